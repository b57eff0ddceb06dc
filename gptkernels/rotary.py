"""Public rotary-embedding API: :func:`rotary_cos_sin` and :func:`apply_rotary`.

Same shape as :mod:`gptkernels.attention`: inputs are checked at the boundary, the backend is
resolved, ``"torch"`` runs the eager reference, and kernel backends run through the ``torch.library``
ops ``gptkernels::apply_rotary`` (out of place, with a fake implementation and an autograd formula)
and ``gptkernels::apply_rotary_`` (in place, mutating q and k), so ``torch.compile(fullgraph=True)``
sees one opaque op.

The backward of a rotation by theta is the rotation by -theta of the output gradients (the rotation
matrix is orthogonal), so the backward is the forward kernel with ``conjugate=True``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _checks as C
from . import _policy as P
from . import reference
from ._backend import resolve
from ._dispatch import backend_fn, needs_grad

OP = "apply_rotary"
OP_CACHE = "rotary_cos_sin"

# --------------------------------------------------------------------------------------------------
# torch.library ops (kernel backends only: "torch" is plain eager code that autograd and
# torch.compile trace by themselves)
# --------------------------------------------------------------------------------------------------


def _offset_arg(offset_t: Optional[torch.Tensor], offset: int):
    """The launcher's ``offset``: the (B,) tensor if there is one, else the int."""
    return offset_t if offset_t is not None else offset


@torch.library.custom_op("gptkernels::apply_rotary", mutates_args=())
def _rotary(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor],
    offset_t: Optional[torch.Tensor],
    offset: int,
    interleaved: bool,
    conjugate: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    # A custom op cannot return None: without k, the second output is an empty placeholder.
    fn = backend_fn(backend, "apply_rotary", OP)
    q_out, k_out = fn(q, k, cos, sin, positions=positions, offset=_offset_arg(offset_t, offset),
                      interleaved=interleaved, inplace=False, conjugate=conjugate)
    return q_out, (k_out if k_out is not None else q.new_empty(0))


@_rotary.register_fake
def _(q, k, cos, sin, positions, offset_t, offset, interleaved, conjugate, backend):
    return q.new_empty(q.shape), (k.new_empty(k.shape) if k is not None else q.new_empty(0))


def _rotary_setup_context(ctx, inputs, output):
    q, k, cos, sin, positions, offset_t, offset, interleaved, conjugate, backend = inputs
    ctx.save_for_backward(cos, sin, positions, offset_t)
    ctx.params = (offset, interleaved, conjugate, backend)
    ctx.shapes = (q.shape, None if k is None else k.shape)


def _rotary_backward(ctx, dq_out, dk_out):
    # d/dx of R(theta) x is R(theta)^T = R(-theta): rotate the output gradients back.
    cos, sin, positions, offset_t = ctx.saved_tensors
    offset, interleaved, conjugate, backend = ctx.params
    q_shape, k_shape = ctx.shapes
    if dq_out is None:
        dq_out = cos.new_zeros(q_shape)
    if k_shape is None:
        dk_out = None
    elif dk_out is None:
        dk_out = cos.new_zeros(k_shape)
    dq, dk = _rotary(dq_out, dk_out, cos, sin, positions, offset_t, offset, interleaved,
                     not conjugate, backend)
    return dq, (dk if k_shape is not None else None), None, None, None, None, None, None, None, None


_rotary.register_autograd(_rotary_backward, setup_context=_rotary_setup_context)


@torch.library.custom_op("gptkernels::apply_rotary_", mutates_args=("q", "k"))
def _rotary_inplace(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor],
    offset_t: Optional[torch.Tensor],
    offset: int,
    interleaved: bool,
    backend: str,
) -> None:
    fn = backend_fn(backend, "apply_rotary", OP)
    fn(q, k, cos, sin, positions=positions, offset=_offset_arg(offset_t, offset),
       interleaved=interleaved, inplace=True, conjugate=False)


