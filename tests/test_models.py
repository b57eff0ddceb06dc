"""Reference models against Hugging Face transformers (the outside judge) and against our own eager
baseline: logits of every family and variant, on the torch backend and the Triton kernels."""

from __future__ import annotations

import pytest
import torch

from gptkernels.models import CausalLM, ModelConfig, from_config, from_hf_config
from tests.helpers import DEVICE, DTYPES, assert_parity
from tests.hf_models import FAMILY_VARIANTS, VARIANTS, hf_config, hf_positions, padded_batch, pair

TOL = 1e-4  # float32 logits vs HF eager


def _hf_logits(hf, ids, mask=None):
    with torch.no_grad():
        if mask is None:
            return hf(ids).logits
        # HF's GPT-2/Neo/NeoX forward counts positions with arange(S) even when padded; its
        # generate (and OPT's forward) count real tokens, which is what our models do.
        return hf(ids, attention_mask=mask, position_ids=hf_positions(mask)).logits


def _max_err(a, b, mask=None):
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf_torch_backend(variant):
    hf, ours = pair(VARIANTS[variant])
    vocab = ours.config.vocab_size
    ids, _ = padded_batch(2, 17, vocab, seed=1)
    with torch.no_grad():
        got = ours(ids, backend="torch")
    assert got.shape == (2, 17, vocab)
    assert _max_err(got, _hf_logits(hf, ids)) <= TOL
    # A padded batch: left padding, none, right padding.
    ids, mask = padded_batch(3, 17, vocab, left=[(0, 5)], right=[(2, 3)], seed=2)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, backend="torch")
    assert _max_err(got, _hf_logits(hf, ids, mask), mask) <= TOL
    assert bool((got[~mask.bool()] == 0).all()), "padded positions must get logits 0"


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_logits_match_hf_triton_backend(variant):
    hf, ours = pair(VARIANTS[variant])
    ids, mask = padded_batch(2, 11, ours.config.vocab_size, left=[(0, 4)], seed=3)
    with torch.no_grad():
        dense = ours(ids, backend="triton")
        packed = ours(ids, attention_mask=mask, backend="triton")
    assert _max_err(dense, _hf_logits(hf, ids)) <= TOL
    assert _max_err(packed, _hf_logits(hf, ids, mask), mask) <= TOL


def test_gpt2_opt_positions_follow_hf_forward():
    """With explicit position_ids our forward equals HF's forward on a padded batch, including
    GPT-2's arange(S) positions (what HF's GPT-2 forward does without position_ids)."""
    hf, ours = pair(VARIANTS["gpt2"])
    ids, mask = padded_batch(2, 9, ours.config.vocab_size, left=[(1, 3)], seed=4)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        pos = torch.arange(9, device=DEVICE).expand(2, 9)
        got = ours(ids, attention_mask=mask, position_ids=pos, backend="torch")
    assert _max_err(got, ref, mask) <= TOL
    # OPT counts positions from the mask in its own forward: no position_ids needed.
    hf, ours = pair(VARIANTS["opt-pre-ln-project"])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask, backend="torch")
    assert _max_err(got, ref, mask) <= TOL


def test_padding_does_not_change_real_tokens():
    """A left-padded row gives the same logits as the same prompt alone (packing is exact)."""
    _, ours = pair(VARIANTS["gpt-neo-window4"])
    ids, mask = padded_batch(2, 13, ours.config.vocab_size, left=[(0, 6)], seed=5)
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask, backend="torch")
        alone = ours(ids[:1, 6:], backend="torch")
    assert _max_err(batched[0, 6:], alone[0]) <= 1e-5


# --------------------------------------------------------------------------------------------------
# Our kernel backend against our eager baseline (SPEC's parity rule on the logits)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize("variant", ["gpt-neo-window4", "gpt-neox-parallel-pct0.5"])
def test_triton_backend_parity_low_precision(variant, dtype):
    hf, ours = pair(VARIANTS[variant])
    ids, mask = padded_batch(2, 10, ours.config.vocab_size, left=[(1, 3)], seed=6)
    with torch.no_grad():
        ref = _hf_logits(hf.double(), ids, mask)  # the float64 reference: same weights, HF eager
        model = ours.to(dtype)
        base = model(ids, attention_mask=mask, backend="torch")
        out = model(ids, attention_mask=mask, backend="triton")
    m = mask.bool()
    assert out.dtype == dtype
    assert_parity(out[m], ref[m], base[m], name=f"{variant} logits")


# --------------------------------------------------------------------------------------------------
# Configs and bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_from_object_equals_from_dict(variant):
    d = VARIANTS[variant]
    assert from_hf_config(hf_config(d)) == from_hf_config(d)


def test_config_quirks():
    gpt2 = from_hf_config(VARIANTS["gpt2-unscaled-inverse-layer"])
    assert gpt2.softmax_scales == [1.0, 0.5]
    neo = from_hf_config(VARIANTS["gpt-neo-window4"])
    assert neo.windows == [None, 4] and neo.softmax_scales == [1.0, 1.0] and not neo.qkv_bias
    neox = from_hf_config(VARIANTS["gpt-neox-sequential-pct0.25"])
    assert neox.rotary_dim == 4 and not neox.parallel_residual and not neox.tie_word_embeddings
    neox = from_hf_config(VARIANTS["gpt-neox-rope-parameters"])  # rotary fraction from rotary_pct
    assert neox.rotary_dim == 8 and neox.rope_base == 500.0 and neox.rope_scaling is None
    neox = from_hf_config(VARIANTS["gpt-neox-dynamic-rope"])
    assert neox.rope_scaling["original_max_position_embeddings"] == neox.max_positions == 128
    opt = from_hf_config(VARIANTS["opt-post-ln"])
    assert opt.position_offset == 2 and not opt.norm_before and not opt.final_norm
    assert opt.activation == "relu"


