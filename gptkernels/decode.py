"""The fused decode call and the fused ops of a decode step (issue 19 item 3, issue 14 item 6).

* :func:`flash_attn_with_kvcache`: FlashAttention's call of the same name: the new k/v appended to
  a dense or paged cache at ``cache_seqlens``, rotary applied to q and the new k at their positions,
  then attention over the cache. On the Triton backend: one launch for rotary + append
  (:func:`rotary_append`), one for the attention (the paged decode kernel for one query row, paged
  flash attention for more), plus the split-K merge when a long context is split.
* :func:`rotary_append`: rotary of q and the new k, and the cache append of k and v, in one launch
  (what ``apply_rotary`` + ``paged_append`` do in two).
* :func:`add_layer_norm`: a residual add and one or two LayerNorms of the sum, in one launch.
* :func:`fused_linear`: a decode-step GEMM with the LayerNorm before it, the bias, activation and
  residual add after it, and (for a fused qkv projection) the cache append of its k/v columns.

Each op's semantics is the composition of the unfused ops, written once in
:mod:`gptkernels.reference` (its functions of the same names). Same layering as the other public
ops: inputs are checked here, ``"torch"`` runs the reference, the Triton backend runs through
``torch.library`` ops (fake implementations included: ``torch.compile(fullgraph=True)`` traces them,
and nothing in them syncs with the host, so CUDA graphs capture them). The CUDA backend has none of
these kernels: it raises :class:`gptkernels.BackendUnavailableError`. fp8 caches take ``k_scale`` /
``v_scale`` and are written as :func:`gptkernels.paged_append` writes them (value / scale, nearest
even, saturated at +-448).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _checks as C
from . import _policy as P
from . import reference
from ._backend import BackendUnavailableError, resolve
from ._dispatch import backend_fn, needs_grad
from .rotary import check_cos_sin

#: A decode step runs its GEMMs through :func:`fused_linear` up to this many rows (its batch); more
#: rows are a prefill-sized GEMM, which cuBLAS serves better (the fused kernel keeps one row tile).
FUSED_LINEAR_MAX_ROWS = 64

OP = "flash_attn_with_kvcache"

# --------------------------------------------------------------------------------------------------
# torch.library ops (kernel backends; "torch" is the eager reference)
# --------------------------------------------------------------------------------------------------


def _kernel_backend(op: str, backend: str, name: str):
    """The backend's launcher, or a clear error (the CUDA backend has no fused kernels)."""
    try:
        return backend_fn(backend, name, op)
    except BackendUnavailableError:
        raise BackendUnavailableError(
            f"{op}: backend {backend!r} has no fused {name} kernel (the fused decode ops are Triton "
            "kernels); use backend='triton' or 'torch'") from None


@torch.library.custom_op("gptkernels::rotary_append", mutates_args=("k_cache", "v_cache"))
def _rotary_append_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, block_table: torch.Tensor, starts: torch.Tensor,
                      cos: Optional[torch.Tensor], sin: Optional[torch.Tensor],
                      rotary_starts: Optional[torch.Tensor], interleaved: bool, q_per_token: bool,
                      k_scale: Optional[torch.Tensor], v_scale: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    fn = backend_fn(backend, "rotary_append", "rotary_append")
    q_out = fn(q, k, v, k_cache, v_cache, block_table, starts, cos, sin, rotary_starts=rotary_starts,
               interleaved=interleaved, q_per_token=q_per_token, k_scale=k_scale, v_scale=v_scale)
    # a custom op cannot return its input: without rotary, an empty placeholder (q is unchanged)
    return q_out if cos is not None else q.new_empty(0)


@_rotary_append_op.register_fake
def _(q, k, v, k_cache, v_cache, block_table, starts, cos, sin, rotary_starts, interleaved, q_per_token, k_scale,
      v_scale, backend):
    return q.new_empty(q.shape) if cos is not None else q.new_empty(0)


