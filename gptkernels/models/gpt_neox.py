"""GPT-NeoX (Pythia): rotary positions, no position table. Quirks that change numbers:

* the fused ``query_key_value`` output is laid out per head, (H, 3, D): it is regrouped to
  q | k | v on load;
* partial rotary: only the first ``rotary_pct * head_dim`` channels rotate (GPT-NeoX half-split
  pairing), with HF's rope scaling if the config has one;
* ``use_parallel_residual`` (default): x + attn(ln1(x)) + mlp(ln2(x)); else sequential pre-LN;
* an untied output embedding (``embed_out``, ``lm_head`` in transformers >= 5).
"""

from __future__ import annotations

from ._convert import StateDict, cfg_bool, cfg_float, cfg_int, cfg_str
from .config import ModelConfig

MODEL_TYPE = "gpt_neox"


def rope_parameters(d: dict) -> dict:
    """HF's rope parameters (rope_theta, partial_rotary_factor, rope_type and scaling keys), from a
    transformers >= 5 config or an older config.json (rotary_pct, rotary_emb_base, rope_scaling).

    Exactly what GPTNeoXConfig does: ``rope_scaling`` wins over ``rope_parameters``; a missing
    theta / rotary fraction comes from ``rotary_emb_base`` / ``rotary_pct`` (defaults 10000 and
    0.25), never from a top-level ``rope_theta``, which GPT-NeoX ignores."""
    source = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    params = d.get(source) or {}
    if not isinstance(params, dict):
        raise TypeError(f"from_hf_config: config field {source!r} must be a JSON object, got {params!r}")
    params = dict(params)
    # Each value is checked where the file holds it, so an error names the key the file has.
    if params.get("rope_theta") is None:
        params["rope_theta"] = cfg_float(d, "rotary_emb_base", default=10000.0, positive=True)
    if params.get("partial_rotary_factor") is None:
        params["partial_rotary_factor"] = cfg_float(d, "rotary_pct", default=0.25, maximum=1.0)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def config_from_hf(d: dict) -> ModelConfig:
    hidden = cfg_int(d, "hidden_size")
    heads = cfg_int(d, "num_attention_heads")
    max_positions = cfg_int(d, "max_position_embeddings")
    rope = rope_parameters(d)
    fraction = cfg_float(rope, "partial_rotary_factor", maximum=1.0)  # from rope_scaling/_parameters
    theta = cfg_float(rope, "rope_theta", positive=True)
    rotary_dim = int((hidden // heads) * fraction)
    scaling = None
    if rope["rope_type"] != "default":
        scaling = {k: v for k, v in rope.items() if k not in ("partial_rotary_factor", "type")}
        if rope["rope_type"] == "dynamic":
            # HF's dynamic NTK always scales from max_position_embeddings (it ignores an
            # original_max_position_embeddings key): positions below it keep the default frequencies.
            scaling["original_max_position_embeddings"] = max_positions
    bias = cfg_bool(d, "attention_bias", default=True)
    return ModelConfig(
        family="gpt-neox", vocab_size=cfg_int(d, "vocab_size"), hidden_size=hidden,
        num_layers=cfg_int(d, "num_hidden_layers"), num_heads=heads,
        intermediate_size=cfg_int(d, "intermediate_size"), max_positions=max_positions,
        activation=cfg_str(d, "hidden_act", default="gelu"),
        norm_eps=cfg_float(d, "layer_norm_eps", default=1e-5), qkv_bias=bias, out_bias=bias,
        learned_positions=False, rotary_dim=rotary_dim, rope_base=theta,
        rope_scaling=scaling, parallel_residual=cfg_bool(d, "use_parallel_residual", default=True),
        tie_word_embeddings=cfg_bool(d, "tie_word_embeddings", default=False),
        bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"), extra={"model_type": MODEL_TYPE})


def _qkv_per_head_to_grouped(t, heads: int):
    """(H * 3 * D, ...) rows ordered (head, q/k/v, d) -> (3 * H * D, ...) ordered (q/k/v, head, d)."""
    rest = t.shape[1:]
    return t.reshape(heads, 3, -1, *rest).transpose(0, 1).reshape(-1, *rest)


def convert_state_dict(cfg: ModelConfig, state_dict: dict) -> dict:
    sd = StateDict(state_dict, ("gpt_neox.",),
                   ignore=(".attention.bias", ".attention.masked_bias", ".attention.rotary_emb.inv_freq"))
    sd.put("tok_emb.weight", sd.take("embed_in.weight"))
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}", f"layers.{i}"
        sd.norm(f"{dst}.norm1", f"{src}.input_layernorm")
        sd.put(f"{dst}.attn.qkv.weight",
               _qkv_per_head_to_grouped(sd.take(f"{src}.attention.query_key_value.weight"), cfg.num_heads))
        if cfg.qkv_bias:
            sd.put(f"{dst}.attn.qkv.bias",
                   _qkv_per_head_to_grouped(sd.take(f"{src}.attention.query_key_value.bias"), cfg.num_heads))
        sd.linear(f"{dst}.attn.out", f"{src}.attention.dense", bias=cfg.out_bias)
        sd.norm(f"{dst}.norm2", f"{src}.post_attention_layernorm")
        sd.linear(f"{dst}.mlp.fc_in", f"{src}.mlp.dense_h_to_4h")
        sd.linear(f"{dst}.mlp.fc_out", f"{src}.mlp.dense_4h_to_h")
    sd.norm("norm_f", "final_layer_norm")
    for name in ("embed_out.weight", "lm_head.weight"):  # older checkpoints / transformers >= 5
        if sd.has(name):
            head = sd.take(name)
            if not cfg.tie_word_embeddings:
                sd.put("lm_head.weight", head)
    if not cfg.tie_word_embeddings and "lm_head.weight" not in sd.out:
        raise ValueError("load_hf_state_dict: state_dict has no output embedding (embed_out.weight or "
                         "lm_head.weight) and the config does not tie it to the input embedding")
    return sd.finish()
