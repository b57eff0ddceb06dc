// gptkernels_C::flash_attn_fwd: input checks, output allocation, FlashFwdParams, launch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <climits>
#include <limits>
#include <optional>
#include <tuple>

#include "attention/flash_fwd.h"
#include "common/torch_utils.h"
#include "ops.h"

namespace gptkernels {

namespace {
constexpr const char* kOp = "flash_attn_fwd";

std::string head_dims_list() {
  std::string s;
  for (int d : kFlashHeadDims) s += (s.empty() ? "" : ", ") + std::to_string(d);
  return s;
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const std::optional<at::Tensor>& cu_seqlens_q,
                                                  const std::optional<at::Tensor>& cu_seqlens_k,
                                                  const std::optional<at::Tensor>& block_table,
                                                  const std::optional<at::Tensor>& seqlens_k, int64_t max_seqlen_q,
                                                  int64_t max_seqlen_k, bool causal, std::optional<int64_t> window,
                                                  double softmax_scale, bool bottom_right) {
  (void)max_seqlen_k;  // the kernel reads each sequence's key count from cu_seqlens_k / seqlens_k
  // Guards of a direct call (common/torch_utils.h): gptkernels.flash_attn checks its inputs first.
  // ---- dtypes ----
  const DType dtype = float_dtype(q, kOp, "q", /*allow_float32=*/false);
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), kOp,
                   ": k and v must have q's dtype ", q.scalar_type(), ", got ", k.scalar_type(), " and ",
                   v.scalar_type());

