// Paged cache append: token t of k, v (T, Hkv, D) goes to cache slot slot_mapping[t]. One thread
// block per token; its threads copy the token's Hkv * D elements of k and of v. A slot of -1 (or
// any slot outside the cache) is skipped, never written.
//
// Included by the per-dtype translation units paged_append_<dtype>.cu (one instantiation each).
#pragma once

#include <cuda_runtime.h>

#include "common/device.cuh"
#include "common/launch.cuh"
#include "paged/paged.h"
#include "paged/paged_launch.h"

namespace gptkernels {
namespace paged {

constexpr int kAppendThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kAppendThreads) paged_append_kernel(const PagedAppendParams p) {
  const int t = blockIdx.x;  // token
  const int64_t slot = p.slots_int64 ? static_cast<const int64_t*>(p.slot_mapping)[t * p.slot_stride]
                                     : static_cast<const int32_t*>(p.slot_mapping)[t * p.slot_stride];
  if (slot < 0 || slot >= p.num_slots) return;  // -1: padding token; anything else outside: masked
  const int64_t blk = slot / p.block_size;      // cache block
  const int64_t row = slot % p.block_size;      // row inside the block
  const T* k = static_cast<const T*>(p.k) + t * p.k_stride[0];
  const T* v = static_cast<const T*>(p.v) + t * p.v_stride[0];
  T* kc = static_cast<T*>(p.k_cache) + blk * p.k_cache_stride[0] + row * p.k_cache_stride[1];
  T* vc = static_cast<T*>(p.v_cache) + blk * p.v_cache_stride[0] + row * p.v_cache_stride[1];
  const int n = p.num_heads * p.head_dim;
  for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
    const int h = idx / p.head_dim;  // kv head
    const int d = idx % p.head_dim;  // channel (consecutive threads: consecutive channels, coalesced)
    kc[h * p.k_cache_stride[2] + d * p.k_cache_stride[3]] = k[h * p.k_stride[1] + d * p.k_stride[2]];
    vc[h * p.v_cache_stride[2] + d * p.v_cache_stride[3]] = v[h * p.v_stride[1] + d * p.v_stride[2]];
  }
}

}  // namespace paged

template <typename T>
cudaError_t launch_paged_append(const PagedAppendParams& params, cudaStream_t stream) {
  if (params.num_tokens == 0 || params.num_heads * params.head_dim == 0) return cudaSuccess;
  auto kernel = paged::paged_append_kernel<T>;
  GPTKERNELS_LAUNCH(kernel, dim3(params.num_tokens), paged::kAppendThreads, 0, stream, params);
  return launch_status();
}

}  // namespace gptkernels
