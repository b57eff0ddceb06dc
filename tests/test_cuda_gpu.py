"""The "cuda" backend's kernels on a GPU, through the public API with backend="cuda": the emulated
parity grid (tests/test_cuda_emulated.py), bigger (every layout, head dim, block size, dtype
including bfloat16), plus torch.compile, CUDA-graph capture and 64-bit offsets. Every test here
needs a CUDA GPU and the built extension; elsewhere each one skips with that reason.
"""

from __future__ import annotations

import pytest
import torch

import gptkernels
from gptkernels import cuda as cuda_backend, reference
from tests.cuda_cases import (ALL_DTYPES, HALF_DTYPES, check_64bit_cache_offsets, check_64bit_row_offsets,
                              check_append, check_decode, check_flash, check_rotary, ops, to_paged)  # noqa: F401
from tests.helpers import assert_parity, grid, randn, requires_gpu


def _gpu_flash(q, k, v, **kw):
    return gptkernels.flash_attn(q, k, v, return_lse=True, backend="cuda", **kw)


GPU_FLASH = grid([], [
    *[dict(B=2, Sq=s, Sk=s, Hq=4, Hkv=hkv, D=d, window=w, causal=c)
      for d in (32, 64, 80, 96, 128) for s in (1, 97, 513) for hkv in (4, 1)
      for c, w in ((True, None), (True, 64), (False, None))],
    dict(B=3, Sq=130, Sk=1030, Hq=8, Hkv=2, D=128),
    dict(B=2, Sq=1030, Sk=130, Hq=8, Hkv=2, D=64),
    dict(B=1, Sq=2048, Sk=2048, Hq=4, Hkv=4, D=64, window=256, scale=1.0),
    dict(B=2, Sq=257, Sk=257, Hq=6, Hkv=2, D=96, layout="qkv"),
    dict(lens_q=[1, 77, 0, 300, 64], lens_k=[40, 77, 5, 300, 1024], Hq=8, Hkv=2, D=128, layout="varlen"),
    dict(lens_q=[1, 77, 0, 300, 64], lens_k=[40, 77, 5, 300, 1024], Hq=8, Hkv=2, D=64, layout="varlen",
         window=33),
    *[dict(Sq=sq, lens_k=[1, 97, 700], Hq=8, Hkv=4, D=d, layout="paged", block_size=bs)
      for bs in (8, 16, 32, 64, 128, 256) for sq, d in ((1, 64), (9, 128))],
    dict(lens_q=[5, 1, 64], lens_k=[200, 1, 64], Hq=4, Hkv=1, D=80, layout="paged_varlen", block_size=16),
])


@requires_gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(GPU_FLASH)))
def test_flash_attn_cuda(case, dtype):
    check_flash(_gpu_flash, "cuda", dtype, seed=case, **GPU_FLASH[case])


@requires_gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("L,S,window", [(1, 300, None), (97, 300, 32), (300, 97, None), (513, 513, 100)])
def test_sdpa_cuda(dtype, L, S, window):
    """Torch's layout (B, H, L, E) is a strided view for the kernel, and top-left causal alignment."""
    q, k, v = (randn(2, 4, n, 64, dtype=dtype, device="cuda") for n in (L, S, S))
    out = gptkernels.sdpa(q, k, v, is_causal=True, window=window, backend="cuda")

    def eager(upcast, *t):  # the reference on (B, L, H, E) views, top-left aligned
        o = reference.attention(*(x.transpose(1, 2) for x in t), causal=True, window=window,
                                bottom_right=False, upcast=upcast)
        return o.transpose(1, 2)

    assert_parity(out, eager(True, q.double(), k.double(), v.double()), eager(False, q, k, v))


@requires_gpu
def test_flash_attn_cuda_compiles():
    q, k, v = (randn(2, 97, 4, 64, dtype=torch.float16, device="cuda") for _ in range(3))
    f = torch.compile(lambda q, k, v: gptkernels.flash_attn(q, k, v, window=16, backend="cuda"), fullgraph=True)
    ref = reference.attention(q.double(), k.double(), v.double(), causal=True, window=16)
    base = reference.attention(q, k, v, causal=True, window=16, upcast=False)
    assert_parity(f(q, k, v), ref, base)


GPU_ROTARY = grid([], [
    dict(shape=(4, 513, 8, 128), hk=2, rot=128, interleaved=False, offset=7),
    dict(shape=(4, 513, 8, 128), hk=2, rot=128, interleaved=True, offset=7),
    dict(shape=(2, 97, 12, 64), hk=12, rot=16, interleaved=False, offset="tensor"),   # GPT-NeoX partial
    dict(shape=(2, 97, 16, 256), hk=16, rot=64, interleaved=True, offset=0),          # GPT-J partial
    dict(shape=(1000, 8, 80), hk=8, rot=20, interleaved=False, positions="int64"),   # Pythia: 25% of 80
    dict(shape=(1000, 8, 80), hk=2, rot=80, interleaved=True, positions="int32", inplace=True, fused=True),
    dict(shape=(3, 130, 4, 96), hk=None, rot=96, interleaved=False, inplace=True, fused=True, offset=100),
    dict(shape=(3, 130, 4, 64), hk=4, rot=64, interleaved=False, cos_dtype="same", offset=3),
])


