// Paged decode (one query token per sequence) on CUDA cores, split-K (flash-decoding).
//
// Grid (num_splits, Hkv * head_chunks, B). A thread block serves one kv head and up to
// kDecodeMaxGroup query heads of its GQA group (all of them when the group is that small: each K/V
// row is read once for the whole group), for one split of the sequence's visible keys. Its 4 warps
// are cut into "key groups" of LPK lanes; a key group takes one key at a time, each lane holding
// NCHUNK * 4 channels of it (4-element vector loads). Each key group keeps an online softmax (max,
// sum, accumulator) per query head; at the end the block merges its key groups through shared
// memory and writes the split's normalized output and lse. With more than one split,
// paged_decode_merge_kernel then merges the splits (a log-sum-exp weighted average).
//
// Template buckets: (LPK, NCHUNK) = (8, 1) for D <= 32, (16, 1) for D <= 64, (32, 1) for D <= 128,
// (32, 2) for D <= 256. Included by paged_decode_<dtype>_d<max D>.cu (one instantiation each).
#pragma once

#include <cuda_runtime.h>

#include <cmath>

#include "common/device.cuh"
#include "common/launch.cuh"
#include "paged/paged.h"
#include "paged/paged_launch.h"

namespace gptkernels {
namespace paged {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kMergeThreads = 128;
constexpr int kMaxSplits = 128;  // the host caps num_splits here (the merge kernel's shared memory)

// Four consecutive elements (8 bytes for 16-bit types, 16 for float32; the caller guarantees the
// alignment) converted to float.
__device__ __forceinline__ void load4(const float* src, float* dst) {
  const float4 x = *reinterpret_cast<const float4*>(src);
  dst[0] = x.x;
  dst[1] = x.y;
  dst[2] = x.z;
  dst[3] = x.w;
}
__device__ __forceinline__ void load4(const __half* src, float* dst) {
  const uint2 raw = *reinterpret_cast<const uint2*>(src);
  const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&raw.x));
  const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&raw.y));
  dst[0] = lo.x;
  dst[1] = lo.y;
  dst[2] = hi.x;
  dst[3] = hi.y;
}
__device__ __forceinline__ void load4(const __nv_bfloat16* src, float* dst) {
  const uint2 raw = *reinterpret_cast<const uint2*>(src);
  const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
  const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
  dst[0] = lo.x;
  dst[1] = lo.y;
  dst[2] = hi.x;
  dst[3] = hi.y;
}

template <typename T, int LPK, int NCHUNK>
__global__ void __launch_bounds__(kDecodeThreads) paged_decode_kernel(const PagedDecodeParams p) {
  constexpr int kKeyGroupsPerWarp = 32 / LPK;                    // keys a warp works on at once
  constexpr int kKeyGroups = kDecodeWarps * kKeyGroupsPerWarp;   // keys the block works on at once
  constexpr int kElems = NCHUNK * 4;                             // channels per lane
  constexpr int kDimPad = NCHUNK * LPK * 4;                      // channels per key group (>= D)
  constexpr int G = kDecodeMaxGroup;                             // query heads per block (at most)
  constexpr int KU = NCHUNK == 1 ? 4 : 2;                        // keys per key group per iteration
  // Lane gl of a key group holds channels d(c, v) = (c * LPK + gl) * 4 + v, c < NCHUNK, v < 4:
  // consecutive lanes read consecutive 4-element vectors (coalesced).

  __shared__ float sm_max[kKeyGroups][G];
  __shared__ float sm_sum[kKeyGroups][G];
  __shared__ float sm_acc[kKeyGroups][G][kDimPad];

  const int split = blockIdx.x;
  const int hk = blockIdx.y / p.head_chunks;     // kv head
  const int chunk = blockIdx.y % p.head_chunks;  // which G query heads of the group
  const int b = blockIdx.z;                      // sequence
  const int group = p.num_heads_q / p.num_heads_kv;
  const int h0 = hk * group + chunk * G;         // first query head of this block
  const int nh = min(G, group - chunk * G);      // query heads of this block (block-uniform)
  const int D = p.head_dim;

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int kg = lane / LPK;                          // key group within the warp
  const int gl = lane % LPK;                          // lane within the key group
  const int gid = warp * kKeyGroupsPerWarp + kg;      // key group within the block

  // ---- the keys of this split: [s_lo, s_hi) ----
  // The query sits at position L - 1, L = seq_lens[b] as given (never clamped to the table), and
  // sees keys [max(0, L - W), L) (all L without a window). Keys past the block table's capacity
  // are missing: like keys behind a bad table entry they contribute nothing, so the splits cover
  // [k_lo, k_hi) only. (The Triton kernel and the torch backend follow the same rule.)
  const int L = max(0, p.seq_lens[b]);
  const int k_lo = p.window > 0 ? max(0, L - p.window) : 0;
  const int k_hi = min(L, p.max_blocks_per_seq * p.block_size);
  const int k_end = max(k_lo, k_hi);  // [k_lo, k_end): the visible keys (none when k_hi <= k_lo)
  // int64: the split arithmetic may pass 2^31 for a table near the int32 limit
  const int64_t per_split = (static_cast<int64_t>(k_end - k_lo) + p.num_splits - 1) / p.num_splits;
  const int64_t lo = k_lo + split * per_split, hi = lo + per_split;
  const int s_lo = static_cast<int>(lo < k_end ? lo : k_end);
  const int s_hi = static_cast<int>(hi < k_end ? hi : k_end);

  // ---- q, pre-scaled into log2 units (exp(x * scale) == exp2(x * scale * log2 e)) ----
  float qr[G][kElems];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    const T* qh = static_cast<const T*>(p.q) + (int64_t)b * p.q_stride[0] + (int64_t)(h0 + h) * p.q_stride[1];
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      const int d = ((e / 4) * LPK + gl) * 4 + e % 4;
      qr[h][e] = (h < nh && d < D) ? to_float(qh[d * p.q_stride[2]]) * p.scale_log2 : 0.f;
    }
  }

  float row_max[G], row_sum[G], acc[G][kElems];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    row_max[h] = -INFINITY;
    row_sum[h] = 0.f;
