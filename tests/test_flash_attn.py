"""Parity of the Triton flash attention (forward, backward, varlen, paged keys) with a float64 reference.

Every check follows SPEC's rule (tests.helpers.assert_parity): the kernel's error against the float64
reference may be at most twice the eager torch error in the same dtype (reference.attention with
upcast=False), plus a small floor. The interpreter runs a representative grid; a GPU runs the full one.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import gptkernels
from gptkernels import reference
from tests.helpers import (DEVICE, DTYPES, FLOORS, FULL_GRID, ROW_STRIDE, assert_parity, grid,
                           huge_stride_views, index_views, randn, requires_gpu)

BACKEND = "triton"


def _cu(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=DEVICE)


def _finite(lse):
    # rows that see no key have lse = -inf: keep them out of the loss (their gradient is zero)
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _same_strides(t):
    """A leaf copy of ``t`` with exactly its strides (gaps of fused-QKV views included)."""
    leaf = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return leaf.copy_(t)


def _attend(fn, q, k, v, dout, dlse, grad, **kw):
    """out, lse and (if grad) dq, dk, dv of ``fn`` on leaf copies of q, k, v (strides kept)."""
    leaves = [_same_strides(t.detach()).requires_grad_(grad) for t in (q, k, v)]
    out, lse = fn(*leaves, **kw)
    if not grad:
        return out, lse, ()
    loss = (out.to(dout.dtype) * dout).sum()
    if dlse is not None:
        loss = loss + (_finite(lse) * dlse.to(lse.dtype)).sum()
    return out, lse, torch.autograd.grad(loss, leaves)


def check_attention(q, k, v, *, grad=False, with_dlse=False, max_seqlen_q=None, max_seqlen_k=None,
                    deterministic=True, lse_floor=False, ref_kw=None, **kw):
    """Kernel vs float64 reference vs eager same-dtype reference: out, lse and (grad) dq, dk, dv.
    ``deterministic`` goes to the kernel only (False: the atomic-dQ backward). ``lse_floor``: the
    backward recomputes P = exp(s - lse), whose float32 rounding costs about |lse| * 2**-24
    relative (the eager softmax subtracts the row max exactly): with scores far from 0 (|lse| ~ 100)
    that exceeds the eager error, so the gradients' floor grows by 4 * max|lse| * 2**-24. And
    delta = rowsum(dO * O) is taken from O rounded to its dtype (as FlashAttention does; eager
    autograd keeps the exact softmax): with the scores' gradient nearly cancelling (equal keys, dQ
    exactly 0) that rounding shows in dQ and dK, bounded by scale * max|q or k| * max_row
    sum|dO * O| * (the dtype's unit roundoff). ``ref_kw``: arguments for the references only (the
    kernel's dropout mask)."""
    out_shape = (*q.shape[:-1], v.shape[-1])  # q's rows, v's head dim (which may differ from q's)
    dout = randn(*out_shape, dtype=q.dtype) if grad else None
    dlse = None
    if grad and with_dlse:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1]) if q.dim() == 4 else (q.shape[1], q.shape[0])
        dlse = randn(*lse_shape)

    def kernel(q_, k_, v_):
        return gptkernels.flash_attn(q_, k_, v_, return_lse=True, backend=BACKEND,
                                     max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                     deterministic=deterministic, **kw)

    def ref(q_, k_, v_, upcast=True):
        return reference.attention(q_, k_, v_, return_lse=True, upcast=upcast, **kw, **(ref_kw or {}))

    out, lse, grads = _attend(kernel, q, k, v, dout, dlse, grad)
    r_out, r_lse, r_grads = _attend(ref, q.double(), k.double(), v.double(),
                                    None if dout is None else dout.double(),
                                    None if dlse is None else dlse.double(), grad)
    b_out, b_lse, b_grads = _attend(lambda *t: ref(*t, upcast=False), q, k, v, dout, dlse, grad)

    assert out.dtype == q.dtype and out.shape == out_shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.is_contiguous()
    assert_parity(out, r_out, b_out, name="out")
    assert_parity(lse, r_lse, b_lse.float(), name="lse")
    for name, g, r, b, x in zip(("dq", "dk", "dv"), grads, r_grads, b_grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
        floor = None
        if lse_floor:
            lse_max = float(r_lse.detach()[torch.isfinite(r_lse)].abs().max())
            floor = (FLOORS[g.dtype] + 4 * lse_max * 2**-24) * max(1.0, float(r.abs().max()))
            if name != "dv":
                scale = kw.get("softmax_scale") or q.shape[-1] ** -0.5
                other = (k if name == "dq" else q).detach().double().abs().max()
                delta_bound = (dout.double() * out.detach().double()).abs().sum(-1).max()
                floor += scale * float(other * delta_bound) * torch.finfo(g.dtype).eps / 2
        assert_parity(g, r, b, name=name, floor=floor)
    return out, lse


# --------------------------------------------------------------------------------------------------
# Dense forward
# --------------------------------------------------------------------------------------------------

# (batch, Sq, Sk, Hq, Hkv, D, causal, window)
_DENSE_SMALL = [
    (1, 1, 1, 1, 1, 16, True, None),
    (2, 17, 17, 4, 4, 64, True, None),
    (1, 97, 130, 8, 1, 80, True, None),      # Sq < Sk, MQA (ratio 8)
    (2, 130, 97, 2, 1, 96, True, None),      # Sq > Sk: the first rows see no key
    (1, 130, 130, 4, 1, 128, False, None),
    (1, 97, 97, 2, 1, 256, True, 7),
    (1, 130, 130, 2, 2, 64, True, 1),
    (1, 130, 130, 4, 2, 80, True, 64),
    (3, 97, 130, 2, 1, 16, True, 1000),      # window larger than the sequence
    (1, 1, 130, 2, 1, 64, True, 64),         # one query row (decode-like)
    (1, 130, 1, 2, 1, 64, False, None),      # one key
    (2, 17, 97, 8, 8, 96, False, None),
    (1, 33, 20, 2, 1, 1, True, 5),           # head dim 1; Sq > Sk with a window
    (1, 40, 40, 2, 2, 200, True, None),      # head dim 200: a 256-wide tile, masked
]
_RATIOS = ((1, 2), (2, 2), (4, 1), (8, 1))  # (Hq // Hkv, Hkv)
_DENSE_FULL = [
    # every (sequence pair, head dim, mask); batch and GQA ratio rotate so each meets each
    (1 + i % 3, sq, sk, _RATIOS[i % 4][0] * _RATIOS[i % 4][1], _RATIOS[i % 4][1], d, causal, w)
    for i, ((sq, sk), d, (causal, w)) in enumerate(itertools.product(
        ((1, 1), (17, 17), (97, 130), (130, 97), (1, 300), (257, 257), (1024, 1024)),
        (16, 64, 80, 96, 128, 256),
        ((False, None), (True, None), (True, 1), (True, 7), (True, 64), (True, 4096))))
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", grid(_DENSE_SMALL, _DENSE_FULL), ids=str)
def test_forward_dense(case, dtype):
    b, sq, sk, hq, hkv, d, causal, window = case
    q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    check_attention(q, k, v, causal=causal, window=window)


def test_softmax_scale_and_large_values():
    # GPT-Neo's scale 1.0 with large scores: the online softmax must stay stable.
    dtype = torch.float32
    q, k, v = randn(2, 33, 2, 64, dtype=dtype, scale=4.0), randn(2, 33, 2, 64, dtype=dtype, scale=4.0), \
        randn(2, 33, 2, 64, dtype=dtype)
    check_attention(q, k, v, causal=True, softmax_scale=1.0)
    check_attention(q, k, v, causal=False, softmax_scale=0.03)


def test_rows_that_see_nothing():
    # Sq > Sk bottom-right: rows i < Sq - Sk sit at negative positions and see no key.
    q, k, v = randn(2, 40, 2, 64), randn(2, 9, 1, 64), randn(2, 9, 1, 64)
    out, lse = check_attention(q, k, v, causal=True, grad=True)
    assert torch.equal(out[:, :31], torch.zeros_like(out[:, :31]))
    assert bool(torch.isneginf(lse[:, :, :31]).all()) and bool(torch.isfinite(lse[:, :, 31:]).all())


def test_forward_is_deterministic():
    q, k, v = (randn(1, 130, 2, 80, dtype=DTYPES[0]), randn(1, 130, 1, 80, dtype=DTYPES[0]),
               randn(1, 130, 1, 80, dtype=DTYPES[0]))
    a = gptkernels.flash_attn(q, k, v, window=33, return_lse=True, backend=BACKEND)
    b = gptkernels.flash_attn(q, k, v, window=33, return_lse=True, backend=BACKEND)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_backward_is_deterministic():
    q, k, v = (randn(1, 97, 4, 64, dtype=DTYPES[0]), randn(1, 97, 1, 64, dtype=DTYPES[0]),
               randn(1, 97, 1, 64, dtype=DTYPES[0]))
    dout = randn(1, 97, 4, 64, dtype=DTYPES[0])
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = gptkernels.flash_attn(*leaves, backend=BACKEND)
        grads.append(torch.autograd.grad(out, leaves, dout))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# --------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------

_GRAD_SMALL = [
    (2, 97, 97, 2, 2, 64, True, None),
    (1, 130, 97, 4, 2, 80, True, None),      # Sq > Sk, rows that see nothing
    (1, 17, 130, 8, 1, 96, True, 7),         # Sq < Sk, window, MQA ratio 8
    (1, 130, 130, 4, 1, 128, True, 64),
    (1, 97, 130, 2, 2, 16, False, None),
    (1, 1, 17, 2, 1, 256, True, 1),
]
_GRAD_FULL = [
    (1 + i % 2, sq, sk, _RATIOS[i % 4][0] * _RATIOS[i % 4][1], _RATIOS[i % 4][1], d, causal, w)
    for i, ((sq, sk), d, (causal, w)) in enumerate(itertools.product(
        ((1, 17), (97, 97), (130, 97), (97, 130), (300, 300), (1024, 1024)),
        (16, 64, 80, 128, 256),
        ((False, None), (True, None), (True, 1), (True, 7), (True, 64))))
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", grid(_GRAD_SMALL, _GRAD_FULL), ids=str)
def test_backward_dense(case, dtype):
    b, sq, sk, hq, hkv, d, causal, window = case
    q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    check_attention(q, k, v, causal=causal, window=window, grad=True)


# (batch, Sq, Sk, Hq, Hkv, D, causal, window): the atomic-dQ backward on the interpreter's grid
_ATOMIC_SMALL = [_GRAD_SMALL[0], _GRAD_SMALL[1], _GRAD_SMALL[2], (1, 130, 130, 4, 1, 128, True, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", grid(_ATOMIC_SMALL, _GRAD_FULL), ids=str)
def test_backward_atomic_dq(case, dtype):
    # deterministic=False: dQ added with float32 atomics by the dK/dV kernel (5 tile matmuls).
    # Same parity rule as the deterministic path; several key tiles add into each dQ row here.
    b, sq, sk, hq, hkv, d, causal, window = case
    q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    check_attention(q, k, v, causal=causal, window=window, grad=True, deterministic=False,
                    with_dlse=dtype == torch.float32)


def test_backward_atomic_dq_varlen():
    # Packed sequences, one of length 0: atomics stay inside each sequence's rows.
    lq, lk = (5, 0, 70, 1), (9, 3, 70, 100)
    q, k, v = randn(sum(lq), 4, 64), randn(sum(lk), 2, 64), randn(sum(lk), 2, 64)
    check_attention(q, k, v, causal=True, window=40, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk),
                    max_seqlen_q=max(lq), max_seqlen_k=max(lk), grad=True, with_dlse=True,
                    deterministic=False)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("dtype, value", [(torch.float16, 2.0), (torch.float32, 6.0)])
def test_backward_large_magnitude(dtype, value, deterministic):
    # FlashAttention's overflow cases (its test_flash_attn_bwd_overflow and _bwd_varlen_overflow),
    # against our API: q filled with +value, k with -value, so every score and lse lie far below 0
    # and exp(0 - lse) overflows. Key rows padding the last key tile must contribute exactly
    # nothing: the atomic-dQ path gave NaN in every dQ element (exact dQ: 0).
    q = torch.full((1, 1, 1, 16), value, dtype=dtype, device=DEVICE)
    k = torch.full((1, 1, 1, 16), -value, dtype=dtype, device=DEVICE)
    check_attention(q, k, randn(1, 1, 1, 16, dtype=dtype), causal=False, grad=True,
                    deterministic=deterministic, lse_floor=True)
    lq, lk = (1, 3, 70), (1, 3, 70)
    q = torch.full((sum(lq), 2, 16), value, dtype=dtype, device=DEVICE)
    k = torch.full((sum(lk), 1, 16), -value, dtype=dtype, device=DEVICE)
    for causal in (False, True):
        check_attention(q, k, randn(sum(lk), 1, 16, dtype=dtype), causal=causal, grad=True,
                        cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), max_seqlen_q=70, max_seqlen_k=70,
                        deterministic=deterministic, lse_floor=True)


def test_torch_deterministic_mode_overrides(monkeypatch):
    # torch.use_deterministic_algorithms(True) takes the deterministic backward (the dq kernel runs)
    from gptkernels.triton import flash_attn as fa

    calls = []
    real = fa._bwd_dq.fn.run
    monkeypatch.setattr(fa._bwd_dq.fn, "run", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = randn(1, 33, 2, 64).requires_grad_()
    for enforced, dq_kernel_runs in ((False, 0), (True, 1)):
        calls.clear()
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: enforced)
        out = gptkernels.flash_attn(q, q, q, backend=BACKEND, deterministic=False)
        torch.autograd.grad(out.sum(), q)
        assert len(calls) == dq_kernel_runs


def test_gpu_config_choice_without_autotuning():
    # GPTKERNELS_AUTOTUNE=0 (set for every test) takes the first row of the call's bucket; the
    # atomic-dQ kernel has its own list (an unpipelined config that does not spill at D = 128).
    from gptkernels.triton import flash_attn as fa

    rows = list(dict.fromkeys(r for t in (fa._DKDV_TABLE, fa._DKDV_ATOMIC_TABLE) for v in t.values() for r in v))
    cfgs = [fa._config(r) for r in rows]
    prune = fa._pick(fa._DKDV_TABLE, fa._DKDV_ATOMIC_TABLE)
    q = torch.empty(1, dtype=torch.bfloat16)
    for atomic, table in ((False, fa._DKDV_TABLE), (True, fa._DKDV_ATOMIC_TABLE)):
        for d in (64, 128, 256):
            (cfg,) = prune(cfgs, {"Q": q}, BLOCK_D=d, ATOMIC_DQ=atomic)
            want = table[(False, d)][0]
            assert (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages) == want
    assert fa._DKDV_ATOMIC_TABLE[(False, 128)] != fa._DKDV_TABLE[(False, 128)]
    # the forward: a 16-row query tile when no sequence has more than 16 query rows
    rows = list(dict.fromkeys(r for t in (fa._FWD_TABLE, fa._FWD_DECODE_TABLE) for v in t.values() for r in v))
    prune = fa._pick(fa._FWD_TABLE, decode_table=fa._FWD_DECODE_TABLE)
    for seq_bucket, table in ((16, fa._FWD_DECODE_TABLE), (32, fa._FWD_TABLE), (4096, fa._FWD_TABLE)):
        (cfg,) = prune([fa._config(r) for r in rows], {"Q": q, "seq_bucket": seq_bucket}, BLOCK_D=128)
        assert (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages) == table[(False, 128)][0]


def test_deterministic_must_be_bool():
    q = randn(1, 4, 2, 16)
    with pytest.raises(TypeError, match="deterministic"):
        gptkernels.flash_attn(q, q, q, backend=BACKEND, deterministic=None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_through_lse(dtype):
    # A loss on lse too: its gradient (dlse) is folded into the backward's delta term.
    q, k, v = randn(2, 97, 4, 64, dtype=dtype), randn(2, 61, 2, 64, dtype=dtype), randn(2, 61, 2, 64, dtype=dtype)
    check_attention(q, k, v, causal=True, window=40, grad=True, with_dlse=True)


def test_backward_lse_only():
    # Only lse reaches the loss (out's gradient is zero / absent).
    q, k, v = (randn(1, 33, 2, 64) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    _, lse = gptkernels.flash_attn(*leaves, return_lse=True, backend=BACKEND)
    got = torch.autograd.grad(lse.sum(), leaves)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    _, r_lse = reference.attention(*ref_leaves, return_lse=True)
    want = torch.autograd.grad(r_lse.sum(), ref_leaves, allow_unused=True)
    want = [torch.zeros_like(t) if w is None else w for t, w in zip(ref_leaves, want)]  # lse ignores v
    for g, w in zip(got, want):
        assert_parity(g, w)


def test_fused_qkv_views():
    # q, k, v are strided views of one (B, S, 3, H, D) tensor: the kernels take them as they are.
    for dtype in DTYPES:
        qkv = randn(1, 70, 3, 2, 80, dtype=dtype)
        q, k, v = qkv.unbind(2)
        assert not q.is_contiguous() and _same_strides(q).stride() == q.stride()
        check_attention(q, k, v, causal=True, grad=True)
        check_attention(q, k[:, :, :1], v[:, :, :1], causal=True, window=9)  # GQA on views

        fused = qkv.detach().clone().requires_grad_()
        out = gptkernels.flash_attn(*fused.unbind(2), backend=BACKEND)
        (g,) = torch.autograd.grad(out.sum(), fused)  # gradients land in the fused tensor
        views = [t.detach().clone().requires_grad_() for t in qkv.unbind(2)]
        sep = torch.autograd.grad(gptkernels.flash_attn(*views, backend=BACKEND).sum(), views)
        assert torch.equal(g, torch.stack(sep, dim=2))


def test_transposed_layout():
    # (B, H, S, D) memory seen as (B, S, H, D): the layout sdpa hands to the kernels.
    q, k, v = (randn(1, 2, 97, 64).transpose(1, 2) for _ in range(3))
    check_attention(q, k, v, causal=True, grad=True)


def test_random_shapes():
    # Seeded random lengths, head dims and windows (float32, forward and backward): the band
    # arithmetic (first/interior/last tiles) for many (Sq, Sk, W) against the tile sizes.
    gen = torch.Generator().manual_seed(1234)
    for _ in range(grid(16, 60)):
        sq, sk = (int(x) for x in torch.randint(1, 150, (2,), generator=gen))
        d = int(torch.randint(1, 129, (1,), generator=gen))
        hkv = int(torch.randint(1, 3, (1,), generator=gen))
        hq = hkv * int(torch.randint(1, 4, (1,), generator=gen))
        causal = bool(torch.rand(1, generator=gen) < 0.8)
        window = int(torch.randint(1, 160, (1,), generator=gen)) if causal and torch.rand(1, generator=gen) < 0.6 else None
        q, k, v = randn(1, sq, hq, d), randn(1, sk, hkv, d), randn(1, sk, hkv, d)
        check_attention(q, k, v, causal=causal, window=window, grad=True)


# Tile shapes the GPU configs use (BLOCK_M, BLOCK_N per kernel): the band arithmetic must hold for
# every one of them, and the interpreter otherwise only runs its own fixed config.
_TILE_SHAPES = [
    dict(fwd=(128, 128), dkdv=(16, 128), dq=(128, 64)),
    dict(fwd=(128, 32), dkdv=(32, 128), dq=(64, 16)),
    dict(fwd=(16, 16), dkdv=(16, 32), dq=(16, 16)),
]


@pytest.mark.parametrize("shapes", _TILE_SHAPES, ids=str)
def test_other_tile_shapes(shapes, monkeypatch):
    import triton

    from gptkernels.triton import flash_attn as fa

    for name, kernel in (("fwd", fa._fwd_kernel), ("dkdv", fa._bwd_dkdv), ("dq", fa._bwd_dq)):
        bm, bn = shapes[name]
        monkeypatch.setattr(kernel, "configs", [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn})])
    q, k, v = randn(1, 150, 2, 64), randn(1, 170, 1, 64), randn(1, 170, 1, 64)
    check_attention(q, k, v, causal=True, window=37, grad=True)
    q, k, v = randn(1, 170, 2, 32), randn(1, 150, 2, 32), randn(1, 150, 2, 32)
    check_attention(q, k, v, causal=True, grad=True)
    lq, lk = (3, 140), (150, 20)
    q, k, v = randn(sum(lq), 2, 16), randn(sum(lk), 1, 16), randn(sum(lk), 1, 16)
    check_attention(q, k, v, causal=True, window=60, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk),
                    max_seqlen_q=max(lq), max_seqlen_k=max(lk), grad=True)


@requires_gpu
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 64), (torch.float16, 80), (torch.bfloat16, 128),
                                            (torch.bfloat16, 256), (torch.float32, 96)], ids=str)
