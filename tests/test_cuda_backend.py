"""The "cuda" backend: the CUDA C++ extension gptkernels._C (csrc/) and its wrappers gptkernels.cuda.

Three layers:

* Everywhere: the extension imports and registers its ops with the right schemas; its C++ input
  checks (which run before any device work, so CPU tensors reach them) name the argument;
  unsupported options become BackendUnavailableError; the fake implementations trace; setup.py
  decides when to build.
* Everywhere, on CPU: the kernels themselves, run by the CPU emulator of the extension
  (tests/cuda_emulator: the same csrc sources compiled for the host, every CUDA thread a CPU
  thread, ldmatrix / mma computed from the PTX ISA definitions), against the float64 reference with
  SPEC's parity rule. This is what proves the kernels' index math without a GPU. The emulator is
  built to show GPU-only bugs too (warps run one at a time, cp.async lands late or early, shared
  memory poisoned, misaligned accesses / int overflow / bad launch configurations fail the launch):
  its self-test kernels check each detector, and offsets past 2^31 elements are checked with
  lazily mapped 4 GiB buffers.
* On a GPU: the same parity grid, bigger, through the public API with backend="cuda", plus
  torch.compile, CUDA-graph capture, 64-bit offsets and the error for attention gradients.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import shutil

import pytest
import torch

import gptkernels
from gptkernels import cuda as cuda_backend, reference
from gptkernels._backend import BackendUnavailableError
from gptkernels._policy import CPU_NOMINAL_SMS, decode_band
from gptkernels._policy import num_splits as policy_num_splits
from gptkernels._policy import softmax_scale as softmax_scale_default
from tests.helpers import DEVICE, ON_GPU, assert_parity, grid, randn, requires_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HALF_DTYPES = [torch.float16, torch.bfloat16]  # the flash kernel's dtypes (tensor cores)
ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


# ==================================================================================================
# Shared case builders and checks (used with the emulator on CPU and with the real kernels on a GPU)
# ==================================================================================================


def _cu(lengths, device):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def _to_paged(k, v, lens, block_size, *, seed=0):
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
        kw.update(cu_seqlens_q=_cu(lens_q, device), cu_seqlens_k=_cu(lens_k, device),
                  max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))
    elif layout in ("paged", "paged_varlen"):
        kd, vd = mk(len(lens_k), max(lens_k), Hkv, D), mk(len(lens_k), max(lens_k), Hkv, D)
        k, v, table, seqlens = _to_paged(kd, vd, lens_k, block_size, seed=seed)
        kw.update(block_table=table, seqlens_k=seqlens)
        if layout == "paged":
            q = mk(len(lens_k), Sq, Hq, D)
        else:
            q = mk(sum(lens_q), Hq, D)
            kw.update(cu_seqlens_q=_cu(lens_q, device), max_seqlen_q=max(lens_q))
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
    kc, vc, table, seq_lens = _to_paged(kd, vd, lens, block_size, seed=seed)
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
# The extension itself (CPU and GPU)
# ==================================================================================================


def _build_blocker() -> str | None:
    """Why the extension cannot be built on this machine (None: it can)."""
    if not torch.version.cuda:
        return f"torch {torch.__version__} is not a CUDA build"
    if not (shutil.which("nvcc") or os.environ.get("CUDA_HOME")):
        return "no nvcc (CUDA toolkit) on PATH"
    return None


@pytest.fixture(scope="module")
def ops():
    """torch.ops.gptkernels_C, from the built extension."""
    try:
        from gptkernels import _C  # noqa: F401
    except ImportError as e:
        blocker = _build_blocker()
        if blocker:
            pytest.skip(f"the CUDA extension cannot be built here: {blocker}")
        pytest.fail(f"gptkernels._C is not built ({e}): run `make build-cuda` first")
    cuda_backend._ops()  # registers the fakes
    return torch.ops.gptkernels_C


def test_backends_reports_why_cuda_is_unavailable():
    reason = gptkernels.backends()["cuda"]
    if ON_GPU and importlib.util.find_spec("gptkernels._C") is not None:
        assert reason is None
    else:
        assert isinstance(reason, str) and ("not built" in reason or "no CUDA GPU" in reason)


SCHEMAS = {
    "flash_attn_fwd": "flash_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
                      "Tensor? block_table, Tensor? seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, "
                      "int? window, float softmax_scale, bool bottom_right) -> (Tensor out, Tensor lse)",
    "rotary_out": "rotary_out(Tensor q, Tensor? k, Tensor cos, Tensor sin, Tensor? positions, Tensor? offsets, "
                  "int offset, bool interleaved, bool conjugate, Tensor(a!) q_out, Tensor(b!)? k_out) -> ()",
    "rotary_inplace": "rotary_inplace(Tensor(a!) q, Tensor(b!)? k, Tensor cos, Tensor sin, Tensor? positions, "
                      "Tensor? offsets, int offset, bool interleaved, bool conjugate) -> ()",
    "paged_append": "paged_append(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
                    "Tensor slot_mapping) -> ()",
    "paged_decode": "paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
                    "float softmax_scale, int? window, int num_splits) -> (Tensor out, Tensor lse)",
}


def test_extension_registers_ops_with_schemas(ops):
    for name, schema in SCHEMAS.items():
        assert str(getattr(ops, name).default._schema) == "gptkernels_C::" + schema
    mutated = {name: [a.name for a in getattr(ops, name).default._schema.arguments
                      if a.alias_info is not None and a.alias_info.is_write] for name in SCHEMAS}
    assert mutated == {"flash_attn_fwd": [], "rotary_out": ["q_out", "k_out"], "rotary_inplace": ["q", "k"],
                       "paged_append": ["k_cache", "v_cache"], "paged_decode": []}


def _h(*shape, dtype=torch.float16):
    return torch.randn(*shape).to(dtype)


def _i(*values):
    return torch.tensor(values, dtype=torch.int32)


# (op, args, exception, message): every case reaches a C++ check before any device work.
CPP_CHECKS = [
    ("flash_attn_fwd", lambda: (_h(1, 4, 2, 64), _h(1, 4, 2, 64), _h(1, 4, 2, 64, dtype=torch.bfloat16),
                                None, None, None, None, 4, 4, True, None, 0.1, True), TypeError, "k and v"),
    ("flash_attn_fwd", lambda: (_h(4, 2, 64), _h(1, 4, 2, 64), _h(1, 4, 2, 64), None, None, None, None, 4, 4,
                                True, None, 0.1, True), ValueError, "q must have 4 dimensions"),
    ("flash_attn_fwd", lambda: (_h(2, 4, 2, 64), _h(1, 4, 2, 64), _h(1, 4, 2, 64), None, None, None, None, 4, 4,
                                True, None, 0.1, True), ValueError, r"k\.shape\[0\]"),
    ("flash_attn_fwd", lambda: (_h(1, 4, 3, 64), _h(1, 4, 2, 64), _h(1, 4, 2, 64), None, None, None, None, 4, 4,
                                True, None, 0.1, True), ValueError, "multiple of the number of heads of k"),
    ("flash_attn_fwd", lambda: (_h(1, 4, 2, 64), _h(1, 4, 2, 64), _h(1, 4, 2, 64), None, None, None, None, 4, 4,
                                True, 0, 0.1, True), ValueError, "window must be >= 1"),
    ("flash_attn_fwd", lambda: (_h(1, 4, 2, 64), _h(1, 4, 2, 64), _h(1, 4, 2, 64), None, None, None, None, 4, 4,
                                False, 3, 0.1, True), ValueError, "window needs causal"),
    ("flash_attn_fwd", lambda: (_h(5, 2, 64), _h(5, 2, 64), _h(5, 2, 64), _i(0, 5), None, None, None, 5, 5,
                                True, None, 0.1, True), ValueError, "cu_seqlens_q and cu_seqlens_k"),
    ("flash_attn_fwd", lambda: (_h(5, 2, 64), _h(5, 2, 64), _h(5, 2, 64), _i(0, 2, 5), _i(0, 5), None, None, 5,
                                5, True, None, 0.1, True), ValueError, "cu_seqlens_q"),
    ("flash_attn_fwd", lambda: (_h(5, 2, 64), _h(5, 2, 64), _h(5, 2, 64), _i(0, 5).long(), _i(0, 5), None,
                                None, 5, 5, True, None, 0.1, True), TypeError, "cu_seqlens_q must be an int32"),
    ("flash_attn_fwd", lambda: (_h(2, 1, 2, 64), _h(4, 16, 2, 64), _h(4, 16, 2, 64), None, None,
                                _i(0, 1).view(2, 1), None, 1, 16, True, None, 0.1, True), ValueError,
     "block_table and seqlens_k"),
    ("flash_attn_fwd", lambda: (_h(3, 1, 2, 64), _h(4, 16, 2, 64), _h(4, 16, 2, 64), None, None,
                                _i(0, 1).view(2, 1), _i(3, 5), 1, 16, True, None, 0.1, True), ValueError,
     r"q\.shape\[0\]"),
    ("flash_attn_fwd", lambda: (_h(1, 4, 2, 64), _h(1, 4, 2, 64), _h(1, 4, 2, 64), None, None, None, None, 4, 4,
                                True, None, 0.1, True), ValueError, "q must be a CUDA tensor"),
    ("rotary_out", lambda: (_h(2, 3, 2, 8), _h(2, 4, 2, 8), _h(10, 4, dtype=torch.float32),
                            _h(10, 4, dtype=torch.float32), None, None, 0, False, False, _h(2, 3, 2, 8),
                            _h(2, 4, 2, 8)), ValueError, "k must be shaped like q"),
    ("rotary_out", lambda: (_h(2, 3, 2, 8), None, _h(10, 5, dtype=torch.float32), _h(10, 5, dtype=torch.float32),
                            None, None, 0, False, False, _h(2, 3, 2, 8), None), ValueError, "rotary_dim"),
    ("rotary_out", lambda: (_h(2, 3, 2, 8), None, _h(10, 4, dtype=torch.float32), _h(10, 3, dtype=torch.float32),
                            None, None, 0, False, False, _h(2, 3, 2, 8), None), ValueError, "sin must be shaped"),
    ("rotary_out", lambda: (_h(2, 3, 2, 8), None, _h(10, 4, dtype=torch.float32), _h(10, 4, dtype=torch.float32),
                            _i(1, 2, 3), None, 0, False, False, _h(2, 3, 2, 8), None), ValueError, "positions"),
    ("rotary_out", lambda: (_h(2, 3, 2, 8), None, _h(10, 4, dtype=torch.float32), _h(10, 4, dtype=torch.float32),
                            None, _i(1, 2, 3), 0, False, False, _h(2, 3, 2, 8), None), ValueError, "offset"),
    ("rotary_out", lambda: (_h(2, 3, 2, 8), None, _h(10, 4, dtype=torch.float32), _h(10, 4, dtype=torch.float32),
                            None, None, 0, False, False, _h(2, 3, 2, 6), None), ValueError, "q_out"),
    ("rotary_inplace", lambda: (_h(2, 3, 2, 8), None, _h(10, 4, dtype=torch.float32),
                                _h(10, 4, dtype=torch.float32), None, None, 0, False, False), ValueError,
     "q must be a CUDA tensor"),
    ("paged_append", lambda: (_h(3, 2, 8), _h(3, 2, 8), _h(4, 8, 2, 8), _h(4, 8, 2, 8), _i(0, 1)), ValueError,
     r"slot_mapping\.shape\[0\]"),
    ("paged_append", lambda: (_h(3, 2, 8), _h(3, 2, 8), _h(4, 8, 3, 8), _h(4, 8, 3, 8), _i(0, 1, 2)), ValueError,
     r"k\.shape\[1\]"),
    ("paged_append", lambda: (_h(3, 2, 8), _h(3, 2, 8), _h(4, 8, 2, 8), _h(4, 8, 2, 8), _i(0, 1, 2).float()),
     TypeError, "slot_mapping must be an int32 or int64"),
    ("paged_append", lambda: (_h(3, 2, 8), _h(3, 2, 8), _h(4, 8, 2, 8), _h(4, 8, 2, 8), _i(0, 1, 2)), ValueError,
     "k must be a CUDA tensor"),
    ("paged_decode", lambda: (_h(2, 4, 8), _h(4, 8, 2, 8), _h(4, 8, 2, 8), _i(0, 1, 2, 3).view(2, 2), _i(3),
                              0.3, None, 1), ValueError, r"seq_lens\.shape\[0\]"),
    ("paged_decode", lambda: (_h(2, 4, 8), _h(4, 8, 2, 8), _h(4, 8, 2, 8, dtype=torch.bfloat16),
                              _i(0, 1, 2, 3).view(2, 2), _i(3, 4), 0.3, None, 1), TypeError, "v_cache"),
    ("paged_decode", lambda: (_h(2, 4, 8), _h(4, 8, 3, 8), _h(4, 8, 3, 8), _i(0, 1, 2, 3).view(2, 2), _i(3, 4),
                              0.3, None, 1), ValueError, "multiple of the number of heads of k_cache"),
    ("paged_decode", lambda: (_h(2, 4, 8), _h(4, 8, 2, 8), _h(4, 8, 2, 8), _i(0, 1, 2, 3).view(2, 2), _i(3, 4),
                              0.3, 0, 1), ValueError, "window must be >= 1"),
    ("paged_decode", lambda: (_h(2, 4, 8), _h(4, 8, 2, 8), _h(4, 8, 2, 8), _i(0, 1, 2, 3).view(2, 2), _i(3, 4),
                              0.3, None, 1), ValueError, "q must be a CUDA tensor"),
    # int32 key counts: max_blocks * block_size (a stride-0 table: no memory)
    ("flash_attn_fwd", lambda: (_h(1, 1, 2, 32), _h(1, 1024, 2, 32), _h(1, 1024, 2, 32), None, None,
                                _i(0).view(1, 1).expand(1, 1 << 21), _i(5), 1, 5, True, None, 0.1, True),
     ValueError, "block_table covers more than 2"),
    ("paged_decode", lambda: (_h(1, 2, 8), _h(1, 1024, 2, 8), _h(1, 1024, 2, 8), _i(0).view(1, 1).expand(1, 1 << 21),
                              _i(5), 0.3, None, 1), ValueError, "block_table covers more than 2"),
    # grid limits (gridDim.y and .z <= 65535)
    ("flash_attn_fwd", lambda: (_h(1, 1, 65536, 32), _h(1, 1, 1, 32), _h(1, 1, 1, 32), None, None, None, None, 1,
                                1, True, None, 0.1, True), ValueError, "at most 65535 sequences and heads"),
    ("paged_decode", lambda: (_h(65536, 1, 8), _h(1, 8, 1, 8), _h(1, 8, 1, 8),
                              torch.zeros(65536, 1, dtype=torch.int32), torch.ones(65536, dtype=torch.int32), 0.3,
                              None, 1), ValueError, "at most 65535 sequences"),
    ("paged_decode", lambda: (_h(2, 4, 8), _h(4, 8, 2, 8), _h(4, 8, 2, 8), _i(0, 1, 2, 3).view(2, 2), _i(3, 4),
                              0.3, None, 0), ValueError, "num_splits must be >= 1"),
]


@pytest.mark.parametrize("case", range(len(CPP_CHECKS)))
def test_cpp_checks_name_the_argument(ops, case):
    name, args, exc, match = CPP_CHECKS[case]
    with pytest.raises(exc, match=match):
        getattr(ops, name)(*[a.to(DEVICE) if isinstance(a, torch.Tensor) and "CUDA tensor" not in match else a
                             for a in args()])


def _flash_kw(**kw):
    base = dict(causal=True, window=None, softmax_scale=0.125, cu_seqlens_q=None, cu_seqlens_k=None,
                max_seqlen_q=None, max_seqlen_k=None, block_table=None, seqlens_k=None, bottom_right=True)
    base.update(kw)
    return base


@pytest.mark.parametrize("what", ["float32", "head_dim", "unaligned", "cos_dtype", "decode_head_dim",
                                  "decode_cache_layout", "append_dtype"])
def test_unsupported_options_raise_backend_unavailable(ops, what):
    dev = DEVICE
    if what == "float32":
        q = randn(1, 4, 2, 64, device=dev)
        call, match = lambda: cuda_backend.flash_attn_forward(q, q, q, **_flash_kw()), "float32"
    elif what == "head_dim":
        q = randn(1, 4, 2, 48, dtype=torch.float16, device=dev)
        call, match = lambda: cuda_backend.flash_attn_forward(q, q, q, **_flash_kw()), "head dim 48"
    elif what == "unaligned":  # head dim not contiguous: no 16-byte row loads
        q = randn(1, 4, 2, 128, dtype=torch.float16, device=dev)[..., ::2]
        call, match = lambda: cuda_backend.flash_attn_forward(q, q, q, **_flash_kw()), "16-byte aligned rows"
    elif what == "cos_dtype":
        q = randn(1, 4, 2, 8, dtype=torch.float16, device=dev)
        cos = randn(10, 4, dtype=torch.bfloat16, device=dev)
        call, match = (lambda: cuda_backend.apply_rotary(q, None, cos, cos, positions=None, offset=0, interleaved=False,
                                                  inplace=False, conjugate=False)), "cos/sin"
    elif what == "decode_head_dim":
        q, kc = randn(1, 2, 6, dtype=torch.float16, device=dev), randn(2, 8, 2, 6, dtype=torch.float16, device=dev)
        t, n = torch.zeros(1, 2, dtype=torch.int32, device=dev), torch.ones(1, dtype=torch.int32, device=dev)
        call, match = (lambda: cuda_backend.paged_decode(q, kc, kc, t, n, softmax_scale=0.5, window=None,
                                                         num_splits=1)), "head dim 6"
    elif what == "decode_cache_layout":  # head dim strided in the cache
        q = randn(1, 2, 8, dtype=torch.float16, device=dev)
        kc = randn(2, 8, 2, 16, dtype=torch.float16, device=dev)[..., ::2]
        t, n = torch.zeros(1, 2, dtype=torch.int32, device=dev), torch.ones(1, dtype=torch.int32, device=dev)
        call, match = (lambda: cuda_backend.paged_decode(q, kc, kc, t, n, softmax_scale=0.5, window=None,
                                                         num_splits=1)), "contiguous head dim"
    else:
        k = randn(3, 2, 8, dtype=torch.float16, device=dev)
        kc = randn(4, 8, 2, 8, device=dev)
        s = torch.arange(3, device=dev)
        call, match = lambda: cuda_backend.paged_append(k, k, kc, kc, s), "dtypes must match"
    with pytest.raises(BackendUnavailableError, match=match):
        call()


def test_no_attention_backward_on_cuda():
    """attention.py asks the backend for flash_attn_backward when grads are needed: cuda has none."""
    assert not hasattr(cuda_backend, "flash_attn_backward")
    if ON_GPU:
        q = randn(1, 8, 2, 64, dtype=torch.float16, device="cuda").requires_grad_()
        with pytest.raises(BackendUnavailableError, match="flash_attn_backward"):
            gptkernels.flash_attn(q, q, q, backend="cuda")


def test_public_ops_refuse_cuda_backend_without_gpu():
    if ON_GPU:
        pytest.skip("needs a machine without a CUDA GPU: this one has one")
    q = randn(1, 4, 2, 64, dtype=torch.float16)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        gptkernels.flash_attn(q, q, q, backend="cuda")


def test_fake_implementations_trace(ops):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 5, 4, 64, dtype=torch.float16)
        k = torch.empty(2, 7, 2, 64, dtype=torch.float16)
        out, lse = ops.flash_attn_fwd(q, k, k, None, None, None, None, 5, 7, True, None, 0.1, True)
        assert out.shape == q.shape and lse.shape == (2, 4, 5) and lse.dtype == torch.float32
        qv = torch.empty(9, 4, 64, dtype=torch.float16)
        cu = torch.empty(3, dtype=torch.int32)
        out, lse = ops.flash_attn_fwd(qv, qv, qv, cu, cu, None, None, 5, 5, True, None, 0.1, True)
        assert out.shape == qv.shape and lse.shape == (4, 9)
        qd = torch.empty(3, 4, 64, dtype=torch.bfloat16)
        cache = torch.empty(10, 16, 2, 64, dtype=torch.bfloat16)
        out, lse = ops.paged_decode(qd, cache, cache, torch.empty(3, 4, dtype=torch.int32),
                                    torch.empty(3, dtype=torch.int32), 0.1, None, 1)
        assert out.shape == qd.shape and lse.shape == (3, 4)


# --------------------------------------------------------------------------------------------------
# setup.py's build decision (no build: the extension object only)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def setup_mod(monkeypatch):
    for var in ("GPTKERNELS_BUILD_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)  # restored after the test, whatever setup.py sets
    spec = importlib.util.spec_from_file_location("gptkernels_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ is not "__main__": setup() does not run
    return mod


def test_setup_skips_when_told(setup_mod, monkeypatch):
    monkeypatch.setenv("GPTKERNELS_BUILD_CUDA", "0")
    assert setup_mod._cuda_extensions() == ([], {})


def test_setup_without_cuda_torch(setup_mod, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert setup_mod._cuda_extensions() == ([], {})  # the pure package still installs
    monkeypatch.setenv("GPTKERNELS_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="GPTKERNELS_BUILD_CUDA=1.*not a CUDA build"):
        setup_mod._cuda_extensions()


def test_setup_without_nvcc(setup_mod, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(setup_mod, "_toolkit_from_nvcc", lambda: None)
    assert setup_mod._cuda_extensions() == ([], {})
    monkeypatch.setenv("GPTKERNELS_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="nvcc"):
        setup_mod._cuda_extensions()


@pytest.mark.parametrize("arch", [None, "9.0"])
def test_setup_builds_every_source(setup_mod, monkeypatch, arch):
    blocker = _build_blocker()
    if blocker:
        pytest.skip(f"the CUDA extension cannot be built here: {blocker}")
    if arch:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch)
    exts, cmdclass = setup_mod._cuda_extensions()
    assert [e.name for e in exts] == ["gptkernels._C"] and "build_ext" in cmdclass
    srcs = {os.path.normpath(s) for s in exts[0].sources}
    on_disk = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "csrc"))
               for f in fs if f.endswith((".cu", ".cpp"))}
    assert srcs == on_disk
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == (arch or "8.0;9.0")
    assert os.path.exists(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))


# ==================================================================================================
# The kernels on the CPU emulator (every machine)
# ==================================================================================================


@pytest.fixture(scope="module")
def emu_ops():
    from tests.cuda_emulator.build import NAMESPACE, load

    try:
        ns = load()
    except RuntimeError as e:
        if "CUDA headers" in str(e):
            pytest.skip(f"needs the CUDA toolkit headers to build the emulator: {e}")
        raise
    cuda_backend.register_fakes(NAMESPACE)
    return ns


@pytest.fixture
def emu(emu_ops, monkeypatch):
    """gptkernels.cuda's launchers, running the csrc kernels on the CPU emulator (CPU tensors)."""
    monkeypatch.setattr(cuda_backend, "_OPS", emu_ops)
    return cuda_backend


