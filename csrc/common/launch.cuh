// Kernel launch primitives. Kept in one small header so that the CPU emulator of the tests
// (tests/cuda_emulator, which runs these kernels on CPU threads) can substitute its own version.
#pragma once

#include <cuda_runtime.h>

namespace gptkernels {

// kernel<<<grid, block, smem_bytes, stream>>>(params); `kernel` must be a plain name (no commas).
#define GPTKERNELS_LAUNCH(kernel, grid, block, smem_bytes, stream, params) \
  kernel<<<(grid), (block), (smem_bytes), (stream)>>>(params)

// Opts `kernel` in to `bytes` of dynamic shared memory (needed above 48 KiB).
template <typename Kernel>
inline cudaError_t allow_dynamic_smem(Kernel kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// The status of the last launch from this thread.
inline cudaError_t launch_status() { return cudaGetLastError(); }

}  // namespace gptkernels
