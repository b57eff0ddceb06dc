"""Build and install gptkernels.

The Python/Triton package installs with no compiler. The CUDA extension ``gptkernels._C`` is built
when a CUDA build of torch and nvcc are present (see _cuda_extensions below).

Environment:
  GPTKERNELS_BUILD_CUDA  unset: build the extension when possible, else skip it with a note;
                         1: build it and fail loudly when that is impossible; 0: never build it.
  TORCH_CUDA_ARCH_LIST   GPU architectures to compile for (default "8.0;9.0": A100, H100/H200).
  MAX_JOBS               parallel compile jobs (ninja; default: all cores).
  CUDA_HOME              the CUDA toolkit; found from nvcc when unset.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

import warnings

from setuptools import find_packages, setup

# setuptools' page-long notice on every editable install (folders named like the package may shadow
# it): here the package folder is the source itself. torch's import warns where numpy is not
# installed yet (it comes as a dependency after the build); the build does not use it.
warnings.filterwarnings("ignore", message=r"\s*Editable installation")
warnings.filterwarnings("ignore", message=r"Failed to initialize NumPy")

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"

# The lowest versions that are tested: torch 2.11 / triton 3.6 on the GPU machines. numpy: Triton's
# CPU interpreter (TRITON_INTERPRET=1) needs it; safetensors: from_pretrained reads checkpoints.
# Triton is not listed: torch's Linux CUDA wheels pin the triton they were built with, and a second
# requirement here made pip fetch the newest triton first (~300 MB) and then backtrack. A CPU-only
# torch brings none: the `triton` extra adds it (for the interpreter).
INSTALL_REQUIRES = ["torch>=2.11", "numpy", "safetensors"]
#: Optional extras, each named for what it adds. requirements.txt (what `make test` installs) holds all of
#: them and the build tools (setuptools, wheel, ninja: needed before a --no-build-isolation install).
EXTRAS = {
    "hf": ["transformers"],  # gptkernels.hf, tokenizers in the CLI, HF models in the tests
    "triton": ["triton>=3.6; platform_system=='Linux'"],  # with a torch that does not bring it
    "bench": ["matplotlib", "tqdm"],  # benchmarks/: plots and progress bars
    "test": ["pytest", "pytest-benchmark", "hypothesis", "transformers"],
}
EXTRAS["all"] = sorted({req for reqs in EXTRAS.values() for req in reqs})


def _note(msg: str) -> None:
    print(f"gptkernels setup: {msg}", file=sys.stderr)


def _toolkit_from_nvcc() -> str | None:
    """The CUDA toolkit folder that ``nvcc`` on PATH really belongs to.

    torch guesses CUDA_HOME as ``dirname(dirname(which nvcc))``, which is wrong when nvcc on PATH is a
    wrapper script (e.g. /usr/local/bin/nvcc exec-ing /usr/local/cuda-13.0/bin/nvcc). nvcc's dry run
    names the folder it runs from (``#$ _HERE_=<toolkit>/bin``).
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        default = "/usr/local/cuda"
        return default if os.path.exists(os.path.join(default, "bin", "nvcc")) else None
    try:
        res = subprocess.run([nvcc, "-dryrun", "-E", "-x", "cu", os.devnull], capture_output=True,
                             text=True, timeout=60)
        m = re.search(r"^#\$ _HERE_=(.+)$", res.stdout + res.stderr, re.MULTILINE)
        if m:
            return os.path.dirname(os.path.normpath(m.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _pip_cuda_include_dirs(cuda_home: str) -> list[str]:
    """Headers the torch build needs that a slim toolkit may lack (cuBLAS, cuSPARSE ...).

    The CUDA wheels of torch bring them under site-packages/nvidia/cu*/include. Used only when the
    toolkit has no cublas_v2.h, and put last on the include path so the toolkit's own headers win.
    """
    if os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
        return []
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    found = sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))
    return [d for d in found if os.path.exists(os.path.join(d, "cublas_v2.h"))][:1]


def _cuda_extensions():
    """(ext_modules, cmdclass) for gptkernels._C, or ([], {}) when it is not built."""
    flag = os.environ.get("GPTKERNELS_BUILD_CUDA", "").strip()
    if flag == "0":
        return [], {}
    force = flag == "1"

    def skip(why: str):
        if force:
            raise RuntimeError(f"GPTKERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
        _note(f"not building the CUDA extension gptkernels._C ({why}); the Triton package installs")
        return [], {}

    try:
        import torch
    except Exception as e:  # no torch in the build environment (e.g. pip's build isolation)
        return skip(f"torch cannot be imported: {type(e).__name__}: {e}")
    if not getattr(torch.version, "cuda", None):
        return skip(f"torch {torch.__version__} is not a CUDA build")
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        home = _toolkit_from_nvcc()
        if home is None:
            return skip("nvcc was not found (put it on PATH or set CUDA_HOME)")
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = home
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return skip(f"no nvcc under CUDA_HOME={cuda_home}")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    csrc = os.path.join(HERE, "csrc")
    # Relative paths: setuptools wants them; ninja gets absolute ones from torch.
    sources = sorted(
        os.path.relpath(p, HERE)
        for pattern in ("*.cpp", "*.cu")
        for p in glob.glob(os.path.join(csrc, "**", pattern), recursive=True)
    )
    if not sources:
        return skip(f"no sources under {csrc}")
    ext = CUDAExtension(
        name="gptkernels._C",
        sources=sources,
        include_dirs=[csrc],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        },
    )
    # After torch's own include dirs (CUDAExtension appends them): the toolkit's headers win.
    ext.include_dirs += _pip_cuda_include_dirs(cuda_home)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _check_wheel_builder() -> None:
    """Fail with a clear message where pip cannot build a wheel in this environment.

    pip builds (editable installs too) through ``bdist_wheel``: part of setuptools since 70.1, the
    ``wheel`` package before that. With ``--no-build-isolation`` pip uses this environment's own
    setuptools, and a fresh venv's (65.5 on Python 3.11) has no bdist_wheel: setuptools would only
    say ``invalid command 'bdist_wheel'``.
    """
    if not {"bdist_wheel", "dist_info", "editable_wheel"} & set(sys.argv[1:]):
        return
    import importlib.util

    if importlib.util.find_spec("setuptools.command.bdist_wheel") or importlib.util.find_spec("wheel"):
        return
    import setuptools

    raise SystemExit(
        f"gptkernels setup: this environment's setuptools {setuptools.__version__} cannot build a wheel "
        "(it needs setuptools >= 70.1 or the `wheel` package), and `pip install --no-build-isolation` "
        "builds with this environment's own tools: run `pip install -U setuptools wheel ninja` (and torch, "
        "for the CUDA extension) first, or `pip install -e .` without --no-build-isolation (no CUDA extension)"
    )


def main() -> None:
    _check_wheel_builder()
    ext_modules, cmdclass = _cuda_extensions()
    setup(
        name="gptkernels",
        version="0.1.0",
        description="Fused attention, rotary embedding and paged KV-cache kernels for GPT-family models",
        packages=find_packages(include=["gptkernels", "gptkernels.*"]),
        python_requires=">=3.10",
        install_requires=INSTALL_REQUIRES,
        extras_require=EXTRAS,
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


# setuptools runs this file as __main__ (also under pip / PEP 517); the tests import it to check
# _cuda_extensions() without building anything.
if __name__ == "__main__":
    main()