def _emu_flash(emu):
    def run(q, k, v, **kw):
        kw["softmax_scale"] = softmax_scale_default(q.shape[-1], kw["softmax_scale"])
        return emu.flash_attn_forward(q, k, v, bottom_right=True, **kw)
    return run


def _emu_decode(emu):
    """The launcher with what the public op resolves (scale default, the split policy)."""
    def run(q, kc, vc, table, lens, *, softmax_scale, window, num_splits):
        if num_splits is None:
            band = decode_band(table.shape[1] * kc.shape[1], window)
            num_splits = policy_num_splits(q.shape[0] * kc.shape[2], band, CPU_NOMINAL_SMS)
        return emu.paged_decode(q, kc, vc, table, lens, softmax_scale=softmax_scale_default(q.shape[-1], softmax_scale),
                                window=window, num_splits=num_splits)
    return run


EMU_FLASH = [
    dict(B=1, Sq=1, Sk=1, Hq=1, Hkv=1, D=64),
    dict(B=2, Sq=17, Sk=17, Hq=4, Hkv=2, D=64),
    dict(B=1, Sq=130, Sk=130, Hq=2, Hkv=1, D=128, window=37),
    dict(B=1, Sq=97, Sk=97, Hq=3, Hkv=3, D=80, causal=False),
    dict(B=1, Sq=20, Sk=150, Hq=2, Hkv=2, D=96),              # chunked prefill: Sq < Sk, bottom-right
    dict(B=2, Sq=33, Sk=9, Hq=2, Hkv=1, D=32),                # Sq > Sk: the first rows see no key
    dict(B=1, Sq=65, Sk=65, Hq=2, Hkv=2, D=64, window=1),     # each row sees only itself
    dict(B=1, Sq=70, Sk=70, Hq=2, Hkv=1, D=64, scale=1.0, layout="qkv"),  # GPT-Neo scale, strided views
    dict(lens_q=[5, 0, 70, 1], lens_k=[9, 3, 70, 130], Hq=4, Hkv=1, D=64, layout="varlen"),
    dict(lens_q=[5, 0, 70, 1], lens_k=[9, 3, 70, 130], Hq=4, Hkv=1, D=64, layout="varlen", window=5),
    dict(lens_q=[17, 64], lens_k=[17, 64], Hq=2, Hkv=2, D=80, layout="varlen", causal=False),
    dict(Sq=5, lens_k=[33, 5, 80], Hq=4, Hkv=2, D=128, layout="paged", block_size=16),
    dict(Sq=3, lens_k=[300, 1], Hq=2, Hkv=1, D=64, layout="paged", block_size=256, window=100),
    dict(lens_q=[3, 1, 9], lens_k=[40, 9, 9], Hq=2, Hkv=2, D=32, layout="paged_varlen", block_size=8),
]


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(EMU_FLASH)))
def test_emulated_flash_attn(emu, case, dtype):
    check_flash(_emu_flash(emu), "cpu", dtype, seed=case, **EMU_FLASH[case])


