// One instantiation per translation unit: the split merge of paged decode, bf16.
#include "paged/paged_decode_kernel.cuh"

namespace gptkernels {
template cudaError_t launch_paged_decode_merge<__nv_bfloat16>(const PagedDecodeParams&, cudaStream_t);
}  // namespace gptkernels
