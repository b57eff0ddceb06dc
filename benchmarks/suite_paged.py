"""Paged KV cache (issue 4): decode, bf16, Hq = 32, Hkv = 8, D = 128, block size 16, in GB/s.

Effective bandwidth = bytes of K and V the step must read / time, against the copy bandwidth of the
same run, at batch 64 x context 4k and batch 1 x context 128k (plus a context sweep in the full run),
and across block sizes 16..256. Blocks are shuffled in the cache (a real allocator's order). Beside
our backends: torch SDPA per backend on a gathered dense cache (the gather is not timed: it is the
layout those kernels need), FlexAttention's paged attention (compiled) where it runs, and the eager
reference. Plus ``paged_append`` writing a 64 x 1k prefill into the cache.

fp8 KV cache (issue 16): the same 64 x 4k decode over a float8_e4m3fn copy of the cache (per-KV-head
scales, dequantized in the kernel) beside the bf16 cache, each credited with its own K/V bytes (fp8
reads half): the target is >= 1.7x bf16's speed. And, for the quantization table (quant-ppl),
:func:`cache_ppl_rows`: the perplexity of the tiny trained checkpoint when the decode steps read an
fp8 cache (scales calibrated from the prefill, as ``generate`` does) vs a float one.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from . import formulas, peers, timing
from .checks import compare, exact
from .harness import Session, _short, classify, free_memory
from .results import Row, Table
from .suite_attention import alibi_slopes

HQ, HKV, D, BLOCK = 32, 8, 128, 16
DTYPE = torch.bfloat16
EAGER_MAX_TOKENS = 64 * 4096  # the eager reference gathers each sequence: fine up to this


def config(quick: bool) -> dict:
    if quick:
        return {"b64": (4096,), "b1": (131072,), "blocks": (16, 64, 256, 1, 1024), "flex_blocks": False}
    # block sizes beyond 16..256 (issue 19: 1..1024) after the issue-4 ones, which its target reads
    return {"b64": (1024, 2048, 4096, 8192), "b1": (8192, 32768, 131072),
            "blocks": (16, 32, 64, 128, 256, 1, 4, 512, 1024), "flex_blocks": True}


DECODE_IMPLS = ("gptkernels triton", "gptkernels cuda", "gptkernels torch (eager)",
                *(f"torch sdpa {b} (dense cache)" for b in peers.SDPA_BACKENDS), "flexattention paged (compiled)")
APPEND_IMPLS = ("gptkernels triton", "gptkernels cuda", "gptkernels torch (eager)")
APPEND_TOKENS = 64 * 1024
#: fp8 vs bf16 cache: batch 64 x this context (the 64 x 4k decode case of paged-b64, reused), each
#: cache dtype a case of the table, the Triton kernels (the CUDA backend has no fp8 path).
FP8_CTX = 4096
FP8_CASES = ("bf16 cache", "fp8 cache")
FP8_IMPL = "gptkernels triton"


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
    return (sum(len(_decode_impls(b, c, t, quick)) for t, b, c, _, _ in _jobs(quick)) + len(APPEND_IMPLS)
            + len(FP8_CASES) + sum(len(feature_impls(f)) for f in FEATURE_CASES)
            + len(KV_CASES) * len(KV_IMPLS))


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
        Table(id="paged-fp8", suite="paged", x="cache dtype", unit="GB/s", ceiling="copy", plot="bar",
              title=f"paged_decode over an fp8 (float8_e4m3fn) vs a bf16 cache, bf16 queries, batch 64 x "
                    f"context {FP8_CTX}, Hq={HQ}, Hkv={HKV}, D={D}, block {BLOCK}",
              formula=formulas.paged_kv_bytes([1], 1, 1, 1).formula.replace("*elem", "*elem (1 fp8, 2 bf16)"),
              note="Each cache is credited with its own K/V bytes (fp8 reads half of bf16's); target (issue 16): "
                   "the fp8 decode >= 1.7x the bf16 decode's speed. fp8 is checked against float64 over the "
                   "dequantized cache."),
        Table(id="paged-features", suite="paged", x="feature", unit="GB/s", ceiling="copy", plot="bar", formula=f,
              title=f"paged_decode with softcap {SOFTCAP:g} / ALiBi, bf16, batch 64 x context {FP8_CTX}, Hq={HQ}, "
                    f"Hkv={HKV}, D={D}, block {BLOCK}",
              note="The same K/V bytes as paged-b64's 4096 row (its figure is the plain decode's); the CUDA backend "
                   "refuses both options. SDPA: ALiBi as an additive mask over the gathered dense cache (not "
                   "timed), the 4 query heads of a KV head as 4 query rows."),
        Table(id="kvcache-decode", suite="paged", x="feature", unit="GB/s", ceiling="copy", plot="bar",
              formula=formulas.kvcache_decode_bytes(1, 1, 1, 1, 1, 1, 2, 2).formula,
              title=f"flash_attn_with_kvcache (rotary + append + decode), bf16, batch {KV_BATCH}, "
                    f"{KV_CTX - 1} cached + 1 new token, Hq={HQ}, Hkv={HKV}, D={D}, page {KV_BLOCK}",
              note="One fused call per step (FlashAttention's flash_attn_with_kvcache signature); page size 256 "
                   "because FlashAttention 2's paged cache needs a multiple of 256."),
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


def _fp8_sets(case: DecodeCase):
    """fp8 copies of the case's caches, with per-KV-head scales from their amax (as calibration would
    pick them), and the reference over the dequantized cache for the first and last sequence."""
    from gptkernels import reference
    from gptkernels.kv_cache import fp8_scale

    sets = []
    for s in case.sets:
        k_scale = fp8_scale(s.k.view(-1, HKV, D))
        v_scale = fp8_scale(s.v.view(-1, HKV, D))
        sets.append(SimpleNamespace(q=s.q, table=s.table, lens=s.lens, k_scale=k_scale, v_scale=v_scale,
                                    k=reference.quantize_fp8(s.k, k_scale), v=reference.quantize_fp8(s.v, v_scale)))
    s0, rows = sets[0], case._rows()
    blocks = s0.table[rows].long().flatten()
    table = torch.arange(blocks.numel(), device=timing.DEVICE, dtype=torch.int32).view(len(rows), case.nblk)
    args = (s0.k[blocks], s0.v[blocks], table, s0.lens[rows])
    scales = dict(k_scale=s0.k_scale, v_scale=s0.v_scale)
    ref = reference.paged_decode(s0.q[rows].double(), *args, **scales)
    base = reference.paged_decode(s0.q[rows], *args, upcast=False, **scales)
    return sets, (lambda out, _s: compare([("out", out[rows], ref, base)]))


def _fp8(sess: Session, case: DecodeCase) -> None:
    """The paged-fp8 rows: the bf16 decode of ``case`` and the same over its fp8 copy."""
    import gptkernels

    table_id = "paged-fp8"
    cases = [c for c in FP8_CASES if sess.wanted(table_id, c, FP8_IMPL)]
    if not cases:
        return
    params = dict(case.params)
    for label in cases:
        fp8 = label.startswith("fp8")
        elem = 1 if fp8 else 2
        common = dict(ours=True, params=dict(params, cache_dtype="float8_e4m3fn" if fp8 else "bfloat16"),
                      bytes=formulas.paged_kv_bytes([case.ctx] * case.batch, HKV, D, elem).value)
        try:
            if fp8:
                sets, check = _fp8_sets(case)
                run = (lambda s: gptkernels.paged_decode(s.q, s.k, s.v, s.table, s.lens, k_scale=s.k_scale,
                                                         v_scale=s.v_scale, backend="triton"))
            else:
                sets, check = case.sets, case.check
                run = (lambda s: gptkernels.paged_decode(s.q, s.k, s.v, s.table, s.lens, backend="triton"))
        except Exception as e:
            sess.fail(table_id, label, FP8_IMPL, e, **common)
            continue
        with torch.no_grad():
            row = sess.measure(table_id, label, FP8_IMPL, run=run, sets=sets, check=check, **common)
        if fp8:
            bf16 = next((r for r in sess.rows if (r.table, r.case, r.impl) == (table_id, FP8_CASES[0], FP8_IMPL)
                         and r.status == "ok"), None)
            if row.status == "ok" and bf16 is not None:
                row.extra["speedup_vs_bf16"] = bf16.ms / row.ms  # the target: >= 1.7
            del sets
            free_memory()


# --------------------------------------------------------------------------------------------------
# Perplexity with an fp8 cache (rows of suite_quant's quant-ppl table)
# --------------------------------------------------------------------------------------------------

#: Tokens of each held-out window prefilled (the scales are calibrated on them); the rest of the window
#: (64 of 256) is fed one decode step at a time, each step reading the cache. 8 windows: 512 tokens
#: scored, the same ones for both caches (decode on the eager CPU backend costs ~10 ms per sequence
#: and layer, so this stays around a minute there).
PPL_PREFIX = 192
CACHE_PPL_WINDOWS = 8


@torch.no_grad()
def cache_perplexity(model, windows: torch.Tensor, *, kv_cache_dtype=None, backend=None, prefix: int = PPL_PREFIX,
                     batch: int = 16) -> tuple[float, int]:
    """Perplexity over the tokens after ``prefix`` of each window (W, S), predicted by decode steps over
    the paged cache (teacher forcing: each step feeds the true token): (perplexity, tokens scored).
    ``kv_cache_dtype``: None (the model's dtype) or torch.float8_e4m3fn, as ``generate`` takes it."""
    from gptkernels.generation import PagedDecoder
    from gptkernels.models.inputs import pack_batch

    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i:i + batch].to(model.device)
        b, s = ids.shape
        packed = pack_batch(model.config, ids[:, :prefix], None, None, op="cache_perplexity", force_packed=True)
        dec = PagedDecoder(model, [prefix] * b, s - prefix, backend=backend, kv_cache_dtype=kv_cache_dtype)
        logits = dec.prefill(packed)
        for t in range(prefix, s):
            total += float(torch.nn.functional.cross_entropy(logits.float(), ids[:, t], reduction="sum"))
            count += b
            if t + 1 < s:
                logits = dec.step(ids[:, t])
    return float(torch.exp(torch.tensor(total / count))), count