#pragma unroll
    for (int e = 0; e < kElems; ++e) acc[h][e] = 0.f;
  }

  const T* k_base = static_cast<const T*>(p.k_cache) + (int64_t)hk * p.k_cache_stride[2];
  const T* v_base = static_cast<const T*>(p.v_cache) + (int64_t)hk * p.v_cache_stride[2];
  const int* table = p.block_table + (int64_t)b * p.max_blocks_per_seq;

  // Each iteration a key group takes KU keys: their 2 * KU vector loads are all issued before any
  // result is used (more bytes in flight per SM), and the running max / sum / accumulator are
  // rescaled once per KU keys. Key u of key group kg in warp w, block step jb:
  //   j = jb + w * (KPW * KU) + u * KPW + kg        (KPW = key groups per warp)
  // so a warp's KPW * KU keys are consecutive, and the block covers kKeyGroups * KU keys per step.
  // The trip count is warp-uniform (jb is the same in every lane), so the shuffles below always run
  // on all 32 lanes; a key past s_hi (or behind a bad table entry) computes on zeros and is masked.
  for (int jb = s_lo; jb < s_hi; jb += kKeyGroups * KU) {
    bool valid[KU];
    float kf[KU][kElems], vf[KU][kElems];
#pragma unroll
    for (int u = 0; u < KU; ++u) {
      const int j = jb + warp * (kKeyGroupsPerWarp * KU) + u * kKeyGroupsPerWarp + kg;
      valid[u] = j < s_hi;
      int64_t k_off = 0, v_off = 0;
      if (valid[u]) {
        const int blk = table[j / p.block_size];
        valid[u] = blk >= 0 && blk < p.num_cache_blocks;  // bad table entry: masked, never read
        const int row = j % p.block_size;
        k_off = (int64_t)blk * p.k_cache_stride[0] + (int64_t)row * p.k_cache_stride[1];
        v_off = (int64_t)blk * p.v_cache_stride[0] + (int64_t)row * p.v_cache_stride[1];
      }
#pragma unroll
      for (int c = 0; c < NCHUNK; ++c) {
        const int d0 = (c * LPK + gl) * 4;
        if (valid[u] && d0 < D) {  // D % 4 == 0: a vector is all in or all out
          load4(k_base + k_off + d0, &kf[u][c * 4]);
          load4(v_base + v_off + d0, &vf[u][c * 4]);
        } else {
#pragma unroll
          for (int v = 0; v < 4; ++v) kf[u][c * 4 + v] = vf[u][c * 4 + v] = 0.f;
        }
      }
    }
#pragma unroll
    for (int h = 0; h < G; ++h) {
      if (h >= nh) break;  // block-uniform
      // Scores of the KU keys for head h0 + h (log2 units), in every lane of the key group.
      float sc[KU];
      float mx = row_max[h];
#pragma unroll
      for (int u = 0; u < KU; ++u) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kElems; ++e) dot += qr[h][e] * kf[u][e];
        dot = group_sum<LPK>(dot);
        sc[u] = valid[u] ? dot : -INFINITY;
        mx = fmaxf(mx, sc[u]);
      }
      if (mx == -INFINITY) continue;  // no valid key yet for this key group (group-uniform)
      const float corr = exp2f(row_max[h] - mx);  // 0 while row_max is -inf
      float psum = 0.f;
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[h][e] *= corr;
#pragma unroll
      for (int u = 0; u < KU; ++u) {
        const float pw = exp2f(sc[u] - mx);  // masked key: exp2(-inf) = 0
        psum += pw;
#pragma unroll
        for (int e = 0; e < kElems; ++e) acc[h][e] += pw * vf[u][e];
      }
      row_sum[h] = row_sum[h] * corr + psum;
      row_max[h] = mx;
    }
  }

  // ---- merge the key groups of the block ----
