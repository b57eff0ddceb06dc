"""The GPU check. ``make gpu-smoke`` is THE first thing to run whenever a GPU is at hand.

    python3 -m benchmarks.gpu_check --part smoke [--deadline 420] [--steps facts,bench,report] [--dry-run]
    python3 -m benchmarks.gpu_check --part all|build|tests|bench [--suite S] [--full] [--tests PATHS]

**The budget** (the device tool's limits, as of 2026-11): a session that is lent a GPU gets 15 minutes
of device time *in all*, the machine's start (1-2 minutes) and idle time included, and one command
may run at most 10 minutes. So the first call must bring back figures by itself: ``--part smoke``
ends by its deadline (default 420 s) whatever happens, and writes everything it learned under
``$OUT`` (at most 8 files, each under 16 MiB, no sub-folders) even when a step fails or time runs
out. Call it with a ``timeout_s`` of about deadline + 60 s; that leaves ~5 minutes for one more call
(e.g. ``--steps facts,bench,report`` for the benchmark rows a first call could not reach).

The smoke plan, in order, each step started only if what it needs fits before the deadline (else
skipped, with the reason), each bounded by its share of the time left:

0. ``build``: the CUDA extension, in the background from the start (``MAX_JOBS`` = core count);
1. ``facts``: nvidia-smi, versions, SM count, clocks, and the ceilings (bf16 matmul, device copy);
2. ``tests``: every kernel path on the GPU, bf16 included, on the interpreter's small grid
   (``GPTKERNELS_FULL_GRID=0``): pytest shards in parallel (:mod:`benchmarks.sharding`, no xdist
   needed) sharing one Triton cache; the CUDA extension's GPU tests join as soon as it is built;
3. ``cuda_tests``: those, if the build finished only after the tests step;
4. ``bench``: ``benchmarks.run --smoke``: the headline rows beside their peers (run.SMOKE_HEADLINE),
   then the rest while the time lasts;
5. ``report``: bench.json, BENCHMARKS.md and the short table, from whatever finished.

Files under ``$OUT`` (else ``bench_out/gpu-smoke-<time>``): ``smoke.json`` (every step, the device
facts, test counts and failures, the bench summary; rewritten after each step), ``summary.txt`` (the
table printed last), ``gpu.log``, ``tests.log``, ``build.log``, ``bench.json``, ``BENCHMARKS.md``.
Bring bench.json home and run ``python -m benchmarks.report bench.json`` to record it (with plots).

``--dry-run`` walks the same plan on a machine without a GPU: fake device facts, fake jobs and a
fake clock that moves by each fake job's length (``--dry-run 'tests=500,bench.rc=1,raise=report'``
sets a kind's length, its exit status, or a step that raises); ``tests/test_gpu_smoke.py`` runs it.

``--part all|build|tests|bench`` is the whole check (``make gpu``): the full test grid and the
benchmark suite, far more than one 10-minute call (split it with ``--tests`` and ``--suite``).
Exit status: non-zero when the build, a test or one of our benchmark rows failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from .env import REPO

PY = sys.executable or "python3"
RESULT_RE = r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
#: "tests/test_x.py::name[id] PASSED [ 1%]" (plain -v; ids may hold spaces: "[(1, 2)-torch.float16]") and
#: "[gw0] [ 1%] PASSED tests/test_x.py::name" (xdist)
LINE_PLAIN = re.compile(rf"^(\S+?\.py)::.*? {RESULT_RE}\b")
LINE_XDIST = re.compile(rf"^\[gw\d+\] \[\s*\d+%\] {RESULT_RE} (\S+?\.py)::")
#: pytest -rfE's summary: "FAILED tests/test_x.py::name[id] - AssertionError: ..."
LINE_SUMMARY = re.compile(r"^(FAILED|ERROR) (\S+?\.py::.*?)(?: - (.*))?$")
LINE_FAILED = re.compile(r"^(\S+?\.py::.*?) (FAILED|ERROR)\b")
LINE_SHARD = re.compile(r"^shard (\d+)/(\d+): (\d+) of (\d+) tests")

#: What comes back from a device call: at most 8 files, 16 MiB each, no deeper than 2 folders.
OUT_FILES_MAX = 8
OUT_FILE_BYTES = 15 << 20

DEFAULT_DEADLINE_S = 420.0
#: Kept free at the end for stopping jobs and writing the files.
FINAL_RESERVE_S = 20.0
#: The tests' share of the deadline (the rest goes to the benchmarks), and the least worth starting.
TESTS_SHARE, TESTS_MIN_S = 0.35, 45.0
#: Kept for the benchmarks when the tests step is sized, and the least a bench run is started with.
BENCH_KEEP_SHARE, BENCH_MIN_S = 0.45, 60.0
#: The CUDA tests when they did not run inside the tests step; how long the build is waited for.
CUDA_TESTS_CAP_S, CUDA_TESTS_MIN_S, BUILD_WAIT_S = 60.0, 20.0, 45.0
#: benchmarks.run's start-up (imports, environment) and end (saving), outside its --budget.
BENCH_OVERHEAD_S = 25.0
#: Per-test limit (pytest-timeout, where installed): one hung test must not take its shard's time.
TEST_TIMEOUT_S = 150

#: The test files of the smoke, most important first (the shards interleave them: benchmarks.sharding).
SMOKE_TESTS = ("tests/test_flash_attn.py", "tests/test_paged_ops.py", "tests/test_rotary.py", "tests/test_sdpa.py",
               "tests/test_attention_api.py", "tests/test_generate.py", "tests/test_models.py", "tests/test_hf.py",
               "tests/test_paged_cache.py", "tests/test_quant.py", "tests/test_loading.py")
#: Not in the smoke, and why (node-id prefixes).
SMOKE_DESELECT = {
    "tests/test_flash_attn.py::test_compiles_for_hopper": "offline sm_90a compile: a CPU check (make test)",
    "tests/test_paged_ops.py::test_compiles_for_hopper": "offline sm_90a compile: a CPU check (make test)",
    "tests/test_rotary.py::test_compiles_for_hopper": "offline sm_90a compile: a CPU check (make test)",
    "tests/test_flash_attn.py::test_every_gpu_config": "compiles every autotune config (~70 compiles): a later call",
}
#: The CUDA extension's tests on the GPU: test_cuda_{extension,gpu}'s full GPU lists (no Triton compiles; not
#: its CPU emulator or setup tests) and the cuda variants of the tests parametrized by backend, which
#: a process only collects once the extension is built ("cuda" also matches the module's name).
CUDA_TESTS = ("tests/test_cuda_extension.py", "tests/test_cuda_gpu.py", "tests/test_rotary.py", "tests/test_quant.py")
CUDA_TESTS_K = "cuda and not emulat and not setup"


# --------------------------------------------------------------------------------------------------
# Clock, log, jobs
# --------------------------------------------------------------------------------------------------


class Clock:
    """Seconds since the check started. The dry run's clock also moves by each fake job's length."""

    def __init__(self, dry: bool = False):
        self.dry, self._t0, self._offset = dry, time.monotonic(), 0.0

    def now(self) -> float:
        return time.monotonic() - self._t0 + self._offset

    def sleep(self, seconds: float) -> None:
        if self.dry:
            self._offset += seconds
        else:
            time.sleep(seconds)


class Log:
    """gpu.log: every command and step; ``say`` also prints the line (short progress on stdout)."""

    def __init__(self, path: Path, clock: Clock | None = None):
        self.path, self.clock = path, clock or Clock()
        self.f = open(path, "a", buffering=1, errors="replace")

    def write(self, text: str) -> None:
        self.f.write(text if text.endswith("\n") else text + "\n")

    def say(self, msg: str) -> None:
        line = f"[{self.clock.now():5.0f} s] {msg}"
        print(line, flush=True)
        self.write(line)

    def close(self) -> None:
        self.f.close()


@dataclass
class Job:
    """One command, its output going to ``log``, stopped ``timeout`` seconds after it starts."""

    name: str
    kind: str  # facts, build, import, tests, cuda_tests, bench (the dry run fakes each kind)
    cmd: list[str]
    log: Path
    timeout: float
    env: dict = field(default_factory=dict)
    started: float | None = None
    ended: float | None = None
    rc: int | None = None
    timed_out: bool = False
    note: str = ""
    proc: object = None

    @property
    def done(self) -> bool:
        return self.ended is not None

    @property
    def seconds(self) -> float:
        return 0.0 if self.started is None else (self.ended if self.done else self.started) - self.started

    @property
    def ok(self) -> bool:
        return self.done and self.rc == 0

    def status(self) -> str:
        if self.started is None or self.note.startswith("not started"):
            return self.note or "not started"
        if not self.done:
            return "running"
        if self.timed_out:
            return f"stopped ({self.note or 'at its time limit'})"
        return "ok" if self.rc == 0 else f"failed (exit {self.rc})"

    def lines(self) -> list[str]:
        try:
            return self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []


def job_env(extra: dict) -> dict:
    """The environment of every job: this one, never the interpreter, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update({"PYTHONUNBUFFERED": "1", "TRITON_CACHE_DIR": str(REPO / "build" / "triton-cache"),
                "TORCHINDUCTOR_CACHE_DIR": str(REPO / "build" / "inductor-cache")})
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Executor:
    """Runs jobs as process groups (their output in their log file) and stops them at their limit."""

    def __init__(self, clock: Clock, log: Log):
        self.clock, self.log, self.jobs = clock, log, []
        self.lock = threading.Lock()
        #: set by stop_all: nothing starts afterwards (a job started in a new session would outlive
        #: the device call)
        self.closed = False

    def refuse(self, job: Job) -> bool:
        """After stop_all: the job ends at once, unstarted (so nothing waits on it)."""
        if self.closed:
            job.started = job.ended = self.clock.now()
            job.rc, job.note = 125, "not started: the check was ending"
            self.log.write(f"# {job.name}: not started, the check was ending")
        return self.closed

    def start(self, job: Job) -> Job:
        if self.refuse(job):
            return job
        job.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write(f"\n$ {' '.join(job.cmd)}   # {job.name}: output in {job.log.name}, "
                       f"limit {job.timeout:.0f} s")
        with open(job.log, "w") as out:
            job.proc = subprocess.Popen(job.cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                        env=job_env(job.env), start_new_session=True)
        job.started = self.clock.now()
        with self.lock:
            self.jobs.append(job)
        return job

    def poll(self, job: Job) -> bool:
        """Whether ``job`` has ended (stopping it once past its limit)."""
        if job.done or job.started is None:
            return job.done
        rc = job.proc.poll()
        if rc is not None:
            job.rc, job.ended = rc, self.clock.now()
        elif self.clock.now() - job.started >= job.timeout:
            self.stop(job, f"at its limit of {job.timeout:.0f} s")
        return job.done

    def stop(self, job: Job, why: str) -> None:
        if job.done or job.started is None:
            return
        rc = job.proc.poll()
        if rc is not None:  # it ended on its own meanwhile
            job.rc, job.ended = rc, self.clock.now()
            return
        try:
            os.killpg(job.proc.pid, signal.SIGTERM)  # the group this job started, nothing else
            try:
                job.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(job.proc.pid, signal.SIGKILL)
                job.proc.wait(timeout=5)
        except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
            pass
        job.rc, job.ended, job.timed_out, job.note = 124, self.clock.now(), True, why
        with open(job.log, "a", errors="replace") as f:
            f.write(f"\n[stopped {why} after {job.seconds:.0f} s]\n")

    def wait(self, jobs: list[Job], until: float | None = None, also=None) -> None:
        """Until every job in ``jobs`` has ended (or ``until``: the rest are stopped). ``also()`` is
        called at each poll (it may start more jobs)."""
        while True:
            if also is not None:
                also()
            if all(self.poll(j) for j in list(jobs)):
                return
            if until is not None and self.clock.now() >= until:
                for j in jobs:
                    self.stop(j, "at the end of its step's time")
                return
            self.clock.sleep(0.25)

    def stop_all(self, why: str) -> None:
        with self.lock:
            self.closed = True
            jobs = list(self.jobs)
        for j in jobs:
            self.poll(j)
            self.stop(j, why)