def test_every_gpu_config(dtype, head_dim, monkeypatch):
    # Each config the autotuner may pick for this dtype and head dim, one at a time.
    from gptkernels.triton import flash_attn as fa

    bucket = (dtype == torch.float32, min(max(fa._block_d(head_dim), 64), 256))
    q = randn(2, 300, 4, head_dim, dtype=dtype)
    k, v = randn(2, 333, 2, head_dim, dtype=dtype), randn(2, 333, 2, head_dim, dtype=dtype)
    for kernel, table in ((fa._fwd_kernel, fa._FWD_TABLE), (fa._bwd_dkdv, fa._DKDV_TABLE),
                          (fa._bwd_dq, fa._DQ_TABLE)):
        original = kernel.configs
        for row in table[bucket]:
            monkeypatch.setattr(kernel, "configs", [fa._config(row)])
            check_attention(q, k, v, causal=True, window=100, grad=True)
            check_attention(q, k, v, causal=False, grad=kernel is not fa._fwd_kernel)
            if kernel is fa._bwd_dkdv:  # the same configs with atomic dQ
                check_attention(q, k, v, causal=True, window=100, grad=True, deterministic=False)
        monkeypatch.setattr(kernel, "configs", original)
    # the forward's configs for <= 16 query rows (decode), with and without split keys
    for row in fa._FWD_DECODE_TABLE[bucket]:
        monkeypatch.setattr(fa._fwd_kernel, "configs", [fa._config(row)])
        for splits in (1, 3):
            monkeypatch.setattr(fa, "_fwd_num_splits", lambda *args, n=splits: n)
            check_attention(q[:, :5], k, v, causal=True, window=100)
            check_attention(q[:, :1], k, v, causal=True)


def test_compiles_for_hopper():
    # The interpreter never runs Triton's compiler: prove, without a GPU, that every kernel compiles
    # for sm_90a, uses wgmma tensor cores, pipelines its loads and fits in an H100's shared memory.
    # A subprocess, because TRITON_INTERPRET (read when the kernels are defined) must be unset.
    from tools.sm90_compile import SM90_SHARED, compile_in_subprocess

    results = compile_in_subprocess(timeout=900)
    assert {r["kernel"] for r in results} == {"fwd", "fwd_split", "fwd_decode", "fwd_packed", "fwd_paged",
                                              "dkdv", "dkdv_atomic_dq", "dq"}
    for r in results:
        # the decode tile (16 query rows, also packed GQA rows) is below wgmma's 64: Ampere-style
        # mma.sync tensor cores
        decode = r["kernel"] in ("fwd_decode", "fwd_packed")
        assert (r["mma_sync"] if decode else r["wgmma"]) and r["pipelined"], r
        assert r["shared"] <= SM90_SHARED, r
    # the atomic-dQ variant adds dS K tiles to float32 dQ with reductions, not compare-and-swap loops
    assert all(r["atomics"] for r in results if r["kernel"] == "dkdv_atomic_dq")
    assert not any(r["atomics"] for r in results if r["kernel"] != "dkdv_atomic_dq")


