"""Weight-only quantization: the quantizers and the GEMMs ``y = x @ dequant(W)^T (+ bias)``.

Formats (round-to-nearest; W is a Linear weight (N, K) = (out_features, in_features)):

* **int8**, symmetric, one scale per output channel: ``qweight`` int8 (N, K) in [-127, 127],
  ``scales`` (N,); ``W ~ qweight * scales[:, None]``.
* **int4**, asymmetric, one scale and zero point per group of ``group_size`` consecutive input
  channels (default 128; a power of two >= 32 dividing K): ``qweight`` uint8 (N, K/2), two codes
  0..15 per byte along K (byte j of row n: low nibble = column 2j, high nibble = column 2j + 1);
  ``scales`` and ``zeros`` (N, K/group_size), the same float dtype; ``W ~ (q - zeros) * scales`` per
  group. The quantizer writes integer zero points (so 0 is exact); the GEMMs accept any float zeros.

Scales (and zeros) are float16, bfloat16 or float32; the quantizers store them in the weight's dtype
unless told otherwise (``scale_dtype``) and quantize against the stored values, so every weight is
within half a step (``scale / 2``) of its dequantized value.

The GEMMs check their inputs here, resolve the backend (``gptkernels._backend``) and run the eager
reference (``"torch"``) or a kernel backend through the ``torch.library`` ops
``gptkernels::int8_linear`` / ``gptkernels::int4_linear`` (fake implementations included:
``torch.compile(fullgraph=True)`` traces them; no host sync: CUDA graphs capture them). The Triton
kernels dequantize in registers (:mod:`gptkernels.triton.quant`); the ``"cuda"`` backend has no
weight-only GEMM and raises :class:`gptkernels.BackendUnavailableError`. Every backend is
differentiable in x and bias (the kernel backends' backward is eager code over the dequantized
weight: for fine-tuning around frozen quantized layers, not fast); the quantized tensors get no
gradient.

Models: :func:`gptkernels.models.from_pretrained` (``quantize="int8" | "int4"``) swaps the blocks'
Linear layers for :class:`gptkernels.models.quantize.QuantLinear`. The fp8 KV cache (issue 16's
other half) quantizes the paged cache, not weights: its scales are arguments of the paged ops.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks as C
from . import _policy as P
from . import reference
from ._backend import resolve
from ._dispatch import backend_fn, needs_grad

#: The weight-only formats, by the name ``from_pretrained(quantize=...)`` takes.
FORMATS = ("int8", "int4")
#: Default int4 group size (input channels per scale and zero point), as gpt-fast, AWQ and GPTQ.
DEFAULT_GROUP_SIZE = 128
#: The smallest int4 group: a K tile of the kernel lies in one group and holds two 16-wide dots.
MIN_GROUP_SIZE = 32

OP8, OP4 = "int8_linear", "int4_linear"

# --------------------------------------------------------------------------------------------------
# torch.library ops (kernel backends; "torch" is plain eager code). x arrives flattened to (M, K).
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("gptkernels::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    return backend_fn(backend, "int8_linear", OP8)(x, qweight, scales, bias)


@_int8_linear_op.register_fake
def _(x, qweight, scales, bias, backend):
    return x.new_empty((x.shape[0], qweight.shape[0]))


def _weight_grads(ctx, dy, weight):
    """Gradients of y = x W^T + b for x and b (the quantized tensors get none), in float32 eager
    code over the dequantized weight ``weight``: the backward is for occasional use (fine-tuning
    what sits around a frozen quantized layer), not a kernel."""
    dx = (dy.float() @ weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
    dbias = dy.float().sum(0).to(ctx.x_dtype) if ctx.has_bias and ctx.needs_input_grad[3 + ctx.int4] else None
    return dx, dbias


def _setup_context(ctx, inputs, output):
    x, qweight, scales = inputs[:3]
    ctx.int4 = len(inputs) == 7
    zeros = inputs[3] if ctx.int4 else None
    ctx.group_size = inputs[5] if ctx.int4 else None
    ctx.has_bias = inputs[3 + ctx.int4] is not None
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(qweight, scales, zeros)


def _int8_backward(ctx, dy):
    qweight, scales, _ = ctx.saved_tensors
    dx, dbias = _weight_grads(ctx, dy, reference.dequantize_int8(qweight, scales, torch.float32))
    return dx, None, None, dbias, None


_int8_linear_op.register_autograd(_int8_backward, setup_context=_setup_context)


@torch.library.custom_op("gptkernels::int4_linear", mutates_args=())
def _int4_linear_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    bias: Optional[torch.Tensor], group_size: int, backend: str) -> torch.Tensor:
    return backend_fn(backend, "int4_linear", OP4)(x, qweight, scales, zeros, bias, group_size=group_size)


@_int4_linear_op.register_fake
def _(x, qweight, scales, zeros, bias, group_size, backend):
    return x.new_empty((x.shape[0], qweight.shape[0]))


def _int4_backward(ctx, dy):
    qweight, scales, zeros = ctx.saved_tensors
    w = reference.dequantize_int4(qweight, scales, zeros, ctx.group_size, torch.float32)
    dx, dbias = _weight_grads(ctx, dy, w)
    return dx, None, None, None, dbias, None, None


_int4_linear_op.register_autograd(_int4_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def check_group_size(op: str, group_size, in_features: int | None = None) -> int:
    """``group_size`` is a power of two >= MIN_GROUP_SIZE that divides ``in_features`` (if given)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{op}: group_size must be an int, got {group_size!r}")
    if group_size < MIN_GROUP_SIZE or group_size & (group_size - 1):
        raise ValueError(f"{op}: group_size must be a power of two >= {MIN_GROUP_SIZE}, got {group_size}")
    if in_features is not None and in_features % group_size:
        raise ValueError(f"{op}: in_features ({in_features}) must be divisible by group_size ({group_size})")
    return group_size


