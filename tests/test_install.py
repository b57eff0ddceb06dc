"""A new user's first hour: what the package declares it needs, the readable progress of `make`'s long
steps (tools/progress_filter.py), and TRITON_INTERPRET set or unset after triton was imported.

The installs themselves (each README install line in a clean venv) run in CI: .ci/install_check.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from gptkernels import _backend

from tools import progress_filter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("gptkernels_setup_metadata", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ is not "__main__": setup() does not run
    return mod


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_package_declares_what_it_imports(setup_py):
    required = {_name(r) for r in setup_py.INSTALL_REQUIRES}
    # numpy: Triton's CPU interpreter; safetensors: from_pretrained. Both were missing from a plain install.
    assert {"torch", "numpy", "safetensors"} <= required
    # triton comes with torch's CUDA wheels (pinned); listed again, pip fetched the newest and backtracked
    assert "triton" not in required and _name(setup_py.EXTRAS["triton"][0]) == "triton"
    assert setup_py.EXTRAS["hf"] == ["transformers"]
    assert {"pytest", "transformers"} <= {_name(r) for r in setup_py.EXTRAS["test"]}
    assert {"matplotlib", "tqdm"} <= {_name(r) for r in setup_py.EXTRAS["bench"]}


def test_requirements_txt_covers_the_package(setup_py):
    """`make test` installs requirements.txt, then the package with --no-deps: it must hold them all."""
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        listed = {_name(ln) for ln in f if ln.strip() and not ln.lstrip().startswith("#")}
    declared = {_name(r) for r in setup_py.INSTALL_REQUIRES} | {
        _name(r) for reqs in setup_py.EXTRAS.values() for r in reqs}
    assert declared - listed == {"triton"}  # torch==2.14.1 pins the triton it was built with
    assert {"setuptools", "wheel", "ninja"} <= listed  # the --no-build-isolation build uses them


def test_setup_says_what_to_install_for_a_wheel(setup_py, monkeypatch):
    # A fresh venv's setuptools (65.5 on Python 3.11) without `wheel`: pip --no-build-isolation failed
    # with setuptools' bare "invalid command 'bdist_wheel'".
    monkeypatch.setattr(sys, "argv", ["setup.py", "dist_info"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wheel", "setuptools.command.bdist_wheel") else real(name, *a))
    with pytest.raises(SystemExit, match=r"pip install -U setuptools wheel ninja"):
        setup_py._check_wheel_builder()
    monkeypatch.setattr(sys, "argv", ["setup.py", "build_ext", "--inplace"])  # no wheel needed: no complaint
    setup_py._check_wheel_builder()


PIP_OUTPUT = """\
Looking in indexes: https://pypi.org/simple
WARNING: Location 'file:///opt/x/simple/pip/' is ignored: it is neither a file nor a directory.
Collecting torch==2.14.1 (from -r requirements.txt (line 3))
  Downloading torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl (899.7 MB)
     ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 899.7/899.7 MB 50.1 MB/s  0:00:18
Requirement already satisfied: setuptools in ./.venv/lib/python3.11/site-packages (65.5.0)
Collecting pytest (from -r requirements.txt (line 9))
  Using cached pytest-9.2.0-py3-none-any.whl (411 kB)
Collecting tqdm
  Downloading tqdm-4.70.1-py3-none-any.whl (80 kB)
ERROR: Could not find a version that satisfies the requirement nonexistent
Installing collected packages: tqdm, pytest, torch
Successfully installed pytest-9.2.0 torch-2.14.1 tqdm-4.70.1
"""


def test_pip_progress_is_short_and_names_sizes(capsys):
    progress_filter.filter_pip(PIP_OUTPUT.splitlines(True), sys.stdout)
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\s+torch 2\.14\.1\s+899\.7 MB \(download\)", lines[0])
    assert lines[1].startswith("ERROR: Could not find")  # errors pass through
    assert re.fullmatch(r"\s+and 2 smaller packages\s+491 kB", lines[2])
    assert "unpacking 900.2 MB of wheels" in lines[3]
    assert re.fullmatch(r"\s+installed 3 packages in \d+ s", lines[4])
    assert len(lines) == 5


def test_build_progress_is_one_line_per_unit(capsys):
    nvcc = ("[3/45] /usr/local/cuda/bin/nvcc -MD -MF /src/build/t/csrc/a.o.d " + "-I/x/include " * 60 +
            "-c -c /src/csrc/attention/flash_fwd_hdim64_fp16.cu -o /src/build/t/csrc/a.o -O3 -lineinfo")
    text = "\n".join([nvcc, "/src/csrc/x.cu(12): warning #177-D: variable declared but never referenced",
                      "[4/45] c++ -MMD -MF /src/b.o.d -c /src/csrc/bindings.cpp -o /src/b.o -O3"]) + "\n"
    progress_filter.filter_build(text.splitlines(True), sys.stdout, root="/src")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[3/45] csrc/attention/flash_fwd_hdim64_fp16.cu"
    assert lines[1].startswith("/src/csrc/x.cu(12): warning")  # warnings in full
    assert lines[2] == "[4/45] csrc/bindings.cpp"
    assert re.fullmatch(r"compiled 45 units in \d+ s", lines[3])


# --------------------------------------------------------------------------------------------------
# TRITON_INTERPRET changed after import: detected, one line, reported by backends()
# --------------------------------------------------------------------------------------------------


def _python(code: str, interpret: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_interpret_set_after_import():
    out = _python(
        "import os, torch, gptkernels\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "print(gptkernels.backends()['triton'])\n"
        "q = torch.randn(1, 5, 2, 16)\n"
        "try:\n"
        "    gptkernels.flash_attn(q, q, q)\n"
        "except gptkernels.BackendUnavailableError as e:\n"
        "    print('raised:', e)\n", interpret=False)
    reason, raised = out.splitlines()
    assert reason.startswith("TRITON_INTERPRET=1 was set after triton was imported")
    assert "set it before importing gptkernels or triton" in reason
    # One line naming the op and the cause, not Triton's "Cannot call @triton.jit'd outside of ...".
    assert raised.startswith("raised: flash_attn: backend 'triton'") and reason in raised


def test_interpret_unset_after_import():
    out = _python(
        "import os, gptkernels\n"
        "print(gptkernels.backends()['triton'])\n"
        "del os.environ['TRITON_INTERPRET']\n"
        "print(gptkernels.backends()['triton'])\n", interpret=True)
    before, after = out.splitlines()
    assert before == "None"
    assert after.startswith("TRITON_INTERPRET was unset after triton was imported")


def test_interpret_flag_read_as_triton_reads_it(monkeypatch):
    for value, on in (("1", True), ("true", True), ("ON", True), ("yes", True), ("0", False), ("", False),
                      ("false", False), ("off", False), ("2", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert _backend.triton_interpret() is on, value
