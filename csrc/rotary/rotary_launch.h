// The per-(dtype, cos dtype, vector width) launcher template; defined in rotary_kernel.cuh,
// instantiated once per translation unit (rotary_<dtype>_cos<dtype>_vec<N>.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "rotary/rotary.h"

namespace gptkernels {

// VEC pairs per thread: 1 (any strides) or rotary_vec_width(dtype) (vector loads, see rotary.h).
template <typename T, typename CosT, int VEC>
cudaError_t launch_rotary(const RotaryParams& params, cudaStream_t stream);

}  // namespace gptkernels
