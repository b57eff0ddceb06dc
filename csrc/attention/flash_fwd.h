// Flash attention forward: the launch parameters and the launcher (torch-free: shared by the
// kernel translation units and csrc/attention/flash_attn.cpp).
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace gptkernels {

// One struct covers the three layouts; every stride is in elements, the head-dim stride is 1.
//   dense:  q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D): batch strides are stride(0), row strides stride(1)
//   varlen: q (Tq, Hq, D), k/v (Tk, Hkv, D) with cu_seqlens: batch strides 0, rows start at cu[b]
//   paged:  k/v caches (num_blocks, block_size, Hkv, D): k_batch_stride is the cache block stride,
//           key j of sequence b lives in block block_table[b, j / block_size], row j % block_size
struct FlashFwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;   // contiguous, shaped like q
  float* lse;  // dense (B, Hq, Sq), varlen (Hq, Tq): row i of (b, h) at b*lse_batch_stride + h*lse_head_stride + q_start + i

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;

  int batch;
  int num_heads_q;
  int num_heads_kv;
  int seqlen_q;   // dense: Sq; varlen: max_seqlen_q clamped to [0, Tq] (sizes the grid only)
  int seqlen_k;   // dense: Sk (unused when varlen or paged)
  int total_q;    // rows q may address (dense Sq, varlen Tq): cu_seqlens_q values are clamped to it
  int total_k;    // same for k/v (dense Sk, varlen Tk)

  const int* cu_seqlens_q;  // (B+1,) or nullptr
  const int* cu_seqlens_k;  // (B+1,) or nullptr
  const int* block_table;   // (B, max_blocks) or nullptr (paged keys)
  const int* seqlens_k;     // (B,) with block_table
  int64_t block_table_batch_stride;
  int max_blocks_per_seq;
  int block_size;
  int num_cache_blocks;

  float scale_log2;  // softmax_scale * log2(e): the kernel works with exp2
  bool causal;
  int window;        // 0: no window; W >= 1: query at position p sees keys p - W < j <= p
  bool bottom_right; // query row i sits at p = i + Sk - Sq (else p = i, torch SDPA's convention)
};

// The head dims with a compiled kernel (each one a translation unit per dtype).
constexpr int kFlashHeadDims[] = {32, 64, 80, 96, 128};

bool flash_fwd_supports_head_dim(int head_dim);

// Launches the forward kernel for dtype (float16 or bfloat16) and params' head dim.
cudaError_t run_flash_fwd(DType dtype, int head_dim, const FlashFwdParams& params, cudaStream_t stream);

}  // namespace gptkernels
