"""The paged KV cache's block manager: :class:`PagedKVCache` and :class:`CacheFullError`.

Layout (SPEC.md, "Paged KV cache"): per layer, ``k_cache`` and ``v_cache`` are (num_blocks, block_size,
Hkv, D); a token's slot is ``block * block_size + offset_in_block``. The manager lives on the host
(plain Python lists: a handful of integers per sequence and step, guarded by one lock so several
threads may share a cache) and hands the kernels device tensors: slot mappings, block tables,
sequence lengths. The ops that read and write the caches are in :mod:`gptkernels.paged`.
"""

from __future__ import annotations

import operator
import threading
from typing import Sequence

import torch

from . import _checks as C
from ._policy import FLOAT_DTYPES, FP8_E4M3_MAX, FP8_KV_DTYPES

# --------------------------------------------------------------------------------------------------
# fp8 scales
# --------------------------------------------------------------------------------------------------

#: Calibration maps a head's largest |value| to FP8_E4M3_MAX / FP8_HEADROOM (224): later tokens may
#: be up to twice as large before they saturate. e4m3's relative precision is the same across its
#: normal range, so the headroom costs nothing until values fall below 2**-6 * scale (amax / ~14000).
FP8_HEADROOM = 2.0


def fp8_scale(x: torch.Tensor, headroom: float = FP8_HEADROOM) -> torch.Tensor:
    """Per-head scales for an fp8 cache from sample values ``x`` (T, H, D): float32 (H,)
    ``amax(|x|) * headroom / 448`` per head (1 for a head of zeros, or for T = 0). Runs on x's
    device without a host sync (CUDA-graph and torch.compile friendly)."""
    if x.shape[0] == 0:
        return torch.ones(x.shape[1], dtype=torch.float32, device=x.device)
    amax = x.detach().abs().amax(dim=(0, 2)).to(torch.float32)
    return torch.where(amax > 0, amax * (headroom / FP8_E4M3_MAX), torch.ones_like(amax))


# --------------------------------------------------------------------------------------------------
# Block manager
# --------------------------------------------------------------------------------------------------


class CacheFullError(RuntimeError):
    """Not enough free blocks for a :meth:`PagedKVCache.reserve`; no sequence was changed."""


def _as_int(x, name: str, op: str) -> int:
    if isinstance(x, bool):
        raise TypeError(f"{op}: {name} must be an int, got {x!r}")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int, got {type(x).__name__} {x!r}") from None


def _as_int_list(xs, name: str, op: str) -> list[int]:
    if isinstance(xs, (str, bytes)) or not isinstance(xs, (Sequence, torch.Tensor)):
        raise TypeError(f"{op}: {name} must be a list of ints, got {type(xs).__name__}")
    if isinstance(xs, torch.Tensor):
        if xs.dim() != 1 or xs.is_floating_point() or xs.is_complex():
            raise TypeError(f"{op}: {name} must be a list (or 1-D integer tensor) of ints, got {xs!r}")
        return [int(x) for x in xs.tolist()]
    return [_as_int(x, f"{name}[{i}]", op) for i, x in enumerate(xs)]


