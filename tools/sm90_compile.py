"""Compile the Triton kernels for an H100 (sm_90a) on a machine without a GPU.

The CPU interpreter never runs Triton's compiler, so this is how CI proves the kernels compile for
Hopper and lower as their notes say. It prints one JSON line per compiled kernel and is run in a
subprocess (TRITON_INTERPRET must be unset here: Triton reads it when the kernels are defined) by

* ``tests/test_flash_attn.py::test_compiles_for_hopper`` (``--kernels flash``, the default): wgmma
  tensor cores and pipelined loads (cp.async);
* ``tests/test_paged_ops.py::test_compiles_for_hopper`` (``--kernels paged``) and
  ``tests/test_rotary.py::test_compiles_for_hopper`` (``--kernels rotary``): 16-byte vector loads
  (notes/paged.md, notes/rotary.md) and, for the decode dot path, which tensor-core instruction.

Nothing runs on a GPU, also when one is present: the target is always sm_90a.

The work audit (``benchmarks/suite_audit.py``, notes/audit.md) compiles the very launches it counts
in the interpreter with :func:`launch_figures`: registers, spills, shared memory, resident blocks
per SM (:func:`resident_blocks`) and which tensor-core / TMA instructions were emitted.

By hand, with register/spill figures from ptxas (the tables in notes/attention.md):

    python -m tools.sm90_compile --all-configs --ptxas
    python -m tools.sm90_compile --kernels paged rotary --all-configs --ptxas
"""

from __future__ import annotations

import argparse
import json
import linecache
import os
import re
import subprocess
import sys
import tempfile
from unittest import mock

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

from gptkernels.triton import flash_attn as fa
from gptkernels.triton import paged as pg
from gptkernels.triton import rotary as ro

#: What ``compile_sm90``/``compile_launch`` target: an H100 (Triton compiles capability 90 as sm_90a).
SM90 = GPUTarget("cuda", 90, 32)
#: Shared memory per block on an H100 (227 KiB usable of 228).
SM90_SHARED = 227 * 1024

_INDEX_ARGS = {"cu_q", "cu_k", "seqlens_k", "block_table"}
_FP32_ARGS = {"Lse", "Delta", "DLse", "DQacc", "Opart", "Lpart", "Slopes"}


def compile_sm90(kernel, row, constexprs, elem="bf16"):
    """Compile ``kernel`` with config ``row`` (BLOCK_M, BLOCK_N, warps, stages) for sm_90a, with the
    specialisation a real launch gets: unit last-dim strides become constants, pointers and the
    other strides are 16-divisible."""
    fn = kernel.fn
    consts = dict(constexprs, BLOCK_M=row[0], BLOCK_N=row[1])
    # constexpr parameters with a default (KV_SCALED, ROW64, TAIL): as a launch that omits them
    consts.update({p.name: p.default for p in fn.params
                   if p.is_constexpr and p.has_default and p.name not in consts})
    consts.update({n: 1 for n in fn.arg_names if n.startswith("stride_") and n.endswith("d")})
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in _INDEX_ARGS:
            sig[name] = "*i32"
        elif name in _FP32_ARGS:
            sig[name] = "*fp32"
        elif name[0].isupper():
            sig[name] = "*" + elem
        else:
            sig[name] = "fp32" if name.endswith("scale") else "i32"
        if sig[name].startswith("*") or (name.startswith("stride_") and sig[name] == "i32"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs=attrs)
    return triton.compile(src, target=SM90, options={"num_warps": row[2], "num_stages": row[3]})


