"""The one-command GPU check (``make gpu``): build the extension, run every test on CUDA, run the
benchmarks, regenerate BENCHMARKS.md, and print a short table last.

    python3 -m benchmarks.gpu_check [--part all|build|tests|bench] [--suite S] [--full] [--deadline SEC]

Meant for a GPU machine without network, with its own ``python3`` (torch, triton, transformers,
pytest preinstalled; no venv). A device call there is limited to 10 minutes, so it runs in parts:
``--part tests`` (build + the whole test suite) and ``--part bench`` (build + ``benchmarks.run
--quick`` + the report), each kept under ``--deadline`` seconds (default 560). Every part builds
first (incremental: a no-op when the extension is already built and up to date).

Everything goes under ``$OUT`` when it is set (else ``bench_out/gpu-<time>``), at most 8 files, no
sub-folders: ``gpu.log`` (every command's full output), ``gpu_check.json`` (build status, test
counts per file, the bench summary), and for the bench part ``bench.json``, ``BENCHMARKS.md`` and
the plots (``attention.png``, ``rotary.png``, ``paged.png``, ``model.png``). The checkout's own
BENCHMARKS.md and benchmarks/results/ are regenerated too (on that machine's copy of the tree: bring
bench.json back and run ``python -m benchmarks.report bench.json`` to record it here).
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
from pathlib import Path

from .env import REPO

PY = sys.executable or "python3"
RESULT_RE = r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
#: "tests/test_x.py::name PASSED [ 1%]" (plain -v) and "[gw0] [ 1%] PASSED tests/test_x.py::name" (xdist)
LINE_PLAIN = re.compile(rf"^(\S+?\.py)::\S+ {RESULT_RE}\b")
LINE_XDIST = re.compile(rf"{RESULT_RE} (\S+?\.py)::")
OUT_FILES_MAX = 8


class Log:
    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "a", buffering=1)

    def say(self, msg: str) -> None:
        """A line on stdout (short progress) and in the log."""
        print(msg, flush=True)
        self.f.write(msg + "\n")

    def run(self, cmd: list[str], *, timeout: float, env: dict | None = None, on_line=None) -> tuple[int, float]:
        """Run ``cmd`` with its output going to the log only; kill its process group at ``timeout``.

        Returns (exit status, seconds); status 124 when it was stopped at the timeout.
        """
        self.f.write(f"\n$ {' '.join(cmd)}\n")
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace",  # a stray non-UTF-8 byte must not end the check
                                env={**os.environ, **(env or {})}, start_new_session=True, bufsize=1)
        timed_out = False

        def _kill(*_):
            nonlocal timed_out
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the group this call started, and nothing else
            except ProcessLookupError:
                pass

        timer = threading.Timer(max(1.0, timeout), _kill)
        timer.start()
        try:
            for line in proc.stdout:
                self.f.write(line)
                if on_line is not None:
                    on_line(line)
            proc.wait()
        finally:
            timer.cancel()
        if timed_out:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            self.f.write(f"[stopped after {timeout:.0f} s]\n")
        return (124 if timed_out else proc.returncode), time.monotonic() - start


# --------------------------------------------------------------------------------------------------


def build(log: Log, deadline: float) -> dict:
    env = {"TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
           "GPTKERNELS_BUILD_CUDA": os.environ.get("GPTKERNELS_BUILD_CUDA", "1"),
           "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))}
    log.say(f"build: TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} {PY} setup.py build_ext --inplace ...")
    rc, sec = log.run([PY, "setup.py", "build_ext", "--inplace"], timeout=min(deadline, 420), env=env)
    ok = rc == 0
    detail = "built" if ok else ("stopped at its time limit" if rc == 124 else f"FAILED (exit {rc}), see gpu.log")
    if ok:  # built is not enough: it must load
        rc2, _ = log.run([PY, "-c", "import gptkernels, json; print(json.dumps(gptkernels.backends()))"], timeout=120)
        if rc2 != 0:
            ok, detail = False, "built but gptkernels failed to import, see gpu.log"
    log.say(f"build: {detail} in {sec:.0f} s")
    return {"ok": ok, "status": rc, "seconds": round(sec, 1), "detail": detail}


def count_tests(lines) -> dict[str, dict[str, int]]:
    """Per test file: how many passed, failed, errored, skipped (from pytest -v lines, xdist or not)."""
    per: dict[str, dict[str, int]] = {}
    for line in lines:
        m = LINE_PLAIN.match(line.strip())
        if m:
            path, res = m.group(1), m.group(2)
        else:
            m = LINE_XDIST.search(line)
            if not m:
                continue
            res, path = m.group(1), m.group(2)
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors",
               "SKIPPED": "skipped", "XFAIL": "skipped"}[res]
        c = per.setdefault(path, {"passed": 0, "failed": 0, "errors": 0, "skipped": 0})
        c[key] += 1
    return per


def tests(log: Log, deadline: float, paths: str = "tests") -> dict:
    # Triton compiles hundreds of specialisations (notes/README.md): one xdist worker per 2 cores
    workers = os.environ.get("GPU_TEST_WORKERS", str(max(1, min(8, (os.cpu_count() or 8) // 2))))
    cmd = [PY, "-m", "pytest", *paths.split(), "-v", "-p", "no:cacheprovider", "-o", "console_output_style=classic"]
    try:
        import xdist  # noqa: F401

        if workers not in ("", "0", "1"):
            cmd += ["-n", workers]
    except ImportError:
        workers = "1"
    log.say(f"tests: {' '.join(cmd[1:])} (stopped after {deadline:.0f} s) ...")
    lines: list[str] = []
    rc, sec = log.run(cmd, timeout=deadline, on_line=lines.append)
    per = count_tests(lines)
    tail = next((ln.strip() for ln in reversed(lines) if re.match(r"^=+ .*(passed|failed|error|skipped).* =+$",
                                                                   ln.strip())), "")
    total = {k: sum(c[k] for c in per.values()) for k in ("passed", "failed", "errors", "skipped")}
    status = "stopped at its time limit (counts so far)" if rc == 124 else f"exit {rc}"
    log.say(f"tests: {status}: {total} in {sec:.0f} s {tail}")
    return {"status": rc, "seconds": round(sec, 1), "per_file": per, "total": total, "pytest_summary": tail,
            "ok": rc == 0, "timed_out": rc == 124}


def bench(log: Log, deadline: float | None, suite: str, full: bool, out: Path) -> dict:
    """``deadline``: seconds left for this part (None: no limit, the run's own --quick budgets)."""
    run_dir = REPO / "bench_out" / f"gpu-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    cmd = [PY, "-m", "benchmarks.run", "--suite", suite, "--out", str(run_dir), "--no-progress"]
    cmd += [] if full else ["--quick"]
    if deadline is not None:
        # start-up, the ceilings and the report need about a minute and a half besides the rows;
        # the run stops starting new rows at its budget and saves its JSON after every suite
        cmd += ["--budget", str(int(max(60.0, deadline - 90)))]
    log.say(f"bench: {' '.join(cmd[1:])} ...")
    rc, sec = log.run(cmd, timeout=(deadline - 30) if deadline is not None else 4 * 3600,
                      env={"PYTHONUNBUFFERED": "1"})
    jsons = sorted(run_dir.glob("run-*.json"))
    result = {"status": rc, "seconds": round(sec, 1), "json": None, "ok": rc == 0}
    if not jsons:
        log.say(f"bench: no JSON written (exit {rc}), see gpu.log")
        result["ok"] = False
        return result
    from . import report, results

    doc = results.load(jsons[-1])
    result["json"] = str(jsons[-1])
    shutil.copy(jsons[-1], out / "bench.json")
    md = report.generate([jsons[-1]])  # BENCHMARKS.md and benchmarks/results/ in this tree
    shutil.copy(md, out / "BENCHMARKS.md")
    for png in sorted((REPO / "benchmarks" / "results").glob("*.png")):
        if png.stem in doc["suites"]:
            shutil.copy(png, out / png.name)
    from .run import summary

    result["summary"] = summary(doc)
    result["targets"] = doc.get("targets", [])
    result["failed_rows"] = [f"{r['table']} {r['case']} {r['impl']}: {r['status']}: {r['message'][:120]}"
                             for r in doc["rows"] if r["ours"] and r["status"] in ("mismatch", "error")]
    log.say(f"bench: exit {rc} in {sec:.0f} s; {len(doc['rows'])} rows; report written")
    return result


def table(res: dict) -> str:
    lines = ["", "=" * 100, "gptkernels GPU check"]
    b = res.get("build")
    if b:
        lines.append(f"build: {b['detail']} ({b['seconds']:.0f} s)")
    t = res.get("tests")
    if t:
        lines += ["", f"{'test file':44s} {'passed':>7s} {'failed':>7s} {'errors':>7s} {'skipped':>8s}"]
        for path, c in sorted(t["per_file"].items()):
            flag = "  <--" if c["failed"] or c["errors"] else ""
            lines.append(f"{path:44s} {c['passed']:7d} {c['failed']:7d} {c['errors']:7d} {c['skipped']:8d}{flag}")
        tot = t["total"]
        lines.append(f"{'total':44s} {tot['passed']:7d} {tot['failed']:7d} {tot['errors']:7d} {tot['skipped']:8d}"
                     + ("   (STOPPED at the time limit: counts so far)" if t["timed_out"] else ""))
    r = res.get("bench")
    if r:
        if r.get("summary"):
            lines.append(r["summary"])
        for f in r.get("failed_rows", [])[:10]:
            lines.append(f"FAILED ROW: {f}")
        if not r.get("json"):
            lines.append("bench: no results (see gpu.log)")
    lines.append(f"files under {res['out']}: {', '.join(sorted(p.name for p in Path(res['out']).iterdir()))}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("all", "build", "tests", "bench"), default="all")
    ap.add_argument("--suite", default="all", help="benchmarks.run's --suite (a suite, all, or a comma list)")
    ap.add_argument("--full", action="store_true", help="the full sweeps instead of --quick (longer)")
    ap.add_argument("--tests", default="tests", help="what pytest runs (default: tests; e.g. 'tests/test_a.py "
                                                      "tests/test_b.py' to split the suite across calls)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds this part may take in all (default: 560 for one part, none for --part all)")
    args = ap.parse_args(argv)
    start = time.monotonic()
    deadline = args.deadline if args.deadline is not None else (None if args.part == "all" else 560.0)
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench_out" / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu.log")

    def left(default: float | None) -> float | None:
        if deadline is None:
            return default
        return max(30.0, deadline - (time.monotonic() - start))

    import torch

    if not torch.cuda.is_available():
        log.say("gpu_check: no CUDA GPU is visible: this check needs one (use `make test` / `make bench` here)")
        return 2
    # Compiled Triton kernels and Inductor graphs go under build/ (git-ignored), which the device tool
    # keeps on a warm machine between calls: a part split over several 10-minute calls, or a re-run
    # after a fix, compiles only what changed.
    for var, sub in (("TRITON_CACHE_DIR", "triton-cache"), ("TORCHINDUCTOR_CACHE_DIR", "inductor-cache")):
        os.environ.setdefault(var, str(REPO / "build" / sub))
    log.say(f"gpu_check --part {args.part}: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
            f"{PY}; writing to {out}")
    res: dict = {"out": str(out), "part": args.part}
    res["build"] = build(log, left(600))
    if args.part in ("all", "tests"):
        res["tests"] = tests(log, left(3600) - 15, args.tests)
    if args.part in ("all", "bench"):
        res["bench"] = bench(log, left(None), args.suite, args.full, out)
    res["seconds"] = round(time.monotonic() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    files = list(out.iterdir())
    if len(files) > OUT_FILES_MAX:
        log.say(f"warning: {len(files)} files under {out}: only {OUT_FILES_MAX} come back from a device call")
    log.f.close()
    print(table(res))
    bad = (not res["build"]["ok"]) or (res.get("tests") and not res["tests"]["ok"]) or \
          (res.get("bench") and not res["bench"]["ok"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
