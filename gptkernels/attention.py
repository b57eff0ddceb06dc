"""Public attention API: :func:`flash_attn` and the SDPA drop-in :func:`sdpa`.

Checks inputs at the boundary, resolves the backend, and runs either the eager reference
(``"torch"``) or a kernel backend through the ``torch.library`` ops ``gptkernels::flash_attn_fwd`` /
``gptkernels::flash_attn_bwd``, so that ``torch.compile(fullgraph=True)`` sees one opaque op with a
fake (meta) implementation and an autograd formula.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import _checks as C
from . import _policy as P
from . import reference
from ._backend import BackendUnavailableError, resolve
from ._dispatch import backend_fn, needs_grad

OP = "flash_attn"

# --------------------------------------------------------------------------------------------------
# torch.library ops (kernel backends only: "torch" is plain eager code that autograd and
# torch.compile trace by themselves)
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("gptkernels::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    block_table: Optional[torch.Tensor],
    seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    window_left: int,
    window_right: int,
    softmax_scale: float,
    bottom_right: bool,
    backend: str,
    deterministic: bool,
    k_scale: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    # deterministic only matters to the backward; it is an input here so autograd can save it
    fwd = backend_fn(backend, "flash_attn_forward", OP)
    return fwd(q, k, v, **_band(window_left, window_right), softmax_scale=softmax_scale,
               cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
               max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
               block_table=block_table, seqlens_k=seqlens_k, bottom_right=bottom_right,
               **_options(k_scale=k_scale, v_scale=v_scale, softcap=softcap, alibi_slopes=alibi_slopes),
               **_dropout(dropout_p, dropout_seed))


def _band(window_left: int, window_right: int) -> dict:
    """The launchers' ``causal`` / ``window`` from the ops' normalised window (``_policy.window_bounds``;
    -1: unbounded): right = 0 is causal attention, the pair the window."""
    return dict(causal=window_right == 0, window=(window_left, window_right))


def _dropout(dropout_p: float, dropout_seed: int) -> dict:
    """The launchers' dropout arguments: none without dropout (a backend without it, cuda, then
    serves the call; with it, cuda refuses naming dropout_p)."""
    return dict(dropout_p=dropout_p, dropout_seed=dropout_seed) if dropout_p > 0 else {}


def dropout_seed(generator: Optional[torch.Generator] = None) -> int:
    """The Philox seed of a call with dropout: one draw from ``generator`` (default: torch's global
    CPU generator, which ``torch.manual_seed`` seeds; no device sync), so that the same generator
    state gives the same mask. In [2**31, 2**62): always a 64-bit kernel argument (no recompiles)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(2**31, 2**62, (), generator=generator, device=device))


def _options(**options):
    """The optional inputs a call uses (fp8 scales, softcap, ALiBi slopes): only those reach the
    launcher, so a backend without them (cuda) still serves the calls that do not use them."""
    return {name: value for name, value in options.items() if value is not None}


@_flash_attn_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k, max_seqlen_q, max_seqlen_k,
      window_left, window_right, softmax_scale, bottom_right, backend, deterministic, k_scale=None, v_scale=None,
      softcap=None, alibi_slopes=None, dropout_p=0.0, dropout_seed=0):
    # out: q's rows with v's head dim (Dv may differ from D)
    return (q.new_empty((*q.shape[:-1], v.shape[-1])),
            q.new_empty(P.lse_shape(q, cu_seqlens_q is not None), dtype=torch.float32))


@torch.library.custom_op("gptkernels::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(
    dout: torch.Tensor,
    dlse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    window_left: int,
    window_right: int,
    softmax_scale: float,
    bottom_right: bool,
    backend: str,
    deterministic: bool,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dropout_seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bwd = backend_fn(backend, "flash_attn_backward", OP)
    return bwd(dout, dlse, q, k, v, out, lse, **_band(window_left, window_right),
               softmax_scale=softmax_scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
               max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, bottom_right=bottom_right,
               deterministic=deterministic, **_options(softcap=softcap, alibi_slopes=alibi_slopes),
               **_dropout(dropout_p, dropout_seed))


@_flash_attn_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      window_left, window_right, softmax_scale, bottom_right, backend, deterministic, softcap=None,
      alibi_slopes=None, dropout_p=0.0, dropout_seed=0):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, block_table, seqlens_k, max_q, max_k, left, right, scale,
     bottom_right, backend, deterministic) = inputs[:15]
    # then an fp8 paged cache's scales (forward only), softcap, ALiBi slopes, dropout p and seed
    softcap, alibi_slopes, dropout_p, seed = (list(inputs[17:21]) + [None, None, 0.0, 0])[:4]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi_slopes)
    ctx.params = (max_q, max_k, left, right, scale, bottom_right, backend, deterministic, softcap,
                  dropout_p, seed)
    ctx.paged = block_table is not None


