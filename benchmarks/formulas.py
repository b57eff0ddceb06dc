"""Flop and byte counts of every benchmark, written once.

Each function returns the count and a short formula string, so the JSON, the tables and the report
show the formula next to the figure. Conventions are the ones FlashAttention's and vLLM's benchmarks
use, so figures compare with published ones:

* attention: 4*B*H*Sq*Sk*D flops for full attention (two matmuls, QK^T and PV, of 2*Sq*Sk*D each);
  x0.5 for causal (the standard convention, not S*(S+1)/2); a sliding window counts the exact band
  area (the number of visible (query, key) pairs); backward = 2.5x forward (five matmuls instead of
  two).
* memory-bound ops: the fewest bytes the op must move (each input read once, each output written
  once), so GB/s compares directly with a device-to-device copy's (bytes read + written).
"""

from __future__ import annotations

from dataclasses import dataclass

BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


@dataclass(frozen=True)
class Count:
    value: float
    formula: str


def dtype_bytes(dtype) -> int:
    return BYTES[str(dtype).replace("torch.", "")]


def band_area(seqlen_q: int, seqlen_k: int, window: int | None) -> int:
    """Visible (query, key) pairs of causal attention with an optional window, bottom-right aligned.

    Query row i sits at p = i + Sk - Sq and sees keys max(0, p - W + 1) .. p (SPEC.md).
    """
    shift = seqlen_k - seqlen_q
    total = 0
    # closed form per row would be shorter but this is exact for every Sq/Sk/W and cheap (<= 128k rows)
    w = seqlen_k if window is None else window
    for i in range(seqlen_q):
        p = i + shift
        if p < 0:
            continue
        total += min(p, seqlen_k - 1) - max(0, p - w + 1) + 1
    return total


def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, *,
                    causal: bool = True, window: int | None = None, backward: bool = False) -> Count:
    """Matmul flops of softmax attention (forward, or backward with ``backward=True``)."""
    if window is not None:
        area = band_area(seqlen_q, seqlen_k, window)
        flops = 4 * batch * heads * head_dim * area
        formula = f"4*B*H*D*band_area(Sq,Sk,W={window})"
    elif causal:
        flops = 0.5 * 4 * batch * heads * seqlen_q * seqlen_k * head_dim
        formula = "0.5*4*B*H*Sq*Sk*D"
    else:
        flops = 4 * batch * heads * seqlen_q * seqlen_k * head_dim
        formula = "4*B*H*Sq*Sk*D"
    if backward:
        return Count(2.5 * flops, f"2.5*[{formula}]")
    return Count(float(flops), formula)


def matmul_flops(m: int, n: int, k: int) -> Count:
    return Count(2.0 * m * n * k, "2*M*N*K")


def copy_bytes(numel: int, elem_bytes: int) -> Count:
    """A device-to-device copy: every byte read once and written once."""
    return Count(2.0 * numel * elem_bytes, "2*numel*elem (read + write)")


