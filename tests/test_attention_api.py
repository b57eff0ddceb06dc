"""The public attention API: backend dispatch, input checks (every bad-input case of SPEC), autograd
and torch.compile. Kernel numerics are in test_flash_attn.py and test_sdpa.py."""

from __future__ import annotations

import pytest
import torch

import gptkernels
from gptkernels import BackendUnavailableError, reference
from tests.helpers import DEVICE, ON_GPU, assert_parity, randn


def _qkv(b=1, s=9, hq=2, hkv=1, d=16, dtype=torch.float32):
    return randn(b, s, hq, d, dtype=dtype), randn(b, s, hkv, d, dtype=dtype), randn(b, s, hkv, d, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------


def test_backends_report():
    report = gptkernels.backends()
    assert set(report) == {"triton", "cuda", "torch"}
    assert report["torch"] is None
    assert report["triton"] is None  # the interpreter on CPU, the GPU otherwise
    assert report["cuda"] is None or isinstance(report["cuda"], str) and report["cuda"]


def test_torch_backend_is_the_reference(kernel_calls):
    q, k, v = _qkv()
    out, lse = gptkernels.flash_attn(q, k, v, window=3, return_lse=True, backend="torch")
    want, want_lse = reference.attention(q, k, v, window=3, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    assert not kernel_calls


def test_default_backend_and_environment(kernel_calls, monkeypatch):
    q, k, v = _qkv()
    monkeypatch.delenv("GPTKERNELS_BACKEND", raising=False)
    gptkernels.flash_attn(q, k, v)  # CUDA tensors, or CPU tensors under the interpreter: triton
    assert len(kernel_calls) == 1
    monkeypatch.setenv("GPTKERNELS_BACKEND", "torch")
    out = gptkernels.flash_attn(q, k, v)
    assert len(kernel_calls) == 1 and torch.equal(out, reference.attention(q, k, v))
    out = gptkernels.flash_attn(q, k, v, backend="triton")  # an explicit backend= wins
    assert len(kernel_calls) == 2
    monkeypatch.setenv("GPTKERNELS_BACKEND", "tpu")
    with pytest.raises(ValueError, match="GPTKERNELS_BACKEND"):
        gptkernels.flash_attn(q, k, v)


def test_backend_that_cannot_serve():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend"):
        gptkernels.flash_attn(q, k, v, backend="tpu")
    # Triton kernels do not run on meta tensors: a clear error, never a silent fallback.
    meta = [t.to("meta") for t in (q, k, v)]
    with pytest.raises(BackendUnavailableError, match="triton"):
        gptkernels.flash_attn(*meta, backend="triton")
    reason = gptkernels.backends()["cuda"]
    if reason is not None:
        with pytest.raises(BackendUnavailableError, match="cuda"):
            gptkernels.flash_attn(q, k, v, backend="cuda")
    # paged keys are forward-only: asking for gradients is refused up front
    cache = randn(2, 8, 1, 16)
    table = torch.tensor([[0, 1]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([9], dtype=torch.int32, device=DEVICE)
    with pytest.raises(BackendUnavailableError, match="not differentiable"):
        gptkernels.flash_attn(q.requires_grad_(), cache, cache, block_table=table, seqlens_k=lens)


def test_return_lse_and_shapes():
    q, k, v = _qkv(b=2, s=5, hq=4, hkv=2)
    out = gptkernels.flash_attn(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    out, lse = gptkernels.flash_attn(q, k, v, return_lse=True)
    assert lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    cu = torch.tensor([0, 3, 10], dtype=torch.int32, device=DEVICE)
    out, lse = gptkernels.flash_attn(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                     cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True)
    assert out.shape == (10, 4, 16) and lse.shape == (4, 10)


# --------------------------------------------------------------------------------------------------
# Bad input: every case names the argument
# --------------------------------------------------------------------------------------------------

I32 = dict(dtype=torch.int32, device=DEVICE)


def _bad_cases():
    q, k, v = _qkv(b=2, s=9, hq=4, hkv=2)
    packed = [t.flatten(0, 1) for t in (q, k, v)]
    cu = torch.tensor([0, 9, 18], **I32)
    cache = randn(4, 8, 2, 16)
    table = torch.tensor([[0, 1], [2, 3]], **I32)
    lens = torch.tensor([9, 16], **I32)
    return [
        # (name, args, kwargs, exception, match)
        ("q not a tensor", ([1.0], k, v), {}, TypeError, "q must be a torch.Tensor"),
        ("integer q", (q.int(), k, v), {}, TypeError, "q must have dtype"),
        ("float64 q", (q.double(), k.double(), v.double()), {}, TypeError, "q must have dtype"),
        ("dtype mismatch", (q, k.half(), v.half()), {}, TypeError, "k must have the same dtype"),
        ("device mismatch", (q, k.to("meta"), v.to("meta")), {}, ValueError, "k must be on q's device"),
        ("3-D dense q", (q[0], k, v), {}, ValueError, "q must have 4 dimensions"),
        ("k and v shapes", (q, k, v[:, :5]), {}, ValueError, "k and v must have the same shape"),
        ("batch mismatch", (q, k[:1], v[:1]), {}, ValueError, r"k.shape\[0\]"),
        ("head counts", (randn(2, 9, 3, 16), k, v), {}, ValueError, "heads of q"),
        ("head dim mismatch", (randn(2, 9, 4, 32), k, v), {}, ValueError, "same head dim"),
        ("head dim too big", (randn(1, 2, 1, 264), randn(1, 2, 1, 264), randn(1, 2, 1, 264)), {},
         ValueError, "head dim"),
        ("window 0", (q, k, v), dict(window=0), ValueError, "window must be >= 1"),
        ("window without causal", (q, k, v), dict(window=4, causal=False), ValueError, "window=4 needs causal"),
        ("window float", (q, k, v), dict(window=2.5), TypeError, "window"),
        ("causal not bool", (q, k, v), dict(causal=1), TypeError, "causal"),
        ("scale nan", (q, k, v), dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
        ("scale str", (q, k, v), dict(softmax_scale="1"), TypeError, "softmax_scale"),
        ("cu_seqlens_q alone", packed, dict(cu_seqlens_q=cu), ValueError, "cu_seqlens_q and cu_seqlens_k"),
        ("cu_seqlens int64", packed, dict(cu_seqlens_q=cu.long(), cu_seqlens_k=cu), TypeError, "cu_seqlens_q"),
        ("cu_seqlens 2-D", packed, dict(cu_seqlens_q=cu[None], cu_seqlens_k=cu), ValueError, "cu_seqlens_q"),
        ("cu_seqlens batch", packed, dict(cu_seqlens_q=cu, cu_seqlens_k=cu[:2]), ValueError, "cu_seqlens_k"),
        ("cu_seqlens device", packed, dict(cu_seqlens_q=cu.to("meta"), cu_seqlens_k=cu), ValueError,
         "cu_seqlens_q must be on the same device"),
        ("varlen 4-D q", (q, *packed[1:]), dict(cu_seqlens_q=cu, cu_seqlens_k=cu), ValueError, "q must have 3"),
        ("max_seqlen negative", packed, dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=-1), TypeError,
         "max_seqlen_q"),
        ("block_table alone", (q, cache, cache), dict(block_table=table), ValueError, "block_table and seqlens_k"),
        ("block size", (q, randn(4, 12, 2, 16), randn(4, 12, 2, 16)), dict(block_table=table, seqlens_k=lens),
         ValueError, "block size"),
        ("block_table dtype", (q, cache, cache), dict(block_table=table.long(), seqlens_k=lens), TypeError,
         "block_table"),
        ("seqlens_k batch", (q, cache, cache), dict(block_table=table, seqlens_k=lens[:1]), ValueError,
         "seqlens_k"),
        ("paged with cu_seqlens_k", (packed[0], cache, cache),
         dict(block_table=table, seqlens_k=lens, cu_seqlens_q=cu, cu_seqlens_k=cu), ValueError, "cu_seqlens_k"),
        ("paged q batch", (q[:1], cache, cache), dict(block_table=table, seqlens_k=lens), ValueError,
         r"q.shape\[0\]"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input(case):
    _, args, kwargs, exc, match = case
    with pytest.raises(exc, match=match):
        gptkernels.flash_attn(*args, **kwargs)


def test_index_values_checked_under_debug(monkeypatch):
    """Values of index tensors need a device sync: checked under GPTKERNELS_DEBUG=1 only."""
    q, k, v = (t.flatten(0, 1) for t in _qkv(b=2, s=9, hq=4, hkv=2))
    cache = randn(4, 8, 2, 16)
    qd = randn(2, 3, 4, 16)
    cases = [
        ((q, k, v), dict(cu_seqlens_q=torch.tensor([0, 9, 17], **I32), cu_seqlens_k=torch.tensor([0, 9, 18], **I32)),
         r"cu_seqlens_q\[-1\] must equal"),
        ((q, k, v), dict(cu_seqlens_q=torch.tensor([1, 9, 18], **I32), cu_seqlens_k=torch.tensor([0, 9, 18], **I32)),
         r"cu_seqlens_q\[0\] must be 0"),
        ((q, k, v), dict(cu_seqlens_q=torch.tensor([0, 9, 18], **I32), cu_seqlens_k=torch.tensor([0, 12, 9, 18][:3], **I32)),
         "cu_seqlens_k"),
        ((qd, cache, cache), dict(block_table=torch.tensor([[0, 1], [2, 4]], **I32), seqlens_k=torch.tensor([9, 16], **I32)),
         r"block_table\[1\] \(sequence 1\) points outside the cache"),
        ((qd, cache, cache), dict(block_table=torch.tensor([[0, -1], [2, 3]], **I32), seqlens_k=torch.tensor([9, 16], **I32)),
         r"block_table\[0\] \(sequence 0\) points outside the cache"),
        ((qd, cache, cache), dict(block_table=torch.tensor([[0, 1], [2, 3]], **I32), seqlens_k=torch.tensor([9, 17], **I32)),
         r"seqlens_k\[1\] = 17 \(sequence 1\) must be between 0 and"),
    ]
    monkeypatch.setenv("GPTKERNELS_DEBUG", "1")
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            gptkernels.flash_attn(*args, **kwargs)
    # without the debug flag the same calls run (masked in the kernel, no sync, no crash)
    monkeypatch.setenv("GPTKERNELS_DEBUG", "0")
    out = gptkernels.flash_attn(*cases[3][0], **cases[3][1])
    assert bool(torch.isfinite(out).all())


def test_max_seqlen_checked_under_debug(monkeypatch):
    """An understated max_seqlen_q/max_seqlen_k is a ValueError under GPTKERNELS_DEBUG=1 (without it,
    the right answer, more slowly: tests/test_flash_attn.py::test_understated_max_seqlen); an
    overstated one (a static bound for CUDA graphs) is fine."""
    q, k, v = (t.flatten(0, 1) for t in _qkv(b=2, s=9, hq=4, hkv=2))
    cu_q, cu_k = torch.tensor([0, 5, 18], **I32), torch.tensor([0, 11, 18], **I32)
    cache = randn(4, 8, 2, 16)
    table, lens = torch.tensor([[0, 1], [2, 3]], **I32), torch.tensor([9, 16], **I32)
    monkeypatch.setenv("GPTKERNELS_DEBUG", "1")
    for kw, match in ((dict(max_seqlen_q=12, max_seqlen_k=11), r"max_seqlen_q = 12 is less than the "
                       r"longest sequence in cu_seqlens_q \(13\)"),
                      (dict(max_seqlen_q=13, max_seqlen_k=0), r"max_seqlen_k = 0 .* cu_seqlens_k \(11\)")):
        with pytest.raises(ValueError, match=match):
            gptkernels.flash_attn(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    with pytest.raises(ValueError, match=r"max_seqlen_k = 15 .* seqlens_k \(16\)"):
        gptkernels.flash_attn(randn(2, 3, 4, 16), cache, cache, block_table=table, seqlens_k=lens,
                              max_seqlen_k=15)
    gptkernels.flash_attn(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=64,
                          max_seqlen_k=11)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_inputs(backend):
    """Batch 0, no tokens at all (T = 0), no query rows, no keys: the result torch would give (empty,
    or zeros with lse -inf for rows that see no key) and zero gradients, on every path."""
    cache = randn(4, 8, 1, 16)
    table, none = torch.zeros(0, 2, **I32), torch.zeros(0, **I32)
    cases = [  # (q, k, v, kwargs)
        (randn(0, 5, 2, 16), randn(0, 5, 1, 16), randn(0, 5, 1, 16), {}),            # batch 0
        (randn(2, 0, 2, 16), randn(2, 5, 1, 16), randn(2, 5, 1, 16), {}),            # Sq = 0
        (randn(2, 5, 2, 16), randn(2, 0, 1, 16), randn(2, 0, 1, 16), {}),            # Sk = 0
        (randn(0, 2, 16), randn(0, 1, 16), randn(0, 1, 16),                          # varlen B = 0
         dict(cu_seqlens_q=torch.zeros(1, **I32), cu_seqlens_k=torch.zeros(1, **I32))),
        (randn(0, 2, 16), randn(0, 1, 16), randn(0, 1, 16),                          # T = 0, B = 3
         dict(cu_seqlens_q=torch.zeros(4, **I32), cu_seqlens_k=torch.zeros(4, **I32), max_seqlen_q=0)),
        (randn(3, 2, 16), randn(0, 1, 16), randn(0, 1, 16),                          # no keys
         dict(cu_seqlens_q=torch.tensor([0, 3], **I32), cu_seqlens_k=torch.zeros(2, **I32))),
        (randn(0, 3, 2, 16), cache, cache, dict(block_table=table, seqlens_k=none)),  # paged B = 0
        (randn(0, 2, 16), cache, cache, dict(block_table=table, seqlens_k=none,
                                             cu_seqlens_q=torch.zeros(1, **I32))),
    ]
    for q, k, v, kw in cases:
        paged = "block_table" in kw
        leaves = [t.clone().requires_grad_(not paged) for t in (q, k, v)]
        out, lse = gptkernels.flash_attn(*leaves, causal=False, return_lse=True, backend=backend, **kw)
        assert out.shape == q.shape and torch.equal(out, torch.zeros_like(q))
        assert lse.numel() == 0 or bool(torch.isneginf(lse).all())
        # (the torch backend returns a constant for varlen B = 0: no graph to differentiate)
        if not paged and (backend == "triton" or out.requires_grad):
            grads = torch.autograd.grad(out.sum(), leaves)
            assert all(g.shape == t.shape and not bool(g.any()) for g, t in zip(grads, leaves))


def test_head_dim_stride_past_2_31_is_refused():
    """The kernels index the head dim in int32 (every other dim in int64 where needed): a view whose
    head-dim stride times the head dim passes 2**31 elements is a ValueError naming it, on every op
    (shape checks only: meta tensors, nothing is allocated)."""
    meta = dict(device="meta", dtype=torch.float16)
    bad = torch.empty_strided((1, 4, 2, 64), (64, 16, 8, 2**25), **meta)
    q, kv = torch.empty(1, 4, 2, 64, **meta), torch.empty(1, 4, 1, 64, **meta)
    cache = torch.empty(4, 8, 1, 64, **meta)
    cos = torch.empty(16, 32, device="meta")
    match = r"has a last-dim \(head dim\) stride of \d+ elements: the kernels need stride x size"
    calls = [
        ("flash_attn: q", lambda: gptkernels.flash_attn(bad, kv, kv)),
        ("flash_attn: k", lambda: gptkernels.flash_attn(q, bad[:, :, :1], kv)),
        ("sdpa: value", lambda: gptkernels.sdpa(q.transpose(1, 2), kv.transpose(1, 2),
                                                bad[:, :, :1].transpose(1, 2), enable_gqa=True)),
        ("apply_rotary: q", lambda: gptkernels.apply_rotary(bad, None, cos, cos)),
        ("apply_rotary: cos", lambda: gptkernels.apply_rotary(
            q, None, torch.empty_strided((16, 32), (1, 2**26), device="meta"), cos)),
        ("paged_append: k", lambda: gptkernels.paged_append(bad[0, :, :1], kv[0], cache, cache,
                                                            torch.zeros(4, dtype=torch.int64, device="meta"))),
        ("paged_decode: k_cache", lambda: gptkernels.paged_decode(
            q[:, 0], torch.empty_strided((4, 8, 1, 64), (512, 64, 64, 2**25), **meta), cache,
            torch.zeros(1, 1, dtype=torch.int32, device="meta"), torch.ones(1, dtype=torch.int32, device="meta"))),
    ]
    for prefix, call in calls:
        with pytest.raises(ValueError, match=f"^{prefix} {match}"):
            call()


# --------------------------------------------------------------------------------------------------
# Autograd and torch.compile
# --------------------------------------------------------------------------------------------------


def test_gradients_through_custom_op():
    # torch.autograd.gradcheck of the kernel path in float32 against finite differences would be
    # slow in the interpreter; compare the op's gradients with the reference's instead.
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, s=13, hq=4, hkv=2))
    out, lse = gptkernels.flash_attn(q, k, v, window=4, return_lse=True)
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    r_out, r_lse = reference.attention(*ref_in, window=4, return_lse=True)
    for g, r in zip(grads, torch.autograd.grad(r_out.sum() + r_lse.sum(), ref_in)):
        assert_parity(g, r)


def test_torch_compile_fullgraph():
    compile_backend = "inductor" if ON_GPU else "aot_eager"

    def f(q, k, v, qs, ks, vs):
        o = gptkernels.flash_attn(q, k, v, window=5)
        s = gptkernels.sdpa(qs, ks, vs, is_causal=True, enable_gqa=True)
        return o.float().square().sum() + s.float().sum()

    inputs = [randn(1, 17, 2, 16), randn(1, 17, 1, 16), randn(1, 17, 1, 16),
              randn(1, 2, 9, 16), randn(1, 1, 12, 16), randn(1, 1, 12, 16)]
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in inputs]
        loss = fn(*leaves)
        return loss, torch.autograd.grad(loss, leaves)

    loss, grads = run(compiled)
    want, want_grads = run(f)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
