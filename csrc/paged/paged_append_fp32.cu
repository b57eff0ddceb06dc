// One instantiation per translation unit: paged cache append, fp32.
#include "paged/paged_append_kernel.cuh"

namespace gptkernels {
template cudaError_t launch_paged_append<float>(const PagedAppendParams&, cudaStream_t);
}  // namespace gptkernels
