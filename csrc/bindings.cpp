// The extension module gptkernels._C: op schemas (registered once, here) and their kernels.
//
// `import gptkernels._C` loads this library; its static initializers register the ops under
// torch.ops.gptkernels_C. Arguments an op writes into are marked Tensor(a!) in its schema.
//
// The implementations are registered for CUDA and also for CPU: on CPU tensors they run their
// structural input checks and then fail with "... must be a CUDA tensor", which is what a caller
// (and the CPU-only test machine) should see instead of a dispatcher error.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "ops.h"

// The op namespace: gptkernels_C. The CPU emulator of the tests builds these same files into a
// second library with its own namespace, so both can be loaded in one process.
#ifndef GPTKERNELS_OPS_NAMESPACE
#define GPTKERNELS_OPS_NAMESPACE gptkernels_C
#endif
// Indirection so that the namespace macro is expanded before TORCH_LIBRARY pastes tokens with it.
#define GPTKERNELS_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define GPTKERNELS_LIBRARY_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

GPTKERNELS_LIBRARY(GPTKERNELS_OPS_NAMESPACE, m) {
  m.def(
      "flash_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "Tensor? block_table, Tensor? seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, int? window, "
      "float softmax_scale, bool bottom_right) -> (Tensor out, Tensor lse)");
  m.def(
      "rotary_out(Tensor q, Tensor? k, Tensor cos, Tensor sin, Tensor? positions, Tensor? offsets, int offset, "
      "bool interleaved, bool conjugate, Tensor(a!) q_out, Tensor(b!)? k_out) -> ()");
  m.def(
      "rotary_inplace(Tensor(a!) q, Tensor(b!)? k, Tensor cos, Tensor sin, Tensor? positions, Tensor? offsets, "
      "int offset, bool interleaved, bool conjugate) -> ()");
  m.def("paged_append(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def(
      "paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
      "float softmax_scale, int? window, int num_splits) -> (Tensor out, Tensor lse)");
}

#define GPTKERNELS_IMPL(m)                                    \
  m.impl("flash_attn_fwd", &gptkernels::flash_attn_fwd);      \
  m.impl("rotary_out", &gptkernels::rotary_out);              \
  m.impl("rotary_inplace", &gptkernels::rotary_inplace);      \
  m.impl("paged_append", &gptkernels::paged_append);          \
  m.impl("paged_decode", &gptkernels::paged_decode)

GPTKERNELS_LIBRARY_IMPL(GPTKERNELS_OPS_NAMESPACE, CUDA, m) { GPTKERNELS_IMPL(m); }
GPTKERNELS_LIBRARY_IMPL(GPTKERNELS_OPS_NAMESPACE, CPU, m) { GPTKERNELS_IMPL(m); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gptkernels CUDA kernels; the ops are registered as torch.ops.gptkernels_C.*";
}
