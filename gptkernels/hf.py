"""Our attention inside Hugging Face transformers models: ``attn_implementation="gptkernels"``.

    import gptkernels.hf
    gptkernels.hf.register()                       # once per process
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="gptkernels")

Any model whose attention goes through transformers' ``AttentionInterface`` (GPT-2, GPT-NeoX, OPT,
Llama, Mistral, Qwen2, ... : not GPT-Neo, whose HF code has its own attention classes) then runs
:func:`gptkernels.sdpa` wherever transformers would call torch's SDPA without a mask: unpadded
prefill (causal) and decode with a KV cache (one query row against all keys), GQA without repeating
K/V, forward and backward. The semantics are transformers' ``"sdpa"`` implementation exactly: the
same mask preparation (its ``sdpa`` mask function is registered under our name too), and every call
that needs a mask (padding, packed sequences, a sliding window longer than the keys seen, custom
mask overlays) or that SDPA itself serves differently (position bias, paged continuous-batching
caches, softcap) is handed to transformers' own ``sdpa_attention_forward`` unchanged. Nothing is
approximated; the fast path is the maskless one.
"""

from __future__ import annotations

from typing import Optional

import torch

from .attention import sdpa

NAME = "gptkernels"
#: Keyword arguments that change the attention math in ways neither we nor transformers' sdpa
#: function compute (gpt-oss and others pass attention sinks as ``s_aux``): refused, never dropped.
UNSUPPORTED = ("s_aux",)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None, *,
                      gptkernels_backend: Optional[str] = None, **kwargs):
    """transformers' attention-function signature: query (B, Hq, L, D), key/value (B, Hkv, S, D)
    -> (output (B, L, Hq, D), None). ``gptkernels_backend`` pins a backend (default: resolved)."""
    for name in UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation={NAME!r}: this model passes {name} (attention sinks), "
                             "which gptkernels does not compute; use attn_implementation='eager'")
    if (attention_mask is not None or query.shape[0] != key.shape[0]  # a batch-1 query broadcast
            or any(kwargs.get(k) is not None for k in ("position_bias", "cache", "softcap"))):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    # As transformers' sdpa (5.x): causal only with more than one query row (a decode row sees every
    # key), top-left aligned (keys past the last query row, e.g. a static cache's empty tail, unseen).
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = sdpa(query, key, value, dropout_p=dropout, is_causal=bool(causal) and query.shape[2] > 1,
               scale=scaling, enable_gqa=query.shape[1] != key.shape[1], backend=gptkernels_backend)
    return out.transpose(1, 2).contiguous(), None  # (B, L, H, D): a no-op when the kernels ran


def register(name: str = NAME, backend: Optional[str] = None) -> str:
    """Register :func:`attention_forward` (and transformers' sdpa mask preparation) as
    ``attn_implementation=name``; ``backend`` pins "triton", "cuda" or "torch". Returns ``name``."""
    import functools

    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if not isinstance(name, str) or not name or name in ("sdpa", "eager") or "flash" in name:
        raise ValueError(f"register: name must be a new implementation name, got {name!r}")
    fn = attention_forward if backend is None else functools.partial(attention_forward, gptkernels_backend=backend)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return name
