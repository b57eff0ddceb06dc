"""Property-based fuzzing of attention (issue 11): Hypothesis draws the inputs the hand-written tests
might not think of, and every backend must agree with the float64 reference.

Drawn: batch, sequence lengths (0 included), head dims, GQA ratios, causal / window (int or (left,
right)), softmax scale, softcap and ALiBi slopes now and then,
varlen splits, paged block tables (shuffled blocks, spare and bad-but-unused entries, any block
size), and the memory layout of every tensor (views of larger buffers in any dim order, index
tensors included). Checked: the Triton kernels (the interpreter on CPU) and the torch backend
against the float64 reference with SPEC's parity rule (tests.helpers.assert_parity), forward, lse
and, for dense and varlen, the gradients of both backward paths.

Cheap on purpose (it runs in `make test`: well under a minute on 2 cores): small shapes, a few
dozen examples, ``derandomize=True`` so CI draws the same examples every run (a failure reproduces
as is). ``HYPOTHESIS_PROFILE=explore`` (with ``HYPOTHESIS_MAX_EXAMPLES``, default 200) draws new
ones, more of them, for a local search.
"""

from __future__ import annotations

import itertools
import os

import hypothesis
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import gptkernels
from gptkernels import reference
from tests.helpers import DEVICE, DTYPES, assert_parity

_SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=10, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_SLOW_OK)
settings.register_profile("explore", max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", 200)),
                          deadline=None, database=None, suppress_health_check=_SLOW_OK)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")


def _layout(draw, ndim):
    """A memory layout: the order of the dims in memory (outermost first) and padding per dim."""
    order = draw(st.permutations(range(ndim)))
    pad = draw(st.lists(st.integers(0, 2), min_size=ndim, max_size=ndim))
    return list(order), pad


