"""PNG plots from a run's JSON: one figure per suite, one panel per table.

Line panels (TFLOP/s against sequence length, GB/s against context length or block size) when a table
has several numeric x values, grouped bars otherwise; our backends drawn solid, peers dashed; the
device ceiling of that run as a grey line.
"""

from __future__ import annotations

import math
from pathlib import Path

from .results import Row, Table, rows_of, tables_of


def _ceiling(doc: dict, table: Table):
    c = doc.get("ceilings") or {}
    if table.ceiling == "matmul" and table.unit == "TFLOP/s" and c.get("matmul_tflops"):
        return c["matmul_tflops"], "bf16 matmul"
    if table.ceiling == "copy" and table.unit == "GB/s" and c.get("copy_gbps"):
        return c["copy_gbps"], "device copy"
    return None, None


def _panel(ax, doc: dict, table: Table, rows: list[Row]) -> None:
    ok = [r for r in rows if r.status == "ok" and r.value is not None]
    impls = list(dict.fromkeys(r.impl for r in rows))
    xs = sorted({r.x for r in ok if r.x is not None})
    ceiling, label = _ceiling(doc, table)
    if len(xs) >= 2 and all(r.x is not None for r in ok):
        for impl in impls:
            pts = sorted((r.x, r.value) for r in ok if r.impl == impl)
            if not pts:
                continue
            ours = impl.startswith("gptkernels")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linewidth=2.2 if ours else 1.2,
                    linestyle="-" if ours else "--", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([_short_num(x) for x in xs])
        if ceiling:
            ax.axhline(ceiling, color="grey", linestyle=":", linewidth=1.5, label=f"{label} ({ceiling:.0f})")
    else:
        cases = list(dict.fromkeys(r.case for r in rows))
        shown = [i for i in impls if any(r.impl == i for r in ok)]
        width = 0.8 / max(1, len(shown))
        for j, impl in enumerate(shown):
            vals = []
            for c in cases:
                r = next((r for r in ok if r.impl == impl and r.case == c), None)
                vals.append(r.value if r is not None else 0.0)
            ax.bar([i + j * width for i in range(len(cases))], vals, width,
                   label=impl, hatch=None if impl.startswith("gptkernels") else "//")
        ax.set_xticks([i + width * (len(shown) - 1) / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, fontsize=7)
        if ceiling:
            ax.axhline(ceiling, color="grey", linestyle=":", linewidth=1.5, label=f"{label} ({ceiling:.0f})")
    ax.set_title(table.title, fontsize=8)
    ax.set_xlabel(table.x, fontsize=8)
    ax.set_ylabel(table.unit, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)


def _short_num(x: float) -> str:
    x = int(x)
    return f"{x // 1024}k" if x >= 1024 and x % 1024 == 0 else str(x)


def plot(doc: dict, out_dir: str | Path) -> list[Path]:
    """Write one PNG per suite that has plottable rows; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables, rows = tables_of(doc), rows_of(doc)
    by_suite: dict[str, list[Table]] = {}
    for t in tables.values():
        if t.plot and any(r.table == t.id and r.status == "ok" for r in rows):
            by_suite.setdefault(t.suite, []).append(t)
    paths = []
    for suite, ts in by_suite.items():
        cols = min(2, len(ts))
        nrows = math.ceil(len(ts) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(6.5 * cols, 4.2 * nrows), squeeze=False)
        for ax, t in zip(axes.flat, ts):
            _panel(ax, doc, t, [r for r in rows if r.table == t.id])
        for ax in list(axes.flat)[len(ts):]:
            ax.set_visible(False)
        env = doc["env"]
        fig.suptitle(f"gptkernels {suite}: {env['device']}, {env['date'][:10]}, {str(env['commit'])[:12]}",
                     fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{suite}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
