"""The performance targets the issues set (each names its issue), read off a run's rows: each one's figure, the target, the gap.

Every target names the rows it is computed from; where one of them did not run, the target says so
("not measured: ...") instead of guessing.
"""

from __future__ import annotations

from .results import Row

TRITON, CUDA = "gptkernels triton", "gptkernels cuda"
SDPA = ("torch sdpa flash", "torch sdpa cudnn", "torch sdpa efficient")


class _Index:
    def __init__(self, rows: list[Row]):
        self.rows = {(r.table, r.case, r.impl): r for r in rows}
        self.cases: dict[str, list[str]] = {}
        for r in rows:
            self.cases.setdefault(r.table, [])
            if r.case not in self.cases[r.table]:
                self.cases[r.table].append(r.case)

    def get(self, table, case, impl) -> Row | None:
        r = self.rows.get((table, str(case), impl))
        return r if r is not None and r.status == "ok" else None

    def why(self, table, case, impl) -> str:
        r = self.rows.get((table, str(case), impl))
        if r is None:
            return f"{impl} at {table} {case} did not run"
        return f"{impl} at {table} {case}: {r.status}" + (f" ({r.message[:80]})" if r.message else "")


def _target(issue, what, value, target, met, figure, *, higher_is_better=True, missing=None, tables=()) -> dict:
    d = {"issue": issue, "what": what, "value": value, "target": target, "met": met, "figure": figure,
         "gap": None, "tables": list(tables)}
    if missing is not None:
        d.update(met=None, figure=f"not measured: {missing}")
    elif value is not None and target:
        # the factor still to gain (1.25 = needs to be 25% better); <= 1 means met
        d["gap"] = (target / value if higher_is_better else value / target) if value else None
    return d


def _ratio_target(ix, issue, what, target, num, den, fmt, higher_is_better=True):
    """A target on a ratio of two rows' figures: ``num`` and ``den`` are (table, case, impl, key)."""
    a, b = ix.get(*num[:3]), ix.get(*den[:3])
    tables = {num[0], den[0]}
    if a is None or b is None:
        missing = ix.why(*num[:3]) if a is None else ix.why(*den[:3])
        return _target(issue, what, None, target, None, "", missing=missing, tables=tables)
    value = num[3](a) / den[3](b)
    met = value >= target if higher_is_better else value <= target
    return _target(issue, what, value, target, met, fmt.format(value=value, a=a, b=b),
                   higher_is_better=higher_is_better, tables=tables)


def _best(ix, table, case, impls):
    rows = [r for r in (ix.get(table, case, i) for i in impls) if r is not None]
    return max(rows, key=lambda r: r.value) if rows else None


def evaluate(rows: list[Row]) -> list[dict]:
    """Every target whose benchmark ran in this run (a run of one suite lists that suite's targets)."""
    from .suite_attention import ATOMIC_DQ, WINDOW

    ix = _Index(rows)
    out = _evaluate(ix, WINDOW, ATOMIC_DQ)
    return [t for t in out if not t["tables"] or any(tb in ix.cases for tb in t["tables"])]