def _view(shape, layout, dtype, gen, fill=None):
    """A tensor of ``shape`` that is a view of a larger buffer laid out as ``layout``; random values
    (never zeros), or ``fill`` (a tensor of ``shape``) copied in."""
    order, pad = layout
    big = [shape[d] + pad[d] for d in order]
    buf = torch.randn(big, generator=gen, dtype=torch.float32).to(device=DEVICE, dtype=dtype)
    view = buf.permute([order.index(d) for d in range(len(shape))])
    view = view[tuple(slice(p // 2, p // 2 + s) for s, p in zip(shape, pad))]
    if fill is not None:
        view.copy_(fill)
    return view


def _index_view(x, draw):
    """``x`` (an int tensor) as it is, or strided / transposed / expanded-free views of it."""
    kind = draw(st.sampled_from(["contiguous", "strided", "transposed"]))
    if kind == "strided":
        return torch.stack([x, torch.full_like(x, 7)], dim=-1)[..., 0]
    if kind == "transposed" and x.dim() == 2:
        return x.t().contiguous().t()
    if kind == "transposed":
        return torch.stack([torch.full_like(x, 5), x]).t().contiguous().t()[1]
    return x


def _cu(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)


@st.composite
def _attention_case(draw, kind):
    """Everything one flash_attn call needs, drawn: (q, k, v, kwargs, grad, seed of dout)."""
    dtype = draw(st.sampled_from(DTYPES[:2] if DEVICE == "cpu" else DTYPES))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.sampled_from([1, 2, 4]))
    d = draw(st.sampled_from([8, 16, 24, 40, 64, 80]))
    causal = draw(st.booleans())
    # windows: an int W (causal), or FlashAttention's (left, right) pair, -1 unbounded (right is
    # ignored under causal)
    side = st.one_of(st.just(-1), st.integers(0, 40))
    pair = st.tuples(side, side)
    window = draw(st.one_of(st.none(), st.integers(1, 40), pair) if causal else st.one_of(st.none(), pair))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 1.0)))
    seed = draw(st.integers(0, 2**31))
    gen = torch.Generator().manual_seed(seed)
    kw = dict(causal=causal, window=window, softmax_scale=scale)
    if draw(st.integers(0, 3)) == 0:  # score modifiers, now and then
        kw["softcap"] = draw(st.one_of(st.none(), st.floats(1.0, 50.0)))
        if draw(st.booleans()):
            kw["alibi_slopes"] = torch.rand(hq, generator=gen).to(DEVICE)
    grad = False
    if kind == "dense":
        b, sq, sk = draw(st.integers(1, 2)), draw(st.integers(0, 40)), draw(st.integers(0, 40))
        q_shape, kv_shape = (b, sq, hq, d), (b, sk, hkv, d)
        grad = draw(st.booleans())
    elif kind == "varlen":
        lq = draw(st.lists(st.integers(0, 30), min_size=1, max_size=3))
        same = draw(st.booleans())  # self-attention splits, or independent key lengths
        lk = lq if same else draw(st.lists(st.integers(0, 30), min_size=len(lq), max_size=len(lq)))
        q_shape, kv_shape = (sum(lq), hq, d), (sum(lk), hkv, d)
        kw.update(cu_seqlens_q=_index_view(_cu(lq), draw), cu_seqlens_k=_index_view(_cu(lk), draw))
        if draw(st.booleans()):  # the launch-size hints, exact or overstated
            kw.update(max_seqlen_q=max(lq) + draw(st.integers(0, 3)),
                      max_seqlen_k=max(lk) + draw(st.integers(0, 3)))
        grad = draw(st.booleans())
    else:  # paged keys: prefix in the cache plus a chunk of new queries
        block_size = draw(st.sampled_from([8, 16, 32, 64]))
        lens = draw(st.lists(st.integers(0, 90), min_size=1, max_size=3))
        width = max(1, max(-(-n // block_size) for n in lens)) + draw(st.integers(0, 2))
        num_blocks = sum(-(-n // block_size) for n in lens) + draw(st.integers(0, 3))
        num_blocks = max(num_blocks, 1)
        perm = torch.randperm(num_blocks, generator=gen).tolist()
        # unused entries: any value, even outside the cache (never read: beyond seqlens_k)
        table = torch.randint(-3, num_blocks + 3, (len(lens), width), generator=gen, dtype=torch.int32)
        used = 0
        for i, n in enumerate(lens):
            need = -(-n // block_size)
            table[i, :need] = torch.tensor(perm[used:used + need], dtype=torch.int32)
            used += need
        kv_shape = (num_blocks, block_size, hkv, d)
        kw.update(block_table=_index_view(table.to(DEVICE), draw),
                  seqlens_k=_index_view(torch.tensor(lens, dtype=torch.int32, device=DEVICE), draw))
        if draw(st.booleans()):
            new = [draw(st.integers(0, min(n, 20))) for n in lens]
            q_shape = (sum(new), hq, d)
            kw.update(cu_seqlens_q=_index_view(_cu(new), draw))
        else:
            q_shape = (len(lens), draw(st.integers(0, 20)), hq, d)
    q = _view(q_shape, _layout(draw, len(q_shape)), dtype, gen)
    k = _view(kv_shape, _layout(draw, len(kv_shape)), dtype, gen)
    v = _view(kv_shape, _layout(draw, len(kv_shape)), dtype, gen)
    return q, k, v, kw, grad, seed + 1


def _run(fn, q, k, v, dout, grad):
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    out, lse = fn(*leaves)
    if not grad:
        return out, lse, ()
    return out, lse, torch.autograd.grad((out.to(dout.dtype) * dout).sum(), leaves)


def _check(q, k, v, kw, grad, seed):
    """The Triton kernels (both backwards) and the torch backend vs the float64 reference."""
    ref_kw = {n: kw[n] for n in ("causal", "window", "softmax_scale", "cu_seqlens_q", "cu_seqlens_k",
                                 "block_table", "seqlens_k", "softcap", "alibi_slopes") if n in kw}
    dout = None
    if grad:
        dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, q.dtype)

    def reference_fn(upcast):
        return lambda *t: reference.attention(*t, return_lse=True, upcast=upcast, **ref_kw)

    r_out, r_lse, r_grads = _run(reference_fn(True), q.double(), k.double(), v.double(),
                                 None if dout is None else dout.double(), grad)
    b_out, b_lse, b_grads = _run(reference_fn(False), q, k, v, dout, grad)
    runs = [("triton", True), ("torch", True)] + ([("triton", False)] if grad else [])
    for backend, deterministic in runs:
        out, lse, grads = _run(lambda *t: gptkernels.flash_attn(
            *t, return_lse=True, backend=backend, deterministic=deterministic, **kw),
            q, k, v, dout, grad)
        tag = f"{backend}{'' if deterministic else ' (atomic dQ)'}"
        assert out.shape == q.shape and out.dtype == q.dtype
        assert_parity(out, r_out, b_out, name=f"{tag} out")
        assert_parity(lse, r_lse, b_lse.float(), name=f"{tag} lse")
        for name, g, r, b in zip(("dq", "dk", "dv"), grads, r_grads, b_grads):
            assert_parity(g, r, b, name=f"{tag} {name}")


@pytest.mark.parametrize("kind", ["dense", "varlen", "paged"])
def test_flash_attn_fuzz(kind):
    @settings(settings.get_profile(PROFILE))
    @hypothesis.given(_attention_case(kind))
    def run(case):
        _check(*case)

    run()


@st.composite
def _decode_case(draw):
    dtype = draw(st.sampled_from(DTYPES[:2] if DEVICE == "cpu" else DTYPES))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.sampled_from([1, 2, 4, 8]))
    d = draw(st.sampled_from([16, 40, 64, 96]))
    block_size = draw(st.sampled_from([8, 16, 32, 64]))
    lens = draw(st.lists(st.integers(0, 100), min_size=1, max_size=3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    need = [-(-n // block_size) for n in lens]
    num_blocks = max(1, sum(need) + draw(st.integers(0, 2)))
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.randint(-3, num_blocks + 3, (len(lens), max(need) + 1), generator=gen,
                          dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[used:used + n].to(torch.int32)
        used += n
    kw = dict(window=draw(st.one_of(st.none(), st.integers(1, 60))),
              softmax_scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
              num_splits=draw(st.one_of(st.none(), st.integers(1, 5))))
    q = _view((len(lens), hq, d), _layout(draw, 3), dtype, gen)
    kc = _view((num_blocks, block_size, hkv, d), _layout(draw, 4), dtype, gen)
    vc = _view((num_blocks, block_size, hkv, d), _layout(draw, 4), dtype, gen)
    table = _index_view(table.to(DEVICE), draw)
    lens = _index_view(torch.tensor(lens, dtype=torch.int32, device=DEVICE), draw)
    return q, kc, vc, table, lens, kw


def test_paged_decode_fuzz():
    @settings(settings.get_profile(PROFILE))
    @hypothesis.given(_decode_case())
    def run(case):
        q, kc, vc, table, lens, kw = case
        ref_kw = {n: kw[n] for n in ("window", "softmax_scale")}
        r_out, r_lse = reference.paged_decode(q.double(), kc.double(), vc.double(), table, lens,
                                              return_lse=True, **ref_kw)
        b_out, b_lse = reference.paged_decode(q, kc, vc, table, lens, upcast=False, return_lse=True,
                                              **ref_kw)
        for backend in ("triton", "torch"):
            out, lse = gptkernels.paged_decode(q, kc, vc, table, lens, return_lse=True, backend=backend,
                                               **kw)
            assert_parity(out, r_out, b_out, name=f"{backend} out")
            assert_parity(lse, r_lse, b_lse.float(), name=f"{backend} lse")

    run()
