// Rotary embedding: launch parameters and launcher (torch-free).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace gptkernels {

// q and k are viewed as (batch, seqlen, heads, head_dim) with arbitrary element strides (a (T, H, D)
// tensor is batch 1, seqlen T, batch stride 0). Outputs have their own strides: in place, they are
// the inputs' pointers and strides.
struct RotaryParams {
  const void* q;
  void* q_out;
  const void* k;  // nullptr: no k
  void* k_out;
  int64_t q_stride[4], q_out_stride[4];  // batch, seq, head, dim
  int64_t k_stride[4], k_out_stride[4];
  int batch, seqlen, heads_q, heads_k, head_dim;
  int half;  // R / 2: channels 0 .. R-1 rotate, R .. head_dim-1 pass through

  const void* cos;  // (max_positions, half), element strides below
  const void* sin;
  int64_t cos_stride[2], sin_stride[2];
  int64_t max_positions;

  // Position of token (b, s): positions[b * pos_stride[0] + s * pos_stride[1]] if positions, else
  // offset + s + offsets[b * offsets_stride[0] + s * offsets_stride[1]] (offsets may be nullptr).
  const void* positions;
  bool positions_int64;
  int64_t pos_stride[2];
  const void* offsets;
  bool offsets_int64;
  int64_t offsets_stride[2];
  int64_t offset;

  bool vectorized;   // rotary_vec_width(dtype) pairs per thread with vector accesses (see below)
  bool interleaved;  // GPT-J pairs (2i, 2i+1); else GPT-NeoX pairs (i, i + half)
  bool conjugate;    // rotate by -theta (the backward pass)
  bool copy_tail;    // copy channels R .. head_dim-1 to the outputs (not in place)
};

// Pairs per thread of the vectorized kernel: 8-byte accesses to each half of GPT-NeoX pairs, 16-byte
// accesses to GPT-J's interleaved pairs. It needs contiguous head dims, half % width == 0 and rows
// (and data pointers) aligned to width elements (GPT-NeoX) or 2 * width (GPT-J).
inline int rotary_vec_width(DType dtype) { return dtype == DType::kFloat32 ? 2 : 4; }

// dtype: q/k dtype; cos_dtype: cos/sin dtype (float32 or dtype).
cudaError_t run_rotary(DType dtype, DType cos_dtype, const RotaryParams& params, cudaStream_t stream);

}  // namespace gptkernels
