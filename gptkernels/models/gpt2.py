"""GPT-2: learned positions, pre-LN blocks, tied LM head.

Quirks that change numbers:
* Conv1D layers store weights as (in, out): transposed on load.
* ``scale_attn_weights`` (1/sqrt(head_dim), on by default) and ``scale_attn_by_inverse_layer_idx``
  (an extra 1/(layer + 1)) give each layer its own softmax scale.
"""

from __future__ import annotations

import math

from ._convert import StateDict, cfg_bool, cfg_float, cfg_int, cfg_str
from .config import ModelConfig

MODEL_TYPE = "gpt2"


def config_from_hf(d: dict) -> ModelConfig:
    if d.get("add_cross_attention"):
        raise ValueError("from_hf_config: GPT-2 with cross-attention (add_cross_attention) is not supported")
    hidden = cfg_int(d, "n_embd", "hidden_size")
    heads = cfg_int(d, "n_head", "num_attention_heads")
    layers = cfg_int(d, "n_layer", "num_hidden_layers")
    scale_weights = cfg_bool(d, "scale_attn_weights", default=True)
    scale_inverse_layer = cfg_bool(d, "scale_attn_by_inverse_layer_idx", default=False)
    scales = []
    for i in range(layers):
        s = 1.0 / math.sqrt(hidden // heads) if scale_weights else 1.0
        if scale_inverse_layer:
            s /= float(i + 1)
        scales.append(s)
    return ModelConfig(
        family="gpt2", vocab_size=cfg_int(d, "vocab_size"), hidden_size=hidden, num_layers=layers,
        num_heads=heads, intermediate_size=cfg_int(d, "n_inner", default=None) or 4 * hidden,
        max_positions=cfg_int(d, "n_positions", "max_position_embeddings"),
        activation=cfg_str(d, "activation_function", default="gelu_new"),
        norm_eps=cfg_float(d, "layer_norm_epsilon", default=1e-5), softmax_scales=scales,
        tie_word_embeddings=cfg_bool(d, "tie_word_embeddings", default=True),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"), extra={"model_type": MODEL_TYPE})


def convert_state_dict(cfg: ModelConfig, state_dict: dict) -> dict:
    sd = StateDict(state_dict, ("transformer.",), ignore=(".attn.bias", ".attn.masked_bias"))
    sd.put("tok_emb.weight", sd.take("wte.weight"))
    sd.put("pos_emb.weight", sd.take("wpe.weight"))
    for i in range(cfg.num_layers):
        src, dst = f"h.{i}", f"layers.{i}"
        sd.norm(f"{dst}.norm1", f"{src}.ln_1")
        sd.linear(f"{dst}.attn.qkv", f"{src}.attn.c_attn", transpose=True)  # columns already q | k | v
        sd.linear(f"{dst}.attn.out", f"{src}.attn.c_proj", transpose=True)
        sd.norm(f"{dst}.norm2", f"{src}.ln_2")
        sd.linear(f"{dst}.mlp.fc_in", f"{src}.mlp.c_fc", transpose=True)
        sd.linear(f"{dst}.mlp.fc_out", f"{src}.mlp.c_proj", transpose=True)
    sd.norm("norm_f", "ln_f")
    if sd.has("lm_head.weight"):
        head = sd.take("lm_head.weight")
        if not cfg.tie_word_embeddings:
            sd.put("lm_head.weight", head)
    return sd.finish()
