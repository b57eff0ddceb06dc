"""What keeps the first GPU run inside its 15 minutes (issue 13), proven on CPU.

* the autotuner: a single remaining config is never timed, GPTKERNELS_AUTOTUNE=0 reaches every
  autotuned kernel, timing is short;
* the full (GPU) test grid: every case is collected and constructed here, up to its first kernel
  launch, so a malformed case cannot wait for a GPU to show;
* ``make gpu-smoke``: its dry run (fake device and clock) walks the plan in order, skips a step that
  would overrun with its reason, and leaves its files under $OUT even when a step raises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import triton
import triton.language as tl

from gptkernels.triton import _config
from tests.helpers import DEVICE, ON_GPU, full_grid

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
    x = torch.arange(n, dtype=torch.float32, device=DEVICE)
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, n)
    assert torch.equal(x.cpu(), torch.arange(n, dtype=torch.float32) + 1)  # every element, exactly once


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
    x = torch.zeros(10, device=DEVICE)
    one = _tiny_kernel(prune=lambda cfgs, nargs, **kw: cfgs[:1])
    one.nargs = {"x_ptr": x, "n": 10}
    (cfg,) = one.prune_configs({})
    assert one._bench(x, 10, config=cfg) == [0.0, 0.0, 0.0] and timed == []
    two = _tiny_kernel()
    two.nargs = {"x_ptr": x, "n": 10}
    cfgs = two.prune_configs({})
    assert len(cfgs) == 2 and two._bench(x, 10, config=cfgs[0])[0] > 0 and len(timed) == 1
    assert not x.any()  # neither launched the kernel (the fake does not)


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
    import importlib
    import pkgutil

    from triton.runtime.autotuner import Autotuner

    import gptkernels.triton

    modules = [importlib.import_module(f"gptkernels.triton.{m.name}") for m in pkgutil.iter_modules(gptkernels.triton.__path__)]
    tuners = {f"{m.__name__}.{name}": obj for m in modules for name, obj in vars(m).items()
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
    """The test files whose parameters depend on the grid (they import tests.helpers.grid)."""
    import ast

    here, files = os.path.join(REPO, "tests"), []
    for name in sorted(os.listdir(here)):
        if name.startswith("test_") and name.endswith(".py"):
            tree = ast.parse(open(os.path.join(here, name)).read())
            if any(isinstance(node, ast.ImportFrom) and node.module == "tests.helpers"
                   and any(a.name in ("grid", "FULL_GRID") for a in node.names) for node in ast.walk(tree)):
                files.append(f"tests/{name}")
    return files


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


# --------------------------------------------------------------------------------------------------
# make gpu-smoke: the dry run (fake device, jobs and clock) walks the real plan
# --------------------------------------------------------------------------------------------------


def _smoke(tmp_path, monkeypatch, *args):
    from benchmarks import gpu_check

    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    monkeypatch.setenv("OUT", str(out))
    rc = gpu_check.main(["--part", "smoke", "--scratch", str(tmp_path / "work"), *args])
    res = json.loads((out / "smoke.json").read_text())
    return rc, res, out


def _steps(res):
    return {s["name"]: s for s in res["steps"]}


def test_dry_run_walks_the_smoke_plan_in_order(tmp_path, monkeypatch, capsys):
    from benchmarks import gpu_check, results

    rc, res, out = _smoke(tmp_path, monkeypatch, "--dry-run")
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert [s["name"] for s in res["steps"]] == list(gpu_check.SMOKE_STEPS)
    starts = [s["start_s"] for s in res["steps"]]
    assert starts == sorted(starts) and res["seconds"] <= res["deadline_s"]
    assert {n: s["status"] for n, s in _steps(res).items()} == {
        "build": "started", "facts": "ok", "tests": "ok", "cuda_tests": "ok", "bench": "ok", "report": "ok"}
    assert res["dry_run"] and res["build"]["state"] == "ok" and res["facts"]["sm_count"] == 132
    assert res["tests"]["total"]["passed"] > 0 and res["cuda_tests"]["total"]["passed"] > 0
    # the jobs a real run starts, in the log: the build, the facts, pytest shards, benchmarks.run --smoke
    log = (out / "gpu.log").read_text()
    for cmd in ("setup.py build_ext --inplace", "benchmarks.gpu_check --facts", "-p benchmarks.sharding",
                "--deselect tests/test_flash_attn.py::test_compiles_for_hopper", "benchmarks.run", "--smoke"):
        assert cmd in log, cmd
    files = sorted(p.name for p in out.iterdir())
    assert files == ["BENCHMARKS.md", "bench.json", "build.log", "gpu.log", "smoke.json", "summary.txt", "tests.log"]
    assert len(files) <= gpu_check.OUT_FILES_MAX and all((out / f).stat().st_size < 16 << 20 for f in files)
    assert results.load(out / "bench.json")["kind"] == "gpu"
    assert "DRY RUN" in (out / "summary.txt").read_text() and "DRY RUN" in printed.splitlines()[0]
    assert printed.rstrip().endswith((out / "summary.txt").read_text().rstrip().splitlines()[-1])  # the table last


def test_dry_run_skips_a_step_that_would_overrun(tmp_path, monkeypatch):
    # the facts take long: no room for the tests (the benchmarks keep their share), the build is not
    # done for the CUDA tests, the benchmarks get what is left
    rc, res, out = _smoke(tmp_path, monkeypatch, "--deadline", "200", "--dry-run", "facts=100")
    st = _steps(res)
    assert st["tests"]["status"] == "skipped" and "for the tests" in st["tests"]["reason"]
    assert st["cuda_tests"]["status"] == "skipped" and "not built" in st["cuda_tests"]["reason"]
    assert st["bench"]["status"] == "partial" and st["report"]["status"] == "ok"
    assert res["seconds"] <= 200 and (out / "bench.json").exists()
    # later still: the benchmarks do not fit either, and say why; the files are written all the same
    rc, res, out = _smoke(tmp_path, monkeypatch, "--deadline", "200", "--dry-run", "facts=130")
    st = _steps(res)
    assert st["bench"]["status"] == "skipped" and "needs at least 60 s" in st["bench"]["reason"]
    assert st["report"]["status"] == "skipped" and res["seconds"] <= 200
    assert {"smoke.json", "summary.txt", "gpu.log", "build.log"} <= {p.name for p in out.iterdir()}


def test_dry_run_stops_a_job_at_its_share_and_keeps_its_results(tmp_path, monkeypatch):
    rc, res, _ = _smoke(tmp_path, monkeypatch, "--dry-run", "tests=500")
    st = _steps(res)
    assert st["tests"]["status"] == "partial" and 140 <= st["tests"]["seconds"] <= 150  # 35% of 420 s
    t = res["tests"]
    assert t["stopped_shards"] and t["total"]["passed"] > 0 and t["not_run"] > 0  # counts so far, and the rest
    assert st["bench"]["status"] == "ok" and res["seconds"] <= 420


def test_dry_run_writes_the_files_when_steps_raise_or_fail(tmp_path, monkeypatch):
    rc, res, out = _smoke(tmp_path, monkeypatch, "--dry-run",
                          "build=20,raise=tests,raise=report,bench.rc=1,cuda_tests.rc=1")
    st = _steps(res)
    assert rc == 1
    assert st["tests"]["status"] == "error" and "planted by the dry run" in st["tests"]["reason"]
    assert st["report"]["status"] == "error" and st["bench"]["status"] == "failed"
    assert st["cuda_tests"]["status"] == "failed"
    assert res["cuda_tests"]["failures"][0]["message"] == "AssertionError: planted by the dry run"
    assert "Traceback" in (out / "gpu.log").read_text()
    assert {"smoke.json", "summary.txt", "gpu.log", "tests.log"} <= {p.name for p in out.iterdir()}


def test_dry_run_interrupted_from_outside_still_writes(tmp_path, monkeypatch):
    from benchmarks import gpu_check

    def interrupted(check):
        check.step("facts", check.facts, need=0)
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(gpu_check, "smoke", interrupted)
    rc, res, out = _smoke(tmp_path, monkeypatch, "--dry-run")
    assert "signal 15" in res["interrupted"] and res["facts"]["dry_run"]
    assert {"smoke.json", "summary.txt", "gpu.log"} <= {p.name for p in out.iterdir()}


def test_smoke_steps_can_be_chosen(tmp_path, monkeypatch):
    # a second call: the benchmarks only
    rc, res, _ = _smoke(tmp_path, monkeypatch, "--dry-run", "--steps", "facts,bench,report")
    st = _steps(res)
    assert [n for n, s in st.items() if s["status"] != "skipped"] == ["facts", "bench", "report"]
    assert st["tests"]["reason"] == "not asked for (--steps)"


# --------------------------------------------------------------------------------------------------
# make gpu-smoke: the real jobs on CPU (processes, pytest shards, the facts)
# --------------------------------------------------------------------------------------------------


def _real_check(tmp_path, deadline=120):
    from benchmarks import gpu_check

    args = gpu_check.parse_args(["--part", "smoke", "--deadline", str(deadline)])
    clock = gpu_check.Clock()
    log = gpu_check.Log(tmp_path / "gpu.log", clock)
    return gpu_check.Check(args, tmp_path, tmp_path, clock, log, gpu_check.Executor(clock, log), None)


def test_a_job_past_its_limit_is_stopped_with_its_process_group(tmp_path):
    from benchmarks import gpu_check

    check = _real_check(tmp_path)
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('started', p.pid, flush=True); time.sleep(60)")
    job = check.ex.start(gpu_check.Job("sleeper", "tests", [sys.executable, "-c", code], tmp_path / "s.log", 2.0))
    check.ex.wait([job])
    assert job.timed_out and job.rc == 124 and job.seconds < 15
    text = job.log.read_text()
    assert "started" in text and "[stopped at its limit of 2 s" in text
    child = int(text.split("started")[1].split()[0])
    time.sleep(0.5)
    try:  # the process it started is gone too (or a zombie waiting for a reaper)
        state = open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z", "X"), state


def test_real_pytest_shards_are_counted(tmp_path):
    """The smoke's pytest command line (sharding plugin, --deselect, -rfE) on a small test file."""
    (tmp_path / "test_tiny.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('case', [(1, 2), (3, 4), (5, 6)], ids=str)\n"
        "def test_ok(case):\n    assert case\n"
        "def test_fails():\n    assert 1 == 2, 'planted'\n"
        "def test_left_out():\n    raise SystemExit('deselected: never runs')\n"
        "@pytest.mark.skip(reason='needs a CUDA GPU')\n"
        "def test_skipped():\n    pass\n")
    # pytest's rootdir (node ids are relative to it) is this folder wherever the checkout is: without
    # a config file here, a checkout sharing a parent with it (both under /tmp) made that parent the
    # rootdir, and the --deselect id below missed
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    check = _real_check(tmp_path)
    path = os.path.relpath(tmp_path / "test_tiny.py", REPO)  # the jobs run in the checkout, as on the GPU
    # (node ids are relative to pytest's rootdir: the checkout on the GPU, the tmp folder here)
    jobs = check.shard_jobs("tests", [path], 2, {}, check.clock.now() + 100, {"test_tiny.py::test_left_out": "why"})
    for j in jobs:
        check.ex.start(j)
    check.ex.wait(jobs)
    s = check.summarise(jobs)
    assert s["total"] == {"passed": 3, "failed": 1, "errors": 0, "skipped": 1}, [j.lines() for j in jobs]
    assert s["planned"] == 5 and s["not_run"] == 0 and s["verdict"] == "failed" and not s["crashed_shards"]
    (fail,) = s["failures"]
    assert fail["test"].endswith("test_tiny.py::test_fails") and "planted" in fail["message"]


