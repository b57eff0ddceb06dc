"""What keeps the first GPU run inside its 15 minutes (issue 13), proven on CPU.

* the autotuner: a single remaining config is never timed, GPTKERNELS_AUTOTUNE=0 reaches every
  autotuned kernel, timing is short;
* the full (GPU) test grid: every case is collected and constructed here, up to its first kernel
  launch, so a malformed case cannot wait for a GPU to show;
* ``make gpu-smoke``: its dry run (fake device and clock) walks the plan in order, skips a step that
  would overrun with its reason, and leaves its files under $OUT even when a step raises.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from gptkernels.triton import _config
from tests.helpers import ON_GPU, full_grid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------------
# The autotuner
# --------------------------------------------------------------------------------------------------


def _tiny_kernel(prune=None):
    """A kernel autotuned over two configs (the interpreter runs it on CPU tensors)."""

    @_config.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["n"],
                      prune_configs_by=None if prune is None else {"early_config_prune": prune})
    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)

    return add_one


def _launch(kernel, n):
    x = torch.arange(n, dtype=torch.float32)
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, n)
    assert torch.equal(x, torch.arange(n, dtype=torch.float32) + 1)  # every element, exactly once


@pytest.fixture
def timed(monkeypatch):
    """Replaces the autotuner's timing with a fake that records each call (and never times)."""
    calls = []

    def fake(kernel_call, quantiles):
        calls.append(1)
        return [1.0 + len(calls), 1.0, 1.0]

    monkeypatch.setattr(_config, "time_config", fake)
    monkeypatch.setenv(_config.ENV_AUTOTUNE, "1")
    return calls


@pytest.mark.skipif(ON_GPU, reason="the kernel runs in the CPU interpreter (the fake replaces GPU timing)")
def test_single_remaining_config_is_not_timed(timed):
    kernel = _tiny_kernel(prune=lambda cfgs, nargs, **kw: cfgs[1:])  # one config left
    _launch(kernel, 100)
    assert timed == [] and kernel.best_config.kwargs == {"BLOCK": 32}
    # with a real choice the fake is what times them (so the assertion above could fail)
    both = _tiny_kernel()
    _launch(both, 100)
    assert len(timed) == 2 and both.best_config.kwargs == {"BLOCK": 16}
    _launch(both, 100)  # same key: the choice is cached, nothing timed again
    assert len(timed) == 2


def test_single_config_shortcut_on_triton_versions_that_time_it(timed):
    # Triton 3.6 (the GPU image's) sends even one remaining config through its timing loop (_bench);
    # Triton >= 3.7 skips the loop itself. Here the loop's step is called as 3.6 calls it.
    x = torch.zeros(10)
    one = _tiny_kernel(prune=lambda cfgs, nargs, **kw: cfgs[:1])
    one.nargs = {"x_ptr": x, "n": 10}
    (cfg,) = one.prune_configs({})
    assert one._bench(x, 10, config=cfg) == [0.0, 0.0, 0.0] and timed == []
    two = _tiny_kernel()
    two.nargs = {"x_ptr": x, "n": 10}
    cfgs = two.prune_configs({})
    assert len(cfgs) == 2 and two._bench(x, 10, config=cfgs[0])[0] > 0 and len(timed) == 1
    assert torch.equal(x, torch.zeros(10))  # neither launched the kernel (the fake does not)


@pytest.mark.skipif(ON_GPU, reason="the kernel runs in the CPU interpreter (the fake replaces GPU timing)")
def test_autotune_off_takes_the_first_config_untimed(timed, monkeypatch):
    monkeypatch.setenv(_config.ENV_AUTOTUNE, "0")
    kernel = _tiny_kernel()
    _launch(kernel, 77)
    assert timed == [] and kernel.best_config.kwargs == {"BLOCK": 16}
    # after the kernel's own pruning: its first remaining config
    pruned = _tiny_kernel(prune=lambda cfgs, nargs, **kw: cfgs[::-1])
    _launch(pruned, 77)
    assert timed == [] and pruned.best_config.kwargs == {"BLOCK": 32}


