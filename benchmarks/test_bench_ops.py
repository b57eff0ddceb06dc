"""pytest-benchmark suite: ``pytest benchmarks/`` (GPU only; on CPU every test skips, saying why).

One representative case per op, ours beside the peer users would pick, each checked against the
float64 reference first (the same Case classes as ``python -m benchmarks.run``). pytest-benchmark
keeps its own wall-clock statistics (each call synchronises); ``extra_info`` carries the CUDA-event
median of ``triton.testing.do_bench`` and the figure (TFLOP/s or GB/s) with its formula.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: none is visible on this machine "
                                       "(benchmark figures come from a GPU only)")


def _bench(benchmark, run, sets, *, flops=None, bytes=None, formula="", grad_to_none=None):
    from benchmarks import timing

    rot = timing.Rotating(run, sets)

    def call():
        rot()
        torch.cuda.synchronize()

    ms = timing.median_ms(rot, grad_to_none=grad_to_none)
    benchmark.extra_info.update(median_ms_cuda_events=ms, formula=formula)
    if flops:
        benchmark.extra_info["tflops"] = flops / (ms * 1e-3) / 1e12
    if bytes:
        benchmark.extra_info["gbps"] = bytes / (ms * 1e-3) / 1e9
    def reset():  # a backward's gradients must not accumulate across rounds (an extra add kernel)
        for t in grad_to_none or ():
            t.grad = None

    benchmark.pedantic(call, setup=reset, rounds=20, warmup_rounds=3, iterations=1)


@pytest.mark.parametrize("impl", ["gptkernels triton", "torch sdpa flash", "torch sdpa cudnn"])
def test_attention_fwd(benchmark, impl):
    from benchmarks import formulas, suite_attention as A

    case = A.Case(4096, 128, None, "fwd")
    fwd = A._forward_fn(impl, None)
    with torch.no_grad():
        try:
            out = fwd(case.sets[0].q, case.sets[0].k, case.sets[0].v)
        except RuntimeError as e:
            if "No available kernel" in str(e):
                pytest.skip(f"{impl} does not run on this GPU: {e}")
            raise
        chk = case.check((out,))
        assert chk.ok, chk.problem
        _bench(benchmark, lambda s: fwd(s.q, s.k, s.v), case.sets, flops=case.flops,
               formula=formulas.attention_flops(1, 1, 1, 1, 1).formula)


def test_attention_bwd(benchmark):
    from benchmarks import suite_attention as A

    case = A.Case(4096, 128, None, "bwd")
    fwd = A._forward_fn("gptkernels triton", None)
    for s in case.sets:
        s.out = fwd(s.q, s.k, s.v)
    s0 = case.sets[0]
    s0.out.backward(s0.dout, retain_graph=True)
    chk = case.check((s0.q.grad, s0.k.grad, s0.v.grad))
    assert chk.ok, chk.problem
    grads = [t for s in case.sets for t in (s.q, s.k, s.v)]
    _bench(benchmark, lambda s: s.out.backward(s.dout, retain_graph=True), case.sets, flops=case.flops,
           formula="2.5 x forward", grad_to_none=grads)


@pytest.mark.parametrize("impl", ["gptkernels triton", "hf rotate_half (eager)"])
def test_rotary(benchmark, impl):
    from benchmarks import suite_rotary as R

    case = R.Case(8192)
    run = R._run_fn(impl, case)
    with torch.no_grad():
        chk = case.check(run(case.sets[0]), case.sets[0])
        assert chk.ok, chk.problem
        _bench(benchmark, run, case.sets, bytes=case.bytes, formula="2*T*(Hq+Hk)*D*elem + tables")


def test_paged_decode(benchmark):
    from benchmarks import suite_paged as P

    case = P.DecodeCase(64, 4096, 16)
    run, _, _ = P._decode_fn("gptkernels triton", case)
    with torch.no_grad():
        chk = case.check(run(case.sets[0]), case.sets[0])
        assert chk.ok, chk.problem
        _bench(benchmark, run, case.sets, bytes=case.bytes, formula="2*sum(seq_lens)*Hkv*D*elem")
