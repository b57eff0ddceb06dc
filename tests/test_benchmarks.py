"""The benchmark harness on CPU: formulas, the JSON schema, the report, the parity sweep, the CLI.

No timing is asserted and no benchmark figure comes from here: the sample runs below are fixtures
made up to exercise the report generator, and the parity sweep's rows are pass/fail, not speed.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import formulas, gpu_check, parity, report, results, run, targets, timing
from benchmarks import suite_attention, suite_model, suite_paged, suite_quant, suite_rotary
from benchmarks.checks import Check
from benchmarks.env import REPO
from benchmarks.results import Row, Table
from gptkernels import reference
from tests.helpers import ON_GPU

# --------------------------------------------------------------------------------------------------
# formulas
# --------------------------------------------------------------------------------------------------


def test_attention_flops_conventions():
    b, h, s, d = 3, 5, 97, 80
    full = formulas.attention_flops(b, h, s, s, d, causal=False)
    causal = formulas.attention_flops(b, h, s, s, d, causal=True)
    assert full.value == 4 * b * h * s * s * d and full.formula == "4*B*H*Sq*Sk*D"
    assert causal.value == 0.5 * full.value
    bwd = formulas.attention_flops(b, h, s, s, d, causal=True, backward=True)
    assert bwd.value == 2.5 * causal.value and bwd.formula.startswith("2.5*")


@pytest.mark.parametrize("sq,sk,w", [(97, 97, 7), (17, 130, 33), (64, 64, 1), (50, 50, 200), (1, 130, 64),
                                     (130, 17, 5)])
def test_band_area_is_the_reference_mask(sq, sk, w):
    # the band the window formula counts is exactly the set of pairs the reference lets through
    mask = reference.attention_mask(sq, sk, causal=True, window=w)
    assert formulas.band_area(sq, sk, w) == int(mask.sum())
    assert formulas.band_area(sq, sk, None) == int(reference.attention_mask(sq, sk, causal=True).sum())
    f = formulas.attention_flops(2, 3, sq, sk, 16, window=w)
    assert f.value == 4 * 2 * 3 * 16 * int(mask.sum())


def test_memory_formulas():
    assert formulas.copy_bytes(1000, 2).value == 4000
    assert formulas.matmul_flops(2, 3, 5).value == 60
    # rotary: q and k read and written once, cos and sin (float32) read once per token
    t, hq, hk, d, r = 17, 4, 2, 80, 40
    assert formulas.rotary_bytes(t, hq, hk, d, r, 2).value == 2 * t * (hq + hk) * d * 2 + 2 * t * (r // 2) * 4
    # paged decode: K and V of every visible token once; a window caps each sequence
    lens = [1, 100, 333]
    assert formulas.paged_kv_bytes(lens, 8, 128, 2).value == 2 * sum(lens) * 8 * 128 * 2
    assert formulas.paged_kv_bytes(lens, 8, 128, 2, window=64).value == 2 * (1 + 64 + 64) * 8 * 128 * 2
    assert formulas.paged_append_bytes(10, 2, 64, 2).value == 4 * 10 * 2 * 64 * 2
    step = formulas.decode_step_bytes(1000, layers=3, context=50, heads_kv=2, head_dim=8, elem_bytes=2, batch=4)
    assert step.value == 1000 + 2 * 3 * 4 * 50 * 2 * 8 * 2
    pre = formulas.prefill_flops(100, tokens=64, layers=2, heads=4, seqlen=32, head_dim=8, batch=2)
    assert pre.value == 2 * 100 * 64 + 2 * formulas.attention_flops(2, 4, 32, 32, 8).value


def test_rotation_and_budget():
    l2 = 50 << 20
    assert timing.n_sets(1 << 20, l2) == 8  # small sets: as many as allowed
    assert timing.n_sets(40 << 20, l2) == 4  # 3 x L2 over the sets
    assert timing.n_sets(1 << 30, l2) == 1  # a set far larger than L2 needs no rotation
    seen = []
    rot = timing.Rotating(seen.append, ["a", "b", "c"])
    for _ in range(7):
        rot()
    assert seen == ["a", "b", "c", "a", "b", "c", "a"]
    assert not timing.Budget(None).exhausted()
    assert timing.Budget(-1.0).exhausted()


# --------------------------------------------------------------------------------------------------
# the JSON document
# --------------------------------------------------------------------------------------------------

ENV = {"device": "Sample GPU (test fixture)", "date": "2026-01-02T03:04:05Z", "commit": "abc123def456",
       "torch": "2.11.0", "triton": "3.6.0", "driver": "580.00"}
CEIL = {"matmul_tflops": 800.0, "copy_gbps": 3000.0, "matmul_formula": "2*M*N*K", "matmul_shape": [8192] * 3,
        "matmul_ms": 1.0, "copy_formula": "2*numel*elem (read + write)", "copy_bytes": 2.0 * 2**30, "copy_ms": 1.0}


def _row(table, case, impl, ms, ceilings=CEIL, tables=None, **kw):
    """A sample row, finished the way the harness finishes rows (value and % of ceiling from ms)."""
    r = Row(table=table, case=str(case), impl=impl, status=kw.pop("status", "ok"), ms=ms,
            ours=impl.startswith("gptkernels"), x=kw.pop("x", case if isinstance(case, (int, float)) else None),
            err=kw.pop("err", 1e-3), bound=kw.pop("bound", 3e-3), **kw)
    return results.finish_row(r, tables[table], ceilings)


def sample_gpu_doc() -> dict:
    """A made-up GPU run covering every table of every suite (fixture for the report, not figures)."""
    tables = {t.id: t for m in (suite_attention, suite_rotary, suite_paged, suite_model) for t in m.tables(True)}
    rows = []
    for d in (128, 64):
        for s in (1024, 4096, 16384):
            af = formulas.attention_flops(16384 // s, 2048 // d, s, s, d).value
            for i, impl in enumerate(("gptkernels triton", "torch sdpa flash", "torch sdpa cudnn")):
                rows.append(_row(f"attn-fwd-d{d}", s, impl, 1.0 + 0.1 * i, flops=af, tables=tables))
                rows.append(_row(f"attn-bwd-d{d}", s, impl, 3.0 - 0.1 * i, flops=2.5 * af, tables=tables))
            rows.append(_row(f"attn-fwd-d{d}", s, "gptkernels cuda", None, status="unavailable",
                             message="the CUDA extension is not built", err=None, bound=None, tables=tables))
    wf = formulas.attention_flops(1, 16, 16384, 16384, 128, window=256).value
    rows.append(_row("attn-window-fwd", 16384, "gptkernels triton", 0.04, flops=wf, tables=tables))
    rows.append(_row("attn-window-fwd", 16384, "flexattention (compiled)", 0.06, flops=wf, tables=tables))
    rows.append(_row("attn-window-bwd", 16384, "flexattention (compiled)", None, status="error",
                     message="RuntimeError: sample failure", err=None, bound=None, tables=tables))
    rb = formulas.rotary_bytes(8192, 32, 8, 128, 128, 2).value
    rows.append(_row("rotary", 8192, "gptkernels triton", 0.065, bytes=rb, tables=tables))
    rows.append(_row("rotary", 8192, "hf rotate_half (eager)", 0.3, bytes=rb, tables=tables))
    rows.append(_row("rotary", 8192, "gptkernels cuda", None, status="mismatch", message="out: max error too big",
                     tables=tables))
    pb = formulas.paged_kv_bytes([4096] * 64, 8, 128, 2).value
    rows.append(_row("paged-b64", 4096, "gptkernels triton", 0.42, bytes=pb, tables=tables))
    rows.append(_row("paged-b1", 131072, "gptkernels triton", 0.25, bytes=pb / 2, tables=tables))
    for bs, ms in ((16, 0.42), (64, 0.40), (256, 0.41)):
        rows.append(_row("paged-blocks", bs, "gptkernels triton", ms, bytes=pb, tables=tables))
    rows.append(_row("paged-append", 65536, "gptkernels triton", 0.1, bytes=1e8, tables=tables))
    for impl, tok in (("gptkernels triton", 9000.0), ("hf transformers (sdpa)", 3000.0)):
        rows.append(_row("model-decode", "pythia-1.4b B=32", impl, 32 / tok * 1e3, value=tok, tables=tables))
        rows.append(_row("model-prefill", "pythia-1.4b B=32", impl, 50.0, value=32 * 512 / 0.05, pct=40.0,
                         tables=tables))
    rows.append(_row("model-step", "pythia-1.4b", "gptkernels triton", 1.2, bytes=2.7e9, tables=tables,
                     extra={"step_ms": 1.2, "floor_ms": 0.9, "x_floor": 1.2 / 0.9}))
    return results.new_document("gpu", ENV, suites=["attention", "rotary", "paged", "model"], quick=True,
                                ceilings=CEIL, tables=list(tables.values()), rows=rows, duration_s=123.0,
                                targets=targets.evaluate(rows))


def test_finish_row_figures():
    t = Table(id="t", suite="s", title="T", x="S", unit="TFLOP/s", ceiling="matmul")
    r = results.finish_row(Row(table="t", case="1", impl="x", status="ok", ms=2.0, flops=4e9), t, CEIL)
    assert r.value == pytest.approx(2.0) and r.pct == pytest.approx(100 * 2.0 / 800)
    t = Table(id="t", suite="s", title="T", x="S", unit="GB/s", ceiling="copy")
    r = results.finish_row(Row(table="t", case="1", impl="x", status="ok", ms=1.0, bytes=3e9), t, CEIL)
    assert r.value == pytest.approx(3000.0) and r.pct == pytest.approx(100.0)
    r = results.finish_row(Row(table="t", case="1", impl="x", status="error", message="boom", bytes=3e9), t, CEIL)
    assert r.value is None and r.pct is None


def test_document_schema_roundtrip(tmp_path):
    doc = sample_gpu_doc()
    doc["rows"][0]["err"] = float("nan")  # strict JSON has no NaN: stored as text
    path = results.save(doc, tmp_path / "run.json")
    json.loads(path.read_text())  # strict JSON
    back = results.load(path)
    assert back["env"] == ENV and len(back["rows"]) == len(doc["rows"]) and back["rows"][0]["err"] == "nan"


@pytest.mark.parametrize("breakage,match", [
    (lambda d: d.update(schema="other/9"), "schema"),
    (lambda d: d.update(kind="cpu"), "kind"),
    (lambda d: d["env"].pop("commit"), "env"),
    (lambda d: d.update(ceilings=None), "ceilings"),
    (lambda d: d["rows"][0].update(status="fast"), "status"),
    (lambda d: d["rows"][0].update(ms=None), "positive ms"),
    (lambda d: d["rows"][0].update(status="error", message=""), "no message"),
    (lambda d: d["rows"][0].update(table="nope"), "not among the tables"),
    (lambda d: d["rows"][0].pop("impl"), "keys"),
    (lambda d: d["tables"][0].pop("unit"), "keys"),
])
def test_document_schema_rejects(breakage, match):
    doc = json.loads(json.dumps(sample_gpu_doc()))
    breakage(doc)
    with pytest.raises(ValueError, match=match):
        results.validate(doc)


def test_row_status_is_checked():
    with pytest.raises(ValueError, match="status"):
        Row(table="t", case="1", impl="x", status="great")


# --------------------------------------------------------------------------------------------------
# targets and the report
# --------------------------------------------------------------------------------------------------


def test_targets_met_missed_and_unmeasured():
    ts = {t["what"]: t for t in sample_gpu_doc()["targets"]}
    fwd = ts["attention fwd D=128 S=16384: triton >= 1.0x best SDPA"]
    assert fwd["met"] is True and fwd["value"] == pytest.approx(1.1 / 1.0)  # ours 1.0 ms, best SDPA 1.1 ms
    bwd = ts["attention bwd D=128 S=16384: triton >= 0.9x best SDPA"]  # ours 3.0 ms, best SDPA 2.8 ms
    assert bwd["met"] is True and bwd["value"] == pytest.approx(2.8 / 3.0)
    rot = ts["rotary T=8192: triton >= 3x HF eager rotate_half"]
    assert rot["value"] == pytest.approx(0.3 / 0.065) and rot["met"] is True
    win = ts["window 256 at S=16384: >= 20x faster than full causal"]
    assert win["value"] == pytest.approx(1.0 / 0.04) and win["met"] is True
    blocks = ts["paged decode: time within 10% across block sizes 16..256"]
    assert blocks["value"] == pytest.approx(0.42 / 0.40) and blocks["met"] is True
    step = ts["pythia-1.4b batch-1 decode step: <= 1.5x its bandwidth floor"]
    assert step["met"] is True and targets.gap_text(step) == "met"
    cuda = ts["rotary T=8192: cuda at least as fast as triton"]
    assert cuda["met"] is None and "mismatch" in cuda["figure"] and targets.gap_text(cuda) == "not measured"
    missed = ts["paged decode batch 1 x ctx 128k: >= 75% of copy bandwidth"]  # 2147 GB/s of 3000
    assert missed["met"] is False and missed["value"] == pytest.approx(100 * 2**29 / 0.25e-3 / 1e9 / 3000)
    assert missed["gap"] == pytest.approx(75 / missed["value"])
    assert targets.gap_text(missed) == f"NOT met: {missed['gap']:.2f}x short"


def test_report_from_sample_gpu_json(tmp_path):
    path = results.save(sample_gpu_doc(), tmp_path / "run.json")
    md_path = report.generate([path], out=tmp_path / "BENCHMARKS.md", plots_dir=tmp_path / "results")
    md = md_path.read_text()
    assert "Sample GPU (test fixture)" in md and "2026-01-02T03:04:05Z" in md and "abc123def456" in md
    assert "800 TFLOP/s" in md and "3000 GB/s" in md  # the run's ceilings
    for t in results.tables_of(results.load(path)).values():
        assert t.title in md
    assert "## Targets" in md and "NOT met" in md and "not measured" in md
    assert "2*M*N*K" in md and "0.5*4*B*H*Sq*Sk*D" in md  # formulas next to the figures
    assert "WRONG" in md and "RuntimeError: sample failure" in md  # failures shown with their reason
    for suite in ("attention", "rotary", "paged", "model"):
        png = tmp_path / "results" / f"{suite}.png"
        assert png.exists() and png.stat().st_size > 1000
        assert f"]({'results/' + suite + '.png'})" in md
    assert results.load(tmp_path / "results" / "latest.json")["rows"]  # the source is kept beside the plots


def test_report_merges_runs(tmp_path):
    doc = sample_gpu_doc()
    a, b = json.loads(json.dumps(doc)), json.loads(json.dumps(doc))
    a["rows"] = [r for r in a["rows"] if r["table"].startswith("attn")]
    a["suites"] = ["attention"]
    b["rows"] = [r for r in b["rows"] if not r["table"].startswith("attn")]
    b["suites"] = ["rotary", "paged", "model"]
    pa, pb = results.save(a, tmp_path / "a.json"), results.save(b, tmp_path / "b.json")
    merged = report.merge([results.load(pa), results.load(pb)])
    assert len(merged["rows"]) == len(doc["rows"]) and merged["suites"] == ["attention", "rotary", "paged", "model"]
    assert len(merged["merged_from"]) == 2 and merged["targets"]


def test_report_without_a_gpu_run_says_so(tmp_path):
    rows = [Row(table="parity", case="paged_append x", impl="gptkernels triton", status="pass", err=0.0, bound=0.0,
                params={"op": "paged_append", "shape": "x", "dtype": "float32"})]
    doc = results.new_document("parity", dict(ENV, device="cpu (no CUDA GPU)"), suites=["paged"], quick=False,
                               ceilings=None, tables=[parity.TABLE], rows=rows, duration_s=1.0)
    path = results.save(doc, tmp_path / "p.json")
    md = report.generate([path], out=tmp_path / "B.md", plots_dir=tmp_path / "r").read_text()
    assert "No GPU run is recorded yet: timings need a GPU." in md and "| paged_append | x | float32 |" in md


# --------------------------------------------------------------------------------------------------
# the parity sweep and the command line
# --------------------------------------------------------------------------------------------------


def test_parity_sweep_one_tiny_case():
    rows = parity.run(["paged_append"], dtype_list=[torch.float32], case_filter=lambda c: c.op == "paged_append")
    triton_rows = [r for r in rows if r.impl == "gptkernels triton"]
    assert [r.status for r in triton_rows] == ["pass"], [r.message for r in triton_rows]
    assert triton_rows[0].err == 0.0 and triton_rows[0].params["dtype"] == "float32"
    cuda_rows = [r for r in rows if r.impl == "gptkernels cuda"]
    assert cuda_rows and all(r.status in ("pass", "unavailable") for r in cuda_rows)
    table = parity.format_table(rows)
    assert "paged_append" in table and "max err" in table and "bound" in table


def test_parity_failure_is_reported_and_fails_the_run(monkeypatch, tmp_path, capsys):
    def bad(dtype, backend, device, gen):
        return Check(err=1.0, bound=0.1, problem="out: max error 1 exceeds the bound 0.1")

    monkeypatch.setattr(parity, "cases", lambda: [parity.Case("apply_rotary", "planted failure", bad)])
    rc = run.main(["--suite", "rotary", "--parity", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL" in out and "planted failure" in out
    doc = results.load(next(tmp_path.glob("parity-*.json")))
    assert doc["kind"] == "parity" and any(r["status"] == "fail" for r in doc["rows"])
    if not ON_GPU:
        assert out.rstrip().endswith("no benchmark figure was measured.")  # said plainly, last


def test_cli_parity_run_passes_and_writes_json(tmp_path, capsys):
    rc = run.main(["--suite", "rotary", "--parity", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    doc = results.load(next(tmp_path.glob("parity-*.json")))
    assert rc == 0, out
    assert {r["params"].get("op") for r in doc["rows"] if r["status"] == "pass"} == {"apply_rotary"}
    assert "Timings need a GPU" in out or ON_GPU


@pytest.mark.skipif(ON_GPU, reason="the interpreter path is the one a machine without a GPU takes")
@pytest.mark.parametrize("inherited", [None, "0"])
def test_make_bench_without_gpu_runs_kernels_in_the_interpreter(tmp_path, inherited):
    """`make bench` starts with TRITON_INTERPRET unset: the suite must choose the interpreter itself,
    before gptkernels imports triton; an inherited TRITON_INTERPRET=0 (which would fail every kernel
    without a GPU) is overridden."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if inherited is not None:
        env["TRITON_INTERPRET"] = inherited
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "rotary", "--quick",
                           "--out", str(tmp_path), "--no-progress"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = results.load(next(tmp_path.glob("parity-*.json")))
    assert [r for r in doc["rows"] if r["status"] == "pass"], proc.stdout
    assert not [r for r in doc["rows"] if r["status"] == "unavailable" and r["params"].get("backend") == "triton"]


