"""Builds the CPU emulation of the CUDA extension: the csrc sources, unchanged, compiled by the host
compiler with this folder's emulator headers shadowing three small csrc headers (common/mma.cuh,
common/launch.cuh, common/torch_cuda.h). The ops register as torch.ops.gptkernels_emu.* and take
CPU tensors; tests/test_cuda_emulated.py runs them against the float64 reference.

The build adds what makes GPU-only bugs show on the CPU (emu_runtime.h says what each one catches):
UBSan's alignment and signed-overflow checks (handled in emu_runtime.h, no sanitizer runtime),
pattern-filled locals, a linker-script fragment (emu_shared.ld) that gathers the static __shared__
arrays so that every block starts with them poisoned, and self-test kernels (selftest.cpp).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import glob
import importlib.util
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
NAMESPACE = "gptkernels_emu"


def _sources(build_dir: str) -> list[str]:
    """csrc's .cpp files as they are, one wrapper .cpp per .cu file (the host compiler builds it), and
    the emulator's self-test kernels (selftest.cpp: torch.ops.gptkernels_emu.selftest)."""
    srcs = sorted(glob.glob(os.path.join(CSRC, "**", "*.cpp"), recursive=True))
    srcs.append(os.path.join(HERE, "selftest.cpp"))
    wrap_dir = os.path.join(build_dir, "cu_as_cpp")
    os.makedirs(wrap_dir, exist_ok=True)
    for cu in sorted(glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True)):
        rel = os.path.relpath(cu, CSRC)
        path = os.path.join(wrap_dir, rel.replace(os.sep, "__")[:-3] + ".cpp")
        text = f'#include "{cu}"\n'
        if not os.path.exists(path) or open(path).read() != text:  # keep mtimes: ninja rebuilds less
            with open(path, "w") as f:
                f.write(text)
        srcs.append(path)
    return srcs


def _setup_module():
    """The repo's setup.py as a module (it builds nothing when imported)."""
    spec = importlib.util.spec_from_file_location("gptkernels_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_include_dir() -> str:
    """Where cuda_fp16.h / cuda_runtime.h live: $CUDA_HOME, nvcc's own toolkit (setup.py finds it the
    same way), or the CUDA wheels of torch (site-packages/nvidia/cu*/include). The emulator uses only
    these headers' host code."""
    import torch

    cands = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    home = _setup_module()._toolkit_from_nvcc()
    if home:
        cands.append(os.path.join(home, "include"))
    site = os.path.dirname(os.path.dirname(torch.__file__))
    cands += sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
    for d in cands:
        if os.path.exists(os.path.join(d, "cuda_fp16.h")) and os.path.exists(os.path.join(d, "cuda_runtime.h")):
            return d
    raise RuntimeError(f"the CUDA headers (cuda_fp16.h, cuda_runtime.h) were not found in any of {cands}")


def _cxx_accepts(flag: str) -> bool:
    """Whether the host compiler (torch's: $CXX or c++) knows `flag` (g++ < 12 lacks some)."""
    cmd = [os.environ.get("CXX", "c++"), flag, "-x", "c++", "-fsyntax-only", "-"]
    return subprocess.run(cmd, input="int main() {}\n", capture_output=True, text=True).returncode == 0


@functools.lru_cache(maxsize=None)
def load(verbose: bool = False):
    """Builds (once; ninja makes rebuilds incremental) and loads the emulator; returns its op namespace."""
    import torch
    from torch.utils.cpp_extension import load as load_ext

    build_dir = os.environ.get("GPTKERNELS_EMU_BUILD_DIR") or os.path.join(ROOT, "build", "cuda_emulator")
    os.makedirs(build_dir, exist_ok=True)
    with _exclusive_build(build_dir):
        _load(load_ext, build_dir, verbose)
    return getattr(torch.ops, NAMESPACE)


@contextlib.contextmanager
def _exclusive_build(build_dir: str):
    """One builder at a time (xdist workers), under an OS lock that dies with its process.

    Older torch (2.11, the GPU image's) guards the build with a ``lock`` file whose mere existence
    blocks every later build: one left by a killed build (a device call's time limit) or by newer
    torch (which keeps it as an flock file) would hang the next run forever. Under our lock nobody
    else is building, so any ``lock`` file there is stale and is removed.
    """
    with open(os.path.join(build_dir, ".gptkernels_emu.flock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(build_dir, "lock"))
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load(load_ext, build_dir: str, verbose: bool) -> None:
    load_ext(
        name="gptkernels_emu",
        sources=_sources(build_dir),
        extra_include_paths=[HERE, CSRC, _cuda_include_dir()],  # HERE first: its headers shadow csrc's
        extra_cflags=["-O2", "-include", os.path.join(HERE, "emu_runtime.h"),
                      f"-DGPTKERNELS_OPS_NAMESPACE={NAMESPACE}", "-Wno-unused-function",
                      # What a GPU faults on (or silently gets wrong) fails here: misaligned typed
                      # accesses (vector loads) and signed int overflow in kernel code reach the
                      # handlers in emu_runtime.h (no sanitizer runtime is linked); uninitialized
                      # locals get a garbage pattern instead of whatever the stack held.
                      "-fsanitize=alignment,signed-integer-overflow",
                      *[f for f in ["-ftrivial-auto-var-init=pattern"] if _cxx_accepts(f)]],
        extra_ldflags=["-lpthread", "-Wl,-T," + os.path.join(HERE, "emu_shared.ld")],
        build_directory=build_dir,
        with_cuda=False,
        verbose=verbose,
    )