def test_bad_config():
    with pytest.raises(ValueError, match="model_type"):
        from_hf_config({"model_type": "llama"})
    with pytest.raises(TypeError, match="config"):
        from_hf_config(42)
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(family="gpt2", vocab_size=8, hidden_size=30, num_layers=1, num_heads=4,
                    intermediate_size=8, max_positions=8)
    with pytest.raises(ValueError, match="activation"):
        from_hf_config(dict(VARIANTS["gpt2"], activation_function="tanh-ish"))
    with pytest.raises(ValueError, match="attention_types"):
        from_hf_config(dict(VARIANTS["gpt-neo-window4"], attention_types=[[["global"], 1]]))
    with pytest.raises(ValueError, match="norm_eps"):
        ModelConfig(family="gpt2", vocab_size=8, hidden_size=32, num_layers=1, num_heads=4,
                    intermediate_size=8, max_positions=8, norm_eps=float("nan"))
    with pytest.raises(ValueError, match="rope_base"):
        ModelConfig(family="gpt-neox", vocab_size=8, hidden_size=32, num_layers=1, num_heads=4,
                    intermediate_size=8, max_positions=8, rotary_dim=4, rope_base=0.0)


@pytest.mark.parametrize("variant,field,value,error", [
    ("gpt2", "n_head", 0, ValueError),                 # was ZeroDivisionError
    ("gpt2", "n_layer", "2", TypeError),               # was a TypeError naming no field
    ("gpt2", "n_embd", 64.0, TypeError),
    ("gpt2", "vocab_size", -1, ValueError),
    ("gpt2", "n_inner", True, TypeError),
    ("gpt2", "scale_attn_weights", "false", TypeError),  # a string would read as true
    ("gpt2", "layer_norm_epsilon", float("nan"), ValueError),
    ("gpt2", "activation_function", 3, TypeError),
    ("gpt-neo-window4", "num_heads", 0, ValueError),
    ("gpt-neo-window4", "window_size", 0, ValueError),
    ("gpt-neo-window4", "attention_types", [["global", "x"]], TypeError),
    ("gpt-neox-sequential-pct0.25", "num_attention_heads", 0, ValueError),
    ("gpt-neox-sequential-pct0.25", "rotary_pct", "0.25", TypeError),
    ("gpt-neox-sequential-pct0.25", "rotary_pct", 1.5, ValueError),
    ("gpt-neox-sequential-pct0.25", "rotary_emb_base", 0, ValueError),
    ("gpt-neox-sequential-pct0.25", "rope_scaling", "linear", TypeError),
    ("opt-post-ln", "num_hidden_layers", "2", TypeError),
    ("opt-post-ln", "word_embed_proj_dim", 0, ValueError),
    ("opt-post-ln", "do_layer_norm_before", 0, TypeError),
])
def test_bad_config_field_is_named(variant, field, value, error):
    """A config.json field of the wrong type or value is an error naming the field, raised where it
    is read (not a ZeroDivisionError or an anonymous TypeError further on)."""
    with pytest.raises(error, match=f"'{field}'"):
        from_hf_config(dict(VARIANTS[variant], **{field: value}))


def test_bad_state_dict():
    hf, ours = pair(VARIANTS["gpt2"])
    sd = hf.state_dict()
    missing = {k: v for k, v in sd.items() if "h.1.mlp.c_fc.weight" not in k}
    with pytest.raises(ValueError, match="state_dict has no weight"):
        ours.load_hf_state_dict(missing)
    with pytest.raises(ValueError, match="unexpected"):
        ours.load_hf_state_dict({**sd, "transformer.h.0.extra.weight": torch.zeros(1)})
    bad = dict(sd)
    bad["transformer.wpe.weight"] = torch.zeros(7, 64)
    with pytest.raises(ValueError, match="shape"):
        ours.load_hf_state_dict(bad)
    with pytest.raises(TypeError, match="state_dict"):
        ours.load_hf_state_dict([1, 2])


def test_bad_input():
    model: CausalLM = from_config(VARIANTS["gpt2"], device=DEVICE)
    ids, mask = padded_batch(2, 6, 128, left=[(0, 2)])
    with torch.no_grad():
        with pytest.raises(TypeError, match="input_ids"):
            model(ids.float(), backend="torch")
        with pytest.raises(ValueError, match="input_ids"):
            model(ids[0], backend="torch")
        with pytest.raises(ValueError, match="input_ids"):
            model(ids + 128, backend="torch")  # outside the vocabulary
        with pytest.raises(ValueError, match="input_ids"):
            model(torch.zeros(1, 129, dtype=torch.long, device=DEVICE), backend="torch")  # too long
        with pytest.raises(ValueError, match="attention_mask"):
            model(ids, attention_mask=mask[:, 1:], backend="torch")
        with pytest.raises(ValueError, match="attention_mask"):
            model(ids, attention_mask=mask * 2, backend="torch")
        holes = mask.clone()
        holes[1, 3] = 0
        with pytest.raises(ValueError, match="attention_mask"):
            model(ids, attention_mask=holes, backend="torch")
        with pytest.raises(ValueError, match="position_ids"):
            model(ids, position_ids=torch.zeros(2, 5, dtype=torch.long, device=DEVICE), backend="torch")
        with pytest.raises(ValueError, match="position_ids"):
            model(ids, position_ids=torch.full_like(ids, 200), backend="torch")
        with pytest.raises(ValueError, match="backend"):
            model(ids, backend="tpu")
