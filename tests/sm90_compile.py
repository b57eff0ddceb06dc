"""Compile the flash-attention kernels for an H100 (sm_90a) on a machine without a GPU.

The CPU interpreter never runs Triton's compiler, so this is how CI proves the kernels compile for
Hopper, use wgmma tensor cores and pipeline their loads (cp.async). It is run in a subprocess by
``tests/test_flash_attn.py::test_compiles_for_hopper`` (TRITON_INTERPRET must be unset here: Triton
reads it when the kernels are defined).

By hand, with register/spill figures from ptxas (the tables in notes/attention.md):

    python -m tests.sm90_compile --all-configs --ptxas
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gptkernels.kernels import flash_attn as fa

_INDEX_ARGS = {"cu_q", "cu_k", "seqlens_k", "block_table"}
_FP32_ARGS = {"Lse", "Delta", "DLse"}


def compile_sm90(kernel, row, constexprs, elem="bf16"):
    """Compile ``kernel`` with config ``row`` (BLOCK_M, BLOCK_N, warps, stages) for sm_90a, with the
    specialisation a real launch gets: unit last-dim strides become constants, pointers and the
    other strides are 16-divisible."""
    fn = kernel.fn
    consts = dict(constexprs, BLOCK_M=row[0], BLOCK_N=row[1])
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
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": row[2], "num_stages": row[3]})


def ptxas_usage(ptx: str) -> dict:
    """Registers and spill bytes that ptxas reports for ``ptx`` (Triton's bundled ptxas)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    path = "/tmp/gptkernels_sm90_check.ptx"
    with open(path, "w") as f:
        f.write(ptx)
    out = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.devnull],
                         capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return {"regs": int(regs.group(1)) if regs else None, "spill": int(spill.group(1)) if spill else None}


def cases(head_dim=80, elem="bf16"):
    """(name, kernel, table, constexprs): every kernel, the forward both dense-varlen and paged."""
    block_d = fa._block_d(head_dim)
    common = dict(CAUSAL=True, HAS_WINDOW=True, BOTTOM_RIGHT=True, VARLEN_Q=True, PAGED=False,
                  HEAD_DIM=head_dim, BLOCK_D=block_d,
                  PRECISION="ieee" if elem == "fp32" else "tf32")
    return [
        ("fwd", fa._fwd_kernel, fa._FWD_TABLE, dict(common, VARLEN_K=True, PAGE=1)),
        ("fwd_paged", fa._fwd_kernel, fa._FWD_TABLE, dict(common, VARLEN_K=False, PAGED=True, PAGE=16)),
        ("dkdv", fa._bwd_dkdv, fa._DKDV_TABLE, common),
        ("dq", fa._bwd_dq, fa._DQ_TABLE, common),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dim", type=int, default=80)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--all-configs", action="store_true", help="every listed config, not the first")
    ap.add_argument("--ptxas", action="store_true", help="add ptxas register/spill figures")
    args = ap.parse_args(argv)
    bucket = (args.dtype == "fp32", min(max(fa._block_d(args.head_dim), 64), 256))
    for name, kernel, table, constexprs in cases(args.head_dim, args.dtype):
        rows = table[bucket] if args.all_configs else table[bucket][:1]
        for row in rows:
            compiled = compile_sm90(kernel, row, constexprs, args.dtype)
            result = {
                "kernel": name, "config": row, "shared": compiled.metadata.shared,
                "wgmma": "wgmma" in compiled.asm["ptx"],
                "pipelined": "async_copy_global_to_local" in compiled.asm["ttgir"],
            }
            if args.ptxas:
                result.update(ptxas_usage(compiled.asm["ptx"]))
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