@pytest.mark.parametrize("head_dim", [64, 128])
def test_backward_tiles_for_tensor_cores(head_dim):
    # issue 14 item 5: every config of the dK/dV kernel at D = 64/128 multiplies tiles of at least 64
    # on every side (S = Q K^T: BLOCK_M x BLOCK_N x D; dV += P^T dO, dK += dS^T Q: BLOCK_N x D x
    # BLOCK_M; dP = dO V^T; atomic dQ = dS K: BLOCK_M x D x BLOCK_N) on wgmma, without spilling
    # registers (offline sm_90a compile, ptxas). The atomic-dQ variant's pipelined config spills one
    # or two registers (notes/attention.md); its unpipelined one none.
    from tools.sm90_compile import SM90_SHARED, compile_in_subprocess

    results = compile_in_subprocess("--head-dim", str(head_dim), "--all-configs", "--ptxas",
                                    "--flash-cases", "dkdv", "dkdv_atomic_dq", timeout=600)
    assert {r["kernel"] for r in results} == {"dkdv", "dkdv_atomic_dq"}
    for r in results:
        block_m, block_n = r["config"][:2]
        assert min(block_m, block_n, head_dim) >= 64 and r["wgmma"] and not r["mma_sync"], r
        assert r["shared"] <= SM90_SHARED and r["regs"] <= 255, r
        assert r["spill"] <= (8 if r["kernel"] == "dkdv_atomic_dq" and r["pipelined"] else 0), r


# --------------------------------------------------------------------------------------------------
# Varlen
# --------------------------------------------------------------------------------------------------

_VARLEN_SMALL = [
    # (q lengths, k lengths, Hq, Hkv, D, causal, window)
    ((5, 0, 70, 1), (9, 3, 70, 100), 4, 2, 96, True, None),
    ((33, 17, 1), (33, 17, 1), 2, 2, 64, True, 7),
    ((40, 3), (20, 65), 8, 1, 80, False, None),
]
_VARLEN_FULL = _VARLEN_SMALL + [
    (lq, lk, _RATIOS[i % 4][0] * _RATIOS[i % 4][1], _RATIOS[i % 4][1], d, causal, w)
    for i, ((lq, lk), d, (causal, w)) in enumerate(itertools.product(
        (((1, 200, 0, 37), (1, 200, 0, 37)), ((128, 1, 513), (300, 7, 513)), ((300, 64), (17, 400))),
        (64, 80, 128),
        ((False, None), (True, None), (True, 1), (True, 64))))
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", grid(_VARLEN_SMALL, _VARLEN_FULL), ids=str)
def test_varlen(case, dtype):
    lq, lk, hq, hkv, d, causal, window = case
    q = randn(sum(lq), hq, d, dtype=dtype)
    k, v = randn(sum(lk), hkv, d, dtype=dtype), randn(sum(lk), hkv, d, dtype=dtype)
    out, lse = check_attention(q, k, v, causal=causal, window=window, cu_seqlens_q=_cu(lq),
                               cu_seqlens_k=_cu(lk), max_seqlen_q=max(lq), max_seqlen_k=max(lk),
                               grad=True, with_dlse=dtype == torch.float32)
    assert lse.shape == (hq, sum(lq))


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("max_q, max_k", [(100, 0), (100, 10), (10, 100), (0, 0)])
def test_understated_max_seqlen(max_q, max_k, deterministic, monkeypatch):
    # max_seqlen_q/k size the grids only: understated (unchecked without GPTKERNELS_DEBUG=1), the
    # programs loop over the longer sequences, so every output row and every gradient is computed
    # (it used to leave rows unwritten, zero every gradient at max_seqlen_k=0, garbage dK/dV).
    monkeypatch.delenv("GPTKERNELS_DEBUG", raising=False)
    lq, lk = (100, 37, 0, 5), (100, 3, 17, 100)
    q = randn(sum(lq), 2, 32, dtype=torch.float16)
    k, v = randn(sum(lk), 1, 32, dtype=torch.float16), randn(sum(lk), 1, 32, dtype=torch.float16)
    check_attention(q, k, v, causal=True, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), grad=True,
                    max_seqlen_q=max_q, max_seqlen_k=max_k, deterministic=deterministic)


def test_varlen_matches_dense():
    # Packed sequences of equal length give exactly the dense answer.
    q, k, v = randn(3, 37, 4, 64), randn(3, 37, 2, 64), randn(3, 37, 2, 64)
    dense, dense_lse = gptkernels.flash_attn(q, k, v, window=5, return_lse=True, backend=BACKEND)
    cu = _cu([37] * 3)
    packed, packed_lse = gptkernels.flash_attn(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                               window=5, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                               return_lse=True, backend=BACKEND)
    assert torch.equal(packed.view(3, 37, 4, 64), dense)
    assert torch.equal(packed_lse.view(4, 3, 37).transpose(0, 1), dense_lse)


# --------------------------------------------------------------------------------------------------
# Paged keys (chunked prefill / prefix reuse)
# --------------------------------------------------------------------------------------------------


