// Emulator version of csrc/common/launch.cuh: launches run on CPU threads (emu_runtime.h), after
// the launch-configuration checks of the driver; a fault in the kernel fails the launch.
#pragma once

#include <cuda_runtime.h>

namespace gptkernels {

#define GPTKERNELS_LAUNCH(kernel, grid, block, smem_bytes, stream, params) \
  ::emu::launch(kernel, dim3(grid), dim3(block), static_cast<size_t>(smem_bytes), params)

// Records the opt-in: launches above 48 KiB of dynamic shared memory need it (as on the GPU).
template <typename Kernel>
inline cudaError_t allow_dynamic_smem(Kernel kernel, int bytes) {
  if (bytes < 0 || static_cast<size_t>(bytes) > ::emu::kMaxDynamicSmemOptIn) return cudaErrorInvalidValue;
  ::emu::smem_opt_in()[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(bytes);
  return cudaSuccess;
}

// The fault of the last launch, if any (check_launch in common/torch_cuda.h reports its message).
inline cudaError_t launch_status() { return ::emu::faulted() ? cudaErrorLaunchFailure : cudaSuccess; }

}  // namespace gptkernels
