"""fp8 (float8_e4m3fn) paged KV cache: quantization (value / scale, nearest even, saturated at +-448),
paged_append / paged_decode / paged flash_attn against float64 over the dequantized cache (GQA,
windows, block sizes, split-K), the block manager's scales and calibration, generate's
kv_cache_dtype, and bad input (issue 16).

On CPU the Triton kernels run in the interpreter (float16 and float32 queries); on a GPU bfloat16
is added and the grid grows.
"""

from __future__ import annotations

import pytest
import torch

import gptkernels
from gptkernels import PagedKVCache, flash_attn, paged_append, paged_decode, reference
from gptkernels._backend import BackendUnavailableError
from gptkernels.kv_cache import FP8_HEADROOM, fp8_scale
from tests.helpers import DEVICE, DTYPES, ON_GPU, assert_parity, grid, randn, requires_gpu

FP8 = torch.float8_e4m3fn


def _e4m3_values() -> torch.Tensor:
    """Every finite float8_e4m3fn value, sorted (from its 256 bit patterns)."""
    v = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    return v[torch.isfinite(v)].unique()


def _nearest_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Brute force: the e4m3 value nearest to each float64 x (ties to the even code), after saturating
    at +-448. Independent of torch's cast."""
    vals = _e4m3_values().double()
    x = x.double().clamp(-448, 448)
    dist = (x[:, None] - vals[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    ties = dist == best
    codes = vals.to(torch.float32).to(FP8).view(torch.uint8).to(torch.int64)
    even = ties & ((codes & 1) == 0)[None, :]  # of two nearest, the one with an even mantissa
    pick = torch.where(even.any(1), even.int().argmax(1), ties.int().argmax(1))
    return vals[pick]


def _tricky_values(seed=0) -> torch.Tensor:
    """Every e4m3 value, the midpoints between neighbours (ties) and their float32 neighbours, values
    past 448, subnormals, and random values of several magnitudes."""
    vals = _e4m3_values()
    mids = (vals[1:] + vals[:-1]) / 2
    big = torch.tensor(1e9)
    g = torch.Generator().manual_seed(seed)
    return torch.cat([vals, mids, torch.nextafter(mids, big), torch.nextafter(mids, -big),
                      torch.tensor([447.9, 448.0, 463.9, 464.0, 464.1, 500.0, 1e6, -1e6, 2.0**-10, 2.0**-12]),
                      torch.randn(2000, generator=g) * 100, torch.randn(2000, generator=g) * 0.01])


# --------------------------------------------------------------------------------------------------
# Quantization: the reference and the append kernel, bit for bit
# --------------------------------------------------------------------------------------------------


def test_reference_quantize_is_nearest_even_and_saturates():
    x = _tricky_values()
    got = reference.quantize_fp8(x[:, None, None], torch.tensor(1.0))[:, 0, 0].double()
    assert torch.equal(got, _nearest_e4m3(x))
    # per-head scales divide each head by its own scale
    xs = randn(7, 3, 5, scale=10.0, device="cpu")
    scale = torch.tensor([0.5, 2.0, 0.03])
    got = reference.quantize_fp8(xs, scale)
    want = _nearest_e4m3((xs / scale[:, None]).flatten()).view(xs.shape)
    assert torch.equal(got.double(), want)
    assert torch.equal(reference.dequantize_fp8(got, scale, torch.float64), want * scale.double()[:, None])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_head", [True, False])
def test_append_kernel_quantizes_like_the_reference(dtype, per_head):
    """The append kernel stores exactly the reference's bits: nearest even (ties included), +-448
    saturation, subnormals; skipped and out-of-cache slots untouched."""
    x = _tricky_values(seed=1)
    hkv, d, bs = 2, 16, 8
    rows = -(-x.numel() // (hkv * d))
    x = torch.cat([x, torch.zeros(rows * hkv * d - x.numel())]).view(rows, hkv, d)
    k = x.to(dtype).to(DEVICE)
    v = (-x).to(dtype).to(DEVICE)
    num_blocks = -(-rows // bs) + 2
    slots = torch.randperm(num_blocks * bs)[:rows].to(DEVICE)
    slots[3] = -1
    slots[5] = num_blocks * bs + 7  # outside the cache: dropped
    if per_head:
        k_scale = torch.tensor([1.0, 0.37], device=DEVICE)
        v_scale = torch.tensor([2.5, 0.001], device=DEVICE)
    else:
        k_scale, v_scale = torch.tensor(0.75, device=DEVICE), torch.tensor(1.0, device=DEVICE)
    caches = [torch.full((num_blocks, bs, hkv, d), 0.5, device=DEVICE).to(FP8) for _ in range(4)]
    paged_append(k, v, caches[0], caches[1], slots, k_scale=k_scale, v_scale=v_scale, backend="triton")
    paged_append(k, v, caches[2], caches[3], slots, k_scale=k_scale, v_scale=v_scale, backend="torch")
    assert torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))
    # ...and those bits are the nearest e4m3 value of k / scale (float32 division)
    kept = (slots >= 0) & (slots < num_blocks * bs)
    stored = caches[0].view(-1, hkv, d)[slots[kept]].double().cpu()
    ks = k_scale.cpu().float() if per_head else k_scale.cpu().float().expand(hkv)
    want = _nearest_e4m3((k[kept].cpu().float() / ks[:, None]).flatten()).view(stored.shape)
    assert torch.equal(stored, want)
    untouched = torch.ones(num_blocks * bs, dtype=torch.bool)
    untouched[slots[kept].cpu()] = False
    assert bool((caches[0].view(-1, hkv, d)[untouched.to(DEVICE)].float() == 0.5).all())


# --------------------------------------------------------------------------------------------------
# Decode and paged flash_attn vs float64 over the dequantized cache
# --------------------------------------------------------------------------------------------------


def _fp8_case(lens, hq, hkv, d, block_size, dtype, *, seed=0, per_head=True):
    """Random fp8 caches (blocks shuffled, pad entries pointing at unrelated blocks), scales that
    spread the values over e4m3's range, and a query."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    table = torch.randint(0, num_blocks, (len(lens), max(need, default=0) + 1), generator=g, dtype=torch.int32)
    i = 0
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(perm[i:i + n], dtype=torch.int32)
        i += n
    if per_head:
        k_scale = (torch.rand(hkv, generator=g) * 0.02 + 0.005).to(DEVICE)
        v_scale = (torch.rand(hkv, generator=g) * 0.02 + 0.005).to(DEVICE)
    else:
        k_scale, v_scale = torch.tensor(0.012, device=DEVICE), torch.tensor(0.007, device=DEVICE)
    kc = reference.quantize_fp8(randn(num_blocks, block_size, hkv, d, generator=g, scale=2.0), k_scale)
    vc = reference.quantize_fp8(randn(num_blocks, block_size, hkv, d, generator=g), v_scale)
    q = randn(len(lens), hq, d, dtype=dtype, generator=g)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    return q, kc, vc, table.to(DEVICE), lens_t, dict(k_scale=k_scale, v_scale=v_scale)


def _check_fp8_decode(q, kc, vc, table, lens, scales, **kw):
    out, lse = paged_decode(q, kc, vc, table, lens, return_lse=True, **scales, **kw)
    kw.pop("num_splits", None)
    kw.pop("backend", None)
    # float64 over the dequantized cache; the eager yardstick dequantizes in q's dtype
    ref, ref_lse = reference.paged_decode(q.double(), kc, vc, table, lens, return_lse=True, **scales, **kw)
    base, base_lse = reference.paged_decode(q, kc, vc, table, lens, upcast=False, return_lse=True, **scales, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_parity(out, ref, base)
    assert_parity(lse, ref_lse, base_lse, name="lse")
    return out, lse


_DECODE = grid(
    [(8, 1, 64, True), (16, 4, 80, False), (256, 2, 128, True)],
    [(bs, g, d, ph) for bs in (8, 16, 64, 256) for g, d, ph in ((1, 64, True), (4, 128, False), (8, 80, True))],
)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size, group, head_dim, per_head", _DECODE)
def test_decode_parity(block_size, group, head_dim, per_head, dtype):
    hkv = 2
    lens = grid([1, 19, 130], [1, 19, 130, 1000, 4099])
    case = _fp8_case(lens, hkv * group, hkv, head_dim, block_size, dtype, seed=block_size + group, per_head=per_head)
    for splits in (None, 3):
        _check_fp8_decode(*case, num_splits=splits)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [1, 50])
def test_decode_window_and_split(window, dtype):
    case = _fp8_case(grid([3, 40, 150], [3, 40, 150, 2000]), 8, 2, 64, 16, dtype, seed=window)
    for splits in (1, 4):
        _check_fp8_decode(*case, window=window, num_splits=splits, softmax_scale=0.2)


def test_decode_long_context_splits():
    """Long enough that the split heuristic itself splits (16 nominal SMs on CPU)."""
    case = _fp8_case([grid(2100, 31001)], 8, 2, 64, 64, DTYPES[0], seed=9)
    _check_fp8_decode(*case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_backend_matches(dtype):
    q, kc, vc, table, lens, scales = _fp8_case([5, 77], 4, 2, 64, 16, dtype, seed=3)
    out = paged_decode(q, kc, vc, table, lens, backend="torch", **scales)
    ref = reference.paged_decode(q.double(), kc, vc, table, lens, **scales)
    assert_parity(out, ref, reference.paged_decode(q, kc, vc, table, lens, upcast=False, **scales))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", grid([8, 64], [8, 16, 64, 256]))
@pytest.mark.parametrize("varlen", [False, True])
def test_paged_flash_attn_parity(block_size, varlen, dtype):
    """Paged keys of flash_attn (chunked prefill / decode over the cache) on an fp8 cache, GQA, window."""
    lens = [9, 70, 33]
    q1, kc, vc, table, seqlens, scales = _fp8_case(lens, 4, 2, 64, block_size, dtype, seed=block_size)
    g = torch.Generator().manual_seed(block_size + 1)
    if varlen:
        qlens = [3, 5, 1]
        q = randn(sum(qlens), 4, 64, dtype=dtype, generator=g)
        cu = torch.tensor([0, 3, 8, 9], dtype=torch.int32, device=DEVICE)
        kw = dict(cu_seqlens_q=cu, max_seqlen_q=5)
    else:
        q = randn(3, 4, 4, 64, dtype=dtype, generator=g)
        kw = {}
    for window in (None, 11):
        out = flash_attn(q, kc, vc, block_table=table, seqlens_k=seqlens, window=window, **scales, **kw)
        kw_ref = {k: v for k, v in kw.items() if k != "max_seqlen_q"}
        ref = reference.attention(q.double(), kc, vc, block_table=table, seqlens_k=seqlens, window=window,
                                  **scales, **kw_ref)
        base = reference.attention(q, kc, vc, block_table=table, seqlens_k=seqlens, window=window,
                                   upcast=False, **scales, **kw_ref)
        assert_parity(out, ref, base)
        torch_out = flash_attn(q, kc, vc, block_table=table, seqlens_k=seqlens, window=window, backend="torch",
                               **scales, **kw)
        assert_parity(torch_out, ref, base)


def test_fp8_error_vs_float_cache_is_bounded():
    """What the fp8 cache costs: e4m3 keeps 3 mantissa bits (~3.6% rms relative error per value), and
    decode over the quantized cache stays about that close (in norm) to the same decode over the
    float cache it was made from (scales calibrated with headroom: no value saturates)."""
    g = torch.Generator().manual_seed(4)
    hkv, d, bs = 2, 64, 16
    k = randn(300, hkv, d, generator=g)
    v = randn(300, hkv, d, generator=g)
    q = randn(1, 8, d, generator=g)
    table = torch.arange(19, dtype=torch.int32, device=DEVICE)[None]
    lens = torch.tensor([300], dtype=torch.int32, device=DEVICE)
    slots = torch.arange(300, device=DEVICE)
    kf, vf = torch.zeros(19, bs, hkv, d, device=DEVICE), torch.zeros(19, bs, hkv, d, device=DEVICE)
    paged_append(k, v, kf, vf, slots)
    k8, v8 = kf.to(FP8), vf.to(FP8)
    scales = dict(k_scale=fp8_scale(k), v_scale=fp8_scale(v))
    paged_append(k, v, k8, v8, slots, **scales)
    exact = paged_decode(q, kf, vf, table, lens)
    approx = paged_decode(q, k8, v8, table, lens, **scales)
    rel = float((approx - exact).norm() / exact.norm())
    assert 0 < rel < 0.06, rel


# --------------------------------------------------------------------------------------------------
# The block manager: fp8 caches, scales, calibration; an end-to-end loop
# --------------------------------------------------------------------------------------------------


def test_calibration_maps_amax_to_224():
    x = randn(50, 3, 16, device="cpu")
    x[:, 2] = 0  # an all-zero head keeps scale 1
    s = fp8_scale(x)
    amax = x.abs().amax(dim=(0, 2))
    assert s.dtype == torch.float32 and s.shape == (3,)
    torch.testing.assert_close(s[:2], amax[:2] * (FP8_HEADROOM / 448), rtol=0, atol=0)
    assert float(s[2]) == 1.0
    q = reference.quantize_fp8(x, s)
    assert torch.equal(q[:, :2].float().abs().amax(dim=(0, 2)), torch.tensor([448 / FP8_HEADROOM] * 2))
    assert torch.equal(fp8_scale(x[:0]), torch.ones(3))


@pytest.mark.parametrize("block_size", [1, 16])
def test_cache_end_to_end(block_size):
    """PagedKVCache(dtype=fp8): calibrate from the prefill, reserve -> append -> decode with
    **cache.scales(layer), a fork (copy-on-write copies fp8 rows), against float64 over the
    dequantized history."""
    hq, hkv, d, layers = 4, 2, 32, 2
    dtype = DTYPES[0]
    cache = PagedKVCache(layers, 400 // block_size + 8, block_size, hkv, d, dtype=FP8, device=DEVICE)
    assert cache.fp8 and cache.scales(0)["k_scale"].shape == (hkv,) and bool((cache.k_scale[1] == 1).all())
    g = torch.Generator().manual_seed(block_size)
    hist = {}

    def step(seq_ids, counts, calibrate=False):
        slots = cache.reserve(seq_ids, counts)
        T = sum(counts)
        for layer in range(layers):
            k = randn(T, hkv, d, dtype=dtype, generator=g, scale=2.0)
            v = randn(T, hkv, d, dtype=dtype, generator=g)
            if calibrate:
                cache.calibrate_scales(layer, k, v)
            paged_append(k, v, cache.k_cache[layer], cache.v_cache[layer], slots, **cache.scales(layer))
            i = 0
            for sid, n in zip(seq_ids, counts):
                ks, vs = hist.setdefault(sid, [([], []) for _ in range(layers)])[layer]
                ks.extend(reference.quantize_fp8(k[i:i + n], cache.k_scale[layer]))
                vs.extend(reference.quantize_fp8(v[i:i + n], cache.v_scale[layer]))
                i += n
        live = list(hist)
        table, lens = cache.block_table(live), cache.seq_lens(live)
        q = randn(len(live), hq, d, dtype=dtype, generator=g)
        for layer in range(layers):
            sc = cache.scales(layer)
            out = paged_decode(q, cache.k_cache[layer], cache.v_cache[layer], table, lens, **sc)
            for b, sid in enumerate(live):
                ks, vs = hist[sid][layer]
                K = reference.dequantize_fp8(torch.stack(ks), sc["k_scale"], torch.float64)[None]
                V = reference.dequantize_fp8(torch.stack(vs), sc["v_scale"], torch.float64)[None]
                qb = q[b][None, None]
                ref = reference.attention(qb.double(), K, V)[0, 0]
                base = reference.attention(qb, K.to(dtype), V.to(dtype), upcast=False)[0, 0]
                assert_parity(out[b], ref, base, name=f"seq {sid} layer {layer}")

    step([0, 1], [37, 5], calibrate=True)   # prefill
    assert not bool((cache.k_scale[0] == 1).any())
    step([0, 1], [1, 1])
    cache.fork(1, 2)
    hist[2] = [([*ks], [*vs]) for ks, vs in hist[1]]
    step([1, 2], [1, 2])


# --------------------------------------------------------------------------------------------------
# generate(kv_cache_dtype=...)
# --------------------------------------------------------------------------------------------------


def test_generate_calibrates_from_the_prefill():
    """Each layer's scales are fp8_scale of its prefill K/V (the largest |value| per head stored as
    224), the decode logits stay close to the float cache's, and the kernels and the eager backend
    generate the same tokens."""
    from gptkernels.generation import PagedDecoder
    from gptkernels.models import from_config
    from gptkernels.models.inputs import pack_batch
    from tests.hf_models import VARIANTS, padded_batch

    model = from_config(VARIANTS["gpt-neox-parallel-pct0.5"], device=DEVICE)
    ids, mask = padded_batch(2, 7, model.config.vocab_size, left=[(0, 2)], seed=5)
    batch = pack_batch(model.config, ids, mask, op="test", force_packed=True)
    with torch.no_grad():
        dec8 = PagedDecoder(model, batch.lengths, 4, backend="torch", kv_cache_dtype=FP8)
        dec = PagedDecoder(model, batch.lengths, 4, backend="torch")
        l8, lf = dec8.prefill(batch), dec.prefill(batch)
        torch.testing.assert_close(l8, lf, rtol=0, atol=0)  # the prefill attends over unquantized K/V
        slots = dec.prefill_slots
        hkv, d = model.kv_heads, model.config.head_dim
        for layer in range(model.config.num_layers):
            for name in ("k", "v"):
                float_rows = getattr(dec.cache, f"{name}_cache")[layer].view(-1, hkv, d)[slots]
                scale = getattr(dec8.cache, f"{name}_scale")[layer]
                assert torch.equal(scale, fp8_scale(float_rows))
                stored = getattr(dec8.cache, f"{name}_cache")[layer].view(-1, hkv, d)[slots]
                assert torch.equal(stored.float().abs().amax(dim=(0, 2)), torch.full((hkv,), 224.0, device=DEVICE))
        nxt = lf.argmax(-1)
        s8, sf = dec8.step(nxt), dec.step(nxt)
        assert float((s8 - sf).abs().max()) <= 0.05 * float(sf.abs().max())
    ref = gptkernels.generate(model, ids, 5, attention_mask=mask, backend="torch", kv_cache_dtype=FP8)
    got = gptkernels.generate(model, ids, 5, attention_mask=mask, backend="triton", cuda_graph=False,
                              kv_cache_dtype=FP8)
    assert torch.equal(got, ref)


@requires_gpu
def test_generate_fp8_cuda_graph_matches_plain():
    from gptkernels.models import from_config
    from tests.hf_models import VARIANTS, padded_batch

    model = from_config(VARIANTS["gpt-neox-parallel-pct0.5"], dtype=torch.bfloat16, device="cuda")
    ids, mask = padded_batch(3, 9, model.config.vocab_size, left=[(0, 3)], seed=6)
    ids, mask = ids.cuda(), mask.cuda()
    plain = gptkernels.generate(model, ids, 8, attention_mask=mask, cuda_graph=False, kv_cache_dtype=FP8)
    graph = gptkernels.generate(model, ids, 8, attention_mask=mask, cuda_graph=True, kv_cache_dtype=FP8)
    assert torch.equal(plain, graph)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def _bad_case():
    q, kc, vc, table, lens, scales = _fp8_case([5, 9], 4, 2, 16, 8, torch.float32)
    return q, kc, vc, table, lens, scales


@pytest.mark.parametrize("what, exc, match", [
    ("no k_scale", ValueError, "k_scale is required with a float8_e4m3fn cache"),
    ("no v_scale", ValueError, "v_scale is required"),
    ("scale float16", TypeError, "k_scale must have dtype float32"),
    ("scale (3,)", ValueError, r"k_scale must be shaped \(\) or \(Hkv,\) = \(2,\)"),
    ("scale (1, 2)", ValueError, "v_scale must be shaped"),
    ("scale not a tensor", TypeError, "k_scale must be a torch.Tensor"),
    ("scale meta", ValueError, "k_scale must be on the cache's device"),
    ("float cache with scales", ValueError, "k_scale is for an fp8 cache"),
    ("v_cache float", TypeError, r"v(_cache)? must have (k_cache's dtype|the same dtype as k)"),
    ("e5m2 cache", TypeError, "k(_cache)? must have dtype"),
])
@pytest.mark.parametrize("op", ["paged_append", "paged_decode", "flash_attn"])
def test_bad_input(op, what, exc, match):
    q, kc, vc, table, lens, scales = _bad_case()
    ks, vs = scales["k_scale"], scales["v_scale"]
    if what == "no k_scale":
        ks = None
    elif what == "no v_scale":
        vs = None
    elif what == "scale float16":
        ks = ks.half()
    elif what == "scale (3,)":
        ks = torch.ones(3, device=DEVICE)
    elif what == "scale (1, 2)":
        vs = vs[None]
    elif what == "scale not a tensor":
        ks = 0.5
    elif what == "scale meta":
        ks = ks.to("meta")
    elif what == "float cache with scales":
        kc, vc = kc.float(), vc.float()
    elif what == "v_cache float":
        vc = vc.float()
    elif what == "e5m2 cache":
        kc, vc = kc.to(torch.float8_e5m2), vc.to(torch.float8_e5m2)
    kw = dict(k_scale=ks, v_scale=vs)
    with pytest.raises(exc, match=match):
        if op == "paged_append":
            paged_append(randn(2, 2, 16), randn(2, 2, 16), kc, vc, torch.arange(2, device=DEVICE), **kw)
        elif op == "paged_decode":
            paged_decode(q, kc, vc, table, lens, **kw)
        else:
            flash_attn(q[:, None], kc, vc, block_table=table, seqlens_k=lens, **kw)


def test_scale_values_checked_under_debug(monkeypatch):
    """A scale of 0, below 0 or not finite would store inf / NaN: refused under GPTKERNELS_DEBUG=1
    (checking values needs a sync), on every entry point."""
    q, kc, vc, table, lens, scales = _bad_case()
    monkeypatch.setenv("GPTKERNELS_DEBUG", "1")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        ks = torch.tensor([0.5, bad], device=DEVICE)
        with pytest.raises(ValueError, match="paged_decode: k_scale must be finite and > 0"):
            paged_decode(q, kc, vc, table, lens, k_scale=ks, v_scale=scales["v_scale"])
        with pytest.raises(ValueError, match="paged_append: v_scale must be finite and > 0"):
            paged_append(randn(2, 2, 16), randn(2, 2, 16), kc, vc, torch.arange(2, device=DEVICE),
                         k_scale=scales["k_scale"], v_scale=ks)
        with pytest.raises(ValueError, match="flash_attn: k_scale must be finite and > 0"):
            flash_attn(q[:, None], kc, vc, block_table=table, seqlens_k=lens, k_scale=ks, v_scale=scales["v_scale"])
    paged_decode(q, kc, vc, table, lens, **scales)  # good values pass


def test_scales_without_a_paged_cache_are_refused():
    q = randn(1, 3, 2, 16)
    with pytest.raises(ValueError, match="flash_attn: k_scale and v_scale are for an fp8 paged cache"):
        flash_attn(q, q, q, k_scale=torch.tensor(1.0, device=DEVICE), v_scale=torch.tensor(1.0, device=DEVICE))
    with pytest.raises(TypeError, match="flash_attn: k must have dtype"):
        flash_attn(q, q.to(FP8), q.to(FP8))  # fp8 only as a paged cache


def test_manager_and_generate_bad_input():
    from gptkernels.models import from_config
    from tests.hf_models import VARIANTS

    with pytest.raises(TypeError, match="PagedKVCache: dtype"):
        PagedKVCache(1, 4, 8, 2, 16, dtype=torch.float8_e5m2, device=DEVICE)
    float_cache = PagedKVCache(1, 4, 8, 2, 16, dtype=torch.float32, device=DEVICE)
    assert float_cache.scales(0) == {} and float_cache.k_scale is None
    with pytest.raises(ValueError, match="calibrate_scales: the cache is torch.float32, not fp8"):
        float_cache.calibrate_scales(0, randn(3, 2, 16), randn(3, 2, 16))
    fp8_cache = PagedKVCache(1, 4, 8, 2, 16, dtype=FP8, device=DEVICE)
    with pytest.raises(ValueError, match=r"calibrate_scales: k.shape\[1\] must be 2"):
        fp8_cache.calibrate_scales(0, randn(3, 1, 16), randn(3, 1, 16))
    model = from_config(VARIANTS["gpt2"], device=DEVICE)
    ids = torch.ones(1, 3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="generate: kv_cache_dtype must be None"):
        gptkernels.generate(model, ids, 2, kv_cache_dtype=torch.int8)
    with pytest.raises(TypeError, match="generate: kv_cache_dtype must be None or a torch.dtype"):
        gptkernels.generate(model, ids, 2, kv_cache_dtype="fp8")


def test_cuda_backend_refuses_fp8():
    """The CUDA kernels have no fp8 path: their launchers say so (before touching the extension)."""
    from gptkernels import cuda as cuda_backend

    q, kc, vc, table, lens, scales = _bad_case()
    with pytest.raises(BackendUnavailableError, match="paged_decode: backend 'cuda' cannot serve this call: "
                                                      "no CUDA kernel for k_scale, v_scale"):
        cuda_backend.paged_decode(q, kc, vc, table, lens, softmax_scale=0.25, window=None, num_splits=1, **scales)
    with pytest.raises(BackendUnavailableError, match="paged_append: backend 'cuda'"):
        cuda_backend.paged_append(q[:, :2], q[:, :2], kc, vc, torch.arange(2, device=DEVICE), **scales)
    with pytest.raises(BackendUnavailableError, match="flash_attn: backend 'cuda'"):
        cuda_backend.flash_attn_forward(q[:, None], kc, vc, causal=True, window=None, softmax_scale=0.25,
                                        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                                        max_seqlen_k=None, block_table=table, seqlens_k=lens,
                                        bottom_right=True, **scales)
    if ON_GPU and gptkernels.backends()["cuda"] is None:
        with pytest.raises(BackendUnavailableError, match="no CUDA kernel for k_scale"):
            paged_decode(q, kc, vc, table, lens, backend="cuda", **scales)


# --------------------------------------------------------------------------------------------------
# The kernels compile for Hopper (the interpreter never runs Triton's compiler)
# --------------------------------------------------------------------------------------------------

_COMPILE_FP8 = r'''
import json, torch
from gptkernels.triton import flash_attn as fa
from tools import sm90_compile
from tools.sm90_compile import launch_results, pg, record_launches
sm90_compile.BULK_POINTERS.setdefault("flash_paged", ("K_head", "V_head"))
FP8, hkv, block, d = torch.float8_e4m3fn, 8, 16, 128
kc = torch.empty(64, block, hkv, d, dtype=FP8)
vc = torch.empty_like(kc)
ks, vs = torch.ones(hkv), torch.ones(())
launches = []
for group, extra in ((1, {}), (4, {"softcap": 30.0, "alibi_slopes": torch.ones(hkv * 4)})):
    q = torch.empty(4, hkv * group, d, dtype=torch.bfloat16)
    table, lens = torch.zeros(4, 256, dtype=torch.int32), torch.full((4,), 4096, dtype=torch.int32)
    for kernel, args, kwargs in record_launches(pg, ("_paged_decode_kernel", "_paged_merge_kernel"), pg.paged_decode,
                                                q, kc, vc, table, lens, softmax_scale=d ** -0.5, window=None,
                                                num_splits=4, k_scale=ks, v_scale=vs, **extra):
        if kernel is pg._paged_decode_kernel:
            launches.append(("decode", {"group": group}, (kernel, args, kwargs)))
k = torch.empty(17, hkv, d, dtype=torch.bfloat16)
launches += [("append", {}, la) for la in record_launches(pg, ("_paged_append_kernel",), pg.paged_append, k,
                                                          torch.empty_like(k), kc, vc,
                                                          torch.zeros(17, dtype=torch.int64), k_scale=ks, v_scale=vs)]
q = torch.empty(4, 3, hkv * 4, d, dtype=torch.bfloat16)
launches += [("flash_paged", {}, la) for la in record_launches(
    fa, ("_fwd_kernel",), fa.flash_attn_forward, q, kc, vc, causal=True, window=None, softmax_scale=d ** -0.5,
    cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
    block_table=torch.zeros(4, 256, dtype=torch.int32), seqlens_k=torch.full((4,), 4096, dtype=torch.int32),
    bottom_right=True, k_scale=ks, v_scale=vs)]
for r in launch_results(launches, ptxas=True):
    print(json.dumps(r))
'''


def test_fp8_softcap_alibi_kernels_compile_for_hopper():
    """fp8 append (the rounding), fp8 decode with softcap and ALiBi (both the broadcast and the
    tensor-core path) and the paged flash_attn forward over an fp8 cache compile for sm_90a and fit
    its shared memory; append and decode do not spill and load 16-byte vectors where the bf16
    kernels do."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tools.sm90_compile import SM90_SHARED, subprocess_env

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FP8], cwd=root, env=subprocess_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted((r["kernel"], r["case"].get("group")) for r in results) == [
        ("append", None), ("decode", 1), ("decode", 4), ("flash_paged", None)]
    for r in results:
        assert r["shared"] <= SM90_SHARED, r
        # (the flash forward's first config, 128 x 128 tiles, spills a few bytes over a bf16 cache too:
        # the flash kernel's own tuning, not the fp8 path's)
        assert r["spill"] == 0 or r["kernel"] == "flash_paged", r
        if r["kernel"] in ("append", "decode") and r["case"].get("group", 1) == 1:
            assert r["vec16"], r  # (the GQA decode's fp8 V tile loads 8 bytes per thread: notes/paged.md)
        if r["kernel"] == "decode" and r["case"]["group"] == 4 or r["kernel"] == "flash_paged":
            assert r["tensor_cores"] in ("wgmma", "mma"), r