def _paged_cache(lengths, block_size, hkv, d, dtype, spare=3, gen=None, dv=None):
    """A cache holding sequences of ``lengths`` in shuffled blocks, plus the block table; ``dv``:
    v_cache's head dim (default ``d``)."""
    per_seq = [max(1, -(-n // block_size)) for n in lengths]
    max_blocks = max(per_seq) + 1  # a spare column: tables are usually wider than needed
    num_blocks = sum(per_seq) + spare
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.full((len(lengths), max_blocks), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(per_seq):
        table[b, :n] = perm[used:used + n].to(torch.int32)
        used += n
    # unused entries point at arbitrary (valid) blocks, as a real block manager may leave them
    table[table < 0] = perm[-1].to(torch.int32)
    k_cache = randn(num_blocks, block_size, hkv, d, dtype=dtype)
    v_cache = randn(num_blocks, block_size, hkv, d if dv is None else dv, dtype=dtype)
    return k_cache, v_cache, table.to(DEVICE), torch.tensor(lengths, dtype=torch.int32, device=DEVICE)


_PAGED_SMALL = [
    # (block size, prefix lengths, new chunk lengths, Hq, Hkv, D, window, varlen q)
    (8, (0, 30, 100), (1, 17, 30), 4, 2, 64, None, True),
    (16, (50, 3), (20, 20), 8, 1, 80, 9, False),
    (64, (130, 0, 7), (1, 1, 1), 2, 2, 128, None, False),     # decode-like: one new token each
    (256, (1, 300), (97, 5), 4, 1, 64, 64, True),
]
_PAGED_FULL = _PAGED_SMALL + [
    # dense q (varlen False) needs one chunk length for every sequence: the longest chunk stands in
    (bs, pre, new if vl else (max(new),) * len(new), _RATIOS[i % 4][0] * _RATIOS[i % 4][1], _RATIOS[i % 4][1],
     d, w, vl)
    for i, (bs, (pre, new), d, (w, vl)) in enumerate(itertools.product(
        (8, 16, 64, 256),
        (((0, 30, 1000), (1, 17, 30)), ((2000, 5), (128, 128))),
        (64, 80, 128),
        ((None, True), (None, False), (100, True))))
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", grid(_PAGED_SMALL, _PAGED_FULL), ids=str)
def test_paged_prefill(case, dtype):
    block_size, prefix, new, hq, hkv, d, window, varlen = case
    lengths = [p + n for p, n in zip(prefix, new)]
    k_cache, v_cache, table, seqlens = _paged_cache(lengths, block_size, hkv, d, dtype)
    if varlen:
        q = randn(sum(new), hq, d, dtype=dtype)
        kw = dict(cu_seqlens_q=_cu(new), max_seqlen_q=max(new))
    else:
        assert len(set(new)) == 1
        q = randn(len(new), new[0], hq, d, dtype=dtype)
        kw = {}
    check_attention(q, k_cache, v_cache, causal=True, window=window, block_table=table,
                    seqlens_k=seqlens, **kw)


def test_paged_matches_dense():
    # A chunk attending to prefix + itself through the cache equals dense attention on the
    # gathered keys (bottom-right aligned), bit for bit.
    k_cache, v_cache, table, seqlens = _paged_cache([77, 77], 16, 2, 64, torch.float32)
    q = randn(2, 20, 4, 64)
    paged = gptkernels.flash_attn(q, k_cache, v_cache, block_table=table, seqlens_k=seqlens,
                                  backend=BACKEND)
    k = torch.stack([reference.gather_paged(k_cache, table[b], 77) for b in range(2)])
    v = torch.stack([reference.gather_paged(v_cache, table[b], 77) for b in range(2)])
    dense = gptkernels.flash_attn(q, k, v, backend=BACKEND)
    torch.testing.assert_close(paged, dense, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Index tensors of any strides: the same answer as contiguous ones, on every backend
# --------------------------------------------------------------------------------------------------


def _same_on_views(call, args, name, junk, views):
    """call(**args) with args[name] replaced by each of its ``views``: the answer equals the one with
    the view made contiguous, and the torch backend's (forward, and backward where differentiable)."""
    for view in views:
        x = index_views(args[name], junk)[view]
        for backend in ("triton", "torch"):
            got = call(backend, **{**args, name: x})
            want = call(backend, **{**args, name: x.contiguous()})
            ref = call("torch", **{**args, name: x.contiguous()})
            for g, w, r in zip(got, want, ref):
                assert torch.equal(g, w), (name, view, backend)
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_varlen_cu_seqlens_of_any_strides():
    # (An expanded cu_seqlens cannot be valid: it would have to start at 0 and end at Tq > 0.)
    lq, lk = (5, 0, 17, 9), (12, 3, 17, 30)
    q, k, v = randn(sum(lq), 2, 32), randn(sum(lk), 1, 32), randn(sum(lk), 1, 32)
    dout = randn(*q.shape)

    def call(backend, cu_q, cu_k):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = gptkernels.flash_attn(*leaves, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=17,
                                    max_seqlen_k=30, backend=backend)
        return (out, *torch.autograd.grad((out * dout).sum(), leaves))

    args = {"cu_q": _cu(lq), "cu_k": _cu(lk)}
    _same_on_views(call, args, "cu_q", 7, ("strided", "transposed"))
    _same_on_views(call, args, "cu_k", 7, ("strided", "transposed"))


def test_paged_index_tensors_of_any_strides():
    k_cache, v_cache, table, seqlens = _paged_cache([40, 9, 26], 8, 2, 32, torch.float32)
    q = randn(3, 5, 4, 32)
    cu_q = _cu((5, 0, 4))

    def call(backend, table, seqlens, cu_q=None):
        qq = q[:, :5].flatten(0, 1)[:9] if cu_q is not None else q
        return gptkernels.flash_attn(qq, k_cache, v_cache, block_table=table, seqlens_k=seqlens,
                                     cu_seqlens_q=cu_q, max_seqlen_q=None if cu_q is None else 5,
                                     return_lse=True, backend=backend)

    views = ("strided", "transposed", "expanded")
    _same_on_views(call, {"table": table, "seqlens": seqlens}, "seqlens", 37, views)
    _same_on_views(call, {"table": table, "seqlens": seqlens}, "table", 1, views)
    _same_on_views(call, {"table": table, "seqlens": seqlens, "cu_q": cu_q}, "cu_q", 3,
                   ("strided", "transposed"))


# --------------------------------------------------------------------------------------------------
# Unchecked bad indices never read out of bounds
# --------------------------------------------------------------------------------------------------


def _nan_guarded(shape, dtype, guard=4):
    """A tensor whose storage is padded on both sides (along dim 0) with NaN: a read out of
    bounds would poison the output."""
    full = torch.full((shape[0] + 2 * guard, *shape[1:]), float("nan"), dtype=dtype, device=DEVICE)
    inner = full[guard:guard + shape[0]]
    inner.copy_(randn(*shape, dtype=dtype))
    return inner


def test_bad_block_table_stays_in_bounds(monkeypatch):
    monkeypatch.delenv("GPTKERNELS_DEBUG", raising=False)
    k_cache, v_cache = _nan_guarded((6, 16, 2, 64), torch.float32), _nan_guarded((6, 16, 2, 64), torch.float32)
    table = torch.tensor([[0, 7, -3, 2], [5, 4, 1000, -1]], dtype=torch.int32, device=DEVICE)
    seqlens = torch.tensor([60, 10_000], dtype=torch.int32, device=DEVICE)  # 10_000 > capacity 64
    q = randn(2, 5, 4, 64)
    out, lse = gptkernels.flash_attn(q, k_cache, v_cache, block_table=table, seqlens_k=seqlens,
                                     return_lse=True, backend=BACKEND)
    assert bool(torch.isfinite(out).all()) and not bool(torch.isnan(lse).any())
    # Blocks outside the cache contribute nothing: sequence 0 equals attention over blocks 0 and 2.
    keys = torch.cat([k_cache[0], k_cache[2, :12]])
    vals = torch.cat([v_cache[0], v_cache[2, :12]])
    want = reference.attention(q[:1].double(), keys[None].double(), vals[None].double(), causal=False)
    got_visible = gptkernels.flash_attn(q[:1], k_cache, v_cache, causal=False,
                                        block_table=table[:1], seqlens_k=seqlens[:1], backend=BACKEND)
    torch.testing.assert_close(got_visible.double(), want, rtol=1e-5, atol=1e-6)


def test_bad_cu_seqlens_stay_in_bounds(monkeypatch):
    monkeypatch.delenv("GPTKERNELS_DEBUG", raising=False)
    q = _nan_guarded((20, 2, 64), torch.float32)
    k, v = _nan_guarded((30, 2, 64), torch.float32), _nan_guarded((30, 2, 64), torch.float32)
    cu_q = torch.tensor([0, 15, 40], dtype=torch.int32, device=DEVICE)  # ends past Tq = 20
    cu_k = torch.tensor([-5, 25, 90], dtype=torch.int32, device=DEVICE)  # starts before 0, ends past 30
    out, lse = gptkernels.flash_attn(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=40,
                                     max_seqlen_k=90, return_lse=True, backend=BACKEND)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())


# --------------------------------------------------------------------------------------------------
# Split keys (flash-decoding): few query tiles, long keys
# --------------------------------------------------------------------------------------------------

# (batch, Sq, Sk, Hq, Hkv, D, causal, window)
_SPLIT_CASES = [
    (2, 1, 300, 8, 2, 64, True, None),      # decode rows, GQA
    (1, 5, 300, 4, 1, 80, True, 64),        # a short chunk with a window
    (1, 40, 17, 2, 2, 64, True, None),      # Sq > Sk: rows that see nothing in every split
    (2, 17, 130, 2, 1, 128, False, None),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_keys_forward(splits, dtype, monkeypatch):
    # Forced split counts (the heuristic only splits long keys): each split's share of every query
    # tile's band, the merge, and lse (also through the backward, which reads it).
    from gptkernels.triton import flash_attn as fa

    monkeypatch.setattr(fa, "_fwd_num_splits", lambda *args: splits)
    for i, (b, sq, sk, hq, hkv, d, causal, window) in enumerate(_SPLIT_CASES):
        q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
        check_attention(q, k, v, causal=causal, window=window, grad=i == 1)
    lq, lk = (1, 0, 3), (200, 9, 0)
    q, k, v = randn(sum(lq), 4, 64, dtype=dtype), randn(sum(lk), 2, 64, dtype=dtype), \
        randn(sum(lk), 2, 64, dtype=dtype)
    check_attention(q, k, v, causal=True, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), max_seqlen_q=3,
                    max_seqlen_k=200)
    k_cache, v_cache, table, seqlens = _paged_cache([250, 7, 90], 16, 2, 64, dtype)
    check_attention(randn(3, 2, 4, 64, dtype=dtype), k_cache, v_cache, causal=True, block_table=table,
                    seqlens_k=seqlens)


def test_split_heuristic():
    # Decode-shaped calls with long keys split; a prefill that fills the GPU by itself does not.
    from gptkernels.triton import flash_attn as fa

    cpu = torch.device("cpu")
    assert fa._fwd_num_splits(1, 8, 1, 8192, None, cpu) > 1
    assert fa._fwd_num_splits(1, 8, 1, 8192, 256, cpu) == 1      # a window of 256: short band
    assert fa._fwd_num_splits(1, 8, 1, 300, None, cpu) == 1       # short keys
    assert fa._fwd_num_splits(4, 32, 4096, 4096, None, cpu) == 1  # 1024 programs already


# --------------------------------------------------------------------------------------------------
# Short queries with GQA: a group's query heads packed into one query tile (PACK_GQA)
# --------------------------------------------------------------------------------------------------

# (batch, Sq, Sk, Hq, Hkv, D, causal, window): Sq <= 16 or group x Sq <= 128, group > 1
_PACKED_SMALL = [
    (2, 1, 200, 8, 1, 64, True, None),       # decode, group 8
    (1, 3, 150, 6, 2, 80, True, 40),         # a speculative chunk, group 3 (not a power of two), window
    (1, 16, 70, 16, 2, 64, True, None),      # 16 rows x group 8 = 128 packed rows
    (2, 5, 5, 4, 2, 128, False, None),
    (1, 20, 33, 4, 1, 32, True, None),       # group x Sq = 80
    (1, 9, 4, 2, 1, 16, True, None),         # Sq > Sk: rows that see nothing
]
_PACKED_FULL = _PACKED_SMALL + [
    (b, sq, sk, g * hkv, hkv, d, causal, w)
    for b, (sq, sk) in ((1, (1, 1)), (3, (1, 4096)), (2, (4, 1000)), (1, (16, 16)), (1, (32, 300)))
    for g, hkv in ((2, 4), (4, 2), (8, 1))
    for d in (64, 128, 256)
    for causal, w in ((True, None), (True, 256), (False, None))
    if g * sq <= 128 or sq <= 16
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", grid(_PACKED_SMALL, _PACKED_FULL), ids=str)
def test_packed_gqa(case, dtype):
    # The forward reads each K/V tile once per group; the backward (not packed) runs from its lse.
    from gptkernels.triton import flash_attn as fa

    b, sq, sk, hq, hkv, d, causal, window = case
    assert fa._pack_gqa(hq // hkv, sq)
    q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    check_attention(q, k, v, causal=causal, window=window, grad=True, with_dlse=dtype == torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 3])
def test_packed_gqa_varlen_paged_split(splits, dtype, monkeypatch):
    # Packed tiles with varlen queries and keys (empty sequences too), paged keys, and key splits
    # (flash-decoding: the partials of packed rows go where the rows' heads are).
    from gptkernels.triton import flash_attn as fa

    if splits > 1:
        monkeypatch.setattr(fa, "_fwd_num_splits", lambda *args: splits)
    lq, lk = (1, 7, 0, 2), (90, 33, 5, 0)
    q = randn(sum(lq), 8, 64, dtype=dtype)
    k, v = randn(sum(lk), 2, 64, dtype=dtype), randn(sum(lk), 2, 64, dtype=dtype)
    check_attention(q, k, v, causal=True, window=20, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk),
                    max_seqlen_q=max(lq), max_seqlen_k=max(lk), grad=True)
    # understated max_seqlen_q: the tail launch covers the packed rows past it
    check_attention(q, k, v, causal=True, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk),
                    max_seqlen_q=2, max_seqlen_k=max(lk))
    k_cache, v_cache, table, seqlens = _paged_cache([250, 7, 90], 16, 2, 64, dtype)
    check_attention(randn(3, 2, 8, 64, dtype=dtype), k_cache, v_cache, causal=True, block_table=table,
                    seqlens_k=seqlens)
    check_attention(randn(3, 1, 6, 64, dtype=dtype), k_cache, v_cache, causal=True, window=50,
                    block_table=table, seqlens_k=seqlens)


def test_pack_gqa_choice():
    # Packed: GQA with few query rows. Not packed: one head per KV head, or long queries (full tiles).
    from gptkernels.triton import flash_attn as fa

    assert fa._pack_gqa(4, 1) and fa._pack_gqa(8, 16) and fa._pack_gqa(32, 16) and fa._pack_gqa(2, 64)
    assert not fa._pack_gqa(1, 1) and not fa._pack_gqa(4, 64) and not fa._pack_gqa(2, 2048)


def test_no_keys_at_all():
    q = randn(2, 7, 2, 64)
    k = v = randn(2, 0, 1, 64)
    out, lse = gptkernels.flash_attn(q, k, v, return_lse=True, backend=BACKEND)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())


@pytest.mark.parametrize("deterministic", [True, False])
def test_varlen_tokens_outside_cu_seqlens(deterministic):
    # Tokens past cu_seqlens_*[-1] (a buffer padded beyond its sequences) belong to no sequence:
    # out 0 and lse -inf as a row that sees no key, and zero gradients, as the torch backend gives
    # (they were left unwritten: a dQ of 1e28 came back in those rows).
    cu = _cu((3, 2))
    leaves = [torch.empty(9, h, 16, device=DEVICE).normal_().requires_grad_() for h in (2, 1, 1)]
    out, lse = gptkernels.flash_attn(*leaves, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=3, max_seqlen_k=3,
                                     return_lse=True, deterministic=deterministic, backend=BACKEND)
    (out.sum() + lse[:, :5].sum()).backward()
    assert torch.equal(out[5:], torch.zeros_like(out[5:])) and bool(torch.isneginf(lse[:, 5:]).all())
    for t in leaves:
        assert torch.equal(t.grad[5:], torch.zeros_like(t.grad[5:]))
    want = reference.attention(*(t.detach() for t in leaves), cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True)
    assert torch.equal(want[0][5:], out[5:].detach()) and torch.equal(want[1][:, 5:], lse[:, 5:].detach())


@pytest.mark.skipif(not FULL_GRID, reason="needs a CUDA GPU (none is visible): too slow for the CPU "
                    "interpreter (GPTKERNELS_FULL_GRID=1 forces it)")
@pytest.mark.parametrize("window", [None, 256])
def test_long_sequence(window):
    dtype = DTYPES[-1] if DEVICE == "cpu" else torch.bfloat16
    q, k, v = randn(1, 4096, 8, 128, dtype=dtype), randn(1, 4096, 2, 128, dtype=dtype), randn(1, 4096, 2, 128, dtype=dtype)
    check_attention(q, k, v, causal=True, window=window, grad=True)


# --------------------------------------------------------------------------------------------------
# Offsets past 2**31 (GPU review)
# --------------------------------------------------------------------------------------------------


def test_head_offsets_past_2_31():
    # Inputs whose head stride is just over 2**30 elements (views of a huge, mostly untouched
    # buffer; e.g. a (B, H, S, D) tensor seen as (B, S, H, D) with S * D > 2**30): head 2 starts
    # past 2**31, so h * stride_h must be computed in int64 in every kernel (forward, preprocess,
    # dK/dV, dQ, paged keys). An int32 product wraps and reads far outside the tensors.
    from gptkernels.triton import flash_attn as fa

    dtype = DTYPES[0]
    q, k, v, dout, k_cache, v_cache = huge_stride_views(
        dtype, *[((1, 37, 3, 64), 2)] * 4, *[((4, 16, 3, 64), 2)] * 2)
    kw = dict(causal=True, window=None, softmax_scale=0.125, cu_seqlens_q=None, cu_seqlens_k=None,
              max_seqlen_q=None, max_seqlen_k=None, bottom_right=True)

    def run(q, k, v, dout):
        out, lse = fa.flash_attn_forward(q, k, v, block_table=None, seqlens_k=None, **kw)
        return (out, lse, *fa.flash_attn_backward(dout, None, q, k, v, out, lse, **kw))

    for got, want in zip(run(q, k, v, dout), run(*(t.contiguous() for t in (q, k, v, dout)))):
        torch.testing.assert_close(got, want)

    table = torch.tensor([[3, 1, 0]], dtype=torch.int32, device=DEVICE)
    seqlens = torch.tensor([45], dtype=torch.int32, device=DEVICE)

    def paged(k_cache, v_cache):
        return fa.flash_attn_forward(q, k_cache, v_cache, block_table=table, seqlens_k=seqlens, **kw)

    for got, want in zip(paged(k_cache, v_cache), paged(k_cache.contiguous(), v_cache.contiguous())):
        torch.testing.assert_close(got, want)


def test_row_offsets_past_2_31():
    # Token (row) strides past 2**31 / 15 elements: row 15 of a tile lies past 2**31, so
    # offs_m * stride_s (and offs_n * stride_s, in-block offsets of the paged keys) must be computed
    # in int64 in every kernel and both backwards; an int32 product wraps.
    from gptkernels.triton import flash_attn as fa

    dtype = DTYPES[0]
    q, k, v, dout = huge_stride_views(dtype, *[((1, 17, 2, 32), 1)] * 4, stride=ROW_STRIDE)
    kw = dict(causal=False, window=None, softmax_scale=0.25, cu_seqlens_q=None, cu_seqlens_k=None,
              max_seqlen_q=None, max_seqlen_k=None, bottom_right=True)

    def run(q, k, v, dout):
        out, lse = fa.flash_attn_forward(q, k, v, block_table=None, seqlens_k=None, **kw)
        return (out, lse, *fa.flash_attn_backward(dout, None, q, k, v, out, lse, **kw),
                *fa.flash_attn_backward(dout, None, q, k, v, out, lse, deterministic=False, **kw))

    dense = [t.contiguous() for t in (q, k, v, dout)]
    assert fa._row64(q) and not fa._row64(*dense)  # int64 row offsets only where they are needed
    for got, want in zip(run(q, k, v, dout), run(*dense)):
        torch.testing.assert_close(got, want)

    # paged keys: pages shorter than the key tile (one table entry per row) and pages of 32 rows
    # (a whole tile in one page in the interpreter), each with its last in-page row past 2**31
    for block_size in (16, 32):
        stride = 2**31 // (block_size - 1) + 2**12
        k_cache, v_cache = huge_stride_views(dtype, *[((3, block_size, 1, 32), 1)] * 2, stride=stride)
        table = torch.tensor([[2, 0, 1]], dtype=torch.int32, device=DEVICE)
        seqlens = torch.tensor([3 * block_size - 3], dtype=torch.int32, device=DEVICE)

        def paged(k_cache, v_cache):
            return fa.flash_attn_forward(dense[0], k_cache, v_cache, block_table=table,
                                         seqlens_k=seqlens, **kw)

        for got, want in zip(paged(k_cache, v_cache), paged(k_cache.contiguous(), v_cache.contiguous())):
            torch.testing.assert_close(got, want)


def test_large_batch_is_launched_in_chunks(monkeypatch):
    # CUDA caps grid dims y and z at 65535 and the batch is grid axis 2: a bigger batch (dense, or
    # varlen with many sequences) is launched in chunks. The limit is lowered to 2 here so that the
    # interpreter runs several chunks; every launch is recorded and checked against it.
    from gptkernels.triton import flash_attn as fa

    monkeypatch.setattr(fa, "MAX_GRID_YZ", 2)
    grids = []
    for kernel in (fa._fwd_kernel.fn, fa._bwd_preprocess, fa._bwd_dkdv.fn, fa._bwd_dq.fn):
        def recording(*args, _run=kernel.run, **kwargs):
            g = kwargs["grid"]
            grids.append(g(kwargs) if callable(g) else g)
            return _run(*args, **kwargs)
        monkeypatch.setattr(kernel, "run", recording)

    q, k, v = randn(5, 19, 2, 32), randn(5, 23, 1, 32), randn(5, 23, 1, 32)
    check_attention(q, k, v, causal=True, window=9, grad=True, with_dlse=True)
    check_attention(q, k, v, causal=True, window=9, grad=True, deterministic=False)
    lq, lk = (3, 0, 20, 7, 1), (5, 9, 20, 0, 30)
    q, k, v = randn(sum(lq), 2, 16), randn(sum(lk), 2, 16), randn(sum(lk), 2, 16)
    check_attention(q, k, v, causal=True, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk),
                    max_seqlen_q=max(lq), max_seqlen_k=max(lk), grad=True)
    k_cache, v_cache, table, seqlens = _paged_cache([20, 5, 33], 8, 1, 32, torch.float32)
    check_attention(randn(3, 4, 2, 32), k_cache, v_cache, causal=True, block_table=table,
                    seqlens_k=seqlens)
    check_attention(randn(9, 2, 32), k_cache, v_cache, causal=True, block_table=table,
                    seqlens_k=seqlens, cu_seqlens_q=_cu((4, 0, 5)), max_seqlen_q=5)
    assert grids and all(g[1] <= 65535 and g[2] <= 2 for g in grids)
    # dense and varlen: 5 sequences in chunks of 2, 2, 1 through 4 kernels (3 with atomic dQ: no
    # dq kernel), varlen twice (each kernel's tail launch for rows past max_seqlen_*); paged: 3
    # through 1, and twice with varlen q
    assert len(grids) == 3 * 4 + 3 * 3 + 3 * 8 + 2 + 2 * 2
    assert sum(g[2] for g in grids) == 5 * 4 + 5 * 3 + 5 * 8 + 3 + 3 * 2


# --------------------------------------------------------------------------------------------------
# Soft cap and ALiBi (issue 19 items 1-2; semantics: gptkernels/reference.py, as paged_decode's)
# --------------------------------------------------------------------------------------------------

# (softcap, slopes): "heads" = the ALiBi paper's (Hq,) slopes, "batch" = random (B, Hq) ones
_MODS = [(5.0, None), (None, "heads"), (2.0, "batch")]


def _mod_kw(softcap, kind, batch, hq):
    from tests.test_paged_ops import _slopes  # the slopes paged_decode's tests use

    return dict(softcap=softcap, alibi_slopes=_slopes(kind, batch, hq, seed=batch * hq))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mods", _MODS, ids=str)
def test_softcap_alibi_dense_and_gqa(mods, dtype):
    # forward + both backwards: dense causal GQA through lse, a window, non-causal (|i - j| both ways),
    # and a decode-shaped GQA call (packed rows: each row its own head's slope)
    softcap, kind = mods
    q, k, v = randn(2, 37, 4, 32, dtype=dtype), randn(2, 45, 2, 32, dtype=dtype), randn(2, 45, 2, 32, dtype=dtype)
    kw = _mod_kw(softcap, kind, 2, 4)
    check_attention(q, k, v, causal=True, grad=True, with_dlse=True, **kw)
    check_attention(q, k, v, causal=True, window=16, grad=True, deterministic=False, **kw)
    check_attention(q[:, :20], k, v, causal=False, grad=True, **kw)
    q, k, v = randn(2, 3, 8, 32, dtype=dtype), randn(2, 40, 2, 32, dtype=dtype), randn(2, 40, 2, 32, dtype=dtype)
    check_attention(q, k, v, causal=True, grad=True, deterministic=False, **_mod_kw(softcap, kind, 2, 8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mods", _MODS, ids=str)
def test_softcap_alibi_varlen_and_paged(mods, dtype):
    # varlen (an empty sequence, bottom-right positions per sequence) forward + backward; paged
    # keys with dense and varlen q (forward only: not differentiable), one with an fp8 cache
    softcap, kind = mods
    lq, lk = (5, 0, 17), (30, 4, 17)
    q, k, v = randn(sum(lq), 4, 32, dtype=dtype), randn(sum(lk), 2, 32, dtype=dtype), randn(sum(lk), 2, 32, dtype=dtype)
    kw = _mod_kw(softcap, kind, 3, 4)
    check_attention(q, k, v, causal=True, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), max_seqlen_q=17,
                    max_seqlen_k=30, grad=True, deterministic=dtype == torch.float16, **kw)
    k_cache, v_cache, table, seqlens = _paged_cache([40, 7, 21], 8, 2, 32, dtype)
    check_attention(randn(3, 4, 4, 32, dtype=dtype), k_cache, v_cache, causal=True, window=12,
                    block_table=table, seqlens_k=seqlens, **kw)
    check_attention(randn(9, 4, 32, dtype=dtype), k_cache, v_cache, causal=True, block_table=table,
                    seqlens_k=seqlens, cu_seqlens_q=_cu((4, 0, 5)), max_seqlen_q=5, **kw)
    scales = dict(k_scale=torch.tensor([0.02, 0.05], device=DEVICE), v_scale=torch.tensor(0.03, device=DEVICE))
    k8 = reference.quantize_fp8(k_cache * 4, scales["k_scale"])
    v8 = reference.quantize_fp8(v_cache, scales["v_scale"])
    check_attention(randn(3, 2, 4, 32, dtype=dtype), k8, v8, causal=True, block_table=table,
                    seqlens_k=seqlens, **scales, **kw)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("softcap", [50.0, 2.0])
def test_softcap_large_and_small(softcap, deterministic):
    # scores of a few tens: a cap of 50 barely bends them (tanh near its linear part), a cap of 2
    # flattens them (tanh saturated, 1 - tanh^2 near 0 in the backward)
    q, k, v = randn(1, 33, 2, 64, scale=3.0), randn(1, 33, 2, 64, scale=3.0), randn(1, 33, 2, 64)
    check_attention(q, k, v, causal=True, softcap=softcap, grad=True, deterministic=deterministic,
                    with_dlse=True, lse_floor=True)


def test_softcap_alibi_torch_backend_is_reference():
    q, k, v = randn(2, 9, 4, 16), randn(2, 12, 2, 16), randn(2, 12, 2, 16)
    kw = _mod_kw(3.0, "batch", 2, 4)
    out, lse = gptkernels.flash_attn(q, k, v, return_lse=True, backend="torch", **kw)
    r_out, r_lse = reference.attention(q, k, v, return_lse=True, **kw)
    assert torch.equal(out, r_out) and torch.equal(lse, r_lse)
    # the modifiers do change the result (a test of them that could not fail would prove nothing)
    assert not torch.allclose(out, gptkernels.flash_attn(q, k, v, backend="torch"))


def test_softcap_alibi_slopes_of_any_strides():
    # (B, Hq) slopes as a transposed view and (Hq,) slopes with a stride: the same answer as
    # contiguous copies (the kernels read them through their strides)
    q, k, v = randn(3, 6, 4, 16), randn(3, 10, 2, 16), randn(3, 10, 2, 16)
    g = torch.Generator().manual_seed(3)
    batch = (torch.rand(4, 3, generator=g) * 0.5).to(DEVICE).t()
    heads = (torch.rand(4, 2, generator=g) * 0.5).to(DEVICE)[:, 0]
    for slopes in (batch, heads):
        assert not slopes.is_contiguous()
        got = gptkernels.flash_attn(q, k, v, alibi_slopes=slopes, backend=BACKEND)
        want = gptkernels.flash_attn(q, k, v, alibi_slopes=slopes.contiguous(), backend=BACKEND)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _bad_mod_args():
    return dict(q=randn(2, 5, 4, 16), k=randn(2, 7, 2, 16), v=randn(2, 7, 2, 16))


@pytest.mark.parametrize("over, exc, match", [
    (dict(softcap=0.0), ValueError, "flash_attn: softcap must be None or a finite float > 0"),
    (dict(softcap=-1.0), ValueError, "flash_attn: softcap must be None or a finite float > 0"),
    (dict(softcap=float("nan")), ValueError, "flash_attn: softcap"),
    (dict(softcap=float("inf")), ValueError, "flash_attn: softcap"),
    (dict(softcap="30"), TypeError, "flash_attn: softcap must be None or a float"),
    (dict(softcap=True), TypeError, "flash_attn: softcap"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.float16)), TypeError,
     "flash_attn: alibi_slopes must have dtype float32"),
    (dict(alibi_slopes=torch.ones(5)), ValueError,
     r"flash_attn: alibi_slopes must be shaped \(Hq,\) = \(4,\) or \(B, Hq\) = \(2, 4\)"),
    (dict(alibi_slopes=torch.ones(3, 4)), ValueError, "flash_attn: alibi_slopes must be shaped"),
    (dict(alibi_slopes=torch.ones(2, 4, 1)), ValueError, "flash_attn: alibi_slopes must be shaped"),
    (dict(alibi_slopes=torch.ones(4, device="meta")), ValueError,
     "flash_attn: alibi_slopes must be on the same device"),
    (dict(alibi_slopes=[0.5] * 4), TypeError, "flash_attn: alibi_slopes must be a torch.Tensor"),
])
@pytest.mark.parametrize("backend", [BACKEND, "torch"])
def test_softcap_alibi_bad_input(over, exc, match, backend):
    if isinstance(over.get("alibi_slopes"), torch.Tensor) and over["alibi_slopes"].device.type != "meta":
        over = dict(over, alibi_slopes=over["alibi_slopes"].to(DEVICE))
    with pytest.raises(exc, match=match):
        gptkernels.flash_attn(**_bad_mod_args(), backend=backend, **over)


def test_alibi_slopes_get_no_gradient_on_kernels():
    # The kernel backends (like FlashAttention) do not differentiate the slopes: refused rather
    # than silently leaving their .grad empty; detached slopes are fine.
    args = _bad_mod_args()
    slopes = torch.full((4,), 0.3, device=DEVICE, requires_grad=True)
    with pytest.raises(gptkernels.BackendUnavailableError, match="flash_attn: .*alibi_slopes"):
        gptkernels.flash_attn(**args, alibi_slopes=slopes, backend=BACKEND)
    gptkernels.flash_attn(**args, alibi_slopes=slopes.detach(), backend=BACKEND)


def test_cuda_backend_refuses_softcap_and_alibi():
    # The CUDA kernels implement neither: the launcher refuses, naming the argument, before it
    # touches the extension (so this runs without a GPU).
    from gptkernels import cuda as cuda_backend

    q, k, v = randn(1, 4, 2, 64, dtype=torch.float16), randn(1, 6, 2, 64, dtype=torch.float16), \
        randn(1, 6, 2, 64, dtype=torch.float16)
    kw = dict(causal=True, window=None, softmax_scale=0.125, cu_seqlens_q=None, cu_seqlens_k=None,
              max_seqlen_q=None, max_seqlen_k=None, block_table=None, seqlens_k=None, bottom_right=True)
    for opt, name in ((dict(softcap=5.0), "softcap"), (dict(alibi_slopes=torch.ones(2, device=DEVICE)), "alibi_slopes")):
        with pytest.raises(gptkernels.BackendUnavailableError,
                           match=f"flash_attn: backend 'cuda' cannot serve this call: no CUDA kernel for {name}"):
            cuda_backend.flash_attn_forward(q, k, v, **kw, **opt)


def test_softcap_alibi_through_torch_compile():
    # softcap and the slopes go through the torch.library ops (schema, fake implementations,
    # autograd), traced whole by torch.compile
    torch._dynamo.reset()
    q, k, v = (randn(1, 9, 4, 16).requires_grad_() for _ in range(3))
    kw = _mod_kw(4.0, "heads", 1, 4)

    def fn(q, k, v):
        return gptkernels.flash_attn(q, k, v, backend=BACKEND, **kw)

    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    want = fn(q, k, v)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.sum(), (q, k, v))
    g_want = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mods", _MODS, ids=str)