@pytest.mark.parametrize("value,interpreted", [("1", True), ("true", True), ("Yes", True), ("0", False),
                                               ("false", False), ("", False)])
def test_gpu_run_reads_triton_interpret_by_gptkernels_rule(monkeypatch, capsys, value, interpreted):
    """On a GPU, benchmarks.run refuses to time under the interpreter, judged by the one rule
    (gptkernels._backend.triton_interpret: what Triton reads), so TRITON_INTERPRET=false times kernels."""
    import torch

    from gptkernels._backend import triton_interpret

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_interpret() is interpreted
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(run, "run_gpu", lambda args: 0)
    rc = run.main(["--suite", "rotary", "--no-progress"])
    err = capsys.readouterr().err
    assert (rc, "TRITON_INTERPRET is set" in err) == ((2, True) if interpreted else (0, False))


def test_cli_arguments():
    a = run.parse_args([])
    assert a.suites == list(run.SUITES) and not a.quick and a.out == "bench_out"
    a = run.parse_args(["--suite", "paged", "--quick", "--out", "x"])
    assert a.suites == ["paged"] and a.quick and a.out == "x"
    assert run.budgets(a) == {"paged": pytest.approx(run.QUICK_BUDGET_S["paged"])}
    a = run.parse_args(["--suite", "all", "--budget", "100"])
    shares = run.budgets(a)
    assert sum(shares.values()) == pytest.approx(100) and shares["attention"] > shares["rotary"]
    assert run.budgets(run.parse_args(["--suite", "all"])) == {s: None for s in run.SUITES}
    assert run.parse_args(["--suite", "model,attention"]).suites == ["attention", "model"]
    for bad in (["--suite", "everything"], ["--suite", "rotary,nope"], ["--suite", ","], ["--budget", "-5"],
                ["--frobnicate"]):
        with pytest.raises(SystemExit) as e:
            run.parse_args(bad)
        assert e.value.code == 2


