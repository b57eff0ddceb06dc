"""Quantization (issue 16): weight-only int8/int4 models, judged on real weights and timed on a GPU.

* **quant-ppl** (CPU and GPU): perplexity of the shipped tiny trained checkpoint
  (``checkpoints/tiny-stdlib``, tools/train_tiny.py) on its held-out Python-stdlib text, float vs
  int8 vs int4 (group 128): what quantization costs in quality. On CPU (``make bench`` without a GPU)
  in float32 on the ``"torch"`` backend (the eager reference: the interpreter would take minutes);
  on a GPU in float16 with the Triton kernels.
* **quant-gemm** (GPU): the weight-only GEMM ``y = x @ dequant(W)^T`` at N = K = 8192, bf16
  activations, M = 1, 16, 64 rows, in GB/s of its own bytes (weights + scales + x + y) and % of the
  copy ceiling (issue target: >= 80 % at M <= 16), beside torch's ``_weight_int8pack_mm`` /
  ``_weight_int4pack_mm`` (tinygemm) on the same quantized weights and cuBLAS bf16 on the float ones.
* **quant-decode** (GPU): the batch-1 decode step of pythia-1.4b-shaped random-weight models, bf16 vs
  int8 vs int4 (targets: int8 >= 1.6x, int4 >= 2.3x bf16's tokens/s).

Every figure is checked first (SPEC's parity rule against float64 over the dequantized weights for the
GEMMs; the model's logits against its own float32 copy on the eager backends for the decode step).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from . import timing
from .checks import compare
from .env import REPO
from .harness import Session, _short, classify, free_memory
from .results import Row, Table

CKPT = REPO / "checkpoints" / "tiny-stdlib"
#: Perplexity: non-overlapping windows of the held-out text (the model's 256 positions), 16 at a time.
PPL_WINDOW, PPL_WINDOWS, PPL_BATCH = 256, 48, 16
FORMATS = (None, "int8", "int4")
GROUP_SIZE = 128


def fmt_label(fmt: str | None) -> str:
    return {None: "float", "int8": "int8", "int4": f"int4 (group {GROUP_SIZE})"}[fmt]


# --------------------------------------------------------------------------------------------------
# Perplexity of the tiny checkpoint
# --------------------------------------------------------------------------------------------------


def heldout_ids(path: Path | None = None, windows: int | None = None, window: int = PPL_WINDOW) -> torch.Tensor:
    """(windows, window) token ids of the checkpoint's held-out text (its own tokenizer); defaults:
    CKPT and PPL_WINDOWS (read at call time)."""
    path = CKPT if path is None else path
    windows = PPL_WINDOWS if windows is None else windows
    from gptkernels.models.loading import find_tokenizer

    tok = find_tokenizer(str(path))
    if tok is None:
        raise FileNotFoundError(f"no tokenizer in {path}")
    ids = tok.encode((path / "heldout.txt").read_text(encoding="utf-8"))
    n = min(windows, len(ids) // window)
    return torch.tensor(ids[: n * window], dtype=torch.int64).view(n, window)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, *, backend=None, batch: int = PPL_BATCH) -> tuple[float, int]:
    """exp(mean next-token cross entropy) over ``windows`` (W, S): (perplexity, tokens scored)."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i:i + batch].to(model.device)
        logits = model(ids, backend=backend)[:, :-1].float()
        target = ids[:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum"))
        count += target.numel()
    return float(torch.exp(torch.tensor(total / count))), count


def _linear_bytes(model) -> int:
    """Bytes of the blocks' linear layers (what quantization shrinks)."""
    from gptkernels.models.quantize import QUANTIZED_LINEARS

    total = 0
    for block in model.layers:
        for path in QUANTIZED_LINEARS:
            mod = block.get_submodule(path)
            total += sum(t.numel() * t.element_size() for t in list(mod.parameters()) + list(mod.buffers())
                         if t is not getattr(mod, "bias", None))
    return total


def ppl_table(note: str = "") -> Table:
    return Table(id="quant-ppl", suite="quant", x="setting", unit="perplexity", plot=None,
                 title="Perplexity of the tiny trained checkpoint (checkpoints/tiny-stdlib) on held-out "
                       "Python-stdlib text: float vs weight-only int8 / int4",
                 formula="exp(mean next-token cross entropy) over non-overlapping 256-token windows",
                 note=note or "The blocks' linear layers (QKV, output, MLP) are quantized while loading "
                              "(from_pretrained(quantize=...)); embeddings and the tied LM head stay float. "
                              "The two 'cache, decode' rows score the last 64 tokens of 8 windows through "
                              "decode steps over a float vs an fp8 (e4m3) paged KV cache whose scales are "
                              "calibrated on the first 192 (benchmarks/suite_paged.py).")


def ppl_rows(device: str, dtype: torch.dtype, backend: str | None, windows: torch.Tensor) -> list[Row]:
    """One row per format: the checkpoint loaded with ``from_pretrained(quantize=fmt)``."""
    from gptkernels.models import from_pretrained
    from gptkernels.models.quantize import QuantLinear

    dname = str(dtype).replace("torch.", "")
    case = f"{device} {dname}, {backend or 'default'} backend"
    rows, base = [], None
    for fmt in FORMATS:
        impl = fmt_label(fmt)
        params = {"device": device, "dtype": dname, "backend": backend, "format": fmt or "float",
                  "group_size": GROUP_SIZE if fmt == "int4" else None, "windows": int(windows.shape[0]),
                  "window": int(windows.shape[1])}
        try:
            model = from_pretrained(CKPT, dtype=dtype, device=device, quantize=fmt, group_size=GROUP_SIZE)
            if fmt is not None and backend is not None:
                for m in model.modules():
                    if isinstance(m, QuantLinear):
                        m.backend = backend  # the GEMM on the same backend as the attention
            t0 = time.perf_counter()
            ppl, tokens = perplexity(model, windows, backend=backend)
            ms = 1e3 * (time.perf_counter() - t0)
            base = ppl if fmt is None else base
            extra = {"tokens": tokens, "linear_bytes": _linear_bytes(model)}
            if base is not None and fmt is not None:
                extra["vs_float"] = ppl / base
            rows.append(Row(table="quant-ppl", case=case, impl=impl, status="ok", ours=True, ms=ms, value=ppl,
                            params=params, extra=extra))
            del model
        except Exception as e:
            rows.append(Row(table="quant-ppl", case=case, impl=impl, status=classify(e), ours=True,
                            message=_short(e), params=params))
        free_memory()
    return rows


#: The GEMMs' rows of the parity sweep (op, M, N, K, group size or None).
PARITY_CASES = (("int8_linear", 1, 97, 130, None), ("int8_linear", 37, 70, 97, None),
                ("int4_linear", 1, 97, 256, 128), ("int4_linear", 37, 70, 128, 32))


def parity_rows(device: str = "cpu", backend: str = "triton") -> list[Row]:
    """The weight-only GEMMs against float64 over the dequantized weights (SPEC's parity rule), as
    rows of the parity sweep's table (``benchmarks.parity.TABLE``), float16 and float32, bias on."""
    import gptkernels
    from gptkernels import reference

    rows = []
    for i, (op, m, n, k, gs) in enumerate(PARITY_CASES):
        for dtype in (torch.float16, torch.float32):
            g = torch.Generator().manual_seed(100 + i)
            w = torch.randn(n, k, generator=g).to(device, dtype) * 0.5
            x = torch.randn(m, k, generator=g).to(device, dtype)
            bias = torch.randn(n, generator=g).to(device, dtype)
            shape = f"M={m} N={n} K={k}" + (f" group={gs}" if gs else "") + " bias"
            params = {"op": op, "shape": shape, "dtype": str(dtype)[6:], "device": device}
            try:
                if op == "int8_linear":
                    q = gptkernels.quantize_int8(w)
                    out = gptkernels.int8_linear(x, *q, bias, backend=backend)
                    ref = reference.int8_linear(x.double(), *q, bias.double())
                    base = reference.int8_linear(x, *q, bias, upcast=False)
                else:
                    q = gptkernels.quantize_int4(w, group_size=gs)
                    out = gptkernels.int4_linear(x, *q, bias, group_size=gs, backend=backend)
                    ref = reference.int4_linear(x.double(), *q, bias.double(), group_size=gs)
                    base = reference.int4_linear(x, *q, bias, group_size=gs, upcast=False)
                chk = compare([("y", out, ref, base)])
                rows.append(Row(table="parity", case=f"{op} {shape}", impl=f"gptkernels {backend}",
                                status="pass" if chk.ok else "fail", message=chk.problem or "", err=chk.err,
                                bound=chk.bound, params=params))
            except Exception as e:
                rows.append(Row(table="parity", case=f"{op} {shape}", impl=f"gptkernels {backend}",
                                status=classify(e), message=_short(e), params=params))
    return rows


def cpu_tables_and_rows(device: str = "cpu") -> tuple[list[Table], list[Row]]:
    """The parity-sweep part (``make bench`` without a GPU, or ``--parity``): the GEMMs' parity rows
    on ``device`` (the interpreter on CPU) and the checkpoint's perplexity in float32 on the CPU's
    eager backend."""
    from .suite_paged import cache_ppl_rows  # fp8 KV cache rows (helper H11's, issue 16)

    windows = heldout_ids()
    rows = (parity_rows(device) + ppl_rows("cpu", torch.float32, "torch", windows)
            + cache_ppl_rows(CKPT, "cpu", torch.float32, "torch", windows, "cpu float32, torch backend"))
    return [ppl_table()], rows


# --------------------------------------------------------------------------------------------------
# GPU: the weight-only GEMM
# --------------------------------------------------------------------------------------------------

GEMM_N = GEMM_K = 8192
GEMM_M = (1, 16, 64)
GEMM_IMPLS = ("gptkernels triton int8", "gptkernels triton int4 (group 128)", "torch _weight_int8pack_mm",
              "torch _weight_int4pack_mm (tinygemm)", "torch bf16 matmul (cuBLAS)")
DECODE_MODEL = "pythia-1.4b"
DECODE_PROMPT, DECODE_NEW = 128, {True: 64, False: 256}
DECODE_CASE = f"{DECODE_MODEL} B=1"
PPL_GPU_CASE = "cuda float16, default backend"


def planned_rows(quick: bool) -> int:
    return len(GEMM_M) * len(GEMM_IMPLS) + len(FORMATS) + len(FORMATS) + 2  # + 2: float / fp8 cache rows


def tables(quick: bool) -> list[Table]:
    return [
        Table(id="quant-gemm", suite="quant", x="M", unit="GB/s", ceiling="copy", plot="line",
              title=f"Weight-only GEMM y = x @ dequant(W)^T, bf16 x, N = K = {GEMM_N}",
              formula="(weight bytes incl. scales/zeros + M*K*2 + M*N*2) / time",
              note="Each implementation is credited with its own bytes (int4 reads a quarter of bf16's "
                   "weight bytes); target: >= 80% of the copy ceiling at M <= 16."),
        Table(id="quant-decode", suite="quant", x="model, format", unit="tok/s", plot="bar",
              title=f"Batch-1 decode step, {DECODE_MODEL} random weights, bf16 activations, prompt "
                    f"{DECODE_PROMPT}", formula="1 / decode step time (generate's decode phase / steps)",
              note="Targets (issue 16): int8 >= 1.6x and int4 >= 2.3x the bf16 model's tokens/s."),
        ppl_table(),
    ]


def _int4pack_peer(q4, s4, z4, group_size):
    """Our int4 weights in torch's tinygemm layout: codes packed high nibble first, then
    ``_convert_weight_to_int4pack``; its dequantization is (q - 8) * scale + zero, so its zero is
    (8 - our zero) * scale."""
    from gptkernels.reference import unpack_int4

    codes = unpack_int4(q4).to(torch.int32)
    packed = (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    w = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
    sz = torch.stack([s4, (8 - z4.float()).to(s4.dtype) * s4], dim=-1).transpose(0, 1).contiguous()
    return lambda x: torch.ops.aten._weight_int4pack_mm(x, w, group_size, sz)


def _gemm_case(impl: str, m: int, w: torch.Tensor):
    """(run(set), sets, bytes, check(out, set)) for one implementation at M = m."""
    import gptkernels
    from gptkernels import reference

    dev, dtype = timing.DEVICE, torch.bfloat16
    n, k = w.shape
    io = m * k * 2 + m * n * 2
    if "int8" in impl:
        q, s = gptkernels.quantize_int8(w)
        wbytes = q.numel() + s.numel() * s.element_size()
        make = lambda: (q.clone(), s.clone())  # noqa: E731
        ref_fn = lambda x, t: reference.int8_linear(x.double(), *t)  # noqa: E731
        base_fn = lambda x, t: reference.int8_linear(x, *t, upcast=False)  # noqa: E731
        run = ((lambda st: gptkernels.int8_linear(st.x, *st.t)) if impl.startswith("gptkernels")
               else (lambda st: torch._weight_int8pack_mm(st.x, *st.t)))
    elif "int4" in impl:
        q, s, z = gptkernels.quantize_int4(w, group_size=GROUP_SIZE)
        wbytes = q.numel() + 2 * s.numel() * s.element_size()
        make = lambda: (q.clone(), s.clone(), z.clone())  # noqa: E731
        ref_fn = lambda x, t: reference.int4_linear(x.double(), *t, group_size=GROUP_SIZE)  # noqa: E731
        base_fn = lambda x, t: reference.int4_linear(x, *t, group_size=GROUP_SIZE, upcast=False)  # noqa: E731
        if impl.startswith("gptkernels"):
            run = lambda st: gptkernels.int4_linear(st.x, *st.t, group_size=GROUP_SIZE)  # noqa: E731
        else:
            run = lambda st: st.peer(st.x)  # noqa: E731
    else:
        wbytes = w.numel() * 2
        make = lambda: (w.clone(),)  # noqa: E731
        ref_fn = lambda x, t: x.double() @ t[0].double().t()  # noqa: E731
        base_fn = lambda x, t: x @ t[0].t()  # noqa: E731
        run = lambda st: torch.matmul(st.x, st.t[0].t())  # noqa: E731
    sets = []
    for _ in range(timing.n_sets(wbytes)):
        st = SimpleNamespace(x=torch.randn(m, k, device=dev, dtype=dtype), t=make())
        if "tinygemm" in impl:
            st.peer = _int4pack_peer(*st.t, GROUP_SIZE)
        sets.append(st)

    def check(out, st):
        return compare([("y", out, ref_fn(st.x, st.t), base_fn(st.x, st.t))])

    return run, sets, wbytes + io, check


def _run_gemm(sess: Session) -> None:
    if not any(sess.wanted("quant-gemm", str(m), i) for m in GEMM_M for i in GEMM_IMPLS):
        return
    g = torch.Generator(device=timing.DEVICE).manual_seed(0)
    w = torch.randn(GEMM_N, GEMM_K, device=timing.DEVICE, dtype=torch.bfloat16, generator=g) * 0.02
    for m in GEMM_M:
        for impl in GEMM_IMPLS:
            if not sess.wanted("quant-gemm", str(m), impl):
                continue
            ours = impl.startswith("gptkernels")
            params = {"M": m, "N": GEMM_N, "K": GEMM_K, "dtype": "bfloat16",
                      "group_size": GROUP_SIZE if "int4" in impl else None}
            try:
                run, sets, nbytes, check = _gemm_case(impl, m, w)
            except Exception as e:
                sess.fail("quant-gemm", str(m), impl, e, x=m, ours=ours, params=params)
                continue
            with torch.no_grad():
                sess.measure("quant-gemm", str(m), impl, run=run, sets=sets, check=check, ours=ours, x=m,
                             params=params, bytes=nbytes)
            del sets
            free_memory()
    del w


# --------------------------------------------------------------------------------------------------
# GPU: the decode step of a quantized model
# --------------------------------------------------------------------------------------------------


def decode_impl(fmt: str | None) -> str:
    return f"gptkernels triton {fmt_label(fmt) if fmt else 'bf16'}"


def _decode_rows(sess: Session, quick: bool) -> None:
    import gptkernels
    from gptkernels.models import PRESETS, from_config
    from gptkernels.models.quantize import QuantLinear

    preset = PRESETS[DECODE_MODEL]
    n_new = DECODE_NEW[quick]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, preset["vocab_size"], (1, DECODE_PROMPT), generator=g).to(timing.DEVICE)
    base_step = None
    for fmt in FORMATS:
        impl = decode_impl(fmt)
        case = DECODE_CASE
        if not sess.wanted("quant-decode", case, impl):
            continue
        params = {"model": DECODE_MODEL, "B": 1, "prompt": DECODE_PROMPT, "new": n_new, "format": fmt or "bfloat16"}
        if sess.budget.exhausted():
            sess.skip("quant-decode", case, impl, "time budget of the suite spent", ours=True)
            continue
        try:
            torch.manual_seed(0)
            model = from_config(preset, dtype=torch.bfloat16, device=timing.DEVICE, quantize=fmt,
                                group_size=GROUP_SIZE)
            with torch.no_grad():
                # check: the logits against the same model in float32 on the eager backends (the
                # dequantized weights' exact product), the bf16 eager run as the yardstick
                out = model(prompt)
                eager = copy.deepcopy(model)
                for m in eager.modules():
                    if isinstance(m, QuantLinear):
                        m.backend = "torch"
                base = eager(prompt, backend="torch")
                ref = eager.float()(prompt, backend="torch")
                chk = compare([("logits", out, ref, base)])
                del eager, out, base, ref
                free_memory()
            if not chk.ok:
                sess.add(Row(table="quant-decode", case=case, impl=impl, status="mismatch", ours=True,
                             message=chk.problem, err=chk.err, bound=chk.bound, params=params))
                continue
            gptkernels.generate(model, prompt, 8)  # warm-up: compile, autotune
            stats: dict = {}
            gptkernels.generate(model, prompt, n_new, stats=stats)
            step_ms = 1e3 * stats["decode_s"] / stats["decode_steps"]
            base_step = step_ms if fmt is None else base_step
            extra = {"step_ms": step_ms, "capture_ms": 1e3 * stats["capture_s"],
                     "linear_bytes": _linear_bytes(model)}
            if base_step is not None and fmt is not None:
                extra["speedup_vs_bf16"] = base_step / step_ms
            sess.add(Row(table="quant-decode", case=case, impl=impl, status="ok", ours=True, ms=step_ms,
                         value=1e3 / step_ms, params=params, extra=extra, err=chk.err, bound=chk.bound))
            del model
        except Exception as e:
            sess.fail("quant-decode", case, impl, e, ours=True, params=params)
        free_memory()


def run(sess: Session, quick: bool) -> None:
    for t in tables(quick):
        sess.table(t)
    _run_gemm(sess)
    _decode_rows(sess, quick)
    if not any(sess.wanted("quant-ppl", PPL_GPU_CASE, fmt_label(f)) for f in FORMATS):
        return
    if sess.budget.exhausted():
        for fmt in FORMATS:
            sess.skip("quant-ppl", PPL_GPU_CASE, fmt_label(fmt), "time budget of the suite spent", ours=True)
        return
    try:
        windows = heldout_ids()
    except Exception as e:
        for fmt in FORMATS:
            sess.fail("quant-ppl", PPL_GPU_CASE, fmt_label(fmt), e, ours=True)
        return
    for row in ppl_rows("cuda", torch.float16, None, windows):
        sess.add(row)
    from .suite_paged import cache_ppl_rows  # fp8 KV cache rows (helper H11's, issue 16)

    for row in cache_ppl_rows(CKPT, "cuda", torch.float16, None, windows, PPL_GPU_CASE):
        sess.add(row)
