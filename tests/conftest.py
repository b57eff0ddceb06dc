"""Test setup: without a GPU, Triton kernels run on CPU tensors in the interpreter.

TRITON_INTERPRET must be set before triton is imported, which is why it happens here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _first_config_only(monkeypatch):
    # On a GPU every new autotune key would compile and time each candidate config: tests take the
    # first listed one (tests/test_flash_attn.py::test_every_gpu_config runs them all). No effect in
    # the interpreter, which has one config.
    monkeypatch.setenv("GPTKERNELS_AUTOTUNE", "0")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls into the Triton attention forward launcher (kernel path vs. fallthrough)."""
    from gptkernels import triton as triton_backend

    calls = []
    real = triton_backend.flash_attn_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_backend, "flash_attn_forward", counting)
    return calls
