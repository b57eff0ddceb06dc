"""paged_append and paged_decode: parity against float64, split-K, windows, the end-to-end cache loop,
torch.compile, CUDA graphs, dispatch and bad input.

On CPU the Triton kernels run in the interpreter (float16, float32, small grid); on a GPU the grid is
bigger and bfloat16 is added.
"""

import math

import pytest
import torch

import gptkernels
from gptkernels import PagedKVCache, paged_append, paged_decode, reference
from gptkernels._backend import BackendUnavailableError, unavailable_reason
from gptkernels._policy import MAX_SPLITS, MIN_SPLIT_TOKENS, decode_band, num_splits, sm_count
from tests.helpers import (DEVICE, DTYPES, ON_GPU, ROW_STRIDE, assert_parity, grid, huge_stride_views,
                           index_views, randn, requires_gpu)


def _paged_case(lens, hq, hkv, d, block_size, dtype, *, seed=0, extra_blocks=3, extra_cols=1):
    """Random caches whose blocks are handed out in a shuffled order; pad entries point at valid,
    unrelated blocks (they must never be read)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(need, default=0) + extra_cols
    table = torch.randint(0, num_blocks, (len(lens), max(width, 1)), generator=g, dtype=torch.int32)
    i = 0
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(perm[i:i + n], dtype=torch.int32)
        i += n
    kc = randn(num_blocks, block_size, hkv, d, dtype=dtype, generator=g)
    vc = randn(num_blocks, block_size, hkv, d, dtype=dtype, generator=g)
    q = randn(len(lens), hq, d, dtype=dtype, generator=g)
    return q, kc, vc, table.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def _check_decode(q, kc, vc, table, lens, **kw):
    out, lse = paged_decode(q, kc, vc, table, lens, return_lse=True, **kw)
    kw.pop("num_splits", None)
    kw.pop("backend", None)
    ref, ref_lse = reference.paged_decode(q.double(), kc.double(), vc.double(), table, lens,
                                          return_lse=True, **kw)
    base, base_lse = reference.paged_decode(q, kc, vc, table, lens, upcast=False, return_lse=True, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    assert_parity(out, ref, base)
    assert_parity(lse, ref_lse, base_lse, name="lse")
    return out, lse


# --------------------------------------------------------------------------------------------------
# decode parity
# --------------------------------------------------------------------------------------------------

# (block_size, group, head_dim): every block size, group and head dim of the issue appears; on the
# GPU every block size meets every group (the head dims rotate, to bound the compile time).
_SHAPES = grid(
    [(8, 1, 64), (16, 2, 80), (64, 4, 128), (256, 8, 64), (16, 8, 80), (8, 4, 128)],
    [(bs, g, (64, 80, 128)[(i + j) % 3]) for i, bs in enumerate((8, 16, 64, 256))
     for j, g in enumerate((1, 2, 4, 8))],
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size, group, head_dim", _SHAPES)
def test_decode_parity(block_size, group, head_dim, dtype):
    hkv = 2 if group < 8 else 1
    lens = grid([1, 17, 97, 130], [1, 17, 97, 130, 1000, 4099])
    case = _paged_case(lens, hkv * group, hkv, head_dim, block_size, dtype, seed=block_size + group + head_dim)
    _check_decode(*case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_long_context(dtype):
    """A few thousand keys: the split heuristic splits (also on CPU: 16 nominal SMs) and matches."""
    lens = grid([2903], [2903, 31001])
    case = _paged_case(lens, 8, 2, 64, 64, dtype, seed=5)
    assert num_splits(len(lens) * 2, case[3].shape[1] * 64, sm_count(case[0].device)) > 1
    _check_decode(*case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [1, 7, 40, 1000])
@pytest.mark.parametrize("block_size", grid([8, 64], [8, 16, 64, 256]))
def test_decode_window(window, block_size, dtype):
    lens = grid([1, 5, 41, 150], [1, 5, 41, 150, 2000])
    case = _paged_case(lens, 4, 2, 80, block_size, dtype, seed=window)
    for splits in (1, 3):
        _check_decode(*case, window=window, num_splits=splits, softmax_scale=0.3)


def test_window_never_reads_blocks_outside_it():
    """Blocks wholly before the window may hold garbage (NaN), or even be outside the cache."""
    bs = 8
    q, kc, vc, table, lens = _paged_case([100, 61], 4, 2, 64, bs, torch.float32, seed=3)
    window = 20
    ref = reference.paged_decode(q.double(), kc.double(), vc.double(), table, lens, window=window)
    for b, n in enumerate(lens.tolist()):
        first_needed = (n - window) // bs
        kc[table[b, :first_needed].long()] = float("nan")
        vc[table[b, :first_needed].long()] = float("nan")
        table[b, :first_needed] = -12345  # unreadable: would be out of bounds
    for splits in (1, 4):
        out = paged_decode(q, kc, vc, table, lens, window=window, num_splits=splits)
        assert_parity(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_and_unsplit_agree(dtype):
    lens = [1, 40, 0, 517]
    q, kc, vc, table, lens_t = _paged_case(lens, 4, 1, 64, 16, dtype, seed=11)
    outs = {s: _check_decode(q, kc, vc, table, lens_t, num_splits=s) for s in (1, 2, 11)}
    for s in (2, 11):  # 11 splits: most have no tile at all for the short sequences
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(outs[s][0].float(), outs[1][0].float(), rtol=tol, atol=tol)
        torch.testing.assert_close(outs[s][1], outs[1][1], rtol=1e-4, atol=1e-4)
    for s in (1, 11):  # the empty sequence: zeros and lse -inf on both paths
        assert torch.equal(outs[s][0][2], torch.zeros_like(outs[s][0][2]))
        assert bool(torch.isneginf(outs[s][1][2]).all())


def test_decode_empty_batch():
    q, kc, vc, _, _ = _paged_case([3], 4, 2, 64, 8, torch.float32)
    out, lse = paged_decode(q[:0], kc, vc, torch.zeros(0, 2, dtype=torch.int32, device=DEVICE),
                            torch.zeros(0, dtype=torch.int32, device=DEVICE), return_lse=True)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


def test_decode_strided_q():
    """q a slice of a fused qkv projection: any strides, no copies needed by the caller."""
    q, kc, vc, table, lens = _paged_case([9, 70], 4, 2, 64, 16, torch.float32, seed=2)
    qkv = randn(2, 3 * 4, 64)
    qs = qkv[:, 4:8]
    qs.copy_(q)
    assert not qs.is_contiguous()
    torch.testing.assert_close(paged_decode(qs, kc, vc, table, lens), paged_decode(q, kc, vc, table, lens),
                               rtol=0, atol=0)


def test_split_policy():
    sms = 132
    assert num_splits(64 * 8, 4096, sms) == 1  # 512 programs fill an H100 by themselves
    s = num_splits(8, 128 * 1024, sms)
    assert 1 < s <= MAX_SPLITS and 8 * s >= 2 * sms  # batch 1, 128k: split until the GPU is full
    assert num_splits(8, 1000, sms) == 1  # too short to be worth a split
    assert num_splits(1, 10 ** 7, sms) == min(2 * sms, MAX_SPLITS)
    assert num_splits(8, 128 * 1024, sms) <= 128 * 1024 // MIN_SPLIT_TOKENS
    for b in (1, 2, 4, 8, 16, 32):  # fewer splits as the batch grows
        assert num_splits(2 * b * 8, 32768, sms) <= num_splits(b * 8, 32768, sms)
    # a sliding window bounds the keys a row sees: a 128k table with a 1k window is a 1k band
    assert decode_band(128 * 1024, 1024) == 1024 and decode_band(128 * 1024, None) == 128 * 1024
    assert decode_band(100, 1024, query_rows=16) == 100 and decode_band(4096, 1024, query_rows=16) == 1039
    assert num_splits(8, decode_band(128 * 1024, 1024), sms) <= 2


# --------------------------------------------------------------------------------------------------
# softcap and ALiBi (issue 19 items 1-2; semantics: gptkernels/reference.py)
# --------------------------------------------------------------------------------------------------


def _slopes(kind, batch, hq, seed=0):
    """ALiBi slopes: None, (Hq,) (the geometric sequence of the ALiBi paper, 2**(-8 i / Hq)) or
    (B, Hq) random (as a transposed, non-contiguous view)."""
    if kind is None:
        return None
    if kind == "heads":
        return (2.0 ** (-8.0 * torch.arange(1, hq + 1) / hq)).to(DEVICE)
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(hq, batch, generator=g) * 0.5).to(DEVICE).t()


_MODIFIERS = [(None, "heads"), (5.0, None), (1.0, "batch"), (30.0, "heads")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap, alibi", _MODIFIERS)
@pytest.mark.parametrize("group", grid([1, 4], [1, 2, 4, 8]))
def test_decode_softcap_alibi_parity(softcap, alibi, group, dtype):
    hkv = 2
    lens = grid([1, 20, 150], [1, 20, 150, 1000, 4099])
    q, kc, vc, table, lens_t = _paged_case(lens, hkv * group, hkv, 64, 16, dtype, seed=group)
    slopes = _slopes(alibi, len(lens), hkv * group, seed=group)
    for window, splits in ((None, 3), (9, 1)):  # split-K; a window, unsplit
        _check_decode(q, kc, vc, table, lens_t, softcap=softcap, alibi_slopes=slopes, window=window,
                      num_splits=splits, softmax_scale=0.3)
        torch_out = paged_decode(q, kc, vc, table, lens_t, softcap=softcap, alibi_slopes=slopes, window=window,
                                 softmax_scale=0.3, backend="torch")
        ref = reference.paged_decode(q.double(), kc.double(), vc.double(), table, lens_t, softcap=softcap,
                                     alibi_slopes=slopes, window=window, softmax_scale=0.3)
        assert_parity(torch_out, ref, reference.paged_decode(
            q, kc, vc, table, lens_t, softcap=softcap, alibi_slopes=slopes, window=window, softmax_scale=0.3,
            upcast=False))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_softcap_alibi_convention(backend):
    """The convention written out by hand, independently of reference.py: s = scale * q.k, then
    softcap * tanh(s / softcap), then - slope * (L - 1 - j) (FlashAttention's -slope * |i + Sk - Sq - j|
    with one query row; vLLM's slope * (j - L + 1)), then softmax."""
    q, kc, vc, table, lens = _paged_case([13, 6], 4, 2, 32, 8, torch.float32, seed=7)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device=DEVICE)
    cap, scale = 2.0, 0.4
    out, lse = paged_decode(q, kc, vc, table, lens, softmax_scale=scale, softcap=cap, alibi_slopes=slopes,
                            return_lse=True, backend=backend)
    for b, n in enumerate(lens.tolist()):
        K = reference.gather_paged(kc, table[b], n).double().cpu()
        V = reference.gather_paged(vc, table[b], n).double().cpu()
        for h in range(4):
            s = scale * (K[:, h // 2] @ q[b, h].double().cpu())
            s = cap * torch.tanh(s / cap) - float(slopes[h]) * (n - 1 - torch.arange(n, dtype=torch.float64))
            p = torch.softmax(s, 0)
            torch.testing.assert_close(out[b, h].double().cpu(), p @ V[:, h // 2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse[b, h].double().cpu(), torch.logsumexp(s, 0), rtol=1e-5, atol=1e-5)
    # the reference's building blocks state FlashAttention's formula
    pos_q, pos_k = torch.tensor([2, 5]), torch.arange(6)
    bias = reference.alibi_bias(torch.tensor([0.5]), pos_q, pos_k, torch.float64)
    assert torch.equal(bias[0], -0.5 * (pos_q[:, None] - pos_k[None, :]).abs().double())
    x = torch.tensor([-100.0, -1.0, 0.0, 3.0, 100.0], dtype=torch.float64)
    assert torch.equal(reference.softcap_scores(x, 4.0), 4.0 * torch.tanh(x / 4.0))
    assert reference.softcap_scores(x, None) is x


def test_alibi_slopes_of_any_strides_and_fp8():
    """(B, Hq) slopes as a transposed view and (Hq,) as a strided one read like their contiguous
    copies; softcap and ALiBi over an fp8 cache."""
    q, kc, vc, table, lens = _paged_case([33, 7, 60], 8, 2, 64, 8, torch.float32, seed=8)
    batch_slopes = _slopes("batch", 3, 8, seed=1)
    head_slopes = torch.stack([_slopes("heads", 3, 8), torch.zeros(8, device=DEVICE)], 1)[:, 0]
    assert not batch_slopes.is_contiguous() and not head_slopes.is_contiguous()
    for slopes in (batch_slopes, head_slopes):
        got = paged_decode(q, kc, vc, table, lens, alibi_slopes=slopes, softcap=3.0, num_splits=2)
        want = paged_decode(q, kc, vc, table, lens, alibi_slopes=slopes.contiguous(), softcap=3.0, num_splits=2)
        assert torch.equal(got, want)
    scales = dict(k_scale=torch.tensor([0.01, 0.02], device=DEVICE), v_scale=torch.tensor(0.01, device=DEVICE))
    k8, v8 = reference.quantize_fp8(kc, scales["k_scale"]), reference.quantize_fp8(vc, scales["v_scale"])
    _check_decode(q, k8, v8, table, lens, alibi_slopes=batch_slopes, softcap=3.0, num_splits=3, **scales)


@pytest.mark.parametrize("over, exc, match", [
    (dict(softcap=0.0), ValueError, "paged_decode: softcap must be None or a finite float > 0"),
    (dict(softcap=-1.0), ValueError, "softcap must be None or a finite float > 0"),
    (dict(softcap=float("nan")), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(softcap="30"), TypeError, "paged_decode: softcap must be None or a float"),
    (dict(softcap=True), TypeError, "softcap"),
    (dict(alibi_slopes=lambda a: torch.ones(4, device=DEVICE, dtype=torch.float16)), TypeError,
     "paged_decode: alibi_slopes must have dtype float32"),
    (dict(alibi_slopes=lambda a: torch.ones(5, device=DEVICE)), ValueError,
     r"paged_decode: alibi_slopes must be shaped \(Hq,\) = \(4,\) or \(B, Hq\) = \(2, 4\)"),
    (dict(alibi_slopes=lambda a: torch.ones(2, 4, 1, device=DEVICE)), ValueError, "alibi_slopes must be shaped"),
    (dict(alibi_slopes=lambda a: torch.ones(3, 4, device=DEVICE)), ValueError, "alibi_slopes must be shaped"),
    (dict(alibi_slopes=lambda a: torch.ones(4, device="meta")), ValueError, "alibi_slopes must be on the same device"),
    (dict(alibi_slopes=[0.5] * 4), TypeError, "alibi_slopes must be a torch.Tensor"),
])
def test_softcap_alibi_bad_input(over, exc, match):
    args, kwargs = _decode_args(**over)
    with pytest.raises(exc, match=match):
        paged_decode(**args, **kwargs)
    with pytest.raises(exc, match=match):
        paged_decode(**args, **kwargs, backend="torch")


def test_cuda_backend_refuses_softcap_and_alibi():
    from gptkernels import cuda as cuda_backend

    q, kc, vc, table, lens = _paged_case([5, 9], 4, 2, 64, 8, torch.float32)
    for kw, name in ((dict(softcap=5.0), "softcap"), (dict(alibi_slopes=torch.ones(4, device=DEVICE)), "alibi_slopes")):
        with pytest.raises(BackendUnavailableError, match=f"paged_decode: backend 'cuda' cannot serve this call: "
                                                          f"no CUDA kernel for {name}"):
            cuda_backend.paged_decode(q, kc, vc, table, lens, softmax_scale=0.125, window=None, num_splits=1, **kw)


def test_torch_compile_decode_with_options():
    """fp8 scales, softcap and ALiBi go through the torch.library op (fake implementation included)."""
    torch._dynamo.reset()
    q, kc, vc, table, lens = _paged_case([30, 7], 4, 2, 64, 16, torch.float32, seed=2)
    scales = dict(k_scale=torch.tensor([0.01, 0.02], device=DEVICE), v_scale=torch.tensor(0.01, device=DEVICE))
    k8, v8 = reference.quantize_fp8(kc, scales["k_scale"]), reference.quantize_fp8(vc, scales["v_scale"])
    slopes = _slopes("heads", 2, 4)

    def step(q, kc, vc, table, lens, k_scale, v_scale, slopes):
        return paged_decode(q, kc, vc, table, lens, k_scale=k_scale, v_scale=v_scale, softcap=4.0,
                            alibi_slopes=slopes, return_lse=True)

    want = step(q, k8, v8, table, lens, scales["k_scale"], scales["v_scale"], slopes)
    compiled = torch.compile(step, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    got = compiled(q, k8, v8, table, lens, scales["k_scale"], scales["v_scale"], slopes)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# page sizes 1 to 1024 (issue 19 item 7) on every paged path
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 4, 512, 1024])
def test_page_sizes(block_size, dtype):
    lens = [1, 37, block_size + 6] if block_size >= 512 else [1, 37, 130]  # a second page of the long one
    q, kc, vc, table, lens_t = _paged_case(lens, 4, 2, 32, block_size, dtype, seed=block_size, extra_blocks=1)
    for splits in (None, 3):  # decode, unsplit and split-K
        _check_decode(q, kc, vc, table, lens_t, num_splits=splits)
    _check_decode(q, kc, vc, table, lens_t, window=5, backend="torch")
    # append: slots across pages, -1 skipped
    g = torch.Generator().manual_seed(block_size)
    slots = torch.randperm(kc.shape[0] * block_size, generator=g)[:9].to(DEVICE)
    slots[2] = -1
    k, v = randn(9, 2, 32, dtype=dtype, generator=g), randn(9, 2, 32, dtype=dtype, generator=g)
    got_k, got_v, want_k, want_v = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    paged_append(k, v, got_k, got_v, slots)
    reference.paged_append(k, v, want_k, want_v, slots)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    # paged flash_attn (chunked prefill over the cache: 3 query rows per sequence), both backends
    qs = randn(3, 3, 4, 32, dtype=dtype, generator=g)
    ref = reference.attention(qs.double(), kc.double(), vc.double(), block_table=table, seqlens_k=lens_t)
    base = reference.attention(qs, kc, vc, block_table=table, seqlens_k=lens_t, upcast=False)
    for backend in ("triton", "torch"):
        assert_parity(gptkernels.flash_attn(qs, kc, vc, block_table=table, seqlens_k=lens_t, backend=backend),
                      ref, base)


@pytest.mark.parametrize("block_size", [1, 1024])
def test_page_sizes_through_the_manager(block_size):
    dtype = DTYPES[0]
    cache = PagedKVCache(1, 1200 // block_size + 2, block_size, 2, 32, dtype=dtype, device=DEVICE)
    slots = cache.reserve([0, 1], [40, 3])
    k, v = randn(43, 2, 32, dtype=dtype), randn(43, 2, 32, dtype=dtype)
    paged_append(k, v, cache.k_cache[0], cache.v_cache[0], slots)
    q = randn(2, 4, 32, dtype=dtype)
    out = paged_decode(q, cache.k_cache[0], cache.v_cache[0], cache.block_table([0, 1]), cache.seq_lens([0, 1]))
    for b, (lo, hi) in enumerate(((0, 40), (40, 43))):
        K, V = k[lo:hi][None], v[lo:hi][None]
        ref = reference.attention(q[b][None, None].double(), K.double(), V.double())[0, 0]
        base = reference.attention(q[b][None, None], K, V, upcast=False)[0, 0]
        assert_parity(out[b], ref, base)


@pytest.mark.parametrize("block_size", [3, 12, 2048])
def test_page_size_not_a_power_of_two_from_1_to_1024(block_size):
    kc, vc = randn(2, block_size, 2, 16), randn(2, block_size, 2, 16)
    q, table, lens = randn(1, 2, 16), torch.zeros(1, 1, dtype=torch.int32, device=DEVICE), torch.ones(1, dtype=torch.int32, device=DEVICE)
    match = rf"the block size of .* must be a power of two from 1 to 1024, got {block_size}"
    with pytest.raises(ValueError, match="paged_decode: " + match):
        paged_decode(q, kc, vc, table, lens)
    with pytest.raises(ValueError, match="paged_append: " + match):
        paged_append(randn(1, 2, 16), randn(1, 2, 16), kc, vc, torch.zeros(1, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="flash_attn: " + match):
        gptkernels.flash_attn(q[:, None], kc, vc, block_table=table, seqlens_k=lens)
    with pytest.raises(ValueError, match=r"PagedKVCache: the block size of the cache \(block_size\)"):
        PagedKVCache(1, 2, block_size, 2, 16, device=DEVICE)


# --------------------------------------------------------------------------------------------------
# append
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size, hkv, d", [(8, 2, 80), (16, 3, 64), (256, 1, 128)])
def test_append_writes_slots_and_skips(block_size, hkv, d, dtype):
    g = torch.Generator().manual_seed(block_size)
    num_blocks, T = 5, 37
    kc, vc = randn(num_blocks, block_size, hkv, d, dtype=dtype, generator=g), randn(num_blocks, block_size, hkv, d, dtype=dtype, generator=g)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[::4] = -1  # padding tokens: skipped
    slots = slots.to(DEVICE)
    k, v = randn(T, hkv, d, dtype=dtype, generator=g), randn(T, hkv, d, dtype=dtype, generator=g)
    want_k, want_v = kc.clone(), vc.clone()
    reference.paged_append(k, v, want_k, want_v, slots)
    paged_append(k, v, kc, vc, slots)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)  # written exactly, the rest untouched


def test_append_strided_inputs_and_empty():
    kc, vc = randn(4, 8, 2, 64), randn(4, 8, 2, 64)
    qkv = randn(11, 3, 2, 64)
    k, v = qkv[:, 1], qkv[:, 2]  # a fused projection's slices
    slots = torch.arange(3, 14, device=DEVICE)
    paged_append(k, v, kc, vc, slots)
    torch.testing.assert_close(kc.view(-1, 2, 64)[3:14], k, rtol=0, atol=0)
    torch.testing.assert_close(vc.view(-1, 2, 64)[3:14], v, rtol=0, atol=0)
    before = kc.clone()
    paged_append(k[:0], v[:0], kc, vc, slots[:0])
    assert torch.equal(kc, before)


def test_append_out_of_cache_slots_are_dropped(monkeypatch):
    kc, vc = randn(2, 8, 1, 16), randn(2, 8, 1, 16)
    k, v = randn(4, 1, 16), randn(4, 1, 16)
    slots = torch.tensor([3, 16, -7, 10 ** 9], device=DEVICE)
    before_k, before_v = kc.clone(), vc.clone()
    paged_append(k, v, kc, vc, slots)  # unchecked: only the slot inside the cache is written
    before_k.view(-1, 1, 16)[3] = k[0]
    before_v.view(-1, 1, 16)[3] = v[0]
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)
    monkeypatch.setenv("GPTKERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match=r"slot_mapping\[1\] = 16"):
        paged_append(k, v, kc, vc, slots)
    with pytest.raises(ValueError, match="same slot twice"):
        paged_append(k[:2], v[:2], kc, vc, torch.tensor([5, 5], device=DEVICE))


def test_decode_out_of_cache_blocks(monkeypatch):
    q, kc, vc, table, lens = _paged_case([20, 30], 2, 1, 64, 8, torch.float32, seed=4)
    table[1, 2] = 10 ** 6
    table[1, 1] = -3
    lens[0] = 3001  # longer than its block table row can hold
    out, lse = paged_decode(q, kc, vc, table, lens, return_lse=True)  # unchecked: no crash, finite
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    monkeypatch.setenv("GPTKERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match=r"seq_lens\[0\] = 3001 \(sequence 0\)"):
        paged_decode(q, kc, vc, table, lens)
    lens[0] = 20
    with pytest.raises(ValueError, match=r"block_table\[1\] \(sequence 1\) points outside"):
        paged_decode(q, kc, vc, table, lens)


# --------------------------------------------------------------------------------------------------
# index tensors of any strides (the kernels read them as the torch backend does)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("view", ["strided", "transposed", "expanded"])
@pytest.mark.parametrize("tensor", ["seq_lens", "block_table"])
def test_decode_index_tensors_of_any_strides(tensor, view, backend):
    # The junk between the elements is a valid length / block: read as contiguous, it gives a
    # plausible wrong answer rather than a crash.
    q, kc, vc, table, lens = _paged_case([20, 9, 31], 4, 2, 32, 8, torch.float32, seed=5)
    args = {"block_table": table, "seq_lens": lens}
    args[tensor] = index_views(args[tensor], junk=33 if tensor == "seq_lens" else 1)[view]
    got = paged_decode(q, kc, vc, **args, num_splits=2, return_lse=True, backend=backend)
    contig = {name: t.contiguous() for name, t in args.items()}
    want = paged_decode(q, kc, vc, **contig, num_splits=2, return_lse=True, backend=backend)
    ref = paged_decode(q, kc, vc, **contig, return_lse=True, backend="torch")
    for g, w, r in zip(got, want, ref):
        assert torch.equal(g, w)
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("view", ["strided", "transposed", "expanded"])
def test_append_slot_mapping_of_any_strides(view, backend):
    kc, vc = randn(4, 8, 2, 16), randn(4, 8, 2, 16)
    k, v = randn(6, 2, 16), randn(6, 2, 16)
    slots = torch.tensor([9, -1, 0, 31, 17, 4], device=DEVICE)
    slots = index_views(slots, junk=20)[view]
    if view == "expanded":  # every token writes slot 9: give them the same values (no race)
        k, v = k[:1].expand_as(k), v[:1].expand_as(v)
    got_k, got_v, want_k, want_v = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    paged_append(k, v, got_k, got_v, slots, backend=backend)
    reference.paged_append(k, v, want_k, want_v, slots.contiguous())
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


# --------------------------------------------------------------------------------------------------
# the cache loop end to end
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [8, 64])
def test_end_to_end_reserve_append_decode(block_size, dtype):
    """Prefill chunks and decode steps for several sequences, a fork and a free, against attention on
    the dense history each sequence has seen."""
    hq, hkv, d, layers = 4, 2, 64, 2
    cache = PagedKVCache(layers, 40, block_size, hkv, d, dtype=dtype, device=DEVICE)
    g = torch.Generator().manual_seed(block_size)
    hist = {}  # seq -> per layer (k list, v list) of (Hkv, D) rows

    def step(seq_ids, counts, window=None):
        slots = cache.reserve(seq_ids, counts)
        T = sum(counts)
        for layer in range(layers):
            k = randn(T, hkv, d, dtype=dtype, generator=g)
            v = randn(T, hkv, d, dtype=dtype, generator=g)
            paged_append(k, v, cache.k_cache[layer], cache.v_cache[layer], slots)
            i = 0
            for sid, n in zip(seq_ids, counts):
                ks, vs = hist.setdefault(sid, [([], []) for _ in range(layers)])[layer]
                ks.extend(k[i:i + n])
                vs.extend(v[i:i + n])
                i += n
        live = list(hist)
        table = cache.block_table(live, max_blocks=12)  # fixed width, as for CUDA graphs
        lens = cache.seq_lens(live)
        q = randn(len(live), hq, d, dtype=dtype, generator=g)
        for layer in range(layers):
            out = paged_decode(q, cache.k_cache[layer], cache.v_cache[layer], table, lens, window=window)
            for b, sid in enumerate(live):
                ks, vs = hist[sid][layer]
                K, V = torch.stack(ks)[None], torch.stack(vs)[None]
                qb = q[b][None, None]
                ref = reference.attention(qb.double(), K.double(), V.double(), window=window)[0, 0]
                base = reference.attention(qb, K, V, window=window, upcast=False)[0, 0]
                assert_parity(out[b], ref, base, name=f"seq {sid} layer {layer}")

    step([0, 1, 2], [37, 5, 64])       # prefill
    step([0, 1, 2], [1, 1, 1])         # decode
    cache.fork(1, 3)                   # a beam shares seq 1's prefix (copy-on-write of its last block)
    hist[3] = [([*ks], [*vs]) for ks, vs in hist[1]]
    step([1, 3, 0], [1, 2, 1], window=9)
    cache.free(2)
    del hist[2]
    step([4, 0, 1, 3], [23, 1, 1, 1])  # a new sequence takes the freed blocks
    step([0, 1, 3, 4], [1, 1, 1, 1])


# --------------------------------------------------------------------------------------------------
# torch.compile, CUDA graphs, dispatch
# --------------------------------------------------------------------------------------------------


def test_torch_compile_decode_step():
    torch._dynamo.reset()
    dtype = torch.float16 if ON_GPU else torch.float32
    cache = PagedKVCache(1, 16, 16, 2, 64, dtype=dtype, device=DEVICE)
    cache.reserve([0, 1], [30, 7])
    paged_append(randn(37, 2, 64, dtype=dtype), randn(37, 2, 64, dtype=dtype),
                 cache.k_cache[0], cache.v_cache[0], torch.arange(37, device=DEVICE))
    slots = cache.reserve([0, 1], [1, 1])
    table, lens = cache.block_table([0, 1], max_blocks=4), cache.seq_lens([0, 1])
    q, k, v = randn(2, 4, 64, dtype=dtype), randn(2, 2, 64, dtype=dtype), randn(2, 2, 64, dtype=dtype)

    def decode_step(q, k, v, kc, vc, slots, table, lens):
        paged_append(k, v, kc, vc, slots)
        return paged_decode(q, kc, vc, table, lens, return_lse=True)

    kc2, vc2 = cache.k_cache[0].clone(), cache.v_cache[0].clone()
    want = decode_step(q, k, v, kc2, vc2, slots, table, lens)
    compiled = torch.compile(decode_step, fullgraph=True, backend="inductor" if ON_GPU else "aot_eager")
    got = compiled(q, k, v, cache.k_cache[0], cache.v_cache[0], slots, table, lens)
    assert torch.equal(cache.k_cache[0], kc2) and torch.equal(cache.v_cache[0], vc2)  # the append happened
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


@requires_gpu
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_cuda_graph_capture_and_replay(num_splits):
    dtype = torch.bfloat16
    cache = PagedKVCache(1, 64, 16, 2, 128, dtype=dtype, device="cuda")
    prefill = cache.reserve([0, 1, 2], [100, 3, 300])
    paged_append(randn(403, 2, 128, dtype=dtype), randn(403, 2, 128, dtype=dtype),
                 cache.k_cache[0], cache.v_cache[0], prefill)
    static = dict(q=randn(3, 8, 128, dtype=dtype), k=randn(3, 2, 128, dtype=dtype), v=randn(3, 2, 128, dtype=dtype),
                  slots=cache.reserve([0, 1, 2], [1, 1, 1]), table=cache.block_table([0, 1, 2], max_blocks=32),
                  lens=cache.seq_lens([0, 1, 2]))

    def step():
        paged_append(static["k"], static["v"], cache.k_cache[0], cache.v_cache[0], static["slots"])
        return paged_decode(static["q"], cache.k_cache[0], cache.v_cache[0], static["table"], static["lens"],
                            num_splits=num_splits, return_lse=True)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up: autotuning and compilation happen outside the capture
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    for _ in range(3):  # next decode steps: new inputs copied into the static buffers, then replay
        static["q"].copy_(randn(3, 8, 128, dtype=dtype))
        static["k"].copy_(randn(3, 2, 128, dtype=dtype))
        static["v"].copy_(randn(3, 2, 128, dtype=dtype))
        static["slots"].copy_(cache.reserve([0, 1, 2], [1, 1, 1]))
        static["lens"].copy_(cache.seq_lens([0, 1, 2]))
        static["table"].copy_(cache.block_table([0, 1, 2], max_blocks=32))
        graph.replay()
        torch.cuda.synchronize()
        ref, ref_lse = reference.paged_decode(static["q"].double(), cache.k_cache[0].double(),
                                              cache.v_cache[0].double(), static["table"], static["lens"],
                                              return_lse=True)
        base, base_lse = reference.paged_decode(static["q"], cache.k_cache[0], cache.v_cache[0],
                                                static["table"], static["lens"], upcast=False, return_lse=True)
        assert_parity(out, ref, base)
        assert_parity(lse, ref_lse, base_lse, name="lse")


def test_dispatch(monkeypatch):
    from gptkernels import triton as triton_backend

    q, kc, vc, table, lens = _paged_case([5, 9], 4, 2, 64, 8, torch.float32)
    calls = []
    real = triton_backend.paged_decode
    monkeypatch.setattr(triton_backend, "paged_decode", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    paged_decode(q, kc, vc, table, lens)  # default: the Triton kernels (GPU, or the CPU interpreter)
    assert len(calls) == 1 and calls[0]["num_splits"] >= 1 and calls[0]["window"] is None
    paged_decode(q, kc, vc, table, lens, num_splits=3, window=4, softmax_scale=0.5)
    assert calls[1] == dict(softmax_scale=0.5, window=4, num_splits=3)
    out = paged_decode(q, kc, vc, table, lens, backend="torch")
    monkeypatch.setenv("GPTKERNELS_BACKEND", "torch")
    assert torch.equal(paged_decode(q, kc, vc, table, lens), out) and len(calls) == 2
    monkeypatch.delenv("GPTKERNELS_BACKEND")
    if unavailable_reason("cuda", q.device) is not None:
        with pytest.raises(BackendUnavailableError, match="cuda"):
            paged_decode(q, kc, vc, table, lens, backend="cuda")
        with pytest.raises(BackendUnavailableError, match="cuda"):
            paged_append(kc[0], vc[0], kc, vc, torch.arange(8, device=DEVICE), backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        paged_decode(q, kc, vc, table, lens, backend="tpu")
    # the torch backend is differentiable; the kernels say they are not
    qg = q.clone().requires_grad_()
    paged_decode(qg, kc, vc, table, lens, backend="torch").sum().backward()
    assert qg.grad is not None
    with pytest.raises(BackendUnavailableError, match="no_grad"):
        paged_decode(qg, kc, vc, table, lens, backend="triton")


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


def _decode_args(**over):
    q, kc, vc, table, lens = _paged_case([5, 9], 4, 2, 64, 8, torch.float32)
    args = dict(q=q, k_cache=kc, v_cache=vc, block_table=table, seq_lens=lens)
    kwargs = {}
    for name, val in over.items():
        (args if name in args else kwargs)[name] = val(args) if callable(val) else val
    return args, kwargs


@pytest.mark.parametrize("over, exc, match", [
    (dict(q=lambda a: a["q"][0]), ValueError, "q must have 3 dimensions"),
    (dict(q=lambda a: a["q"].half()), TypeError, "k_cache must have the same dtype as q"),
    (dict(q=lambda a: a["q"].int()), TypeError, "q must have dtype"),
    (dict(q=lambda a: a["q"][:, :3]), ValueError, "multiple of the number of heads of k_cache"),
    (dict(q=lambda a: a["q"][..., :32]), ValueError, "head dim"),
    (dict(q=lambda a: a["q"][:1]), ValueError, "block_table.shape"),
    (dict(k_cache=lambda a: a["k_cache"][:, :, :1]), ValueError, "same shape"),
    (dict(v_cache=lambda a: a["v_cache"].double()), TypeError, "v_cache"),
    (dict(k_cache=lambda a: a["k_cache"][:, :6], v_cache=lambda a: a["v_cache"][:, :6]), ValueError, "block size"),
    (dict(k_cache=lambda a: a["k_cache"][0]), ValueError, "k_cache must have 4 dimensions"),
    (dict(k_cache=lambda a: a["k_cache"].to("meta")), ValueError, "k_cache must be on q's device"),
    (dict(block_table=lambda a: a["block_table"].long()), TypeError, "block_table must have dtype int32"),
    (dict(block_table=lambda a: a["block_table"][0]), ValueError, "block_table must have 2 dimensions"),
    (dict(block_table=lambda a: a["block_table"][:1]), ValueError, "block_table.shape"),
    (dict(block_table=lambda a: a["block_table"][:, :0]), ValueError, "block_table must have at least one column"),
    (dict(block_table=lambda a: a["block_table"].to("meta")), ValueError, "block_table must be on the same device"),
    (dict(seq_lens=lambda a: a["seq_lens"].long()), TypeError, "seq_lens must have dtype int32"),
    (dict(seq_lens=lambda a: a["seq_lens"][:1]), ValueError, "seq_lens.shape"),
    (dict(window=0), ValueError, "window"),
    (dict(window=2.0), TypeError, "window"),
    (dict(num_splits=0), ValueError, "num_splits"),
    (dict(num_splits=1.5), TypeError, "num_splits"),
    (dict(softmax_scale="x"), TypeError, "softmax_scale"),
    (dict(return_lse=1), TypeError, "return_lse"),
])
def test_decode_bad_input(over, exc, match):
    args, kwargs = _decode_args(**over)
    with pytest.raises(exc, match=match):
        paged_decode(**args, **kwargs)


@pytest.mark.parametrize("case, exc, match", [
    ("k_ndim", ValueError, "k must have 3 dimensions"),
    ("kv_shape", ValueError, "k and v must have the same shape"),
    ("k_dtype", TypeError, "k_cache must have the same dtype as k"),
    ("heads", ValueError, r"k.shape\[1\]"),
    ("head_dim", ValueError, r"k.shape\[2\]"),
    ("slot_dtype", TypeError, "slot_mapping must have dtype int64"),
    ("slot_len", ValueError, r"slot_mapping.shape\[0\]"),
    ("slot_device", ValueError, "slot_mapping must be on the same device"),
    ("block_size", ValueError, "block size"),
    ("cache_shape", ValueError, "k_cache and v_cache must have the same shape"),
])
def test_append_bad_input(case, exc, match):
    kc, vc = randn(4, 8, 2, 16), randn(4, 8, 2, 16)
    k, v = randn(5, 2, 16), randn(5, 2, 16)
    slots = torch.arange(5, device=DEVICE)
    if case == "k_ndim":
        k = k[0]
    elif case == "kv_shape":
        v = v[:4]
    elif case == "k_dtype":
        k, v = k.half(), v.half()
    elif case == "heads":
        k, v = k[:, :1], v[:, :1]
    elif case == "head_dim":
        k, v = k[..., :8], v[..., :8]
    elif case == "slot_dtype":
        slots = slots.int()
    elif case == "slot_len":
        slots = slots[:3]
    elif case == "slot_device":
        slots = slots.to("meta")
    elif case == "block_size":
        kc, vc = randn(4, 12, 2, 16), randn(4, 12, 2, 16)
    elif case == "cache_shape":
        vc = vc[:3]
    with pytest.raises(exc, match=match):
        paged_append(k, v, kc, vc, slots)


# --------------------------------------------------------------------------------------------------
# Offsets past 2**31 (GPU review)
# --------------------------------------------------------------------------------------------------


def test_offsets_past_2_31():
    # q's batch stride and the head stride of head-major caches and of the new tokens just over
    # 2**30 elements (views of a huge, mostly untouched buffer): b * stride_b and h * stride_h pass
    # 2**31 and must be computed in int64; an int32 product wraps and reads/writes far outside.
    dtype = DTYPES[0]
    q0, kc0, vc0, table, lens = _paged_case([9, 40, 23], 6, 3, 64, 8, dtype, seed=5)
    q, kc, vc, k, v = huge_stride_views(dtype, (q0.shape, 0), (kc0.shape, 2), (vc0.shape, 2),
                                        ((5, 3, 64), 1), ((5, 3, 64), 1))
    for dst, src in ((q, q0), (kc, kc0), (vc, vc0)):
        dst.copy_(src)
    for qq, qq0 in ((q, q0), (q[:, ::2], q0[:, ::2])):  # GQA (tensor-core path) and one head per group
        for splits in (1, 3):
            got = paged_decode(qq, kc, vc, table, lens, num_splits=splits, return_lse=True, backend="triton")
            want = paged_decode(qq0, kc0, vc0, table, lens, num_splits=splits, return_lse=True, backend="triton")
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w)
    slots = torch.tensor([3, -1, 50, 17, 96], device=DEVICE)
    paged_append(k, v, kc, vc, slots, backend="triton")
    reference.paged_append(k.contiguous(), v.contiguous(), kc0, vc0, slots)
    assert torch.equal(kc.contiguous(), kc0) and torch.equal(vc.contiguous(), vc0)


def test_row_offsets_past_2_31():
    # Caches and new tokens whose token (row) stride passes 2**31 / 15 elements: the in-page row
    # times the row stride passes 2**31 from row 15 on and must be computed in int64.
    dtype = DTYPES[0]
    q, kc0, vc0, table, lens = _paged_case([9, 40, 23], 4, 2, 32, 16, dtype, seed=6)
    kc, vc, k, v = huge_stride_views(dtype, (kc0.shape, 1), (vc0.shape, 1), ((17, 2, 32), 0),
                                     ((17, 2, 32), 0), stride=ROW_STRIDE)
    kc.copy_(kc0)
    vc.copy_(vc0)
    for splits in (1, 3):
        got = paged_decode(q, kc, vc, table, lens, num_splits=splits, return_lse=True, backend="triton")
        want = paged_decode(q, kc0, vc0, table, lens, num_splits=splits, return_lse=True, backend="triton")
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
    slots = torch.arange(17, device=DEVICE) * 5
    paged_append(k, v, kc, vc, slots, backend="triton")
    reference.paged_append(k.contiguous(), v.contiguous(), kc0, vc0, slots)
    assert torch.equal(kc.contiguous(), kc0) and torch.equal(vc.contiguous(), vc0)


def test_num_splits_beyond_the_grid_limit(monkeypatch):
    # The splits are grid axis z, which CUDA caps at 65535: a larger forced num_splits is clamped
    # (lowered to 3 here so that the interpreter stays fast). The answer does not depend on it.
    from gptkernels.triton import paged as pg

    monkeypatch.setattr(pg, "MAX_GRID_Z", 3)
    grids = []
    kernel = pg._paged_decode_kernel.fn

    def recording(*args, _run=kernel.run, **kwargs):
        grids.append(kwargs["grid"])
        return _run(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", recording)
    q, kc, vc, table, lens = _paged_case([70, 5], 4, 2, 64, 8, torch.float32, seed=3)
    out, lse = _check_decode(q, kc, vc, table, lens, num_splits=100_000, backend="triton")
    assert grids == [(2, 2, 3)]
    one = paged_decode(q, kc, vc, table, lens, num_splits=1, return_lse=True, backend="triton")
    torch.testing.assert_close(out, one[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, one[1], rtol=1e-5, atol=1e-5)


def test_compiles_for_hopper():
    # The interpreter never runs Triton's compiler: prove, without a GPU, that the paged kernels
    # compile for sm_90a with the arguments their launchers pass (every autotune config of decode),
    # fit an H100's shared memory, do not spill, and lower as notes/paged.md says: 16-byte K/V loads
    # (ld.global.v4, or 16-byte cp.async copies on the pipelined tensor-core path of groups >= 2).
    from tools.sm90_compile import SM90_SHARED, compile_in_subprocess

    results = compile_in_subprocess("--kernels", "paged", "--all-configs", "--ptxas")
    assert {(r["kernel"], r["case"]["dtype"], r["case"].get("group")) for r in results} == {
        (kernel, dtype, group) for dtype in ("bf16", "fp16")
        for kernel, group in (("decode", 1), ("decode", 4), ("merge", 1), ("merge", 4), ("append", None))}
    for r in results:
        assert r["shared"] <= SM90_SHARED and r["spill"] == 0, r
        if r["kernel"] in ("append", "decode"):
            assert r["vec16"], r
        if r["kernel"] == "decode" and r["case"]["group"] > 1:
            assert r["tensor_cores"] in ("wgmma", "mma") and r["pipelined"], r
