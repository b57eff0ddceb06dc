"""The eager PyTorch baseline: every op written plainly, the semantics every kernel is checked against.

These functions are the ``"torch"`` backend (with ``upcast=True``: math in float32, or float64 for
float64 inputs) and, called on float64 inputs, the reference of the parity tests. With
``upcast=False`` they compute in the input dtype, like a user's eager model would; the tests use that
as the yardstick a low-precision kernel may not be worse than (SPEC.md, "Numerics").

They do no input checking: the public ops in :mod:`gptkernels` check before calling them. Index
values the ops do not check (outside GPTKERNELS_DEBUG=1) are treated exactly as the kernels treat
them, so the backends agree on every input the kernels accept: a block-table entry outside
[0, num_blocks) or a key past the table's capacity contributes nothing, a slot outside the cache is
not written, a rotary position outside [0, max_positions) is left unrotated (cos 1, sin 0), and
sequence bounds from cu_seqlens / seqlens_k are clamped to the tensors' extents (never wrapped
around like a negative Python index). Outputs are contiguous, like the kernels'.
"""

from __future__ import annotations

import torch

from ._policy import FP8_E4M3_MAX, window_bounds
from ._policy import softmax_scale as softmax_scale_default


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32) if upcast else dtype


# --------------------------------------------------------------------------------------------------
# Score modifiers: softcap and ALiBi (every attention path; the kernels follow these definitions)
# --------------------------------------------------------------------------------------------------
#
# Order, as in FlashAttention 2/3, vLLM and FlashInfer: s = softmax_scale * q.k, then the soft cap,
# then the ALiBi bias, then the causal / window mask, then softmax:
#     s = softcap * tanh(s / softcap)              (softcap > 0; None: off)
#     s = s - slope[h] * |pos_q - pos_k|          (alibi_slopes; pos_q bottom-right aligned)
# lse is the logsumexp of these final scores.


