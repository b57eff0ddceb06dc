"""Batched generation over the paged KV cache against Hugging Face's ``generate`` (greedy token for
token, left padding, EOS, repetition penalty, sampling draw for draw), the Triton kernels against
the eager baseline, the CUDA-graph decode against the plain one, and bad input."""

from __future__ import annotations

import pytest
import torch

import gptkernels
from gptkernels.generation import PagedDecoder, process_logits
from gptkernels.models import from_config
from gptkernels.models.inputs import pack_batch
from tests.helpers import DEVICE, ON_GPU, requires_gpu
from tests.hf_models import FAMILY_VARIANTS, VARIANTS, padded_batch, pair

PAD = 0


def _hf_generate(hf, ids, mask, new, **kw):
    kw.setdefault("do_sample", False)
    if kw["do_sample"]:
        kw.setdefault("top_k", 0)  # HF's default would be 50; ours is off
    with torch.no_grad():
        kw.setdefault("pad_token_id", PAD)
        return hf.generate(ids, attention_mask=mask, max_new_tokens=new, **kw)


@pytest.mark.parametrize("variant", FAMILY_VARIANTS + ["gpt-neox-sequential-pct0.25", "opt-post-ln"])
def test_greedy_matches_hf_left_padded(variant):
    hf, ours = pair(VARIANTS[variant])
    ids, mask = padded_batch(3, 9, ours.config.vocab_size, left=[(0, 4), (2, 1)], seed=11)
    ref = _hf_generate(hf, ids, mask, 10)
    got = gptkernels.generate(ours, ids, 10, attention_mask=mask, backend="torch")
    assert torch.equal(got, ref)
    if variant == "gpt-neox-parallel-pct0.5":  # batch 1 without a mask: the other prompt path
        got1 = gptkernels.generate(ours, ids[1:2], 10, backend="torch")
        assert torch.equal(got1, _hf_generate(hf, ids[1:2], None, 10))


@pytest.mark.parametrize("variant", ["gpt2", "gpt-neox-parallel-pct0.5"])
def test_eos_stops_rows_like_hf(variant):
    hf, ours = pair(VARIANTS[variant])
    ids, mask = padded_batch(3, 7, ours.config.vocab_size, left=[(1, 2)], seed=12)
    free = _hf_generate(hf, ids, mask, 20)
    for eos in {int(free[0, 7 + 2]), int(free[1, 7 + 9])}:  # rows finish at different steps
        ref = _hf_generate(hf, ids, mask, 20, eos_token_id=eos)
        got = gptkernels.generate(ours, ids, 20, attention_mask=mask, eos_token_id=eos,
                                  pad_token_id=PAD, backend="torch")
        assert torch.equal(got, ref), (eos, got, ref)
    # Two EOS ids, pad defaulting to the first one.
    eos = [int(free[0, 8]), int(free[2, 10])]
    ref = _hf_generate(hf, ids, mask, 20, eos_token_id=eos, pad_token_id=eos[0])
    got = gptkernels.generate(ours, ids, 20, attention_mask=mask, eos_token_id=eos, backend="torch")
    assert torch.equal(got, ref)


def test_repetition_penalty_matches_hf():
    hf, ours = pair(VARIANTS["gpt-neo-window4"])
    ids, mask = padded_batch(2, 8, ours.config.vocab_size, left=[(0, 3)], seed=13)
    for penalty in (1.5, 0.7):
        ref = _hf_generate(hf, ids, mask, 10, repetition_penalty=penalty)
        got = gptkernels.generate(ours, ids, 10, attention_mask=mask, repetition_penalty=penalty,
                                  backend="torch")
        assert torch.equal(got, ref)