@_rotary_inplace.register_fake
def _(q, k, cos, sin, positions, offset_t, offset, interleaved, backend):
    return None


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def check_cos_sin(op: str, cos, sin, q: torch.Tensor, head_dim: int, names: tuple[str, str] = ("cos", "sin")) -> None:
    """cos/sin caches (max_positions, R/2) of one float dtype on q's device, with R <= ``head_dim``
    (shared with the fused decode ops, :mod:`gptkernels.decode`, whose names for them differ)."""
    cn, sn = names
    C.check_tensor(cos, cn, ndim=2, dtypes=P.FLOAT_DTYPES, op=op)
    C.check_tensor(sin, sn, ndim=2, dtypes=P.FLOAT_DTYPES, op=op)
    if sin.shape != cos.shape:
        raise ValueError(f"{op}: {sn} must have {cn}'s shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    C.check_same_dtype(op, cn, cos, **{sn: sin})
    C.check_same_device(op, "q", q, **{cn: cos, sn: sin})
    half = cos.shape[1]
    if half < 1 or 2 * half > head_dim:
        raise ValueError(f"{op}: {cn}/{sn} must be (max_positions, R/2) with rotary dim R <= head dim "
                         f"{head_dim}, got {cn} shape {tuple(cos.shape)} (R = {2 * half})")


def _check_apply_rotary(q, k, cos, sin, positions, offset, interleaved, inplace):
    """Validate an apply_rotary call (everything that needs no device sync; the rest under
    GPTKERNELS_DEBUG=1)."""
    C.check_tensor(q, "q", ndim=(3, 4), dtypes=P.FLOAT_DTYPES, op=OP)
    lead = q.shape[:-2]  # (B, S) dense, (T,) packed
    if k is not None:
        C.check_tensor(k, "k", ndim=q.dim(), dtypes=P.FLOAT_DTYPES, op=OP)
        C.check_same_dtype(OP, "q", q, k=k)
        C.check_same_device(OP, "q", q, k=k)
        if k.shape[:-2] != lead:
            what = "batch and sequence" if q.dim() == 4 else "token"
            raise ValueError(f"{OP}: k must have q's {what} dims {tuple(lead)}, got shape {tuple(k.shape)}")
        if k.shape[-1] != q.shape[-1]:
            raise ValueError(f"{OP}: k must have q's head dim {q.shape[-1]}, got shape {tuple(k.shape)}")
    head_dim = q.shape[-1]
    C.check_head_dim(OP, "q", head_dim)
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        C.check_head_dim_stride(OP, name, t)

    check_cos_sin(OP, cos, sin, q, head_dim)
    max_pos = cos.shape[0]

    for name, flag in (("interleaved", interleaved), ("inplace", inplace)):
        if not isinstance(flag, bool):
            raise TypeError(f"{OP}: {name} must be a bool, got {flag!r}")
    if inplace:
        for name, t in (("q", q), ("k", k)):
            if t is None or t.numel() == 0:  # nothing is written: any strides will do
                continue
            expanded = [d for d in range(t.dim()) if t.stride(d) == 0 and t.shape[d] > 1]
            if expanded:
                raise ValueError(f"{OP}: inplace=True cannot write into {name}: it is an expanded view "
                                 f"(stride 0 along dim {expanded[0]}), so several of its elements share "
                                 f"one memory location; pass {name}.contiguous() or use inplace=False")

    seq = q.shape[-3]  # S (dense) or T (packed): the index s of a token
    if positions is not None:
        C.check_index_tensor(OP, "positions", positions, ndim=q.dim() - 2, dtypes=P.INDEX_DTYPES,
                             device=q.device)
        if positions.shape != lead:
            raise ValueError(f"{OP}: positions must have q's leading dims {tuple(lead)}, "
                             f"got shape {tuple(positions.shape)}")
        if isinstance(offset, torch.Tensor) or offset != 0:
            raise ValueError(f"{OP}: pass positions or offset, not both (offset={offset!r})")
        if C.debug_enabled() and positions.numel():
            lo, hi = int(positions.min()), int(positions.max())
            if lo < 0 or hi >= max_pos:
                raise ValueError(f"{OP}: positions must lie in [0, {max_pos}) (the rows of cos/sin), "
                                 f"got values from {lo} to {hi}")
    elif isinstance(offset, torch.Tensor):
        if q.dim() != 4:
            raise ValueError(f"{OP}: a per-sequence offset tensor needs dense q (B, S, H, D); for packed "
                             f"q (T, H, D) pass positions, got q shape {tuple(q.shape)}")
        C.check_index_tensor(OP, "offset", offset, ndim=1, dtypes=P.INDEX_DTYPES, device=q.device)
        C.check_dim(OP, "offset", offset, 0, q.shape[0], "the batch size of q")
        if C.debug_enabled() and offset.numel():
            lo, hi = int(offset.min()), int(offset.max())
            if lo < 0 or hi + seq > max_pos:
                raise ValueError(f"{OP}: offset + S must lie in [0, {max_pos}] (the rows of cos/sin) "
                                 f"with S = {seq}, got offsets from {lo} to {hi}")
    else:
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise TypeError(f"{OP}: offset must be an int or a (B,) int tensor, got {offset!r}")
        # An int offset is checked always: it costs no sync.
        if offset < 0 or offset + seq > max_pos:
            raise ValueError(f"{OP}: offset + S must lie in [0, {max_pos}] (the rows of cos/sin) with "
                             f"S = {seq}, got offset {offset}")


def _same_view(q: torch.Tensor, k: torch.Tensor | None) -> bool:
    """``k`` is ``q`` or views exactly the same elements (same memory, shape and strides).

    Under torch.compile only identity is seen (Dynamo cannot trace data pointer comparisons); two
    distinct view objects of the same memory are then left to the op, like any aliased pair."""
    if k is None:
        return False
    if k is q:
        return True
    if torch.compiler.is_compiling():
        return False
    return k.data_ptr() == q.data_ptr() and k.shape == q.shape and k.stride() == q.stride()


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def apply_rotary(q, k, cos, sin, *, positions=None, offset=0, interleaved=False, inplace=False,
                 backend=None):
    """Rotary position embedding of q and k (SPEC.md, "Rotary embedding"). Returns ``(q_out, k_out)``.

    ``q`` (B, S, Hq, D) or packed (T, Hq, D); ``k`` the same with its own head count, or None (then
    ``k_out`` is None). ``cos``/``sin`` (max_positions, R/2) from :func:`rotary_cos_sin`. A token's
    position is ``positions[...]`` (an int tensor shaped like q's leading dims) if given, else
    ``offset + s`` (``offset`` an int or a (B,) tensor). The first R channels rotate (GPT-NeoX half
    split, or GPT-J pairs with ``interleaved=True``); channels R..D pass through bit for bit. Math in
    float32, result in the input dtype.

    ``inplace=True`` writes into q and k (which may be strided views, e.g. of a fused QKV projection)
    and returns them; ``k`` that is ``q`` (the same view) is rotated once, and an expanded (stride-0)
    q or k is refused (several elements would share one memory location). It is not
    differentiable: with grad mode on and q or k requiring grad it raises (use ``inplace=False``
    for training). Out of place, gradients flow to q and k; the kernel
    backends give cos/sin no gradient (they raise if cos/sin require grad; ``backend="torch"`` does).

    Positions must lie in [0, max_positions). An int offset is always checked; positions and offset
    tensors only under ``GPTKERNELS_DEBUG=1`` (a host sync). Unchecked, the kernels leave a token whose
    position is out of range unrotated and never read outside cos/sin.
    """
    _check_apply_rotary(q, k, cos, sin, positions, offset, interleaved, inplace)
    if inplace and _same_view(q, k):
        # q is k (or the same memory seen the same way): rotate it once, as the torch backend
        # does, not twice (a kernel would rotate q, then read the rotated values back as k)
        apply_rotary(q, None, cos, sin, positions=positions, offset=offset, interleaved=interleaved,
                     inplace=True, backend=backend)
        return q, k
    if inplace and needs_grad(q, k):
        raise ValueError(f"{OP}: inplace=True is not differentiable, but q or k requires grad: use "
                         "inplace=False (training), or call under torch.no_grad() / detach q and k")
    backend = resolve(backend, q.device, OP)
    if backend == "torch":
        return reference.apply_rotary(q, k, cos, sin, positions=positions, offset=offset,
                                      interleaved=interleaved, inplace=inplace)
    backend_fn(backend, "apply_rotary", OP)  # fail here with a clear error, not inside the op
    offset_t = offset if isinstance(offset, torch.Tensor) else None
    offset_i = 0 if offset_t is not None else offset
    if needs_grad(cos, sin):
        raise ValueError(f"{OP}: backend {backend!r} gives cos/sin no gradient, but cos or sin requires "
                         "grad: detach them (they are usually a fixed cache), or use backend='torch'")
    if inplace:
        _rotary_inplace(q, k, cos, sin, positions, offset_t, offset_i, interleaved, backend)
        return q, k
    q_out, k_out = _rotary(q, k, cos, sin, positions, offset_t, offset_i, interleaved, False, backend)
    return q_out, (k_out if k is not None else None)


# --------------------------------------------------------------------------------------------------
# cos/sin caches
# --------------------------------------------------------------------------------------------------

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


#: Rope parameters that must be finite and > 0 when given: a factor or length of 0, negative or NaN
#: gives NaN caches or divides by zero. (YaRN's beta_fast/beta_slow of 0 mean "the default" in HF.)
_POSITIVE_PARAMS = ("factor", "original_max_position_embeddings", "max_position_embeddings",
                    "low_freq_factor", "high_freq_factor", "attention_factor")


def _param(scaling: dict, key: str, rope_type: str, default=None, required=False):
    value = scaling.get(key, default)
    if value is None and required:
        raise ValueError(f"{OP_CACHE}: scaling of rope_type {rope_type!r} needs the key {key!r}")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise TypeError(f"{OP_CACHE}: scaling[{key!r}] must be a number, got {value!r}")
    if value is not None and key in _POSITIVE_PARAMS and not (0 < value < math.inf):
        raise ValueError(f"{OP_CACHE}: scaling[{key!r}] (rope_type {rope_type!r}) must be a finite "
                         f"number > 0, got {value!r}")
    return value


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rotary_inv_freq(rotary_dim: int, max_positions: int, *, base: float = 10000.0,
                    scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """The inverse frequencies (R/2,) float64 and the attention factor that scales cos/sin, for the
    rope type in ``scaling`` (HF's rope parameters). Follows transformers' rope init functions."""
    rope_type = "default"
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise TypeError(f"{OP_CACHE}: scaling must be None or a dict of HF rope parameters, got "
                            f"{type(scaling).__name__}")
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"{OP_CACHE}: scaling['rope_type'] must be one of {ROPE_TYPES}, got {rope_type!r}")
        theta = scaling.get("rope_theta")
        if theta is not None and float(theta) != float(base):
            raise ValueError(f"{OP_CACHE}: scaling['rope_theta'] ({theta}) differs from base ({base}): "
                             "pass base=scaling['rope_theta']")
    else:
        scaling = {}
    dim = rotary_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv_freq = 1.0 / (base ** exponent)
    attention_factor = 1.0

    if rope_type == "linear":
        inv_freq = inv_freq / _param(scaling, "factor", rope_type, required=True)
    elif rope_type == "dynamic":
        # Dynamic NTK: HF recomputes the base for the current sequence length seq_len (growing only);
        # the cache is built for seq_len = max_positions (never below the original length).
        factor = _param(scaling, "factor", rope_type, required=True)
        orig = _param(scaling, "original_max_position_embeddings", rope_type,
                      default=scaling.get("max_position_embeddings"), required=True)
        if dim <= 2:
            raise ValueError(f"{OP_CACHE}: rope_type 'dynamic' needs rotary_dim > 2, got {dim}")
        seq_len = max(max_positions, orig)
        ntk_base = base * ((factor * seq_len / orig) - (factor - 1)) ** (dim / (dim - 2))
        inv_freq = 1.0 / (ntk_base ** exponent)
    elif rope_type == "yarn":
        orig = _param(scaling, "original_max_position_embeddings", rope_type, required=True)
        factor = _param(scaling, "factor", rope_type)
        if factor is None:  # HF: the ratio of the extended to the pretraining context
            factor = _param(scaling, "max_position_embeddings", rope_type, required=True) / orig
        attention_factor = _param(scaling, "attention_factor", rope_type)
        mscale = _param(scaling, "mscale", rope_type)
        mscale_all_dim = _param(scaling, "mscale_all_dim", rope_type)
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = _yarn_mscale(factor)
        beta_fast = _param(scaling, "beta_fast", rope_type) or 32
        beta_slow = _param(scaling, "beta_slow", rope_type) or 1
        truncate = scaling.get("truncate", True)

        def correction_dim(rotations):  # the dim whose wavelength fits `rotations` times into orig
            return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # HF: avoid a division by zero
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate (divide by factor)
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    elif rope_type == "llama3":
        factor = _param(scaling, "factor", rope_type, required=True)
        low_ff = _param(scaling, "low_freq_factor", rope_type, required=True)
        high_ff = _param(scaling, "high_freq_factor", rope_type, required=True)
        orig = _param(scaling, "original_max_position_embeddings", rope_type, required=True)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > orig / low_ff, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= orig / high_ff) & (wavelen <= orig / low_ff)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq, float(attention_factor)


