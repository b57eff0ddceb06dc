"""pytest plugin: run each test only up to its first Triton kernel launch.

With ``GPTKERNELS_FULL_GRID=1`` on a machine without a GPU this builds every case of the full (GPU)
grid, its inputs included, and stops at the launch, which it reports as a skip whose reason starts
with :data:`REACHED`. A malformed case (an assert in the test's own setup, a shape that does not
fit) fails here, on CPU, instead of waiting for a GPU to show it. ``tests/test_gpu_smoke.py`` runs
it in a subprocess:

    GPTKERNELS_FULL_GRID=1 GPTKERNELS_DRY_LAUNCH_SKIP_IDS=ids.txt \
        python -m pytest -p tests.full_grid_dry tests/test_flash_attn.py ...

``GPTKERNELS_DRY_LAUNCH_SKIP_IDS`` names a file of node ids to deselect (the small grid's, which
``make test`` runs for real anyway); of the rest, one dtype per case runs.
``GPTKERNELS_DRY_LAUNCH_REPORT`` names a file that gets one line per test: its outcome, a tab, its
node id, a tab, the skip reason or the first line of the failure.
"""

from __future__ import annotations

import os

import pytest

REACHED = "dry run: reached a kernel launch"
ENV_SKIP_IDS = "GPTKERNELS_DRY_LAUNCH_SKIP_IDS"
ENV_REPORT = "GPTKERNELS_DRY_LAUNCH_REPORT"


def _stop(self, *args, warmup=False, **kwargs):
    if warmup:  # compile-only calls launch nothing
        return None
    name = getattr(getattr(self, "fn", None), "__name__", type(self).__name__)
    pytest.skip(f"{REACHED} ({name})")


def pytest_configure(config):
    # Both launch paths: the interpreter's (CPU) and the compiled one (a GPU), patched for this
    # process only (a pytest subprocess made for the dry run).
    from triton.runtime import jit
    from triton.runtime.interpreter import InterpretedFunction

    InterpretedFunction.run = _stop
    jit.JITFunction.run = _stop


def _case_key(item):
    """A test and its parameters other than the dtype: a case's construction is the same in every
    dtype, so one dtype per case is enough here (and halves the run)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return item.nodeid.split("[")[0], tuple(sorted((k, repr(v)) for k, v in params.items() if k != "dtype"))


def pytest_collection_modifyitems(config, items):
    skip = set()
    path = os.environ.get(ENV_SKIP_IDS)
    if path:
        with open(path) as f:
            skip = {line.strip() for line in f if line.strip()}
    keep, dropped, seen = [], [], set()
    for item in items:
        key = _case_key(item)
        if item.nodeid in skip or key in seen:
            dropped.append(item)
        else:
            seen.add(key)
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def pytest_runtest_logreport(report):
    path = os.environ.get(ENV_REPORT)
    if not path or not (report.when == "call" or report.outcome != "passed"):
        return
    if report.skipped and isinstance(report.longrepr, tuple):
        detail = report.longrepr[2]
    else:
        detail = str(report.longrepr or "").strip().splitlines()[-1:] or [""]
        detail = detail[0] if isinstance(detail, list) else detail
    with open(path, "a") as f:
        f.write(f"{report.outcome}\t{report.nodeid}\t{detail.replace(chr(9), ' ').replace(chr(10), ' ')}\n")