def test_emulated_flash_attn_top_left(emu):
    """bottom_right=False is torch SDPA's alignment (gptkernels.sdpa)."""
    torch.manual_seed(0)
    q, k, v = (randn(2, s, 2, 64, dtype=torch.float16, device="cpu") for s in (40, 19, 19))
    out, lse = emu.flash_attn_forward(q, k, v, **_flash_kw(bottom_right=False, window=6))
    r_out, r_lse = reference.attention(q.double(), k.double(), v.double(), causal=True, window=6,
                                       softmax_scale=0.125, bottom_right=False, return_lse=True)
    b_out = reference.attention(q, k, v, causal=True, window=6, softmax_scale=0.125, bottom_right=False,
                                upcast=False)
    assert_parity(out, r_out, b_out)
    assert_parity(lse, r_lse)


EMU_ROTARY = [
    dict(shape=(2, 17, 3, 80), hk=1, rot=48, interleaved=False, offset=5),
    dict(shape=(2, 17, 3, 80), hk=1, rot=48, interleaved=True, offset=5),
    dict(shape=(9, 2, 64), hk=2, rot=64, interleaved=False, positions="int32"),
    dict(shape=(9, 2, 64), hk=2, rot=64, interleaved=True, positions="int64"),
    dict(shape=(3, 7, 2, 32), hk=None, rot=16, interleaved=False, offset="tensor"),
    dict(shape=(13, 4, 96), hk=1, rot=96, interleaved=False, positions="int64", inplace=True, fused=True),
    dict(shape=(2, 5, 2, 64), hk=2, rot=32, interleaved=True, inplace=True, fused=True, offset=3),
    dict(shape=(2, 5, 2, 64), hk=2, rot=64, interleaved=False, cos_dtype="same", offset=1),
    dict(shape=(2, 11, 2, 64), hk=1, rot=64, interleaved=False, conjugate=True, offset=2),
    # the scalar path: R/2 not a multiple of the vector width, rows not aligned, head dim strided
    dict(shape=(2, 9, 2, 68), hk=1, rot=20, interleaved=True, offset=1),
    dict(shape=(2, 9, 2, 68), hk=1, rot=40, interleaved=True, offset=1),
    dict(shape=(2, 9, 3, 32), hk=2, rot=32, interleaved=False, offset=4, every_other=True),
    dict(shape=(7, 3, 32), hk=2, rot=24, interleaved=True, positions="int64", every_other=True, inplace=True),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(EMU_ROTARY)))