def test_the_facts_job_runs_without_a_gpu(tmp_path):
    from benchmarks import gpu_check

    assert gpu_check.main(["--facts", str(tmp_path / "facts.json")]) == 0
    facts = json.loads((tmp_path / "facts.json").read_text())
    assert facts["cuda_available"] == ON_GPU and facts["versions"]["torch"] and facts["cpu_count"]
    assert ("ceilings" in facts) == ON_GPU


def test_shards_put_gpu_only_checks_first_and_interleave_files():
    from benchmarks import sharding

    ids = [f"tests/test_a.py::t[{i}]" for i in range(6)] + ["tests/test_b.py::x", "tests/test_b.py::y_past_2_31",
                                                           "tests/test_b.py::z"]
    ranked = [ids[k] for k in sharding.order(ids)]
    assert ranked[0] == "tests/test_b.py::y_past_2_31"
    # a[0] b[0] a[1] a[2] b[2] ...: file b is not left to the end
    assert ranked.index("tests/test_b.py::z") < ranked.index("tests/test_a.py::t[5]")
    assert sorted(ranked) == sorted(ids)
    assert sharding.parse("3/8") == (3, 8)
    for bad in ("8/8", "x", "1"):
        with pytest.raises(ValueError, match="GPTKERNELS_SHARD"):
            sharding.parse(bad)


