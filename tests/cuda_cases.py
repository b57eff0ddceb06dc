"""Shared pieces of the "cuda" backend's tests (tests/test_cuda_extension.py, test_cuda_emulated.py,
test_cuda_gpu.py): the extension fixture, the case builders and the parity checks. Each check takes
a ``run`` callable, so the same case runs on the CPU emulator of the kernels (CPU tensors) and on
the real kernels through the public API (a GPU).
"""

from __future__ import annotations

import itertools
import math
import os
import shutil

import pytest
import torch

import gptkernels
from gptkernels import cuda as cuda_backend, reference
from tests.helpers import assert_parity, randn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HALF_DTYPES = [torch.float16, torch.bfloat16]  # the flash kernel's dtypes (tensor cores)
ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


# ==================================================================================================
# The built extension
# ==================================================================================================


def build_blocker() -> str | None:
    """Why the extension cannot be built on this machine (None: it can)."""
    if not torch.version.cuda:
        return f"torch {torch.__version__} is not a CUDA build"
    if not (shutil.which("nvcc") or os.environ.get("CUDA_HOME")):
        return "no nvcc (CUDA toolkit) on PATH"
    return None


@pytest.fixture(scope="module")
def ops():
    """torch.ops.gptkernels_C, from the built extension (a test module imports this fixture)."""
    try:
        from gptkernels import _C  # noqa: F401
    except ImportError as e:
        blocker = build_blocker()
        if blocker:
            pytest.skip(f"the CUDA extension cannot be built here: {blocker}")
        pytest.fail(f"gptkernels._C is not built ({e}): run `make build-cuda` first")
    cuda_backend._ops()  # registers the fakes
    return torch.ops.gptkernels_C


def flash_kw(**kw):
    """Keyword arguments of gptkernels.cuda.flash_attn_forward: resolved defaults, overridden by kw."""
    base = dict(causal=True, window=None, softmax_scale=0.125, cu_seqlens_q=None, cu_seqlens_k=None,
                max_seqlen_q=None, max_seqlen_k=None, block_table=None, seqlens_k=None, bottom_right=True)
    base.update(kw)
    return base


# ==================================================================================================
# Case builders and parity checks (the emulator on CPU, the real kernels on a GPU)
# ==================================================================================================


