"""Rotary embedding: kernel parity against the float64 reference, in-place on fused QKV views,
gradients, torch.compile, dispatch, bad input, and the cos/sin caches against transformers.

On CPU the Triton kernel runs in the interpreter (float16, float32, small grid); on a GPU the same
tests run with bfloat16 added and the full grid.
"""

from __future__ import annotations

import math

import pytest
import torch

import gptkernels
from gptkernels import reference
from gptkernels._backend import BackendUnavailableError, unavailable_reason
from gptkernels._dispatch import backend_module
from tests.helpers import (DEVICE, DTYPES, ON_GPU, ROW_STRIDE, assert_parity, grid, huge_stride_views,
                           index_views, randn, requires_gpu)


def _kernel_backends() -> list[str]:
    """Kernel backends that can run here and implement apply_rotary (the CUDA twin once built)."""
    out = []
    for b in ("triton", "cuda"):
        if unavailable_reason(b, DEVICE) is None and hasattr(backend_module(b), "apply_rotary"):
            out.append(b)
    return out


KERNELS = _kernel_backends()
MAX_POS = 300


def _cache(rot, max_pos=MAX_POS, device=DEVICE):
    # Random angles make every position matter (a real cache varies slowly along the positions).
    ang = torch.rand(max_pos, rot // 2, dtype=torch.float64) * 2 * math.pi
    return ang.cos().float().to(device), ang.sin().float().to(device)


def _d64(t):
    return None if t is None else t.detach().double()


def _reference(q, k, cos, sin, **kw):
    """(float64 reference, eager reference in q's dtype) outputs."""
    ref = reference.apply_rotary(_d64(q), _d64(k), _d64(cos), _d64(sin), **kw)
    base = reference.apply_rotary(q.detach(), None if k is None else k.detach(), cos, sin,
                                  upcast=False, **kw)
    return ref, base


def _check_outputs(outs, ref, base, name=""):
    for i, (o, r, b) in enumerate(zip(outs, ref, base)):
        if r is None:
            assert o is None
            continue
        assert o.dtype == b.dtype
        assert_parity(o, r, b, name=f"{name}{'qk'[i]}_out")


def _check_pass_through(outs, ins, rot):
    for o, x in zip(outs, ins):
        if x is not None:
            assert torch.equal(o[..., rot:], x[..., rot:]), "channels R..D must pass through bit for bit"


# --------------------------------------------------------------------------------------------------
# Forward parity
# --------------------------------------------------------------------------------------------------


def _rot_dims(d):
    return sorted({d, d // 2, d // 4, 16}, reverse=True)


ROT_CASES = [(d, r) for d in (64, 80, 128) for r in _rot_dims(d)]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim,rot", ROT_CASES)
def test_parity_rotary_dims(head_dim, rot, interleaved, dtype, backend):
    """Both layouts, R in {D, D/2, D/4, 16}, D in {64, 80, 128}: dense, GQA, odd length, int offset."""
    b, s, hq, hk = grid([(2, 17, 6, 2)], [(3, 130, 12, 4)])[0]
    q, k = randn(b, s, hq, head_dim, dtype=dtype), randn(b, s, hk, head_dim, dtype=dtype)
    cos, sin = _cache(rot)
    kw = dict(offset=5, interleaved=interleaved)
    outs = gptkernels.apply_rotary(q, k, cos, sin, backend=backend, **kw)
    ref, base = _reference(q, k, cos, sin, **kw)
    _check_outputs(outs, ref, base)
    _check_pass_through(outs, (q, k), rot)
    assert outs[0].is_contiguous() and outs[1].is_contiguous()


SHAPES = {
    # name: (q shape, k heads); dense (B, S, H, D) or packed (T, H, D)
    "dense_gqa": ((2, 17, 6, 80), 2),
    "dense_mha_odd_heads": ((1, 33, 5, 80), 5),
    "dense_mqa": ((3, 9, 7, 80), 1),
    "decode": ((5, 1, 8, 80), 2),
    "packed_gqa": ((97, 4, 80), 1),
    "packed_one_token": ((1, 3, 80), 3),
    "dense_many_heads": ((1, 7, 40, 64), 8),
}


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_parity_shapes(shape, interleaved, dtype, backend):
    q_shape, hk = SHAPES[shape]
    d = q_shape[-1]
    q = randn(*q_shape, dtype=dtype)
    k = randn(*q_shape[:-2], hk, d, dtype=dtype)
    rot = d // 2
    cos, sin = _cache(rot)
    outs = gptkernels.apply_rotary(q, k, cos, sin, interleaved=interleaved, backend=backend)
    ref, base = _reference(q, k, cos, sin, interleaved=interleaved)
    _check_outputs(outs, ref, base)
    _check_pass_through(outs, (q, k), rot)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["positions_dense", "positions_strided", "positions_packed_int32",
                                  "offset_tensor_int64", "offset_tensor_int32", "k_none"])
def test_positions_and_offsets(case, dtype, backend):
    b, s, hq, hk, d = 3, 19, 4, 2, 64
    q, k = randn(b, s, hq, d, dtype=dtype), randn(b, s, hk, d, dtype=dtype)
    kw = {}
    if case == "positions_dense":
        kw["positions"] = torch.randint(0, MAX_POS, (b, s), device=DEVICE)
    elif case == "positions_strided":  # a non-contiguous positions tensor
        kw["positions"] = torch.randint(0, MAX_POS, (s, b), device=DEVICE).t()
    elif case == "positions_packed_int32":
        q, k = q.reshape(b * s, hq, d), k.reshape(b * s, hk, d)
        kw["positions"] = torch.randint(0, MAX_POS, (b * s,), device=DEVICE, dtype=torch.int32)
    elif case == "offset_tensor_int64":
        kw["offset"] = torch.tensor([0, 7, MAX_POS - s], device=DEVICE)
    elif case == "offset_tensor_int32":
        kw["offset"] = torch.tensor([11, 0, 3], device=DEVICE, dtype=torch.int32)
    elif case == "k_none":
        k = None
        kw["offset"] = MAX_POS - s
    cos, sin = _cache(48)
    outs = gptkernels.apply_rotary(q, k, cos, sin, backend=backend, **kw)
    ref, base = _reference(q, k, cos, sin, **kw)
    _check_outputs(outs, ref, base)
    _check_pass_through(outs, (q, k), 48)


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
@pytest.mark.parametrize("view", ["strided", "transposed", "expanded"])
@pytest.mark.parametrize("tensor", ["offset", "positions_dense", "positions_packed"])
def test_index_tensors_of_any_strides(tensor, view, backend):
    # Junk 0 between the elements: read as contiguous, the tokens would rotate by the wrong angle.
    b, s = 3, 5
    q, k = randn(b, s, 2, 32), randn(b, s, 1, 32)
    if tensor == "offset":
        idx = torch.tensor([7, 0, 40], device=DEVICE)
    elif tensor == "positions_dense":
        idx = torch.randint(1, MAX_POS, (b, s), device=DEVICE, dtype=torch.int32)
    else:
        q, k = q.flatten(0, 1), k.flatten(0, 1)
        idx = torch.randint(1, MAX_POS, (b * s,), device=DEVICE)
    x = index_views(idx, junk=0)[view]
    name = "offset" if tensor == "offset" else "positions"
    cos, sin = _cache(32)
    got = gptkernels.apply_rotary(q, k, cos, sin, **{name: x}, backend=backend)
    want = gptkernels.apply_rotary(q, k, cos, sin, **{name: x.contiguous()}, backend=backend)
    ref = reference.apply_rotary(q, k, cos, sin, **{name: x.contiguous()})
    for g, w, r in zip(got, want, ref):
        assert torch.equal(g, w)
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
def test_empty_inputs(backend):
    # No tokens (T = 0), batch 0 (with a (0,) offset tensor), S = 0, in place and out of place, with
    # gradients: empty results, as torch's own ops give.
    cos, sin = _cache(16)
    for q, k, kw in ((randn(0, 2, 16), randn(0, 1, 16), {}),
                     (randn(0, 4, 2, 16), None, dict(offset=torch.zeros(0, dtype=torch.long, device=DEVICE))),
                     (randn(2, 0, 2, 16), randn(2, 0, 1, 16), dict(offset=3))):
        qq = q.clone().requires_grad_()
        q_out, k_out = gptkernels.apply_rotary(qq, k, cos, sin, backend=backend, **kw)
        assert q_out.shape == q.shape and (k_out is None) == (k is None)
        assert torch.autograd.grad(q_out.sum(), qq)[0].shape == q.shape
        got = gptkernels.apply_rotary(q, k, cos, sin, inplace=True, backend=backend, **kw)
        assert got[0] is q and got[1] is k


@pytest.mark.parametrize("backend", KERNELS)
def test_row_offsets_past_2_31(backend):
    # q, k and positions whose token (row) stride passes 2**31 / 15 elements: the token index times
    # its stride passes 2**31 and must be computed in int64, in place and out of place.
    q, k = huge_stride_views(DTYPES[0], ((17, 2, 32), 0), ((17, 1, 32), 0), stride=ROW_STRIDE)
    positions = torch.randint(0, MAX_POS, (17,), device=DEVICE)
    cos, sin = _cache(32)
    want = gptkernels.apply_rotary(q.contiguous(), k.contiguous(), cos, sin, positions=positions,
                                   backend=backend)
    got = gptkernels.apply_rotary(q, k, cos, sin, positions=positions, backend=backend)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    gptkernels.apply_rotary(q, k, cos, sin, positions=positions, inplace=True, backend=backend)
    assert torch.equal(q.contiguous(), want[0]) and torch.equal(k.contiguous(), want[1])


@pytest.mark.parametrize("backend", KERNELS)
def test_cos_sin_any_float_dtype_and_strides(backend):
    """cos/sin in float16 and as non-contiguous views: the kernel reads them through strides."""
    q, k = randn(2, 11, 3, 64), randn(2, 11, 1, 64)
    ang = torch.rand(32, MAX_POS, dtype=torch.float64, device=DEVICE) * 2 * math.pi
    cos, sin = ang.cos().half().t(), ang.sin().half().t()  # (MAX_POS, 32), strides (1, MAX_POS)
    outs = gptkernels.apply_rotary(q, k, cos, sin, offset=4, backend=backend)
    ref, base = _reference(q, k, cos, sin, offset=4)
    _check_outputs(outs, ref, base)


@pytest.mark.skipif("triton" not in KERNELS, reason="the Triton backend is unavailable here")
@pytest.mark.parametrize("config", [(2, 2, 3, 4), (16, 16, 1, 8), (1, 4, 2, 2)])
def test_triton_launch_configs(config):
    """Any (block_t, block_h, head_splits, num_warps) a tuning sweep may pick gives the same answer;
    the launcher contract: conjugate=True undoes the rotation, in place returns its inputs."""
    from gptkernels.triton.rotary import apply_rotary as launch

    block_t, block_h, splits, warps = config
    q, k = randn(3, 4, 6, 80), randn(3, 4, 3, 80)
    cos, sin = _cache(64)
    tune = dict(block_t=block_t, block_h=block_h, head_splits=splits, num_warps=warps)
    kw = dict(positions=None, offset=torch.tensor([4, 0, 9], device=DEVICE), interleaved=False)
    qo, ko = launch(q, k, cos, sin, inplace=False, conjugate=False, **kw, **tune)
    ref, base = _reference(q, k, cos, sin, offset=kw["offset"])
    _check_outputs((qo, ko), ref, base)
    qb, kb = launch(qo, ko, cos, sin, inplace=True, conjugate=True, **kw, **tune)
    assert qb is qo and kb is ko
    torch.testing.assert_close(qb, q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kb, k, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif("triton" not in KERNELS, reason="the Triton backend is unavailable here")
def test_inplace_kernel_is_never_benchmarked():
    """Autotune benchmarking re-runs a kernel on the same arguments: an in-place rotation would be
    applied once per benchmark run on a GPU (the interpreter has one config, so it cannot show it).
    The launch config comes from a heuristic; an autotuner would have to restore q and k."""
    from triton.runtime.autotuner import Autotuner

    from gptkernels.triton import rotary as ro

    kernel = ro._rotary_kernel
    assert not isinstance(kernel, Autotuner) or {"q_ptr", "k_ptr"} <= set(kernel.restore_value)


# --------------------------------------------------------------------------------------------------
# In place, on strided views of a fused QKV projection
# --------------------------------------------------------------------------------------------------


def _fused_views(layout, dtype, b, s, hq, hk, d):
    if layout == "neox":  # GPT-NeoX: (B, S, H, 3*D), each head holds [q | k | v]
        qkv = randn(b, s, hq, 3 * d, dtype=dtype)
        return qkv, qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    # Llama-style packed projection: (T, (Hq + 2 Hk) * D) = [q heads | k heads | v heads]
    t = b * s
    qkv = randn(t, (hq + 2 * hk) * d, dtype=dtype)
    q = qkv[:, :hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    return qkv, q, k, qkv[:, (hq + hk) * d:]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("layout,rot", [("neox", 80), ("neox", 20), ("packed", 40)])
def test_inplace_fused_qkv(layout, rot, interleaved, dtype, backend):
    b, s, d = 2, 13, 80
    hq, hk = (4, 4) if layout == "neox" else (6, 2)
    qkv, q, k, v = _fused_views(layout, dtype, b, s, hq, hk, d)
    before = qkv.clone()
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    cos, sin = _cache(rot)
    kw = dict(positions=torch.randint(0, MAX_POS, q.shape[:-2], device=DEVICE), interleaved=interleaved)
    ref, base = _reference(q0, k0, cos, sin, **kw)
    q_out, k_out = gptkernels.apply_rotary(q, k, cos, sin, inplace=True, backend=backend, **kw)
    assert q_out is q and k_out is k
    _check_outputs((q, k), ref, base)
    assert torch.equal(q[..., rot:], q0[..., rot:]) and torch.equal(k[..., rot:], k0[..., rot:]), (
        "channels R..D must be left untouched")
    assert torch.equal(v, v0), "v (the rest of the fused tensor) must be left untouched"
    # and nothing else in the fused buffer moved: rebuild it from the rotated views
    expect = before.clone()
    _, eq, ek, _ = _fused_views_of(layout, expect, hq, hk, d)
    eq.copy_(q)
    ek.copy_(k)
    assert torch.equal(qkv, expect)


def _fused_views_of(layout, qkv, hq, hk, d):
    if layout == "neox":
        return qkv, qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    t = qkv.shape[0]
    return (qkv, qkv[:, :hq * d].view(t, hq, d), qkv[:, hq * d:(hq + hk) * d].view(t, hk, d),
            qkv[:, (hq + hk) * d:])


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
def test_inplace_k_none_and_offset_tensor(backend):
    q = randn(3, 10, 4, 64, dtype=torch.float16)
    q0 = q.clone()
    cos, sin = _cache(64)
    off = torch.tensor([2, 0, 9], device=DEVICE)
    ref, base = _reference(q0, None, cos, sin, offset=off)
    out = gptkernels.apply_rotary(q, None, cos, sin, offset=off, inplace=True, backend=backend)
    assert out[0] is q and out[1] is None
    assert_parity(q, ref[0], base[0])


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
def test_inplace_q_is_k_rotates_once(backend):
    # k that is q (or the very same view of it): rotated once, as the torch backend always did (a
    # kernel rotating q and then k in place read q's rotated values back as k: twice).
    cos, sin = _cache(32)
    pos = torch.randint(0, MAX_POS, (2, 5), device=DEVICE)
    q = randn(2, 5, 3, 32)
    want, _ = reference.apply_rotary(q, None, cos, sin, positions=pos)
    for k_of in (lambda x: x, lambda x: x.view(x.shape)):
        x = q.clone()
        got_q, got_k = gptkernels.apply_rotary(x, k_of(x), cos, sin, positions=pos, inplace=True,
                                               backend=backend)
        assert got_q is x and torch.equal(x, want) and torch.equal(got_k, want)


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
def test_inplace_into_expanded_view_is_refused(backend):
    cos, sin = _cache(32)
    q, k = randn(1, 5, 1, 32), randn(2, 5, 1, 32)
    for qq, kk, name in ((q.expand(2, 5, 3, 32), k, "q"), (q[0], k[0, :1].expand(5, 1, 32), "k")):
        before = (qq.clone(), kk.clone())
        with pytest.raises(ValueError, match=rf"inplace=True cannot write into {name}: it is an "
                                             r"expanded view \(stride 0 along dim"):
            gptkernels.apply_rotary(qq, kk, cos, sin, inplace=True, backend=backend)
        assert torch.equal(qq, before[0]) and torch.equal(kk, before[1])
    # out of place, expanded inputs are fine (read only)
    out, _ = gptkernels.apply_rotary(q.expand(2, 5, 3, 32), None, cos, sin, backend=backend)
    torch.testing.assert_close(out, reference.apply_rotary(q.expand(2, 5, 3, 32).contiguous(), None,
                                                           cos, sin)[0])


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_gradients(packed, interleaved, dtype, backend):
    b, s, hq, hk, d, rot = 2, 15, 6, 2, 80, 40
    shape = (b * s,) if packed else (b, s)
    q = randn(*shape, hq, d, dtype=dtype).requires_grad_()
    k = randn(*shape, hk, d, dtype=dtype).requires_grad_()
    cos, sin = _cache(rot)
    kw = dict(interleaved=interleaved)
    if packed:
        kw["positions"] = torch.randint(0, MAX_POS, shape, device=DEVICE)
    else:
        kw["offset"] = torch.tensor([3, 40], device=DEVICE)
    # upstream gradients as non-contiguous views, like those of a transposed consumer
    gq = randn(*reversed(q.shape), dtype=dtype).permute(*reversed(range(q.dim())))
    gk = randn(*reversed(k.shape), dtype=dtype).permute(*reversed(range(k.dim())))
    qo, ko = gptkernels.apply_rotary(q, k, cos, sin, backend=backend, **kw)
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))

    q64, k64 = _d64(q).requires_grad_(), _d64(k).requires_grad_()
    r = reference.apply_rotary(q64, k64, _d64(cos), _d64(sin), **kw)
    rdq, rdk = torch.autograd.grad(r, (q64, k64), (gq.double(), gk.double()))
    qb, kb = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    e = reference.apply_rotary(qb, kb, cos, sin, upcast=False, **kw)
    edq, edk = torch.autograd.grad(e, (qb, kb), (gq, gk))
    assert_parity(dq, rdq, edq, name="dq")
    assert_parity(dk, rdk, edk, name="dk")
    # channels R..D: the identity, so their gradient is the upstream gradient bit for bit
    assert torch.equal(dq[..., rot:], gq[..., rot:]) and torch.equal(dk[..., rot:], gk[..., rot:])


@pytest.mark.parametrize("backend", KERNELS)
def test_gradients_k_none(backend):
    q = randn(2, 9, 3, 64).requires_grad_()
    cos, sin = _cache(64)
    qo, ko = gptkernels.apply_rotary(q, None, cos, sin, offset=1, backend=backend)
    assert ko is None
    g = randn(*q.shape)
    (dq,) = torch.autograd.grad(qo, q, g)
    q64 = _d64(q).requires_grad_()
    (rdq,) = torch.autograd.grad(reference.apply_rotary(q64, None, _d64(cos), _d64(sin), offset=1)[0],
                                 q64, g.double())
    assert_parity(dq, rdq)


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
def test_inplace_with_grad_raises(backend):
    q = randn(1, 4, 2, 64).requires_grad_()
    cos, sin = _cache(64)
    with pytest.raises(ValueError, match="inplace"):
        gptkernels.apply_rotary(q * 1, None, cos, sin, inplace=True, backend=backend)
    with torch.no_grad():  # fine without autograd
        x = q.detach().clone()
        gptkernels.apply_rotary(x, None, cos, sin, inplace=True, backend=backend)


@pytest.mark.parametrize("backend", KERNELS)
def test_cos_sin_requiring_grad_raises(backend):
    q = randn(1, 4, 2, 64)
    cos, sin = _cache(64)
    with pytest.raises(ValueError, match="cos"):
        gptkernels.apply_rotary(q, None, cos.requires_grad_(), sin, backend=backend)


# --------------------------------------------------------------------------------------------------
# torch.compile, dispatch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNELS)
def test_torch_compile(backend):
    cos, sin = _cache(32)
    compile_backend = "inductor" if ON_GPU else "aot_eager"

    def layer(q, k, pos):
        qo, ko = gptkernels.apply_rotary(q, k, cos, sin, positions=pos, backend=backend)
        return (qo * 2).sum() + (ko * ko).sum()

    def layer_inplace(qkv, off):
        q, k = qkv[..., :64], qkv[..., 64:128]
        gptkernels.apply_rotary(q, k, cos, sin, offset=off, inplace=True, backend=backend)
        return qkv * 1

    q, k = randn(2, 7, 4, 64).requires_grad_(), randn(2, 7, 2, 64).requires_grad_()
    pos = torch.randint(0, MAX_POS, (2, 7), device=DEVICE)
    out = torch.compile(layer, fullgraph=True, backend=compile_backend)(q, k, pos)
    dq, dk = torch.autograd.grad(out, (q, k))
    out_e = layer(q, k, pos)
    dq_e, dk_e = torch.autograd.grad(out_e, (q, k))
    torch.testing.assert_close(out, out_e)
    torch.testing.assert_close(dq, dq_e)
    torch.testing.assert_close(dk, dk_e)

    qkv = randn(2, 7, 2, 3 * 64)
    qkv_e = qkv.clone()
    off = torch.tensor([0, 5], device=DEVICE)
    got = torch.compile(layer_inplace, fullgraph=True, backend=compile_backend)(qkv, off)
    want = layer_inplace(qkv_e, off)
    assert torch.equal(got, want) and torch.equal(qkv, qkv_e)


def test_dispatch(monkeypatch):
    kernels = backend_module("triton") if "triton" in KERNELS else None
    q, k = randn(1, 5, 2, 64), randn(1, 5, 2, 64)
    cos, sin = _cache(64)
    calls = []
    if kernels is not None:
        real = kernels.apply_rotary

        def spy(*a, **kw):
            calls.append(kw)
            return real(*a, **kw)

        monkeypatch.setattr(kernels, "apply_rotary", spy)
        out = gptkernels.apply_rotary(q, k, cos, sin)  # default: triton (GPU, or the interpreter)
        assert len(calls) == 1 and calls[0]["conjugate"] is False and calls[0]["inplace"] is False
        assert_parity(out[0], _reference(q, k, cos, sin)[0][0])
    # "torch" (explicit or from the environment) never reaches a kernel, and is the reference
    ref = reference.apply_rotary(q, k, cos, sin)
    out = gptkernels.apply_rotary(q, k, cos, sin, backend="torch")
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    monkeypatch.setenv("GPTKERNELS_BACKEND", "torch")
    gptkernels.apply_rotary(q, k, cos, sin)
    assert len(calls) == (1 if kernels is not None else 0)
    monkeypatch.delenv("GPTKERNELS_BACKEND")
    with pytest.raises(ValueError, match="backend"):
        gptkernels.apply_rotary(q, k, cos, sin, backend="tpu")
    if unavailable_reason("cuda", DEVICE) is not None:
        with pytest.raises(BackendUnavailableError, match="cuda"):
            gptkernels.apply_rotary(q, k, cos, sin, backend="cuda")


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def _bad_cases():
    q, k = randn(2, 5, 4, 64), randn(2, 5, 2, 64)
    cos, sin = _cache(32, max_pos=20)
    ok = dict(q=q, k=k, cos=cos, sin=sin)
    return {
        "q not a tensor": (dict(ok, q=q.tolist()), TypeError, "q"),
        "q rank": (dict(ok, q=q[0, 0]), ValueError, "q"),
        "q int dtype": (dict(ok, q=q.long()), TypeError, "q"),
        "k rank": (dict(ok, k=k[0]), ValueError, "k"),
        "k dtype": (dict(ok, k=k.half()), TypeError, "k"),
        "k batch": (dict(ok, k=k[:1]), ValueError, "k"),
        "k seq": (dict(ok, k=k[:, :3]), ValueError, "k"),
        "k head dim": (dict(ok, k=randn(2, 5, 2, 32)), ValueError, "head dim"),
        "R > D": (dict(ok, cos=_cache(80, 20)[0], sin=_cache(80, 20)[1]), ValueError, "cos"),
        "cos rank": (dict(ok, cos=cos[None]), ValueError, "cos"),
        "sin shape": (dict(ok, sin=sin[:, :8]), ValueError, "sin"),
        "sin dtype": (dict(ok, sin=sin.double()), TypeError, "sin"),
        "cos int": (dict(ok, cos=cos.long(), sin=sin.long()), TypeError, "cos"),
        "cos device": (dict(ok, cos=cos.to("meta")), ValueError, "cos"),
        "positions shape": (dict(ok, positions=torch.zeros(2, 4, dtype=torch.long, device=DEVICE)),
                            ValueError, "positions"),
        "positions dtype": (dict(ok, positions=torch.zeros(2, 5, device=DEVICE)), TypeError, "positions"),
        "positions and offset": (dict(ok, positions=torch.zeros(2, 5, dtype=torch.long, device=DEVICE),
                                      offset=3), ValueError, "offset"),
        "offset shape": (dict(ok, offset=torch.zeros(3, dtype=torch.long, device=DEVICE)), ValueError,
                         "offset"),
        "offset dtype": (dict(ok, offset=torch.zeros(2, device=DEVICE)), TypeError, "offset"),
        "offset float": (dict(ok, offset=1.5), TypeError, "offset"),
        "offset tensor packed": (dict(ok, q=q[0], k=k[0], offset=torch.zeros(1, dtype=torch.long,
                                                                             device=DEVICE)),
                                 ValueError, "offset"),
        "int offset past cache": (dict(ok, offset=16), ValueError, "offset"),
        "negative offset": (dict(ok, offset=-1), ValueError, "offset"),
        "interleaved": (dict(ok, interleaved=1), TypeError, "interleaved"),
        "inplace": (dict(ok, inplace="yes"), TypeError, "inplace"),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, backend):
    kw, exc, match = BAD[case]
    kw = dict(kw)
    args = [kw.pop(n) for n in ("q", "k", "cos", "sin")]
    with pytest.raises(exc, match=match):
        gptkernels.apply_rotary(*args, backend=backend, **kw)


@pytest.mark.parametrize("backend", KERNELS + ["torch"])
def test_debug_checks_out_of_range(backend, monkeypatch):
    q, k = randn(2, 5, 4, 64), randn(2, 5, 2, 64)
    cos, sin = _cache(32, max_pos=20)
    monkeypatch.setenv("GPTKERNELS_DEBUG", "1")
    for pos in (torch.tensor([[0, 1, 2, 3, 20]] * 2), torch.tensor([[0, 1, -1, 3, 4]] * 2)):
        with pytest.raises(ValueError, match="positions"):
            gptkernels.apply_rotary(q, k, cos, sin, positions=pos.to(DEVICE), backend=backend)
    with pytest.raises(ValueError, match="offset"):
        gptkernels.apply_rotary(q, k, cos, sin, offset=torch.tensor([0, 16], device=DEVICE),
                                backend=backend)
    # in range: fine
    gptkernels.apply_rotary(q, k, cos, sin, offset=torch.tensor([0, 15], device=DEVICE), backend=backend)


@pytest.mark.parametrize("backend", KERNELS)
def test_out_of_range_positions_are_masked(backend, monkeypatch):
    """Without GPTKERNELS_DEBUG the kernel never reads past cos/sin: such tokens stay unrotated."""
    monkeypatch.delenv("GPTKERNELS_DEBUG", raising=False)
    q, k = randn(2, 5, 4, 64), randn(2, 5, 2, 64)
    cos, sin = _cache(64, max_pos=20)
    pos = torch.tensor([[0, 20, 3, -1, 19], [10**6, 1, 2, 3, -(10**6)]], device=DEVICE)
    qo, ko = gptkernels.apply_rotary(q, k, cos, sin, positions=pos, backend=backend)
    bad = (pos < 0) | (pos >= 20)
    assert torch.equal(qo[bad], q[bad]) and torch.equal(ko[bad], k[bad])
    good = ~bad
    ref, base = _reference(q, k, cos, sin, positions=pos.clamp(0, 19))
    assert_parity(qo[good], ref[0][good], base[0][good])
    assert_parity(ko[good], ref[1][good], base[1][good])


# --------------------------------------------------------------------------------------------------
# cos/sin caches against transformers
# --------------------------------------------------------------------------------------------------


class _HFConfig:
    """The fields transformers' rope init functions read, for both the 5.17 and the 5.23 API
    (``rope_parameters`` with rope_theta inside, and the older ``rope_scaling``/``rope_theta``)."""

    default_rope_type = "default"

    def __init__(self, head_dim, rot, base, params, max_position_embeddings):
        self.head_dim = head_dim
        self.num_attention_heads = 4
        self.hidden_size = 4 * head_dim
        self.max_position_embeddings = max_position_embeddings
        self.partial_rotary_factor = rot / head_dim
        self.rope_theta = base
        self.rope_parameters = dict(params, rope_theta=base, partial_rotary_factor=rot / head_dim)
        self.rope_scaling = self.rope_parameters

    def standardize_rope_params(self):  # already standard
        pass


def _hf_inv_freq(rope_type, cfg, seq_len=None):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fn = ROPE_INIT_FUNCTIONS.get(rope_type)
    if fn is None and rope_type == "default":  # transformers 5 keeps "default" in the model classes
        from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

        fn = GPTNeoXRotaryEmbedding.compute_default_rope_parameters
    kw = {} if seq_len is None else {"seq_len": seq_len}
    inv_freq, attention_factor = fn(cfg, "cpu", **kw)
    return inv_freq.double(), float(attention_factor)


ROPE_CASES = {  # name: (rope parameters, max_positions); config.max_position_embeddings is 1024
    "default": ({"rope_type": "default"}, 1024),
    "linear": ({"rope_type": "linear", "factor": 4.0}, 1024),
    "dynamic_short": ({"rope_type": "dynamic", "factor": 2.0}, 500),    # below the original length
    "dynamic_long": ({"rope_type": "dynamic", "factor": 2.0}, 3000),    # HF recomputes for 3000
    "yarn": ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096}, 1024),
    "yarn_betas_no_truncate": ({"rope_type": "yarn", "factor": 4.0, "beta_fast": 16, "beta_slow": 2,
                                "truncate": False, "original_max_position_embeddings": 2048}, 1024),
    "yarn_mscale": ({"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096}, 1024),
    "yarn_attention_factor": ({"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.8,
                               "original_max_position_embeddings": 4096}, 1024),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}, 1024),
}


