"""Launch configuration shared by the Triton kernels, and the autotuner they all go through.

On a GPU the kernels autotune over a few configs; in the CPU interpreter (TRITON_INTERPRET=1) every
config costs a full run, so each kernel uses one fixed config there.

Autotuning costs what it should (:func:`autotune`, used by every autotuned kernel here):

* a call whose configs are pruned down to one takes it without timing it, on every Triton version
  (Triton 3.6's autotuner compiles and times even a single remaining config: ~0.15 s of warm-up and
  repeats per new autotune key, thousands of keys in a test run);
* ``GPTKERNELS_AUTOTUNE=0`` keeps the first config left after the kernel's own pruning (no timing
  at all; the test suite sets it), read at each new autotune key;
* timing, when there is a choice, uses a short warm-up and repeat (:data:`TUNE_WARMUP_MS`,
  :data:`TUNE_REP_MS`): the configs differ by far more than the noise of 25 ms of repeats.
"""

from __future__ import annotations

import os

import triton
from triton.runtime.autotuner import Autotuner

from .._backend import triton_interpret

#: Whether these kernels were defined for the CPU interpreter (Triton reads the variable at definition).
INTERPRET = triton_interpret()

#: ``GPTKERNELS_AUTOTUNE=0``: no timing, the first config the kernel's pruning leaves (for test suites
#: and quick runs, where each autotune key would otherwise compile and time every candidate).
ENV_AUTOTUNE = "GPTKERNELS_AUTOTUNE"

#: Autotuning's timing of each candidate config: warm-up and repeat budgets in milliseconds of GPU
#: time (Triton's defaults are 25 and 100).
TUNE_WARMUP_MS = 5
TUNE_REP_MS = 25


class ConfigList(list):
    """An autotune list that keeps the GPU list at hand as ``.gpu`` (also under the interpreter, where
    the list itself is the interpreter's one config: the work audit, benchmarks/suite_audit.py, runs
    each GPU config in the interpreter)."""

    gpu: list


def configs(gpu: list[triton.Config], interpreter: triton.Config) -> list[triton.Config]:
    """The autotune list: ``gpu`` on a GPU, the single ``interpreter`` config in the interpreter."""
    chosen = ConfigList([interpreter] if INTERPRET else gpu)
    chosen.gpu = list(gpu)
    return chosen


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def autotune_enabled() -> bool:
    return os.environ.get(ENV_AUTOTUNE, "1") != "0"


def time_config(kernel_call, quantiles):
    """How the autotuner times one candidate (a module function, so a test can replace it)."""
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)


class _Tuner(Autotuner):
    """Triton's autotuner, except that a single remaining config is never timed.

    Triton >= 3.7 already skips the timing then; 3.6 (the GPU image's) does not. The pruning sets
    ``_single`` right before the timing loop, which then returns a placeholder for the one config
    instead of launching it (the call itself runs next, as with any cached choice).
    """

    _single = False

    def prune_configs(self, kwargs):
        pruned = super().prune_configs(kwargs)
        self._single = len(pruned) == 1
        return pruned

    def _bench(self, *args, config, **meta):
        if self._single:
            return [0.0, 0.0, 0.0]
        return super()._bench(*args, config=config, **meta)


def _first_if_not_tuning(prune):
    """Wrap a kernel's early_config_prune (or none): under GPTKERNELS_AUTOTUNE=0 keep its first config."""

    def wrapped(cfgs, named_args, **kwargs):
        if prune is not None:
            cfgs = prune(cfgs, named_args, **kwargs)
        return cfgs if autotune_enabled() else cfgs[:1]

    return wrapped


def autotune(configs: list[triton.Config], key: list[str], prune_configs_by: dict | None = None, **kw):
    """``triton.autotune`` with this package's costs (module docstring); same arguments."""
    prune_by = dict(prune_configs_by or {})
    prune_by["early_config_prune"] = _first_if_not_tuning(prune_by.get("early_config_prune"))

    def decorate(fn):
        tuner = triton.autotune(configs=configs, key=key, prune_configs_by=prune_by,
                                do_bench=lambda call, quantiles: time_config(call, quantiles), **kw)(fn)
        if type(tuner) is Autotuner:  # same object layout: only the two methods above differ
            tuner.__class__ = _Tuner
        return tuner

    return decorate
