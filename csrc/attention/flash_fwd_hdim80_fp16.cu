// One instantiation per translation unit: the flash attention forward kernel for head dim 80, fp16.
#include "attention/flash_fwd_kernel.cuh"

namespace gptkernels {
template cudaError_t launch_flash_fwd<__half, 80>(const FlashFwdParams&, cudaStream_t);
}  // namespace gptkernels
