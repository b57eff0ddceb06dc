"""Batched generation over the paged KV cache: :func:`generate` and the engine under it,
:class:`PagedDecoder`.

Prefill packs the prompts' real tokens (left padding dropped) and runs them through varlen
:func:`gptkernels.flash_attn` (rotary through :func:`gptkernels.apply_rotary`), writing each layer's
K/V into a :class:`gptkernels.PagedKVCache` with :func:`gptkernels.paged_append`. Each decode step
feeds one token per sequence: paged_append, then :func:`gptkernels.paged_decode`.

On CUDA (with a kernel backend) the decode step is captured once in a CUDA graph and replayed: the
block table has a fixed width (every block the generation will need is reserved up front), and the
step reads its token, position, sequence length and slot from static device buffers, so nothing in
it waits for the host. Logit processing and sampling run after the replay, also without a sync.
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import torch
from torch import nn

from ._backend import debug_checks, resolve
from ._policy import FP8_KV_DTYPES
from .decode import FUSED_LINEAR_MAX_ROWS
from .models.common import AttnContext, CausalLM
from .models.inputs import Batch, pack_batch
from .kv_cache import PagedKVCache

OP = "generate"

#: With an eos_token_id, the host checks whether every row has finished once per this many steps
#: (one sync each); the extra steps only produce padding and are cut off.
EOS_CHECK_EVERY = 8


class PagedDecoder:
    """Prefill and decode steps of one batch over its own paged KV cache (the engine of
    :func:`generate`; use it directly to time prefill and single decode steps).

    ``lengths``: real tokens of each prompt; ``max_new_tokens``: tokens to generate per row. All
    blocks are reserved at construction (fixed block table: CUDA-graph friendly).

        dec = PagedDecoder(model, batch.lengths, max_new_tokens=32, backend=None)
        logits = dec.prefill(batch)          # (B, vocab) at each prompt's last token
        logits = dec.step(next_tokens)       # (B, vocab); repeat max_new_tokens - 1 times
    """

    def __init__(self, model: CausalLM, lengths: Sequence[int], max_new_tokens: int, *,
                 block_size: int = 16, backend: Optional[str] = None,
                 cuda_graph: Optional[bool] = None, compile_step: bool = False,
                 kv_cache_dtype: Optional[torch.dtype] = None, fused: Optional[bool] = None):
        cfg = model.config
        self.model, self.backend, self.block_size = model, backend, block_size
        device = model.device
        self.lengths = [int(n) for n in lengths]
        b = len(self.lengths)
        # The last generated token is never fed back: a row holds len + max_new - 1 tokens at most.
        capacity = [n + max(max_new_tokens - 1, 0) for n in self.lengths]
        num_blocks = sum(-(-c // block_size) for c in capacity)
        self.cache = PagedKVCache(cfg.num_layers, num_blocks, block_size, model.kv_heads, cfg.head_dim,
                                  dtype=_cache_dtype(kv_cache_dtype, model.dtype), device=device)
        ids = list(range(b))
        self.prefill_slots = self.cache.reserve(ids, self.lengths)
        self.cache.reserve(ids, [c - n for c, n in zip(capacity, self.lengths)])
        self.block_table = self.cache.block_table(ids)
        self.steps_left = max(max_new_tokens - 1, 0)  # decode steps the reserved blocks can hold
        # Static step inputs (the CUDA graph reads these addresses).
        self.positions = torch.tensor(self.lengths, dtype=torch.int64, device=device)
        self.seq_lens = (self.positions + 1).to(torch.int32)  # the keys each step sees (paged_decode's)
        self.tokens = torch.zeros(b, dtype=torch.int64, device=device)
        backend_name = resolve(backend, device, OP)
        if cuda_graph is None:
            cuda_graph = device.type == "cuda" and backend_name != "torch" and not debug_checks()
        if cuda_graph and (device.type != "cuda" or backend_name == "torch"):
            raise ValueError(f"{OP}: cuda_graph=True needs a CUDA model and a kernel backend (the torch "
                             f"backend syncs with the host), got device {device} and backend {backend_name!r}")
        self.cuda_graph = bool(cuda_graph)
        self.fused = fused_mode(model, b, backend_name, fused)
        # Opt-in: torch.compile fuses the small per-layer kernels (LayerNorms, residual adds, GELU)
        # around the opaque gptkernels ops; the CUDA graph then captures the compiled step.
        # Kept unbound: a bound method stored on self is a reference cycle that would keep the model
        # and its KV cache alive after generate returns, until the garbage collector runs.
        self._compiled_step = torch.compile(PagedDecoder._step, fullgraph=True) if compile_step else None
        self.graph = None
        self.logits = None  # the graph's output buffer

    @torch.no_grad()
    def prefill(self, batch: Batch) -> torch.Tensor:
        """Run the packed prompts, fill the cache; returns logits (B, vocab) at each last token."""
        if not batch.packed:
            raise ValueError(f"{OP}: prefill needs a packed batch (pack_batch(..., force_packed=True))")
        # fp8 cache: each layer's scales are calibrated from its prefill K/V before they are stored
        ctx = AttnContext(positions=batch.positions, backend=self.backend, cu_seqlens=batch.cu_seqlens,
                          max_seqlen=batch.max_seqlen, k_cache=self.cache.k_cache,
                          v_cache=self.cache.v_cache, slot_mapping=self.prefill_slots,
                          k_scale=self.cache.k_scale, v_scale=self.cache.v_scale,
                          calibrate=self.cache.calibrate_scales if self.cache.fp8 else None)
        h = self.model.body(batch.ids, ctx)
        return self.model.head(batch.last(h))

    def _step(self) -> torch.Tensor:
        """One decode step from the static buffers; device ops only (no host sync)."""
        pos, bs = self.positions, self.block_size
        if self.fused is not None:  # the fused ops find each token's slot from the table themselves
            ctx = AttnContext(positions=pos, backend=self.backend, k_cache=self.cache.k_cache,
                              v_cache=self.cache.v_cache, block_table=self.block_table,
                              seq_lens=self.seq_lens, fused=self.fused, k_scale=self.cache.k_scale,
                              v_scale=self.cache.v_scale)
            return self.model.decode_logits(self.tokens, ctx)
        block = self.block_table.gather(1, (pos // bs)[:, None]).squeeze(1).long()
        ctx = AttnContext(positions=pos, backend=self.backend, k_cache=self.cache.k_cache,
                          v_cache=self.cache.v_cache, slot_mapping=block * bs + pos % bs,
                          block_table=self.block_table, seq_lens=self.seq_lens,
                          k_scale=self.cache.k_scale, v_scale=self.cache.v_scale)
        return self.model.head(self.model.body(self.tokens, ctx))

    def _step_fn(self) -> torch.Tensor:
        return self._step() if self._compiled_step is None else self._compiled_step(self)

    @torch.no_grad()
    def capture(self) -> None:
        """Capture :meth:`_step` in a CUDA graph. The warm-up runs (kernel compilation, autotuning,
        cuBLAS workspaces) write the K/V of the current slots, which the first replay rewrites."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step_fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step_fn()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); returns logits (B, vocab). With the CUDA graph the returned
        tensor is the graph's buffer: it is overwritten by the next step."""
        if self.steps_left <= 0:
            raise ValueError(f"{OP}: this PagedDecoder was sized for max_new_tokens - 1 decode steps; "
                             "all were used (make a new one with a larger max_new_tokens)")
        self.steps_left -= 1
        if tokens is not self.tokens:  # generate's greedy argmax writes into the buffer itself
            self.tokens.copy_(tokens)
        if self.cuda_graph and self.graph is None:
            self.capture()
        if self.graph is not None:
            self.graph.replay()
            out = self.logits
        else:
            out = self._step_fn()
        self.positions.add_(1)
        self.seq_lens.add_(1)
        return out