def test_summary_table_lists_figures_and_targets():
    text = run.summary(sample_gpu_doc())
    assert "attn-fwd-d128" in text and "16384" in text and "torch sdpa" in text
    assert any(line.startswith("targets:") and "not met" in line for line in text.splitlines())
    assert text.splitlines()[-1].startswith("2 rows failed")  # the sample's WRONG and error rows


def test_gpu_check_counts_tests_per_file():
    lines = ["tests/test_a.py::test_x[1] PASSED                    [ 10%]",
             "tests/test_a.py::test_x[2] FAILED                    [ 20%]",
             "tests/test_b.py::test_y SKIPPED (needs a CUDA GPU)   [ 30%]",
             "[gw1] [ 40%] PASSED tests/test_b.py::test_z[a-b]",
             "[gw0] [ 50%] ERROR tests/test_c.py::test_w",
             "collected 5 items"]
    per = gpu_check.count_tests(lines)
    assert per == {"tests/test_a.py": {"passed": 1, "failed": 1, "errors": 0, "skipped": 0},
                   "tests/test_b.py": {"passed": 1, "failed": 0, "errors": 0, "skipped": 1},
                   "tests/test_c.py": {"passed": 0, "failed": 0, "errors": 1, "skipped": 0}}


def test_pytest_benchmark_suite_skips_without_gpu():
    from benchmarks import test_bench_ops

    marks = test_bench_ops.pytestmark
    (mark,) = [m for m in (marks if isinstance(marks, list) else [marks]) if m.name == "skipif"]
    assert mark.args[0] == (not torch.cuda.is_available()) and "GPU" in mark.kwargs["reason"]


def test_planned_rows_match_tables():
    for m in (suite_attention, suite_rotary, suite_paged, suite_model):
        for quick in (True, False):
            assert m.planned_rows(quick) > 0
            assert all(t.unit and t.title and t.x for t in m.tables(quick))
    assert sum(run.QUICK_BUDGET_S.values()) <= 540  # `make bench` (--quick) ends inside 10 minutes


