// One instantiation per translation unit: the flash attention forward kernel for head dim 128, fp16.
#include "attention/flash_fwd_kernel.cuh"

namespace gptkernels {
template cudaError_t launch_flash_fwd<__half, 128>(const FlashFwdParams&, cudaStream_t);
}  // namespace gptkernels
