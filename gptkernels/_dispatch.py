"""Dispatch: where a resolved kernel backend's launchers live.

The Triton launchers (:mod:`gptkernels.triton`) and the CUDA extension's wrappers
(:mod:`gptkernels.cuda`) expose the same function names with the same signatures, so the public ops
dispatch with one lookup. Kept apart from :mod:`gptkernels._backend` (which decides *which* backend)
because the launchers themselves need that module (the interpreter flag, the error type): one
direction of imports, no cycle. Imported lazily: ``import gptkernels`` needs neither triton nor the
extension.
"""

from __future__ import annotations

import torch

from ._backend import BackendUnavailableError


def backend_module(backend: str):
    """The module of launchers of a kernel backend (``"torch"`` calls :mod:`gptkernels.reference`)."""
    if backend == "triton":
        from . import triton as triton_backend

        return triton_backend
    if backend == "cuda":
        from . import cuda as cuda_backend

        return cuda_backend
    raise ValueError(f"backend {backend!r} has no kernel module")


def backend_fn(backend: str, name: str, op: str):
    """``name`` from ``backend``'s module, or a clear error if that backend does not implement it."""
    fn = getattr(backend_module(backend), name, None)
    if fn is None:
        raise BackendUnavailableError(f"{op}: backend {backend!r} does not implement {name}")
    return fn


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
