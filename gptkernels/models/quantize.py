"""Weight-only quantized models: the blocks' Linear layers swapped for :class:`QuantLinear` (gpt-fast
style: a module swap; the model code is unchanged).

    model = from_pretrained(path, dtype=torch.bfloat16, device="cuda", quantize="int4", group_size=128)
    model = from_config(PRESETS["pythia-1.4b"], dtype=torch.bfloat16, device="cuda", quantize="int8")
    model = quantize_model(float_model, "int8")          # an already-loaded model, in place

What is quantized: every Linear of every block: the fused QKV projection, the attention output, the
two MLP layers (:data:`QUANTIZED_LINEARS`). The embeddings, OPT's ``project_in``/``project_out`` and
the LM head stay in the model's dtype (the head is often tied to the embedding, and its error lands
directly on the logits). Scales (and int4 zero points) are stored in the model's dtype. Formats and
layout: :mod:`gptkernels.quant`.

Loading quantizes one layer at a time: the model is built on the meta device with QuantLinear
modules already in place, materialised on its device (the quantized model's memory: no float
linear ever exists there as a whole model), and each checkpoint weight is moved to the device, cast
and quantized in slices of about :data:`SLICE_ELEMENTS` elements (whole output rows), then dropped.
The device's peak is the quantized model plus the quantizer's float32 working copies of one slice
(a few MiB; less than one float layer of any real model).

A QuantLinear's GEMM runs on ``QuantLinear.backend`` (default None: the default backend for its
device, see :mod:`gptkernels._backend`), not on the ``backend=`` given to the model, which picks the
attention, rotary and paged-cache kernels as before: the CUDA backend has no weight-only GEMM, and
float Linear layers do not follow that argument either (they are cuBLAS calls).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ..quant import (DEFAULT_GROUP_SIZE, FORMATS, check_group_size, dequantize_int4, dequantize_int8, int4_linear,
                     int8_linear, quantize_int4, quantize_int8)
from .common import CausalLM
from .config import ModelConfig
from .families import convert_hf_state_dict
from .tp import RowParallelLinear

#: The Linear layers of each block that are quantized (module paths under ``layers.<i>``).
QUANTIZED_LINEARS = ("attn.qkv", "attn.out", "mlp.fc_in", "mlp.fc_out")
#: Weight elements quantized per step (a slice of whole output rows): bounds the float32 working
#: copies of the quantizer to a few MiB, well under one layer of a real model.
SLICE_ELEMENTS = 1 << 20


def check_quantize(op: str, quantize, group_size, cfg: Optional[ModelConfig] = None) -> Optional[str]:
    """``quantize`` is None, "int8" or "int4"; for int4, ``group_size`` is valid and divides the
    in_features of every quantized layer (hidden_size and intermediate_size) of ``cfg``."""
    if quantize is None:
        return None
    if not isinstance(quantize, str) or quantize not in FORMATS:
        raise ValueError(f"{op}: quantize must be None or one of {FORMATS}, got {quantize!r}")
    if quantize == "int4":
        check_group_size(op, group_size)
        if cfg is not None:
            for name, k in (("hidden_size", cfg.hidden_size), ("intermediate_size", cfg.intermediate_size)):
                if k % group_size:
                    raise ValueError(f"{op}: in_features of the quantized layers ({name} = {k}) must be "
                                     f"divisible by group_size ({group_size})")
    return quantize


class QuantLinear(nn.Module):
    """A Linear layer (y = x W^T + b) with a weight-only quantized W: int8 per output channel or
    int4 per group of ``group_size`` input channels (:mod:`gptkernels.quant`).

    Buffers ``qweight``, ``scales`` (and ``zeros`` for int4); ``bias`` a frozen Parameter in the
    model's dtype (or None). ``backend`` selects the GEMM's backend (None: the device's default).
    Built empty (fill it with :meth:`quantize_weight_`) or from a Linear with :meth:`from_linear`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str, *,
                 group_size: int = DEFAULT_GROUP_SIZE, dtype=None, device=None, backend: Optional[str] = None):
        super().__init__()
        check_quantize("QuantLinear", fmt, group_size)
        if fmt == "int4":
            check_group_size("QuantLinear", group_size, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.group_size, self.backend = fmt, group_size if fmt == "int4" else None, backend
        dtype = dtype or torch.get_default_dtype()
        if fmt == "int8":
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
            self.zeros = None
        else:
            groups = in_features // group_size
            self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype, device=device))
            self.register_buffer("zeros", torch.empty(out_features, groups, dtype=dtype, device=device))
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @staticmethod
    def from_linear(linear: nn.Linear, fmt: str, *, group_size: int = DEFAULT_GROUP_SIZE,
                    backend: Optional[str] = None) -> "QuantLinear":
        """The quantized twin of ``linear`` (a tensor-parallel row-parallel layer keeps its
        reduction: :class:`QuantRowParallelLinear`)."""
        q = _empty_like(linear, fmt, group_size, backend)
        q.quantize_weight_(linear.weight)
        if linear.bias is not None:
            with torch.no_grad():
                q.bias.copy_(linear.bias)
        return q

    @torch.no_grad()
    def quantize_weight_(self, weight: torch.Tensor) -> None:
        """Quantize the float ``weight`` (out_features, in_features) into this layer's buffers, in
        slices of whole rows (about SLICE_ELEMENTS elements), each moved to this layer's device first:
        the full float weight never has to be there, and the quantizer's float32 copies are one slice."""
        want = (self.out_features, self.in_features)
        if tuple(weight.shape) != want:
            raise ValueError(f"QuantLinear: weight must have shape {want}, got {tuple(weight.shape)}")
        dev, sdtype = self.qweight.device, self.scales.dtype
        step = max(1, SLICE_ELEMENTS // max(1, self.in_features))
        for r in range(0, self.out_features, step):
            rows = weight[r:r + step].to(dev, sdtype)  # as the float model would hold it
            if self.fmt == "int8":
                q, s = quantize_int8(rows, scale_dtype=sdtype)
            else:
                q, s, z = quantize_int4(rows, group_size=self.group_size, scale_dtype=sdtype)
                self.zeros[r:r + step].copy_(z)
            self.qweight[r:r + step].copy_(q)
            self.scales[r:r + step].copy_(s)
            del rows, q, s

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float weight this layer multiplies by (for tests and inspection)."""
        if self.fmt == "int8":
            return dequantize_int8(self.qweight, self.scales, dtype=dtype)
        return dequantize_int4(self.qweight, self.scales, self.zeros, group_size=self.group_size, dtype=dtype)

    def _gemm(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.fmt == "int8":
            return int8_linear(x, self.qweight, self.scales, bias, backend=self.backend)
        return int4_linear(x, self.qweight, self.scales, self.zeros, bias, group_size=self.group_size,
                           backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._gemm(x, self.bias)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.fmt == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fmt={self.fmt}{g}")


class QuantRowParallelLinear(QuantLinear):
    """The QuantLinear of a tensor-parallel rank's row-parallel layer (:class:`RowParallelLinear`:
    attention output, MLP down projection): the rank's slice of the input columns is quantized, its
    partial product gets the bias on rank 0 only, then the all-reduce (unless the block adds its
    partials first: ``reduce=False``)."""

    def __init__(self, *args, tp, reduce: bool, **kw):
        super().__init__(*args, **kw)
        self.tp, self.reduce = tp, reduce
        self.bias_here = tp.rank == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._gemm(x, self.bias if self.bias_here else None)
        return self.tp.all_reduce(y) if self.reduce else y


def _empty_like(lin: nn.Linear, fmt: str, group_size: int, backend: Optional[str]) -> QuantLinear:
    """An empty QuantLinear of ``lin``'s shape, device and dtype (row-parallel stays row-parallel)."""
    kw = dict(group_size=group_size, dtype=lin.weight.dtype, device=lin.weight.device, backend=backend)
    args = (lin.in_features, lin.out_features, lin.bias is not None, fmt)
    if isinstance(lin, RowParallelLinear):
        return QuantRowParallelLinear(*args, tp=lin.tp, reduce=lin.reduce, **kw)
    return QuantLinear(*args, **kw)


