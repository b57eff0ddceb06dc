"""The ``"cuda"`` backend: thin wrappers over the CUDA extension's ops ``torch.ops.gptkernels_C.*``.

Same function names and signatures as the Triton launchers (:mod:`gptkernels.triton`), so the
public ops dispatch to either with one lookup (:func:`gptkernels._dispatch.backend_fn`). They return contiguous
outputs. There is no ``flash_attn_backward`` here: the CUDA backend is forward-only for attention,
and :mod:`gptkernels.attention` says so when gradients are needed.

Input checks are the public ops' (gptkernels.attention, rotary, paged): the launchers receive checked
inputs with resolved defaults. The C++ ops keep only the guards that hold a kernel in bounds when
``torch.ops.gptkernels_C.*`` is called directly (terse ValueError / TypeError, passed through here),
and say what the CUDA kernels do not implement (NotImplementedError, e.g. float32 attention or a
head dim without a compiled kernel), which the wrappers turn into :class:`BackendUnavailableError`:
that list lives in one place, csrc/. Empty inputs (batch 0, no tokens, no keys) give the empty or
zero / -inf results the other backends give.
"""

from __future__ import annotations

import torch

from .._backend import BackendUnavailableError
from .._policy import lse_shape, window_bounds

#: The op namespace the wrappers call; ``None`` until first use (importing gptkernels._C registers
#: it). The tests point it at the CPU emulator of the extension (tests/cuda_emulator).
_OPS = None
_FAKES_REGISTERED: set[str] = set()


def _ops():
    global _OPS
    if _OPS is None:
        from .. import _C  # noqa: F401  (loads the library: registers torch.ops.gptkernels_C)

        register_fakes("gptkernels_C")
        _OPS = torch.ops.gptkernels_C
    return _OPS


def _call(public_op: str, name: str, *args):
    try:
        return getattr(_ops(), name)(*args)
    except NotImplementedError as e:
        raise BackendUnavailableError(f"{public_op}: backend 'cuda' cannot serve this call: {e}") from None


# --------------------------------------------------------------------------------------------------
# Fake (meta) implementations, so that the ops trace under torch.compile / FakeTensorMode
# --------------------------------------------------------------------------------------------------


def register_fakes(namespace: str) -> None:
    """Registers the fake implementations of the extension's ops in ``namespace`` (once)."""
    if namespace in _FAKES_REGISTERED:
        return
    _FAKES_REGISTERED.add(namespace)
    lib = f"{namespace}::"

    @torch.library.register_fake(lib + "flash_attn_fwd")
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k, max_seqlen_q, max_seqlen_k, causal,
          window, softmax_scale, bottom_right):
        return q.new_empty(q.shape), q.new_empty(lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32)

    @torch.library.register_fake(lib + "rotary_out")
    def _(q, k, cos, sin, positions, offsets, offset, interleaved, conjugate, q_out, k_out):
        return None

    @torch.library.register_fake(lib + "rotary_inplace")
    def _(q, k, cos, sin, positions, offsets, offset, interleaved, conjugate):
        return None

    @torch.library.register_fake(lib + "paged_append")
    def _(k, v, k_cache, v_cache, slot_mapping):
        return None

    @torch.library.register_fake(lib + "paged_decode")
    def _(q, k_cache, v_cache, block_table, seq_lens, softmax_scale, window, num_splits):
        return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Launchers (same signatures as gptkernels.triton)
# --------------------------------------------------------------------------------------------------