def _fwd_backward(ctx, dout, dlse):
    if ctx.paged:
        raise BackendUnavailableError(f"{OP}: attention over a paged KV cache is not differentiable")
    q, k, v, out, lse, cu_q, cu_k, alibi_slopes = ctx.saved_tensors
    max_q, max_k, left, right, scale, bottom_right, backend, deterministic, softcap, dropout_p, seed = \
        ctx.params
    # dropout: the same seed, so the backward regenerates the forward's mask
    dq, dk, dv = _flash_attn_bwd(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, left,
                                 right, scale, bottom_right, backend, deterministic, softcap,
                                 alibi_slopes, dropout_p, seed)
    return (dq, dk, dv) + (None,) * 18  # no gradient for the other 18 inputs (ALiBi slopes included)


_flash_attn_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _max_seqlen(name: str, given, lens: torch.Tensor | None, lens_name: str, op: str = OP) -> int:
    """``max_seqlen_q``/``max_seqlen_k``: ``given``, else the longest of ``lens`` (sequence lengths,
    a host sync). A given value sizes the kernels' grids only (any value gives the right answer;
    an understated one is slower); under GPTKERNELS_DEBUG=1 it must be at least the longest."""
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given < 0:
            raise TypeError(f"{op}: {name} must be None or an int >= 0, got {given!r}")
        if C.debug_enabled() and lens is not None and lens.numel():
            longest = int(lens.max())
            if given < longest:
                raise ValueError(f"{op}: {name} = {given} is less than the longest sequence in "
                                 f"{lens_name} ({longest})")
        return given
    if lens is None or lens.numel() == 0:
        return 0
    # Needs a host sync; pass max_seqlen_* to avoid it (CUDA graphs, torch.compile).
    return int(lens.max())


def _lengths(cu: torch.Tensor | None) -> torch.Tensor | None:
    return None if cu is None else cu[1:] - cu[:-1]


