"""Weight-only quantization: the quantizers (round trip, layout), the int8/int4 GEMMs against float64
over the dequantized weights (odd M, N, K; groups; bias; 1..130 rows; split-K; strides), dispatch,
torch.compile, CUDA graphs, bad input; quantized models against the float models of all four
families, loading, memory, generation; the shipped tiny checkpoint.

On CPU the Triton kernels run in the interpreter (float16, float32); on a GPU bfloat16 is added.
"""

from __future__ import annotations

import copy
import math
import os
import weakref

import pytest
import torch

import gptkernels
from gptkernels import BackendUnavailableError, reference
from gptkernels.quant import DEFAULT_GROUP_SIZE
from tests.helpers import DEVICE, DTYPES, ON_GPU, assert_parity, grid, randn, requires_gpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CKPT = os.path.join(REPO, "checkpoints", "tiny-stdlib")


def _weights(n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return randn(n, k, dtype=dtype, generator=g, scale=0.5)


def _check_int8(x, w, bias=None, **kw):
    q, s = gptkernels.quantize_int8(w)
    y = gptkernels.int8_linear(x, q, s, bias, **kw)
    ref = reference.int8_linear(x.double(), q, s, None if bias is None else bias.double())
    base = reference.int8_linear(x, q, s, bias, upcast=False)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    assert_parity(y, ref, base)
    return y


def _check_int4(x, w, bias=None, group_size=DEFAULT_GROUP_SIZE, **kw):
    q, s, z = gptkernels.quantize_int4(w, group_size=group_size)
    y = gptkernels.int4_linear(x, q, s, z, bias, group_size=group_size, **kw)
    ref = reference.int4_linear(x.double(), q, s, z, None if bias is None else bias.double(), group_size=group_size)
    base = reference.int4_linear(x, q, s, z, bias, group_size=group_size, upcast=False)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], w.shape[0])
    assert_parity(y, ref, base)
    return y


# --------------------------------------------------------------------------------------------------
# Quantizers: round trip and layout
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_dtype", [None, torch.float32, torch.float16, torch.bfloat16])
def test_int8_round_trip(scale_dtype):
    w = _weights(37, 97, torch.float32, 1)
    w[3] = 0.0  # an all-zero row is exact
    q, s = gptkernels.quantize_int8(w, scale_dtype=scale_dtype)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (37,)
    assert s.dtype == (scale_dtype or torch.float32)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    deq = gptkernels.dequantize_int8(q, s, dtype=torch.float64)
    step = s.double()[:, None]
    assert bool(((deq - w.double()).abs() <= step / 2 * (1 + 1e-6) + 1e-12).all())
    assert torch.equal(deq[3], torch.zeros(97, dtype=torch.float64))
    # the row maximum lands on +-127 (the scale is max|row| / 127)
    assert bool((q.abs().amax(1)[torch.arange(37) != 3] == 127).all())


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [None, torch.float16, torch.bfloat16])
def test_int4_round_trip(group_size, scale_dtype):
    w = _weights(19, 256, torch.float32, 2)
    w[5, :group_size] = 0.0           # an all-zero group: exact
    w[6, :group_size] = 0.3           # a constant positive group: exact (range widened to 0)
    w[7] = w[7].abs() + 0.1           # groups that do not straddle 0
    q, s, z = gptkernels.quantize_int4(w, group_size=group_size, scale_dtype=scale_dtype)
    g = 256 // group_size
    assert q.dtype == torch.uint8 and q.shape == (19, 128)
    assert s.shape == z.shape == (19, g) and s.dtype == z.dtype == (scale_dtype or torch.float32)
    assert torch.equal(z, z.round()) and float(z.min()) >= 0 and float(z.max()) <= 15
    deq = gptkernels.dequantize_int4(q, s, z, group_size=group_size, dtype=torch.float64)
    step = s.double().repeat_interleave(group_size, 1)
    # half a step; a bfloat16/float16 scale rounded down stretches 15 steps by up to 2**-9 each
    slack = 1e-6 if scale_dtype in (None, torch.float32) else 15 * 2**-8
    assert bool(((deq - w.double()).abs() <= step * (0.5 + slack) + 1e-12).all())
    assert torch.equal(deq[5, :group_size], torch.zeros(group_size, dtype=torch.float64))
    torch.testing.assert_close(deq[6, :group_size], torch.full((group_size,), 0.3, dtype=torch.float64),
                               atol=1e-3 if scale_dtype else 1e-7, rtol=0)


