// Self-test kernels of the emulator (built into it, never into the real extension): each one has a
// bug that only a GPU would show, and tests/test_cuda_emulated.py checks that the emulator shows it
// too (wrong data or a failed launch), and that the correct variant passes. This is what keeps the
// emulator's detectors (emu_runtime.h) honest.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "common/launch.cuh"
#include "common/mma.cuh"
#include "common/torch_cuda.h"

namespace gptkernels {
namespace emu_selftest {

enum Mode : int { kCorrect, kNoWait, kNoCommit, kNoBarrier, kMisalignedVector, kMisalignedCpAsync,
                  kMisalignedLdmatrix, kIntOverflow };

struct Params {
  const float* src;  // 4 * threads floats (16-byte aligned)
  float* dst;        // gridDim.x * 4 * threads floats
  int big;           // a large int (kIntOverflow)
  int mode;
};

// 64 threads (2 warps). Thread t stages 16 bytes of src in shared memory with cp.async, then writes
// out the 16 bytes the other warp staged (t + 32) % 64: correct only with commit, wait and barrier.
__global__ void __launch_bounds__(64) exchange_kernel(const Params p) {
  float* sm = reinterpret_cast<float*>(dynamic_smem());
  const int t = threadIdx.x;
  float* out = p.dst + static_cast<int64_t>(blockIdx.x) * 4 * 64;
  if (p.mode == kMisalignedCpAsync) {
    cp_async_16(sm + 4 * t, p.src + 4 * t + 1);  // source 4 bytes off
  } else {
    cp_async_16(sm + 4 * t, p.src + 4 * t);
  }
  if (p.mode != kNoCommit) cp_async_commit();
  if (p.mode != kNoWait) cp_async_wait_all();
  if (p.mode != kNoBarrier) __syncthreads();
  const int o = (t + 32) % 64;
  for (int e = 0; e < 4; ++e) out[4 * t + e] = sm[4 * o + e];
  if (p.mode == kMisalignedVector) {
    const float4 x = *reinterpret_cast<const float4*>(p.src + 4 * (t % 32) + 2);  // 8 bytes off a 16-byte load
    out[4 * t] = x.x;
  }
  if (p.mode == kMisalignedLdmatrix) {
    uint32_t r[4];
    ldmatrix_x4(r, sm + 4 * (t % 32) + 1);  // row addresses 4 bytes off
    out[4 * t] = static_cast<float>(r[0]);
  }
  if (p.mode == kIntOverflow) {
    const int off = (t + 1) * p.big;  // int32 math on a 64-bit-sized offset
    out[4 * t] = static_cast<float>(off % 7);
  }
}

// For the launch configurations the driver refuses or accepts (one instantiation per case: the
// shared-memory opt-in is a property of the kernel).
template <int CASE>
__global__ void __launch_bounds__(32) touch_smem_kernel(const Params p) {
  float* sm = reinterpret_cast<float*>(dynamic_smem());
  sm[threadIdx.x] = 1.f;
  __syncthreads();
  p.dst[threadIdx.x] = sm[31 - threadIdx.x];
}

// Static __shared__ arrays start poisoned in every block (emu_shared.ld gathers them): thread t
// reads the slot of thread t ^ 1, which only even threads write unless ALL.
template <bool ALL>
__global__ void __launch_bounds__(64) static_smem_template_kernel(const Params p) {
  __shared__ float buf[64];
  if (ALL || threadIdx.x % 2 == 0) buf[threadIdx.x] = 1.f;
  __syncthreads();
  p.dst[blockIdx.x * 64 + threadIdx.x] = buf[threadIdx.x ^ 1];
}
__global__ void __launch_bounds__(64) static_smem_plain_kernel(const Params p) {  // not a template
  __shared__ float buf[64];
  if (threadIdx.x % 2 == 0) buf[threadIdx.x] = 1.f;
  __syncthreads();
  p.dst[blockIdx.x * 64 + threadIdx.x] = buf[threadIdx.x ^ 1];
}

at::Tensor selftest(const std::string& which, const at::Tensor& src) {
  TORCH_CHECK_VALUE(src.is_cpu() && src.scalar_type() == at::kFloat && src.is_contiguous() && src.numel() == 256,
                    "selftest: src must be 256 contiguous float32 values on the CPU");
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(src.data_ptr()) % 16 == 0, "selftest: src must be 16-byte aligned");
  static const char* kModes[] = {"correct", "no_wait", "no_commit", "no_barrier", "misaligned_vector",
                                 "misaligned_cp_async", "misaligned_ldmatrix", "int_overflow"};
  Params p{};
  p.src = src.data_ptr<float>();
  p.big = 1 << 30;
  for (int m = 0; m < static_cast<int>(sizeof(kModes) / sizeof(kModes[0])); ++m) {
    if (which == kModes[m]) {
      at::Tensor dst = at::empty({4, 256}, src.options());  // 4 blocks: early / late cp.async, both warp orders
      p.dst = dst.data_ptr<float>();
      p.mode = m;
      GPTKERNELS_LAUNCH(exchange_kernel, dim3(4), dim3(64), 64 * 16, nullptr, p);
      check_launch(launch_status(), "selftest");
      return dst;
    }
  }
  if (which.rfind("static_smem_", 0) == 0) {
    at::Tensor dst = at::empty({2, 64}, src.options());  // 2 blocks: the second must not see the first's data
    p.dst = dst.data_ptr<float>();
    if (which == "static_smem_written") {
      GPTKERNELS_LAUNCH(static_smem_template_kernel<true>, dim3(2), dim3(64), 0, nullptr, p);
    } else if (which == "static_smem_unwritten_template") {
      GPTKERNELS_LAUNCH(static_smem_template_kernel<false>, dim3(2), dim3(64), 0, nullptr, p);
    } else if (which == "static_smem_unwritten_plain") {
      GPTKERNELS_LAUNCH(static_smem_plain_kernel, dim3(2), dim3(64), 0, nullptr, p);
    } else {
      TORCH_CHECK_VALUE(false, "selftest: unknown case ", which);
    }
    check_launch(launch_status(), "selftest");
    return dst;
  }
  at::Tensor dst = at::empty({32}, src.options());
  p.dst = dst.data_ptr<float>();
  if (which == "grid_y_too_large") {
    GPTKERNELS_LAUNCH(touch_smem_kernel<0>, dim3(1, 65536, 1), dim3(32), 128, nullptr, p);
  } else if (which == "smem_without_opt_in") {
    GPTKERNELS_LAUNCH(touch_smem_kernel<1>, dim3(1), dim3(32), 64 * 1024, nullptr, p);
  } else if (which == "smem_with_opt_in") {
    check_launch(allow_dynamic_smem(touch_smem_kernel<2>, 64 * 1024), "selftest");
    GPTKERNELS_LAUNCH(touch_smem_kernel<2>, dim3(1), dim3(32), 64 * 1024, nullptr, p);
  } else {
    TORCH_CHECK_VALUE(false, "selftest: unknown case ", which);
  }
  check_launch(launch_status(), "selftest");
  return dst;
}

}  // namespace emu_selftest
}  // namespace gptkernels

#define GPTKERNELS_SELFTEST_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
GPTKERNELS_SELFTEST_FRAGMENT(GPTKERNELS_OPS_NAMESPACE, m) {
  m.def("selftest(str which, Tensor src) -> Tensor", &gptkernels::emu_selftest::selftest);
}
