// A CPU emulator of the CUDA execution model, just enough to run gptkernels' kernels unchanged.
//
// Force-included (g++ -include) before every csrc file of the emulator build (see build.py). Each
// CUDA thread of a block runs on its own std::thread; blocks run one after the other.
// Warp collectives (__shfl_xor_sync, and ldmatrix / mma in common/mma.cuh) exchange values through
// a per-warp buffer between two warp barriers, and compute their results from the PTX ISA
// definitions of those instructions.
//
// It is built to make the bugs a GPU would show fail here too, deterministically:
//
// * Warps run one at a time between block barriers ("phases"): warp order[0] runs until all its
//   lanes reach __syncthreads() (or exit), then order[1], ... Any order is a legal GPU schedule, so
//   a correct kernel passes; a missing __syncthreads() between a producer warp and a consumer warp
//   makes the consumer read stale data whenever it runs first. Odd blocks (linear index) run their
//   warps in reverse order, so both directions are exercised.
// * cp.async (common/mma.cuh) lands "late" in blocks 0, 1 (mod 4): the copy happens at the issuing
//   thread's cp.async.wait_group, and only for committed groups, so a missing wait or commit leaves
//   the poisoned / stale data in place. In blocks 2, 3 (mod 4) it lands "early", at issue, so a copy
//   issued while other warps still read the buffer (a missing barrier before a refill) overwrites
//   their data first.
// * Shared memory is poisoned with 0xFF bytes (NaN in float16/bfloat16/float32) at every block
//   start: the dynamic buffer and the static __shared__ arrays (kept in their own linker section).
//   Uninitialized locals are pattern-filled (-ftrivial-auto-var-init=pattern, build.py: 0xFE bytes,
//   a finite float, so an uninitialized register that the kernel only ever scales by 0 goes unseen;
//   on a GPU it could hold NaN).
// * Faults a GPU raises fail the launch (RuntimeError from check_launch, naming the cause):
//   misaligned or out-of-bounds cp.async / ldmatrix addresses; any misaligned typed access (vector
//   loads and stores through uint2 / float4 / aligned structs) and signed int overflow in kernel
//   code (-fsanitize=alignment,signed-integer-overflow, whose handlers are defined below); launch
//   configurations the driver rejects (block > 1024 threads, gridDim.y/z > 65535, dynamic shared
//   memory above 48 KiB without the opt-in, or above the opt-in).
// * __shfl_xor_sync takes the full-warp mask only (another mask faults), and every lane of the
//   warp must reach each collective: a divergent collective hangs, and a wait with no progress
//   for GPTKERNELS_EMU_TIMEOUT_S seconds (default 120) aborts the process with a message.
//
// What it cannot check: timing, register pressure, occupancy, __launch_bounds__ against the block
// size launched (the macro is dropped), the rounding of real tensor cores, and races between lanes
// of one warp (they run concurrently, like on the GPU, but unordered).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

// Device-side qualifiers become plain C++. Static __shared__ arrays are gathered in one section
// (the attribute below for plain functions, emu_shared.ld for templates), so that the launch can
// poison them (all of them: blocks run one at a time) before every block.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static __attribute__((section("gptkernels_emu_shared")))
#define __launch_bounds__(...)

#define GPTKERNELS_EMULATOR 1

// Bounds of the static __shared__ section (defined by the linker; weak: null when no kernel has one).
extern "C" char __start_gptkernels_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_gptkernels_emu_shared[] __attribute__((weak, visibility("hidden")));

using std::max;
using std::min;