def flash_attn_forward(q, k, v, *, causal, window, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       max_seqlen_k, block_table, seqlens_k, bottom_right, k_scale=None, v_scale=None,
                       softcap=None, alibi_slopes=None, dropout_p=None, dropout_seed=None):
    """(out, lse): out like q (contiguous), lse float32 (B, Hq, Sq) dense or (Hq, Tq) varlen.

    float16/bfloat16 only, head dims 32, 64, 80, 96, 128, rows 16-byte aligned (head dim contiguous).
    ``softmax_scale`` and, for varlen q, ``max_seqlen_q`` come resolved from gptkernels.attention.
    """
    _refuse_options("flash_attn", k_scale=k_scale, v_scale=v_scale, softcap=softcap, alibi_slopes=alibi_slopes)
    if dropout_p:  # passed only when > 0 (gptkernels.attention)
        raise BackendUnavailableError(
            f"flash_attn: backend 'cuda' cannot serve this call: no CUDA kernel for dropout_p > 0 "
            f"(got {dropout_p}; dropout runs on backend='triton' or 'torch')")
    if v.shape[-1] != q.shape[-1]:
        raise BackendUnavailableError(
            f"flash_attn: backend 'cuda' cannot serve this call: no CUDA kernel for a head dim of v "
            f"({v.shape[-1]}) different from q's ({q.shape[-1]}) (it runs on backend='triton' or 'torch')")
    causal, window = _causal_window(causal, window)
    max_q = q.shape[1] if cu_seqlens_q is None else int(max_seqlen_q)  # dense: Sq is q's shape
    max_k = 0 if max_seqlen_k is None else int(max_seqlen_k)  # unused: each sequence's key count is read
    out, lse = _call("flash_attn", "flash_attn_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k,
                     max_q, max_k, bool(causal), window, float(softmax_scale), bool(bottom_right))
    return out, lse


def _causal_window(causal, window):
    """The C++ op's (causal, window W or None) for a window (``window_bounds``'s (left, right)) it
    serves: causal with or without a left window, or full attention. A two-sided or non-causal
    window has no CUDA kernel: refused, naming the argument."""
    left, right = window_bounds(causal, window)
    if right == 0:
        return True, None if left < 0 else left + 1
    if left < 0 and right < 0:
        return False, None
    raise BackendUnavailableError(
        f"flash_attn: backend 'cuda' cannot serve this call: no CUDA kernel for window=(left, right) = "
        f"({left}, {right}) (two-sided and non-causal windows run on backend='triton' or 'torch')")


def apply_rotary(q, k, cos, sin, *, positions, offset, interleaved, inplace, conjugate):
    """(q_out, k_out): rotated copies (contiguous), or q and k themselves rotated in place."""
    offsets, offset_int = None, 0
    if isinstance(offset, torch.Tensor):
        offsets = offset.reshape(-1)  # a 0-d offset becomes (1,): one offset for every token
    else:
        offset_int = int(offset)
    if inplace:
        _call("apply_rotary", "rotary_inplace", q, k, cos, sin, positions, offsets, offset_int, bool(interleaved),
              bool(conjugate))
        return q, k
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = None if k is None else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _call("apply_rotary", "rotary_out", q, k, cos, sin, positions, offsets, offset_int, bool(interleaved),
          bool(conjugate), q_out, k_out)
    return q_out, k_out


def _refuse_options(public_op: str, **options) -> None:
    """Options the Triton launchers take and the CUDA kernels do not implement (they are not in the
    C++ schemas): fp8 caches (k_scale/v_scale), softcap, ALiBi."""
    used = [name for name, value in options.items() if value is not None]
    if used:
        raise BackendUnavailableError(
            f"{public_op}: backend 'cuda' cannot serve this call: no CUDA kernel for {', '.join(used)} "
            "(fp8 caches, softcap and ALiBi run on backend='triton' or 'torch')")


def paged_append(k, v, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None):
    """Writes k, v (T, Hkv, D) into the caches at slot_mapping (T,); slots of -1 are skipped."""
    _refuse_options("paged_append", k_scale=k_scale, v_scale=v_scale)
    _call("paged_append", "paged_append", k, v, k_cache, v_cache, slot_mapping)


def paged_decode(q, k_cache, v_cache, block_table, seq_lens, *, softmax_scale, window, num_splits,
                 k_scale=None, v_scale=None, softcap=None, alibi_slopes=None):
    """(out (B, Hq, D) like q, lse (B, Hq) float32). ``softmax_scale`` and ``num_splits`` come resolved
    from gptkernels.paged (the split policy is gptkernels._policy's, for every backend)."""
    _refuse_options("paged_decode", k_scale=k_scale, v_scale=v_scale, softcap=softcap, alibi_slopes=alibi_slopes)
    out, lse = _call("paged_decode", "paged_decode", q, k_cache, v_cache, block_table, seq_lens,
                     float(softmax_scale), window, int(num_splits))
    return out, lse
