// One instantiation per translation unit: rotary embedding, fp32 q/k, fp32 cos/sin, 2 pairs per thread (vector accesses).
#include "rotary/rotary_kernel.cuh"

namespace gptkernels {
template cudaError_t launch_rotary<float, float, 2>(const RotaryParams&, cudaStream_t);
}  // namespace gptkernels