namespace emu {

inline int timeout_s() {
  const char* s = std::getenv("GPTKERNELS_EMU_TIMEOUT_S");
  return s ? std::atoi(s) : 120;
}

[[noreturn]] inline void deadlock(const char* what) {
  std::fprintf(stderr, "gptkernels emulator: %s waited over %d s (divergent collective or barrier?)\n", what,
               timeout_s());
  std::abort();
}

// ---- faults: the first one of a launch is kept; the launch then reports it (and stops) ----------

struct Faults {
  std::mutex mu;
  std::string first;
  std::atomic<bool> any{false};
};
inline Faults& faults() {
  static Faults f;
  return f;
}
inline void fault(const std::string& msg) {
  Faults& f = faults();
  std::lock_guard<std::mutex> lock(f.mu);
  if (!f.any.load()) f.first = msg;
  f.any.store(true);
}
inline bool faulted() { return faults().any.load(); }
// The fault message, cleared (the next launch starts clean).
inline std::string take_fault() {
  Faults& f = faults();
  std::lock_guard<std::mutex> lock(f.mu);
  std::string msg = f.any.load() ? f.first : std::string();
  f.first.clear();
  f.any.store(false);
  return msg;
}

// A reusable barrier for a fixed set of threads; threads that finish leave it (drop), like exited
// threads at a warp collective on the GPU. Used for the lanes of one warp.
class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t gen = gen_;
    if (++arrived_ >= count_) {
      next_phase();
      return;
    }
    // Yield a while before sleeping: the other lanes usually arrive within a few scheduler turns,
    // and a futex sleep / wake per thread per phase dominates the run time.
    lock.unlock();
    for (int i = 0; i < 64 && gen_atomic_.load(std::memory_order_acquire) == gen; ++i) std::this_thread::yield();
    lock.lock();
    if (!cv_.wait_for(lock, std::chrono::seconds(timeout_s()), [&] { return gen_ != gen; })) {
      deadlock("a warp collective");
    }
  }
  void drop() {
    std::unique_lock<std::mutex> lock(mu_);
    --count_;
    if (count_ > 0 && arrived_ >= count_) next_phase();
  }

 private:
  void next_phase() {
    arrived_ = 0;
    ++gen_;
    gen_atomic_.store(gen_, std::memory_order_release);
    cv_.notify_all();
  }
  std::mutex mu_;
  std::condition_variable cv_;
  int count_;
  int arrived_ = 0;
  uint64_t gen_ = 0;
  std::atomic<uint64_t> gen_atomic_{0};  // gen_, readable without the lock
};

// Runs the warps of a block one at a time, in `order`, from one __syncthreads() to the next: a warp
// hands over when every live lane of it waits at the barrier (or has exited); when the last warp
// in the order hands over, the barrier opens and order[0] runs again. Lanes of the running warp run
// concurrently (warp collectives need that).
class WarpScheduler {
 public:
  WarpScheduler(int threads, bool reverse) : n_((threads + 31) / 32), cvs_(new std::condition_variable[n_]) {
    for (int w = 0; w < n_; ++w) {
      live_.push_back(std::min(32, threads - 32 * w));
      arrived_.push_back(0);
      order_.push_back(reverse ? n_ - 1 - w : w);
    }
    total_live_ = threads;
  }
  void start(int w) {
    std::unique_lock<std::mutex> lock(mu_);
    wait_turn(lock, w, 0);
  }
  void sync(int w) {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t gen = gen_;
    ++arrived_[w];
    if (arrived_[w] == live_[w]) pass_on();
    wait_turn(lock, w, gen + 1);
  }
  void exit(int w) {
    std::unique_lock<std::mutex> lock(mu_);
    --live_[w];
    --total_live_;
    if (current() == w && arrived_[w] == live_[w]) pass_on();
  }

 private:
  int current() const { return pos_ < n_ ? order_[pos_] : -1; }
  void skip_finished() {
    while (pos_ < n_ && live_[order_[pos_]] == 0) ++pos_;
  }
  void pass_on() {
    ++handovers_;
    ++pos_;
    skip_finished();
    if (pos_ == n_) {
      if (total_live_ == 0) return;  // the block is done
      // Every live thread waits at the barrier: it opens.
      ++gen_;
      std::fill(arrived_.begin(), arrived_.end(), 0);
      pos_ = 0;
      skip_finished();
    }
    cvs_[order_[pos_]].notify_all();
  }
  // A warp may wait for its turn through several other warps' phases: only a timeout without any
  // hand-over in between is a hang.
  void wait_turn(std::unique_lock<std::mutex>& lock, int w, uint64_t min_gen) {
    for (;;) {
      const uint64_t seen = handovers_;
      if (cvs_[w].wait_for(lock, std::chrono::seconds(timeout_s()),
                           [&] { return gen_ >= min_gen && current() == w; })) {
        return;
      }
      if (handovers_ == seen) deadlock("__syncthreads()");
    }
  }

  const int n_;
  std::unique_ptr<std::condition_variable[]> cvs_;
  std::mutex mu_;
  std::vector<int> live_, arrived_, order_;
  int total_live_ = 0;
  int pos_ = 0;
  uint64_t gen_ = 0;
  uint64_t handovers_ = 0;
};

struct Warp {
  explicit Warp(int n) : barrier(n) {}
  Barrier barrier;
  alignas(16) unsigned char slot[32][64];  // one value per lane per collective
};

