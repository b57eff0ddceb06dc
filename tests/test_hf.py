"""Our attention in Hugging Face transformers models (gptkernels.hf).

The judges are the same models with transformers' own ``"sdpa"`` and ``"eager"`` implementations
(float32, same weights; GPT-Neo has eager only): logits and gradients of padded batches (left and
right), greedy batched generation with a cache, token for token. Every test also counts: our
kernels ran in every layer (``kernel_calls``, Triton forward launches) and transformers' attention
did not (``gptkernels.hf.calls``), or, for the calls that must fall back, that they did, and why.

Padding rows: transformers' sdpa gives a query row that sees no key zeros, as we do, so against
sdpa every row is compared. Eager adds ``finfo.min`` to masked scores, which turns such a row into an
average of values: against eager only the real rows are compared.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import gptkernels.hf
from gptkernels import reference
from gptkernels.models import TINY
from tests.helpers import DEVICE, ON_GPU, assert_parity, requires_gpu
from tests.hf_models import hf_config, padded_batch

BACKEND = "triton"
NAME = gptkernels.hf.register("gptkernels-test", backend=BACKEND)
VOCAB = 96

#: Tiny configs of every family the drop-in serves (2 layers each).
CONFIGS = {
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4),
    "gpt-neo": dict(TINY["gpt-neo"], vocab_size=VOCAB, window_size=4),  # global, local (window 4)
    "gpt-neox": dict(model_type="gpt_neox", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5),
    "llama-gqa": dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                      max_position_embeddings=64),
    "opt": dict(model_type="opt", vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64),
    "mistral-window": dict(model_type="mistral", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=64, sliding_window=5),
    # Qwen2 with a window on its second layer only (layer_types from max_window_layers)
    "qwen2-window-layer1": dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=64, use_sliding_window=True, sliding_window=4,
                                max_window_layers=1),
}
LAYERS = 2
#: Padding of a batch of 2 rows of 13 tokens: (row, pad count) pairs for padded_batch.
PADDING = {"left": dict(left=((0, 5), (1, 2))), "right": dict(right=((0, 5), (1, 2)))}


@pytest.fixture
def calls():
    gptkernels.hf.calls.clear()
    return gptkernels.hf.calls


def _models(config, seed=0):
    """{"sdpa": ..., "eager": ..., "ours": ...} with the same random weights, float32, eval mode;
    GPT-Neo has no "sdpa" (ours is the eager model after gptkernels.hf.patch). ``config`` is a name
    in CONFIGS or a config dict."""
    torch.manual_seed(seed)
    d = CONFIGS[config] if isinstance(config, str) else config
    neo = d["model_type"] == "gpt_neo"
    base = transformers.AutoModelForCausalLM.from_config(hf_config(d), attn_implementation="eager" if neo else "sdpa")
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else torch.rand_like(p) - 0.5)
    base.generation_config.eos_token_id = None  # random weights: every row makes every new token
    models = {"eager": base} if neo else {"sdpa": base, "eager": copy.deepcopy(base)}
    if not neo:
        models["eager"].set_attn_implementation("eager")
    ours = copy.deepcopy(base)
    if neo:
        gptkernels.hf.patch(ours, backend=BACKEND)
    else:
        ours.set_attn_implementation(NAME)
        assert ours.config._attn_implementation == NAME
    models["ours"] = ours
    return {k: m.to(DEVICE).eval() for k, m in models.items()}


def _ids(batch, seq, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _assert_only_kernels(calls, kernel_calls, launches):
    assert gptkernels.hf.fallbacks() == {}, f"transformers' attention ran: {dict(calls)}"
    assert len(kernel_calls) == launches  # one flash_attn launch per layer and forward
    assert sum(calls.values()) == launches


# --------------------------------------------------------------------------------------------------
# Unpadded
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "gpt-neo", "gpt-neox", "llama-gqa", "opt"])
def test_logits_match_sdpa(name, kernel_calls, calls):
    models = _models(name)
    ids = _ids(2, 23)
    with torch.no_grad():
        want = models.get("sdpa", models["eager"])(ids).logits
        got = models["ours"](ids).logits
    _assert_only_kernels(calls, kernel_calls, LAYERS)
    assert calls["kernels"] == LAYERS
    assert_parity(got, want.double(), want, name="logits")


@pytest.mark.parametrize("name", ["gpt-neox", "llama-gqa"])
def test_greedy_generation_with_cache_matches_sdpa(name, kernel_calls, calls):
    # prefill (causal, 9 rows) then decode steps of one row against the DynamicCache's keys
    models = _models(name)
    ids = _ids(2, 9, seed=2)
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    want = models["sdpa"].generate(ids, **kw)
    got = models["ours"].generate(ids, **kw)
    assert torch.equal(got, want)
    _assert_only_kernels(calls, kernel_calls, LAYERS * 6)  # 2 layers x (1 prefill + 5 decode steps)


def test_gradients_match_sdpa(calls):
    models = _models("llama-gqa")
    ids = _ids(1, 21, seed=4)
    grads = []
    for model in (models["sdpa"], models["ours"]):
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "self_attn" in n})
    for n, want in grads[0].items():
        assert_parity(grads[1][n], want.double(), want, name=n)
    assert gptkernels.hf.fallbacks() == {} and calls["kernels"] == LAYERS


# --------------------------------------------------------------------------------------------------
# Padded batches, sliding windows
# --------------------------------------------------------------------------------------------------


def _padded(side, seed=3):
    return padded_batch(2, 13, VOCAB, **PADDING[side], seed=seed)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_padded_logits(name, side, kernel_calls, calls):
    models = _models(name)
    ids, mask = _padded(side)
    with torch.no_grad():
        got = models["ours"](ids, attention_mask=mask).logits
        _assert_only_kernels(calls, kernel_calls, LAYERS)
        assert calls["kernels:padded"] == LAYERS
        real = mask.bool()
        eager = models["eager"](ids, attention_mask=mask).logits
        assert_parity(got[real], eager[real].double(), eager[real], name="logits (real rows) vs eager")
        if "sdpa" in models:
            want = models["sdpa"](ids, attention_mask=mask).logits
            assert_parity(got, want.double(), want, name="logits (every row) vs sdpa")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "qwen2-window-layer1"])
def test_padded_gradients(name, side, calls):
    # loss: a random weighting of the logits of the real rows (the padding rows' outputs are eager's
    # finfo.min artefact, and labels would read one of them: the last left pad predicts the first token)
    models = _models(name)
    ids, mask = _padded(side, seed=4)
    weights = torch.randn(*ids.shape, VOCAB, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    grads = {}
    for key in ("sdpa" if "sdpa" in models else "eager", "ours"):
        model = models[key]
        model.zero_grad()
        logits = model(ids, attention_mask=mask).logits
        (logits * weights)[mask.bool()].sum().backward()
        grads[key] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want_grads = grads["sdpa" if "sdpa" in models else "eager"]
    assert want_grads.keys() == grads["ours"].keys()
    for n, want in want_grads.items():
        assert_parity(grads["ours"][n], want.double(), want, name=n)
    assert gptkernels.hf.fallbacks() == {} and calls["kernels:padded"] == LAYERS


@pytest.mark.parametrize("name,side", [(n, "left") for n in CONFIGS if n != "qwen2-window-layer1"]
                         + [("gpt2", "right"), ("llama-gqa", "right"), ("mistral-window", "right")])
def test_padded_generation(name, side, kernel_calls, calls):
    # Greedy batched generation from padded prompts: a padded prefill, then decode rows against the
    # cache's keys with padding (right padding leaves holes: new tokens follow the pads). Mistral's
    # cache keeps the last window - 1 keys, so its decode steps see no padding once past it. GPT-Neo
    # right-padded is left out: its first new token reads a padding row, eager's finfo.min artefact.
    models = _models(name)
    ids, mask = _padded(side, seed=6)
    new = 3
    kw = dict(max_new_tokens=new, do_sample=False, attention_mask=mask, pad_token_id=0)
    want = models["sdpa" if "sdpa" in models else "eager"].generate(ids, **kw)
    calls.clear()
    got = models["ours"].generate(ids, **kw)
    assert torch.equal(got, want)
    _assert_only_kernels(calls, kernel_calls, LAYERS * new)
    assert calls["kernels:padded"] >= LAYERS  # the prefill at least


def test_window_convention():
    # transformers' sliding window (sliding_window_causal_mask_function(W), over absolute positions,
    # prefill and a decode row with a cache offset) and GPT-Neo's local layers (its `bias` buffer)
    # are our window=W, bottom-right: p - W < j <= p
    from transformers import masking_utils as mu
    from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention

    for w in (1, 3, 8):
        fn = mu.sliding_window_causal_mask_function(w)
        assert gptkernels.hf._causal_window(fn) == w
        for q_len, kv_len, kv_offset in ((11, 11, 0), (1, 6, 5), (4, 9, 2)):
            q_offset = kv_offset + kv_len - q_len
            theirs = mu.sdpa_mask(batch_size=1, q_length=q_len, kv_length=kv_len, q_offset=q_offset,
                                  kv_offset=kv_offset, mask_function=fn, allow_is_causal_skip=False)
            ours = reference.attention_mask(q_len, kv_len, causal=True, window=w, bottom_right=True)
            assert torch.equal(theirs[0, 0], ours), (w, q_len, kv_len)
        cfg = hf_config(dict(CONFIGS["gpt-neo"], window_size=w))
        bias = GPTNeoSelfAttention(cfg, "local").bias[0, 0]
        n = bias.shape[0]
        for q_len in (1, 5, n):
            assert torch.equal(bias[n - q_len:], reference.attention_mask(q_len, n, causal=True, window=w))
    assert gptkernels.hf._causal_window(mu.causal_mask_function) is None
    not_ours = [mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)),
                mu.and_masks(mu.causal_mask_function, mu.padding_mask_function(torch.ones(1, 4, dtype=torch.bool))),
                mu.or_masks(mu.sliding_window_causal_mask_function(3), lambda *a: True),
                mu.bidirectional_mask_function, lambda b, h, q, k: k <= q]
    for fn in not_ours:
        assert gptkernels.hf._causal_window(fn) is gptkernels.hf._NOT_CAUSAL


# --------------------------------------------------------------------------------------------------
# What goes to transformers' attention, and bad input
# --------------------------------------------------------------------------------------------------


def test_general_masks_go_to_sdpa(kernel_calls, calls):
    # Patterns the kernels do not compute keep transformers' sdpa mask and sdpa itself: results
    # identical to sdpa's, counted with their reason, no kernel launched.
    from transformers import masking_utils as mu

    models = _models("llama-gqa")
    sdpa_model, ours = models["sdpa"], models["ours"]
    cases = []
    # rows padded on different sides: no single alignment serves them
    ids, mask = padded_batch(2, 12, VOCAB, left=((0, 3),), right=((1, 4),), seed=7)
    cases.append(("padding layout", dict(input_ids=ids, attention_mask=mask)))
    # packed sequences given by position ids (no mask, no cache)
    ids = _ids(1, 12, seed=8)
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]], device=DEVICE)
    cases.append(("mask pattern", dict(input_ids=ids, position_ids=pos, use_cache=False)))
    # a 4-D mask given by the caller
    allowed = torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(9)).to(DEVICE) > 0.3
    allowed |= torch.eye(10, dtype=torch.bool, device=DEVICE)
    cases.append(("mask", dict(input_ids=_ids(2, 10, seed=10), attention_mask=allowed)))
    for why, kw in cases:
        calls.clear()
        with torch.no_grad():
            want, got = sdpa_model(**kw).logits, ours(**kw).logits
        assert torch.equal(got, want), why
        assert dict(calls) == {"sdpa:" + why: LAYERS}
    assert kernel_calls == []
    # a custom overlay through the mask interface: transformers' 4-D mask, tagged with why
    embeds = torch.zeros(2, 6, 8, device=DEVICE)
    mask = mu.create_causal_mask(ours.config, embeds, None, None, or_mask_function=lambda b, h, q, k: k == 0)
    assert mask.shape == (2, 1, 6, 6) and mask._gptkernels_why == "mask pattern"


def test_static_cache_goes_to_sdpa(kernel_calls, calls):
    models = _models("llama-gqa")
    ids, mask = _padded("left", seed=11)
    kw = dict(max_new_tokens=3, do_sample=False, attention_mask=mask, pad_token_id=0,
              cache_implementation="static")
    want = models["sdpa"].generate(ids, **kw)
    calls.clear()
    assert torch.equal(models["ours"].generate(ids, **kw), want)
    assert kernel_calls == [] and set(calls) == {"sdpa:static cache"}


def test_calls_we_do_not_compute(calls):
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
    assert dict(calls) == {"sdpa:batch broadcast": 1}
    # a padding mask that does not fit the keys: an error naming both, never a guess
    pad = torch.ones(1, 7, dtype=torch.bool, device=DEVICE)
    pad._gptkernels = gptkernels.hf._Padding(pad, None)
    with pytest.raises(ValueError, match="padding mask"):
        gptkernels.hf.attention_forward(module, q, k[:1], v[:1], pad)


def test_softcap_goes_to_the_kernels(calls):
    # Gemma-2 passes softcap (attn_logit_softcapping): served by flash_attn(softcap=) (transformers'
    # sdpa refuses it), equal to Gemma-2's own eager attention, prefill (causal) and decode rows.
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.head_dim = True, 2, 32
    q = torch.randn(2, 4, 9, 32, device=DEVICE) * 3
    k, v = torch.randn(2, 2, 9, 32, device=DEVICE) * 3, torch.randn(2, 2, 9, 32, device=DEVICE)
    causal = torch.full((9, 9), float("-inf"), device=DEVICE).triu(1)
    for rows, mask in ((slice(None), causal), (slice(8, 9), None)):
        got, _ = gptkernels.hf.attention_forward(module, q[:, :, rows], k, v, None, scaling=0.2, softcap=5.0)
        want, _ = eager_attention_forward(module, q[:, :, rows], k, v, mask, scaling=0.2, softcap=5.0)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert dict(calls) == {"kernels": 2}


def test_value_head_dim_goes_to_the_kernels(calls):
    # A value head dim of its own (DeepSeek's MLA: q/k 192, v 128 wide): our kernels, as transformers'
    # sdpa computes it, without a mask and with a tagged padding mask (left padding, varlen).
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    q = torch.randn(2, 4, 9, 48, device=DEVICE)
    k, v = torch.randn(2, 2, 9, 48, device=DEVICE), torch.randn(2, 2, 9, 16, device=DEVICE)
    got, _ = gptkernels.hf.attention_forward(module, q, k, v, None)
    want, _ = sdpa_attention_forward(module, q, k, v, None)
    assert got.shape == want.shape == (2, 9, 4, 16)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    pad = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    pad[1, :3] = False  # row 1 left-padded by 3
    pad._gptkernels = gptkernels.hf._Padding(pad, None)
    got, _ = gptkernels.hf.attention_forward(module, q, k, v, pad)
    dense = gptkernels.hf._dense_mask(pad._gptkernels, 9, None)
    want, _ = sdpa_attention_forward(module, q, k, v, dense)
    assert got.shape == (2, 9, 4, 16)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1, 3:], want[1, 3:], rtol=1e-4, atol=1e-5)  # the real rows
    assert set(calls) <= {"kernels", "kernels:padded"} and sum(calls.values()) == 2


@pytest.mark.parametrize("name", ["gpt2", "gpt-neo"])
def test_training_dropout_runs_the_kernels(name, calls):
    # Attention dropout in training (GPT-2's attn_pdrop): flash_attn(dropout_p=) in every layer, not
    # transformers' sdpa / eager; reproducible from torch's seed; the same as the kernels called by
    # hand with that seed; gradients flow.
    cfg = dict(CONFIGS[name], attn_pdrop=0.5, resid_pdrop=0.0, embd_pdrop=0.0)
    cfg.pop("attention_dropout", None)
    if name == "gpt-neo":
        cfg["attention_dropout"], cfg["resid_dropout"], cfg["embed_dropout"] = cfg.pop("attn_pdrop"), 0.0, 0.0
        cfg.pop("resid_pdrop"), cfg.pop("embd_pdrop")
    ours = _models(cfg)["ours"].train()
    ids = _ids(2, 9)
    losses = []
    for _ in range(2):
        torch.manual_seed(7)
        losses.append(ours(ids, labels=ids).loss)
    assert torch.equal(losses[0], losses[1])  # the same seed, the same masks
    with torch.no_grad():
        plain = ours.eval()(ids, labels=ids).loss
    assert not torch.equal(losses[0].detach(), plain)  # dropout did something
    losses[0].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters() if p.requires_grad)
    assert gptkernels.hf.fallbacks() == {} and sum(calls.values()) == 3 * LAYERS  # 3 forwards

    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 1
    q, k, v = (torch.randn(2, 4, 9, 16, device=DEVICE) for _ in range(3))
    torch.manual_seed(3)
    got, _ = gptkernels.hf.attention_forward(module, q, k, v, None, dropout=0.25, gptkernels_backend=BACKEND)
    torch.manual_seed(3)
    want = gptkernels.flash_attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.25,
                                 backend=BACKEND)
    assert torch.equal(got, want)


def test_gpt_neo_patch(kernel_calls, calls):
    models = _models("gpt-neo")
    eager, ours = models["eager"], models["ours"]
    ids, mask = _padded("left", seed=12)
    # output_attentions needs the weights: eager runs (counted) and returns them
    with torch.no_grad():
        want = eager(ids, attention_mask=mask, output_attentions=True)
        got = ours(ids, attention_mask=mask, output_attentions=True)
    assert torch.equal(got.logits, want.logits)
    assert all(torch.equal(a, b) for a, b in zip(got.attentions, want.attentions))
    assert dict(calls) == {"eager:output_attentions": LAYERS} and kernel_calls == []
    # bad input: not GPT-Neo, patched twice, a backend that does not exist
    with pytest.raises(TypeError, match="GPT-Neo"):
        gptkernels.hf.patch(_models("gpt2")["eager"])
    with pytest.raises(ValueError, match="already patched"):
        gptkernels.hf.patch(ours)
    with pytest.raises(ValueError, match="backend"):
        gptkernels.hf.patch(copy.deepcopy(eager), backend="tpu")


def test_backend_pin_and_bad_names():
    name = gptkernels.hf.register("gptkernels-torch-test", backend="torch")
    models = _models("gpt2")
    ref, ours = models["sdpa"], copy.deepcopy(models["sdpa"])
    ours.set_attn_implementation(name)
    ids = _ids(1, 10, seed=5)
    with torch.no_grad():
        assert_parity(ours(ids).logits, ref(ids).logits.double(), ref(ids).logits)
    for bad in ("sdpa", "eager", "flash_attention_2", gptkernels.hf.GPT_NEO_MASK, "", None):
        with pytest.raises(ValueError, match="name"):
            gptkernels.hf.register(bad)
    with pytest.raises(ValueError, match="backend"):
        gptkernels.hf.register("gptkernels-bad-backend", backend="tpu")


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not ON_GPU, reason="bfloat16 needs a CUDA GPU (the interpreter's bf16 dot is wrong)")
def test_bf16_on_gpu(kernel_calls):
    models = _models("llama-gqa")
    ours, ref = models["ours"].to(torch.bfloat16), models["sdpa"].to(torch.bfloat16)
    ids = _ids(4, 200, seed=6)
    with torch.no_grad():
        want64 = _models("llama-gqa")["sdpa"].double()(ids).logits
        got, base = ours(ids).logits, ref(ids).logits
    assert len(kernel_calls) == 2
    assert_parity(got, want64, base, name="logits")


@requires_gpu
@pytest.mark.parametrize("name", ["llama-gqa", "gpt-neo", "mistral-window"])
def test_padded_bf16_on_gpu(name, kernel_calls, calls):
    # long padded prompts (left, the generation layout) in bfloat16 against float64, and generation
    models = _models(name)
    judge = "sdpa" if "sdpa" in models else "eager"
    ours, ref = models["ours"].to(torch.bfloat16), models[judge].to(torch.bfloat16)
    ids, mask = padded_batch(4, 112, VOCAB, left=((0, 37), (2, 90)), seed=13)  # + 8 new: GPT-Neo's 128 positions
    real = mask.bool()
    with torch.no_grad():
        want64 = _models(name)[judge].double()(ids, attention_mask=mask).logits[real]
        got, base = ours(ids, attention_mask=mask).logits[real], ref(ids, attention_mask=mask).logits[real]
        assert_parity(got, want64, base, name="logits (real rows)")
        _assert_only_kernels(calls, kernel_calls, LAYERS)
        out = ours.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (4, 120) and gptkernels.hf.fallbacks() == {}
