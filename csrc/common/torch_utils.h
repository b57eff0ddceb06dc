// Torch-side helpers of the op implementations (.cpp files only): the guards of a direct call,
// dtype mapping, alignment.
//
// Which layer checks what: the public Python ops (gptkernels/attention.py, rotary.py, paged.py) are
// the authoritative input checks; their messages are the ones users see and the tests pin. The C++
// ops behind them check again only what keeps a kernel in bounds and honest when
// torch.ops.gptkernels_C.* is called directly: dtypes (dispatch), the dims and sizes the index math
// relies on, GQA divisibility, int32 and grid limits, devices, and what the kernels implement
// (head dims, alignment, dtype pairs: NotImplementedError, which gptkernels.cuda turns into
// BackendUnavailableError). Their messages are terse: the op, the argument, the broken condition.
// A check that only repeats a Python rule without protecting memory (e.g. a window needing causal:
// the kernels ignore it without) is not repeated here.
//
// Check order in every op: structure (dims, shapes, dtypes, strides) first, devices last, so that a
// CPU-only machine exercises every guard (tests/test_cuda_extension.py does).
// Error types follow Python's: TORCH_CHECK_TYPE -> TypeError (dtypes), TORCH_CHECK_VALUE ->
// ValueError (shapes, values), TORCH_CHECK_NOT_IMPLEMENTED -> NotImplementedError (an option this
// backend has no kernel for).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>

#include "common/dtype.h"
#include "common/torch_cuda.h"

namespace gptkernels {

inline DType float_dtype(const at::Tensor& t, const char* op, const char* name, bool allow_float32 = true) {
  switch (t.scalar_type()) {
    case at::ScalarType::Half: return DType::kFloat16;
    case at::ScalarType::BFloat16: return DType::kBFloat16;
    case at::ScalarType::Float:
      if (allow_float32) return DType::kFloat32;
      TORCH_CHECK_NOT_IMPLEMENTED(false, op, ": ", name, " is float32: no CUDA kernel (float16, bfloat16)");
    default: break;
  }
  TORCH_CHECK_TYPE(false, op, ": ", name, " must be float16, bfloat16", allow_float32 ? " or float32" : "",
                   ", got ", t.scalar_type());
  return DType::kFloat32;  // unreachable
}

inline void check_dim(const at::Tensor& t, int64_t ndim, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == ndim, op, ": ", name, " must be ", ndim, "-D, got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op, const char* name,
                       const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, op, ": ", name, ".shape[", dim, "] must be ", expected, " (", what,
                    "), got ", t.sizes());
}

inline void check_index(const at::Tensor& t, int64_t ndim, const char* op, const char* name, bool allow_int64 = false) {
  const bool ok = t.scalar_type() == at::ScalarType::Int || (allow_int64 && t.scalar_type() == at::ScalarType::Long);
  TORCH_CHECK_TYPE(ok, op, ": ", name, " must be ", allow_int64 ? "int32 or int64" : "int32", ", got ",
                   t.scalar_type());
  check_dim(t, ndim, op, name);
}

// GQA/MQA: query head h reads kv head h / (hq / hkv), in bounds only when hkv divides hq.
inline void check_heads(int64_t heads_q, int64_t heads_kv, const char* op, const char* kv_name) {
  TORCH_CHECK_VALUE(heads_kv >= 1 && heads_q % heads_kv == 0, op, ": ", heads_q, " query heads are not a multiple of ",
                    heads_kv, " ", kv_name, " heads");
}

// The innermost dim is contiguous and every other stride and the data pointer are multiples of
// `elems` elements: what vectorized (16-byte) loads need.
inline bool rows_aligned(const at::Tensor& t, int64_t elems) {
  if (t.stride(-1) != 1 && t.size(-1) > 1) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % elems != 0) return false;
  }
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % (elems * t.element_size()) == 0;
}

// Every tensor is on `ref`'s device (after check_cuda(ref): devices are checked last, see above).
inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* ref_name,
                              const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on ", ref_name, "'s device ",
                    ref.device(), ", got ", t.device());
}
inline void check_same_device(const at::Tensor& ref, const std::optional<at::Tensor>& t, const char* op,
                              const char* ref_name, const char* name) {
  if (t.has_value()) check_same_device(ref, *t, op, ref_name, name);
}

}  // namespace gptkernels
