// One instantiation per translation unit: rotary embedding, fp32 q/k, fp32 cos/sin, one pair per thread (any strides).
#include "rotary/rotary_kernel.cuh"

namespace gptkernels {
template cudaError_t launch_rotary<float, float, 1>(const RotaryParams&, cudaStream_t);
}  // namespace gptkernels
