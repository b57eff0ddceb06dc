// One instantiation per translation unit: the split merge of paged decode, fp16.
#include "paged/paged_decode_kernel.cuh"

namespace gptkernels {
template cudaError_t launch_paged_decode_merge<__half>(const PagedDecodeParams&, cudaStream_t);
}  // namespace gptkernels
