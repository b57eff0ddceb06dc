// Emulator version of csrc/common/torch_cuda.h: the ops take CPU tensors and launch on CPU threads.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <string>

namespace gptkernels {

inline void check_cuda(const at::Tensor& ref, const char* op, const char* ref_name) {
  TORCH_CHECK_VALUE(ref.is_cpu(), op, ": ", ref_name, " must be a CPU tensor in the emulator, got ", ref.device());
}

struct DeviceGuard {
  explicit DeviceGuard(const at::Tensor&) {}
};

inline cudaStream_t current_stream(const at::Tensor&) { return nullptr; }

// A failed launch raises a RuntimeError naming the op and the emulator's fault (emu_runtime.h).
inline void check_launch(cudaError_t err, const char* op) {
  const std::string fault = ::emu::take_fault();
  TORCH_CHECK(err == cudaSuccess && fault.empty(), op, ": emulated launch failed (cudaError ", static_cast<int>(err),
              "): ", fault);
}

}  // namespace gptkernels