def _hf_penalty_skips_padding() -> bool:
    """Whether this transformers' generate leaves the prompt's left padding out of the repetition
    penalty (it passes the padding lengths as prompt_ignore_length; 5.17 does not, 5.23 does)."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    return "prompt_ignore_length=" in inspect.getsource(GenerationMixin._get_logits_processor)


def test_repetition_penalty_ignores_left_padding():
    """Padding is not part of a prompt: a left-padded row generates what it generates alone, even
    when its pad id is the token it picks (a penalized pad id would change that pick)."""
    hf, ours = pair(VARIANTS["gpt2"])
    ids, mask = padded_batch(2, 8, ours.config.vocab_size, left=[(0, 3)], seed=13)
    alone = gptkernels.generate(ours, ids[:1, 3:], 6, repetition_penalty=3.0, backend="torch")
    pad_id = int(alone[0, 5])  # the first token row 0 generates
    assert pad_id not in ids[0, 3:].tolist(), "the test needs a first token that is not in the prompt"
    ids[0, :3] = pad_id
    got = gptkernels.generate(ours, ids, 6, attention_mask=mask, repetition_penalty=3.0, backend="torch")
    assert torch.equal(got[0, 3:], alone[0])
    if _hf_penalty_skips_padding():
        assert torch.equal(got, _hf_generate(hf, ids, mask, 6, repetition_penalty=3.0))


@pytest.mark.parametrize("kw", [dict(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2),
                                dict(top_k=5), dict(top_p=0.5, temperature=1.5)], ids=str)
def test_sampling_matches_hf_draw_for_draw(kw):
    """Same processors, same order, same multinomial draws from the global generator: same tokens."""
    hf, ours = pair(VARIANTS["gpt-neox-parallel-pct0.5"])
    ids, mask = padded_batch(4, 7, ours.config.vocab_size, left=[(1, 3)], seed=14)
    torch.manual_seed(123)
    ref = _hf_generate(hf, ids, mask, 10, do_sample=True, **kw)
    torch.manual_seed(123)
    got = gptkernels.generate(ours, ids, 10, attention_mask=mask, do_sample=True, backend="torch", **kw)
    assert torch.equal(got, ref)


def test_sampling_reproducible_with_generator():
    _, ours = pair(VARIANTS["opt-pre-ln-project"])
    ids, mask = padded_batch(2, 6, ours.config.vocab_size, left=[(0, 2)], seed=15)

    def run(seed):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        return gptkernels.generate(ours, ids, 12, attention_mask=mask, do_sample=True, temperature=2.0,
                                   generator=g, backend="torch")

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_process_logits_filters():
    scores = torch.tensor([[1.0, 3.0, 2.0, -1.0, 0.5]])
    seqs = torch.tensor([[1, 3]])
    pen = process_logits(scores, seqs, do_sample=False, temperature=9.0, top_k=1, top_p=0.1,
                         repetition_penalty=2.0)
    assert pen.tolist() == [[1.0, 1.5, 2.0, -2.0, 0.5]]  # greedy: warpers off, penalty on
    k2 = process_logits(scores, seqs, do_sample=True, temperature=1.0, top_k=2, top_p=1.0,
                        repetition_penalty=1.0)
    assert torch.isinf(k2).tolist() == [[True, False, False, True, True]]
    p = process_logits(scores, seqs, do_sample=True, temperature=1.0, top_k=0, top_p=0.6,
                       repetition_penalty=1.0)
    assert torch.isinf(p).tolist() == [[True, False, True, True, True]]  # token 1 holds 0.63


# --------------------------------------------------------------------------------------------------
# Kernel backends against the eager baseline
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["gpt-neo-window4", "gpt-neox-parallel-pct0.5"])
def test_triton_generation_matches_torch_backend(variant):
    _, ours = pair(VARIANTS[variant])
    ids, mask = padded_batch(2, 6, ours.config.vocab_size, left=[(0, 3)], seed=16)
    ref = gptkernels.generate(ours, ids, 6, attention_mask=mask, backend="torch")
    got = gptkernels.generate(ours, ids, 6, attention_mask=mask, backend="triton", cuda_graph=False)
    assert torch.equal(got, ref)


def test_decoder_step_logits_match_full_forward():
    """Each decode step's logits equal a full forward over the sequence so far (paged cache exact)."""
    _, ours = pair(VARIANTS["gpt-neo-window4"])
    ids, mask = padded_batch(2, 5, ours.config.vocab_size, left=[(1, 2)], seed=17)
    with torch.no_grad():
        batch = pack_batch(ours.config, ids, mask, op="test", force_packed=True)
        dec = PagedDecoder(ours, batch.lengths, 6, block_size=8, backend="torch")
        logits = dec.prefill(batch)
        seq, full_mask = ids, mask
        for _ in range(5):
            ref = ours(seq, attention_mask=full_mask, backend="torch")[:, -1]
            assert float((logits - ref).abs().max()) <= 1e-5
            nxt = logits.argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
            full_mask = torch.cat([full_mask, torch.ones_like(nxt)[:, None]], 1)
            logits = dec.step(nxt)
        with pytest.raises(ValueError, match="max_new_tokens"):
            dec.step(nxt)  # a 6th step would need a slot that was never reserved


