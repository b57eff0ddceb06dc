"""Shared building blocks of the reference models: config, attention with backend dispatch, MLP,
norms, embeddings, and the decoder-only transformer every family is an instance of.

GPT-2, GPT-Neo, GPT-NeoX and OPT differ in a handful of switches (where positions come from, the
softmax scale, windowed layers, where the LayerNorms sit, parallel residual, projections around the
embedding); those switches live in :class:`ModelConfig` and the family files translate an HF config
into them. Weights are converted to one layout (a fused ``qkv`` Linear whose output is q | k | v,
each ``heads x head_dim``) by the family files too, so the model code below has no per-family
branches on weight layout.

How a forward pass runs attention is described by an :class:`AttnContext`:

* dense: hidden states (B, S, C), causal :func:`gptkernels.flash_attn` on (B, S, H, D);
* packed: hidden states (T, C) of the real tokens of a padded batch, varlen flash_attn with
  ``cu_seqlens`` (padding never enters the attention: no mask, exact on every backend);
* packed + cache (generation prefill): as packed, and K/V also go to the paged cache
  (:func:`gptkernels.paged_append`);
* decode: hidden states (B, C), one new token per sequence: paged_append, then
  :func:`gptkernels.paged_decode` over the cache.

A decode step may run fused (``AttnContext.fused``, chosen by :class:`gptkernels.generation.PagedDecoder`):
fewer, larger kernel launches with the same semantics (:mod:`gptkernels.decode`; notes/models.md,
"Launches per decode step"):

* ``"ops"``: rotary + cache append in one launch, each residual add folded into the LayerNorm
  that follows it (the sum travels to the next block as a pending delta); works with any Linear
  layers (tensor-parallel, quantized);
* ``"linear"``: also each LayerNorm, bias, activation and residual add folded into its GEMM
  (:func:`gptkernels.decode.fused_linear`), and for models without rotary the cache append into the
  qkv GEMM: five launches per pre-LN or parallel block (six with rotary). Plain ``nn.Linear`` layers
  of one process, up to ``FUSED_LINEAR_MAX_ROWS`` sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import decode as fused_ops
from ..attention import flash_attn
from ..paged import paged_append, paged_decode
from ..rotary import apply_rotary, rotary_cos_sin
from .config import ACTIVATIONS, ModelConfig
from .families import convert_hf_state_dict
from .inputs import pack_batch

# --------------------------------------------------------------------------------------------------
# How attention runs in one forward pass
# --------------------------------------------------------------------------------------------------


@dataclass
class AttnContext:
    """Per-forward attention metadata shared by every layer (see the module docstring)."""

    positions: torch.Tensor                    # int64, shaped like the hidden states' leading dims
    backend: Optional[str] = None
    cu_seqlens: Optional[torch.Tensor] = None  # packed: int32 (B+1,)
    max_seqlen: int = 0
    k_cache: Optional[list] = None             # per-layer paged caches (generation)
    v_cache: Optional[list] = None
    slot_mapping: Optional[torch.Tensor] = None  # int64, one slot per token of this pass
    block_table: Optional[torch.Tensor] = None   # decode: int32 (B, max_blocks)
    seq_lens: Optional[torch.Tensor] = None      # decode: int32 (B,), including the new token
    fused: Optional[str] = None                  # decode: None, "ops" or "linear" (module docstring)
    # fp8 cache: per-layer float32 (Hkv,) scales, and (prefill) a hook that sets a layer's scales
    # from its K/V before they are appended (PagedKVCache.calibrate_scales)
    k_scale: Optional[list] = None
    v_scale: Optional[list] = None
    calibrate: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None

    @property
    def decode(self) -> bool:
        return self.block_table is not None

    def attend(self, layer: int, q, k, v, *, softmax_scale: float, window: Optional[int]):
        """Causal attention of q over k, v (and the cache), per this context's mode."""
        scales = {}
        if self.k_scale is not None:
            if self.calibrate is not None:
                self.calibrate(layer, k, v)
            scales = dict(k_scale=self.k_scale[layer], v_scale=self.v_scale[layer])
        if self.k_cache is not None:
            paged_append(k, v, self.k_cache[layer], self.v_cache[layer], self.slot_mapping,
                         backend=self.backend, **scales)
        if self.decode:
            return paged_decode(q, self.k_cache[layer], self.v_cache[layer], self.block_table,
                                self.seq_lens, softmax_scale=softmax_scale, window=window,
                                backend=self.backend, **scales)
        return flash_attn(q, k, v, causal=True, window=window, softmax_scale=softmax_scale,
                          cu_seqlens_q=self.cu_seqlens, cu_seqlens_k=self.cu_seqlens,
                          max_seqlen_q=self.max_seqlen if self.cu_seqlens is not None else None,
                          max_seqlen_k=self.max_seqlen if self.cu_seqlens is not None else None,
                          backend=self.backend)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Self-attention: fused qkv projection (q | k | v), optional partial rotary, backend attention,
    output projection. The softmax scale and window are the layer's own (GPT-2's inverse layer
    index scaling, GPT-Neo's unscaled global/local layers)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.out_bias)
        self.softmax_scale = cfg.softmax_scale(layer)
        self.window = cfg.window(layer)
        self.rotary = cfg.rotary_dim > 0

    def forward(self, x: torch.Tensor, ctx: AttnContext, rope) -> torch.Tensor:
        lead = x.shape[:-1]
        # (..., 3, H, D) views: no copies; the kernels take any strides.
        q, k, v = self.qkv(x).view(*lead, 3, self.num_heads, self.head_dim).unbind(-3)
        if self.rotary:
            cos, sin = rope
            q, k = apply_rotary(q, k, cos, sin, positions=ctx.positions, backend=ctx.backend)
        o = ctx.attend(self.layer, q, k, v, softmax_scale=self.softmax_scale, window=self.window)
        return self.out(o.reshape(*lead, -1))

    def forward_fused(self, x: torch.Tensor, ctx: AttnContext, rope, norm=None) -> torch.Tensor:
        """A fused decode step (``ctx.fused``) up to the out projection: x (B, C) -> (B, H * D).

        The qkv projection (``"linear"``: with the block's LayerNorm ``norm`` folded in, and without
        rotary also the cache append of k and v), rotary + cache append in one launch, paged decode."""
        b = x.shape[0]
        kc, vc = ctx.k_cache[self.layer], ctx.v_cache[self.layer]
        scales = {}  # an fp8 cache: this layer's scales, as the paged ops take them
        if ctx.k_scale is not None:
            scales = dict(k_scale=ctx.k_scale[self.layer], v_scale=ctx.v_scale[self.layer])
        in_gemm = ctx.fused == "linear" and not self.rotary
        if ctx.fused == "linear":
            cache = (kc, vc, ctx.block_table, ctx.positions, *scales.values()) if in_gemm else None
            qkv = fused_ops.fused_linear(x, self.qkv.weight, self.qkv.bias, norm=norm, cache=cache,
                                         backend=ctx.backend)
        else:
            qkv = self.qkv(x)
        if in_gemm:
            q = qkv.view(b, self.num_heads, self.head_dim)
        else:
            q, k, v = qkv.view(b, 3, self.num_heads, self.head_dim).unbind(1)
            cos, sin = rope if self.rotary else (None, None)
            q = fused_ops.rotary_append(q, k, v, kc, vc, ctx.block_table, ctx.positions, cos, sin,
                                        backend=ctx.backend, **scales)
        o = paged_decode(q, kc, vc, ctx.block_table, ctx.seq_lens, softmax_scale=self.softmax_scale,
                         window=self.window, backend=ctx.backend, **scales)
        return o.reshape(b, -1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc_in = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.fc_out = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.activation]
        self.activation = cfg.activation  # its name, for the fused decode GEMM's epilogue

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


