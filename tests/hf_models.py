"""Tiny random Hugging Face models and our models with the same weights, for the model tests.

Configs are built locally (nothing is downloaded); HF models use ``attn_implementation="eager"``
and float32, the outside judge of :mod:`gptkernels.models`.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from gptkernels.models import TINY, from_config  # noqa: E402
from tests.helpers import DEVICE  # noqa: E402

#: Every family and the variants whose quirks change numbers (tiny: 2 layers, hidden 64 or less).
VARIANTS = {
    "gpt2": TINY["gpt2"],
    "gpt2-unscaled-inverse-layer": dict(TINY["gpt2"], scale_attn_weights=False,
                                        scale_attn_by_inverse_layer_idx=True),
    "gpt2-untied": dict(TINY["gpt2"], tie_word_embeddings=False, n_inner=96, activation_function="gelu"),
    "gpt-neo-window4": dict(TINY["gpt-neo"], window_size=4),  # local layer, window < sequence
    "gpt-neox-parallel-pct0.5": TINY["gpt-neox"],
    "gpt-neox-sequential-pct0.25": dict(TINY["gpt-neox"], use_parallel_residual=False, rotary_pct=0.25),
    "gpt-neox-linear-rope": dict(TINY["gpt-neox"], rotary_pct=1.0, rotary_emb_base=500,
                                 rope_scaling={"type": "linear", "factor": 2.0}),
    # HF's dynamic NTK scales from max_position_embeddings whatever original_max_position_embeddings
    # says: below it, the default frequencies.
    "gpt-neox-dynamic-rope": dict(TINY["gpt-neox"], rotary_pct=1.0, rope_scaling={
        "rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64}),
    # A transformers-5 style dict without partial_rotary_factor: it comes from rotary_pct (0.5).
    "gpt-neox-rope-parameters": dict(TINY["gpt-neox"], rope_parameters={"rope_type": "default",
                                                                        "rope_theta": 500.0}),
    "opt-pre-ln-project": TINY["opt"],  # word_embed_proj_dim 32 != hidden 64: project_in/out
    "opt-post-ln": dict(TINY["opt"], do_layer_norm_before=False, word_embed_proj_dim=64),
}

#: One per family, for the slow paths (triton interpreter, generation).
FAMILY_VARIANTS = ["gpt2", "gpt-neo-window4", "gpt-neox-parallel-pct0.5", "opt-pre-ln-project"]


def hf_config(d: dict):
    # A deep copy: HF's configs fill in nested dicts they are given (rope_scaling gains rope_theta,
    # partial_rotary_factor...), which would change VARIANTS for every later test.
    d = copy.deepcopy(d)
    return transformers.AutoConfig.for_model(d.pop("model_type"), **d)


def hf_model(d: dict, seed: int = 0, device=DEVICE):
    """A random HF model in float32, eager attention. Weights N(0, 0.2), vectors U(-0.5, 0.5): large
    enough that every layer changes the logits."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(d), attn_implementation="eager")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            else:
                p.uniform_(-0.5, 0.5)
    return model.to(device).eval()


def pair(d: dict, seed: int = 0, device=DEVICE):
    """(HF model, our model with the same weights), both float32 on ``device``."""
    hf = hf_model(d, seed, device)
    ours = from_config(d, device=device)
    ours.load_hf_state_dict(hf.state_dict())
    return hf, ours


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, as HF's generate (and OPT's forward) compute them."""
    return (mask.long().cumsum(1) - 1).clamp_min(0)


def padded_batch(batch: int, seq: int, vocab: int, *, left=(), right=(), seed: int = 0, device=DEVICE):
    """Random ids (B, S) and a mask; ``left``/``right``: (row, pad count) pairs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, n in left:
        mask[row, :n] = 0
    for row, n in right:
        mask[row, seq - n:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device)