def rotary_bytes(tokens: int, heads_q: int, heads_k: int, head_dim: int, rotary_dim: int,
                 elem_bytes: int, table_bytes: int = 4) -> Count:
    """apply_rotary on q and k: read and write every element of q and k, read cos and sin per token.

    Channels past rotary_dim pass through; out-of-place they are still copied, in place they are not
    touched, but the count is the same convention either way (2 x q+k bytes) so GB/s compares with a copy.
    """
    qk = tokens * (heads_q + heads_k) * head_dim * elem_bytes
    tables = 2 * tokens * (rotary_dim // 2) * table_bytes
    return Count(2.0 * qk + tables, "2*T*(Hq+Hk)*D*elem + 2*T*(R/2)*4 (q,k read+write; cos,sin read)")


def paged_kv_bytes(seq_lens, heads_kv: int, head_dim: int, elem_bytes: int,
                   window: int | None = None) -> Count:
    """Bytes of K and V a decode step must read: each visible cached token's K and V once."""
    tokens = sum(min(int(n), window) if window is not None else int(n) for n in seq_lens)
    formula = "2*sum(min(len,W))*Hkv*D*elem" if window is not None else "2*sum(seq_lens)*Hkv*D*elem"
    return Count(2.0 * tokens * heads_kv * head_dim * elem_bytes, formula + " (K and V read once)")


def paged_append_bytes(tokens: int, heads_kv: int, head_dim: int, elem_bytes: int) -> Count:
    return Count(4.0 * tokens * heads_kv * head_dim * elem_bytes,
                 "4*T*Hkv*D*elem (k, v read; cache slots written)")


def decode_step_bytes(weight_bytes: int, layers: int, context: int, heads_kv: int, head_dim: int,
                      elem_bytes: int, batch: int = 1) -> Count:
    """The bandwidth floor's numerator of one decode step: every weight once, every cached K/V once."""
    kv = 2 * layers * batch * context * heads_kv * head_dim * elem_bytes
    return Count(float(weight_bytes + kv), "weight_bytes + 2*L*B*ctx*Hkv*D*elem")


def prefill_flops(matmul_params: int, tokens: int, layers: int, heads: int, seqlen: int,
                  head_dim: int, batch: int) -> Count:
    """Forward flops of a prompt: 2 per weight per token, plus causal attention."""
    attn = attention_flops(batch, heads, seqlen, seqlen, head_dim, causal=True).value * layers
    return Count(2.0 * matmul_params * tokens + attn,
                 "2*N_matmul_params*tokens + L*0.5*4*B*H*S*S*D")


# --------------------------------------------------------------------------------------------------
# The work audit's minima (benchmarks/suite_audit.py): the fewest bytes each op must move and the
# FLOPs it must multiply, for comparison with what the kernels' programs actually load, store and
# multiply (counted in the Triton interpreter). Exact counts, not the conventions above: a causal
# mask counts its S*(S+1)/2 visible pairs, index tensors count the entries the op must read.
# --------------------------------------------------------------------------------------------------

#: bytes of the float32 log-sum-exp the attention kernels write per query row and head
LSE_BYTES = 4


def visible_keys(seqlen_q: int, seqlen_k: int, window: int | None, causal: bool = True) -> int:
    """Keys that at least one query row sees (bottom-right aligned, SPEC.md): the K/V an op must read."""
    if not causal or seqlen_q == 0:
        return seqlen_k if seqlen_q else 0
    last = seqlen_k - 1  # the last row sits at p = Sk - 1 and sees up to it
    first_p = seqlen_k - seqlen_q
    lo = 0 if window is None else max(0, first_p - window + 1)
    return max(0, last - lo + 1) if last >= 0 else 0


def attention_pairs(seqlen_q: int, seqlen_k: int, window: int | None, causal: bool = True) -> int:
    """Visible (query, key) pairs of one head of one sequence: the exact useful work of attention."""
    if not causal:
        return seqlen_q * seqlen_k
    return band_area(seqlen_q, seqlen_k, window)


def attention_useful_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, *,
                           causal: bool = True, window: int | None = None, backward: bool = False) -> Count:
    """Matmul FLOPs the visible pairs need: 2 products (QK^T, PV) of 2*D per pair forward; the backward
    needs 5 (S recomputed, dP, dV, dK, dQ), 2.5x the forward (FlashAttention's count)."""
    pairs = attention_pairs(seqlen_q, seqlen_k, window, causal)
    flops = 4.0 * batch * heads * head_dim * pairs
    kind = "Sq*Sk" if not causal else f"band_area(Sq,Sk,W={window})"
    if backward:
        return Count(2.5 * flops, f"2.5*4*B*Hq*D*{kind} (5 products per visible pair)")
    return Count(flops, f"4*B*Hq*D*{kind} (2 products per visible pair)")


def attention_kv_bytes(batch: int, seqlen_q: int, seqlen_k: int, heads_kv: int, head_dim: int,
                       elem_bytes: int, *, causal: bool = True, window: int | None = None) -> Count:
    """K and V of every key some query row sees, read once (once per KV head: GQA shares them)."""
    keys = visible_keys(seqlen_q, seqlen_k, window, causal)
    return Count(2.0 * batch * keys * heads_kv * head_dim * elem_bytes,
                 "2*B*visible_keys(Sq,Sk,W)*Hkv*D*elem (K and V read once)")


def attention_fwd_bytes(batch: int, seqlen_q: int, seqlen_k: int, heads_q: int, heads_kv: int,
                        head_dim: int, elem_bytes: int, *, causal: bool = True,
                        window: int | None = None) -> Count:
    """The attention forward's minimum: q and the visible K/V read once, out and lse written once."""
    kv = attention_kv_bytes(batch, seqlen_q, seqlen_k, heads_kv, head_dim, elem_bytes, causal=causal,
                            window=window)
    rows = batch * seqlen_q * heads_q
    return Count(kv.value + rows * (2 * head_dim * elem_bytes + LSE_BYTES),
                 f"{kv.formula.split(' (')[0]} + B*Sq*Hq*(2*D*elem + 4) (q read, out and lse written)")


def attention_bwd_bytes(batch: int, seqlen: int, heads_q: int, heads_kv: int, head_dim: int,
                        elem_bytes: int) -> Count:
    """The attention backward's minimum: q, k, v, out, dout and lse read once, dq, dk, dv written once."""
    q_side = batch * seqlen * heads_q * (4 * head_dim * elem_bytes + LSE_BYTES)
    kv_side = batch * seqlen * heads_kv * 4 * head_dim * elem_bytes
    return Count(float(q_side + kv_side),
                 "B*S*Hq*(4*D*elem + 4) + B*S*Hkv*4*D*elem (q,out,dout,lse,k,v read; dq,dk,dv written)")


