// dtype (and head-dim bucket) -> the instantiated launchers. Sees only the launcher declarations.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "paged/paged.h"
#include "paged/paged_launch.h"

namespace gptkernels {

cudaError_t run_paged_append(DType dtype, const PagedAppendParams& params, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: return launch_paged_append<__half>(params, stream);
    case DType::kBFloat16: return launch_paged_append<__nv_bfloat16>(params, stream);
    case DType::kFloat32: return launch_paged_append<float>(params, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
static cudaError_t decode_bucket(const PagedDecodeParams& params, cudaStream_t stream) {
  const int d = params.head_dim;
  cudaError_t err;
  if (d <= 32) {
    err = launch_paged_decode<T, 8, 1>(params, stream);
  } else if (d <= 64) {
    err = launch_paged_decode<T, 16, 1>(params, stream);
  } else if (d <= 128) {
    err = launch_paged_decode<T, 32, 1>(params, stream);
  } else if (d <= kDecodeMaxHeadDim) {
    err = launch_paged_decode<T, 32, 2>(params, stream);
  } else {
    return cudaErrorInvalidValue;  // the caller checked the head dim
  }
  if (err != cudaSuccess || params.num_splits == 1) return err;
  return launch_paged_decode_merge<T>(params, stream);
}

cudaError_t run_paged_decode(DType dtype, const PagedDecodeParams& params, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: return decode_bucket<__half>(params, stream);
    case DType::kBFloat16: return decode_bucket<__nv_bfloat16>(params, stream);
    case DType::kFloat32: return decode_bucket<float>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gptkernels
