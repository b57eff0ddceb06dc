"""Triton kernels for the paged KV cache: cache append and split-K (flash-decoding) decode.

Launchers (same names and signatures as their CUDA twins in :mod:`gptkernels.cuda`):

* ``paged_append(k, v, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None) -> None``
* ``paged_decode(q, k_cache, v_cache, block_table, seq_lens, *, softmax_scale, window, num_splits,
  k_scale=None, v_scale=None, softcap=None, alibi_slopes=None) -> (out, lse)``

Inputs are checked by :mod:`gptkernels.paged`; every index the kernels read from memory (slots,
block table entries, sequence lengths) is masked so that bad values never read or write out of
bounds. An fp8 cache (``k_scale``/``v_scale`` given) is written as value / scale and read back as
stored * scale; softcap and ALiBi follow gptkernels/reference.py. Design and byte counts:
notes/paged.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._policy import FP8_E4M3_MAX, LOG2E
from ._config import autotune, configs, next_pow2

# Kernels may read module globals only as constexprs.
_FP8_MAX: tl.constexpr = tl.constexpr(FP8_E4M3_MAX)
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)

# --------------------------------------------------------------------------------------------------
# Append: k, v (T, Hkv, D) -> cache slots
# --------------------------------------------------------------------------------------------------


@triton.jit
def _round_to_e4m3(y):
    """float32 -> the nearest float8_e4m3fn value (ties to even), saturated at +-448, still in
    float32: the cast that follows is then exact. Written out because the interpreter's own
    float32 -> fp8 cast truncates where it should carry (31.2 becomes 16, not 32); on the GPU it
    costs a few integer ops per element of a store-bound kernel."""
    y = tl.minimum(tl.maximum(y, -_FP8_MAX), _FP8_MAX)
    a = tl.abs(y)
    # Normal range (|y| >= 2**-6): keep 3 of float32's 23 mantissa bits, round half to even on the
    # bits (a carry into the exponent is the right answer).
    bits = a.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # Subnormal range: multiples of 2**-9, rounded half to even in exact float32 arithmetic.
    z = a * 512.0
    zi = z.to(tl.int32)  # floor (z >= 0)
    frac = z - zi.to(tl.float32)
    up = (frac > 0.5) | ((frac == 0.5) & ((zi & 1) == 1))
    sub = (zi + up.to(tl.int32)).to(tl.float32) * 0.001953125
    r = tl.where(a < 0.015625, sub, normal)
    return tl.where(y.to(tl.int32, bitcast=True) < 0, -r, r)  # the sign bit: -0.0 stays -0.0


@triton.jit
def _store_row(ptr, x, scale, mask, QUANT: tl.constexpr):
    """Store rows x in the cache's dtype: as is, or (fp8) x / scale rounded to e4m3."""
    if QUANT:
        x = _round_to_e4m3(tl.math.div_rn(x.to(tl.float32), scale))
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _paged_append_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, ks_ptr, vs_ptr,
    T, num_slots,
    s_kt, s_kh, s_kd,
    s_vt, s_vh, s_vd,
    s_kcb, s_kct, s_kch, s_kcd,
    s_vcb, s_vct, s_vch, s_vcd,
    s_ksh, s_vsh,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr,
):
    # One program: BLOCK_T tokens of one KV head; each token row is D contiguous elements in both
    # the input and the cache, so loads and stores are coalesced row by row.
    h = tl.program_id(1).to(tl.int64)  # int64: h * stride_h passes 2**31 for large strided inputs
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + t, mask=t < T, other=-1)
    # -1 means "skip"; any other slot outside the cache is dropped too (never an out-of-bounds store).
    keep = (slot >= 0) & (slot < num_slots)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    mask = keep[:, None] & (d < HEAD_DIM)[None, :]
    k_scale = 1.0
    v_scale = 1.0
    if QUANT:  # fp8 cache: one scale per KV head (stride 0: one for all)
        k_scale = tl.load(ks_ptr + h * s_ksh)
        v_scale = tl.load(vs_ptr + h * s_vsh)
    kx = tl.load(k_ptr + t[:, None] * s_kt + h * s_kh + d[None, :] * s_kd, mask=mask)
    _store_row(kc_ptr + blk[:, None] * s_kcb + off[:, None] * s_kct + h * s_kch + d[None, :] * s_kcd, kx,
               k_scale, mask, QUANT)
    vx = tl.load(v_ptr + t[:, None] * s_vt + h * s_vh + d[None, :] * s_vd, mask=mask)
    _store_row(vc_ptr + blk[:, None] * s_vcb + off[:, None] * s_vct + h * s_vch + d[None, :] * s_vcd, vx,
               v_scale, mask, QUANT)


