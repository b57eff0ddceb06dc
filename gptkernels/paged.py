"""Paged KV-cache ops: :func:`paged_append` and :func:`paged_decode`.

Layout (SPEC.md, "Paged KV cache"): per layer, ``k_cache`` and ``v_cache`` are (num_blocks, block_size,
Hkv, D); a token's slot is ``block * block_size + offset_in_block``. The block manager that hands out
slots and block tables is :class:`gptkernels.kv_cache.PagedKVCache`.

The ops check their inputs here, resolve the backend, and run the eager reference (``"torch"``) or a
kernel backend through the ``torch.library`` ops ``gptkernels::paged_append`` (mutates the caches)
and ``gptkernels::paged_decode``, so ``torch.compile(fullgraph=True)`` sees opaque ops with fake
implementations and a decode step can be captured in a CUDA graph (no host sync inside the op).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks as C
from . import _policy as P
from . import reference
from ._backend import BackendUnavailableError, resolve
from ._dispatch import backend_fn, needs_grad

# --------------------------------------------------------------------------------------------------
# torch.library ops (kernel backends; "torch" is plain eager code)
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("gptkernels::paged_append", mutates_args=("k_cache", "v_cache"))
def _paged_append_op(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor, k_scale: Optional[torch.Tensor],
                     v_scale: Optional[torch.Tensor], backend: str) -> None:
    fn = backend_fn(backend, "paged_append", "paged_append")
    if k_scale is None:  # the call every backend serves
        fn(k, v, k_cache, v_cache, slot_mapping)
    else:
        fn(k, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)


@_paged_append_op.register_fake
def _(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, backend):
    return None


@torch.library.custom_op("gptkernels::paged_decode", mutates_args=())
def _paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor, softmax_scale: float,
                     window: Optional[int], num_splits: int, k_scale: Optional[torch.Tensor],
                     v_scale: Optional[torch.Tensor], softcap: Optional[float],
                     alibi_slopes: Optional[torch.Tensor], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    fn = backend_fn(backend, "paged_decode", "paged_decode")
    # Only the options a call uses reach the launcher: a backend without them (cuda) serves the rest.
    extra = {name: val for name, val in (("k_scale", k_scale), ("v_scale", v_scale), ("softcap", softcap),
                                         ("alibi_slopes", alibi_slopes)) if val is not None}
    return fn(q, k_cache, v_cache, block_table, seq_lens, softmax_scale=softmax_scale, window=window,
              num_splits=num_splits, **extra)


@_paged_decode_op.register_fake
def _(q, k_cache, v_cache, block_table, seq_lens, softmax_scale, window, num_splits, k_scale, v_scale,
      softcap, alibi_slopes, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _check_caches(op: str, k_cache, v_cache, dtype: torch.dtype, device: torch.device, ref: str,
                  k_scale, v_scale) -> None:
    """The caches: (num_blocks, block_size, Hkv, D) pairs of ``ref``'s dtype, or fp8 with scales."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        C.check_tensor(t, name, ndim=4, dtypes=P.FLOAT_DTYPES + P.FP8_KV_DTYPES, op=op)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache and v_cache must have the same shape (num_blocks, block_size, Hkv, D), "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.dtype in P.FP8_KV_DTYPES or v_cache.dtype in P.FP8_KV_DTYPES:
        if v_cache.dtype != k_cache.dtype:
            raise TypeError(f"{op}: v_cache must have k_cache's dtype ({k_cache.dtype}), got {v_cache.dtype}")
    elif k_cache.dtype != dtype or v_cache.dtype != dtype:
        bad = "k_cache" if k_cache.dtype != dtype else "v_cache"
        raise TypeError(f"{op}: {bad} must have the same dtype as {ref} ({dtype}) or be an fp8 cache "
                        f"(float8_e4m3fn, with scales), got {(k_cache if bad == 'k_cache' else v_cache).dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != device:
            raise ValueError(f"{op}: {name} must be on {ref}'s device ({device}), got {t.device}")
    C.check_block_size(op, "k_cache (its shape[1])", k_cache.shape[1])
    C.check_kv_scales(op, k_cache, k_scale, v_scale)


def _check_append(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale) -> None:
    op = "paged_append"
    C.check_tensor(k, "k", ndim=3, dtypes=P.FLOAT_DTYPES, op=op)
    C.check_tensor(v, "v", ndim=3, dtypes=P.FLOAT_DTYPES, op=op)
    C.check_same_dtype(op, "k", k, v=v)
    C.check_same_device(op, "k", k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape (T, Hkv, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    _check_caches(op, k_cache, v_cache, k.dtype, k.device, "k", k_scale, v_scale)
    C.check_dim(op, "k", k, 1, k_cache.shape[2], "k_cache.shape[2], the KV heads of the cache")
    C.check_dim(op, "k", k, 2, k_cache.shape[3], "k_cache.shape[3], the head dim of the cache")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        C.check_head_dim_stride(op, name, t)
    C.check_index_tensor(op, "slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64,), device=k.device)
    C.check_dim(op, "slot_mapping", slot_mapping, 0, k.shape[0], "k.shape[0], one slot per token")
    if C.debug_enabled():
        slots = slot_mapping.cpu()
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        bad = (slots < -1) | (slots >= num_slots)
        if bool(bad.any()):
            t = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: slot_mapping[{t}] = {int(slots[t])} is outside the cache "
                             f"(-1 to skip, or 0 to {num_slots - 1})")
        kept = slots[slots >= 0]
        if kept.unique().numel() != kept.numel():
            raise ValueError(f"{op}: slot_mapping writes the same slot twice")


def _check_decode(q, k_cache, v_cache, block_table, seq_lens, softmax_scale, window, num_splits,
                  k_scale, v_scale, softcap, alibi_slopes) -> None:
    op = "paged_decode"
    C.check_tensor(q, "q", ndim=3, dtypes=P.FLOAT_DTYPES, op=op)
    _check_caches(op, k_cache, v_cache, q.dtype, q.device, "q", k_scale, v_scale)
    if q.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"{op}: q and k_cache must have the same head dim, got {q.shape[-1]} and {k_cache.shape[-1]}")
    C.check_head_dim(op, "q", q.shape[-1])
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        C.check_head_dim_stride(op, name, t)
    C.check_gqa(op, q.shape[1], k_cache.shape[2], "q", "k_cache")
    idx = dict(dtypes=(torch.int32,), device=q.device)
    C.check_index_tensor(op, "block_table", block_table, ndim=2, **idx)
    C.check_dim(op, "block_table", block_table, 0, q.shape[0], "q.shape[0], the batch size")
    if block_table.shape[1] < 1:
        raise ValueError(f"{op}: block_table must have at least one column, got shape {tuple(block_table.shape)}")
    C.check_index_tensor(op, "seq_lens", seq_lens, ndim=1, **idx)
    C.check_dim(op, "seq_lens", seq_lens, 0, q.shape[0], "q.shape[0], the batch size")
    C.check_scale(op, "softmax_scale", softmax_scale)
    C.check_window(op, window, True)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)):
        raise TypeError(f"{op}: num_splits must be None or an int >= 1, got {num_splits!r}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"{op}: num_splits must be None or an int >= 1, got {num_splits}")
    C.check_softcap(op, softcap)
    C.check_alibi_slopes(op, alibi_slopes, q.shape[0], q.shape[1], q.device)
    if C.debug_enabled():
        C.debug_check_block_table(op, k_cache, block_table, seq_lens, "seq_lens")


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def paged_append(k, v, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None, backend=None) -> None:
    """Write k, v (T, Hkv, D) into the paged caches at ``slot_mapping`` (T,) int64, in place.

    A slot is ``block * block_size + offset``; a slot of -1 is skipped (padding tokens). A slot
    outside the cache is never written (under GPTKERNELS_DEBUG=1 it is a ValueError).

    fp8 caches (``torch.float8_e4m3fn``) need ``k_scale`` and ``v_scale``: float32, shaped (Hkv,) or
    (); the cache stores value / scale, rounded to nearest even and saturated at +-448. Float caches
    take no scales.
    """
    _check_append(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    backend = resolve(backend, k.device, "paged_append")
    if backend == "torch":
        reference.paged_append(k, v, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)
    else:
        _paged_append_op(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, backend)


def paged_decode(q, k_cache, v_cache, block_table, seq_lens, *, softmax_scale=None, window=None,
                 num_splits=None, return_lse=False, k_scale=None, v_scale=None, softcap=None,
                 alibi_slopes=None, backend=None):
    """Attention of one new query token per sequence over its paged cache.

    q (B, Hq, D); k_cache/v_cache (num_blocks, block_size, Hkv, D); block_table (B, max_blocks) int32;
    seq_lens (B,) int32 counts the cached tokens including the current one (at position
    seq_lens - 1). Causal, with an optional sliding ``window`` (the query sees keys
    ``seq_lens - window <= j < seq_lens``). ``num_splits=None`` picks the flash-decoding split from
    the batch, KV heads, the block table's capacity and the GPU; an int >= 1 forces it.

    fp8 caches are read as stored * ``k_scale`` / ``v_scale`` (as for :func:`paged_append`),
    dequantized inside the kernel. ``softcap`` (> 0): scores ``s = softmax_scale * q.k`` become
    ``softcap * tanh(s / softcap)`` (FlashAttention's ``softcap``, vLLM's / FlashInfer's
    ``logits_soft_cap``). ``alibi_slopes`` (float32 (Hq,) or (B, Hq)): the bias
    ``-slope * (seq_lens - 1 - j)`` is added to the score of key j, after the soft cap
    (FlashAttention's and vLLM's ``alibi_slopes``).

    Returns out (B, Hq, D) like q, and with ``return_lse=True`` also lse (B, Hq) float32 (of the final
    scores). A sequence of length 0 gives zeros and lse -inf.
    """
    _check_decode(q, k_cache, v_cache, block_table, seq_lens, softmax_scale, window, num_splits,
                  k_scale, v_scale, softcap, alibi_slopes)
    if not isinstance(return_lse, bool):
        raise TypeError(f"paged_decode: return_lse must be a bool, got {return_lse!r}")
    scale = P.softmax_scale(q.shape[-1], softmax_scale)
    softcap = None if softcap is None else float(softcap)
    backend = resolve(backend, q.device, "paged_decode")
    if backend == "torch":
        out, lse = reference.paged_decode(q, k_cache, v_cache, block_table, seq_lens, softmax_scale=scale,
                                          window=window, return_lse=True, k_scale=k_scale, v_scale=v_scale,
                                          softcap=softcap, alibi_slopes=alibi_slopes)
    else:
        if needs_grad(q, k_cache, v_cache, alibi_slopes):
            raise BackendUnavailableError(
                f"paged_decode: backend {backend!r} is not differentiable; call it under torch.no_grad() "
                "(or use backend='torch')")
        if num_splits is None:
            band = P.decode_band(block_table.shape[1] * k_cache.shape[1], window)
            num_splits = P.num_splits(q.shape[0] * k_cache.shape[2], band, P.sm_count(q.device))
        out, lse = _paged_decode_op(q, k_cache, v_cache, block_table, seq_lens, scale, window,
                                    num_splits, k_scale, v_scale, softcap, alibi_slopes, backend)
    return (out, lse) if return_lse else out
