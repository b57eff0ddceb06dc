"""BENCHMARKS.md from the latest run's JSON (never typed by hand).

    python -m benchmarks.report                       # benchmarks/results/latest.json -> BENCHMARKS.md
    python -m benchmarks.report bench_out/run-*.json  # merge runs (e.g. suites run in separate calls),
                                                      # store them as benchmarks/results/latest.json

It writes the device, date and commit, the ceilings, the performance targets (:mod:`benchmarks.targets`:
attention, rotary, paged decode, fp8 cache, models, CUDA vs Triton, quantization) with the gap to each,
every table (figure and % of the device ceiling, the flop/byte formula next to it), the plots
(regenerated from the JSON into benchmarks/results/), and every correctness check's figures.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import plots, results, targets
from .env import REPO
from .results import Row, Table

RESULTS_DIR = REPO / "benchmarks" / "results"
LATEST = RESULTS_DIR / "latest.json"
#: The latest work audit (``--suite audit``; CPU, no timing): kept apart from the timed run's JSON, so
#: BENCHMARKS.md regenerated from a GPU run still shows it.
AUDIT_LATEST_NAME = "audit-latest.json"
DEFAULT_OUT = REPO / "BENCHMARKS.md"

SUITE_TITLES = {"attention": "Attention", "rotary": "Rotary embedding", "paged": "Paged KV-cache decode",
                "model": "Models", "parity": "Parity sweep", "quant": "Quantization"}
STATUS_CELL = {"mismatch": "WRONG", "error": "error", "unavailable": "n/a", "skipped": "skipped", "fail": "FAIL"}


def merge(docs: list[dict]) -> dict:
    """One document from several runs: later rows replace earlier ones for the same (table, case, impl)."""
    if len(docs) == 1:
        return docs[0]
    kinds = {d["kind"] for d in docs}
    base = dict(next((d for d in docs if d["kind"] == "gpu"), docs[0]))
    rows, tables = {}, {}
    for d in docs:
        if d["kind"] != base["kind"]:
            continue
        for t in d["tables"]:
            tables[t["id"]] = t
        for r in d["rows"]:
            rows[(r["table"], r["case"], r["impl"])] = r
    base.update(tables=list(tables.values()), rows=list(rows.values()),
                suites=list(dict.fromkeys(s for d in docs if d["kind"] == base["kind"] for s in d["suites"])),
                merged_from=[{"env": d["env"], "ceilings": d["ceilings"], "suites": d["suites"], "kind": d["kind"]}
                             for d in docs],
                duration_s=sum(d["duration_s"] for d in docs if d["kind"] == base["kind"]))
    if len(kinds) > 1:
        base["notes"] = list(base.get("notes", [])) + ["parity-sweep runs given with GPU runs were left out"]
    base["targets"] = targets.evaluate(results.rows_of(base)) if base["kind"] == "gpu" else []
    results.validate(base)
    return base


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit in ("ms",):
        return f"{v:.3f}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _table_md(table: Table, rows: list[Row], doc: dict, notes: list[str]) -> list[str]:
    """A pivot: one line per case, one column per implementation; failures as footnotes."""
    cases = list(dict.fromkeys(r.case for r in rows))
    impls = list(dict.fromkeys(r.impl for r in rows))
    cell = {(r.case, r.impl): r for r in rows}
    ceil = {"matmul": "bf16 matmul", "copy": "device copy"}.get(table.ceiling or "", "")
    out = [f"### {table.title}", ""]
    desc = f"{table.unit}"
    if ceil:
        desc += f" (% of the {ceil} ceiling)"
    if table.formula:
        desc += f"; formula: `{table.formula}`"
    out += [desc + ".", ""]
    if table.note:
        out += [table.note, ""]
    out.append(f"| {table.x} | " + " | ".join(impls) + " |")
    out.append("|---|" + "---:|" * len(impls))
    for c in cases:
        cells = []
        for i in impls:
            r = cell.get((c, i))
            if r is None:
                cells.append("")
            elif r.status == "ok":
                text = _fmt(r.value, table.unit)
                if r.pct is not None:
                    text += f" ({r.pct:.0f}%)"
                if table.id == "model-step" and "x_floor" in r.extra:
                    text += f", {r.extra['step_ms']:.2f} ms = {r.extra['x_floor']:.2f}x floor"
                cells.append(text)
            else:
                word = STATUS_CELL.get(r.status, r.status)
                if r.message and r.status != "skipped":
                    note = f"{r.status}: {r.message}"  # one footnote per distinct reason
                    if note not in notes:
                        notes.append(note)
                    word += f" [{notes.index(note) + 1}]"
                cells.append(word)
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    out.append("")
    return out


def _targets_md(ts: list[dict]) -> list[str]:
    out = ["## Targets (the issue that set each, on an H100/H200) and the gap to each", "",
           "| issue | target | figure | status |", "|---|---|---|---|"]
    for t in ts:
        out.append(f"| {t['issue']} | {t['what']} | {t['figure']} | {targets.gap_text(t)} |")
    met = sum(t["met"] is True for t in ts)
    missed = sum(t["met"] is False for t in ts)
    unmeasured = sum(t["met"] is None for t in ts)
    out += ["", f"{met} met, {missed} not met, {unmeasured} not measured.", ""]
    return out


def _checks_md(rows: list[Row]) -> list[str]:
    out = ["## Correctness checks before timing", "",
           "Every timed implementation was first checked on the same inputs against the float64 reference "
           "(SPEC's parity rule: max error <= 2 x the eager computation's error in the same dtype + a floor); "
           "a failing check is reported as WRONG and not timed.", "",
           "| table | case | implementation | max error | bound | result |", "|---|---|---|---:|---:|---|"]
    for r in rows:
        if r.err is None and r.status not in ("mismatch",):
            continue
        err = f"{r.err:.2e}" if isinstance(r.err, float) else str(r.err)
        bound = f"{r.bound:.2e}" if isinstance(r.bound, float) else str(r.bound)
        res = "pass" if r.status == "ok" else STATUS_CELL.get(r.status, r.status)
        if r.status == "ok" and r.message.startswith("peer checked"):
            res = "pass (peer: 2x bound)"
        out.append(f"| {r.table} | {r.case} | {r.impl} | {err} | {bound} | {res} |")
    out.append("")
    return out


def _env_md(doc: dict) -> list[str]:
    e = doc["env"]
    lines = [f"- Device: **{e['device']}**" + (f", driver {e['driver']}" if e.get("driver") else "")
             + (f", {e['sm_count']} SMs, {e.get('memory_gib')} GiB, L2 {e.get('l2_mib')} MiB" if e.get("sm_count") else ""),
             f"- Date: {e['date']}; commit: `{e['commit']}`",
             f"- torch {e['torch']}, triton {e['triton']}, transformers {e.get('transformers')}, "
             f"CUDA runtime {e.get('cuda_runtime')}, Python {e.get('python')}",
             f"- Suites: {', '.join(doc['suites'])}; mode: "
             f"{'parity sweep (no timings)' if doc['kind'] == 'parity' else 'quick' if doc['quick'] else 'full'}; "
             f"run time {doc['duration_s']:.0f} s"]
    c = doc.get("ceilings")
    if c:
        lines.append(f"- Ceilings measured in this run: bf16 matmul {c['matmul_shape']} = **{c['matmul_tflops']:.0f} "
                     f"TFLOP/s** (`{c['matmul_formula']}`); device-to-device copy of {c['copy_bytes'] / 2**31:.2f} GiB "
                     f"= **{c['copy_gbps']:.0f} GB/s** (`{c['copy_formula']}`)")
    for m in doc.get("merged_from", []):
        mc = m.get("ceilings") or {}
        lines.append(f"- merged run: {m['env']['date']}, `{m['env']['commit']}`, suites {', '.join(m['suites'])}"
                     + (f", matmul {mc['matmul_tflops']:.0f} TFLOP/s, copy {mc['copy_gbps']:.0f} GB/s" if mc else ""))
    return lines + [""]


def render(doc: dict, source: str, plot_paths: list[Path], md_dir: Path, audit: dict | None = None) -> str:
    tables, rows = results.tables_of(doc), results.rows_of(doc)
    out = ["# gptkernels benchmarks", "",
           f"Generated by `python -m benchmarks.report` from `{source}`; do not edit by hand "
           "(re-run the benchmarks and the report instead).", ""]
    if doc["kind"] == "parity":
        out += ["**No GPU run is recorded yet: timings need a GPU.** The latest run is the parity sweep of every "
                "kernel against the float64 reference in the Triton interpreter on CPU "
                "(`make bench` without a GPU); on a GPU, `make gpu` (see README, Benchmarks) records the figures.", ""]
    out += _env_md(doc)
    for note in doc.get("notes", []):
        out += [f"> {note}", ""]
    if doc["kind"] == "gpu":
        out += _targets_md(doc.get("targets") or targets.evaluate(rows))
    notes: list[str] = []
    plot_by_suite = {p.stem: p for p in plot_paths}
    for suite in dict.fromkeys(t.suite for t in tables.values()):
        out += [f"## {SUITE_TITLES.get(suite, suite)}", ""]
        if suite == "parity":
            out += _parity_md([r for r in rows if r.table == "parity"])
            continue
        for t in tables.values():
            if t.suite == suite:
                out += _table_md(t, [r for r in rows if r.table == t.id], doc, notes)
        if suite in plot_by_suite:
            rel = os.path.relpath(plot_by_suite[suite], md_dir)
            out += [f"![{suite}]({rel})", ""]
    if notes:
        out += ["## Notes on failed or unavailable cells", ""]
        out += [f"{i}. {n}" for i, n in enumerate(notes, 1)] + [""]
    if doc["kind"] == "gpu":
        out += _checks_md(rows)
    if audit is not None:
        out += _audit_md(audit)
    return "\n".join(out).rstrip() + "\n"


def _parity_md(rows: list[Row]) -> list[str]:
    out = ["| op | shape | dtype | backend | max error vs float64 | bound | result |",
           "|---|---|---|---|---:|---:|---|"]
    for r in rows:
        p = r.params
        err = f"{r.err:.2e}" if isinstance(r.err, float) else "-"
        bound = f"{r.bound:.2e}" if isinstance(r.bound, float) else "-"
        res = r.status if r.status == "pass" else f"{r.status}: {r.message[:160]}"
        out.append(f"| {p.get('op', r.case)} | {p.get('shape', '(every case)')} | {p.get('dtype', '-')} | "
                   f"{r.impl.split()[-1]} | {err} | {bound} | {res.replace('|', '/')} |")
    return out + [""]


def generate(json_paths: list[str | Path] | None = None, out: str | Path = DEFAULT_OUT,
             plots_dir: str | Path = RESULTS_DIR, store: bool = True) -> Path:
    """Write BENCHMARKS.md (and the plots) from one or more run JSONs; returns the Markdown's path."""
    paths = [Path(p) for p in (json_paths or [LATEST])]
    plots_dir = Path(plots_dir)
    paths, audit = _audit_of(paths, plots_dir, store)
    doc = merge([results.load(p) for p in paths])
    source = paths[0]
    if store:
        source = LATEST if plots_dir == RESULTS_DIR else plots_dir / "latest.json"
        results.save(doc, source)
    out = Path(out)
    plot_paths = plots.plot(doc, plots_dir) if doc["kind"] == "gpu" else []
    try:
        shown = str(Path(source).resolve().relative_to(REPO))
    except ValueError:
        shown = Path(source).name
    if len(paths) > 1 and not store:
        shown = ", ".join(p.name for p in paths)
    out.write_text(render(doc, shown, plot_paths, out.resolve().parent, audit))
    return out


