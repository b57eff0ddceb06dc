"""The correctness check before every timing: SPEC's parity rule, from gptkernels.testing.

The rule lives in one place (``gptkernels.testing.parity_error``); the benchmarks report its figures
(max error vs float64, the bound, pass/fail) instead of asserting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptkernels.testing import parity_error


@dataclass
class Check:
    err: float
    bound: float
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def compare(pairs) -> Check:
    """Check several outputs at once: ``pairs`` of (name, out, ref_float64, eager_same_dtype or None).

    Returns the worst error/bound ratio's figures, and the first problem found.
    """
    worst, problem = None, None
    for name, out, ref, base in pairs:
        err, bound, why = parity_error(out, ref, base, name=name)
        if why is not None and problem is None:
            problem = why
        ratio = err / bound if bound and bound == bound else float("inf")
        if worst is None or ratio > worst[0]:
            worst = (ratio, err, bound)
    if worst is None:
        raise ValueError("compare needs at least one output")
    return Check(err=worst[1], bound=worst[2], problem=problem)


def exact(name: str, out: torch.Tensor, ref: torch.Tensor) -> Check:
    """Bit-for-bit equality (a cache write is a copy: no rounding is allowed)."""
    if out.shape != ref.shape:
        return Check(float("nan"), 0.0, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}")
    diff = (out.double() - ref.double()).abs()
    err = float(diff.max()) if diff.numel() else 0.0
    same = torch.equal(out, ref)
    return Check(err, 0.0, None if same else f"{name}: differs from the reference (max diff {err:.3g})")
