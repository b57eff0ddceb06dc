"""Input checks shared by every op and backend.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape, value
or device) with a message that names the argument and says what was expected. Checks that would need
a device sync (the *values* of index tensors) are in :func:`debug_enabled` blocks of the callers and
run only under ``GPTKERNELS_DEBUG=1``; the kernels mask their loads so unchecked indices stay in bounds.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ._backend import debug_checks as debug_enabled  # noqa: F401  (re-exported for callers)
from ._policy import FP8_KV_DTYPES, MAX_HEAD_DIM


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    x,
    name: str,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    op: str,
) -> torch.Tensor:
    """``x`` is a tensor with one of ``ndim`` dimensions and one of ``dtypes``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{op}: {name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype {_dtype_names(dtypes)}, got {x.dtype}")
    return x


def check_same_dtype(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} must be on {ref_name}'s device ({ref.device}), got {t.device}")


def check_dim(op: str, name: str, x: torch.Tensor, dim: int, expected: int, what: str) -> None:
    """``x.shape[dim] == expected``; ``what`` says where ``expected`` comes from."""
    if x.shape[dim] != expected:
        raise ValueError(
            f"{op}: {name}.shape[{dim}] must be {expected} ({what}), got shape {tuple(x.shape)}"
        )


def check_head_dim(op: str, name: str, head_dim: int, max_head_dim: int = MAX_HEAD_DIM) -> None:
    if head_dim < 1 or head_dim > max_head_dim:
        raise ValueError(f"{op}: head dim of {name} must be between 1 and {max_head_dim}, got {head_dim}")


def check_head_dim_stride(op: str, name: str, t) -> None:
    """The kernels index the head dim (at most 256 elements) in int32, any other dim in int64 where
    needed: the last dim's stride times its size must stay below 2**31 elements (only an exotic
    view breaks this, e.g. a transposed tensor with the head dim outermost)."""
    if t is not None and abs(t.stride(-1)) * t.shape[-1] >= 2**31:
        raise ValueError(f"{op}: {name} has a last-dim (head dim) stride of {t.stride(-1)} elements: "
                         f"the kernels need stride x size ({t.shape[-1]}) below 2**31; "
                         f"pass {name}.contiguous()")


def check_gqa(op: str, hq: int, hkv: int, q_name: str = "q", kv_name: str = "k") -> int:
    """Query heads must be a multiple of KV heads; returns the group size Hq // Hkv."""
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(
            f"{op}: the number of heads of {q_name} ({hq}) must be a multiple of the number of heads "
            f"of {kv_name} ({hkv}) (GQA/MQA)"
        )
    return hq // hkv


def check_window(op: str, window, causal: bool, *, pairs: bool = False):
    """``window`` is None or an int >= 1 (W keys, itself included: needs causal attention); with
    ``pairs`` (flash_attn) also FlashAttention's ``(left, right)``: two ints, each >= 0 or -1
    (unbounded), with or without ``causal`` (which sets right to 0, as FlashAttention does).
    Normalised by :func:`gptkernels._policy.window_bounds`."""
    if window is None:
        return None
    if isinstance(window, (tuple, list)) and pairs:
        if len(window) != 2:
            raise ValueError(f"{op}: window must be an int or a (left, right) pair, got {len(window)} "
                             f"values: {window!r}")
        for side, n in zip(("left", "right"), window):
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(f"{op}: window=(left, right) must hold ints, got {side} = {n!r}")
            if n < -1:
                raise ValueError(f"{op}: window=(left, right): {side} must be >= 0 or -1 (unbounded), "
                                 f"got {n}")
        return tuple(window)
    if isinstance(window, bool) or not isinstance(window, int):
        more = " or a (left, right) pair of ints" if pairs else ""
        raise TypeError(f"{op}: window must be None or an int >= 1{more}, got {window!r}")
    if window < 1:
        raise ValueError(f"{op}: window must be >= 1 (the number of keys a query sees, itself included), got {window}")
    if not causal:
        more = " (or pass window=(left, right) for a non-causal window)" if pairs else ""
        raise ValueError(f"{op}: window={window} needs causal attention (causal=True / is_causal=True){more}")
    return window


def check_scale(op: str, name: str, scale) -> None:
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: {name} must be None or a float, got {scale!r}")
    if not (scale == scale) or scale in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: {name} must be finite, got {scale}")


def check_index_tensor(
    op: str, name: str, x, *, ndim: int, dtypes: Sequence[torch.dtype], device: torch.device
) -> torch.Tensor:
    """An integer index tensor (cu_seqlens, block tables, slot mappings, positions)."""
    check_tensor(x, name, ndim=ndim, dtypes=dtypes, op=op)
    if x.device != device:
        raise ValueError(f"{op}: {name} must be on the same device as the data ({device}), got {x.device}")
    return x


def check_cu_seqlens(op: str, name: str, cu: torch.Tensor, batch: int | None, total: int) -> None:
    """Shape/dtype of cu_seqlens; under GPTKERNELS_DEBUG=1 also its values (starts at 0, non-decreasing,
    ends at ``total``)."""
    if cu.dim() != 1 or cu.numel() < 1:  # B = 0 is a single 0
        raise ValueError(f"{op}: {name} must be a 1-D int32 tensor of B+1 running offsets, got shape {tuple(cu.shape)}")
    if batch is not None and cu.numel() != batch + 1:
        raise ValueError(
            f"{op}: {name} must have B+1 = {batch + 1} entries (like the other cu_seqlens), got {cu.numel()}"
        )
    if debug_enabled():
        c = cu.to("cpu", torch.int64)
        if int(c[0]) != 0:
            raise ValueError(f"{op}: {name}[0] must be 0, got {int(c[0])}")
        if bool((c[1:] < c[:-1]).any()):
            raise ValueError(f"{op}: {name} must be non-decreasing, got {c.tolist()}")
        if int(c[-1]) != total:
            raise ValueError(
                f"{op}: {name}[-1] must equal the number of packed tokens ({total}), got {int(c[-1])}"
            )


#: Page sizes a paged cache may have: powers of two in this range (SPEC.md, "Paged KV cache").
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 1, 1024


def check_block_size(op: str, name: str, block_size: int) -> None:
    """A paged cache's block size is a power of two from 1 to 1024 (SPEC.md, "Paged KV cache")."""
    if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(f"{op}: the block size of {name} must be a power of two from {MIN_BLOCK_SIZE} to "
                         f"{MAX_BLOCK_SIZE}, got {block_size}")


def debug_check_block_table(op: str, cache: torch.Tensor, block_table: torch.Tensor,
                            seq_lens: torch.Tensor, lens_name: str) -> None:
    """Under GPTKERNELS_DEBUG=1 (needs a sync): every block a sequence uses lies inside the paged
    ``cache`` (num_blocks, block_size, H, D), and its length fits in its block table row."""
    num_blocks, block_size = cache.shape[0], cache.shape[1]
    lens = seq_lens.to("cpu", torch.int64)
    table = block_table.to("cpu", torch.int64)
    for b in range(table.shape[0]):
        n = int(lens[b])
        if n < 0 or n > table.shape[1] * block_size:
            raise ValueError(f"{op}: {lens_name}[{b}] = {n} (sequence {b}) must be between 0 and the "
                             f"{table.shape[1]} blocks x {block_size} tokens of block_table")
        used = table[b, : (n + block_size - 1) // block_size]
        bad = (used < 0) | (used >= num_blocks)
        if bool(bad.any()):
            raise ValueError(f"{op}: block_table[{b}] (sequence {b}) points outside the cache "
                             f"({num_blocks} blocks): {used[bad].tolist()}")


# --------------------------------------------------------------------------------------------------
# fp8 KV-cache scales, softcap, ALiBi slopes (semantics: gptkernels/reference.py)
# --------------------------------------------------------------------------------------------------


def check_kv_scales(op: str, k_cache: torch.Tensor, k_scale, v_scale) -> None:
    """``k_scale``/``v_scale`` go with an fp8 cache and only with one: float32 tensors shaped () or
    (Hkv,) on the cache's device (``k_cache`` (num_blocks, block_size, Hkv, D), already checked).
    Under GPTKERNELS_DEBUG=1 (a sync) their values must also be finite and > 0."""
    hkv = k_cache.shape[2]
    fp8 = k_cache.dtype in FP8_KV_DTYPES
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not fp8:
            if scale is not None:
                raise ValueError(f"{op}: {name} is for an fp8 cache ({_dtype_names(FP8_KV_DTYPES)}) only; "
                                 f"the cache is {str(k_cache.dtype).replace('torch.', '')}: pass {name}=None")
            continue
        if scale is None:
            raise ValueError(f"{op}: {name} is required with a {str(k_cache.dtype).replace('torch.', '')} cache "
                             f"(float32, shaped () or (Hkv,) = ({hkv},): the cache stores value / scale)")
        check_tensor(scale, name, dtypes=(torch.float32,), op=op)
        if scale.shape not in ((), (hkv,)):
            raise ValueError(f"{op}: {name} must be shaped () or (Hkv,) = ({hkv},) (one scale per KV head), "
                             f"got shape {tuple(scale.shape)}")
        if scale.device != k_cache.device:
            raise ValueError(f"{op}: {name} must be on the cache's device ({k_cache.device}), got {scale.device}")
        if debug_enabled():
            bad = ~(torch.isfinite(scale) & (scale > 0))
            if bool(bad.any()):
                raise ValueError(f"{op}: {name} must be finite and > 0, got {scale.cpu().tolist()}")


def check_softcap(op: str, softcap) -> float | None:
    """``softcap`` is None (off) or a finite number > 0 (scores -> softcap * tanh(scores / softcap))."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"{op}: softcap must be None or a float > 0, got {softcap!r}")
    if not (softcap > 0 and softcap != float("inf")):  # also refuses NaN
        raise ValueError(f"{op}: softcap must be None or a finite float > 0 (FlashAttention's softcap=0.0, "
                         f"\"off\", is softcap=None here), got {softcap}")
    return float(softcap)


def check_alibi_slopes(op: str, slopes, batch: int, num_heads: int, device: torch.device) -> None:
    """ALiBi ``slopes``: None, or float32 (Hq,) or (B, Hq) on the data's device (any strides)."""
    if slopes is None:
        return
    check_tensor(slopes, "alibi_slopes", dtypes=(torch.float32,), op=op)
    if slopes.shape not in ((num_heads,), (batch, num_heads)):
        raise ValueError(f"{op}: alibi_slopes must be shaped (Hq,) = ({num_heads},) or (B, Hq) = "
                         f"({batch}, {num_heads}), got shape {tuple(slopes.shape)}")
    if slopes.device != device:
        raise ValueError(f"{op}: alibi_slopes must be on the same device as the data ({device}), got {slopes.device}")


def check_dropout(op: str, dropout_p) -> float:
    """``dropout_p``: a float in [0, 1) (FlashAttention's; 0: no dropout)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{op}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not 0 <= dropout_p < 1:  # also refuses NaN
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)
