"""The "cuda" backend's kernels on the CPU emulator (every machine): the csrc sources compiled for the
host by tests/cuda_emulator (every CUDA thread a CPU thread, ldmatrix / mma computed from the PTX ISA
definitions), run through gptkernels.cuda's launchers against the float64 reference with SPEC's
parity rule. This is what proves the kernels' index math without a GPU.

The emulator is built to show GPU-only bugs too (warps run one at a time, cp.async lands late or
early, shared memory poisoned, misaligned accesses / int overflow / bad launch configurations fail
the launch): its self-test kernels check each detector here, and offsets past 2^31 elements are
checked with lazily mapped 4 GiB buffers.
"""

from __future__ import annotations

import pytest
import torch

import gptkernels
from gptkernels import cuda as cuda_backend, reference
from gptkernels._policy import CPU_NOMINAL_SMS, decode_band
from gptkernels._policy import num_splits as policy_num_splits
from gptkernels._policy import softmax_scale as softmax_scale_default
from tests.cuda_cases import (ALL_DTYPES, HALF_DTYPES, check_64bit_cache_offsets, check_64bit_row_offsets,
                              check_append, check_decode, check_flash, check_rotary, cu_seqlens, flash_kw)
from tests.helpers import assert_parity, randn


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
    out, lse = emu.flash_attn_forward(q, k, v, **flash_kw(bottom_right=False, window=6))
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


# Page sizes at both ends of what the public ops accept (powers of two 1 to 1024, SPEC.md): the
# kernels find a key's page as key / block_size and its row as key % block_size (a slot's likewise),
# nothing tuned to a size. Page 1: every key on its own shuffled page; page 1024: a band and a split
# that cross a page boundary, and a short sequence whose page is mostly unused (NaN). One dtype: the
# index math does not depend on it.
EMU_PAGE_SIZES = [
    ("decode", dict(lens=[13, 1, 40], Hq=4, Hkv=2, D=32, block_size=1, num_splits=3)),
    ("decode", dict(lens=[1100, 5], Hq=4, Hkv=2, D=32, block_size=1024, window=700, num_splits=2)),
    ("flash", dict(Sq=5, lens_k=[33, 5, 70], Hq=2, Hkv=1, D=64, layout="paged", block_size=1)),
    ("flash", dict(lens_q=[3, 1, 9], lens_k=[40, 9, 9], Hq=2, Hkv=2, D=32, layout="paged_varlen", block_size=1)),
    ("flash", dict(Sq=17, lens_k=[1100, 17], Hq=2, Hkv=1, D=32, layout="paged", block_size=1024, window=300)),
    ("append", dict(T=37, Hkv=3, D=24, block_size=1)),
    ("append", dict(T=37, Hkv=3, D=24, block_size=1024)),
]


@pytest.mark.parametrize("case", range(len(EMU_PAGE_SIZES)),
                         ids=[f"{op}-page{kw['block_size']}" for op, kw in EMU_PAGE_SIZES])
def test_emulated_page_sizes_1_and_1024(emu, case):
    op, kw = EMU_PAGE_SIZES[case]
    if op == "decode":
        check_decode(_emu_decode(emu), "cpu", torch.float16, seed=case, **kw)
    elif op == "flash":
        check_flash(_emu_flash(emu), "cpu", torch.float16, seed=case, **kw)
    else:
        check_append(emu.paged_append, "cpu", torch.float16, seed=case, **kw)


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
# 64-bit offsets (the checks: tests/cuda_cases.py)
# --------------------------------------------------------------------------------------------------


def test_emulated_kernels_use_64bit_cache_offsets(emu):
    check_64bit_cache_offsets(emu, "cpu")


def test_emulated_kernels_use_64bit_row_offsets(emu):
    check_64bit_row_offsets(emu, "cpu")


# --------------------------------------------------------------------------------------------------
# The same answer as the triton and torch backends on every input the kernels accept (issue 11's
# rules): unchecked index values, understated max_seqlen_q, empty inputs
# --------------------------------------------------------------------------------------------------