@pytest.mark.parametrize("head_dim,rot", [(64, 64), (80, 20), (128, 64)])
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rotary_cos_sin_matches_transformers(case, head_dim, rot):
    params, max_pos = ROPE_CASES[case]
    base = 10000.0 if head_dim != 128 else 500000.0
    orig_len = 1024  # config.max_position_embeddings: dynamic NTK's original length
    cfg = _HFConfig(head_dim, rot, base, params, orig_len)
    rope_type = params["rope_type"]
    seq_len = max_pos if rope_type == "dynamic" else None
    hf_inv, hf_af = _hf_inv_freq(rope_type, cfg, seq_len)

    scaling = dict(params)
    if rope_type == "dynamic":
        scaling["original_max_position_embeddings"] = orig_len
    cos, sin = gptkernels.rotary_cos_sin(rot, max_pos, base=base, scaling=scaling)
    assert cos.shape == sin.shape == (max_pos, rot // 2) and cos.dtype == torch.float32

    inv, af = gptkernels.rotary.rotary_inv_freq(rot, max_pos, base=base, scaling=scaling)
    torch.testing.assert_close(inv, hf_inv, rtol=2e-6, atol=0)  # HF computes in float32
    assert af == pytest.approx(hf_af, rel=1e-12)
    # cos/sin: HF's cos(p * inv_freq) * attention factor, within the float32 rounding of inv_freq
    p = torch.arange(max_pos, dtype=torch.float64)[:, None]
    ang = p * hf_inv[None, :]
    tol = 2e-6 * ang + 2e-7 * af
    assert bool(((cos.double() - ang.cos() * hf_af).abs() <= tol).all())
    assert bool(((sin.double() - ang.sin() * hf_af).abs() <= tol).all())


def test_rotary_cos_sin_options_and_errors():
    cos, sin = gptkernels.rotary_cos_sin(16, 7, dtype=torch.bfloat16, device="cpu")
    assert cos.dtype == torch.bfloat16 and cos.shape == (7, 8)
    assert torch.equal(cos[0], torch.ones(8, dtype=torch.bfloat16))  # position 0: no rotation
    # HF's rope parameters may carry rope_theta: it must agree with base
    c2, _ = gptkernels.rotary_cos_sin(16, 7, base=500000.0, scaling={"rope_type": "default",
                                                                     "rope_theta": 500000.0})
    assert c2.shape == (7, 8)
    # the old "type" key of rope_scaling; linear scaling by 2: position 2p of it is position p unscaled
    lin, lin_s = gptkernels.rotary_cos_sin(16, 8, scaling={"type": "linear", "factor": 2.0})
    ref, ref_s = gptkernels.rotary_cos_sin(16, 4)
    torch.testing.assert_close(lin[::2], ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(lin_s[::2], ref_s, atol=1e-6, rtol=0)

    bad = [
        (dict(rotary_dim=15), ValueError, "rotary_dim"),
        (dict(rotary_dim=0), ValueError, "rotary_dim"),
        (dict(rotary_dim=16.0), TypeError, "rotary_dim"),
        (dict(max_positions=0), ValueError, "max_positions"),
        (dict(base=-1.0), ValueError, "base"),
        (dict(dtype=torch.int32), TypeError, "dtype"),
        (dict(scaling="linear"), TypeError, "scaling"),
        (dict(scaling={"rope_type": "longrope"}), ValueError, "rope_type"),
        (dict(scaling={"rope_type": "linear"}), ValueError, "factor"),
        (dict(scaling={"rope_type": "yarn", "factor": 2.0}), ValueError, "original_max_position_embeddings"),
        (dict(scaling={"rope_type": "dynamic", "factor": 2.0}), ValueError,
         "original_max_position_embeddings"),
        (dict(scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}),
         ValueError, "low_freq_factor"),
        (dict(scaling={"rope_type": "linear", "factor": "2"}), TypeError, "factor"),
        (dict(scaling={"rope_type": "default", "rope_theta": 500000.0}), ValueError, "rope_theta"),
    ]
    # factors and lengths of 0, negative or NaN would give NaN caches or divide by zero
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    for value in (0, -2.0, float("nan"), float("inf")):
        for scaling, key in (({"rope_type": "linear"}, "factor"),
                             ({"rope_type": "dynamic", "original_max_position_embeddings": 4}, "factor"),
                             ({"rope_type": "dynamic", "factor": 2.0}, "original_max_position_embeddings"),
                             ({"rope_type": "yarn", "original_max_position_embeddings": 4}, "factor"),
                             ({"rope_type": "yarn", "factor": 2.0}, "original_max_position_embeddings"),
                             ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4},
                              "attention_factor"),
                             (llama3, "factor"), (llama3, "low_freq_factor"),
                             (llama3, "original_max_position_embeddings")):
            rope_type = scaling["rope_type"]
            bad.append((dict(scaling={**scaling, key: value}), ValueError,
                        rf"scaling\['{key}'\] \(rope_type '{rope_type}'\) must be a finite number > 0"))
    for kw, exc, match in bad:
        kw = dict({"rotary_dim": 16, "max_positions": 8}, **kw)
        with pytest.raises(exc, match=match):
            gptkernels.rotary_cos_sin(kw.pop("rotary_dim"), kw.pop("max_positions"), **kw)