# --------------------------------------------------------------------------------------------------
# Model transformations
# --------------------------------------------------------------------------------------------------


def _quantized_linears(model: CausalLM) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """(full name, parent module, attribute, module) of every Linear slot that gets quantized."""
    for i, block in enumerate(model.layers):
        for path in QUANTIZED_LINEARS:
            parent_name, attr = path.split(".")
            parent = getattr(block, parent_name)
            yield f"layers.{i}.{path}", parent, attr, getattr(parent, attr)


def swap_linears(model: CausalLM, fmt: str, *, group_size: int = DEFAULT_GROUP_SIZE,
                 backend: Optional[str] = None) -> CausalLM:
    """Replace the blocks' Linear layers by *empty* QuantLinears (same device and dtype), in place.
    On a meta-device model this allocates nothing: the loaders fill the layers afterwards."""
    check_quantize("quantize_model", fmt, group_size, model.config)
    for _, parent, attr, lin in _quantized_linears(model):
        setattr(parent, attr, _empty_like(lin, fmt, group_size, backend))
    return model


def quantize_model(model: CausalLM, fmt: str, *, group_size: int = DEFAULT_GROUP_SIZE,
                   backend: Optional[str] = None) -> CausalLM:
    """Quantize a loaded float model in place, one Linear at a time (each float weight is released
    as soon as its QuantLinear exists). Returns the model."""
    check_quantize("quantize_model", fmt, group_size, model.config)
    for _, parent, attr, lin in _quantized_linears(model):
        if isinstance(lin, QuantLinear):
            raise ValueError(f"quantize_model: the model is already quantized ({lin.fmt})")
        setattr(parent, attr, QuantLinear.from_linear(lin, fmt, group_size=group_size, backend=backend))
        del lin
    return model