# --------------------------------------------------------------------------------------------------
# Reading pytest's output
# --------------------------------------------------------------------------------------------------


def count_tests(lines) -> dict[str, dict[str, int]]:
    """Per test file: how many passed, failed, errored, skipped (from pytest -v lines, xdist or not)."""
    per: dict[str, dict[str, int]] = {}
    for line in lines:
        m = LINE_PLAIN.match(line.strip())
        if m:
            path, res = m.group(1), m.group(2)
        else:
            m = LINE_XDIST.match(line.strip())
            if not m:
                continue
            res, path = m.group(1), m.group(2)
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors",
               "SKIPPED": "skipped", "XFAIL": "skipped"}[res]
        c = per.setdefault(path, {"passed": 0, "failed": 0, "errors": 0, "skipped": 0})
        c[key] += 1
    return per


def failures(lines) -> list[dict]:
    """The failed and errored tests with pytest's one-line reason (-rfE), or with none when the run
    was stopped before its summary."""
    found: dict[str, dict] = {}
    for line in lines:
        m = LINE_SUMMARY.match(line.strip())
        if m:
            found[m.group(2)] = {"test": m.group(2), "outcome": m.group(1).lower(), "message": (m.group(3) or "")[:300]}
            continue
        m = LINE_FAILED.match(line.strip())
        if m and m.group(1) not in found:
            found[m.group(1)] = {"test": m.group(1), "outcome": m.group(2).lower(), "message": ""}
    return list(found.values())