def softcap_scores(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma-2 / Grok soft capping of scores that already carry the softmax scale:
    ``softcap * tanh(scores / softcap)`` (FlashAttention's ``softcap``, vLLM's
    ``logits_soft_cap``, FlashInfer's ``logits_soft_cap``); ``softcap=None`` leaves them unchanged."""
    if softcap is None:
        return scores
    return softcap * torch.tanh(scores / softcap)


def alibi_bias(slopes: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi's additive bias ``-slope * |pos_q - pos_k|`` (FlashAttention's ``alibi_slopes``: "a bias
    of -alibi_slope * |i + seqlen_k - seqlen_q - j|"; vLLM's ``slope * (pos_k - pos_q)`` is the same
    on the keys a causal query sees). ``slopes`` (..., H) -> bias (..., H, len(pos_q), len(pos_k))."""
    dist = (pos_q.to(dtype)[:, None] - pos_k.to(dtype)[None, :]).abs()
    return -slopes.to(dtype)[..., None, None] * dist


# --------------------------------------------------------------------------------------------------
# fp8 KV cache: value / scale stored in float8_e4m3fn, read back as stored * scale
# --------------------------------------------------------------------------------------------------


def _per_head(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A scale shaped () or (H,) as a (H, 1) / () tensor that broadcasts over (..., H, D) rows."""
    scale = scale.to(dtype)
    return scale[:, None] if scale.dim() == 1 else scale


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """x (..., H, D) -> fp8 ``x / scale`` (scale () or (H,) float32), rounded to nearest even and
    saturated at +-448 (e4m3's largest finite value) rather than turned into NaN. The division is in
    float32, as in the append kernels, so both give the same bits."""
    y = x.to(torch.float32) / _per_head(scale, torch.float32)
    return y.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(dtype)


def dequantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 x (..., H, D) -> ``x * scale`` in ``dtype`` (every fp8 value is exact in float16 and up)."""
    return x.to(dtype) * _per_head(scale, dtype)


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


def attention_mask(
    seqlen_q: int,
    seqlen_k: int,
    *,
    causal: bool,
    window: int | tuple[int, int] | None = None,
    bottom_right: bool = True,
    device=None,
) -> torch.Tensor | None:
    """Which keys each query sees: bool (seqlen_q, seqlen_k), True = visible; None = all visible.

    This is the mask rule of SPEC.md, written once. Query row ``i`` sits at absolute position
    ``p = i + seqlen_k - seqlen_q`` (bottom-right alignment; ``p = i`` when ``bottom_right=False``,
    torch SDPA's top-left convention). With (left, right) = ``window_bounds(causal, window)``
    (FlashAttention's ``window_size``) it sees keys ``p - left <= j <= p + right``, a side of -1
    unbounded. So causal: ``j <= p``; ``window=W``: at most W keys, itself included,
    ``p - W < j <= p``; ``window=(left, right)`` without causal: a two-sided band.
    """
    left, right = window_bounds(causal, window)
    if left < 0 and right < 0:
        return None
    shift = seqlen_k - seqlen_q if bottom_right else 0
    p = torch.arange(seqlen_q, device=device)[:, None] + shift
    j = torch.arange(seqlen_k, device=device)[None, :]
    visible = torch.ones((seqlen_q, seqlen_k), dtype=torch.bool, device=device)
    if right >= 0:
        visible &= j <= p + right
    if left >= 0:
        visible &= j >= p - left
    return visible


def _attend(q, k, v, scale, mask, dtype, *, softcap=None, bias=None, keep=None, dropout_p=0.0):
    """Softmax attention of one batch. q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), mask (Sq, Sk) or None;
    ``softcap`` and an additive ``bias`` broadcasting to (B, Hq, Sq, Sk) (ALiBi) as defined above.

    Returns out (B, Sq, Hq, D) in ``dtype`` and lse (B, Hq, Sq). Rows that see no key give zeros and
    lse = -inf. Dropout: ``keep`` (bool, broadcasting to (B, Hq, Sq, Sk)) keeps a probability, scaled
    by 1 / (1 - ``dropout_p``); lse stays that of the undropped scores (FlashAttention's).
    """
    group = q.shape[2] // k.shape[2]
    qt = q.to(dtype).transpose(1, 2)  # B, Hq, Sq, D
    kt = k.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    vt = v.to(dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    scores = softcap_scores((qt @ kt.transpose(-1, -2)) * scale, softcap)
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
        empty = ~mask.any(dim=-1, keepdim=True)  # (Sq, 1): rows that see no key
        lse = torch.logsumexp(scores, dim=-1)
        # softmax of an all -inf row is NaN: give those rows finite scores, then zero their weights.
        probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    else:
        lse = torch.logsumexp(scores, dim=-1)
        probs = torch.softmax(scores, dim=-1)
    if keep is not None:
        probs = probs.masked_fill(~keep, 0.0) / (1.0 - dropout_p)
    out = probs @ vt
    return out.transpose(1, 2), lse


def paged_keys(cache: torch.Tensor, block_table_row: torch.Tensor, length: int):
    """Positions [0, length) of one sequence in a paged cache (num_blocks, block_size, H, D):
    (rows (length, H, D), valid (length,) bool).

    A position is valid when its page lies inside the table row and the row's entry for it inside
    [0, num_blocks); invalid positions give zero rows and must not be attended (the kernels never
    load them: their keys contribute nothing).
    """
    num_blocks, block_size = cache.shape[0], cache.shape[1]
    width = block_table_row.shape[0]
    pos = torch.arange(length, device=cache.device)
    page = pos // block_size
    if width == 0 or num_blocks == 0:
        valid = torch.zeros(length, dtype=torch.bool, device=cache.device)
        return cache.new_zeros((length, *cache.shape[2:])), valid
    blk = block_table_row.to(cache.device).long()[page.clamp(max=width - 1)]
    valid = (page < width) & (blk >= 0) & (blk < num_blocks)
    rows = cache[torch.where(valid, blk, 0), pos % block_size]
    if rows.element_size() == 1:  # fp8: torch has no masked_fill for it; all-zero bits are +0.0
        return rows.view(torch.uint8).masked_fill(~valid[:, None, None], 0).view(rows.dtype), valid
    return rows.masked_fill(~valid[:, None, None], 0), valid


def gather_paged(cache: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence from a paged cache (num_blocks, block_size, H, D)
    (zeros where :func:`paged_keys` finds no valid block)."""
    return paged_keys(cache, block_table_row, length)[0]


def _bounds(cu: list[int], b: int, total: int) -> tuple[int, int]:
    """Sequence b's [start, end) from cu_seqlens, clamped to [0, total] as the kernels clamp them."""
    start = min(max(cu[b], 0), total)
    return start, min(max(cu[b + 1], start), total)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: int | tuple[int, int] | None = None,
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    seqlens_k: torch.Tensor | None = None,
    bottom_right: bool = True,
    upcast: bool = True,
    return_lse: bool = False,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
):
    """Attention with exactly SPEC's semantics (dense, varlen, paged keys, GQA, window, lse).

    ``causal`` and ``window`` (None, an int W, or FlashAttention's (left, right)): see
    :func:`attention_mask`.

    * dense: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D); lse (B, Hq, Sq). v's head dim Dv may differ
      from D (then out is (..., Hq, Dv)); so in every layout below.
    * varlen: q (Tq, Hq, D) with ``cu_seqlens_q``; k/v (Tk, Hkv, D) with ``cu_seqlens_k``; lse (Hq, Tq).
    * paged keys: k/v are caches (num_blocks, block_size, Hkv, D) with ``block_table`` (B, max_blocks)
      and ``seqlens_k`` (B,); q is dense (B, Sq, Hq, D) or varlen with ``cu_seqlens_q``. An fp8 cache
      is read as stored * ``k_scale`` / ``v_scale`` ((Hkv,) or ()).
    * ``softcap`` and ``alibi_slopes`` ((Hq,) or (B, Hq)): the score modifiers defined above.
    * ``dropout_p`` > 0 (dense and varlen keys, not paged): each probability is kept with
      probability 1 - dropout_p and scaled by 1 / (1 - dropout_p); lse is of the undropped scores.
      The keep mask is ``dropout_mask`` when given (bool (B, Hq, Sq, Sk) dense, (Hq, Tq, Tk) varlen:
      sequence b's block is ``[:, q0:q1, :seqlen_k]``; e.g. the Triton kernels' mask from
      ``gptkernels.triton.flash_attn.dropout_mask``, for parity tests), else drawn here from torch's
      ``generator`` (default: the global one): the torch and Triton backends draw different masks
      for the same seed, as FlashAttention's and torch's SDPA do.
    """
    if dropout_p > 0 and block_table is not None:
        raise ValueError("reference.attention: dropout_p > 0 is not served with paged keys (inference)")
    lens_k = None
    if block_table is not None:
        # The kernels clamp each length to the table's capacity (max_blocks * block_size).
        capacity = block_table.shape[1] * k.shape[1]
        lens_k = [min(max(n, 0), capacity) for n in seqlens_k.tolist()]
    return _attention(q, k, v, causal=causal, window=window, softmax_scale=softmax_scale,
                      cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, block_table=block_table,
                      lens_k=lens_k, bottom_right=bottom_right, upcast=upcast, return_lse=return_lse,
                      k_scale=k_scale, v_scale=v_scale, softcap=softcap, alibi_slopes=alibi_slopes,
                      dropout_p=dropout_p, dropout_mask=dropout_mask, generator=generator)


def _keep(dropout_p, dropout_mask, generator, shape, device, rows=None, cols=None):
    """The dropout keep mask (bool, ``shape`` = (B, Hq, Sq, Sk)) of one attend call, or None without
    dropout: ``dropout_mask`` (a varlen one cut to a sequence's ``rows`` and first ``cols`` keys and
    given a batch dim) or a draw from torch's ``generator``."""
    if not dropout_p > 0:
        return None
    if dropout_mask is None:
        gen_device = generator.device if generator is not None else device
        u = torch.rand(shape, generator=generator, device=gen_device)
        return (u >= dropout_p).to(device)
    if rows is not None:
        return dropout_mask[:, rows, :cols][None].to(device)
    return dropout_mask.to(device)


def _alibi(slopes, b, seqlen_q, seqlen_k, bottom_right, dtype, device):
    """The ALiBi bias of sequence ``b`` (None: all sequences, dense) or None without slopes."""
    if slopes is None:
        return None
    if b is not None and slopes.dim() == 2:
        slopes = slopes[b]  # dense (b None): (B, Hq) or (Hq,) slopes broadcast over the batch
    shift = seqlen_k - seqlen_q if bottom_right else 0
    pos_q = torch.arange(seqlen_q, device=device) + shift
    return alibi_bias(slopes.to(device), pos_q, torch.arange(seqlen_k, device=device), dtype)


def _attention(q, k, v, *, causal, window, softmax_scale, cu_seqlens_q, cu_seqlens_k, block_table,
               lens_k, bottom_right, upcast, return_lse, k_scale=None, v_scale=None, softcap=None,
               alibi_slopes=None, dropout_p=0.0, dropout_mask=None, generator=None):
    """:func:`attention` with the paged key lengths given (``lens_k``: one int per sequence)."""
    dtype = _compute_dtype(q.dtype, upcast)
    scale = softmax_scale_default(q.shape[-1], softmax_scale)
    varlen_q = cu_seqlens_q is not None
    paged = block_table is not None
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    if not varlen_q and not paged:
        mask = attention_mask(q.shape[1], k.shape[1], causal=causal, window=window,
                              bottom_right=bottom_right, device=q.device)
        bias = _alibi(alibi_slopes, None, q.shape[1], k.shape[1], bottom_right, dtype, q.device)
        keep = _keep(dropout_p, dropout_mask, generator, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]),
                     q.device)
        out, lse = _attend(q, k, v, scale, mask, dtype, softcap=softcap, bias=bias, keep=keep,
                           dropout_p=dropout_p)
        out = out.to(q.dtype).contiguous()  # (B, Sq, Hq, D) row-major, as the kernels write it
        return (out, lse.to(lse_dtype).contiguous()) if return_lse else out

    # One sequence at a time: the plainest way to get every per-sequence offset right.
    batch = block_table.shape[0] if paged else cu_seqlens_q.numel() - 1
    cq = cu_seqlens_q.tolist() if varlen_q else None
    ck = cu_seqlens_k.tolist() if cu_seqlens_k is not None else None
    hq, d = q.shape[-2], v.shape[-1]  # out's head dim is v's (which may differ from q's)
    if varlen_q:
        # Rows no sequence covers (only with cu_seqlens the debug checks would refuse) stay 0 / -inf.
        out = q.new_zeros((q.shape[0], hq, d), dtype=dtype)
        lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=dtype, device=q.device)
    else:
        out = q.new_zeros((batch, q.shape[1], hq, d), dtype=dtype)
        lse = torch.full((batch, hq, q.shape[1]), float("-inf"), dtype=dtype, device=q.device)
    for b in range(batch):
        if varlen_q:
            q0, q1 = _bounds(cq, b, q.shape[0])
            qb = q[q0:q1]
        else:
            qb = q[b]
        key_ok = None
        if paged:
            kb, key_ok = paged_keys(k, block_table[b], lens_k[b])
            vb, _ = paged_keys(v, block_table[b], lens_k[b])
            if k_scale is not None:  # fp8 cache: read back as stored * scale
                kb, vb = dequantize_fp8(kb, k_scale, dtype), dequantize_fp8(vb, v_scale, dtype)
        else:
            k0, k1 = _bounds(ck, b, k.shape[0])
            kb, vb = k[k0:k1], v[k0:k1]
        mask = attention_mask(qb.shape[0], kb.shape[0], causal=causal, window=window,
                              bottom_right=bottom_right, device=q.device)
        if key_ok is not None and not bool(key_ok.all()):
            mask = key_ok[None, :].expand(qb.shape[0], -1) if mask is None else mask & key_ok[None, :]
        bias = _alibi(alibi_slopes, b, qb.shape[0], kb.shape[0], bottom_right, dtype, q.device)
        keep = _keep(dropout_p, dropout_mask, generator, (1, q.shape[-2], qb.shape[0], kb.shape[0]),
                     q.device, slice(q0, q1) if varlen_q else None, kb.shape[0])
        ob, lb = _attend(qb[None], kb[None], vb[None], scale, mask, dtype, softcap=softcap, bias=bias,
                         keep=keep, dropout_p=dropout_p)
        if varlen_q:
            out[q0:q1] = ob[0]
            lse[:, q0:q1] = lb[0]
        else:
            out[b] = ob[0]
            lse[b] = lb[0]
    out = out.to(q.dtype)
    if not return_lse:
        return out
    return out, lse.to(lse_dtype)