struct BlockState {
  BlockState(int threads, size_t smem_bytes, bool reverse, bool late)
      : sched(threads, reverse), smem(smem_bytes + 16, 0xFF), smem_bytes(smem_bytes), cp_async_late(late) {
    for (int w = 0; w * 32 < threads; ++w) warps.emplace_back(new Warp(std::min(32, threads - 32 * w)));
  }
  WarpScheduler sched;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> smem;  // dynamic shared memory (+16 for alignment)
  size_t smem_bytes;
  bool cp_async_late;  // cp.async lands at the wait (else at issue)
  unsigned char* smem_aligned() {
    return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem.data()) + 15) & ~uintptr_t(15));
  }
};

struct Idx {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local BlockState* t_block = nullptr;
inline thread_local int t_lane = 0;
inline thread_local int t_warp = 0;
// Where a kernel thread goes when its code faults (a UBSan check, below): out of the kernel, as if
// the thread had exited. Kernel frames hold only trivially destructible objects, so the jump skips
// nothing that needs to run.
inline thread_local std::jmp_buf* t_fault_exit = nullptr;

// Every lane of the calling warp contributes `bytes` (<= 64) from `mine`; `f` then reads all lanes'
// contributions (slot[lane]) and its result is returned to each caller.
template <typename F>
inline auto warp_exchange(const void* mine, size_t bytes, F&& f) {
  Warp& w = *t_block->warps[t_warp];
  std::memcpy(w.slot[t_lane], mine, bytes);
  w.barrier.wait();
  auto result = f(w.slot);
  w.barrier.wait();  // nobody overwrites a slot before every lane has read
  return result;
}

inline unsigned char* dynamic_smem() { return t_block->smem_aligned(); }

// `bytes` at `p` lie in the block's dynamic shared memory, `align`-byte aligned; else a fault.
inline bool check_smem(const char* what, const void* p, size_t bytes, size_t align) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t lo = reinterpret_cast<uintptr_t>(t_block->smem_aligned());
  char buf[200];
  if (a < lo || a + bytes > lo + t_block->smem_bytes) {
    std::snprintf(buf, sizeof(buf), "%s: shared address out of bounds (offset %lld of %zu bytes)", what,
                  static_cast<long long>(a - lo), t_block->smem_bytes);
  } else if (a % align != 0) {
    std::snprintf(buf, sizeof(buf), "%s: misaligned shared address (offset %llu, needs %zu-byte alignment)",
                  what, static_cast<unsigned long long>(a - lo), align);
  } else {
    return true;
  }
  fault(buf);
  return false;
}

// Launch limits of the driver (sm_80 / sm_90).
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
constexpr size_t kMaxDynamicSmemOptIn = 227 * 1024;

// cudaFuncAttributeMaxDynamicSharedMemorySize per kernel (allow_dynamic_smem in common/launch.cuh).
inline std::map<const void*, size_t>& smem_opt_in() {
  static std::map<const void*, size_t> m;
  return m;
}

}  // namespace emu

// The CUDA built-in variables.
inline emu::Idx blockIdx, blockDim, gridDim;
inline thread_local emu::Idx threadIdx;

inline void __syncthreads() { emu::t_block->sched.sync(emu::t_warp); }

// Full-warp masks only (what the kernels use): every lane must call it, at the same point.
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu) emu::fault("__shfl_xor_sync: only the full-warp mask is emulated");
  return emu::warp_exchange(&v, sizeof(v), [&](unsigned char (*slot)[64]) {
    float r;
    std::memcpy(&r, slot[emu::t_lane ^ lane_mask], sizeof(r));
    return r;
  });
}