def test_issue16_targets_read_the_quant_and_fp8_rows():
    """Issue 16's targets off the rows suite_quant and suite_paged write: the GEMM at M <= 16 on its
    weights' bytes (x and y excluded) vs the copy ceiling, the quantized decode step's tokens/s over
    bf16's, fp8 vs bf16 paged decode; a row that did not run is 'not measured', and the short table
    prints every target with its gap."""
    tables = {t.id: t for m in (suite_quant, suite_paged) for t in m.tables(True)}
    n = k = suite_quant.GEMM_N
    int8_w, int4_w = n * k + 2 * n, n * k // 2 + 2 * 2 * n * (k // 128)  # codes + bf16 scales (+ zeros)
    params = dict(M=1, N=n, K=k)
    rows = [_row("quant-gemm", 1, "gptkernels triton int8", 0.03, bytes=int8_w + 2 * (k + n), params=params,
                 tables=tables),
            _row("quant-gemm", 1, "gptkernels triton int4 (group 128)", 0.0135, bytes=int4_w + 2 * (k + n),
                 params=params, tables=tables),
            _row("quant-gemm", 16, "gptkernels triton int8", None, status="mismatch", message="y: max error",
                 params=dict(params, M=16), tables=tables)]
    for fmt, tok in ((None, 100.0), ("int8", 170.0), ("int4", 200.0)):
        rows.append(_row("quant-decode", suite_quant.DECODE_CASE, suite_quant.decode_impl(fmt), 1e3 / tok,
                         value=tok, tables=tables))
    rows += [_row("paged-fp8", "bf16 cache", "gptkernels triton", 0.42, bytes=2**30, tables=tables),
             _row("paged-fp8", "fp8 cache", "gptkernels triton", 0.24, bytes=2**29, tables=tables)]
    ts = {t["what"]: t for t in targets.evaluate(rows)}
    i8 = ts["weight-only GEMM int8 M=1: >= 80% of copy on weight bytes"]
    assert i8["value"] == pytest.approx(100 * int8_w / 0.03e-3 / 1e9 / 3000) and i8["met"] is False  # 74.6%
    i4 = ts["weight-only GEMM int4 M=1: >= 80% of copy on weight bytes"]
    assert i4["value"] == pytest.approx(100 * int4_w / 0.0135e-3 / 1e9 / 3000) and i4["met"] is True  # 88.0%
    assert ts["weight-only GEMM int8 M=16: >= 80% of copy on weight bytes"]["figure"].startswith(
        "not measured: gptkernels triton int8 at quant-gemm 16: mismatch")
    assert "did not run" in ts["weight-only GEMM int4 M=16: >= 80% of copy on weight bytes"]["figure"]
    assert not any("M=64" in w for w in ts)  # the target is for M <= 16
    d8 = ts["pythia-1.4b B=1 decode step int8: >= 1.6x bf16's tokens/s"]
    d4 = ts["pythia-1.4b B=1 decode step int4: >= 2.3x bf16's tokens/s"]
    assert (d8["value"], d8["met"]) == (pytest.approx(1.7), True)
    assert (d4["value"], d4["met"]) == (pytest.approx(2.0), False) and d4["gap"] == pytest.approx(2.3 / 2.0)
    fp8 = ts["fp8 paged decode 64 x 4k: >= 1.7x the bf16 cache's speed"]
    assert fp8["value"] == pytest.approx(0.42 / 0.24) and fp8["met"] is True
    assert {t["issue"] for t in ts.values()} == {16}
    doc = results.new_document("gpu", ENV, suites=["paged", "quant"], quick=True, ceilings=CEIL,
                               tables=list(tables.values()), rows=rows, duration_s=1.0,
                               targets=targets.evaluate(rows))
    text = run.summary(doc)
    assert "NOT met: 1.15x short" in text and "targets: 3 met, 2 not met, 2 not measured" in text
    # a line per variant of our rows (their impl names are not plain "gptkernels triton")
    lines = {ln.split()[0] + " " + ln[19:39].strip(): ln for ln in text.splitlines() if ln.startswith("quant-")}
    assert "WRONG" in lines["quant-gemm 16 int8"] and len([k for k in lines if "gemm" in k]) == 1  # largest M
    assert {"quant-decode pythia-1.4b B=1 bf16", "quant-decode pythia-1.4b B=1 int4"} <= set(lines)


def test_targets_only_for_suites_that_ran():
    assert targets.evaluate([]) == []
    rot = [Row(**r) for r in sample_gpu_doc()["rows"] if r["table"] == "rotary"]
    ts = targets.evaluate(rot)
    assert ts and {t["issue"] for t in ts} == {3, 6} and all(t["tables"] for t in ts)