# --------------------------------------------------------------------------------------------------
# Rotary embedding
# --------------------------------------------------------------------------------------------------


def rotary_positions(x: torch.Tensor, positions=None, offset=0) -> torch.Tensor:
    """Absolute position of every token of ``x`` (B, S, H, D) or (T, H, D): int64 (B, S) or (T,).

    ``positions`` if given, else ``offset + s`` with ``s`` the index along S (or T); ``offset`` is an int
    or, for dense x, a (B,) tensor of per-sequence offsets.
    """
    if positions is not None:
        return positions.long()
    seq_dim = x.dim() - 3
    idx = torch.arange(x.shape[seq_dim], device=x.device)
    if isinstance(offset, torch.Tensor):
        offset = offset.to(x.device).long()
        if seq_dim == 1:
            return offset[:, None] + idx[None, :]
        return offset + idx
    if seq_dim == 1:
        return (idx + offset)[None, :].expand(x.shape[0], -1)
    return idx + offset


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, *,
           interleaved: bool = False, upcast: bool = True) -> torch.Tensor:
    """Rotate the first R = 2 * cos.shape[-1] channels of x (..., H, D) at positions ``pos``.

    ``interleaved=False`` (GPT-NeoX): channel d pairs with d + R/2 and uses frequency d.
    ``interleaved=True`` (GPT-J): channel 2d pairs with 2d + 1 and uses frequency d.
    out_a = a*cos - b*sin, out_b = b*cos + a*sin; channels R..D pass through unchanged.
    """
    dtype = _compute_dtype(x.dtype, upcast)
    half = cos.shape[-1]
    rot = 2 * half
    # A position outside [0, max_positions) is left unrotated (cos 1, sin 0), as the kernels do,
    # instead of wrapping around (negative) or raising (too large).
    ok = (pos >= 0) & (pos < cos.shape[0])
    safe = torch.where(ok, pos, 0)
    c = torch.where(ok[..., None], cos[safe].to(dtype), 1.0).unsqueeze(-2)  # (..., 1, R/2): all heads
    s = torch.where(ok[..., None], sin[safe].to(dtype), 0.0).unsqueeze(-2)
    xr = x[..., :rot].to(dtype)
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((a * c - b * s, b * c + a * s), dim=-1).flatten(-2)
    else:
        a, b = xr[..., :half], xr[..., half:]
        out = torch.cat((a * c - b * s, b * c + a * s), dim=-1)
    return torch.cat((out.to(x.dtype), x[..., rot:]), dim=-1).contiguous()


