"""The benchmark suite's command line (the main job behind ``make bench``).

    python -m benchmarks.run --suite {attention,rotary,paged,model,quant,all} [--quick] [--out DIR]
    python -m benchmarks.run --smoke --budget SEC [--ceilings FACTS.json]  # make gpu-smoke's rows
    python -m benchmarks.run --suite audit   # work counts in the interpreter (also in `all` without a GPU)

On a GPU: measure the device's ceilings (bf16 matmul TFLOP/s, device copy GB/s), then every benchmark
of the chosen suites beside its peers, each checked against the reference before it is timed; write
one JSON per run and PNG plots under --out, and print a short table last. Exit status 1 when one of
our kernels gave a wrong answer or failed to run (peers never fail the run).

Without a GPU (or with --parity): the parity sweep of every kernel of those suites in the Triton
interpreter, printed as a table; timings need a GPU. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SUITES = ("attention", "rotary", "paged", "model", "quant")
#: --quick's wall-clock budget per suite (seconds): `make bench` must end within 10 minutes.
QUICK_BUDGET_S = {"attention": 230, "rotary": 30, "paged": 90, "model": 150, "quant": 40}

#: ``--smoke`` (``make gpu-smoke``, the first GPU run, issue 13): these rows first, suite by suite in
#: this order, each suite within its share of the budget (an overrun comes out of the next share);
#: then SMOKE_NEXT's rows, then every other ``--quick`` row of SMOKE_ORDER's suites while the budget
#: lasts (FlexAttention and torch.compile rows are not started when their compile cannot finish:
#: timing.COMPILE_S).
SMOKE_ORDER = ("attention", "paged", "rotary", "model")
SMOKE_SHARE = {"attention": 110, "paged": 35, "rotary": 15, "model": 75}
_OURS, _SDPA = ("gptkernels triton", "gptkernels cuda"), ("torch sdpa flash", "torch sdpa cudnn")
_ATOMIC = "gptkernels triton (deterministic=False)"
SMOKE_HEADLINE = {
    "attention": {("attn-fwd-d128", "16384"): (*_OURS, *_SDPA),
                  ("attn-bwd-d128", "16384"): ("gptkernels triton", _ATOMIC, *_SDPA),
                  ("attn-window-fwd", "16384"): _OURS,
                  ("attn-window-bwd", "16384"): ("gptkernels triton", _ATOMIC),
                  ("attn-decode", "32768"): (*_OURS, *_SDPA)},
    "paged": {("paged-b64", "4096"): (*_OURS, "torch sdpa flash (dense cache)"),
              ("paged-b1", "131072"): (*_OURS, "torch sdpa flash (dense cache)")},
    "rotary": {("rotary", "8192"): (*_OURS, "gptkernels triton (in place)", "gptkernels cuda (in place)",
                                    "hf rotate_half (eager)")},
    "model": {("model-step", "pythia-1.4b"): (*_OURS, "hf transformers (sdpa)"),
              ("model-decode", "pythia-1.4b B=1"): (*_OURS, "hf transformers (sdpa)")},
}
#: ``--smoke``'s second pass starts with these rows (issue 16's cheapest figures: the fp8 vs bf16
#: paged decode at 64 x 4k, the int8 / int4 GEMM at M = 1), in the whole budget's remainder, before
#: the rest of SMOKE_ORDER's rows: they never take time from a headline row. The quant suite's other
#: rows (M = 16 and 64, torch's peers, the pythia-1.4b decode steps, perplexity) are not in the smoke
#: (``make gpu PART=bench SUITE=quant``): building and checking three 1.4B models does not fit.
SMOKE_NEXT = {
    "paged": {("paged-fp8", "bf16 cache"): ("gptkernels triton",), ("paged-fp8", "fp8 cache"): ("gptkernels triton",)},
    "quant": {("quant-gemm", "1"): ("gptkernels triton int8", "gptkernels triton int4 (group 128)")},
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="all",
                    help=f"which benchmarks: {', '.join(SUITES)}, all, or a comma-separated list (default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer shapes, shorter timings, a per-suite time budget (the `make bench` run)")
    ap.add_argument("--out", default="bench_out", help="directory for the JSON and the plots (default: bench_out)")
    ap.add_argument("--parity", action="store_true",
                    help="run the parity sweep instead of timings (what runs anyway without a GPU)")
    ap.add_argument("--budget", type=float, default=None,
                    help="total wall-clock budget in seconds, shared by the suites (default: none, or "
                         f"{sum(QUICK_BUDGET_S.values())} with --quick)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--smoke", action="store_true",
                    help="make gpu-smoke's plan: the headline rows of every suite first (SMOKE_HEADLINE), then "
                         "the rest of --quick while --budget lasts (implies --quick and every suite)")
    ap.add_argument("--ceilings", default=None, metavar="JSON",
                    help="take the ceilings from this file (a 'ceilings' entry, as gpu_check's facts write "
                         "it) instead of measuring them again")
    ap.add_argument("--no-plots", action="store_true", help="no PNG plots (benchmarks.report makes them later)")
    ap.add_argument("--verbose", "-v", action="store_true", help="print every row as it is measured")
    args = ap.parse_args(argv)
    if args.budget is not None and args.budget <= 0:
        ap.error(f"--budget must be a positive number of seconds, got {args.budget}")
    names = [n.strip() for n in args.suite.split(",") if n.strip()]
    bad = [n for n in names if n not in (*SUITES, "all", "audit")]
    if bad or not names:
        ap.error(f"--suite must be one of {', '.join((*SUITES, 'all', 'audit'))} or a comma-separated list of them, "
                 f"got {args.suite!r}")
    args.suites = list(SUITES) if "all" in names else [s for s in SUITES if s in names]
    args.audit = "audit" in names or "all" in names  # the work audit (interpreter only): without a GPU
    if args.smoke:  # make gpu-smoke: every suite, --quick timings
        args.quick, args.suites = True, list(SUITES)
    return args


def budgets(args) -> dict[str, float | None]:
    """Each chosen suite's share of the time budget."""
    if args.budget is None and not args.quick:
        return {s: None for s in args.suites}
    total = args.budget if args.budget is not None else sum(QUICK_BUDGET_S[s] for s in args.suites)
    weight = sum(QUICK_BUDGET_S[s] for s in args.suites)
    return {s: total * QUICK_BUDGET_S[s] / weight for s in args.suites}