def test_run_saves_after_every_row(tmp_path):
    """run.py saves the JSON after each row (Session.on_row): a run killed at the device call's time
    limit keeps what it measured; a failing save is reported, never turned into a failed row."""
    from benchmarks.harness import Session

    sess = Session(quick=True, ceilings=None)
    sess.table(Table(id="t", suite="rotary", title="t", x="T", unit="GB/s"))
    saved = []
    sess.on_row = lambda: saved.append(len(sess.rows))
    sess.skip("t", "1", "a", "why")
    sess.skip("t", "2", "a", "why")
    assert saved == [1, 2]
    sess.on_row = lambda: 1 / 0
    assert sess.skip("t", "3", "a", "why").status == "skipped" and len(sess.rows) == 3
    path = results.save(sample_gpu_doc(), tmp_path / "run.json")
    assert results.load(path)["rows"] and [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no .tmp left


def test_model_suite_past_its_budget_builds_nothing(monkeypatch):
    """Past the budget the model suite skips its rows without building the models (which compiles
    kernels and generates tokens for minutes on a GPU)."""
    from benchmarks.harness import Session

    def boom(*a, **kw):
        raise AssertionError("ModelBench built past the budget")

    monkeypatch.setattr(suite_model, "ModelBench", boom)
    sess = Session(quick=True, ceilings=None)
    sess.budget = timing.Budget(0.0)
    sess.budget.start -= 1.0
    suite_model.run(sess, True)
    assert len(sess.rows) == suite_model.planned_rows(True)
    assert all(r.status == "skipped" and "budget" in r.message for r in sess.rows)


def test_run_gpu_path_with_the_device_faked(tmp_path, monkeypatch):
    """run.run_gpu (what only runs on a GPU), its device parts faked: the JSON exists after the first
    row, and a suite's overrun comes out of the next suite's share (the run ends on time)."""
    import time as _time
    from types import SimpleNamespace

    clock = [0.0]
    monkeypatch.setattr(run, "time", SimpleNamespace(monotonic=lambda: clock[0], strftime=_time.strftime,
                                                     gmtime=_time.gmtime))
    monkeypatch.setattr(timing, "measure_ceilings",
                        lambda quick=False: timing.Ceilings(800.0, 3000.0, (1, 1, 1), 1.0, 1.0, 1.0))
    budgets_seen, saved = {}, []

    def fake(name, took):
        def run_suite(sess, quick):
            budgets_seen[name] = sess.budget.seconds
            sess.table(Table(id=name, suite=name, title=name, x="x", unit="ms"))
            sess.add(Row(table=name, case="1", impl="gptkernels triton", status="ok", ours=True, ms=1.0))
            saved.append(bool(list(tmp_path.glob("run-*.json"))))  # (run_gpu catches a suite's exceptions)
            clock[0] += took
        return run_suite

    monkeypatch.setattr(suite_rotary, "run", fake("rotary", 40.0))   # share 25 s: 15 s over
    monkeypatch.setattr(suite_paged, "run", fake("paged", 10.0))
    args = run.parse_args(["--suite", "rotary,paged", "--budget", "100", "--out", str(tmp_path), "--no-progress"])
    assert run.run_gpu(args) == 0
    assert budgets_seen == {"rotary": pytest.approx(25.0), "paged": pytest.approx(60.0)}
    assert saved == [True, True]  # the JSON was written after the first row, before the suite ended
    doc = results.load(next(tmp_path.glob("run-*.json")))
    assert doc["kind"] == "gpu" and [r["table"] for r in doc["rows"]] == ["rotary", "paged"]


# --------------------------------------------------------------------------------------------------
# make gpu-smoke's benchmark plan (benchmarks.run --smoke): headline rows first, the rest after
# --------------------------------------------------------------------------------------------------


def _planned(suite: str) -> set[tuple[str, str, str]]:
    """Every (table, case, impl) a suite's --quick run lists."""
    rows = set()
    if suite == "attention":
        for table, s, d, window, direction in [(f"attn-{dr}-d{d}", s, d, None, dr) for d, ss in
                                               suite_attention.config(True)["dims"].items() for s in ss
                                               for dr in ("fwd", "bwd")] + \
                [(f"attn-window-{dr}", s, 128, suite_attention.WINDOW, dr)
                 for s in suite_attention.config(True)["window_s"] for dr in ("fwd", "bwd")]:
            rows |= {(table, str(s), i) for i in suite_attention.impls(direction, s, window, True)}
        rows |= {("attn-decode", str(sk), i) for sk in suite_attention.config(True)["decode_sk"]
                 for i in suite_attention.decode_impls()}
        rows |= {(f"attn-feat-{dr}", f, i) for f in suite_attention.FEATURES for dr in ("fwd", "bwd")
                 for i in suite_attention.feature_impls(f, dr)}
    elif suite == "paged":
        for table, b, ctx, _, x in suite_paged._jobs(True):
            rows |= {(table, str(x), i) for i in suite_paged._decode_impls(b, ctx, table, True)}
        rows |= {("paged-append", str(suite_paged.APPEND_TOKENS), i) for i in suite_paged.APPEND_IMPLS}
        rows |= {("paged-fp8", c, suite_paged.FP8_IMPL) for c in suite_paged.FP8_CASES}
        rows |= {("paged-features", f, i) for f in suite_paged.FEATURE_CASES for i in suite_paged.feature_impls(f)}
        rows |= {("kvcache-decode", f, i) for f in suite_paged.KV_CASES for i in suite_paged.KV_IMPLS}
    elif suite == "quant":
        rows |= {("quant-gemm", str(m), i) for m in suite_quant.GEMM_M for i in suite_quant.GEMM_IMPLS}
        rows |= {("quant-decode", suite_quant.DECODE_CASE, suite_quant.decode_impl(f)) for f in suite_quant.FORMATS}
        rows |= {("quant-ppl", suite_quant.PPL_GPU_CASE, suite_quant.fmt_label(f)) for f in suite_quant.FORMATS}
    elif suite == "rotary":
        rows |= {("rotary", str(t), i) for t in suite_rotary.config(True) for i in suite_rotary.IMPLS}
    else:
        for name in suite_model.MODELS:
            for impl in suite_model.impls():
                rows |= {(t, name if t == "model-step" else f"{name} B={b}", impl) for t, b in suite_model._tags()}
            rows |= set(suite_model._padded_rows(name))
    return rows


def _headline(suite: str, plan: dict | None = None) -> set[tuple[str, str, str]]:
    plan = run.SMOKE_HEADLINE if plan is None else plan
    return {(t, c, i) for (t, c), impls in plan.get(suite, {}).items() for i in impls}


def test_smoke_headline_rows_are_rows_the_suites_have():
    # a misspelt headline row would silently never be measured
    assert list(run.SMOKE_ORDER) == ["attention", "paged", "rotary", "model"] == list(run.SMOKE_HEADLINE)
    for suite in run.SMOKE_ORDER:
        assert _headline(suite) <= _planned(suite), _headline(suite) - _planned(suite)
    # the second pass opens with issue 16's cheapest rows, none of them a headline row
    assert list(run.SMOKE_NEXT) == ["paged", "quant"]
    nxt = _headline("paged", run.SMOKE_NEXT) | _headline("quant", run.SMOKE_NEXT)
    assert nxt == {("paged-fp8", "bf16 cache", "gptkernels triton"), ("paged-fp8", "fp8 cache", "gptkernels triton"),
                   ("quant-gemm", "1", "gptkernels triton int8"),
                   ("quant-gemm", "1", "gptkernels triton int4 (group 128)")}
    for suite in run.SMOKE_NEXT:
        assert _headline(suite, run.SMOKE_NEXT) <= _planned(suite)
        assert not _headline(suite, run.SMOKE_NEXT) & _headline(suite)
    assert ("attn-bwd-d128", "16384", run._ATOMIC) in _headline("attention")  # both backwards
    assert ("model-step", "pythia-1.4b", "gptkernels triton") in _headline("model")
    assert not any("flex" in i for s in run.SMOKE_ORDER for _, _, i in _headline(s))  # compiles: second pass


class _Recorder:
    """A Session whose measure/skip record the rows instead of running them (the suites' selection)."""

    def __init__(self, select, budget=None):
        from benchmarks.harness import Session

        self.sess = Session(quick=True, ceilings=None)
        self.sess.select = select
        self.sess.budget = timing.Budget(budget)
        self.rows = []

        def measure(table, case, impl, **kw):
            self.rows.append((table, case, impl))
            return Row(table=table, case=case, impl=impl, status="skipped", message="recorded, not run")

        self.sess.measure = measure
        real_skip = self.sess.skip
        self.skipped = []

        def skip(table, case, impl, why, **kw):
            self.skipped.append((table, case, impl, why))
            return real_skip(table, case, impl, why, **kw)

        self.sess.skip = skip


def _fake_suites(monkeypatch, built):
    """Cheap stand-ins for the suites' cases (no tensors), recording which cases get built."""
    from types import SimpleNamespace

    def fake_case(tag):
        def make(*args):
            built.append((tag, *args))
            return SimpleNamespace(s=args[0], direction=args[-1] if tag == "attn" else None, window=None,
                                   params={}, flops=1.0, bytes=1.0, sets=[], sk=args[0], check=None,
                                   batch=args[0], ctx=args[1] if len(args) > 1 else None, drop_dense=lambda: None)
        return make

    monkeypatch.setattr(suite_attention, "Case", fake_case("attn"))
    monkeypatch.setattr(suite_attention, "DecodeCase", fake_case("attn-decode"))
    monkeypatch.setattr(suite_attention, "_forward_fn", lambda impl, window: None)
    monkeypatch.setattr(suite_attention, "_decode_fn", lambda impl: None)
    monkeypatch.setattr(suite_attention, "FeatureCase", fake_case("attn"))
    monkeypatch.setattr(suite_attention, "_feature_fn", lambda case, impl: None)
    monkeypatch.setattr(suite_attention, "dv_refusal", lambda: None)
    monkeypatch.setattr(suite_paged, "KVCacheCase", fake_case("kvcache"))
    monkeypatch.setattr(suite_paged, "_kvcache_fn", lambda case, impl: None)
    monkeypatch.setattr(suite_paged, "_feature_check", lambda case, opts: None)
    monkeypatch.setattr(suite_paged, "_sdpa_alibi_fn", lambda case, slopes: (None, None))
    monkeypatch.setattr(suite_paged, "DecodeCase", fake_case("paged"))
    monkeypatch.setattr(suite_paged, "_decode_fn", lambda impl, case: (None, None, None))
    monkeypatch.setattr(suite_rotary, "Case", fake_case("rotary"))
    monkeypatch.setattr(suite_rotary, "_run_fn", lambda impl, case: None)


def test_smoke_first_pass_builds_and_measures_only_the_headline(monkeypatch):
    built = []
    _fake_suites(monkeypatch, built)
    for suite, module in (("attention", suite_attention), ("paged", suite_paged), ("rotary", suite_rotary)):
        rec = _Recorder(run.headline_select(suite))
        module.run(rec.sess, True)
        assert set(rec.rows) == _headline(suite) and len(rec.rows) == len(set(rec.rows)), suite
    # no case was built that has no headline row (a 64 x 4k paged cache is 1 GiB on the GPU)
    assert sorted((b[0], b[1]) for b in built if b[0] == "attn") == [("attn", 16384)] * 4
    assert [b[1:3] for b in built if b[0] == "paged"] == [(64, 4096), (1, 131072)]
    # the first attention rows are the ones the targets read first: full causal D=128 at S=16k
    rec = _Recorder(run.headline_select("attention"))
    suite_attention.run(rec.sess, True)
    assert rec.rows[0] == ("attn-fwd-d128", "16384", "gptkernels triton")


def test_smoke_next_rows_build_only_their_cases(monkeypatch):
    """SMOKE_NEXT's pass: paged builds only the 64 x 4k cache and measures the two fp8-table rows (no
    other paged row); quant measures the two M = 1 GEMMs and builds no model."""
    built = []
    _fake_suites(monkeypatch, built)
    monkeypatch.setattr(suite_paged, "_fp8_sets", lambda case: ([], None))
    rec = _Recorder(run.plan_select(run.SMOKE_NEXT, "paged"))
    suite_paged.run(rec.sess, True)
    assert rec.rows == [("paged-fp8", c, "gptkernels triton") for c in ("bf16 cache", "fp8 cache")]
    assert [b[1:3] for b in built if b[0] == "paged"] == [(64, suite_paged.FP8_CTX)]
    gemms = []
    monkeypatch.setattr(timing, "DEVICE", "cpu")
    monkeypatch.setattr(suite_quant, "GEMM_N", 64)  # the weight the GEMM rows share: small on CPU
    monkeypatch.setattr(suite_quant, "GEMM_K", 64)
    monkeypatch.setattr(suite_quant, "_gemm_case", lambda impl, m, w: gemms.append((impl, m)) or (None, [], 1, None))
    monkeypatch.setattr(suite_quant, "heldout_ids", lambda *a, **k: pytest.fail("perplexity is not in the plan"))
    import gptkernels.models

    monkeypatch.setattr(gptkernels.models, "from_config", lambda *a, **k: pytest.fail("no model is in the plan"))
    rec = _Recorder(run.plan_select(run.SMOKE_NEXT, "quant"))
    suite_quant.run(rec.sess, True)
    assert set(rec.rows) == _headline("quant", run.SMOKE_NEXT) and len(gemms) == 2 and not rec.skipped


def test_smoke_second_pass_runs_the_rest_and_never_starts_a_compile_that_cannot_finish(monkeypatch):
    built = []
    _fake_suites(monkeypatch, built)
    done = _headline("attention")
    rec = _Recorder(lambda t, c, i: (t, c, i) not in done, budget=30.0)  # 30 s: no Flex compile fits
    suite_attention.run(rec.sess, True)
    flex = {(t, c, i) for t, c, i in _planned("attention") if i.startswith("flexattention")}
    assert set(rec.rows) == _planned("attention") - done - flex
    assert {s[:3] for s in rec.skipped} == flex and all("FlexAttention compile takes" in s[3] for s in rec.skipped)
    rec = _Recorder(lambda t, c, i: (t, c, i) not in _headline("rotary"), budget=10.0)
    suite_rotary.run(rec.sess, True)
    assert [s[2] for s in rec.skipped] == ["hf rotate_half (torch.compile)"]


def test_smoke_model_rows_are_selected_per_table_and_batch(monkeypatch):
    from benchmarks.checks import Check

    calls = []

    class FakeBench(suite_model.ModelBench):
        def __init__(self, sess, name, quick):
            self.sess, self.name, self.quick = sess, name, quick
            self.prompts, self.ref, self.base, self.matmul_params, self.weight_bytes = {1: None}, None, None, 1, 1

        def params(self, b):
            return {}

        def forward_fn(self, impl):
            return lambda ids: None

        def _agreement(self, impl):
            return None

        def _prefill(self, impl, fwd, b, label, *a):
            calls.append(("model-prefill", label, impl))

        def _decode(self, impl, b, label, weight_bytes, check, ours, agree, tables):
            calls.extend((t, self.name if t == "model-step" else label, impl) for t in tables)

        def run_padded(self, impl):
            calls.append(("model-hf-padded", f"{self.name} B={suite_model.PADDED_BATCH}", impl))

    monkeypatch.setattr(suite_model, "ModelBench", FakeBench)
    monkeypatch.setattr(suite_model, "compare", lambda pairs: Check(0.0, 1.0))
    rec = _Recorder(run.headline_select("model"))
    suite_model.run(rec.sess, True)
    assert set(calls) == _headline("model") and len(calls) == len(set(calls))
    calls.clear()
    rec = _Recorder(lambda t, c, i: (t, c, i) not in _headline("model"))
    suite_model.run(rec.sess, True)
    assert set(calls) == _planned("model") - _headline("model")


def test_run_smoke_next_rows_skipped_when_the_headline_spent_the_budget(tmp_path, monkeypatch):
    """The headline overran the whole budget: SMOKE_NEXT's suites are not run (nothing built), their
    rows are skipped with the reason, and issue 16's targets say 'not measured'."""
    import time as _time
    from types import SimpleNamespace

    clock = [0.0]
    monkeypatch.setattr(run, "time", SimpleNamespace(monotonic=lambda: clock[0], strftime=_time.strftime,
                                                     gmtime=_time.gmtime))

    def fake(name):
        def run_suite(sess, quick):
            assert name != "quant", "the quant suite runs only for SMOKE_NEXT's rows"
            sess.table(Table(id=name, suite=name, title=name, x="x", unit="ms"))
            if sess.wanted(name, "head", "gptkernels triton"):
                sess.add(Row(table=name, case="head", impl="gptkernels triton", status="ok", ours=True, ms=1.0))
            clock[0] += 300.0 if name == "attention" else 0.0
        return run_suite

    for name, module in (("attention", suite_attention), ("paged", suite_paged), ("rotary", suite_rotary),
                         ("model", suite_model), ("quant", suite_quant)):
        monkeypatch.setattr(module, "run", fake(name))
    monkeypatch.setattr(run, "SMOKE_HEADLINE", {s: {(s, "head"): ("gptkernels triton",)} for s in run.SMOKE_ORDER})
    (tmp_path / "facts.json").write_text(json.dumps({"ceilings": {"matmul_tflops": 800.0, "copy_gbps": 4000.0}}))
    args = run.parse_args(["--smoke", "--budget", "235", "--out", str(tmp_path), "--no-progress", "--no-plots",
                           "--ceilings", str(tmp_path / "facts.json")])
    assert run.run_gpu(args) == 0
    doc = results.load(next(tmp_path.glob("run-*.json")))
    skipped = {(r["table"], r["case"], r["impl"]) for r in doc["rows"] if r["status"] == "skipped"}
    assert skipped == {(t, c, i) for s in run.SMOKE_NEXT for (t, c), impls in run.SMOKE_NEXT[s].items() for i in impls}
    assert all("budget was spent" in r["message"] for r in doc["rows"] if r["status"] == "skipped")
    issue16 = [t for t in doc["targets"] if t["issue"] == 16]
    assert len(issue16) == 5 and all(t["met"] is None for t in issue16)  # fp8, GEMM int8/int4 at M = 1, 16


def test_run_smoke_two_passes_within_the_budget(tmp_path, monkeypatch):
    """--smoke: pass 1 gives each suite its share of the budget for its headline rows (an overrun
    comes out of the next share), pass 2 the rest of the budget, to SMOKE_NEXT's rows first (the quant
    suite only for them), then the other rows; a headline row skipped for time in pass 1 and measured
    in pass 2 appears once, measured."""
    import time as _time
    from types import SimpleNamespace

    clock = [0.0]
    monkeypatch.setattr(run, "time", SimpleNamespace(monotonic=lambda: clock[0], strftime=_time.strftime,
                                                     gmtime=_time.gmtime))
    seen = []

    def fake(name, took):
        def run_suite(sess, quick):
            sess.table(Table(id=name, suite=name, title=name, x="x", unit="ms"))
            seen.append((name, round(sess.budget.seconds, 3)))
            for case in ("head", "rest", "late", "next"):
                if not sess.wanted(name, case, "gptkernels triton"):
                    continue
                if case == "late" and len(seen) <= 4:  # pass 1: out of time for this one
                    sess.skip(name, case, "gptkernels triton", "time budget of the suite spent", ours=True)
                    continue
                sess.add(Row(table=name, case=case, impl="gptkernels triton", status="ok", ours=True, ms=1.0))
            clock[0] += took
        return run_suite

    for name, module, took in (("attention", suite_attention, 130.0), ("paged", suite_paged, 10.0),
                               ("rotary", suite_rotary, 5.0), ("model", suite_model, 20.0),
                               ("quant", suite_quant, 15.0)):
        monkeypatch.setattr(module, "run", fake(name, took))
    monkeypatch.setattr(run, "SMOKE_HEADLINE", {s: {(s, "head"): ("gptkernels triton",), (s, "late"): ("gptkernels triton",)}
                                                for s in run.SMOKE_ORDER})
    monkeypatch.setattr(run, "SMOKE_NEXT", {s: {(s, "next"): ("gptkernels triton",)} for s in ("paged", "quant")})
    monkeypatch.setattr(timing, "measure_ceilings", lambda quick=False: (_ for _ in ()).throw(AssertionError("measured")))
    (tmp_path / "facts.json").write_text(json.dumps({"ceilings": {"matmul_tflops": 800.0, "copy_gbps": 4000.0}}))
    args = run.parse_args(["--smoke", "--budget", "235", "--out", str(tmp_path), "--no-progress", "--no-plots",
                           "--ceilings", str(tmp_path / "facts.json")])
    assert args.quick and args.suites == list(run.SUITES)
    assert run.run_gpu(args) == 0
    total = sum(run.SMOKE_SHARE.values())
    shares = [235 * run.SMOKE_SHARE[s] / total for s in run.SMOKE_ORDER]
    # pass 1: attention its share (110), paged its share less attention's 20 s overrun, ...
    assert seen[0] == ("attention", pytest.approx(shares[0]))
    assert seen[1] == ("paged", pytest.approx(shares[0] + shares[1] - 130.0))
    # pass 2: what is left of the whole budget after pass 1 (165 s spent): SMOKE_NEXT's suites, then the rest
    assert seen[4:7] == [("paged", pytest.approx(235 - 165)), ("quant", pytest.approx(235 - 175)),
                         ("attention", pytest.approx(235 - 190))]
    assert [name for name, _ in seen[7:]] == ["paged", "rotary", "model"]
    doc = results.load(next(tmp_path.glob("run-*.json")))
    assert doc["ceilings"]["matmul_tflops"] == 800.0 and not doc["plots"]
    keys = [(r["table"], r["case"]) for r in doc["rows"]]
    assert len(keys) == len(set(keys)) == 4 * 4 + 1 and all(r["status"] == "ok" for r in doc["rows"])
    assert keys.index(("quant", "next")) < keys.index(("attention", "rest"))  # before the rest
    assert {t for t, c in keys if c == "next"} == {"paged", "quant", "attention", "rotary", "model"}


# --------------------------------------------------------------------------------------------------
# issue 19's rows: softcap, ALiBi, two-sided windows, dv != d, page sizes 1..1024, the fused decode call
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sq,sk,left,right", [(70, 70, 9, 5), (17, 130, 3, 40), (130, 17, -1, 2), (50, 50, 0, -1),
                                              (33, 33, -1, -1)])
