"""Triton kernels and their launchers.

Each launcher has the same name and signature as its twin in :mod:`gptkernels.cuda`, so the public
ops dispatch to either with one lookup (:func:`gptkernels._dispatch.backend_fn`). Import this package only after
deciding on ``TRITON_INTERPRET``: Triton reads it when the kernels are defined.
"""

from .flash_attn import flash_attn_backward, flash_attn_forward
from .fused import add_layer_norm, fused_linear, rotary_append
from .paged import paged_append, paged_decode
from .quant import int4_linear, int8_linear
from .rotary import apply_rotary

__all__ = ["add_layer_norm", "apply_rotary", "flash_attn_backward", "flash_attn_forward", "fused_linear",
           "int4_linear", "int8_linear", "paged_append", "paged_decode", "rotary_append"]
