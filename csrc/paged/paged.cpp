// gptkernels_C::paged_append / paged_decode: input checks, params, split choice, launch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <tuple>

#include "common/torch_utils.h"
#include "ops.h"
#include "paged/paged.h"

namespace gptkernels {

namespace {

constexpr int kMaxSplits = 128;         // paged_decode_kernel.cuh: kMaxSplits (merge kernel smem)

void check_cache_pair(const at::Tensor& k_cache, const at::Tensor& v_cache, const char* op) {
  check_dim(k_cache, 4, op, "k_cache");
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), op, ": k_cache and v_cache shapes differ: ",
                    k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK_TYPE(v_cache.scalar_type() == k_cache.scalar_type(), op, ": v_cache must have k_cache's dtype ",
                   k_cache.scalar_type(), ", got ", v_cache.scalar_type());
  // The kernels divide by it (slot / block_size, key / block_size).
  TORCH_CHECK_VALUE(k_cache.size(1) >= 1, op, ": block size k_cache.shape[1] must be >= 1");
}

}  // namespace

void paged_append(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& slot_mapping) {
  constexpr const char* op = "paged_append";
  // Guards of a direct call (common/torch_utils.h): gptkernels.paged_append checks its inputs first.
  const DType dtype = float_dtype(k, op, "k");
  TORCH_CHECK_TYPE(v.scalar_type() == k.scalar_type(), op, ": v must have k's dtype ", k.scalar_type(), ", got ",
                   v.scalar_type());
  check_dim(k, 3, op, "k");
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), op, ": k and v shapes differ: ", k.sizes(), " and ", v.sizes());
  check_cache_pair(k_cache, v_cache, op);
  TORCH_CHECK_NOT_IMPLEMENTED(k_cache.scalar_type() == k.scalar_type(), op, ": a ", k_cache.scalar_type(),
                              " cache with ", k.scalar_type(), " k/v has no CUDA kernel (the dtypes must match)");
  check_size(k, 1, k_cache.size(2), op, "k", "kv heads of the cache");
  check_size(k, 2, k_cache.size(3), op, "k", "head dim of the cache");
  check_index(slot_mapping, 1, op, "slot_mapping", /*allow_int64=*/true);
  check_size(slot_mapping, 0, k.size(0), op, "slot_mapping", "tokens of k");
  TORCH_CHECK_VALUE(k.size(0) <= INT_MAX, op, ": at most 2^31 - 1 tokens, got ", k.size(0));

  check_cuda(k, op, "k");
  check_same_device(k, v, op, "k", "v");
  check_same_device(k, k_cache, op, "k", "k_cache");
  check_same_device(k, v_cache, op, "k", "v_cache");
  check_same_device(k, slot_mapping, op, "k", "slot_mapping");

  const DeviceGuard device_guard(k);
  PagedAppendParams p{};
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  for (int i = 0; i < 4; ++i) {
    p.k_cache_stride[i] = k_cache.stride(i);
    p.v_cache_stride[i] = v_cache.stride(i);
  }
  p.slot_mapping = slot_mapping.data_ptr();
  p.slots_int64 = slot_mapping.scalar_type() == at::ScalarType::Long;
  p.slot_stride = slot_mapping.stride(0);
  p.num_tokens = static_cast<int>(k.size(0));
  p.num_heads = static_cast<int>(k.size(1));
  p.head_dim = static_cast<int>(k.size(2));
  p.block_size = static_cast<int>(k_cache.size(1));
  p.num_slots = k_cache.size(0) * k_cache.size(1);
  check_launch(run_paged_append(dtype, p, current_stream(k)), op);
}

