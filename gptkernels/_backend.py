"""Backend selection: which implementation serves a call.

Every public op takes ``backend=None | "triton" | "cuda" | "torch"`` and resolves it here, so the
rules live in one place:

* ``None``: ``$GPTKERNELS_BACKEND`` if set, else the fastest backend for the tensors' device:
  ``"triton"`` on CUDA tensors (``"cuda"`` if Triton is missing), ``"torch"`` on CPU tensors, except
  under ``TRITON_INTERPRET=1`` where CPU tensors go to ``"triton"`` (that is how CPU tests run kernels).
* An explicit backend that cannot serve the call raises :class:`BackendUnavailableError` saying why.
  Nothing ever falls back silently.

Where a resolved backend's launchers live is :mod:`gptkernels._dispatch`.
"""

from __future__ import annotations

import os
import sys

import torch

BACKENDS = ("triton", "cuda", "torch")
ENV_BACKEND = "GPTKERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot serve this call (not built, wrong device, unsupported option)."""


def triton_interpret() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``).

    Read as Triton reads it (1, true, on, yes; any case): ``TRITON_INTERPRET=0`` or ``=false`` is off.
    """
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def debug_checks() -> bool:
    """True under ``GPTKERNELS_DEBUG=1``: run the input checks that need a device sync."""
    return os.environ.get("GPTKERNELS_DEBUG", "0") not in ("", "0")


# Import failures are looked up once. A plain dict memo rather than functools.lru_cache, which
# torch.compile warns about when it traces a call.
_IMPORT_ERRORS: dict[str, str | None] = {}


def _triton_import_error() -> str | None:
    if "triton" not in _IMPORT_ERRORS:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _IMPORT_ERRORS["triton"] = None
        except Exception as e:  # pragma: no cover - triton ships with Linux torch
            _IMPORT_ERRORS["triton"] = f"triton cannot be imported ({type(e).__name__}: {e})"
    return _IMPORT_ERRORS["triton"]


# For each set of Triton jit functions defined so far: whether it was defined for the interpreter.
_DEFINED_FOR_INTERPRETER: dict[str, bool] = {}


def _defined_for_interpreter() -> dict[str, bool]:
    """Whether Triton's own jit functions and ours were defined for the interpreter, for those defined.

    ``@triton.jit`` reads ``TRITON_INTERPRET`` when a function is defined: Triton's library functions
    when ``triton.language`` is first imported (``import gptkernels`` does, through torch.library), ours
    when :mod:`gptkernels.triton` is imported (its ``_config.INTERPRET``). Neither changes afterwards.
    """
    if "triton" not in _DEFINED_FOR_INTERPRETER:
        cdiv = getattr(getattr(sys.modules.get("triton.language"), "standard", None), "cdiv", None)
        if cdiv is not None:
            from triton.runtime.interpreter import InterpretedFunction

            _DEFINED_FOR_INTERPRETER["triton"] = isinstance(cdiv, InterpretedFunction)
    if "gptkernels" not in _DEFINED_FOR_INTERPRETER:
        ours = getattr(sys.modules.get("gptkernels.triton._config"), "INTERPRET", None)
        if ours is not None:
            _DEFINED_FOR_INTERPRETER["gptkernels"] = bool(ours)
    return _DEFINED_FOR_INTERPRETER


def interpret_changed() -> str | None:
    """Why the Triton kernels cannot run because ``TRITON_INTERPRET`` changed after they were defined.

    None when it did not change (or nothing is defined yet). Without this check a kernel defined for
    the GPU fails in the interpreter deep inside Triton ("Cannot call @triton.jit'd outside of the
    scope of a kernel"), and one defined for the interpreter would run on the CPU.
    """
    now = triton_interpret()
    if all(defined == now for defined in _defined_for_interpreter().values()):
        return None
    if now:
        return ("TRITON_INTERPRET=1 was set after triton was imported (its kernels were defined for the "
                "GPU): set it before importing gptkernels or triton, e.g. `TRITON_INTERPRET=1 python ...`")
    return ("TRITON_INTERPRET was unset after triton was imported (its kernels were defined for the CPU "
            "interpreter): set or unset it before importing gptkernels or triton")


def _cuda_ext_import_error() -> str | None:
    if "cuda" not in _IMPORT_ERRORS:
        try:
            from gptkernels import _C  # noqa: F401

            _IMPORT_ERRORS["cuda"] = None
        except Exception as e:
            _IMPORT_ERRORS["cuda"] = (
                "the CUDA extension gptkernels._C is not built "
                f"({type(e).__name__}: {e}); build it with `make build-cuda` or `pip install --no-build-isolation -e .` "
                "(after `pip install setuptools wheel ninja`) where nvcc and a CUDA build of torch are"
            )
    return _IMPORT_ERRORS["cuda"]


def unavailable_reason(backend: str, device: torch.device | str | None = None) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None: it can). ``device=None`` asks about this machine."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected one of {BACKENDS}"
    dev_type = None if device is None else torch.device(device).type
    if backend == "torch":
        return None
    if backend == "triton":
        err = _triton_import_error() or interpret_changed()
        if err:
            return err
        if dev_type is None:
            if torch.cuda.is_available() or triton_interpret():
                return None
            return "no CUDA GPU is visible and TRITON_INTERPRET=1 is not set (the CPU interpreter)"
        if dev_type == "cuda":
            if triton_interpret():
                return "TRITON_INTERPRET=1 is set: Triton kernels run on CPU tensors, not CUDA tensors"
            return None
        if dev_type == "cpu":
            if triton_interpret():
                return None
            return ("Triton kernels run on CPU tensors only in the interpreter: set TRITON_INTERPRET=1 "
                    "before importing triton")
        return f"Triton kernels do not run on {dev_type} tensors"
    # cuda
    err = _cuda_ext_import_error()
    if err:
        return err
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    if dev_type not in (None, "cuda"):
        return f"the CUDA extension runs on CUDA tensors, got {dev_type} tensors"
    return None


def backends() -> dict[str, str | None]:
    """Every backend and why it is unavailable on this machine (None where it is available)."""
    return {b: unavailable_reason(b) for b in BACKENDS}


def resolve(backend: str | None, device: torch.device, op: str) -> str:
    """The backend that serves ``op`` on tensors of ``device``; raises if the choice cannot."""
    if backend is None:
        backend = os.environ.get(ENV_BACKEND) or None
        source = f"${ENV_BACKEND}"
    else:
        source = "backend="
    if backend is None:
        if device.type == "cuda":
            backend = "triton" if _triton_import_error() is None else "cuda"
        elif device.type == "cpu" and triton_interpret():
            backend = "triton"
        else:
            backend = "torch"
        source = "the default choice"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be None or one of {BACKENDS}, got {backend!r} (from {source})")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {backend!r} (from {source}) is unavailable: {reason}")
    return backend

