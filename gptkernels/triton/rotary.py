"""Fused rotary embedding: one launch rotates q and k together.

Memory-bound: per token it reads and writes every q and k element once and reads one row of cos and
sin. The grid is (token tiles, head splits). A program loads the cos/sin rows of its BLOCK_T tokens
once (float32, in registers) and reuses them for all its q heads and then all its k heads, walking
the heads BLOCK_H at a time. Rotated halves (GPT-NeoX) are two contiguous vector loads per row;
GPT-J pairs are one contiguous load of the R channels split into even/odd lanes in registers.
Head splits only exist to fill the GPU when there are few tokens (decode). See notes/rotary.md.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .._policy import sm_count
from ._config import INTERPRET, next_pow2
from .paged import _store_row


@triton.jit
def _rotate_heads(x_ptr, o_ptr, x_tok, o_tok, tok_mask, h_lo, h_hi,
                  stride_xh, stride_xd, stride_oh, stride_od, cos, sin,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr, D: tl.constexpr, PASS_PAD: tl.constexpr,
                  BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr, COPY_PASS: tl.constexpr,
                  scale_ptr=None, stride_sh=0, QUANT: tl.constexpr = False):
    """Rotate heads [h_lo, h_hi) of the tokens whose row offsets are x_tok/o_tok ([BT, 1, 1] int64).
    cos/sin are [BT, 1, HALF_PAD] float32, broadcast over the heads. ``QUANT``: o is an fp8 KV cache
    (the fused rotary + append of gptkernels/triton/fused.py): each value is rounded to x's dtype, as
    the rotation alone would store it, then stored as paged_append stores it (value / the scale of
    its head, ``scale_ptr + head * stride_sh``)."""
    for h0 in range(h_lo, h_hi, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[None, :, None]
        row_mask = tok_mask & (h < h_hi)
        x_row = x_ptr + x_tok + h.to(tl.int64) * stride_xh
        o_row = o_ptr + o_tok + h.to(tl.int64) * stride_oh
        if QUANT:
            scale = tl.load(scale_ptr + h.to(tl.int64) * stride_sh, mask=h < h_hi, other=1.0)
        else:
            scale = 1.0
        if INTERLEAVED:
            # GPT-J: channel 2i pairs with 2i+1. Load the R channels contiguously, split in registers.
            d = tl.arange(0, 2 * HALF_PAD)[None, None, :]
            m = row_mask & (d < 2 * HALF)
            x = tl.load(x_row + d * stride_xd, mask=m, other=0.0)
            a, b = tl.split(tl.reshape(x.to(tl.float32), (x.shape[0], x.shape[1], HALF_PAD, 2)))
            out = tl.join(a * cos - b * sin, b * cos + a * sin)
            out = tl.reshape(out, (x.shape[0], x.shape[1], 2 * HALF_PAD))
            _store_rotated(o_row + d * stride_od, out, x_ptr, scale, m, QUANT)
        else:
            # GPT-NeoX: channel i pairs with i + R/2. Two contiguous loads of R/2 channels.
            d = tl.arange(0, HALF_PAD)[None, None, :]
            m = row_mask & (d < HALF)
            a = tl.load(x_row + d * stride_xd, mask=m, other=0.0).to(tl.float32)
            b = tl.load(x_row + (d + HALF) * stride_xd, mask=m, other=0.0).to(tl.float32)
            _store_rotated(o_row + d * stride_od, a * cos - b * sin, x_ptr, scale, m, QUANT)
            _store_rotated(o_row + (d + HALF) * stride_od, b * cos + a * sin, x_ptr, scale, m, QUANT)
        if COPY_PASS:
            # Out of place with R < D: channels R..D are copied as raw values (bit for bit).
            dp = 2 * HALF + tl.arange(0, PASS_PAD)[None, None, :]
            mp = row_mask & (dp < D)
            _store_rotated(o_row + dp * stride_od, tl.load(x_row + dp * stride_xd, mask=mp), x_ptr, scale, mp,
                           QUANT)


@triton.jit
def _store_rotated(ptr, v, x_ptr, scale, mask, QUANT: tl.constexpr):
    """Store v at ptr in its dtype; an fp8 cache (QUANT) gets v rounded to x's dtype first, then
    paged_append's value / scale (gptkernels/triton/paged.py, ``_store_row``)."""
    if QUANT:
        _store_row(ptr, v.to(x_ptr.dtype.element_ty), scale, mask, True)
    else:
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr, off_ptr,
    n_tokens, seqlen, offset, max_pos, HQ, HK, hq_per_split, hk_per_split,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_qob, stride_qos, stride_qoh, stride_qod,
    stride_kob, stride_kos, stride_koh, stride_kod,
    stride_pb, stride_ps, stride_cp, stride_cd, stride_sp, stride_sd,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, D: tl.constexpr, PASS_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_K: tl.constexpr, HAS_POS: tl.constexpr, HAS_OFF_T: tl.constexpr,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, COPY_PASS: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = t < n_tokens
    # token t is (b, s) of the (B, S) leading dims; packed inputs have B = 1, S = T
    b = t // seqlen
    s = t - b * seqlen
    if HAS_POS:
        pos = tl.load(pos_ptr + b.to(tl.int64) * stride_pb + s.to(tl.int64) * stride_ps,
                      mask=tok_mask, other=0)
    elif HAS_OFF_T:
        pos = tl.load(off_ptr + b, mask=tok_mask, other=0) + s
    else:
        pos = s + offset
    # Positions outside the cache are masked: such a token is left unrotated (cos 1, sin 0) rather
    # than reading out of bounds. GPTKERNELS_DEBUG=1 rejects them before the launch.
    pos_ok = tok_mask & (pos >= 0) & (pos < max_pos)

    # cos/sin rows of these tokens: loaded once, reused by every q and k head below
    d = tl.arange(0, HALF_PAD)[None, :]
    p64 = pos.to(tl.int64)[:, None]
    cs_mask = pos_ok[:, None] & (d < HALF)
    cos = tl.load(cos_ptr + p64 * stride_cp + d * stride_cd, mask=cs_mask, other=1.0)
    sin = tl.load(sin_ptr + p64 * stride_sp + d * stride_sd, mask=cs_mask, other=0.0)
    cos = cos.to(tl.float32)[:, None, :]
    sin = sin.to(tl.float32)[:, None, :]
    if CONJUGATE:  # rotate by -theta (the backward pass)
        sin = -sin

    b64 = b.to(tl.int64)[:, None, None]
    s64 = s.to(tl.int64)[:, None, None]
    tm = tok_mask[:, None, None]
    h_lo = pid_h * hq_per_split
    _rotate_heads(q_ptr, qo_ptr, b64 * stride_qb + s64 * stride_qs, b64 * stride_qob + s64 * stride_qos,
                  tm, h_lo, tl.minimum(h_lo + hq_per_split, HQ),
                  stride_qh, stride_qd, stride_qoh, stride_qod, cos, sin,
                  HALF, HALF_PAD, D, PASS_PAD, BLOCK_H, INTERLEAVED, COPY_PASS)
    if HAS_K:
        h_lo = pid_h * hk_per_split
        _rotate_heads(k_ptr, ko_ptr, b64 * stride_kb + s64 * stride_ks,
                      b64 * stride_kob + s64 * stride_kos,
                      tm, h_lo, tl.minimum(h_lo + hk_per_split, HK),
                      stride_kh, stride_kd, stride_koh, stride_kod, cos, sin,
                      HALF, HALF_PAD, D, PASS_PAD, BLOCK_H, INTERLEAVED, COPY_PASS)