def apply_rotary(q, k, cos, sin, *, positions=None, offset=0, interleaved=False, inplace=False,
                 upcast=True):
    """Rotary embedding of q and (optionally) k, per SPEC.md. Returns (q_out, k_out or None)."""
    pos = rotary_positions(q, positions, offset)
    q_out = rotate(q, cos, sin, pos, interleaved=interleaved, upcast=upcast)
    k_out = None if k is None else rotate(k, cos, sin, pos, interleaved=interleaved, upcast=upcast)
    if inplace:
        q.copy_(q_out)
        if k is not None:
            k.copy_(k_out)
        return q, k
    return q_out, k_out


# --------------------------------------------------------------------------------------------------
# Paged KV cache
# --------------------------------------------------------------------------------------------------


def paged_append(k, v, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None) -> None:
    """Write k, v (T, Hkv, D) to the cache slots ``slot_mapping`` (T,); a slot of -1 (or any slot
    outside the cache, as the kernels drop it) is skipped. An fp8 cache stores
    :func:`quantize_fp8` (value / scale, saturated) with ``k_scale`` / ``v_scale``."""
    keep = (slot_mapping >= 0) & (slot_mapping < k_cache.shape[0] * k_cache.shape[1])
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    if k_scale is not None:
        k_cache[blocks, offsets] = quantize_fp8(k[keep], k_scale, k_cache.dtype)
        v_cache[blocks, offsets] = quantize_fp8(v[keep], v_scale, v_cache.dtype)
        return
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


