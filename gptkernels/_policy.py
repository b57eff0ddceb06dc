"""Defaults and policies that every op and every backend shares, each written once.

The public ops resolve these values at the boundary and hand the backends resolved numbers: a
backend never re-defaults the softmax scale or picks its own split count.

* dtypes and head dims the kernels serve;
* the softmax scale default and ``LOG2E`` (the kernels' online softmax runs in base 2);
* the shape of ``lse`` (for fake implementations and launchers alike);
* the flash-decoding split policy (how many programs share one row's keys) and the SM count it
  assumes, for ``paged_decode`` and the ``flash_attn`` forward on every backend.
"""

from __future__ import annotations

import math

import torch

# --------------------------------------------------------------------------------------------------
# dtypes and sizes
# --------------------------------------------------------------------------------------------------

#: dtypes the kernels compute in (activations, caches).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: dtypes a paged KV cache may have besides the model's float dtype: fp8 (e4m3, "fn": no infinities,
#: largest finite value 448), read and written with per-KV-head float32 scales (SPEC.md, "Paged KV cache").
FP8_KV_DTYPES = (torch.float8_e4m3fn,)
#: The largest finite float8_e4m3fn magnitude: quantizing saturates there.
FP8_E4M3_MAX = 448.0
#: integer dtypes accepted for token positions and per-sequence offsets.
INDEX_DTYPES = (torch.int32, torch.int64)
#: largest head dim the attention kernels support.
MAX_HEAD_DIM = 256

# --------------------------------------------------------------------------------------------------
# Softmax
# --------------------------------------------------------------------------------------------------

#: log2(e): the kernels compute exp(x) as exp2(x * LOG2E) and keep lse in base 2 internally.
LOG2E = 1.4426950408889634


def softmax_scale(head_dim: int, given: float | None) -> float:
    """The scale applied to q.k: ``given``, or ``1/sqrt(head_dim)`` (SPEC.md)."""
    return 1.0 / math.sqrt(head_dim) if given is None else float(given)


def lse_shape(q: torch.Tensor, varlen: bool) -> tuple[int, ...]:
    """Shape of the float32 lse of attention: dense q (B, Sq, Hq, D) -> (B, Hq, Sq); varlen q
    (Tq, Hq, D) -> (Hq, Tq)."""
    if varlen:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


# --------------------------------------------------------------------------------------------------
# Attention windows
# --------------------------------------------------------------------------------------------------


def window_bounds(causal: bool, window) -> tuple[int, int]:
    """FlashAttention's ``window_size=(left, right)`` of a checked ``(causal, window)``: query row i at
    p = i + Sk - Sq sees keys ``p - left <= j <= p + right`` (and j < Sk); -1 = unbounded on that side.

    ``window=None``: (-1, 0) causal, (-1, -1) not; an int W (causal only): (W - 1, 0); a pair
    (left, right): itself, with right = 0 when ``causal`` (FlashAttention's rule: causal sets the
    right window to 0). The one translation of the user's arguments, for every backend.
    """
    if window is None:
        return (-1, 0) if causal else (-1, -1)
    if isinstance(window, int):
        return window - 1, 0
    left, right = window
    return int(left), 0 if causal else int(right)


def band_width(left: int, right: int) -> int | None:
    """Keys one query row can see under the window (left, right): left + right + 1, or None
    (unbounded) when either side is -1. Sizes tiles and splits (a static bound, no host sync)."""
    return None if left < 0 or right < 0 else left + right + 1


# --------------------------------------------------------------------------------------------------
# Flash-decoding split policy
# --------------------------------------------------------------------------------------------------

#: A split should cover at least this many keys: below it the merge and launch overheads dominate.
MIN_SPLIT_TOKENS = 512
#: Upper bound of the split count (the merge kernel reads every split's partial result).
MAX_SPLITS = 128
#: SM count assumed off the GPU (the interpreter, CPU tensors): the same choices on every machine.
CPU_NOMINAL_SMS = 16

# A plain dict memo rather than functools.lru_cache, which torch.compile warns about when it traces.
_SM_COUNTS: dict[int, int] = {}


@torch.compiler.assume_constant_result
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; ``CPU_NOMINAL_SMS`` for anything but a CUDA device."""
    if device.type != "cuda":
        return CPU_NOMINAL_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def num_splits(programs: int, band: int, num_sms: int) -> int:
    """How many splits of the keys (flash-decoding) a launch of ``programs`` programs should use.

    ``programs``: programs without splitting (e.g. sequences x KV heads for the paged decode);
    ``band``: the most keys one query row can see (a static bound from shapes and the window: no
    host sync). Enough programs to fill the GPU about twice (2 x num_sms: two resident programs per
    SM keep enough loads in flight to hide memory latency), but each split covers at least
    MIN_SPLIT_TOKENS keys, and at most MAX_SPLITS splits.
    """
    programs = max(1, programs)
    target = 2 * num_sms
    if programs >= target:
        return 1
    splits = -(-target // programs)
    return max(1, min(splits, band // MIN_SPLIT_TOKENS, MAX_SPLITS))


def decode_band(max_keys: int, window: int | None, query_rows: int = 1) -> int:
    """The most keys one of ``query_rows`` consecutive query rows can see: all ``max_keys``, or the
    window plus the rows it slides over."""
    if window is None:
        return max_keys
    return min(max_keys, window + query_rows - 1)
