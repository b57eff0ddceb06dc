"""Tensor parallelism on ``torch.distributed``: one model split N ways across the ranks of a group.

The layout is Megatron-LM's (as gpt-fast's ``tp.py`` and vLLM apply it); every rank runs the same
forward on the same tokens and holds 1/N of every attention and MLP weight:

* **column-parallel** (no communication): the fused qkv projection keeps the rank's query heads' q
  rows and its K/V heads' k and v rows; the MLP's first projection keeps 1/N of the hidden columns.
  Attention then runs on the local heads with any backend, and the paged KV cache of each rank holds
  only its K/V heads.
* **row-parallel**: the attention output and MLP down projections multiply the local activations by
  their 1/N of the input columns, giving a partial sum of the full output; one all-reduce adds the
  partials (the bias is added once, on rank 0, before the sum). A block with GPT-NeoX's parallel
  residual, ``x + attn(ln1(x)) + mlp(ln2(x))``, adds both partials first: one all-reduce per block.
* **vocab-parallel** (our choice for the embeddings): the token embedding and the LM head (tied or
  not) keep ``ceil(V / N)`` vocabulary rows each (zero rows pad the last rank). The embedding looks up
  the ids it holds, zeros elsewhere, and all-reduces; the head computes its logit columns and an
  all-gather gives every rank the full logits. At TP 8 each rank keeps 1/8 of the embedding tables
  (GPT-NeoX-20B's two take 1.2 GB in bf16) for one all-reduce of the embeddings and one all-gather
  of the logits per forward.
* **replicated**: LayerNorms, row-parallel biases, learned position tables, OPT's project_in/out.

Sharding is a transformation, :func:`shard_model_`, applied to a model built on the meta device (it
swaps the projections for their parallel forms and records the plan in ``model.tp``); the model code
itself has no tensor-parallel branches. Which part of each weight a rank holds is described once, as
:class:`Shard` s: in our layout (:func:`model_shards`: random init draws the whole tensor and keeps
the rank's part, so a TP model equals the single-process model with the same seed) and in each family's
Hugging Face layout (:func:`hf_shards`: ``from_pretrained`` reads only those slices from safetensors
with ``get_slice``, and ``load_hf_state_dict`` cuts them from a full state dict).
"""

from __future__ import annotations

import gc
import hashlib
import os
import re
import socket
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

try:  # traceable collectives, for torch.compile(fullgraph=True) of the decode step (TensorParallel)
    from torch.distributed import _functional_collectives as funcol
except ImportError:  # pragma: no cover - torch built without distributed
    funcol = None

# ``all_gather_tensor`` / ``all_gather_into_tensor`` were renamed ``all_gather_single`` (torch 2.14
# warns on the old names).
_all_gather = None if funcol is None else getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

OP = "tensor parallel"


# --------------------------------------------------------------------------------------------------
# The plan: which heads, MLP columns and vocabulary rows a rank holds
# --------------------------------------------------------------------------------------------------


