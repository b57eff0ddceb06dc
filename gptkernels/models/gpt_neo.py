"""GPT-Neo: GPT-2's layout with separate q/k/v projections, and two quirks that change numbers:

* no 1/sqrt(head_dim) softmax scaling (softmax_scale = 1.0);
* layers alternate global and local attention (``attention_types``); local layers see the last
  ``window_size`` tokens, themselves included. They run our sliding-window kernels on every backend
  (HF's own flash-attention path drops the window).
"""

from __future__ import annotations

import torch

from ._convert import StateDict, cfg_bool, cfg_float, cfg_get, cfg_int, cfg_str
from .config import ModelConfig

MODEL_TYPE = "gpt_neo"


def attention_layers(d: dict) -> list[str]:
    """``attention_types`` ([[["global", "local"], 12]]) expanded to one entry per layer."""
    if d.get("attention_types") is not None:
        layers = []
        try:
            for kinds, repeat in d["attention_types"]:
                if isinstance(repeat, bool) or not isinstance(repeat, int) or isinstance(kinds, str):
                    raise TypeError
                for _ in range(repeat):
                    layers.extend(kinds)
        except (TypeError, ValueError):
            raise TypeError(f"from_hf_config: config field 'attention_types' must be a list of "
                            f"[[kinds...], repeat] pairs, got {d['attention_types']!r}") from None
        return layers
    layers = cfg_get(d, "attention_layers")
    if not isinstance(layers, (list, tuple)):
        raise TypeError(f"from_hf_config: config field 'attention_layers' must be a list, got {layers!r}")
    return list(layers)


def config_from_hf(d: dict) -> ModelConfig:
    hidden = cfg_int(d, "hidden_size")
    num_layers = cfg_int(d, "num_layers", "num_hidden_layers")
    kinds = attention_layers(d)
    if len(kinds) != num_layers or set(kinds) - {"global", "local"}:
        raise ValueError(f"from_hf_config: GPT-Neo attention_types must give 'global'/'local' for each "
                         f"of the {num_layers} layers, got {kinds}")
    window = cfg_int(d, "window_size", default=256)
    return ModelConfig(
        family="gpt-neo", vocab_size=cfg_int(d, "vocab_size"), hidden_size=hidden,
        num_layers=num_layers, num_heads=cfg_int(d, "num_heads", "num_attention_heads"),
        intermediate_size=cfg_int(d, "intermediate_size", default=None) or 4 * hidden,
        max_positions=cfg_int(d, "max_position_embeddings"),
        activation=cfg_str(d, "activation_function", default="gelu_new"),
        norm_eps=cfg_float(d, "layer_norm_epsilon", default=1e-5),
        softmax_scales=[1.0] * num_layers,
        windows=[window if k == "local" else None for k in kinds],
        qkv_bias=False, tie_word_embeddings=cfg_bool(d, "tie_word_embeddings", default=True),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"), extra={"model_type": MODEL_TYPE})


def convert_state_dict(cfg: ModelConfig, state_dict: dict) -> dict:
    sd = StateDict(state_dict, ("transformer.",),
                   ignore=(".attn.attention.bias", ".attn.attention.masked_bias"))
    sd.put("tok_emb.weight", sd.take("wte.weight"))
    sd.put("pos_emb.weight", sd.take("wpe.weight"))
    for i in range(cfg.num_layers):
        src, dst = f"h.{i}", f"layers.{i}"
        att = f"{src}.attn.attention"
        sd.norm(f"{dst}.norm1", f"{src}.ln_1")
        sd.put(f"{dst}.attn.qkv.weight", torch.cat([sd.take(f"{att}.{p}_proj.weight") for p in "qkv"]))
        sd.linear(f"{dst}.attn.out", f"{att}.out_proj")
        sd.norm(f"{dst}.norm2", f"{src}.ln_2")
        sd.linear(f"{dst}.mlp.fc_in", f"{src}.mlp.c_fc")
        sd.linear(f"{dst}.mlp.fc_out", f"{src}.mlp.c_proj")
    sd.norm("norm_f", "ln_f")
    if sd.has("lm_head.weight"):
        head = sd.take("lm_head.weight")
        if not cfg.tie_word_embeddings:
            sd.put("lm_head.weight", head)
    return sd.finish()
