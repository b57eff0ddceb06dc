"""One row at a time: check against the reference, then time; every failure becomes a row, never a crash.

A suite builds its cases (input sets, a reference) and calls :meth:`Session.measure` once per
implementation. The session owns the time budget, the progress bar and the collected rows.
"""

from __future__ import annotations

import gc
import traceback

import torch

from . import timing
from .results import Row, Table, finish_row

#: Peers (torch SDPA, FlexAttention, HF code) are the yardstick, not the code under test: their check
#: catches a wrong benchmark setup (layout, mask, scale), so it allows this many times SPEC's bound.
PEER_SLACK = 2.0


def _short(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def classify(e: BaseException) -> str:
    """The row status an exception gives: unavailable (cannot run here, said clearly) or error."""
    try:
        from gptkernels import BackendUnavailableError
    except Exception:  # pragma: no cover - the package failing to import is an error for every row
        BackendUnavailableError = ()  # noqa: N806
    if BackendUnavailableError and isinstance(e, BackendUnavailableError):
        return "unavailable"
    # torch SDPA forced onto a backend that does not take this case says so in these words
    if isinstance(e, RuntimeError) and any(m in str(e) for m in ("No available kernel", "No viable backend")):
        return "unavailable"
    return "error"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Session:
    """Collects the rows of one run; ``quick`` shortens timings, ``budget`` caps a suite's wall time."""

    def __init__(self, *, quick: bool, ceilings: dict | None, progress=None, verbose: bool = False):
        self.quick = quick
        self.ceilings = ceilings
        self.tables: dict[str, Table] = {}
        self.rows: list[Row] = []
        self.budget = timing.Budget(None)
        self.progress = progress
        self.verbose = verbose
        #: called after every row (run.py saves the JSON: a run stopped mid-suite keeps its rows)
        self.on_row = None
        #: which rows this run plans, ``select(table, case, impl) -> bool`` (None: every row a suite
        #: lists); ``benchmarks.run --smoke`` narrows it to the headline rows first
        self.select = None

    def wanted(self, table: str, case: str, impl: str) -> bool:
        """Whether the row is in the run's plan: a suite builds a case only if one of its rows is."""
        return self.select is None or bool(self.select(table, case, impl))

    # ---- tables and rows -------------------------------------------------------------------------

    def table(self, table: Table) -> Table:
        self.tables.setdefault(table.id, table)
        return self.tables[table.id]

    def add(self, row: Row) -> Row:
        finish_row(row, self.tables[row.table], self.ceilings)
        self.rows.append(row)
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix_str(f"{row.table} {row.case} {row.impl}: {row.status}"[:70])
        if self.verbose:
            fig = f"{row.value:.1f}" if row.value is not None else "-"
            print(f"  {row.table:24s} {row.case:>18s} {row.impl:34s} {row.status:11s} {fig}", flush=True)
        if self.on_row is not None:
            try:
                self.on_row()
            except Exception as e:  # saving must not turn a measured row into a failed one
                print(f"saving after a row failed: {type(e).__name__}: {e}", flush=True)
        return row

    def skip(self, table: str, case: str, impl: str, why: str, **kw) -> Row:
        return self.add(Row(table=table, case=case, impl=impl, status="skipped", message=why, **kw))

    def fail(self, table: str, case: str, impl: str, e: BaseException, **kw) -> Row:
        status = classify(e)
        if self.verbose and status == "error":
            traceback.print_exception(e)
        free_memory()
        return self.add(Row(table=table, case=case, impl=impl, status=status, message=_short(e), **kw))

    # ---- measuring ---------------------------------------------------------------------------------

    def measure(self, table: str, case: str, impl: str, *, run, sets, check, ours: bool = False,
                x: float | None = None, params: dict | None = None, flops: float | None = None,
                bytes: float | None = None, grad_to_none=None, setup=None, extra: dict | None = None) -> Row:
        """Check ``run`` on ``sets[0]`` with ``check``, then time it rotating over ``sets``.

        ``setup(sets)`` (optional) runs first and may return replacement sets (a compiled peer, a
        forward pass whose graph the backward timing reuses). ``check(out, set0)`` returns a
        :class:`benchmarks.checks.Check`. A failing check is reported and not timed.
        """
        kw = dict(table=table, case=case, impl=impl, ours=ours, x=x, params=dict(params or {}),
                  flops=flops, bytes=bytes, extra=dict(extra or {}))
        if self.budget.exhausted():
            return self.add(Row(status="skipped", message="time budget of the suite spent", **kw))
        try:
            if setup is not None:
                sets = setup(sets) or sets
            out = run(sets[0])
            chk = check(out, sets[0])
            del out
            kw.update(err=chk.err, bound=chk.bound)
            if not chk.ok and not ours and chk.err <= PEER_SLACK * chk.bound:
                kw["message"] = f"peer checked against {PEER_SLACK:g}x the parity bound: {chk.problem}"
                kw["bound"] = PEER_SLACK * chk.bound
            elif not chk.ok:
                return self.add(Row(status="mismatch", message=chk.problem, **kw))
            ms = timing.median_ms(timing.Rotating(run, sets), quick=self.quick, grad_to_none=grad_to_none)
            return self.add(Row(status="ok", ms=ms, **kw))
        except Exception as e:  # every failure is a row; the suite goes on
            for key in ("err", "bound", "message"):
                kw.pop(key, None)
            return self.fail(e=e, **kw)
