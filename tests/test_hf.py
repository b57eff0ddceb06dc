"""``attn_implementation="gptkernels"`` in Hugging Face transformers models (gptkernels.hf).

The judge is the same model with transformers' own ``"sdpa"`` implementation (float32, same weights):
logits, gradients and greedy generation with a KV cache must agree, and the kernels must actually
run where no mask is needed (unpadded prefill, decode) and not where one is (padding).
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import gptkernels.hf
from tests.helpers import DEVICE, ON_GPU, assert_parity
from tests.hf_models import hf_config

BACKEND = "triton"
NAME = gptkernels.hf.register("gptkernels-test", backend=BACKEND)

#: Tiny configs of models whose attention goes through transformers' AttentionInterface.
CONFIGS = {
    "gpt2": dict(model_type="gpt2", vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4),
    "gpt-neox": dict(model_type="gpt_neox", vocab_size=96, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5),
    "llama-gqa": dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                      max_position_embeddings=64),
    "opt": dict(model_type="opt", vocab_size=96, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64),
}


def _models(config, seed=0):
    """(sdpa model, gptkernels model) with the same random weights, float32, eval mode; ``config``
    is a name in CONFIGS or a config dict."""
    torch.manual_seed(seed)
    cfg = hf_config(CONFIGS[config] if isinstance(config, str) else config)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else torch.rand_like(p) - 0.5)
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation(NAME)
    assert ours.config._attn_implementation == NAME
    return ref.to(DEVICE).eval(), ours.to(DEVICE).eval()


def _ids(batch, seq, seed=1):
    return torch.randint(0, 96, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_sdpa(name, kernel_calls):
    ref, ours = _models(name)
    ids = _ids(2, 23)
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids).logits
    assert len(kernel_calls) == 2  # one flash_attn launch per layer: the kernels ran
    assert_parity(got, want.double(), want, name="logits")


@pytest.mark.parametrize("name", ["gpt-neox", "llama-gqa"])
def test_greedy_generation_with_cache_matches_sdpa(name, kernel_calls):
    # prefill (causal, 9 rows) then decode steps of one row against the DynamicCache's keys
    ref, ours = _models(name)
    ids = _ids(2, 9, seed=2)
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=mask, pad_token_id=0)
    want = ref.generate(ids, **kw)
    got = ours.generate(ids, **kw)
    assert torch.equal(got, want)
    assert len(kernel_calls) == 2 * 6  # 2 layers x (1 prefill + 5 decode steps)


def test_padding_goes_to_transformers_sdpa(kernel_calls):
    # A padded batch needs a mask: transformers' own sdpa path runs it, so results are identical.
    ref, ours = _models("llama-gqa")
    ids = _ids(2, 12, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    assert kernel_calls == []


@pytest.mark.parametrize("seq,launches", [(7, 2), (23, 0)])
def test_sliding_window_model(seq, launches, kernel_calls):
    # Mistral with a window of 8: transformers needs a mask (and we defer to its sdpa) only once the
    # keys outnumber the window.
    ref, ours = _models(dict(model_type="mistral", vocab_size=96, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, sliding_window=8))
    ids = _ids(2, seq, seed=7)
    with torch.no_grad():
        want, got = ref(ids).logits, ours(ids).logits
    assert len(kernel_calls) == launches
    assert_parity(got, want.double(), want, name="logits")


def test_gradients_match_sdpa():
    ref, ours = _models("llama-gqa")
    ids = _ids(1, 21, seed=4)
    grads = []
    for model in (ref, ours):
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "self_attn" in n})
    for n, want in grads[0].items():
        assert_parity(grads[1][n], want.double(), want, name=n)


def test_calls_we_do_not_compute():
    # Attention sinks (gpt-oss's s_aux) are refused, not dropped; a batch-1 query against a batch of
    # keys (which transformers' sdpa broadcasts) goes to transformers' own function.
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(1, 4, 8, 32, device=DEVICE)
    k, v = torch.randn(3, 4, 10, 32, device=DEVICE), torch.randn(3, 4, 10, 32, device=DEVICE)
    with pytest.raises(ValueError, match="s_aux"):
        gptkernels.hf.attention_forward(module, q, k, v, None, s_aux=torch.zeros(4, device=DEVICE))
    got, _ = gptkernels.hf.attention_forward(module, q, k, v, None)
    want, _ = sdpa_attention_forward(module, q, k, v, None)
    assert got.shape == want.shape == (3, 8, 4, 32) and got.is_contiguous()
    assert torch.equal(got, want)


def test_backend_pin_and_bad_names():
    name = gptkernels.hf.register("gptkernels-torch-test", backend="torch")
    ref, _ = _models("gpt2")
    ours = copy.deepcopy(ref)
    ours.set_attn_implementation(name)
    ids = _ids(1, 10, seed=5)
    with torch.no_grad():
        assert_parity(ours(ids).logits, ref(ids).logits.double(), ref(ids).logits)
    for bad in ("sdpa", "eager", "flash_attention_2", "", None):
        with pytest.raises(ValueError, match="name"):
            gptkernels.hf.register(bad)


@pytest.mark.skipif(not ON_GPU, reason="bfloat16 needs a CUDA GPU (the interpreter's bf16 dot is wrong)")
def test_bf16_on_gpu(kernel_calls):
    ref, ours = _models("llama-gqa")
    ref, ours = ref.to(torch.bfloat16), ours.to(torch.bfloat16)
    ids = _ids(4, 200, seed=6)
    with torch.no_grad():
        want64 = _models("llama-gqa")[0].double()(ids).logits
        got, base = ours(ids).logits, ref(ids).logits
    assert len(kernel_calls) == 2
    assert_parity(got, want64, base, name="logits")