def _progress(total: int, disable: bool, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a bench dependency; without it, no bar
        return None
    return tqdm(total=total, desc=desc, disable=disable or None, file=sys.stderr, dynamic_ncols=True)


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


# --------------------------------------------------------------------------------------------------


def _choose_interpreter() -> None:
    """Without a GPU, Triton kernels run in the interpreter: chosen before triton is first imported
    (``import gptkernels`` imports it, so gptkernels._backend's rule is read only afterwards).

    The variable is set, not defaulted: without a GPU the interpreter is the only way to run them, and
    an inherited ``TRITON_INTERPRET=0`` would fail every kernel row. Where triton was imported
    already (benchmarks.run called in-process), it is too late: the triton rows then say why
    (gptkernels._backend.interpret_changed / unavailable_reason)."""
    import torch

    if not torch.cuda.is_available() and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"


def run_parity(args) -> int:
    _choose_interpreter()  # before anything imports triton (gptkernels does, through torch.library)
    import torch

    from . import parity

    from . import results
    from .env import environment

    ops = [op for s in args.suites for op in parity.SUITE_OPS.get(s, ())]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.monotonic()
    bar = _progress(parity.planned_rows(ops, device), args.no_progress, "parity")
    rows = parity.run(ops, device=device, progress=bar)
    if bar is not None:
        bar.close()
    tables = [parity.TABLE]
    if "quant" in args.suites:  # the weight-only GEMMs' parity rows, the tiny checkpoint's perplexity
        from . import suite_quant

        quant_tables, quant_rows = suite_quant.cpu_tables_and_rows(device)
        tables, rows = tables + quant_tables, rows + quant_rows
    doc = results.new_document("parity", environment(), suites=args.suites, quick=args.quick, ceilings=None,
                               tables=tables, rows=rows, duration_s=time.monotonic() - start,
                               notes=["Parity sweep only: timings need a GPU."])
    path = results.save(doc, Path(args.out) / f"parity-{_stamp()}.json")
    bad = parity.failed(rows)
    print(f"\nwrote {path}")
    if "model" in args.suites:
        print("model suite: needs a GPU (the models' CPU parity against HF is in tests/test_models.py)")
    print()
    print(parity.format_table([r for r in rows if r.table == "parity"]))
    for r in rows:
        if r.table == "quant-ppl":
            print(f"perplexity, tiny-stdlib, {r.case}, {r.impl}: " + (f"{r.value:.3f}" if r.value else r.message))
    print()
    where = ("in the Triton interpreter on CPU (TRITON_INTERPRET=1)" if device == "cpu"
             else "on the GPU (parity only, --parity)")
    print(f"Parity sweep {where}: {sum(r.status == 'pass' for r in rows)} passed, {len(bad)} failed, "
          f"{sum(r.status == 'unavailable' for r in rows)} unavailable, in {time.monotonic() - start:.0f} s.")
    if device == "cpu":
        print("Timings need a GPU: no CUDA GPU is visible here, so no benchmark figure was measured.")
    return 1 if bad else 0


def run_gpu(args) -> int:
    import torch

    from . import plots, results, suite_attention, suite_model, suite_paged, suite_quant, suite_rotary, targets, timing
    from .env import environment
    from .harness import Session

    modules = {"attention": suite_attention, "rotary": suite_rotary, "paged": suite_paged, "model": suite_model,
               "quant": suite_quant}
    start = time.monotonic()
    torch.backends.cuda.matmul.allow_tf32 = False  # nothing here is float32, but never flatter a peer
    env = environment()
    print(f"device: {env['device']} (driver {env.get('driver')}), torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['commit']}", flush=True)
    ceilings = (load_ceilings(args.ceilings) if args.ceilings else None) or \
        timing.measure_ceilings(quick=args.quick).as_dict()
    print(f"ceilings: bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, device copy {ceilings['copy_gbps']:.0f} GB/s",
          flush=True)
    out = Path(args.out)
    name = f"run-{_stamp()}-{'-'.join(args.suites) if len(args.suites) < len(SUITES) else 'all'}" + \
        ("-quick" if args.quick else "")
    path = out / f"{name}.json"

    def save(plot: bool):
        """The run so far as JSON (after every row and suite: a run stopped from outside keeps what it
        measured)."""
        rows = latest_rows(sess.rows)
        doc = results.new_document("gpu", env, suites=args.suites, quick=args.quick, ceilings=ceilings,
                                   tables=list(sess.tables.values()), rows=rows,
                                   duration_s=time.monotonic() - start, targets=targets.evaluate(rows),
                                   notes=["make gpu-smoke: headline rows first, then the rest while the budget "
                                          "lasted"] if args.smoke else None)
        if plot and not args.no_plots:
            try:
                doc["plots"] = [str(p) for p in plots.plot(doc, out / name)]
            except Exception as e:  # a plotting problem must not lose the figures
                print(f"plots failed: {type(e).__name__}: {e}", file=sys.stderr)
        results.save(doc, path)
        return doc

    planned = sum(modules[s].planned_rows(args.quick) for s in args.suites)
    bar = _progress(planned, args.no_progress, "bench")
    sess = Session(quick=args.quick, ceilings=ceilings, progress=bar, verbose=args.verbose)
    sess.on_row = lambda: save(plot=False)  # a run killed at a time limit keeps every finished row
    suites_start = time.monotonic()

    def run_suite(s: str, seconds: float | None, select=None, tag: str = "") -> None:
        """One suite within ``seconds`` (None: no limit), its rows narrowed by ``select``."""
        sess.budget, sess.select = timing.Budget(seconds), select
        t0 = time.monotonic()
        try:
            modules[s].run(sess, args.quick)
        except Exception as e:  # a suite's own bug must not lose the other suites' figures
            import traceback

            traceback.print_exc()
            print(f"suite {s} stopped: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"[{s}{tag}: {time.monotonic() - t0:.0f} s]", file=sys.stderr, flush=True)
        save(plot=False)

    def left(allowed: float) -> float:
        return max(0.0, allowed - (time.monotonic() - suites_start))

    if args.smoke:
        total = args.budget if args.budget is not None else float(sum(QUICK_BUDGET_S.values()))
        allowed = 0.0
        for s in SMOKE_ORDER:  # pass 1: the headline rows, each suite within its share (carried over)
            allowed += total * SMOKE_SHARE[s] / sum(SMOKE_SHARE.values())
            run_suite(s, left(allowed), headline_select(s), " headline")
        for s in SMOKE_NEXT:  # pass 2: SMOKE_NEXT's rows first, then the others, while the whole budget lasts
            if left(total) > 0:
                run_suite(s, left(total), plan_select(SMOKE_NEXT, s), " next")
                continue
            for t in modules[s].tables(args.quick):  # nothing is built (a 1 GiB cache, an 8192^2 weight):
                sess.table(t)                         # the rows say why, so their targets say "not measured"
            for (table, case), impls in SMOKE_NEXT[s].items():
                for impl in impls:
                    sess.skip(table, case, impl, "the smoke's budget was spent before its second pass",
                              ours=impl.startswith("gptkernels"))
        measured = {(r.table, r.case, r.impl) for r in sess.rows if r.status != "skipped"}
        for s in SMOKE_ORDER:
            run_suite(s, left(total), lambda t, c, i: (t, c, i) not in measured, " rest")
    else:
        shares, allowed = budgets(args), 0.0
        for s in args.suites:
            if shares[s] is not None:  # an earlier suite's overrun comes out of this one's share: ends on time
                allowed += shares[s]
            run_suite(s, left(allowed) if shares[s] is not None else None)
    if bar is not None:
        bar.close()
    doc = save(plot=True)
    rows = latest_rows(sess.rows)
    print(f"\nwrote {path}" + (f" and {len(doc['plots'])} plots under {out / name}" if doc["plots"] else ""))
    print(summary(doc))
    bad = [r for r in rows if r.ours and r.status in ("mismatch", "error")]
    return 1 if bad else 0


def plan_select(plan: dict, suite: str):
    """The rows of ``suite`` that ``plan`` (SMOKE_HEADLINE, SMOKE_NEXT) lists."""
    rows = plan.get(suite, {})
    return lambda table, case, impl: impl in rows.get((table, case), ())


def headline_select(suite: str):
    """``--smoke``'s first pass over ``suite``: its rows in SMOKE_HEADLINE."""
    return plan_select(SMOKE_HEADLINE, suite)


def latest_rows(rows: list) -> list:
    """One row per (table, case, impl), the last one (``--smoke`` measures in its second pass a row
    its first pass skipped for time)."""
    last = {(r.table, r.case, r.impl): r for r in rows}
    return [r for r in rows if last[(r.table, r.case, r.impl)] is r]


def load_ceilings(path: str) -> dict | None:
    """The ceilings another process measured (its JSON's 'ceilings' entry, or the dict itself)."""
    import json

    try:
        doc = json.loads(Path(path).read_text())
        c = doc.get("ceilings", doc) if isinstance(doc, dict) else None
        if isinstance(c, dict) and all(isinstance(c.get(k), (int, float)) and c[k] > 0
                                       for k in ("matmul_tflops", "copy_gbps")):
            return c
        print(f"benchmarks.run: no usable ceilings in {path}: measuring them", file=sys.stderr)
    except (OSError, ValueError) as e:
        print(f"benchmarks.run: cannot read ceilings from {path} ({e}): measuring them", file=sys.stderr)
    return None


TRITON_PREFIX = "gptkernels triton "


def summary(doc: dict) -> str:
    """The short table printed last: per table, its largest case, ours beside the best peer; the targets."""
    from . import targets as tg
    from .results import rows_of, tables_of

    rows, tables = rows_of(doc), tables_of(doc)
    lines = ["", f"{'table':18s} {'case':>20s} {'triton':>16s} {'cuda':>16s} {'best peer':>16s}  peer", "-" * 100]

    def fig(r, unit):
        if r is None:
            return "-"
        if r.status != "ok":
            return {"mismatch": "WRONG", "unavailable": "n/a"}.get(r.status, r.status)
        if r.value is None:
            return f"{r.ms:.3f} ms"
        pct = f" ({r.pct:.0f}%)" if r.pct is not None else ""
        return f"{r.value:.0f}{pct}" if r.value >= 10 else f"{r.value:.2f}{pct}"

    for t in tables.values():
        trs = [r for r in rows if r.table == t.id]
        if not trs:
            continue
        cases = list(dict.fromkeys(r.case for r in trs))
        if t.plot == "line":  # the largest x (longest sequence, context, block)
            cases = [max(trs, key=lambda r: r.x if r.x is not None else float("-inf")).case]
        for case in cases:
            at = {r.impl: r for r in trs if r.case == case}
            peers = [r for r in at.values() if not r.ours and r.status == "ok"]
            best = max(peers, key=lambda r: r.value) if peers else None
            # tables whose own rows are variants ("gptkernels triton int8", "... int4 (group 128)"):
            # a line per variant, so each shows its figure
            ours = {"": (at.get("gptkernels triton"), at.get("gptkernels cuda"))}
            if "gptkernels triton" not in at:
                ours = {" " + i[len(TRITON_PREFIX):].split(" (")[0]: (r, None) for i, r in at.items()
                        if r.ours and i.startswith(TRITON_PREFIX)} or ours
            for variant, (triton, cuda) in ours.items():
                lines.append(f"{t.id:18s} {case + variant:>20s} {fig(triton, t.unit):>16s} "
                             f"{fig(cuda, t.unit):>16s} {fig(best, t.unit):>16s}  "
                             f"{best.impl if best else '-'} [{t.unit}]")
    ts = doc.get("targets") or []
    if ts:
        lines += ["", f"{'target':78s} {'figure':40s} status", "-" * 130]
        for t in ts:
            fig_text = t["figure"][:40]
            lines.append(f"{t['what'][:78]:78s} {fig_text:40s} {tg.gap_text(t)}")
        met = sum(t["met"] is True for t in ts)
        lines.append(f"targets: {met} met, {sum(t['met'] is False for t in ts)} not met, "
                     f"{sum(t['met'] is None for t in ts)} not measured")
    failed = [r for r in rows if r.status in ("mismatch", "error")]
    if failed:
        lines.append(f"{len(failed)} rows failed (WRONG answers or errors): see the JSON's messages")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.audit and (not args.suites or not (args.parity or __import__("torch").cuda.is_available())):
        from . import suite_audit  # the work audit (interpreter): alone, or after the parity sweep without a GPU

        return max(run_parity(args) if args.suites else 0, suite_audit.run_cli(args))
    if args.parity:
        return run_parity(args)
    import torch

    if not torch.cuda.is_available():
        return run_parity(args)
    from gptkernels._backend import triton_interpret  # a GPU: nothing to choose, triton may be imported

    if triton_interpret():
        print("benchmarks.run: TRITON_INTERPRET is set: unset it to time kernels on the GPU "
              "(or pass --parity)", file=sys.stderr)
        return 2
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