def cu_seqlens(lengths, device):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def to_paged(k, v, lens, block_size, *, seed=0):
    """Per-sequence keys k, v (B, S, Hkv, D) -> caches (num_blocks, block_size, Hkv, D), a shuffled
    block table, seq lens. Slots past a sequence's end hold NaN and table entries past its blocks
    point far outside the cache: a kernel that reads either fails the parity check or crashes."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    shape = (num_blocks, block_size, k.shape[2], k.shape[3])
    kc = torch.full(shape, float("nan"), dtype=k.dtype, device=k.device)
    vc = torch.full(shape, float("nan"), dtype=v.dtype, device=v.device)
    table = torch.full((len(lens), max(need, default=0) + 1), 1 << 30, dtype=torch.int32)
    i = 0
    for b, n in enumerate(lens):
        for j in range(need[b]):
            blk = perm[i]
            i += 1
            table[b, j] = blk
            rows = min(block_size, n - j * block_size)
            kc[blk, :rows] = k[b, j * block_size:j * block_size + rows]
            vc[blk, :rows] = v[b, j * block_size:j * block_size + rows]
    return kc, vc, table.to(k.device), torch.tensor(lens, dtype=torch.int32, device=k.device)


def check_flash(run, device, dtype, *, Hq, Hkv, D, B=1, Sq=None, Sk=None, lens_q=None, lens_k=None,
                causal=True, window=None, scale=None, layout="dense", block_size=16, seed=0):
    """``run(q, k, v, **kw)`` -> (out, lse) vs the float64 reference and the eager same-dtype one.

    layout: "dense" (B, S, H, D); "qkv" (q, k, v head slices of one fused tensor: strided views);
    "varlen" (packed, lens_q / lens_k); "paged" (dense q, keys paged with lens_k); "paged_varlen".
    kw are flash_attn's: causal, window, softmax_scale, cu_seqlens_*, max_seqlen_*, block_table, seqlens_k.
    """
    torch.manual_seed(seed)
    kw = dict(causal=causal, window=window, softmax_scale=scale, cu_seqlens_q=None, cu_seqlens_k=None,
              max_seqlen_q=None, max_seqlen_k=None, block_table=None, seqlens_k=None)
    mk = lambda *shape: randn(*shape, dtype=dtype, device=device)  # noqa: E731
    if layout == "dense":
        q, k, v = mk(B, Sq, Hq, D), mk(B, Sk, Hkv, D), mk(B, Sk, Hkv, D)
    elif layout == "qkv":
        assert Sq == Sk
        fused = mk(B, Sq, Hq + 2 * Hkv, D)
        q, k, v = fused[:, :, :Hq], fused[:, :, Hq:Hq + Hkv], fused[:, :, Hq + Hkv:]
    elif layout == "varlen":
        q, k, v = mk(sum(lens_q), Hq, D), mk(sum(lens_k), Hkv, D), mk(sum(lens_k), Hkv, D)
        kw.update(cu_seqlens_q=cu_seqlens(lens_q, device), cu_seqlens_k=cu_seqlens(lens_k, device),
                  max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))
    elif layout in ("paged", "paged_varlen"):
        kd, vd = mk(len(lens_k), max(lens_k), Hkv, D), mk(len(lens_k), max(lens_k), Hkv, D)
        k, v, table, seqlens = to_paged(kd, vd, lens_k, block_size, seed=seed)
        kw.update(block_table=table, seqlens_k=seqlens)
        if layout == "paged":
            q = mk(len(lens_k), Sq, Hq, D)
        else:
            q = mk(sum(lens_q), Hq, D)
            kw.update(cu_seqlens_q=cu_seqlens(lens_q, device), max_seqlen_q=max(lens_q))
    else:
        raise AssertionError(layout)

    out, lse = run(q, k, v, **kw)

    ref_kw = {n: kw[n] for n in ("causal", "window", "softmax_scale", "cu_seqlens_q", "cu_seqlens_k",
                                 "block_table", "seqlens_k")}
    r_out, r_lse = reference.attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), return_lse=True,
                                       **{n: (t.cpu() if isinstance(t, torch.Tensor) else t)
                                          for n, t in ref_kw.items()})
    b_out, b_lse = reference.attention(q, k, v, return_lse=True, upcast=False, **ref_kw)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == r_lse.shape
    assert_parity(out, r_out, b_out, name="out")
    assert_parity(lse, r_lse, b_lse.float(), name="lse")


def check_rotary(run, device, dtype, *, shape, hk, rot, interleaved, positions=None, offset=0, inplace=False,
                 fused=False, every_other=False, cos_dtype=torch.float32, conjugate=False, max_positions=300,
                 seed=0):
    """``run(q, k, cos, sin, positions=, offset=, interleaved=, inplace=, conjugate=)`` -> (q_out, k_out).

    fused: q and k are head slices of one buffer (strided views); every_other: their channels are
    every other element of a buffer (head-dim stride 2: the kernel's scalar path)."""
    torch.manual_seed(seed)
    *lead, hq, d = shape
    if fused:  # q and k: head slices of one buffer, rotated in place through strided views
        buf = randn(*lead, hq + (hk or 0) + 1, d, dtype=dtype, device=device)
        q, k = buf[..., :hq, :], (buf[..., hq:hq + hk, :] if hk else None)
    elif every_other:
        q = randn(*lead, hq, 2 * d, dtype=dtype, device=device)[..., ::2]
        k = randn(*lead, hk, 2 * d, dtype=dtype, device=device)[..., 1::2] if hk else None
    else:
        q = randn(*lead, hq, d, dtype=dtype, device=device)
        k = randn(*lead, hk, d, dtype=dtype, device=device) if hk else None
    ang = torch.rand(max_positions, rot // 2, dtype=torch.float64) * 2 * math.pi
    cos, sin = ang.cos().to(device, cos_dtype), ang.sin().to(device, cos_dtype)
    if positions == "int32" or positions == "int64":
        positions = torch.randint(0, max_positions, tuple(lead), device=device,
                                  dtype=torch.int32 if positions == "int32" else torch.int64)
    q0, k0 = q.clone(), (None if k is None else k.clone())
    q_out, k_out = run(q, k, cos, sin, positions=positions, offset=offset, interleaved=interleaved,
                       inplace=inplace, conjugate=conjugate)
    # conjugate: rotation by -theta, i.e. the reference with -sin
    s = -sin if conjugate else sin
    r_q, r_k = reference.apply_rotary(q0.double(), None if k0 is None else k0.double(), cos.double(), s.double(),
                                      positions=positions, offset=offset, interleaved=interleaved)
    b_q, b_k = reference.apply_rotary(q0, k0, cos.to(dtype), s.to(dtype), positions=positions, offset=offset,
                                      interleaved=interleaved, upcast=False)
    if inplace:
        assert q_out is q and k_out is k
    else:
        assert q_out.is_contiguous() and torch.equal(q, q0)  # the input is left alone
    assert_parity(q_out, r_q, b_q, name="q_out")
    if k is None:
        assert k_out is None
    else:
        assert_parity(k_out, r_k, b_k, name="k_out")
    assert torch.equal(q_out[..., rot:], q0[..., rot:])  # channels past the rotary dim pass through


def check_decode(run, device, dtype, *, lens, Hq, Hkv, D, block_size, window=None, num_splits=None, scale=None,
                 seed=0):
    """``run(q, kc, vc, table, lens, softmax_scale=, window=, num_splits=)`` -> (out, lse)."""
    torch.manual_seed(seed)
    kd = randn(len(lens), max(max(lens), 1), Hkv, D, dtype=dtype, device=device)
    vd = randn(len(lens), max(max(lens), 1), Hkv, D, dtype=dtype, device=device)
    kc, vc, table, seq_lens = to_paged(kd, vd, lens, block_size, seed=seed)
    q = randn(len(lens), Hq, D, dtype=dtype, device=device)
    out, lse = run(q, kc, vc, table, seq_lens, softmax_scale=scale, window=window, num_splits=num_splits)
    r_out, r_lse = reference.paged_decode(q.double().cpu(), kc.double().cpu(), vc.double().cpu(), table.cpu(),
                                          seq_lens.cpu(), softmax_scale=scale, window=window, return_lse=True)
    b_out, b_lse = reference.paged_decode(q, kc, vc, table, seq_lens, softmax_scale=scale, window=window,
                                          upcast=False, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32
    assert_parity(out, r_out, b_out, name="out")
    assert_parity(lse, r_lse, b_lse.float(), name="lse")


def check_append(run, device, dtype, *, T, Hkv, D, block_size, slot_dtype=torch.int64, strided=False, seed=0):
    """``run(k, v, k_cache, v_cache, slot_mapping)`` writes exactly what the reference writes."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = -(-T // block_size) + 2
    kc = randn(num_blocks, block_size, Hkv, D, dtype=dtype, device=device, generator=g)
    vc = randn(num_blocks, block_size, Hkv, D, dtype=dtype, device=device, generator=g)
    if strided:  # k, v: views into one (T, 2, Hkv, D) buffer
        kv = randn(T, 2, Hkv, D, dtype=dtype, device=device, generator=g)
        k, v = kv[:, 0], kv[:, 1]
    else:
        k = randn(T, Hkv, D, dtype=dtype, device=device, generator=g)
        v = randn(T, Hkv, D, dtype=dtype, device=device, generator=g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[::3] = -1  # padding tokens are skipped
    slots = slots.to(device=device, dtype=slot_dtype)
    r_kc, r_vc = kc.clone(), vc.clone()
    reference.paged_append(k, v, r_kc, r_vc, slots.long())
    run(k, v, kc, vc, slots)
    assert torch.equal(kc, r_kc) and torch.equal(vc, r_vc)



# ==================================================================================================
# 64-bit offsets: element offsets past 2^31 (a paged cache of 1M blocks, a token stride of 2^31)
# ==================================================================================================

BIG = 1 << 31  # elements: an int32 offset computation overflows past here


def lazy_empty(numel, device, dtype=torch.float16):
    """numel elements (4+ GiB). On the CPU the OS maps the pages lazily: only touched ones cost."""
    try:
        return torch.empty(numel, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as e:  # e.g. overcommit disabled on this machine
        pytest.skip(f"needs {numel * 2 / 2**30:.1f} GiB of (lazily mapped) memory on {device}: {e}")


def far_caches(kc, vc):
    """The caches kc, vc (n, bs, Hkv, D) as the last n blocks of caches whose block offsets pass 2^31
    elements; returns them and the block index of kc[0] there."""
    n, block = kc.shape[0], kc[0].numel()
    num_blocks = BIG // block + n + 1
    far = [lazy_empty(num_blocks * block, kc.device).view(num_blocks, *kc.shape[1:]) for _ in range(2)]
    first = num_blocks - n
    assert first * block >= BIG
    far[0][first:] = kc
    far[1][first:] = vc
    return far[0], far[1], first


def check_64bit_cache_offsets(mod, device):
    """paged decode, flash attention over a paged cache and paged append with cache blocks 2^31+
    elements in: the same results as with the same blocks at the start of a small cache."""
    torch.manual_seed(0)
    D, bs, Hkv, Hq, lens = 64, 16, 2, 4, [40, 23]
    kd, vd = (randn(2, 40, Hkv, D, dtype=torch.float16, device=device) for _ in range(2))
    kc, vc, table, seq_lens = to_paged(kd, vd, lens, bs)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    far_k, far_v, first = far_caches(kc, vc)
    far_table = torch.where(table < kc.shape[0], table + first, table)  # bad entries stay bad

    q = randn(2, Hq, D, dtype=torch.float16, device=device)
    for splits in (1, 3):
        near = mod.paged_decode(q, kc, vc, table, seq_lens, softmax_scale=0.125, window=None, num_splits=splits)
        far = mod.paged_decode(q, far_k, far_v, far_table, seq_lens, softmax_scale=0.125, window=None,
                               num_splits=splits)
        assert torch.equal(near[0], far[0]) and torch.equal(near[1], far[1])

    qf = randn(2, 5, Hq, D, dtype=torch.float16, device=device)
    kw = flash_kw(block_table=table, seqlens_k=seq_lens)
    near = mod.flash_attn_forward(qf, kc, vc, **kw)
    far = mod.flash_attn_forward(qf, far_k, far_v, **{**kw, "block_table": far_table})
    assert torch.equal(near[0], far[0]) and torch.equal(near[1], far[1])

    k_new, v_new = (randn(3, Hkv, D, dtype=torch.float16, device=device) for _ in range(2))
    slots = torch.tensor([-1, 5, 2 * bs + 7], device=device)  # relative to the far blocks
    mod.paged_append(k_new, v_new, far_k, far_v, torch.where(slots >= 0, slots + first * bs, slots))
    assert torch.equal(far_k[first, 5], k_new[1]) and torch.equal(far_v[first + 2, 7], v_new[2])


def check_64bit_row_offsets(mod, device):
    """q's second token 2^31 elements past its first: rotary in place, flash attention's q rows."""
    torch.manual_seed(0)
    H, D = 2, 64
    x = randn(1, 2, H, D, dtype=torch.float16, device=device)
    far = lazy_empty(BIG + H * D, device).as_strided((1, 2, H, D), (0, BIG, D, 1))
    far.copy_(x)
    cos, sin = gptkernels.rotary_cos_sin(D, 16, dtype=torch.float32, device=device)
    near, _ = mod.apply_rotary(x, None, cos, sin, positions=None, offset=7, interleaved=False, inplace=False,
                               conjugate=False)
    mod.apply_rotary(far, None, cos, sin, positions=None, offset=7, interleaved=False, inplace=True, conjugate=False)
    assert torch.equal(far, near)

    k, v = (randn(1, 2, H, D, dtype=torch.float16, device=device) for _ in range(2))
    near = mod.flash_attn_forward(x, k, v, **flash_kw())
    far.copy_(x)
    out = mod.flash_attn_forward(far, k, v, **flash_kw())
    assert torch.equal(near[0], out[0]) and torch.equal(near[1], out[1])