def test_int4_layout():
    """Two codes per byte along K: low nibble = even column, high nibble = odd column."""
    codes = torch.tensor([[1, 2, 3, 4, 15, 0], [7, 8, 9, 10, 11, 12]], dtype=torch.uint8)
    packed = reference.pack_int4(codes)
    assert packed.tolist() == [[1 | 2 << 4, 3 | 4 << 4, 15], [7 | 8 << 4, 9 | 10 << 4, 11 | 12 << 4]]
    assert torch.equal(reference.unpack_int4(packed), codes)
    # dequantize: (q - zero) * scale per group
    k, gs = 64, 32
    q = torch.randint(0, 16, (3, k), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    s = torch.tensor([[0.5, 2.0], [1.0, 0.25], [3.0, 1.5]])
    z = torch.tensor([[8.0, 0.0], [3.0, 15.0], [7.0, 7.0]])
    want = (q.double() - z.double().repeat_interleave(gs, 1)) * s.double().repeat_interleave(gs, 1)
    got = gptkernels.dequantize_int4(reference.pack_int4(q), s, z, group_size=gs, dtype=torch.float64)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------------
# GEMM parity
# --------------------------------------------------------------------------------------------------

_INT8_SHAPES = grid([(1, 17, 97), (16, 33, 64), (37, 70, 130), (130, 19, 33)],
                    [(1, 17, 97), (16, 33, 64), (37, 70, 130), (130, 19, 33), (64, 1024, 4096), (1, 4097, 2049),
                     (257, 513, 1031)])
_INT4_SHAPES = grid([(1, 17, 128, 32), (5, 33, 256, 64), (37, 70, 256, 128), (130, 19, 64, 32)],
                    [(1, 17, 128, 32), (5, 33, 256, 64), (37, 70, 256, 128), (130, 19, 64, 32),
                     (16, 1024, 4096, 128), (1, 4097, 2048, 64), (257, 513, 1024, 256)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m, n, k", _INT8_SHAPES)
def test_int8_linear_parity(m, n, k, bias, dtype):
    w = _weights(n, k, dtype, m + n + k)
    x = randn(m, k, dtype=dtype)
    _check_int8(x, w, randn(n, dtype=dtype) if bias else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m, n, k, group_size", _INT4_SHAPES)
def test_int4_linear_parity(m, n, k, group_size, bias, dtype):
    w = _weights(n, k, dtype, m + n + k + group_size)
    x = randn(m, k, dtype=dtype)
    _check_int4(x, w, randn(n, dtype=dtype) if bias else None, group_size=group_size)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("m", grid([1, 2, 15, 16, 17, 33, 64, 65, 130], list(range(1, 131))))
def test_every_row_count(m, fmt):
    """Decode (1-64 rows: one row tile of 16/32/64 on a GPU) to prefill, in float16."""
    dtype = torch.float16
    w = _weights(40, 128, dtype, m)
    x = randn(m, 128, dtype=dtype)
    if fmt == "int8":
        _check_int8(x, w, randn(40, dtype=dtype))
    else:
        _check_int4(x, w, randn(40, dtype=dtype), group_size=32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_split_k(fmt, dtype, monkeypatch):
    """K split across programs (float32 partials summed by a second kernel), forced and by policy."""
    from gptkernels.triton import quant as tq

    m, n, k = 3, 21, 1024
    w = _weights(n, k, dtype, 7)
    x = randn(m, k, dtype=dtype)
    bias = randn(n, dtype=dtype)
    # the policy splits a long K over few output tiles (also on CPU: 16 nominal SMs)
    block = tq.tile_config(m)[:3]
    assert tq.k_splits(m, n, k, block, gptkernels._policy.sm_count(x.device)) > 1
    check = _check_int8 if fmt == "int8" else _check_int4
    kw = {} if fmt == "int8" else {"group_size": 64}
    whole = check(x, w, bias, **kw)
    for splits in (3, 5):  # uneven splits: the last is shorter
        monkeypatch.setattr(tq, "k_splits", lambda *a, s=splits: s)
        y = check(x, w, bias, **kw)
        assert (y.double() - whole.double()).abs().max() <= 4 * torch.finfo(dtype).eps * whole.abs().max()


def test_batched_and_strided_inputs():
    """x of any leading dims and strides (a transposed view, a slice); weights as strided views."""
    dtype = torch.float32
    w = _weights(24, 96, dtype, 3)
    x = randn(2, 5, 96, dtype=dtype)
    _check_int8(x, w)
    _check_int4(x, w, group_size=32)
    xt = randn(96, 7, dtype=dtype).t()  # (7, 96), stride (1, 7)
    _check_int8(xt, w)
    _check_int4(xt, w, group_size=32)
    xs = randn(9, 200, dtype=dtype)[:, 13:109]  # row stride 200
    _check_int4(xs, w, group_size=32)
    # quantized tensors as views of bigger buffers
    q, s = gptkernels.quantize_int8(w)
    qbig = torch.zeros(24, 128, dtype=torch.int8, device=q.device)
    qbig[:, 5:101] = q
    sbig = torch.zeros(48, dtype=s.dtype, device=s.device)
    sbig[::2] = s
    y = gptkernels.int8_linear(xs, qbig[:, 5:101], sbig[::2])
    assert_parity(y, reference.int8_linear(xs.double(), q, s), reference.int8_linear(xs, q, s, upcast=False))


def test_empty_and_torch_backend():
    w = _weights(10, 64, torch.float32, 4)
    q, s = gptkernels.quantize_int8(w)
    assert gptkernels.int8_linear(randn(0, 64), q, s).shape == (0, 10)
    q4, s4, z4 = gptkernels.quantize_int4(w, group_size=32)
    assert gptkernels.int4_linear(randn(2, 0, 64), q4, s4, z4, group_size=32).shape == (2, 0, 10)
    x = randn(3, 64)
    torch.testing.assert_close(gptkernels.int8_linear(x, q, s, backend="torch"), reference.int8_linear(x, q, s))
    torch.testing.assert_close(gptkernels.int4_linear(x, q4, s4, z4, group_size=32, backend="torch"),
                               reference.int4_linear(x, q4, s4, z4, group_size=32))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gradients(fmt):
    """Differentiable in x and bias on every backend (the same gradients); the weight is frozen."""
    w = _weights(12, 64, torch.float32, 5)
    if fmt == "int8":
        params = gptkernels.quantize_int8(w)
        fn, kw = gptkernels.int8_linear, {}
    else:
        params = gptkernels.quantize_int4(w, group_size=32)
        fn, kw = gptkernels.int4_linear, {"group_size": 32}
    x0, b0, dy = randn(2, 3, 64), randn(12), randn(2, 3, 12)
    grads = {}
    for backend in ("torch", "triton"):
        x, b = x0.clone().requires_grad_(), b0.clone().requires_grad_()
        fn(x, *params, b, backend=backend, **kw).backward(dy)
        grads[backend] = (x.grad, b.grad)
    torch.testing.assert_close(grads["triton"], grads["torch"])
    deq = (gptkernels.dequantize_int8(*params) if fmt == "int8"
           else gptkernels.dequantize_int4(*params, group_size=32))
    torch.testing.assert_close(grads["torch"][0], dy @ deq)
    scales = params[1].clone().requires_grad_()
    with pytest.raises(ValueError, match=f"{fmt}_linear: scales and zeros get no gradient"):
        fn(x0, params[0], scales, *params[2:], **kw)


def test_cuda_backend_refuses():
    w = _weights(12, 64, torch.float16, 6)
    q, s = gptkernels.quantize_int8(w)
    q4, s4, z4 = gptkernels.quantize_int4(w, group_size=32)
    x = randn(2, 64, dtype=torch.float16)
    with pytest.raises(BackendUnavailableError, match="int8_linear"):
        gptkernels.int8_linear(x, q, s, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="int4_linear"):
        gptkernels.int4_linear(x, q4, s4, z4, group_size=32, backend="cuda")


def test_torch_compile_fullgraph():
    """The custom ops trace with their fake implementations: no graph break."""
    w = _weights(20, 64, torch.float32, 8)
    q, s = gptkernels.quantize_int8(w)
    q4, s4, z4 = gptkernels.quantize_int4(w, group_size=32)
    bias = randn(20)

    def f(x):
        return gptkernels.int8_linear(x, q, s, bias) + gptkernels.int4_linear(x, q4, s4, z4, bias, group_size=32)

    torch._dynamo.reset()
    x = randn(3, 64)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, f(x))


@requires_gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cuda_graph_capture(fmt):
    """No host sync inside the op (split-K included): it captures and replays in a CUDA graph."""
    dtype = torch.bfloat16
    w = _weights(4096, 4096, dtype, 9)
    x = randn(1, 4096, dtype=dtype)
    if fmt == "int8":
        q, s = gptkernels.quantize_int8(w)
        fn = lambda: gptkernels.int8_linear(x, q, s)  # noqa: E731
    else:
        q, s, z = gptkernels.quantize_int4(w)
        fn = lambda: gptkernels.int4_linear(x, q, s, z)  # noqa: E731
    want = fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    x.copy_(randn(1, 4096, dtype=dtype))
    g.replay()
    torch.testing.assert_close(out, fn())
    assert not torch.equal(out, want)


_HOPPER_SCRIPT = """
import json, torch
from tools.sm90_compile import compile_launch, global_loads, launch_figures, record_launches
from gptkernels.triton import quant as tq
for fmt in ("int8", "int4"):
    for m in (1, 256):
        x = torch.empty(m, 4096, dtype=torch.bfloat16)
        if fmt == "int8":
            launches = record_launches(tq, ("_wo_gemm_kernel",), tq.int8_linear, x,
                                       torch.empty(4096, 4096, dtype=torch.int8), torch.empty(4096, dtype=torch.bfloat16), None)
        else:
            s = torch.empty(4096, 32, dtype=torch.bfloat16)
            launches = record_launches(tq, ("_wo_gemm_kernel",), tq.int4_linear, x,
                                       torch.empty(4096, 2048, dtype=torch.uint8), s, s, None, group_size=128)
        for kernel, args, kwargs in launches:
            fig = launch_figures(kernel, args, kwargs)
            llir = compile_launch(kernel, args, kwargs)[0].asm["llir"]
            x_loads = sorted({size for src, size in global_loads(llir) if src.startswith("x = tl.load")})
            print(json.dumps(dict(fmt=fmt, m=m, x_loads=x_loads, **fig)))
"""


def test_compiles_for_hopper():
    """Offline sm_90a compile (Triton's own ptxas, no GPU needed; notes/quant.md has the figures):
    both formats at a decode (1 row) and a prefill (256 rows) shape, bfloat16: no register spills,
    tensor cores (mma.sync for the 16-row decode tile, wgmma for the 128-row one), pipelined loads,
    16-byte vector loads of x."""
    import json
    import subprocess
    import sys

    from tools.sm90_compile import subprocess_env

    proc = subprocess.run([sys.executable, "-c", _HOPPER_SCRIPT], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(figures) == 4
    for f in figures:
        assert f["spill"] == 0, f
        assert f["wgmma"] if f["m"] == 256 else f["mma_sync"], f
        assert f["cp_async"] and f["x_loads"] == [16], f


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_bad_input():
    w = _weights(12, 64, torch.float32, 10)
    q, s = gptkernels.quantize_int8(w)
    q4, s4, z4 = gptkernels.quantize_int4(w, group_size=32)
    x = randn(3, 64)
    cases = [
        (lambda: gptkernels.quantize_int4(w, group_size=128), ValueError,
         r"quantize_int4: in_features \(64\) must be divisible by group_size \(128\)"),
        (lambda: gptkernels.quantize_int4(w, group_size=48), ValueError, "group_size must be a power of two"),
        (lambda: gptkernels.quantize_int4(w, group_size=16), ValueError, "group_size must be a power of two >= 32"),
        (lambda: gptkernels.quantize_int4(w, group_size=32.0), TypeError, "group_size must be an int"),
        (lambda: gptkernels.quantize_int8(w.long()), TypeError, "quantize_int8: weight must have dtype"),
        (lambda: gptkernels.quantize_int8(w[0]), ValueError, "quantize_int8: weight must have 2 dimensions"),
        (lambda: gptkernels.quantize_int8(w, scale_dtype=torch.int32), TypeError, "scale_dtype"),
        (lambda: gptkernels.quantize_int8(torch.full((2, 4), float("nan"))), ValueError, "weight must be finite"),
        (lambda: gptkernels.int8_linear(x, q, s[:-1]), ValueError, r"int8_linear: scales.shape\[0\] must be 12"),
        (lambda: gptkernels.int8_linear(x, q, s[:, None]), ValueError, "int8_linear: scales must have 1 dimensions"),
        (lambda: gptkernels.int8_linear(x, q, s.to(torch.int32)), TypeError, "int8_linear: scales must have dtype"),
        (lambda: gptkernels.int8_linear(x, q.to(torch.uint8), s), TypeError, "int8_linear: qweight must have dtype int8"),
        (lambda: gptkernels.int8_linear(x[:, :63], q, s), ValueError, r"int8_linear: x.shape\[-1\] must be K = 64"),
        (lambda: gptkernels.int8_linear(x.long(), q, s), TypeError, "int8_linear: x must have dtype"),
        (lambda: gptkernels.int8_linear(x, q, s, randn(11)), ValueError, r"int8_linear: bias.shape\[0\] must be 12"),
        (lambda: gptkernels.int8_linear(x, q, s, randn(12, dtype=torch.float16)), TypeError,
         "int8_linear: bias must have the same dtype as x"),
        (lambda: gptkernels.int4_linear(x, q4, s4, z4), ValueError,
         r"int4_linear: in_features \(64\) must be divisible by group_size \(128\)"),
        (lambda: gptkernels.int4_linear(x, q4, s4[:, :1], z4, group_size=32), ValueError,
         r"int4_linear: scales must have shape \(N, K / group_size\) = \(12, 2\)"),
        (lambda: gptkernels.int4_linear(x, q4, s4, z4[:, :1], group_size=32), ValueError,
         "int4_linear: zeros must have the shape of scales"),
        (lambda: gptkernels.int4_linear(x, q4, s4, z4.half(), group_size=32), TypeError,
         "int4_linear: zeros must have the same dtype as scales"),
        (lambda: gptkernels.int4_linear(x, q4, s4.to(torch.int8), z4, group_size=32), TypeError,
         "int4_linear: scales must have dtype"),
        (lambda: gptkernels.int4_linear(x, q4.view(torch.int8), s4, z4, group_size=32), TypeError,
         "int4_linear: qweight must have dtype uint8"),
        (lambda: gptkernels.int4_linear(x[:, :32], q4, s4, z4, group_size=32), ValueError,
         r"int4_linear: x.shape\[-1\] must be K = 64"),
        (lambda: gptkernels.int8_linear(x, q, s, backend="tpu"), ValueError, "int8_linear: backend must be"),
    ]
    for fn, exc, match in cases:
        with pytest.raises(exc, match=match):
            fn()


# --------------------------------------------------------------------------------------------------
# Quantized models
# --------------------------------------------------------------------------------------------------

from torch import nn  # noqa: E402

from gptkernels.models import TINY, from_config  # noqa: E402
from gptkernels.models.quantize import QuantLinear, model_bytes, quantize_model  # noqa: E402

#: Tiny presets have in_features 64 (hidden) and 128/256 (MLP): int4 groups of 32.
TINY_GROUP = 32
MODEL_BACKENDS = ["torch", "triton"] + (["cuda"] if ON_GPU and gptkernels.backends()["cuda"] is None else [])


def _float_model(family, seed=0):
    torch.manual_seed(seed)
    return from_config(TINY[family], dtype=torch.float32, device=DEVICE)


def _dequantized_twin(float_model, qmodel):
    """The float model with every quantized layer's weight replaced by what the QuantLinear
    multiplies by: the quantized model must compute exactly this."""
    twin = copy.deepcopy(float_model)
    with torch.no_grad():
        for name, m in qmodel.named_modules():
            if isinstance(m, QuantLinear):
                twin.get_submodule(name).weight.copy_(m.dequantized_weight(torch.float32))
    return twin


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("family", list(TINY))
def test_quantized_model_vs_float(family, fmt):
    """Every block Linear is swapped (embeddings and head stay float); the logits equal the float
    model's with the dequantized weights (GEMM on the triton and torch backends, attention on every
    backend), and stay close to the unquantized float model's."""
    f = _float_model(family)
    q = quantize_model(copy.deepcopy(f), fmt, group_size=TINY_GROUP)
    cfg = f.config
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 4 * cfg.num_layers
    assert type(q.lm_head) is nn.Linear and q.tok_emb.weight.dtype == torch.float32
    assert model_bytes(q) < model_bytes(f)
    twin = _dequantized_twin(f, q)
    ids, mask = _batch(cfg.vocab_size)
    with torch.no_grad():
        want = twin(ids, attention_mask=mask, backend="torch")
        exact = f(ids, attention_mask=mask, backend="torch")
        for gemm_backend in (None, "torch"):  # None: the device's default (triton here)
            for m in q.modules():
                if isinstance(m, QuantLinear):
                    m.backend = gemm_backend
            for backend in MODEL_BACKENDS:
                got = q(ids, attention_mask=mask, backend=backend)
                torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)
    keep = mask.bool()
    rel = float((got - exact)[keep].norm() / exact[keep].norm())
    assert rel < (0.03 if fmt == "int8" else 0.3), f"{fmt} logits are {rel:.3f} (relative) from the float model's"


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_generate(fmt):
    """generate (paged cache; on a GPU a CUDA-graph decode step) gives the tokens of the float model
    with the dequantized weights."""
    f = _float_model("gpt-neox", seed=3)
    q = quantize_model(copy.deepcopy(f), fmt, group_size=TINY_GROUP)
    twin = _dequantized_twin(f, q)
    ids, mask = _batch(f.config.vocab_size, seed=1)
    out = gptkernels.generate(q, ids, 6, attention_mask=mask)
    want = gptkernels.generate(twin, ids, 6, attention_mask=mask, backend="torch")
    assert torch.equal(out, want)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_decode_step_has_no_host_sync(fmt):
    """What the CUDA graph needs, checked on any machine: the quantized decode step (split-K GEMMs
    included) traces as one graph (torch.compile fullgraph) on the kernel backend."""
    from gptkernels.generation import PagedDecoder
    from gptkernels.models.inputs import pack_batch

    q = quantize_model(_float_model("gpt-neox", seed=4), fmt, group_size=TINY_GROUP)
    ids, mask = _batch(q.config.vocab_size)
    with torch.no_grad():
        batch = pack_batch(q.config, ids, mask, op="test", force_packed=True)
        dec = PagedDecoder(q, batch.lengths, 4, backend="triton", cuda_graph=False)
        dec.prefill(batch)
        eager = dec._step()
        torch._dynamo.reset()
        traced = torch.compile(dec._step, fullgraph=True, backend="eager")()
    torch.testing.assert_close(traced, eager)


def test_quantize_model_checks():
    f = _float_model("gpt2")
    with pytest.raises(ValueError, match=r"quantize_model: quantize must be None or one of \('int8', 'int4'\), got 'int3'"):
        quantize_model(f, "int3")
    with pytest.raises(ValueError, match=r"quantize_model: in_features of the quantized layers \(hidden_size = 64\) "
                                         r"must be divisible by group_size \(128\)"):
        quantize_model(f, "int4")
    q = quantize_model(f, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(q, "int4", group_size=TINY_GROUP)


# --------------------------------------------------------------------------------------------------
# Loading quantized: from_config, from_pretrained, memory
# --------------------------------------------------------------------------------------------------

from gptkernels.models import from_pretrained  # noqa: E402
from gptkernels.models import quantize as quantize_module  # noqa: E402


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_from_config_quantized(fmt):
    """from_config(quantize=...) draws and quantizes one layer at a time, yet builds exactly the
    model quantize_model makes of the float model with the same seed."""
    torch.manual_seed(1)
    q = from_config(TINY["opt"], dtype=torch.float16, device=DEVICE, quantize=fmt, group_size=TINY_GROUP)
    torch.manual_seed(1)
    want = quantize_model(from_config(TINY["opt"], dtype=torch.float16, device=DEVICE), fmt, group_size=TINY_GROUP)
    _same_state(q, want)
    assert q.tok_emb.weight.dtype == torch.float16 and q.layers[0].mlp.fc_in.scales.dtype == torch.float16


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("variant", ["gpt2", "gpt-neox-parallel-pct0.5"])
def test_from_pretrained_quantized(tmp_path, variant, fmt):
    """A saved HF checkpoint loads quantized layer by layer: the same model as quantizing the float
    one (GPT-2's transposed Conv1D and NeoX's per-head QKV layouts converted first), whatever the
    checkpoint's dtype; its logits stay close to HF's."""
    from tests.hf_models import VARIANTS, hf_model

    hf = hf_model(VARIANTS[variant], seed=2, device="cpu").half()  # a float16 checkpoint, loaded in float32
    hf.save_pretrained(tmp_path)
    q = from_pretrained(tmp_path, dtype=torch.float32, device=DEVICE, quantize=fmt, group_size=TINY_GROUP)
    want = quantize_model(from_pretrained(tmp_path, dtype=torch.float32, device=DEVICE), fmt, group_size=TINY_GROUP)
    _same_state(q, want)
    ids, mask = _batch(q.config.vocab_size)
    with torch.no_grad():
        got = q(ids, backend="torch")
        exact = hf.float().to(DEVICE)(input_ids=ids).logits
    rel = float((got - exact).norm() / exact.norm())
    assert rel < (0.03 if fmt == "int8" else 0.3)


def test_loading_never_holds_a_float_model(tmp_path, monkeypatch):
    """Instrumented: while from_pretrained(quantize=...) loads, the model's own bytes are the quantized
    model's from the start (empty QuantLinears, never float linears), each quantized layer receives
    its float weight once, one layer at a time, and the quantizer sees slices of at most
    SLICE_ELEMENTS elements."""
    from tests.hf_models import VARIANTS, hf_model

    hf_model(VARIANTS["gpt2"], seed=4, device="cpu").save_pretrained(tmp_path)
    monkeypatch.setattr(quantize_module, "SLICE_ELEMENTS", 1000)  # several slices per layer
    seen, sizes, slices = [], [], []
    real_fill, real_q8 = quantize_module.QuantLinear.quantize_weight_, quantize_module.quantize_int8

    def fill(self, weight):
        sizes.append(model_bytes(holder["model"]))
        seen.append((self.out_features, self.in_features, tuple(weight.shape)))
        return real_fill(self, weight)

    def q8(rows, **kw):
        slices.append(rows.numel())
        return real_q8(rows, **kw)

    holder = {}
    real_swap = quantize_module.swap_linears

    def swap(model, *a, **kw):  # remembers the model being loaded
        holder["model"] = model
        return real_swap(model, *a, **kw)

    monkeypatch.setattr(quantize_module.QuantLinear, "quantize_weight_", fill)
    monkeypatch.setattr(quantize_module, "quantize_int8", q8)
    import gptkernels.models.loading as loading

    monkeypatch.setattr(loading, "swap_linears", swap)
    q = from_pretrained(tmp_path, dtype=torch.float32, device=DEVICE, quantize="int8")
    layers = 4 * q.config.num_layers
    assert len(seen) == layers and all((a, b) == shape for a, b, shape in seen)
    assert set(sizes) == {model_bytes(q)}  # the model never grew while loading
    assert max(slices) <= 1000 + 256 and len(slices) > layers
    float_linears = sum(a * b for a, b, _ in seen) * 4
    assert model_bytes(q) < model_bytes(from_pretrained(tmp_path, dtype=torch.float32)) - float_linears // 2


@requires_gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_loading_peak_gpu_memory(tmp_path, fmt):
    """Measured on the GPU: the peak while loading is the quantized model plus less than one float
    layer (the checkpoint stays on the host; the quantizer works on slices)."""
    d = dict(model_type="gpt_neox", vocab_size=256, hidden_size=2048, num_hidden_layers=2, num_attention_heads=16,
             intermediate_size=8192, max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True)
    import transformers

    from tests.hf_models import hf_config

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(d)).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    del hf
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    q = from_pretrained(tmp_path, dtype=torch.bfloat16, device="cuda", quantize=fmt)
    peak = torch.cuda.max_memory_allocated() - start
    layer = 8192 * 2048 * 2  # the largest float layer (fc_in / fc_out) in bfloat16
    assert peak <= model_bytes(q) + layer, (peak, model_bytes(q), layer)


def test_loader_bad_input(tmp_path):
    from tests.hf_models import VARIANTS, hf_model

    hf_model(VARIANTS["gpt2"], device="cpu").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"from_pretrained: quantize must be None or one of \('int8', 'int4'\), got 'fp8'"):
        from_pretrained(tmp_path, quantize="fp8")
    with pytest.raises(ValueError, match=r"from_pretrained: in_features of the quantized layers \(hidden_size = 64\) "
                                         r"must be divisible by group_size \(128\)"):
        from_pretrained(tmp_path, quantize="int4")
    with pytest.raises(ValueError, match="from_config: group_size must be a power of two >= 32, got 24"):
        from_config(TINY["gpt2"], quantize="int4", group_size=24)
    with pytest.raises(TypeError, match="from_config: group_size must be an int"):
        from_config(TINY["gpt2"], quantize="int4", group_size="32")
    with pytest.raises(ValueError, match="from_config: quantize must be None or one of"):
        from_config(TINY["gpt2"], quantize=True)


# --------------------------------------------------------------------------------------------------
# The shipped tiny trained checkpoint (checkpoints/tiny-stdlib, tools/train_tiny.py)
# --------------------------------------------------------------------------------------------------

def test_tiny_checkpoint_loads_like_transformers():
    """Our loader and transformers read the same model and tokenizer (no download): same logits."""
    import transformers

    from gptkernels.models.loading import find_tokenizer

    tok = find_tokenizer(TINY_CKPT)
    assert tok is not None
    text = "def f(x):\n    return x + 1\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < 2048
    ours = from_pretrained(TINY_CKPT, dtype=torch.float32, device=DEVICE)
    hf = transformers.AutoModelForCausalLM.from_pretrained(TINY_CKPT, dtype=torch.float32).to(DEVICE)
    x = torch.tensor([ids], device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, backend="torch"), hf(input_ids=x).logits, atol=1e-4, rtol=1e-4)


def test_tiny_checkpoint_perplexity_float_int8_int4():
    """Trained, not random: held-out perplexity far below the vocabulary size; int8 costs < 1%,
    int4 (group 128) < 10% (the benchmark table in BENCHMARKS.md uses more text)."""
    from benchmarks import suite_quant

    windows = suite_quant.heldout_ids(windows=4)
    ppl = {}
    for fmt in (None, "int8", "int4"):
        model = from_pretrained(TINY_CKPT, dtype=torch.float32, device=DEVICE, quantize=fmt)
        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.backend = "torch"
        ppl[fmt] = suite_quant.perplexity(model, windows, backend="torch")[0]
    assert ppl[None] < 30, ppl
    assert ppl["int8"] < 1.01 * ppl[None], ppl
    assert ppl["int4"] < 1.10 * ppl[None], ppl


def test_tiny_checkpoint_cli_generates_code(capsys):
    """`python -m gptkernels generate --model checkpoints/tiny-stdlib --prompt "def "`: Python-looking
    text (the CLI, greedy; the eager backend keeps it quick in the interpreter)."""
    from gptkernels.__main__ import main

    assert main(["generate", "--model", TINY_CKPT, "--prompt", "def ", "--max-new-tokens", "12",
                 "--device", DEVICE, "--dtype", "float32", "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    text = next(line for line in out.splitlines() if "text:" in line)
    assert "def " in text and ("(" in text or "_" in text), out


# --------------------------------------------------------------------------------------------------
# Tensor parallel: each rank quantizes its own slices
# --------------------------------------------------------------------------------------------------


def _tp_quant_rank(rank: int, world: int, root: str) -> None:
    """One rank (torch.multiprocessing.spawn): load the checkpoint quantized with tp_group, save logits."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="file://" + os.path.join(root, "rendezvous"), rank=rank,
                            world_size=world)
    try:
        out = {}
        for fmt in ("int8", "int4"):
            model = from_pretrained(root, dtype=torch.float32, quantize=fmt, group_size=TINY_GROUP,
                                    tp_group=dist.group.WORLD)
            ids, mask = _batch(model.config.vocab_size)
            with torch.no_grad():
                out[fmt] = model(ids.cpu(), attention_mask=mask.cpu(), backend="torch")
            out[fmt + "_bytes"] = model_bytes(model)
        torch.manual_seed(11)  # rank 0's random state is shared: the single-process model's weights
        model = from_config(TINY["gpt-neox"], quantize="int4", group_size=TINY_GROUP, tp_group=dist.group.WORLD)
        with torch.no_grad():
            out["random_int4"] = model(ids.cpu(), attention_mask=mask.cpu(), backend="torch")
        torch.save(out, os.path.join(root, f"quant-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_quantized(tmp_path):
    """2 ranks, gloo: from_pretrained and from_config; every rank quantizes the slices it holds (column-parallel QKV/fc_in rows,
    row-parallel out/fc_out columns, which keep their all-reduce). int4 groups do not cross the
    slices, so the result is the single-process int4 model's; int8's per-channel scales of a
    row-parallel layer come from the rank's columns, so int8 is close to the float model instead."""
    import torch.multiprocessing as mp

    from tests.hf_models import VARIANTS, hf_model

    hf_model(VARIANTS["gpt-neox-parallel-pct0.5"], seed=5, device="cpu").save_pretrained(tmp_path)
    mp.spawn(_tp_quant_rank, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"quant-{r}.pt") for r in range(2)]
    ids, mask = _batch(TINY["gpt-neox"]["vocab_size"])
    ids, mask = ids.cpu(), mask.cpu()
    keep = mask.bool()
    with torch.no_grad():
        single4 = from_pretrained(tmp_path, quantize="int4", group_size=TINY_GROUP)(ids, attention_mask=mask,
                                                                                   backend="torch")
        exact = from_pretrained(tmp_path)(ids, attention_mask=mask, backend="torch")
    single_bytes = model_bytes(from_pretrained(tmp_path, quantize="int4", group_size=TINY_GROUP))
    torch.manual_seed(11)
    with torch.no_grad():
        random4 = from_config(TINY["gpt-neox"], quantize="int4", group_size=TINY_GROUP)(ids, attention_mask=mask,
                                                                                       backend="torch")
    for r in ranks:
        torch.testing.assert_close(r["random_int4"], random4, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(r["int4"], single4, atol=1e-4, rtol=1e-4)
        assert float((r["int8"] - exact)[keep].norm() / exact[keep].norm()) < 0.03
        assert r["int4_bytes"] < single_bytes  # each rank holds its part of the quantized blocks


def test_benchmark_quant_suite_without_gpu(tmp_path, capsys, monkeypatch):
    """`python -m benchmarks.run --suite quant` without a GPU (what `make bench` runs): the GEMMs'
    parity rows pass, the perplexity rows are measured (on 4 windows here), and BENCHMARKS.md gets
    the table."""
    from benchmarks import report, results, run, suite_quant

    monkeypatch.setattr(suite_quant, "PPL_WINDOWS", 4)

    rc = run.main(["--suite", "quant", "--parity", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0, capsys.readouterr().out
    path = next(tmp_path.glob("parity-*.json"))
    doc = results.load(path)
    parity = [r for r in doc["rows"] if r["table"] == "parity" and r["status"] == "pass"]
    ppl = {r["impl"]: r["value"] for r in doc["rows"] if r["table"] == "quant-ppl" and r["status"] == "ok"}
    assert {r["params"]["op"] for r in parity} == ({"int8_linear", "int4_linear"} if not ON_GPU else
                                                    {r["params"]["op"] for r in parity})
    assert {"float", "int8", "int4 (group 128)"} <= set(ppl) and ppl["int8"] < 1.01 * ppl["float"]
    md = tmp_path / "BENCHMARKS.md"
    report.generate([path], out=md, plots_dir=tmp_path, store=False)
    text = md.read_text()
    assert "## Quantization" in text and "Perplexity of the tiny trained checkpoint" in text