def fused_mode(model: CausalLM, batch: int, backend: str, fused: Optional[bool]) -> Optional[str]:
    """How a decode step runs (``AttnContext.fused``): None (the unfused ops), ``"ops"`` or
    ``"linear"`` (:mod:`gptkernels.models.common`). ``fused=None``: fused on the Triton backend
    (the fused kernels are Triton's), with ``"linear"`` where every block's projections are plain
    ``nn.Linear`` layers of one process (no tensor parallelism, no quantization) and the batch is
    at most ``FUSED_LINEAR_MAX_ROWS`` sequences, else ``"ops"``; unfused otherwise. An fp8 cache is
    written as paged_append writes it. ``fused=True`` on the CUDA backend is an error."""
    if fused is not None and not isinstance(fused, bool):
        raise TypeError(f"{OP}: fused must be None or a bool, got {fused!r}")
    if fused is None:
        fused = backend == "triton"
    if not fused:
        return None
    if backend == "cuda":
        raise ValueError(f"{OP}: fused=True needs the triton or torch backend (the CUDA backend has no fused "
                         "decode kernels), got backend 'cuda'")
    plain = model.tp is None and all(type(getattr(blk.attn, n)) is nn.Linear for blk in model.layers for n in
                                     ("qkv", "out")) and \
        all(type(getattr(blk.mlp, n)) is nn.Linear for blk in model.layers for n in ("fc_in", "fc_out"))
    return "linear" if plain and batch <= FUSED_LINEAR_MAX_ROWS else "ops"


