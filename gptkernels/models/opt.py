"""OPT. Quirks that change numbers:

* learned positions are counted from the attention mask (``cumsum(mask) - 1``) and read row
  ``position + 2`` of the table (the offset of fairseq's padding rows);
* ``word_embed_proj_dim`` != hidden size (OPT-350m): ``project_in`` after the token embedding,
  ``project_out`` before the (tied) LM head;
* ``do_layer_norm_before=False`` (OPT-350m): post-LayerNorm blocks and no final LayerNorm;
* ReLU MLP; q is scaled by 1/sqrt(head_dim) (before the product in HF, in the softmax here).
"""

from __future__ import annotations

import torch

from ._convert import StateDict, cfg_bool, cfg_int, cfg_str
from .config import ModelConfig

MODEL_TYPE = "opt"


def config_from_hf(d: dict) -> ModelConfig:
    hidden = cfg_int(d, "hidden_size")
    norm_before = cfg_bool(d, "do_layer_norm_before", default=True)
    bias = cfg_bool(d, "enable_bias", default=True)
    return ModelConfig(
        family="opt", vocab_size=cfg_int(d, "vocab_size"), hidden_size=hidden,
        num_layers=cfg_int(d, "num_hidden_layers"), num_heads=cfg_int(d, "num_attention_heads"),
        intermediate_size=cfg_int(d, "ffn_dim"), max_positions=cfg_int(d, "max_position_embeddings"),
        activation=cfg_str(d, "activation_function", default="relu"), norm_eps=1e-5,
        norm_affine=cfg_bool(d, "layer_norm_elementwise_affine", default=True),
        qkv_bias=bias, out_bias=bias, mlp_bias=bias, position_offset=2, norm_before=norm_before,
        final_norm=norm_before and not cfg_bool(d, "_remove_final_layer_norm", default=False),
        embed_dim=cfg_int(d, "word_embed_proj_dim", default=hidden),
        tie_word_embeddings=cfg_bool(d, "tie_word_embeddings", default=True),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"), extra={"model_type": MODEL_TYPE})


def convert_state_dict(cfg: ModelConfig, state_dict: dict) -> dict:
    sd = StateDict(state_dict, ("model.decoder.", "decoder."))
    affine = cfg.norm_affine
    sd.put("tok_emb.weight", sd.take("embed_tokens.weight"))
    sd.put("pos_emb.weight", sd.take("embed_positions.weight"))
    if cfg.embed_dim != cfg.hidden_size:
        sd.linear("proj_in", "project_in", bias=False)
        sd.linear("proj_out", "project_out", bias=False)
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}", f"layers.{i}"
        att = f"{src}.self_attn"
        sd.norm(f"{dst}.norm1", f"{src}.self_attn_layer_norm", affine)
        sd.put(f"{dst}.attn.qkv.weight", torch.cat([sd.take(f"{att}.{p}_proj.weight") for p in "qkv"]))
        if cfg.qkv_bias:
            sd.put(f"{dst}.attn.qkv.bias", torch.cat([sd.take(f"{att}.{p}_proj.bias") for p in "qkv"]))
        sd.linear(f"{dst}.attn.out", f"{att}.out_proj", bias=cfg.out_bias)
        sd.norm(f"{dst}.norm2", f"{src}.final_layer_norm", affine)
        sd.linear(f"{dst}.mlp.fc_in", f"{src}.fc1", bias=cfg.mlp_bias)
        sd.linear(f"{dst}.mlp.fc_out", f"{src}.fc2", bias=cfg.mlp_bias)
    if cfg.final_norm:
        sd.norm("norm_f", "final_layer_norm", affine)
    if sd.has("lm_head.weight"):
        head = sd.take("lm_head.weight")
        if not cfg.tie_word_embeddings:
            sd.put("lm_head.weight", head)
    return sd.finish()
