"""Launch configuration shared by the Triton kernels.

On a GPU the kernels autotune over a few configs; in the CPU interpreter (TRITON_INTERPRET=1) every
config costs a full run, so each kernel uses one fixed config there.
"""

from __future__ import annotations

import triton

from .._backend import triton_interpret

#: Whether these kernels were defined for the CPU interpreter (Triton reads the variable at definition).
INTERPRET = triton_interpret()


class ConfigList(list):
    """An autotune list that keeps the GPU list at hand as ``.gpu`` (also under the interpreter, where
    the list itself is the interpreter's one config: the work audit, benchmarks/suite_audit.py, runs
    each GPU config in the interpreter)."""

    gpu: list


def configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The autotune list: ``gpu`` on a GPU, the single ``interpreter`` config in the interpreter."""
    chosen = ConfigList([interpreter] if INTERPRET else gpu)
    chosen.gpu = list(gpu)
    return chosen


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
