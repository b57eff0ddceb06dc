// Paged KV cache: append and decode launch parameters and launchers (torch-free).
//
// Cache layout, per layer: (num_blocks, block_size, Hkv, D); token slot = block * block_size + offset.
#pragma once

#include <cstdint>

#include "common/dtype.h"

namespace gptkernels {

struct PagedAppendParams {
  const void* k;  // (T, Hkv, D)
  const void* v;
  void* k_cache;
  void* v_cache;
  int64_t k_stride[3], v_stride[3];              // token, head, dim
  int64_t k_cache_stride[4], v_cache_stride[4];  // block, row, head, dim
  const void* slot_mapping;                      // (T,), -1 = skip
  bool slots_int64;
  int64_t slot_stride;
  int num_tokens, num_heads, head_dim, block_size;
  int64_t num_slots;  // num_blocks * block_size: slots outside [0, num_slots) are skipped
};

cudaError_t run_paged_append(DType dtype, const PagedAppendParams& params, cudaStream_t stream);

struct PagedDecodeParams {
  const void* q;  // (B, Hq, D)
  int64_t q_stride[3];
  const void* k_cache;  // (num_blocks, block_size, Hkv, D), head dim contiguous, rows 4-element aligned
  const void* v_cache;
  int64_t k_cache_stride[3], v_cache_stride[3];  // block, row, head
  const int* block_table;                        // (B, max_blocks), contiguous
  const int* seq_lens;                           // (B,): tokens in the cache incl. the current one
  int max_blocks_per_seq;
  int block_size;
  int num_cache_blocks;

  void* out;           // (B, Hq, D) contiguous, q's dtype
  float* lse;          // (B, Hq) contiguous
  float* partial_out;  // (num_splits, B, Hq, D) float32, used when num_splits > 1
  float* partial_lse;  // (num_splits, B, Hq)

  int batch, num_heads_q, num_heads_kv, head_dim;
  int num_splits;    // thread blocks sharing one sequence's keys (flash-decoding)
  int head_chunks;   // ceil(group / kDecodeMaxGroup): thread blocks sharing one GQA group's q heads
  int window;        // 0: none
  float scale_log2;  // softmax_scale * log2(e)
};

// Query heads one decode thread block serves (a whole GQA group when the group is at most this).
constexpr int kDecodeMaxGroup = 8;
constexpr int kDecodeMaxHeadDim = 256;

cudaError_t run_paged_decode(DType dtype, const PagedDecodeParams& params, cudaStream_t stream);

}  // namespace gptkernels
