"""The kernels under another Triton release's CPU interpreter (issue 11).

CI runs Triton 3.8 and the GPU image 3.6, but users who pip-install the newest Triton to run the CPU
path get its interpreter, which can reject code the older ones accept: Triton 3.9's refused the
paged keys' row mask (a block bool ``&`` a scalar bool: "mask has unsupported dtype"), failing
every paged ``flash_attn`` whose page is at least the key tile.

With ``GPTKERNELS_TRITON_LATEST=DIR`` (a directory holding another ``triton`` package, e.g. from
``pip install --no-deps --target DIR triton==3.9.0``) this runs a few paged, varlen, dense, decode,
append and rotary cases in a subprocess that imports that Triton first, in the interpreter on CPU.
``make test-triton-latest`` does both. Skipped otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = "GPTKERNELS_TRITON_LATEST"
ROOT = Path(__file__).resolve().parent.parent

#: A few cases of every kernel family; the paged ones cover pages shorter than, as long as and
#: longer than the interpreter's key tile.
TESTS = [
    "tests/test_flash_attn.py::test_paged_prefill",
    "tests/test_flash_attn.py::test_paged_matches_dense",
    "tests/test_flash_attn.py::test_paged_index_tensors_of_any_strides",
    "tests/test_flash_attn.py::test_varlen",
    "tests/test_flash_attn.py::test_backward_atomic_dq_varlen",
    "tests/test_flash_attn.py::test_split_keys_forward",
    "tests/test_paged_ops.py::test_decode_parity",
    "tests/test_paged_ops.py::test_append_writes_slots_and_skips",
    "tests/test_rotary.py::test_parity_shapes",
]


@pytest.mark.skipif(not os.environ.get(ENV), reason=f"needs another Triton release: set {ENV} to a "
                    "directory holding it (`make test-triton-latest` installs Triton 3.9 and runs this)")
def test_kernels_under_another_triton():
    triton_dir = Path(os.environ[ENV]).resolve()
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(triton_dir), str(ROOT), env.get("PYTHONPATH", "")]),
               TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")  # the interpreter, on CPU tensors
    which = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__); "
                            "print(triton.__file__)"], env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    assert Path(which[1]).is_relative_to(triton_dir), f"{ENV}={triton_dir} holds no triton package"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, f"under Triton {which[0]}:\n{run.stdout[-6000:]}{run.stderr[-2000:]}"
