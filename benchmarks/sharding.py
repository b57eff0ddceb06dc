"""pytest plugin: run one shard of the collected tests, the most important first.

    GPTKERNELS_SHARD=2/8 python -m pytest -p benchmarks.sharding tests/test_a.py tests/test_b.py ...

``make gpu-smoke`` (benchmarks/gpu_check.py) starts one such pytest per shard, all sharing one Triton
cache, instead of needing pytest-xdist. The collected tests are put in an order that a time limit
cuts fairly, then dealt round-robin:

1. tests whose name matches :data:`FIRST` (the checks that only a GPU can make: offsets past 2**31,
   CUDA-graph capture, the benchmark shapes in bfloat16);
2. then the files interleaved in proportion to their size, in the order given on the command line
   (the i-th of a file's n tests sits at position i/n), so a run stopped at 60% has run about 60%
   of every file rather than all of the first files and none of the last.

Each shard prints ``shard i/n: k of N tests`` so a stopped run can say how many it did not reach.
"""

from __future__ import annotations

import os

import pytest

ENV_SHARD = "GPTKERNELS_SHARD"

#: Name fragments of the tests that go first in every shard.
FIRST = ("past_2_31", "64bit", "cuda_graph", "benchmark_shape")


def parse(spec: str) -> tuple[int, int]:
    """'i/n' -> (i, n), 0 <= i < n."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"{ENV_SHARD} must look like 'i/n' (e.g. 0/8), got {spec!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"{ENV_SHARD}: the shard index must lie in [0, {n}), got {spec!r}")
    return i, n


def order(nodeids: list[str]) -> list[int]:
    """Indices of ``nodeids`` in run order (module docstring)."""
    files: dict[str, list[int]] = {}
    for k, node in enumerate(nodeids):
        files.setdefault(node.split("::")[0], []).append(k)
    rank = {f: r for r, f in enumerate(files)}
    position = {}
    for f, ks in files.items():
        for j, k in enumerate(ks):
            position[k] = j / len(ks)

    def key(k):
        node = nodeids[k]
        return (not any(tag in node for tag in FIRST), position[k], rank[node.split("::")[0]], k)

    return sorted(range(len(nodeids)), key=key)


@pytest.hookimpl(trylast=True)  # after -k and --deselect: shard what is left
def pytest_collection_modifyitems(config, items):
    spec = os.environ.get(ENV_SHARD)
    if not spec:
        return
    i, n = parse(spec)
    ranked = [items[k] for k in order([item.nodeid for item in items])]
    keep = ranked[i::n]
    kept = {id(item) for item in keep}
    dropped = [item for item in items if id(item) not in kept]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
    print(f"\nshard {i}/{n}: {len(keep)} of {len(ranked)} tests", flush=True)