def _cache_dtype(kv_cache_dtype, model_dtype: torch.dtype) -> torch.dtype:
    """The paged cache's dtype: the model's (None), or fp8 (torch.float8_e4m3fn)."""
    if kv_cache_dtype is None or kv_cache_dtype == model_dtype:
        return model_dtype
    if not isinstance(kv_cache_dtype, torch.dtype):
        raise TypeError(f"{OP}: kv_cache_dtype must be None or a torch.dtype, got {kv_cache_dtype!r}")
    if kv_cache_dtype not in FP8_KV_DTYPES:
        raise ValueError(f"{OP}: kv_cache_dtype must be None (the model's dtype, {model_dtype}) or "
                         f"{', '.join(map(str, FP8_KV_DTYPES))}, got {kv_cache_dtype}")
    return kv_cache_dtype


# --------------------------------------------------------------------------------------------------
# Logits processors (Hugging Face's semantics and order)
# --------------------------------------------------------------------------------------------------


def process_logits(scores: torch.Tensor, seqs: torch.Tensor, *, do_sample: bool, temperature: float,
                   top_k: int, top_p: float, repetition_penalty: float,
                   padding: Optional[torch.Tensor] = None) -> torch.Tensor:
    """HF's processors on float32 ``scores`` (B, V) given the token ids so far ``seqs`` (B, L)
    (the prompt with its padding, and what was generated): repetition penalty, then, only when
    sampling, temperature, top-k, top-p. Filtered entries become -inf.

    ``padding`` (B, S0) bool marks the prompt's left padding (the first S0 columns of ``seqs``): pad
    ids are not part of the prompt and are not penalized, as in transformers 5.23's ``generate``
    (5.17 penalizes them): a row generates the same tokens alone or in a padded batch."""
    if repetition_penalty != 1.0:
        if padding is not None:
            # Point the padding at the row's last id (a real token, penalized anyway): no pad id left.
            n = padding.shape[1]
            seqs = torch.cat([torch.where(padding, seqs[:, -1:], seqs[:, :n]), seqs[:, n:]], 1)
        picked = scores.gather(1, seqs)
        picked = torch.where(picked < 0, picked * repetition_penalty, picked / repetition_penalty)
        scores = scores.scatter(1, seqs, picked)
    if not do_sample:
        return scores
    if temperature != 1.0:
        scores = scores / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1])).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return scores


# --------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------


def _check_number(name, value, *, kind, lo=None, lo_open=False, hi=None):
    if isinstance(value, bool) or not isinstance(value, kind):
        want = "an int" if kind is int else "a number"
        raise TypeError(f"{OP}: {name} must be {want}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{OP}: {name} must be finite, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{OP}: {name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{OP}: {name} must be <= {hi}, got {value}")


def _token_list(name, value, vocab) -> list[int]:
    items = [value] if not isinstance(value, (list, tuple)) else list(value)
    if not items:
        raise ValueError(f"{OP}: {name} must be an int or a non-empty list of ints")
    for t in items:
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"{OP}: {name} must be an int or a list of ints, got {value!r}")
        if not 0 <= t < vocab:
            raise ValueError(f"{OP}: {name} must lie in [0, {vocab}) (the vocabulary), got {t}")
    return items