# --------------------------------------------------------------------------------------------------
# Compiled for Hopper (no GPU needed)
# --------------------------------------------------------------------------------------------------


def test_compiles_for_hopper():
    # The interpreter never runs Triton's compiler: prove, without a GPU, that the kernel compiles
    # for sm_90a with the arguments its launcher passes (GPT-NeoX and GPT-J layouts, R = D and a
    # partial R, out of place), fits an H100's shared memory and does not spill; and, as
    # notes/rotary.md promises, that its q/k loads are 16-byte vectors in every case (the GPT-NeoX
    # layout at R = D/4 took 8-byte ones until pick_config sized the tile by the half-row).
    from tools.sm90_compile import SM90_SHARED, compile_in_subprocess

    results = compile_in_subprocess("--kernels", "rotary", "--ptxas")
    assert {(r["case"]["dtype"], r["case"]["layout"], r["case"]["rot_dim"]) for r in results} == {
        (dtype, layout, rot) for dtype in ("bf16", "fp16") for layout in ("neox", "gptj")
        for rot in (128, 32)}
    for r in results:
        assert r["kernel"] == "rotary" and r["shared"] <= SM90_SHARED and r["spill"] == 0, r
        assert r["vec16"], r


# --------------------------------------------------------------------------------------------------
# GPU: the benchmark's shape, in bfloat16
# --------------------------------------------------------------------------------------------------


@requires_gpu
@pytest.mark.parametrize("interleaved", [False, True])
def test_benchmark_shape_bf16(interleaved):
    t, hq, hk, d = 8192, 32, 8, 128
    cos, sin = gptkernels.rotary_cos_sin(d, 16384, base=500000.0, device=DEVICE)
    qkv = randn(t, (hq + 2 * hk) * d, dtype=torch.bfloat16)
    q, k = qkv[:, :hq * d].view(t, hq, d), qkv[:, hq * d:(hq + hk) * d].view(t, hk, d)
    pos = torch.randint(0, 16384, (t,), device=DEVICE)
    ref, base = _reference(q.clone(), k.clone(), cos, sin, positions=pos, interleaved=interleaved)
    outs = gptkernels.apply_rotary(q, k, cos, sin, positions=pos, interleaved=interleaved)
    _check_outputs(outs, ref, base)
    v0 = qkv[:, (hq + hk) * d:].clone()
    gptkernels.apply_rotary(q, k, cos, sin, positions=pos, interleaved=interleaved, inplace=True)
    _check_outputs((q, k), ref, base)
    assert torch.equal(qkv[:, (hq + hk) * d:], v0)