def paged_decode_bytes(seq_lens, heads_q: int, heads_kv: int, head_dim: int, elem_bytes: int,
                       block_size: int, window: int | None = None, kv_elem_bytes: int | None = None) -> Count:
    """paged_decode's minimum: the visible K/V once (:func:`paged_kv_bytes`, in the cache's element
    size ``kv_elem_bytes``: 1 for fp8, whose float32 K and V scales per KV head are read too), q read,
    out and lse written, the block-table entries of the visible pages and the sequence lengths read."""
    kv_elem = elem_bytes if kv_elem_bytes is None else kv_elem_bytes
    kv = paged_kv_bytes(seq_lens, heads_kv, head_dim, kv_elem, window)
    if kv_elem == 1:
        kv = Count(kv.value + 2 * 4 * heads_kv, kv.formula.split(" (")[0] + " + 2*Hkv*4 (fp8 scales)")
    pages = 0
    for n in seq_lens:
        n = int(n)
        first = 0 if window is None else max(0, n - window)
        pages += -(-n // block_size) - first // block_size if n else 0
    rows = len(seq_lens) * heads_q
    return Count(kv.value + rows * (2 * head_dim * elem_bytes + LSE_BYTES) + 4 * pages + 4 * len(seq_lens),
                 f"{kv.formula.split(' (')[0]} + B*Hq*(2*D*elem + 4) + 4*visible_pages + 4*B")


def paged_decode_flops(seq_lens, heads_q: int, head_dim: int, window: int | None = None) -> Count:
    """Useful FLOPs of one decode step: 2 products of 2*D per visible (query head, key)."""
    keys = sum(min(int(n), window) if window is not None else int(n) for n in seq_lens)
    return Count(4.0 * heads_q * head_dim * keys, "4*Hq*D*sum(min(len,W))")


def paged_append_io_bytes(tokens: int, heads_kv: int, head_dim: int, elem_bytes: int) -> Count:
    """paged_append's minimum: :func:`paged_append_bytes` plus the int64 slot of each token."""
    base = paged_append_bytes(tokens, heads_kv, head_dim, elem_bytes)
    return Count(base.value + 8.0 * tokens, base.formula.split(" (")[0] + " + 8*T (slot mapping)")


def rotary_io_bytes(tokens: int, heads_q: int, heads_k: int, head_dim: int, rotary_dim: int,
                    elem_bytes: int, *, positions_bytes: int = 0, inplace: bool = False) -> Count:
    """apply_rotary's minimum: :func:`rotary_bytes` (out of place: every q/k element read and written,
    cos and sin rows read), or in place only the rotated R channels, plus a position per token."""
    if inplace:
        qk = tokens * (heads_q + heads_k) * rotary_dim * elem_bytes
        tables = 2 * tokens * (rotary_dim // 2) * 4
        return Count(2.0 * qk + tables + positions_bytes * tokens,
                     "2*T*(Hq+Hk)*R*elem + 2*T*(R/2)*4 + T*pos_bytes (in place: R channels)")
    base = rotary_bytes(tokens, heads_q, heads_k, head_dim, rotary_dim, elem_bytes)
    return Count(base.value + positions_bytes * tokens,
                 base.formula.split(" (")[0] + " + T*pos_bytes (positions)")


def weight_only_gemm_bytes(m: int, n: int, k: int, elem_bytes: int, *, int4: bool, group_size: int = 128,
                           scale_bytes: int = 2, bias: bool = False) -> Count:
    """y = x @ dequant(W)^T (+ b), weight-only int8/int4: the packed weight, its scales (and int4 zero
    points) and x read once, y written once (the quant suite's GB/s counts the same bytes)."""
    if int4:
        weights = n * k // 2 + 2 * n * (k // group_size) * scale_bytes
        wf = "N*K/2 + 2*N*(K/g)*scale_bytes"
    else:
        weights = n * k + n * scale_bytes
        wf = "N*K + N*scale_bytes"
    io = (m * k + m * n + (n if bias else 0)) * elem_bytes
    return Count(float(weights + io), f"{wf} + (M*K + M*N{' + N' if bias else ''})*elem")


# ---- the fused decode ops (gptkernels/decode.py) ---------------------------------------------------


def rotary_append_bytes(batch: int, heads_q: int, heads_kv: int, head_dim: int, rotary_dim: int,
                        elem_bytes: int, cache_elem_bytes: int | None = None) -> Count:
    """rotary_append of one token per sequence: q read and written (rotated out of place), the new k
    and v read and written to their cache slots (an fp8 cache: 1 byte each, and the two per-head
    float32 scales), one cos and one sin row (float32) per token, its block-table entry (int32) and
    its start (int64)."""
    ce = elem_bytes if cache_elem_bytes is None else cache_elem_bytes
    value = (2 * batch * heads_q * head_dim + 2 * batch * heads_kv * head_dim) * elem_bytes + \
        2 * batch * heads_kv * head_dim * ce + 2 * batch * (rotary_dim // 2) * 4 + 12 * batch
    formula = "(2*B*Hq*D + 2*B*Hkv*D)*elem + 2*B*Hkv*D*cache_elem + 2*B*(R/2)*4 (cos, sin) + 12*B (table, start)"
    if ce != elem_bytes:
        value += 2 * heads_kv * 4
        formula += " + 2*Hkv*4 (fp8 scales)"
    return Count(float(value), formula)


def add_layer_norm_bytes(rows: int, width: int, elem_bytes: int, *, deltas: int, norms: int,
                         affine: bool = True) -> Count:
    """add_layer_norm: x and the deltas read, the sum written (with deltas), each norm's output
    written, each norm's weight and bias read."""
    streams = 1 + deltas + (1 if deltas else 0) + norms
    params = 2 * norms * width if affine else 0
    return Count(float((streams * rows * width + params) * elem_bytes),
                 f"({streams}*M*C + {2 * norms if affine else 0}*C)*elem")


def fused_linear_bytes(m: int, n: int, k: int, elem_bytes: int, *, bias: bool = True, norm: bool = False,
                       residual: bool = False, cache: bool = False) -> Count:
    """fused_linear: the weight, x (and the LayerNorm's weight and bias, the bias, the residual) read
    once, y written once (with the cache append: its k/v columns written to their slots instead,
    plus each row's position (int64) and block-table entry (int32))."""
    value = n * k + m * k + m * n + (n if bias else 0) + (2 * k if norm else 0) + (m * n if residual else 0)
    f = "N*K + M*K + M*N" + (" + N" if bias else "") + (" + 2*K (norm)" if norm else "") + \
        (" + M*N (residual)" if residual else "")
    extra, ef = (12 * m, " + 12*M (position, table entry)") if cache else (0, "")
    return Count(float(value * elem_bytes + extra), f"({f})*elem{ef}")


def window_pairs(seqlen_q: int, seqlen_k: int, left: int, right: int) -> int:
    """Visible (query, key) pairs of FlashAttention's ``window_size=(left, right)`` without causality
    (-1: that side unbounded), bottom-right aligned: row i at p = i + Sk - Sq sees keys
    max(0, p - left) .. min(Sk - 1, p + right)."""
    shift, total = seqlen_k - seqlen_q, 0
    for i in range(seqlen_q):
        p = i + shift
        lo = 0 if left < 0 else max(0, p - left)
        hi = seqlen_k - 1 if right < 0 else min(seqlen_k - 1, p + right)
        total += max(0, hi - lo + 1)
    return total


def attention_pair_flops(batch: int, heads: int, pairs: int, head_dim: int, head_dim_v: int | None = None, *,
                         backward: bool = False) -> Count:
    """Matmul FLOPs of attention over ``pairs`` visible (query, key) pairs per head: QK^T costs 2*D and
    PV 2*Dv per pair (Dv = D unless the value head dim differs); backward 2.5x. Soft cap and ALiBi
    add elementwise work only, not counted (the same useful work as plain attention)."""
    dv = head_dim if head_dim_v is None else head_dim_v
    flops = 2.0 * batch * heads * pairs * (head_dim + dv)
    formula = "2*B*H*pairs*(D+Dv)" if head_dim_v is not None else "4*B*H*D*pairs"
    if backward:
        return Count(2.5 * flops, f"2.5*[{formula}]")
    return Count(flops, formula)


def kvcache_decode_bytes(batch: int, cache_len: int, new: int, heads_q: int, heads_kv: int, head_dim: int,
                         elem_bytes: int, rotary_dim: int = 0) -> Count:
    """flash_attn_with_kvcache, one step: K and V of every key read once (the ``new`` appended ones
    included, written once), q read and out written once, the rotary rows (float32 cos, sin) of the
    new positions read once."""
    keys = cache_len + new
    value = (2 * batch * keys * heads_kv * head_dim + 2 * batch * new * heads_kv * head_dim
             + 2 * batch * new * heads_q * head_dim) * elem_bytes + 2 * batch * new * (rotary_dim // 2) * 4
    return Count(float(value), "(2*B*(L+n)*Hkv*D + 2*B*n*Hkv*D + 2*B*n*Hq*D)*elem + 2*B*n*(R/2)*4")