def test_decode_step_has_no_host_sync():
    """What the CUDA graph needs, checked on any machine: the decode step traces as one graph
    (torch.compile fullgraph; an .item()/.tolist()/bool(tensor) would break it) on the kernel backend."""
    model = from_config(VARIANTS["gpt-neox-parallel-pct0.5"], device=DEVICE)
    ids, mask = padded_batch(2, 5, model.config.vocab_size, left=[(0, 2)], seed=19)
    with torch.no_grad():
        batch = pack_batch(model.config, ids, mask, op="test", force_packed=True)
        dec = PagedDecoder(model, batch.lengths, 4, backend="triton", cuda_graph=False)
        dec.prefill(batch)
        eager = dec._step()
        traced = torch.compile(dec._step, fullgraph=True, backend="eager")()
    torch.testing.assert_close(traced, eager)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 5])
def test_cuda_graph_decode_matches_plain(dtype, batch):
    model = from_config(VARIANTS["gpt-neox-parallel-pct0.5"], dtype=dtype, device="cuda")
    ids, mask = padded_batch(batch, 9, model.config.vocab_size, left=[(0, 4)] if batch > 1 else [],
                             seed=18, device="cuda")
    with torch.no_grad():
        batch_ = pack_batch(model.config, ids, mask, op="test", force_packed=True)
        plain = PagedDecoder(model, batch_.lengths, 20, cuda_graph=False)
        graph = PagedDecoder(model, batch_.lengths, 20, cuda_graph=True)
        a, b = plain.prefill(batch_), graph.prefill(batch_)
        for _ in range(19):
            torch.testing.assert_close(b, a)  # same kernels replayed: equal up to rounding
            nxt = a.argmax(-1)
            a, b = plain.step(nxt), graph.step(nxt)
        assert graph.graph is not None and plain.graph is None
    got = gptkernels.generate(model, ids, 20, attention_mask=mask)  # graph on by default
    ref = gptkernels.generate(model, ids, 20, attention_mask=mask, cuda_graph=False)
    assert torch.equal(got, ref)


@requires_gpu
def test_compiled_cuda_graph_decode_matches_plain():
    model = from_config(VARIANTS["gpt-neo-window4"], dtype=torch.bfloat16, device="cuda")
    ids, mask = padded_batch(3, 9, model.config.vocab_size, left=[(0, 4)], seed=20, device="cuda")
    with torch.no_grad():
        batch = pack_batch(model.config, ids, mask, op="test", force_packed=True)
        plain = PagedDecoder(model, batch.lengths, 12, cuda_graph=False)
        fused = PagedDecoder(model, batch.lengths, 12, cuda_graph=True, compile_step=True)
        a, b = plain.prefill(batch), fused.prefill(batch)
        for _ in range(11):
            torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)  # fused rounding
            nxt = a.argmax(-1)
            a, b = plain.step(nxt), fused.step(nxt)
        assert fused.graph is not None