def test_softcap_alibi_gpu(mods, dtype):
    # the GPU's own configs (wgmma tiles, autotuned), longer sequences, D = 128
    softcap, kind = mods
    q, k, v = randn(2, 300, 8, 128, dtype=dtype), randn(2, 300, 2, 128, dtype=dtype), randn(2, 300, 2, 128, dtype=dtype)
    kw = _mod_kw(softcap, kind, 2, 8)
    for deterministic in (True, False):
        check_attention(q, k, v, causal=True, grad=True, with_dlse=True, deterministic=deterministic, **kw)
    check_attention(q, k, v, causal=True, window=64, grad=True, **kw)
    check_attention(q[:, :1], k, v, causal=True, **kw)  # decode: packed GQA rows, split keys
    lq, lk = (100, 1, 250), (300, 40, 250)
    qv, kv_, vv = randn(sum(lq), 8, 128, dtype=dtype), randn(sum(lk), 2, 128, dtype=dtype), randn(sum(lk), 2, 128, dtype=dtype)
    check_attention(qv, kv_, vv, causal=True, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), max_seqlen_q=250,
                    max_seqlen_k=300, grad=True, **_mod_kw(softcap, kind, 3, 8))


# --------------------------------------------------------------------------------------------------
# Two-sided and non-causal windows (issue 19 item 4): window=(left, right), FlashAttention's
# window_size; semantics: reference.attention_mask, normalised by _policy.window_bounds
# --------------------------------------------------------------------------------------------------