def _decode_case(lens, rows, *, dtype, Hq=4, Hkv=2, D=16, block_size=8, num_blocks=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    kc = randn(num_blocks, block_size, Hkv, D, dtype=dtype, generator=g)
    vc = randn(num_blocks, block_size, Hkv, D, dtype=dtype, generator=g)
    q = randn(len(lens), Hq, D, dtype=dtype, generator=g)
    table = torch.tensor(rows, dtype=torch.int32)
    return q, kc, vc, table, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_emulated_paged_decode_seq_lens_past_the_table(emu, monkeypatch, dtype, window, num_splits):
    """seq_lens longer than the block table holds (3 blocks of 8 = 24 keys): the query stays at
    position L - 1, as given, and the keys past the table are missing (they contribute nothing), as
    vLLM / FlashAttention callers read seq_lens; it is not moved to the table's end. With window 5,
    L = 26 sees keys 21-23 only, L = 30 none, L = 27 keys 22 and 23 of a table with a bad entry
    before them. The triton and torch backends give the same answer."""
    monkeypatch.delenv("GPTKERNELS_DEBUG", raising=False)  # the debug checks refuse these lengths
    lens, rows = [26, 30, 27, 20], [[0, 1, 2], [3, 4, 5], [-1, 5, 3], [2, 0, 4]]
    q, kc, vc, table, seq_lens = _decode_case(lens, rows, dtype=dtype)
    out, lse = emu.paged_decode(q, kc, vc, table, seq_lens, softmax_scale=0.25, window=window,
                                num_splits=num_splits)
    r_out, r_lse = reference.paged_decode(q.double(), kc.double(), vc.double(), table, seq_lens,
                                          softmax_scale=0.25, window=window, return_lse=True)
    b_out, b_lse = reference.paged_decode(q, kc, vc, table, seq_lens, softmax_scale=0.25, window=window,
                                          upcast=False, return_lse=True)
    assert_parity(out, r_out, b_out)
    assert_parity(lse, r_lse, b_lse.float(), name="lse")
    if window is not None:  # what the query sees, spelled out: the masking rule, not the reference's code
        assert torch.isinf(lse[1]).all() and not out[1].any()  # L = 30: its window lies past the table
        clamped = reference.paged_decode(q.double(), kc.double(), vc.double(), table,
                                         seq_lens.clamp(max=24), softmax_scale=0.25, window=window)
        assert (out[0].double() - clamped[0]).abs().max() > 0.05  # not the window of a query moved to 23
    for backend in ("triton", "torch"):
        o, l_ = gptkernels.paged_decode(q, kc, vc, table, seq_lens, softmax_scale=0.25, window=window,
                                        num_splits=num_splits, return_lse=True, backend=backend)
        assert_parity(o, r_out, b_out, name=f"{backend} out")
        assert_parity(l_, r_lse, b_lse.float(), name=f"{backend} lse")


def test_emulated_flash_attn_clamps_unchecked_bounds(emu, monkeypatch):
    """cu_seqlens outside the tensors and seqlens_k outside [0, the table's capacity] are clamped
    (the kernels never read out of bounds), as the triton and torch backends clamp them: the same
    answer on all three, bottom-right alignment from the clamped lengths."""
    monkeypatch.delenv("GPTKERNELS_DEBUG", raising=False)
    torch.manual_seed(0)
    dt = torch.float16
    q, k, v = randn(20, 2, 32, dtype=dt), randn(30, 2, 32, dtype=dt), randn(30, 2, 32, dtype=dt)
    cu_q = torch.tensor([0, 15, 40], dtype=torch.int32)   # ends past Tq = 20
    cu_k = torch.tensor([-5, 25, 90], dtype=torch.int32)  # starts before 0, ends past Tk = 30
    varlen = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=40, max_seqlen_k=90)
    kc, vc = randn(5, 8, 2, 32, dtype=dt), randn(5, 8, 2, 32, dtype=dt)
    qp = randn(3, 4, 2, 32, dtype=dt)
    paged = dict(block_table=torch.tensor([[0, 1, 2], [3, 4, 1], [2, 7, -1]], dtype=torch.int32),
                 seqlens_k=torch.tensor([30, -4, 20], dtype=torch.int32))  # 30 > 3 x 8; -4 -> 0
    for args, kw in (((q, k, v), varlen), ((qp, kc, vc), paged)):
        out, lse = emu.flash_attn_forward(*args, **flash_kw(**kw))
        ref_kw = {n: t for n, t in kw.items() if not n.startswith("max_")}
        r_out, r_lse = reference.attention(*(t.double() for t in args), causal=True, softmax_scale=0.125,
                                           return_lse=True, **ref_kw)
        b_out, b_lse = reference.attention(*args, causal=True, softmax_scale=0.125, upcast=False,
                                           return_lse=True, **ref_kw)
        assert_parity(out, r_out, b_out)
        assert_parity(lse, r_lse, b_lse.float(), name="lse")
        t_out, t_lse = gptkernels.flash_attn(*args, softmax_scale=0.125, return_lse=True, backend="triton", **kw)
        assert_parity(t_out, r_out, b_out, name="triton out")
        assert_parity(t_lse, r_lse, b_lse.float(), name="triton lse")