def _check_flash_attn(q, k, v, causal, window, softmax_scale, cu_seqlens_q, cu_seqlens_k,
                      max_seqlen_q, max_seqlen_k, block_table, seqlens_k, op=OP, names=None,
                      k_scale=None, v_scale=None, softcap=None, alibi_slopes=None):
    """Validate a flash_attn call; returns (max_seqlen_q, max_seqlen_k) for the kernels.

    ``op`` and ``names`` (e.g. q -> query) let :func:`sdpa` reuse these checks in its own words.
    """
    n = {"q": "q", "k": "k", "v": "v", "softmax_scale": "softmax_scale", **(names or {})}
    # A paged cache (block_table) may be fp8, with k_scale / v_scale (checked with the paged inputs)
    fp8_cache = block_table is not None and isinstance(k, torch.Tensor) and k.dtype in P.FP8_KV_DTYPES
    kv_dtypes = P.FLOAT_DTYPES + (P.FP8_KV_DTYPES if block_table is not None else ())
    for name, t in ((n["q"], q), (n["k"], k), (n["v"], v)):
        C.check_tensor(t, name, dtypes=P.FLOAT_DTYPES if t is q else kv_dtypes, op=op)
    if fp8_cache:
        C.check_same_dtype(op, n["k"], k, **{n["v"]: v})
    else:
        C.check_same_dtype(op, n["q"], q, **{n["k"]: k, n["v"]: v})
    C.check_same_device(op, n["q"], q, **{n["k"]: k, n["v"]: v})
    if not isinstance(causal, bool):
        raise TypeError(f"{op}: causal must be a bool, got {causal!r}")
    C.check_window(op, window, causal, pairs=True)
    C.check_scale(op, n["softmax_scale"], softmax_scale)
    # v's head dim (Dv) may differ from q's and k's (D): DeepSeek MLA's D = 192, Dv = 128
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"{op}: {n['k']} and {n['v']} must have the same shape except the last (head) "
                         f"dim, got {tuple(k.shape)} and {tuple(v.shape)}")
    idx = dict(dtypes=(torch.int32,), device=q.device)
    paged = block_table is not None or seqlens_k is not None
    varlen_q = cu_seqlens_q is not None

    if paged:
        if block_table is None or seqlens_k is None:
            raise ValueError(f"{op}: block_table and seqlens_k must be given together (paged keys)")
        if cu_seqlens_k is not None:
            raise ValueError(f"{op}: cu_seqlens_k must be None with a paged cache (use seqlens_k)")
        C.check_tensor(k, "k", ndim=4, op=op)  # (num_blocks, block_size, Hkv, D)
        block_size = k.shape[1]
        C.check_block_size(op, "k (the paged cache, k.shape[1])", block_size)
        C.check_kv_scales(op, k, k_scale, v_scale)
        C.check_index_tensor(op, "block_table", block_table, ndim=2, **idx)
        batch = block_table.shape[0]
        C.check_index_tensor(op, "seqlens_k", seqlens_k, ndim=1, **idx)
        C.check_dim(op, "seqlens_k", seqlens_k, 0, batch, "block_table.shape[0], the batch size")
        if varlen_q:
            C.check_tensor(q, "q", ndim=3, op=op)
            C.check_index_tensor(op, "cu_seqlens_q", cu_seqlens_q, ndim=1, **idx)
            C.check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, batch, q.shape[0])
        else:
            C.check_tensor(q, "q", ndim=4, op=op)
            C.check_dim(op, "q", q, 0, batch, "block_table.shape[0], the batch size")
        if C.debug_enabled():
            C.debug_check_block_table(op, k, block_table, seqlens_k, "seqlens_k")
        max_k = block_table.shape[1] * block_size if max_seqlen_k is None else _max_seqlen(
            "max_seqlen_k", max_seqlen_k, seqlens_k, "seqlens_k", op)
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"{op}: k_scale and v_scale are for an fp8 paged cache (with block_table) only")
    elif varlen_q or cu_seqlens_k is not None:
        if not varlen_q or cu_seqlens_k is None:
            raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must be given together (varlen)")
        for name, t in ((n["q"], q), (n["k"], k), (n["v"], v)):
            C.check_tensor(t, name, ndim=3, op=op)
        C.check_index_tensor(op, "cu_seqlens_q", cu_seqlens_q, ndim=1, **idx)
        C.check_index_tensor(op, "cu_seqlens_k", cu_seqlens_k, ndim=1, **idx)
        C.check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, None, q.shape[0])
        C.check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, cu_seqlens_q.numel() - 1, k.shape[0])
        max_k = _max_seqlen("max_seqlen_k", max_seqlen_k, _lengths(cu_seqlens_k), "cu_seqlens_k", op)
    else:
        for name, t in ((n["q"], q), (n["k"], k), (n["v"], v)):
            C.check_tensor(t, name, ndim=4, op=op)
        C.check_dim(op, n["k"], k, 0, q.shape[0], f"the batch size of {n['q']}")
        max_k = k.shape[1]
    max_q = (_max_seqlen("max_seqlen_q", max_seqlen_q, _lengths(cu_seqlens_q), "cu_seqlens_q", op)
             if varlen_q else q.shape[1])

    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: {n['q']} and {n['k']} must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    C.check_head_dim(op, n["q"], q.shape[-1])
    C.check_head_dim(op, n["v"], v.shape[-1])
    for name, t in ((n["q"], q), (n["k"], k), (n["v"], v)):
        C.check_head_dim_stride(op, name, t)
    C.check_gqa(op, q.shape[-2], k.shape[-2], n["q"], n["k"])
    C.check_softcap(op, softcap)
    batch = block_table.shape[0] if paged else cu_seqlens_q.numel() - 1 if varlen_q else q.shape[0]
    C.check_alibi_slopes(op, alibi_slopes, batch, q.shape[-2], q.device)
    return max_q, max_k


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _flash_attn(q, k, v, *, causal, window, softmax_scale, cu_seqlens_q, cu_seqlens_k,
                max_seqlen_q, max_seqlen_k, block_table, seqlens_k, return_lse, backend,
                bottom_right, deterministic=True, op=OP, names=None, k_scale=None, v_scale=None,
                softcap=None, alibi_slopes=None, dropout_p=0.0, generator=None):
    dropout_p = C.check_dropout(op, dropout_p)
    if dropout_p > 0 and (block_table is not None or seqlens_k is not None):
        raise ValueError(f"{op}: dropout_p > 0 is not served with paged keys (block_table: inference); "
                         f"got dropout_p={dropout_p}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be None or a torch.Generator, got {type(generator).__name__}")
    max_q, max_k = _check_flash_attn(q, k, v, causal, window, softmax_scale, cu_seqlens_q,
                                     cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table, seqlens_k,
                                     op=op, names=names, k_scale=k_scale, v_scale=v_scale,
                                     softcap=softcap, alibi_slopes=alibi_slopes)
    softcap = None if softcap is None else float(softcap)
    if not isinstance(deterministic, bool):
        raise TypeError(f"{op}: deterministic must be a bool, got {deterministic!r}")
    # torch.use_deterministic_algorithms(True) wins: like torch's own ops that have a deterministic
    # alternative, take it rather than fail
    deterministic = deterministic or torch.are_deterministic_algorithms_enabled()
    scale = P.softmax_scale(q.shape[-1], softmax_scale)
    backend = resolve(backend, q.device, op)
    if backend == "torch":
        out, lse = reference.attention(
            q, k, v, causal=causal, window=window, softmax_scale=scale, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, block_table=block_table, seqlens_k=seqlens_k,
            bottom_right=bottom_right, return_lse=True, k_scale=k_scale, v_scale=v_scale,
            softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p, generator=generator)
    else:
        if needs_grad(alibi_slopes):
            raise BackendUnavailableError(
                f"{op}: backend {backend!r} does not differentiate alibi_slopes (FlashAttention does "
                "not either): pass alibi_slopes.detach(), or use backend='torch'")
        if needs_grad(q, k, v):
            if block_table is not None:
                raise BackendUnavailableError(
                    f"{OP}: attention over a paged KV cache (block_table) is not differentiable; "
                    "call it under torch.no_grad() or detach q, k, v")
            backend_fn(backend, "flash_attn_backward", OP)  # fail now, not in backward
        out, lse = _flash_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, seqlens_k,
                                   max_q, max_k, *P.window_bounds(causal, window), scale, bottom_right,
                                   backend, deterministic, k_scale, v_scale, softcap, alibi_slopes,
                                   dropout_p, dropout_seed(generator) if dropout_p > 0 else 0)
    return (out, lse) if return_lse else out