#pragma unroll
  for (int h = 0; h < G; ++h) {
    if (gl == 0) {
      sm_max[gid][h] = row_max[h];
      sm_sum[gid][h] = row_sum[h];
    }
#pragma unroll
    for (int e = 0; e < kElems; ++e) sm_acc[gid][h][((e / 4) * LPK + gl) * 4 + e % 4] = acc[h][e];
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < nh * D; idx += kDecodeThreads) {
    const int h = idx / D;  // query head h0 + h
    const int d = idx % D;  // channel
    float m = -INFINITY;
#pragma unroll
    for (int gi = 0; gi < kKeyGroups; ++gi) m = fmaxf(m, sm_max[gi][h]);
    float sum = 0.f, o = 0.f;
    if (m != -INFINITY) {
#pragma unroll
      for (int gi = 0; gi < kKeyGroups; ++gi) {
        const float w = exp2f(sm_max[gi][h] - m);  // a key group that saw no key: exp2(-inf) = 0
        sum += sm_sum[gi][h] * w;
        o += sm_acc[gi][h][d] * w;
      }
    }
    // No visible key (empty split, or seq_lens 0): output 0, lse -inf.
    o = sum > 0.f ? o / sum : 0.f;
    const float lse = sum > 0.f ? m * kLn2 + logf(sum) : -INFINITY;
    const int64_t bh = (int64_t)b * p.num_heads_q + h0 + h;  // (b, query head) row of out / lse
    if (p.num_splits == 1) {
      static_cast<T*>(p.out)[bh * D + d] = from_float<T>(o);
      if (d == 0) p.lse[bh] = lse;
    } else {
      const int64_t sbh = (int64_t)split * p.batch * p.num_heads_q + bh;  // (split, b, head)
      p.partial_out[sbh * D + d] = o;
      if (d == 0) p.partial_lse[sbh] = lse;
    }
  }
}

// Merges the splits of one (b, query head): out = sum_s w_s o_s / sum_s w_s with w_s = exp(lse_s - M),
// lse = M + ln(sum_s w_s), M = max_s lse_s. Every split -inf (no visible key): 0 and -inf.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads) paged_decode_merge_kernel(const PagedDecodeParams p) {
  __shared__ float sm_w[kMaxSplits];
  const int64_t bh = blockIdx.x;  // b * Hq + head
  const int64_t rows = (int64_t)p.batch * p.num_heads_q;
  const int S = p.num_splits;
  float m = -INFINITY;
  for (int s = 0; s < S; ++s) m = fmaxf(m, p.partial_lse[s * rows + bh]);
  for (int s = threadIdx.x; s < S; s += blockDim.x) {
    sm_w[s] = m == -INFINITY ? 0.f : expf(p.partial_lse[s * rows + bh] - m);
  }
  __syncthreads();
  float wsum = 0.f;
  for (int s = 0; s < S; ++s) wsum += sm_w[s];
  const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
  for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < S; ++s) {
      if (sm_w[s] > 0.f) o += sm_w[s] * p.partial_out[(s * rows + bh) * p.head_dim + d];
    }
    static_cast<T*>(p.out)[bh * p.head_dim + d] = from_float<T>(o * inv);
  }
  if (threadIdx.x == 0) p.lse[bh] = wsum > 0.f ? m + logf(wsum) : -INFINITY;
}

}  // namespace paged

template <typename T, int LPK, int NCHUNK>
cudaError_t launch_paged_decode(const PagedDecodeParams& params, cudaStream_t stream) {
  const dim3 grid(params.num_splits, params.num_heads_kv * params.head_chunks, params.batch);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  auto kernel = paged::paged_decode_kernel<T, LPK, NCHUNK>;
  GPTKERNELS_LAUNCH(kernel, grid, paged::kDecodeThreads, 0, stream, params);
  return launch_status();
}

template <typename T>
cudaError_t launch_paged_decode_merge(const PagedDecodeParams& params, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(params.batch) * params.num_heads_q;
  if (rows == 0) return cudaSuccess;
  auto kernel = paged::paged_decode_merge_kernel<T>;
  GPTKERNELS_LAUNCH(kernel, dim3(static_cast<unsigned>(rows)), paged::kMergeThreads, 0, stream, params);
  return launch_status();
}

}  // namespace gptkernels