class PagedKVCache:
    """Per-layer paged K/V caches and the block manager that hands their blocks to sequences.

    ``k_cache[layer]`` / ``v_cache[layer]`` are (num_blocks, block_size, num_kv_heads, head_dim) tensors.
    Sequences are named by int ids chosen by the caller. :meth:`reserve` grows sequences block by
    block and returns the slots their new tokens go to; :meth:`free` returns a sequence's blocks to
    the pool; :meth:`fork` shares a sequence's blocks with a new one by reference count.

    Copy-on-write, and the order it needs: a forked sequence shares its parent's blocks, including
    a partly filled last block. The first :meth:`reserve` that adds tokens to a sequence whose last
    block is shared and partly filled gives that sequence a private copy of the block's filled rows,
    and the copy is made *during that reserve()* (queued on the device then), from whatever the
    block holds at that moment. The manager cannot see :func:`paged_append`, so the rule is: **append
    the K/V of every slot a reserve() returned before the next reserve() of a sequence that shares
    the block** (a model step's reserve -> append -> attention, then fork, is always fine; fork may
    come before or after the append). Out of order, e.g. ``reserve(p) -> fork(p, c) -> reserve(p)
    -> append both``: p moves to the copy, which was taken before p's first tokens were written, so
    p reads those rows as the copied block held them (zeros in a fresh cache, a freed sequence's
    stale K/V otherwise), while c, still on the original block, reads them correctly. No single
    moment the manager controls could fix that order (the append of the first tokens and of the
    next ones may be the same call), so it is documented, not guessed at.

    fp8 (``dtype=torch.float8_e4m3fn``): half the bytes of a 16-bit cache per token. Each layer has
    float32 (Hkv,) scales, ``k_scale[layer]`` / ``v_scale[layer]`` (1 at first): the cache stores
    value / scale, saturated at +-448. Set them, or :meth:`calibrate_scales` from sample K/V (what
    :func:`gptkernels.generate` does with the prefill), before a layer's first append, and pass
    ``**cache.scales(layer)`` to the ops. Zeros mean the same in both: the fresh cache is zeros.

    Thread safety: every method takes one lock around the bookkeeping (free list, reference counts,
    tables), so threads may reserve/fork/free concurrently; each call is atomic (a reserve that
    raises :class:`CacheFullError` changed nothing, even with other threads running). The lock does
    not order device work: a thread's :func:`paged_append` into its slots must still come before its
    next reserve(), as above.

    Example::

        cache = PagedKVCache(num_layers=2, num_blocks=64, block_size=16, num_kv_heads=8, head_dim=64,
                             dtype=torch.float16, device="cuda")
        slots = cache.reserve([0, 1], [5, 3])          # prompts of 5 and 3 tokens
        for layer in range(2):
            paged_append(k, v, cache.k_cache[layer], cache.v_cache[layer], slots)   # k, v (8, 8, 64)
        out = paged_decode(q, cache.k_cache[0], cache.v_cache[0],
                           cache.block_table([0, 1]), cache.seq_lens([0, 1]))
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, *, dtype: torch.dtype = torch.float16, device=None):
        op = "PagedKVCache"
        for name, val in (("num_layers", num_layers), ("num_blocks", num_blocks),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("block_size", block_size)):
            if _as_int(val, name, op) < 1:
                raise ValueError(f"{op}: {name} must be >= 1, got {val}")
        C.check_block_size(op, "the cache (block_size)", block_size)
        C.check_head_dim(op, "head_dim", head_dim)
        if dtype not in FLOAT_DTYPES + FP8_KV_DTYPES:
            raise TypeError(f"{op}: dtype must be one of {FLOAT_DTYPES + FP8_KV_DTYPES}, got {dtype!r}")
        self.num_layers, self.num_blocks, self.block_size = int(num_layers), int(num_blocks), int(block_size)
        self.num_kv_heads, self.head_dim, self.dtype = int(num_kv_heads), int(head_dim), dtype
        self.device = torch.device(device) if device is not None else torch.get_default_device()
        shape = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        # Zeros, not empty: slots no sequence has written stay finite (the kernels mask them anyway).
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        # fp8: per-layer float32 (Hkv,) scales, 1 until set or calibrated (None for a float cache).
        # Updated in place, so a captured CUDA graph keeps reading the current values.
        self.k_scale = self.v_scale = None
        if self.fp8:
            self.k_scale = [torch.ones(self.num_kv_heads, device=self.device) for _ in range(num_layers)]
            self.v_scale = [torch.ones(self.num_kv_heads, device=self.device) for _ in range(num_layers)]
        # One lock around all host bookkeeping; reentrant because public methods call each other.
        self._lock = threading.RLock()
        self.reset()

    # ---- fp8 scales ----------------------------------------------------------------------------

    @property
    def fp8(self) -> bool:
        """Whether the caches are fp8 (their appends and reads take :attr:`k_scale`/:attr:`v_scale`)."""
        return self.dtype in FP8_KV_DTYPES

    def scales(self, layer: int) -> dict:
        """``{"k_scale": ..., "v_scale": ...}`` of ``layer`` for :func:`paged_append` /
        :func:`paged_decode` / paged :func:`flash_attn` (empty for a float cache)::

            paged_append(k, v, cache.k_cache[i], cache.v_cache[i], slots, **cache.scales(i))
        """
        if not self.fp8:
            return {}
        return {"k_scale": self.k_scale[layer], "v_scale": self.v_scale[layer]}

    def calibrate_scales(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                         headroom: float = FP8_HEADROOM) -> None:
        """Set ``layer``'s fp8 scales from sample K/V (T, Hkv, D), e.g. a prefill's, before they are
        appended (:func:`fp8_scale`: amax per head with ``headroom``). Calibrate a layer before it
        holds tokens: tokens already stored would be read back with the new scale."""
        op = "PagedKVCache.calibrate_scales"
        if not self.fp8:
            raise ValueError(f"{op}: the cache is {self.dtype}, not fp8: it has no scales")
        for name, x in (("k", k), ("v", v)):
            C.check_tensor(x, name, ndim=3, dtypes=FLOAT_DTYPES, op=op)
            C.check_dim(op, name, x, 1, self.num_kv_heads, "num_kv_heads of the cache")
        self.k_scale[layer].copy_(fp8_scale(k, headroom))
        self.v_scale[layer].copy_(fp8_scale(v, headroom))

    # ---- state -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every sequence: all blocks are free (the cache tensors keep their contents)."""
        with self._lock:
            # A stack: the most recently freed block is handed out first (it may still be in L2).
            self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))
            self._ref: list[int] = [0] * self.num_blocks  # sequences holding each block
            self._tables: dict[int, list[int]] = {}
            self._lens: dict[int, int] = {}

    @property
    def num_free_blocks(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def seq_ids(self) -> list[int]:
        with self._lock:
            return list(self._tables)

    def __contains__(self, seq_id) -> bool:
        with self._lock:
            return seq_id in self._tables

    def blocks(self, seq_id: int) -> list[int]:
        """The blocks of ``seq_id`` in order (a copy)."""
        with self._lock:
            return list(self._tables[self._known(seq_id, "blocks")])

    def ref_count(self, block: int) -> int:
        """How many sequences hold ``block`` (0: it is free)."""
        op = "PagedKVCache.ref_count"
        b = _as_int(block, "block", op)
        if not 0 <= b < self.num_blocks:  # -1 would silently read the last block's count
            raise ValueError(f"{op}: block must be in [0, num_blocks={self.num_blocks}), got {b}")
        with self._lock:
            return self._ref[b]

    def _known(self, seq_id, op: str) -> int:
        sid = _as_int(seq_id, "seq_id", f"PagedKVCache.{op}")
        if sid not in self._tables:
            raise ValueError(f"PagedKVCache.{op}: unknown seq_id {sid} (reserve() creates sequences)")
        return sid

    def seq_len(self, seq_id: int) -> int:
        """Tokens reserved for ``seq_id``."""
        with self._lock:
            return self._lens[self._known(seq_id, "seq_len")]

    # ---- growing -----------------------------------------------------------------------------

    def _entries(self, seq_ids, num_tokens, op: str) -> list[tuple[int, int]]:
        ids = _as_int_list(seq_ids, "seq_ids", op)
        counts = _as_int_list(num_tokens, "num_tokens", op)
        if len(ids) != len(counts):
            raise ValueError(f"{op}: seq_ids and num_tokens must have the same length, got {len(ids)} and {len(counts)}")
        for i, n in enumerate(counts):
            if n < 0:
                raise ValueError(f"{op}: num_tokens[{i}] must be >= 0, got {n}")
        return list(zip(ids, counts))

    def _blocks_needed(self, entries: list[tuple[int, int]]) -> int:
        """Free blocks that reserving ``entries`` in order takes (new blocks + copy-on-write copies)."""
        bs = self.block_size
        length: dict[int, int] = {}   # length of each sequence after the entries seen so far
        private: set[int] = set()     # sequences whose last block is already their own in this call
        ref_drop: dict[int, int] = {}  # refcount given up by the copies planned so far
        needed = 0
        for sid, n in entries:
            cur = length.get(sid, self._lens.get(sid, 0))
            if n > 0 and cur % bs and sid not in private:
                last = self._tables[sid][-1]
                if self._ref[last] - ref_drop.get(last, 0) > 1:  # shared and partly filled: copy it
                    needed += 1
                    ref_drop[last] = ref_drop.get(last, 0) + 1
            if n > 0:
                private.add(sid)
            needed += -(-(cur + n) // bs) - (-(-cur // bs))
            length[sid] = cur + n
        return needed

    def blocks_needed(self, seq_ids, num_tokens) -> int:
        """How many free blocks ``reserve(seq_ids, num_tokens)`` would take."""
        entries = self._entries(seq_ids, num_tokens, "PagedKVCache.blocks_needed")
        with self._lock:
            return self._blocks_needed(entries)

    def can_reserve(self, seq_ids, num_tokens) -> bool:
        """Whether ``reserve(seq_ids, num_tokens)`` would succeed now (another thread may take the
        blocks before a later reserve(): reserve() itself is all or nothing)."""
        with self._lock:
            return self.blocks_needed(seq_ids, num_tokens) <= len(self._free)

    def _take(self) -> int:
        block = self._free.pop()
        self._ref[block] = 1
        return block

    def _release(self, block: int) -> None:
        self._ref[block] -= 1
        if self._ref[block] == 0:
            self._free.append(block)

    def reserve(self, seq_ids, num_tokens) -> torch.Tensor:
        """Reserve ``num_tokens[i]`` new slots at the end of sequence ``seq_ids[i]`` (created if unknown).

        Returns the slot mapping: int64 (sum(num_tokens),) on the cache's device, the new tokens of
        each entry in order, ready for :func:`paged_append`. All or nothing: if the free blocks do not
        suffice it raises :class:`CacheFullError` and every sequence is exactly as before.
        """
        op = "PagedKVCache.reserve"
        entries = self._entries(seq_ids, num_tokens, op)
        bs = self.block_size
        slots: list[int] = []
        with self._lock:
            needed = self._blocks_needed(entries)
            if needed > len(self._free):
                raise CacheFullError(
                    f"{op}: {sum(n for _, n in entries)} tokens need {needed} free blocks, only "
                    f"{len(self._free)} of {self.num_blocks} are free (free() finished sequences)")
            for sid, n in entries:
                table = self._tables.setdefault(sid, [])
                cur = self._lens.setdefault(sid, 0)
                if n > 0 and cur % bs and self._ref[table[-1]] > 1:
                    self._copy_on_write(table, cur % bs)
                while len(table) * bs < cur + n:
                    table.append(self._take())
                slots.extend(table[p // bs] * bs + p % bs for p in range(cur, cur + n))
                self._lens[sid] = cur + n
        return self._to_device(slots, torch.int64)

    def _to_device(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        """A host list as a tensor on the cache's device. To a GPU through pinned memory and a
        non-blocking copy: the host does not wait for the GPU work queued before it (a decode loop
        can prepare step n+1 while step n runs)."""
        host = torch.tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host.to(self.device)

    def _copy_on_write(self, table: list[int], filled: int) -> None:
        """Give ``table`` a private copy of the ``filled`` rows of its shared last block (in every
        layer), as they are now (see the class docstring for the order this needs)."""
        old, new = table[-1], self._take()
        for cache in (*self.k_cache, *self.v_cache):
            cache[new, :filled].copy_(cache[old, :filled])
        self._release(old)
        table[-1] = new

    def fork(self, parent_id: int, child_id: int) -> None:
        """Create ``child_id`` sharing all of ``parent_id``'s tokens (its blocks, by reference count).

        Takes no free block now; the first append of either sequence into a shared, partly filled
        last block copies that block (copy-on-write), so reserve() may then need one more block.
        """
        op = "PagedKVCache.fork"
        child = _as_int(child_id, "child_id", op)
        with self._lock:
            parent = self._known(parent_id, "fork")
            if child in self._tables:
                raise ValueError(f"{op}: child_id {child} already exists (free() it first)")
            self._tables[child] = list(self._tables[parent])
            self._lens[child] = self._lens[parent]
            for block in self._tables[child]:
                self._ref[block] += 1

    def free(self, seq_id: int) -> None:
        """Forget ``seq_id``; blocks no other sequence holds return to the pool."""
        with self._lock:
            sid = self._known(seq_id, "free")
            for block in reversed(self._tables.pop(sid)):
                self._release(block)
            del self._lens[sid]

    # ---- tensors for the kernels -------------------------------------------------------------

    def block_table(self, seq_ids, max_blocks: int | None = None) -> torch.Tensor:
        """int32 (B, max_blocks) on the cache's device: row b lists the blocks of ``seq_ids[b]``.

        Pad entries are 0 (a valid block: never read, the kernels stop at the sequence length).
        ``max_blocks`` defaults to the longest row (at least 1); pass a fixed value for shapes that
        stay the same from step to step (CUDA graphs).
        """
        op = "PagedKVCache.block_table"
        ids = _as_int_list(seq_ids, "seq_ids", op)
        with self._lock:  # copies of the rows: other threads may grow the tables afterwards
            rows = [list(self._tables[self._known(s, "block_table")]) for s in ids]
        longest = max((len(r) for r in rows), default=0)
        if max_blocks is None:
            width = max(1, longest)
        else:
            width = _as_int(max_blocks, "max_blocks", op)
            if width < longest:
                raise ValueError(f"{op}: max_blocks={width} is less than the {longest} blocks of the longest sequence")
        data = [r + [0] * (width - len(r)) for r in rows]
        return self._to_device(data, torch.int32).reshape(len(rows), width)

    def seq_lens(self, seq_ids) -> torch.Tensor:
        """int32 (B,) on the cache's device: the reserved length of each sequence."""
        op = "PagedKVCache.seq_lens"
        ids = _as_int_list(seq_ids, "seq_ids", op)
        with self._lock:
            lens = [self._lens[self._known(s, "seq_lens")] for s in ids]
        return self._to_device(lens, torch.int32)

    def __repr__(self) -> str:
        with self._lock:
            return (f"PagedKVCache(num_layers={self.num_layers}, num_blocks={self.num_blocks}, "
                    f"block_size={self.block_size}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                    f"dtype={self.dtype}, device={self.device}, sequences={len(self._tables)}, "
                    f"free_blocks={len(self._free)})")
