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
