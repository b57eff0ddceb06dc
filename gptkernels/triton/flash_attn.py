"""Flash attention in Triton: forward (dense, varlen, paged keys) and backward (dense, varlen).

Design (details, FLOP/byte predictions and what a GPU session must tune: ``notes/attention.md``):

* Forward: one program per (query tile, query head, sequence). Online softmax in base 2 (log2(e) is
  folded into the scale, lse is converted back to natural log at the end). The key loop covers only
  the tiles that intersect the causal / window band and is split in three: masked boundary tiles
  before the band interior, unmasked interior tiles, masked boundary tiles after it. Causal attention
  therefore does about half the work of full attention and a window W does O(S * W); a narrow
  window takes tiles of at most 64 so that boundary tiles waste at most 1.25x (``_fit_rows``).
  With few query rows and GQA (``PACK_GQA``: decode, speculative chunks) one program serves a KV
  head: its query tile holds the rows of every query head of the group, so K/V are read once per
  group, not once per query head.
* Backward, FlashAttention-2 style without atomics (deterministic):
  1. ``_bwd_preprocess``: delta = rowsum(dO * O) - dlse (dlse: the gradient flowing into lse).
  2. ``_bwd_dkdv``: one program per (key tile, KV head, sequence) keeps K, V, dK, dV on chip and
     walks the query tiles of the band for every query head of its GQA group, so dK/dV of a KV head
     sum over the group in registers, with no repeated K/V and no atomics. Tiles of 128 query rows x
     64 keys: all four products are at least 64 on each side at D >= 64 (wgmma).
  3. ``_bwd_dq``: one program per (query tile, query head, sequence) walks the key tiles of the band.
  Both recompute P = exp2(S * log2(e) - lse * log2(e)) from the saved lse.
* Any strides: q, k, v, dout come with their own strides and are never copied; the index tensors
  (cu_seqlens, seqlens_k, block_table: a few bytes) are made contiguous by the launchers. Offsets
  that can exceed 2**31 (batch, token, head, cache block) are computed in int64; so is a row of a
  tile (the dK/dV kernel: a row of the sequence) times a row stride when the launcher finds a
  stride that needs it (``ROW64``; int32 otherwise: the int64 form spilled registers in the sm_90a
  forward). The batch is grid axis 2,
  which CUDA caps at 65535: larger batches are launched in chunks.
* ``max_seqlen_q``/``max_seqlen_k`` size the grids. Dense grids are exact; varlen ones come from the
  caller (no sync), so a tail launch (``TAIL``: one program per head and sequence, which finds
  nothing to do when the value was right) computes any rows past them: an understated value costs
  time, never correctness.
* Dropout (``DROPOUT``, off by default: the flag-off launch compiles as before): the keep mask is
  Philox bits on a counter that is a function of (sequence, head, query row, key) only
  (``_rng_seq``, ``_dropout_keep``), so the forward and both backward kernels regenerate it from
  the seed; nothing is stored.
* Head dims 1..256: the D tile is padded to a power of two (>= 16, the smallest tl.dot) and masked.
* float32 uses ``input_precision="ieee"`` (TF32 would break fp32 parity on the GPU).
* Safety: sequence bounds read from cu_seqlens / seqlens_k are clamped to the tensors' extents and a
  block table entry outside [0, num_blocks) is masked (its keys contribute nothing), so unchecked
  bad indices never read or write out of bounds.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._policy import LOG2E, band_width, decode_band, num_splits, sm_count, window_bounds
from ._config import INTERPRET, autotune, configs, next_pow2
from .paged import _tanh, merge_splits

_LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)  # the same constant, usable inside kernels


# --------------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _visible(pos_q, cols, seqlen_k, window, right, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
             HAS_RIGHT: tl.constexpr):
    """The mask rule, mirroring ``reference.attention_mask`` (the single definition in Python).

    ``pos_q``: absolute positions p of the query rows, ``cols``: key indices j (already broadcast
    against each other). The window (left, right) arrives as: CAUSAL (right = 0) or HAS_RIGHT
    (right > 0, the runtime ``right``) or neither (unbounded); HAS_WINDOW (left bounded, the runtime
    ``window`` = left + 1) or not. Key j is visible iff j < seqlen_k, j <= p + right and
    j > p - window.
    """
    vis = cols < seqlen_k
    if CAUSAL:
        vis = vis & (cols <= pos_q)
    elif HAS_RIGHT:
        vis = vis & (cols <= pos_q + right)
    if HAS_WINDOW:
        vis = vis & (cols > pos_q - window)
    return vis


@triton.jit
def _score_mods(s, pos_q, cols, slope2, softcap_scale, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Soft cap, then ALiBi, on a tile of scores (``reference.softcap_scores`` / ``alibi_bias``).

    In: ``s`` = q.k times ``qk_scale``, which is softmax_scale * log2(e) without a soft cap and
    softmax_scale / softcap with one (tanh acts on the natural-scale score; log2(e) then rides on
    ``softcap_scale`` = softcap * log2(e)). Out: scores in log2 units, as the online softmax takes
    them. ``slope2``: the rows' ALiBi slopes times log2(e); the bias is -slope * |pos_q - col|.
    Neither changes which keys are visible (the mask comes after, as in FlashAttention).
    Returns (scores, tanh of the capped input): the backward's chain rule needs the latter.
    """
    cap = s
    if SOFTCAP:
        cap = _tanh(s)
        s = cap * softcap_scale
    if ALIBI:
        s -= slope2 * tl.abs(pos_q - cols).to(tl.float32)
    return s, cap


@triton.jit
def _rows(offs, ROW64: tl.constexpr):
    """Row indices of a tile, ready to multiply by a row stride: int64 when the launcher found a
    stride for which that product may pass 2**31 (``ROW64``), else int32 (cheaper addressing and
    fewer registers: the int64 form made the sm_90a forward spill)."""
    if ROW64:
        offs = offs.to(tl.int64)
    return offs


