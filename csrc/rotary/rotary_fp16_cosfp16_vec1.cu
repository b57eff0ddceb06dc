// One instantiation per translation unit: rotary embedding, fp16 q/k, fp16 cos/sin, one pair per thread (any strides).
#include "rotary/rotary_kernel.cuh"

namespace gptkernels {
template cudaError_t launch_rotary<__half, __half, 1>(const RotaryParams&, cudaStream_t);
}  // namespace gptkernels