def rotary_cos_sin(rotary_dim, max_positions, *, base=10000.0, scaling=None, device=None,
                   dtype=torch.float32):
    """cos/sin caches for :func:`apply_rotary`: each (max_positions, rotary_dim / 2), row p holding
    cos/sin(p * inv_freq) (times YaRN's attention factor, as HF does).

    ``scaling`` is HF's rope parameters dict: ``rope_type`` "default", "linear" (factor), "dynamic"
    (factor, original_max_position_embeddings: the cache is the one HF uses once the sequence has
    grown to ``max_positions`` tokens), "yarn" (factor, original_max_position_embeddings, beta_fast,
    beta_slow, attention_factor, mscale, mscale_all_dim, truncate) or "llama3" (factor,
    low_freq_factor, high_freq_factor, original_max_position_embeddings). Computed in float64 (HF
    computes the angles in float32), then cast to ``dtype``.
    """
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
        raise TypeError(f"{OP_CACHE}: rotary_dim must be an int, got {rotary_dim!r}")
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"{OP_CACHE}: rotary_dim must be even and >= 2 (channels rotate in pairs), "
                         f"got {rotary_dim}")
    if isinstance(max_positions, bool) or not isinstance(max_positions, int):
        raise TypeError(f"{OP_CACHE}: max_positions must be an int, got {max_positions!r}")
    if max_positions < 1:
        raise ValueError(f"{OP_CACHE}: max_positions must be >= 1, got {max_positions}")
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
        raise ValueError(f"{OP_CACHE}: base must be a number > 1, got {base!r}")
    if dtype not in P.FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"{OP_CACHE}: dtype must be a floating dtype, got {dtype}")
    inv_freq, attention_factor = rotary_inv_freq(rotary_dim, max_positions, base=float(base),
                                                 scaling=scaling)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos = (angles.cos() * attention_factor).to(device=device, dtype=dtype)
    sin = (angles.sin() * attention_factor).to(device=device, dtype=dtype)
    return cos, sin