def _evaluate(ix: "_Index", window: int, atomic_dq: str) -> list[dict]:
    """``atomic_dq``: the row name of the backward with deterministic=False (a second bwd target)."""
    out = []
    val = (lambda r: r.value)
    # ---- issue 2: attention ------------------------------------------------------------------------
    for d in (128, 64):
        for direction, need in (("fwd", 1.0), ("bwd", 0.9)):
            table = f"attn-{direction}-d{d}"
            for case in ix.cases.get(table, []):
                best = _best(ix, table, case, SDPA)
                for impl, who in ((TRITON, "triton"), (atomic_dq, "triton deterministic=False")):
                    if impl == atomic_dq and direction == "fwd":
                        continue  # the forward has one variant
                    ours = ix.get(table, case, impl)
                    what = f"attention {direction} D={d} S={case}: {who} >= {need}x best SDPA"
                    if ours is None or best is None:
                        out.append(_target(2, what, None, need, None, "", missing=ix.why(table, case, impl)
                                           if ours is None else "no SDPA backend ran", tables=[table]))
                    else:
                        v = ours.value / best.value
                        out.append(_target(2, what, v, need, v >= need,
                                           f"{ours.value:.0f} vs {best.value:.0f} TFLOP/s ({best.impl})",
                                           tables=[table]))
                ours = ix.get(table, case, TRITON)
                if direction == "fwd":
                    what = f"attention fwd D={d} S={case}: triton >= 60% of matmul"
                    if ours is None:
                        out.append(_target(2, what, None, 60.0, None, "", missing=ix.why(table, case, TRITON),
                                           tables=[table]))
                    else:
                        out.append(_target(2, what, ours.pct, 60.0, ours.pct >= 60.0,
                                           f"{ours.value:.0f} TFLOP/s = {ours.pct:.0f}% of matmul", tables=[table]))
    for case in ix.cases.get("attn-window-fwd", []):
        ms = (lambda r: 1.0 / r.ms)
        out.append(_ratio_target(
            ix, 2, f"window {window} at S={case}: >= 20x faster than full causal", 20.0,
            ("attn-window-fwd", case, TRITON, ms), ("attn-fwd-d128", case, TRITON, ms),
            "{b.ms:.3f} ms causal / {a.ms:.3f} ms window = {value:.1f}x"))
        out.append(_ratio_target(
            ix, 2, f"window {window} at S={case}: >= 1.2x FlexAttention's sliding window", 1.2,
            ("attn-window-fwd", case, TRITON, ms), ("attn-window-fwd", case, "flexattention (compiled)", ms),
            "{b.ms:.3f} ms flex / {a.ms:.3f} ms ours = {value:.2f}x"))
    # ---- issue 3: rotary ------------------------------------------------------------------------------
    for impl in (TRITON, CUDA):
        r = ix.get("rotary", "8192", impl)
        what = f"rotary T=8192 {impl.split()[1]}: >= 85% of copy bandwidth"
        if r is None:
            out.append(_target(3, what, None, 85.0, None, "", missing=ix.why("rotary", "8192", impl), tables=["rotary"]))
        else:
            out.append(_target(3, what, r.pct, 85.0, r.pct >= 85.0, f"{r.value:.0f} GB/s = {r.pct:.0f}% of copy",
                               tables=["rotary"]))
    out.append(_ratio_target(ix, 3, "rotary T=8192: triton >= 3x HF eager rotate_half", 3.0,
                             ("rotary", "8192", TRITON, val), ("rotary", "8192", "hf rotate_half (eager)", val),
                             "{a.value:.0f} vs {b.value:.0f} GB/s = {value:.1f}x"))
    # ---- issue 4: paged decode ----------------------------------------------------------------------
    for table, case, need, label in (("paged-b64", "4096", 85.0, "batch 64 x ctx 4k"),
                                     ("paged-b1", "131072", 75.0, "batch 1 x ctx 128k")):
        r = ix.get(table, case, TRITON)
        what = f"paged decode {label}: >= {need:.0f}% of copy bandwidth"
        if r is None:
            out.append(_target(4, what, None, need, None, "", missing=ix.why(table, case, TRITON), tables=[table]))
        else:
            out.append(_target(4, what, r.pct, need, r.pct >= need, f"{r.value:.0f} GB/s = {r.pct:.0f}% of copy",
                               tables=[table]))
    blocks = [ix.get("paged-blocks", c, TRITON) for c in ix.cases.get("paged-blocks", [])]
    blocks = [r for r in blocks if r is not None and 16 <= (r.x or 0) <= 256]
    what = "paged decode: time within 10% across block sizes 16..256"
    if len(blocks) >= 2:
        spread = max(r.ms for r in blocks) / min(r.ms for r in blocks)
        out.append(_target(4, what, spread, 1.10, spread <= 1.10,
                           f"slowest/fastest = {spread:.2f} over block sizes {sorted(int(r.x) for r in blocks)}",
                           higher_is_better=False, tables=["paged-blocks"]))
    else:
        out.append(_target(4, what, None, 1.10, None, "", missing="fewer than two block sizes ran",
                           tables=["paged-blocks"]))
    # ---- issue 16: fp8 paged KV cache (benchmarks/suite_paged.py, table paged-fp8) ---------------------
    out.append(_ratio_target(ix, 16, "fp8 paged decode 64 x 4k: >= 1.7x the bf16 cache's speed", 1.7,
                             ("paged-fp8", "fp8 cache", TRITON, lambda r: 1.0 / r.ms),
                             ("paged-fp8", "bf16 cache", TRITON, lambda r: 1.0 / r.ms),
                             "{b.ms:.3f} ms bf16 / {a.ms:.3f} ms fp8 = {value:.2f}x"))
    out += _quant_targets(ix)
    # ---- issue 5: models ------------------------------------------------------------------------------
    for model in ("pythia-1.4b", "gpt2-medium"):
        out.append(_ratio_target(ix, 5, f"{model} decode batch 32: >= 2x HF generate", 2.0,
                                 ("model-decode", f"{model} B=32", TRITON, val),
                                 ("model-decode", f"{model} B=32", "hf transformers (sdpa)", val),
                                 "{a.value:.0f} vs {b.value:.0f} tok/s = {value:.2f}x"))
        r = ix.get("model-step", model, TRITON)
        what = f"{model} batch-1 decode step: <= 1.5x its bandwidth floor"
        if r is None:
            out.append(_target(5, what, None, 1.5, None, "", missing=ix.why("model-step", model, TRITON),
                               tables=["model-step"]))
        else:
            x = r.extra["x_floor"]
            out.append(_target(5, what, x, 1.5, x <= 1.5,
                               f"{r.extra['step_ms']:.2f} ms vs floor {r.extra['floor_ms']:.2f} ms = {x:.2f}x",
                               higher_is_better=False, tables=["model-step"]))
    # ---- issue 6: cuda backend -------------------------------------------------------------------------
    speed = (lambda r: 1.0 / r.ms)
    for table, case, label in (("rotary", "8192", "rotary T=8192"), ("paged-b64", "4096", "paged decode 64 x 4k"),
                               ("paged-b1", "131072", "paged decode 1 x 128k")):
        out.append(_ratio_target(ix, 6, f"{label}: cuda at least as fast as triton", 1.0,
                                 (table, case, CUDA, speed), (table, case, TRITON, speed),
                                 "{b.ms:.3f} ms triton / {a.ms:.3f} ms cuda = {value:.2f}x"))
    return out


