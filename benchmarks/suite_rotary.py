"""Rotary embedding (issue 3): T = 8192 tokens, 32 q heads + 8 k heads, D = 128, bf16, in GB/s.

Beside our backends (out of place and in place): HF-style eager ``rotate_half`` code (written here
the way transformers' GPT-NeoX/Llama code does it: bf16 cos/sin of the full head dim, ``q*cos +
rotate_half(q)*sin``) and ``torch.compile`` of it, and the eager reference. Every implementation is
credited with the same useful bytes (formulas.rotary_bytes), so GB/s ratios are time ratios.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from . import formulas, timing
from .checks import compare
from .harness import Session, free_memory
from .results import Table

HQ, HK, D = 32, 8, 128
DTYPE = torch.bfloat16


def config(quick: bool) -> tuple[int, ...]:
    return (8192,) if quick else (1024, 4096, 8192, 32768)


IMPLS = ("gptkernels triton", "gptkernels triton (in place)", "gptkernels cuda", "gptkernels cuda (in place)",
         "gptkernels torch (eager)", "hf rotate_half (eager)", "hf rotate_half (torch.compile)")


def planned_rows(quick: bool) -> int:
    return len(config(quick)) * len(IMPLS)


def tables(quick: bool) -> list[Table]:
    f = formulas.rotary_bytes(1, 1, 1, 2, 2, 2).formula
    return [Table(id="rotary", suite="rotary", title=f"apply_rotary, bf16, Hq={HQ}, Hk={HK}, D=R={D}, (T, H, D)",
                  x="T", unit="GB/s", formula=f, ceiling="copy", plot="line",
                  note="HF-style code moves more bytes than this count (it writes temporaries); it is "
                       "credited with the same useful bytes, so GB/s compare as speed.")]


# HF-style rotary, as transformers writes it (cos/sin of the full head dim, in the activations' dtype).
def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hf_apply_rotary(q, k, cos, sin):
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (T, 1, D): broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


_compiled = {}


def _hf_compiled():
    if "f" not in _compiled:
        from .peers import allow_many_compiles

        allow_many_compiles()
        _compiled["f"] = torch.compile(hf_apply_rotary, dynamic=False)
    return _compiled["f"]


class Case:
    def __init__(self, t: int):
        import gptkernels

        self.t = t
        self.cos, self.sin = gptkernels.rotary_cos_sin(D, t, device=timing.DEVICE)  # float32 (t, D/2)
        # HF's tables: full head dim (the two halves repeat), in the activations' dtype
        self.cos_hf = torch.cat((self.cos, self.cos), -1).to(DTYPE)
        self.sin_hf = torch.cat((self.sin, self.sin), -1).to(DTYPE)
        count = formulas.rotary_bytes(t, HQ, HK, D, D, 2)
        self.bytes = count.value
        self.sets = [SimpleNamespace(q=torch.randn(t, HQ, D, device=timing.DEVICE, dtype=DTYPE),
                                     k=torch.randn(t, HK, D, device=timing.DEVICE, dtype=DTYPE))
                     for _ in range(timing.n_sets(count.value / 2))]
        self.params = {"T": t, "Hq": HQ, "Hk": HK, "D": D, "R": D, "dtype": "bfloat16", "layout": "(T, H, D)"}
        from gptkernels import reference

        s0 = self.sets[0]  # references now, before any in-place implementation touches the data
        self.ref = reference.apply_rotary(s0.q.double(), s0.k.double(), self.cos.double(), self.sin.double())
        self.base = reference.apply_rotary(s0.q, s0.k, self.cos, self.sin, upcast=False)

    def check(self, out, _s0):
        return compare([("q_out", out[0], self.ref[0], self.base[0]), ("k_out", out[1], self.ref[1], self.base[1])])


def _run_fn(impl: str, case: Case):
    import gptkernels

    if impl.startswith("gptkernels "):
        backend = impl.split()[1]
        inplace = impl.endswith("(in place)")
        return lambda s: gptkernels.apply_rotary(s.q, s.k, case.cos, case.sin, inplace=inplace, backend=backend)
    if impl == "hf rotate_half (eager)":
        return lambda s: hf_apply_rotary(s.q, s.k, case.cos_hf, case.sin_hf)
    if impl == "hf rotate_half (torch.compile)":
        f = _hf_compiled()
        return lambda s: f(s.q, s.k, case.cos_hf, case.sin_hf)
    raise ValueError(f"unknown rotary implementation {impl!r}")


def run(sess: Session, quick: bool) -> None:
    for t in tables(quick):
        sess.table(t)
    for t in config(quick):
        names = [i for i in IMPLS if sess.wanted("rotary", str(t), i)]
        if not names:
            continue
        try:
            case = Case(t)
        except Exception as e:
            for impl in names:
                sess.fail("rotary", str(t), impl, e, x=t, ours=impl.startswith("gptkernels"))
            continue
        for impl in names:
            if impl.endswith("(torch.compile)") and not sess.budget.allows(timing.COMPILE_S["torch.compile"]):
                sess.skip("rotary", str(t), impl, sess.budget.why_not(timing.COMPILE_S["torch.compile"],
                                                                      "a torch.compile"), x=t, ours=False)
                continue
            try:
                fn = _run_fn(impl, case)
            except Exception as e:
                sess.fail("rotary", str(t), impl, e, x=t, ours=impl.startswith("gptkernels"))
                continue
            setup = None
            if impl.endswith("(in place)"):
                # its own copies: the check's first call must see the original data
                def setup(sets):
                    return [SimpleNamespace(q=s.q.clone(), k=s.k.clone()) for s in sets]
            with torch.no_grad():
                sess.measure("rotary", str(t), impl, run=fn, sets=case.sets, check=case.check,
                             setup=setup, ours=impl.startswith("gptkernels"), x=t, params=case.params,
                             bytes=case.bytes)
        del case
        free_memory()