# --------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------

#: Elements of one head tile (BLOCK_T x BLOCK_H x padded D): 4096 x 2 bytes = 8 KB of bf16 read and
#: 8 KB written per loop step, enough bytes in flight to hide DRAM latency with several programs per
#: SM, without spilling (4096 values over 128 threads: 16 float32 per thread per half).
TILE_ELEMS = 4096
#: The CPU interpreter pays per program, not per element: bigger tiles, fewer programs.
TILE_ELEMS_INTERPRET = 16384
#: The largest single load tile :func:`_min_vector_block_t` may grow to (128 values per thread).
MAX_TILE_ELEMS = 16384
#: Aim for at least this many programs per SM before splitting heads across programs (decode).
PROGRAMS_PER_SM = 4


def pick_config(n_tokens: int, hq: int, hk: int, head_dim: int, device: torch.device,
                block_t: int | None = None, block_h: int | None = None, head_splits: int | None = None,
                num_warps: int | None = None, *, rot_dim: int | None = None, interleaved: bool = False,
                copy_pass: bool = False, elem_bytes: int = 2):
    """(BLOCK_T, BLOCK_H, head_splits, num_warps) for a launch; the arguments override the heuristic
    (for tuning sweeps). ``rot_dim``/``interleaved``/``copy_pass``/``elem_bytes`` describe the load
    tiles, so a partial rotary dim still gets 16-byte accesses (see :func:`_min_vector_block_t`)."""
    heads = [h for h in (hq, hk) if h > 0]
    num_warps = num_warps or 4
    if block_h is None:
        # the smaller head count, so the k heads of GQA do not run in a mostly empty tile
        block_h = min(next_pow2(min(heads)), 16)
    if block_t is None:
        tile = TILE_ELEMS_INTERPRET if INTERPRET else TILE_ELEMS
        block_t = max(1, tile // (block_h * next_pow2(head_dim)))
        block_t = max(block_t, _min_vector_block_t(head_dim, rot_dim or head_dim, interleaved, copy_pass,
                                                   block_h, num_warps, elem_bytes, block_t))
        block_t = min(block_t, next_pow2(n_tokens), 64)
    if head_splits is None:
        token_programs = triton.cdiv(n_tokens, block_t)
        want = PROGRAMS_PER_SM * sm_count(device)
        max_splits = triton.cdiv(max(heads), block_h)
        head_splits = max(1, min(max_splits, triton.cdiv(want, token_programs)))
    return block_t, block_h, head_splits, num_warps


def _min_vector_block_t(head_dim, rot_dim, interleaved, copy_pass, block_h, num_warps, elem_bytes,
                        block_t):
    """The BLOCK_T at which the smallest load tile gives every thread 16 contiguous bytes.

    Triton spreads a [BLOCK_T, BLOCK_H, W] tile over all the threads first: when it holds fewer than
    threads x 16 bytes, each thread gets fewer contiguous elements and the accesses shrink to 8 or 4
    bytes (the offline sm_90a compile showed this for the GPT-NeoX layout at R = D/4: 8-byte loads).
    Grows ``block_t`` only while the largest tile stays within ``MAX_TILE_ELEMS`` (registers)."""
    half_pad = next_pow2(rot_dim // 2)
    widths = [2 * half_pad if interleaved else half_pad]
    if copy_pass and rot_dim < head_dim:
        widths.append(next_pow2(head_dim - rot_dim))
    want = num_warps * 32 * max(1, 16 // elem_bytes)
    widest = max(widths)
    while block_t * block_h * min(widths) < want and 2 * block_t * block_h * widest <= MAX_TILE_ELEMS:
        block_t *= 2
    return block_t


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def _lead_strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(stride_b, stride_s, stride_h, stride_d): packed (T, H, D) is B = 1, S = T."""
    if x.dim() == 4:
        return tuple(x.stride())
    return (0, *x.stride())


def apply_rotary(q, k, cos, sin, *, positions, offset, interleaved, inplace, conjugate,
                 block_t=None, block_h=None, head_splits=None, num_warps=None):
    """Rotate q and k (k may be None) by cos/sin at their positions, in one launch.

    ``positions``: None or an int tensor shaped like q's leading dims; ``offset``: an int or a (B,)
    tensor; ``conjugate=True`` rotates by -theta. ``inplace`` writes into q/k (any strides) and returns
    them; otherwise returns new contiguous tensors with channels R..D copied. Inputs are checked by
    :func:`gptkernels.apply_rotary`. ``block_t``/``block_h``/``head_splits``/``num_warps`` override
    the launch heuristic (tuning sweeps only; powers of two).
    """
    if inplace:
        q_out, k_out = q, k
    else:
        q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_out = None if k is None else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    seqlen = q.shape[-3]
    n_tokens = q.shape[:-2].numel()
    hq, head_dim = q.shape[-2], q.shape[-1]
    hk = 0 if k is None else k.shape[-2]
    if n_tokens == 0 or hq + hk == 0:
        return q_out, k_out
    half = cos.shape[1]
    copy_pass = (not inplace) and 2 * half < head_dim
    block_t, block_h, splits, num_warps = pick_config(
        n_tokens, hq, hk, head_dim, q.device, block_t, block_h, head_splits, num_warps,
        rot_dim=2 * half, interleaved=interleaved, copy_pass=copy_pass, elem_bytes=q.element_size())
    hq_per = triton.cdiv(triton.cdiv(hq, splits), block_h) * block_h
    hk_per = triton.cdiv(triton.cdiv(hk, splits), block_h) * block_h if hk else 0

    kk, kko = (k, k_out) if k is not None else (q, q_out)  # unused pointers when HAS_K is False
    has_off_t = isinstance(offset, torch.Tensor)
    if has_off_t:
        offset = offset.contiguous()  # read at off_ptr + b (positions' strides are honoured)
    pos_t = positions if positions is not None else q
    if positions is not None:
        stride_pb, stride_ps = (positions.stride() if positions.dim() == 2 else (0, positions.stride(0)))
    else:
        stride_pb = stride_ps = 0
    grid = (triton.cdiv(n_tokens, block_t), splits)
    _rotary_kernel[grid](
        q, kk, q_out, kko, cos, sin, pos_t, offset if has_off_t else q,
        n_tokens, seqlen, 0 if has_off_t else int(offset), cos.shape[0], hq, hk, hq_per, hk_per,
        *_lead_strides(q), *_lead_strides(kk), *_lead_strides(q_out), *_lead_strides(kko),
        stride_pb, stride_ps, cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        HALF=half, HALF_PAD=next_pow2(half), D=head_dim,
        PASS_PAD=next_pow2(max(head_dim - 2 * half, 1)),
        BLOCK_T=block_t, BLOCK_H=block_h,
        HAS_K=k is not None, HAS_POS=positions is not None, HAS_OFF_T=has_off_t,
        INTERLEAVED=interleaved, CONJUGATE=conjugate, COPY_PASS=copy_pass,
        num_warps=num_warps,
    )
    return q_out, k_out