def head_split(num_heads: int, num_kv_heads: int, rank: int, world: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(query heads [h0, h1), K/V heads [k0, k1)) of ``rank`` out of ``world``.

    Query heads split evenly. K/V heads split with them; when there are fewer K/V heads than ranks
    (MQA, narrow GQA) each K/V head is replicated on the ``world // num_kv_heads`` ranks whose query
    heads read it. Anything else is a ValueError naming the counts."""
    if num_heads % world:
        raise ValueError(f"{OP}: the number of attention heads ({num_heads}) must be divisible by the "
                         f"tensor-parallel size ({world})")
    if num_heads % num_kv_heads:
        raise ValueError(f"{OP}: the number of attention heads ({num_heads}) must be a multiple of the "
                         f"number of K/V heads ({num_kv_heads})")
    q = num_heads // world
    heads = (rank * q, (rank + 1) * q)
    if num_kv_heads >= world:
        if num_kv_heads % world:
            raise ValueError(f"{OP}: the number of K/V heads ({num_kv_heads}) must be divisible by the "
                             f"tensor-parallel size ({world}), or divide it (then K/V heads are replicated)")
        kv = num_kv_heads // world
        return heads, (rank * kv, (rank + 1) * kv)
    if world % num_kv_heads:
        raise ValueError(f"{OP}: with fewer K/V heads ({num_kv_heads}) than ranks ({world}) the "
                         "tensor-parallel size must be a multiple of the K/V heads (each is replicated)")
    k = rank * num_kv_heads // world  # the K/V head every local query head reads
    return heads, (k, k + 1)


@dataclass(frozen=True)
class Plan:
    """What rank ``rank`` of ``world`` holds of a model with config ``cfg``."""

    cfg: ModelConfig
    rank: int
    world: int
    heads: tuple[int, int]      # query heads [h0, h1)
    kv_heads: tuple[int, int]   # K/V heads [k0, k1)
    mlp: tuple[int, int]        # MLP hidden columns [m0, m1)
    vocab: tuple[int, int]      # vocabulary rows [v0, v1) (v1 - v0 <= vocab_rows)
    vocab_rows: int             # rows of the embedding/LM head per rank: ceil(V / N)

    @property
    def local_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def local_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def local_config(self) -> ModelConfig:
        """The config with this rank's head count: the family converters regroup a rank's slice of
        a checkpoint (GPT-NeoX's per-head qkv) as they regroup a whole one."""
        return replace(self.cfg, num_heads=self.local_heads)


def make_plan(cfg: ModelConfig, rank: int, world: int) -> Plan:
    """The plan of ``rank``; heads or MLP width not divisible by ``world``: a ValueError."""
    heads, kv_heads = head_split(cfg.num_heads, cfg.num_heads, rank, world)  # these families: MHA
    if cfg.intermediate_size % world:
        raise ValueError(f"{OP}: the MLP width (intermediate_size {cfg.intermediate_size}) must be "
                         f"divisible by the tensor-parallel size ({world})")
    m = cfg.intermediate_size // world
    rows = -(-cfg.vocab_size // world)
    vocab = (min(rank * rows, cfg.vocab_size), min((rank + 1) * rows, cfg.vocab_size))
    return Plan(cfg, rank, world, heads, kv_heads, (rank * m, (rank + 1) * m), vocab, rows)


# --------------------------------------------------------------------------------------------------
# Shards: a rank's part of one tensor
# --------------------------------------------------------------------------------------------------


class ShardShapeError(ValueError):
    """A checkpoint tensor whose shape does not fit the config being sharded."""


@dataclass(frozen=True)
class Shard:
    """A rank's part of a tensor: along ``dim`` (whose full length is ``full``) the pieces
    ``ranges`` ([start, stop), in order) concatenated, zero-padded to ``pad_to`` (vocab-parallel
    tables: every rank the same size, as the all-gather needs)."""

    dim: int
    full: int
    ranges: tuple[tuple[int, int], ...]
    pad_to: int = 0

    @property
    def size(self) -> int:
        return max(self.pad_to, sum(b - a for a, b in self.ranges))

    def take(self, source, name: str) -> torch.Tensor:
        """This part of ``source``: a tensor, or a safetensors slice (``safe_open(...).get_slice``,
        of which only these ranges are read)."""
        shape = tuple(source.shape) if isinstance(source, torch.Tensor) else tuple(source.get_shape())
        if len(shape) <= self.dim or shape[self.dim] != self.full:
            raise ShardShapeError(f"{OP}: checkpoint weight {name!r} has shape {shape}; this config needs "
                                  f"{self.full} along dimension {self.dim} to split it")
        parts = []
        for a, b in self.ranges:
            if isinstance(source, torch.Tensor):
                parts.append(source.narrow(self.dim, a, b - a))
            else:
                parts.append(source[(slice(None),) * self.dim + (slice(a, b),)])
        t = parts[0] if len(parts) == 1 else torch.cat(parts, self.dim)
        if t.shape[self.dim] < self.pad_to:
            pad = list(t.shape)
            pad[self.dim] = self.pad_to - t.shape[self.dim]
            t = torch.cat([t, t.new_zeros(pad)], self.dim)
        return t


def _rules(table: dict[str, Shard]) -> list[tuple[re.Pattern, Shard]]:
    # A pattern matches the end of a key, after a dot or at its start (any HF prefix may precede it).
    return [(re.compile(rf"(^|\.)(?:{pattern})$"), shard) for pattern, shard in table.items()]


def _find(rules, key: str) -> Optional[Shard]:
    for pattern, shard in rules:
        if pattern.search(key):
            return shard
    return None


def _pieces(p: Plan):
    """The row ranges, in units of channels, that the plan keeps: (q rows, k/v rows, our fused
    q | k | v rows, MLP columns, the vocabulary Shard)."""
    d, cfg = p.cfg.head_dim, p.cfg
    q = ((p.heads[0] * d, p.heads[1] * d),)
    kv = ((p.kv_heads[0] * d, p.kv_heads[1] * d),)
    q_size, kv_size = cfg.num_heads * d, cfg.num_heads * d  # MHA: as many K/V heads as query heads
    (k0, k1), = kv
    qkv = q + ((q_size + k0, q_size + k1), (q_size + kv_size + k0, q_size + kv_size + k1))  # q | k | v
    mlp = (p.mlp,)
    vocab = Shard(0, cfg.vocab_size, (p.vocab,), p.vocab_rows)
    return q, kv, qkv, q_size, kv_size, mlp, vocab


def model_shards(p: Plan) -> list[tuple[re.Pattern, Shard]]:
    """Our parameter names -> the rank's Shard (names absent: replicated). nn.Linear weights are
    (out, in): column-parallel splits dim 0, row-parallel dim 1."""
    q, _, qkv, q_size, kv_size, mlp, vocab = _pieces(p)
    inter = p.cfg.intermediate_size
    return _rules({
        r"attn\.qkv\.(weight|bias)": Shard(0, q_size + 2 * kv_size, qkv),
        r"attn\.out\.weight": Shard(1, q_size, q),
        r"mlp\.fc_in\.(weight|bias)": Shard(0, inter, mlp),
        r"mlp\.fc_out\.weight": Shard(1, inter, mlp),
        r"tok_emb\.weight|lm_head\.weight": vocab,
    })


def hf_shards(p: Plan) -> list[tuple[re.Pattern, Shard]]:
    """Hugging Face weight names of the config's family -> the rank's Shard in HF's layout (names
    absent: read whole). The family files' conversions then turn the slices into our layout."""
    q, kv, qkv, q_size, kv_size, mlp, vocab = _pieces(p)
    inter, family, d = p.cfg.intermediate_size, p.cfg.family, p.cfg.head_dim
    if family == "gpt2":  # Conv1D weights are (in, out); c_attn's columns are q | k | v
        table = {
            r"attn\.c_attn\.weight": Shard(1, q_size + 2 * kv_size, qkv),
            r"attn\.c_attn\.bias": Shard(0, q_size + 2 * kv_size, qkv),
            r"attn\.c_proj\.weight": Shard(0, q_size, q),
            r"mlp\.c_fc\.weight": Shard(1, inter, mlp),
            r"mlp\.c_fc\.bias": Shard(0, inter, mlp),
            r"mlp\.c_proj\.weight": Shard(0, inter, mlp),
            r"wte\.weight|lm_head\.weight": vocab,
        }
    elif family == "gpt-neo":  # nn.Linear (out, in), separate q/k/v projections without bias
        table = {
            r"attn\.attention\.q_proj\.weight": Shard(0, q_size, q),
            r"attn\.attention\.[kv]_proj\.weight": Shard(0, kv_size, kv),
            r"attn\.attention\.out_proj\.weight": Shard(1, q_size, q),
            r"mlp\.c_fc\.(weight|bias)": Shard(0, inter, mlp),
            r"mlp\.c_proj\.weight": Shard(1, inter, mlp),
            r"wte\.weight|lm_head\.weight": vocab,
        }
    elif family == "gpt-neox":  # query_key_value rows are per head: (head, q/k/v, d), heads contiguous
        per_head = ((p.heads[0] * 3 * d, p.heads[1] * 3 * d),)
        table = {
            r"attention\.query_key_value\.(weight|bias)": Shard(0, 3 * q_size, per_head),
            r"attention\.dense\.weight": Shard(1, q_size, q),
            r"mlp\.dense_h_to_4h\.(weight|bias)": Shard(0, inter, mlp),
            r"mlp\.dense_4h_to_h\.weight": Shard(1, inter, mlp),
            r"embed_in\.weight|embed_out\.weight|lm_head\.weight": vocab,
        }
    elif family == "opt":
        table = {
            r"self_attn\.q_proj\.(weight|bias)": Shard(0, q_size, q),
            r"self_attn\.[kv]_proj\.(weight|bias)": Shard(0, kv_size, kv),
            r"self_attn\.out_proj\.weight": Shard(1, q_size, q),
            r"fc1\.(weight|bias)": Shard(0, inter, mlp),
            r"fc2\.weight": Shard(1, inter, mlp),
            r"embed_tokens\.weight|lm_head\.weight": vocab,
        }
    else:  # pragma: no cover - ModelConfig admits only the four families
        raise ValueError(f"{OP}: no sharding rules for family {family!r}")
    return _rules(table)


# --------------------------------------------------------------------------------------------------
# The group and its collectives
# --------------------------------------------------------------------------------------------------


class TensorParallel:
    """A model's tensor-parallel group (``model.tp``): the plan of this rank and the collectives the
    forward and ``generate`` use."""

    def __init__(self, group, plan: Plan):
        self.group, self.plan = group, plan
        self.rank, self.world = plan.rank, plan.world
        self.src = dist.get_global_rank(group, 0)  # group rank 0, as a global rank (broadcasts)
        self._model_rules = model_shards(plan)
        self._hf_rules = hf_shards(plan)

    def __repr__(self) -> str:
        return f"TensorParallel(rank {self.rank} of {self.world}, {dist.get_backend(self.group)})"

    def model_shard(self, name: str) -> Optional[Shard]:
        """The Shard of our parameter ``name`` this rank holds (None: replicated)."""
        return _find(self._model_rules, name)

    def hf_shard(self, key: str) -> Optional[Shard]:
        """The Shard of the Hugging Face checkpoint tensor ``key`` this rank reads (None: all of it)."""
        return _find(self._hf_rules, key)

    def shard_hf_state_dict(self, state_dict: dict) -> dict:
        """This rank's slices of a full HF state dict (the rest of each tensor is not copied)."""
        if not isinstance(state_dict, dict):
            return state_dict  # the conversion says what it expected
        out = {}
        for key, t in state_dict.items():
            shard = self.hf_shard(key) if isinstance(key, str) and isinstance(t, torch.Tensor) else None
            out[key] = t if shard is None else shard.take(t, key)
        return out

    # The collectives: functional collectives (torch.distributed._functional_collectives) while
    # torch.compile traces (what it can put in a graph), plain synchronous c10d calls in eager mode
    # (what a CUDA graph captures with NCCL too): no registry of pending works, no wrapper tensors.

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the ranks. In eager mode it is summed in place: the callers pass a
        temporary of their own (a partial product, a masked embedding)."""
        if torch.compiler.is_compiling():
            return funcol.all_reduce(x, "sum", self.group)
        x = x if x.is_contiguous() else x.contiguous()
        dist.all_reduce(x, group=self.group)
        return x

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """(..., n) per rank -> (..., N * n): the ranks' pieces side by side, in rank order."""
        lead, n = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, n).contiguous()
        if torch.compiler.is_compiling():
            g = _all_gather(flat, 0, self.group)
        else:
            g = flat.new_empty(self.world * flat.shape[0], n)
            _all_gather_into(g, flat, group=self.group)
        # g: (N * M, n), rank r's rows at [r * M, (r + 1) * M)
        return g.view(self.world, -1, n).permute(1, 0, 2).reshape(*lead, self.world * n)

    def broadcast_(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` of group rank 0, on every rank (in place)."""
        dist.broadcast(x, self.src, group=self.group)
        return x


# --------------------------------------------------------------------------------------------------
# Parallel layers
# --------------------------------------------------------------------------------------------------


class RowParallelLinear(nn.Linear):
    """y = sum over ranks of x_local @ W_local^T (+ the bias, once). ``reduce=False`` leaves the
    partial sum to the caller (GPT-NeoX's parallel block adds attention and MLP partials first)."""

    def __init__(self, in_local: int, out_features: int, bias: bool, tp: TensorParallel, *,
                 reduce: bool = True, device=None, dtype=None):
        super().__init__(in_local, out_features, bias=bias, device=device, dtype=dtype)
        self.tp, self.reduce = tp, reduce
        self.bias_here = tp.rank == 0  # every rank holds the bias; rank 0 adds it to its partial

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias if self.bias_here else None)
        return self.tp.all_reduce(y) if self.reduce else y


class AllReduce(nn.Module):
    """Sums its input over the ranks (the one all-reduce of a GPT-NeoX parallel-residual block)."""

    def __init__(self, tp: TensorParallel):
        super().__init__()
        self.tp = tp

    def forward(self, x):
        return self.tp.all_reduce(x)


class VocabParallelEmbedding(nn.Embedding):
    """The rank's ``vocab_rows`` rows of the table, starting at id ``start``; other ids give zeros,
    and the all-reduce fills them from the rank that holds them."""

    def __init__(self, rows: int, dim: int, start: int, tp: TensorParallel, *, device=None, dtype=None):
        super().__init__(rows, dim, device=device, dtype=dtype)
        self.tp, self.start = tp, start

    def forward(self, ids):
        local = ids - self.start
        here = (local >= 0) & (local < self.num_embeddings)
        h = F.embedding(torch.where(here, local, 0), self.weight)
        return self.tp.all_reduce(h.masked_fill(~here.unsqueeze(-1), 0))


class VocabParallelHead(nn.Linear):
    """Logits of the rank's vocabulary rows, all-gathered: every rank gets the full (..., vocab)."""

    def __init__(self, dim: int, rows: int, vocab_size: int, tp: TensorParallel, *, device=None, dtype=None):
        super().__init__(dim, rows, bias=False, device=device, dtype=dtype)
        self.tp, self.vocab_size = tp, vocab_size

    def forward(self, h):
        return self.tp.gather_last(F.linear(h, self.weight))[..., : self.vocab_size]


def shard_model_(model, tp: TensorParallel):
    """Turn a whole model built on the meta device into this rank's shard, in place (parameters stay
    on meta: materialise with ``to_empty``). Returns the model, with ``model.tp = tp``."""
    if any(p.device.type != "meta" for p in model.parameters()):
        raise ValueError(f"{OP}: shard_model_ expects a model built on the meta device")
    p, cfg = tp.plan, model.config
    d, hidden = cfg.head_dim, cfg.hidden_size
    kw = dict(device="meta", dtype=model.tok_emb.weight.dtype)
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        attn.qkv = nn.Linear(hidden, (p.local_heads + 2 * p.local_kv_heads) * d, bias=cfg.qkv_bias, **kw)
        attn.out = RowParallelLinear(p.local_heads * d, hidden, cfg.out_bias, tp, reduce=not block.parallel, **kw)
        attn.num_heads = p.local_heads
        local = p.mlp[1] - p.mlp[0]
        mlp.fc_in = nn.Linear(hidden, local, bias=cfg.mlp_bias, **kw)
        mlp.fc_out = RowParallelLinear(local, hidden, cfg.mlp_bias, tp, reduce=not block.parallel, **kw)
        if block.parallel:  # x + attn + mlp: both partial sums, then one all-reduce
            block.reduce = AllReduce(tp)
    model.tok_emb = VocabParallelEmbedding(p.vocab_rows, cfg.embed_dim, p.vocab[0], tp, **kw)
    model.lm_head = VocabParallelHead(cfg.embed_dim, p.vocab_rows, cfg.vocab_size, tp, **kw)
    model.tie_weights()
    model.tp = tp
    return model


# --------------------------------------------------------------------------------------------------
# Setting up: the group's checks, shared random state, torchrun
# --------------------------------------------------------------------------------------------------


def _backend_devices(group) -> set[str]:
    """Device types the group's backend serves ("nccl" -> cuda, "gloo" -> cpu and cuda, or a
    "cpu:gloo,cuda:nccl" list)."""
    name = str(dist.get_backend(group)).lower()
    if ":" in name:
        return {part.split(":")[0] for part in name.split(",")}
    return {"nccl": {"cuda"}, "gloo": {"cpu", "cuda"}, "mpi": {"cpu", "cuda"}}.get(name, {"cpu", "cuda"})


def setup(tp_group, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, *, op: str) -> TensorParallel:
    """Check ``tp_group`` and what the ranks agree on, and return this rank's TensorParallel.

    Every rank calls it (it gathers each rank's device, dtype, config and host), so a problem
    raises the same error on every rank instead of leaving some waiting in a collective."""
    if not dist.is_available():
        raise ValueError(f"{op}: tp_group needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise ValueError(f"{op}: tp_group was given but torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group first (torchrun sets up the environment "
                         "for it), then pass a group such as torch.distributed.group.WORLD")
    if not isinstance(tp_group, dist.ProcessGroup):
        raise TypeError(f"{op}: tp_group must be a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD or new_group(...)), got {type(tp_group).__name__}")
    rank, world = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    if rank < 0:
        raise ValueError(f"{op}: this process (global rank {dist.get_rank()}) is not a member of tp_group")
    plan = make_plan(cfg, rank, world)  # same config on every rank: every rank raises alike
    fingerprint = hashlib.sha1(repr(sorted(cfg.to_dict().items())).encode()).hexdigest()
    mine = (device.type, str(device), str(dtype).replace("torch.", ""), fingerprint, socket.gethostname())
    everyone: list = [None] * world
    if device.type == "cuda":  # NCCL sends the objects from the current device: the model's
        with torch.cuda.device(device):
            dist.all_gather_object(everyone, mine, group=tp_group)
    else:
        dist.all_gather_object(everyone, mine, group=tp_group)
    where = ", ".join(f"rank {r} on {e[1]}" for r, e in enumerate(everyone))
    if len({e[0] for e in everyone}) > 1:
        raise ValueError(f"{op}: tp_group mixes devices ({where}): every rank's shard must be on the same "
                         "kind of device (one GPU per rank with NCCL, or CPU with gloo)")
    if device.type not in _backend_devices(tp_group):
        raise ValueError(f"{op}: tp_group's backend {dist.get_backend(tp_group)!r} cannot communicate "
                         f"{device.type} tensors: use NCCL for CUDA models and gloo for CPU models")
    if device.type == "cuda":
        seen = {}
        for r, e in enumerate(everyone):
            other = seen.setdefault((e[4], e[1]), r)
            if other != r:
                raise ValueError(f"{op}: ranks {other} and {r} of tp_group both use {e[1]} on host {e[4]}: "
                                 "give each rank its own GPU (torch.cuda.set_device(LOCAL_RANK))")
    if len({e[2] for e in everyone}) > 1:
        raise ValueError(f"{op}: the ranks of tp_group ask for different dtypes "
                         f"({', '.join(f'rank {r}: {e[2]}' for r, e in enumerate(everyone))})")
    if len({e[3] for e in everyone}) > 1:
        raise ValueError(f"{op}: the ranks of tp_group load different model configs; every rank must "
                         "load the same model")
    return TensorParallel(tp_group, plan)


def _default_generator(device: torch.device) -> Optional[torch.Generator]:
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        torch.cuda.init()
        return torch.cuda.default_generators[device.index if device.index is not None
                                             else torch.cuda.current_device()]
    return None


def share_random_state_(tp: TensorParallel, device: torch.device) -> None:
    """Give every rank group rank 0's random state for ``device``, so a random init draws the same
    numbers everywhere (the whole tensor is drawn, then each rank keeps its part)."""
    gen = _default_generator(device)
    if gen is None:
        return
    state = gen.get_state()
    comm = state.to(device) if "cpu" not in _backend_devices(tp.group) else state
    tp.broadcast_(comm)
    gen.set_state(comm.cpu())


def init_from_env(tp_size: Optional[int], device: torch.device):
    """For the CLI: the process group torchrun describes in the environment, or none.

    Returns ``(group or None, device)``: under torchrun, the NCCL group with this process on
    ``cuda:LOCAL_RANK`` for a CUDA device, else gloo on the CPU. ``tp_size`` must equal the number of
    processes torchrun started (one model, all ranks; no data-parallel replicas)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != (tp_size or 1):
        if world == 1:
            raise ValueError(f"--tp {tp_size}: start {tp_size} processes with torchrun "
                             f"(torchrun --nproc-per-node {tp_size} -m gptkernels generate ... --tp {tp_size})")
        given = "without --tp" if tp_size is None else f"with --tp {tp_size}"
        raise ValueError(f"torchrun started {world} processes {given}: --tp must equal the number of "
                         f"processes (pass --tp {world}; one model over all ranks, no data-parallel replicas)")
    if world == 1:
        return None, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {device}: with --tp each rank uses cuda:LOCAL_RANK; pass --device cuda")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    global _env_group_started
    _env_group_started = True
    return dist.group.WORLD, device


_env_group_started = False  # whether init_from_env started the default group (end_process_group ends it)


def end_process_group(clean: bool) -> None:
    """For the CLI: end the group :func:`init_from_env` started (a no-op without one, or once ended).
    After a clean run the ranks meet first (a barrier), so that none tears down its connections while
    another is still in a collective; after an error it is destroyed at once (torchrun stops the
    other ranks).

    Then the group object itself must go before the interpreter exits. A gloo group's worker threads
    release each finished collective's tensors, which takes the GIL; one still waiting for it when
    Python starts finalizing is made to exit inside a C++ destructor, and the rank aborts
    ("terminate called without an active exception", about one torchrun in 5 on a loaded machine).
    ``destroy_process_group`` only unregisters the group: the model still holds it, kept alive by
    reference cycles until finalization's own collection. Collecting here, with the interpreter
    alive, frees it: its destructor joins the worker threads (releasing the GIL)."""
    global _env_group_started
    if not _env_group_started:
        return
    _env_group_started = False
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
    gc.collect()