  // ---- layout: the dims and sizes the kernel's index math reads ----
  const bool paged = block_table.has_value() || seqlens_k.has_value();
  const bool varlen_q = cu_seqlens_q.has_value();
  const bool varlen_k = !paged && cu_seqlens_k.has_value();  // with paged keys cu_seqlens_k is not read
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), kOp, ": k and v shapes differ: ", k.sizes(), " and ", v.sizes());
  int64_t batch;
  if (paged) {
    TORCH_CHECK_VALUE(block_table.has_value() && seqlens_k.has_value(), kOp,
                      ": block_table and seqlens_k go together");
    check_dim(k, 4, kOp, "k");
    check_index(*block_table, 2, kOp, "block_table");
    check_index(*seqlens_k, 1, kOp, "seqlens_k");
    batch = block_table->size(0);
    check_size(*seqlens_k, 0, batch, kOp, "seqlens_k", "batch");
  } else if (varlen_q || varlen_k) {
    TORCH_CHECK_VALUE(varlen_q && varlen_k, kOp, ": cu_seqlens_q and cu_seqlens_k go together");
    check_dim(k, 3, kOp, "k");
    check_index(*cu_seqlens_k, 1, kOp, "cu_seqlens_k");
    TORCH_CHECK_VALUE(cu_seqlens_k->numel() >= 1, kOp, ": cu_seqlens_k is empty (B + 1 >= 1 offsets)");
    batch = cu_seqlens_k->numel() - 1;
  } else {
    check_dim(q, 4, kOp, "q");
    check_dim(k, 4, kOp, "k");
    batch = q.size(0);
    check_size(k, 0, batch, kOp, "k", "batch");
  }
  if (varlen_q) {
    check_dim(q, 3, kOp, "q");
    check_index(*cu_seqlens_q, 1, kOp, "cu_seqlens_q");
    check_size(*cu_seqlens_q, 0, batch + 1, kOp, "cu_seqlens_q", "B + 1");
  } else if (paged) {
    check_dim(q, 4, kOp, "q");
    check_size(q, 0, batch, kOp, "q", "batch");
  }

  // ---- heads, head dim, window ----
  const int64_t head_dim = q.size(-1);
  const int64_t heads_q = q.size(-2), heads_kv = k.size(-2);
  TORCH_CHECK_VALUE(k.size(-1) == head_dim, kOp, ": q and k head dims differ: ", head_dim, " and ", k.size(-1));
  check_heads(heads_q, heads_kv, kOp, "k");
  // The kernel reads 0 as "no window", and a negative one would overflow its position math.
  TORCH_CHECK_VALUE(!window.has_value() || *window >= 1, kOp, ": window must be >= 1, got ", window.value_or(0));

  // ---- what the kernels implement (NotImplementedError -> BackendUnavailableError) ----
  TORCH_CHECK_NOT_IMPLEMENTED(flash_fwd_supports_head_dim(static_cast<int>(head_dim)), kOp, ": head dim ", head_dim,
                              " has no CUDA kernel (", head_dims_list(), ")");
  auto check_aligned = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK_NOT_IMPLEMENTED(rows_aligned(t, 8), kOp, ": ", name,
                                " needs a contiguous head dim and 16-byte aligned rows (data pointer and other "
                                "strides multiples of 8 elements), got strides ",
                                t.strides());
  };
  check_aligned(q, "q");
  check_aligned(k, "k");
  check_aligned(v, "v");

  // ---- grid and int32 limits ----
  TORCH_CHECK_VALUE(batch <= 65535 && heads_q <= 65535, kOp, ": at most 65535 sequences and heads, got ", batch,
                    " and ", heads_q);
  TORCH_CHECK_VALUE(q.size(0) < INT_MAX && k.size(0) < INT_MAX && (paged || k.size(1) < INT_MAX), kOp,
                    ": sequence lengths must fit in int32");
  // The kernel caps a sequence's keys at max_blocks * block_size in int32 (as paged_decode does).
  TORCH_CHECK_VALUE(!paged || block_table->size(1) * k.size(1) <= INT_MAX, kOp,
                    ": block_table covers more than 2^31 - 1 tokens");

  // ---- devices (last: see common/torch_utils.h) ----
  check_cuda(q, kOp, "q");
  check_same_device(q, k, kOp, "q", "k");
  check_same_device(q, v, kOp, "q", "v");
  check_same_device(q, cu_seqlens_q, kOp, "q", "cu_seqlens_q");
  if (varlen_k) check_same_device(q, cu_seqlens_k, kOp, "q", "cu_seqlens_k");
  check_same_device(q, block_table, kOp, "q", "block_table");
  check_same_device(q, seqlens_k, kOp, "q", "seqlens_k");

  const DeviceGuard device_guard(q);
  // The index tensors are tiny: the kernel reads them contiguous (no-op when they already are).
  using OptTensor = std::optional<at::Tensor>;
  const OptTensor cu_q = varlen_q ? OptTensor(cu_seqlens_q->contiguous()) : std::nullopt;
  const OptTensor cu_k = varlen_k ? OptTensor(cu_seqlens_k->contiguous()) : std::nullopt;
  const OptTensor table = paged ? OptTensor(block_table->contiguous()) : std::nullopt;
  const OptTensor lens_k = paged ? OptTensor(seqlens_k->contiguous()) : std::nullopt;
  // contiguous. Varlen: tokens outside cu_seqlens_q (padding after its last offset) are written by
  // no program; they read as a row that sees no key (out 0, lse -inf), as on every backend.
  at::Tensor out = varlen_q ? at::zeros(q.sizes(), q.options()) : at::empty(q.sizes(), q.options());
  at::Tensor lse = varlen_q
      ? at::full({heads_q, q.size(0)}, -std::numeric_limits<float>::infinity(), q.options().dtype(at::kFloat))
      : at::empty({batch, heads_q, q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};

  FlashFwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  // Dense tensors are (B, S, H, D); varlen ones (T, H, D) have no batch dim (batch stride 0); a paged
  // cache's "batch" stride is its block stride.
  if (varlen_q) {
    p.q_batch_stride = 0;
    p.q_row_stride = q.stride(0);
    p.q_head_stride = q.stride(1);
    p.o_batch_stride = 0;
    p.o_row_stride = out.stride(0);
    p.o_head_stride = out.stride(1);
    p.lse_batch_stride = 0;
    p.lse_head_stride = lse.stride(0);
    // max_seqlen_q sizes the grid only (each thread block strides over its sequence's query blocks);
    // no sequence is longer than Tq, so a larger value would only launch idle blocks.
    p.seqlen_q = static_cast<int>(std::min<int64_t>(std::max<int64_t>(max_seqlen_q, 0), q.size(0)));
    p.total_q = static_cast<int>(q.size(0));
  } else {
    p.q_batch_stride = q.stride(0);
    p.q_row_stride = q.stride(1);
    p.q_head_stride = q.stride(2);
    p.o_batch_stride = out.stride(0);
    p.o_row_stride = out.stride(1);
    p.o_head_stride = out.stride(2);
    p.lse_batch_stride = lse.stride(0);
    p.lse_head_stride = lse.stride(1);
    p.seqlen_q = static_cast<int>(q.size(1));
    p.total_q = static_cast<int>(q.size(1));
  }
  if (!varlen_k) {
    p.k_batch_stride = k.stride(0);
    p.k_row_stride = k.stride(1);
    p.k_head_stride = k.stride(2);
    p.v_batch_stride = v.stride(0);
    p.v_row_stride = v.stride(1);
    p.v_head_stride = v.stride(2);
    p.seqlen_k = paged ? 0 : static_cast<int>(k.size(1));
    p.total_k = paged ? 0 : static_cast<int>(k.size(1));
  } else {  // varlen k (Tk, Hkv, D)
    p.k_batch_stride = 0;
    p.k_row_stride = k.stride(0);
    p.k_head_stride = k.stride(1);
    p.v_batch_stride = 0;
    p.v_row_stride = v.stride(0);
    p.v_head_stride = v.stride(1);
    p.seqlen_k = 0;
    p.total_k = static_cast<int>(k.size(0));
  }
  p.batch = static_cast<int>(batch);
  p.num_heads_q = static_cast<int>(heads_q);
  p.num_heads_kv = static_cast<int>(heads_kv);
  p.cu_seqlens_q = cu_q.has_value() ? cu_q->data_ptr<int>() : nullptr;
  p.cu_seqlens_k = cu_k.has_value() ? cu_k->data_ptr<int>() : nullptr;
  if (paged) {
    p.block_table = table->data_ptr<int>();
    p.seqlens_k = lens_k->data_ptr<int>();
    p.block_table_batch_stride = table->size(1);  // contiguous
    p.max_blocks_per_seq = static_cast<int>(table->size(1));
    p.block_size = static_cast<int>(k.size(1));
    p.num_cache_blocks = static_cast<int>(k.size(0));
  }
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.causal = causal;
  // Any window wider than every sequence changes nothing; clamping keeps the int math from overflowing.
  p.window = window.has_value() ? static_cast<int>(std::min<int64_t>(*window, 1 << 30)) : 0;
  p.bottom_right = bottom_right;

  check_launch(run_flash_fwd(dtype, static_cast<int>(head_dim), p, current_stream(q)), kOp);
  return {out, lse};
}

}  // namespace gptkernels
