"""Triton kernels of the fused decode step: fewer, larger launches per layer (issue 14 item 6,
issue 19 item 3).

Launchers (inputs checked by :mod:`gptkernels.decode`; semantics: the ``reference`` functions of the
same names in :mod:`gptkernels.reference`, which compose the unfused ops):

* ``rotary_append(q, k, v, k_cache, v_cache, block_table, starts, cos, sin, *, rotary_starts,
  interleaved, q_per_token) -> q_out``: rotary of q and of the new k, and the new k (rotated) and
  v written into the paged cache, in one launch. New token i of sequence b goes to position
  ``starts[b] + i`` of its block table and is rotated at ``rotary_starts[b] + i`` (q too, or at
  ``rotary_starts[b]`` for every token when ``q_per_token`` is False: FlashAttention's rule without
  causality). Without cos/sin it is a paged append addressed by (block table, start).
* ``add_layer_norm(x, d1, d2, weight1, bias1, weight2, bias2, *, eps, num_norms) -> (h, y1, y2)``:
  the residual add ``h = x + d1`` (or ``x + (d1 + d2)``: the sums rounded to x's dtype in the
  order the unfused ops round them, so h is bit for bit the unfused residual stream) and one or two
  LayerNorms of h (GPT-NeoX's parallel block normalises the same h twice), in one launch.
* ``fused_linear(x, weight, bias, *, norm, activation, residual, cache) -> y``: a GEMM for the few
  rows of a decode step with its neighbours folded in: a LayerNorm of x before it (its row
  statistics recomputed by each program in one pass over x: a few KB from L2), the bias, an activation and a
  residual add after it, and optionally the paged-cache append of the k and v columns of a fused qkv
  projection (``cache``: those columns go to the cache slots of each row's position instead of y).

Why these and not others: they are what a batch-1 decode step launches around its four GEMMs and
its attention (LayerNorm, residual adds, GELU, rotary, the cache append: see notes/models.md,
"Launches per decode step"). Design, work counts and predictions: notes/models.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _policy as P
from ._config import INTERPRET, next_pow2
from .paged import _scale_arg, _store_row
from .rotary import _rotate_heads

# Kernels may read module globals only as constexprs.
_LOG2E: tl.constexpr = tl.constexpr(P.LOG2E)

#: Activations the fused linear applies in its epilogue, by the model config's names
#: (gptkernels.models.config.ACTIVATIONS): name -> the kernel's ACT code.
ACTIVATION_CODES = {None: 0, "gelu": 1, "gelu_new": 2, "gelu_fast": 2, "gelu_pytorch_tanh": 2,
                    "quick_gelu": 3, "relu": 4, "silu": 5, "swish": 5}

# --------------------------------------------------------------------------------------------------
# Rotary + paged append
# --------------------------------------------------------------------------------------------------


@triton.jit
def _rotary_append_kernel(
    q_ptr, qo_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, cos_ptr, sin_ptr, bt_ptr, start_ptr, rstart_ptr, ks_ptr, vs_ptr,
    n_tokens, seqlen, seqlen_new, HQ, HK, hq_per_split, hk_per_split, max_pos, num_blocks, max_blocks,
    s_qb, s_qs, s_qh, s_qd,
    s_qob, s_qos, s_qoh, s_qod,
    s_kb, s_ks, s_kh, s_kd,
    s_vb, s_vs, s_vh, s_vd,
    s_kcb, s_kct, s_kch, s_kcd,
    s_vcb, s_vct, s_vch, s_vcd,
    s_btb, s_btn, s_st, s_rst, s_cp, s_cd, s_sp, s_sd, s_ksh, s_vsh,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    PASS_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    ROTARY: tl.constexpr, Q_PER_TOKEN: tl.constexpr, INTERLEAVED: tl.constexpr, QUANT: tl.constexpr,
):
    # One program: BLOCK_T tokens of q (b, i) x its share of the heads: q heads, then the k and v
    # heads of the tokens that are new (i < seqlen_new). The cos/sin rows of its tokens are loaded
    # once and serve every q and k head (as in rotary.py).
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = t < n_tokens
    b = t // seqlen
    i = t - b * seqlen
    b64 = b.to(tl.int64)
    start = tl.load(start_ptr + b64 * s_st, mask=tok_ok, other=0).to(tl.int64)
    pos = start + i  # where a new token goes: its block table's coordinates
    # Its slot: the table entry of its page. A negative position, one past the table or an entry
    # outside the cache is never written (as paged_append drops a slot outside the cache).
    page = pos // BLOCK_SIZE
    new_ok = tok_ok & (i < seqlen_new)
    slot_ok = new_ok & (pos >= 0) & (page < max_blocks)
    blk = tl.load(bt_ptr + b64 * s_btb + page * s_btn, mask=slot_ok, other=-1).to(tl.int64)
    slot_ok = slot_ok & (blk >= 0) & (blk < num_blocks)
    off = pos % BLOCK_SIZE
    b3 = b64[:, None, None]
    i3 = i.to(tl.int64)[:, None, None]
    blk3 = blk[:, None, None]
    off3 = off[:, None, None]
    km = slot_ok[:, None, None]

    hk_lo = pid_h * hk_per_split
    hk_hi = tl.minimum(hk_lo + hk_per_split, HK)
    if ROTARY:
        # Rotary positions count from rstart (the cache's own coordinates: they differ from the
        # table's with a left-padded dense cache): k at rstart + i; q too, or at rstart for every
        # token (FlashAttention's rule without causality). Outside [0, max_pos): unrotated.
        rstart = tl.load(rstart_ptr + b64 * s_rst, mask=tok_ok, other=0).to(tl.int64)
        d = tl.arange(0, HALF_PAD)[None, :]
        rpos = rstart + i
        ok = tok_ok & (rpos >= 0) & (rpos < max_pos)
        cs_mask = ok[:, None] & (d < HALF)
        cos = tl.load(cos_ptr + rpos[:, None] * s_cp + d * s_cd, mask=cs_mask, other=1.0).to(tl.float32)[:, None, :]
        sin = tl.load(sin_ptr + rpos[:, None] * s_sp + d * s_sd, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
        _rotate_heads(k_ptr, kc_ptr, b3 * s_kb + i3 * s_ks, blk3 * s_kcb + off3 * s_kct, km,
                      hk_lo, hk_hi, s_kh, s_kd, s_kch, s_kcd, cos, sin,
                      HALF, HALF_PAD, D, PASS_PAD, BLOCK_H, INTERLEAVED, True, ks_ptr, s_ksh, QUANT)
        if not Q_PER_TOKEN:
            ok = tok_ok & (rstart >= 0) & (rstart < max_pos)
            cs_mask = ok[:, None] & (d < HALF)
            cos = tl.load(cos_ptr + rstart[:, None] * s_cp + d * s_cd, mask=cs_mask, other=1.0)
            sin = tl.load(sin_ptr + rstart[:, None] * s_sp + d * s_sd, mask=cs_mask, other=0.0)
            cos = cos.to(tl.float32)[:, None, :]
            sin = sin.to(tl.float32)[:, None, :]
        hq_lo = pid_h * hq_per_split
        # q -> q_out (a new tensor: channels R..D copied)
        _rotate_heads(q_ptr, qo_ptr, b3 * s_qb + i3 * s_qs, b3 * s_qob + i3 * s_qos, tok_ok[:, None, None],
                      hq_lo, tl.minimum(hq_lo + hq_per_split, HQ), s_qh, s_qd, s_qoh, s_qod, cos, sin,
                      HALF, HALF_PAD, D, PASS_PAD, BLOCK_H, INTERLEAVED, True)
    dd = tl.arange(0, BLOCK_D)[None, None, :]
    for h0 in range(hk_lo, hk_hi, BLOCK_H):
        h = (h0 + tl.arange(0, BLOCK_H))[None, :, None].to(tl.int64)
        m = km & (h < hk_hi) & (dd < D)
        if QUANT:  # fp8 cache: paged_append's convention (value / the scale of its KV head)
            k_scale = tl.load(ks_ptr + h * s_ksh, mask=h < hk_hi, other=1.0)
            v_scale = tl.load(vs_ptr + h * s_vsh, mask=h < hk_hi, other=1.0)
        else:
            k_scale = 1.0
            v_scale = 1.0
        if not ROTARY:  # k is copied as it is
            kx = tl.load(k_ptr + b3 * s_kb + i3 * s_ks + h * s_kh + dd * s_kd, mask=m)
            _store_row(kc_ptr + blk3 * s_kcb + off3 * s_kct + h * s_kch + dd * s_kcd, kx, k_scale, m, QUANT)
        vx = tl.load(v_ptr + b3 * s_vb + i3 * s_vs + h * s_vh + dd * s_vd, mask=m)
        _store_row(vc_ptr + blk3 * s_vcb + off3 * s_vct + h * s_vch + dd * s_vcd, vx, v_scale, m, QUANT)


#: Elements of one (tokens x heads x head dim) tile of the append: a decode step has few tokens, so
#: the heads are spread over programs (PROGRAMS_PER_SM of them per SM when the tokens allow).
APPEND_TILE_ELEMS = 4096
PROGRAMS_PER_SM = 4


def _dense4(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(stride_b, stride_s, stride_h, stride_d) of (B, S, H, D) or of (B, H, D) as S = 1."""
    if x.dim() == 4:
        return tuple(x.stride())
    return (x.stride(0), 0, x.stride(1), x.stride(2))