def ptxas_usage(ptx: str) -> dict:
    """Registers and spill bytes that ptxas reports for ``ptx`` (Triton's bundled ptxas)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:  # private: tests may run side by side
        f.write(ptx)
        f.flush()
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return {"regs": int(regs.group(1)) if regs else None, "spill": int(spill.group(1)) if spill else None}


#: Cases with the score modifiers on (softcap and ALiBi: SOFTCAP / ALIBI, off by default), compiled
#: only when named (``--flash-cases``): the default run is the default path's.
MOD_CASES = ("fwd_mods", "fwd_packed_mods", "dkdv_mods", "dkdv_atomic_dq_mods", "dq_mods")


def cases(head_dim=80, elem="bf16"):
    """(name, kernel, table, constexprs): every kernel, the forward both dense-varlen and paged; and
    (:data:`MOD_CASES`) the forward, packed forward and backward with softcap and ALiBi on."""
    block_d = fa._block_d(head_dim)
    common = dict(CAUSAL=True, HAS_WINDOW=True, BOTTOM_RIGHT=True, VARLEN_Q=True, PAGED=False,
                  HEAD_DIM=head_dim, BLOCK_D=block_d,
                  PRECISION="ieee" if elem == "fp32" else "tf32")
    fwd = dict(common, KV_SCALED=False)  # KV_SCALED: an fp8 paged cache (forward only)
    default = [
        ("fwd", fa._fwd_kernel, fa._FWD_TABLE, dict(fwd, VARLEN_K=True, PAGE=1, SPLIT=False)),
        ("fwd_split", fa._fwd_kernel, fa._FWD_TABLE, dict(fwd, VARLEN_K=True, PAGE=1, SPLIT=True)),
        ("fwd_decode", fa._fwd_kernel, fa._FWD_DECODE_TABLE, dict(fwd, VARLEN_K=True, PAGE=1, SPLIT=True)),
        # a GQA group's query heads packed into the 16-row decode tile (flash_attn with few rows)
        ("fwd_packed", fa._fwd_kernel, fa._FWD_DECODE_TABLE, dict(fwd, VARLEN_K=True, PAGE=1, SPLIT=True,
                                                                  PACK_GQA=True)),
        ("fwd_paged", fa._fwd_kernel, fa._FWD_TABLE, dict(fwd, VARLEN_K=False, PAGED=True, PAGE=16,
                                                          SPLIT=False)),
        ("dkdv", fa._bwd_dkdv, fa._DKDV_TABLE, dict(common, ATOMIC_DQ=False)),
        ("dkdv_atomic_dq", fa._bwd_dkdv, fa._DKDV_ATOMIC_TABLE, dict(common, ATOMIC_DQ=True)),
        ("dq", fa._bwd_dq, fa._DQ_TABLE, common),
    ]
    mods = dict(SOFTCAP=True, ALIBI=True)
    base = {name: (kernel, table, consts) for name, kernel, table, consts in default}
    return default + [(name, base[name[:-5]][0], base[name[:-5]][1], dict(base[name[:-5]][2], **mods))
                      for name in MOD_CASES]


# --------------------------------------------------------------------------------------------------
# Paged and rotary kernels: compiled from the arguments their own launchers pass
# --------------------------------------------------------------------------------------------------

_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


class _Recorder:
    """Stands in for a kernel in its module: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def record_launches(module, names, launcher, *args, **kwargs):
    """Call ``launcher`` (on CPU tensors) with the kernels ``names`` of ``module`` replaced by
    recorders -> [(kernel, args, kwargs)]: the launches it makes, with its own arguments, run none."""
    launches = []
    patches = [mock.patch.object(module, n, _Recorder(getattr(module, n), launches)) for n in names]
    for patch in patches:
        patch.start()
    try:
        launcher(*args, **kwargs)
    finally:
        for patch in patches:
            patch.stop()
    return launches


def compile_launch(kernel, args, kwargs, config=None):
    """Compile one recorded launch for sm_90a, specialised as Triton's launcher does it (with
    Triton's own rule): ints equal to 1 (unit strides) become constants, 16-divisible ints and
    16-byte aligned pointers are marked so. ``config``: the autotune config of an autotuned kernel.
    -> (compiled kernel, its constexpr values)."""
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    values = dict(zip(fn.arg_names, args))
    values.update((k, v) for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS)
    options = {k: v for k, v in kwargs.items() if k in _LAUNCH_OPTIONS}
    if config is not None:
        values.update(config.kwargs)
        options.update(num_warps=config.num_warps, num_stages=config.num_stages)
    sig, consts, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            # a constexpr the launcher leaves at its default (e.g. HEAD_DIM_V when Dv == D)
            sig[name], consts[(i,)] = "constexpr", values[name] if name in values else param.default
            continue
        ty, key = native_specialize_impl(CUDABackend, values[name], False, True, True)
        sig[name] = ty
        if ty == "constexpr":
            consts[(i,)] = key
        elif isinstance(key, str) and CUDABackend.parse_attr(key):
            attrs[(i,)] = CUDABackend.parse_attr(key)
    compiled = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=SM90,
                              options=options)
    return compiled, {fn.arg_names[i[0]]: v for i, v in consts.items()}