def _scale_arg(scale, fallback):
    """(tensor, head stride) of a per-KV-head scale shaped (Hkv,) or (); ``fallback`` stands in
    (never read) when there is none."""
    if scale is None:
        return fallback, 0
    return scale, (scale.stride(0) if scale.dim() == 1 else 0)


def paged_append(k, v, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None) -> None:
    """Write k, v (T, Hkv, D) to the caches at ``slot_mapping`` (T,) int64; -1 skips a token. With
    ``k_scale``/``v_scale`` (fp8 caches) each value is stored as value / scale, saturated at +-448."""
    T, hkv, d = k.shape
    if T == 0:
        return
    slot_mapping = slot_mapping.contiguous()  # the kernel reads slot t at slot_ptr + t
    num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
    ks, s_ks = _scale_arg(k_scale, slot_mapping)
    vs, s_vs = _scale_arg(v_scale, slot_mapping)
    block_t = 16
    grid = (triton.cdiv(T, block_t), hkv)
    _paged_append_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping, ks, vs, T, num_blocks * block_size,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), s_ks, s_vs,
        HEAD_DIM=d, BLOCK_SIZE=block_size, BLOCK_T=block_t, BLOCK_D=next_pow2(d), QUANT=k_scale is not None,
    )


# --------------------------------------------------------------------------------------------------
# Decode: grid (B, Hkv, num_splits); each program serves all query heads of one KV head
# --------------------------------------------------------------------------------------------------