def _check_scale_dtype(op: str, scale_dtype, weight: torch.Tensor) -> torch.dtype:
    if scale_dtype is None:
        return weight.dtype if weight.dtype in P.FLOAT_DTYPES else torch.float32
    if not isinstance(scale_dtype, torch.dtype) or scale_dtype not in P.FLOAT_DTYPES:
        raise TypeError(f"{op}: scale_dtype must be None or one of float16, bfloat16, float32, got {scale_dtype!r}")
    return scale_dtype


def _check_weight(op: str, weight) -> None:
    C.check_tensor(weight, "weight", ndim=2, dtypes=P.FLOAT_DTYPES + (torch.float64,), op=op)
    if weight.numel() and not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{op}: weight must be finite (it has inf or NaN entries)")


def _check_params(op: str, qweight, scales, zeros, group_size, device) -> tuple[int, int]:
    """The quantized weight's tensors; returns (N, K)."""
    int4 = zeros is not None or op in (OP4, "dequantize_int4")
    C.check_tensor(qweight, "qweight", ndim=2, dtypes=(torch.uint8,) if int4 else (torch.int8,), op=op)
    n = qweight.shape[0]
    if int4:
        k = 2 * qweight.shape[1]
        check_group_size(op, group_size, k)
        groups = k // group_size
        C.check_tensor(scales, "scales", ndim=2, dtypes=P.FLOAT_DTYPES, op=op)
        if tuple(scales.shape) != (n, groups):
            raise ValueError(f"{op}: scales must have shape (N, K / group_size) = ({n}, {groups}) "
                             f"(qweight {tuple(qweight.shape)} packs K = {k}), got {tuple(scales.shape)}")
        C.check_tensor(zeros, "zeros", ndim=2, dtypes=P.FLOAT_DTYPES, op=op)
        if zeros.shape != scales.shape:
            raise ValueError(f"{op}: zeros must have the shape of scales {tuple(scales.shape)}, got {tuple(zeros.shape)}")
        C.check_same_dtype(op, "scales", scales, zeros=zeros)
    else:
        k = qweight.shape[1]
        C.check_tensor(scales, "scales", ndim=1, dtypes=P.FLOAT_DTYPES, op=op)
        C.check_dim(op, "scales", scales, 0, n, "qweight.shape[0], one scale per output channel")
    C.check_same_device(op, "qweight", qweight, scales=scales, zeros=zeros)
    if device is not None and qweight.device != device:
        raise ValueError(f"{op}: qweight must be on x's device ({device}), got {qweight.device}")
    return n, k


def _check_linear(op: str, x, qweight, scales, zeros, bias, group_size) -> tuple[int, int]:
    C.check_tensor(x, "x", dtypes=P.FLOAT_DTYPES, op=op)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension (..., K), got a 0-d tensor")
    n, k = _check_params(op, qweight, scales, zeros, group_size, x.device)
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x.shape[-1] must be K = {k} (the in_features of qweight "
                         f"{tuple(qweight.shape)}), got shape {tuple(x.shape)}")
    if bias is not None:
        C.check_tensor(bias, "bias", ndim=1, op=op)
        C.check_same_dtype(op, "x", x, bias=bias)
        C.check_same_device(op, "x", x, bias=bias)
        C.check_dim(op, "bias", bias, 0, n, "qweight.shape[0], the out_features")
    return n, k