@triton.jit
def _rng_seq(rng_offset, b64, hq, q_start, q_len, kv_len, VARLEN_Q: tl.constexpr):
    """Dropout: the Philox counter of sequence b's first (query row, key quad), int64. Keys go by
    quads (one Philox call gives four 32-bit words: keys 4c .. 4c + 3), a row has cdiv(kv_len, 4);
    (query head h, row i, quad c) of a sequence is ``_rng_seq + (h * q_len + i) * cdiv(kv_len, 4)
    + c``, i.e. ``rng_offset + ((b * Hq + h) * q_len + q_start + i) * cdiv(kv_len, 4) + c`` (dense:
    q_start = 0; varlen: no batch term, q_start + i is the packed token, q_len = Tq, kv_len = Tk):
    unique per (sequence, head, query, key), whichever kernel, tile shape or row packing asks."""
    seq = q_start.to(tl.int64)
    if not VARLEN_Q:
        seq += b64 * hq * q_len
    return rng_offset + seq * ((kv_len + 3) // 4)


@triton.jit
def _dropout_keep(seed, rng_seq, h, rows, col0, q_len, kv_len, dropout_p, BLOCK_N: tl.constexpr):
    """Dropout keep mask of a tile: query head(s) ``h`` (a scalar, or per row with PACK_GQA), query
    rows ``rows`` of the sequence, keys col0 .. col0 + BLOCK_N (col0 a multiple of 4: tiles start
    at multiples of BLOCK_N >= 16). One Philox call (``tl.randint4x``) per four keys on the counters
    of :func:`_rng_seq`, its words interleaved back into key order; kept with probability
    1 - dropout_p. The forward, both backward kernels and :func:`dropout_mask` all call this, so
    they regenerate the same bits."""
    quads = col0 // 4 + tl.arange(0, BLOCK_N // 4)
    offs = rng_seq + (h * q_len + rows).to(tl.int64)[:, None] * ((kv_len + 3) // 4) + quads[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, offs)
    # join(join(r0, r2), join(r1, r3))[..., t, u] = r_(2t + u): key 4c + 2t + u after the reshape
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [offs.shape[0], BLOCK_N])
    return tl.uint_to_uniform_float(r) >= dropout_p


@triton.jit
def _tile_loop(pid, row0, seqlen, BLOCK: tl.constexpr, TAIL: tl.constexpr):
    """(first row, step, count) of the tiles a program computes along a sequence of ``seqlen`` rows.

    A main launch (grid sized from max_seqlen_*): tile ``pid`` only, a loop of one iteration that
    compiles to straight code. A tail launch (``TAIL``, after the main one, varlen only): rows from
    ``row0`` (= the max_seqlen_* the main grid covers) on, strided over its programs, so an
    understated max_seqlen_* still computes every row; when it was right, nothing is left."""
    if TAIL:
        first = row0 + pid * BLOCK
        step = tl.num_programs(0) * BLOCK
        count = tl.cdiv(tl.maximum(seqlen - first, 0), step)
    else:
        first = pid * BLOCK
        step = BLOCK
        count = 1
    return first, step, count


@triton.jit
def _row_off(di, g, stride_s, stride_h, PACK_GQA: tl.constexpr):
    """Offsets of a forward tile's rows from its first row: di tokens on, and with PACK_GQA g heads
    on (a packed tile's rows are (query, head) pairs)."""
    off = di * stride_s
    if PACK_GQA:
        off += g * stride_h
    return off


@triton.jit
def _seq_bounds(b, cu_q, cu_k, seqlens_k, q_len, kv_len,
                VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, PAGED: tl.constexpr):
    """(q_start, seqlen_q, k_start, seqlen_k) of sequence b.

    ``q_len``/``kv_len``: dense Sq/Sk; varlen the packed totals Tq/Tk; paged the table capacity
    max_blocks * block_size. Values read from index tensors are clamped to those extents, so a bad
    cu_seqlens / seqlens_k can give a wrong answer (caught under GPTKERNELS_DEBUG=1) but never an
    out-of-bounds access.
    """
    zero = b * 0
    if VARLEN_Q:
        q_start = tl.minimum(tl.maximum(tl.load(cu_q + b), 0), q_len)
        q_end = tl.minimum(tl.maximum(tl.load(cu_q + b + 1), q_start), q_len)
        seqlen_q = q_end - q_start
    else:
        q_start = zero
        seqlen_q = zero + q_len
    if PAGED:
        k_start = zero
        seqlen_k = tl.minimum(tl.maximum(tl.load(seqlens_k + b), 0), kv_len)
    elif VARLEN_K:
        k_start = tl.minimum(tl.maximum(tl.load(cu_k + b), 0), kv_len)
        k_end = tl.minimum(tl.maximum(tl.load(cu_k + b + 1), k_start), kv_len)
        seqlen_k = k_end - k_start
    else:
        k_start = zero
        seqlen_k = zero + kv_len
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def _q_tile_band(m0, seqlen_q, seqlen_k, shift, window, right, CAUSAL: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Key tiles that query tile [m0, m0 + BLOCK_M) must visit: (lo, int_lo, int_hi, hi).

    [lo, hi) holds every visible key; [int_lo, int_hi) (BLOCK_N-aligned) the tiles in which every
    valid query row sees every key, which need no mask. Query row i sits at p = i + shift.
    """
    return _pos_band(m0 + shift, tl.minimum(m0 + BLOCK_M, seqlen_q) - 1 + shift, seqlen_k, window,
                     right, CAUSAL, HAS_WINDOW, HAS_RIGHT, BLOCK_N)


@triton.jit
def _pos_band(p_lo, p_hi, seqlen_k, window, right, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr):
    """_q_tile_band of the query rows at positions p_lo..p_hi (a packed GQA tile's rows are the
    positions of several heads). Row p sees keys p - window < j <= p + right: the band ends after
    the last row's p_hi + right, its interior after the first row's p_lo + right; it starts at the
    first row's p_lo - window + 1, its interior at the last row's p_hi - window + 1."""
    zero = p_lo * 0
    if CAUSAL:
        hi = tl.minimum(tl.maximum(p_hi + 1, 0), seqlen_k)
        int_hi = (tl.minimum(tl.maximum(p_lo + 1, 0), seqlen_k) // BLOCK_N) * BLOCK_N
    elif HAS_RIGHT:
        hi = tl.minimum(tl.maximum(p_hi + right + 1, 0), seqlen_k)
        int_hi = (tl.minimum(tl.maximum(p_lo + right + 1, 0), seqlen_k) // BLOCK_N) * BLOCK_N
    else:
        hi = zero + seqlen_k
        int_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if HAS_WINDOW:
        lo = (tl.minimum(tl.maximum(p_lo - window + 1, 0), seqlen_k) // BLOCK_N) * BLOCK_N
        int_lo = ((tl.maximum(p_hi - window + 1, lo) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    else:
        lo = zero
        int_lo = zero
    # A band narrower than a tile has no interior: everything goes through the masked loop.
    empty = int_hi < int_lo
    int_lo = tl.where(empty, lo, int_lo)
    int_hi = tl.where(empty, lo, int_hi)
    return lo, int_lo, int_hi, hi


@triton.jit
def _k_tile_band(n0, seqlen_q, seqlen_k, shift, window, right, CAUSAL: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Query tiles that see key tile [n0, n0 + BLOCK_N): (lo, int_lo, int_hi, hi), as above."""
    zero = n0 * 0
    n_last = tl.minimum(n0 + BLOCK_N, seqlen_k) - 1
    q_ceil = ((seqlen_q + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    # row i sees key j iff j <= i + shift + right: rows from n0 - right - shift on see part of the
    # tile, rows from n_last - right - shift on see all of it (causal: right = 0).
    if CAUSAL:
        lo = (tl.minimum(tl.maximum(n0 - shift, 0), seqlen_q) // BLOCK_M) * BLOCK_M
        int_lo = ((tl.minimum(tl.maximum(n_last - shift, lo), seqlen_q) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    elif HAS_RIGHT:
        lo = (tl.minimum(tl.maximum(n0 - right - shift, 0), seqlen_q) // BLOCK_M) * BLOCK_M
        int_lo = ((tl.minimum(tl.maximum(n_last - right - shift, lo), seqlen_q) + BLOCK_M - 1)
                  // BLOCK_M) * BLOCK_M
    else:
        lo = zero
        int_lo = zero
    if HAS_WINDOW:
        # ... and j > i + shift - W: rows before n_last + W - shift see part of the tile, tiles
        # ending at or before n0 + W - shift see all of it.
        hi = tl.minimum(tl.maximum(n_last + window - shift, 0), seqlen_q)
        int_hi = tl.minimum((tl.maximum(n0 + window - shift, 0) // BLOCK_M) * BLOCK_M, q_ceil)
    else:
        hi = zero + seqlen_q
        int_hi = zero + q_ceil
    empty = int_hi < int_lo
    int_lo = tl.where(empty, lo, int_lo)
    int_hi = tl.where(empty, lo, int_hi)
    return lo, int_lo, int_hi, hi


@triton.jit
def _kv_rows(start_n, offs_n, seqlen_k, b, block_table, stride_tb, num_blocks,
             stride_kb, stride_ks, stride_vb, stride_vs,
             PAGED: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, ROW64: tl.constexpr):
    """Where key tile [start_n, start_n + BLOCK_N) lies in K and V, and which rows are real keys.

    Returns (k_base, k_rows, v_base, v_rows, ok): a scalar int64 offset plus per-row offsets (int32
    where they are small), relative to the per-head pointers. Dense/varlen: rows of the sequence.
    Paged: through the block table; a table entry outside [0, num_blocks) marks its keys invalid
    (never loaded, never attended).
    """
    cols = start_n + offs_n
    ok = cols < seqlen_k
    if PAGED:
        row = block_table + b.to(tl.int64) * stride_tb
        if PAGE >= BLOCK_N:
            # PAGE and BLOCK_N are powers of two: the whole tile lies in one cache block.
            blk = tl.load(row + start_n // PAGE)
            valid = (blk >= 0) & (blk < num_blocks)
            # where, not `ok & valid`: Triton 3.9's interpreter rejects a block & scalar bool mask
            ok = tl.where(valid, ok, False)
            blk = tl.where(valid, blk, 0).to(tl.int64)
            in_blk = (start_n % PAGE).to(tl.int64)
            k_base = blk * stride_kb + in_blk * stride_ks
            v_base = blk * stride_vb + in_blk * stride_vs
            k_rows = _rows(offs_n, ROW64) * stride_ks
            v_rows = _rows(offs_n, ROW64) * stride_vs
        else:
            # A tile spans several blocks: one table entry per key row.
            blk = tl.load(row + cols // PAGE, mask=ok, other=-1)
            ok = ok & (blk >= 0) & (blk < num_blocks)
            blk = tl.where(ok, blk, 0).to(tl.int64)
            in_blk = _rows(cols % PAGE, ROW64)
            k_base = start_n.to(tl.int64) * 0  # the row offsets carry everything
            v_base = k_base
            k_rows = blk * stride_kb + in_blk * stride_ks
            v_rows = blk * stride_vb + in_blk * stride_vs
    else:
        k_base = start_n.to(tl.int64) * stride_ks
        v_base = start_n.to(tl.int64) * stride_vs
        k_rows = _rows(offs_n, ROW64) * stride_ks
        v_rows = _rows(offs_n, ROW64) * stride_vs
    return k_base, k_rows, v_base, v_rows, ok


# --------------------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------------------

#: GPU configs (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel, per (float32?, BLOCK_D bucket).
#: Chosen from an offline sm_90a compile (ptxas -v, see notes/attention.md): configs that spill
#: registers or exceed 227 KiB of shared memory are left out (dK/dV at D = 256 has no spill-free
#: config: the least bad two are kept). float32 runs IEEE dots (no tensor cores, spills anyway): a
#: parity path, given small tiles only. BLOCK_M is the query tile, BLOCK_N the key tile; the first
#: row of each list is the one taken with GPTKERNELS_AUTOTUNE=0.
_FWD_TABLE = {
    (False, 64): [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 4), (64, 64, 4, 3),
                  (64, 32, 4, 2)],
    (False, 128): [(128, 128, 8, 2), (128, 64, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 2)],
    (False, 256): [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2)],
    (True, 64): [(32, 32, 4, 2)],
    (True, 128): [(32, 16, 4, 2)],
    (True, 256): [(16, 16, 4, 1)],
}
#: dK/dV: 128 query rows x 64 keys with 8 warps (two warpgroups), so that every product is at least
#: 64 on each side at D = 64/128 (wgmma) and dK, dV (2 x 64 x D float32) fit in registers without
#: spills; 128 keys spill at D = 128. D = 256: 32 keys (the only spill-free shape; products of 32).
_DKDV_TABLE = {
    (False, 64): [(128, 64, 8, 2), (128, 64, 8, 3)],
    (False, 128): [(128, 64, 8, 2)],
    (False, 256): [(128, 32, 8, 2)],
    (True, 64): [(32, 32, 4, 1)],
    (True, 128): [(16, 32, 4, 1)],
    (True, 256): [(16, 16, 8, 1)],
}
#: The forward when every sequence has at most 16 query rows (decode, speculative chunks): a 16-row
#: query tile, so the tensor cores do not multiply 112 padding rows per key (that would make a
#: memory-bound step compute-bound). mma.sync, pipelined, no spills in the offline compile (D = 256:
#: the 64-wide key tile; 128 spills).
_FWD_DECODE_TABLE = {
    (False, 64): [(16, 128, 4, 3), (16, 64, 4, 3)],
    (False, 128): [(16, 64, 4, 3), (16, 128, 4, 3)],
    (False, 256): [(16, 64, 4, 3), (16, 32, 4, 2)],
    (True, 64): [(16, 32, 4, 2)],
    (True, 128): [(16, 32, 4, 2)],
    (True, 256): [(16, 16, 4, 1)],
}
#: The dK/dV kernel with atomic dQ (``deterministic=False``): its dS K tile (BLOCK_M x D float32)
#: adds registers: with pipelined query loads (2 stages, the choice without autotuning) ptxas spills
#: one or two registers (4-8 bytes, outside the tile loop or in its masked branch); unpipelined
#: (1 stage) nothing (notes/attention.md).
_DKDV_ATOMIC_TABLE = {
    (False, 64): [(128, 64, 8, 2), (128, 64, 8, 1)],
    (False, 128): [(128, 64, 8, 2), (128, 64, 8, 1)],
    (False, 256): [(64, 32, 8, 1)],
    (True, 64): [(16, 32, 4, 1)],
    (True, 128): [(16, 16, 8, 1)],
    (True, 256): [(16, 16, 8, 1)],
}
_DQ_TABLE = {
    (False, 64): [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
    (False, 128): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (64, 16, 4, 2)],
    (False, 256): [(64, 32, 8, 2), (64, 16, 8, 2), (128, 32, 8, 2)],
    (True, 64): [(32, 32, 4, 2)],
    (True, 128): [(32, 16, 4, 2)],
    (True, 256): [(16, 16, 4, 1)],
}
#: The interpreter: one config per kernel. Its cost is per operation, not per element, so fairly
#: large tiles run fastest, yet ~100-token test sequences still cross several tiles (interior and
#: boundary paths), and BLOCK_M != BLOCK_N exercises the band arithmetic.
_FWD_INTERP = (64, 32, 4, 1)
_DKDV_INTERP = (32, 64, 4, 1)
_DQ_INTERP = (64, 32, 4, 1)


def _config(row) -> triton.Config:
    block_m, block_n, warps, stages = row
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def _autotune_configs(tables, interp) -> list[triton.Config]:
    rows = list(dict.fromkeys(row for t in tables for rows in t.values() for row in rows))  # union, in order
    return configs([_config(r) for r in rows], _config(interp))


#: ``GPTKERNELS_AUTOTUNE=0``: no benchmarking, the first config listed for the call's bucket. For
#: test suites and quick runs (each autotune key otherwise compiles and times every candidate);
#: read at each new autotune key, so set it before the first call of a process.
ENV_AUTOTUNE = "GPTKERNELS_AUTOTUNE"


def _fit_rows(rows, seq_bucket, band_bucket, pack, window):
    """The rows of a config list that suit the launch's shape (all of them if none does).

    * A packed GQA launch (``pack``): query tiles of at least ``seq_bucket`` rows (its query heads x
      query rows, up to 128), the shortest such: every query row of a KV head in one tile, so K/V
      are read once per group, with the least padding.
    * A window of ``band_bucket`` keys (``window``): tiles no longer than a quarter of it on either
      side (64 at least): a query tile's band spans W + BLOCK_M - 1 keys, rounded out to key tiles,
      so the tile FLOPs stay within (W + max(BLOCK_M, BLOCK_N)) / W <= 1.25x the useful ones.
    """
    if pack:
        fit = [r for r in rows if r[0] >= min(seq_bucket, 128)]
        fit = [r for r in fit if r[0] == min((f[0] for f in fit), default=0)]
        # 64-key tiles first: with 128 packed rows the 128-key tile spills (offline compile)
        fit = sorted(fit, key=lambda r: r[1] != 64)
    elif window:
        fit = [r for r in rows if max(r[0], r[1]) <= max(band_bucket // 4, 64)]
    else:
        fit = rows
    return fit or rows


def _pick(table, atomic_table=None, decode_table=None, shaped=False):
    """early_config_prune: keep the configs listed for this call's dtype and head-dim bucket (from
    ``atomic_table`` when the launch has ATOMIC_DQ=True, from ``decode_table`` when no program has
    more than 16 query rows), in the table's order; ``shaped``: those that suit a packed GQA or
    windowed launch (:func:`_fit_rows`)."""

    def prune(cfgs, named_args, **kwargs):
        if len(cfgs) == 1:
            return cfgs
        # v's head dim when it differs (BLOCK_DV, else 0): the bucket of the wider one, so that the
        # tiles' registers and shared memory stay within what the table was compiled for
        block_d = max(kwargs.get("BLOCK_D", named_args.get("BLOCK_D")),
                      kwargs.get("BLOCK_DV", named_args.get("BLOCK_DV", 0)))
        tbl = table
        if atomic_table is not None and kwargs.get("ATOMIC_DQ"):
            tbl = atomic_table
        elif decode_table is not None and named_args["seq_bucket"] <= 16:
            tbl = decode_table
        rows = tbl[(named_args["Q"].dtype == torch.float32, min(max(block_d, 64), 256))]
        if shaped:
            rows = _fit_rows(rows, named_args["seq_bucket"], named_args["band_bucket"],
                             kwargs.get("PACK_GQA", False), kwargs.get("HAS_WINDOW", False))
        if kwargs.get("DROPOUT"):
            # the Philox state needs registers: 64-key tiles first (128 keys spill ~500 bytes in
            # the sm_90a forward, 64 none), and the atomic-dQ kernel unpipelined (notes/attention.md)
            rows = sorted(rows, key=lambda r: (r[1] > 64, tbl is atomic_table and r[3] > 1))
        if os.environ.get(ENV_AUTOTUNE, "1") == "0":
            rows = rows[:1]
        by_row = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c for c in cfgs}
        return [by_row[r] for r in rows if r in by_row]

    return prune


#: Autotune key (the autotuner adds the tensors' dtypes): the compile-time shape of the problem plus
#: power-of-two buckets of the longest query sequence and of the band width (keys a row sees), which
#: decide the tile shape that fills the GPU and wastes least on boundary tiles.
_TUNE_KEY = ["HEAD_DIM", "CAUSAL", "HAS_WINDOW", "PAGED", "VARLEN_Q", "seq_bucket", "band_bucket",
             "SOFTCAP", "ALIBI", "HAS_RIGHT", "HEAD_DIM_V", "DROPOUT"]


def _autotune(table, interp, extra_key=(), reset_to_zero=None, atomic_table=None, decode_table=None,
              shaped=False):
    tables = [t for t in (table, atomic_table, decode_table) if t is not None]
    return autotune(configs=_autotune_configs(tables, interp), key=_TUNE_KEY + list(extra_key),
                    prune_configs_by={"early_config_prune": _pick(table, atomic_table, decode_table,
                                                                  shaped)},
                    reset_to_zero=reset_to_zero)


#: Integer arguments whose values vary from call to call: not specialised (Triton would otherwise
#: compile a variant per "== 1" / "divisible by 16" class of each). Strides stay specialised: a unit
#: last-dim stride and 16-divisible row strides are what make the loads vectorised and pipelined.
_VARYING = ["q_len", "kv_len", "group", "window", "window_right", "row0", "num_blocks", "stride_tb",
            "num_splits"]
#: ... and the dropout seed and offset (drawn per call)
_RNG_ARGS = ["seed", "rng_offset"]


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, K_head, V_head, start, end, pos_q, seqlen_k, window, right, qk_scale,
               b, block_table, stride_tb, num_blocks,
               stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
               offs_n, offs_d, offs_dv, slope2, softcap_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               PAGED: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
               HEAD_DIM_V: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, ROW64: tl.constexpr,
               SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, HAS_RIGHT: tl.constexpr,
               seed, rng_seq, rng_h, rng_rows, q_len, kv_len, dropout_p, DROPOUT: tl.constexpr):
    # K tiles are HEAD_DIM (q's) wide, V tiles HEAD_DIM_V (v's; the same when equal)
    # DROPOUT: l (and so lse) sums the undropped P; the output takes the kept P (the 1 / (1 - p)
    # scale is applied once, to the output)
    d_ok = offs_d[None, :] < HEAD_DIM
    dv_ok = offs_dv[None, :] < HEAD_DIM_V
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k_base, k_rows, v_base, v_rows, ok = _kv_rows(start_n, offs_n, seqlen_k, b, block_table,
                                                      stride_tb, num_blocks, stride_kb, stride_ks,
                                                      stride_vb, stride_vs, PAGED, PAGE, BLOCK_N,
                                                      ROW64)
        if MASKED or PAGED:
            kv_mask = ok[:, None] & d_ok
            v_mask = ok[:, None] & dv_ok
        else:
            kv_mask = d_ok  # interior tile: every key row exists
            v_mask = dv_ok
        # .to(q.dtype): an fp8 paged cache's values in q's dtype, exactly (a no-op otherwise; its
        # scales are folded into qk_scale and the output by _fwd_kernel)
        k = tl.load(K_head + k_base + k_rows[:, None] + offs_d[None, :] * stride_kd, mask=kv_mask,
                    other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s, _cap = _score_mods(s, pos_q[:, None], (start_n + offs_n)[None, :], slope2, softcap_scale,
                              SOFTCAP, ALIBI)
        if MASKED:
            vis = _visible(pos_q[:, None], (start_n + offs_n)[None, :], seqlen_k, window, right,
                           CAUSAL, HAS_WINDOW, HAS_RIGHT)
            if PAGED:
                vis = vis & ok[None, :]
            s = tl.where(vis, s, float("-inf"))
        elif PAGED:
            s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or PAGED:
            # A row that has seen no key yet has m = -inf: subtract 0 instead (its p are all 0).
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, rng_seq, rng_h, rng_rows, start_n, q_len, kv_len,
                                       dropout_p, BLOCK_N), p, 0.0)
        v = tl.load(V_head + v_base + v_rows[:, None] + offs_dv[None, :] * stride_vd, mask=v_mask,
                    other=0.0).to(q.dtype)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@_autotune(_FWD_TABLE, _FWD_INTERP, extra_key=["SPLIT", "PACK_GQA"], decode_table=_FWD_DECODE_TABLE,
           shaped=True)
@triton.jit(do_not_specialize=_VARYING + _RNG_ARGS)
def _fwd_kernel(
    Q, K, V, Out, Lse,
    cu_q, cu_k, seqlens_k, block_table,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    stride_tb, num_blocks,
    Opart, Lpart, stride_pb, stride_ps, stride_ph, stride_pp, stride_lpb, stride_lps, stride_lph,
    num_splits,
    K_scale, V_scale, stride_kscale_h, stride_vscale_h,
    Slopes, stride_slb, stride_slh, softcap_scale,
    q_len, kv_len, group, qk_scale, window, window_right, seq_bucket, band_bucket, row0,
    seed, rng_offset, dropout_p,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_SCALED: tl.constexpr = False,
    ROW64: tl.constexpr = False, TAIL: tl.constexpr = False, PACK_GQA: tl.constexpr = False,
    SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False, HAS_RIGHT: tl.constexpr = False,
    HEAD_DIM_V: tl.constexpr = 0, BLOCK_DV: tl.constexpr = 0, DROPOUT: tl.constexpr = False,
):
    # PACK_GQA (few query rows, GQA): one program per KV head (grid axis 1) whose query tile holds
    # the rows of every query head of the group, row r = query i * group + head g: each K/V tile is
    # loaded once per group instead of once per query head (as the paged decode does).
    # Causal: the last query tiles have the most keys; launch them first to shorten the tail.
    # SPLIT (flash-decoding, few query tiles): num_splits programs per query tile, each over an
    # equal share of the tile's key band, write a partial (out, lse) that merge_splits combines.
    # TAIL: the launch after the main one that covers rows past max_seqlen_q (see _tile_loop).
    # HEAD_DIM_V / BLOCK_DV: v's (and out's) head dim and its tile when it differs from q's; 0 (the
    # default): the same as HEAD_DIM / BLOCK_D, so that path compiles exactly as without them.
    V_DIM: tl.constexpr = HEAD_DIM if HEAD_DIM_V == 0 else HEAD_DIM_V
    V_BLOCK: tl.constexpr = BLOCK_D if BLOCK_DV == 0 else BLOCK_DV
    if SPLIT:
        split = tl.program_id(0) % num_splits
        pid_m = tl.num_programs(0) // num_splits - 1 - tl.program_id(0) // num_splits
    elif TAIL:
        split = 0
        pid_m = tl.program_id(0)
    else:
        split = 0
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(b, cu_q, cu_k, seqlens_k, q_len, kv_len,
                                                       VARLEN_Q, VARLEN_K, PAGED)
    if BOTTOM_RIGHT:
        shift = seqlen_k - seqlen_q
    else:
        shift = seqlen_k * 0
    # h: the (first) query head of the program; int64: h * stride_h passes 2**31 for large strides
    if PACK_GQA:
        hk = tl.program_id(1).to(tl.int64)
        h = hk * group
        n_rows = seqlen_q * group  # rows are (query, head) pairs
    else:
        h = tl.program_id(1).to(tl.int64)
        hk = h // group
        n_rows = seqlen_q
    v_scale = 1.0
    if KV_SCALED:  # fp8 paged cache: its KV head's K scale folds into the scores, V's into the output
        qk_scale = qk_scale * tl.load(K_scale + hk * stride_kscale_h)
        v_scale = tl.load(V_scale + hk * stride_vscale_h)
    b64 = b.to(tl.int64)
    if DROPOUT:  # kept P is scaled by 1 / (1 - p): once, on the output
        v_scale = v_scale / (1.0 - dropout_p)
        if PACK_GQA:
            rng_seq = _rng_seq(rng_offset, b64, tl.num_programs(1) * group, q_start, q_len, kv_len,
                               VARLEN_Q)
        else:
            rng_seq = _rng_seq(rng_offset, b64, tl.num_programs(1), q_start, q_len, kv_len, VARLEN_Q)
    else:
        rng_seq = b64  # unused
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, V_BLOCK)
    dv_ok = offs_dv < V_DIM
    if PAGED:
        K_head = K + hk * stride_kh
        V_head = V + hk * stride_vh
    else:
        k_tok = k_start.to(tl.int64)
        K_head = K + b64 * stride_kb + k_tok * stride_ks + hk * stride_kh
        V_head = V + b64 * stride_vb + k_tok * stride_vs + hk * stride_vh

    m_first, m_step, m_count = _tile_loop(pid_m, row0, n_rows, BLOCK_M, TAIL)
    for it in range(0, m_count):
        m0 = m_first + it * m_step
        rows = m0 + offs_m  # tile rows: queries, or (query, head) pairs with PACK_GQA
        row_ok = rows < n_rows
        if PACK_GQA:
            i0 = m0 // group  # the tile's first query
            qi = rows // group  # each row's query (at position qi + shift) and head h + g
            di = _rows(qi - i0, ROW64)
            g = _rows(rows - qi * group, ROW64)
        else:
            i0 = m0
            qi = rows
            di = _rows(offs_m, ROW64)
            g = di  # unused (_row_off ignores it)
        q_tok = (q_start + i0).to(tl.int64)
        Q_tile = Q + b64 * stride_qb + q_tok * stride_qs + h * stride_qh
        q = tl.load(Q_tile + _row_off(di, g, stride_qs, stride_qh, PACK_GQA)[:, None]
                    + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if ALIBI:  # each row's own head's slope (packed rows: head h + g), in log2 units
            if PACK_GQA:
                heads = h + g
            else:
                heads = h + offs_m * 0
            slope2 = (tl.load(Slopes + b64 * stride_slb + heads * stride_slh, mask=row_ok,
                              other=0.0) * _LOG2E_C)[:, None]
        else:
            slope2 = m0  # unused
        if DROPOUT and PACK_GQA:  # a packed row's own head
            rng_h = h + g
        else:
            rng_h = h

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, V_BLOCK], tl.float32)
        pos_q = qi + shift
        # the band of the tile's positions: its first query's to its last row's
        p_last = tl.minimum(m0 + BLOCK_M, n_rows) - 1
        if PACK_GQA:
            p_last = p_last // group
        lo, int_lo, int_hi, hi = _pos_band(i0 + shift, p_last + shift, seqlen_k, window, window_right,
                                           CAUSAL, HAS_WINDOW, HAS_RIGHT, BLOCK_N)
        if SPLIT:
            # This split's whole tiles of the band [lo, hi), intersected with the three loops'
            # ranges (lo and every share are BLOCK_N-aligned, so the loops' tile alignment holds).
            share = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N), num_splits) * BLOCK_N
            s_lo = lo + split * share
            s_hi = tl.minimum(s_lo + share, hi)
            lo1, hi1 = tl.maximum(lo, s_lo), tl.minimum(int_lo, s_hi)
            lo2, hi2 = tl.maximum(int_lo, s_lo), tl.minimum(int_hi, s_hi)
            lo3, hi3 = tl.maximum(int_hi, s_lo), tl.minimum(hi, s_hi)
        else:
            lo1, hi1, lo2, hi2, lo3, hi3 = lo, int_lo, int_lo, int_hi, int_hi, hi
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K_head, V_head, lo1, hi1, pos_q, seqlen_k,
                                   window, window_right, qk_scale, b, block_table, stride_tb, num_blocks,
                                   stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                                   offs_n, offs_d, offs_dv, slope2, softcap_scale, True, CAUSAL,
                                   HAS_WINDOW, PAGED, PAGE, HEAD_DIM, V_DIM, BLOCK_N, PRECISION, ROW64,
                                   SOFTCAP, ALIBI, HAS_RIGHT, seed, rng_seq, rng_h, qi, q_len, kv_len,
                                   dropout_p, DROPOUT)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K_head, V_head, lo2, hi2, pos_q, seqlen_k,
                                   window, window_right, qk_scale, b, block_table, stride_tb, num_blocks,
                                   stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                                   offs_n, offs_d, offs_dv, slope2, softcap_scale, False, CAUSAL,
                                   HAS_WINDOW, PAGED, PAGE, HEAD_DIM, V_DIM, BLOCK_N, PRECISION, ROW64,
                                   SOFTCAP, ALIBI, HAS_RIGHT, seed, rng_seq, rng_h, qi, q_len, kv_len,
                                   dropout_p, DROPOUT)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K_head, V_head, lo3, hi3, pos_q, seqlen_k,
                                   window, window_right, qk_scale, b, block_table, stride_tb, num_blocks,
                                   stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                                   offs_n, offs_d, offs_dv, slope2, softcap_scale, True, CAUSAL,
                                   HAS_WINDOW, PAGED, PAGE, HEAD_DIM, V_DIM, BLOCK_N, PRECISION, ROW64,
                                   SOFTCAP, ALIBI, HAS_RIGHT, seed, rng_seq, rng_h, qi, q_len, kv_len,
                                   dropout_p, DROPOUT)

        # Rows that saw no key: l = 0, acc = 0 -> out 0 and lse -inf.
        seen = l_i > 0.0
        l_safe = tl.where(seen, l_i, 1.0)
        out = acc * (v_scale / l_safe)[:, None]
        lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) / _LOG2E_C, float("-inf"))

        tile_mask = row_ok[:, None] & dv_ok[None, :]
        if SPLIT:  # float32 partials, laid out (B, Sq, Hq, splits, Dv) / (B, Sq, Hq, splits)
            P_tile = Opart + b64 * stride_pb + q_tok * stride_ps + h * stride_ph + split * stride_pp
            tl.store(P_tile + _row_off(di, g, stride_ps, stride_ph, PACK_GQA)[:, None]
                     + offs_dv[None, :], out, mask=tile_mask)
            LP_tile = Lpart + b64 * stride_lpb + q_tok * stride_lps + h * stride_lph + split
            tl.store(LP_tile + _row_off(di, g, stride_lps, stride_lph, PACK_GQA), lse, mask=row_ok)
        else:
            O_tile = Out + b64 * stride_ob + q_tok * stride_os + h * stride_oh
            tl.store(O_tile + _row_off(di, g, stride_os, stride_oh, PACK_GQA)[:, None] + offs_dv[None, :],
                     out.to(Out.dtype.element_ty), mask=tile_mask)
            L_tile = Lse + b64 * stride_lb + h * stride_lh + q_start + i0
            tl.store(L_tile + _row_off(di, g, 1, stride_lh, PACK_GQA), lse, mask=row_ok)


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["row0"])
def _bwd_preprocess(
    Out, DO, DLse, Delta, cu_q,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_lb, stride_lh,
    q_len, row0,
    HAS_DLSE: tl.constexpr, VARLEN_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    ROW64: tl.constexpr = False, TAIL: tl.constexpr = False,
):
    """delta = rowsum(dO * O) - dlse, laid out like lse (DLse is contiguous like lse)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # int64: h * stride_h passes 2**31 for large strided inputs
    b = tl.program_id(2)
    q_start, seqlen_q, _k0, _k1 = _seq_bounds(b, cu_q, cu_q, cu_q, q_len, 0, VARLEN_Q, False, False)
    b64 = b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    row_ix = _rows(offs_m, ROW64)
    offs_d = tl.arange(0, BLOCK_D)
    m_first, m_step, m_count = _tile_loop(pid_m, row0, seqlen_q, BLOCK_M, TAIL)
    for it in range(0, m_count):
        m0 = m_first + it * m_step
        row_ok = (m0 + offs_m) < seqlen_q
        mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        tok = (q_start + m0).to(tl.int64)
        o = tl.load(Out + b64 * stride_ob + tok * stride_os + h * stride_oh
                    + row_ix[:, None] * stride_os + offs_d[None, :], mask=mask, other=0.0)
        do = tl.load(DO + b64 * stride_dob + tok * stride_dos + h * stride_doh
                     + row_ix[:, None] * stride_dos + offs_d[None, :] * stride_dod, mask=mask,
                     other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        l_off = b64 * stride_lb + h * stride_lh + q_start + m0 + offs_m
        if HAS_DLSE:
            delta -= tl.load(DLse + l_off, mask=row_ok, other=0.0)
        tl.store(Delta + l_off, delta, mask=row_ok)


@triton.jit
def _load_row_stats(L_rows, D_rows, rows, seqlen_q):
    """lse in base 2 and delta of query rows. A row that saw no key (lse = -inf) and a row past the
    sequence get lse = +inf, so that their P = exp2(s - lse) is exactly 0."""
    row_ok = rows < seqlen_q
    lse = tl.load(L_rows + rows, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E_C)
    delta = tl.load(D_rows + rows, mask=row_ok, other=0.0)
    return lse2, delta


@triton.jit
def _dkdv_tiles(dk, dv, k, v, Q_b, DO_b, DQ_b, L_b, D_b, lo, int_lo, int_hi, hi, group, hk,
                seqlen_q, seqlen_k, cols, shift, window, right, qk_scale,
                stride_qs, stride_qh, stride_qd, stride_dos, stride_doh, stride_dod,
                stride_dqs, stride_dqh, stride_lh, offs_m, offs_d, offs_dv, Slopes_b, stride_slh,
                softcap_scale, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HEAD_DIM: tl.constexpr,
                HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
                ATOMIC_DQ: tl.constexpr,
                ROW64: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
                HAS_RIGHT: tl.constexpr, seed, rng_seq, q_len, kv_len, dropout_p, n0,
                DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dK, dV of one key tile over the query tiles [lo, hi) of every query head of its
    GQA group: one loop over (head, query tile) pairs (a nested head loop costs ~25 registers in the
    sm_90a compile, which the 128 x 64 tiles do not have), masked only outside [int_lo, int_hi).

    Scores in query-major layout (BLOCK_M queries x BLOCK_N keys), so the softmax statistics are per
    row; P and dS go to the tensor cores transposed (dV += P^T dO, dK += dS^T Q: Triton stages them
    through shared memory). Query rows past the sequence have P = 0 (lse = +inf) and add nothing;
    key rows past the sequence are never stored. With ATOMIC_DQ this key tile's share of dQ (dS K,
    unscaled) is added to the float32 accumulator with atomics: 5 tile products per pair instead of
    7, but the summation order (and so the last bits of dQ) varies from run to run.

    Soft cap / ALiBi (``_score_mods``): the scores are recomputed as in the forward; the cap's
    chain rule scales dS by 1 - tanh^2 (ALiBi adds a constant: nothing to differentiate).
    dO (like V, dV) is HEAD_DIM_V wide, Q (like K, dK, dQ) HEAD_DIM wide.

    Dropout (``DROPOUT``, keep mask Z regenerated by :func:`_dropout_keep`, r = 1 / (1 - p)):
    dV += (P Z r)^T dO, dP = (dO V^T) Z r, dS = P (dP - delta) (delta from the dropped output).
    """
    d_ok = offs_d[None, :] < HEAD_DIM
    dv_ok = offs_dv[None, :] < HEAD_DIM_V
    n_tiles = tl.cdiv(hi - lo, BLOCK_M)
    for it in range(0, group * n_tiles):
        g = it // n_tiles
        start_m = tl.multiple_of(lo + (it - g * n_tiles) * BLOCK_M, BLOCK_M)
        h = hk * group + g
        rows = start_m + offs_m
        mask = (rows < seqlen_q)[:, None] & d_ok
        # row offsets computed from the loop's rows each time (not hoisted tile offsets): fewer
        # registers live across the loop
        row_ix = _rows(rows, ROW64)
        q = tl.load(Q_b + h * stride_qh + row_ix[:, None] * stride_qs
                    + offs_d[None, :] * stride_qd, mask=mask, other=0.0)
        do = tl.load(DO_b + h * stride_doh + row_ix[:, None] * stride_dos
                     + offs_dv[None, :] * stride_dod, mask=(rows < seqlen_q)[:, None] & dv_ok,
                     other=0.0)
        lse2, delta = _load_row_stats(L_b + h * stride_lh, D_b + h * stride_lh, rows, seqlen_q)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if ALIBI:
            slope2 = tl.load(Slopes_b + h * stride_slh) * _LOG2E_C
        else:
            slope2 = qk_scale  # unused
        s, cap = _score_mods(s, rows[:, None] + shift, cols[None, :], slope2, softcap_scale, SOFTCAP,
                             ALIBI)
        p = tl.math.exp2(s - lse2[:, None])
        if (start_m < int_lo) | (start_m >= int_hi):
            p = tl.where(_visible(rows[:, None] + shift, cols[None, :], seqlen_k, window, right,
                                  CAUSAL, HAS_WINDOW, HAS_RIGHT), p, 0.0)
        elif ATOMIC_DQ:
            # Key rows past the sequence (the last key tile's padding) must add nothing to dQ: their
            # zero keys score 0, p = exp2(0 - lse) overflows when lse is very negative, and
            # inf x 0 in dS K would be NaN. (dK/dV rows past the sequence are never stored.)
            p = tl.where((cols < seqlen_k)[None, :], p, 0.0)
        p_v = p  # the P that multiplies V in the forward
        if DROPOUT:
            keep = _dropout_keep(seed, rng_seq, h, rows, n0, q_len, kv_len, dropout_p, BLOCK_N)
            p_v = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dv = tl.dot(tl.trans(p_v.to(do.dtype)), do, dv, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:  # d(softcap * tanh(x / softcap)) / dx
            ds = ds * (1.0 - cap * cap)
        ds = ds.to(q.dtype)
        dk = tl.dot(tl.trans(ds), q, dk, input_precision=PRECISION)
        if ATOMIC_DQ:
            tl.atomic_add(DQ_b + h * stride_dqh + row_ix[:, None] * stride_dqs + offs_d[None, :],
                          tl.dot(ds, k, input_precision=PRECISION), mask=mask, sem="relaxed")
    return dk, dv


# DQacc is zeroed between autotuning trials (each trial adds into it with ATOMIC_DQ).
@_autotune(_DKDV_TABLE, _DKDV_INTERP, extra_key=["ATOMIC_DQ"], reset_to_zero=["DQacc"],
           atomic_table=_DKDV_ATOMIC_TABLE)
@triton.jit(do_not_specialize=_VARYING[:6] + _RNG_ARGS)
def _bwd_dkdv(
    Q, K, V, DO, Lse, Delta, DK, DV, DQacc,
    cu_q, cu_k,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dkb, stride_dks, stride_dkh,
    stride_dqab, stride_dqas, stride_dqah,
    stride_lb, stride_lh,
    Slopes, stride_slb, stride_slh, softcap_scale,
    q_len, kv_len, group, qk_scale, sm_scale, window, window_right, seq_bucket, band_bucket, row0,
    seed, rng_offset, dropout_p,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    VARLEN_Q: tl.constexpr, PAGED: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROW64: tl.constexpr = False, TAIL: tl.constexpr = False,
    SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False, HAS_RIGHT: tl.constexpr = False,
    HEAD_DIM_V: tl.constexpr = 0, BLOCK_DV: tl.constexpr = 0, DROPOUT: tl.constexpr = False,
):
    # HEAD_DIM_V / BLOCK_DV: v's head dim (V, dO, dV) as in _fwd_kernel (0: HEAD_DIM / BLOCK_D)
    V_DIM: tl.constexpr = HEAD_DIM if HEAD_DIM_V == 0 else HEAD_DIM_V
    V_BLOCK: tl.constexpr = BLOCK_D if BLOCK_DV == 0 else BLOCK_DV
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)  # int64: hk * stride_kh passes 2**31 for large strided inputs
    b = tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(b, cu_q, cu_k, cu_k, q_len, kv_len,
                                                       VARLEN_Q, VARLEN_Q, False)
    if BOTTOM_RIGHT:
        shift = seqlen_k - seqlen_q
    else:
        shift = seqlen_k * 0
    b64 = b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, V_BLOCK)
    q_tok = q_start.to(tl.int64)
    k_tok = k_start.to(tl.int64)
    if DROPOUT:
        rng_seq = _rng_seq(rng_offset, b64, tl.num_programs(1) * group, q_start, q_len, kv_len,
                           VARLEN_Q)
    else:
        rng_seq = b64  # unused

    n_first, n_step, n_count = _tile_loop(pid_n, row0, seqlen_k, BLOCK_N, TAIL)
    for it in range(0, n_count):
        n0 = n_first + it * n_step
        cols = n0 + offs_n
        kv_mask = (cols < seqlen_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
        col_ix = _rows(cols, ROW64)
        k = tl.load(K + b64 * stride_kb + k_tok * stride_ks + hk * stride_kh
                    + col_ix[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask,
                    other=0.0)
        v = tl.load(V + b64 * stride_vb + k_tok * stride_vs + hk * stride_vh
                    + col_ix[:, None] * stride_vs + offs_dv[None, :] * stride_vd,
                    mask=(cols < seqlen_k)[:, None] & (offs_dv < V_DIM)[None, :], other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, V_BLOCK], tl.float32)
        lo, int_lo, int_hi, hi = _k_tile_band(n0, seqlen_q, seqlen_k, shift, window, window_right,
                                              CAUSAL, HAS_WINDOW, HAS_RIGHT, BLOCK_M, BLOCK_N)
        # GQA: the query heads of this KV head's group, summed on chip (no atomics, no repeat).
        dk, dv = _dkdv_tiles(dk, dv, k, v, Q + b64 * stride_qb + q_tok * stride_qs,
                             DO + b64 * stride_dob + q_tok * stride_dos,
                             DQacc + b64 * stride_dqab + q_tok * stride_dqas,
                             Lse + b64 * stride_lb + q_start, Delta + b64 * stride_lb + q_start,
                             lo, int_lo, int_hi, hi, group, hk, seqlen_q, seqlen_k, cols, shift,
                             window, window_right, qk_scale, stride_qs, stride_qh, stride_qd, stride_dos,
                             stride_doh, stride_dod, stride_dqas, stride_dqah, stride_lh, offs_m,
                             offs_d, offs_dv, Slopes + b64 * stride_slb, stride_slh, softcap_scale,
                             CAUSAL, HAS_WINDOW, HEAD_DIM, V_DIM, BLOCK_M, PRECISION, ATOMIC_DQ, ROW64,
                             SOFTCAP, ALIBI, HAS_RIGHT, seed, rng_seq, q_len, kv_len, dropout_p, n0,
                             DROPOUT, BLOCK_N)
        # the store's row offsets and mask are computed again here rather than kept live through
        # the loop above (registers)
        col_ix = _rows(n0 + offs_n, ROW64)
        out_ptrs = (b64 * stride_dkb + k_tok * stride_dks + hk * stride_dkh
                    + col_ix[:, None] * stride_dks + offs_d[None, :])
        st_mask = (n0 + offs_n < seqlen_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
        tl.store(DK + out_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=st_mask)
        # dK and dV are the launcher's, contiguous: dV is laid out like dK, V_DIM wide instead of
        # HEAD_DIM, so its strides are dK's / HEAD_DIM * V_DIM (no stride arguments of its own: three
        # more kernel arguments moved ptxas's register allocation of the atomic-dQ variant from 4 to
        # 88 bytes of spill in the sm_90a compile)
        if HEAD_DIM_V == 0:
            tl.store(DV + out_ptrs, dv.to(DV.dtype.element_ty), mask=st_mask)
        else:
            dv_ptrs = ((b64 * (stride_dkb // HEAD_DIM) + k_tok * (stride_dks // HEAD_DIM)
                        + hk * (stride_dkh // HEAD_DIM)) * V_DIM
                       + col_ix[:, None] * (stride_dks // HEAD_DIM * V_DIM) + offs_dv[None, :])
            tl.store(DV + dv_ptrs, dv.to(DV.dtype.element_ty),
                     mask=(n0 + offs_n < seqlen_k)[:, None] & (offs_dv < V_DIM)[None, :])


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, K_head, V_head, start, end, pos_q, seqlen_k, window, right,
              qk_scale,
              stride_ks, stride_kd, stride_vs, stride_vd, offs_n, offs_d, offs_dv, slope2, softcap_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr,
              ROW64: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr,
              HAS_RIGHT: tl.constexpr, seed, rng_seq, h, rows, q_len, kv_len, dropout_p,
              DROPOUT: tl.constexpr):
    """Accumulate dQ of one query tile over the key tiles [start, end) (soft cap / ALiBi / dropout
    as in _dkdv_tiles; V is HEAD_DIM_V wide)."""
    d_ok = offs_d[None, :] < HEAD_DIM
    dv_ok = offs_dv[None, :] < HEAD_DIM_V
    col_ix = _rows(offs_n, ROW64)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if MASKED:
            kv_mask = (cols < seqlen_k)[:, None] & d_ok
            v_mask = (cols < seqlen_k)[:, None] & dv_ok
        else:
            kv_mask = d_ok
            v_mask = dv_ok
        tok = start_n.to(tl.int64)
        k = tl.load(K_head + tok * stride_ks + col_ix[:, None] * stride_ks
                    + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(V_head + tok * stride_vs + col_ix[:, None] * stride_vs
                    + offs_dv[None, :] * stride_vd, mask=v_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s, cap = _score_mods(s, pos_q[:, None], cols[None, :], slope2, softcap_scale, SOFTCAP, ALIBI)
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            p = tl.where(_visible(pos_q[:, None], cols[None, :], seqlen_k, window, right, CAUSAL,
                                  HAS_WINDOW, HAS_RIGHT), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if DROPOUT:
            dp = tl.where(_dropout_keep(seed, rng_seq, h, rows, start_n, q_len, kv_len, dropout_p,
                                        BLOCK_N), dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - cap * cap)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@_autotune(_DQ_TABLE, _DQ_INTERP, shaped=True)
@triton.jit(do_not_specialize=_VARYING[:6] + _RNG_ARGS)
def _bwd_dq(
    Q, K, V, DO, Lse, Delta, DQ,
    cu_q, cu_k,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    Slopes, stride_slb, stride_slh, softcap_scale,
    q_len, kv_len, group, qk_scale, sm_scale, window, window_right, seq_bucket, band_bucket, row0,
    seed, rng_offset, dropout_p,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BOTTOM_RIGHT: tl.constexpr,
    VARLEN_Q: tl.constexpr, PAGED: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROW64: tl.constexpr = False, TAIL: tl.constexpr = False,
    SOFTCAP: tl.constexpr = False, ALIBI: tl.constexpr = False, HAS_RIGHT: tl.constexpr = False,
    HEAD_DIM_V: tl.constexpr = 0, BLOCK_DV: tl.constexpr = 0, DROPOUT: tl.constexpr = False,
):
    # HEAD_DIM_V / BLOCK_DV: v's head dim (V, dO) as in _fwd_kernel (0: HEAD_DIM / BLOCK_D)
    V_DIM: tl.constexpr = HEAD_DIM if HEAD_DIM_V == 0 else HEAD_DIM_V
    V_BLOCK: tl.constexpr = BLOCK_D if BLOCK_DV == 0 else BLOCK_DV
    if TAIL:
        pid_m = tl.program_id(0)
    else:
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # int64: h * stride_h passes 2**31 for large strided inputs
    b = tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k = _seq_bounds(b, cu_q, cu_k, cu_k, q_len, kv_len,
                                                       VARLEN_Q, VARLEN_Q, False)
    if BOTTOM_RIGHT:
        shift = seqlen_k - seqlen_q
    else:
        shift = seqlen_k * 0
    hk = h // group
    b64 = b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, V_BLOCK)
    row_ix = _rows(offs_m, ROW64)
    k_tok = k_start.to(tl.int64)
    K_head = K + b64 * stride_kb + k_tok * stride_ks + hk * stride_kh
    V_head = V + b64 * stride_vb + k_tok * stride_vs + hk * stride_vh
    L_rows = Lse + b64 * stride_lb + h * stride_lh + q_start
    D_rows = Delta + b64 * stride_lb + h * stride_lh + q_start
    if ALIBI:
        slope2 = tl.load(Slopes + b64 * stride_slb + h * stride_slh) * _LOG2E_C
    else:
        slope2 = qk_scale  # unused
    if DROPOUT:
        rng_seq = _rng_seq(rng_offset, b64, tl.num_programs(1), q_start, q_len, kv_len, VARLEN_Q)
    else:
        rng_seq = b64  # unused

    m_first, m_step, m_count = _tile_loop(pid_m, row0, seqlen_q, BLOCK_M, TAIL)
    for it in range(0, m_count):
        m0 = m_first + it * m_step
        rows = m0 + offs_m
        mask = (rows < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
        q_tok = (q_start + m0).to(tl.int64)
        q = tl.load(Q + b64 * stride_qb + q_tok * stride_qs + h * stride_qh
                    + row_ix[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=mask, other=0.0)
        do = tl.load(DO + b64 * stride_dob + q_tok * stride_dos + h * stride_doh
                     + row_ix[:, None] * stride_dos + offs_dv[None, :] * stride_dod,
                     mask=(rows < seqlen_q)[:, None] & (offs_dv < V_DIM)[None, :], other=0.0)
        lse2, delta = _load_row_stats(L_rows, D_rows, rows, seqlen_q)

        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        pos_q = rows + shift
        lo, int_lo, int_hi, hi = _q_tile_band(m0, seqlen_q, seqlen_k, shift, window, window_right,
                                              CAUSAL, HAS_WINDOW, HAS_RIGHT, BLOCK_M, BLOCK_N)
        dq = _dq_tiles(dq, q, do, lse2, delta, K_head, V_head, lo, int_lo, pos_q, seqlen_k, window,
                       window_right, qk_scale, stride_ks, stride_kd, stride_vs, stride_vd, offs_n,
                       offs_d, offs_dv, slope2, softcap_scale, True, CAUSAL, HAS_WINDOW, HEAD_DIM,
                       V_DIM, BLOCK_N, PRECISION, ROW64, SOFTCAP, ALIBI, HAS_RIGHT,
                       seed, rng_seq, h, rows, q_len, kv_len, dropout_p, DROPOUT)
        dq = _dq_tiles(dq, q, do, lse2, delta, K_head, V_head, int_lo, int_hi, pos_q, seqlen_k,
                       window, window_right, qk_scale, stride_ks, stride_kd, stride_vs, stride_vd,
                       offs_n, offs_d, offs_dv, slope2, softcap_scale, False, CAUSAL, HAS_WINDOW,
                       HEAD_DIM, V_DIM, BLOCK_N, PRECISION, ROW64, SOFTCAP, ALIBI, HAS_RIGHT,
                       seed, rng_seq, h, rows, q_len, kv_len, dropout_p, DROPOUT)
        dq = _dq_tiles(dq, q, do, lse2, delta, K_head, V_head, int_hi, hi, pos_q, seqlen_k, window,
                       window_right, qk_scale, stride_ks, stride_kd, stride_vs, stride_vd, offs_n,
                       offs_d, offs_dv, slope2, softcap_scale, True, CAUSAL, HAS_WINDOW, HEAD_DIM,
                       V_DIM, BLOCK_N, PRECISION, ROW64, SOFTCAP, ALIBI, HAS_RIGHT,
                       seed, rng_seq, h, rows, q_len, kv_len, dropout_p, DROPOUT)

        tl.store(DQ + b64 * stride_dqb + q_tok * stride_dqs + h * stride_dqh
                 + row_ix[:, None] * stride_dqs + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Launchers (same names and signatures as the CUDA backend's, see gptkernels._dispatch)
# --------------------------------------------------------------------------------------------------


#: CUDA limits grid dims y and z to 65535: the batch (grid axis 2) is launched in chunks of at most this.
MAX_GRID_YZ = 65535


def _batch_chunks(batch: int) -> list[slice]:
    """Sequences [b0, b1) per launch; every launcher slices its per-sequence tensors with these."""
    return [slice(b0, min(b0 + MAX_GRID_YZ, batch)) for b0 in range(0, batch, MAX_GRID_YZ)]


def _cu_chunk(cu: torch.Tensor, bs: slice) -> torch.Tensor:
    # The B+1 running offsets of sequences bs: still absolute token offsets into the packed tensors.
    return cu[bs.start:bs.stop + 1]


def _contiguous(*index_tensors):
    """Index tensors (cu_seqlens, seqlens_k, block_table) as the kernels read them: contiguous.
    Any strides are accepted (views, expanded tensors); a copy is made only when needed."""
    return tuple(None if t is None else t.contiguous() for t in index_tensors)


def _row64(*tensors) -> bool:
    """Whether a row of a tile (< 256: tiles and pages) times one of these tensors' strides may pass
    2**31: the kernels then compute row offsets in int64 (``ROW64``; int32 otherwise)."""
    return any(abs(st) * 256 >= 2**31 for t in tensors if t is not None for st in t.stride())


def _seq_row64(rows: int, *tensors) -> bool:
    """Whether a row index within a sequence of up to ``rows`` rows (plus a tile) times one of these
    tensors' strides may pass 2**31: the dK/dV kernel offsets its query and key rows from the
    sequence start (loop-variant offsets hoist fewer registers than a tile base plus tile rows)."""
    return any(abs(st) * (rows + 256) >= 2**31 for t in tensors if t is not None for st in t.stride())


class _Covered:
    """The grid function of a main launch over ``max_rows`` rows in tiles of ``meta[block]``; it
    records how many rows the launch covers (``rows``: whole tiles), where a tail launch starts."""

    def __init__(self, max_rows: int, block: str):
        self.max_rows, self.block, self.rows = max_rows, block, max_rows

    def __call__(self, meta) -> int:
        tiles = triton.cdiv(self.max_rows, meta[self.block])
        self.rows = tiles * meta[self.block]
        return tiles


def _tail_config(table, interp, dtype, block_d) -> dict:
    """Launch options of a tail launch (rows past max_seqlen_*, see _tile_loop): the config
    GPTKERNELS_AUTOTUNE=0 takes, never autotuned (a tail launch usually has nothing to do)."""
    row = interp if INTERPRET else table[(dtype == torch.float32, min(max(block_d, 64), 256))][0]
    return dict(BLOCK_M=row[0], BLOCK_N=row[1], num_warps=row[2], num_stages=row[3])


def _block_d(head_dim: int) -> int:
    return max(16, next_pow2(head_dim))


def _v_dims(head_dim: int, head_dim_v: int) -> dict:
    """The kernels' HEAD_DIM_V / BLOCK_DV for v's head dim: none when it equals q's (the kernels'
    default, 0: the same as HEAD_DIM / BLOCK_D, so that launch compiles exactly as before)."""
    if head_dim_v == head_dim:
        return {}
    return dict(HEAD_DIM_V=head_dim_v, BLOCK_DV=_block_d(head_dim_v))


def _precision(dtype: torch.dtype) -> str:
    # fp32 must not silently become TF32 (10-bit mantissa) on the GPU; 16-bit inputs ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def _bucket(n: int) -> int:
    # Autotune key values: powers of two from 16 (so that Triton's integer specialisation, which
    # looks at divisibility by 16, does not recompile per bucket) to 16384.
    return min(max(next_pow2(n), 16), 16384)


def _tune_buckets(max_q: int, max_k: int, width: int | None) -> tuple[int, int]:
    """(seq_bucket, band_bucket): small batches of short rows want small tiles to fill the GPU; a
    narrow window (``width`` keys a row sees, ``_policy.band_width``) wants a short BLOCK_M so fewer
    boundary tiles are computed."""
    band = max_k if width is None else min(width, max_k)
    return _bucket(max_q), _bucket(band)


def _band_args(causal: bool, window) -> tuple[int, int, int | None, dict]:
    """The kernels' form of the window (``_policy.window_bounds``: (left, right), -1 unbounded):
    (window = left + 1 or 0, window_right = right or 0, the band width, the constexpr flags CAUSAL
    (right = 0), HAS_RIGHT (right > 0), HAS_WINDOW (left bounded)). Causal attention, windowed or
    not, keeps its own CAUSAL code: the two-sided form adds nothing to it."""
    left, right = window_bounds(causal, window)
    flags = dict(CAUSAL=right == 0, HAS_WINDOW=left >= 0, HAS_RIGHT=right > 0)
    return max(left + 1, 0), max(right, 0), band_width(left, right), flags


def _tok_strides(x: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, token, head, dim) strides of a dense (B, S, H, D) or varlen (T, H, D) tensor."""
    return (0, *x.stride()) if varlen else tuple(x.stride())


def _lse_strides(q: torch.Tensor, varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of a contiguous lse: (B, Hq, Sq) dense, (Hq, Tq) varlen."""
    if varlen:
        return 0, q.shape[0]
    return q.shape[2] * q.shape[1], q.shape[1]


def flash_attn_forward(q, k, v, *, causal, window, softmax_scale, cu_seqlens_q, cu_seqlens_k,
                       max_seqlen_q, max_seqlen_k, block_table, seqlens_k, bottom_right,
                       k_scale=None, v_scale=None, softcap=None, alibi_slopes=None, dropout_p=0.0,
                       dropout_seed=0):
    """Attention forward. Returns (out like q, contiguous; lse float32 (B, Hq, Sq) or (Hq, Tq)).
    ``k_scale``/``v_scale``: an fp8 paged cache's per-KV-head scales ((Hkv,) or ()); ``softcap``
    (> 0) and ``alibi_slopes`` ((Hq,) or (B, Hq) float32, any strides) as in gptkernels/reference.py.
    ``dropout_p`` > 0 (dense and varlen keys): P is kept with probability 1 - dropout_p (mask from
    Philox with ``dropout_seed``, :func:`dropout_mask`) and scaled by 1 / (1 - dropout_p); lse is
    of the undropped scores."""
    varlen_q = cu_seqlens_q is not None
    varlen_k = cu_seqlens_k is not None
    paged = block_table is not None
    # The kernels read index tensors as contiguous: copy a strided/expanded one (a few bytes).
    cu_seqlens_q, cu_seqlens_k, seqlens_k, block_table = _contiguous(
        cu_seqlens_q, cu_seqlens_k, seqlens_k, block_table)
    hq, head_dim, head_dim_v = q.shape[-2], q.shape[-1], v.shape[-1]
    group = hq // k.shape[-2]
    out_shape = (*q.shape[:-1], head_dim_v)  # q's rows, v's head dim
    if varlen_q:
        # max_seqlen_q sizes the grid only (the kernel loops over longer sequences): >= 1 program
        batch, q_len, max_q = cu_seqlens_q.numel() - 1, q.shape[0], max(max_seqlen_q, 1)
        # tokens past cu_seqlens_q[-1] belong to no sequence and no program writes them: they read
        # as a row that sees no key (out 0, lse -inf), as on every backend (no host sync to find them)
        out = torch.zeros(out_shape, dtype=q.dtype, device=q.device)
        lse = torch.full((hq, q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    else:
        batch, q_len, max_q = q.shape[0], q.shape[1], q.shape[1]
        out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, hq, q.shape[1]), dtype=torch.float32, device=q.device)
    if paged:
        page, num_blocks = k.shape[1], k.shape[0]
        kv_len = block_table.shape[1] * page  # the table's capacity: seqlens_k is clamped to it
        sk = (k.stride(0), k.stride(1), k.stride(2), k.stride(3))
        sv = (v.stride(0), v.stride(1), v.stride(2), v.stride(3))
    else:
        page, num_blocks = 1, 0
        kv_len = k.shape[0] if varlen_k else k.shape[1]
        sk, sv = _tok_strides(k, varlen_k), _tok_strides(v, varlen_k)
    if out.numel() == 0 or k.numel() == 0 or kv_len == 0:
        # Nothing to launch; with no keys at all every row sees nothing: zeros and lse = -inf.
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse

    dummy = lse  # stands in for absent index tensors (never read: the constexpr flags say so)
    sq = _tok_strides(q, varlen_q)
    so = _tok_strides(out, varlen_q)
    slb, slh = _lse_strides(q, varlen_q)
    dense_k = not (paged or varlen_k)
    pack = _pack_gqa(group, max_q)
    heads, tile_rows = (hq // group, max_q * group) if pack else (hq, max_q)  # grid axis 1, rows
    win_left, win_right, width, band_flags = _band_args(causal, window)
    num_splits = _fwd_num_splits(batch, heads, max_q, max_seqlen_k or kv_len, width, q.device, tile_rows)
    if num_splits > 1:  # float32 partial results per split, rows laid out like q's
        opart = torch.empty((*q.shape[:-1], num_splits, head_dim_v), dtype=torch.float32, device=q.device)
        lpart = torch.empty((*q.shape[:-1], num_splits), dtype=torch.float32, device=q.device)
        sp = _tok_strides(opart[..., 0, :], varlen_q)[:3] + (opart.stride(-2),)
        slp = _tok_strides(lpart, varlen_q)[:3]
    else:
        opart = lpart = dummy
        sp, slp = (0, 0, 0, 0), (0, 0, 0)
    row64 = _row64(q, k, v, out, opart, lpart) or (pack and _pack_row64(q, out, lse, opart, lpart))
    qk_scale, softcap_scale = _score_scales(softmax_scale, softcap)

    def launch(kernel, grid, bs, splits, tail, row0=0, **config):
        kernel[grid](
            q if varlen_q else q[bs], k[bs] if dense_k else k, v[bs] if dense_k else v,
            out if varlen_q else out[bs], lse if varlen_q else lse[bs],
            _cu_chunk(cu_seqlens_q, bs) if varlen_q else dummy,
            _cu_chunk(cu_seqlens_k, bs) if varlen_k else dummy,
            seqlens_k[bs] if paged else dummy, block_table[bs] if paged else dummy,
            *sq, *sk, *sv, so[0], so[1], so[2], slb, slh,
            block_table.stride(0) if paged else 0, num_blocks,
            opart if varlen_q or splits == 1 else opart[bs],
            lpart if varlen_q or splits == 1 else lpart[bs], *sp, *slp, splits,
            *_kv_scale_args(k_scale, v_scale, dummy), *_slope_args(alibi_slopes, bs, dummy), softcap_scale,
            q_len, kv_len, group, qk_scale, win_left, win_right,
            *_tune_buckets(tile_rows, max_seqlen_k or kv_len, width), row0,
            dropout_seed, _rng_offset(bs, varlen_q, hq, q_len, kv_len), dropout_p, **band_flags,
            BOTTOM_RIGHT=bottom_right, **_dropout_flag(dropout_p),
            VARLEN_Q=varlen_q, VARLEN_K=varlen_k, PAGED=paged, PAGE=page,
            HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), PRECISION=_precision(q.dtype),
            SPLIT=splits > 1, KV_SCALED=k_scale is not None, ROW64=row64, TAIL=tail,
            PACK_GQA=pack, SOFTCAP=softcap is not None, ALIBI=alibi_slopes is not None,
            **_v_dims(head_dim, head_dim_v), **config,
        )

    covered = _Covered(tile_rows, "BLOCK_M")
    for bs in _batch_chunks(batch):
        grid = lambda meta, n=bs.stop - bs.start: (covered(meta) * num_splits, heads, n)  # noqa: E731
        launch(_fwd_kernel, grid, bs, num_splits, False)
    if num_splits > 1:
        # every row's splits -> out (rows of q's layout) and lse, which is (B, Hq, Sq) / (Hq, Tq)
        rows = out.view(-1, hq, head_dim_v)
        lse_rows = torch.empty((rows.shape[0], hq), dtype=torch.float32, device=q.device)
        merge_splits(opart.view(-1, hq, num_splits, head_dim_v), lpart.view(-1, hq, num_splits), rows,
                     lse_rows)
        lse.copy_(lse_rows.t() if varlen_q else lse_rows.view(batch, -1, hq).transpose(1, 2))
    if varlen_q:
        # max_seqlen_q came from the caller (no sync): rows past it, if any, in a tail launch
        # (after the merge, which writes every row), one program per head and sequence.
        config = _tail_config(_FWD_TABLE, _FWD_INTERP, q.dtype, _block_d(max(head_dim, head_dim_v)))
        for bs in _batch_chunks(batch):
            launch(_fwd_kernel.fn, (1, heads, bs.stop - bs.start), bs, 1, True, covered.rows, **config)
    return out, lse


def _rng_offset(bs: slice, varlen: bool, hq: int, q_len: int, kv_len: int) -> int:
    """The dropout offset of a launch's first sequence (``_rng_seq``: a dense launch's b counts from
    the chunk's first sequence; varlen rows are packed tokens, with no batch term)."""
    return 0 if varlen else bs.start * hq * q_len * kv_len


def _dropout_flag(dropout_p: float) -> dict:
    """DROPOUT=True when dropout is on; nothing otherwise, so the default launch compiles exactly as
    before the flag existed."""
    return dict(DROPOUT=True) if dropout_p > 0 else {}


@triton.jit
def _dropout_mask_kernel(Mask, seed, rng_offset, dropout_p, hq, q_len, kv_len,
                         VARLEN_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Mask (B, Hq, q_len, kv_len) int8, contiguous; varlen: B = 1 and rows are packed tokens
    h = tl.program_id(1).to(tl.int64)
    b64 = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rng_seq = _rng_seq(rng_offset, b64, hq, b64 * 0, q_len, kv_len, VARLEN_Q)
    base = Mask + ((b64 * hq + h) * q_len + rows.to(tl.int64))[:, None] * kv_len
    for n0 in range(0, kv_len, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, rng_seq, h, rows, n0, q_len, kv_len, dropout_p, BLOCK_N)
        tl.store(base + cols[None, :], keep.to(tl.int8),
                 mask=(rows < q_len)[:, None] & (cols < kv_len)[None, :])


def dropout_mask(seed: int, dropout_p: float, batch: int, heads: int, q_len: int, kv_len: int, *,
                 varlen: bool = False, device=None) -> torch.Tensor:
    """The keep mask the kernels draw for ``dropout_seed=seed`` (for tests and debugging, as
    FlashAttention's ``return_attn_probs`` S_dmask): bool (B, Hq, Sq, Sk) for dense inputs, or
    ``varlen=True`` (Hq, Tq, Tk) over the packed tokens (sequence b's block is
    ``[:, q0:q1, :seqlen_k_b]``: keys count from each sequence's first). Computed by the same jitted
    :func:`_dropout_keep` as the kernels."""
    rows_b = 1 if varlen else batch
    mask = torch.empty((rows_b, heads, q_len, kv_len), dtype=torch.int8, device=device)
    if mask.numel():
        _dropout_mask_kernel[(triton.cdiv(q_len, 32), heads, rows_b)](
            mask, seed, 0, float(dropout_p), heads, q_len, kv_len, VARLEN_Q=varlen, BLOCK_M=32,
            BLOCK_N=32)
    mask = mask.bool()
    return mask[0] if varlen else mask


def _score_scales(softmax_scale: float, softcap: float | None) -> tuple[float, float]:
    """(qk_scale, softcap_scale) for the kernels (``_score_mods``): q.k times qk_scale is the score
    in log2 units, or without the cap's tanh yet, score / softcap, which the cap turns into log2
    units with softcap_scale = softcap * log2(e)."""
    if softcap is None:
        return softmax_scale * LOG2E, 0.0
    return softmax_scale / softcap, softcap * LOG2E


def _slope_args(slopes, bs: slice, dummy):
    """(Slopes, batch stride, head stride) for the kernels: ALiBi slopes (Hq,) (batch stride 0: one
    row for every sequence) or (B, Hq) cut to the launch's sequences ``bs``; ``dummy`` (never read)
    without them."""
    if slopes is None:
        return dummy, 0, 0
    if slopes.dim() == 1:
        return slopes, 0, slopes.stride(0)
    return slopes[bs], slopes.stride(0), slopes.stride(1)


def _kv_scale_args(k_scale, v_scale, dummy):
    """(K_scale, V_scale, head strides) for the forward kernel: an fp8 cache's (Hkv,) or () scales
    (stride 0: one for every head), or ``dummy`` (never read) without them."""
    if k_scale is None:
        return dummy, dummy, 0, 0
    return (k_scale, v_scale, k_scale.stride(0) if k_scale.dim() else 0,
            v_scale.stride(0) if v_scale.dim() else 0)


def _fwd_num_splits(batch: int, heads: int, max_q: int, max_k: int, width, device,
                    rows: int | None = None) -> int:
    """Key splits for the forward (flash-decoding): more than one only when the query tiles alone
    leave the GPU idle (decode, short chunks) and the band each row sees is long. The paged decode's
    policy (gptkernels._policy), with (sequences x query tiles) x grid heads as its programs:
    ``heads`` programs per sequence of ``rows`` tile rows (default ``max_q``; with PACK_GQA, KV
    heads of group x max_q rows). ``width``: the keys a row sees (``_policy.band_width``)."""
    # the largest BLOCK_M: never more splits than needed
    q_tiles = triton.cdiv(max_q if rows is None else rows, 128)
    return num_splits(batch * q_tiles * heads, decode_band(max_k, width, max_q), sm_count(device))


#: The short-query path packs a GQA group's query heads into the query tile (PACK_GQA) when every
#: sequence has at most this many query rows (decode, speculative chunks) ...
PACK_MAX_Q = 16
#: ... or when the group's rows fill at most one query tile of the largest BLOCK_M.
PACK_MAX_ROWS = 128


def _pack_gqa(group: int, max_q: int) -> bool:
    """Whether the forward packs the query heads of a GQA group into its query tiles: with few query
    rows, so that each K/V tile is loaded once per group and not once per query head (the query
    tiles of one head would be mostly padding anyway). Longer queries keep one program per query
    head: their tiles are full and L2 absorbs the repeated K/V reads."""
    return 1 < group <= 256 and (max_q <= PACK_MAX_Q or group * max_q <= PACK_MAX_ROWS)


def _pack_row64(*tensors) -> bool:
    """Whether a packed tile's row offset, (query - first query) x token stride + head x head stride
    with both factors below 256 (``_row64``'s bound), may pass 2**31 as a sum (a bound from each
    tensor's two largest strides)."""
    return any(256 * sum(sorted(abs(st) for st in t.stride())[-2:]) >= 2**31 for t in tensors
               if t is not None)


def flash_attn_backward(dout, dlse, q, k, v, out, lse, *, causal, window, softmax_scale,
                        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bottom_right,
                        deterministic=True, softcap=None, alibi_slopes=None, dropout_p=0.0,
                        dropout_seed=0):
    """Attention backward (dense and varlen). Returns contiguous (dq, dk, dv).

    ``deterministic=True``: dK/dV and dQ in two kernels (7 tile matmuls per tile pair, bit-exact
    repeats). ``False``: one kernel adds dQ into a float32 buffer with atomics (5 tile matmuls, an
    extra q-sized float32 buffer, the last bits of dQ vary between runs). ``softcap``,
    ``alibi_slopes`` and ``dropout_p`` / ``dropout_seed`` as in the forward (the slopes get no
    gradient; the dropout mask is regenerated from the seed, never stored).
    """
    varlen = cu_seqlens_q is not None
    cu_seqlens_q, cu_seqlens_k = _contiguous(cu_seqlens_q, cu_seqlens_k)
    hq, hkv, head_dim, head_dim_v = q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]
    group = hq // hkv
    # varlen: tokens outside cu_seqlens_* belong to no sequence and no program writes their rows:
    # their gradient is 0 (zero-filled, as the torch backend gives; no host sync to find them)
    alloc = torch.zeros if varlen else torch.empty
    dq = alloc(q.shape, dtype=q.dtype, device=q.device)
    dk = alloc(k.shape, dtype=k.dtype, device=k.device)
    # contiguous like dk: _bwd_dkdv derives dv's strides from dk's
    dv = alloc(v.shape, dtype=v.dtype, device=v.device)
    if varlen:
        batch, q_len, kv_len = cu_seqlens_q.numel() - 1, q.shape[0], k.shape[0]
        # the max_seqlen_* size the grids only (the kernels loop over longer sequences): >= 1 program
        max_q, max_k = max(max_seqlen_q, 1), max(max_seqlen_k, 1)
    else:
        batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
        max_q, max_k = q_len, kv_len
    if q.numel() == 0 or k.numel() == 0:
        # No query or no key: nothing is attended, every gradient is zero.
        return dq.zero_(), dk.zero_(), dv.zero_()

    out, lse = out.contiguous(), lse.contiguous()  # our own forward's outputs: already contiguous
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()  # small (like lse); may be an expanded grad
    delta = torch.empty_like(lse)
    block_d, block_dv = _block_d(head_dim), _block_d(head_dim_v)
    block_wide = max(block_d, block_dv)  # the config tables' head-dim bucket
    sq, sk, sv = _tok_strides(q, varlen), _tok_strides(k, varlen), _tok_strides(v, varlen)
    sdo, so = _tok_strides(dout, varlen), _tok_strides(out, varlen)
    sdq, sdk = _tok_strides(dq, varlen), _tok_strides(dk, varlen)
    slb, slh = _lse_strides(q, varlen)
    cu_q = cu_seqlens_q if varlen else lse
    cu_k = cu_seqlens_k if varlen else lse

    if deterministic:
        dq_acc, sdqa = lse.new_zeros(1), (0, 0, 0)  # never read or written (ATOMIC_DQ is False)
    else:
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        sdqa = _tok_strides(dq_acc, varlen)[:3]

    pre_m = max(16, min(128, 8192 // block_dv))  # the preprocess reads O and dO: Dv wide
    win_left, win_right, width, band_flags = _band_args(causal, window)
    common = dict(**band_flags, BOTTOM_RIGHT=bottom_right,
                  VARLEN_Q=varlen, PAGED=False, HEAD_DIM=head_dim, BLOCK_D=block_d,
                  PRECISION=_precision(q.dtype), SOFTCAP=softcap is not None,
                  ALIBI=alibi_slopes is not None, **_v_dims(head_dim, head_dim_v),
                  **_dropout_flag(dropout_p))
    qk_scale, softcap_scale = _score_scales(softmax_scale, softcap)
    scalars = (q_len, kv_len, group, qk_scale, softmax_scale, win_left, win_right,
               *_tune_buckets(max(max_q, max_k), max_k, width))
    row64 = _row64(q, k, v, dout, out, dq, dk, dv, dq_acc) or \
        _seq_row64(max(q_len, kv_len), q, k, v, dout, dk, dv, dq_acc)
    # varlen: the max_seqlen_* came from the caller (no sync); rows past them, if any, go to tail
    # launches (one program per head and sequence, usually with nothing to do; see _tile_loop)
    passes = [False, True] if varlen else [False]
    for bs in _batch_chunks(batch):
        n = bs.stop - bs.start
        # Varlen tensors are indexed through the (sliced) cu_seqlens; dense ones are sliced.
        cut = (lambda t: t) if varlen else (lambda t: t[bs])  # noqa: E731
        cq = _cu_chunk(cu_q, bs) if varlen else cu_q
        ck = _cu_chunk(cu_k, bs) if varlen else cu_k
        lse_c, delta_c = cut(lse), cut(delta)
        mods = (*_slope_args(alibi_slopes, bs, lse), softcap_scale)
        rng = (dropout_seed, _rng_offset(bs, varlen, hq, q_len, kv_len), dropout_p)
        for tail in passes:
            _bwd_preprocess[(1 if tail else triton.cdiv(max_q, pre_m), hq, n)](
                cut(out), cut(dout), cut(dlse) if dlse is not None else lse_c, delta_c, cq,
                so[0], so[1], so[2], *sdo, slb, slh, q_len,
                triton.cdiv(max_q, pre_m) * pre_m if tail else 0,
                # O and dO are v's head dim wide
                HAS_DLSE=dlse is not None, VARLEN_Q=varlen, HEAD_DIM=head_dim_v, BLOCK_D=block_dv,
                BLOCK_M=pre_m, ROW64=row64, TAIL=tail, num_warps=4,
            )
        covered = _Covered(max_k, "BLOCK_N")
        for tail in passes:
            kernel, config = _bwd_dkdv, {}
            grid = lambda meta: (covered(meta), hkv, n)  # noqa: E731
            if tail:
                kernel, grid = _bwd_dkdv.fn, (1, hkv, n)
                config = _tail_config(_DKDV_TABLE if deterministic else _DKDV_ATOMIC_TABLE,
                                      _DKDV_INTERP, q.dtype, block_wide)
            kernel[grid](
                cut(q), cut(k), cut(v), cut(dout), lse_c, delta_c, cut(dk), cut(dv),
                dq_acc if deterministic else cut(dq_acc), cq, ck,
                *sq, *sk, *sv, *sdo, sdk[0], sdk[1], sdk[2], *sdqa, slb, slh, *mods, *scalars,
                covered.rows if tail else 0, *rng,
                **common, ATOMIC_DQ=not deterministic, ROW64=row64, TAIL=tail, **config,
            )
        covered = _Covered(max_q, "BLOCK_M")
        for tail in passes if deterministic else ():
            kernel, config = _bwd_dq, {}
            grid = lambda meta: (covered(meta), hq, n)  # noqa: E731
            if tail:
                kernel, grid = _bwd_dq.fn, (1, hq, n)
                config = _tail_config(_DQ_TABLE, _DQ_INTERP, q.dtype, block_wide)
            kernel[grid](
                cut(q), cut(k), cut(v), cut(dout), lse_c, delta_c, cut(dq), cq, ck,
                *sq, *sk, *sv, *sdo, sdq[0], sdq[1], sdq[2], slb, slh, *mods, *scalars,
                covered.rows if tail else 0, *rng, **common,
                ROW64=row64, TAIL=tail, **config,
            )
    if not deterministic:
        # the kernels add unscaled dS K; one pass scales and rounds to q's dtype
        dq.copy_(dq_acc.mul_(softmax_scale))
    return dq, dk, dv