_LLIR_FILE = re.compile(r'^!(\d+) = !DIFile\(filename: "([^"]*)", directory: "([^"]*)"', re.M)
_LLIR_SCOPE = re.compile(r"^!(\d+) = (?:distinct )?!DI(?:Subprogram|LexicalBlockFile)\(.*?\bfile: !(\d+)",
                         re.M)
_LLIR_LOC = re.compile(r"^!(\d+) = !DILocation\(line: (\d+),(?: column: \d+,)? scope: !(\d+)", re.M)
_LLIR_LOAD = re.compile(r'asm sideeffect "[^"]*?\b(ld\.global[\w.:]*|cp\.async\.c[ag]\.shared\.global)'
                        r'([^"]*)".*!dbg !(\d+)')


def global_loads(llir: str) -> list[tuple[str, int]]:
    """(source line, bytes per thread) of every global load of a compiled kernel, from its LLVM IR
    (``compiled.asm["llir"]``: Triton writes each load as the inline PTX that ends up in the PTX, and
    LLVM's debug locations, unlike PTX's .loc, stay on the instruction): ``ld.global`` with its
    vector width, and ``cp.async`` copies to shared memory with their copy size."""
    files = {n: os.path.join(d, f) for n, f, d in _LLIR_FILE.findall(llir)}
    scope_file = dict(_LLIR_SCOPE.findall(llir))
    locs = {n: (files.get(scope_file.get(scope), ""), int(line))
            for n, line, scope in _LLIR_LOC.findall(llir)}
    loads = []
    for op, operands, dbg in _LLIR_LOAD.findall(llir):
        if op.startswith("cp.async"):  # [dst], [src], bytes, src bytes
            size = int(operands.split(",")[2].strip(), 0)
        else:
            vec = re.search(r"\.v(\d+)\.", op)
            size = (int(vec.group(1)) if vec else 1) * int(re.search(r"(\d+)$", op).group(1)) // 8
        loads.append((linecache.getline(*locs.get(dbg, ("", 0))).strip(), size))
    return loads


#: Each kernel's bulk loads (its K/V, q/k or partial-output tiles: `tl.load(<pointer> ...` in its
#: source). notes/paged.md promises 16-byte vectors for append's and decode's (cp.async.cg copies
#: on the dot path), notes/rotary.md for the rotary q/k loads; the merge's are reported, not promised.
BULK_POINTERS = {"append": ("k_ptr", "v_ptr"), "decode": ("k_head", "v_head"), "merge": ("o_row",),
                 "rotary": ("x_row",)}


def bulk_load_sizes(name: str, llir: str) -> list[int]:
    """The distinct sizes (bytes per thread) of kernel ``name``'s bulk loads in its LLVM IR."""
    pattern = re.compile(r"tl\.load\(\s*(%s)\b" % "|".join(BULK_POINTERS[name]))
    sizes = sorted({size for source, size in global_loads(llir) if pattern.search(source)})
    if not sizes:
        raise RuntimeError(f"{name}: no load from {BULK_POINTERS[name]} found in the LLVM IR: renamed "
                           "(update BULK_POINTERS), or no line info (TRITON_DISABLE_LINE_INFO set)?")
    return sizes