CACHE_PPL_IMPLS = ("float cache, decode", "fp8 e4m3 cache, decode")


def cache_ppl_rows(model_path, device: str, dtype: torch.dtype, backend: str | None, windows: torch.Tensor,
                   case: str) -> list[Row]:
    """Two quant-ppl rows: the checkpoint at ``model_path`` scoring the tokens after the first
    PPL_PREFIX of each window through decode steps over a float cache and over an fp8 one
    (``extra["vs_float_cache"]``: the fp8 perplexity / the float cache's). The first
    CACHE_PPL_WINDOWS of ``windows``."""
    from gptkernels.models import from_pretrained

    windows = windows[:CACHE_PPL_WINDOWS]

    dname = str(dtype).replace("torch.", "")
    rows, base = [], None
    try:
        model = from_pretrained(model_path, dtype=dtype, device=device)
    except Exception as e:
        return [Row(table="quant-ppl", case=case, impl=impl, status=classify(e), ours=True, message=_short(e))
                for impl in CACHE_PPL_IMPLS]
    for impl, cache_dtype in zip(CACHE_PPL_IMPLS, (None, torch.float8_e4m3fn)):
        params = {"device": device, "dtype": dname, "backend": backend,
                  "kv_cache_dtype": "float8_e4m3fn" if cache_dtype else dname, "prefix": PPL_PREFIX,
                  "windows": int(windows.shape[0]), "window": int(windows.shape[1])}
        try:
            t0 = time.perf_counter()
            ppl, tokens = cache_perplexity(model, windows, kv_cache_dtype=cache_dtype, backend=backend)
            ms = 1e3 * (time.perf_counter() - t0)
            extra = {"tokens": tokens, "scored": f"tokens {PPL_PREFIX + 1}-{windows.shape[1]} of each window"}
            if cache_dtype is None:
                base = ppl
            elif base is not None:
                extra["vs_float_cache"] = ppl / base
            rows.append(Row(table="quant-ppl", case=case, impl=impl, status="ok", ours=True, ms=ms, value=ppl,
                            params=params, extra=extra))
        except Exception as e:
            rows.append(Row(table="quant-ppl", case=case, impl=impl, status=classify(e), ours=True,
                            message=_short(e), params=params))
    del model
    free_memory()
    return rows


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
        fp8_here = (table_id, ctx) == ("paged-b64", FP8_CTX) and any(
            sess.wanted("paged-fp8", c, FP8_IMPL) for c in FP8_CASES)
        feat_here = (table_id, ctx) == ("paged-b64", FP8_CTX) and any(
            sess.wanted("paged-features", f, i) for f in FEATURE_CASES for i in feature_impls(f))
        if not names and not fp8_here and not feat_here:  # none of its rows is planned: the cache is not built
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
        if fp8_here:  # the fp8 rows reuse this case's caches (64 x 4k)
            _fp8(sess, case)
        if feat_here:  # so do the softcap / ALiBi rows
            _features(sess, case)
        del case
        free_memory()
    _append(sess)
    free_memory()
    _kvcache(sess)
    free_memory()


