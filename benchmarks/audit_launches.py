"""Kernel launches per decode step of each model family (issue 14, item 6: the count before fusing).

A batch-1 decode step is launch-bound on a GPU: what decides its time is less the bytes than how many
kernels it launches. This counts them on CPU, without a GPU, for the step :func:`gptkernels.generate`
takes (with the kernel backend, ``"triton"``, in the interpreter: the same Python path as on CUDA):

* Triton launches: exact (every ``kernel[grid](...)`` the interpreter executes);
* every other op: the ATen operations the step dispatches (seen by a ``TorchDispatchMode``, also
  inside our own ``gptkernels::*`` ops), one CUDA kernel each, except views and allocations (none)
  and ``aten._local_scalar_dense`` (a device-to-host sync, counted apart). This is an estimate of the
  CUDA run (a few ATen ops launch two kernels on CUDA, e.g. a split-K GEMM), labelled as such.

Per step = count(generate with n+1 new tokens) - count(with n): the prefill and one-time costs cancel.
Sections: each transformer layer (forward hooks), the rest of the model step (embedding, final norm,
LM head, the step's index arithmetic), and the generation loop around it (logits processing, greedy
argmax, writing the token, feeding the step's static buffers).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .results import Row, Table

TABLE = Table(
    id="audit-launches", suite="audit", x="family", unit="launches",
    title="Kernel launches per decode step (batch 1, greedy, triton backend; counted on CPU): fused (generate's "
          "default) and unfused",
    formula="per step = launches(generate n+1 tokens) - launches(generate n tokens)",
    note="Triton launches exact; other ops one CUDA kernel per ATen op that is not a view or an allocation "
         "(an estimate of the CUDA run). Tiny random models of each family: the count per layer does not "
         "depend on the model's size, except that a long context adds the split-K merge (1 launch per layer).")

#: ATen ops that launch no kernel on CUDA (allocations, aliasing): views are recognised by schema.
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias",
              "lift_fresh", "set_", "resize_", "_unsafe_view", "_reshape_alias", "as_strided",
              "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
              "_has_compatible_shallow_copy_type"}
#: ATen ops that wait for the device (a device-to-host copy), counted apart.
_SYNC = {"_local_scalar_dense", "item"}


class _Tally:
    def __init__(self):
        self.section = "loop"
        self.in_triton = False  # inside an interpreted launch: its host copies are the interpreter's
        self.counts: Counter = Counter()  # (section, kind) -> n; kind: "triton", "aten", "sync"
        self.ops: Counter = Counter()  # (section, op name) -> n

    def add(self, kind: str, op: str):
        self.counts[(self.section, kind)] += 1
        self.ops[(self.section, op)] += 1


class _OpCounter(TorchDispatchMode):
    def __init__(self, tally: _Tally):
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace not in ("aten", "prims"):
            # our own op (or another library's): straight to its CPU kernel (the Python key skipped, so
            # it does not come back here) with a fresh counter for the ATen work inside it; its Triton
            # launches are counted by the grid hook
            with _OpCounter(self.tally):
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if self.tally.in_triton:
            pass  # the interpreter copying a launch's arguments to and from the "device": not the op's work
        elif name in _SYNC:
            self.tally.add("sync", name)
        elif not (func.is_view or name in _NO_KERNEL):
            self.tally.add("aten", name)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _counting_launches(model, tally: _Tally):
    """Count in ``tally`` every launch of the block, by section (layer hooks, the decoder's step)."""
    import triton.runtime.interpreter as interp

    from gptkernels import generation

    real_call = interp.GridExecutor.__call__

    def grid_call(self, *args, **kwargs):
        tally.add("triton", self.fn.__name__)
        tally.in_triton = True
        try:
            return real_call(self, *args, **kwargs)
        finally:
            tally.in_triton = False

    real_step = generation.PagedDecoder._step

    def step(self):
        outer, tally.section = tally.section, "model"
        try:
            return real_step(self)
        finally:
            tally.section = outer

    hooks, outer = [], []
    for i, layer in enumerate(model.layers):
        def pre(mod, args, i=i):
            outer.append(tally.section)
            tally.section = f"layer {i}"

        def post(mod, args, out):
            tally.section = outer.pop()

        hooks += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    try:
        with mock.patch.object(interp.GridExecutor, "__call__", grid_call), \
                mock.patch.object(generation.PagedDecoder, "_step", step), _OpCounter(tally):
            yield tally
    finally:
        for h in hooks:
            h.remove()


def count_family(family: str, new_tokens: int = 2, prompt: int = 5, fused: bool | None = None) -> dict:
    """Launches of one decode step (and its share of the generation loop) of the TINY ``family`` model.
    ``fused``: generate's decode step through the fused ops (None: its default on the triton backend,
    fused) or not (False: the unfused ops, the count before issue 14 item 6)."""
    import gptkernels
    from gptkernels.models import TINY, from_config

    from .suite_audit import as_on_gpu

    torch.manual_seed(0)
    model = from_config(TINY[family], dtype=torch.float32)
    ids = torch.randint(3, model.config.vocab_size, (1, prompt))

    def counted(n):
        tally = _Tally()
        with as_on_gpu(), torch.no_grad(), _counting_launches(model, tally):
            gptkernels.generate(model, ids, n, backend="triton", fused=fused)
        return tally

    counted(new_tokens)  # warm-up: anything done once per process (caches, first-use setup)
    a, b = counted(new_tokens), counted(new_tokens + 1)
    delta = Counter(b.counts)
    delta.subtract(a.counts)
    ops = Counter(b.ops)
    ops.subtract(a.ops)
    layers = model.config.num_layers
    per_layer = [sum(v for (sec, kind), v in delta.items() if sec == f"layer {i}" and kind != "sync")
                 for i in range(layers)]

    def section(name, kind=None):
        return sum(v for (sec, k), v in delta.items() if sec == name and (kind is None or k == kind))

    triton_layer = [sum(v for (sec, k), v in delta.items() if sec == f"layer {i}" and k == "triton")
                    for i in range(layers)]
    layer_ops = Counter()
    for (sec, op), v in ops.items():
        if sec == "layer 0" and v:
            layer_ops[op] += v
    return {
        "family": family, "layers": layers,
        "per_layer": per_layer, "triton_per_layer": triton_layer,
        "model_outside_layers": section("model") - section("model", "sync"),
        "loop": section("loop") - section("loop", "sync"),
        "syncs": sum(v for (sec, k), v in delta.items() if k == "sync"),
        "total": sum(v for (sec, k), v in delta.items() if k != "sync"),
        "triton_total": sum(v for (sec, k), v in delta.items() if k == "triton"),
        "layer0_ops": dict(sorted(layer_ops.items(), key=lambda kv: -kv[1])),
        "outside_ops": {op: v for (sec, op), v in ops.items() if sec in ("model", "loop") and v},
    }


FAMILIES = ("gpt2", "gpt-neo", "gpt-neox", "opt")


def rows(families=FAMILIES) -> list[Row]:
    """Per family: the decode step generate runs (fused), then the unfused one (``fused=False``: the
    count before issue 14 item 6, kept measurable)."""
    out = []
    for fam in families:
        for case, fused in ((fam, None), (f"{fam} unfused", False)):
            try:
                c = count_family(fam, fused=fused)
            except Exception as e:  # a family that cannot run here gets a row saying why
                out.append(Row(table=TABLE.id, case=case, impl="decode step", status="error", ours=True,
                               message=f"{type(e).__name__}: {str(e)[:300]}"))
                continue
            out.append(Row(table=TABLE.id, case=case, impl="decode step", status="pass", ours=True,
                           value=float(c["total"]), params={"backend": "triton", "batch": 1, "fused": fused is None},
                           extra=c))
    return out


def format_table(rs: list[Row]) -> str:
    head = (f"{'family':10s} {'layers':>6s} {'per layer (triton)':>20s} {'rest of model':>14s} "
            f"{'loop':>6s} {'per step':>9s} {'syncs':>6s}  layer 0 ops")
    lines = [head, "-" * len(head)]
    for r in rs:
        if r.table != TABLE.id:
            continue
        if r.status != "pass":
            lines.append(f"{r.case:10s} {r.status.upper()}: {r.message}")
            continue
        e = r.extra
        per = sorted(set(e["per_layer"]))
        tri = sorted(set(e["triton_per_layer"]))
        per_text = "/".join(map(str, per)) + f" ({'/'.join(map(str, tri))})"
        ops = ", ".join(f"{k} {v}" for k, v in list(e["layer0_ops"].items())[:8])
        lines.append(f"{r.case:10s} {e['layers']:>6} {per_text:>20s} {e['model_outside_layers']:>14} "
                     f"{e['loop']:>6} {e['total']:>9} {e['syncs']:>6}  {ops}")
    return "\n".join(lines)
