"""gptkernels: fused attention, rotary embedding and paged KV-cache kernels for GPT-family models.

Every op takes ``backend=None | "triton" | "cuda" | "torch"``; see :func:`backends`.
"""

from ._backend import BackendUnavailableError, backends
from .attention import flash_attn, sdpa
from .kv_cache import CacheFullError, PagedKVCache
from .paged import paged_append, paged_decode
from .rotary import apply_rotary, rotary_cos_sin

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CacheFullError",
    "PagedKVCache",
    "apply_rotary",
    "backends",
    "flash_attn",
    "paged_append",
    "paged_decode",
    "rotary_cos_sin",
    "sdpa",
    "generate",
]


def __getattr__(name):
    # generate pulls in the model code; load it on first use.
    if name == "generate":
        from .generation import generate

        return generate
    raise AttributeError(f"module 'gptkernels' has no attribute {name!r}")