# --------------------------------------------------------------------------------------------------
# Issue 19: softcap / ALiBi on the 64 x 4k decode (paged-features); the fused decode call (kvcache-decode)
# --------------------------------------------------------------------------------------------------

SOFTCAP = 30.0
FEATURE_CASES = (f"softcap {SOFTCAP:g}", "alibi")
SDPA_ALIBI = "torch sdpa efficient (dense cache, additive mask)"


def feature_impls(feature: str) -> list[str]:
    """Ours (Triton) and, for ALiBi, SDPA with an additive mask; SDPA has no soft cap, and
    FlexAttention's paged helper is left out here (its block mask, not the score, is what it pages)."""
    return ["gptkernels triton"] + ([SDPA_ALIBI] if feature == "alibi" else [])


def feature_options(feature: str, device=None) -> dict:
    if feature.startswith("softcap"):
        return {"softcap": SOFTCAP}
    return {"alibi_slopes": alibi_slopes(HQ, device)}


def _feature_check(case: DecodeCase, opts: dict):
    """The check of a feature row: float64 reference and eager bf16 over the first and last sequence."""
    from gptkernels import reference

    s0, rows = case.sets[0], case._rows()
    blocks = s0.table[rows].long().flatten()
    table = torch.arange(blocks.numel(), device=timing.DEVICE, dtype=torch.int32).view(len(rows), case.nblk)
    k, v, q, lens = s0.k[blocks], s0.v[blocks], s0.q[rows], s0.lens[rows]
    ref = reference.paged_decode(q.double(), k.double(), v.double(), table, lens, **opts)
    base = reference.paged_decode(q, k, v, table, lens, upcast=False, **opts)
    return lambda out, _s: compare([("out", out[rows], ref, base)])