# --------------------------------------------------------------------------------------------------
# Quantizers
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def quantize_int8(weight: torch.Tensor, *, scale_dtype: torch.dtype | None = None):
    """Symmetric int8 per output channel, round to nearest. ``weight`` (N, K) float.

    Returns ``(qweight, scales)``: int8 (N, K) in [-127, 127] and (N,) in ``scale_dtype`` (default:
    the weight's dtype; float32 for a float64 weight), scale = max|row| / 127.
    """
    op = "quantize_int8"
    _check_weight(op, weight)
    return reference.quantize_int8(weight, _check_scale_dtype(op, scale_dtype, weight))


@torch.no_grad()
def quantize_int4(weight: torch.Tensor, *, group_size: int = DEFAULT_GROUP_SIZE,
                  scale_dtype: torch.dtype | None = None):
    """Asymmetric int4 per group of ``group_size`` input channels, round to nearest. ``weight`` (N, K)
    float with K divisible by ``group_size`` (a power of two >= 32).

    Returns ``(qweight, scales, zeros)``: uint8 (N, K/2) (two codes per byte, low nibble = even
    column) and (N, K/group_size) scales and integer zero points in ``scale_dtype`` (default: the
    weight's dtype). Each group's range is widened to include 0; scale = range / 15.
    """
    op = "quantize_int4"
    _check_weight(op, weight)
    check_group_size(op, group_size, weight.shape[1])
    return reference.quantize_int4(weight, group_size, _check_scale_dtype(op, scale_dtype, weight))


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, *, dtype: torch.dtype | None = None):
    """The float weight (N, K) ``qweight * scales[:, None]`` in ``dtype`` (default: scales' dtype)."""
    _check_params("dequantize_int8", qweight, scales, None, None, None)
    return reference.dequantize_int8(qweight, scales, dtype or scales.dtype)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, *,
                    group_size: int = DEFAULT_GROUP_SIZE, dtype: torch.dtype | None = None):
    """The float weight (N, K) ``(q - zeros) * scales`` per group, in ``dtype`` (default: scales')."""
    _check_params("dequantize_int4", qweight, scales, zeros, group_size, None)
    return reference.dequantize_int4(qweight, scales, zeros, group_size, dtype or scales.dtype)


# --------------------------------------------------------------------------------------------------
# GEMMs
# --------------------------------------------------------------------------------------------------


def _run(op: str, x, n: int, k: int, backend, eager, kernel, *quantized):
    if needs_grad(*quantized):
        raise ValueError(f"{op}: scales and zeros get no gradient (the weight is frozen), but one requires "
                         "grad: detach it")
    backend = resolve(backend, x.device, op)
    if backend == "torch":
        return eager()
    backend_fn(backend, op, op)  # a backend without this GEMM fails here, before any work
    lead = x.shape[:-1]
    return kernel(x.reshape(-1, k), backend).reshape(*lead, n)


def int8_linear(x, qweight, scales, bias=None, *, backend=None) -> torch.Tensor:
    """``x @ (qweight * scales[:, None])^T + bias``: x (..., K) float16/bfloat16/float32 -> (..., N)
    in x's dtype. ``qweight`` int8 (N, K), ``scales`` (N,) float, ``bias`` (N,) in x's dtype or None.
    Accumulates in float32 (float64 for float64 x on ``"torch"``)."""
    n, k = _check_linear(OP8, x, qweight, scales, None, bias, None)
    return _run(OP8, x, n, k, backend,
                lambda: reference.int8_linear(x, qweight, scales, bias),
                lambda x2, be: _int8_linear_op(x2, qweight, scales, bias, be), scales)


def int4_linear(x, qweight, scales, zeros, bias=None, *, group_size=DEFAULT_GROUP_SIZE,
                backend=None) -> torch.Tensor:
    """``x @ dequantize_int4(qweight, scales, zeros)^T + bias``: x (..., K) -> (..., N) in x's dtype.
    ``qweight`` uint8 (N, K/2), ``scales``/``zeros`` (N, K/group_size), ``bias`` (N,) or None."""
    n, k = _check_linear(OP4, x, qweight, scales, zeros, bias, group_size)
    return _run(OP4, x, n, k, backend,
                lambda: reference.int4_linear(x, qweight, scales, zeros, bias, group_size=group_size),
                lambda x2, be: _int4_linear_op(x2, qweight, scales, zeros, bias, group_size, be), scales, zeros)
