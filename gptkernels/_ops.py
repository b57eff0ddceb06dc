"""Where a resolved backend's implementations live.

The Triton launchers (:mod:`gptkernels.kernels`) and the CUDA extension's wrappers
(:mod:`gptkernels._cuda`) expose the same function names with the same signatures, so the public ops
dispatch with one lookup. Imported lazily: ``import gptkernels`` needs neither triton nor the
extension.
"""

from __future__ import annotations

import torch

from ._backend import BackendUnavailableError


def backend_module(backend: str):
    if backend == "triton":
        from . import kernels

        return kernels
    if backend == "cuda":
        from . import _cuda

        return _cuda
    raise ValueError(f"backend {backend!r} has no kernel module")  # "torch" calls reference directly


def backend_fn(backend: str, name: str, op: str):
    """``name`` from ``backend``'s module, or a clear error if that backend does not implement it."""
    fn = getattr(backend_module(backend), name, None)
    if fn is None:
        raise BackendUnavailableError(f"{op}: backend {backend!r} does not implement {name}")
    return fn


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