#: Issue 16's GEMM target: the weight-only GEMM at M <= 16 rows reads its weights at >= this % of the
#: copy ceiling, counting the weights' bytes (codes, scales, zeros) only.
GEMM_WEIGHT_PCT, GEMM_MAX_M = 80.0, 16
#: Issue 16's model target: the pythia-1.4b batch-1 decode step's tokens/s over the bf16 model's.
DECODE_SPEEDUP = {"int8": 1.6, "int4": 2.3}


def gemm_weight_pct(r: Row) -> float:
    """% of the copy ceiling a quant-gemm row reaches on its weights' bytes alone: its bytes are the
    weights' + x's (M x K) + y's (M x N), bf16 (suite_quant), so the rest is the weights'."""
    m, n, k = (r.params[p] for p in ("M", "N", "K"))
    return r.pct * (r.bytes - 2 * m * (k + n)) / r.bytes


def _quant_targets(ix: "_Index") -> list[dict]:
    """Issue 16's weight-only targets (benchmarks/suite_quant.py: quant-gemm, quant-decode)."""
    from .suite_quant import DECODE_CASE, GEMM_M, GEMM_IMPLS, decode_impl

    out = []
    for m in (m for m in GEMM_M if m <= GEMM_MAX_M):
        for impl in (i for i in GEMM_IMPLS if i.startswith("gptkernels")):
            r = ix.get("quant-gemm", str(m), impl)
            what = f"weight-only GEMM {impl.split()[2]} M={m}: >= {GEMM_WEIGHT_PCT:.0f}% of copy on weight bytes"
            if r is None or r.pct is None or not r.bytes:
                out.append(_target(16, what, None, GEMM_WEIGHT_PCT, None, "", tables=["quant-gemm"],
                                   missing=ix.why("quant-gemm", str(m), impl) if r is None else "no copy ceiling"))
                continue
            pct = gemm_weight_pct(r)
            out.append(_target(16, what, pct, GEMM_WEIGHT_PCT, pct >= GEMM_WEIGHT_PCT,
                               f"{r.value * pct / r.pct:.0f} GB/s of weights = {pct:.0f}% of copy",
                               tables=["quant-gemm"]))
    tok_s = (lambda r: r.value)
    for fmt, need in DECODE_SPEEDUP.items():
        out.append(_ratio_target(ix, 16, f"{DECODE_CASE} decode step {fmt}: >= {need}x bf16's tokens/s", need,
                                 ("quant-decode", DECODE_CASE, decode_impl(fmt), tok_s),
                                 ("quant-decode", DECODE_CASE, decode_impl(None), tok_s),
                                 "{a.value:.0f} vs {b.value:.0f} tok/s = {value:.2f}x"))
    return out


def gap_text(t: dict) -> str:
    """'met', 'NOT met: needs 1.25x', or 'not measured' (for tables and the summary)."""
    if t["met"] is None:
        return "not measured"
    if t["met"]:
        return "met"
    g = t.get("gap")
    return f"NOT met: {g:.2f}x short" if g else "NOT met"
