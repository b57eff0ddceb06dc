// One instantiation per translation unit: paged decode, fp32, head dims up to 256
// (32 lanes per key, 2 vector(s) of 4 channels per lane).
#include "paged/paged_decode_kernel.cuh"

namespace gptkernels {
template cudaError_t launch_paged_decode<float, 32, 2>(const PagedDecodeParams&, cudaStream_t);
}  // namespace gptkernels