# (Sq, Sk, Hq, Hkv, window): the interpreter's tiles are 64 x 32 (forward, dQ) and 32 x 64 (dK/dV),
# so these bands cross tile edges, have interiors (or not) and start / end inside tiles
_TWO_SIDED = [
    (45, 45, 2, 2, (5, 7)),       # both sides bounded, non-causal
    (40, 70, 4, 2, (3, -1)),      # left only (everything to the right), Sq < Sk, GQA
    (70, 40, 2, 1, (-1, 4)),      # right only, Sq > Sk: the first rows see no key
    (33, 33, 2, 2, (0, 0)),       # each row its own key only
    (20, 50, 2, 2, (2, 100)),     # right past the end of the keys
    (70, 20, 2, 1, (3, 25)),      # right > Sk and Sq > Sk: rows i < 25 see nothing (p + right < 0)
    (37, 45, 4, 2, (40, 30)),     # a wide band: an unmasked interior on both sides
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", _TWO_SIDED, ids=str)
def test_two_sided_window_dense(case, dtype):
    sq, sk, hq, hkv, window = case
    q, k, v = randn(2, sq, hq, 32, dtype=dtype), randn(2, sk, hkv, 32, dtype=dtype), randn(2, sk, hkv, 32, dtype=dtype)
    for deterministic in (True, False):
        check_attention(q, k, v, causal=False, window=window, grad=True, with_dlse=deterministic,
                        deterministic=deterministic)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_sided_window_varlen_and_paged(dtype):
    # varlen with an empty sequence (and one with Sq > Sk), forward + both backwards; paged keys
    # (forward only), dense and varlen q
    lq, lk = (5, 0, 40, 17), (30, 4, 25, 17)
    q, k, v = randn(sum(lq), 4, 32, dtype=dtype), randn(sum(lk), 2, 32, dtype=dtype), randn(sum(lk), 2, 32, dtype=dtype)
    for window, deterministic in (((4, 6), True), ((-1, 3), False)):
        check_attention(q, k, v, causal=False, window=window, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk),
                        max_seqlen_q=40, max_seqlen_k=30, grad=True, with_dlse=True,
                        deterministic=deterministic)
    k_cache, v_cache, table, seqlens = _paged_cache([40, 7, 70], 8, 2, 32, dtype)
    check_attention(randn(3, 33, 4, 32, dtype=dtype), k_cache, v_cache, causal=False, window=(6, 3),
                    block_table=table, seqlens_k=seqlens)
    for window in ((-1, 2), (20, -1)):
        check_attention(randn(9, 4, 32, dtype=dtype), k_cache, v_cache, causal=False, window=window,
                        block_table=table, seqlens_k=seqlens, cu_seqlens_q=_cu((4, 0, 5)), max_seqlen_q=5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_sided_window_with_softcap_alibi(dtype):
    # ALiBi's |p - j| on both sides of the query, the cap's chain rule, both backwards
    q, k, v = randn(2, 37, 4, 32, dtype=dtype), randn(2, 45, 2, 32, dtype=dtype), randn(2, 45, 2, 32, dtype=dtype)
    for deterministic in (True, False):
        check_attention(q, k, v, causal=False, window=(9, 12), grad=True, with_dlse=True,
                        deterministic=deterministic, **_mod_kw(2.0, "batch", 2, 4))


def test_window_pair_of_causal_form_is_the_int_form():
    # (W - 1, 0), with causal=True or False, and (W - 1, 5) with causal=True (FlashAttention: causal
    # sets right = 0) are window=W: the same kernels, bit for bit, forward and both backwards
    q, k, v = randn(2, 40, 4, 32), randn(2, 60, 2, 32), randn(2, 60, 2, 32)
    dout = randn(2, 40, 4, 32)

    def run(deterministic, grad=True, **kw):
        leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        out = gptkernels.flash_attn(*leaves, backend=BACKEND, deterministic=deterministic, **kw)
        return (out, *torch.autograd.grad((out * dout).sum(), leaves)) if grad else (out,)

    pairs = {True: (dict(causal=True, window=(8, 0)), dict(causal=False, window=(8, 0)),
                    dict(causal=True, window=(8, 5)), dict(causal=True, window=[8, 0])),
             False: (dict(causal=False, window=(8, 0)),)}
    for deterministic, forms in pairs.items():
        want = run(deterministic, causal=True, window=9)
        for kw in forms:
            got = run(deterministic, **kw)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), kw
    # and the pair forms of "no window": (-1, 0) causal, (-1, -1) full attention
    assert torch.equal(run(True, False, causal=False, window=(-1, 0))[0], run(True, False, causal=True)[0])
    assert torch.equal(run(True, False, causal=False, window=(-1, -1))[0], run(True, False, causal=False)[0])
    assert not torch.allclose(run(True, False, causal=False, window=(8, 3))[0], want[0])


