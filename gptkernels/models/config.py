"""The model config: :class:`ModelConfig`, the switches in which the four families differ.

Plain data (a dataclass, JSON-friendly). The family files (:mod:`gptkernels.models.gpt2` etc.) build
it from a Hugging Face config; :mod:`gptkernels.models.common` builds the model from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.nn.functional as F

from .._policy import softmax_scale as default_softmax_scale

FAMILIES = ("gpt2", "gpt-neo", "gpt-neox", "opt")

#: HF activation names -> function. The tanh forms are the same formula HF's NewGELU computes.
ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


@dataclass
class ModelConfig:
    """Everything that shapes a model's numbers. Built from an HF config by
    :func:`gptkernels.models.from_hf_config`; every field is plain data (dataclass, JSON-friendly)."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    activation: str = "gelu_new"
    norm_eps: float = 1e-5
    norm_affine: bool = True           # OPT's layer_norm_elementwise_affine
    #: per-layer softmax scale; None -> 1/sqrt(head_dim) for every layer
    softmax_scales: Optional[list[float]] = None
    #: per-layer sliding window (GPT-Neo's local layers); None -> every layer global
    windows: Optional[list[Optional[int]]] = None
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    #: learned absolute position embeddings (GPT-2, GPT-Neo, OPT); False for rotary models
    learned_positions: bool = True
    position_offset: int = 0           # OPT: position p reads row p + 2 of its table
    rotary_dim: int = 0                # GPT-NeoX: channels that rotate (rotary_pct * head_dim)
    rope_base: float = 10000.0
    rope_scaling: Optional[dict] = None
    parallel_residual: bool = False    # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    norm_before: bool = True           # False: OPT-350m's post-LayerNorm blocks
    final_norm: bool = True
    embed_dim: Optional[int] = None    # OPT's word_embed_proj_dim (project_in/out when != hidden)
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    extra: dict = field(default_factory=dict)  # anything the family wants to keep (model_type...)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig: family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig: {name} must be an int >= 1, got {value!r}")
        for name, positive in (("norm_eps", False), ("rope_base", True)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or value < 0 or (positive and value == 0)):
                raise ValueError(f"ModelConfig: {name} must be a finite number {'> 0' if positive else '>= 0'}, "
                                 f"got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ModelConfig: hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_heads ({self.num_heads})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"ModelConfig: activation must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.activation!r}")
        for name in ("softmax_scales", "windows"):
            value = getattr(self, name)
            if value is not None and len(value) != self.num_layers:
                raise ValueError(f"ModelConfig: {name} must have one entry per layer "
                                 f"({self.num_layers}), got {len(value)}")
        if self.windows is not None:
            for w in self.windows:
                if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
                    raise ValueError(f"ModelConfig: windows must hold None or ints >= 1, got {w!r}")
        if self.rotary_dim:
            if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
                raise ValueError(f"ModelConfig: rotary_dim must be even and at most head_dim "
                                 f"({self.head_dim}), got {self.rotary_dim}")
        if self.embed_dim is None:
            self.embed_dim = self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def softmax_scale(self, layer: int) -> float:
        return default_softmax_scale(self.head_dim, None if self.softmax_scales is None
                                     else self.softmax_scales[layer])

    def window(self, layer: int) -> Optional[int]:
        return None if self.windows is None else self.windows[layer]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}
