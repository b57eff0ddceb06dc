// Rotary embedding of q and k in one launch. One thread block per token (b, s): it reads the
// token's position once, then its threads walk the (head, pair) list of q's heads followed by k's,
// each thread rotating one pair (a, b) -> (a cos - b sin, b cos + a sin) in float32. A pair is read
// and written by the same thread, so in place is safe.
//
// Included by the translation units rotary_<dtype>_cos<dtype>_vec<N>.cu (one instantiation each).
#pragma once

#include <cuda_runtime.h>

#include "common/device.cuh"
#include "common/launch.cuh"
#include "rotary/rotary.h"
#include "rotary/rotary_launch.h"

namespace gptkernels {
namespace rotary {

constexpr int kThreads = 128;

__device__ __forceinline__ int64_t load_index(const void* base, bool is_int64, int64_t idx) {
  return is_int64 ? static_cast<const int64_t*>(base)[idx] : static_cast<const int32_t*>(base)[idx];
}

// N consecutive elements at p as floats / from floats. N == 1: any address. N > 1: one vector
// access of N * sizeof(T) bytes (the caller guarantees that alignment).
template <typename T, int N>
struct alignas(N * sizeof(T)) Pack {
  T v[N];
};
template <typename T, int N>
__device__ __forceinline__ void load_n(const T* ptr, float (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(ptr);
#pragma unroll
  for (int n = 0; n < N; ++n) out[n] = to_float(pk.v[n]);
}
template <typename T, int N>
__device__ __forceinline__ void store_n(T* ptr, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int n = 0; n < N; ++n) pk.v[n] = from_float<T>(in[n]);
  *reinterpret_cast<Pack<T, N>*>(ptr) = pk;
}

// VEC == 1: one pair per thread, any element strides. VEC > 1: VEC consecutive pairs per thread
// with vector loads and stores; the host picks it only when the head dim is contiguous, R/2 % VEC
// == 0 and every row is aligned to the vector (GPT-NeoX: VEC elements, GPT-J: 2 * VEC).
template <typename T, typename CosT, int VEC>
__global__ void __launch_bounds__(kThreads) rotary_kernel(const RotaryParams p) {
  const int64_t token = blockIdx.x;
  const int b = static_cast<int>(token / p.seqlen);  // sequence
  const int s = static_cast<int>(token % p.seqlen);  // index along S (or T)

  int64_t pos;
  if (p.positions != nullptr) {
    pos = load_index(p.positions, p.positions_int64, b * p.pos_stride[0] + s * p.pos_stride[1]);
  } else {
    pos = p.offset + s;
    if (p.offsets != nullptr) {
      pos += load_index(p.offsets, p.offsets_int64, b * p.offsets_stride[0] + s * p.offsets_stride[1]);
    }
  }
  // A position outside the cos/sin table is masked (never read): the pair passes through unrotated.
  // (GPTKERNELS_DEBUG=1 makes the public op check positions on the host.)
  const bool in_table = pos >= 0 && pos < p.max_positions;
  const CosT* cos_row = static_cast<const CosT*>(p.cos) + (in_table ? pos : 0) * p.cos_stride[0];
  const CosT* sin_row = static_cast<const CosT*>(p.sin) + (in_table ? pos : 0) * p.sin_stride[0];

  const int groups = p.half / VEC;  // groups of VEC pairs per head
  const int units = (p.heads_q + p.heads_k) * groups;
  for (int idx = threadIdx.x; idx < units; idx += blockDim.x) {
    const int hh = idx / groups;             // head in the list: q heads, then k heads
    const int i0 = (idx % groups) * VEC;     // first pair (= frequency) index of this thread
    const bool is_q = hh < p.heads_q;
    const int head = is_q ? hh : hh - p.heads_q;
    const int64_t* st = is_q ? p.q_stride : p.k_stride;
    const int64_t* ost = is_q ? p.q_out_stride : p.k_out_stride;
    const T* src = static_cast<const T*>(is_q ? p.q : p.k) + b * st[0] + s * st[1] + head * st[2];
    T* dst = static_cast<T*>(is_q ? p.q_out : p.k_out) + b * ost[0] + s * ost[1] + head * ost[2];

    // Pair i = i0 + n: channels (2i, 2i+1) for GPT-J, (i, i + R/2) for GPT-NeoX.
    float a[VEC], bv[VEC];
    if (VEC == 1) {
      const int ca = p.interleaved ? 2 * i0 : i0;
      const int cb = p.interleaved ? 2 * i0 + 1 : i0 + p.half;
      a[0] = to_float(src[ca * st[3]]);
      bv[0] = to_float(src[cb * st[3]]);
    } else if (p.interleaved) {
      float x[2 * VEC];
      load_n<T, 2 * VEC>(src + 2 * i0, x);
#pragma unroll
      for (int n = 0; n < VEC; ++n) {
        a[n] = x[2 * n];
        bv[n] = x[2 * n + 1];
      }
    } else {
      load_n<T, VEC>(src + i0, a);
      load_n<T, VEC>(src + p.half + i0, bv);
    }

    float oa[VEC], ob[VEC];
#pragma unroll
    for (int n = 0; n < VEC; ++n) {
      float c = 1.f, sn = 0.f;
      if (in_table) {
        c = to_float(cos_row[(i0 + n) * p.cos_stride[1]]);
        sn = to_float(sin_row[(i0 + n) * p.sin_stride[1]]);
      }
      if (p.conjugate) sn = -sn;
      oa[n] = a[n] * c - bv[n] * sn;
      ob[n] = bv[n] * c + a[n] * sn;
    }

    if (VEC == 1) {
      const int ca = p.interleaved ? 2 * i0 : i0;
      const int cb = p.interleaved ? 2 * i0 + 1 : i0 + p.half;
      dst[ca * ost[3]] = from_float<T>(oa[0]);
      dst[cb * ost[3]] = from_float<T>(ob[0]);
    } else if (p.interleaved) {
      float x[2 * VEC];
#pragma unroll
      for (int n = 0; n < VEC; ++n) {
        x[2 * n] = oa[n];
        x[2 * n + 1] = ob[n];
      }
      store_n<T, 2 * VEC>(dst + 2 * i0, x);
    } else {
      store_n<T, VEC>(dst + i0, oa);
      store_n<T, VEC>(dst + p.half + i0, ob);
    }
  }

  if (p.copy_tail) {
    const int rot = 2 * p.half;
    const int tail = p.head_dim - rot;  // channels R .. D-1 pass through
    if (tail > 0) {
      const int total = (p.heads_q + p.heads_k) * tail;
      for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
        const int hh = idx / tail;
        const int d = rot + idx % tail;
        const bool is_q = hh < p.heads_q;
        const int head = is_q ? hh : hh - p.heads_q;
        const int64_t* st = is_q ? p.q_stride : p.k_stride;
        const int64_t* ost = is_q ? p.q_out_stride : p.k_out_stride;
        const T* src = static_cast<const T*>(is_q ? p.q : p.k) + b * st[0] + s * st[1] + head * st[2];
        T* dst = static_cast<T*>(is_q ? p.q_out : p.k_out) + b * ost[0] + s * ost[1] + head * ost[2];
        dst[d * ost[3]] = src[d * st[3]];
      }
    }
  }
}

}  // namespace rotary

template <typename T, typename CosT, int VEC>
cudaError_t launch_rotary(const RotaryParams& params, cudaStream_t stream) {
  const int64_t tokens = static_cast<int64_t>(params.batch) * params.seqlen;
  if (tokens == 0 || params.heads_q + params.heads_k == 0) return cudaSuccess;
  auto kernel = rotary::rotary_kernel<T, CosT, VEC>;
  GPTKERNELS_LAUNCH(kernel, dim3(static_cast<unsigned>(tokens)), rotary::kThreads, 0, stream, params);
  return launch_status();
}

}  // namespace gptkernels
