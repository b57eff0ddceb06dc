// The CUDA runtime side of the op implementations: device check, device guard, stream, launch status.
// Kept in one small header so that the CPU emulator of the tests (tests/cuda_emulator, which runs
// the kernels on CPU threads) can substitute its own version.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

namespace gptkernels {

// `ref` is a CUDA tensor (the other tensors are then checked to be on its device).
inline void check_cuda(const at::Tensor& ref, const char* op, const char* ref_name) {
  TORCH_CHECK_VALUE(ref.is_cuda(), op, ": ", ref_name, " must be a CUDA tensor, got a tensor on ", ref.device());
}

// Makes `t`'s device current for the scope (allocations and launches go there).
struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor& t) : guard(t.device()) {}
  c10::cuda::CUDAGuard guard;
};

inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

// A kernel launcher's status: raises a RuntimeError naming the op on a CUDA error.
inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace gptkernels
