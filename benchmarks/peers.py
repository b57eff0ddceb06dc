"""What users would pick instead of our kernels: torch SDPA per backend, FlexAttention compiled.

Everything here is imported lazily and fails per row (an error or unavailable row), never the run.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

#: torch SDPA's fused backends, each forced with torch.nn.attention.sdpa_kernel.
SDPA_BACKENDS = ("flash", "cudnn", "efficient")


def sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def sdpa(name: str, q, k, v, *, is_causal: bool, enable_gqa: bool = False):
    """torch SDPA forced onto one backend; q/k/v in SDPA's (B, H, L, E) layout."""
    from torch.nn.attention import sdpa_kernel

    kw = {"enable_gqa": True} if enable_gqa else {}
    with sdpa_kernel(sdpa_backend(name)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, **kw)


def allow_many_compiles() -> None:
    """Every benchmark shape is a new compile of the same function: lift dynamo's recompile limit so
    it never falls back to eager FlexAttention (which would be timed instead, silently)."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 512))


@functools.lru_cache(maxsize=None)
def flex_compiled():
    """FlexAttention compiled once (static shapes: one kernel per benchmark shape)."""
    from torch.nn.attention.flex_attention import flex_attention

    allow_many_compiles()
    return torch.compile(flex_attention, dynamic=False)


def causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window_mod(window: int):
    """SPEC's window: a query sees at most W keys, itself included (q - W < kv <= q)."""

    def mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return mod


def flex_block_mask(mask_mod, seqlen_q: int, seqlen_k: int, device, batch=None, block_size=None):
    from torch.nn.attention.flex_attention import create_block_mask

    kw = {} if block_size is None else {"BLOCK_SIZE": block_size}
    return create_block_mask(mask_mod, batch, None, seqlen_q, seqlen_k, device=device, **kw)
