"""The torch backend (gptkernels.reference) against the kernels on inputs the public ops accept but
do not check outside GPTKERNELS_DEBUG=1: bad block-table entries, lengths past the table, slots
outside the cache, rotary positions outside the table, empty batches, strided inputs.

The kernels mask such indices (a key contributes nothing, a slot is not written, a token is left
unrotated); the reference must do exactly the same, so every backend gives the same answer. Each
case is checked on both backends against an expectation written out by hand (not by the reference),
Triton in the interpreter on CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

import gptkernels
from tests.helpers import DEVICE, assert_parity, randn

BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    # The debug checks would refuse these inputs before any backend sees them.
    monkeypatch.delenv("GPTKERNELS_DEBUG", raising=False)


def _attend_valid(q, keys, values, visible, scale):
    """float64 softmax attention of one query row (H, D) over the keys marked ``visible``: the
    expectation, written without the reference. No visible key: zeros and lse -inf."""
    q, keys, values = q.double(), keys.double(), values.double()
    idx = [j for j, ok in enumerate(visible) if ok]
    if not idx:
        return torch.zeros_like(q), torch.full((q.shape[0],), float("-inf"), dtype=torch.float64)
    k, v = keys[idx], values[idx]                    # (n, Hkv, D)
    group = q.shape[0] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("hd,nhd->hn", q, k) * scale
    return torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v), torch.logsumexp(s, -1)


def _paged_case(dtype, *, num_blocks=5, block_size=8, hkv=2, group=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    kc = randn(num_blocks, block_size, hkv, d, dtype=dtype, generator=g)
    vc = randn(num_blocks, block_size, hkv, d, dtype=dtype, generator=g)
    return kc, vc, g


def _key_ok(table_row, length, num_blocks, block_size):
    """Which of positions [0, length) a kernel attends: page inside the row, entry in the cache."""
    ok = []
    for p in range(length):
        page = p // block_size
        ok.append(page < len(table_row) and 0 <= table_row[page] < num_blocks)
    return ok


def _gathered(cache, table_row, length, block_size):
    rows = []
    for p in range(length):
        page = p // block_size
        blk = table_row[page] if page < len(table_row) else 0
        blk = blk if 0 <= blk < cache.shape[0] else 0
        rows.append(cache[blk, p % block_size])
    return torch.stack(rows) if rows else cache.new_zeros((0, *cache.shape[2:]))


# Tables with entries the kernels mask: negative ids (which used to wrap around to the last blocks
# on the torch backend), ids >= num_blocks (an IndexError there), lengths past the table's capacity
# (an IndexError) and negative lengths.
TABLES = [
    ([[0, -1, 2], [4, 3, 1]], [20, 17]),            # -1 in the middle of a sequence
    ([[-3, 1, 2], [5, 7, 0]], [24, 12]),            # -3 (would read block 2), 5 and 7 >= 5 blocks
    ([[0, 1, 2], [3, 4, 1]], [30, -4]),             # 30 > 3 blocks x 8: keys past 24 masked; -4 -> 0
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("case", range(len(TABLES)))
def test_paged_decode_masks_bad_indices(backend, window, case):
    dtype = torch.float32
    kc, vc, g = _paged_case(dtype)
    rows, lens = TABLES[case]
    q = randn(2, 4, 16, dtype=dtype, generator=g)
    table = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out, lse = gptkernels.paged_decode(q, kc, vc, table, seq_lens, window=window, return_lse=True,
                                       backend=backend)
    scale = 1 / math.sqrt(16)
    for b in range(2):
        L = max(lens[b], 0)  # the decode rule: the query stays at L - 1, even past the table
        ok = _key_ok(rows[b], L, 5, 8)
        visible = [ok[j] and (window is None or j > L - 1 - window) for j in range(L)]
        want_o, want_l = _attend_valid(q[b].cpu(), _gathered(kc, rows[b], L, 8).cpu(),
                                       _gathered(vc, rows[b], L, 8).cpu(), visible, scale)
        torch.testing.assert_close(out[b].double().cpu(), want_o, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(lse[b].double().cpu(), want_l, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("varlen_q", [False, True])
@pytest.mark.parametrize("case", range(len(TABLES)))
def test_paged_flash_attn_masks_bad_indices(backend, varlen_q, case):
    """Paged keys in flash_attn: the same masking; a length is clamped to [0, the table's capacity]
    (the flash kernel's rule) and query row i sits at i + seqlen_k - seqlen_q."""
    dtype = torch.float32
    kc, vc, g = _paged_case(dtype, seed=case)
    rows, lens = TABLES[case]
    sq = 3
    q = randn(2, sq, 4, 16, dtype=dtype, generator=g)
    table = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    seqlens_k = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    kw = dict(block_table=table, seqlens_k=seqlens_k, return_lse=True, backend=backend)
    if varlen_q:
        cu = torch.tensor([0, sq, 2 * sq], dtype=torch.int32, device=DEVICE)
        out, lse = gptkernels.flash_attn(q.reshape(2 * sq, 4, 16), kc, vc, cu_seqlens_q=cu,
                                         max_seqlen_q=sq, **kw)
        out, lse = out.reshape(2, sq, 4, 16), lse.reshape(4, 2, sq).transpose(0, 1)
    else:
        out, lse = gptkernels.flash_attn(q, kc, vc, **kw)
    scale = 1 / math.sqrt(16)
    for b in range(2):
        L = min(max(lens[b], 0), 3 * 8)
        ok = _key_ok(rows[b], L, 5, 8)
        for i in range(sq):
            p = i + L - sq
            visible = [ok[j] and j <= p for j in range(L)]
            want_o, want_l = _attend_valid(q[b, i].cpu(), _gathered(kc, rows[b], L, 8).cpu(),
                                           _gathered(vc, rows[b], L, 8).cpu(), visible, scale)
            torch.testing.assert_close(out[b, i].double().cpu(), want_o, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(lse[b, :, i].double().cpu(), want_l, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_backends_agree_on_bad_indices_low_precision(backend, dtype):
    """The same masked inputs in float16 too: parity against the float64 computation."""
    kc, vc, g = _paged_case(dtype, seed=3)
    rows, lens = TABLES[1]
    q = randn(2, 4, 16, dtype=dtype, generator=g)
    table = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = gptkernels.paged_decode(q, kc, vc, table, seq_lens, backend=backend)
    ref = gptkernels.reference.paged_decode(q.double(), kc.double(), vc.double(), table, seq_lens,
                                            softmax_scale=1 / 4)
    base = gptkernels.reference.paged_decode(q, kc, vc, table, seq_lens, softmax_scale=1 / 4, upcast=False)
    assert_parity(out, ref, base)
    want = torch.stack([
        _attend_valid(q[b].cpu(), _gathered(kc, rows[b], lens[b], 8).cpu(), _gathered(vc, rows[b], lens[b], 8).cpu(),
                      _key_ok(rows[b], lens[b], 5, 8), 1 / 4)[0] for b in range(2)])
    torch.testing.assert_close(ref.cpu(), want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_append_drops_slots_outside_the_cache(backend):
    kc = torch.zeros(3, 8, 2, 4, device=DEVICE)
    vc = torch.zeros(3, 8, 2, 4, device=DEVICE)
    k, v = randn(6, 2, 4), randn(6, 2, 4)
    slots = torch.tensor([0, -1, 24, -9, 23, 100], dtype=torch.int64, device=DEVICE)  # 24 slots
    gptkernels.paged_append(k, v, kc, vc, slots, backend=backend)
    want_k, want_v = torch.zeros_like(kc), torch.zeros_like(vc)
    for t, slot in ((0, 0), (4, 23)):
        want_k[slot // 8, slot % 8], want_v[slot // 8, slot % 8] = k[t], v[t]
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_leaves_positions_outside_the_table_unrotated(backend, interleaved):
    max_pos, half, d = 16, 4, 12
    cos, sin = gptkernels.rotary_cos_sin(2 * half, max_pos, device=DEVICE)
    q, k = randn(6, 3, d), randn(6, 1, d)
    positions = torch.tensor([0, -1, 5, 16, -16, 15], device=DEVICE)
    q_out, k_out = gptkernels.apply_rotary(q, k, cos, sin, positions=positions,
                                           interleaved=interleaved, backend=backend)
    for t, p in enumerate(positions.tolist()):
        for x, out in ((q, q_out), (k, k_out)):
            if 0 <= p < max_pos:
                c, s = cos[p].double(), sin[p].double()
                xr = x[t, :, : 2 * half].double()
                a, b = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., :half], xr[..., half:])
                ra, rb = a * c - b * s, b * c + a * s
                want = torch.stack((ra, rb), -1).flatten(-2) if interleaved else torch.cat((ra, rb), -1)
                torch.testing.assert_close(out[t, :, : 2 * half].double(), want, atol=1e-6, rtol=1e-6)
            else:  # -1 used to read the last row (wrap-around), 16 raised IndexError
                assert torch.equal(out[t], x[t]), (t, p)
            assert torch.equal(out[t, :, 2 * half:], x[t, :, 2 * half:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_negative_offset_tensor(backend):
    cos, sin = gptkernels.rotary_cos_sin(8, 16, device=DEVICE)
    q = randn(2, 4, 2, 8)
    offset = torch.tensor([-2, 14], device=DEVICE)  # positions -2..1 and 14..17
    q_out, _ = gptkernels.apply_rotary(q, None, cos, sin, offset=offset, backend=backend)
    ref, _ = gptkernels.apply_rotary(q, None, cos, sin,
                                     positions=torch.tensor([[-2, -1, 0, 1], [14, 15, 16, 17]], device=DEVICE),
                                     backend="triton")
    torch.testing.assert_close(q_out, ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(q_out[0, :2], q[0, :2]) and torch.equal(q_out[1, 2:], q[1, 2:])


# --------------------------------------------------------------------------------------------------
# Empty batches
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_batch_zero(backend):
    """Batch 0: the empty result (the torch backend raised `stack expects a non-empty TensorList`)."""
    kc, vc, _ = _paged_case(torch.float32)
    table = torch.zeros(0, 2, dtype=torch.int32, device=DEVICE)
    lens = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    out, lse = gptkernels.paged_decode(randn(0, 4, 16), kc, vc, table, lens, return_lse=True,
                                       backend=backend)
    assert out.shape == (0, 4, 16) and lse.shape == (0, 4) and lse.dtype == torch.float32
    out, lse = gptkernels.flash_attn(randn(0, 3, 4, 16), kc, vc, block_table=table, seqlens_k=lens,
                                     return_lse=True, backend=backend)
    assert out.shape == (0, 3, 4, 16) and lse.shape == (0, 4, 3)


# --------------------------------------------------------------------------------------------------
# Contiguous outputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_are_contiguous_for_strided_inputs(backend):
    """Strided inputs (views of a fused projection, transposed layouts) give contiguous outputs on
    every backend (the torch backend returned a transposed view for dense attention)."""
    qkv = randn(2, 8, 3, 4, 16)                          # (B, S, q|k|v, H, D): a fused projection
    q, k, v = qkv.unbind(2)
    out, lse = gptkernels.flash_attn(q, k, v, return_lse=True, backend=backend)
    assert out.is_contiguous() and lse.is_contiguous()
    qt = randn(2, 4, 8, 16).transpose(1, 2)              # (B, S, H, D) view of (B, H, S, D)
    out = gptkernels.flash_attn(qt, k, v, causal=False, backend=backend)
    assert out.is_contiguous()
    cos, sin = gptkernels.rotary_cos_sin(16, 32, device=DEVICE)
    q_out, k_out = gptkernels.apply_rotary(q, k, cos, sin, backend=backend)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    kc, vc, g = _paged_case(torch.float32)
    table = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 2]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([9, 3, 16, 1], dtype=torch.int32, device=DEVICE)
    qd = randn(4, 4, 16, generator=g).transpose(0, 1)    # (4 sequences, 4 heads, 16), strided
    out, lse = gptkernels.paged_decode(qd, kc, vc, table, lens, return_lse=True, backend=backend)
    assert out.is_contiguous() and lse.is_contiguous()


# --------------------------------------------------------------------------------------------------
# seq_lens past the block table, with a window reaching into the table (the decode rule)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_window_past_the_table_torch_vs_triton(num_splits):
    """seq_lens longer than the table holds (3 blocks of 8 = 24 keys) with a window that still
    overlaps the table: the query stays at L - 1 (it is not moved to the table's end, which would
    shift its window onto keys it does not see), and only the window's keys the table holds count.
    torch and triton agree with each other and with that expectation; the cuda backend follows the
    same rule (tests/test_cuda_emulated.py)."""
    kc, vc, g = _paged_case(torch.float32)
    rows, lens, window = [[0, 1, 2], [3, 4, 1]], [26, 27], 5
    q = randn(2, 4, 16, generator=g)
    table = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    got = {be: gptkernels.paged_decode(q, kc, vc, table, seq_lens, window=window, num_splits=num_splits,
                                       return_lse=True, backend=be) for be in BACKENDS}
    torch.testing.assert_close(got["triton"], got["torch"], atol=2e-5, rtol=1e-5)
    for b, L in enumerate(lens):  # keys L - 5 .. L - 1 that lie below 24: 21-23, then 22-23
        visible = [L - window <= j < 24 for j in range(L)]
        want_o, want_l = _attend_valid(q[b].cpu(), _gathered(kc, rows[b], L, 8).cpu(),
                                       _gathered(vc, rows[b], L, 8).cpu(), visible, 1 / math.sqrt(16))
        assert sum(visible) == 24 - (L - window)
        for be in BACKENDS:
            torch.testing.assert_close(got[be][0][b].double().cpu(), want_o, atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(got[be][1][b].double().cpu(), want_l, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# The attention mask rule (reference.attention_mask): every window form against the formula written
# out by hand, query row i at p = i + Sk - Sq sees key j iff p - left <= j <= p + right (-1: unbounded)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sq, sk", [(5, 5), (3, 8), (8, 3), (1, 6), (6, 1)])
def test_attention_mask_window_forms(sq, sk):
    from gptkernels.reference import attention_mask

    def by_hand(left, right, bottom_right=True):
        shift = sk - sq if bottom_right else 0
        return torch.tensor([[(left < 0 or j >= i + shift - left) and (right < 0 or j <= i + shift + right)
                              for j in range(sk)] for i in range(sq)])

    forms = [  # (causal, window) -> FlashAttention's (left, right)
        ((True, None), (-1, 0)), ((False, None), (-1, -1)), ((True, 1), (0, 0)), ((True, 3), (2, 0)),
        ((False, (2, 1)), (2, 1)), ((False, (0, 0)), (0, 0)), ((False, (-1, 2)), (-1, 2)),
        ((False, (1, -1)), (1, -1)), ((False, (-1, -1)), (-1, -1)), ((False, (0, 9)), (0, 9)),
        ((True, (2, 4)), (2, 0)),  # causal sets right = 0, as FlashAttention does
    ]
    for (causal, window), (left, right) in forms:
        mask = attention_mask(sq, sk, causal=causal, window=window)
        want = by_hand(left, right)
        assert (mask is None and bool(want.all())) or torch.equal(mask, want), (causal, window)
    top_left = attention_mask(sq, sk, causal=True, window=2, bottom_right=False)
    assert torch.equal(top_left, by_hand(1, 0, bottom_right=False))
