"""The fused decode ops (gptkernels/decode.py, gptkernels/triton/fused.py): each against a float64
reference under SPEC's parity rule (the eager computation in the same dtype as the yardstick), the
composition of the unfused ops they replace, FlashAttention's semantics of
``flash_attn_with_kvcache`` written out densely in this file, the models' fused decode steps
against the unfused ones, and bad input."""

from __future__ import annotations

import pytest
import torch

import gptkernels
from gptkernels import BackendUnavailableError
from gptkernels import reference as R
from gptkernels.decode import add_layer_norm, fused_linear, rotary_append
from gptkernels.generation import PagedDecoder, fused_mode
from gptkernels.models import from_config
from gptkernels.models.config import ACTIVATIONS
from gptkernels.models.inputs import pack_batch
from tests.helpers import DEVICE, DTYPES, assert_parity, randn, requires_gpu
from tests.hf_models import VARIANTS, padded_batch

LOW = [torch.float16, torch.float32]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _cache(num_blocks, block_size, hkv, d, dtype, seed):
    g = _gen(seed)
    return randn(num_blocks, block_size, hkv, d, dtype=dtype, generator=g), \
        randn(num_blocks, block_size, hkv, d, dtype=dtype, generator=g)


def _d(*ts):
    return [None if t is None else (t.double() if t.is_floating_point() else t) for t in ts]


# --------------------------------------------------------------------------------------------------
# rotary + cache append
# --------------------------------------------------------------------------------------------------

APPEND_CASES = [
    # (batch, Sq, Sk, Hq, Hkv, D, rotary dim, block size, interleaved, q_per_token)
    (3, 1, 1, 4, 2, 80, 20, 8, False, True),     # a decode step: GQA, partial rotary (GPT-NeoX pct 0.25)
    (2, 5, 3, 2, 2, 64, 64, 16, True, True),     # a chunk, fewer new keys than queries, GPT-J pairs
    (2, 4, 4, 6, 3, 32, 16, 8, False, False),    # non-causal rule: every q row at its start
    (1, 2, 2, 1, 1, 96, 0, 8, False, True),      # no rotary: a paged append addressed by the table
]


