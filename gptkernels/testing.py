"""SPEC's parity rule: how a kernel's output is judged against a float64 reference.

Used by the test suite (as an assertion) and by the benchmarks (as figures reported next to each
timing). ``out`` is the kernel's result, ``ref`` the float64 reference computed from the same inputs,
``base`` the eager torch computation in ``out``'s dtype (``gptkernels.reference`` with
``upcast=False``). The kernel's max error may be at most twice the eager one, plus a small floor.
"""

from __future__ import annotations

import torch

#: The absolute floor of the parity rule, relative to the reference's magnitude (at least 1).
FLOORS = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3, torch.float64: 1e-12}


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    finite = torch.isfinite(ref)
    if not bool(finite.any()):
        return 0.0
    return float((x[finite] - ref[finite]).abs().max())


def parity_error(out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor | None = None, *,
                 name: str = "out", floor: float | None = None) -> tuple[float, float, str | None]:
    """SPEC's parity rule as figures: ``(max error, bound, why it fails or None)``.

    ``ref`` is the float64 reference from the same inputs; ``base`` the eager torch computation in
    ``out``'s dtype. The kernel's max error may be at most twice the eager one, plus a small floor.
    Infinities (lse of rows that see no key) must match exactly; NaN never passes.
    (:func:`assert_parity` asserts it; the benchmark suite reports it.)
    """
    if out.shape != ref.shape:
        return float("nan"), float("nan"), f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    if bool(torch.isnan(o).any()):
        return float("nan"), float("nan"), f"{name}: NaN in the output"
    inf_r = torch.isinf(r)
    if not (torch.equal(torch.isinf(o), inf_r) and torch.equal(o[inf_r], r[inf_r])):
        return float("inf"), float("nan"), (
            f"{name}: infinities differ from the reference at {int((torch.isinf(o) != inf_r).sum())} places")
    finite = ~inf_r
    scale = max(1.0, float(r[finite].abs().max())) if bool(finite.any()) else 1.0
    if floor is None:
        floor = FLOORS[out.dtype] * scale
    err = _max_err(o, r)
    base_err = _max_err(base.detach(), r) if base is not None else 0.0
    bound = 2 * base_err + floor
    if err > bound:
        return err, bound, (
            f"{name}: max error {err:.3g} vs float64 exceeds 2 x eager {out.dtype} error "
            f"{base_err:.3g} + floor {floor:.2g} = {bound:.3g}")
    return err, bound, None


def assert_parity(out: torch.Tensor, ref: torch.Tensor, base: torch.Tensor | None = None, *,
                  name: str = "out", floor: float | None = None) -> None:
    """SPEC's parity rule (see :func:`parity_error`), as an assertion."""
    _, _, problem = parity_error(out, ref, base, name=name, floor=floor)
    assert problem is None, problem