std::tuple<at::Tensor, at::Tensor> paged_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                                const at::Tensor& v_cache, const at::Tensor& block_table,
                                                const at::Tensor& seq_lens, double softmax_scale,
                                                std::optional<int64_t> window, int64_t num_splits) {
  constexpr const char* op = "paged_decode";
  // Guards of a direct call (common/torch_utils.h): gptkernels.paged_decode checks its inputs first.
  const DType dtype = float_dtype(q, op, "q");
  check_dim(q, 3, op, "q");
  check_cache_pair(k_cache, v_cache, op);
  TORCH_CHECK_TYPE(k_cache.scalar_type() == q.scalar_type(), op, ": k_cache must have q's dtype ",
                   q.scalar_type(), ", got ", k_cache.scalar_type());
  check_index(block_table, 2, op, "block_table");
  check_index(seq_lens, 1, op, "seq_lens");
  const int64_t batch = q.size(0), heads_q = q.size(1), head_dim = q.size(2);
  const int64_t heads_kv = k_cache.size(2);
  check_size(block_table, 0, batch, op, "block_table", "batch");
  check_size(seq_lens, 0, batch, op, "seq_lens", "batch");
  check_size(k_cache, 3, head_dim, op, "k_cache", "head dim of q");
  check_heads(heads_q, heads_kv, op, "k_cache");
  // The kernel reads 0 as "no window", and a negative one would overflow its position math.
  TORCH_CHECK_VALUE(!window.has_value() || *window >= 1, op, ": window must be >= 1, got ", window.value_or(0));
  // The split count is chosen by the public op (gptkernels/_policy.py, one policy for every backend);
  // the kernel divides the keys by it.
  TORCH_CHECK_VALUE(num_splits >= 1, op, ": num_splits must be >= 1, got ", num_splits);
  TORCH_CHECK_NOT_IMPLEMENTED(head_dim % 4 == 0 && head_dim <= kDecodeMaxHeadDim, op, ": head dim ", head_dim,
                              " has no CUDA kernel (multiples of 4 up to ", kDecodeMaxHeadDim, ")");
  TORCH_CHECK_NOT_IMPLEMENTED(rows_aligned(k_cache, 4) && rows_aligned(v_cache, 4), op,
                              ": the caches need a contiguous head dim and rows aligned to 4 elements, got strides ",
                              k_cache.strides(), " and ", v_cache.strides());
  const int64_t group = heads_q / heads_kv;
  const int64_t head_chunks = (group + kDecodeMaxGroup - 1) / kDecodeMaxGroup;
  TORCH_CHECK_VALUE(batch <= 65535 && heads_kv * head_chunks <= 65535, op,
                    ": at most 65535 sequences and kv-head groups, got ", batch, " and ", heads_kv * head_chunks);
  TORCH_CHECK_VALUE(block_table.size(1) * k_cache.size(1) <= INT_MAX, op,
                    ": block_table covers more than 2^31 - 1 tokens");

  check_cuda(q, op, "q");
  check_same_device(q, k_cache, op, "q", "k_cache");
  check_same_device(q, v_cache, op, "q", "v_cache");
  check_same_device(q, block_table, op, "q", "block_table");
  check_same_device(q, seq_lens, op, "q", "seq_lens");

  const DeviceGuard device_guard(q);
  at::Tensor out = at::empty({batch, heads_q, head_dim}, q.options());
  at::Tensor lse = at::empty({batch, heads_q}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor table = block_table.contiguous();  // tiny; a no-op when already contiguous
  const at::Tensor lens = seq_lens.contiguous();

  const int64_t splits = std::min<int64_t>(num_splits, kMaxSplits);

  PagedDecodeParams p{};
  p.q = q.data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_cache_stride[i] = k_cache.stride(i);
    p.v_cache_stride[i] = v_cache.stride(i);
  }
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.block_table = table.data_ptr<int>();
  p.seq_lens = lens.data_ptr<int>();
  p.max_blocks_per_seq = static_cast<int>(table.size(1));
  p.block_size = static_cast<int>(k_cache.size(1));
  p.num_cache_blocks = static_cast<int>(std::min<int64_t>(k_cache.size(0), INT_MAX));
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  at::Tensor partial_out, partial_lse;
  if (splits > 1) {
    partial_out = at::empty({splits, batch, heads_q, head_dim}, q.options().dtype(at::kFloat));
    partial_lse = at::empty({splits, batch, heads_q}, q.options().dtype(at::kFloat));
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_lse = partial_lse.data_ptr<float>();
  }
  p.batch = static_cast<int>(batch);
  p.num_heads_q = static_cast<int>(heads_q);
  p.num_heads_kv = static_cast<int>(heads_kv);
  p.head_dim = static_cast<int>(head_dim);
  p.num_splits = static_cast<int>(splits);
  p.head_chunks = static_cast<int>(head_chunks);
  p.window = window.has_value() ? static_cast<int>(std::min<int64_t>(*window, 1 << 30)) : 0;
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  check_launch(run_paged_decode(dtype, p, current_stream(q)), op);
  return {out, lse};
}

}  // namespace gptkernels
