"""Our attention inside Hugging Face transformers models.

    import gptkernels.hf
    gptkernels.hf.register()                       # once per process
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="gptkernels")

    gptkernels.hf.patch(gpt_neo_model)             # GPT-Neo, whose HF code has its own attention classes

**Semantics.** A model with ``attn_implementation="gptkernels"`` computes what transformers'
``"sdpa"`` implementation computes, at every row, padding rows included (a padding query that sees
no real key gives zeros in both; one after the real keys of a right-padded row sees them, in both).
A GPT-Neo model after :func:`patch` computes what its ``"eager"`` attention computes at every real
row (eager turns rows that see no key into an average of values through its finfo.min mask; ours
are zeros there). Nothing is approximated: a call the kernels cannot serve goes to transformers'
own ``sdpa_attention_forward`` (GPT-Neo: its eager attention), counted in :data:`calls` with why.

**How.** :func:`register` adds our attention function and our mask preparation. The mask
preparation recognises transformers' plain causal mask function and its sliding-window variant (by
code object, see :func:`_causal_window`); for those it returns ``None`` (no padding, no window in
effect: the kernels' causal path) or the 2-D key padding mask of the layer's keys, tagged with the
window and the padding layout (one host sync per forward and mask type). The attention function
compacts the real keys to varlen :func:`gptkernels.flash_attn` (``cu_seqlens`` from the mask) and
pads the output back: bottom-right aligned for left padding (and for a decode row without window,
wherever the holes are), top-left aligned for a right-padded prefill; see
:meth:`_Padding.alignment`. Everything else keeps transformers' sdpa mask and runs transformers'
sdpa: custom mask overlays (``or_mask_function``/``and_mask_function``, block or chunked attention),
bidirectional masks, packed sequences found from position ids, static caches (queries not at the
end of the keys), 4-D masks given by the caller, rows padded on different sides in one batch or
padding between real tokens (a prefill, or a windowed decode: right-padded generation past the
window), float64, position bias, a batch-1 query broadcast over a batch of keys. Attention dropout in
training goes to the kernels (``flash_attn(dropout_p=)``, its own mask, drawn from torch's generator).
Gemma-2's ``softcap`` goes to the kernels (``flash_attn(softcap=)``); transformers' sdpa refuses it,
so a softcapped call that falls back raises transformers' own error (use ``"eager"`` there).
"""

from __future__ import annotations

import collections
import functools
import types
from typing import Optional

import torch

from . import _policy as P
from . import reference
from ._backend import BACKENDS
from .attention import _flash_attn, flash_attn, sdpa

NAME = "gptkernels"
#: The mask preparation a patched GPT-Neo model's config names (its attention is patched, not looked up).
GPT_NEO_MASK = "gptkernels-gpt-neo"
#: Keyword arguments that change the attention math in ways neither we nor transformers' sdpa
#: function compute (gpt-oss and others pass attention sinks as ``s_aux``): refused, never dropped.
UNSUPPORTED = ("s_aux",)
#: Keyword arguments transformers' sdpa function serves and our kernels do not.
SDPA_ONLY = ("position_bias", "cache")

#: Attention calls by path since the last ``calls.clear()``: ``"kernels"`` (no padding),
#: ``"kernels:padded"`` (unpadded to varlen), and fallbacks ``"sdpa:<why>"`` (transformers' sdpa) or
#: ``"eager:<why>"`` (GPT-Neo's eager attention).
calls: collections.Counter = collections.Counter()


def fallbacks() -> dict:
    """The fallback entries of :data:`calls` (empty when every call ran our kernels)."""
    return {k: n for k, n in calls.items() if not k.startswith("kernels")}


# --------------------------------------------------------------------------------------------------
# Mask preparation
# --------------------------------------------------------------------------------------------------

_NOT_CAUSAL = object()


def _cells(fn) -> dict:
    code = fn.__code__
    return dict(zip(code.co_freevars, (c.cell_contents for c in (fn.__closure__ or ()))))