@pytest.mark.parametrize("max_seqlen_q", [0, 1, 64, 200])
def test_emulated_flash_attn_understated_max_seqlen_q(emu, max_seqlen_q):
    """max_seqlen_q only sizes the grid: understated (0 included) or overstated, every row of every
    sequence is computed, bit for bit as with the exact value."""
    torch.manual_seed(0)
    lens_q, lens_k = [70, 130, 5], [70, 150, 9]
    q = randn(sum(lens_q), 2, 32, dtype=torch.float16)
    k, v = (randn(sum(lens_k), 1, 32, dtype=torch.float16) for _ in range(2))
    kw = flash_kw(cu_seqlens_q=cu_seqlens(lens_q, "cpu"), cu_seqlens_k=cu_seqlens(lens_k, "cpu"), max_seqlen_k=150,
                  window=40)
    want = emu.flash_attn_forward(q, k, v, **{**kw, "max_seqlen_q": 130})
    got = emu.flash_attn_forward(q, k, v, **{**kw, "max_seqlen_q": max_seqlen_q})
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ref_kw = dict(causal=True, window=40, softmax_scale=0.125, cu_seqlens_q=kw["cu_seqlens_q"],
                  cu_seqlens_k=kw["cu_seqlens_k"])
    ref = reference.attention(q.double(), k.double(), v.double(), **ref_kw)
    assert_parity(got[0], ref, reference.attention(q, k, v, upcast=False, **ref_kw))


def _empty_cases():
    """(name, public op call) for every empty input the ops accept: batch 0, no tokens, no keys."""
    dt, i32 = torch.float16, torch.int32
    z = lambda *shape: torch.zeros(shape, dtype=dt)  # noqa: E731
    r = lambda *shape: randn(*shape, dtype=dt)  # noqa: E731
    cu = lambda *v: torch.tensor(v, dtype=i32)  # noqa: E731
    cache = r(4, 8, 2, 32)
    cos, sin = gptkernels.rotary_cos_sin(32, 16, dtype=torch.float32)
    return [
        ("flash batch 0", lambda be: gptkernels.flash_attn(z(0, 5, 2, 32), z(0, 5, 2, 32), z(0, 5, 2, 32),
                                                           return_lse=True, backend=be)),
        ("flash Sq = 0", lambda be: gptkernels.flash_attn(z(2, 0, 2, 32), r(2, 5, 2, 32), r(2, 5, 2, 32),
                                                          return_lse=True, backend=be)),
        ("flash Sk = 0", lambda be: gptkernels.flash_attn(r(2, 5, 2, 32), z(2, 0, 2, 32), z(2, 0, 2, 32),
                                                          return_lse=True, backend=be)),
        ("flash Sk = 0 non-causal", lambda be: gptkernels.flash_attn(r(2, 5, 2, 32), z(2, 0, 1, 32), z(2, 0, 1, 32),
                                                                     causal=False, return_lse=True, backend=be)),
        ("sdpa L = 0", lambda be: (gptkernels.sdpa(z(2, 2, 0, 32), r(2, 2, 5, 32), r(2, 2, 5, 32),
                                                   is_causal=True, backend=be),)),
        ("sdpa S = 0", lambda be: (gptkernels.sdpa(r(2, 2, 5, 32), z(2, 2, 0, 32), z(2, 2, 0, 32), backend=be),)),
        ("varlen batch 0", lambda be: gptkernels.flash_attn(z(0, 2, 32), z(0, 2, 32), z(0, 2, 32), cu_seqlens_q=cu(0),
                                                            cu_seqlens_k=cu(0), max_seqlen_q=0, max_seqlen_k=0,
                                                            return_lse=True, backend=be)),
        ("varlen T = 0", lambda be: gptkernels.flash_attn(z(0, 2, 32), z(0, 2, 32), z(0, 2, 32), cu_seqlens_q=cu(0, 0),
                                                          cu_seqlens_k=cu(0, 0), max_seqlen_q=0, max_seqlen_k=0,
                                                          return_lse=True, backend=be)),
        ("varlen Tk = 0", lambda be: gptkernels.flash_attn(r(3, 2, 32), z(0, 2, 32), z(0, 2, 32), cu_seqlens_q=cu(0, 3),
                                                           cu_seqlens_k=cu(0, 0), max_seqlen_q=3, max_seqlen_k=0,
                                                           return_lse=True, backend=be)),
        ("paged batch 0", lambda be: gptkernels.flash_attn(z(0, 3, 2, 32), cache, cache,
                                                           block_table=torch.zeros(0, 2, dtype=i32),
                                                           seqlens_k=cu(), return_lse=True, backend=be)),
        ("paged no keys", lambda be: gptkernels.flash_attn(r(2, 3, 2, 32), cache, cache,
                                                           block_table=torch.zeros(2, 2, dtype=i32),
                                                           seqlens_k=cu(0, 0), return_lse=True, backend=be)),
        ("decode batch 0", lambda be: gptkernels.paged_decode(z(0, 2, 32), cache, cache, torch.zeros(0, 2, dtype=i32),
                                                              cu(), return_lse=True, backend=be)),
        ("rotary batch 0", lambda be: gptkernels.apply_rotary(z(0, 4, 2, 32), z(0, 4, 1, 32), cos, sin,
                                                              offset=torch.zeros(0, dtype=torch.int64), backend=be)),
        ("rotary S = 0", lambda be: gptkernels.apply_rotary(z(2, 0, 2, 32), None, cos, sin, offset=3, backend=be)[:1]),
        ("rotary T = 0", lambda be: gptkernels.apply_rotary(z(0, 2, 32), z(0, 1, 32), cos, sin,
                                                            positions=torch.zeros(0, dtype=torch.int64),
                                                            backend=be)),
    ]


