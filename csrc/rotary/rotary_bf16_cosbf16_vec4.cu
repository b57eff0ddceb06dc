// One instantiation per translation unit: rotary embedding, bf16 q/k, bf16 cos/sin, 4 pairs per thread (vector accesses).
#include "rotary/rotary_kernel.cuh"

namespace gptkernels {
template cudaError_t launch_rotary<__nv_bfloat16, __nv_bfloat16, 4>(const RotaryParams&, cudaStream_t);
}  // namespace gptkernels