def _causal_window(mask_function):
    """None for transformers' ``causal_mask_function``, W for ``sliding_window_causal_mask_function(W)``
    (``and_masks(sliding_window_overlay(W), causal_mask_function)``), ``_NOT_CAUSAL`` for anything
    else (custom overlays, packed sequences, chunks, bidirectional...). Recognised by code object and
    closure, so a pattern we do not know is never mistaken for one we do."""
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return None
    try:
        and_code = mu.and_masks(mu.causal_mask_function).__code__
        overlay_code = mu.sliding_window_overlay(1).__code__
        if mask_function.__code__ is not and_code:
            return _NOT_CAUSAL
        parts = _cells(mask_function)["mask_functions"]
        overlays = [p for p in parts if p is not mu.causal_mask_function]
        if len(parts) != 2 or len(overlays) != 1 or overlays[0].__code__ is not overlay_code:
            return _NOT_CAUSAL
        window = _cells(overlays[0])["sliding_window"]
    except (AttributeError, KeyError, TypeError, ValueError):
        return _NOT_CAUSAL
    return window if isinstance(window, int) and not isinstance(window, bool) and window >= 1 else _NOT_CAUSAL


class _Padding:
    """What the attention function needs to know about a 2-D key padding mask (B, S) from our mask
    preparation: the window of its layers and the layout of the real keys (one sync to read it).
    Unpadding indices are made once per query length and shared by every layer."""

    def __init__(self, mask: torch.Tensor, window: Optional[int], full: Optional[bool] = None):
        self.mask, self.window = mask, window
        if full:
            self.full = self.left = self.right = True
        else:
            m = mask
            runs = m[:, :1].sum(1) + (m[:, 1:] & ~m[:, :-1]).sum(1)  # runs of real keys per row
            empty = ~m.any(1)
            # left: each row's real keys are one run ending at the last key; right: one starting at the first
            left, right = ((runs == 1) & m[:, -1]) | empty, ((runs == 1) & m[:, 0]) | empty
            flags = torch.stack([m.all(), left.all(), right.all()])
            self.full, self.left, self.right = flags.tolist()
        self._unpad = {}

    def alignment(self, q_len: int, window: Optional[int]) -> Optional[str]:
        """How varlen attention over the compacted keys reproduces the padded (sdpa/eager) result at
        every query row, padding rows included: "dense" (no padding), "bottom-right" (queries at the
        end of their row's real keys), "top-left" (queries from each row's first real key), or None
        (it cannot: a window over keys with padding holes, or padding rows between real keys).

        Query i sits at position p = S - q_len + i and sees the real keys j <= p (and p - W < j).
        Compaction keeps key distances when each row's real keys are one run [s, e]; the query's
        position among them is then p - s, which is bottom-right alignment when e = S - 1 (left
        padding; padding queries see nothing and are dropped: zeros, as sdpa's empty rows) and
        top-left when s = 0 and q_len = S (right padding; padding queries after the real ones keep
        their own rows and see the real keys before them, as in sdpa). A single decode row without
        window sees every real key, wherever the holes are."""
        if self.full:
            return "dense"
        if self.left or (q_len == 1 and window is None):
            return "bottom-right"
        if self.right and q_len == self.mask.shape[1]:
            return "top-left"
        return None

    def unpad(self, q_len: int):
        """((batch index, position, cu_seqlens, max_seqlen) of the kept queries, the same of the real
        keys) for bottom-right alignment: the queries are the last ``q_len`` keys; padding queries
        are dropped, except a single decode row, which is kept."""
        if q_len not in self._unpad:
            def index(m):
                b, s = m.nonzero(as_tuple=True)
                lens = m.sum(1, dtype=torch.int32)
                cu = torch.nn.functional.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
                return b, s, cu, int(lens.max()) if lens.numel() else 0

            keys = index(self.mask)
            if q_len == self.mask.shape[1]:
                queries = keys
            elif q_len == 1:
                queries = index(torch.ones_like(self.mask[:, :1]))
            else:
                queries = index(self.mask[:, -q_len:])
            self._unpad[q_len] = (queries, keys)
        return self._unpad[q_len]


def _dense_mask(padding: _Padding, q_len: int, window: Optional[int]) -> torch.Tensor:
    """The (B, 1, q_len, S) bool mask the tagged 2-D mask stands for (bottom-right causal, window,
    key padding): what transformers' sdpa mask preparation would have made."""
    band = reference.attention_mask(q_len, padding.mask.shape[1], causal=True, window=window,
                                    bottom_right=True, device=padding.mask.device)
    return padding.mask[:, None, None, :] & band