@triton.jit
def _scores(q, k, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """q (G, D) x k (N, D) -> (G, N) float32."""
    if USE_DOT:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    else:
        # One query head (G == 1): a broadcast multiply-sum over 2-D tiles (q (1, D) broadcasts over
        # the N rows of k) keeps everything in registers and wastes no tensor-core rows on padding.
        s = tl.sum(k.to(tl.float32) * q.to(tl.float32), axis=1)[None, :]
    return s


@triton.jit
def _tanh(x):
    """tanh in float32 through exp2 (odd, saturates to +-1; absolute error ~1e-7): Triton has no
    tanh that both the GPU and the interpreter run."""
    t = tl.math.exp2(tl.abs(x) * -2.0 * _LOG2E)
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _weighted_values(p, v, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """p (G, N) float32 x v (N, D) -> (G, D) float32."""
    if USE_DOT:
        # Like FlashAttention: the probabilities go to the tensor cores in V's dtype.
        o = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    else:
        o = tl.sum(tl.reshape(p, (p.shape[1], 1)) * v.to(tl.float32), axis=0)[None, :]
    return o


@autotune(  # gptkernels' autotuner: GPTKERNELS_AUTOTUNE=0 takes the first config untimed
    configs=configs(
        gpu=[
            triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in ((32, 4, 3), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 8, 2))
        ],
        interpreter=triton.Config({"BLOCK_N": 32}, num_warps=4),
    ),
    # Not the page size: the tiles are independent of it (notes/paged.md), so one tuning per head
    # layout and dtype serves every block size.
    # (the caches' dtype, fp8 or not, is part of Triton's key: an fp8 cache tunes on its own)
    key=["GROUP_PAD", "HEAD_DIM", "USE_DOT"],
)
@triton.jit
def _paged_decode_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr, ks_ptr, vs_ptr, slope_ptr,
    s_qb, s_qh, s_qd,
    s_kb, s_kt, s_kh, s_kd,
    s_vb, s_vt, s_vh, s_vd,
    s_btb, s_btn,
    s_ob, s_oh, s_os, s_od,
    s_lb, s_lh, s_ls,
    s_ksh, s_vsh, s_ab, s_ah,
    num_blocks, max_blocks, qk_scale, window, softcap_log2,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_SCALED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # int64: b * s_qb and h * s_kh pass 2**31 for large strided q / head-major caches
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    # The keys this query sees: [start, L) (causal: all cached tokens; window: the last `window`).
    L = tl.maximum(tl.load(lens_ptr + b), 0)
    start = tl.where(window > 0, tl.maximum(L - window, 0), 0)
    # Tiles are aligned to absolute positions and split evenly between the splits; tiles before the
    # window are never visited. Each key finds its page through its own table entry, so any page
    # size works (1 to 1024): a tile may span many small pages or be one slice of a large one.
    first = start // BLOCK_N
    n_tiles = tl.cdiv(L, BLOCK_N) - first
    per_split = tl.cdiv(n_tiles, num_splits)
    t_lo = first + split * per_split
    t_hi = tl.minimum(t_lo + per_split, first + n_tiles)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    hq = h * GROUP + g
    q = tl.load(q_ptr + b * s_qb + hq[:, None] * s_qh + d[None, :] * s_qd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    # qk_scale: softmax_scale * LOG2E, or softmax_scale / softcap with a soft cap (whose tanh comes
    # first; LOG2E then rides on softcap_log2). An fp8 cache's K scale is this program's KV head's:
    # folded into it, as the V scale is into the output: dequantizing costs nothing per key.
    v_scale = 1.0
    if KV_SCALED:
        qk_scale = qk_scale * tl.load(ks_ptr + h * s_ksh)
        v_scale = tl.load(vs_ptr + h * s_vsh)
    if ALIBI:  # bias -slope * (L - 1 - key), in log2 units like the scores
        slope = tl.load(slope_ptr + b * s_ab + hq * s_ah, mask=g_ok, other=0.0) * _LOG2E

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([GROUP_PAD], tl.float32)                # running sum of exp2(score - m_i)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * s_btb
    k_head = kc_ptr + h * s_kh
    v_head = vc_ptr + h * s_vh
    for t in range(t_lo, t_hi):
        pos = t * BLOCK_N + tl.arange(0, BLOCK_N)
        page = pos // BLOCK_SIZE
        valid = (pos >= start) & (pos < L) & (page < max_blocks)
        # The page of every key of the tile (one table entry per page, broadcast over its keys).
        blk = tl.load(bt_row + page * s_btn, mask=valid, other=0)
        valid = valid & (blk >= 0) & (blk < num_blocks)  # entries outside the cache are never read
        blk = blk.to(tl.int64)
        off = (pos % BLOCK_SIZE).to(tl.int64)  # int64: off * s_kt may pass 2**31 (strided caches)
        kv_mask = valid[:, None] & d_ok[None, :]
        k = tl.load(k_head + blk[:, None] * s_kb + off[:, None] * s_kt + d[None, :] * s_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_head + blk[:, None] * s_vb + off[:, None] * s_vt + d[None, :] * s_vd, mask=kv_mask, other=0.0)
        if KV_SCALED:  # fp8 -> q's dtype: exact (every e4m3 value is a float16 / bfloat16 value)
            k = k.to(q.dtype)
            v = v.to(q.dtype)

        s = _scores(q, k, USE_DOT, DOT_PRECISION) * qk_scale
        if SOFTCAP:
            s = _tanh(s) * softcap_log2
        if ALIBI:
            s += slope[:, None] * (pos - (L - 1)).to(tl.float32)[None, :]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: avoid -inf - -inf
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _weighted_values(p, v, USE_DOT, DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc * (v_scale / tl.where(seen, l_i, 1.0))[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    # Unsplit: o/lse are the final (B, Hq, D)/(B, Hq) outputs (s_os = s_ls = 0). Split: float32
    # partials (B, Hq, S, D)/(B, Hq, S) for the merge kernel.
    o_row = o_ptr + b.to(tl.int64) * s_ob + split * s_os
    tl.store(o_row + hq[:, None] * s_oh + d[None, :] * s_od, out.to(o_ptr.dtype.element_ty),
             mask=g_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + b.to(tl.int64) * s_lb + hq * s_lh + split * s_ls, lse, mask=g_ok)


@triton.jit
def _paged_merge_kernel(
    po_ptr, plse_ptr, o_ptr, lse_ptr, num_splits,
    s_pb, s_ph, s_ps, s_pd,
    s_qb, s_qh, s_qs,
    s_ob, s_oh, s_od,
    s_lb, s_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One program per (sequence, query head): out = sum_s w_s o_s / sum_s w_s with w_s = exp(lse_s - max).
    b = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    sidx = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse_row = plse_ptr + b * s_qb + hq * s_qh
    # Vector accumulators (reduced after the loops) keep the loop-carried types fixed.
    m_vec = tl.full([BLOCK_S], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        x = tl.load(lse_row + (s0 + sidx) * s_qs, mask=s0 + sidx < num_splits, other=float("-inf"))
        m_vec = tl.maximum(m_vec, x)
    m = tl.max(m_vec, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    den_vec = tl.zeros([BLOCK_S], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    o_row = po_ptr + b * s_pb + hq * s_ph
    for s0 in range(0, num_splits, BLOCK_S):
        s_ok = s0 + sidx < num_splits
        w = tl.exp(tl.load(lse_row + (s0 + sidx) * s_qs, mask=s_ok, other=float("-inf")) - m_safe)
        o = tl.load(o_row + (s0 + sidx)[:, None] * s_ps + d[None, :] * s_pd,
                    mask=s_ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
        den_vec += w
        acc += tl.sum(w[:, None] * o, axis=0)
    den = tl.sum(den_vec, axis=0)
    out = acc / tl.where(den > 0.0, den, 1.0)
    lse = tl.where(den > 0.0, m_safe + tl.log(tl.where(den > 0.0, den, 1.0)), float("-inf"))
    tl.store(o_ptr + b * s_ob + hq * s_oh + d * s_od, out.to(o_ptr.dtype.element_ty), mask=d < HEAD_DIM)
    tl.store(lse_ptr + b * s_lb + hq * s_lh, lse)


#: CUDA limits grid dim z (the splits) to 65535; more splits than that cannot help anyway.
MAX_GRID_Z = 65535


def paged_decode(q, k_cache, v_cache, block_table, seq_lens, *, softmax_scale, window, num_splits,
                 k_scale=None, v_scale=None, softcap=None, alibi_slopes=None):
    """One query token per sequence over the paged cache -> (out (B, Hq, D), lse (B, Hq) float32).
    ``k_scale``/``v_scale``: an fp8 cache's per-KV-head scales; ``softcap`` (> 0) and
    ``alibi_slopes`` ((Hq,) or (B, Hq) float32, any strides) as in gptkernels/reference.py."""
    num_splits = min(num_splits, MAX_GRID_Z)
    batch, hq, d = q.shape
    num_blocks, block_size, hkv, _ = k_cache.shape
    group = hq // hkv
    out = q.new_empty(q.shape)
    lse = q.new_empty((batch, hq), dtype=torch.float32)
    if batch == 0 or hq == 0:
        return out, lse
    seq_lens = seq_lens.contiguous()  # read at lens_ptr + b (the block table's strides are honoured)
    if num_splits == 1:
        po, plse = out, lse
        po_strides = (out.stride(0), out.stride(1), 0, out.stride(2))
        plse_strides = (lse.stride(0), lse.stride(1), 0)
    else:
        po = q.new_empty((batch, hq, num_splits, d), dtype=torch.float32)
        plse = q.new_empty((batch, hq, num_splits), dtype=torch.float32)
        po_strides, plse_strides = po.stride(), plse.stride()
    use_dot = group > 1
    block_d = max(16, next_pow2(d))
    ks, s_ks = _scale_arg(k_scale, seq_lens)
    vs, s_vs = _scale_arg(v_scale, seq_lens)
    if alibi_slopes is None:
        slopes, s_ab, s_ah = seq_lens, 0, 0
    else:  # (Hq,) shares one row between the sequences: batch stride 0
        slopes = alibi_slopes
        s_ab, s_ah = (0, slopes.stride(0)) if slopes.dim() == 1 else slopes.stride()
    _paged_decode_kernel[(batch, hkv, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, po, plse, ks, vs, slopes,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *block_table.stride(),
        *po_strides, *plse_strides, s_ks, s_vs, s_ab, s_ah,
        num_blocks, block_table.shape[1],
        softmax_scale / softcap if softcap is not None else softmax_scale * LOG2E, window or 0,
        softcap * LOG2E if softcap is not None else 0.0,
        GROUP=group, GROUP_PAD=max(16, next_pow2(group)) if use_dot else 1, HEAD_DIM=d, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, USE_DOT=use_dot,
        # float32 caches: exact float32 products (no TF32); 16-bit inputs: the tensor cores' default.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        KV_SCALED=k_scale is not None, SOFTCAP=softcap is not None, ALIBI=alibi_slopes is not None,
    )
    if num_splits > 1:
        merge_splits(po, plse, out, lse)
    return out, lse


def merge_splits(po, plse, out, lse):
    """Combine split-K partial results: po (R, H, S, D) and plse (R, H, S) float32 (each split's
    normalised output and natural-log lse; a split that saw nothing has lse -inf) -> out (R, H, D)
    and lse (R, H), written in place (any strides). Used by paged decode and the flash forward."""
    rows, heads, num_splits, d = po.shape
    if rows == 0 or heads == 0:
        return
    _paged_merge_kernel[(rows, heads)](
        po, plse, out, lse, num_splits, *po.stride(), *plse.stride(), *out.stride(), *lse.stride(),
        HEAD_DIM=d, BLOCK_D=max(16, next_pow2(d)), BLOCK_S=min(16, next_pow2(num_splits)),
    )
