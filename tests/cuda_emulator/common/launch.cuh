// Emulator version of csrc/common/launch.cuh: launches run on CPU threads (emu_runtime.h).
#pragma once

#include <cuda_runtime.h>

namespace gptkernels {

#define GPTKERNELS_LAUNCH(kernel, grid, block, smem_bytes, stream, params) \
  ::emu::launch(kernel, dim3(grid), dim3(block), static_cast<size_t>(smem_bytes), params)

template <typename Kernel>
inline cudaError_t allow_dynamic_smem(Kernel, int) {
  return cudaSuccess;
}

inline cudaError_t launch_status() { return cudaSuccess; }

}  // namespace gptkernels