def _prepare_mask(general, batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                  mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """transformers' mask-interface signature. Returns None (no padding, no window in effect), a 2-D
    bool (B, kv_length) key padding mask tagged ``_gptkernels`` (our kernels), or ``general(...)``
    (transformers' sdpa or eager mask) for every pattern the kernels do not compute."""
    from transformers import masking_utils as mu

    if mask_function is None:
        mask_function = mu.causal_mask_function

    def fallback(why):
        mask = general(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                       kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                       **kwargs)
        if isinstance(mask, torch.Tensor):
            mask._gptkernels_why = why  # for the attention function's count of fallbacks
        return mask

    window = _causal_window(mask_function)
    if window is _NOT_CAUSAL:  # custom overlays, packed sequences, chunks, bidirectional...
        return fallback("mask pattern")
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # the layout checks read the mask
        return fallback("tracing")
    if (not all(isinstance(x, int) for x in (q_offset, kv_offset))  # static caches: tensor offsets
            or q_offset + q_length != kv_offset + kv_length):  # queries are not the last keys
        return fallback("static cache")
    if attention_mask is None:
        pad = None
    else:
        if (attention_mask.dim() != 2 or attention_mask.dtype != torch.bool or attention_mask.shape[0] != batch_size
                or attention_mask.shape[1] < kv_offset + kv_length):
            return fallback("mask shape")
        pad = attention_mask[:, kv_offset:kv_offset + kv_length]  # absolute key positions, as sdpa's mask
    if window is not None and kv_length <= window:
        window = None  # it hides no key
    # No padding, no window, causal alignment moot: None, as sdpa's mask preparation returns
    skip = kwargs.get("allow_is_causal_skip", True) and (q_length == 1 or q_length == kv_length) and window is None
    if pad is None:
        if skip:
            return None
        pad = torch.ones(batch_size, kv_length, dtype=torch.bool, device=kwargs.get("device", "cpu"))
    info = _Padding(pad, window, full=True if attention_mask is None else None)
    if info.full and skip:
        return None
    if info.alignment(q_length, window) is None:
        return fallback("padding layout")
    pad._gptkernels = info
    return pad


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


def _kernels_refuse(query, key, value) -> Optional[str]:
    """Why our kernels cannot serve these tensors (None: they can)."""
    if query.dtype not in P.FLOAT_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return "dtype"
    if max(query.shape[-1], value.shape[-1]) > P.MAX_HEAD_DIM:  # a value head dim of its own is served
        return "head dim"
    if query.shape[0] != key.shape[0]:
        return "batch broadcast"
    return None


def _padded_attention(q, k, v, padding: _Padding, alignment: str, window, scale, backend, softcap=None,
                      dropout_p=0.0):
    """q (B, L, Hq, D), k (B, S, Hkv, D), v (B, S, Hkv, Dv) (any strides) with a tagged padding mask of
    S keys -> (B, L, Hq, Dv): compact the keys (and queries) to varlen, attend with ``alignment`` (see
    :meth:`_Padding.alignment`), pad back with zeros."""
    if alignment == "dense":
        return flash_attn(q, k, v, causal=True, window=window, softmax_scale=scale, backend=backend,
                          softcap=softcap, dropout_p=dropout_p)
    (bq, sq, cu_q, max_q), (bk, sk, cu_k, max_k) = padding.unpad(q.shape[1])
    ku, vu = k[bk, sk], v[bk, sk]
    if alignment == "top-left":  # every query row, each row's from its first (real) key
        batch, q_len = q.shape[:2]
        cu_rows = torch.arange(0, (batch + 1) * q_len, q_len, dtype=torch.int32, device=q.device)
        out = _flash_attn(q.reshape(batch * q_len, *q.shape[2:]), ku, vu, causal=True, window=window,
                          softmax_scale=scale, cu_seqlens_q=cu_rows, cu_seqlens_k=cu_k, max_seqlen_q=q_len,
                          max_seqlen_k=max_k, block_table=None, seqlens_k=None, return_lse=False,
                          backend=backend, bottom_right=False, softcap=softcap, dropout_p=dropout_p)
        return out.view(*q.shape[:-1], v.shape[-1])
    out = flash_attn(q[bq, sq], ku, vu, causal=True, window=window, softmax_scale=scale, cu_seqlens_q=cu_q,
                     cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, backend=backend,
                     softcap=softcap, dropout_p=dropout_p)
    return out.new_zeros(*q.shape[:-1], v.shape[-1]).index_put((bq, sq), out)


def _check_padding_shape(mask, query, key) -> None:
    """Our mask preparation sized the mask for these keys; a model that changed the keys since (none
    known) would make it unreadable: an error, never a guess."""
    if mask.shape != (query.shape[0], key.shape[2]) or query.shape[2] > key.shape[2]:
        raise ValueError(f"gptkernels.hf: a key padding mask of shape {tuple(mask.shape)} for queries "
                         f"{tuple(query.shape)} and keys {tuple(key.shape)} (B, H, S, D): it must be (B, S) "
                         "with S >= the query length; this model changes its keys after the mask was made")


def _sdpa_fallback(why: str, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls["sdpa:" + why] += 1
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                      scaling: Optional[float] = None, is_causal: Optional[bool] = None, *,
                      gptkernels_backend: Optional[str] = None, **kwargs):
    """transformers' attention-function signature: query (B, Hq, L, D), key/value (B, Hkv, S, D)
    -> (output (B, L, Hq, D), None). ``gptkernels_backend`` pins a backend (default: resolved)."""
    for name in UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation={NAME!r}: this model passes {name} (attention sinks), "
                             "which gptkernels does not compute; use attn_implementation='eager'")
    fallback = functools.partial(_sdpa_fallback, module=module, query=query, key=key, value=value,
                                 dropout=dropout, scaling=scaling, is_causal=is_causal, kwargs=kwargs)
    extra = next((k for k in SDPA_ONLY if kwargs.get(k) is not None), None)
    softcap = kwargs.get("softcap")  # Gemma-2's attn_logit_softcapping (the fallback keeps it in kwargs)
    refuse = extra or _kernels_refuse(query, key, value)
    padding = getattr(attention_mask, "_gptkernels", None)
    if padding is not None and padding.mask is attention_mask:
        q_len = query.shape[2]
        if refuse is not None:
            return fallback(refuse, attention_mask=_dense_mask(padding, q_len, padding.window))
        _check_padding_shape(attention_mask, query, key)
        alignment = padding.alignment(q_len, padding.window)
        if alignment is None:  # our mask preparation only tags layouts that have one
            return fallback("padding layout", attention_mask=_dense_mask(padding, q_len, padding.window))
        calls["kernels" if padding.full else "kernels:padded"] += 1
        out = _padded_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), padding,
                                alignment, padding.window, scaling, gptkernels_backend, softcap, dropout)
        return out.contiguous(), None
    if attention_mask is not None:
        # a 4-D (or foreign) mask: transformers' semantics
        return fallback(getattr(attention_mask, "_gptkernels_why", "mask"), attention_mask=attention_mask)
    if refuse is not None:
        return fallback(refuse, attention_mask=None)
    # No mask: transformers' sdpa semantics (5.x): causal only with more than one query row (a decode
    # row sees every key), top-left aligned (keys past the last query row, e.g. a static cache's
    # empty tail, unseen).
    calls["kernels"] += 1
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and query.shape[2] > 1
    if softcap is not None or dropout:
        # sdpa's top-left semantics, through flash_attn (sdpa has no softcap; its dropout is torch's)
        out = _flash_attn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=causal,
                          window=None, softmax_scale=scaling, cu_seqlens_q=None, cu_seqlens_k=None,
                          max_seqlen_q=None, max_seqlen_k=None, block_table=None, seqlens_k=None,
                          return_lse=False, backend=gptkernels_backend, bottom_right=False, softcap=softcap,
                          dropout_p=dropout)
        return out.contiguous(), None
    out = sdpa(query, key, value, is_causal=causal, scale=scaling,
               enable_gqa=query.shape[1] != key.shape[1], backend=gptkernels_backend)
    return out.transpose(1, 2).contiguous(), None  # (B, L, H, D): a no-op when the kernels ran


