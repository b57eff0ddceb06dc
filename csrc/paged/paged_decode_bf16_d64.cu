// One instantiation per translation unit: paged decode, bf16, head dims up to 64
// (16 lanes per key, 1 vector(s) of 4 channels per lane).
#include "paged/paged_decode_kernel.cuh"

namespace gptkernels {
template cudaError_t launch_paged_decode<__nv_bfloat16, 16, 1>(const PagedDecodeParams&, cudaStream_t);
}  // namespace gptkernels