def quantized_format(model: nn.Module) -> Optional[str]:
    """"int8" / "int4" if ``model`` holds QuantLinear layers, else None."""
    return next((m.fmt for m in model.modules() if isinstance(m, QuantLinear)), None)


@torch.no_grad()
def load_hf_state_dict_quantized(model: CausalLM, state_dict: dict, *, sharded: bool = False) -> None:
    """:meth:`CausalLM.load_hf_state_dict` for a model whose Linears were swapped by
    :func:`swap_linears`: float tensors are copied, each quantized layer's float weight is quantized
    into it as it comes (one at a time; a tensor-parallel rank quantizes its slice). Missing,
    unexpected or misshapen weights are a ValueError."""
    cfg = model.config
    tp = getattr(model, "tp", None)
    if tp is not None:  # as CausalLM.load_hf_state_dict: this rank's slices, its local shapes
        if not sharded:
            state_dict = tp.shard_hf_state_dict(state_dict)
        cfg = tp.plan.local_config
    elif sharded:
        raise ValueError("load_hf_state_dict: sharded=True needs a tensor-parallel model")
    converted = convert_hf_state_dict(cfg, state_dict)
    if model.config.tie_word_embeddings:
        converted["lm_head.weight"] = converted["tok_emb.weight"]
    quantized = {name: mod for name, _, _, mod in _quantized_linears(model)}
    expected = {}  # name -> (shape, the tensor or QuantLinear it loads into)
    for name, t in model.state_dict(keep_vars=True).items():
        owner = name.rsplit(".", 1)[0]
        if owner in quantized and not name.endswith(".bias"):
            continue  # qweight / scales / zeros: filled from the float weight below
        expected[name] = (tuple(t.shape), t)
    for owner, mod in quantized.items():
        expected[f"{owner}.weight"] = ((mod.out_features, mod.in_features), mod)
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise ValueError(f"load_hf_state_dict: state_dict does not match a {cfg.family} model: missing "
                         f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected "
                         f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for name, t in converted.items():
        shape = expected[name][0]
        if tuple(t.shape) != shape:
            raise ValueError(f"load_hf_state_dict: state_dict weight for {name} has shape {tuple(t.shape)}, "
                             f"the model expects {shape}")
    for name in list(converted):
        t = converted.pop(name)  # dropped as soon as it is loaded
        target = expected[name][1]
        if isinstance(target, QuantLinear):
            target.quantize_weight_(t)
        else:
            target.copy_(t)
        del t


def _proxy(model: CausalLM, name: str, param: nn.Parameter) -> nn.Module:
    """A module holding only ``param`` under ``name`` (and the model's ``tp``): a model initialiser
    run on it draws exactly what it draws for that parameter of the whole model."""
    root = holder = nn.Module()
    root.tp = getattr(model, "tp", None)
    *path, leaf = name.split(".")
    for part in path:
        child = nn.Module()
        holder.add_module(part, child)
        holder = child
    holder.register_parameter(leaf, param)
    return root


@torch.no_grad()
def init_quantized_(model: CausalLM, init_weights: Callable[[nn.Module], object]) -> CausalLM:
    """Random weights for a :func:`swap_linears` model: ``init_weights(module)`` (the loaders'
    :func:`~gptkernels.models.loading.init_weights_`) runs parameter by parameter, in the order of
    the float model, each quantized layer's float weight drawn into a temporary in the model's dtype
    and quantized at once. Under the same seed the result equals :func:`quantize_model` of the float
    model ``from_config`` builds (tensor parallel too: the initialiser cuts the rank's part); only one
    float layer exists at a time."""
    with torch.device("meta"):
        order = [name for name, _ in CausalLM(model.config).named_parameters()]
    quantized = {f"{name}.weight": mod for name, _, _, mod in _quantized_linears(model)}
    params = dict(model.named_parameters())
    for name in order:
        mod = quantized.get(name)
        if mod is None:
            init_weights(_proxy(model, name, params[name]))
            continue
        w = nn.Parameter(torch.empty(mod.out_features, mod.in_features, dtype=mod.scales.dtype,
                                     device=mod.qweight.device), requires_grad=False)
        init_weights(_proxy(model, name, w))
        mod.quantize_weight_(w)
        del w
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (a tied weight counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


__all__ = ["QUANTIZED_LINEARS", "QuantLinear", "QuantRowParallelLinear", "check_quantize", "init_quantized_", "load_hf_state_dict_quantized",
           "model_bytes", "quantize_model", "quantized_format", "swap_linears"]
