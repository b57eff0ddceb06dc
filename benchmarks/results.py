"""The result of a run: rows, tables, and the JSON document (schema, validation, save, load).

A *row* is one implementation on one case: its correctness check against the reference, then (when
the check passed) its median time and the figure that time gives (TFLOP/s, GB/s or tokens/s) with the
flop/byte formula and the % of the device ceiling. A *table* groups rows of one benchmark (one plot
panel, one Markdown table): its title, the x axis, the unit, the formula.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA = "gptkernels-bench/1"

#: ok: checked and timed. mismatch: the correctness check failed (not timed). error: it raised.
#: unavailable: that backend/peer cannot run here (not built, not supported). skipped: not run (time
#: budget, or a peer that does not apply). pass/fail: rows of the interpreter parity sweep.
STATUSES = ("ok", "mismatch", "error", "unavailable", "skipped", "pass", "fail")
FAILING = ("mismatch", "error", "fail")
KINDS = ("gpu", "parity", "audit")  # audit: work counts in the interpreter (benchmarks/suite_audit.py)


@dataclass
class Table:
    id: str
    suite: str
    title: str
    x: str  # the name of the varying parameter ("S", "context", "block size", "model/batch"...)
    unit: str  # the primary figure's unit: "TFLOP/s", "GB/s", "tok/s", "ms"
    formula: str = ""
    ceiling: str | None = None  # "matmul" | "copy" | None
    plot: str | None = None  # "line" | "bar" | None
    note: str = ""


@dataclass
class Row:
    table: str
    case: str  # the x value as text ("4096", "pythia-1.4b B=32")
    impl: str  # "gptkernels triton", "torch sdpa flash", ...
    status: str
    x: float | None = None  # the x value as a number, for plots (None: categorical)
    ours: bool = False
    message: str = ""
    params: dict = field(default_factory=dict)
    ms: float | None = None
    value: float | None = None  # the primary figure, in the table's unit
    flops: float | None = None
    bytes: float | None = None
    pct: float | None = None  # % of the table's ceiling
    err: float | None = None  # max error vs float64 (where checked)
    bound: float | None = None  # the parity bound it was held to
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"row status must be one of {STATUSES}, got {self.status!r}")


def finish_row(row: Row, table: Table, ceilings: dict | None) -> Row:
    """Fill value and pct from ms and the flop/byte count, by the table's unit and ceiling."""
    if row.status != "ok" or row.ms is None or row.ms <= 0:
        return row
    sec = row.ms * 1e-3
    if row.value is None:
        if table.unit == "TFLOP/s" and row.flops is not None:
            row.value = row.flops / sec / 1e12
        elif table.unit == "GB/s" and row.bytes is not None:
            row.value = row.bytes / sec / 1e9
        elif table.unit == "ms":
            row.value = row.ms
    if ceilings and row.pct is None and row.value is not None:
        if table.ceiling == "matmul" and table.unit == "TFLOP/s":
            row.pct = 100.0 * row.value / ceilings["matmul_tflops"]
        elif table.ceiling == "copy" and table.unit == "GB/s":
            row.pct = 100.0 * row.value / ceilings["copy_gbps"]
    return row


def new_document(kind: str, env: dict, *, suites: list[str], quick: bool, ceilings: dict | None,
                 tables: list[Table], rows: list[Row], duration_s: float, targets: list[dict] | None = None,
                 plots: list[str] | None = None, notes: list[str] | None = None) -> dict:
    doc = {
        "schema": SCHEMA,
        "kind": kind,
        "env": env,
        "suites": list(suites),
        "quick": bool(quick),
        "ceilings": ceilings,
        "tables": [asdict(t) for t in tables],
        "rows": [asdict(r) for r in rows],
        "targets": targets or [],
        "plots": plots or [],
        "notes": notes or [],
        "duration_s": duration_s,
    }
    validate(doc)
    return doc


_ENV_KEYS = ("device", "date", "commit", "torch", "triton")
_ROW_KEYS = {f for f in Row.__dataclass_fields__}
_TABLE_KEYS = {f for f in Table.__dataclass_fields__}


def validate(doc: dict) -> None:
    """Raise ValueError naming the first thing wrong with a result document."""
    if not isinstance(doc, dict):
        raise ValueError(f"document must be a dict, got {type(doc).__name__}")
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"schema must be {SCHEMA!r}, got {doc.get('schema')!r}")
    if doc.get("kind") not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {doc.get('kind')!r}")
    env = doc.get("env")
    if not isinstance(env, dict) or any(k not in env for k in _ENV_KEYS):
        raise ValueError(f"env must be a dict with keys {_ENV_KEYS}, got {env!r}")
    if doc["kind"] == "gpu":
        c = doc.get("ceilings")
        if not isinstance(c, dict) or not all(_positive(c.get(k)) for k in ("matmul_tflops", "copy_gbps")):
            raise ValueError(f"a gpu run needs ceilings with positive matmul_tflops and copy_gbps, got {c!r}")
    tables = doc.get("tables")
    if not isinstance(tables, list):
        raise ValueError("tables must be a list")
    ids = set()
    for t in tables:
        if not isinstance(t, dict) or set(t) != _TABLE_KEYS:
            raise ValueError(f"table must have exactly the keys {sorted(_TABLE_KEYS)}, got {t!r}")
        ids.add(t["id"])
    rows = doc.get("rows")
    if not isinstance(rows, list):
        raise ValueError("rows must be a list")
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or set(r) != _ROW_KEYS:
            raise ValueError(f"rows[{i}] must have exactly the keys {sorted(_ROW_KEYS)}, got {r!r}")
        if r["status"] not in STATUSES:
            raise ValueError(f"rows[{i}].status must be one of {STATUSES}, got {r['status']!r}")
        if r["table"] not in ids:
            raise ValueError(f"rows[{i}].table {r['table']!r} is not among the tables {sorted(ids)}")
        if r["status"] == "ok" and not _positive(r["ms"]):
            raise ValueError(f"rows[{i}] is ok but has no positive ms: {r['ms']!r}")
        if r["status"] in ("mismatch", "error", "fail") and not r["message"]:
            raise ValueError(f"rows[{i}] has status {r['status']} but no message saying why")
    for key in ("targets", "plots", "notes", "suites"):
        if not isinstance(doc.get(key), list):
            raise ValueError(f"{key} must be a list")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _clean(obj):
    """JSON has no NaN/inf: write them as strings so the file stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def save(doc: dict, path: str | os.PathLike) -> Path:
    validate(doc)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # written whole, then renamed: a kill never leaves half a file
    tmp.write_text(json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def load(path: str | os.PathLike) -> dict:
    doc = json.loads(Path(path).read_text())
    validate(doc)
    return doc


def tables_of(doc: dict) -> dict[str, Table]:
    return {t["id"]: Table(**t) for t in doc["tables"]}


def rows_of(doc: dict) -> list[Row]:
    return [Row(**r) for r in doc["rows"]]