def test_emulated_rotary(emu, case, dtype):
    kw = dict(EMU_ROTARY[case])
    if kw.get("offset") == "tensor":
        kw["offset"] = torch.tensor([0, 40, 7])
    if kw.get("cos_dtype") == "same":
        kw["cos_dtype"] = dtype
    check_rotary(emu.apply_rotary, "cpu", dtype, seed=case, **kw)


def test_emulated_rotary_masks_positions_outside_the_table(emu):
    """A position outside cos/sin is never read: that token passes through unrotated."""
    q = randn(4, 2, 16, dtype=torch.float16, device="cpu")
    cos, sin = torch.ones(10, 8), torch.full((10, 8), 0.5)
    pos = torch.tensor([0, -1, 10, 1 << 40])
    q_out, _ = emu.apply_rotary(q, None, cos, sin, positions=pos, offset=0, interleaved=False, inplace=False,
                                conjugate=False)
    assert torch.equal(q_out[1:], q[1:]) and not torch.equal(q_out[0], q[0])


EMU_DECODE = [
    dict(lens=[1, 17, 32], Hq=6, Hkv=2, D=64, block_size=8),
    dict(lens=[1, 17, 32], Hq=6, Hkv=2, D=64, block_size=8, num_splits=3),
    dict(lens=[130, 7], Hq=4, Hkv=4, D=128, block_size=16, window=50, num_splits=4),
    dict(lens=[140, 40], Hq=16, Hkv=1, D=80, block_size=64, num_splits=2),   # MQA group 16: 2 head chunks
    dict(lens=[513], Hq=2, Hkv=1, D=256, block_size=256, num_splits=5),
    dict(lens=[20, 0, 3], Hq=2, Hkv=2, D=32, block_size=8, window=4),        # a sequence of length 0
    dict(lens=[75, 9], Hq=8, Hkv=2, D=12, block_size=32, scale=1.0, num_splits=9),  # small head dim, empty splits
    dict(lens=[64, 33], Hq=3, Hkv=1, D=96, block_size=16),                   # splits chosen by the policy
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("case", range(len(EMU_DECODE)))
def test_emulated_paged_decode(emu, case, dtype):
    check_decode(_emu_decode(emu), "cpu", dtype, seed=case, **EMU_DECODE[case])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("slot_dtype,strided", [(torch.int64, False), (torch.int32, True)])
def test_emulated_paged_append(emu, dtype, slot_dtype, strided):
    check_append(emu.paged_append, "cpu", dtype, T=37, Hkv=3, D=24, block_size=8, slot_dtype=slot_dtype,
                 strided=strided)


def test_emulated_paged_append_skips_slots_outside_the_cache(emu):
    kc = torch.zeros(2, 8, 1, 4)
    k = torch.ones(3, 1, 4)
    emu.paged_append(k, k, kc, kc.clone(), torch.tensor([16, -5, 1 << 40]))
    assert not bool(kc.any())


# --------------------------------------------------------------------------------------------------
# The emulator's detectors: its self-test kernels (tests/cuda_emulator/selftest.cpp) each carry a bug
# only a GPU would show; the emulator must show it too
# --------------------------------------------------------------------------------------------------


def _selftest_expected(src):
    return src.view(64, 4).roll(-32, 0).reshape(-1)  # thread t writes the chunk thread (t + 32) % 64 staged


def test_emulator_selftest_correct_kernels_pass(emu_ops):
    src = torch.randn(256)
    assert torch.equal(emu_ops.selftest("correct", src), _selftest_expected(src).expand(4, -1))
    assert torch.equal(emu_ops.selftest("smem_with_opt_in", src), torch.ones(32))


@pytest.mark.parametrize("case,stale_blocks", [
    ("no_wait", [0, 1]),       # cp.async lands at the wait in blocks 0, 1 (mod 4): without one, never
    ("no_commit", [0, 1]),     # wait_group only waits for committed groups
    ("no_barrier", [0, 1, 2, 3]),  # warps run one at a time: the reader runs before the other warp wrote
])
def test_emulator_shows_memory_ordering_bugs(emu_ops, case, stale_blocks):
    src = torch.randn(256)
    out = emu_ops.selftest(case, src)
    for blk in range(4):
        if blk in stale_blocks:
            assert out[blk].isnan().any(), f"block {blk}: the poisoned shared memory should have been read"
        else:
            assert torch.equal(out[blk], _selftest_expected(src))


@pytest.mark.parametrize("case", ["static_smem_unwritten_template", "static_smem_unwritten_plain"])
def test_emulator_poisons_static_shared_memory(emu_ops, case):
    out = emu_ops.selftest(case, torch.randn(256))  # 2 blocks; odd slots of the shared array never written
    assert out[:, 0::2].isnan().all() and torch.equal(out[:, 1::2], torch.ones(2, 32))
    assert torch.equal(emu_ops.selftest("static_smem_written", torch.randn(256)), torch.ones(2, 64))


@pytest.mark.parametrize("case,match", [
    ("misaligned_vector", "selftest.cpp:[0-9]+: misaligned memory access .*16-byte alignment"),
    ("misaligned_cp_async", "cp.async: misaligned global source"),
    ("misaligned_ldmatrix", "ldmatrix: misaligned shared address"),
    ("int_overflow", "selftest.cpp:[0-9]+: signed integer overflow"),
    ("grid_y_too_large", "invalid launch configuration: grid \\(1, 65536, 1\\)"),
    ("smem_without_opt_in", "65536 bytes of dynamic shared memory"),
])
def test_emulator_faults_where_a_gpu_faults(emu_ops, case, match):
    with pytest.raises(RuntimeError, match=match):
        emu_ops.selftest(case, torch.randn(256))
    assert torch.equal(emu_ops.selftest("correct", t := torch.randn(256)), _selftest_expected(t).expand(4, -1))


# --------------------------------------------------------------------------------------------------
# 64-bit offsets: element offsets past 2^31 (a paged cache of 1M blocks, a token stride of 2^31)
# --------------------------------------------------------------------------------------------------

_BIG = 1 << 31  # elements: an int32 offset computation overflows past here


def _lazy_empty(numel, device, dtype=torch.float16):
    """numel elements (4+ GiB). On the CPU the OS maps the pages lazily: only touched ones cost."""
    try:
        return torch.empty(numel, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as e:  # e.g. overcommit disabled on this machine
        pytest.skip(f"needs {numel * 2 / 2**30:.1f} GiB of (lazily mapped) memory on {device}: {e}")


def _far_caches(kc, vc):
    """The caches kc, vc (n, bs, Hkv, D) as the last n blocks of caches whose block offsets pass 2^31
    elements; returns them and the block index of kc[0] there."""
    n, block = kc.shape[0], kc[0].numel()
    num_blocks = _BIG // block + n + 1
    far = [_lazy_empty(num_blocks * block, kc.device).view(num_blocks, *kc.shape[1:]) for _ in range(2)]
    first = num_blocks - n
    assert first * block >= _BIG
    far[0][first:] = kc
    far[1][first:] = vc
    return far[0], far[1], first


def check_64bit_cache_offsets(mod, device):
    """paged decode, flash attention over a paged cache and paged append with cache blocks 2^31+
    elements in: the same results as with the same blocks at the start of a small cache."""
    torch.manual_seed(0)
    D, bs, Hkv, Hq, lens = 64, 16, 2, 4, [40, 23]
    kd, vd = (randn(2, 40, Hkv, D, dtype=torch.float16, device=device) for _ in range(2))
    kc, vc, table, seq_lens = _to_paged(kd, vd, lens, bs)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    far_k, far_v, first = _far_caches(kc, vc)
    far_table = torch.where(table < kc.shape[0], table + first, table)  # bad entries stay bad

    q = randn(2, Hq, D, dtype=torch.float16, device=device)
    for splits in (1, 3):
        near = mod.paged_decode(q, kc, vc, table, seq_lens, softmax_scale=0.125, window=None, num_splits=splits)
        far = mod.paged_decode(q, far_k, far_v, far_table, seq_lens, softmax_scale=0.125, window=None,
                               num_splits=splits)
        assert torch.equal(near[0], far[0]) and torch.equal(near[1], far[1])

    qf = randn(2, 5, Hq, D, dtype=torch.float16, device=device)
    kw = _flash_kw(block_table=table, seqlens_k=seq_lens)
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
    far = _lazy_empty(_BIG + H * D, device).as_strided((1, 2, H, D), (0, _BIG, D, 1))
    far.copy_(x)
    cos, sin = gptkernels.rotary_cos_sin(D, 16, dtype=torch.float32, device=device)
    near, _ = mod.apply_rotary(x, None, cos, sin, positions=None, offset=7, interleaved=False, inplace=False,
                               conjugate=False)
    mod.apply_rotary(far, None, cos, sin, positions=None, offset=7, interleaved=False, inplace=True, conjugate=False)
    assert torch.equal(far, near)

    k, v = (randn(1, 2, H, D, dtype=torch.float16, device=device) for _ in range(2))
    near = mod.flash_attn_forward(x, k, v, **_flash_kw())
    far.copy_(x)
    out = mod.flash_attn_forward(far, k, v, **_flash_kw())
    assert torch.equal(near[0], out[0]) and torch.equal(near[1], out[1])


def test_emulated_kernels_use_64bit_cache_offsets(emu):
    check_64bit_cache_offsets(emu, "cpu")


def test_emulated_kernels_use_64bit_row_offsets(emu):
    check_64bit_row_offsets(emu, "cpu")


def test_emulated_ops_compile(emu_ops):
    """The schemas' alias annotations and the fakes hold up under torch.compile (functionalization of
    the mutated caches and outputs)."""
    D, bs = 32, 8
    kc, vc = torch.zeros(4, bs, 2, D), torch.zeros(4, bs, 2, D)
    k, v, q = torch.randn(5, 2, D), torch.randn(5, 2, D), torch.randn(1, 4, D)
    table = torch.tensor([[2, 0, 3, 1]], dtype=torch.int32)
    slots = torch.tensor([16, 17, 18, 19, 20])  # block 2, rows 0-4: positions 0-4 of the sequence
    lens = torch.tensor([5], dtype=torch.int32)
    cos, sin = torch.ones(8, D // 2), torch.zeros(8, D // 2)  # the identity rotation

    def step(q, k, v, kc, vc):
        emu_ops.paged_append(k, v, kc, vc, slots)
        q_rot = torch.empty_like(q)
        emu_ops.rotary_out(q, None, cos, sin, None, None, 0, False, False, q_rot, None)
        return emu_ops.paged_decode(q_rot, kc, vc, table, lens, 0.2, None, 2)[0]

    out = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, kc, vc)
    assert torch.equal(kc[2, :5], k) and torch.equal(vc[2, :5], v)  # the append reached the caller's cache
    ref = reference.paged_decode(q.double(), kc.double(), vc.double(), table, lens, softmax_scale=0.2)
    assert_parity(out, ref)


# ==================================================================================================
# The real kernels on a GPU, through the public API
# ==================================================================================================


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
    kc, vc, table, seq_lens = _to_paged(kd, vd, lens, bs)
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


def test_emulator_build_clears_a_stale_lock_file(tmp_path):
    # torch 2.11's extension builder waits forever while a `lock` file exists; one left by a killed
    # build (or by newer torch, which keeps it) must not hang the next run.
    from tests.cuda_emulator.build import _exclusive_build

    (tmp_path / "lock").write_text("")
    with _exclusive_build(str(tmp_path)):
        assert not (tmp_path / "lock").exists()