@pytest.mark.parametrize("case", range(len(_empty_cases())))
def test_emulated_empty_inputs_as_the_other_backends(emu_ops, monkeypatch, case):
    """Empty inputs through the public ops with backend="cuda" (its launchers on the emulator):
    the same shapes and values (zeros, lse -inf where no key is seen) as the torch backend."""
    from gptkernels import _dispatch

    name, call = _empty_cases()[case]
    want = call("torch")
    monkeypatch.setattr(cuda_backend, "_OPS", emu_ops)
    # The public ops refuse backend="cuda" for CPU tensors: a "triton" call (accepted on CPU under
    # the interpreter) is routed to the cuda launchers instead, which run on the emulator.
    monkeypatch.setattr(_dispatch, "backend_module", lambda backend: cuda_backend)
    got = call("triton")
    for g, w in zip(got, want):
        assert (g is None) == (w is None), name
        if w is not None:
            assert g.shape == w.shape and g.dtype == w.dtype and torch.equal(g, w), name


def test_emulated_varlen_tokens_outside_cu_seqlens(emu):
    """Tokens past cu_seqlens_q[-1] belong to no sequence: out 0 and lse -inf, as on the other
    backends (the launcher zero-fills; no program writes them)."""
    cu = cu_seqlens([3, 2], "cpu")
    q, k, v = randn(9, 2, 32, dtype=torch.float16), randn(9, 1, 32, dtype=torch.float16), randn(9, 1, 32, dtype=torch.float16)
    out, lse = emu.flash_attn_forward(q, k, v, **flash_kw(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=3,
                                                          max_seqlen_k=3))
    assert torch.equal(out[5:], torch.zeros_like(out[5:])) and bool(torch.isneginf(lse[:, 5:]).all())


def test_emulated_paged_append_no_tokens(emu):
    kc = randn(2, 8, 1, 4, dtype=torch.float16)
    before = kc.clone()
    emu.paged_append(kc[0, :0], kc[0, :0], kc, kc, torch.zeros(0, dtype=torch.int64))
    assert torch.equal(kc, before)


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


def test_emulator_build_clears_a_stale_lock_file(tmp_path):
    # torch 2.11's extension builder waits forever while a `lock` file exists; one left by a killed
    # build (or by newer torch, which keeps it) must not hang the next run.
    from tests.cuda_emulator.build import _exclusive_build

    (tmp_path / "lock").write_text("")
    with _exclusive_build(str(tmp_path)):
        assert not (tmp_path / "lock").exists()
