"""Work counts of Triton kernels, read off the CPU interpreter (``TRITON_INTERPRET=1``).

The interpreter executes every program of a launch with numpy, one Triton operation at a time, through
one builder object (``triton.runtime.interpreter.interpreter_builder``). :func:`counting` wraps that
builder's memory and matmul operations, and the grid executor, for the duration of a ``with`` block:

* loads and stores: bytes per kernel argument, **only the lanes whose mask is true** (a masked-off
  lane moves no bytes), each distinct address of one load once (lanes of one instruction that read
  the same address, e.g. a block-table entry broadcast over a tile, are one access on a GPU), each
  the pointer's element size. Block pointers and tensor descriptors (TMA) go through the same masked
  load/store in the interpreter, so they are counted too. Also the footprint, the distinct addresses
  over a whole kernel's programs: bytes loaded / footprint is how often programs re-read what another
  already read (L2 may absorb it; DRAM traffic lies between the two).
* ``tl.dot``: the product shape (M, N, K) of every call, batch dims folded in; tile FLOPs = 2*M*N*K
  whatever the operands hold (padding rows and masked-off keys are multiplied all the same).
* atomics: bytes of the active lanes of ``tl.atomic_*`` (each a read-modify-write in L2).

Counts are per launch (kernel name, grid, programs); :class:`Launch` holds them. Nothing about the
kernels is changed: the same numpy computations run, only observed. An operation the counter cannot
attribute (a matmul with scaled operands, a pointer outside every tensor argument) raises
:class:`NotCountable`, so an audit row says why it has no figure instead of showing a wrong one.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np


class NotCountable(RuntimeError):
    """The launch used an operation whose work the counter cannot count exactly."""


@dataclass
class Launch:
    kernel: str  # the @triton.jit function's name
    grid: tuple[int, int, int]
    loads: Counter = field(default_factory=Counter)  # argument name -> bytes loaded (active lanes)
    stores: Counter = field(default_factory=Counter)  # argument name -> bytes stored
    atomics: Counter = field(default_factory=Counter)  # argument name -> bytes of atomic RMW lanes
    dots: Counter = field(default_factory=Counter)  # (M, N, K, operand dtype) -> number of products
    meta: dict = field(default_factory=dict)  # the launch's scalar keyword arguments (constexprs, num_warps)
    seconds: float = 0.0  # wall time in the interpreter

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    @property
    def tile_flops(self) -> int:
        return sum(2 * m * n * k * c for (m, n, k, _), c in self.dots.items())


@dataclass
class _Arg:
    name: str
    start: int  # first byte of the tensor's extent
    end: int  # one past its last byte
    elem: int  # bytes per element of the tensor
    key: tuple  # identifies the memory across launches (for footprints)


class Recorder:
    """What :func:`counting` observed: the launches in order, and the footprints (distinct bytes read
    and written) per tensor over all of them."""

    def __init__(self):
        self.launches: list[Launch] = []
        self._args: list[_Arg] = []
        self._starts = np.zeros(0, dtype=np.uint64)
        self._current: Launch | None = None
        # footprint bitmaps per (kernel, memory extent): key -> [names seen, read map, written map, elem]
        self._maps: dict[tuple, list] = {}

    # -- footprints ----------------------------------------------------------------------------

    def footprint(self, kernel: str | None = None) -> dict[str, dict[str, int]]:
        """Per tensor (named by the kernel arguments that pointed at it): distinct bytes read/written
        by the programs of ``kernel`` (all its launches), or of every kernel (summed per kernel)."""
        out: dict[str, dict[str, int]] = {}
        for (kname, *_), (names, read, written, elem) in self._maps.items():
            if kernel is not None and kname != kernel:
                continue
            entry = out.setdefault("/".join(sorted(names)), {"read": 0, "written": 0})
            entry["read"] += int(read.sum()) * elem
            entry["written"] += int(written.sum()) * elem
        return out

    # -- attribution ---------------------------------------------------------------------------

    def _begin(self, kernel: str, grid, named_args: dict, meta: dict):
        import torch

        args = []
        for name, value in named_args.items():
            if isinstance(value, torch.Tensor) and value.numel() > 0:
                elem = value.element_size()
                span = sum((s - 1) * abs(st) for s, st in zip(value.shape, value.stride())) + 1
                if any(st < 0 for st in value.stride()):
                    raise NotCountable(f"{kernel}: argument {name} has a negative stride")
                start = value.data_ptr()
                args.append(_Arg(name, start, start + span * elem, elem, (kernel, start, span * elem)))
        args.sort(key=lambda a: (a.start, -a.end))
        # arguments that point at the same memory (a dummy standing in for an absent tensor, q and
        # out in place) are one extent, named by all of them ("lens_ptr/slope_ptr")
        merged: list[_Arg] = []
        for a in args:
            if merged and (merged[-1].start, merged[-1].end) == (a.start, a.end):
                merged[-1].name += "/" + a.name
            else:
                merged.append(a)
        args = merged
        self._args = args
        self._starts = np.array([a.start for a in args], dtype=np.uint64)
        self._current = Launch(kernel, tuple(grid), meta=meta)
        for a in args:
            entry = self._maps.get(a.key)
            if entry is None:
                n = (a.end - a.start) // a.elem
                self._maps[a.key] = [{a.name}, np.zeros(n, bool), np.zeros(n, bool), a.elem]
            else:
                entry[0].add(a.name)

    def _attribute(self, addrs: np.ndarray, elem: int, what: str, counter: Counter, bitmap: int | None,
                   distinct: bool):
        """Add ``elem`` bytes per address (per distinct address with ``distinct``) to the argument that
        holds it, and mark the footprint (``bitmap``: 1 read, 2 written)."""
        if addrs.size == 0:
            return
        addrs = addrs.astype(np.uint64, copy=False)
        if distinct:
            addrs = np.unique(addrs)
        idx = np.searchsorted(self._starts, addrs, side="right") - 1
        if (idx < 0).any():
            raise NotCountable(f"{self._current.kernel}: a {what} below every tensor argument's memory")
        for i in np.unique(idx):
            a = self._args[i]
            sel = addrs[idx == i]
            if (sel >= a.end).any():
                raise NotCountable(f"{self._current.kernel}: a {what} outside every tensor argument "
                                   f"(past the end of {a.name})")
            counter[a.name] += int(sel.size) * elem
            if bitmap is not None:
                entry = self._maps[a.key]
                off = (sel - np.uint64(a.start)) // np.uint64(a.elem)
                entry[bitmap][off.astype(np.int64)] = True
                if elem > a.elem:  # a wider access than the tensor's elements (reinterpreted memory)
                    for j in range(1, elem // a.elem):
                        entry[bitmap][np.minimum(off.astype(np.int64) + j, entry[bitmap].size - 1)] = True


def _elem_bytes(handle) -> int:
    return max(1, handle.get_element_ty().primitive_bitwidth // 8)


def _active(ptrs, mask) -> np.ndarray:
    addrs = np.asarray(ptrs.data)
    if mask is None:
        return addrs.reshape(-1)
    m = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
    return addrs[m]


@contextlib.contextmanager
def counting():
    """Count every Triton launch made in the interpreter inside the block -> :class:`Recorder`.

    Needs ``TRITON_INTERPRET=1`` set before triton was first imported (the kernels are then
    interpreted functions); refuses otherwise. Not reentrant, not thread-safe (neither is the
    interpreter)."""
    import time

    import triton.runtime.interpreter as interp

    from gptkernels._backend import triton_interpret

    if not triton_interpret():
        raise NotCountable("work counts need the Triton interpreter: set TRITON_INTERPRET=1 before "
                           "triton is imported (benchmarks.run does this without a GPU)")
    rec = Recorder()
    builder = interp.interpreter_builder
    real = {name: getattr(builder, name) for name in
            ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas",
             "create_dot", "create_dot_scaled")}
    real_call = interp.GridExecutor.__call__

    def current():
        if rec._current is None:
            raise NotCountable("a Triton operation outside a counted launch")
        return rec._current

    def masked_load(ptrs, mask, other, *args, **kwargs):
        rec._attribute(_active(ptrs, mask), _elem_bytes(ptrs), "load", current().loads, 1, True)
        return real["create_masked_load"](ptrs, mask, other, *args, **kwargs)

    def masked_store(ptrs, value, mask, *args, **kwargs):
        rec._attribute(_active(ptrs, mask), _elem_bytes(ptrs), "store", current().stores, 2, True)
        return real["create_masked_store"](ptrs, value, mask, *args, **kwargs)

    def atomic_rmw(op, ptr, val, mask, *args, **kwargs):
        rec._attribute(_active(ptr, mask), _elem_bytes(ptr), "atomic", current().atomics, None, False)
        return real["create_atomic_rmw"](op, ptr, val, mask, *args, **kwargs)

    def atomic_cas(ptr, cmp, val, *args, **kwargs):
        rec._attribute(_active(ptr, None), _elem_bytes(ptr), "atomic", current().atomics, None, False)
        return real["create_atomic_cas"](ptr, cmp, val, *args, **kwargs)

    def dot(a, b, d, *args, **kwargs):
        ash, bsh = np.shape(a.data), np.shape(b.data)
        m, k, n = ash[-2], ash[-1], bsh[-1]
        batch = math.prod(ash[:-2])
        current().dots[(m, n, k, str(a.dtype.scalar))] += batch
        return real["create_dot"](a, b, d, *args, **kwargs)

    def dot_scaled(*args, **kwargs):
        raise NotCountable("tl.dot_scaled (microscaled operands) is not counted by the audit")

    def grid_call(self, *args_dev, **kwargs):
        import inspect

        named = inspect.getcallargs(self.fn, *args_dev, **{k: v for k, v in kwargs.items()
                                                           if k in self.arg_names})
        grid = self.grid(named) if callable(self.grid) else self.grid
        grid = tuple(grid) + (1,) * (3 - len(grid))
        meta = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))}
        rec._begin(self.fn.__name__, grid, named, meta)
        t0 = time.perf_counter()
        try:
            return real_call(self, *args_dev, **kwargs)
        finally:
            rec._current.seconds = time.perf_counter() - t0
            rec.launches.append(rec._current)
            rec._current = None

    patched = {"create_masked_load": masked_load, "create_masked_store": masked_store,
               "create_atomic_rmw": atomic_rmw, "create_atomic_cas": atomic_cas, "create_dot": dot,
               "create_dot_scaled": dot_scaled}
    for name, fn in patched.items():
        setattr(builder, name, fn)  # instance attributes shadow the class's methods
    interp.GridExecutor.__call__ = grid_call
    try:
        yield rec
    finally:
        interp.GridExecutor.__call__ = real_call
        for name in patched:
            delattr(builder, name)


def summarize(launches: list[Launch]) -> dict:
    """Totals over launches: bytes loaded/stored per argument, atomics, dots, programs, launches."""
    total = Launch("all", (0, 0, 0))
    programs = 0
    for la in launches:
        total.loads.update(la.loads)
        total.stores.update(la.stores)
        total.atomics.update(la.atomics)
        total.dots.update(la.dots)
        programs += la.programs
    n = sum(total.dots.values())
    mean = [sum(s[i] * c for s, c in total.dots.items()) / n for i in range(3)] if n else None
    return {
        "launches": len(launches),
        "programs": programs,
        "loaded": sum(total.loads.values()),
        "stored": sum(total.stores.values()),
        "atomic": sum(total.atomics.values()),
        "loads_by_arg": dict(total.loads),
        "stores_by_arg": dict(total.stores),
        "atomics_by_arg": dict(total.atomics),
        "tile_flops": total.tile_flops,
        "dots": n,
        "dot_mean_mnk": mean,
        "dot_min_side": min((min(m, nn, k) for (m, nn, k, _) in total.dots), default=None),
        "dot_shapes": {f"{m}x{nn}x{k} {dt}": c for (m, nn, k, dt), c in sorted(total.dots.items())},
        "seconds": sum(la.seconds for la in launches),
    }


__all__ = ["Launch", "NotCountable", "Recorder", "counting", "summarize"]