def _check_backend(op: str, backend) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be None or one of {BACKENDS}, got {backend!r}")


def register(name: str = NAME, backend: Optional[str] = None) -> str:
    """Register :func:`attention_forward` and our mask preparation as ``attn_implementation=name``;
    ``backend`` pins "triton", "cuda" or "torch". Returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if (not isinstance(name, str) or not name or name in ("sdpa", "eager", GPT_NEO_MASK)
            or "flash" in name):
        raise ValueError(f"register: name must be a new implementation name, got {name!r}")
    _check_backend("register", backend)
    fn = attention_forward if backend is None else functools.partial(attention_forward, gptkernels_backend=backend)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, functools.partial(_prepare_mask, sdpa_mask))
    return name


# --------------------------------------------------------------------------------------------------
# GPT-Neo
# --------------------------------------------------------------------------------------------------


def _gpt_neo_attention_forward(self, hidden_states, attention_mask=None, layer_past=None, use_cache=False,
                               output_attentions=False, **kwargs):
    """GPTNeoSelfAttention.forward (transformers 5.x) with ``_attn`` on our kernels: local layers
    with their window, unscaled scores (softmax_scale=1), bottom-right causal as its ``bias``."""
    query = self._split_heads(self.q_proj(hidden_states), self.num_heads, self.head_dim)
    key = self._split_heads(self.k_proj(hidden_states), self.num_heads, self.head_dim)
    value = self._split_heads(self.v_proj(hidden_states), self.num_heads, self.head_dim)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_id)

    q_len, s_len = query.shape[2], key.shape[2]
    window = self.config.window_size if self.attention_type == "local" and s_len > self.config.window_size else None
    padding = getattr(attention_mask, "_gptkernels", None)
    if padding is not None and padding.mask is not attention_mask:
        padding = None
    dropout = self.attn_dropout.p if self.training else 0.0
    refuse = "output_attentions" if output_attentions else _kernels_refuse(query, key, value)
    if padding is not None:
        _check_padding_shape(attention_mask, query, key)
        if refuse is None and padding.window is not None:  # not from create_causal_mask: not GPT-Neo's own
            refuse = "mask"
        elif refuse is None and padding.alignment(q_len, window) is None:
            refuse = "window over padding holes"
    elif refuse is None and attention_mask is not None:
        refuse = getattr(attention_mask, "_gptkernels_why", "mask")
    if refuse is not None:
        calls["eager:" + refuse] += 1
        if padding is not None:  # the eager mask the 2-D one stands for
            allowed = _dense_mask(padding, q_len, padding.window)
            attention_mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~allowed, torch.finfo(query.dtype).min)
        attn_output, attn_weights = self._attn(query, key, value, attention_mask)
    else:
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if padding is None:  # GPT-Neo's own bias: bottom-right causal, whatever the lengths
            calls["kernels"] += 1
            out = flash_attn(q, k, v, causal=True, window=window, softmax_scale=1.0, backend=self._gptkernels_backend,
                             dropout_p=dropout)
        else:
            calls["kernels" if padding.full else "kernels:padded"] += 1
            out = _padded_attention(q, k, v, padding, padding.alignment(q_len, window), window, 1.0,
                                    self._gptkernels_backend, dropout_p=dropout)
        attn_output, attn_weights = out.transpose(1, 2), None
    attn_output = self._merge_heads(attn_output, self.num_heads, self.head_dim)
    attn_output = self.resid_dropout(self.out_proj(attn_output))
    return attn_output, attn_weights


def patch(model: torch.nn.Module, backend: Optional[str] = None) -> torch.nn.Module:
    """Make a Hugging Face GPT-Neo model (``GPTNeoModel``, ``GPTNeoForCausalLM``, ...) run our
    attention kernels, in place: every attention layer (global, and local with its ``window_size``),
    forward and backward, padded batches and generation with a cache included. The results are
    those of its ``"eager"`` attention (attention dropout in training runs in the kernels, with their
    own mask); calls the kernels cannot serve (``output_attentions``, float64, a window over
    right-padded keys with holes) run that eager code and are counted in :data:`calls`. Returns
    ``model``."""
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.models.gpt_neo import modeling_gpt_neo as neo

    if not isinstance(model, neo.GPTNeoPreTrainedModel):
        raise TypeError(f"patch: expected a Hugging Face GPT-Neo model (GPTNeoModel, GPTNeoForCausalLM, ...), "
                        f"got {type(model).__name__}; other families use register() and "
                        f"attn_implementation={NAME!r}")
    _check_backend("patch", backend)
    layers = [m for m in model.modules() if isinstance(m, neo.GPTNeoSelfAttention)]
    if not layers:
        raise ValueError(f"patch: {type(model).__name__} has no GPT-Neo attention layers")
    if model.config._attn_implementation == GPT_NEO_MASK or any(hasattr(m, "_gptkernels_backend") for m in layers):
        raise ValueError(f"patch: this {type(model).__name__} is already patched")
    AttentionMaskInterface.register(GPT_NEO_MASK, functools.partial(_prepare_mask, eager_mask))
    for m in layers:
        m._gptkernels_backend = backend
        m.forward = types.MethodType(_gpt_neo_attention_forward, m)
    model.config._attn_implementation = GPT_NEO_MASK  # masks from _prepare_mask, eager's where it falls back
    return model