def test_two_sided_window_torch_backend_and_compile():
    # the torch backend is the reference; the pair goes through the torch.library ops (schema
    # window_left / window_right) whole under torch.compile
    q, k, v = randn(1, 12, 2, 16), randn(1, 15, 2, 16), randn(1, 15, 2, 16)
    out = gptkernels.flash_attn(q, k, v, causal=False, window=(2, 3), backend="torch")
    assert torch.equal(out, reference.attention(q, k, v, causal=False, window=(2, 3)))
    torch._dynamo.reset()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def fn(q, k, v):
        return gptkernels.flash_attn(q, k, v, causal=False, window=(2, 3), backend=BACKEND)

    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
    want = fn(*leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(want.sum(), leaves)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("window, causal, exc, match", [
    ((-2, 3), False, ValueError, r"flash_attn: window=\(left, right\): left must be >= 0 or -1"),
    ((3, -5), False, ValueError, r"flash_attn: window=\(left, right\): right must be >= 0 or -1"),
    ((3, -5), True, ValueError, r"flash_attn: window=\(left, right\): right must be >= 0 or -1"),
    ((3,), False, ValueError, r"flash_attn: window must be an int or a \(left, right\) pair, got 1 values"),
    ((1, 2, 3), False, ValueError, r"flash_attn: window must be an int or a \(left, right\) pair"),
    ((1.5, 2), False, TypeError, r"flash_attn: window=\(left, right\) must hold ints, got left = 1.5"),
    ((1, "2"), False, TypeError, r"flash_attn: window=\(left, right\) must hold ints, got right = '2'"),
    ((True, 2), False, TypeError, r"flash_attn: window=\(left, right\) must hold ints"),
    (2.0, True, TypeError, r"flash_attn: window must be None or an int >= 1 or a \(left, right\) pair"),
    (0, True, ValueError, "flash_attn: window must be >= 1"),
    (5, False, ValueError, r"flash_attn: window=5 needs causal attention .*window=\(left, right\)"),
])
@pytest.mark.parametrize("backend", [BACKEND, "torch"])
def test_window_pair_bad_input(window, causal, exc, match, backend):
    with pytest.raises(exc, match=match):
        gptkernels.flash_attn(*_bad_mod_args().values(), causal=causal, window=window, backend=backend)


def test_window_pair_refused_where_not_served():
    # sdpa (torch's SDPA has no window pair) and paged_decode (one query row, the last key: only a
    # left window means anything) take the int form only
    q = randn(1, 2, 5, 16)
    with pytest.raises(TypeError, match="sdpa: window must be None or an int >= 1, got"):
        gptkernels.sdpa(q, q, q, is_causal=True, window=(2, 0))
    k_cache, v_cache, table, seqlens = _paged_cache([9], 8, 2, 16, torch.float32)
    with pytest.raises(TypeError, match="paged_decode: window must be None or an int >= 1"):
        gptkernels.paged_decode(randn(1, 2, 16), k_cache, v_cache, table, seqlens, window=(3, 0))


def test_cuda_backend_refuses_two_sided_windows():
    # The CUDA kernels serve causal windows (left, 0) and full attention only: the launcher refuses
    # the rest, naming the argument, before it touches the extension (so this runs without a GPU);
    # the forms it serves map to the C++ op's (causal, W)
    from gptkernels import cuda as cuda_backend

    q, k, v = (randn(1, 4, 2, 64, dtype=torch.float16) for _ in range(3))
    kw = dict(softmax_scale=0.125, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
              max_seqlen_k=None, block_table=None, seqlens_k=None, bottom_right=True)
    for window in ((3, 2), (3, -1), (-1, 2), (2, 1)):
        with pytest.raises(gptkernels.BackendUnavailableError,
                           match=r"flash_attn: backend 'cuda' cannot serve this call: no CUDA kernel for "
                                 r"window=\(left, right\)"):
            cuda_backend.flash_attn_forward(q, k, v, causal=False, window=window, **kw)
    m = cuda_backend._causal_window
    assert m(True, None) == (True, None) and m(False, None) == (False, None) and m(True, 7) == (True, 7)
    assert m(False, (6, 0)) == (True, 7) and m(True, (6, 4)) == (True, 7) and m(False, (-1, 0)) == (True, None)
    assert m(False, (-1, -1)) == (False, None)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("window", [(64, 32), (128, -1), (-1, 100), (0, 0)], ids=str)
def test_two_sided_window_gpu(window, dtype):
    # the GPU's own configs (wgmma tiles, autotuned), longer sequences, D = 128, varlen and paged
    q, k, v = randn(2, 300, 8, 128, dtype=dtype), randn(2, 350, 2, 128, dtype=dtype), randn(2, 350, 2, 128, dtype=dtype)
    for deterministic in (True, False):
        check_attention(q, k, v, causal=False, window=window, grad=True, with_dlse=True,
                        deterministic=deterministic)
    lq, lk = (100, 1, 250), (300, 40, 250)
    qv, kv_, vv = randn(sum(lq), 8, 128, dtype=dtype), randn(sum(lk), 2, 128, dtype=dtype), randn(sum(lk), 2, 128, dtype=dtype)
    check_attention(qv, kv_, vv, causal=False, window=window, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk),
                    max_seqlen_q=250, max_seqlen_k=300, grad=True)
    k_cache, v_cache, table, seqlens = _paged_cache([400, 70, 1000], 16, 2, 128, dtype)
    check_attention(randn(3, 1, 8, 128, dtype=dtype), k_cache, v_cache, causal=False, window=window,
                    block_table=table, seqlens_k=seqlens)  # decode-shaped: packed GQA, split keys
    check_attention(randn(3, 64, 8, 128, dtype=dtype), k_cache, v_cache, causal=False, window=window,
                    block_table=table, seqlens_k=seqlens)


# --------------------------------------------------------------------------------------------------
# A value head dim different from the query's (issue 19 item 6): q, k (..., D); v and out (..., Dv);
# FlashAttention 3's headdim_v (DeepSeek MLA: D = 192, Dv = 128)
# --------------------------------------------------------------------------------------------------

# (batch, Sq, Sk, Hq, Hkv, D, Dv, causal, window)
_DV_CASES = [
    (2, 40, 50, 4, 2, 64, 32, True, None),      # GQA, Dv < D
    (1, 37, 37, 2, 2, 32, 64, False, None),     # Dv > D: the V tile wider than the K tile
    (1, 20, 24, 2, 1, 192, 128, True, None),    # DeepSeek MLA's head dims, MQA
    (1, 45, 70, 4, 1, 80, 16, True, 20),        # a masked 128-wide K tile, a 16-wide V tile, window
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", _DV_CASES, ids=str)
def test_value_head_dim_dense(case, dtype):
    # forward and both backwards (two kernels; atomic dQ), with a gradient through lse
    b, sq, sk, hq, hkv, d, dv, causal, window = case
    q, k = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    v = randn(b, sk, hkv, dv, dtype=dtype)
    for deterministic in (True, False):
        check_attention(q, k, v, causal=causal, window=window, grad=True, with_dlse=deterministic,
                        deterministic=deterministic)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_value_head_dim_varlen_window_pair(dtype):
    # varlen with an empty query sequence and an empty key sequence; a two-sided window
    lq, lk = (30, 0, 17), (40, 5, 0)
    q = randn(sum(lq), 4, 64, dtype=dtype)
    k, v = randn(sum(lk), 2, 64, dtype=dtype), randn(sum(lk), 2, 40, dtype=dtype)
    kw = dict(cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), max_seqlen_q=max(lq), max_seqlen_k=max(lk))
    for deterministic in (True, False):
        check_attention(q, k, v, causal=True, grad=True, deterministic=deterministic, **kw)
    check_attention(q, k, v, causal=False, window=(8, 4), grad=True, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 3])
def test_value_head_dim_decode_split_and_paged(splits, dtype, monkeypatch):
    # packed GQA decode (Sq = 1, group 4) and a short chunk, with forced key splits (the partials
    # and the merge are Dv wide); paged keys with a v_cache narrower than k_cache
    from gptkernels.triton import flash_attn as fa

    if splits > 1:
        monkeypatch.setattr(fa, "_fwd_num_splits", lambda *args: splits)
    assert fa._pack_gqa(4, 1)
    q, k, v = randn(2, 1, 8, 64, dtype=dtype), randn(2, 150, 2, 64, dtype=dtype), randn(2, 150, 2, 32, dtype=dtype)
    check_attention(q, k, v, causal=True, grad=True)
    q5 = randn(1, 5, 2, 48, dtype=dtype)
    check_attention(q5, randn(1, 120, 2, 48, dtype=dtype), randn(1, 120, 2, 96, dtype=dtype), causal=True,
                    window=40)
    k_cache, v_cache, table, seqlens = _paged_cache([90, 7, 0], 16, 2, 64, dtype, dv=32)
    check_attention(randn(3, 1, 8, 64, dtype=dtype), k_cache, v_cache, causal=True, block_table=table,
                    seqlens_k=seqlens)
    lq = (3, 1, 0)
    check_attention(randn(sum(lq), 8, 64, dtype=dtype), k_cache, v_cache, causal=True, block_table=table,
                    seqlens_k=seqlens, cu_seqlens_q=_cu(lq), max_seqlen_q=max(lq))


def test_value_head_dim_torch_backend_and_compile():
    # the torch backend gives out (..., Dv) on every layout (its per-sequence path too), and the
    # torch.library ops' fake implementations give out's shape from v, traced whole by torch.compile
    lq, lk = (5, 0, 3), (6, 2, 4)
    q, k, v = randn(sum(lq), 4, 32), randn(sum(lk), 2, 32), randn(sum(lk), 2, 8)
    kw = dict(cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), max_seqlen_q=5, max_seqlen_k=6)
    want = gptkernels.flash_attn(q, k, v, backend=BACKEND, **kw)
    got = gptkernels.flash_attn(q, k, v, backend="torch", **kw)
    assert got.shape == (sum(lq), 4, 8)
    torch.testing.assert_close(got, want)
    torch._dynamo.reset()
    qd, kd, vd = randn(1, 9, 4, 32).requires_grad_(), randn(1, 9, 2, 32).requires_grad_(), \
        randn(1, 9, 2, 16).requires_grad_()

    def fn(q, k, v):
        return gptkernels.flash_attn(q, k, v, backend=BACKEND, return_lse=True)

    out, lse = torch.compile(fn, fullgraph=True, backend="aot_eager")(qd, kd, vd)
    w_out, w_lse = fn(qd, kd, vd)
    assert out.shape == (1, 9, 4, 16) and lse.shape == (1, 4, 9)
    torch.testing.assert_close(out, w_out)
    for a, b in zip(torch.autograd.grad(out.sum(), (qd, kd, vd)), torch.autograd.grad(w_out.sum(), (qd, kd, vd))):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_value_head_dim_bad_input(backend):
    q, k = randn(1, 4, 2, 32), randn(1, 6, 2, 32)
    with pytest.raises(ValueError, match="^flash_attn: head dim of v must be between 1 and 256, got 300"):
        gptkernels.flash_attn(q, k, randn(1, 6, 2, 300), backend=backend)
    with pytest.raises(ValueError, match="^flash_attn: k and v must have the same shape except the last"):
        gptkernels.flash_attn(q, k, randn(1, 5, 2, 16), backend=backend)
    k_cache, v_cache, table, seqlens = _paged_cache([9], 8, 2, 32, torch.float32, dv=16)
    with pytest.raises(ValueError, match="^flash_attn: k and v must have the same shape except the last"):
        gptkernels.flash_attn(q, k_cache, v_cache[:, :4], block_table=table, seqlens_k=seqlens, backend=backend)


def test_value_head_dim_refused_where_not_served():
    # the CUDA kernels have no Dv != D: the launcher refuses, naming v, before it touches the
    # extension (so this runs without a GPU); paged_decode and flash_attn_with_kvcache take equal
    # k/v cache shapes
    from gptkernels import cuda as cuda_backend

    q, k, v = randn(1, 4, 2, 64, dtype=torch.float16), randn(1, 6, 2, 64, dtype=torch.float16), \
        randn(1, 6, 2, 32, dtype=torch.float16)
    kw = dict(causal=True, window=None, softmax_scale=0.125, cu_seqlens_q=None, cu_seqlens_k=None,
              max_seqlen_q=None, max_seqlen_k=None, block_table=None, seqlens_k=None, bottom_right=True)
    with pytest.raises(gptkernels.BackendUnavailableError,
                       match="flash_attn: backend 'cuda' cannot serve this call: no CUDA kernel for a head "
                             r"dim of v \(32\) different from q's \(64\)"):
        cuda_backend.flash_attn_forward(q, k, v, **kw)
    k_cache, v_cache, table, seqlens = _paged_cache([9], 8, 2, 16, torch.float32, dv=8)
    with pytest.raises(ValueError, match="paged_decode: k_cache and v_cache must have the same shape"):
        gptkernels.paged_decode(randn(1, 2, 16), k_cache, v_cache, table, seqlens)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dims", [(192, 128), (64, 128), (128, 64)], ids=str)