def _sdpa_alibi_fn(case: DecodeCase, slopes: torch.Tensor, backend: str = "efficient"):
    """SDPA over the gathered cache with ALiBi as an additive float mask. GQA without a copy: the
    HQ // HKV query heads of a KV head are that head's query rows ((B, Hkv, G, D) x (B, Hkv, ctx, D)),
    each row with its own head's slope in the mask (1, Hkv, G, ctx)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    from gptkernels import reference

    g = HQ // HKV
    pos_k = torch.arange(case.ctx, device=timing.DEVICE)
    mask = reference.alibi_bias(slopes, torch.tensor([case.ctx - 1], device=timing.DEVICE), pos_k, torch.float32)
    mask = mask.view(1, HKV, g, case.ctx).to(DTYPE)  # (Hq, 1, ctx) -> (1, Hkv, G, ctx), head hkv * G + g

    def run(s):
        k, v = case.dense(s)
        with sdpa_kernel(peers.sdpa_backend(backend)):
            out = F.scaled_dot_product_attention(s.q.view(case.batch, HKV, g, D), k, v, attn_mask=mask)
        return out.reshape(case.batch, HQ, D)

    def setup(sets):
        for s in sets:
            case.dense(s)
        return sets

    return run, setup


def _features(sess: Session, case: DecodeCase) -> None:
    """The paged-features rows, on the 64 x 4k case's caches (its K/V bytes: the plain decode's figure
    is paged-b64's row at 4096)."""
    import gptkernels

    table_id = "paged-features"
    for feature in FEATURE_CASES:
        impls = [i for i in feature_impls(feature) if sess.wanted(table_id, feature, i)]
        if not impls:
            continue
        common = dict(params=dict(case.params, feature=feature), bytes=case.bytes)
        try:
            opts = feature_options(feature, timing.DEVICE)
            check = _feature_check(case, opts)
        except Exception as e:
            for impl in impls:
                sess.fail(table_id, feature, impl, e, ours=impl.startswith("gptkernels"), **common)
            continue
        for impl in impls:
            ours = impl.startswith("gptkernels")
            setup = None
            try:
                if ours:
                    run = (lambda s, o=opts: gptkernels.paged_decode(s.q, s.k, s.v, s.table, s.lens, backend="triton",
                                                                     **o))
                else:
                    run, setup = _sdpa_alibi_fn(case, opts["alibi_slopes"])
                with torch.no_grad():
                    sess.measure(table_id, feature, impl, run=run, sets=case.sets, check=check, setup=setup,
                                 ours=ours, **common)
            except Exception as e:
                sess.fail(table_id, feature, impl, e, ours=ours, **common)
            finally:
                if not ours:  # the gathered dense cache of SDPA's row
                    case.drop_dense()
        free_memory()


