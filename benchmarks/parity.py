"""The parity sweep: every kernel against the float64 reference over a small grid of shapes.

This is what ``make bench`` runs without a GPU: Triton kernels in the CPU interpreter
(``TRITON_INTERPRET=1``, set before triton is imported), float16 and float32 (the interpreter gets
bfloat16 dots wrong), on odd sizes, GQA, windows, varlen and paged layouts. On a GPU
(``python -m benchmarks.run --parity``) the same sweep runs on CUDA with bfloat16 added. Each row:
op, shape, dtype, max error vs float64, the bound of SPEC's parity rule, pass/fail. The cuda backend
joins where it can run, and says why where it cannot.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .checks import Check, compare, exact
from .harness import classify, _short
from .results import Row, Table

TABLE = Table(id="parity", suite="parity", title="Parity against float64 (SPEC's rule: error <= 2 x eager "
              "error in the same dtype + floor)", x="case", unit="max error", formula="max |out - ref64|")
OPS = ("flash_attn", "flash_attn_bwd", "sdpa", "apply_rotary", "paged_append", "paged_decode")
SUITE_OPS = {"attention": ("flash_attn", "flash_attn_bwd", "sdpa"), "rotary": ("apply_rotary",),
             "paged": ("paged_append", "paged_decode"), "model": ()}


@dataclass
class Case:
    op: str
    shape: str
    fn: Callable  # fn(dtype, backend, device, gen) -> Check


def _randn(gen, *shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


# ---- attention ------------------------------------------------------------------------------------


def _mods(hq, device, softcap=None, alibi=False) -> dict:
    """Issue 19's score modifiers as the ops take them (ALiBi: the benchmark's geometric slopes)."""
    from .suite_attention import alibi_slopes

    return {**({"softcap": softcap} if softcap else {}), **({"alibi_slopes": alibi_slopes(hq, device)} if alibi else {})}


def _attn_fwd(b, sq, sk, hq, hkv, d, causal=True, window=None, varlen=None, **mods):
    def fn(dtype, backend, device, gen):
        import gptkernels
        from gptkernels import reference

        kw = dict(causal=causal, window=window, **_mods(hq, device, **mods))
        if varlen is None:
            q = _randn(gen, b, sq, hq, d, dtype=dtype, device=device)
            k, v = (_randn(gen, b, sk, hkv, d, dtype=dtype, device=device) for _ in range(2))
        else:
            total = varlen[-1]
            q = _randn(gen, total, hq, d, dtype=dtype, device=device)
            k, v = (_randn(gen, total, hkv, d, dtype=dtype, device=device) for _ in range(2))
            cu = torch.tensor(varlen, dtype=torch.int32, device=device)
            kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu)
        out, lse = gptkernels.flash_attn(q, k, v, return_lse=True, backend=backend, **kw)
        ref, ref_lse = reference.attention(q.double(), k.double(), v.double(), return_lse=True, **kw)
        base, base_lse = reference.attention(q, k, v, upcast=False, return_lse=True, **kw)
        return compare([("out", out, ref, base), ("lse", lse, ref_lse, base_lse)])

    return fn


def _attn_bwd(b, s, hq, hkv, d, window=None, deterministic=True, causal=True, **mods):
    def fn(dtype, backend, device, gen):
        import gptkernels
        from gptkernels import reference

        kw = dict(causal=causal, window=window, **_mods(hq, device, **mods))

        inputs = [_randn(gen, b, s, h, d, dtype=dtype, device=device) for h in (hq, hkv, hkv)]
        dout = _randn(gen, b, s, hq, d, dtype=dtype, device=device)

        def grads(f, cast):
            q, k, v = (cast(t).detach().requires_grad_(True) for t in inputs)
            f(q, k, v).backward(cast(dout))
            return q.grad, k.grad, v.grad

        got = grads(lambda q, k, v: gptkernels.flash_attn(q, k, v, backend=backend, deterministic=deterministic,
                                                          **kw), lambda t: t)
        ref = grads(lambda q, k, v: reference.attention(q, k, v, **kw), lambda t: t.double())
        base = grads(lambda q, k, v: reference.attention(q, k, v, upcast=False, **kw), lambda t: t)
        return compare([(n, g, r, bb) for n, g, r, bb in zip(("dq", "dk", "dv"), got, ref, base)])

    return fn


def _sdpa(b, hq, hkv, lq, lk, e, is_causal, window=None):
    def fn(dtype, backend, device, gen):
        import gptkernels
        from gptkernels import reference

        q = _randn(gen, b, hq, lq, e, dtype=dtype, device=device)
        k, v = (_randn(gen, b, hkv, lk, e, dtype=dtype, device=device) for _ in range(2))
        out = gptkernels.sdpa(q, k, v, is_causal=is_causal, enable_gqa=hq != hkv, window=window, backend=backend)

        def eager(t, upcast):  # the reference in SDPA's layout, top-left aligned like torch
            q_, k_, v_ = (x.transpose(1, 2) for x in t)
            return reference.attention(q_, k_, v_, causal=is_causal, window=window, bottom_right=False,
                                       upcast=upcast).transpose(1, 2)

        ref = eager([x.double() for x in (q, k, v)], True)
        base = eager((q, k, v), False)
        return compare([("out", out, ref, base)])

    return fn


# ---- rotary ----------------------------------------------------------------------------------------


def _rotary(lead, hq, hk, d, r, interleaved, offset=0):
    def fn(dtype, backend, device, gen):
        import gptkernels
        from gptkernels import reference

        seq = lead[-1]
        cos, sin = gptkernels.rotary_cos_sin(r, seq + offset + 1, device=device)
        q = _randn(gen, *lead, hq, d, dtype=dtype, device=device)
        k = _randn(gen, *lead, hk, d, dtype=dtype, device=device)
        kw = dict(offset=offset, interleaved=interleaved)
        qo, ko = gptkernels.apply_rotary(q, k, cos, sin, backend=backend, **kw)
        rq, rk = reference.apply_rotary(q.double(), k.double(), cos.double(), sin.double(), **kw)
        bq, bk = reference.apply_rotary(q, k, cos, sin, upcast=False, **kw)
        return compare([("q_out", qo, rq, bq), ("k_out", ko, rk, bk)])

    return fn


# ---- paged -----------------------------------------------------------------------------------------


def _paged_cache(gen, lens, block, hkv, d, dtype, device):
    """Caches with every sequence's blocks shuffled, and the block table that finds them."""
    nblk = [max(1, -(-n // block)) for n in lens]
    width = max(nblk)
    num_blocks = sum(nblk) + 3  # a few blocks nobody uses
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    it = iter(perm)
    for i, n in enumerate(nblk):
        for j in range(n):
            table[i, j] = next(it)
    k = _randn(gen, num_blocks, block, hkv, d, dtype=dtype, device=device)
    v = _randn(gen, num_blocks, block, hkv, d, dtype=dtype, device=device)
    return k, v, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def _paged_decode(lens, block, hq, hkv, d, window=None, **mods):
    def fn(dtype, backend, device, gen):
        import gptkernels
        from gptkernels import reference

        kw = dict(window=window, **_mods(hq, device, **mods))
        k, v, table, seq_lens = _paged_cache(gen, lens, block, hkv, d, dtype, device)
        q = _randn(gen, len(lens), hq, d, dtype=dtype, device=device)
        out, lse = gptkernels.paged_decode(q, k, v, table, seq_lens, return_lse=True, backend=backend, **kw)
        ref, ref_lse = reference.paged_decode(q.double(), k.double(), v.double(), table, seq_lens, return_lse=True,
                                              **kw)
        base, base_lse = reference.paged_decode(q, k, v, table, seq_lens, upcast=False, return_lse=True, **kw)
        return compare([("out", out, ref, base), ("lse", lse, ref_lse, base_lse)])

    return fn


def _paged_append(t, block, hkv, d):
    def fn(dtype, backend, device, gen):
        import gptkernels
        from gptkernels import reference

        num_blocks = -(-t // block) + 2
        slots = torch.randperm(num_blocks * block, generator=gen)[:t]
        slots[torch.rand(t, generator=gen) < 0.2] = -1  # padding tokens are skipped
        slots = slots.to(device)
        k, v = (_randn(gen, t, hkv, d, dtype=dtype, device=device) for _ in range(2))
        kc, vc = (_randn(gen, num_blocks, block, hkv, d, dtype=dtype, device=device) for _ in range(2))
        rk, rv = kc.clone(), vc.clone()
        gptkernels.paged_append(k, v, kc, vc, slots, backend=backend)
        reference.paged_append(k, v, rk, rv, slots)
        a, b = exact("k_cache", kc, rk), exact("v_cache", vc, rv)
        return a if not a.ok else b

    return fn


def cases() -> list[Case]:
    return [
        Case("flash_attn", "B=2 S=97 Hq=4 Hkv=2 D=64 causal", _attn_fwd(2, 97, 97, 4, 2, 64)),
        Case("flash_attn", "B=1 Sq=17 Sk=130 Hq=2 Hkv=1 D=80 W=7", _attn_fwd(1, 17, 130, 2, 1, 80, window=7)),
        Case("flash_attn", "B=1 S=33 H=2 D=128 full", _attn_fwd(1, 33, 33, 2, 2, 128, causal=False)),
        Case("flash_attn", "B=3 Sq=1 Sk=130 Hq=8 Hkv=1 D=256 causal", _attn_fwd(3, 1, 130, 8, 1, 256)),
        Case("flash_attn", "varlen 1,17,49 Hq=4 Hkv=2 D=64 causal", _attn_fwd(0, 0, 0, 4, 2, 64,
                                                                            varlen=[0, 1, 18, 67])),
        Case("flash_attn_bwd", "B=1 S=65 Hq=4 Hkv=2 D=64 causal", _attn_bwd(1, 65, 4, 2, 64)),
        Case("flash_attn_bwd", "B=2 S=40 H=2 D=96 W=16", _attn_bwd(2, 40, 2, 2, 96, window=16)),
        Case("flash_attn_bwd", "B=1 S=97 Hq=4 Hkv=1 D=64 W=40 atomic dQ",
             _attn_bwd(1, 97, 4, 1, 64, window=40, deterministic=False)),
        Case("sdpa", "B=1 H=2 L=17 S=40 E=64 causal", _sdpa(1, 2, 2, 17, 40, 64, True)),
        Case("sdpa", "B=2 Hq=4 Hkv=2 L=S=33 E=80 full", _sdpa(2, 4, 2, 33, 33, 80, False)),
        Case("apply_rotary", "B=2 S=37 Hq=4 Hk=2 D=R=80 neox", _rotary((2, 37), 4, 2, 80, 80, False)),
        Case("apply_rotary", "T=53 Hq=3 Hk=1 D=64 R=32 gptj off=5", _rotary((53,), 3, 1, 64, 32, True, offset=5)),
        Case("paged_append", "T=37 block=16 Hkv=2 D=64 (-1 slots)", _paged_append(37, 16, 2, 64)),
        Case("paged_decode", "lens 1,100,333 block=16 Hq=8 Hkv=2 D=64", _paged_decode([1, 100, 333], 16, 8, 2, 64)),
        Case("paged_decode", "lens 257,40 block=8 H=4 D=80 W=64", _paged_decode([257, 40], 8, 4, 4, 80, window=64)),
        Case("paged_decode", "lens 300,513 block=256 Hq=4 Hkv=1 D=128", _paged_decode([300, 513], 256, 4, 1, 128)),
        # issue 19's paths (the benchmark's attn-feat / paged-features / blocks rows), small
        Case("flash_attn", "B=1 S=65 Hq=4 Hkv=2 D=64 softcap 30", _attn_fwd(1, 65, 65, 4, 2, 64, softcap=30.0)),
        Case("flash_attn", "B=1 S=65 Hq=4 Hkv=2 D=64 alibi", _attn_fwd(1, 65, 65, 4, 2, 64, alibi=True)),
        Case("flash_attn", "B=1 S=70 H=2 D=64 window (9, 5) non-causal",
             _attn_fwd(1, 70, 70, 2, 2, 64, causal=False, window=(9, 5))),
        Case("flash_attn_bwd", "B=1 S=48 Hq=4 Hkv=2 D=64 softcap 30 + alibi",
             _attn_bwd(1, 48, 4, 2, 64, softcap=30.0, alibi=True)),
        Case("flash_attn_bwd", "B=1 S=50 H=2 D=64 window (7, 4) non-causal",
             _attn_bwd(1, 50, 2, 2, 64, causal=False, window=(7, 4))),
        Case("paged_decode", "lens 1,77 block=1 Hq=4 Hkv=2 D=64 softcap 30",
             _paged_decode([1, 77], 1, 4, 2, 64, softcap=30.0)),
        Case("paged_decode", "lens 300,1500 block=1024 Hq=4 Hkv=1 D=64 alibi",
             _paged_decode([300, 1500], 1024, 4, 1, 64, alibi=True)),
    ]


def dtypes(device: str) -> list[torch.dtype]:
    # the interpreter computes tl.dot on bfloat16 wrongly (triton-lang/triton#11584): GPU only
    if device == "cuda":
        return [torch.float16, torch.bfloat16, torch.float32]
    return [torch.float16, torch.float32]


def run(ops=OPS, *, device: str | None = None, dtype_list=None, case_filter=None, progress=None,
        seed: int | None = None) -> list[Row]:
    """The sweep's rows; ``case_filter(case) -> bool`` narrows it (the CPU test runs one tiny case)."""
    from gptkernels._backend import unavailable_reason

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_list = dtype_list or dtypes(device)
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    chosen = [c for c in cases() if c.op in ops and (case_filter is None or case_filter(c))]
    rows = []
    for backend in ("triton", "cuda"):
        why = unavailable_reason(backend, device)
        if why is not None:
            for op in dict.fromkeys(c.op for c in chosen):
                rows.append(Row(table="parity", case=f"{op} (every case)", impl=f"gptkernels {backend}",
                                status="unavailable", message=why, params={"device": device}))
            if progress is not None:  # its planned rows are settled: the bar ends full
                progress.update(len(chosen) * len(dtype_list))
            continue
        for i, case in enumerate(chosen):
            for dtype in dtype_list:
                if progress is not None:  # what is running now: a slow case shows its name, not a frozen bar
                    progress.set_postfix_str(f"{backend} {case.op} {case.shape} {str(dtype)[6:]}", refresh=True)
                gen = torch.Generator().manual_seed(seed + 1000 * i + dtype.itemsize)
                params = {"op": case.op, "shape": case.shape, "dtype": str(dtype).replace("torch.", ""),
                          "device": device, "seed": seed}
                t0 = time.perf_counter()
                try:
                    chk: Check = case.fn(dtype, backend, device, gen)
                    row = Row(table="parity", case=f"{case.op} {case.shape}", impl=f"gptkernels {backend}",
                              status="pass" if chk.ok else "fail", message=chk.problem or "", err=chk.err,
                              bound=chk.bound, params=params)
                except Exception as e:
                    status = classify(e)
                    row = Row(table="parity", case=f"{case.op} {case.shape}", impl=f"gptkernels {backend}",
                              status=status, message=_short(e), params=params)
                row.extra["seconds"] = round(time.perf_counter() - t0, 3)
                rows.append(row)
                if progress is not None:
                    progress.update(1)
    if progress is not None:
        progress.set_postfix_str("", refresh=True)
    return rows


def planned_rows(ops=OPS, device: str | None = None) -> int:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return sum(c.op in ops for c in cases()) * len(dtypes(device)) * 2


def failed(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.status in ("fail", "error", "mismatch")]


def format_table(rows: list[Row]) -> str:
    head = f"{'op':15s} {'shape':40s} {'dtype':9s} {'backend':8s} {'max err':>9s} {'bound':>9s}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        op = r.params.get("op", r.case.split()[0])
        shape = r.params.get("shape", "(every case)")
        dtype = r.params.get("dtype", "-")
        backend = r.impl.split()[-1]
        err = f"{r.err:.2e}" if isinstance(r.err, float) else "-"
        bound = f"{r.bound:.2e}" if isinstance(r.bound, float) else "-"
        result = {"pass": "pass", "fail": "FAIL"}.get(r.status, r.status.upper() if r.status == "error" else r.status)
        line = f"{op:15s} {shape[:40]:40s} {dtype:9s} {backend:8s} {err:>9s} {bound:>9s}  {result}"
        if r.status not in ("pass",) and r.message:
            line += f": {r.message[:150]}"
        lines.append(line)
    return "\n".join(lines)