def test_window_pairs_is_the_reference_mask(sq, sk, left, right):
    mask = reference.attention_mask(sq, sk, causal=False, window=(left, right))
    pairs = sq * sk if mask is None else int(mask.sum())
    assert formulas.window_pairs(sq, sk, left, right) == pairs
    f = formulas.attention_pair_flops(2, 3, pairs, 192, 128)
    assert f.value == 2 * 2 * 3 * pairs * (192 + 128) and "(D+Dv)" in f.formula
    assert formulas.attention_pair_flops(2, 3, pairs, 64).value == 4 * 2 * 3 * 64 * pairs
    assert formulas.attention_pair_flops(2, 3, pairs, 64, backward=True).value == 2.5 * 4 * 2 * 3 * 64 * pairs
    b, lc, hq, hkv, d = 3, 99, 8, 2, 64
    assert formulas.kvcache_decode_bytes(b, lc, 1, hq, hkv, d, 2, d).value == \
        (2 * b * (lc + 1) * hkv * d + 2 * b * hkv * d + 2 * b * hq * d) * 2 + 2 * b * (d // 2) * 4


def test_issue19_rows_are_listed_after_the_headline():
    feat = {(t, c, i) for t, c, i in _planned("attention") if t.startswith("attn-feat")}
    assert {c for _, c, _ in feat} == set(suite_attention.FEATURES)
    assert len(feat) == sum(len(suite_attention.feature_impls(f, d)) for f in suite_attention.FEATURES
                            for d in ("fwd", "bwd"))
    for direction in ("fwd", "bwd"):
        impls = {f: suite_attention.feature_impls(f, direction) for f in suite_attention.FEATURES}
        assert all(i[0] == "gptkernels triton" for i in impls.values())
        assert suite_attention.SDPA_ALIBI in impls["alibi"]  # ALiBi as SDPA's additive mask
        assert "torch sdpa efficient" in impls["dv 128, d 192"]  # dv != d: SDPA natively
        assert not any("sdpa" in i for f in ("softcap 30", "window (256, 256)") for i in impls[f])  # SDPA cannot
        assert all("flexattention (compiled)" in v for f, v in impls.items() if f not in ("causal", "dropout 0.1"))
        assert impls["dropout 0.1"] == impls["causal"]  # ours only: a peer's own mask cannot be checked
        assert suite_attention.FLASH_ATTN_PEER not in impls["dv 128, d 192"]  # FA2 has no dv != d
    paged = _planned("paged")
    assert {c for t, c, _ in paged if t == "paged-blocks"} >= {"1", "1024"}
    assert {(c, i) for t, c, i in paged if t == "paged-features"} == {
        ("softcap 30", "gptkernels triton"), ("alibi", "gptkernels triton"), ("alibi", suite_paged.SDPA_ALIBI)}
    assert {c for t, c, _ in paged if t == "kvcache-decode"} == set(suite_paged.KV_CASES)
    ids = [t.id for t in suite_attention.tables(True)] + [t.id for t in suite_paged.tables(True)]
    assert {"attn-feat-fwd", "attn-feat-bwd", "paged-features", "kvcache-decode"} <= set(ids)
    # none of them is a headline or SMOKE_NEXT row: they never take time from those
    for plan in (run.SMOKE_HEADLINE, run.SMOKE_NEXT):
        rows = {(t, c) for s in plan.values() for (t, c) in s}
        assert not {t for t, _ in rows} & {"attn-feat-fwd", "attn-feat-bwd", "paged-features", "kvcache-decode"}
        assert not {c for t, c in rows if t == "paged-blocks"} & {"1", "1024"}
    # the attention suite measures them last
    rec = _Recorder(None, budget=None)
    order = []
    rec.sess.measure = lambda table, case, impl, **kw: order.append(table) or Row(
        table=table, case=case, impl=impl, status="skipped", message="recorded")
    rec.sess.select = lambda t, c, i: t.startswith("attn-feat") or (t, c, i) in _headline("attention")
    built = []
    mp = pytest.MonkeyPatch()
    try:
        _fake_suites(mp, built)
        mp.setattr(suite_attention, "_measure", lambda sess, table, case, impl, **kw: order.append(table))
        suite_attention.run(rec.sess, True)
    finally:
        mp.undo()
    first_feat = order.index("attn-feat-fwd")
    assert all(t.startswith("attn-feat") for t in order[first_feat:]) and first_feat == len(_headline("attention"))


def test_paged_rest_pass_lists_the_issue19_rows(monkeypatch):
    built = []
    _fake_suites(monkeypatch, built)
    monkeypatch.setattr(suite_paged, "_fp8_sets", lambda case: ([], None))
    monkeypatch.setattr(suite_paged, "_append", lambda sess: None)
    monkeypatch.setattr(timing, "DEVICE", "cpu")  # the ALiBi slopes are made on it
    done = _headline("paged")
    rec = _Recorder(lambda t, c, i: (t, c, i) not in done, budget=30.0)  # 30 s: no Flex compile fits
    suite_paged.run(rec.sess, True)
    flex = {(t, c, i) for t, c, i in _planned("paged") if i.startswith("flexattention")}
    append = {(t, c, i) for t, c, i in _planned("paged") if t == "paged-append"}
    assert set(rec.rows) == _planned("paged") - done - flex - append and {s[:3] for s in rec.skipped} == flex
    assert [b[1] for b in built if b[0] == "kvcache"] == list(suite_paged.KV_CASES)


@pytest.fixture
def cpu_suites(monkeypatch):
    """The suites pointed at CPU tensors (their kernels in the interpreter), float32."""
    monkeypatch.setattr(timing, "DEVICE", "cpu")
    monkeypatch.setattr(suite_paged, "DTYPE", torch.float32)


def _sdpa_math(monkeypatch):
    """SDPA's fused backends are GPU-only: the CPU test forces its math backend under the same call."""
    from torch.nn.attention import SDPBackend

    from benchmarks import peers

    monkeypatch.setattr(peers, "sdpa_backend", lambda name: SDPBackend.MATH)


@pytest.mark.parametrize("feature", suite_attention.FEATURES)
def test_attention_feature_rows_check_in_the_interpreter(feature, cpu_suites, monkeypatch):
    """Each attn-feat case built small on CPU (float32): our Triton row (forward; backward for the
    modifiers), FlexAttention (eager, forward: no Flex backward on CPU) and SDPA where listed pass the
    case's float64 check; the same call without the feature does not (the check can fail)."""
    from torch.nn.attention.flex_attention import flex_attention

    import gptkernels

    _sdpa_math(monkeypatch)
    monkeypatch.setattr(suite_attention, "TWO_SIDED", (5, 3))  # a band narrower than S = 40
    small = dict(b=1, s=40, h=2, d=32, dtype=torch.float32)
    for direction in ("fwd", "bwd") if feature != "causal" else ("fwd",):
        case = suite_attention.FeatureCase(feature, direction, **small)
        s0 = case.sets[0]
        for impl in suite_attention.feature_impls(feature, direction):
            if impl == suite_attention.FLASH_ATTN_PEER or (impl.startswith("flex") and direction == "bwd") or \
                    impl == "torch sdpa flash":  # flash SDPA: GPU only
                continue
            fn = suite_attention._feature_fn(case, impl, flex=flex_attention)
            if direction == "fwd":
                with torch.no_grad():
                    chk = case.check((fn(s0.q, s0.k, s0.v),))
            else:
                fn(s0.q, s0.k, s0.v).backward(s0.dout)
                chk = case.check((s0.q.grad, s0.k.grad, s0.v.grad))
                s0.q.grad = s0.k.grad = s0.v.grad = None
            assert chk.ok, (impl, direction, chk.problem)
        if feature != "causal" and direction == "fwd":
            plain = {k: v for k, v in case.opts.items() if k not in ("softcap", "alibi_slopes", "dropout_p")}
            if isinstance(case.window, tuple):
                plain = {"causal": True, "window": None}
            if not feature.startswith("dv"):
                with torch.no_grad():
                    wrong = gptkernels.flash_attn(s0.q, s0.k, s0.v, backend="triton", **plain)
                assert not case.check((wrong,)).ok
    assert case.params["feature"] == feature and case.flops > 0


def test_dv_row_is_skipped_with_the_reason_when_flash_attn_refuses(monkeypatch):
    import gptkernels

    assert suite_attention.dv_refusal() is None or "refuses dv != d" in suite_attention.dv_refusal()

    def refuse(*a, **k):
        raise ValueError("flash_attn: v must have q's head dim 192")

    monkeypatch.setattr(gptkernels, "flash_attn", refuse)
    why = suite_attention.dv_refusal()
    assert why.startswith("flash_attn refuses dv != d here: ValueError: flash_attn: v must have")
    monkeypatch.setattr(suite_attention, "FeatureCase", lambda *a, **k: pytest.fail("no dv case is built"))
    feature = suite_attention.FEATURES[-1]
    rec = _Recorder(lambda t, c, i: c == feature)
    for t in suite_attention.tables(True):
        rec.sess.table(t)
    suite_attention._features(rec.sess)
    assert not rec.rows and {(t, c) for t, c, _, _ in rec.skipped} == {("attn-feat-fwd", feature),
                                                                        ("attn-feat-bwd", feature)}
    assert all(w == why for *_, w in rec.skipped)


def test_paged_feature_and_kvcache_rows_check_in_the_interpreter(cpu_suites, monkeypatch):
    """paged-features (ours and SDPA's additive ALiBi mask over the gathered cache) and kvcache-decode
    (the fused call, called twice: the step is repeatable) built small on CPU, checked against
    float64; a call without the feature fails the check."""
    import gptkernels

    _sdpa_math(monkeypatch)
    case = suite_paged.DecodeCase(3, 50, 16)
    s0 = case.sets[0]
    for feature in suite_paged.FEATURE_CASES:
        opts = suite_paged.feature_options(feature)
        check = suite_paged._feature_check(case, opts)
        out = gptkernels.paged_decode(s0.q, s0.k, s0.v, s0.table, s0.lens, backend="triton", **opts)
        assert check(out, s0).ok
        assert not check(gptkernels.paged_decode(s0.q, s0.k, s0.v, s0.table, s0.lens, backend="triton"), s0).ok
        if feature == "alibi":
            run_sdpa, setup = suite_paged._sdpa_alibi_fn(case, opts["alibi_slopes"])
            setup(case.sets)
            assert check(run_sdpa(s0), s0).ok
            case.drop_dense()
    for feature in suite_paged.KV_CASES:
        kv = suite_paged.KVCacheCase(feature, batch=3, ctx=40, block=16, hq=4, hkv=2, d=32, dtype=torch.float32)
        fn = suite_paged._kvcache_fn(kv, "gptkernels triton")
        assert kv.check(fn(kv.sets[0]), None).ok and kv.check(fn(kv.sets[0]), None).ok
        if feature != "plain":
            k0 = kv.sets[0]
            plain = gptkernels.flash_attn_with_kvcache(k0.q, k0.kc, k0.vc, k0.k, k0.v, kv.cos, kv.sin,
                                                       cache_seqlens=k0.lens, block_table=k0.table, backend="triton")
            assert not kv.check(plain, None).ok
    if not ON_GPU:
        with pytest.raises(gptkernels.BackendUnavailableError, match="flash-attn package is not installed"):
            suite_paged._kvcache_fn(kv, "flash-attn flash_attn_with_kvcache")


def test_parity_sweep_issue19_cases():
    """The CPU parity sweep's softcap / ALiBi / two-sided window / page size 1 and 1024 cases pass."""
    def issue19(c):
        return any(w in c.shape for w in ("softcap", "alibi", "non-causal", "block=1 ", "block=1024"))

    assert sum(issue19(c) for c in parity.cases()) == 7
    rows = parity.run(["flash_attn", "flash_attn_bwd", "paged_decode"], dtype_list=[torch.float32],
                      case_filter=issue19)
    triton_rows = [r for r in rows if r.impl == "gptkernels triton"]
    assert len(triton_rows) == 7 and all(r.status == "pass" for r in triton_rows), \
        [(r.case, r.message) for r in triton_rows if r.status != "pass"]