def test_autotuning_times_briefly(monkeypatch):
    seen = {}

    def fake_do_bench(fn, warmup, rep, quantiles):
        seen.update(warmup=warmup, rep=rep, quantiles=quantiles)
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    assert _config.time_config(lambda: None, (0.5, 0.2, 0.8)) == [1.0, 1.0, 1.0]
    assert seen == {"warmup": _config.TUNE_WARMUP_MS, "rep": _config.TUNE_REP_MS, "quantiles": (0.5, 0.2, 0.8)}
    assert _config.TUNE_WARMUP_MS + _config.TUNE_REP_MS <= 50  # Triton's default is 25 + 100 ms per config


def test_every_autotuned_kernel_uses_the_package_autotuner():
    # GPTKERNELS_AUTOTUNE=0 and the single-config shortcut reach a kernel only through _config.autotune
    from triton.runtime.autotuner import Autotuner

    from gptkernels.triton import flash_attn, paged, rotary

    tuners = {f"{m.__name__}.{name}": obj for m in (flash_attn, paged, rotary) for name, obj in vars(m).items()
              if isinstance(obj, Autotuner)}
    assert {"gptkernels.triton.flash_attn._fwd_kernel", "gptkernels.triton.paged._paged_decode_kernel"} <= set(tuners)
    assert all(type(t) is _config._Tuner for t in tuners.values()), {n: type(t) for n, t in tuners.items()}


def test_full_grid_switch():
    assert full_grid({}, on_gpu=True) and not full_grid({}, on_gpu=False)
    assert not full_grid({"GPTKERNELS_FULL_GRID": "0"}, on_gpu=True)  # make gpu-smoke: the small grid on a GPU
    assert full_grid({"GPTKERNELS_FULL_GRID": "1"}, on_gpu=False)


# --------------------------------------------------------------------------------------------------
# The full (GPU) grid, collected and constructed on CPU
# --------------------------------------------------------------------------------------------------


def _grid_test_files() -> list[str]:
    """The test files whose parameters depend on the grid (they call tests.helpers.grid)."""
    here = os.path.join(REPO, "tests")
    return sorted(f"tests/{name}" for name in os.listdir(here) if name.startswith("test_") and name.endswith(".py")
                  and "grid(" in open(os.path.join(here, name)).read() and name != "test_gpu_smoke.py")


def test_full_grid_cases_construct_on_cpu(tmp_path):
    """Every case only the full grid has is built on CPU, inputs included, up to its first kernel
    launch (tests/full_grid_dry.py): a malformed case fails here instead of on a GPU."""
    files = _grid_test_files()
    assert "tests/test_flash_attn.py" in files
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "GPTKERNELS_AUTOTUNE": "0"}
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "console_output_style=classic"]
    small = subprocess.run(base + ["--collect-only", "-q", *files], cwd=REPO, capture_output=True, text=True,
                           env={**env, "GPTKERNELS_FULL_GRID": "0"}, timeout=600)
    assert small.returncode == 0, small.stdout[-3000:] + small.stderr[-3000:]
    small_ids = [line.strip() for line in small.stdout.splitlines() if "::" in line]
    (tmp_path / "small.txt").write_text("\n".join(small_ids))
    report = tmp_path / "report.tsv"
    full = subprocess.run(base + ["-p", "tests.full_grid_dry", "-q", *files], cwd=REPO, capture_output=True,
                          text=True, env={**env, "GPTKERNELS_FULL_GRID": "1", "GPTKERNELS_DRY_LAUNCH_REPORT": str(report),
                                          "GPTKERNELS_DRY_LAUNCH_SKIP_IDS": str(tmp_path / "small.txt")},
                          timeout=900)
    outcomes = [line.split("\t") for line in report.read_text().splitlines()] if report.exists() else []
    bad = [f"{node}: {detail}" for outcome, node, detail in outcomes if outcome == "failed"]
    assert full.returncode == 0 and not bad, "\n".join(bad[:40]) + full.stdout[-3000:] + full.stderr[-2000:]
    reached = [node for outcome, node, detail in outcomes if outcome == "skipped" and "reached a kernel launch" in detail]
    assert len(reached) > 500, full.stdout[-3000:]
    # the 36 malformed paged-prefill cases of the GPU grid (dense q with unequal chunk lengths)
    # construct now: 12 cases, one dtype each here
    paged = [node for node in reached if node.startswith("tests/test_flash_attn.py::test_paged_prefill[")
             and ", False)" in node]
    assert len(paged) >= 12, "\n".join(node for _, node, _ in outcomes if "test_paged_prefill" in node)
