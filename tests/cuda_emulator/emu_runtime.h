// A CPU emulator of the CUDA execution model, just enough to run gptkernels' kernels unchanged.
//
// Force-included (g++ -include) before every csrc file of the emulator build (see build.py). Each
// CUDA thread of a block runs on its own std::thread; blocks run one after the other.
// __syncthreads() is a block barrier; warp collectives (__shfl_xor_sync, and ldmatrix / mma in
// common/mma.cuh) exchange values through a per-warp buffer between two warp barriers, and compute
// their results from the PTX ISA definitions of those instructions. Dynamic shared memory is
// poisoned with 0xFF bytes (NaN in float16/bfloat16/float32) at every block start, so a kernel that
// reads shared memory it never wrote produces NaNs. A barrier that waits longer than
// GPTKERNELS_EMU_TIMEOUT_S seconds (default 120; a divergent collective) aborts with a message.
//
// What it cannot check: timing, memory ordering of real hardware (cp.async copies complete at
// once here, so a missing wait cannot show), register pressure, occupancy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

// Device-side qualifiers become plain C++.
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
#define __shared__ static  // one block runs at a time: a static local is that block's shared array
#define __launch_bounds__(...)

#define GPTKERNELS_EMULATOR 1

using std::max;
using std::min;

namespace emu {

// A reusable barrier for a fixed set of threads; threads that finish leave it (drop), like exited
// threads at __syncthreads on the GPU.
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
    // Yield a while before sleeping: the other threads of the phase usually arrive within a few
    // scheduler turns, and a futex sleep / wake per thread per phase dominates the run time.
    lock.unlock();
    for (int i = 0; i < 64 && gen_atomic_.load(std::memory_order_acquire) == gen; ++i) std::this_thread::yield();
    lock.lock();
    const auto timeout = std::chrono::seconds(timeout_s());
    if (!cv_.wait_for(lock, timeout, [&] { return gen_ != gen; })) {
      std::fprintf(stderr, "gptkernels emulator: a barrier waited over %d s (divergent collective?)\n", timeout_s());
      std::abort();
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
  static int timeout_s() {
    const char* s = std::getenv("GPTKERNELS_EMU_TIMEOUT_S");
    return s ? std::atoi(s) : 120;
  }
  std::mutex mu_;
  std::condition_variable cv_;
  int count_;
  int arrived_ = 0;
  uint64_t gen_ = 0;
  std::atomic<uint64_t> gen_atomic_{0};  // gen_, readable without the lock
};

struct Warp {
  explicit Warp(int n) : barrier(n) {}
  Barrier barrier;
  alignas(16) unsigned char slot[32][64];  // one value per lane per collective
};

struct BlockState {
  BlockState(int threads, size_t smem_bytes) : barrier(threads), smem(smem_bytes + 16, 0xFF) {
    for (int w = 0; w * 32 < threads; ++w) warps.emplace_back(new Warp(std::min(32, threads - 32 * w)));
  }
  Barrier barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> smem;  // dynamic shared memory (+16 for alignment)
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

}  // namespace emu

// The CUDA built-in variables.
inline emu::Idx blockIdx, blockDim, gridDim;
inline thread_local emu::Idx threadIdx;

inline void __syncthreads() { emu::t_block->barrier.wait(); }

inline float __shfl_xor_sync(unsigned /*mask: all lanes*/, float v, int lane_mask) {
  return emu::warp_exchange(&v, sizeof(v), [&](unsigned char (*slot)[64]) {
    float r;
    std::memcpy(&r, slot[emu::t_lane ^ lane_mask], sizeof(r));
    return r;
  });
}

namespace emu {

// Runs kernel(params) on grid x block threads, one block at a time.
template <typename P>
inline void launch(void (*kernel)(P), dim3 grid, dim3 block, size_t smem_bytes, const P& params) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  gridDim = {grid.x, grid.y, grid.z};
  blockDim = {block.x, block.y, block.z};
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        BlockState state(threads, smem_bytes);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            t_block = &state;
            t_lane = t % 32;
            t_warp = t / 32;
            threadIdx = {static_cast<unsigned>(t % block.x), static_cast<unsigned>(t / block.x % block.y),
                         static_cast<unsigned>(t / (block.x * block.y))};
            kernel(params);
            state.warps[t_warp]->barrier.drop();
            state.barrier.drop();
          });
        }
        for (auto& th : pool) th.join();
      }
    }
  }
}

}  // namespace emu
