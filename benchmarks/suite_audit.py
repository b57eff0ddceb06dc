"""The work audit (issue 14): what every Triton kernel moves and multiplies, against what its op needs.

    python -m benchmarks.run --suite audit            # every case x every GPU config (a few minutes)
    python -m benchmarks.run --suite audit --quick    # each kernel's first GPU config only

Runs every Triton kernel in the CPU interpreter with **each config its autotuner would try on a GPU**
(the interpreter runs any config, slowly), launched as on an H100/H200 (132 SMs: the same split-K
and tile heuristics the GPU takes), and counts per kernel and config (:mod:`benchmarks.audit_counter`):

* bytes loaded + stored (+ atomics) by all programs of the op, against the op's minimum (each input
  read once, each output written once: :mod:`benchmarks.formulas`, next to each case below);
* K/V bytes loaded against the K/V the op must read (GQA: once per KV head, not per query head);
* tile FLOPs (every ``tl.dot``'s 2*M*N*K) against the useful FLOPs (the visible pairs');
* the mean tensor-core product shape (M, N, K) and the atomics' bytes;
* from an offline sm_90a compile of the same launch with the same config (``tools/sm90_compile.py``,
  in a subprocess without the interpreter, run beside the counting): registers, spill bytes, shared
  memory, resident blocks per SM and whether wgmma / TMA were emitted;
* and kernel launches per decode step of each model family (:mod:`benchmarks.audit_launches`).

The counts are exact and the same on any machine: no timing is involved. A kernel or config that
cannot be counted gets a row saying why (status ``unavailable``), never a silent gap. Bounds that CI
holds these figures to: ``tests/test_audit.py``. Method and today's table: ``notes/audit.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable
from unittest import mock

import numpy as np
import torch

from . import formulas as F
from .formulas import Count
from .results import Row, Table

#: SMs of the GPU the audit launches for (H100 SXM and H200: 132): the split-K policy and the rotary
#: launch heuristic read the SM count, so the programs counted are the ones that GPU would run.
AUDIT_SMS = 132

TABLE = Table(
    id="audit", suite="audit", x="case", unit="x minimum",
    title="Work audit: bytes and FLOPs of every kernel and GPU config, counted in the Triton interpreter",
    formula="bytes: (loaded + stored + atomic) / op minimum; FLOPs: tile (tl.dot 2*M*N*K) / useful",
    note="Counted exactly in the Triton interpreter (no GPU; no timing). Each row is one kernel with one "
         "of the configs its autotuner tries on an H100/H200; the op's other kernels run with the config they "
         "take without autotuning. sm_90a figures from an offline compile of the same launch (registers/spills by ptxas).")


@dataclass
class Case:
    """One op call to audit. ``build()`` makes the inputs and returns a thunk that calls the op once
    (through the public op or, for the backward, the Triton launcher). The minima are written with
    the case, from :mod:`benchmarks.formulas`."""

    name: str
    family: str  # groups the bounds in tests/test_audit.py
    shape: str
    build: Callable[[], Callable[[], object]]
    min_bytes: Count
    useful_flops: Count | None = None
    kv: Count | None = None  # the K/V the op must read ...
    kv_args: tuple[str, ...] = ()  # ... and the kernel arguments that hold K and V
    targets: dict = field(default_factory=dict)  # figure -> (target, where it is asked for): shown, not enforced


class Refused(Exception):
    """The audit cannot run this kernel/config as a GPU would (its row says why)."""


def _randn(*shape, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)


# ---- the cases -------------------------------------------------------------------------------------

DTYPE = torch.float16  # the interpreter computes bfloat16 dots wrongly; the byte counts are the same
ELEM = 2


def attn_fwd(b, sq, sk, hq, hkv, d, *, causal=True, window=None, name=None, family="attention fwd",
             targets=None) -> Case:
    """flash_attn forward, dense (B, S, H, D)."""

    def build():
        import gptkernels

        q = _randn(b, sq, hq, d, dtype=DTYPE)
        k, v = _randn(b, sk, hkv, d, dtype=DTYPE, seed=1), _randn(b, sk, hkv, d, dtype=DTYPE, seed=2)
        return lambda: gptkernels.flash_attn(q, k, v, causal=causal, window=window, backend="triton")

    mask = "full" if not causal else f"W={window}" if window else "causal"
    shape = f"B={b} Sq={sq} Sk={sk} Hq={hq} Hkv={hkv} D={d} {mask}"
    return Case(name or f"attn fwd {mask} S={sk}" + (f" Sq={sq}" if sq != sk else ""), family, shape, build,
                min_bytes=F.attention_fwd_bytes(b, sq, sk, hq, hkv, d, ELEM, causal=causal, window=window),
                useful_flops=F.attention_useful_flops(b, hq, sq, sk, d, causal=causal, window=window),
                kv=F.attention_kv_bytes(b, sq, sk, hkv, d, ELEM, causal=causal, window=window),
                kv_args=("K", "V"), targets=targets or {})


def attn_paged_fwd(sq, ctx, hq, hkv, d, page=16) -> Case:
    """flash_attn forward of a query chunk against paged keys (chunked prefill): one sequence."""

    def build():
        import gptkernels

        blocks = -(-ctx // page)
        kc = _randn(blocks, page, hkv, d, dtype=DTYPE, seed=1)
        vc = _randn(blocks, page, hkv, d, dtype=DTYPE, seed=2)
        table = torch.randperm(blocks, generator=torch.Generator().manual_seed(3)).to(torch.int32)[None]
        lens = torch.tensor([ctx], dtype=torch.int32)
        q = _randn(1, sq, hq, d, dtype=DTYPE)
        return lambda: gptkernels.flash_attn(q, kc, vc, block_table=table, seqlens_k=lens, backend="triton")

    pages = -(-ctx // page)
    mb = F.attention_fwd_bytes(1, sq, ctx, hq, hkv, d, ELEM)
    return Case(f"attn fwd paged keys Sq={sq} ctx={ctx}", "attention fwd",
                f"B=1 Sq={sq} ctx={ctx} page={page} Hq={hq} Hkv={hkv} D={d} causal", build,
                min_bytes=Count(mb.value + 4 * pages + 4, mb.formula + " + 4*pages + 4 (table, length)"),
                useful_flops=F.attention_useful_flops(1, hq, sq, ctx, d),
                kv=F.attention_kv_bytes(1, sq, ctx, hkv, d, ELEM), kv_args=("K", "V"))


def attn_bwd(b, s, hq, hkv, d, *, window=None, deterministic=True) -> Case:
    """flash_attn backward (the Triton launcher, from the reference forward's out and lse)."""

    def build():
        from gptkernels import reference
        from gptkernels.triton import flash_attn as fa

        q = _randn(b, s, hq, d, dtype=DTYPE)
        k, v = _randn(b, s, hkv, d, dtype=DTYPE, seed=1), _randn(b, s, hkv, d, dtype=DTYPE, seed=2)
        dout = _randn(b, s, hq, d, dtype=DTYPE, seed=3)
        out, lse = reference.attention(q, k, v, causal=True, window=window, return_lse=True)
        out, lse = out.to(DTYPE).contiguous(), lse.float().contiguous()
        return lambda: fa.flash_attn_backward(
            dout, None, q, k, v, out, lse, causal=True, window=window, softmax_scale=d ** -0.5,
            cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, bottom_right=True,
            deterministic=deterministic)

    mask = f"W={window}" if window else "causal"
    kind = "deterministic" if deterministic else "atomic dQ"
    return Case(f"attn bwd {mask} S={s} {kind}", "attention bwd", f"B={b} S={s} Hq={hq} Hkv={hkv} D={d} {mask}",
                build, min_bytes=F.attention_bwd_bytes(b, s, hq, hkv, d, ELEM),
                useful_flops=F.attention_useful_flops(b, hq, s, s, d, window=window, backward=True))


def paged_decode(lens, hq, hkv, d, *, page=16, window=None, fp8=False, family="paged decode",
                 targets=None) -> Case:
    """paged_decode over a paged cache (``fp8``: a float8_e4m3fn cache with per-head scales)."""
    kv_dtype = torch.float8_e4m3fn if fp8 else DTYPE

    def build():
        import gptkernels

        blocks = sum(-(-n // page) for n in lens)
        kc = _randn(blocks, page, hkv, d, dtype=torch.float32, seed=1).to(kv_dtype)
        vc = _randn(blocks, page, hkv, d, dtype=torch.float32, seed=2).to(kv_dtype)
        scales = dict(k_scale=torch.ones(hkv), v_scale=torch.ones(hkv)) if fp8 else {}
        perm = torch.randperm(blocks, generator=torch.Generator().manual_seed(3)).to(torch.int32)
        width = max(-(-n // page) for n in lens)
        table = torch.zeros(len(lens), width, dtype=torch.int32)
        at = 0
        for i, n in enumerate(lens):
            used = -(-n // page)
            table[i, :used] = perm[at:at + used]
            at += used
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        q = _randn(len(lens), hq, d, dtype=DTYPE)
        return lambda: gptkernels.paged_decode(q, kc, vc, table, seq_lens, window=window, backend="triton",
                                               **scales)

    w = f" W={window}" if window else ""
    w += " fp8" if fp8 else ""
    kv_elem = 1 if fp8 else ELEM
    return Case(f"paged decode B={len(lens)} ctx={max(lens)} Hq={hq} Hkv={hkv}{w}", family,
                f"lens={','.join(map(str, lens))} page={page} Hq={hq} Hkv={hkv} D={d}{w}", build,
                min_bytes=F.paged_decode_bytes(lens, hq, hkv, d, ELEM, page, window, kv_elem_bytes=kv_elem),
                useful_flops=F.paged_decode_flops(lens, hq, d, window),
                kv=F.paged_kv_bytes(lens, hkv, d, kv_elem, window), kv_args=("kc_ptr", "vc_ptr"),
                targets=targets or {})


def paged_append(tokens, hkv, d, page=16) -> Case:
    def build():
        import gptkernels

        blocks = -(-tokens // page) + 1
        kc = torch.zeros(blocks, page, hkv, d, dtype=DTYPE)
        vc = torch.zeros_like(kc)
        k, v = _randn(tokens, hkv, d, dtype=DTYPE), _randn(tokens, hkv, d, dtype=DTYPE, seed=1)
        slots = torch.randperm(blocks * page, generator=torch.Generator().manual_seed(2))[:tokens]
        return lambda: gptkernels.paged_append(k, v, kc, vc, slots, backend="triton")

    return Case(f"paged append T={tokens}", "paged append", f"T={tokens} page={page} Hkv={hkv} D={d}", build,
                min_bytes=F.paged_append_io_bytes(tokens, hkv, d, ELEM))


def dropout_mask_case(b, h, s, p=0.1) -> Case:
    """The kernels' dropout keep mask written out (gptkernels.triton.flash_attn.dropout_mask, the
    tests' and debuggers' view of what flash_attn(dropout_p=) drops): one int8 per (b, h, i, j)."""

    def build():
        from gptkernels.triton.flash_attn import dropout_mask

        return lambda: dropout_mask(1234, p, b, h, s, s)

    return Case(f"dropout mask B={b} H={h} S={s}", "dropout mask", f"B={b} H={h} Sq=Sk={s} p={p}", build,
                min_bytes=float(b * h * s * s))


def rotary(tokens, hq, hk, d, rot, *, interleaved=False, inplace=False) -> Case:
    def build():
        import gptkernels

        q, k = _randn(tokens, hq, d, dtype=DTYPE), _randn(tokens, hk, d, dtype=DTYPE, seed=1)
        cos, sin = gptkernels.rotary_cos_sin(rot, tokens)
        pos = torch.arange(tokens, dtype=torch.int64)
        return lambda: gptkernels.apply_rotary(q, k, cos, sin, positions=pos, interleaved=interleaved,
                                               inplace=inplace, backend="triton")

    layout = "gptj" if interleaved else "neox"
    where = "in place" if inplace else "out of place"
    return Case(f"rotary {layout} R={rot} {where}", "rotary", f"T={tokens} Hq={hq} Hk={hk} D={d} R={rot}", build,
                min_bytes=F.rotary_io_bytes(tokens, hq, hk, d, rot, ELEM, positions_bytes=8, inplace=inplace))


def quant_linear(m, n, k, *, int4=False, group_size=128, bias=True) -> Case:
    """Weight-only int8 / int4 GEMM (gptkernels.int8_linear / int4_linear): y = x @ dequant(W)^T + b."""

    def build():
        from gptkernels import quant

        w = _randn(n, k, dtype=torch.float32, seed=1)
        x = _randn(m, k, dtype=DTYPE)
        b = _randn(n, dtype=DTYPE, seed=2) if bias else None
        if int4:
            qw, sc, zp = quant.quantize_int4(w.to(DTYPE), group_size=group_size)
            return lambda: quant.int4_linear(x, qw, sc, zp, b, group_size=group_size, backend="triton")
        qw, sc = quant.quantize_int8(w.to(DTYPE))
        return lambda: quant.int8_linear(x, qw, sc, b, backend="triton")

    fmt = f"int4 g={group_size}" if int4 else "int8"
    return Case(f"{fmt} linear M={m} N={n} K={k}", "quant linear", f"M={m} N={n} K={k} {fmt}", build,
                min_bytes=F.weight_only_gemm_bytes(m, n, k, ELEM, int4=int4, group_size=group_size,
                                                   scale_bytes=ELEM, bias=bias),
                useful_flops=F.matmul_flops(m, n, k))


def fused_rotary_append(batch, hq, hkv, d, rot, page=16, fp8=False) -> Case:
    """gptkernels.decode.rotary_append: a decode step's rotary + cache append (one token per sequence),
    into a cache of the model's dtype or an fp8 one (its scales per KV head)."""

    def build():
        from gptkernels.decode import rotary_append

        import gptkernels

        blocks = batch * 4
        kc = torch.zeros(blocks, page, hkv, d, dtype=torch.float8_e4m3fn if fp8 else DTYPE)
        vc = torch.zeros_like(kc)
        scales = dict(k_scale=torch.full((hkv,), 0.05), v_scale=torch.full((hkv,), 0.05)) if fp8 else {}
        q = _randn(batch, hq, d, dtype=DTYPE)
        k, v = _randn(batch, hkv, d, dtype=DTYPE, seed=1), _randn(batch, hkv, d, dtype=DTYPE, seed=2)
        table = torch.randperm(blocks, generator=torch.Generator().manual_seed(3))[:blocks].reshape(batch, 4)
        pos = torch.arange(batch, dtype=torch.int64) * 7 + 5
        cos, sin = gptkernels.rotary_cos_sin(rot, 4 * page)
        return lambda: rotary_append(q, k, v, kc, vc, table.to(torch.int32), pos, cos, sin, backend="triton",
                                     **scales)

    fmt = " fp8 cache" if fp8 else ""
    return Case(f"fused rotary append B={batch} R={rot}{fmt}", "fused rotary append",
                f"B={batch} Hq={hq} Hkv={hkv} D={d} R={rot} page={page}{fmt}", build,
                min_bytes=F.rotary_append_bytes(batch, hq, hkv, d, rot, ELEM, cache_elem_bytes=1 if fp8 else ELEM))


def fused_add_layer_norm(rows, width, deltas=2, norms=2) -> Case:
    """gptkernels.decode.add_layer_norm: a residual add and GPT-NeoX's two LayerNorms of the sum."""

    def build():
        from gptkernels.decode import add_layer_norm

        x = _randn(rows, width, dtype=DTYPE)
        ds = [_randn(rows, width, dtype=DTYPE, seed=1 + i) for i in range(deltas)]
        ln = [(_randn(width, dtype=DTYPE, seed=5 + i), _randn(width, dtype=DTYPE, seed=7 + i), 1e-5)
              for i in range(norms)]
        return lambda: add_layer_norm(x, *ds, norms=ln, backend="triton")

    return Case(f"fused add+layernorm M={rows} C={width} deltas={deltas} norms={norms}", "fused add layernorm",
                f"M={rows} C={width}", build,
                min_bytes=F.add_layer_norm_bytes(rows, width, ELEM, deltas=deltas, norms=norms))


def fused_linear_case(m, n, k, *, norm=True, activation="gelu", residual=False, cache_heads=0) -> Case:
    """gptkernels.decode.fused_linear: a decode GEMM with its LayerNorm, bias, activation (residual);
    with ``cache_heads`` a fused q | k | v projection of heads of 64 whose k and v columns go to the
    paged cache (one token per row)."""

    def build():
        from gptkernels.decode import fused_linear

        x = _randn(m, k, dtype=DTYPE)
        w = _randn(n, k, dtype=DTYPE, seed=1)
        b = _randn(n, dtype=DTYPE, seed=2)
        ln = (_randn(k, dtype=DTYPE, seed=3), _randn(k, dtype=DTYPE, seed=4), 1e-5) if norm else None
        r = _randn(m, n, dtype=DTYPE, seed=5) if residual else None
        cache = None
        if cache_heads:
            kc = torch.zeros(4 * m, 16, cache_heads, 64, dtype=DTYPE)
            table = torch.arange(4 * m, dtype=torch.int32).reshape(m, 4)
            cache = (kc, torch.zeros_like(kc), table, torch.arange(m, dtype=torch.int64) * 5)
        return lambda: fused_linear(x, w, b, norm=ln, activation=activation, residual=r, cache=cache,
                                    backend="triton")

    what = ("LN + " if norm else "") + "GEMM" + (f" + {activation}" if activation else "") + \
        (" + residual" if residual else "") + (" + k/v to the cache" if cache_heads else "")
    return Case(f"fused linear M={m} N={n} K={k} ({what})", "fused linear", f"M={m} N={n} K={k} {what}", build,
                min_bytes=F.fused_linear_bytes(m, n, k, ELEM, norm=norm, residual=residual, cache=bool(cache_heads)),
                useful_flops=F.matmul_flops(m, n, k))


def cases() -> list[Case]:
    """The audit's cases: the shapes of issue 14's table where the interpreter can afford them (the
    ratios depend on the tile counts, not on batch or head count, which are kept small)."""
    return [
        attn_fwd(1, 2048, 2048, 1, 1, 128, targets={"flops_x": (1.10, "issue 14 item 4: causal <= 1.10x at S >= 2k")}),
        attn_fwd(1, 2048, 2048, 1, 1, 128, window=256,
                 targets={"flops_x": (1.25, "issue 14 item 4: window 256 <= 1.25x with the GPU's config")}),
        attn_fwd(1, 512, 512, 1, 1, 128, causal=False),
        attn_fwd(1, 1, 4096, 4, 1, 128, name="attn decode Sq=1 Sk=4096 Hq=4 Hkv=1", family="attention decode",
                 targets={"kv_x": (1.10, "issue 14 item 3: K/V read once per GQA group")}),
        attn_fwd(1, 16, 4096, 4, 1, 128, name="attn decode Sq=16 Sk=4096 Hq=4 Hkv=1", family="attention decode",
                 targets={"kv_x": (1.10, "issue 14 item 3: K/V read once per GQA group")}),
        attn_paged_fwd(128, 1024, 2, 1, 128),
        attn_bwd(1, 1024, 2, 1, 128),
        attn_bwd(1, 1024, 2, 1, 128, deterministic=False),
        paged_decode([2048], 8, 2, 128),
        paged_decode([2048], 2, 2, 128),
        paged_decode([2048, 300], 8, 2, 128, window=256),
        paged_decode([2048], 8, 2, 128, fp8=True),
        paged_append(256, 8, 128),
        dropout_mask_case(1, 2, 256),
        rotary(512, 8, 8, 128, 128),
        rotary(1024, 8, 2, 128, 32),
        rotary(512, 8, 8, 128, 64, interleaved=True, inplace=True),
        quant_linear(1, 2048, 2048),
        quant_linear(1, 2048, 2048, int4=True),
        quant_linear(128, 1024, 1024, int4=True),
        fused_rotary_append(4, 8, 2, 128, 32),
        fused_add_layer_norm(4, 2048),
        fused_rotary_append(4, 8, 2, 128, 32, fp8=True),
        fused_linear_case(1, 2048, 2048),
        fused_linear_case(1, 2048, 8192, norm=False, activation=None, residual=True),
        fused_linear_case(1, 3 * 1024, 1024, activation=None, cache_heads=16),
    ]


# ---- running a case -------------------------------------------------------------------------------


def kernel_modules() -> list:
    """Every module of gptkernels.triton (a new kernel module is audited, or reported as not covered)."""
    import importlib
    import pkgutil

    import gptkernels.triton as pkg

    # not _config: its INTERPRET is the package's own record of how the kernels were defined
    return [importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)
            if not m.name.startswith("_")]


def kernels() -> dict[str, object]:
    """Every Triton kernel of gptkernels.triton by name (autotuners and jitted functions that are
    launched, i.e. take a grid: ``@triton.jit`` helpers called from kernels are listed too, and told
    apart by :func:`uncovered`)."""
    from triton.runtime import Autotuner
    from triton.runtime.jit import KernelInterface

    out = {}
    for mod in kernel_modules():
        for name, obj in vars(mod).items():
            if isinstance(obj, (KernelInterface, Autotuner)) and _python_fn(obj).__module__ == mod.__name__:
                out.setdefault(name, obj)
    return out


def _python_fn(kernel):
    """The Python function under a kernel object (through autotuner, jit and interpreter wrappers)."""
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


def entry_points() -> list[str]:
    """The kernels launched from Python: every kernel of :func:`kernels` that no other kernel calls
    (the rest are ``@triton.jit`` helpers inlined into kernels: ``_visible``, ``_fwd_tiles``, ...)."""
    import inspect
    import re

    ks = kernels()
    sources = {n: inspect.getsource(_python_fn(k)) for n, k in ks.items()}
    called = {n for n in ks for m, src in sources.items() if m != n and re.search(rf"\b{n}\(", src)}
    return sorted(n for n in ks if n not in called)


def uncovered(selected: list[Case] | None = None) -> list[str]:
    """Launched kernels of gptkernels.triton that no case of ``selected`` (default: all) launches."""
    seen = set()
    for case in cases() if selected is None else selected:
        seen |= {name for name, *_ in record_launches(case)}
    return [n for n in entry_points() if n not in seen]


def is_autotuned(kernel) -> bool:
    from triton.runtime import Autotuner

    return isinstance(kernel, Autotuner)


@contextlib.contextmanager
def as_on_gpu(sms: int = AUDIT_SMS):
    """Launch decisions as on a GPU with ``sms`` SMs: the split-K policies' SM count, and the launch
    heuristics' interpreter switches (a module's ``INTERPRET`` flag, a function's ``interpret=``
    default, e.g. ``quant.tile_config``) read the GPU's values."""
    import inspect

    from gptkernels import _policy

    with contextlib.ExitStack() as stack:
        for mod in (_policy, *kernel_modules()):
            if hasattr(mod, "sm_count"):
                stack.enter_context(mock.patch.object(mod, "sm_count", lambda device, n=sms: n))
            if getattr(mod, "INTERPRET", None) is True:
                stack.enter_context(mock.patch.object(mod, "INTERPRET", False))
            for fn in vars(mod).values():
                if not inspect.isfunction(fn) or fn.__module__ != mod.__name__ or not fn.__defaults__:
                    continue
                params = [p for p in inspect.signature(fn).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][-len(fn.__defaults__):]
                if any(p.name == "interpret" and p.default is True for p in params):
                    stack.enter_context(mock.patch.object(fn, "__defaults__", tuple(
                        False if p.name == "interpret" else d for p, d in zip(params, fn.__defaults__))))
        yield


def gpu_configs(kernel, args, kwargs) -> list:
    """The configs ``kernel``'s autotuner would try on a GPU for this launch: its GPU list (kept by
    ``_config.configs`` as ``.gpu``; the list itself off the interpreter) after its own pruning with
    autotuning on, the one it takes without tuning (``GPTKERNELS_AUTOTUNE=0``) first."""
    from gptkernels.triton._config import INTERPRET

    gpu = getattr(kernel.configs, "gpu", None)
    if gpu is None:
        if INTERPRET:
            raise Refused(f"{kernel.fn.__name__}: its GPU config list is not reachable in the interpreter "
                              "(autotune configs not built with gptkernels.triton._config.configs)")
        gpu = kernel.configs
    prune = getattr(kernel, "early_config_prune", None)
    if prune is None:
        return list(gpu)
    named = dict(zip(kernel.arg_names, args))
    with mock.patch.dict(os.environ, {"GPTKERNELS_AUTOTUNE": "1"}):
        pruned = prune(list(gpu), named, **kwargs)
    with mock.patch.dict(os.environ, {"GPTKERNELS_AUTOTUNE": "0"}):
        untuned = prune(list(gpu), named, **kwargs)[:1]
    if not pruned:
        raise Refused(f"{kernel.fn.__name__}: its pruning left no GPU config for this launch")
    return untuned + [c for c in pruned if not any(_same(c, u) for u in untuned)]


def config_text(cfg=None, meta: dict | None = None) -> str:
    """How a row names its config: an autotune config's kwargs, warps and stages, or the launcher's
    BLOCK_* constexprs (a kernel that is not autotuned)."""
    if cfg is not None:
        parts = [f"{k}={v}" for k, v in cfg.kwargs.items()]
        return " ".join(parts + [f"w{cfg.num_warps}", f"s{cfg.num_stages}"])
    meta = meta or {}
    parts = [f"{k}={v}" for k, v in meta.items() if k.startswith("BLOCK_") and k not in ("BLOCK_D", "BLOCK_SIZE")]
    return "launcher: " + " ".join(parts + [f"w{meta.get('num_warps', 4)}"])


def _same(a, b) -> bool:
    return (a.kwargs, a.num_warps, a.num_stages) == (b.kwargs, b.num_warps, b.num_stages)


@contextlib.contextmanager
def _launch_policy(force: dict | None = None, only: str | None = None, seen: dict | None = None):
    """Every autotuned kernel launches with ``force[name]`` or its first GPU config (the configs it
    would try are recorded in ``seen[name]``); with ``only``, every other kernel is skipped (not run:
    its outputs stay uninitialised, which changes no count of ``only``'s: the kernels' control flow
    depends on index tensors and shapes, never on values another kernel computes)."""
    force, seen = force or {}, seen if seen is not None else {}
    with contextlib.ExitStack() as stack:
        for name, kernel in kernels().items():
            if only is not None and name != only:
                stack.enter_context(mock.patch.object(kernel, "run", lambda *a, **k: None))
                continue
            if not is_autotuned(kernel):
                continue

            def run(*args, _name=name, _kernel=kernel, **kwargs):
                tried = gpu_configs(_kernel, args, kwargs)
                if _name in seen and [config_text(c) for c in seen[_name]] != [config_text(c) for c in tried]:
                    raise Refused(f"{_name}: launches of one op would tune over different configs")
                seen[_name] = tried
                cfg = force.get(_name, tried[0])
                return _kernel.fn.run(*args, **kwargs, **cfg.all_kwargs())

            stack.enter_context(mock.patch.object(kernel, "run", run))
        yield


def _run_counted(thunk, sms: int = AUDIT_SMS, **policy):
    from .audit_counter import counting

    with as_on_gpu(sms), _launch_policy(**policy), counting() as rec, np.errstate(all="ignore"), \
            warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        thunk()
    return rec


def _figures(case: Case, launches, kernel_launches, footprint) -> dict:
    """A row's figures: the op's totals (all launches) against its minima, the kernel's own counts."""
    from .audit_counter import summarize

    op, kern = summarize(launches), summarize(kernel_launches)
    moved = op["loaded"] + op["stored"] + op["atomic"]
    fig = {
        "bytes_x": moved / case.min_bytes.value,
        "op_bytes": moved, "min_bytes": case.min_bytes.value,
        "op_launches": op["launches"],
        "kernel_loaded": kern["loaded"], "kernel_stored": kern["stored"], "kernel_atomic": kern["atomic"],
        "programs": kern["programs"], "launches": kern["launches"],
        "kernel_tile_flops": kern["tile_flops"], "dots": kern["dots"], "dot_mean_mnk": kern["dot_mean_mnk"],
        "dot_min_side": kern["dot_min_side"],
        "dot_shapes": kern["dot_shapes"], "loads_by_arg": kern["loads_by_arg"],
        "stores_by_arg": kern["stores_by_arg"], "atomics_by_arg": kern["atomics_by_arg"],
        "interp_s": kern["seconds"],
    }
    read = sum(v["read"] for v in footprint.values())
    fig["reread_x"] = kern["loaded"] / read if read else None
    if case.useful_flops is not None:
        fig["useful_flops"] = case.useful_flops.value
        fig["op_tile_flops"] = op["tile_flops"]
        fig["flops_x"] = op["tile_flops"] / case.useful_flops.value if op["tile_flops"] else None
    if case.kv is not None:
        kv = sum(v for a, v in op["loads_by_arg"].items() if set(a.split("/")) & set(case.kv_args))
        fig["kv_loaded"] = kv
        fig["kv_x"] = kv / case.kv.value
    return fig


def _row(case: Case, kernel: str, config: str, status: str, message: str = "", extra=None) -> Row:
    params = {"family": case.family, "kernel": kernel, "config": config, "shape": case.shape,
              "min_bytes_formula": case.min_bytes.formula,
              "useful_flops_formula": case.useful_flops.formula if case.useful_flops else None,
              "kv_formula": case.kv.formula if case.kv else None, "targets": case.targets}
    return Row(table=TABLE.id, case=case.name, impl=f"{kernel} [{config}]", status=status, ours=True,
               message=message, params=params, extra=extra or {})


def audit_case(case: Case, *, all_configs: bool = True, only_kernels: tuple[str, ...] | None = None,
               max_configs: int | None = None, sms: int = AUDIT_SMS) -> list[Row]:
    """Rows of one case: for each kernel it launches, one row per config (autotuned kernels: each GPU
    config its autotuner would try, or the first with ``all_configs=False``; other kernels: the
    launcher's). ``only_kernels`` restricts the rows (the op still runs whole once). ``sms``: the GPU's
    SM count the launch decisions assume (fewer SMs: fewer key splits, e.g. to keep a test fast)."""
    from .audit_counter import NotCountable

    try:
        thunk = case.build()
        seen: dict = {}
        base = _run_counted(thunk, sms, seen=seen)
    except (NotCountable, Refused) as e:
        return [_row(case, "(op)", "-", "unavailable", f"refused: {e}")]
    except Exception as e:  # the op itself failed in the interpreter: an error row, not a silent gap
        return [_row(case, "(op)", "-", "error", f"{type(e).__name__}: {str(e)[:400]}")]
    rows = []
    names = list(dict.fromkeys(la.kernel for la in base.launches))
    for name in names:
        if only_kernels is not None and name not in only_kernels:
            continue
        mine = [la for la in base.launches if la.kernel == name]
        others = [la for la in base.launches if la.kernel != name]
        if name not in seen:  # not autotuned: the launcher's own config
            rows.append(_row(case, name, config_text(meta=mine[0].meta), "pass",
                             extra=_figures(case, base.launches, mine, base.footprint(name))))
            continue
        tried = seen[name] if all_configs else seen[name][:1]
        if max_configs is not None:
            tried = tried[:max_configs]
        for i, cfg in enumerate(tried):
            text = config_text(cfg)
            if i == 0:
                rows.append(_row(case, name, text, "pass",
                                 extra=dict(_figures(case, base.launches, mine, base.footprint(name)),
                                            first_config=True)))
                continue
            try:
                rec = _run_counted(thunk, sms, force={name: cfg}, only=name)
            except (NotCountable, Refused) as e:
                rows.append(_row(case, name, text, "unavailable", f"refused: {e}"))
                continue
            except Exception as e:
                rows.append(_row(case, name, text, "error", f"{type(e).__name__}: {str(e)[:400]}"))
                continue
            rows.append(_row(case, name, text, "pass",
                             extra=_figures(case, others + rec.launches, rec.launches, rec.footprint(name))))
    return rows


# ---- sm_90a compile of the same launches (a subprocess without the interpreter) --------------------


def record_launches(case: Case) -> list[tuple]:
    """The launches ``case``'s op makes, as on a GPU, without running any kernel: [(kernel name,
    kernel, args, kwargs)]. (The op's Python code after a launch sees uninitialised outputs.)"""
    from gptkernels import _backend

    thunk = case.build()
    launches = []

    def recorder(name, kernel):
        def record(*args, **kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
            launches.append((name, kernel, args, kwargs))

        return record

    with contextlib.ExitStack() as stack:
        for name, kernel in kernels().items():
            stack.enter_context(mock.patch.object(kernel, "run", recorder(name, kernel)))
        # outside the interpreter the public ops refuse CPU tensors for Triton; nothing runs here
        # (every launch is recorded), so let them through to the launchers
        stack.enter_context(mock.patch.object(_backend, "unavailable_reason", lambda *a, **k: None))
        stack.enter_context(as_on_gpu())
        stack.enter_context(torch.no_grad())
        stack.enter_context(np.errstate(all="ignore"))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        thunk()
    return launches


def sm90_figures(selected: list[Case], all_configs: bool = True):
    """Compile every kernel launch of each case for sm_90a with each config the audit counts -> one
    dict per (case, kernel, config). Needs Triton's compiler (no TRITON_INTERPRET) and its ptxas."""
    from tools import sm90_compile as sc

    for case in selected:
        done = set()
        for name, kernel, args, kwargs in record_launches(case):
            if is_autotuned(kernel):
                tried = gpu_configs(kernel, args, kwargs)
                targets = [(cfg, config_text(cfg)) for cfg in (tried if all_configs else tried[:1])]
            else:
                targets = [(None, config_text(meta={k: v for k, v in kwargs.items()
                                                    if isinstance(v, (bool, int, float, str))}))]
            for cfg, text in targets:
                if (name, text) in done:
                    continue
                done.add((name, text))
                out = {"case": case.name, "kernel": name, "config": text}
                t0 = time.perf_counter()
                try:
                    out.update(sc.launch_figures(kernel, args, kwargs, cfg))
                except Exception as e:  # reported in the row, never a silent gap
                    out["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                out["compile_s"] = round(time.perf_counter() - t0, 2)
                yield out


def start_sm90(names: list[str], all_configs: bool):
    """Start the sm_90a compile of the cases ``names`` in a subprocess (it runs while the interpreter
    counts) -> a handle for :func:`finish_sm90`, or a string saying why it cannot run."""
    import subprocess

    try:
        from tools.sm90_compile import subprocess_env
    except Exception as e:  # tools/ or Triton's NVIDIA backend missing
        return f"offline sm_90a compile unavailable: {type(e).__name__}: {e}"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "benchmarks.suite_audit", "--sm90", json.dumps(names)]
    if not all_configs:
        cmd.append("--first-config")
    return subprocess.Popen(cmd, cwd=root, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish_sm90(handle, timeout: float) -> tuple[dict, str | None]:
    """-> ({(case, kernel, config): figures}, why nothing came back or None)."""
    import subprocess

    if isinstance(handle, str):
        return {}, handle
    try:
        out, err = handle.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        handle.kill()
        out, err = handle.communicate()
        why = f"offline sm_90a compile did not finish within {timeout:.0f} s"
    else:
        why = None if handle.returncode == 0 else \
            f"offline sm_90a compile failed (exit {handle.returncode}): {err.strip()[-300:]}"
    figs = {}
    for line in out.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        figs[(d["case"], d["kernel"], d["config"])] = d
    return figs, why


SM90_KEYS = ("regs", "spill", "shared", "blocks_per_sm", "limited_by", "wgmma", "mma_sync", "tma", "error")


def attach_sm90(rows: list[Row], figs: dict, why: str | None) -> None:
    for r in rows:
        if r.status != "pass":
            continue
        d = figs.get((r.case, r.params["kernel"], r.params["config"]))
        if d is None:
            r.extra["sm90"] = {"error": why or "not compiled"}
        else:
            r.extra["sm90"] = {k: d[k] for k in SM90_KEYS if k in d}


# ---- the suite ------------------------------------------------------------------------------------


def run(selected: list[Case] | None = None, *, all_configs: bool = True, sm90: bool = True,
        launches: bool = True, progress=None, sm90_timeout: float = 900.0) -> tuple[list[Row], list[Table]]:
    """Audit ``selected`` (default: :func:`cases`) -> (rows, tables): the kernel table and, with
    ``launches``, the decode-step launch counts of every model family."""
    from . import audit_launches

    selected = cases() if selected is None else selected
    handle = start_sm90([c.name for c in selected], all_configs) if sm90 else None
    rows: list[Row] = []
    try:
        for case in selected:
            t0 = time.perf_counter()
            rows += audit_case(case, all_configs=all_configs)
            if progress is not None:
                progress(case, time.perf_counter() - t0)
    except BaseException:  # interrupted: do not leave the compile running
        if handle is not None and not isinstance(handle, str):
            handle.kill()
        raise
    if len(selected) == len(cases()):  # the whole audit: say which kernels no case launched
        for name in uncovered(selected):
            rows.append(Row(table=TABLE.id, case="(no case)", impl=name, status="unavailable", ours=True,
                            message="refused: no audit case launches this kernel yet (add one to "
                                    "benchmarks/suite_audit.cases())", params={"kernel": name, "config": "-"}))
    tables = [TABLE]
    if launches:
        rows += audit_launches.rows()
        tables.append(audit_launches.TABLE)
    if handle is not None:
        figs, why = finish_sm90(handle, sm90_timeout)
        attach_sm90([r for r in rows if r.table == TABLE.id], figs, why)
    return rows, tables


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_table(rows: list[Row]) -> str:
    """The audit as a plain-text table (what ``benchmarks.run --suite audit`` prints)."""
    head = (f"{'case':42s} {'kernel [config]':52s} {'bytes':>7s} {'K/V':>7s} {'FLOPs':>7s} "
            f"{'mean MxNxK':>13s} {'atomic':>9s} {'regs':>5s} {'spill':>6s} {'smem':>7s} {'blk/SM':>6s} tc")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.table != TABLE.id:
            continue
        if r.status != "pass":
            lines.append(f"{r.case[:42]:42s} {r.impl[:52]:52s} {r.status.upper()}: {r.message}")
            continue
        e = r.extra
        mnk = "x".join(f"{v:.0f}" for v in e["dot_mean_mnk"]) if e.get("dot_mean_mnk") else "-"
        s = e.get("sm90") or {}
        if "regs" in s:
            tc = "wgmma" if s.get("wgmma") else "mma" if s.get("mma_sync") else "-"
            tc += "+tma" if s.get("tma") else ""
            cc = (f"{s['regs']:>5} {s['spill'] if s['spill'] is not None else '-':>6} {s['shared']:>7} "
                  f"{s['blocks_per_sm']:>6} {tc}")
        else:
            cc = f"sm_90a: {s.get('error', 'not compiled')}"[:60]
        lines.append(f"{r.case[:42]:42s} {r.impl[:52]:52s} {_ratio(e['bytes_x']):>7s} {_ratio(e.get('kv_x')):>7s} "
                     f"{_ratio(e.get('flops_x')):>7s} {mnk:>13s} {e['kernel_atomic']:>9} {cc}")
    return "\n".join(lines)


def run_cli(args) -> int:
    """``python -m benchmarks.run --suite audit`` (and, without a GPU, ``--suite all`` after the parity
    sweep): audit every case, print the tables, write ``audit-<time>.json`` under ``--out``. Exit
    status 1 when a kernel raised in the interpreter (a refused config is reported, not a failure)."""
    from pathlib import Path

    from . import audit_launches, results
    from .env import environment

    if "triton" not in sys.modules:  # the audit always counts in the interpreter, GPU or not
        os.environ["TRITON_INTERPRET"] = "1"
    from gptkernels._backend import triton_interpret

    if not triton_interpret():
        print("audit: needs the Triton interpreter, but triton was imported without TRITON_INTERPRET=1: "
              "run `TRITON_INTERPRET=1 python -m benchmarks.run --suite audit`", file=sys.stderr)
        return 2
    start = time.monotonic()
    bar = None if getattr(args, "no_progress", False) else \
        (lambda case, sec: print(f"audit: {case.name} ({sec:.0f} s wall, {time.process_time():.0f} s CPU so far)",
                                 file=sys.stderr, flush=True))
    rows, tables = run(progress=bar)
    doc = results.new_document("audit", environment(), suites=["audit"], quick=bool(getattr(args, "quick", False)),
                               ceilings=None, tables=tables, rows=rows, duration_s=time.monotonic() - start,
                               notes=["Work counts in the Triton interpreter: exact, no timing; sm_90a figures "
                                      "from an offline compile."])
    path = results.save(doc, Path(args.out) / f"audit-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json")
    print()
    print(format_table(rows))
    print()
    print(audit_launches.format_table(rows))
    bad = [r for r in rows if r.status in ("error", "fail")]
    refused = [r for r in rows if r.status == "unavailable"]
    print(f"\nwrote {path}\nWork audit: {sum(r.status == 'pass' for r in rows)} rows counted, {len(refused)} "
          f"refused, {len(bad)} failed, in {time.monotonic() - start:.0f} s (no timing: counts are exact).")
    return 1 if bad else 0


def main(argv=None) -> int:
    """``--sm90 NAMES_JSON [--first-config]``: the compile subprocess (JSON lines on stdout)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.suite_audit")
    ap.add_argument("--sm90", metavar="NAMES_JSON", required=True,
                    help="compile the launches of these cases for sm_90a (the audit's subprocess)")
    ap.add_argument("--first-config", action="store_true")
    args = ap.parse_args(argv)
    wanted = set(json.loads(args.sm90))
    for fig in sm90_figures([c for c in cases() if c.name in wanted], all_configs=not args.first_config):
        print(json.dumps(fig), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
