"""gptkernels.sdpa: a drop-in for torch.nn.functional.scaled_dot_product_attention (plus a window).

The reference is torch's own SDPA on float64 inputs (the window folded into a boolean mask built by
reference.attention_mask); the eager yardstick is torch's SDPA in the same dtype.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import gptkernels
from gptkernels import reference
from tests.helpers import DEVICE, DTYPES, FLOORS, assert_parity, grid, randn


def torch_sdpa(q, k, v, *, is_causal=False, scale=None, enable_gqa=False, window=None):
    """torch's SDPA with our window folded into a mask (top-left aligned, like torch's causal).

    Its math backend: defined for every dtype and mask (rows that see no key give zeros), so the
    yardstick does not depend on which fused torch kernel a GPU happens to pick.
    """
    mask = None
    if window is not None:
        mask = reference.attention_mask(q.shape[-2], k.shape[-2], causal=True, window=window,
                                        bottom_right=False, device=q.device)
        is_causal = False
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=enable_gqa)


# (batch dims, Hq, Hkv, L, S, E, is_causal, window, scale)
_CASES_SMALL = [
    ((2,), 4, 4, 17, 17, 64, True, None, None),
    ((1,), 2, 2, 97, 33, 80, True, None, None),     # L > S: torch's top-left alignment
    ((1,), 2, 2, 33, 97, 80, True, None, 0.5),      # L < S, explicit scale
    ((2,), 8, 2, 40, 40, 64, False, None, None),    # enable_gqa
    ((1,), 4, 1, 97, 97, 96, True, 7, None),        # window + GQA
    ((2, 3), 2, 2, 17, 30, 16, True, None, None),   # two leading dims
    ((), 2, 2, 30, 30, 64, False, None, None),      # no batch dim: (H, L, E)
]
_RATIOS = ((1, 4), (4, 2), (8, 1))  # (Hq // Hkv, Hkv)
_CASES_FULL = _CASES_SMALL + [
    ((1 + i % 3,), _RATIOS[i % 3][0] * _RATIOS[i % 3][1], _RATIOS[i % 3][1], L, S, e, c, w, None)
    for i, ((L, S), e, (c, w)) in enumerate(itertools.product(
        ((1, 1), (130, 130), (257, 64), (64, 257), (1024, 1024)),
        (64, 128, 256),
        ((False, None), (True, None), (True, 1), (True, 100))))
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", grid(_CASES_SMALL, _CASES_FULL), ids=str)
def test_matches_torch_sdpa(case, dtype, kernel_calls):
    lead, hq, hkv, L, S, E, is_causal, window, scale = case
    q = randn(*lead, hq, L, E, dtype=dtype)
    k, v = randn(*lead, hkv, S, E, dtype=dtype), randn(*lead, hkv, S, E, dtype=dtype)
    gqa = hq != hkv
    out = gptkernels.sdpa(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa, window=window)
    assert kernel_calls, "the kernel did not serve a call it covers"
    ref = torch_sdpa(q.double(), k.double(), v.double(), is_causal=is_causal, scale=scale,
                     enable_gqa=gqa, window=window)
    base = torch_sdpa(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa, window=window)
    assert out.shape == base.shape and out.dtype == dtype
    assert_parity(out, ref, base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_match_torch_sdpa(dtype):
    q, k, v = randn(2, 4, 61, 64, dtype=dtype), randn(2, 2, 97, 64, dtype=dtype), randn(2, 2, 97, 64, dtype=dtype)
    dout = randn(2, 4, 61, 64, dtype=dtype)

    def grads(fn, *inputs):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves, is_causal=True, enable_gqa=True, window=20)
        return torch.autograd.grad(out, leaves, dout.to(out.dtype))

    got = grads(gptkernels.sdpa, q, k, v)
    want = grads(torch_sdpa, q.double(), k.double(), v.double())
    base = grads(torch_sdpa, q, k, v)
    for name, g, w, b in zip(("dq", "dk", "dv"), got, want, base):
        assert_parity(g, w, b, name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E, Ev", [(48, 24), (16, 64), (192, 128)], ids=str)
def test_value_head_dim_runs_the_kernels(E, Ev, dtype, kernel_calls):
    # a value head dim different from the query's (issue 19 item 6): the kernels serve it (it used
    # to fall through to torch's SDPA); out (..., H, L, Ev) and the gradients match torch's SDPA,
    # with GQA, torch's top-left causal alignment (L < S) and a window
    q, k, v = randn(2, 4, 21, E, dtype=dtype), randn(2, 2, 30, E, dtype=dtype), randn(2, 2, 30, Ev, dtype=dtype)
    dout = randn(2, 4, 21, Ev, dtype=dtype)
    for is_causal, window in ((True, None), (True, 9), (False, None)):
        kw = dict(is_causal=is_causal, enable_gqa=True, window=window)
        calls = len(kernel_calls)

        def run(fn, *inputs):
            leaves = [t.detach().clone().requires_grad_() for t in inputs]
            out = fn(*leaves, **kw)
            return (out, *torch.autograd.grad(out, leaves, dout.to(out.dtype)))

        got = run(gptkernels.sdpa, q, k, v)
        assert len(kernel_calls) == calls + 1, "the kernels did not serve E != Ev"
        want = run(torch_sdpa, q.double(), k.double(), v.double())
        base = run(torch_sdpa, q, k, v)
        assert got[0].shape == base[0].shape == (2, 4, 21, Ev) and got[0].dtype == dtype
        # dq, dk: the backward takes delta = rowsum(dO * O) from O rounded to its dtype (as
        # FlashAttention does; tests/test_flash_attn.py check_attention(lse_floor=True)): at E = 16
        # (scale 1/4) that rounding exceeds twice the eager error already with Ev == E, so their
        # floor adds its bound scale * max|k or q| * max_row sum|dO * O| * eps / 2
        delta_sum = float((dout.double() * got[0].detach().double()).abs().sum(-1).max())
        for name, g, w, b, other in zip(("out", "dq", "dk", "dv"), got, want, base, (None, k, q, None)):
            floor = None
            if other is not None:
                floor = FLOORS[dtype] * max(1.0, float(w.abs().max())) + E ** -0.5 * float(
                    other.double().abs().max()) * delta_sum * torch.finfo(dtype).eps / 2
            assert_parity(g, w, b, name=name, floor=floor)


def test_fallthrough_to_torch(kernel_calls):
    q, k, v = randn(2, 2, 17, 32), randn(2, 2, 23, 32), randn(2, 2, 23, 32)
    bool_mask = torch.rand(17, 23, device=DEVICE) > 0.3
    float_mask = randn(17, 23)

    # an arbitrary attn_mask (bool or additive) goes to torch's SDPA unchanged
    for mask in (bool_mask, float_mask):
        assert torch.equal(gptkernels.sdpa(q, k, v, attn_mask=mask),
                           F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    # a window with an attn_mask is folded into the mask (top-left aligned)
    band = reference.attention_mask(17, 23, causal=True, window=5, bottom_right=False, device=q.device)
    assert torch.equal(gptkernels.sdpa(q, k, v, attn_mask=bool_mask, is_causal=True, window=5),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask & band))
    assert torch.equal(gptkernels.sdpa(q, k, v, attn_mask=float_mask, is_causal=True, window=5),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=float_mask.masked_fill(~band, float("-inf"))))
    # float64, and a value head dim over 256 (a value head dim different from the query's is
    # served: test_value_head_dim_runs_the_kernels)
    qd, kd, vd = q.double(), k.double(), v.double()
    assert torch.equal(gptkernels.sdpa(qd, kd, vd, is_causal=True),
                       F.scaled_dot_product_attention(qd, kd, vd, is_causal=True))
    v300 = randn(2, 2, 23, 300)
    assert torch.equal(gptkernels.sdpa(q, k, v300), F.scaled_dot_product_attention(q, k, v300))
    assert not kernel_calls, "a call the kernels do not cover reached them"


def test_dropout_runs_the_kernels(kernel_calls):
    # dropout_p: flash_attn's dropout (its own mask, seeded from torch's generator), not torch SDPA's
    # fallthrough: the same seed, the same result as flash_attn called with it; gradients flow
    q, k, v = (randn(2, 2, 17, 32).requires_grad_() for _ in range(3))
    t = (lambda x: x.transpose(1, 2))  # noqa: E731
    torch.manual_seed(1)
    got = gptkernels.sdpa(q, k, v, dropout_p=0.3, is_causal=True)
    torch.manual_seed(1)
    want = t(gptkernels.flash_attn(t(q), t(k), t(v), dropout_p=0.3))
    assert torch.equal(got, want) and len(kernel_calls) == 2
    assert not torch.equal(got, gptkernels.sdpa(q, k, v, is_causal=True))
    got.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    with pytest.raises(ValueError, match="dropout_p"):
        gptkernels.sdpa(q, k, v, dropout_p=1.0)


def test_bad_input():
    q, k, v = randn(1, 2, 8, 16), randn(1, 2, 8, 16), randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="window"):
        gptkernels.sdpa(q, k, v, window=4)  # needs is_causal
    with pytest.raises(ValueError, match="window"):
        gptkernels.sdpa(q, k, v, is_causal=True, window=0)
    with pytest.raises(ValueError, match="enable_gqa"):
        gptkernels.sdpa(randn(1, 4, 8, 16), k, v)
    with pytest.raises(ValueError, match="query"):
        gptkernels.sdpa(q[0, 0], k, v)
    with pytest.raises(TypeError, match="key"):
        gptkernels.sdpa(q, "k", v)
    with pytest.raises(ValueError, match="leading"):
        gptkernels.sdpa(q, randn(2, 2, 8, 16), randn(2, 2, 8, 16))
    # the shared flash_attn checks speak sdpa's argument names
    with pytest.raises(TypeError, match="^sdpa: value must have the same dtype as query"):
        gptkernels.sdpa(q, k, v.half())
    with pytest.raises(ValueError, match="^sdpa: key and value must have the same shape except the last"):
        gptkernels.sdpa(q, randn(1, 2, 9, 16), randn(1, 2, 8, 16))
    with pytest.raises(TypeError, match="^sdpa: scale must be None or a float"):
        gptkernels.sdpa(q, k, v, scale="0.5")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("lead, L, S", [((2,), 0, 5), ((2,), 5, 0), ((2,), 0, 0), ((0,), 5, 5),
                                        ((2, 0), 3, 4)])
def test_empty_like_torch(lead, L, S, backend, kernel_calls):
    # torch's SDPA returns the empty result (L = 0, batch 0) or zeros (S = 0: rows that see no
    # key), with zero gradients; so does sdpa (it used to fail reshaping a tensor of 0 elements).
    for is_causal, window, gqa in ((False, None, False), (True, None, True), (True, 3, False)):
        hq = 4 if gqa else 2
        q = randn(*lead, hq, L, 16).requires_grad_()
        k, v = randn(*lead, 2, S, 16).requires_grad_(), randn(*lead, 2, S, 16).requires_grad_()
        out = gptkernels.sdpa(q, k, v, is_causal=is_causal, enable_gqa=gqa, window=window,
                              backend=backend)
        want = torch_sdpa(q, k, v, is_causal=is_causal, enable_gqa=gqa, window=window)
        assert out.shape == want.shape and torch.equal(out, want)
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        assert all(g is None or not bool(g.any()) for g in grads)
    assert bool(kernel_calls) == (backend == "triton")  # the kernel path, not the fallthrough