# ---- the work audit (CPU section) ------------------------------------------------------------------


def _audit_of(paths: list[Path], plots_dir: Path, store: bool) -> tuple[list[Path], dict | None]:
    """Split the work audit's JSON off the given runs: -> (the other runs, or latest.json when only an
    audit was given; the audit: the last one given, else the stored one). A given audit is stored as
    ``audit-latest.json`` next to latest.json."""
    docs = [(p, results.load(p)) for p in paths]
    audits = [d for _, d in docs if d["kind"] == "audit"]
    rest = [p for p, d in docs if d["kind"] != "audit"]
    stored = plots_dir / AUDIT_LATEST_NAME
    if audits:
        audit = audits[-1]
        if store:
            results.save(audit, stored)
    else:
        audit = results.load(stored) if stored.exists() else None
    if not rest:
        latest = plots_dir / "latest.json" if plots_dir != RESULTS_DIR else LATEST
        if not latest.exists():
            raise ValueError(f"only a work audit was given and there is no {latest} to render it with: "
                             "pass a parity or GPU run's JSON too")
        rest = [latest]
    return rest, audit


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _audit_md(doc: dict) -> list[str]:
    """The work audit: per kernel and GPU config, bytes and FLOPs against the op's minima, the sm_90a
    compile's figures; launches per decode step of each family. From the audit's own JSON."""
    rows = results.rows_of(doc)
    tables = results.tables_of(doc)
    e = doc["env"]
    out = ["## Work audit (CPU: counted in the Triton interpreter, no GPU needed)", "",
           f"`python -m benchmarks.run --suite audit` (part of `make bench` without a GPU) at commit "
           f"`{e['commit']}`, {e['date']}, triton {e['triton']}; {doc['duration_s']:.0f} s. Exact counts, no "
           "timing: see notes/audit.md for what each figure means. *bytes*: loaded + stored + atomic bytes of "
           "all the op's programs / the op's minimum (each input read once, each output written once); "
           "*K/V*: K and V bytes loaded / the K/V the op must read; *FLOPs*: `tl.dot` tile FLOPs / useful "
           "FLOPs; *M x N x K*: the mean tensor-core product (its smallest side over all products in brackets; every "
           "product shape and count is in the JSON); sm_90a columns from an offline compile of the "
           "same launch (ptxas). Each kernel row is one config its autotuner tries on an H100/H200, the one it takes "
           "without autotuning first (the op's other kernels at theirs).", ""]
    kern = [r for r in rows if r.table == "audit"]
    if kern:
        out += ["| case | kernel | config | bytes | K/V | FLOPs | mean M x N x K | atomic B | regs | spill B "
                "| smem KiB | blocks/SM | tensor cores |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in kern:
            p, x = r.params, r.extra
            if r.status != "pass":
                out.append(f"| {r.case} | {p.get('kernel', '-')} | {p.get('config', '-')} | "
                           f"{r.status}: {r.message.replace('|', '/')[:200]} | | | | | | | | | |")
                continue
            mnk = " x ".join(f"{v:.0f}" for v in x["dot_mean_mnk"]) if x.get("dot_mean_mnk") else "-"
            if x.get("dot_min_side") is not None:
                mnk += f" ({x['dot_min_side']})"
            s = x.get("sm90") or {}
            if "regs" in s:
                tc = "wgmma" if s.get("wgmma") else "mma.sync" if s.get("mma_sync") else "none"
                tc += " + TMA" if s.get("tma") else ""
                cc = (f"{s['regs']} | {s.get('spill', '-')} | {s['shared'] / 1024:.1f} | {s['blocks_per_sm']} "
                      f"({s['limited_by']}) | {tc}")
            else:
                cc = f"n/a: {s.get('error', 'not compiled')[:80].replace('|', '/')} | | | |"
            out.append(f"| {r.case} | {p['kernel']} | {p['config']} | {_x(x['bytes_x'])} | {_x(x.get('kv_x'))} | "
                       f"{_x(x.get('flops_x'))} | {mnk} | {x['kernel_atomic']:,} | {cc} |")
        out += ["", "Minima, written once in `benchmarks/formulas.py` (shared with the GPU benchmarks' formulas), "
                "and the targets of issue 14 (shown, not enforced here; CI's bounds: `tests/test_audit.py`):", "",
                "| case | shape | minimum bytes | useful FLOPs | target |", "|---|---|---|---|---|"]
        for case in dict.fromkeys(r.case for r in kern):
            p = next(r.params for r in kern if r.case == case)
            if "min_bytes_formula" not in p:
                continue
            tg = "; ".join(f"{k} <= {v[0]} ({v[1]})" for k, v in (p.get("targets") or {}).items()) or "-"
            out.append(f"| {case} | {p['shape']} | `{p['min_bytes_formula']}` | "
                       f"`{p['useful_flops_formula'] or '-'}` | {tg} |")
        out.append("")
    launches = [r for r in rows if r.table == "audit-launches"]
    if launches:
        t = tables.get("audit-launches")
        out += [f"### {t.title if t else 'Kernel launches per decode step'}", ""]
        if t is not None and t.note:
            out += [t.note, ""]
        out += ["| family | layers | per layer (of which Triton) | rest of the model step | generation loop "
                "| per step | host syncs | one layer's launches |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in launches:
            if r.status != "pass":
                out.append(f"| {r.case} | {r.status}: {r.message.replace('|', '/')[:200]} | | | | | | |")
                continue
            x = r.extra
            per = "/".join(map(str, sorted(set(x["per_layer"]))))
            tri = "/".join(map(str, sorted(set(x["triton_per_layer"]))))
            ops = ", ".join(f"{k} {v}" for k, v in x["layer0_ops"].items())
            out.append(f"| {r.case} | {x['layers']} | {per} ({tri}) | {x['model_outside_layers']} | {x['loop']} | "
                       f"{x['total']} | {x['syncs']} | {ops} |")
        out.append("")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="*", help=f"run JSON file(s) to merge (default: {LATEST.relative_to(REPO)})")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="the Markdown file to write (default: BENCHMARKS.md)")
    ap.add_argument("--plots-dir", default=str(RESULTS_DIR),
                    help="where the PNGs (and latest.json) go (default: benchmarks/results)")
    ap.add_argument("--no-store", action="store_true", help="do not write latest.json next to the plots")
    args = ap.parse_args(argv)
    try:
        path = generate(args.json or None, args.out, args.plots_dir, store=not args.no_store)
    except (OSError, ValueError) as e:
        print(f"benchmarks.report: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
