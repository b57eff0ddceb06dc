"""gptkernels' benchmark suite: every op beside its peers, against the device's own ceilings.

    python -m benchmarks.run --suite {attention,rotary,paged,model,all} [--quick] [--out DIR]
    python -m benchmarks.report [RUN.json ...]        # BENCHMARKS.md from the latest run
    python3 -m benchmarks.gpu_check --part tests|bench  # `make gpu`: build, tests, benchmarks
    pytest benchmarks/                                 # the pytest-benchmark suite (GPU only)

Without a GPU, ``benchmarks.run`` runs the parity sweep of every kernel in the Triton interpreter.
"""