@requires_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(GPU_ROTARY)))
def test_rotary_cuda(case, dtype):
    kw = dict(GPU_ROTARY[case])
    if kw.get("offset") == "tensor":
        kw["offset"] = torch.tensor([0, 300], device="cuda")
    if kw.get("cos_dtype") == "same":
        kw["cos_dtype"] = dtype
    kw.setdefault("max_positions", 1500)

    def run(q, k, cos, sin, conjugate, **rkw):
        return gptkernels.apply_rotary(q, k, cos, sin, backend="cuda", **rkw)

    check_rotary(run, "cuda", dtype, seed=case, **kw)


@requires_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_rotary_cuda_gradient(dtype):
    """The backward is the forward kernel with conjugate=True (rotation by -theta)."""
    q = randn(2, 33, 4, 64, dtype=dtype, device="cuda").requires_grad_()
    cos, sin = gptkernels.rotary_cos_sin(64, 64, device="cuda")
    dq = randn(2, 33, 4, 64, dtype=dtype, device="cuda")
    g, = torch.autograd.grad(gptkernels.apply_rotary(q, None, cos, sin, offset=3, backend="cuda")[0], q, dq)
    q64 = q.detach().double().requires_grad_()
    r, = torch.autograd.grad(reference.apply_rotary(q64, None, cos.double(), sin.double(), offset=3)[0], q64,
                             dq.double())
    qb = q.detach().requires_grad_()
    b, = torch.autograd.grad(reference.apply_rotary(qb, None, cos, sin, offset=3, upcast=False)[0], qb, dq)
    assert_parity(g, r, b)


GPU_DECODE = grid([], [
    *[dict(lens=[1, 100, 1000, 4097], Hq=hq, Hkv=hkv, D=d, block_size=bs)
      for bs in (8, 16, 32, 64, 128, 256) for (hq, hkv), d in zip(((8, 8), (8, 2), (32, 4), (16, 1)),
                                                                  (64, 128, 80, 256))],
    dict(lens=[4097, 33], Hq=8, Hkv=2, D=128, block_size=16, window=1000),
    dict(lens=[4097, 33], Hq=8, Hkv=2, D=128, block_size=16, window=1000, num_splits=1),
    dict(lens=[4097, 33], Hq=8, Hkv=2, D=128, block_size=16, num_splits=128),
    dict(lens=[17] * 64, Hq=12, Hkv=12, D=64, block_size=16),          # GPT-2 small decode batch
    dict(lens=[0, 5, 2000], Hq=4, Hkv=4, D=32, block_size=32, scale=1.0),
])


@requires_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(GPU_DECODE)))
def test_paged_decode_cuda(case, dtype):
    def run(q, kc, vc, table, lens, **kw):
        return gptkernels.paged_decode(q, kc, vc, table, lens, return_lse=True, backend="cuda", **kw)

    check_decode(run, "cuda", dtype, seed=case, **GPU_DECODE[case])


@requires_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [8, 64, 256])
def test_paged_append_cuda(dtype, block_size):
    def run(k, v, kc, vc, slots):
        gptkernels.paged_append(k, v, kc, vc, slots, backend="cuda")

    check_append(run, "cuda", dtype, T=1000, Hkv=4, D=128, block_size=block_size)
    check_append(run, "cuda", dtype, T=7, Hkv=2, D=80, block_size=block_size, strided=True)


@requires_gpu
def test_paged_decode_cuda_graph():
    """No host sync inside: the decode step (append + decode) captures in a CUDA graph and replays."""
    torch.manual_seed(0)
    B, H, D, bs = 4, 8, 128, 16
    lens = [100, 1, 33, 250]
    kd, vd = (randn(B, 256, H, D, dtype=torch.float16, device="cuda") for _ in range(2))
    kc, vc, table, seq_lens = to_paged(kd, vd, lens, bs)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    q = randn(B, H, D, dtype=torch.float16, device="cuda")
    k_new, v_new = (randn(B, H, D, dtype=torch.float16, device="cuda") for _ in range(2))
    slots = torch.tensor([int(table[b, (n - 1) // bs]) * bs + (n - 1) % bs for b, n in enumerate(lens)],
                         device="cuda")

    def step():
        gptkernels.paged_append(k_new, v_new, kc, vc, slots, backend="cuda")
        return gptkernels.paged_decode(q, kc, vc, table, seq_lens, window=64, backend="cuda")

    step()  # warm up (allocator, first launches) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    q.copy_(randn(B, H, D, dtype=torch.float16, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    ref = reference.paged_decode(q.double(), kc.double(), vc.double(), table, seq_lens, window=64)
    base = reference.paged_decode(q, kc, vc, table, seq_lens, window=64, upcast=False)
    assert_parity(out, ref, base)


@requires_gpu
def test_cuda_kernels_use_64bit_offsets(ops):
    """The emulated 64-bit offset checks on the GPU (up to ~9 GiB of device memory for a moment)."""
    check_64bit_cache_offsets(cuda_backend, "cuda")
    torch.cuda.empty_cache()
    check_64bit_row_offsets(cuda_backend, "cuda")
