// gptkernels_C::rotary_out / rotary_inplace: input checks, RotaryParams, launch.
#include <ATen/core/Tensor.h>

#include <climits>
#include <optional>

#include "common/torch_utils.h"
#include "ops.h"
#include "rotary/rotary.h"

namespace gptkernels {

namespace {

// (B, S, H, D) strides, or (T, H, D) seen as batch 1 of T tokens (batch stride 0).
void bshd_strides(int64_t (&dst)[4], const at::Tensor& t) {
  if (t.dim() == 4) {
    for (int i = 0; i < 4; ++i) dst[i] = t.stride(i);
  } else {
    dst[0] = 0;
    dst[1] = t.stride(0);
    dst[2] = t.stride(1);
    dst[3] = t.stride(2);
  }
}

void rotary_impl(const char* op, const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                 const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                 const std::optional<at::Tensor>& offsets, int64_t offset, bool interleaved, bool conjugate,
                 const at::Tensor& q_out, const std::optional<at::Tensor>& k_out, bool inplace) {
  // Guards of a direct call (common/torch_utils.h): gptkernels.apply_rotary checks its inputs first.
  // ---- q, k ----
  const DType dtype = float_dtype(q, op, "q");
  TORCH_CHECK_VALUE(q.dim() == 3 || q.dim() == 4, op, ": q must be 3-D or 4-D, got shape ", q.sizes());
  const int64_t lead = q.dim() - 2;  // leading (token) dims: B, S or T
  const int64_t head_dim = q.size(-1);
  if (k.has_value()) {
    TORCH_CHECK_TYPE(k->scalar_type() == q.scalar_type(), op, ": k must have q's dtype ", q.scalar_type(),
                     ", got ", k->scalar_type());
    TORCH_CHECK_VALUE(k->dim() == q.dim() && k->sizes().slice(0, lead) == q.sizes().slice(0, lead) &&
                          k->size(-1) == head_dim,
                      op, ": k must be shaped like q but for its heads, got ", k->sizes(), " and ", q.sizes());
  }
  TORCH_CHECK_VALUE(k.has_value() == k_out.has_value(), op, ": k_out must be given exactly when k is");
  if (!inplace) {
    TORCH_CHECK_VALUE(q_out.sizes() == q.sizes() && q_out.scalar_type() == q.scalar_type(), op,
                      ": q_out must be shaped and typed like q");
    if (k.has_value()) {
      TORCH_CHECK_VALUE(k_out->sizes() == k->sizes() && k_out->scalar_type() == k->scalar_type(), op,
                        ": k_out must be shaped and typed like k");
    }
  }

  // ---- cos, sin ----
  check_dim(cos, 2, op, "cos");
  TORCH_CHECK_VALUE(sin.sizes() == cos.sizes(), op, ": sin must be shaped like cos ", cos.sizes(), ", got ",
                    sin.sizes());
  const DType cos_dtype = float_dtype(cos, op, "cos");
  TORCH_CHECK_TYPE(sin.scalar_type() == cos.scalar_type(), op, ": sin must have cos's dtype ", cos.scalar_type(),
                   ", got ", sin.scalar_type());
  TORCH_CHECK_NOT_IMPLEMENTED(cos_dtype == DType::kFloat32 || cos_dtype == dtype, op, ": cos/sin of dtype ",
                              cos.scalar_type(), " with q of dtype ", q.scalar_type(),
                              " has no CUDA kernel (cos/sin must be float32 or q's dtype)");
  const int64_t half = cos.size(1);
  TORCH_CHECK_VALUE(2 * half <= head_dim, op, ": rotary_dim 2 * cos.shape[1] = ", 2 * half, " exceeds the head dim ",
                    head_dim);

  // ---- positions / offsets ----
  if (positions.has_value()) {
    check_index(*positions, lead, op, "positions", /*allow_int64=*/true);
    TORCH_CHECK_VALUE(positions->sizes() == q.sizes().slice(0, lead), op, ": positions must have q's leading dims ",
                      q.sizes().slice(0, lead), ", got ", positions->sizes());
  }
  if (offsets.has_value()) {
    check_index(*offsets, 1, op, "offset", /*allow_int64=*/true);
    const int64_t n = offsets->numel();
    TORCH_CHECK_VALUE(n == 1 || n == q.size(0), op, ": an offset tensor must have 1 or ", q.size(0), " (",
                      q.dim() == 4 ? "B" : "T", ") entries, got ", n);
  }
  const int64_t batch = q.dim() == 4 ? q.size(0) : 1;
  const int64_t seqlen = q.dim() == 4 ? q.size(1) : q.size(0);
  TORCH_CHECK_VALUE(batch * seqlen <= INT_MAX, op, ": at most 2^31 - 1 tokens, got ", batch * seqlen);

  // ---- devices (last) ----
  check_cuda(q, op, "q");
  check_same_device(q, k, op, "q", "k");
  check_same_device(q, cos, op, "q", "cos");
  check_same_device(q, sin, op, "q", "sin");
  check_same_device(q, positions, op, "q", "positions");
  check_same_device(q, offsets, op, "q", "offset");
  check_same_device(q, q_out, op, "q", "q_out");
  check_same_device(q, k_out, op, "q", "k_out");

  const DeviceGuard device_guard(q);
  RotaryParams p{};
  p.q = q.data_ptr();
  p.q_out = q_out.data_ptr();
  bshd_strides(p.q_stride, q);
  bshd_strides(p.q_out_stride, q_out);
  if (k.has_value()) {
    p.k = k->data_ptr();
    p.k_out = k_out->data_ptr();
    bshd_strides(p.k_stride, *k);
    bshd_strides(p.k_out_stride, *k_out);
    p.heads_k = static_cast<int>(k->size(-2));
  }
  p.batch = static_cast<int>(batch);
  p.seqlen = static_cast<int>(seqlen);
  p.heads_q = static_cast<int>(q.size(-2));
  p.head_dim = static_cast<int>(head_dim);
  p.half = static_cast<int>(half);
  p.cos = cos.data_ptr();
  p.sin = sin.data_ptr();
  p.cos_stride[0] = cos.stride(0);
  p.cos_stride[1] = cos.stride(1);
  p.sin_stride[0] = sin.stride(0);
  p.sin_stride[1] = sin.stride(1);
  p.max_positions = cos.size(0);
  if (positions.has_value()) {
    p.positions = positions->data_ptr();
    p.positions_int64 = positions->scalar_type() == at::ScalarType::Long;
    // (B, S) positions, or (T,) seen as (1, T)
    p.pos_stride[0] = q.dim() == 4 ? positions->stride(0) : 0;
    p.pos_stride[1] = q.dim() == 4 ? positions->stride(1) : positions->stride(0);
  }
  if (offsets.has_value()) {
    p.offsets = offsets->data_ptr();
    p.offsets_int64 = offsets->scalar_type() == at::ScalarType::Long;
    // One offset for all tokens, one per sequence (B, S) or one per token (T, H, D).
    const bool one = offsets->numel() == 1;
    p.offsets_stride[0] = (!one && q.dim() == 4) ? offsets->stride(0) : 0;
    p.offsets_stride[1] = (!one && q.dim() == 3) ? offsets->stride(0) : 0;
  }
  p.offset = offset;
  // The vector kernel when every tensor it touches allows it (else one pair per thread, any strides).
  const int64_t vec = rotary_vec_width(dtype);
  const int64_t align = interleaved ? 2 * vec : vec;  // elements per vector access
  bool vectorized = half % vec == 0 && rows_aligned(q, align) && rows_aligned(q_out, align);
  if (k.has_value()) vectorized = vectorized && rows_aligned(*k, align) && rows_aligned(*k_out, align);
  p.vectorized = vectorized;
  p.interleaved = interleaved;
  p.conjugate = conjugate;
  p.copy_tail = !inplace;
  check_launch(run_rotary(dtype, cos_dtype, p, current_stream(q)), op);
}

}  // namespace

void rotary_out(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos, const at::Tensor& sin,
                const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& offsets, int64_t offset,
                bool interleaved, bool conjugate, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out) {
  rotary_impl("rotary_out", q, k, cos, sin, positions, offsets, offset, interleaved, conjugate, q_out, k_out,
              /*inplace=*/false);
}

void rotary_inplace(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                    const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                    const std::optional<at::Tensor>& offsets, int64_t offset, bool interleaved, bool conjugate) {
  rotary_impl("rotary_inplace", q, k, cos, sin, positions, offsets, offset, interleaved, conjugate, q, k,
              /*inplace=*/true);
}

}  // namespace gptkernels
