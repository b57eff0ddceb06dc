"""How everything is timed, and the device's two ceilings.

* GPU work is timed with CUDA events after warm-up: ``triton.testing.do_bench`` asked for the median
  (it also flushes the L2 cache before each timed call).
* Inputs rotate across several buffers (``n_sets``) so a small case does not run from L2.
* The ceilings are measured first in every run: a bf16 matmul's TFLOP/s and a large device-to-device
  copy's GB/s (bytes read + written). Every figure is then read as a % of one of them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from . import formulas

#: Where the benchmarks allocate (a module attribute, so the CPU smoke test of the harness can point
#: the suites at the CPU; figures only ever come from CUDA).
DEVICE = "cuda"

#: do_bench's warm-up and repetition budgets (milliseconds of GPU time per measurement).
WARMUP_MS = {True: 10, False: 25}
REP_MS = {True: 40, False: 100}


def n_sets(set_bytes: float, l2_bytes: int | None = None, most: int = 8) -> int:
    """How many input sets to rotate through so that consecutive calls do not hit in L2.

    Enough sets that together they are 3x the L2 size (one set when a set alone is that large).
    """
    if l2_bytes is None:
        l2_bytes = l2_size()
    if set_bytes <= 0:
        return most
    return int(min(most, max(1, math.ceil(3 * l2_bytes / set_bytes))))


def l2_size() -> int:
    if torch.cuda.is_available():
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    return 50 << 20


class Rotating:
    """A zero-argument callable for do_bench: each call runs ``fn`` on the next input set."""

    def __init__(self, fn, sets):
        self.fn, self.sets, self.i = fn, list(sets), 0

    def __call__(self):
        s = self.sets[self.i % len(self.sets)]
        self.i += 1
        return self.fn(s)


def median_ms(fn, *, quick: bool = False, grad_to_none=None) -> float:
    """Median time of ``fn()`` in milliseconds: CUDA events, after warm-up, L2 flushed each call."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=WARMUP_MS[quick], rep=REP_MS[quick], grad_to_none=grad_to_none,
                          return_mode="median"))


def wall_median_ms(fn, reps: int) -> float:
    """Median of ``reps`` timed calls, CUDA events around each, for long host-driven work (generate)."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return float(times[len(times) // 2])


@dataclass
class Ceilings:
    matmul_tflops: float
    copy_gbps: float
    matmul_shape: tuple
    copy_bytes: float
    matmul_ms: float
    copy_ms: float

    def as_dict(self) -> dict:
        return {
            "matmul_tflops": self.matmul_tflops,
            "matmul_formula": formulas.matmul_flops(1, 1, 1).formula,
            "matmul_shape": list(self.matmul_shape),
            "matmul_dtype": "bfloat16",
            "matmul_ms": self.matmul_ms,
            "copy_gbps": self.copy_gbps,
            "copy_formula": formulas.copy_bytes(1, 1).formula,
            "copy_bytes": self.copy_bytes,
            "copy_ms": self.copy_ms,
        }


def measure_ceilings(quick: bool = False, matmul_n: int = 8192, copy_gib: float = 1.0) -> Ceilings:
    """The device's bf16 matmul rate and copy bandwidth, measured now (random data, never zeros)."""
    dev = DEVICE
    a = torch.randn(matmul_n, matmul_n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(matmul_n, matmul_n, device=dev, dtype=torch.bfloat16)
    c = torch.empty(matmul_n, matmul_n, device=dev, dtype=torch.bfloat16)
    mm_ms = median_ms(lambda: torch.matmul(a, b, out=c), quick=quick)
    mm = formulas.matmul_flops(matmul_n, matmul_n, matmul_n)
    del a, b, c
    numel = int(copy_gib * (1 << 30)) // 2
    src = torch.randn(numel, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    cp_ms = median_ms(lambda: dst.copy_(src), quick=quick)
    cp = formulas.copy_bytes(numel, 2)
    del src, dst
    torch.cuda.empty_cache()
    return Ceilings(matmul_tflops=mm.value / (mm_ms * 1e-3) / 1e12, copy_gbps=cp.value / (cp_ms * 1e-3) / 1e9,
                    matmul_shape=(matmul_n, matmul_n, matmul_n), copy_bytes=cp.value, matmul_ms=mm_ms,
                    copy_ms=cp_ms)


#: Seconds a peer's compile takes before its first timed call (estimates for an H100/H200 machine,
#: to be replaced by the first GPU run's figures): a row that needs one is not started with less of
#: the budget left (it could not finish, and the run must end on time).
COMPILE_S = {"flex fwd": 60.0, "flex bwd": 150.0, "flex decode": 60.0, "flex paged": 90.0,
             "torch.compile": 30.0}


class Budget:
    """Wall-clock budget of a suite: rows past it are reported as skipped, so a run ends on time."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def exhausted(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds

    def allows(self, seconds: float) -> bool:
        """Whether ``seconds`` of work still fit in the budget."""
        return self.left() >= seconds

    def why_not(self, seconds: float, what: str) -> str:
        return f"{what} takes ~{seconds:.0f} s; {max(0.0, self.left()):.0f} s of the budget left"