KV_BATCH, KV_CTX, KV_BLOCK = 16, 4096, 256
KV_CASES = ("plain", f"softcap {SOFTCAP:g}", "alibi")
KV_IMPLS = ("gptkernels triton", "flash-attn flash_attn_with_kvcache")


class KVCacheCase:
    """One decode step of flash_attn_with_kvcache: a paged cache (shuffled pages) holding KV_CTX - 1
    tokens per sequence, one new token (k, v) appended and rotated (full rotary), one query row. The
    step writes the same slot with the same values on every call, so timing it repeatedly is the same
    step. The reference (float64 and eager, first and last sequence) is taken at construction, from
    copies of their pages, before any implementation writes to the cache."""

    def __init__(self, feature: str, *, batch: int = KV_BATCH, ctx: int = KV_CTX, block: int = KV_BLOCK,
                 hq: int = HQ, hkv: int = HKV, d: int = D, dtype: torch.dtype = DTYPE):
        import gptkernels

        self.feature, self.batch, self.ctx, self.block, self.dtype = feature, batch, ctx, block, dtype
        self.hq, self.hkv, self.d = hq, hkv, d
        self.nblk = -(-ctx // block)
        self.opts = {} if feature == "plain" else (
            {"softcap": SOFTCAP} if feature.startswith("softcap") else {"alibi_slopes": alibi_slopes(hq, timing.DEVICE)})
        self.cos, self.sin = gptkernels.rotary_cos_sin(d, ctx, device=timing.DEVICE)
        count = formulas.kvcache_decode_bytes(batch, ctx - 1, 1, hq, hkv, d, formulas.dtype_bytes(dtype), d)
        self.bytes = count.value
        self.params = {"B": batch, "cached": ctx - 1, "new": 1, "Hq": hq, "Hkv": hkv, "D": d, "rotary_dim": d,
                       "page_size": block, "feature": feature, "dtype": str(dtype).replace("torch.", "")}
        self.sets = [self._make() for _ in range(timing.n_sets(count.value))]
        self._reference()

    def _make(self):
        dev, n = timing.DEVICE, self.batch * self.nblk
        cache = (n, self.block, self.hkv, self.d)
        return SimpleNamespace(
            q=torch.randn(self.batch, 1, self.hq, self.d, device=dev, dtype=self.dtype),
            k=torch.randn(self.batch, 1, self.hkv, self.d, device=dev, dtype=self.dtype),
            v=torch.randn(self.batch, 1, self.hkv, self.d, device=dev, dtype=self.dtype),
            kc=torch.randn(cache, device=dev, dtype=self.dtype), vc=torch.randn(cache, device=dev, dtype=self.dtype),
            table=torch.randperm(n, device=dev).view(self.batch, self.nblk).to(torch.int32),
            lens=torch.full((self.batch,), self.ctx - 1, device=dev, dtype=torch.int32))

    def _rows(self):
        return sorted({0, self.batch - 1})

    def _reference(self):
        from gptkernels import reference

        s0, rows = self.sets[0], self._rows()
        blocks = s0.table[rows].long().flatten()
        table = torch.arange(blocks.numel(), device=timing.DEVICE, dtype=torch.int32).view(len(rows), self.nblk)
        outs = []
        for dtype, upcast in ((torch.float64, True), (self.dtype, False)):
            kc, vc = s0.kc[blocks].to(dtype), s0.vc[blocks].to(dtype)  # copies: the cache stays as it is
            q, k, v = (t[rows].to(dtype) for t in (s0.q, s0.k, s0.v))
            outs.append(reference.flash_attn_with_kvcache(q, kc, vc, k, v, self.cos, self.sin, cache_seqlens=s0.lens[rows],
                                                          block_table=table, upcast=upcast, **self.opts))
        self._ref = tuple(outs)

    def check(self, out, _s0):
        return compare([("out", out[self._rows()], *self._ref)])


def _kvcache_fn(case: KVCacheCase, impl: str):
    import gptkernels

    if impl == "gptkernels triton":
        return lambda s: gptkernels.flash_attn_with_kvcache(s.q, s.kc, s.vc, s.k, s.v, case.cos, case.sin,
                                                            cache_seqlens=s.lens, block_table=s.table,
                                                            backend="triton", **case.opts)
    if impl == "flash-attn flash_attn_with_kvcache":
        try:
            from flash_attn import flash_attn_with_kvcache
        except ImportError as e:
            raise gptkernels.BackendUnavailableError(f"the flash-attn package is not installed ({e})") from e
        cos, sin = case.cos.to(case.dtype), case.sin.to(case.dtype)
        cap = case.opts.get("softcap", 0.0)
        return lambda s: flash_attn_with_kvcache(s.q, s.kc, s.vc, s.k, s.v, rotary_cos=cos, rotary_sin=sin,
                                                 cache_seqlens=s.lens, block_table=s.table, causal=True,
                                                 softcap=cap, rotary_interleaved=False,
                                                 alibi_slopes=case.opts.get("alibi_slopes"))
    raise ValueError(f"unknown flash_attn_with_kvcache implementation {impl!r}")


def _kvcache(sess: Session) -> None:
    table_id = "kvcache-decode"
    for feature in KV_CASES:
        impls = [i for i in KV_IMPLS if sess.wanted(table_id, feature, i)]
        if not impls:
            continue
        try:
            case = KVCacheCase(feature)
        except Exception as e:
            for impl in impls:
                sess.fail(table_id, feature, impl, e, ours=impl.startswith("gptkernels"))
            continue
        for impl in impls:
            common = dict(ours=impl.startswith("gptkernels"), params=case.params, bytes=case.bytes)
            try:
                run = _kvcache_fn(case, impl)
            except Exception as e:
                sess.fail(table_id, feature, impl, e, **common)
                continue
            with torch.no_grad():
                sess.measure(table_id, feature, impl, run=run, sets=case.sets, check=case.check, **common)
        del case
        free_memory()
