"""Readable progress for `make`'s long steps: pipe a command's output through this.

    pip install -r requirements.txt 2>&1 | python3 tools/progress_filter.py pip
    python setup.py build_ext --inplace 2>&1 | python3 tools/progress_filter.py build

``pip``: one line per big package (name, size, downloaded or read from disk) and a count of the
small ones, instead of pip's resolver chatter; then the total. ``build``: one line per compiled
unit (``[n/45] csrc/...``) instead of ninja's full nvcc command lines (~1.7 KB each). Every other
line (compiler warnings and errors, pip's errors) passes through unchanged. Standard library only: it
runs before the venv exists.
"""

from __future__ import annotations

import os
import re
import sys
import time

# pip's lines that say nothing to a person: the resolver's and a local index's bookkeeping.
_PIP_QUIET = (
    re.compile(r"^Requirement already satisfied"),
    re.compile(r"^Looking in (indexes|links):"),
    re.compile(r"^WARNING: Location '.*' is ignored"),
    re.compile(r"^\s*[━╸╺\-─ ]+\s*[\d.]+/[\d.]+ \w?B\b"),  # a finished download bar (its size is shown)
    re.compile(r"^\s*(Attempting uninstall|Found existing installation|Uninstalling|Successfully uninstalled)"),
    re.compile(r"^\s*Obtaining file:"),
    # (but not "Building editable for ...": a CUDA build takes minutes and this says what is going on)
    re.compile(r"^\s*(Installing build dependencies|Checking if build backend|Getting requirements|Preparing "
               r"(editable )?metadata|Building wheels? for collected|Created (editable )?wheel|Stored in directory)"),
    re.compile(r"^\s*Using cached .*\.metadata"),
    re.compile(r"^Successfully built "),
)
_COLLECTING = re.compile(r"^Collecting (\S+)")
_DOWNLOADING = re.compile(r"^\s*(Downloading|Using cached) (\S+) \(([^)]+)\)")
_PROCESSING = re.compile(r"^Processing (\S+\.whl)")
_INSTALLED = re.compile(r"^Successfully installed (.*)")


def _size(nbytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit in ("B", "kB") else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError  # unreachable


def _wheel_name(path: str) -> str:
    name = os.path.basename(path)
    parts = name.split("-")
    return f"{parts[0]} {parts[1]}" if name.endswith(".whl") and len(parts) > 2 else name


#: Packages at least this big get a line of their own; the others are counted together.
BIG_BYTES = 20e6
_UNITS = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def _parse_size(text: str) -> float:
    number, _, unit = text.partition(" ")
    try:
        return float(number) * _UNITS.get(unit, 1)
    except ValueError:
        return 0.0


def filter_pip(lines, out) -> None:
    start = time.monotonic()
    small, small_bytes, total_bytes = 0, 0.0, 0.0

    def package(name: str, nbytes: float, how: str) -> None:
        nonlocal small, small_bytes, total_bytes
        total_bytes += nbytes
        if nbytes >= BIG_BYTES:
            print(f"  {name:40s} {_size(nbytes):>9s} ({how})", file=out, flush=True)
        else:
            small, small_bytes = small + 1, small_bytes + nbytes

    for line in lines:
        text = line.rstrip("\n")
        if any(p.search(text) for p in _PIP_QUIET) or not text.strip():
            continue
        if _COLLECTING.match(text):
            continue  # the next line (Downloading / Using cached) names it with its size
        m = _DOWNLOADING.match(text)
        if m:
            package(_wheel_name(m.group(2)), _parse_size(m.group(3)),
                    "download" if m.group(1) == "Downloading" else "pip's cache")
            continue
        m = _PROCESSING.match(text)
        if m:
            package(_wheel_name(m.group(1)), os.path.getsize(m.group(1)) if os.path.exists(m.group(1)) else 0.0,
                    "local file")
            continue
        if text.startswith("Installing collected packages"):
            if small:
                print(f"  {f'and {small} smaller packages':40s} {_size(small_bytes):>9s}", file=out, flush=True)
            print(f"  unpacking {_size(total_bytes)} of wheels...", file=out, flush=True)
            continue
        m = _INSTALLED.match(text)
        if m:
            print(f"  installed {len(m.group(1).split())} packages in {time.monotonic() - start:.0f} s",
                  file=out, flush=True)
            continue
        print(text, file=out, flush=True)  # errors, warnings, anything unexpected


_NINJA = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")
_SOURCE_SUFFIXES = (".cu", ".cpp", ".cc", ".cxx", ".c")


def filter_build(lines, out, root: str | None = None) -> None:
    root = (root or os.getcwd()).rstrip("/") + "/"
    start, units = time.monotonic(), 0
    for line in lines:
        text = line.rstrip("\n")
        m = _NINJA.match(text)
        if m:
            done, total, command = m.groups()
            sources = [a for a in command.split() if a.endswith(_SOURCE_SUFFIXES)]
            unit = sources[-1] if sources else command.split()[-1]  # the compiled file (else: a link step)
            print(f"[{done}/{total}] {unit.replace(root, '')}", file=out, flush=True)
            units = int(total)
            continue
        print(text, file=out, flush=True)
    if units:
        plural = "s" if units != 1 else ""
        print(f"compiled {units} unit{plural} in {time.monotonic() - start:.0f} s", file=out, flush=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["pip"], ["build"]):
        print("usage: python3 tools/progress_filter.py {pip,build} < output", file=sys.stderr)
        return 2
    (filter_pip if argv[0] == "pip" else filter_build)(sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
