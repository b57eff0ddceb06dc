"""Shared test helpers: the device and dtypes to test on, random inputs, and SPEC's parity rule."""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

#: The CPU interpreter computes tl.dot on bfloat16 wrongly (triton-lang/triton#11584), so bfloat16
#: is tested on the GPU only.
DTYPES = [torch.float16, torch.bfloat16, torch.float32] if ON_GPU else [torch.float16, torch.float32]

#: The big sweeps run on the GPU (or with GPTKERNELS_FULL_GRID=1); the interpreter runs a small grid.
FULL_GRID = ON_GPU or os.environ.get("GPTKERNELS_FULL_GRID", "0") not in ("", "0")

requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: none is visible on this machine")


def grid(small: list, full: list) -> list:
    """Parameter values: ``full`` on a GPU, ``small`` in the interpreter."""
    return full if FULL_GRID else small


def randn(*shape, dtype=torch.float32, device=DEVICE, generator=None, scale=1.0) -> torch.Tensor:
    """Fresh normal random data (never zeros), made in float32 then cast."""
    x = torch.randn(*shape, generator=generator, dtype=torch.float32) * scale
    return x.to(device=device, dtype=dtype)


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
