// (dtype, cos dtype, vectorized) -> the instantiated launcher. Sees only the launcher declarations.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "rotary/rotary.h"
#include "rotary/rotary_launch.h"

namespace gptkernels {

template <typename T, typename CosT, int VEC>
static cudaError_t launch(const RotaryParams& params, cudaStream_t stream) {
  return params.vectorized ? launch_rotary<T, CosT, VEC>(params, stream) : launch_rotary<T, CosT, 1>(params, stream);
}

cudaError_t run_rotary(DType dtype, DType cos_dtype, const RotaryParams& params, cudaStream_t stream) {
  // The vector widths here are rotary_vec_width(dtype).
  switch (dtype) {
    case DType::kFloat16:
      if (cos_dtype == DType::kFloat32) return launch<__half, float, 4>(params, stream);
      if (cos_dtype == DType::kFloat16) return launch<__half, __half, 4>(params, stream);
      break;
    case DType::kBFloat16:
      if (cos_dtype == DType::kFloat32) return launch<__nv_bfloat16, float, 4>(params, stream);
      if (cos_dtype == DType::kBFloat16) return launch<__nv_bfloat16, __nv_bfloat16, 4>(params, stream);
      break;
    case DType::kFloat32:
      if (cos_dtype == DType::kFloat32) return launch<float, float, 2>(params, stream);
      break;
  }
  return cudaErrorInvalidValue;  // the caller checked the combination
}

}  // namespace gptkernels