def test_value_head_dim_gpu(dims, dtype):
    # the GPU's own configs (wgmma tiles, autotuned, the bucket of max(D, Dv)), longer sequences,
    # varlen, decode (packed GQA, split keys), paged
    d, dv = dims
    q, k, v = randn(2, 300, 8, d, dtype=dtype), randn(2, 350, 2, d, dtype=dtype), randn(2, 350, 2, dv, dtype=dtype)
    for deterministic in (True, False):
        check_attention(q, k, v, causal=True, grad=True, with_dlse=True, deterministic=deterministic)
    check_attention(q, k, v, causal=True, window=64, grad=True)
    check_attention(q[:, :1], k, v, causal=True)
    lq, lk = (100, 1, 250), (300, 40, 250)
    check_attention(randn(sum(lq), 8, d, dtype=dtype), randn(sum(lk), 2, d, dtype=dtype),
                    randn(sum(lk), 2, dv, dtype=dtype), causal=True, cu_seqlens_q=_cu(lq),
                    cu_seqlens_k=_cu(lk), max_seqlen_q=250, max_seqlen_k=300, grad=True)
    k_cache, v_cache, table, seqlens = _paged_cache([400, 70, 1000], 16, 2, d, dtype, dv=dv)
    check_attention(randn(3, 1, 8, d, dtype=dtype), k_cache, v_cache, causal=True, block_table=table,
                    seqlens_k=seqlens)
    check_attention(randn(3, 64, 8, d, dtype=dtype), k_cache, v_cache, causal=True, block_table=table,
                    seqlens_k=seqlens)


# --------------------------------------------------------------------------------------------------
# Dropout (issue 19 item 5)
# --------------------------------------------------------------------------------------------------


def _dropout_seed(seed):
    """(generator for the kernel call, the Philox seed that call draws from it)."""
    from gptkernels.attention import dropout_seed

    return torch.Generator().manual_seed(seed), dropout_seed(torch.Generator().manual_seed(seed))


def check_dropout(q, k, v, p, *, seed=0, varlen_lens=None, **kw):
    """check_attention with dropout_p = p: the references use the very mask the kernels draw
    (gptkernels.triton.flash_attn.dropout_mask, the kernels' own jitted helper)."""
    from gptkernels.triton.flash_attn import dropout_mask

    gen, philox_seed = _dropout_seed(seed)
    if varlen_lens is None:
        mask = dropout_mask(philox_seed, p, q.shape[0], q.shape[2], q.shape[1], k.shape[1], device=q.device)
    else:
        mask = dropout_mask(philox_seed, p, 1, q.shape[1], q.shape[0], k.shape[0], varlen=True, device=q.device)
    return check_attention(q, k, v, dropout_p=p, generator=gen, ref_kw={"dropout_mask": mask}, **kw)


# (batch, Sq, Sk, Hq, Hkv, D, causal, window)
_DROPOUT_CASES = [
    (2, 40, 40, 4, 2, 32, True, None),       # GQA, causal
    (1, 33, 70, 2, 1, 16, False, None),      # Sq < Sk, full attention
    (1, 70, 70, 2, 2, 64, True, 16),         # sliding window
    (1, 40, 33, 2, 1, 24, False, (5, 7)),    # two-sided window, Sq > Sk
]


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", _DROPOUT_CASES, ids=str)
def test_dropout_parity(case, dtype, deterministic):
    # forward (out, lse of the undropped scores) and both backwards against the float64 reference
    # with the kernels' keep mask
    b, sq, sk, hq, hkv, d, causal, window = case
    q, k, v = randn(b, sq, hq, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype), randn(b, sk, hkv, d, dtype=dtype)
    check_dropout(q, k, v, 0.17, causal=causal, window=window, grad=True, with_dlse=True,
                  deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_varlen(dtype, deterministic):
    lq, lk = (30, 1, 45), (50, 20, 45)
    q = randn(sum(lq), 4, 32, dtype=dtype)
    k, v = randn(sum(lk), 2, 32, dtype=dtype), randn(sum(lk), 2, 32, dtype=dtype)
    # an understated max_seqlen_q: the tail launches draw the same bits
    check_dropout(q, k, v, 0.25, varlen_lens=True, causal=True, cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk),
                  max_seqlen_q=20, max_seqlen_k=50, grad=True, deterministic=deterministic)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_packed_gqa_decode(dtype):
    # one query row, a group of 4 (PACK_GQA: a tile's rows are (query, head) pairs), keys split
    from gptkernels.triton.flash_attn import _pack_gqa

    assert _pack_gqa(4, 1)
    q, k, v = randn(2, 1, 8, 32, dtype=dtype), randn(2, 150, 2, 32, dtype=dtype), randn(2, 150, 2, 32, dtype=dtype)
    check_dropout(q, k, v, 0.1, causal=True)
    check_dropout(q, k, v, 0.5, seed=3, causal=True, window=40)


def _dropout_run(p, generator=None, deterministic=True, backend=BACKEND, seed=None):
    """(out, dq, dk, dv) of a fixed call; ``seed``: torch.manual_seed(seed) just before it."""
    torch.manual_seed(11)
    q, k, v = (randn(1, 37, 4, 16).requires_grad_() for _ in range(3))
    if seed is not None:
        torch.manual_seed(seed)
    out = gptkernels.flash_attn(q, k, v, dropout_p=p, generator=generator, backend=backend,
                                deterministic=deterministic)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    return (out.detach(), *grads)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dropout_reproducible(backend):
    # the same torch.manual_seed (or generator state): bit-identical out and gradients; another
    # seed: another mask; p = 0: bit-identical to no dropout, and no draw from the generator
    a, b, c = (_dropout_run(0.3, backend=backend, seed=s) for s in (1, 1, 2))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for x, y in zip(a, c):
        assert not torch.equal(x, y)
    for deterministic in (True, False):  # the atomic-dQ backward regenerates the same mask
        d = _dropout_run(0.3, backend=backend, seed=1, deterministic=deterministic)
        assert torch.equal(d[0], a[0])
        for x, y in zip(d[1:], a[1:]):  # (other tile shapes on a GPU: not bit-equal)
            torch.testing.assert_close(x, y)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for x, y in zip(_dropout_run(0.3, g1, backend=backend), _dropout_run(0.3, g2, backend=backend)):
        assert torch.equal(x, y)
    g = torch.Generator().manual_seed(4)
    state = g.get_state()
    for x, y in zip(_dropout_run(0.0, g, backend=backend), _dropout_run(0, backend=backend)):
        assert torch.equal(x, y)
    assert torch.equal(g.get_state(), state)
    plain = _dropout_run(0.0, backend=backend)
    torch.manual_seed(11)
    q, k, v = (randn(1, 37, 4, 16).requires_grad_() for _ in range(3))
    ref = gptkernels.flash_attn(q, k, v, backend=backend)
    assert torch.equal(plain[0], ref.detach())


def test_dropout_mask_statistics():
    # Philox bits: the kept fraction of a large mask within 5 sigma of 1 - p; heads, rows and
    # sequences draw independent bits (matching fraction p^2 + (1-p)^2); reproducible
    from gptkernels.triton.flash_attn import dropout_mask

    _, seed = _dropout_seed(0)
    p = 0.1
    m = dropout_mask(seed, p, 2, 4, 64, 256, device=DEVICE)
    assert m.shape == (2, 4, 64, 256) and m.dtype == torch.bool
    n = m.numel()
    assert abs(m.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    same = p * p + (1 - p) ** 2
    for a, b in ((m[0, 0], m[0, 1]), (m[0, 0], m[1, 0]), (m[0, 0, :32], m[0, 0, 32:])):
        frac = (a == b).float().mean().item()
        assert abs(frac - same) < 5 * (same * (1 - same) / a.numel()) ** 0.5
    assert torch.equal(m, dropout_mask(seed, p, 2, 4, 64, 256, device=DEVICE))
    assert not torch.equal(m, dropout_mask(seed + 1, p, 2, 4, 64, 256, device=DEVICE))
    # varlen masks index packed tokens: (Hq, Tq, Tk)
    assert dropout_mask(seed, p, 3, 4, 10, 12, varlen=True, device=DEVICE).shape == (4, 10, 12)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dropout_bad_input(backend):
    q, k, v = randn(1, 4, 2, 16), randn(1, 6, 2, 16), randn(1, 6, 2, 16)
    for p in (1.0, -0.1, float("nan"), 2):
        with pytest.raises(ValueError, match=r"^flash_attn: dropout_p must be in \[0, 1\)"):
            gptkernels.flash_attn(q, k, v, dropout_p=p, backend=backend)
    for p in ("0.1", True, torch.tensor(0.1)):
        with pytest.raises(TypeError, match="^flash_attn: dropout_p must be a float"):
            gptkernels.flash_attn(q, k, v, dropout_p=p, backend=backend)
    with pytest.raises(TypeError, match="^flash_attn: generator must be None or a torch.Generator"):
        gptkernels.flash_attn(q, k, v, dropout_p=0.1, generator=3, backend=backend)
    k_cache, v_cache, table, seqlens = _paged_cache([9], 8, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="^flash_attn: dropout_p > 0 is not served with paged keys"):
        gptkernels.flash_attn(q, k_cache, v_cache, block_table=table, seqlens_k=seqlens, dropout_p=0.1,
                              backend=backend)


def test_dropout_refused_by_cuda():
    # the CUDA launcher refuses before it touches the extension (so this runs without a GPU)
    from gptkernels import cuda as cuda_backend

    q, k, v = (randn(1, 4, 2, 64, dtype=torch.float16) for _ in range(3))
    kw = dict(causal=True, window=None, softmax_scale=0.125, cu_seqlens_q=None, cu_seqlens_k=None,
              max_seqlen_q=None, max_seqlen_k=None, block_table=None, seqlens_k=None, bottom_right=True)
    with pytest.raises(gptkernels.BackendUnavailableError,
                       match="flash_attn: backend 'cuda' cannot serve this call: no CUDA kernel for dropout_p"):
        cuda_backend.flash_attn_forward(q, k, v, dropout_p=0.1, dropout_seed=5, **kw)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dropout_gpu(dtype):
    # the GPU's configs (wgmma tiles, autotuned), longer sequences, varlen, packed GQA decode
    q, k, v = randn(2, 300, 8, 128, dtype=dtype), randn(2, 350, 2, 128, dtype=dtype), \
        randn(2, 350, 2, 128, dtype=dtype)
    for deterministic in (True, False):
        check_dropout(q, k, v, 0.1, causal=True, grad=True, with_dlse=True, deterministic=deterministic)
    check_dropout(q, k, v, 0.1, causal=True, window=64, grad=True)
    check_dropout(q[:, :1], k, v, 0.1, causal=True)
    lq, lk = (100, 1, 250), (300, 40, 250)
    check_dropout(randn(sum(lq), 8, 64, dtype=dtype), randn(sum(lk), 2, 64, dtype=dtype),
                  randn(sum(lk), 2, 64, dtype=dtype), 0.1, varlen_lens=True, causal=True,
                  cu_seqlens_q=_cu(lq), cu_seqlens_k=_cu(lk), max_seqlen_q=250, max_seqlen_k=300, grad=True)