def layer_norm(cfg: ModelConfig, dim: int | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(dim or cfg.hidden_size, eps=cfg.norm_eps, elementwise_affine=cfg.norm_affine)


def _ln(norm: nn.LayerNorm) -> tuple:
    """A LayerNorm module as the fused ops take it: (weight, bias, eps)."""
    return norm.weight, norm.bias, norm.eps


class Block(nn.Module):
    """One transformer layer, in the residual arrangement the config names:

    * pre-LN (GPT-2, GPT-Neo, OPT, NeoX sequential): x += attn(ln1(x)); x += mlp(ln2(x))
    * parallel (GPT-NeoX default): x + attn(ln1(x)) + mlp(ln2(x))
    * post-LN (OPT-350m): x = ln1(x + attn(x)); x = ln2(x + mlp(x))
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1 = layer_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.norm2 = layer_norm(cfg)
        self.mlp = MLP(cfg)
        self.parallel = cfg.parallel_residual
        self.norm_before = cfg.norm_before
        # Tensor parallelism (models/tp.py) puts the one all-reduce of a parallel block here.
        self.reduce = nn.Identity()

    def forward(self, x, ctx: AttnContext, rope, pending=None):
        """The block's output; in a fused decode step (``ctx.fused``) the pair (h, pending): the
        output is h plus the deltas in ``pending`` (None, or a tuple of one or two), which the next
        block's (or the final) LayerNorm adds in its own launch."""
        if ctx.fused is not None:
            return self._decode_linear(x, ctx, rope) if ctx.fused == "linear" else self._decode_ops(x, ctx, rope, pending)
        if self.parallel:
            return x + self.reduce(self.attn(self.norm1(x), ctx, rope) + self.mlp(self.norm2(x)))
        if self.norm_before:
            x = x + self.attn(self.norm1(x), ctx, rope)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, ctx, rope))
        return self.norm2(x + self.mlp(x))

    # ---- fused decode steps (gptkernels.decode; the same sums, fewer launches) --------------------

    def _decode_ops(self, x, ctx: AttnContext, rope, pending):
        """``"ops"``: each residual add rides on the LayerNorm after it (add_layer_norm); any Linear
        layers (tensor-parallel ones keep their all-reduce: the sum is reduced before it is added)."""
        attn, be, deltas = self.attn, ctx.backend, pending or ()
        if self.parallel:
            h, n1, n2 = fused_ops.add_layer_norm(x, *deltas, norms=[_ln(self.norm1), _ln(self.norm2)], backend=be)
            a, m = attn.out(attn.forward_fused(n1, ctx, rope)), self.mlp(n2)
            # x + reduce(a + m): one pending delta under tensor parallelism, else both (no add here)
            return h, ((a, m) if isinstance(self.reduce, nn.Identity) else (self.reduce(a + m),))
        if self.norm_before:
            h, n1 = fused_ops.add_layer_norm(x, *deltas, norms=[_ln(self.norm1)], backend=be)
            h, n2 = fused_ops.add_layer_norm(h, attn.out(attn.forward_fused(n1, ctx, rope)),
                                             norms=[_ln(self.norm2)], backend=be)
            return h, (self.mlp(n2),)
        # post-LN: norm1(x + attn(x)), norm2(x + mlp(x)); no delta is left pending
        _, x = fused_ops.add_layer_norm(x, attn.out(attn.forward_fused(x, ctx, rope)), norms=[_ln(self.norm1)],
                                        backend=be)
        _, x = fused_ops.add_layer_norm(x, self.mlp(x), norms=[_ln(self.norm2)], backend=be)
        return x, None

    def _decode_linear(self, x, ctx: AttnContext, rope):
        """``"linear"``: every LayerNorm, bias, activation and residual add inside a GEMM
        (fused_linear); plain nn.Linear layers of one process (PagedDecoder checks)."""
        attn, mlp, be = self.attn, self.mlp, ctx.backend

        def linear(layer, inp, **kw):
            return fused_ops.fused_linear(inp, layer.weight, layer.bias, backend=be, **kw)

        if self.parallel:  # x + attn(ln1(x)) + mlp(ln2(x)), added as (x + attn) + mlp
            o = attn.forward_fused(x, ctx, rope, norm=_ln(self.norm1))
            f = linear(mlp.fc_in, x, norm=_ln(self.norm2), activation=mlp.activation)
            return linear(mlp.fc_out, f, residual=linear(attn.out, o, residual=x)), None
        if self.norm_before:
            h = linear(attn.out, attn.forward_fused(x, ctx, rope, norm=_ln(self.norm1)), residual=x)
            f = linear(mlp.fc_in, h, norm=_ln(self.norm2), activation=mlp.activation)
            return linear(mlp.fc_out, f, residual=h), None
        _, x = fused_ops.add_layer_norm(linear(attn.out, attn.forward_fused(x, ctx, rope), residual=x),
                                        norms=[_ln(self.norm1)], backend=be)
        f = linear(mlp.fc_in, x, activation=mlp.activation)
        _, x = fused_ops.add_layer_norm(linear(mlp.fc_out, f, residual=x), norms=[_ln(self.norm2)], backend=be)
        return x, None


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class CausalLM(nn.Module):
    """Decoder-only transformer with an LM head; the four families are configurations of it.

    ``model(input_ids, attention_mask=None, position_ids=None, backend=None)`` -> logits
    (B, S, vocab) in the model's dtype. See :meth:`forward`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.pos_emb = (nn.Embedding(cfg.max_positions + cfg.position_offset, cfg.hidden_size)
                        if cfg.learned_positions else None)
        project = cfg.embed_dim != cfg.hidden_size
        self.proj_in = nn.Linear(cfg.embed_dim, cfg.hidden_size, bias=False) if project else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm_f = layer_norm(cfg) if cfg.final_norm else None
        self.proj_out = nn.Linear(cfg.hidden_size, cfg.embed_dim, bias=False) if project else None
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        self._rope: dict = {}  # device -> (cos, sin), float32, built on first use
        self.tp = None  # a models.tp.TensorParallel when this is one rank's shard (tp.shard_model_)

    # ---- bookkeeping ---------------------------------------------------------------------------

    def tie_weights(self) -> None:
        """Share the LM head with the token embedding when the config says so (again after
        ``to_empty``, which unties)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @property
    def device(self) -> torch.device:
        return self.tok_emb.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_emb.weight.dtype

    @property
    def kv_heads(self) -> int:
        """K/V heads per layer in this process (the paged cache's head count): all of them, or this
        rank's share under tensor parallelism."""
        return self.layers[0].attn.num_heads

    def rope(self, device: torch.device):
        """The (cos, sin) float32 tables of this model on ``device`` (None without rotary). Kept out
        of the module's buffers so ``model.to(dtype)`` leaves them in float32."""
        cfg = self.config
        if not cfg.rotary_dim:
            return None
        key = str(device)
        if key not in self._rope:
            self._rope[key] = rotary_cos_sin(cfg.rotary_dim, cfg.max_positions, base=cfg.rope_base,
                                             scaling=cfg.rope_scaling, device=device)
        return self._rope[key]

    def load_hf_state_dict(self, state_dict: dict, *, strict: bool = True, sharded: bool = False) -> None:
        """Load weights from a Hugging Face state dict (HF's own key names; with or without the
        ``transformer.`` / ``gpt_neox.`` / ``model.`` prefixes). Conversion is the family's
        (:mod:`gptkernels.models.gpt2` etc.); missing or unexpected weights raise a ValueError.

        A tensor-parallel rank (``model.tp``) takes its slices of the full state dict;
        ``sharded=True`` says ``state_dict`` already holds only those slices (what
        ``from_pretrained`` reads)."""
        cfg = self.config
        if self.tp is not None:
            if not sharded:
                state_dict = self.tp.shard_hf_state_dict(state_dict)
            cfg = self.tp.plan.local_config
        elif sharded:
            raise ValueError("load_hf_state_dict: sharded=True needs a tensor-parallel model (from_config or "
                             "from_pretrained with tp_group)")
        converted = convert_hf_state_dict(cfg, state_dict)
        if self.config.tie_word_embeddings:
            converted["lm_head.weight"] = converted["tok_emb.weight"]
        mine = self.state_dict()
        missing = sorted(set(mine) - set(converted))
        unexpected = sorted(set(converted) - set(mine))
        if strict and (missing or unexpected):
            raise ValueError(f"load_hf_state_dict: state_dict does not match a {self.config.family} "
                             f"model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                             f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
        for name, t in converted.items():
            if name in mine and tuple(t.shape) != tuple(mine[name].shape):
                raise ValueError(f"load_hf_state_dict: state_dict weight for {name} has shape "
                                 f"{tuple(t.shape)}, the model expects {tuple(mine[name].shape)}")
        with torch.no_grad():
            for name, t in converted.items():
                if name in mine:
                    mine[name].copy_(t)

    # ---- forward ---------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.tok_emb(input_ids)
        if self.proj_in is not None:
            h = self.proj_in(h)
        if self.pos_emb is not None:
            h = h + self.pos_emb(positions + self.config.position_offset)
        return h

    def body(self, input_ids: torch.Tensor, ctx: AttnContext, final_norm: bool = True) -> torch.Tensor:
        """Token ids (any leading shape matching ``ctx``) -> final hidden states (before the head;
        without the final LayerNorm if ``final_norm`` is False)."""
        rope = self.rope(input_ids.device)
        h = self.embed(input_ids, ctx.positions)
        pending = None
        for layer in self.layers:
            if ctx.fused is not None:  # a fused decode step: (h, deltas still to add)
                h, pending = layer(h, ctx, rope, pending)
            else:
                h = layer(h, ctx, rope)
        if pending and self.norm_f is not None:
            _, h = fused_ops.add_layer_norm(h, *pending, norms=[_ln(self.norm_f)], backend=ctx.backend)
        elif pending:
            h = h + (pending[0] if len(pending) == 1 else pending[0] + pending[1])
        elif self.norm_f is not None and final_norm:
            h = self.norm_f(h)
        if self.proj_out is not None:
            h = self.proj_out(h)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    def decode_logits(self, input_ids: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """A decode step's logits, ``head(body(...))``; in a ``"linear"`` fused step the final
        LayerNorm rides in the LM head's GEMM when nothing sits between them (no project_out, a
        plain nn.Linear head)."""
        if ctx.fused == "linear" and self.norm_f is not None and self.proj_out is None and \
                type(self.lm_head) is nn.Linear:
            h = self.body(input_ids, ctx, final_norm=False)
            return fused_ops.fused_linear(h, self.lm_head.weight, self.lm_head.bias, norm=_ln(self.norm_f),
                                          backend=ctx.backend)
        return self.head(self.body(input_ids, ctx))

    def forward(self, input_ids, attention_mask=None, position_ids=None, backend=None):
        """Logits (B, S, vocab) for ``input_ids`` (B, S).

        ``attention_mask`` (B, S) of 0/1: padding (left or right: each row's ones must be one
        contiguous run) is dropped before the layers and the real tokens run packed through varlen
        attention, so padding cannot change any real token's result; padded positions get logits
        0. Positions count real tokens (``cumsum(mask) - 1``, what HF's ``generate`` and OPT use);
        pass ``position_ids`` (B, S) to override (HF's GPT-2/Neo/NeoX forward uses ``arange(S)`` even
        with a padded mask). ``backend`` goes to every kernel call.
        """
        batch = pack_batch(self.config, input_ids, attention_mask, position_ids, op="model")
        ctx = AttnContext(positions=batch.positions, backend=backend, cu_seqlens=batch.cu_seqlens,
                          max_seqlen=batch.max_seqlen)
        logits = self.head(self.body(batch.ids, ctx))
        return batch.unpack(logits)