def paged_decode(q, k_cache, v_cache, block_table, seq_lens, *, softmax_scale=None, window=None,
                 upcast=True, return_lse=False, k_scale=None, v_scale=None, softcap=None,
                 alibi_slopes=None):
    """One query token per sequence against its paged cache: q (B, Hq, D) -> (B, Hq, D) [, lse (B, Hq)].

    This is causal paged attention with one query row at position seq_lens - 1. Unlike
    :func:`attention`'s paged keys, the length is not clamped to the table's capacity (the decode
    kernel's rule): the query stays at seq_lens - 1 and the keys past the capacity contribute
    nothing; a negative length is 0. An fp8 cache is read as stored * ``k_scale`` / ``v_scale``;
    ``softcap`` and ``alibi_slopes`` as defined above (the query at position seq_lens - 1).
    """
    lens = [max(n, 0) for n in seq_lens.tolist()]
    out, lse = _attention(q[:, None], k_cache, v_cache, causal=True, window=window,
                          softmax_scale=softmax_scale, cu_seqlens_q=None, cu_seqlens_k=None,
                          block_table=block_table, lens_k=lens, bottom_right=True, upcast=upcast,
                          return_lse=True, k_scale=k_scale, v_scale=v_scale, softcap=softcap,
                          alibi_slopes=alibi_slopes)
    out, lse = out[:, 0], lse[:, :, 0]
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------------
# Weight-only quantization (int8 per output channel, int4 per group; layout: gptkernels/quant.py)
# --------------------------------------------------------------------------------------------------

