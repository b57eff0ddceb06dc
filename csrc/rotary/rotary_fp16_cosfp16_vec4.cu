// One instantiation per translation unit: rotary embedding, fp16 q/k, fp16 cos/sin, 4 pairs per thread (vector accesses).
#include "rotary/rotary_kernel.cuh"

namespace gptkernels {
template cudaError_t launch_rotary<__half, __half, 4>(const RotaryParams&, cudaStream_t);
}  // namespace gptkernels
