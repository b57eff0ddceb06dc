"""Shared test helpers: the device and dtypes to test on, random inputs, and SPEC's parity rule."""

from __future__ import annotations

import os

import pytest
import torch

# SPEC's parity rule lives in the package (the benchmarks report the same rule).
from gptkernels.testing import FLOORS, assert_parity, parity_error  # noqa: F401

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"

#: The CPU interpreter computes tl.dot on bfloat16 wrongly (triton-lang/triton#11584), so bfloat16
#: is tested on the GPU only.
DTYPES = [torch.float16, torch.bfloat16, torch.float32] if ON_GPU else [torch.float16, torch.float32]

#: Which grid the parametrized sweeps use: the full one on a GPU, the small one in the interpreter.
#: GPTKERNELS_FULL_GRID=1 forces the full grid (even on CPU), =0 the small one (even on a GPU: the
#: first GPU run, `make gpu-smoke`, runs the interpreter's grid plus bfloat16).
ENV_FULL_GRID = "GPTKERNELS_FULL_GRID"


def full_grid(env=None, on_gpu: bool = ON_GPU) -> bool:
    value = (os.environ if env is None else env).get(ENV_FULL_GRID, "")
    return on_gpu if value == "" else value != "0"


FULL_GRID = full_grid()

requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU: none is visible on this machine")


def torchrun_cli(args: list[str], nproc: int = 2):
    """``torchrun --standalone --nproc-per-node nproc -m gptkernels *args`` from the repository root,
    one thread per rank -> the CompletedProcess (stdout/stderr as text)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "gptkernels", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def grid(small: list, full: list) -> list:
    """Parameter values: ``full`` on a GPU, ``small`` in the interpreter (FULL_GRID decides)."""
    return full if FULL_GRID else small


def randn(*shape, dtype=torch.float32, device=DEVICE, generator=None, scale=1.0) -> torch.Tensor:
    """Fresh normal random data (never zeros), made in float32 then cast."""
    x = torch.randn(*shape, generator=generator, dtype=torch.float32) * scale
    return x.to(device=device, dtype=dtype)



#: A stride just over 2**30 elements: index 2 along it lies past 2**31, where an int32 offset wraps.
HUGE_STRIDE = 2**30 + 2**20
#: A row stride past 2**31 / 15 elements: row 15 of a tile (any tile of 16 rows or more: the GPU's
#: 128-row tiles and the interpreter's 32/64-row ones) lies past 2**31, where ``offs * stride`` in
#: int32 wraps.
ROW_STRIDE = 2**31 // 15 + 2**12


def huge_stride_views(dtype, *specs, stride: int = HUGE_STRIDE) -> list[torch.Tensor]:
    """Random-filled views, one per ``(shape, dim)`` spec, into one buffer of ~2**31 elements whose
    stride along ``dim`` is ``stride`` (its last index just past 2**31); the other dims are packed.
    The buffer is allocated lazily: only the elements the views cover are ever touched (a few KB)."""
    size = max((shape[dim] - 1) * stride for shape, dim in specs) + 2**20
    assert size <= 2**31 + 2**30, "keep the (lazily allocated) buffer near 2**31 elements"
    buf = torch.empty(size, dtype=dtype, device=DEVICE)
    views, offset = [], 0
    for shape, dim in specs:
        strides, inner = [0] * len(shape), 1
        for i in reversed(range(len(shape))):
            if i != dim:
                strides[i], inner = inner, inner * shape[i]
        strides[dim] = stride
        view = buf.as_strided(shape, strides, offset)
        view.copy_(randn(*shape, dtype=dtype))
        views.append(view)
        offset += inner
    assert offset <= 2**20
    return views


def index_views(x: torch.Tensor, junk: int) -> dict[str, torch.Tensor]:
    """Non-contiguous views of an index tensor (1-D or 2-D), for "any strides" tests.

    ``strided``: every other element (``junk`` in between), ``transposed``: a column-major layout
    (a row of a transposed matrix for 1-D, with ``junk`` around it): both hold x's values.
    ``expanded``: x's first element (1-D) or row (2-D) broadcast with stride 0: other values, so
    compare it with its own ``.contiguous()``. A kernel that read these as contiguous would read the
    junk (or past the end)."""
    pad = torch.full_like(x, junk)
    strided = torch.stack([x, pad], dim=-1)[..., 0]
    if x.dim() == 1:
        transposed = torch.stack([pad, x, pad]).t().contiguous().t()[1]
    else:
        transposed = x.t().contiguous().t()
    expanded = x[:1].expand(x.shape)
    views = {"strided": strided, "transposed": transposed, "expanded": expanded}
    for name, view in views.items():
        assert not view.is_contiguous() or x.numel() <= 1, name
    return views