def rotary_append(q, k, v, k_cache, v_cache, block_table, starts, cos, sin, *, rotary_starts,
                  interleaved, q_per_token, k_scale=None, v_scale=None):
    """Launcher of :func:`gptkernels.decode.rotary_append`. q (B, Sq, Hq, D) or (B, Hq, D); k, v
    (B, Sk, Hkv, D) (Sk <= Sq) or (B, Hkv, D); caches (num_blocks, block_size, Hkv, D);
    ``block_table`` (B, max_blocks) int32; ``starts``, ``rotary_starts`` (B,) int32/int64. Returns
    the rotated q (a new tensor shaped like q), or q itself without cos/sin. An fp8 cache takes
    ``k_scale``/``v_scale`` ((Hkv,) or ()), stored as paged_append stores it."""
    rotary = cos is not None
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if rotary else q
    batch, seqlen = q.shape[0], (q.shape[1] if q.dim() == 4 else 1)
    seqlen_new = k.shape[1] if k.dim() == 4 else 1
    hq, hk, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    n_tokens = batch * seqlen
    if n_tokens == 0:
        return q_out
    block_d = next_pow2(head_dim)
    block_h = min(next_pow2(hk), 16)
    block_t = max(1, min(next_pow2(n_tokens), APPEND_TILE_ELEMS // (block_h * block_d), 64))
    token_programs = triton.cdiv(n_tokens, block_t)
    want = PROGRAMS_PER_SM * P.sm_count(q.device)
    splits = 1 if INTERPRET else max(1, min(triton.cdiv(hk, block_h), triton.cdiv(want, token_programs)))
    hk_per = triton.cdiv(triton.cdiv(hk, splits), block_h) * block_h
    # the q heads follow the same split (GQA: Hq / Hkv of them per k head)
    hq_per = triton.cdiv(triton.cdiv(hq, splits), block_h) * block_h
    half = cos.shape[1] if rotary else 1
    cs = (cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1)) if rotary else (0, 0, 0, 0)
    rstarts = rotary_starts if rotary and rotary_starts is not None else starts
    ks, s_ks = _scale_arg(k_scale, starts)
    vs, s_vs = _scale_arg(v_scale, starts)
    _rotary_append_kernel[(token_programs, splits)](
        q, q_out, k, v, k_cache, v_cache, cos if rotary else q, sin if rotary else q, block_table, starts,
        rstarts, ks, vs, n_tokens, seqlen, seqlen_new, hq, hk, hq_per, hk_per, cos.shape[0] if rotary else 0,
        k_cache.shape[0], block_table.shape[1],
        *_dense4(q), *_dense4(q_out), *_dense4(k), *_dense4(v), *k_cache.stride(), *v_cache.stride(),
        *block_table.stride(), starts.stride(0), rstarts.stride(0), *cs, s_ks, s_vs,
        HALF=half, HALF_PAD=next_pow2(half), D=head_dim, BLOCK_D=block_d,
        PASS_PAD=next_pow2(max(head_dim - 2 * half, 1)), BLOCK_SIZE=k_cache.shape[1],
        BLOCK_T=block_t, BLOCK_H=block_h, ROTARY=rotary, Q_PER_TOKEN=q_per_token,
        INTERLEAVED=interleaved, QUANT=k_scale is not None, num_warps=4,
    )
    return q_out


# --------------------------------------------------------------------------------------------------
# Residual add + LayerNorm
# --------------------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_row(h, c_ok, w_ptr, b_ptr, s_w, s_b, cols, C, eps, AFFINE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """LayerNorm of one row h (float32, its padding lanes 0) over its C valid lanes: biased
    variance, as torch's layer_norm; float32 result."""
    mean = tl.sum(h, axis=0) / C
    diff = tl.where(c_ok, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / C + eps)
    y = diff * rstd
    if AFFINE:
        y = y * tl.load(w_ptr + cols * s_w, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols * s_b, mask=c_ok, other=0.0).to(tl.float32)
    return y


@triton.jit
def _add_layer_norm_kernel(
    x_ptr, d1_ptr, d2_ptr, h_ptr, y1_ptr, y2_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
    C, eps1, eps2,
    s_xm, s_xc, s_d1m, s_d1c, s_d2m, s_d2c, s_hm, s_y1m, s_y2m, s_w1, s_b1, s_w2, s_b2,
    DELTAS: tl.constexpr, NORMS: tl.constexpr, AFFINE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One program per row: the whole row in registers (C <= 16384: 64 float32 per thread at 8 warps).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    dtype = x_ptr.dtype.element_ty
    h = tl.load(x_ptr + row * s_xm + cols * s_xc, mask=c_ok, other=0.0)
    if DELTAS > 0:
        d = tl.load(d1_ptr + row * s_d1m + cols * s_d1c, mask=c_ok, other=0.0)
        if DELTAS > 1:  # x + (d1 + d2), each sum rounded to the dtype as the unfused adds round it
            d = (d.to(tl.float32) + tl.load(d2_ptr + row * s_d2m + cols * s_d2c, mask=c_ok,
                                            other=0.0).to(tl.float32)).to(dtype)
        h = (h.to(tl.float32) + d.to(tl.float32)).to(dtype)
        tl.store(h_ptr + row * s_hm + cols, h, mask=c_ok)
    hf = h.to(tl.float32)
    y = _layer_norm_row(hf, c_ok, w1_ptr, b1_ptr, s_w1, s_b1, cols, C, eps1, AFFINE, HAS_BIAS)
    tl.store(y1_ptr + row * s_y1m + cols, y.to(dtype), mask=c_ok)
    if NORMS > 1:
        y = _layer_norm_row(hf, c_ok, w2_ptr, b2_ptr, s_w2, s_b2, cols, C, eps2, AFFINE, HAS_BIAS)
        tl.store(y2_ptr + row * s_y2m + cols, y.to(dtype), mask=c_ok)


def add_layer_norm(x, d1, d2, weight1, bias1, weight2, bias2, *, eps1, eps2, num_norms):
    """Launcher of :func:`gptkernels.decode.add_layer_norm`: x, d1, d2 (M, C) (d1/d2 may be None);
    returns (h or an empty placeholder without deltas, y1, y2 or an empty placeholder)."""
    m, c = x.shape
    deltas = (d1 is not None) + (d2 is not None)
    h = torch.empty((m, c), dtype=x.dtype, device=x.device) if deltas else x.new_empty(0)
    y1 = torch.empty((m, c), dtype=x.dtype, device=x.device)
    y2 = torch.empty((m, c), dtype=x.dtype, device=x.device) if num_norms > 1 else x.new_empty(0)
    if m == 0:
        return h, y1, y2
    d1_, d2_ = (d1 if d1 is not None else x), (d2 if d2 is not None else x)
    block_c = next_pow2(c)
    _add_layer_norm_kernel[(m,)](
        x, d1_, d2_, h if deltas else x, y1, y2 if num_norms > 1 else y1,
        weight1 if weight1 is not None else x, bias1 if bias1 is not None else x,
        weight2 if weight2 is not None else x, bias2 if bias2 is not None else x,
        c, eps1, eps2, x.stride(0), x.stride(1), d1_.stride(0), d1_.stride(1), d2_.stride(0), d2_.stride(1),
        c, c, c, *(t.stride(0) if t is not None else 0 for t in (weight1, bias1, weight2, bias2)),
        DELTAS=deltas, NORMS=num_norms, AFFINE=weight1 is not None, HAS_BIAS=bias1 is not None,
        BLOCK_C=block_c, num_warps=1 if INTERPRET else min(16, max(1, block_c // 512)),
    )
    return h, y1, y2


# --------------------------------------------------------------------------------------------------
# The decode GEMM with its neighbours folded in
# --------------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    """tanh in float32 through exp2 (odd, saturating at +-1; absolute error ~1e-7)."""
    t = tl.math.exp2(tl.abs(x) * -2.0 * _LOG2E)
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.math.exp2(-x * _LOG2E))


@triton.jit
def _activation(y, ACT: tl.constexpr):
    """The epilogue's activation in float32 (codes: ACTIVATION_CODES)."""
    if ACT == 1:  # exact GELU (erf)
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))  # 1/sqrt(2)
    elif ACT == 2:  # GELU, tanh approximation (HF's gelu_new)
        y = 0.5 * y * (1.0 + _tanh((y + 0.044715 * y * y * y) * 0.7978845608028654))  # sqrt(2/pi)
    elif ACT == 3:  # quick_gelu
        y = y * _sigmoid(1.702 * y)
    elif ACT == 4:
        y = tl.maximum(y, 0.0)
    elif ACT == 5:  # SiLU
        y = y * _sigmoid(y)
    return y


@triton.jit
def _fused_linear_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, lnw_ptr, lnb_ptr, kc_ptr, vc_ptr, bt_ptr, pos_ptr, ks_ptr, vs_ptr,
    M, N, K, eps, NQ, NKV, num_blocks, max_blocks,
    s_xm, s_xk, s_wn, s_wk, s_rm, s_rn, s_ym, s_yn, s_b, s_lnw, s_lnb,
    s_kcb, s_kct, s_kch, s_kcd, s_vcb, s_vct, s_vch, s_vcd, s_btb, s_btn, s_pos, s_ksh, s_vsh,
    NORM: tl.constexpr, LN_AFFINE: tl.constexpr, LN_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr, HAS_RES: tl.constexpr, CACHE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, QUANT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program: a BLOCK_M x BLOCK_N tile of y over all of K (decode: one row tile; the weight, the
    # only large operand, is read once in all).
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    kk = tl.arange(0, BLOCK_K)
    dtype = x_ptr.dtype.element_ty
    x_rows = x_ptr + rm[:, None] * s_xm

    if NORM:
        # The LayerNorm's row statistics in one pass over this program's rows of x (from L2: every
        # program of the launch reads the same few rows), before the weights stream: sums of x - x0,
        # shifted by each row's first element so that the variance's E[d^2] - E[d]^2 does not cancel
        # (x0 is a sample of the row: |mean - x0| is of the order of the standard deviation).
        x0 = tl.load(x_ptr + rm * s_xm, mask=m_ok, other=0.0).to(tl.float32)
        acc_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc_q = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ko = k0 + kk
            kmask = m_ok[:, None] & (ko < K)[None, :]
            xt = tl.load(x_rows + ko[None, :] * s_xk, mask=kmask, other=0.0)
            diff = tl.where(kmask, xt.to(tl.float32) - x0[:, None], 0.0)
            acc_s += tl.sum(diff, axis=1)
            acc_q += tl.sum(diff * diff, axis=1)
        shift = acc_s / K
        mean = x0 + shift
        rstd = 1.0 / tl.sqrt(tl.maximum(acc_q / K - shift * shift, 0.0) + eps)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ko = k0 + kk
        k_ok = ko < K
        xt = tl.load(x_rows + ko[None, :] * s_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            # normalised in float32, rounded to the dtype as the LayerNorm's output would be
            xn = (xt.to(tl.float32) - mean[:, None]) * rstd[:, None]
            if LN_AFFINE:
                xn = xn * tl.load(lnw_ptr + ko * s_lnw, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if LN_BIAS:
                xn = xn + tl.load(lnb_ptr + ko * s_lnb, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            xt = tl.where(k_ok[None, :], xn, 0.0).to(dtype)
        wt = tl.load(w_ptr + rn[:, None] * s_wn + ko[None, :] * s_wk, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(b_ptr + rn * s_b, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    acc = _activation(acc, ACT)
    if HAS_RES:
        acc += tl.load(r_ptr + rm[:, None] * s_rm + rn[None, :] * s_rn,
                       mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    out = acc.to(dtype)
    if CACHE:
        # Columns [0, NQ) are q (to y); [NQ, NQ + NKV) k and [NQ + NKV, N) v, written to row m's
        # cache slot (its sequence's position pos[m], paged through its block-table row).
        tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :] * s_yn, out,
                 mask=m_ok[:, None] & (rn < NQ)[None, :])
        pos = tl.load(pos_ptr + rm * s_pos, mask=m_ok, other=-1).to(tl.int64)
        page = pos // BLOCK_SIZE
        row_ok = m_ok & (pos >= 0) & (page < max_blocks)
        blk = tl.load(bt_ptr + rm * s_btb + page * s_btn, mask=row_ok, other=-1).to(tl.int64)
        row_ok = row_ok & (blk >= 0) & (blk < num_blocks)
        off = pos % BLOCK_SIZE
        is_v = rn >= NQ + NKV
        c = tl.where(is_v, rn - NQ - NKV, rn - NQ)
        head = c // HEAD_DIM
        d = c % HEAD_DIM
        k_cols = (rn >= NQ) & ~is_v & n_ok
        v_cols = is_v & n_ok
        k_scale = 1.0
        v_scale = 1.0
        if QUANT:  # fp8 cache: paged_append's convention (value / the scale of the column's KV head)
            k_scale = tl.load(ks_ptr + head * s_ksh, mask=k_cols, other=1.0)[None, :]
            v_scale = tl.load(vs_ptr + head * s_vsh, mask=v_cols, other=1.0)[None, :]
        _store_row(kc_ptr + blk[:, None] * s_kcb + off[:, None] * s_kct + (head * s_kch + d * s_kcd)[None, :],
                   out, k_scale, row_ok[:, None] & k_cols[None, :], QUANT)
        _store_row(vc_ptr + blk[:, None] * s_vcb + off[:, None] * s_vct + (head * s_vch + d * s_vcd)[None, :],
                   out, v_scale, row_ok[:, None] & v_cols[None, :], QUANT)
    else:
        tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :] * s_yn, out, mask=m_ok[:, None] & n_ok[None, :])


#: Rows the fused linear serves (a decode step's batch); more rows go to cuBLAS (a policy of the
#: model code: :data:`gptkernels.decode.FUSED_LINEAR_MAX_ROWS`).
#: (BLOCK_M, BLOCK_K, num_warps, num_stages) by rows, for a GPU: one row tile covering M (the tensor
#: cores' smallest, 16, for a batch of 1), long K tiles (deep loads of the weight). Predictions, not
#: measurements: notes/models.md.
GPU_TILES = ((16, (16, 256, 4, 4)), (32, (32, 128, 4, 4)), (64, (64, 64, 4, 4)))
#: The interpreter pays per operation, not per element: modest tiles.
INTERP_TILES = ((16, (16, 64, 4, 1)), (64, (64, 64, 4, 1)))
#: Output tile widths tried, widest first: the widest that still gives every SM
#: ``LINEAR_PROGRAMS_PER_SM`` programs (decode GEMMs are weight-bandwidth-bound: the GPU must be
#: full), else the narrowest.
BLOCK_N_CHOICES = (64, 32, 16)
LINEAR_PROGRAMS_PER_SM = 2


def linear_config(m: int, n: int, num_sms: int, interpret: bool = INTERPRET):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of a fused linear launch, from shapes only."""
    tiles = INTERP_TILES if interpret else GPU_TILES
    block_m, block_k, warps, stages = next((cfg for bound, cfg in tiles if m <= bound), tiles[-1][1])
    if interpret:
        return block_m, 32, block_k, warps, stages
    rows = triton.cdiv(m, block_m)
    block_n = next((bn for bn in BLOCK_N_CHOICES if rows * triton.cdiv(n, bn) >= LINEAR_PROGRAMS_PER_SM * num_sms),
                   BLOCK_N_CHOICES[-1])
    return block_m, block_n, block_k, warps, stages


def fused_linear(x, weight, bias, *, norm, activation, residual, cache):
    """Launcher of :func:`gptkernels.decode.fused_linear`. x (M, K), weight (N, K), bias (N,) or None;
    ``norm``: None or (weight, bias, eps) of a LayerNorm over K (weight/bias may be None);
    ``activation``: a name of ACTIVATION_CODES; ``residual`` (M, N) or None; ``cache``: None or
    (k_cache, v_cache, block_table, positions, q_features[, k_scale, v_scale]) for a fused qkv
    projection (an fp8 cache with its scales). Returns y (M, N), or (M, q_features) with a cache."""
    m, k = x.shape
    n = weight.shape[0]
    nq = cache[4] if cache is not None else n
    y = torch.empty((m, nq), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    block_m, block_n, block_k, warps, stages = linear_config(m, n, P.sm_count(x.device))
    ln_w, ln_b, eps = norm if norm is not None else (None, None, 0.0)
    k_scale = v_scale = None
    if cache is not None:
        kc, vc, table, pos, _, *scales = cache
        k_scale, v_scale = scales if scales else (None, None)
        nkv = (n - nq) // 2
        ks, s_ks = _scale_arg(k_scale, pos)
        vs, s_vs = _scale_arg(v_scale, pos)
        c_args = (kc, vc, table, pos, ks, vs)
        c_strides = (*kc.stride(), *vc.stride(), *table.stride(), pos.stride(0), s_ks, s_vs)
        c_shape = (kc.shape[0], table.shape[1])
        head_dim, block_size = kc.shape[3], kc.shape[1]
    else:
        nkv = 0
        c_args = (x, x, x, x, x, x)
        c_strides = (0,) * 13
        c_shape = (0, 0)
        head_dim, block_size = 1, 1
    r = residual if residual is not None else x
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _fused_linear_kernel[grid](
        x, weight, bias if bias is not None else x, r, y,
        ln_w if ln_w is not None else x, ln_b if ln_b is not None else x, *c_args,
        m, n, k, float(eps), nq, nkv, *c_shape,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        r.stride(0) if residual is not None else 0, r.stride(1) if residual is not None else 0,
        y.stride(0), y.stride(1), *(t.stride(0) if t is not None else 0 for t in (bias, ln_w, ln_b)), *c_strides,
        NORM=norm is not None, LN_AFFINE=ln_w is not None, LN_BIAS=ln_b is not None,
        HAS_BIAS=bias is not None, ACT=ACTIVATION_CODES[activation], HAS_RES=residual is not None,
        CACHE=cache is not None, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, QUANT=k_scale is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return y
