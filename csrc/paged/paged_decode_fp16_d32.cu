// One instantiation per translation unit: paged decode, fp16, head dims up to 32
// (8 lanes per key, 1 vector(s) of 4 channels per lane).
#include "paged/paged_decode_kernel.cuh"

namespace gptkernels {
template cudaError_t launch_paged_decode<__half, 8, 1>(const PagedDecodeParams&, cudaStream_t);
}  // namespace gptkernels