def merge_counts(into: dict, per: dict) -> None:
    for path, c in per.items():
        tot = into.setdefault(path, {"passed": 0, "failed": 0, "errors": 0, "skipped": 0})
        for k, v in c.items():
            tot[k] += v


def shard_count(cores: int | None = None) -> int:
    """pytest shards in parallel: Triton compiles on the CPU, one process per core or so, leaving a
    few cores to the CUDA build that runs beside them."""
    if os.environ.get("GPU_TEST_WORKERS"):
        return max(1, int(os.environ["GPU_TEST_WORKERS"]))
    cores = cores or os.cpu_count() or 4
    return max(1, min(12, cores - 4)) if cores >= 8 else max(1, cores // 2)


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# --------------------------------------------------------------------------------------------------
# The device facts (run in a subprocess: `--facts PATH`; this process never touches the GPU)
# --------------------------------------------------------------------------------------------------


def _cmd_out(cmd: list[str], timeout: float = 30) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, errors="replace")
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout or out.stderr).strip() or None


SMI_FIELDS = ("name", "driver_version", "memory.total", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
              "power.limit", "power.draw", "temperature.gpu", "pstate", "compute_mode", "mig.mode.current",
              "persistence_mode", "ecc.mode.current")


def smi_query() -> dict | None:
    out = _cmd_out(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"])
    if not out or "," not in out:
        return None
    values = [v.strip() for v in out.splitlines()[0].split(",")]
    return dict(zip(SMI_FIELDS, values))


def collect_facts(path: Path) -> int:
    """Everything about the machine a figure depends on, then the two ceilings (written twice, so a
    hang in the ceilings still leaves the rest)."""
    import importlib.metadata as md
    import platform

    def save(facts):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(facts, indent=1, default=str) + "\n")
        os.replace(tmp, path)

    facts: dict = {"python": platform.python_version(), "executable": PY, "platform": platform.platform(),
                   "cpu_count": os.cpu_count()}
    versions = {}
    for name in ("torch", "triton", "transformers", "numpy", "pytest", "pytest-xdist", "pytest-timeout", "execnet",
                 "matplotlib", "tqdm", "ninja", "setuptools", "safetensors", "hypothesis"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    facts["versions"] = versions
    facts["nvcc"] = (_cmd_out(["nvcc", "--version"]) or "").splitlines()[-1:] or None
    try:
        facts["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        facts["disk_free_gib"] = round(shutil.disk_usage(REPO).free / 2**30, 1)
    except (OSError, ValueError):
        pass
    facts["nvidia_smi"] = smi_query()
    facts["nvidia_smi_q"] = (_cmd_out(["nvidia-smi", "-q"]) or "")[:65536] or None
    save(facts)
    import torch

    from . import timing
    from .env import environment

    facts["cuda_available"] = torch.cuda.is_available()
    facts["env"] = environment()
    if facts["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        facts.update(device=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                     sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                     l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
                     cudnn=torch.backends.cudnn.version(), cuda_runtime=torch.version.cuda)
    save(facts)
    if facts["cuda_available"]:
        t0 = time.monotonic()
        facts["ceilings"] = timing.measure_ceilings(quick=True).as_dict()
        facts["ceilings_s"] = round(time.monotonic() - t0, 1)
        facts["nvidia_smi_after_ceilings"] = smi_query()  # the clocks under load
        save(facts)
    return 0


# --------------------------------------------------------------------------------------------------
# The dry run: fake jobs (same plan, same parsing, same files), a clock that moves by their length
# --------------------------------------------------------------------------------------------------

#: A fake job's length in seconds, per kind (``--dry-run kind=seconds`` changes one).
DRY_SECONDS = {"facts": 12.0, "build": 150.0, "import": 3.0, "tests": 110.0, "cuda_tests": 30.0, "bench": 200.0}


def parse_dry(spec: str | None) -> dict:
    """'tests=500,bench.rc=1,raise=report' -> {'seconds': {...}, 'rc': {...}, 'raise': {...}}."""
    script = {"seconds": dict(DRY_SECONDS), "rc": {}, "raise": set()}
    for item in filter(None, (x.strip() for x in (spec or "").split(","))):
        key, _, value = item.partition("=")
        if key == "raise":
            script["raise"].add(value)
        elif key.endswith(".rc"):
            script["rc"][key[:-3]] = int(value)
        elif key in DRY_SECONDS:
            script["seconds"][key] = float(value)
        else:
            raise ValueError(f"--dry-run: unknown item {item!r} (kinds: {', '.join(DRY_SECONDS)}; "
                             f"KIND=seconds, KIND.rc=status, raise=STEP)")
    return script


class DryExecutor(Executor):
    """Starts nothing: each job 'runs' for its kind's fake length on the fake clock, then writes the
    output its real command would (pytest lines, the facts and bench JSON)."""

    def __init__(self, clock: Clock, log: Log, script: dict):
        super().__init__(clock, log)
        self.script = script

    def start(self, job: Job) -> Job:
        if self.refuse(job):
            return job
        job.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write(f"\n$ {' '.join(job.cmd)}   # {job.name} (dry run: not started), limit {job.timeout:.0f} s")
        job.log.write_text(f"[dry run] {' '.join(job.cmd)}\n")
        job.started = self.clock.now()
        with self.lock:
            self.jobs.append(job)
        return job

    def poll(self, job: Job) -> bool:
        if job.done or job.started is None:
            return job.done
        length = self.script["seconds"].get(job.kind, 10.0)
        ran = self.clock.now() - job.started
        if ran >= min(length, job.timeout):
            complete = length <= job.timeout
            fake_output(job, complete, self.script["rc"].get(job.kind, 0))
            if complete:
                job.rc, job.ended = self.script["rc"].get(job.kind, 0), self.clock.now()
            else:
                self.stop(job, f"at its limit of {job.timeout:.0f} s")
        return job.done

    def stop(self, job: Job, why: str) -> None:
        if job.done or job.started is None:
            return
        job.rc, job.ended, job.timed_out, job.note = 124, self.clock.now(), True, why
        with open(job.log, "a") as f:
            f.write(f"\n[stopped {why} after {job.seconds:.0f} s]\n")


def _arg(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def fake_output(job: Job, complete: bool, rc: int) -> None:
    """What the job's real command would have written (for the dry run)."""
    with open(job.log, "a") as f:
        if job.kind in ("tests", "cuda_tests"):
            i, n = (int(x) for x in job.env["GPTKERNELS_SHARD"].split("/"))
            files = [a for a in job.cmd if a.startswith("tests/")]
            names = [f"{files[k % len(files)]}::test_dry[{i}-{k}]" for k in range(6)]
            f.write(f"shard {i}/{n}: {len(names)} of {len(names) * n} tests\n")
            shown = names if complete else names[:3]
            for k, name in enumerate(shown):
                f.write(f"{name} {'FAILED' if rc and k == 1 else 'PASSED'}\n")
            if complete and rc:
                f.write(f"FAILED {names[1]} - AssertionError: planted by the dry run\n")
        elif job.kind == "facts":
            Path(job.cmd[-1]).write_text(json.dumps(dry_facts(), indent=1) + "\n")
        elif job.kind == "import":
            f.write(json.dumps({"triton": None, "cuda": None, "torch": None}) + "\n")
        elif job.kind == "bench":
            fake_bench_json(Path(_arg(job.cmd, "--out")), complete)
        else:
            f.write("[dry run] done\n")


def dry_facts() -> dict:
    """What the facts job writes, made up (an H200's shape; KINDS.md's readings for the ceilings)."""
    from .timing import Ceilings

    return {"dry_run": True, "cuda_available": True, "device": "DRY RUN (no GPU)", "sm_count": 132,
            "capability": "9.0", "memory_gib": 139.8, "cpu_count": 16, "versions": {"torch": "dry", "triton": "dry"},
            "nvidia_smi": {"clocks.sm": "1980 MHz", "clocks.mem": "3201 MHz", "driver_version": "dry"},
            "ceilings": Ceilings(790.0, 4300.0, (8192, 8192, 8192), 2.0 * 2**30, 1.39, 0.5).as_dict()}


def fake_bench_json(out: Path, complete: bool) -> Path:
    """A benchmarks.run document with the headline rows (made-up times, marked as a dry run)."""
    from . import results, suite_attention, suite_model, suite_paged, suite_rotary, targets
    from .run import SMOKE_HEADLINE, SMOKE_ORDER

    ceilings = dry_facts()["ceilings"]
    tables = [t for m in (suite_attention, suite_paged, suite_rotary, suite_model) for t in m.tables(True)]
    by_id = {t.id: t for t in tables}
    rows = []
    for suite in SMOKE_ORDER[: None if complete else 2]:
        for (table, case), impls in SMOKE_HEADLINE[suite].items():
            for k, impl in enumerate(impls):
                row = results.Row(table=table, case=case, impl=impl, status="ok", ms=1.0 + 0.1 * k,
                                  ours=impl.startswith("gptkernels"), flops=1e12, bytes=1e9,
                                  extra={"x_floor": 1.2, "step_ms": 1.0, "floor_ms": 0.8})
                rows.append(results.finish_row(row, by_id[table], ceilings))
    env = {"device": "DRY RUN (no GPU)", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "commit": "dry-run", "torch": "dry", "triton": "dry"}
    doc = results.new_document("gpu", env, suites=list(SMOKE_ORDER), quick=True, ceilings=ceilings,
                               tables=tables, rows=rows, duration_s=1.0, targets=targets.evaluate(rows),
                               notes=["DRY RUN: made-up rows; nothing was measured"])
    return results.save(doc, out / "run-dry-smoke.json")


# --------------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------------


class Check:
    """One gpu_check run: its plan's steps, their jobs, and what they learned (``res``)."""

    def __init__(self, args, out: Path, scratch: Path, clock: Clock, log: Log, executor: Executor,
                 dry: dict | None):
        self.args, self.out, self.scratch, self.clock, self.log, self.ex = args, out, scratch, clock, log, executor
        self.dry = dry
        self.deadline = args.deadline
        self.build_job: Job | None = None
        self.import_job: Job | None = None
        self.test_jobs: list[Job] = []
        self.cuda_jobs: list[Job] = []
        self.bench_job: Job | None = None
        self.res: dict = {"part": args.part, "dry_run": dry is not None, "deadline_s": self.deadline,
                          "out": str(out), "scratch": str(scratch), "steps": [], "facts": None,
                          "tests": None, "cuda_tests": None, "build": None, "bench": None}
        self.wanted = set(args.steps) if getattr(args, "steps", None) else None

    # ---- time ------------------------------------------------------------------------------------

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - self.clock.now()

    def avail(self) -> float:
        """Seconds a step may use: what is left before the deadline, less the final reserve."""
        return self.left() - FINAL_RESERVE_S

    def save_json(self) -> None:
        self.res["seconds"] = round(self.clock.now(), 1)
        tmp = self.out / "smoke.json.tmp"
        tmp.write_text(json.dumps(self.res, indent=1, default=str) + "\n")
        os.replace(tmp, self.out / "smoke.json")

    def step(self, name: str, fn, *, need: float, reserve: float = FINAL_RESERVE_S, skip: str | None = None) -> dict:
        """Run ``fn(rec)`` if ``need`` seconds fit before the deadline's reserve (else skipped with the
        reason); an exception in it is recorded and the plan goes on. Returns the step's record."""
        rec = {"name": name, "start_s": round(self.clock.now(), 1)}
        room = self.left() - reserve
        if self.wanted is not None and name not in self.wanted:
            rec.update(status="skipped", reason="not asked for (--steps)")
        elif skip:
            rec.update(status="skipped", reason=skip)
        elif need > room:
            rec.update(status="skipped", reason=f"needs at least {need:.0f} s; {max(0.0, room):.0f} s left before "
                                                f"the deadline ({self.deadline:.0f} s, {reserve:.0f} s kept for the files)")
        else:
            self.log.say(f"{name}: starting ({room:.0f} s left for it and what follows)")
            try:
                if self.dry is not None and name in self.dry["raise"]:
                    raise RuntimeError(f"planted by the dry run in step {name!r}")
                fn(rec)
                rec.setdefault("status", "ok")
            except Exception as e:  # one step's failure must not lose the others' results
                rec.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
                self.log.write(traceback.format_exc())
        rec["seconds"] = round(max(0.0, self.clock.now() - rec["start_s"]), 1)
        self.res["steps"].append(rec)
        self.log.say(f"{name}: {rec['status']}" + (f": {rec['reason']}" if rec.get("reason") else "")
                     + f" ({rec['seconds']:.0f} s)")
        self.save_json()
        return rec

    # ---- build ------------------------------------------------------------------------------------

    def start_build(self, rec: dict) -> None:
        cores = os.cpu_count() or 4
        env = {"TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
               "GPTKERNELS_BUILD_CUDA": os.environ.get("GPTKERNELS_BUILD_CUDA", "1"),
               "MAX_JOBS": os.environ.get("MAX_JOBS", str(cores))}
        self.build_job = self.ex.start(Job("build", "build", [PY, "setup.py", "build_ext", "--inplace"],
                                           self.scratch / "build.log", max(1.0, self.avail()), env))
        rec.update(status="started", detail=f"in the background, MAX_JOBS={env['MAX_JOBS']}, "
                                            f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}")

    def build_state(self, check_import: bool = True) -> str:
        """not started, running, ok (built and importable), or failed."""
        b = self.build_job
        if b is None or b.started is None:
            return "not started"
        if not self.ex.poll(b):
            return "running"
        if not b.ok:
            return "failed"
        if not check_import and (self.import_job is None or not self.import_job.done):
            return "built (import not checked)"
        if self.import_job is None:  # built is not enough: it must load
            self.import_job = self.ex.start(Job(
                "import", "import", [PY, "-c", "import gptkernels, json; print(json.dumps(gptkernels.backends()))"],
                self.scratch / "import.log", 120))
        if not self.ex.poll(self.import_job):
            return "running"
        return "ok" if self.import_job.ok else "failed"  # (not started: the check was ending)

    def build_summary(self) -> dict:
        b = self.build_job
        d = {"state": self.build_state(check_import=False) if b else "not started",
             "job": b.status() if b else "not started",
             "seconds": round(b.seconds, 1) if b else 0.0}
        if self.import_job is not None and self.import_job.done:
            tail = [ln for ln in self.import_job.lines() if ln.startswith("{")]
            d["backends"] = json.loads(tail[-1]) if tail else None
            if not self.import_job.ok:
                d["import_error"] = "\n".join(self.import_job.lines()[-5:])
        if b is not None and b.done and not b.ok:
            d["error_tail"] = "\n".join(ln for ln in b.lines()[-15:])
        return d

    # ---- facts ------------------------------------------------------------------------------------

    def facts(self, rec: dict) -> None:
        path = self.scratch / "facts.json"
        job = self.ex.start(Job("facts", "facts", [PY, "-m", "benchmarks.gpu_check", "--facts", str(path)],
                                self.scratch / "facts.log", min(120.0, self.avail())))
        self.ex.wait([job])
        facts = json.loads(path.read_text()) if path.exists() else None
        if facts is None:
            facts = {"cuda_available": False, "error": "\n".join(job.lines()[-20:])}
        facts["job"] = job.status()
        self.res["facts"] = facts
        if not job.ok:
            rec.update(status="failed", reason=job.status())

    def gpu_missing(self) -> str | None:
        f = self.res.get("facts")
        if f is None or f.get("cuda_available"):  # no facts step (--steps): the steps find out themselves
            return None
        return "no CUDA GPU is visible (facts: " + (f.get("error", "") or "torch.cuda.is_available() is False")[-200:] + ")"

    # ---- tests ------------------------------------------------------------------------------------

    def pytest_cmd(self, files: list[str], deselect: dict, k: str | None = None) -> list[str]:
        cmd = [PY, "-m", "pytest", "-p", "benchmarks.sharding", "-p", "no:cacheprovider", "-o",
               "console_output_style=classic", "-v", "-rfE", "--tb=short"]
        if has_module("pytest_timeout"):
            cmd += [f"--timeout={TEST_TIMEOUT_S}"]
        for node in deselect:
            cmd += ["--deselect", node]
        if k:
            cmd += ["-k", k]
        return cmd + files

    def shard_jobs(self, kind: str, files: list[str], n: int, env: dict, until: float, deselect: dict,
                   k: str | None = None) -> list[Job]:
        cmd = self.pytest_cmd(files, deselect, k)
        jobs = []
        for i in range(n):
            jobs.append(Job(f"{kind} {i}/{n}", kind, cmd, self.scratch / f"{kind}-{i}.log",
                            max(1.0, until - self.clock.now()),
                            {**env, "GPTKERNELS_SHARD": f"{i}/{n}", "TORCHINDUCTOR_COMPILE_THREADS": "1",
                             "COLUMNS": "400"}))  # -rfE's one-line reasons are cut at the terminal width
        return jobs

    def smoke_test_files(self) -> list[str]:
        if self.args.tests != "tests":
            return self.args.tests.split()
        return [f for f in SMOKE_TESTS if (REPO / f).exists()]

    def tests(self, rec: dict) -> None:
        """The Triton test shards; the CUDA tests join as soon as the build is done."""
        cap = min(TESTS_SHARE * self.deadline, self.avail() - BENCH_KEEP_SHARE * self.deadline)
        if cap < TESTS_MIN_S:
            rec.update(status="skipped", reason=f"only {max(0.0, cap):.0f} s for the tests after keeping "
                                                f"{BENCH_KEEP_SHARE:.0%} of the deadline for the benchmarks")
            return
        until = self.clock.now() + cap
        files = self.smoke_test_files()
        n = shard_count()
        self.test_jobs = self.shard_jobs("tests", files, n, {"GPTKERNELS_FULL_GRID": "0"}, until, SMOKE_DESELECT)
        for j in self.test_jobs:
            self.ex.start(j)
        rec.update(files=files, shards=n, limit_s=round(cap), deselected=SMOKE_DESELECT)

        def cuda_when_built():
            if not self.cuda_jobs and self.build_state() == "ok" and until - self.clock.now() > CUDA_TESTS_MIN_S:
                self.start_cuda_tests(until)

        self.ex.wait(self.test_jobs + self.cuda_jobs, until=until, also=cuda_when_built)
        self.ex.wait(self.cuda_jobs, until=until)
        self.res["tests"] = self.summarise(self.test_jobs)
        if self.cuda_jobs:
            self.res["cuda_tests"] = self.summarise(self.cuda_jobs, ran="within the tests step")
        t = self.res["tests"]
        rec.update(status=t["verdict"], note=f"{sum(t['total'].values())} run, {t['not_run']} of {t['planned']} not "
                                             f"reached in its {cap:.0f} s" if t["stopped_shards"] else "")

    def start_cuda_tests(self, until: float) -> None:
        n = max(1, min(3, shard_count() // 4))
        files = [f for f in CUDA_TESTS if (REPO / f).exists()]
        self.cuda_jobs = self.shard_jobs("cuda_tests", files, n, {"GPTKERNELS_FULL_GRID": "1"}, until, {}, CUDA_TESTS_K)
        for j in self.cuda_jobs:
            self.ex.start(j)
        self.log.say(f"cuda_tests: the extension is built: {n} shard(s) started")

    def cuda_tests(self, rec: dict) -> None:
        if self.cuda_jobs:
            rec.update(status="ok" if self.res["cuda_tests"]["ok"] else "failed", reason="ran within the tests step")
            return
        wait_until = self.clock.now() + max(0.0, min(BUILD_WAIT_S, self.avail() - BENCH_MIN_S - CUDA_TESTS_MIN_S))
        while self.build_state() == "running" and self.clock.now() < wait_until:
            self.clock.sleep(0.5)
        state = self.build_state()
        if state != "ok":
            rec.update(status="skipped", reason=f"the CUDA extension is not built ({state}; build: "
                                                f"{self.build_job.status() if self.build_job else 'not started'})")
            return
        cap = min(CUDA_TESTS_CAP_S, self.avail() - BENCH_MIN_S)
        if cap < CUDA_TESTS_MIN_S:
            rec.update(status="skipped", reason=f"only {max(0.0, cap):.0f} s left for them before the benchmarks")
            return
        self.start_cuda_tests(self.clock.now() + cap)
        self.ex.wait(self.cuda_jobs, until=self.clock.now() + cap)
        self.res["cuda_tests"] = self.summarise(self.cuda_jobs, ran="after the tests step")
        rec.update(status=self.res["cuda_tests"]["verdict"])

    def summarise(self, jobs: list[Job], ran: str = "") -> dict:
        per: dict = {}
        fails, planned, stopped = [], 0, []
        for j in jobs:
            lines = j.lines()
            merge_counts(per, count_tests(lines))
            fails += failures(lines)
            m = next((LINE_SHARD.match(ln) for ln in lines if LINE_SHARD.match(ln)), None)
            planned += int(m.group(3)) if m else 0
            if j.timed_out:
                stopped.append(j.name)
        total = {k: sum(c[k] for c in per.values()) for k in ("passed", "failed", "errors", "skipped")}
        done = sum(total.values())
        # pytest's exit status: 1 tests failed, 5 none collected (a shard can be empty); else it broke
        crashed = [j.name for j in jobs if j.done and not j.timed_out and j.rc not in (0, 1, 5)]
        ok = not fails and not crashed and total["failed"] == 0 and total["errors"] == 0
        verdict = "ok" if ok and not stopped else ("failed" if not ok else "partial")
        return {"per_file": per, "total": total, "planned": planned, "not_run": max(0, planned - done),
                "failures": fails[:200], "stopped_shards": stopped, "crashed_shards": crashed, "ok": ok,
                "verdict": verdict, "ran": ran, "shards": [{"name": j.name, "status": j.status(),
                                                            "seconds": round(j.seconds, 1)} for j in jobs]}

    # ---- benchmarks -------------------------------------------------------------------------------

    def bench(self, rec: dict, *, smoke: bool = True) -> None:
        cap = self.avail()
        if self.build_job is not None and self.build_state() == "running":
            self.ex.stop(self.build_job, "before the benchmarks (they need the machine to themselves)")
            rec["note"] = "the CUDA build was still running: stopped (cuda rows say unavailable)"
        run_dir = self.scratch / "bench"
        cmd = [PY, "-m", "benchmarks.run", "--out", str(run_dir), "--no-progress"]
        if smoke:
            cmd += ["--smoke", "--no-plots"]
        else:
            cmd += ["--suite", self.args.suite] + ([] if self.args.full else ["--quick"])
        if cap != float("inf"):
            cmd += ["--budget", str(int(max(30.0, cap - BENCH_OVERHEAD_S)))]
        ceilings = (self.res.get("facts") or {}).get("ceilings")
        if ceilings:
            cmd += ["--ceilings", str(self.scratch / "facts.json")]
        self.bench_job = self.ex.start(Job("bench", "bench", cmd, self.scratch / "bench.log",
                                           cap if cap != float("inf") else 6 * 3600.0))
        self.ex.wait([self.bench_job])
        jsons = sorted(run_dir.glob("run-*.json"), key=lambda p: p.stat().st_mtime)
        self.res["bench"] = {"job": self.bench_job.status(), "seconds": round(self.bench_job.seconds, 1),
                             "json": str(jsons[-1]) if jsons else None}
        if not jsons:
            rec.update(status="failed", reason=f"no JSON written ({self.bench_job.status()}), see bench.log in tests.log")
        elif self.bench_job.timed_out:
            rec.update(status="partial", reason="stopped at its limit: the rows measured so far are kept")
        elif not self.bench_job.ok:
            rec.update(status="failed", reason=f"exit {self.bench_job.rc}" + (
                ": one of our rows gave a wrong answer or an error" if self.bench_job.rc == 1 else ""))

    def report(self, rec: dict, *, plots: bool = False) -> None:
        """bench.json, BENCHMARKS.md and the summary under OUT, from the bench JSON (no plots in the
        smoke: ``python -m benchmarks.report bench.json`` makes them at home)."""
        b = self.res.get("bench") or {}
        if not b.get("json"):
            rec.update(status="skipped", reason="no benchmark JSON to report")
            return
        from . import report, results
        from .run import summary

        doc = results.load(b["json"])
        shutil.copy(b["json"], self.out / "bench.json")
        if plots:
            md = report.generate([b["json"]])  # BENCHMARKS.md and benchmarks/results/ in this tree
            shutil.copy(md, self.out / "BENCHMARKS.md")
        else:
            (self.out / "BENCHMARKS.md").write_text(report.render(doc, "bench.json", [], self.out))
        rows = results.rows_of(doc)
        b.update(rows=len(rows), summary=summary(doc), targets=doc.get("targets", []),
                 statuses={s: sum(r.status == s for r in rows) for s in results.STATUSES if any(r.status == s for r in rows)},
                 failed_rows=[f"{r.table} {r.case} {r.impl}: {r.status}: {r.message[:160]}" for r in rows
                              if r.ours and r.status in ("mismatch", "error")])

    # ---- the end ----------------------------------------------------------------------------------

    def finish(self) -> int:
        """Stop every job still running, put the files under OUT, print the table. Never raises."""
        try:
            self.ex.stop_all("at the end of the check")
        except Exception as e:  # noqa: BLE001 - the files matter more
            self.log.write(f"stopping jobs: {type(e).__name__}: {e}")
        try:
            self.res["build"] = self.build_summary() if self.build_job else None
        except Exception as e:  # noqa: BLE001
            self.res["build"] = {"state": f"unknown ({type(e).__name__}: {e})"}
        self.collect_logs()
        self.res["files"] = sorted({p.name for p in self.out.iterdir() if p.is_file() and not p.name.endswith(".tmp")}
                                   | {"summary.txt", "smoke.json", "gpu.log"})
        text = table(self.res)
        try:
            (self.out / "summary.txt").write_text(text + "\n")
        except OSError:
            pass
        self.save_json()
        self.log.close()
        enforce_out_limits(self.out)
        print(text, flush=True)
        bad = any(s["status"] in ("failed", "error") for s in self.res["steps"])
        return 1 if bad else 0

    def collect_logs(self) -> None:
        """tests.log: every test shard's output one after the other; build.log; each capped."""
        parts = []
        for j in self.test_jobs + self.cuda_jobs + [x for x in (self.bench_job, self.import_job) if x]:
            parts.append((f"==== {j.name}: {j.status()}, {j.seconds:.0f} s: {' '.join(j.cmd[:6])} ...", j.log))
        if (self.scratch / "facts.log").exists():
            parts.append(("==== facts", self.scratch / "facts.log"))
        if parts:
            write_capped(self.out / "tests.log", parts)
        if self.build_job is not None:
            write_capped(self.out / "build.log", [(f"==== build: {self.build_job.status()}", self.build_job.log)])


def write_capped(dest: Path, parts: list[tuple[str, Path]], cap: int = OUT_FILE_BYTES) -> None:
    """Concatenate ``parts`` (header, file) into ``dest``, each cut in the middle to fit ``cap``."""
    share = max(4096, cap // max(1, len(parts)) - 512)
    with open(dest, "w", errors="replace") as out:
        for header, path in parts:
            out.write(header + "\n")
            try:
                data = path.read_text(errors="replace")
            except OSError as e:
                data = f"(unreadable: {e})\n"
            if len(data) > share:
                keep = share // 2
                data = data[:keep] + f"\n[... {len(data) - 2 * keep} characters cut ...]\n" + data[-keep:]
            out.write(data + ("\n" if not data.endswith("\n") else ""))


def enforce_out_limits(out: Path) -> None:
    """At most OUT_FILES_MAX files, each under 16 MiB: cut what is larger, say what does not fit."""
    files = sorted((p for p in out.iterdir() if p.is_file()), key=lambda p: p.name)
    for p in files:
        if p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)
        elif p.stat().st_size > OUT_FILE_BYTES:
            data = p.read_bytes()
            keep = OUT_FILE_BYTES // 2 - 1024
            p.write_bytes(data[:keep] + b"\n[... cut to fit the 16 MiB limit ...]\n" + data[-keep:])
    files = [p for p in out.iterdir() if p.is_file()]
    if len(files) > OUT_FILES_MAX:
        print(f"warning: {len(files)} files under {out}: only {OUT_FILES_MAX} come back from a device call",
              flush=True)


def table(res: dict) -> str:
    """The short table printed last."""
    lines = ["", "=" * 100]
    head = "gptkernels GPU check" + (f" --part {res['part']}" if res["part"] != "smoke" else ": make gpu-smoke")
    if res.get("dry_run"):
        head += "   ** DRY RUN: fake device, jobs and clock; nothing was measured **"
    lines.append(head + (f"   (deadline {res['deadline_s']:.0f} s, took {res.get('seconds', 0):.0f} s)"
                         if res.get("deadline_s") else ""))
    f = res.get("facts") or {}
    if f.get("device"):
        smi = f.get("nvidia_smi_after_ceilings") or f.get("nvidia_smi") or {}
        v = f.get("versions") or {}
        lines.append(f"device: {f['device']}, {f.get('sm_count')} SMs, sm {smi.get('clocks.sm')} / mem "
                     f"{smi.get('clocks.mem')}, driver {smi.get('driver_version')}, torch {v.get('torch')}, "
                     f"triton {v.get('triton')}, {f.get('cpu_count')} cores")
    c = f.get("ceilings")
    if c:
        lines.append(f"ceilings: bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s, device copy {c['copy_gbps']:.0f} GB/s")
    if res["steps"]:
        lines += ["", f"{'step':12s} {'status':10s} {'seconds':>8s}  note"]
        for s in res["steps"]:
            note = s.get("reason") or s.get("note") or s.get("detail") or ""
            lines.append(f"{s['name']:12s} {s['status']:10s} {s.get('seconds', 0):8.0f}  {note[:110]}")
    b = res.get("build")
    if b:
        lines.append(f"build: {b.get('state')} ({b.get('job')}, {b.get('seconds', 0):.0f} s)"
                     + (f"; backends: {b['backends']}" if b.get("backends") else ""))
    for key in ("tests", "cuda_tests"):
        t = res.get(key)
        if not t:
            continue
        lines += ["", f"{key + ' file':44s} {'passed':>7s} {'failed':>7s} {'errors':>7s} {'skipped':>8s}"]
        for path, cnt in sorted(t["per_file"].items()):
            flag = "  <--" if cnt["failed"] or cnt["errors"] else ""
            lines.append(f"{path:44s} {cnt['passed']:7d} {cnt['failed']:7d} {cnt['errors']:7d} {cnt['skipped']:8d}{flag}")
        tot = t["total"]
        lines.append(f"{'total':44s} {tot['passed']:7d} {tot['failed']:7d} {tot['errors']:7d} {tot['skipped']:8d}"
                     + (f"   ({t['not_run']} of {t['planned']} not reached: stopped at the time limit)"
                        if t["not_run"] else ""))
        for fail in t["failures"][:15]:
            lines.append(f"  {fail['outcome'].upper()} {fail['test'][:90]} {fail['message'][:120]}")
        if len(t["failures"]) > 15:
            lines.append(f"  ... {len(t['failures']) - 15} more in smoke.json")
        if t.get("crashed_shards"):
            lines.append(f"  shards that crashed: {', '.join(t['crashed_shards'])} (see tests.log)")
    r = res.get("bench")
    if r:
        if r.get("summary"):
            lines.append(r["summary"])
        for fr in r.get("failed_rows", [])[:10]:
            lines.append(f"FAILED ROW: {fr}")
        if not r.get("json"):
            lines.append(f"bench: no results ({r.get('job')}; see tests.log)")
    lines.append(f"files under {res['out']}: {', '.join(res.get('files') or [])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------------

SMOKE_STEPS = ("build", "facts", "tests", "cuda_tests", "bench", "report")


def smoke(check: Check) -> None:
    """The first GPU run (module docstring): each step guarded by the time left."""
    check.step("build", check.start_build, need=0)
    check.step("facts", check.facts, need=15)
    no_gpu = check.gpu_missing()
    check.step("tests", check.tests, need=TESTS_MIN_S, skip=no_gpu)
    check.step("cuda_tests", check.cuda_tests, need=CUDA_TESTS_MIN_S, skip=no_gpu)
    check.step("bench", check.bench, need=BENCH_MIN_S, skip=no_gpu)
    check.step("report", check.report, need=0, reserve=0.0)


def full_parts(check: Check) -> None:
    """``--part all|build|tests|bench`` (make gpu): the whole suite, the benchmark suite; no shares."""
    part = check.args.part

    def build(rec):
        check.start_build(rec)
        check.ex.wait([check.build_job], until=check.clock.now() + min(900.0, check.avail()))
        while check.build_state() == "running":
            check.clock.sleep(0.5)
        rec.update(status="ok" if check.build_state() == "ok" else "failed", detail=check.build_job.status())

    def tests(rec):
        until = check.clock.now() + (check.avail() if check.deadline else 4 * 3600.0)
        files = check.args.tests.split()
        check.test_jobs = check.shard_jobs("tests", files, shard_count(), {}, until, {})
        for j in check.test_jobs:
            check.ex.start(j)
        check.ex.wait(check.test_jobs, until=until)
        check.res["tests"] = check.summarise(check.test_jobs)
        rec.update(status=check.res["tests"]["verdict"])

    check.step("build", build, need=0)
    check.step("facts", check.facts, need=15)
    if part in ("all", "tests"):
        check.step("tests", tests, need=TESTS_MIN_S, skip=check.gpu_missing())
    if part in ("all", "bench"):
        check.step("bench", lambda rec: check.bench(rec, smoke=False), need=BENCH_MIN_S, skip=check.gpu_missing())
        check.step("report", lambda rec: check.report(rec, plots=True), need=0, reserve=0.0)


# --------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("smoke", "all", "build", "tests", "bench"), default="all")
    ap.add_argument("--deadline", type=float, default=None,
                    help=f"seconds the whole check may take (default: {DEFAULT_DEADLINE_S:.0f} for smoke, 560 for "
                         "one part of make gpu, none for --part all)")
    ap.add_argument("--steps", default=None,
                    help=f"smoke: only these steps (comma list of {', '.join(SMOKE_STEPS)}; e.g. "
                         "'facts,bench,report' for a second call)")
    ap.add_argument("--dry-run", nargs="?", const="", default=None, metavar="SCRIPT",
                    help="walk the plan without a GPU: fake facts, jobs and clock (SCRIPT, e.g. "
                         "'tests=500,bench.rc=1,raise=report', changes a fake job's length or status)")
    ap.add_argument("--scratch", default=None, help="where the jobs' own files go (default: bench_out/<name>-work)")
    ap.add_argument("--suite", default="all", help="make gpu: benchmarks.run's --suite")
    ap.add_argument("--full", action="store_true", help="make gpu: the full sweeps instead of --quick")
    ap.add_argument("--tests", default="tests", help="what pytest runs (default: tests; the smoke's own list)")
    ap.add_argument("--facts", default=None, help=argparse.SUPPRESS)  # internal: the facts job
    args = ap.parse_args(argv)
    if args.deadline is None:
        args.deadline = DEFAULT_DEADLINE_S if args.part == "smoke" else (None if args.part == "all" else 560.0)
    if args.deadline is not None and args.deadline <= 0:
        ap.error(f"--deadline must be positive, got {args.deadline}")
    if args.steps is not None:
        args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
        bad = [s for s in args.steps if s not in SMOKE_STEPS]
        if bad:
            ap.error(f"--steps: unknown step(s) {bad}; the steps are {', '.join(SMOKE_STEPS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.facts:
        return collect_facts(Path(args.facts))
    dry = parse_dry(args.dry_run) if args.dry_run is not None else None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    name = f"gpu-{'smoke' if args.part == 'smoke' else 'check'}-{stamp}"
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench_out" / name
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch) if args.scratch else REPO / "bench_out" / f"{name}-work"
    scratch.mkdir(parents=True, exist_ok=True)
    clock = Clock(dry=dry is not None)
    log = Log(out / "gpu.log", clock)
    ex = DryExecutor(clock, log, dry) if dry is not None else Executor(clock, log)
    check = Check(args, out, scratch, clock, log, ex, dry)
    log.say(f"gpu_check --part {args.part}" + (" (DRY RUN)" if dry is not None else "") +
            f": deadline {args.deadline} s, {os.cpu_count()} cores, {PY}; files under {out}")
    if dry is None and not shutil.which("nvidia-smi"):
        log.say("gpu_check: no nvidia-smi here: this check needs an NVIDIA GPU (--dry-run walks the plan without one)")
        check.res["steps"].append({"name": "facts", "status": "skipped", "reason": "no nvidia-smi: no NVIDIA GPU"})
        check.finish()
        return 2
    watchdog = None
    if dry is None and args.deadline is not None:
        # the backstop: whatever hangs, the jobs are stopped shortly before the deadline and the
        # files are written (the steps' own limits should make this unnecessary)
        watchdog = threading.Timer(max(1.0, args.deadline - FINAL_RESERVE_S / 2),
                                   lambda: ex.stop_all("by the deadline's watchdog"))
        watchdog.daemon = True
        watchdog.start()

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        (smoke if args.part == "smoke" else full_parts)(check)
    except BaseException as e:  # noqa: BLE001 - stopped from outside: still write everything
        check.res["interrupted"] = f"{type(e).__name__}: {e}"
        log.write(traceback.format_exc())
    finally:
        if watchdog is not None:
            watchdog.cancel()
        rc = check.finish()
    return rc


if __name__ == "__main__":
    sys.exit(main())
