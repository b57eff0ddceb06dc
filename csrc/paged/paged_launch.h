// The per-dtype / per-bucket launcher templates; defined in paged_append_kernel.cuh and
// paged_decode_kernel.cuh, instantiated once per translation unit; paged_dispatch.cu sees only
// these declarations.
#pragma once

#include <cuda_runtime_api.h>

#include "paged/paged.h"

namespace gptkernels {

template <typename T>
cudaError_t launch_paged_append(const PagedAppendParams& params, cudaStream_t stream);

// LPK lanes per key, NCHUNK 4-element vectors per lane: head dims up to NCHUNK * LPK * 4.
template <typename T, int LPK, int NCHUNK>
cudaError_t launch_paged_decode(const PagedDecodeParams& params, cudaStream_t stream);

template <typename T>
cudaError_t launch_paged_decode_merge(const PagedDecodeParams& params, cudaStream_t stream);

}  // namespace gptkernels