@torch.no_grad()
def generate(model, input_ids, max_new_tokens, attention_mask=None, do_sample=False, temperature=1.0,
             top_k=0, top_p=1.0, repetition_penalty=1.0, eos_token_id=None, pad_token_id=None,
             generator=None, backend=None, *, block_size=16, cuda_graph=None, compile_step=False,
             kv_cache_dtype=None, fused=None, stats=None):
    """Generate up to ``max_new_tokens`` tokens per row; returns (B, S + n) token ids, n <= max_new_tokens.

    ``max_new_tokens`` >= 1, as in transformers' generate (the CLI has the same rule).

    ``input_ids`` (B, S) with ``attention_mask`` (B, S) for a batch of prompts of different lengths,
    left-padded (as HF expects for generation). Positions count each row's real tokens. Greedy by
    default; ``do_sample=True`` samples from softmax of the processed logits with ``generator``.
    Logits processing follows Hugging Face (in float32, in this order): ``repetition_penalty`` (on
    every id of the row so far, the prompt's left padding excluded), then, when sampling only,
    ``temperature``, ``top_k`` (0: off), ``top_p`` (1.0: off).

    With ``eos_token_id`` (an int or a list), a row that emits it stops: its later tokens are
    ``pad_token_id`` (default: the first eos id); when every row has stopped, generation ends and the
    output is as long as the longest row (like HF). ``backend`` goes to every kernel call.

    A tensor-parallel model (``from_pretrained(..., tp_group=...)``): every rank calls ``generate``
    with the same arguments; each step's tokens are rank 0's choice, broadcast, so every rank returns
    the same tokens (even with differently seeded generators).

    ``kv_cache_dtype=torch.float8_e4m3fn`` keeps the paged K/V cache in fp8 (half the bytes per
    token of a 16-bit cache; None: the model's dtype). Scales, one per layer and KV head for K and
    for V, are calibrated from the prefill: each layer's largest |K| and |V| per head over every
    prompt token maps to 448 / 2 (``gptkernels.kv_cache.FP8_HEADROOM``), so generated tokens may
    grow to twice the prompt's range before they saturate at +-448. The prefill attends over its
    own unquantized K/V; decode steps read the fp8 cache (dequantized in the kernel). The scales
    stay fixed for the whole generation. Not on backend="cuda" (no fp8 kernels).

    Keyword-only extras: ``block_size`` of the paged cache; ``cuda_graph`` (None: on for CUDA models
    with a kernel backend); ``compile_step``: torch.compile the decode step (fuses the small
    per-layer ops; compiling takes a while, once per shape); ``fused``: run the decode step through
    the fused kernels of :mod:`gptkernels.decode` (None: on the Triton backend; see
    :func:`fused_mode`), about half the launches per layer, the same sums; ``stats``: a dict that receives timings (seconds, with device syncs at
    the phase boundaries): ``prefill_s``, ``capture_s``, ``decode_s``, ``prompt_tokens``,
    ``new_tokens``, ``decode_steps``.
    """
    if not isinstance(model, CausalLM):
        raise TypeError(f"{OP}: model must be a gptkernels.models.CausalLM, got {type(model).__name__}")
    cfg = model.config
    _check_number("max_new_tokens", max_new_tokens, kind=int, lo=1)  # as transformers: at least one
    if not isinstance(do_sample, bool):
        raise TypeError(f"{OP}: do_sample must be a bool, got {do_sample!r}")
    _check_number("temperature", temperature, kind=(int, float), lo=0, lo_open=True)
    _check_number("top_k", top_k, kind=int, lo=0)
    _check_number("top_p", top_p, kind=(int, float), lo=0, lo_open=True, hi=1)
    _check_number("repetition_penalty", repetition_penalty, kind=(int, float), lo=0, lo_open=True)
    _check_number("block_size", block_size, kind=int, lo=1)
    _cache_dtype(kv_cache_dtype, model.dtype)  # a bad kv_cache_dtype fails before any work
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{OP}: generator must be None or a torch.Generator, got {type(generator).__name__}")
    eos = None if eos_token_id is None else _token_list("eos_token_id", eos_token_id, cfg.vocab_size)
    if pad_token_id is not None:
        pad = _token_list("pad_token_id", pad_token_id, cfg.vocab_size)
        if len(pad) != 1 or isinstance(pad_token_id, (list, tuple)):
            raise TypeError(f"{OP}: pad_token_id must be an int, got {pad_token_id!r}")
        pad = pad[0]
    else:
        pad = eos[0] if eos else None
    if isinstance(input_ids, torch.Tensor) and input_ids.device != model.device:
        raise ValueError(f"{OP}: input_ids must be on the model's device ({model.device}), got {input_ids.device}")
    resolve(backend, model.device, OP)  # a bad backend fails here, before any work

    device = model.device
    timing = stats is not None

    def now():
        if timing and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    t0 = now()
    batch = pack_batch(cfg, input_ids, attention_mask, None, op=OP, force_packed=True)
    b, s = batch.shape
    if min(batch.lengths) == 0:
        raise ValueError(f"{OP}: every row of attention_mask needs at least one token")
    if attention_mask is not None and not bool(attention_mask[:, -1].bool().all()):
        raise ValueError(f"{OP}: attention_mask must use left padding (every row's last token real)")
    if max(batch.lengths) + max_new_tokens - 1 > cfg.max_positions:
        raise ValueError(f"{OP}: max_new_tokens={max_new_tokens} with a prompt of {max(batch.lengths)} "
                         f"tokens exceeds the model's {cfg.max_positions} positions")
    out = input_ids.new_full((b, s + max_new_tokens), pad if pad is not None else 0, dtype=torch.long)
    out[:, :s] = input_ids

    dec = PagedDecoder(model, batch.lengths, max_new_tokens, block_size=block_size, backend=backend,
                       cuda_graph=cuda_graph, compile_step=compile_step, kv_cache_dtype=kv_cache_dtype,
                       fused=fused)
    logits = dec.prefill(batch)
    t1 = now()
    if dec.cuda_graph and max_new_tokens > 1:
        dec.capture()
    t2 = now()

    # The sampling epilogue: HF's processors in eager torch, written so that a step launches few
    # small kernels, with the same results bit for bit (notes/models.md, "The sampling epilogue").
    penalize = repetition_penalty != 1.0
    if penalize and attention_mask is not None:
        # The penalty reads each row's ids so far from `out`. Pad ids are not part of a prompt: the
        # padding columns hold the row's last prompt token (real: left padding is checked, and
        # penalized anyway, so the set of penalized ids is the same) until the end, once, instead
        # of being masked at every step.
        out[:, :s] = torch.where(attention_mask.bool(), input_ids, input_ids[:, -1:])
    eos_t = None if eos is None else torch.tensor(eos, device=device)
    unfinished = torch.ones(b, dtype=torch.bool, device=device)
    steps = 0
    for step in range(max_new_tokens):
        if do_sample or penalize:
            scores = process_logits(logits.float(), out[:, : s + step], do_sample=do_sample,
                                    temperature=temperature, top_k=top_k, top_p=top_p,
                                    repetition_penalty=repetition_penalty)
            if do_sample:
                nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
            else:
                nxt = scores.argmax(-1)
        else:
            # Greedy without a penalty: the float32 cast is exact and order-preserving, so the argmax
            # of the logits themselves (the first of equal maxima, as before), written straight into
            # the decoder's token buffer (no cast, no copy).
            nxt = torch.argmax(logits, -1, out=dec.tokens)
        if model.tp is not None:  # tensor parallel: every rank takes rank 0's tokens (one broadcast)
            nxt = model.tp.broadcast_(nxt)
        if eos_t is not None:
            nxt = torch.where(unfinished, nxt, pad)
            unfinished &= ~torch.isin(nxt, eos_t)  # a finished row's pad changes nothing
        out[:, s + step] = nxt
        if step == max_new_tokens - 1:
            break
        if eos_t is not None and (step + 1) % EOS_CHECK_EVERY == 0 and not bool(unfinished.any()):
            break
        logits = dec.step(nxt)
        steps += 1
    if penalize and attention_mask is not None:
        out[:, :s] = input_ids
    n = max_new_tokens
    if eos_t is not None:  # each row stops at its first EOS (after it: pad); the longest row decides
        hit = torch.isin(out[:, s:], eos_t)
        first = torch.where(hit.any(1), hit.int().argmax(1), max_new_tokens - 1)
        n = int(first.max()) + 1
    t3 = now()
    if timing:
        stats.update(prefill_s=t1 - t0, capture_s=t2 - t1, decode_s=t3 - t2,
                     prompt_tokens=sum(batch.lengths), new_tokens=b * n, decode_steps=steps)
    return out[:, : s + n]
