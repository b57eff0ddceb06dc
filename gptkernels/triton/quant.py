"""Triton weight-only GEMM: ``y = x @ dequant(W)^T (+ bias)`` for int8 and int4 weights.

Launchers (the CUDA backend has no twin yet: :mod:`gptkernels.quant` says so with
BackendUnavailableError):

* ``int8_linear(x, qweight, scales, bias) -> y``: qweight int8 (N, K), scales (N,)
* ``int4_linear(x, qweight, scales, zeros, bias, *, group_size) -> y``: qweight uint8 (N, K/2) (two
  codes per byte along K, low nibble first), scales/zeros (N, K/group_size)

x is (M, K) in float16/bfloat16/float32 (any strides), y (M, N) in x's dtype. Inputs are checked and
flattened by :mod:`gptkernels.quant`.

One kernel serves both formats. A program owns a BLOCK_M x BLOCK_N tile of y and walks its share of
K in BLOCK_K steps; the weight tile is loaded in its packed form and dequantized in registers right
before the tensor-core dot, so the float weight never exists in memory:

* int8: ``acc += x_tile @ q_tile^T`` with q converted to x's dtype (|q| <= 127 is exact in float16
  and bfloat16); the per-channel scale multiplies the float32 accumulator once at the end.
* int4: BLOCK_K divides group_size, so one tile lies in one group: the low and high nibbles (codes
  0..15, exact in x's dtype) meet the even and odd columns of x in two dots of BLOCK_K/2 (no
  interleaving shuffle); the zero point is folded out of the inner product
  (``x . (q - z) = x . q - z * sum(x)``) and the group's scale multiplies the tile's float32 partial
  sum, so a weight costs one conversion and no arithmetic of its own.

Decode (M <= 64 rows) is bandwidth-bound: the row tile is the smallest the tensor cores take that
covers M (16, 32 or 64: never padded to 128 rows), each weight byte is read once, and when too few
(M, N) tiles exist to fill the GPU, K is split across programs (the flash-decoding split policy of
:mod:`gptkernels._policy`, applied to K): each writes a float32 partial tile and a second small
kernel sums the splits, adds the bias and casts. Every choice depends on shapes only (no host sync:
CUDA-graph capturable). Design, byte counts and predictions: notes/quant.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _policy as P
from ._config import INTERPRET

# --------------------------------------------------------------------------------------------------
# Tile configuration
# --------------------------------------------------------------------------------------------------

#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by the number of rows M, for a GPU. Up to 64
#: rows: one row tile covering M, narrow N tiles and long K tiles (deep loads of the weight, the only
#: large operand); beyond: the compute-bound square tiles of Triton's matmul tutorial.
#: Predictions, not measurements: notes/quant.md.
GPU_TILES = ((16, (16, 64, 256, 4, 4)), (32, (32, 64, 256, 4, 4)), (64, (64, 64, 128, 4, 4)),
             (None, (128, 128, 64, 8, 3)))
#: The interpreter costs per operation, not per element: modest tiles, a 16-row one up to 16 rows and
#: a 64-row one above (so both int4 paths, FOLD_ZERO and not, run in the CPU tests).
INTERP_TILES = ((16, (16, 32, 64, 4, 1)), (None, (64, 32, 64, 4, 1)))
#: int4 row tiles up to this many rows fold the zero point out of the inner product (fewest
#: operations per weight: decode is bandwidth-bound); larger ones dequantize the tile (compute-bound).
FOLD_ZERO_MAX_ROWS = 32
#: Row tiles of the M > 64 path are ordered in groups of this many along M (Triton's matmul tutorial:
#: consecutive programs share weight tiles in L2).
GROUP_M = 8


def tile_config(m: int, interpret: bool = INTERPRET) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for M rows."""
    for bound, cfg in INTERP_TILES if interpret else GPU_TILES:
        if bound is None or m <= bound:
            return cfg
    raise AssertionError("unreachable")


