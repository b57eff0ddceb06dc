// One instantiation per translation unit: paged cache append, bf16.
#include "paged/paged_append_kernel.cuh"

namespace gptkernels {
template cudaError_t launch_paged_append<__nv_bfloat16>(const PagedAppendParams&, cudaStream_t);
}  // namespace gptkernels