#: Largest int8 magnitude used: symmetric [-127, 127] (-128 is never produced, so negation is exact).
INT8_MAX = 127
#: int4 codes are unsigned 0..15, two per byte.
INT4_MAX = 15


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype):
    """Round-to-nearest symmetric int8, one scale per output channel (row of ``weight`` (N, K)).

    scale = amax(|row|) / 127 (1 for an all-zero row), stored in ``scale_dtype``; q = round(w / scale)
    with the *stored* scale, so dequantize_int8(q, scale) = q * scale is within scale / 2 of w.
    Returns (q int8 (N, K), scales (N,)).
    """
    w = weight.detach().to(torch.float32 if weight.dtype != torch.float64 else torch.float64)
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax)).to(scale_dtype)
    q = torch.round(w / scales.to(w.dtype)[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


def quantize_int4(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype):
    """Round-to-nearest asymmetric int4 per group of ``group_size`` input channels.

    Each group's range is widened to include 0 (so 0 is exact and an all-zero group is exact):
    lo = min(w, 0), hi = max(w, 0); scale = (hi - lo) / 15 (1 if hi == lo); zero = round(-lo / scale)
    in [0, 15] (an integer, stored in ``scale_dtype``); q = clamp(round(w / scale) + zero, 0, 15) with
    the stored scale. Dequantized: (q - zero) * scale, within scale / 2 of w (up to the rounding of
    the stored scale). Packed two codes per byte along K: byte j of row n holds q[n, 2j] in its low
    nibble and q[n, 2j + 1] in its high nibble.
    Returns (packed uint8 (N, K/2), scales (N, K/group_size), zeros (N, K/group_size)).
    """
    n, k = weight.shape
    w = weight.detach().to(torch.float32 if weight.dtype != torch.float64 else torch.float64)
    g = w.reshape(n, k // group_size, group_size)
    lo = g.amin(dim=2).clamp(max=0)
    hi = g.amax(dim=2).clamp(min=0)
    scales = torch.where(hi > lo, (hi - lo) / INT4_MAX, torch.ones_like(hi)).to(scale_dtype)
    s = scales.to(w.dtype)
    zeros = torch.round(-lo / s).clamp_(0, INT4_MAX)
    q = (torch.round(g / s[:, :, None]) + zeros[:, :, None]).clamp_(0, INT4_MAX).to(torch.uint8)
    return pack_int4(q.reshape(n, k)), scales, zeros.to(scale_dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 (K even) -> (N, K/2) uint8: low nibble = even column, high = odd column."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 codes 0..15 (the inverse of :func:`pack_int4`)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q (N, K) int8, scales (N,) -> the float weight (N, K) q * scale, computed in ``dtype``."""
    return qweight.to(dtype) * scales.to(dtype)[:, None]


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """packed (N, K/2) uint8, scales/zeros (N, K/group_size) -> (N, K) (q - zero) * scale in ``dtype``."""
    q = unpack_int4(qweight).to(dtype)
    s = scales.to(dtype).repeat_interleave(group_size, dim=1)
    z = zeros.to(dtype).repeat_interleave(group_size, dim=1)
    return (q - z) * s


def _linear(x, w, bias, dtype):
    y = x.to(dtype) @ w.t()
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)


def int8_linear(x, qweight, scales, bias=None, *, upcast=True):
    """y = x @ dequantize_int8(W)^T (+ bias): x (..., K) -> (..., N) in x's dtype. Math in float32
    (float64 for float64 x) with ``upcast``, else in x's dtype (the weight dequantized in it too)."""
    dtype = _compute_dtype(x.dtype, upcast)
    return _linear(x, dequantize_int8(qweight, scales, dtype), bias, dtype)


def int4_linear(x, qweight, scales, zeros, bias=None, *, group_size=128, upcast=True):
    """y = x @ dequantize_int4(W)^T (+ bias), like :func:`int8_linear`."""
    dtype = _compute_dtype(x.dtype, upcast)
    return _linear(x, dequantize_int4(qweight, scales, zeros, group_size, dtype), bias, dtype)


# --------------------------------------------------------------------------------------------------
# The fused decode step (gptkernels/decode.py): each op is the composition of the unfused ops above
# --------------------------------------------------------------------------------------------------


def paged_slots(block_table: torch.Tensor, pos: torch.Tensor, num_blocks: int, block_size: int) -> torch.Tensor:
    """Cache slots (int64, shaped like ``pos`` (B, S)) of positions ``pos`` of each sequence's block
    table row; -1 where the position is negative, past the table or its entry is outside the cache
    (:func:`paged_append` skips those)."""
    pos = pos.long()
    page = torch.div(pos, block_size, rounding_mode="floor")
    ok = (pos >= 0) & (page < block_table.shape[1])
    blk = block_table.long().gather(1, torch.where(ok, page, 0))
    ok = ok & (blk >= 0) & (blk < num_blocks)
    return torch.where(ok, blk * block_size + pos % block_size, -1)


def rotary_append(q, k, v, k_cache, v_cache, block_table, starts, cos=None, sin=None, *,
                  rotary_starts=None, interleaved=False, q_per_token=True, k_scale=None, v_scale=None,
                  upcast=True):
    """Rotary of q and of the new k, and the new k (rotated) and v appended to the paged cache:
    :func:`apply_rotary` then :func:`paged_append`. Returns the rotated q (q itself without cos/sin).

    q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) with Sk <= Sq. New token i of sequence b goes to
    position ``starts[b] + i`` of its ``block_table`` row (a slot outside the table or the cache is
    skipped) and is rotated at ``rotary_starts[b] + i`` (default: ``starts``); q's token i likewise,
    or at ``rotary_starts[b]`` for every token when ``q_per_token`` is False (FlashAttention's rule
    without causality). An fp8 cache is written with ``k_scale``/``v_scale`` as :func:`paged_append`
    writes it."""
    batch, seqlen, seqlen_new = q.shape[0], q.shape[1], k.shape[1]
    rstarts = (starts if rotary_starts is None else rotary_starts).long()[:, None]
    k_new = k
    if cos is not None:
        idx = torch.arange(seqlen, device=q.device)[None, :]
        q_pos = rstarts + idx if q_per_token else rstarts.expand(batch, seqlen)
        q, _ = apply_rotary(q, None, cos, sin, positions=q_pos, interleaved=interleaved, upcast=upcast)
        k_new, _ = apply_rotary(k, None, cos, sin, positions=rstarts + idx[:, :seqlen_new],
                                interleaved=interleaved, upcast=upcast)
    pos = starts.long()[:, None] + torch.arange(seqlen_new, device=q.device)[None, :]
    slots = paged_slots(block_table, pos, k_cache.shape[0], k_cache.shape[1]).reshape(-1)
    paged_append(k_new.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]), k_cache, v_cache, slots,
                 k_scale=k_scale, v_scale=v_scale)
    return q


def add_layer_norm(x, d1=None, d2=None, weight1=None, bias1=None, weight2=None, bias2=None, *,
                   eps1=1e-5, eps2=1e-5, num_norms=1, upcast=True):
    """The residual add and one or two LayerNorms of the sum: returns (h, y1, y2 or None).

    ``h = x + d1``, or ``x + (d1 + d2)``, each add in x's dtype (the residual stream, rounded as the
    unfused adds round it); ``y_i = layer_norm(h)`` with ``weight_i``/``bias_i`` (None: no affine) and
    ``eps_i``, computed in float32 (``upcast``; float64 for float64 inputs) or in h's dtype."""
    h = x if d1 is None else x + (d1 if d2 is None else d1 + d2)
    dtype = _compute_dtype(h.dtype, upcast)

    def norm(w, b, eps):
        w = None if w is None else w.to(dtype)
        b = None if b is None else b.to(dtype)
        return torch.nn.functional.layer_norm(h.to(dtype), h.shape[-1:], w, b, eps).to(h.dtype)

    y1 = norm(weight1, bias1, eps1)
    return h, y1, (norm(weight2, bias2, eps2) if num_norms > 1 else None)


def fused_linear(x, weight, bias=None, *, norm=None, activation=None, residual=None, cache=None,
                 upcast=True):
    """``act(layer_norm(x) @ weight^T + bias) + residual``: x (M, K), weight (N, K) -> (M, N).

    ``norm``: None or (weight, bias, eps) of a LayerNorm over K, its output rounded to x's dtype (as
    a LayerNorm module's output is); ``activation``: None or a name of
    ``gptkernels.models.config.ACTIVATIONS``. Math in float32 (``upcast``) or x's dtype, result in
    x's dtype. ``cache``: None or (k_cache, v_cache, block_table, positions, q_features[, k_scale,
    v_scale]) for a fused qkv projection: columns ``[q_features, q_features + kv)`` are k, the rest
    v, appended to the cache at row m's position ``positions[m]`` (:func:`paged_append` through
    :func:`paged_slots`, an fp8 cache with its scales); then only the q columns are returned."""
    from .models.config import ACTIVATIONS  # the model's table of activations (no import cycle)

    dtype = _compute_dtype(x.dtype, upcast)
    h = x
    if norm is not None:
        w, b, eps = norm
        h = torch.nn.functional.layer_norm(x.to(dtype), x.shape[-1:], None if w is None else w.to(dtype),
                                           None if b is None else b.to(dtype), eps).to(x.dtype)
    y = h.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        y = y + bias.to(dtype)
    if activation is not None:
        y = ACTIVATIONS[activation](y)
    if residual is not None:
        y = y + residual.to(dtype)
    y = y.to(x.dtype)
    if cache is None:
        return y
    k_cache, v_cache, block_table, positions, nq, *scales = cache
    k_scale, v_scale = scales if scales else (None, None)
    nkv = (weight.shape[0] - nq) // 2
    hkv, d = k_cache.shape[2], k_cache.shape[3]
    slots = paged_slots(block_table, positions.reshape(-1, 1), k_cache.shape[0], k_cache.shape[1]).reshape(-1)
    paged_append(y[:, nq:nq + nkv].reshape(-1, hkv, d), y[:, nq + nkv:].reshape(-1, hkv, d),
                 k_cache, v_cache, slots, k_scale=k_scale, v_scale=v_scale)
    return y[:, :nq].contiguous()


def kvcache_pages(k_cache, v_cache, *, block_table=None, cache_seqlens, cache_batch_idx=None,
                  cache_leftpad=None, block_size=None):
    """The cache of :func:`flash_attn_with_kvcache` as a paged cache: (k_pages, v_pages,
    block_table, starts), where ``starts[b]`` counts the tokens sequence b holds before the new ones
    in its block-table coordinates (``cache_seqlens - cache_leftpad``).

    A paged cache (``block_table`` given) is returned as it is. A dense cache (Bc, S, Hkv, D) is
    viewed as pages of ``block_size`` rows (S a multiple of it; the view needs stride(0) = S *
    stride(1)) with row ``cache_batch_idx[b]`` (default b) as sequence b's pages; with
    ``cache_leftpad`` the pages are single rows and sequence b's table starts at row
    ``cache_leftpad[b]`` (entries past row S are -1: never read or written)."""
    starts = cache_seqlens if cache_leftpad is None else cache_seqlens - cache_leftpad
    if block_table is not None:
        return k_cache, v_cache, block_table, starts
    bc, s = k_cache.shape[0], k_cache.shape[1]
    bs = 1 if cache_leftpad is not None else block_size
    per_row = s // bs
    device = k_cache.device

    def pages(c):
        return c.as_strided((bc * per_row, bs, *c.shape[2:]),
                            (bs * c.stride(1), c.stride(1), c.stride(2), c.stride(3)), c.storage_offset())

    batch = cache_seqlens.shape[0]
    rows = torch.arange(batch, device=device) if cache_batch_idx is None else cache_batch_idx.long()
    j = torch.arange(per_row, device=device)
    table = rows[:, None] * per_row + j[None, :]
    if cache_leftpad is not None:
        lp = cache_leftpad.long()[:, None]
        table = torch.where(j[None, :] < s - lp, table + lp, -1)
    return pages(k_cache), pages(v_cache), table.to(torch.int32), starts


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, *,
                            cache_seqlens, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=True, window=None, rotary_interleaved=False,
                            block_size=None, return_lse=False, k_scale=None, v_scale=None, upcast=True,
                            softcap=None, alibi_slopes=None):
    """FlashAttention's ``flash_attn_with_kvcache``, composed: the new k/v (B, Sq, Hkv, D) appended
    at ``cache_seqlens`` (:func:`rotary_append`, rotary of q and k at their positions when
    ``rotary_cos`` is given), then attention of q (B, Sq, Hq, D) over each sequence's
    ``cache_seqlens + Sk`` keys (``cache_seqlens`` without new k/v; minus ``cache_leftpad``, the
    rows before it being no keys), bottom-right aligned (:func:`paged_decode` for one query row,
    :func:`attention` with paged keys for more). Rotary positions are the cache's rows:
    ``cache_seqlens + i`` (with a left-padded cache too, as FlashAttention). ``cache_seqlens`` is a
    (B,) int tensor; the cache layouts: :func:`kvcache_pages`; an fp8 cache with ``k_scale`` /
    ``v_scale`` as the paged ops take them; ``softcap`` and ``alibi_slopes`` (row b of (B, Hq)
    slopes for q's sequence b, whatever its cache row) as defined above, over each sequence's keys."""
    kp, vp, table, starts = kvcache_pages(k_cache, v_cache, block_table=block_table, cache_seqlens=cache_seqlens,
                                          cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                                          block_size=block_size)
    seqlen = q.shape[1]
    if k is not None:
        q = rotary_append(q, k, v, kp, vp, table, starts, rotary_cos, rotary_sin, rotary_starts=cache_seqlens,
                          interleaved=rotary_interleaved, q_per_token=causal or window is not None,
                          k_scale=k_scale, v_scale=v_scale, upcast=upcast)
        lens = starts + k.shape[1]
    else:
        lens = starts
    lens = lens.to(torch.int32)
    if seqlen == 1:
        out, lse = paged_decode(q[:, 0], kp, vp, table, lens, softmax_scale=softmax_scale, window=window,
                                upcast=upcast, return_lse=True, k_scale=k_scale, v_scale=v_scale, softcap=softcap,
                                alibi_slopes=alibi_slopes)
        out, lse = out[:, None], lse[:, :, None]
    else:
        out, lse = attention(q, kp, vp, causal=causal, window=window, softmax_scale=softmax_scale,
                             block_table=table, seqlens_k=lens, upcast=upcast, return_lse=True,
                             k_scale=k_scale, v_scale=v_scale, softcap=softcap, alibi_slopes=alibi_slopes)
    return (out, lse) if return_lse else out
