"""gptkernels: fused attention, rotary embedding and paged KV-cache kernels for GPT-family models.

Every op takes ``backend=None | "triton" | "cuda" | "torch"``; see :func:`backends`.
"""

from ._backend import BackendUnavailableError, backends
from .attention import flash_attn, sdpa
from .decode import flash_attn_with_kvcache
from .kv_cache import CacheFullError, PagedKVCache
from .paged import paged_append, paged_decode
from .quant import dequantize_int4, dequantize_int8, int4_linear, int8_linear, quantize_int4, quantize_int8
from .rotary import apply_rotary, rotary_cos_sin

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "CacheFullError",
    "PagedKVCache",
    "apply_rotary",
    "backends",
    "dequantize_int4",
    "dequantize_int8",
    "flash_attn",
    "flash_attn_with_kvcache",
    "int4_linear",
    "int8_linear",
    "paged_append",
    "paged_decode",
    "quantize_int4",
    "quantize_int8",
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