@torch.library.custom_op("gptkernels::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, d1: Optional[torch.Tensor], d2: Optional[torch.Tensor],
                       weight1: Optional[torch.Tensor], bias1: Optional[torch.Tensor],
                       weight2: Optional[torch.Tensor], bias2: Optional[torch.Tensor], eps1: float,
                       eps2: float, num_norms: int, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = backend_fn(backend, "add_layer_norm", "add_layer_norm")
    return fn(x, d1, d2, weight1, bias1, weight2, bias2, eps1=eps1, eps2=eps2, num_norms=num_norms)


@_add_layer_norm_op.register_fake
def _(x, d1, d2, weight1, bias1, weight2, bias2, eps1, eps2, num_norms, backend):
    h = x.new_empty(x.shape) if d1 is not None else x.new_empty(0)
    return h, x.new_empty(x.shape), (x.new_empty(x.shape) if num_norms > 1 else x.new_empty(0))


# Two ops, one kernel: without a cache the GEMM mutates nothing, with one it writes k/v into the cache.
# (One op whose mutated caches are Optional fails in inductor's lowering, so compile_step could not
# trace the fused step.)
@torch.library.custom_op("gptkernels::fused_linear", mutates_args=())
def _fused_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor], norm_eps: float,
                     has_norm: bool, activation: str, residual: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    fn = backend_fn(backend, "fused_linear", "fused_linear")
    return fn(x, weight, bias, norm=(norm_weight, norm_bias, norm_eps) if has_norm else None,
              activation=activation or None, residual=residual, cache=None)