def test_nothing_starts_after_the_check_stops_its_jobs(tmp_path):
    # a job started in its own session would outlive the device call: after stop_all none starts
    from benchmarks import gpu_check

    check = _real_check(tmp_path)
    check.ex.stop_all("at the end of the check")
    job = check.ex.start(gpu_check.Job("late", "tests", [sys.executable, "-c", "pass"], tmp_path / "late.log", 5.0))
    assert job.proc is None and job.done and job.status() == "not started: the check was ending"
    check.ex.wait([job])  # returns at once


def test_real_tests_step_on_cpu(tmp_path):
    """The tests step itself with real processes (its pool, limit and summary), on a tiny test file."""
    (tmp_path / "test_small.py").write_text("def test_a():\n    pass\n\ndef test_b():\n    assert False, 'x'\n")
    check = _real_check(tmp_path, deadline=200)  # the tests' share: 70 s
    check.args.tests = os.path.relpath(tmp_path / "test_small.py", REPO)
    rec = check.step("tests", check.tests, need=10)
    t = check.res["tests"]
    assert rec["status"] == "failed" and t["total"]["passed"] == 1 and t["total"]["failed"] == 1, t
    assert t["planned"] == 2 and t["failures"][0]["test"].endswith("test_b") and not t["crashed_shards"]
    assert rec["seconds"] < 60 and rec["limit_s"] == 70
    assert json.loads((tmp_path / "smoke.json").read_text())["steps"][0]["name"] == "tests"


@pytest.mark.skipif(bool(__import__("shutil").which("nvidia-smi")), reason="checks the path of a machine without nvidia-smi")
def test_smoke_without_a_gpu_says_so_and_writes_its_files(tmp_path, monkeypatch, capsys):
    rc, res, out = _smoke(tmp_path, monkeypatch)
    assert rc == 2 and "no nvidia-smi" in res["steps"][0]["reason"]
    assert {"smoke.json", "summary.txt", "gpu.log"} <= {p.name for p in out.iterdir()}
    assert "needs an NVIDIA GPU" in capsys.readouterr().out
