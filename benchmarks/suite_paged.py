"""Paged KV cache (issue 4): decode, bf16, Hq = 32, Hkv = 8, D = 128, block size 16, in GB/s.

Effective bandwidth = bytes of K and V the step must read / time, against the copy bandwidth of the
same run, at batch 64 x context 4k and batch 1 x context 128k (plus a context sweep in the full run),
and across block sizes 16..256. Blocks are shuffled in the cache (a real allocator's order). Beside
our backends: torch SDPA per backend on a gathered dense cache (the gather is not timed: it is the
layout those kernels need), FlexAttention's paged attention (compiled) where it runs, and the eager
reference. Plus ``paged_append`` writing a 64 x 1k prefill into the cache.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from . import formulas, peers, timing
from .checks import compare, exact
from .harness import Session, free_memory
from .results import Table

HQ, HKV, D, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16
EAGER_MAX_TOKENS = 64 * 4096  # the eager reference gathers each sequence: fine up to this


def config(quick: bool) -> dict:
    if quick:
        return {"b64": (4096,), "b1": (131072,), "blocks": (16, 64, 256), "flex_blocks": False}
    return {"b64": (1024, 2048, 4096, 8192), "b1": (8192, 32768, 131072), "blocks": (16, 32, 64, 128, 256),
            "flex_blocks": True}


DECODE_IMPLS = ("gptkernels triton", "gptkernels cuda", "gptkernels torch (eager)",
                *(f"torch sdpa {b} (dense cache)" for b in peers.SDPA_BACKENDS), "flexattention paged (compiled)")
APPEND_IMPLS = ("gptkernels triton", "gptkernels cuda", "gptkernels torch (eager)")
APPEND_TOKENS = 64 * 1024


def _decode_impls(batch: int, ctx: int, table: str, quick: bool) -> list[str]:
    names = list(DECODE_IMPLS)
    if table == "paged-blocks":  # the block size matters to paged kernels only
        names = [n for n in names if n.startswith("gptkernels") and "torch" not in n]
        if config(quick)["flex_blocks"]:
            names.append("flexattention paged (compiled)")
    if batch * ctx > EAGER_MAX_TOKENS and "gptkernels torch (eager)" in names:
        names.remove("gptkernels torch (eager)")
    return names


def _jobs(quick: bool):
    cfg = config(quick)
    for ctx in cfg["b64"]:
        yield "paged-b64", 64, ctx, BLOCK, ctx
    for ctx in cfg["b1"]:
        yield "paged-b1", 1, ctx, BLOCK, ctx
    for bs in cfg["blocks"]:
        yield "paged-blocks", 64, 4096, bs, bs


def planned_rows(quick: bool) -> int:
    return sum(len(_decode_impls(b, c, t, quick)) for t, b, c, _, _ in _jobs(quick)) + len(APPEND_IMPLS)


def tables(quick: bool) -> list[Table]:
    f = formulas.paged_kv_bytes([1], 1, 1, 2).formula
    common = dict(suite="paged", unit="GB/s", formula=f, ceiling="copy", plot="line")
    return [
        Table(id="paged-b64", title=f"paged_decode, bf16, batch 64, Hq={HQ}, Hkv={HKV}, D={D}, block {BLOCK}",
              x="context", **common),
        Table(id="paged-b1", title=f"paged_decode, bf16, batch 1, Hq={HQ}, Hkv={HKV}, D={D}, block {BLOCK}",
              x="context", **common),
        Table(id="paged-blocks", title=f"paged_decode across block sizes, bf16, batch 64 x context 4096",
              x="block size", **common),
        Table(id="paged-append", suite="paged", title=f"paged_append, bf16, {APPEND_TOKENS} tokens "
              f"(64 x 1k prefill), Hkv={HKV}, D={D}, block {BLOCK}", x="T", unit="GB/s",
              formula=formulas.paged_append_bytes(1, 1, 1, 2).formula, ceiling="copy", plot=None),
    ]


class DecodeCase:
    """A paged cache with shuffled blocks, every sequence ``ctx`` tokens long, and its reference."""

    def __init__(self, batch: int, ctx: int, block: int):
        self.batch, self.ctx, self.block = batch, ctx, block
        self.nblk = -(-ctx // block)
        self.num_blocks = batch * self.nblk
        count = formulas.paged_kv_bytes([ctx] * batch, HKV, D, 2)
        self.bytes = count.value
        self.params = {"B": batch, "context": ctx, "block_size": block, "Hq": HQ, "Hkv": HKV, "D": D,
                       "dtype": "bfloat16"}
        self.sets = [self._make() for _ in range(timing.n_sets(count.value))]
        self._ref = None
        self._dense = {}

    def _make(self):
        cache = (self.num_blocks, self.block, HKV, D)
        table = torch.randperm(self.num_blocks, device=timing.DEVICE).view(self.batch, self.nblk).to(torch.int32)
        return SimpleNamespace(q=torch.randn(self.batch, HQ, D, device=timing.DEVICE, dtype=DTYPE),
                               k=torch.randn(cache, device=timing.DEVICE, dtype=DTYPE),
                               v=torch.randn(cache, device=timing.DEVICE, dtype=DTYPE),
                               table=table,
                               lens=torch.full((self.batch,), self.ctx, device=timing.DEVICE, dtype=torch.int32))

    def _rows(self):
        return sorted({0, self.batch - 1})

    def reference(self):
        """float64 reference and eager bf16 for the first and last sequence (a compact copy of their blocks)."""
        if self._ref is None:
            from gptkernels import reference

            s0, rows = self.sets[0], self._rows()
            blocks = s0.table[rows].long().flatten()
            table = torch.arange(blocks.numel(), device=timing.DEVICE, dtype=torch.int32).view(len(rows), self.nblk)
            k, v, q, lens = s0.k[blocks], s0.v[blocks], s0.q[rows], s0.lens[rows]
            ref = reference.paged_decode(q.double(), k.double(), v.double(), table, lens)
            base = reference.paged_decode(q, k, v, table, lens, upcast=False)
            self._ref = (ref, base)
        return self._ref

    def check(self, out, _s0):
        ref, base = self.reference()
        return compare([("out", out[self._rows()], ref, base)])

    def dense(self, s):
        """(B, Hkv, ctx, D) K and V gathered from the paged cache, for SDPA (built once per set)."""
        key = id(s)
        if key not in self._dense:
            def gather(cache):
                x = cache[s.table.long()].reshape(self.batch, self.nblk * self.block, HKV, D)[:, : self.ctx]
                return x.transpose(1, 2).contiguous()

            self._dense[key] = (gather(s.k), gather(s.v))
        return self._dense[key]

    def drop_dense(self):
        self._dense.clear()


def _flex_paged(case: DecodeCase):
    """FlexAttention over the same paged cache through torch's PagedAttention helper (experimental).

    Its physical cache layout is (1, Hkv, num_blocks * block, D): the same blocks, permuted once
    (not timed), and its page table is our block table.
    """
    from torch.nn.attention.experimental._paged_attention import PagedAttention

    flex = peers.flex_compiled()
    state = {}

    def prepare(s):
        pa = PagedAttention(case.num_blocks, case.block, case.batch, device=timing.DEVICE)
        table = s.table.long()
        pa.page_table[:, : case.nblk] = table
        logical = torch.arange(case.nblk, device=timing.DEVICE).expand(case.batch, -1)
        pa.physical_to_logical.scatter_(1, table, logical)
        lens = s.lens.long()

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]

        bm = peers.flex_block_mask(mask_mod, 1, case.nblk * case.block, s.q.device, batch=case.batch,
                                   block_size=(128, case.block))
        try:
            bm = pa.convert_logical_block_mask(bm, kv_len=lens)
        except TypeError:  # older torch: no kv_len argument (mask_mod above bounds the length anyway)
            bm = pa.convert_logical_block_mask(bm)

        def phys(cache):
            return cache.permute(2, 0, 1, 3).reshape(1, HKV, case.num_blocks * case.block, D).contiguous()

        return SimpleNamespace(q=s.q[:, :, None], k=phys(s.k), v=phys(s.v), mask=bm)

    def run(s):
        key = id(s)
        if key not in state:
            state[key] = prepare(s)
        p = state[key]
        return flex(p.q, p.k, p.v, block_mask=p.mask, enable_gqa=True)[:, :, 0]

    def setup(sets):
        for s in sets:
            state[id(s)] = prepare(s)
        return sets

    return run, setup, state


def _decode_fn(impl: str, case: DecodeCase):
    """(run, setup, cleanup) of one decode implementation."""
    import gptkernels

    if impl.startswith("gptkernels "):
        backend = impl.split()[1]
        return (lambda s: gptkernels.paged_decode(s.q, s.k, s.v, s.table, s.lens, backend=backend)), None, None
    if impl.startswith("torch sdpa "):
        name = impl.split()[2]

        def run(s):
            k, v = case.dense(s)
            return peers.sdpa(name, s.q[:, :, None], k, v, is_causal=False, enable_gqa=True)[:, :, 0]

        def setup(sets):
            for s in sets:
                case.dense(s)
            return sets

        return run, setup, case.drop_dense
    if impl.startswith("flexattention paged"):
        run, setup, state = _flex_paged(case)
        return run, setup, state.clear
    raise ValueError(f"unknown paged decode implementation {impl!r}")


def _append(sess: Session) -> None:
    import gptkernels

    t, table_id = APPEND_TOKENS, "paged-append"
    impls = [i for i in APPEND_IMPLS if sess.wanted(table_id, str(t), i)]
    if not impls:
        return
    count = formulas.paged_append_bytes(t, HKV, D, 2)
    params = {"T": t, "Hkv": HKV, "D": D, "block_size": BLOCK, "dtype": "bfloat16"}
    try:
        num_blocks = t // BLOCK
        blocks = torch.randperm(num_blocks, device=timing.DEVICE)
        tok = torch.arange(t, device=timing.DEVICE)
        slots = blocks[tok // BLOCK] * BLOCK + tok % BLOCK  # each block filled in order, blocks shuffled
        sets = [SimpleNamespace(k=torch.randn(t, HKV, D, device=timing.DEVICE, dtype=DTYPE),
                                v=torch.randn(t, HKV, D, device=timing.DEVICE, dtype=DTYPE),
                                kc=torch.randn(num_blocks, BLOCK, HKV, D, device=timing.DEVICE, dtype=DTYPE),
                                vc=torch.randn(num_blocks, BLOCK, HKV, D, device=timing.DEVICE, dtype=DTYPE))
                for _ in range(timing.n_sets(count.value / 2))]
    except Exception as e:
        for impl in impls:
            sess.fail(table_id, str(t), impl, e, x=t, ours=True)
        return

    def check(_, s):
        kc, vc = s.kc.view(-1, HKV, D), s.vc.view(-1, HKV, D)
        a, b = exact("k_cache", kc[slots], s.k), exact("v_cache", vc[slots], s.v)
        return a if not a.ok else b

    for impl in impls:
        backend = impl.split()[1]
        with torch.no_grad():
            sess.measure(table_id, str(t), impl, ours=True, x=t, params=params, bytes=count.value, sets=sets,
                         run=lambda s, b=backend: gptkernels.paged_append(s.k, s.v, s.kc, s.vc, slots, backend=b),
                         check=check)


def run(sess: Session, quick: bool) -> None:
    for t in tables(quick):
        sess.table(t)
    for table_id, batch, ctx, block, x in _jobs(quick):
        label = str(x)
        names = [n for n in _decode_impls(batch, ctx, table_id, quick) if sess.wanted(table_id, label, n)]
        if not names:  # none of its rows is in this run's plan: the cache is not even built
            continue
        try:
            case = DecodeCase(batch, ctx, block)
        except Exception as e:
            for impl in names:
                sess.fail(table_id, label, impl, e, x=x, ours=impl.startswith("gptkernels"))
            continue
        for impl in names:
            common = dict(ours=impl.startswith("gptkernels"), x=x, params=case.params, bytes=case.bytes)
            if impl.startswith("flexattention") and not sess.budget.allows(timing.COMPILE_S["flex paged"]):
                sess.skip(table_id, label, impl,
                          sess.budget.why_not(timing.COMPILE_S["flex paged"], "a FlexAttention compile"), **common)
                continue
            try:
                fn, setup, cleanup = _decode_fn(impl, case)
            except Exception as e:
                sess.fail(table_id, label, impl, e, **common)
                continue
            try:
                with torch.no_grad():
                    sess.measure(table_id, label, impl, run=fn, sets=case.sets, check=case.check, setup=setup,
                                 **common)
            finally:
                if cleanup is not None:
                    cleanup()
        del case
        free_memory()
    _append(sess)
    free_memory()