@_fused_linear_op.register_fake
def _(x, weight, bias, norm_weight, norm_bias, norm_eps, has_norm, activation, residual, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("gptkernels::fused_linear_append", mutates_args=("k_cache", "v_cache"))
def _fused_linear_append_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            norm_weight: Optional[torch.Tensor], norm_bias: Optional[torch.Tensor],
                            norm_eps: float, has_norm: bool, activation: str, residual: Optional[torch.Tensor],
                            k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                            positions: torch.Tensor, q_features: int, k_scale: Optional[torch.Tensor],
                            v_scale: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    fn = backend_fn(backend, "fused_linear", "fused_linear")
    return fn(x, weight, bias, norm=(norm_weight, norm_bias, norm_eps) if has_norm else None,
              activation=activation or None, residual=residual,
              cache=(k_cache, v_cache, block_table, positions, q_features, k_scale, v_scale))


@_fused_linear_append_op.register_fake
def _(x, weight, bias, norm_weight, norm_bias, norm_eps, has_norm, activation, residual, k_cache, v_cache,
      block_table, positions, q_features, k_scale, v_scale, backend):
    return x.new_empty((x.shape[0], q_features))


# --------------------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------------------


def _check_float(op: str, name: str, t, ndim, ref: Optional[torch.Tensor] = None, ref_name: str = "x"):
    C.check_tensor(t, name, ndim=ndim, dtypes=P.FLOAT_DTYPES, op=op)
    if ref is not None:
        C.check_same_dtype(op, ref_name, ref, **{name: t})
        C.check_same_device(op, ref_name, ref, **{name: t})


def _check_paged_caches(op: str, k_cache, v_cache, q: torch.Tensor, k_scale, v_scale, *,
                        dense_ok: bool = False) -> None:
    """k_cache/v_cache: 4-D, the same shape, q's dtype or fp8 (with k_scale / v_scale, as the paged
    ops take them), q's device; a paged cache's page size (``shape[1]``) as every paged op takes it."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        C.check_tensor(t, name, ndim=4, op=op)
        if t.dtype not in P.FP8_KV_DTYPES and t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} must have q's dtype ({q.dtype}) or be an fp8 cache (float8_e4m3fn, "
                            f"with k_scale / v_scale), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} must be on q's device ({q.device}), got {t.device}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{op}: k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")
    if (k_cache.dtype in P.FP8_KV_DTYPES) != (v_cache.dtype in P.FP8_KV_DTYPES):
        raise TypeError(f"{op}: v_cache must have k_cache's dtype ({k_cache.dtype}), got {v_cache.dtype}")
    C.check_kv_scales(op, k_cache, k_scale, v_scale)
    if not dense_ok:
        C.check_block_size(op, "k_cache (its shape[1])", k_cache.shape[1])


def _check_index(op: str, name: str, t, batch: int, device, *, ndim: int = 1, dtypes=P.INDEX_DTYPES):
    C.check_index_tensor(op, name, t, ndim=ndim, dtypes=dtypes, device=device)
    C.check_dim(op, name, t, 0, batch, "the batch size of q")


def _norm_args(op: str, name: str, norm, width: int, x: torch.Tensor):
    """A LayerNorm given as (weight, bias, eps): weight/bias None or (width,) like x; eps >= 0."""
    if not (isinstance(norm, (tuple, list)) and len(norm) == 3):
        raise TypeError(f"{op}: {name} must be a (weight, bias, eps) tuple of a LayerNorm, got {norm!r}")
    w, b, eps = norm
    for part, t in (("weight", w), ("bias", b)):
        if t is not None:
            _check_float(op, f"{name} {part}", t, 1, x)
            if t.shape[0] != width:
                raise ValueError(f"{op}: {name} {part} must have {width} elements (the normalised width), "
                                 f"got shape {tuple(t.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"{op}: {name} eps must be a finite number >= 0, got {eps!r}")
    return w, b, float(eps)


def _not_differentiable(op: str, backend: str, *tensors) -> None:
    if backend != "torch" and needs_grad(*tensors):
        raise BackendUnavailableError(f"{op}: backend {backend!r} is not differentiable (an inference op); "
                                      "call it under torch.no_grad() or use backend='torch'")


# --------------------------------------------------------------------------------------------------
# rotary + cache append
# --------------------------------------------------------------------------------------------------


def rotary_append(q, k, v, k_cache, v_cache, block_table, starts, cos=None, sin=None, *, rotary_starts=None,
                  interleaved=False, q_per_token=True, k_scale=None, v_scale=None, backend=None):
    """Rotary of q and the new k, and the new k (rotated) and v appended to a paged cache, in one
    launch: ``apply_rotary`` + ``paged_append`` (:func:`gptkernels.reference.rotary_append`).

    q (B, Sq, Hq, D) or (B, Hq, D) (one token per sequence); k, v (B, Sk, Hkv, D) with Sk <= Sq, or
    (B, Hkv, D); caches (num_blocks, block_size, Hkv, D) of q's dtype; ``block_table`` (B, max_blocks)
    int32; ``starts`` (B,) int32/int64: new token i of sequence b goes to position ``starts[b] + i``
    of its table row (a position outside the table, or an entry outside the cache, is not written).
    With ``cos``/``sin`` (max_positions, R/2) the new k and q rotate at ``rotary_starts[b] + i``
    (default ``starts``), q at ``rotary_starts[b]`` for every token if ``q_per_token`` is False;
    ``interleaved`` as in :func:`gptkernels.apply_rotary`. An fp8 cache takes ``k_scale`` /
    ``v_scale`` (as :func:`gptkernels.paged_append`). Returns the rotated q (a new tensor), or q
    itself without cos/sin. Inference only (not differentiable on the kernel backends)."""
    op = "rotary_append"
    _check_float(op, "q", q, (3, 4))
    _check_float(op, "k", k, q.dim(), q, "q")
    _check_float(op, "v", v, q.dim(), q, "q")
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch = q.shape[0]
    C.check_dim(op, "k", k, 0, batch, "the batch size of q")
    if q.dim() == 4 and k.shape[1] > q.shape[1]:
        raise ValueError(f"{op}: k must have at most q's {q.shape[1]} tokens per sequence, got shape {tuple(k.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{op}: k must have q's head dim {q.shape[-1]}, got shape {tuple(k.shape)}")
    C.check_head_dim(op, "q", q.shape[-1])
    C.check_gqa(op, q.shape[-2], k.shape[-2], "q", "k")
    _check_paged_caches(op, k_cache, v_cache, q, k_scale, v_scale)
    C.check_dim(op, "k", k, k.dim() - 2, k_cache.shape[2], "k_cache.shape[2], the KV heads of the cache")
    C.check_dim(op, "k", k, k.dim() - 1, k_cache.shape[3], "k_cache.shape[3], the head dim of the cache")
    _check_index(op, "block_table", block_table, batch, q.device, ndim=2, dtypes=(torch.int32,))
    _check_index(op, "starts", starts, batch, q.device)
    if rotary_starts is not None:
        _check_index(op, "rotary_starts", rotary_starts, batch, q.device)
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: pass both cos and sin, or neither")
    if cos is not None:
        check_cos_sin(op, cos, sin, q, q.shape[-1])
    for name, flag in (("interleaved", interleaved), ("q_per_token", q_per_token)):
        if not isinstance(flag, bool):
            raise TypeError(f"{op}: {name} must be a bool, got {flag!r}")
    backend = resolve(backend, q.device, op)
    _not_differentiable(op, backend, q, k, v)
    if backend == "torch":
        q4 = q if q.dim() == 4 else q[:, None]
        k4, v4 = (k, v) if k.dim() == 4 else (k[:, None], v[:, None])
        out = reference.rotary_append(q4, k4, v4, k_cache, v_cache, block_table, starts, cos, sin,
                                      rotary_starts=rotary_starts, interleaved=interleaved, q_per_token=q_per_token,
                                      k_scale=k_scale, v_scale=v_scale)
        return out if q.dim() == 4 else out[:, 0]
    _kernel_backend(op, backend, "rotary_append")
    if cos is not None and needs_grad(cos, sin):
        raise ValueError(f"{op}: backend {backend!r} gives cos/sin no gradient: detach them")
    out = _rotary_append_op(q, k, v, k_cache, v_cache, block_table, starts, cos, sin,
                            rotary_starts if cos is not None else None, interleaved, q_per_token, k_scale, v_scale,
                            backend)
    return out if cos is not None else q


# --------------------------------------------------------------------------------------------------
# residual add + LayerNorm
# --------------------------------------------------------------------------------------------------


def add_layer_norm(x, d1=None, d2=None, *, norms, backend=None):
    """The residual add and one or two LayerNorms of the sum, in one launch.

    x, d1, d2 (..., C) of one dtype (d1/d2 may be None); ``norms``: one or two LayerNorms as
    (weight, bias, eps) (weight/bias (C,) or None). Returns ``(h, y1)`` or ``(h, y1, y2)``: ``h = x
    + d1`` or ``x + (d1 + d2)`` (each add rounded to x's dtype, as the unfused adds: bit for bit the
    unfused residual stream; x itself without deltas) and ``y_i = layer_norm(h)`` (float32 math,
    x's dtype out). :func:`gptkernels.reference.add_layer_norm`."""
    op = "add_layer_norm"
    _check_float(op, "x", x, None)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{op}: x must have a last dim to normalise, got shape {tuple(x.shape)}")
    if d1 is None and d2 is not None:
        raise ValueError(f"{op}: pass d1 before d2")
    for name, d in (("d1", d1), ("d2", d2)):
        if d is not None:
            _check_float(op, name, d, None, x)
            if d.shape != x.shape:
                raise ValueError(f"{op}: {name} must have x's shape {tuple(x.shape)}, got {tuple(d.shape)}")
    if not isinstance(norms, (tuple, list)) or len(norms) not in (1, 2):
        raise TypeError(f"{op}: norms must be a list of one or two (weight, bias, eps) LayerNorms, got {norms!r}")
    c = x.shape[-1]
    parsed = [_norm_args(op, f"norms[{i}]", n, c, x) for i, n in enumerate(norms)]
    if len(parsed) == 2 and ((parsed[0][0] is None) != (parsed[1][0] is None)
                             or (parsed[0][1] is None) != (parsed[1][1] is None)):
        raise ValueError(f"{op}: the two norms must both have (or both lack) a weight and a bias")
    (w1, b1, e1), (w2, b2, e2) = parsed[0], (parsed[1] if len(parsed) == 2 else (None, None, 0.0))
    backend = resolve(backend, x.device, op)
    _not_differentiable(op, backend, x, d1, d2, w1, b1, w2, b2)
    if backend == "torch":
        h, y1, y2 = reference.add_layer_norm(x, d1, d2, w1, b1, w2, b2, eps1=e1, eps2=e2, num_norms=len(parsed))
        return (h, y1) if len(parsed) == 1 else (h, y1, y2)
    _kernel_backend(op, backend, "add_layer_norm")
    lead = x.shape[:-1]

    def flat(t):
        return None if t is None else t.reshape(-1, c)

    h, y1, y2 = _add_layer_norm_op(flat(x), flat(d1), flat(d2), w1, b1, w2, b2, e1, e2, len(parsed), backend)
    h = x if d1 is None else h.view(*lead, c)
    y1 = y1.view(*lead, c)
    return (h, y1) if len(parsed) == 1 else (h, y1, y2.view(*lead, c))


# --------------------------------------------------------------------------------------------------
# The decode GEMM with its neighbours
# --------------------------------------------------------------------------------------------------


def fused_linear(x, weight, bias=None, *, norm=None, activation=None, residual=None, cache=None, backend=None):
    """``act(layer_norm(x) @ weight^T + bias) + residual`` in one launch, for the few rows of a decode
    step (:data:`FUSED_LINEAR_MAX_ROWS`; any M works).

    x (..., K); weight (N, K) (an ``nn.Linear``'s), bias (N,) or None; ``norm``: None or a LayerNorm
    over K as (weight, bias, eps); ``activation``: None or a name of
    ``gptkernels.models.config.ACTIVATIONS``; ``residual`` (..., N) or None. ``cache``: None or
    (k_cache, v_cache, block_table, positions[, k_scale, v_scale]) for a fused q | k | v projection
    (an fp8 cache with its scales, as :func:`gptkernels.paged_append` takes them): with the paged
    cache's Hkv heads of D, the last 2 x Hkv x D columns are k and v and go to the cache at row m's
    position ``positions[m]`` (one token per sequence; ``block_table`` (M, max_blocks) int32), and
    only the q columns are returned. :func:`gptkernels.reference.fused_linear`."""
    op = "fused_linear"
    _check_float(op, "x", x, None)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dimension, got a scalar")
    _check_float(op, "weight", weight, 2, x)
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x's last dim ({x.shape[-1]}) must be weight.shape[1] ({k}), the in-features")
    if bias is not None:
        _check_float(op, "bias", bias, 1, x)
        C.check_dim(op, "bias", bias, 0, n, "weight.shape[0], the out-features")
    if norm is not None:
        norm = _norm_args(op, "norm", norm, k, x)
    if activation is not None and activation not in _activation_names():
        raise ValueError(f"{op}: activation must be None or one of {sorted(_activation_names())}, got {activation!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if residual is not None:
        _check_float(op, "residual", residual, None, x)
        if residual.shape != (*lead, n):
            raise ValueError(f"{op}: residual must be shaped {(*lead, n)} (x's rows, weight's out-features), "
                             f"got {tuple(residual.shape)}")
    nq = n
    if cache is not None:
        if not (isinstance(cache, (tuple, list)) and len(cache) in (4, 6)):
            raise TypeError(f"{op}: cache must be (k_cache, v_cache, block_table, positions[, k_scale, v_scale]), "
                            f"got {cache!r}")
        if residual is not None:
            raise ValueError(f"{op}: a cache append and a residual do not go together (a qkv projection has none)")
        k_cache, v_cache, table, positions, *scales = cache
        k_scale, v_scale = scales if scales else (None, None)
        _check_paged_caches(op, k_cache, v_cache, x, k_scale, v_scale)
        nq = n - 2 * k_cache.shape[2] * k_cache.shape[3]
        if nq < 0:
            raise ValueError(f"{op}: weight's {n} out-features cannot hold the k and v columns of the cache "
                             f"(2 x {k_cache.shape[2]} heads x {k_cache.shape[3]})")
        _check_index(op, "block_table", table, m, x.device, ndim=2, dtypes=(torch.int32,))
        _check_index(op, "positions", positions, m, x.device)
    backend = resolve(backend, x.device, op)
    _not_differentiable(op, backend, x, weight, bias, residual, *(norm[:2] if norm else ()))
    r2 = None if residual is None else residual.reshape(-1, n)
    if backend == "torch":
        y = reference.fused_linear(x2, weight, bias, norm=norm, activation=activation, residual=r2,
                                   cache=None if cache is None else (*cache[:4], nq, k_scale, v_scale))
        return y.view(*lead, nq)
    _kernel_backend(op, backend, "fused_linear")
    nw, nb, eps = norm if norm is not None else (None, None, 0.0)
    if cache is None:
        y = _fused_linear_op(x2, weight, bias, nw, nb, eps, norm is not None, activation or "", r2, backend)
    else:
        kc, vc, table, positions = cache[:4]
        y = _fused_linear_append_op(x2, weight, bias, nw, nb, eps, norm is not None, activation or "", r2, kc, vc,
                                    table, positions, nq, k_scale, v_scale, backend)
    return y.view(*lead, nq)


def _activation_names() -> tuple[str, ...]:
    """The model config's activations (imported on use: the models import this module)."""
    from .models.config import ACTIVATIONS

    return tuple(ACTIVATIONS)


# --------------------------------------------------------------------------------------------------
# flash_attn_with_kvcache
# --------------------------------------------------------------------------------------------------

#: A dense cache is viewed as pages of the largest power of two up to this size that divides its
#: length (the paged kernels read one block-table entry per page).
DENSE_PAGE_MAX = 256


def _dense_page_size(s: int) -> int:
    bs = 1
    while bs < DENSE_PAGE_MAX and s % (2 * bs) == 0:
        bs *= 2
    return bs


def _check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                   cache_leftpad, block_table, softmax_scale, causal, window, rotary_interleaved, return_lse,
                   k_scale, v_scale, softcap, alibi_slopes):
    """Checks of :func:`flash_attn_with_kvcache`; returns (cache_seqlens as a (B,) tensor, dense page size)."""
    _check_float(OP, "q", q, 4)
    batch, seqlen, hq, d = q.shape
    C.check_head_dim(OP, "q", d)
    paged = block_table is not None
    _check_paged_caches(OP, k_cache, v_cache, q, k_scale, v_scale, dense_ok=not paged)
    if k_cache.shape[3] != d:
        raise ValueError(f"{OP}: k_cache must have q's head dim {d}, got shape {tuple(k_cache.shape)}")
    C.check_gqa(OP, hq, k_cache.shape[2], "q", "k_cache")
    if (k is None) != (v is None):
        raise ValueError(f"{OP}: pass both k and v (the new keys and values), or neither")
    if k is not None:
        _check_float(OP, "k", k, 4, q, "q")
        _check_float(OP, "v", v, 4, q, "q")
        if k.shape != v.shape:
            raise ValueError(f"{OP}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.shape[0] != batch or k.shape[2:] != k_cache.shape[2:] or not 1 <= k.shape[1] <= max(seqlen, 1):
            raise ValueError(f"{OP}: k must be (B, Sk, Hkv, D) = ({batch}, 1..{seqlen}, {k_cache.shape[2]}, {d}) "
                             f"(q's batch, at most q's tokens, the cache's heads and head dim), got {tuple(k.shape)}")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError(f"{OP}: pass both rotary_cos and rotary_sin, or neither")
    if rotary_cos is not None:
        if k is None:
            raise ValueError(f"{OP}: rotary_cos/rotary_sin need the new k and v (they rotate q and the new k)")
        check_cos_sin(OP, rotary_cos, rotary_sin, q, d, names=("rotary_cos", "rotary_sin"))
    for name, flag in (("causal", causal), ("rotary_interleaved", rotary_interleaved), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{OP}: {name} must be a bool, got {flag!r}")
    C.check_scale(OP, "softmax_scale", softmax_scale)
    C.check_window(OP, window, causal)
    C.check_softcap(OP, softcap)
    # (B, Hq) slopes follow q's batch (FlashAttention's b), not the cache row of cache_batch_idx
    C.check_alibi_slopes(OP, alibi_slopes, batch, hq, q.device)
    dev = q.device
    if cache_seqlens is None:
        if paged or k is not None:
            raise ValueError(f"{OP}: cache_seqlens is required with {'block_table' if paged else 'new k/v'} "
                             "(the tokens each sequence holds before the new ones)")
        cache_seqlens = k_cache.shape[1]
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if cache_seqlens < 0:
            raise ValueError(f"{OP}: cache_seqlens must be >= 0, got {cache_seqlens}")
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=dev)
    elif isinstance(cache_seqlens, torch.Tensor):
        _check_index(OP, "cache_seqlens", cache_seqlens, batch, dev)
    else:
        raise TypeError(f"{OP}: cache_seqlens must be an int or a (B,) int tensor, got {type(cache_seqlens).__name__}")
    page = k_cache.shape[1]
    if paged:
        _check_index(OP, "block_table", block_table, batch, dev, ndim=2, dtypes=(torch.int32,))
        for name, t in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
            if t is not None:
                raise ValueError(f"{OP}: {name} is for a dense cache (B_cache, S_cache, Hkv, D); with block_table "
                                 "each sequence's pages are its table row (as in FlashAttention)")
    else:
        s = k_cache.shape[1]
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if t.shape[0] > 1 and s > 1 and t.stride(0) != s * t.stride(1):
                raise ValueError(f"{OP}: a dense {name} needs stride(0) = S_cache x stride(1) (its rows one after "
                                 f"another, as a contiguous cache or a slice of one along B), got strides {t.stride()}")
        if cache_batch_idx is not None:
            _check_index(OP, "cache_batch_idx", cache_batch_idx, batch, dev)
        if cache_leftpad is not None:
            _check_index(OP, "cache_leftpad", cache_leftpad, batch, dev)
        page = 1 if cache_leftpad is not None else _dense_page_size(s)
        if page < C.MIN_BLOCK_SIZE:
            what = "with cache_leftpad" if cache_leftpad is not None else f"of length {s}"
            raise ValueError(f"{OP}: a dense cache {what} is read as pages of {page} row(s), below the paged "
                             f"kernels' smallest page ({C.MIN_BLOCK_SIZE}); use a length that is a multiple of "
                             f"{C.MIN_BLOCK_SIZE}{'' if cache_leftpad is None else ' and no cache_leftpad'}")
    if C.debug_enabled():
        _debug_check_kvcache(q, k_cache, k, cache_seqlens, cache_batch_idx, cache_leftpad, block_table)
    return cache_seqlens, page


def _debug_check_kvcache(q, k_cache, k, cache_seqlens, cache_batch_idx, cache_leftpad, block_table):
    """GPTKERNELS_DEBUG=1 (a host sync): the values of the index tensors."""
    new = 0 if k is None else k.shape[1]
    lens = cache_seqlens.cpu().long()
    if bool((lens < 0).any()):
        raise ValueError(f"{OP}: cache_seqlens must be >= 0, got {lens.tolist()}")
    if block_table is not None:
        C.debug_check_block_table(OP, k_cache, block_table, (lens + new).to(torch.int32), "cache_seqlens + Sk")
        return
    s, rows = k_cache.shape[1], k_cache.shape[0]
    if bool((lens + new > s).any()):
        raise ValueError(f"{OP}: cache_seqlens + Sk ({(lens + new).tolist()}) must fit the cache's {s} rows")
    if cache_batch_idx is not None:
        idx = cache_batch_idx.cpu().long()
        if bool(((idx < 0) | (idx >= rows)).any()):
            raise ValueError(f"{OP}: cache_batch_idx must lie in [0, {rows}) (k_cache.shape[0]), got {idx.tolist()}")
    if cache_leftpad is not None:
        lp = cache_leftpad.cpu().long()
        if bool(((lp < 0) | (lp > lens)).any()):
            raise ValueError(f"{OP}: cache_leftpad must lie in [0, cache_seqlens], got {lp.tolist()} "
                             f"(cache_seqlens {lens.tolist()})")


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=True, window=None, rotary_interleaved=False,
                            return_lse=False, k_scale=None, v_scale=None, softcap=None, alibi_slopes=None,
                            backend=None):
    """FlashAttention's ``flash_attn_with_kvcache``: append the new k/v to the cache, rotate q and the
    new k, attend over the cache (README, "The fused decode call", has the argument table).

    * q (B, Sq, Hq, D). The cache: dense ``k_cache``/``v_cache`` (B_cache, S_cache, Hkv, D), or paged
      (num_blocks, page_size, Hkv, D) with ``block_table`` (B, max_blocks) int32.
    * ``cache_seqlens`` (int or (B,) int32/int64): the tokens each sequence holds before the new
      ones (None: the whole dense cache, without new k/v). ``k``, ``v`` (B, Sk, Hkv, D), Sk <= Sq:
      written in place at rows ``cache_seqlens .. cache_seqlens + Sk - 1``; the attention then sees
      ``cache_seqlens + Sk`` keys.
    * ``rotary_cos``/``rotary_sin`` (max_positions, R/2) (needs k, v): the new k rotates at
      ``cache_seqlens + i``; q too when ``causal`` or ``window`` (else every query row at
      ``cache_seqlens``, FlashAttention's rule). GPT-NeoX pairing unless ``rotary_interleaved``.
    * ``cache_batch_idx`` (B,): the dense cache row of each sequence (default b). ``cache_leftpad``
      (B,): a dense sequence's keys start at that row (earlier rows are not keys; query positions
      count from it; rotary positions stay the cache's rows, as in FlashAttention). Dense only.
    * Attention as :func:`gptkernels.flash_attn` with paged keys: bottom-right aligned, ``causal``
      (default True, FlashAttention's is False), ``window=W`` (FlashAttention's
      ``window_size=(W - 1, 0)``), ``softmax_scale`` (default 1/sqrt(D)).
    * An fp8 cache (float8_e4m3fn) takes ``k_scale`` / ``v_scale`` (float32 (Hkv,) or (); FlashAttention
      3's ``k_descale`` / ``v_descale``): the new k/v are stored as value / scale, keys read as
      stored * scale, as the paged ops do.
    * ``softcap`` (a finite float > 0; None: off, which FlashAttention spells ``softcap=0.0``) and
      ``alibi_slopes`` (float32 (Hq,) or (B, Hq), row b for q's sequence b, also with
      ``cache_batch_idx``): as :func:`gptkernels.flash_attn` applies them (scale, soft cap, the bias
      ``-slope * |i + Sk - Sq - j|`` over the sequence's keys, then the mask).

    Returns out (B, Sq, Hq, D) [and lse (B, Hq, Sq) float32]. Inference only. Backends: "triton"
    (rotary + append in one launch, then the paged decode kernel for Sq = 1 or paged flash attention),
    "torch" (:func:`gptkernels.reference.flash_attn_with_kvcache`); "cuda" raises
    BackendUnavailableError (no fused rotary + append kernel).
    """
    cache_seqlens, page = _check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                         cache_batch_idx, cache_leftpad, block_table, softmax_scale, causal,
                                         window, rotary_interleaved, return_lse, k_scale, v_scale, softcap,
                                         alibi_slopes)
    softcap = None if softcap is None else float(softcap)
    backend = resolve(backend, q.device, OP)
    _not_differentiable(OP, backend, q, k_cache, v_cache, k, v, alibi_slopes)
    if backend == "torch":
        return reference.flash_attn_with_kvcache(
            q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens=cache_seqlens,
            cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad, block_table=block_table,
            softmax_scale=softmax_scale, causal=causal, window=window, rotary_interleaved=rotary_interleaved,
            block_size=page, return_lse=return_lse, k_scale=k_scale, v_scale=v_scale, softcap=softcap,
            alibi_slopes=alibi_slopes)
    if backend == "cuda":
        raise BackendUnavailableError(f"{OP}: backend 'cuda' has no fused rotary + cache append kernel; use "
                                      "backend='triton' (or compose apply_rotary, paged_append and paged_decode)")
    kp, vp, table, starts = reference.kvcache_pages(k_cache, v_cache, block_table=block_table,
                                                    cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
                                                    cache_leftpad=cache_leftpad, block_size=page)
    if k is not None:
        q = rotary_append(q, k, v, kp, vp, table, starts, rotary_cos, rotary_sin, rotary_starts=cache_seqlens,
                          interleaved=rotary_interleaved, q_per_token=causal or window is not None,
                          k_scale=k_scale, v_scale=v_scale, backend=backend)
        lens = starts + k.shape[1]
    else:
        lens = starts
    lens = lens.to(torch.int32)
    from .attention import flash_attn
    from .paged import paged_decode

    if q.shape[1] == 1:
        out, lse = paged_decode(q[:, 0], kp, vp, table, lens, softmax_scale=softmax_scale, window=window,
                                return_lse=True, k_scale=k_scale, v_scale=v_scale, softcap=softcap,
                                alibi_slopes=alibi_slopes, backend=backend)
        out, lse = out[:, None], lse[:, :, None]
    else:
        out, lse = flash_attn(q, kp, vp, causal=causal, window=window, softmax_scale=softmax_scale,
                              block_table=table, seqlens_k=lens, return_lse=True, k_scale=k_scale,
                              v_scale=v_scale, softcap=softcap, alibi_slopes=alibi_slopes, backend=backend)
    return (out, lse) if return_lse else out
