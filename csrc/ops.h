// The op implementations registered in bindings.cpp (one place for their C++ signatures).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace gptkernels {

// csrc/attention/flash_attn.cpp
std::tuple<at::Tensor, at::Tensor> flash_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const std::optional<at::Tensor>& cu_seqlens_q,
                                                  const std::optional<at::Tensor>& cu_seqlens_k,
                                                  const std::optional<at::Tensor>& block_table,
                                                  const std::optional<at::Tensor>& seqlens_k, int64_t max_seqlen_q,
                                                  int64_t max_seqlen_k, bool causal, std::optional<int64_t> window,
                                                  double softmax_scale, bool bottom_right);

// csrc/rotary/rotary.cpp
void rotary_out(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos, const at::Tensor& sin,
                const std::optional<at::Tensor>& positions, const std::optional<at::Tensor>& offsets, int64_t offset,
                bool interleaved, bool conjugate, const at::Tensor& q_out, const std::optional<at::Tensor>& k_out);
void rotary_inplace(const at::Tensor& q, const std::optional<at::Tensor>& k, const at::Tensor& cos,
                    const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                    const std::optional<at::Tensor>& offsets, int64_t offset, bool interleaved, bool conjugate);

// csrc/paged/paged.cpp
void paged_append(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& slot_mapping);
std::tuple<at::Tensor, at::Tensor> paged_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                                const at::Tensor& v_cache, const at::Tensor& block_table,
                                                const at::Tensor& seq_lens, double softmax_scale,
                                                std::optional<int64_t> window, int64_t num_splits);

}  // namespace gptkernels