def test_compiled_fused_step_matches_plain():
    # compile_step over the fused decode step (fused_linear with the cache append): inductor traces
    # it (an op with Optional mutated caches did not lower) and gives the plain step's logits.
    model = from_config(VARIANTS["gpt2"], device=DEVICE)
    ids, mask = padded_batch(2, 5, model.config.vocab_size, left=[(0, 2)], device=DEVICE)
    with torch.no_grad():
        batch = pack_batch(model.config, ids, mask, op="test", force_packed=True)
        plain = PagedDecoder(model, batch.lengths, 4, backend="triton", cuda_graph=False)
        compiled = PagedDecoder(model, batch.lengths, 4, backend="triton", cuda_graph=False, compile_step=True)
        assert plain.fused == compiled.fused == "linear"
        a, b = plain.prefill(batch), compiled.prefill(batch)
        for _ in range(3):
            nxt = a.argmax(-1)
            a, b = plain.step(nxt), compiled.step(nxt)
            torch.testing.assert_close(b, a)


@pytest.mark.parametrize("compile_step", [False, True])
def test_decoder_freed_without_the_garbage_collector(compile_step):
    # No reference cycle through the decoder: its KV cache (gigabytes on a GPU) goes when the last
    # reference does, not at the next collection; a TP model's process group too (a gloo worker
    # thread that outlived the interpreter's shutdown aborted torchrun ranks).
    import gc
    import weakref

    model = from_config(VARIANTS["gpt2"], device=DEVICE)
    ids, mask = padded_batch(2, 5, model.config.vocab_size, left=[(0, 2)])
    batch = pack_batch(model.config, ids, mask, op="test", force_packed=True)
    gc.disable()
    try:
        dec = PagedDecoder(model, batch.lengths, 3, backend="torch", cuda_graph=False,
                           compile_step=compile_step)
        dec.prefill(batch)
        cache = weakref.ref(dec.cache)
        del dec
        assert cache() is None
    finally:
        gc.enable()


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_generate_bad_input():
    model = from_config(VARIANTS["gpt2"], device=DEVICE)
    ids, mask = padded_batch(2, 5, 128, left=[(0, 2)])
    gen = gptkernels.generate
    cases = [
        (ValueError, "max_new_tokens", lambda: gen(model, ids, 0)),  # at least one, as the CLI and HF
        (TypeError, "model", lambda: gen(torch.nn.Linear(2, 2), ids, 3)),
        (TypeError, "max_new_tokens", lambda: gen(model, ids, 2.5)),
        (ValueError, "max_new_tokens", lambda: gen(model, ids, -1)),
        (ValueError, "max_new_tokens", lambda: gen(model, ids, 125)),  # past 128 positions
        (ValueError, "temperature", lambda: gen(model, ids, 3, do_sample=True, temperature=0.0)),
        (ValueError, "top_k", lambda: gen(model, ids, 3, top_k=-1)),
        (ValueError, "top_p", lambda: gen(model, ids, 3, top_p=1.5)),
        (ValueError, "repetition_penalty", lambda: gen(model, ids, 3, repetition_penalty=0.0)),
        (TypeError, "do_sample", lambda: gen(model, ids, 3, do_sample="yes")),
        (ValueError, "eos_token_id", lambda: gen(model, ids, 3, eos_token_id=500)),
        (TypeError, "pad_token_id", lambda: gen(model, ids, 3, eos_token_id=1, pad_token_id=[1, 2])),
        (TypeError, "generator", lambda: gen(model, ids, 3, generator=123)),
        (ValueError, "backend", lambda: gen(model, ids, 3, backend="tpu")),
        (ValueError, "attention_mask", lambda: gen(model, ids, 3, attention_mask=mask.flip(1))),
        (ValueError, "attention_mask", lambda: gen(model, ids, 3, attention_mask=torch.zeros_like(mask))),
        (TypeError, "input_ids", lambda: gen(model, ids.float(), 3)),
    ]
    if not ON_GPU:
        cases.append((ValueError, "cuda_graph", lambda: gen(model, ids, 3, cuda_graph=True)))
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()
