"""What a run ran on: device, driver, versions, commit, date."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def git_commit() -> str:
    """``$GPTKERNELS_COMMIT`` (a copy of the tree without .git, e.g. on a device machine), else git."""
    given = os.environ.get("GPTKERNELS_COMMIT")
    if given:
        return given
    head = _run(["git", "rev-parse", "HEAD"])
    if head is None:
        return "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return head + ("+dirty" if dirty else "")


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
    except Exception:
        return None
    return getattr(m, "__version__", None)


def environment() -> dict:
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "cuda_runtime": torch.version.cuda,
        "argv": sys.argv,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update({
            "device": torch.cuda.get_device_name(0),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "sm_count": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1),
            "driver": _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
            "clocks_max_sm_mhz": _run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader"]),
        })
    else:
        env.update({"device": f"cpu ({platform.processor() or platform.machine()}, no CUDA GPU)",
                    "driver": None})
    try:
        import gptkernels

        env["gptkernels_backends"] = gptkernels.backends()
    except Exception as e:  # the package itself failing to import is worth recording, not fatal here
        env["gptkernels_backends"] = f"import failed: {type(e).__name__}: {e}"
    return env