def flash_attn(q, k, v, *, causal=True, window=None, softmax_scale=None, cu_seqlens_q=None,
               cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, block_table=None,
               seqlens_k=None, return_lse=False, backend=None, deterministic=True, k_scale=None,
               v_scale=None, softcap=None, alibi_slopes=None, dropout_p=0.0, generator=None):
    """Fused softmax attention (causal, sliding window, GQA, varlen, paged keys, softcap, ALiBi,
    dropout).

    Dense: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D). Varlen: q (Tq, Hq, D), k/v (Tk, Hkv, D) with int32
    ``cu_seqlens_q``/``cu_seqlens_k`` (B+1,). Paged keys: k/v are caches (num_blocks, block_size, Hkv, D)
    with ``block_table`` (B, max_blocks) and ``seqlens_k`` (B,) int32. v's head dim Dv (1..256) may
    differ from D (FlashAttention 3's ``headdim_v``; DeepSeek MLA: D = 192, Dv = 128): out is then
    (..., Hq, Dv); the CUDA backend refuses it. An fp8 paged cache
    (``torch.float8_e4m3fn``) needs ``k_scale``/``v_scale`` (float32, (Hkv,) or ()): it is read as
    stored * scale, inside the kernel (as :func:`gptkernels.paged_decode` reads it).

    Query row i sits at position ``p = i + Sk - Sq`` (bottom-right). ``causal``: it sees keys
    ``j <= p``; ``window=W`` (with causal): at most W keys, itself included (``p - W < j <= p``),
    which is FlashAttention's ``window_size=(W - 1, 0)``. ``window=(left, right)`` is
    FlashAttention's ``window_size``: keys ``p - left <= j <= p + right``, each side an int >= 0 or
    -1 (unbounded), with ``causal=False`` a two-sided or one-sided local window (``(-1, -1)``: full
    attention); with ``causal=True`` right is ignored (taken as 0), as in FlashAttention. Rows that
    see no key output zeros (lse -inf). The CUDA backend serves causal windows only.

    Score modifiers, applied in FlashAttention's order (scale, soft cap, ALiBi, then the mask; as
    :func:`gptkernels.paged_decode`): ``softcap`` (a finite float > 0; None: off, which
    FlashAttention spells ``softcap=0.0``, refused here) turns the scaled score s into
    ``softcap * tanh(s / softcap)`` (Gemma-2, Grok); ``alibi_slopes`` (float32, (Hq,) or (B, Hq))
    adds ``-slope * |i + Sk - Sq - j|`` to the score of query row i and key j (FlashAttention's
    ``alibi_slopes``; BLOOM, MPT). Both are differentiated through for q, k, v; the slopes get no
    gradient on the kernel backends (FlashAttention's neither). The CUDA backend refuses both.

    ``dropout_p`` (a float in [0, 1); FlashAttention's): each attention probability is kept with
    probability 1 - dropout_p and scaled by 1 / (1 - dropout_p) (lse is of the undropped scores);
    the backward regenerates the same mask. The mask comes from a seed drawn from ``generator``
    (default: torch's global generator, so ``torch.manual_seed`` reproduces it): the Triton
    kernels draw it with Philox, the torch backend with torch's generator, so the two backends'
    masks differ (as FlashAttention's and torch's SDPA's do). Not with paged keys (inference); the
    CUDA backend refuses it.

    Returns ``out`` like q (head dim Dv), or ``(out, lse)`` with ``return_lse=True`` (lse float32,
    (B, Hq, Sq) dense or (Hq, Tq) varlen). Pass ``max_seqlen_q``/``max_seqlen_k`` with varlen inputs
    to avoid a host sync.

    ``deterministic=False`` lets the Triton backward add dQ with float32 atomics from the dK/dV
    kernel (FlashAttention-2's layout: 5 tile matmuls instead of 7); repeated runs then differ in
    the last bits of dQ. The default, ``True``, gives bit-identical gradients on every run, and so
    does ``torch.use_deterministic_algorithms(True)`` whatever ``deterministic`` says.
    """
    return _flash_attn(q, k, v, causal=causal, window=window, softmax_scale=softmax_scale,
                       cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                       max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                       block_table=block_table, seqlens_k=seqlens_k, return_lse=return_lse,
                       backend=backend, bottom_right=True, deterministic=deterministic,
                       k_scale=k_scale, v_scale=v_scale, softcap=softcap, alibi_slopes=alibi_slopes,
                       dropout_p=dropout_p, generator=generator)


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
         enable_gqa=False, *, window=None, backend=None):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` with a sliding ``window``.

    Same layout (..., H, L, E) and semantics, including torch's top-left causal alignment when
    L != S. A value head dim Ev different from the query's E is served (out (..., H, L, Ev)), and
    ``dropout_p`` (the kernels' own mask, drawn as :func:`flash_attn` draws it: torch's generator
    seeds it, but the mask is not torch SDPA's). Calls that the kernels do not cover go to torch's
    own SDPA: an ``attn_mask``, head dims over 256, or float64. ``window`` (which needs
    ``is_causal=True``) is then folded into the mask.
    """
    op = "sdpa"
    for name, t in (("query", query), ("key", key), ("value", value)):
        C.check_tensor(t, name, op=op)
        if t.dim() < 3:
            raise ValueError(f"{op}: {name} must be (..., H, L, E) with at least 3 dimensions, "
                             f"got shape {tuple(t.shape)}")
    C.check_window(op, window, is_causal)
    hq, hkv = query.shape[-3], key.shape[-3]
    if hq != hkv and not enable_gqa:
        raise ValueError(f"{op}: query has {hq} heads and key {hkv}: pass enable_gqa=True for GQA/MQA")
    kernel_ok = (attn_mask is None and query.dtype in P.FLOAT_DTYPES
                 and max(query.shape[-1], value.shape[-1]) <= P.MAX_HEAD_DIM)
    if not kernel_ok:
        mask = attn_mask
        if window is not None:
            band = reference.attention_mask(query.shape[-2], key.shape[-2], causal=True, window=window,
                                            bottom_right=False, device=query.device)
            if mask is None:
                mask = band
            elif mask.dtype == torch.bool:
                mask = mask & band
            else:
                mask = mask.masked_fill(~band, float("-inf"))
            is_causal = False
        kw = {"enable_gqa": enable_gqa} if enable_gqa else {}
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, **kw)

    lead = query.shape[:-3]
    if key.shape[:-3] != lead or value.shape[:-3] != lead:
        raise ValueError(f"{op}: query, key and value must share their leading (batch) dims, got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")

    batch = lead.numel()

    def to_bshd(t):  # (..., H, L, E) -> (B, L, H, E), a view when the leading dims allow it
        # (the batch is spelled out: reshape cannot infer -1 for a tensor of 0 elements, L or S = 0)
        return t.reshape(batch, *t.shape[-3:]).transpose(1, 2)

    out = _flash_attn(to_bshd(query), to_bshd(key), to_bshd(value), causal=bool(is_causal),
                      window=window, softmax_scale=scale, cu_seqlens_q=None, cu_seqlens_k=None,
                      max_seqlen_q=None, max_seqlen_k=None, block_table=None, seqlens_k=None,
                      return_lse=False, backend=backend, bottom_right=False, op=op,
                      names={"q": "query", "k": "key", "v": "value", "softmax_scale": "scale"},
                      dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(*lead, hq, query.shape[-2], value.shape[-1])