namespace emu {

// Runs kernel(params) on grid x block threads, one block at a time (see the top of this file).
template <typename P>
inline void launch(void (*kernel)(P), dim3 grid, dim3 block, size_t smem_bytes, const P& params) {
  const long long threads = static_cast<long long>(block.x) * block.y * block.z;
  char buf[240];
  const auto opt_in = smem_opt_in().find(reinterpret_cast<const void*>(kernel));
  const size_t smem_limit = opt_in == smem_opt_in().end() ? kDefaultDynamicSmem : opt_in->second;
  if (threads < 1 || threads > 1024 || block.z > 64 || grid.x < 1 || grid.y < 1 || grid.z < 1 ||
      grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    std::snprintf(buf, sizeof(buf), "invalid launch configuration: grid (%u, %u, %u), block (%u, %u, %u)", grid.x,
                  grid.y, grid.z, block.x, block.y, block.z);
    fault(buf);
    return;
  }
  if (smem_bytes > smem_limit || smem_bytes > kMaxDynamicSmemOptIn) {
    std::snprintf(buf, sizeof(buf),
                  "%zu bytes of dynamic shared memory: above the kernel's limit of %zu (48 KiB unless "
                  "cudaFuncSetAttribute raised it, at most 227 KiB)",
                  smem_bytes, smem_limit);
    fault(buf);
    return;
  }
  gridDim = {grid.x, grid.y, grid.z};
  blockDim = {block.x, block.y, block.z};
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        if (faulted()) return;  // like the GPU: a faulting kernel stops
        blockIdx = {x, y, z};
        const uint64_t linear = x + static_cast<uint64_t>(grid.x) * (y + static_cast<uint64_t>(grid.y) * z);
        if (__start_gptkernels_emu_shared != nullptr && __stop_gptkernels_emu_shared != nullptr) {
          std::memset(__start_gptkernels_emu_shared, 0xFF, __stop_gptkernels_emu_shared - __start_gptkernels_emu_shared);
        }
        BlockState state(static_cast<int>(threads), smem_bytes, /*reverse=*/linear % 2 == 1,
                         /*late=*/(linear / 2) % 2 == 0);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            t_block = &state;
            t_lane = t % 32;
            t_warp = t / 32;
            threadIdx = {static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                         static_cast<unsigned>(t / (block.x * block.y))};
            std::jmp_buf fault_exit;
            t_fault_exit = &fault_exit;
            state.sched.start(t_warp);
            if (setjmp(fault_exit) == 0) kernel(params);
            t_fault_exit = nullptr;
            state.warps[t_warp]->barrier.drop();
            state.sched.exit(t_warp);
          });
        }
        for (auto& th : pool) th.join();
      }
    }
  }
}

// ---- UBSan handlers (-fsanitize=alignment,signed-integer-overflow, see build.py) -----------------
// Only kernel code counts (a thread of an emulated block); the host code of the TUs is ignored. The
// faulting thread leaves the kernel before the access (a misaligned SSE access would crash the
// process; a wrapped offset would read anywhere), and the launch fails.

struct UbsanLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
struct UbsanTypeMismatch {  // GCC / LLVM TypeMismatchData (the _v1 handler)
  UbsanLocation loc;
  const void* type;
  unsigned char log_alignment;
  unsigned char kind;
};

inline void ubsan_fault(const void* data, const char* what, const void* ptr = nullptr, size_t align = 0) {
  if (t_block == nullptr) return;
  const auto* loc = static_cast<const UbsanLocation*>(data);
  const char* file = loc->file ? std::strrchr(loc->file, '/') : nullptr;
  char buf[300];
  if (ptr != nullptr) {
    std::snprintf(buf, sizeof(buf), "%s:%u: %s (address %p, needs %zu-byte alignment)",
                  file ? file + 1 : loc->file, loc->line, what, ptr, align);
  } else {
    std::snprintf(buf, sizeof(buf), "%s:%u: %s", file ? file + 1 : loc->file, loc->line, what);
  }
  fault(buf);
  if (t_fault_exit != nullptr) std::longjmp(*t_fault_exit, 1);
}

}  // namespace emu

#define GPTKERNELS_EMU_HANDLER extern "C" __attribute__((weak, visibility("hidden"), used))
GPTKERNELS_EMU_HANDLER void __ubsan_handle_type_mismatch_v1(void* data, void* ptr) {
  const auto* d = static_cast<const emu::UbsanTypeMismatch*>(data);
  const size_t align = size_t(1) << d->log_alignment;
  if (ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % align != 0) {
    emu::ubsan_fault(data, "misaligned memory access", ptr, align);
  }
}
GPTKERNELS_EMU_HANDLER void __ubsan_handle_add_overflow(void* data, void*, void*) {
  emu::ubsan_fault(data, "signed integer overflow in +");
}
GPTKERNELS_EMU_HANDLER void __ubsan_handle_sub_overflow(void* data, void*, void*) {
  emu::ubsan_fault(data, "signed integer overflow in -");
}
GPTKERNELS_EMU_HANDLER void __ubsan_handle_mul_overflow(void* data, void*, void*) {
  emu::ubsan_fault(data, "signed integer overflow in *");
}
GPTKERNELS_EMU_HANDLER void __ubsan_handle_negate_overflow(void* data, void*) {
  emu::ubsan_fault(data, "signed integer overflow in unary -");
}
GPTKERNELS_EMU_HANDLER void __ubsan_handle_divrem_overflow(void* data, void*, void*) {
  emu::ubsan_fault(data, "signed integer overflow (or division by zero) in / or %");
}
#undef GPTKERNELS_EMU_HANDLER