def paged_launches(head_dim=128, dtypes=("bf16", "fp16")):
    """(kernel name, case, launch) of the paged launchers for pages of 16 and 8 KV heads: decode
    with group 1 (broadcast path) and 4 (tl.dot path) over a 4096-token context in 4 splits (so the
    merge runs too), and an append of 17 tokens."""
    out = []
    for dt in dtypes:
        dtype, hkv, block = _TORCH_DTYPES[dt], 8, 16
        k_cache = torch.empty(64, block, hkv, head_dim, dtype=dtype)
        v_cache = torch.empty_like(k_cache)
        for group in (1, 4):
            q = torch.empty(4, hkv * group, head_dim, dtype=dtype)
            table = torch.zeros(4, 4096 // block, dtype=torch.int32)
            lens = torch.full((4,), 4096, dtype=torch.int32)
            for kernel, args, kwargs in record_launches(
                    pg, ("_paged_decode_kernel", "_paged_merge_kernel"), pg.paged_decode,
                    q, k_cache, v_cache, table, lens, softmax_scale=head_dim ** -0.5, window=None,
                    num_splits=4):
                name = "decode" if kernel is pg._paged_decode_kernel else "merge"
                out.append((name, {"dtype": dt, "group": group}, (kernel, args, kwargs)))
        k = torch.empty(17, hkv, head_dim, dtype=dtype)
        for launch in record_launches(pg, ("_paged_append_kernel",), pg.paged_append, k,
                                      torch.empty_like(k), k_cache, v_cache,
                                      torch.zeros(17, dtype=torch.int64)):
            out.append(("append", {"dtype": dt}, launch))
    return out


def rotary_launches(head_dim=128, dtypes=("bf16", "fp16")):
    """(kernel name, case, launch) of the rotary launcher for 4096 tokens of 32 q and 8 k heads with
    a positions tensor, out of place: GPT-NeoX and GPT-J layouts, rotary dim = head dim and a
    partial one (head dim / 4: Pythia's rotary_pct 0.25 at 128, GPT-J's 64 of 256)."""
    out = []
    tokens, hq, hk = 4096, 32, 8
    partial = max(2, head_dim // 8 * 2)
    for dt in dtypes:
        dtype = _TORCH_DTYPES[dt]
        q = torch.empty(tokens, hq, head_dim, dtype=dtype)
        k = torch.empty(tokens, hk, head_dim, dtype=dtype)
        for interleaved in (False, True):
            for rot in (head_dim, partial):
                cos = torch.empty(tokens, rot // 2, dtype=torch.float32)
                case = {"dtype": dt, "layout": "gptj" if interleaved else "neox", "rot_dim": rot}
                for launch in record_launches(
                        ro, ("_rotary_kernel",), ro.apply_rotary, q, k, cos, torch.empty_like(cos),
                        positions=torch.arange(tokens), offset=0, interleaved=interleaved,
                        inplace=False, conjugate=False):
                    out.append(("rotary", case, launch))
    return out


def launch_results(launches, all_configs=False, ptxas=False):
    """Compile every launch (an autotuned kernel: its first config, or all) -> JSON-ready dicts."""
    for name, case, (kernel, args, kwargs) in launches:
        configs = kernel.configs if isinstance(kernel, triton.runtime.Autotuner) else [None]
        for config in configs if all_configs else configs[:1]:
            compiled, consts = compile_launch(kernel, args, kwargs, config)
            ptx = compiled.asm["ptx"]
            sizes = bulk_load_sizes(name, compiled.asm["llir"])
            result = {
                "kernel": name, "case": case,
                "config": dict({k: v for k, v in consts.items() if k.startswith("BLOCK_")},
                               num_warps=compiled.metadata.num_warps,
                               num_stages=compiled.metadata.num_stages),
                "shared": compiled.metadata.shared,
                "vec16": sizes == [16],  # every bulk load a 16-byte vector (or 16-byte cp.async)
                "bulk_load_bytes": sizes,
                "tensor_cores": "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else None,
                "pipelined": "async_copy_global_to_local" in compiled.asm["ttgir"],
            }
            if ptxas:
                result.update(ptxas_usage(ptx))
            yield result


# --------------------------------------------------------------------------------------------------
# Occupancy and instruction figures of one launch (the work audit, benchmarks/suite_audit.py)
# --------------------------------------------------------------------------------------------------

#: An H100/H200 SM (compute capability 9.0, CUDA occupancy calculator): threads, resident blocks,
#: 32-bit registers, register allocation unit per warp, shared memory (per SM, and the 1 KiB the
#: driver reserves per block).
SM90_LIMITS = {"threads": 2048, "blocks": 32, "regs": 65536, "reg_unit": 256, "shared": 228 * 1024,
               "shared_reserved": 1024}


def resident_blocks(regs: int | None, num_warps: int, shared: int) -> tuple[int | None, str]:
    """Blocks of a kernel that fit on one sm_90 SM at once, and the limit that binds ("threads",
    "blocks", "registers", "shared"). ``regs`` per thread (ptxas; None: unknown -> (None, ...))."""
    lim = SM90_LIMITS
    if regs is None:
        return None, "registers unknown (no ptxas)"
    per_warp = -(-regs * 32 // lim["reg_unit"]) * lim["reg_unit"]
    bounds = {"threads": lim["threads"] // (32 * num_warps), "blocks": lim["blocks"],
              "registers": lim["regs"] // (per_warp * num_warps),
              "shared": lim["shared"] // (shared + lim["shared_reserved"])}
    binding = min(bounds, key=bounds.get)
    return bounds[binding], binding


def instructions(ptx: str) -> dict:
    """Which tensor-core and copy instructions the PTX holds: wgmma (Hopper tensor cores), mma.sync
    (Ampere-style), TMA (cp.async.bulk.tensor), cp.async (pipelined loads)."""
    return {"wgmma": "wgmma.mma_async" in ptx, "mma_sync": "mma.sync" in ptx,
            "tma": "cp.async.bulk.tensor" in ptx, "cp_async": "cp.async.c" in ptx}


def launch_figures(kernel, args, kwargs, config=None) -> dict:
    """Compile one launch for sm_90a (:func:`compile_launch`) -> registers, spill bytes, shared
    memory, resident blocks per SM (and the binding limit), warps, stages, instructions."""
    compiled, _ = compile_launch(kernel, args, kwargs, config)
    ptx = compiled.asm["ptx"]
    usage = ptxas_usage(ptx)
    blocks, limit = resident_blocks(usage["regs"], compiled.metadata.num_warps, compiled.metadata.shared)
    return {**usage, "shared": compiled.metadata.shared, "num_warps": compiled.metadata.num_warps,
            "num_stages": compiled.metadata.num_stages, "blocks_per_sm": blocks, "limited_by": limit,
            **instructions(ptx)}


def subprocess_env() -> dict:
    """The environment of a compile subprocess: without TRITON_INTERPRET (the tests set it on CPU;
    Triton reads it when the kernels are defined) and with line info (``global_loads`` needs it)."""
    drop = ("TRITON_INTERPRET", "TRITON_DISABLE_LINE_INFO")
    return {k: v for k, v in os.environ.items() if k not in drop}


def compile_in_subprocess(*flags, timeout=600) -> list[dict]:
    """Run this script with ``flags`` in a fresh process without TRITON_INTERPRET (the tests set it on
    CPU; Triton reads it when the kernels are defined) and with line info (``global_loads`` needs it)
    -> its JSON lines."""
    env = subprocess_env()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "tools.sm90_compile", *flags], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def main_flash(head_dim, dtype, all_configs, ptxas, only=None):
    """The flash-attention kernels at ``head_dim``/``dtype``, from their config tables (``only``:
    these cases of :func:`cases`)."""
    bucket = (dtype == "fp32", min(max(fa._block_d(head_dim), 64), 256))
    for name, kernel, table, constexprs in cases(head_dim, dtype):
        if (only and name not in only) or (not only and name in MOD_CASES):
            continue
        rows = table[bucket] if all_configs else table[bucket][:1]
        for row in rows:
            compiled = compile_sm90(kernel, row, constexprs, dtype)
            result = {
                "kernel": name, "config": row, "shared": compiled.metadata.shared,
                "wgmma": "wgmma" in compiled.asm["ptx"],
                "mma_sync": "mma.sync" in compiled.asm["ptx"],
                "pipelined": "async_copy_global_to_local" in compiled.asm["ttgir"],
                # global float32 adds: "red" (no result used) or "atom" instructions, without CAS loops
                "atomics": sorted(set(re.findall(r"\b(?:red|atom)\.global[.\w]*", compiled.asm["ptx"]))),
            }
            if ptxas:
                result.update(ptxas_usage(compiled.asm["ptx"]))
            print(json.dumps(result), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", nargs="+", default=["flash"], choices=["flash", "paged", "rotary"])
    ap.add_argument("--head-dim", type=int, default=None, help="default: 80 (flash), 128 (others)")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                    help="default: bf16 (flash), bf16 and fp16 (others)")
    ap.add_argument("--all-configs", action="store_true", help="every listed config, not the first")
    ap.add_argument("--ptxas", action="store_true", help="add ptxas register/spill figures")
    ap.add_argument("--flash-cases", nargs="+", default=None, metavar="CASE",
                    help="only these flash cases (the names of cases(): fwd, dkdv, dq, ...)")
    args = ap.parse_args(argv)
    if "flash" in args.kernels:
        main_flash(args.head_dim or 80, args.dtype or "bf16", args.all_configs, args.ptxas, args.flash_cases)
    dtypes = (args.dtype,) if args.dtype else ("bf16", "fp16")
    launches = []
    if "paged" in args.kernels:
        launches += paged_launches(args.head_dim or 128, dtypes)
    if "rotary" in args.kernels:
        launches += rotary_launches(args.head_dim or 128, dtypes)
    for result in launch_results(launches, args.all_configs, args.ptxas):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