def k_splits(m: int, n: int, k: int, block: tuple[int, int, int], num_sms: int) -> int:
    """How many programs share one output tile's K (split-K), from shapes only.

    The flash-decoding policy of :func:`gptkernels._policy.num_splits` with K as the band: enough
    programs to fill the GPU about twice, each split at least MIN_SPLIT_TOKENS (512) of K. Splits are
    whole BLOCK_K steps.
    """
    block_m, block_n, block_k = block
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    splits = P.num_splits(tiles, k, num_sms)
    return max(1, min(splits, triton.cdiv(k, block_k)))


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _wo_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, k_per_split,
    s_xm, s_xk, s_wn, s_wk, s_sn, s_sg, s_zn, s_zg, s_ys, s_ym, s_yn,
    INT4: tl.constexpr, GROUP_SIZE: tl.constexpr, FOLD_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering of the (M, N) tiles (a no-op with one row tile, i.e. decode).
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    split = tl.program_id(1)

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    k_start = split * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if INT4:
        HALF: tl.constexpr = BLOCK_K // 2
        j = tl.arange(0, HALF)
        kk = tl.arange(0, BLOCK_K)
        for k0 in range(k_start, k_end, BLOCK_K):
            # packed bytes k0/2 .. k0/2 + HALF: byte j holds columns k0 + 2j (low) and k0 + 2j + 1 (high)
            wp = tl.load(w_ptr + rn[:, None] * s_wn + (k0 // 2 + j)[None, :] * s_wk,
                         mask=n_ok[:, None], other=0)
            x = tl.load(x_ptr + rm[:, None] * s_xm + (k0 + kk)[None, :] * s_xk, mask=m_ok[:, None], other=0)
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, HALF, 2)))
            g = k0 // GROUP_SIZE
            zero = tl.load(z_ptr + rn * s_zn + g * s_zg, mask=n_ok, other=0).to(tl.float32)
            scale = tl.load(s_ptr + rn * s_sn + g * s_sg, mask=n_ok, other=0).to(tl.float32)
            if FOLD_ZERO:
                # Few rows (decode): sum_k x (q - zero) = x . q - zero * sum_k x. The codes (0..15,
                # exact in every dtype) go to the tensor cores as they are: one conversion per
                # weight and no arithmetic of its own; the zero point and the group's scale cost a
                # few operations per output of the tile.
                part = tl.dot(x_even, tl.trans((wp & 0xF).to(dtype)), input_precision=PRECISION)
                part = tl.dot(x_odd, tl.trans((wp >> 4).to(dtype)), part, input_precision=PRECISION)
                x_sum = tl.sum(x.to(tl.float32), axis=1)
                acc += (part - x_sum[:, None] * zero[None, :]) * scale[None, :]
            else:
                # Many rows (prefill, compute-bound): dequantize the tile in x's dtype, shared by
                # BLOCK_M rows, and accumulate in place (no second accumulator tile in registers).
                w_lo = (((wp & 0xF).to(tl.float32) - zero[:, None]) * scale[:, None]).to(dtype)
                w_hi = (((wp >> 4).to(tl.float32) - zero[:, None]) * scale[:, None]).to(dtype)
                acc = tl.dot(x_even, tl.trans(w_lo), acc, input_precision=PRECISION)
                acc = tl.dot(x_odd, tl.trans(w_hi), acc, input_precision=PRECISION)
    else:
        kk = tl.arange(0, BLOCK_K)
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + kk
            k_ok = k < k_end
            w = tl.load(w_ptr + rn[:, None] * s_wn + k[None, :] * s_wk, mask=n_ok[:, None] & k_ok[None, :], other=0)
            x = tl.load(x_ptr + rm[:, None] * s_xm + k[None, :] * s_xk, mask=m_ok[:, None] & k_ok[None, :], other=0)
            acc = tl.dot(x, tl.trans(w.to(dtype)), acc, input_precision=PRECISION)
        scale = tl.load(s_ptr + rn * s_sn, mask=n_ok, other=0).to(tl.float32)
        acc = acc * scale[None, :]

    mask = m_ok[:, None] & n_ok[None, :]
    if PARTIAL:  # float32 partial sums of this split; _sum_splits_kernel finishes
        tl.store(y_ptr + split * s_ys + rm[:, None] * s_ym + rn[None, :] * s_yn, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :] * s_yn, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(p_ptr, b_ptr, y_ptr, M, N, s_ps, s_ym, s_yn,
                       SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # p: (SPLITS, M, N) float32, contiguous (s_ps = M * N). A fixed summation order: deterministic.
    offs = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(p_ptr + s * s_ps + offs, mask=ok, other=0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=ok, other=0).to(tl.float32)
    tl.store(y_ptr + (offs // N) * s_ym + n * s_yn, acc.to(y_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------



def _gemm(x, qweight, scales, zeros, bias, *, n, k, int4, group_size):
    m = x.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    block_m, block_n, block_k, warps, stages = tile_config(m)
    if int4:
        block_k = min(block_k, group_size)  # a K tile never straddles two groups
    splits = k_splits(m, n, k, (block_m, block_n, block_k), P.sm_count(x.device))
    k_steps = triton.cdiv(k, block_k)
    splits = max(1, min(splits, k_steps))
    k_per_split = triton.cdiv(k_steps, splits) * block_k
    splits = triton.cdiv(k, k_per_split) if k > 0 else 1  # no empty split
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), splits)
    partial = splits > 1
    out = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if partial else y
    s_out = (out.stride(0), out.stride(1), out.stride(2)) if partial else (0, y.stride(0), y.stride(1))
    z = zeros if int4 else scales  # unused without INT4
    s_s = (scales.stride(0), scales.stride(1) if int4 else 0)
    s_z = (z.stride(0), z.stride(1) if int4 else 0)
    _wo_gemm_kernel[grid](
        x, qweight, scales, z, bias if bias is not None else scales, out,
        m, n, k, k_per_split,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), *s_s, *s_z, *s_out,
        INT4=int4, GROUP_SIZE=group_size if int4 else 1, FOLD_ZERO=block_m <= FOLD_ZERO_MAX_ROWS,
        HAS_BIAS=bias is not None, PARTIAL=partial,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
        num_warps=warps, num_stages=stages,
    )
    if partial:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](
            out, bias if bias is not None else out, y, m, n, out.stride(0), y.stride(0), y.stride(1),
            SPLITS=splits, HAS_BIAS=bias is not None, BLOCK=block)
    return y


def int8_linear(x, qweight, scales, bias):
    """x (M, K) @ (qweight int8 (N, K) * scales (N,))^T + bias -> (M, N) in x's dtype."""
    n, k = qweight.shape
    return _gemm(x, qweight, scales, None, bias, n=n, k=k, int4=False, group_size=0)


def int4_linear(x, qweight, scales, zeros, bias, *, group_size):
    """x (M, K) @ dequant(packed qweight (N, K/2), scales, zeros per group)^T + bias -> (M, N)."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    return _gemm(x, qweight, scales, zeros, bias, n=n, k=k, int4=True, group_size=group_size)