@pytest.mark.parametrize("case", APPEND_CASES, ids=lambda c: "B{}-Sq{}-Sk{}-{}x{}-D{}-R{}-bs{}-il{}-pt{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_append_parity(case, dtype):
    b, sq, sk, hq, hkv, d, rot, bs, inter, per_tok = case
    g = _gen(1)
    # q, k, v as strided views of one fused projection (the models' layout)
    qkv = randn(b, sq, hq + 2 * hkv, d, dtype=dtype, generator=g)
    q, k, v = qkv[:, :, :hq], qkv[:, :sk, hq:hq + hkv], qkv[:, :sk, hq + hkv:]
    kc, vc = _cache(12, bs, hkv, d, dtype, 2)
    table = torch.randperm(12, generator=g)[: b * 4].reshape(b, 4).to(torch.int32).to(DEVICE)
    table[0, 3] = -1  # never used by a valid position here
    starts = torch.tensor([3, 9 + bs, 0][:b], dtype=torch.int64, device=DEVICE)
    rstarts = starts + 5  # rotary positions may count from elsewhere (a left-padded dense cache)
    cos, sin = gptkernels.rotary_cos_sin(rot, 64, device=DEVICE) if rot else (None, None)
    kw = dict(rotary_starts=rstarts, interleaved=inter, q_per_token=per_tok)
    kc1, vc1 = kc.clone(), vc.clone()
    with torch.no_grad():
        out = rotary_append(q, k, v, kc1, vc1, table, starts, cos, sin, backend="triton", **kw)
    kr, vr = kc.double(), vc.double()
    ref = R.rotary_append(*_d(q, k, v), kr, vr, table, starts, *_d(cos, sin), **kw)
    kb, vb = kc.clone(), vc.clone()
    base = R.rotary_append(q, k, v, kb, vb, table, starts, cos, sin, upcast=False, **kw)
    assert_parity(out, ref, base, name="q")
    assert_parity(kc1, kr, kb, name="k_cache")
    assert torch.equal(vc1, vb)  # v is copied
    if rot == 0:
        assert out is q
    # every slot the new tokens do not own is untouched
    written = torch.zeros(12 * bs, dtype=torch.bool)
    pos = starts[:, None].cpu() + torch.arange(sk)[None, :]
    slots = R.paged_slots(table.cpu(), pos, 12, bs).reshape(-1)
    written[slots[slots >= 0]] = True
    keep = (~written.reshape(12, bs)).to(DEVICE)
    assert torch.equal(kc1[keep], kc[keep]) and torch.equal(vc1[keep], vc[keep])


def test_rotary_append_is_the_unfused_composition():
    """The same bits as apply_rotary + paged_append on the triton backend (one launch for two)."""
    b, hq, hkv, d = 4, 4, 2, 64
    g = _gen(3)
    q, k, v = (randn(b, h, d, dtype=torch.float16, generator=g) for h in (hq, hkv, hkv))
    kc, vc = _cache(10, 8, hkv, d, torch.float16, 4)
    table = torch.randperm(10, generator=g)[:8].reshape(4, 2).to(torch.int32).to(DEVICE)
    pos = torch.tensor([0, 5, 9, 15], device=DEVICE)
    cos, sin = gptkernels.rotary_cos_sin(32, 32, device=DEVICE)
    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    with torch.no_grad():
        q1 = rotary_append(q, k, v, kc1, vc1, table, pos, cos, sin, backend="triton")
        q2, k2 = gptkernels.apply_rotary(q[:, None], k[:, None], cos, sin, positions=pos[:, None], backend="triton")
        slots = table.long().gather(1, (pos // 8)[:, None])[:, 0] * 8 + pos % 8
        gptkernels.paged_append(k2[:, 0], v, kc2, vc2, slots, backend="triton")
    assert torch.equal(q1, q2[:, 0]) and torch.equal(kc1, kc2) and torch.equal(vc1, vc2)


def test_rotary_append_bad_slots_are_skipped():
    """A position past the table, a negative one or a table entry outside the cache writes nothing."""
    kc, vc = _cache(4, 8, 1, 16, torch.float32, 5)
    k = randn(4, 1, 16, generator=_gen(6))
    table = torch.tensor([[0], [9], [-3], [1]], dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([8, 0, 0, -1], device=DEVICE)  # past the 1-page table; bad entry x2; negative
    for backend in ("triton", "torch"):
        kc1, vc1 = kc.clone(), vc.clone()
        with torch.no_grad():
            rotary_append(k, k, k, kc1, vc1, table, starts, backend=backend)
        assert torch.equal(kc1, kc) and torch.equal(vc1, vc), backend


# --------------------------------------------------------------------------------------------------
# residual add + LayerNorm
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("deltas,norms,affine", [(0, 1, True), (1, 1, True), (2, 2, True), (1, 1, False), (2, 1, False)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_layer_norm_parity(deltas, norms, affine, dtype):
    m, c = 5, 97  # an odd width: the padding lanes of the row tile
    g = _gen(7)
    x = randn(m, c, dtype=dtype, generator=g, scale=3.0) + 1.5  # a mean away from 0
    ds = [randn(m, c, dtype=dtype, generator=g) for _ in range(deltas)]
    ln = [((randn(c, dtype=dtype, generator=g), randn(c, dtype=dtype, generator=g)) if affine else (None, None))
          + (1e-5 * (i + 1),) for i in range(norms)]
    with torch.no_grad():
        got = add_layer_norm(x, *ds, norms=ln, backend="triton")
    flat = [t for w, bb, _ in ln for t in (w, bb)] + [None] * (4 - 2 * norms)
    eps = dict(eps1=ln[0][2], eps2=ln[-1][2], num_norms=norms)
    ref = R.add_layer_norm(*_d(x, *ds, *([None] * (2 - deltas))), *_d(*flat), **eps)
    base = R.add_layer_norm(x, *ds, *([None] * (2 - deltas)), *flat, upcast=False, **eps)
    # h is the unfused residual stream bit for bit: x + d1, or x + (d1 + d2), added in x's dtype
    assert torch.equal(got[0], base[0])
    assert (got[0] is x) == (deltas == 0)
    for i in range(norms):
        assert_parity(got[1 + i], ref[1 + i], base[1 + i], name=f"y{i + 1}")
    assert len(got) == 1 + norms


def test_add_layer_norm_any_leading_shape():
    x = randn(2, 3, 40, generator=_gen(8))
    d = randn(2, 3, 40, generator=_gen(9))
    with torch.no_grad():
        h, y = add_layer_norm(x, d, norms=[(None, None, 1e-5)], backend="triton")
    assert h.shape == y.shape == x.shape
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x + d, (40,)), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# The decode GEMM with its neighbours
# --------------------------------------------------------------------------------------------------

LINEAR_CASES = [
    # (rows, K, N, norm, activation, residual, mean of x)
    (1, 97, 70, "affine", None, False, 0.5),       # a batch-1 decode step, odd sizes
    (2, 64, 40, "affine", None, False, 40.0),      # a row mean far from 0: the one-pass variance
    (5, 64, 130, None, "gelu", False, 0.5),       # exact GELU (GPT-NeoX)
    (17, 80, 48, "affine", "gelu_new", False, 0.5),  # two row tiles; tanh GELU (GPT-2, GPT-Neo)
    (3, 96, 40, "plain", "relu", True, -2.0),      # OPT: LayerNorm without affine
    (2, 48, 33, None, "quick_gelu", True, 0.5),
    (4, 32, 64, None, "silu", False, 0.5),
    (6, 128, 96, None, None, True, 0.5),           # out / fc_out: the residual add
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "M{}-K{}-N{}-{}-{}-res{}-mean{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_linear_parity(case, dtype):
    m, k, n, norm, act, res, mean = case
    g = _gen(10)
    x = randn(m, k, dtype=dtype, generator=g) + mean
    w = randn(n, k, dtype=dtype, generator=g, scale=k ** -0.5)
    bias = randn(n, dtype=dtype, generator=g)
    r = randn(m, n, dtype=dtype, generator=g) if res else None
    ln = None
    if norm == "affine":
        ln = (randn(k, dtype=dtype, generator=g), randn(k, dtype=dtype, generator=g), 1e-5)
    elif norm == "plain":
        ln = (None, None, 1e-5)
    with torch.no_grad():
        got = fused_linear(x, w, bias, norm=ln, activation=act, residual=r, backend="triton")
    ln64 = None if ln is None else (*_d(ln[0], ln[1]), ln[2])
    ref = R.fused_linear(*_d(x, w, bias), norm=ln64, activation=act, residual=None if r is None else r.double())
    base = R.fused_linear(x, w, bias, norm=ln, activation=act, residual=r, upcast=False)
    assert_parity(got, ref, base)


def test_fused_ops_take_any_strides():
    """Strided views everywhere (x, weight, bias, LayerNorm weights, residual, deltas): the same bits
    as from contiguous copies."""
    g = _gen(28)
    big = randn(5, 2, 64, generator=g)
    x = big[:, 1, :48]  # row stride 128
    w = randn(40, 96, generator=g, scale=0.2)[:, ::2]  # column stride 2
    vec = randn(3, 96, generator=g)
    bias, lnw, lnb = vec[0, ::2][:40], vec[1, ::2], vec[2, 1::2]
    r = randn(40, 5, generator=g).t()
    with torch.no_grad():
        got = fused_linear(x, w, bias, norm=(lnw, lnb, 1e-5), activation="gelu", residual=r, backend="triton")
        want = fused_linear(x.contiguous(), w.contiguous(), bias.contiguous(), activation="gelu", residual=r.contiguous(),
                            norm=(lnw.contiguous(), lnb.contiguous(), 1e-5), backend="triton")
        d = x.t().contiguous().t()  # column-major: strides (1, 5)
        h, y1, y2 = add_layer_norm(x, d, norms=[(lnw, lnb, 1e-5), (lnb, lnw, 1e-5)], backend="triton")
        h2, z1, z2 = add_layer_norm(x.contiguous(), x.contiguous(), norms=[(lnw.contiguous(), lnb.contiguous(), 1e-5),
                                    (lnb.contiguous(), lnw.contiguous(), 1e-5)], backend="triton")
    assert torch.equal(got, want)
    assert torch.equal(h, h2) and torch.equal(y1, z1) and torch.equal(y2, z2)


def test_fused_linear_epilogue_covers_every_activation():
    from gptkernels.triton.fused import ACTIVATION_CODES

    assert set(ACTIVATIONS) <= set(ACTIVATION_CODES)
    x = randn(3, 32, generator=_gen(11))
    w = randn(20, 32, generator=_gen(12), scale=0.3)
    for act in ACTIVATIONS:
        with torch.no_grad():
            got = fused_linear(x, w, None, activation=act, backend="triton")
        torch.testing.assert_close(got, ACTIVATIONS[act](x @ w.t()), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])
def test_fused_linear_qkv_appends_to_cache(dtype, hq, hkv):
    """A fused q | k | v projection: q returned, k and v written to each row's cache slot."""
    m, k, d, bs = 5, 64, 16, 8
    n = (hq + 2 * hkv) * d
    g = _gen(13)
    x = randn(m, k, dtype=dtype, generator=g)
    w = randn(n, k, dtype=dtype, generator=g, scale=0.125)
    bias = randn(n, dtype=dtype, generator=g)
    ln = (randn(k, dtype=dtype, generator=g), randn(k, dtype=dtype, generator=g), 1e-5)
    kc, vc = _cache(12, bs, hkv, d, dtype, 14)
    table = torch.randperm(12, generator=g)[:10].reshape(5, 2).to(torch.int32).to(DEVICE)
    pos = torch.tensor([0, 7, 13, 3, 16], device=DEVICE)  # row 4: past its 2-page table (not written)
    kc1, vc1 = kc.clone(), vc.clone()
    with torch.no_grad():
        q = fused_linear(x, w, bias, norm=ln, cache=(kc1, vc1, table, pos), backend="triton")
    nq = hq * d
    kr, vr = kc.double(), vc.double()
    ref = R.fused_linear(*_d(x, w, bias), norm=(*_d(ln[0], ln[1]), ln[2]), cache=(kr, vr, table, pos, nq))
    kb, vb = kc.clone(), vc.clone()
    base = R.fused_linear(x, w, bias, norm=ln, cache=(kb, vb, table, pos, nq), upcast=False)
    assert q.shape == (m, nq)
    assert_parity(q, ref, base, name="q")
    assert_parity(kc1, kr, kb, name="k_cache")
    assert_parity(vc1, vr, vb, name="v_cache")
    assert torch.equal(kc1[table[4].long()], kc[table[4].long()])  # row 4 wrote nothing


# --------------------------------------------------------------------------------------------------
# flash_attn_with_kvcache: FlashAttention's semantics, written out densely
# --------------------------------------------------------------------------------------------------


def _fa_semantics(q, k_cache, v_cache, k, v, cos, sin, seqlens, batch_idx, leftpad, table, causal, window,
                  interleaved, softcap=None, alibi_slopes=None):
    """flash_attn_with_kvcache as FlashAttention's own test states it (tests/test_flash_attn.py,
    test_flash_attn_kvcache), in float64 on a dense copy of each sequence's cache: the new k rotated
    at cache_seqlens + i, q at cache_seqlens + i (causal or local) or cache_seqlens, the new rows
    written at cache_seqlens..; the keys [leftpad, cache_seqlens + Sk), key index counted from
    leftpad, bottom-right alignment; ``softcap`` (tanh of the scaled scores) then ALiBi's
    ``-alibi_slopes[b, h] * |i + seqlen_k - seqlen_q - j|`` (row b of q's batch; (Hq,) slopes for
    every b) before the mask. Returns (out, lse, the dense caches after the update), on the CPU."""
    q, k_cache, v_cache, k, v, cos, sin = (None if t is None else t.cpu() for t in (q, k_cache, v_cache, k, v, cos, sin))
    b, sq, hq, d = q.shape
    if table is None:
        rows = torch.arange(b) if batch_idx is None else batch_idx.long().cpu()
        kc, vc = k_cache[rows].clone(), v_cache[rows].clone()
    else:
        nb, bs = table.shape[1], k_cache.shape[1]
        kc = k_cache[table.long().cpu().flatten()].reshape(b, nb * bs, *k_cache.shape[2:]).clone()
        vc = v_cache[table.long().cpu().flatten()].reshape(b, nb * bs, *k_cache.shape[2:]).clone()
    s = kc.shape[1]
    lens = seqlens.long().cpu()[:, None]
    ar = torch.arange(s)[None, :]
    sk = 0
    if k is not None:
        sk = k.shape[1]
        if cos is not None:
            qpos = lens + torch.arange(sq)[None, :] if (causal or window) else lens.expand(b, sq)
            q = R.rotate(q, cos, sin, qpos, interleaved=interleaved)
            k = R.rotate(k, cos, sin, lens + torch.arange(sk)[None, :], interleaved=interleaved)
        upd = (lens <= ar) & (ar < lens + sk)
        kc[upd] = k.reshape(-1, *k.shape[2:])
        vc[upd] = v.reshape(-1, *v.shape[2:])
    valid = ar < lens + sk
    lp = torch.zeros_like(lens) if leftpad is None else leftpad.long().cpu()[:, None]
    valid &= ar >= lp
    n_keys = valid.sum(-1, keepdim=True)  # (b, 1)
    col = ar - lp  # (b, s)
    row = torch.arange(sq)[None, :, None] + n_keys[:, :, None] - sq  # (b, sq, 1)
    mask = valid[:, None, :].expand(b, sq, s).clone()
    if causal:
        mask &= col[:, None, :] <= row
    if window is not None:
        mask &= col[:, None, :] > row - window
    g = hq // kc.shape[2]
    kk, vv = kc.repeat_interleave(g, dim=2), vc.repeat_interleave(g, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) / d ** 0.5
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.double().cpu().expand(b, hq)
        scores = scores - slopes[:, :, None, None] * (row - col[:, None, :]).abs()[:, None]
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    lse = torch.logsumexp(scores, -1)
    p = torch.where(torch.isinf(lse)[..., None], 0.0, torch.exp(scores - lse[..., None]))
    out = torch.einsum("bhqk,bkhd->bqhd", p, vv)
    return out, lse, kc, vc


KV_CASES = [
    # (layout, Sq, Sk, causal, window, rotary, interleaved)
    ("paged", 1, 1, True, None, True, False),     # a decode step over a paged cache
    ("dense", 1, 1, True, None, True, True),      # dense cache, GPT-J rotary
    ("dense-idx", 3, 3, True, None, True, False),  # cache_batch_idx, a 3-token chunk
    ("dense-leftpad", 3, 2, True, None, True, False),  # left-padded cache, fewer new keys than queries
    ("paged", 4, 4, False, None, True, False),    # non-causal: q rotated at cache_seqlens
    ("paged", 2, 2, True, 5, True, False),        # sliding window
    ("dense-idx", 2, 0, True, None, False, False),  # no new k/v: attention over cache_seqlens keys
    ("dense-leftpad", 1, 1, True, None, False, False),  # leftpad, one row: the paged decode kernel
]


def _kv_inputs(layout, sq, sk, dtype, seed=20):
    b, hq, hkv, d = 3, 4, 2, 32
    g = _gen(seed)
    q = randn(b, sq, hq, d, dtype=dtype, generator=g)
    k = randn(b, sk, hkv, d, dtype=dtype, generator=g) if sk else None
    v = randn(b, sk, hkv, d, dtype=dtype, generator=g) if sk else None
    kw = {}
    if layout == "paged":
        kc, vc = _cache(16, 8, hkv, d, dtype, seed + 1)
        kw["block_table"] = torch.randperm(16, generator=g)[:15].reshape(3, 5).to(torch.int32).to(DEVICE)
    else:
        kc, vc = _cache(5, 40, hkv, d, dtype, seed + 1)
        if layout in ("dense-idx",):
            kw["cache_batch_idx"] = torch.tensor([4, 0, 2], dtype=torch.int32, device=DEVICE)
        if layout == "dense-leftpad":
            kw["cache_leftpad"] = torch.tensor([2, 0, 11], dtype=torch.int32, device=DEVICE)
    seqlens = torch.tensor([5, 0 if sk else 3, 29], dtype=torch.int32, device=DEVICE)
    return q, kc, vc, k, v, seqlens, kw


def _dense_cache(kc, kw):
    """The caches as the dense per-sequence view _fa_semantics returns, for comparison."""
    if "block_table" in kw:
        t = kw["block_table"].long().cpu().flatten()
        return kc[t].reshape(3, -1, *kc.shape[2:])
    idx = kw.get("cache_batch_idx")
    return kc[torch.arange(3) if idx is None else idx.long().cpu()]


@pytest.mark.parametrize("case", KV_CASES, ids=lambda c: "{}-Sq{}-Sk{}-causal{}-w{}-rot{}-il{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flash_attn_with_kvcache_parity(case, dtype):
    layout, sq, sk, causal, window, rot, inter = case
    q, kc, vc, k, v, seqlens, kw = _kv_inputs(layout, sq, sk, dtype)
    cos, sin = gptkernels.rotary_cos_sin(16, 64, device=DEVICE) if rot else (None, None)
    args = dict(cache_seqlens=seqlens, causal=causal, window=window, rotary_interleaved=inter, **kw)
    if layout == "dense-leftpad" and gptkernels._checks.MIN_BLOCK_SIZE > 1:
        with pytest.raises(ValueError, match="cache_leftpad"):
            gptkernels.flash_attn_with_kvcache(q, kc, vc, k, v, cos, sin, **args)
        return
    kc1, vc1 = kc.clone(), vc.clone()
    with torch.no_grad():
        out, lse = gptkernels.flash_attn_with_kvcache(q, kc1, vc1, k, v, cos, sin, return_lse=True,
                                                      backend="triton", **args)
    ref_out, ref_lse, ref_kc, ref_vc = _fa_semantics(*_d(q, kc, vc, k, v, cos, sin), seqlens,
                                                     kw.get("cache_batch_idx"), kw.get("cache_leftpad"),
                                                     kw.get("block_table"), causal, window, inter)
    # our float64 reference is FlashAttention's semantics
    kr, vr = kc.double(), vc.double()
    our64, our_lse64 = R.flash_attn_with_kvcache(*_d(q), kr, vr, *_d(k, v, cos, sin), block_size=8,
                                                 return_lse=True, **args)
    torch.testing.assert_close(our64.cpu(), ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(our_lse64.cpu(), ref_lse, atol=1e-12, rtol=0)
    torch.testing.assert_close(_dense_cache(kr, kw).cpu(), ref_kc, atol=1e-12, rtol=0)
    # the kernels under the parity rule, the eager computation in the same dtype as the yardstick
    kb, vb = kc.clone(), vc.clone()
    base, base_lse = R.flash_attn_with_kvcache(q, kb, vb, k, v, cos, sin, block_size=8, return_lse=True,
                                               upcast=False, **args)
    assert_parity(out, ref_out, base)
    assert_parity(lse, ref_lse, base_lse, name="lse")
    assert_parity(_dense_cache(kc1, kw), ref_kc, _dense_cache(kb, kw), name="k_cache")
    assert torch.equal(vc1, vb)
    # the torch backend is the float32 reference
    kt, vt = kc.clone(), vc.clone()
    out_t = gptkernels.flash_attn_with_kvcache(q, kt, vt, k, v, cos, sin, backend="torch", **args)
    assert_parity(out_t, ref_out, base)


@pytest.mark.parametrize("layout,sq", [("paged", 1), ("dense", 3)])
def test_flash_attn_with_kvcache_fp8_cache(layout, sq):
    """An fp8 cache with its scales: the new k/v written as paged_append writes them (the same bytes
    on both backends), the attention over the dequantized cache equal to the torch backend's."""
    q, kc, vc, k, v, seqlens, kw = _kv_inputs(layout, sq, sq, torch.float16)
    fp8 = torch.float8_e4m3fn
    ks, vs = torch.tensor([0.01, 0.02], device=DEVICE), torch.tensor(0.015, device=DEVICE)
    kc8, vc8 = (kc / 0.02).to(fp8), (vc / 0.02).to(fp8)
    cos, sin = gptkernels.rotary_cos_sin(16, 64, device=DEVICE)
    outs = []
    for backend in ("triton", "torch"):
        kc1, vc1 = kc8.clone(), vc8.clone()
        with torch.no_grad():
            out = gptkernels.flash_attn_with_kvcache(q, kc1, vc1, k, v, cos, sin, cache_seqlens=seqlens, k_scale=ks,
                                                     v_scale=vs, backend=backend, **kw)
        outs.append((out, kc1.view(torch.uint8), vc1.view(torch.uint8)))
    (a, ka, va), (b, kb, vb) = outs
    assert torch.equal(ka, kb) and torch.equal(va, vb)
    assert not torch.equal(ka, kc8.view(torch.uint8))  # the new keys were written
    torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_flash_attn_with_kvcache_int_seqlens_and_defaults():
    """An int cache_seqlens is every sequence's; without it and without new k/v, the whole cache."""
    q, kc, vc, _, _, _, _ = _kv_inputs("dense", 1, 0, torch.float32)
    with torch.no_grad():
        a = gptkernels.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=40)
        b = gptkernels.flash_attn_with_kvcache(q, kc, vc)
        c = gptkernels.flash_attn(q, kc[:3], vc[:3], causal=True)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, c, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# flash_attn_with_kvcache: softcap and ALiBi
# --------------------------------------------------------------------------------------------------

MOD_CASES = [
    # (layout, Sq, Sk, causal, window, softcap, slopes: None, "h" (Hq,) or "bh" (B, Hq) strided)
    ("paged", 1, 1, True, None, 2.0, None),         # a decode step: the paged decode kernel, softcap
    ("dense", 1, 1, True, None, None, "h"),         # dense cache, one slope per head
    ("dense-idx", 1, 1, True, None, 2.0, "bh"),     # cache_batch_idx: the slopes' row is q's b
    ("dense-idx", 3, 3, True, None, 2.0, "bh"),     # the same with a 3-token chunk (paged flash attention)
    ("paged", 4, 2, False, None, None, "bh"),       # non-causal: |distance| to keys after the query too
    ("paged", 3, 3, True, 4, 2.0, "h"),             # sliding window with both
    ("dense-leftpad", 2, 2, True, None, 2.0, "bh"),  # left-padded: distances within the sequence's keys
]


def _slopes(kind, hq=4, b=3):
    if kind is None:
        return None
    base = 2.0 ** (-8.0 * torch.arange(1, hq + 1) / hq)  # ALiBi's geometric slopes
    if kind == "h":
        return base.to(DEVICE)
    # (B, Hq), a different row per sequence, as a strided (transposed) view
    per_b = base[:, None] * torch.tensor([1.0, 0.3, 2.5])[None, :b]
    return per_b.to(DEVICE).t()


@pytest.mark.parametrize("case", MOD_CASES, ids=lambda c: "{}-Sq{}-Sk{}-causal{}-w{}-cap{}-alibi{}".format(*c))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_flash_attn_with_kvcache_softcap_alibi(case, dtype):
    """softcap and alibi_slopes reach whichever attention path runs (paged decode for Sq = 1, paged
    flash attention for more), on dense and paged caches: the kernels against FlashAttention's
    semantics in float64 under the parity rule, the reference equal to those semantics."""
    layout, sq, sk, causal, window, softcap, kind = case
    q, kc, vc, k, v, seqlens, kw = _kv_inputs(layout, sq, sk, dtype, seed=31)
    slopes = _slopes(kind)
    cos, sin = gptkernels.rotary_cos_sin(16, 64, device=DEVICE)
    args = dict(cache_seqlens=seqlens, causal=causal, window=window, softcap=softcap, alibi_slopes=slopes, **kw)
    kc1, vc1 = kc.clone(), vc.clone()
    with torch.no_grad():
        out, lse = gptkernels.flash_attn_with_kvcache(q, kc1, vc1, k, v, cos, sin, return_lse=True,
                                                      backend="triton", **args)
    ref_out, ref_lse, _, _ = _fa_semantics(*_d(q, kc, vc, k, v, cos, sin), seqlens, kw.get("cache_batch_idx"),
                                           kw.get("cache_leftpad"), kw.get("block_table"), causal, window, False,
                                           softcap=softcap, alibi_slopes=slopes)
    our64, our_lse64 = R.flash_attn_with_kvcache(*_d(q), kc.double(), vc.double(), *_d(k, v, cos, sin),
                                                 block_size=8, return_lse=True, **args)
    torch.testing.assert_close(our64.cpu(), ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(our_lse64.cpu(), ref_lse, atol=1e-12, rtol=0)
    base, base_lse = R.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cos, sin, block_size=8,
                                               return_lse=True, upcast=False, **args)
    assert_parity(out, ref_out, base)
    assert_parity(lse, ref_lse, base_lse, name="lse")
    out_t = gptkernels.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), k, v, cos, sin, backend="torch", **args)
    assert_parity(out_t, ref_out, base)
    # the modifiers change the answer (the comparison above is not of two unmodified attentions)
    plain, _, _, _ = _fa_semantics(*_d(q, kc, vc, k, v, cos, sin), seqlens, kw.get("cache_batch_idx"),
                                   kw.get("cache_leftpad"), kw.get("block_table"), causal, window, False)
    assert (plain - ref_out).abs().max() > 1e-2


def test_flash_attn_with_kvcache_softcap_alibi_bad_input():
    q, kc, vc, k, v, seqlens, _ = _kv_inputs("dense", 1, 1, torch.float32)
    fa = gptkernels.flash_attn_with_kvcache
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    cases = [
        (ValueError, "flash_attn_with_kvcache: softcap must be None or a finite float > 0",
         lambda: fa(q, kc, vc, k, v, cache_seqlens=seqlens, softcap=0.0)),
        (ValueError, "flash_attn_with_kvcache: softcap", lambda: fa(q, kc, vc, k, v, cache_seqlens=seqlens,
                                                                    softcap=-1.0)),
        (TypeError, "flash_attn_with_kvcache: softcap", lambda: fa(q, kc, vc, k, v, cache_seqlens=seqlens,
                                                                   softcap="50")),
        (TypeError, "flash_attn_with_kvcache: alibi_slopes", lambda: fa(q, kc, vc, k, v, cache_seqlens=seqlens,
                                                                        alibi_slopes=torch.ones(4).half())),
        (ValueError, r"flash_attn_with_kvcache: alibi_slopes must be shaped \(Hq,\) = \(4,\)",
         lambda: fa(q, kc, vc, k, v, cache_seqlens=seqlens, alibi_slopes=torch.ones(2))),
        # (B, Hq) slopes follow q's batch of 3, not the cache's 5 rows that cache_batch_idx picks from
        (ValueError, r"flash_attn_with_kvcache: alibi_slopes must be shaped .* \(B, Hq\) = \(3, 4\)",
         lambda: fa(q, kc, vc, k, v, cache_seqlens=seqlens, cache_batch_idx=idx, alibi_slopes=torch.ones(5, 4))),
    ]
    for exc, msg, call in cases:
        with pytest.raises(exc, match=msg):
            call()
    slopes = torch.ones(4, requires_grad=True)
    with pytest.raises(BackendUnavailableError, match="flash_attn_with_kvcache: backend 'triton' is not differentiable"):
        fa(q, kc, vc, k, v, cache_seqlens=seqlens, alibi_slopes=slopes, backend="triton")
    with pytest.raises(BackendUnavailableError, match="flash_attn_with_kvcache: backend 'cuda'"):
        fa(q, kc, vc, k, v, cache_seqlens=seqlens, softcap=30.0, backend="cuda")


@requires_gpu
def test_gpu_flash_attn_with_kvcache_softcap_alibi_bf16():
    for case in MOD_CASES:
        test_flash_attn_with_kvcache_softcap_alibi(case, torch.bfloat16)


# --------------------------------------------------------------------------------------------------
# The models' fused decode steps
# --------------------------------------------------------------------------------------------------


MODEL_VARIANTS = ["gpt2", "gpt-neo-window4", "gpt-neox-parallel-pct0.5", "gpt-neox-sequential-pct0.25",
                  "opt-pre-ln-project", "opt-post-ln"]


@pytest.mark.parametrize("variant", MODEL_VARIANTS)
def test_fused_decode_steps_match_unfused(variant):
    """Each decode step's logits, fused ("ops" and "linear") against the unfused ops, from the same
    prefill: float32, within rounding; the greedy tokens the same."""
    model = from_config(VARIANTS[variant], device=DEVICE)
    ids, mask = padded_batch(3, 6, model.config.vocab_size, left=[(0, 2)], seed=21)
    with torch.no_grad():
        batch = pack_batch(model.config, ids, mask, op="test", force_packed=True)
        decs = {mode: PagedDecoder(model, batch.lengths, 4, block_size=8, backend="triton", fused=mode is not None)
                for mode in (None, "ops", "linear")}
        decs["ops"].fused = "ops"  # the mode tensor-parallel and quantized models take
        assert decs["linear"].fused == "linear" and decs[None].fused is None
        first = decs[None].prefill(batch)  # one prefill (the interpreter's slow part), copied
        for mode in ("ops", "linear"):
            for dst, src in zip(decs[mode].cache.k_cache + decs[mode].cache.v_cache,
                                decs[None].cache.k_cache + decs[None].cache.v_cache):
                dst.copy_(src)
        logits = dict.fromkeys(decs, first)
        for _ in range(3):
            nxt = logits[None].argmax(-1)
            for mode in ("ops", "linear"):
                torch.testing.assert_close(logits[mode], logits[None], atol=2e-5, rtol=1e-5)
                assert torch.equal(logits[mode].argmax(-1), nxt)
            logits = {mode: dec.step(nxt) for mode, dec in decs.items()}


def test_fused_generate_matches_unfused_float16():
    model = from_config(VARIANTS["gpt-neox-parallel-pct0.5"], dtype=torch.float16, device=DEVICE)
    ids, mask = padded_batch(2, 6, model.config.vocab_size, left=[(1, 3)], seed=22)
    got = gptkernels.generate(model, ids, 6, attention_mask=mask, backend="triton")
    ref = gptkernels.generate(model, ids, 6, attention_mask=mask, backend="triton", fused=False)
    assert torch.equal(got, ref)


def test_fused_mode_choice():
    model = from_config(VARIANTS["gpt2"], device=DEVICE)
    assert fused_mode(model, 1, "triton", None) == "linear"
    assert fused_mode(model, 65, "triton", None) == "ops"  # a prefill-sized GEMM: cuBLAS
    assert fused_mode(model, 1, "torch", None) is None  # the torch backend: the unfused baseline
    assert fused_mode(model, 1, "cuda", None) is None  # no fused CUDA kernels
    assert fused_mode(model, 1, "torch", True) == "linear"  # the references
    assert fused_mode(model, 1, "triton", False) is None
    with pytest.raises(ValueError, match="fused"):
        fused_mode(model, 1, "cuda", True)
    with pytest.raises(TypeError, match="fused"):
        fused_mode(model, 1, "triton", "yes")


@pytest.mark.parametrize("variant", ["gpt2", "gpt-neox-parallel-pct0.5"])
def test_fused_decode_fp8_cache_matches_unfused(variant):
    """An fp8 KV cache: the fused decode step writes the cache as paged_append does (the same bits)
    and gives the unfused step's logits."""
    model = from_config(VARIANTS[variant], device=DEVICE)
    ids, mask = padded_batch(2, 5, model.config.vocab_size, left=[(0, 2)], seed=26)
    fp8 = torch.float8_e4m3fn
    with torch.no_grad():
        batch = pack_batch(model.config, ids, mask, op="test", force_packed=True)
        a = PagedDecoder(model, batch.lengths, 3, block_size=8, backend="triton", kv_cache_dtype=fp8, fused=False)
        b = PagedDecoder(model, batch.lengths, 3, block_size=8, backend="triton", kv_cache_dtype=fp8)
        assert b.fused == "linear"
        la = a.prefill(batch)
        for dst, src in zip(b.cache.k_cache + b.cache.v_cache + b.cache.k_scale + b.cache.v_scale,
                            a.cache.k_cache + a.cache.v_cache + a.cache.k_scale + a.cache.v_scale):
            dst.copy_(src)
        for _ in range(2):
            nxt = la.argmax(-1)
            la, lb = a.step(nxt), b.step(nxt)
            torch.testing.assert_close(lb, la, atol=2e-5, rtol=1e-5)
            for ca, cb in zip(a.cache.k_cache + a.cache.v_cache, b.cache.k_cache + b.cache.v_cache):
                assert torch.equal(ca.view(torch.uint8), cb.view(torch.uint8))


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_rotary_append_fp8_cache_is_paged_append(dtype):
    """fp8: the same bytes as apply_rotary then paged_append with the scales (paged.py's rounding)."""
    b, hq, hkv, d = 3, 4, 2, 64
    g = _gen(27)
    q, k, v = (randn(b, h, d, dtype=dtype, generator=g, scale=30.0) for h in (hq, hkv, hkv))
    kc = torch.zeros(6, 8, hkv, d, dtype=torch.float8_e4m3fn, device=DEVICE)
    vc = torch.zeros_like(kc)
    ks = torch.tensor([0.05, 0.2], device=DEVICE)
    vs = torch.tensor(0.1, device=DEVICE)
    table = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32, device=DEVICE)
    pos = torch.tensor([3, 9, 15], device=DEVICE)
    cos, sin = gptkernels.rotary_cos_sin(32, 32, device=DEVICE)
    for backend in ("triton", "torch"):
        kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        with torch.no_grad():
            q1 = rotary_append(q, k, v, kc1, vc1, table, pos, cos, sin, k_scale=ks, v_scale=vs, backend=backend)
            q2, k2 = gptkernels.apply_rotary(q[:, None], k[:, None], cos, sin, positions=pos[:, None],
                                             backend=backend)
            slots = table.long().gather(1, (pos // 8)[:, None])[:, 0] * 8 + pos % 8
            gptkernels.paged_append(k2[:, 0], v, kc2, vc2, slots, k_scale=ks, v_scale=vs, backend=backend)
        assert torch.equal(q1, q2[:, 0]), backend
        assert torch.equal(kc1.view(torch.uint8), kc2.view(torch.uint8)), backend
        assert torch.equal(vc1.view(torch.uint8), vc2.view(torch.uint8)), backend


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    q, kc, vc, k, v, seqlens, _ = _kv_inputs("dense", 1, 1, torch.float32)
    table = torch.zeros(3, 2, dtype=torch.int32)
    cos, sin = gptkernels.rotary_cos_sin(16, 64)
    fa = gptkernels.flash_attn_with_kvcache
    cases = [
        (ValueError, "q must have 4", lambda: fa(q[:, 0], kc, vc, k, v, cache_seqlens=seqlens)),
        (ValueError, "pass both k and v", lambda: fa(q, kc, vc, k, None, cache_seqlens=seqlens)),
        (ValueError, "rotary_cos/rotary_sin need the new k", lambda: fa(q, kc, vc, rotary_cos=cos, rotary_sin=sin,
                                                                          cache_seqlens=seqlens)),
        (ValueError, "pass both rotary_cos", lambda: fa(q, kc, vc, k, v, cos, None, cache_seqlens=seqlens)),
        (ValueError, "cache_seqlens is required", lambda: fa(q, kc, vc, k, v)),
        (TypeError, "cache_seqlens must be an int", lambda: fa(q, kc, vc, cache_seqlens=[1, 2, 3])),
        (TypeError, "cache_seqlens must have dtype", lambda: fa(q, kc, vc, k, v, cache_seqlens=seqlens.float())),
        (ValueError, r"cache_seqlens.shape\[0\]", lambda: fa(q, kc, vc, k, v, cache_seqlens=seqlens[:2])),
        (TypeError, "k_cache must have q's dtype", lambda: fa(q, kc.half(), vc.half(), k, v, cache_seqlens=seqlens)),
        (ValueError, "k_cache and v_cache must have the same shape", lambda: fa(q, kc, vc[:, :8], k, v,
                                                                                  cache_seqlens=seqlens)),
        (ValueError, "k must be", lambda: fa(q, kc, vc, k[:, :, :1], v[:, :, :1], cache_seqlens=seqlens)),
        (ValueError, "cache_batch_idx is for a dense cache", lambda: fa(
            q, kc[:, :8], vc[:, :8], k, v, cache_seqlens=seqlens, block_table=table,
            cache_batch_idx=seqlens)),
        (ValueError, "cache_leftpad is for a dense cache", lambda: fa(
            q, kc[:, :8], vc[:, :8], k, v, cache_seqlens=seqlens, block_table=table, cache_leftpad=seqlens)),
        (ValueError, "stride", lambda: fa(q, kc[:, :20], vc[:, :20], k, v, cache_seqlens=seqlens)),
        (ValueError, "window=4 needs causal", lambda: fa(q, kc, vc, k, v, cache_seqlens=seqlens, causal=False,
                                                          window=4)),
        (ValueError, "window must be >= 1", lambda: fa(q, kc, vc, k, v, cache_seqlens=seqlens, window=0)),
        (TypeError, "rotary_interleaved must be a bool", lambda: fa(q, kc, vc, k, v, cache_seqlens=seqlens,
                                                                     rotary_interleaved=1)),
        (ValueError, r"rotary_cos/rotary_sin must be \(max_positions", lambda: fa(
            q, kc, vc, k, v, *gptkernels.rotary_cos_sin(64, 8), cache_seqlens=seqlens)),
        (TypeError, "block_table must have dtype", lambda: fa(q, kc[:, :8], vc[:, :8], k, v, cache_seqlens=seqlens,
                                                               block_table=table.long())),
        (ValueError, "block size of k_cache", lambda: fa(q, kc[:, :6], vc[:, :6], k, v, cache_seqlens=seqlens,
                                                          block_table=table)),
    ]
    fp8 = torch.float8_e4m3fn
    cases += [
        (ValueError, "k_scale is required", lambda: fa(q, kc.to(fp8), vc.to(fp8), k, v, cache_seqlens=seqlens)),
        (ValueError, "k_scale is for an fp8 cache", lambda: fa(q, kc, vc, k, v, cache_seqlens=seqlens,
                                                               k_scale=torch.ones(2), v_scale=torch.ones(2))),
        (TypeError, "v_cache must have k_cache's dtype", lambda: fa(q, kc.to(fp8), vc, k, v, cache_seqlens=seqlens,
                                                                    k_scale=torch.ones(2), v_scale=torch.ones(2))),
    ]
    for exc, msg, call in cases:
        with pytest.raises(exc, match=msg):
            call()
    with pytest.raises(ValueError, match="flash_attn_with_kvcache"):
        fa(q[:, 0], kc, vc)


def test_fused_ops_bad_input():
    x = randn(2, 16)
    w = randn(8, 16)
    kc, vc = _cache(4, 8, 1, 4, torch.float32, 23)
    t = torch.zeros(2, 1, dtype=torch.int32)
    pos = torch.zeros(2, dtype=torch.int64)
    cases = [
        (ValueError, "fused_linear: x's last dim", lambda: fused_linear(x, w[:, :8])),
        (ValueError, r"fused_linear: bias.shape\[0\]", lambda: fused_linear(x, w, torch.zeros(3))),
        (ValueError, "activation must be None or one of", lambda: fused_linear(x, w, activation="tanh")),
        (TypeError, "norm must be a", lambda: fused_linear(x, w, norm=torch.ones(16))),
        (ValueError, "norm weight must have 16", lambda: fused_linear(x, w, norm=(torch.ones(3), None, 1e-5))),
        (ValueError, "norm eps", lambda: fused_linear(x, w, norm=(None, None, -1.0))),
        (ValueError, "residual must be shaped", lambda: fused_linear(x, w, residual=x)),
        (ValueError, "cannot hold the k and v", lambda: fused_linear(x, w[:4], cache=(kc, vc, t, pos))),
        (ValueError, "a cache append and a residual", lambda: fused_linear(x, w, residual=randn(2, 8),
                                                                           cache=(kc, vc, t, pos))),
        (TypeError, "fused_linear: weight must have the same dtype", lambda: fused_linear(x, w.half())),
        (ValueError, "add_layer_norm: d1 must have x's shape", lambda: add_layer_norm(x, x[:1], norms=[(None, None, 0.0)])),
        (TypeError, "norms must be a list", lambda: add_layer_norm(x, norms=(None, None, 1e-5))),
        (ValueError, "pass d1 before d2", lambda: add_layer_norm(x, None, x, norms=[(None, None, 1e-5)])),
        (ValueError, "both have", lambda: add_layer_norm(x, norms=[(torch.ones(16), None, 1e-5), (None, None, 1e-5)])),
        (ValueError, "rotary_append: k must have at most", lambda: rotary_append(
            randn(2, 1, 1, 4), randn(2, 2, 1, 4), randn(2, 2, 1, 4), kc, vc, t, pos)),
        (ValueError, "rotary_append: pass both cos and sin", lambda: rotary_append(
            randn(2, 1, 4), randn(2, 1, 4), randn(2, 1, 4), kc, vc, t, pos, torch.ones(4, 2))),
        (ValueError, r"rotary_append: starts.shape\[0\]", lambda: rotary_append(
            randn(2, 1, 4), randn(2, 1, 4), randn(2, 1, 4), kc, vc, t, pos[:1])),
        (ValueError, r"k.shape\[1\] must be 1 \(k_cache.shape\[2\]", lambda: rotary_append(
            randn(2, 2, 4), randn(2, 2, 4), randn(2, 2, 4), kc, vc, t, pos)),
    ]
    for exc, msg, call in cases:
        with pytest.raises(exc, match=msg):
            call()
    with pytest.raises(BackendUnavailableError):
        fused_linear(x, w, backend="cuda")  # no CUDA GPU here, or no fused CUDA kernel there
    xg = x.clone().requires_grad_()
    with pytest.raises(BackendUnavailableError, match="not differentiable"):
        fused_linear(xg, w, backend="triton")


def test_fused_ops_trace_without_graph_breaks():
    """The custom ops have fake implementations: torch.compile(fullgraph=True) traces each."""
    x = randn(3, 32)
    w = randn(24, 32, scale=0.2)
    kc, vc = _cache(4, 8, 2, 4, torch.float32, 24)
    t = torch.arange(6, dtype=torch.int32).reshape(3, 2) % 4
    pos = torch.tensor([0, 3, 9])

    def step(x):
        _, y = add_layer_norm(x, x, norms=[(None, None, 1e-5)])
        qkv = fused_linear(y, w, None, activation="relu")
        q, k, v = qkv.view(3, 3, 2, 4).unbind(1)
        q = rotary_append(q, k, v, kc, vc, t, pos)
        return fused_linear(y, w, None, cache=(kc, vc, t, pos)), q

    with torch.no_grad():
        eager = step(x)
        traced = torch.compile(step, fullgraph=True, backend="eager")(x)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------
# GPU (bfloat16 too)
# --------------------------------------------------------------------------------------------------


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_fused_ops_bf16(dtype):
    for case in APPEND_CASES:
        test_rotary_append_parity(case, dtype)
    for case in LINEAR_CASES:
        test_fused_linear_parity(case, dtype)
    test_add_layer_norm_parity(2, 2, True, dtype)
    for case in KV_CASES:
        test_flash_attn_with_kvcache_parity(case, dtype)


@requires_gpu
def test_gpu_fused_decode_cuda_graph_bf16():
    """The fused decode step captured in a CUDA graph: the same tokens as the unfused one (bf16,
    pythia-like and GPT-2-like tiny models, batch 1 and 5)."""
    for variant in ("gpt-neox-parallel-pct0.5", "gpt2"):
        model = from_config(VARIANTS[variant], dtype=torch.bfloat16, device="cuda")
        for batch in (1, 5):
            ids, mask = padded_batch(batch, 9, model.config.vocab_size, left=[(0, 3)] if batch > 1 else [],
                                     seed=25, device="cuda")
            got = gptkernels.generate(model, ids, 16, attention_mask=mask)  # fused, CUDA graph
            ref = gptkernels.generate(model, ids, 16, attention_mask=mask, fused=False)
            agree = (got == ref).float().mean().item()
            assert agree >= 0.9, (variant, batch, agree)  # bf16 rounding may flip a late near-tie
            assert torch.equal(got[:, :13], ref[:, :13]), (variant, batch)
