"""The block manager PagedKVCache as a unit: reserve/free/fork, tables, copy-on-write, CacheFullError,
and random operation sequences checked against a simple model of what must hold."""

import random

import pytest
import torch

import gptkernels
from gptkernels import CacheFullError, PagedKVCache
from tests.helpers import DEVICE


def _cache(num_blocks=8, block_size=8, num_layers=2, hkv=2, d=4, dtype=torch.float32):
    return PagedKVCache(num_layers, num_blocks, block_size, hkv, d, dtype=dtype, device=DEVICE)


def _state(cache):
    """Everything a reserve may not change when it fails."""
    return ({s: cache.blocks(s) for s in cache.seq_ids}, {s: cache.seq_len(s) for s in cache.seq_ids},
            cache.num_free_blocks, [cache.ref_count(b) for b in range(cache.num_blocks)])


def test_layout_and_exports():
    c = PagedKVCache(3, 10, 16, 4, 80, dtype=torch.float16, device=DEVICE)
    assert gptkernels.PagedKVCache is PagedKVCache and gptkernels.CacheFullError is CacheFullError
    assert len(c.k_cache) == len(c.v_cache) == 3
    for t in (*c.k_cache, *c.v_cache):
        assert t.shape == (10, 16, 4, 80) and t.dtype == torch.float16 and t.device.type == DEVICE
    assert len({t.data_ptr() for t in (*c.k_cache, *c.v_cache)}) == 6  # no shared storage
    assert (c.block_size, c.num_blocks, c.num_free_blocks) == (16, 10, 10)
    assert "PagedKVCache(" in repr(c)


def test_reserve_slots_tables_and_lens():
    c = _cache(num_blocks=8, block_size=8)
    slots = c.reserve([7, 3], [5, 17])
    assert slots.dtype == torch.int64 and slots.device.type == DEVICE and slots.shape == (22,)
    b7, b3 = c.blocks(7), c.blocks(3)
    assert len(b7) == 1 and len(b3) == 3 and not set(b7) & set(b3)
    want = [b7[0] * 8 + i for i in range(5)] + [b3[p // 8] * 8 + p % 8 for p in range(17)]
    assert slots.tolist() == want
    assert c.seq_len(7) == 5 and c.seq_len(3) == 17 and c.num_free_blocks == 4
    lens = c.seq_lens([3, 7])
    assert lens.dtype == torch.int32 and lens.tolist() == [17, 5]
    table = c.block_table([7, 3])
    assert table.dtype == torch.int32 and table.device.type == DEVICE and table.shape == (2, 3)
    assert table[0, 0] == b7[0] and table[1].tolist() == b3
    assert all(0 <= x < 8 for x in table.flatten().tolist())  # pad entries are valid blocks
    assert c.block_table([7, 3], max_blocks=6).shape == (2, 6)
    # grow in place: the next token goes right after the last one
    more = c.reserve([7, 7], [3, 1])  # the same sequence twice in one call: in order
    assert more.tolist() == [b7[0] * 8 + i for i in range(5, 9)][:3] + [c.blocks(7)[1] * 8]
    assert c.seq_len(7) == 9


def test_zero_tokens_and_empty_sequences():
    c = _cache()
    assert c.reserve([1], [0]).shape == (0,)
    assert 1 in c and c.seq_len(1) == 0 and c.blocks(1) == [] and c.num_free_blocks == 8
    assert c.block_table([1]).tolist() == [[0]] and c.seq_lens([1]).tolist() == [0]
    assert c.reserve([], []).shape == (0,)
    assert c.block_table([]).shape == (0, 1)


def test_cache_full_leaves_state_unchanged():
    c = _cache(num_blocks=4, block_size=8)
    c.reserve([0, 1], [10, 3])
    before = _state(c)
    with pytest.raises(CacheFullError, match="free blocks"):
        c.reserve([1, 2], [6, 20])  # 1 fits, 2 (a new sequence) would need 3 blocks: nothing happens
    assert _state(c) == before and 2 not in c
    assert not c.can_reserve([1, 2], [6, 20]) and c.blocks_needed([1, 2], [6, 20]) == 4
    assert c.can_reserve([1], [13])  # exactly the last block
    c.reserve([1], [13])
    assert c.num_free_blocks == 0 and c.seq_len(1) == 16
    with pytest.raises(CacheFullError):
        c.reserve([0], [7])


def test_free_returns_blocks_and_they_are_reused():
    c = _cache(num_blocks=4, block_size=8)
    c.reserve([0, 1], [16, 16])
    assert c.num_free_blocks == 0
    freed = set(c.blocks(0))
    c.free(0)
    assert 0 not in c and c.num_free_blocks == 2
    assert all(c.ref_count(b) == 0 for b in freed)
    c.reserve([5], [9])
    assert set(c.blocks(5)) == freed
    with pytest.raises(ValueError, match="seq_id"):
        c.free(0)
    c.reset()
    assert c.num_free_blocks == 4 and c.seq_ids == []


def test_fork_shares_and_copies_on_write():
    c = _cache(num_blocks=6, block_size=8, num_layers=2)
    slots = c.reserve([0], [12])
    for layer in range(2):  # distinct contents per layer and tensor
        c.k_cache[layer].view(-1, 2, 4)[slots] = torch.arange(12 * 8, dtype=torch.float32, device=DEVICE).view(12, 2, 4) + layer
        c.v_cache[layer].view(-1, 2, 4)[slots] = -torch.arange(12 * 8, dtype=torch.float32, device=DEVICE).view(12, 2, 4) - layer
    snapshot = [t.clone() for t in (*c.k_cache, *c.v_cache)]
    c.fork(0, 1)
    assert c.blocks(1) == c.blocks(0) and c.seq_len(1) == 12 and c.num_free_blocks == 4
    assert all(c.ref_count(b) == 2 for b in c.blocks(0))
    assert c.blocks_needed([1], [1]) == 1  # the shared, partly filled last block must be copied
    s1 = c.reserve([1], [1])
    p, ch = c.blocks(0), c.blocks(1)
    assert p[0] == ch[0] and p[1] != ch[1] and c.ref_count(p[1]) == 1 and c.ref_count(ch[1]) == 1
    assert s1.tolist() == [ch[1] * 8 + 4]
    for layer in range(2):  # the copy carries the first 4 tokens of every layer; the parent is untouched
        for new, old in ((c.k_cache[layer], snapshot[layer]), (c.v_cache[layer], snapshot[2 + layer])):
            torch.testing.assert_close(new[ch[1], :4], old[p[1], :4], rtol=0, atol=0)
            torch.testing.assert_close(new[p[1]], old[p[1]], rtol=0, atol=0)
    # the parent now owns its last block alone: no copy when it appends
    assert c.blocks_needed([0], [4]) == 0
    c.free(0)
    assert c.ref_count(p[0]) == 1 and c.ref_count(p[1]) == 0
    c.free(1)
    assert c.num_free_blocks == 6


def test_fork_at_block_boundary_needs_no_copy_and_both_copy_once():
    c = _cache(num_blocks=6, block_size=8)
    c.reserve([0], [16])
    c.fork(0, 1)
    assert c.blocks_needed([0, 1], [1, 1]) == 2  # a new block each, no copy
    c.reserve([0], [3])
    c.fork(0, 2)
    # 0 and 2 share a partly filled block: the first to append copies, then the other owns it alone
    assert c.blocks_needed([0, 2], [1, 1]) == 1
    assert c.blocks_needed([0, 2, 0], [1, 1, 6]) == 2
    before = c.num_free_blocks
    c.reserve([0, 2], [1, 1])
    assert c.num_free_blocks == before - 1


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(block_size=12), ValueError, "block_size"),
    (dict(block_size=3), ValueError, "block_size"),
    (dict(block_size=2048), ValueError, "block_size"),
    (dict(num_blocks=0), ValueError, "num_blocks"),
    (dict(num_layers=0), ValueError, "num_layers"),
    (dict(num_kv_heads=0), ValueError, "num_kv_heads"),
    (dict(head_dim=300), ValueError, "head_dim"),
    (dict(num_blocks=2.5), TypeError, "num_blocks"),
    (dict(dtype=torch.int32), TypeError, "dtype"),
])
def test_constructor_bad_input(kwargs, exc, match):
    args = dict(num_layers=1, num_blocks=4, block_size=8, num_kv_heads=2, head_dim=8)
    args.update(kwargs)
    dtype = args.pop("dtype", torch.float16)
    with pytest.raises(exc, match=match):
        PagedKVCache(**args, dtype=dtype, device=DEVICE)


def test_manager_bad_input():
    c = _cache()
    c.reserve([0], [3])
    with pytest.raises(ValueError, match="same length"):
        c.reserve([0, 1], [1])
    with pytest.raises(ValueError, match=r"num_tokens\[1\]"):
        c.reserve([0, 1], [1, -2])
    with pytest.raises(TypeError, match=r"seq_ids\[0\]"):
        c.reserve(["a"], [1])
    with pytest.raises(TypeError, match="num_tokens"):
        c.reserve([0], 3)
    with pytest.raises(ValueError, match="unknown seq_id 9"):
        c.seq_len(9)
    with pytest.raises(ValueError, match="unknown seq_id 9"):
        c.block_table([0, 9])
    with pytest.raises(ValueError, match="unknown seq_id 9"):
        c.seq_lens([9])
    with pytest.raises(ValueError, match="unknown seq_id 9"):
        c.fork(9, 10)
    with pytest.raises(ValueError, match="child_id 0"):
        c.fork(0, 0)
    c.reserve([0], [20])
    with pytest.raises(ValueError, match="max_blocks"):
        c.block_table([0], max_blocks=2)
    assert c.seq_len(0) == 23 and c.seq_ids == [0]  # the failed calls changed nothing


class _Model:
    """What must hold, kept independently of the manager: abstract blocks with their own ids."""

    def __init__(self, num_blocks, block_size):
        self.bs, self.free = block_size, num_blocks
        self.tables, self.tokens, self.ref, self.next_id = {}, {}, {}, 0

    def _new(self):
        self.next_id += 1
        self.ref[self.next_id] = 1
        self.free -= 1
        return self.next_id

    def _drop(self, blk):
        self.ref[blk] -= 1
        if self.ref[blk] == 0:
            del self.ref[blk]
            self.free += 1

    def reserve(self, ids, counts, values):
        """Returns False (and changes nothing) when the blocks do not suffice."""
        saved = ({s: list(t) for s, t in self.tables.items()}, {s: list(t) for s, t in self.tokens.items()},
                 dict(self.ref), self.free, self.next_id)
        it = iter(values)
        for sid, n in zip(ids, counts):
            table, toks = self.tables.setdefault(sid, []), self.tokens.setdefault(sid, [])
            if n and len(toks) % self.bs and self.ref[table[-1]] > 1:
                self._drop(table[-1])
                table[-1] = self._new()
            while len(table) * self.bs < len(toks) + n:
                table.append(self._new())
            toks.extend(next(it) for _ in range(n))
        if self.free < 0:
            self.tables, self.tokens, self.ref, self.free, self.next_id = saved
            return False
        return True

    def fork(self, parent, child):
        self.tables[child] = list(self.tables[parent])
        self.tokens[child] = list(self.tokens[parent])
        for b in self.tables[child]:
            self.ref[b] += 1

    def free_seq(self, sid):
        for b in self.tables.pop(sid):
            self._drop(b)
        del self.tokens[sid]


def _check_against_model(cache, model):
    assert sorted(cache.seq_ids) == sorted(model.tables)
    assert cache.num_free_blocks == model.free
    owners = {}
    for sid in cache.seq_ids:
        real, abstract = cache.blocks(sid), model.tables[sid]
        assert cache.seq_len(sid) == len(model.tokens[sid])
        assert len(real) == len(abstract) == -(-len(model.tokens[sid]) // cache.block_size)
        assert len(set(real)) == len(real)  # no block twice in one sequence
        for r, a in zip(real, abstract):
            assert owners.setdefault(r, a) == a  # a real block is shared exactly when the model shares
            assert cache.ref_count(r) == model.ref[a]
    assert len(owners) == len(model.ref)  # the sharing pattern is the same both ways
    used = set(owners)
    assert cache.num_free_blocks + len(used) == cache.num_blocks  # conservation
    assert all(cache.ref_count(b) == 0 for b in range(cache.num_blocks) if b not in used)
    # contents: every sequence reads back its own tokens through its block table
    kc = cache.k_cache[0].view(-1)  # head_dim 1, one KV head: one value per slot
    for sid in cache.seq_ids:
        n = cache.seq_len(sid)
        if n:
            table = cache.block_table([sid])[0].long()
            pos = torch.arange(n, device=kc.device)
            got = kc[table[pos // cache.block_size] * cache.block_size + pos % cache.block_size]
            assert got.tolist() == [float(x) for x in model.tokens[sid]]


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_against_model(seed):
    rng = random.Random(seed)
    bs = rng.choice([8, 16])
    num_blocks = rng.choice([6, 13, 24])
    cache = PagedKVCache(1, num_blocks, bs, 1, 1, dtype=torch.float32, device=DEVICE)
    model = _Model(num_blocks, bs)
    next_value, next_sid = 1, 0
    full_seen = False
    for _ in range(120):
        live = cache.seq_ids
        op = rng.random()
        if op < 0.55 or not live:
            k = rng.randint(1, 3)
            ids = [rng.choice(live) if live and rng.random() < 0.7 else next_sid + i for i in range(k)]
            next_sid += k
            counts = [rng.choice([0, 1, 1, 2, 5, bs - 1, bs, 2 * bs + 3]) for _ in ids]
            values = list(range(next_value, next_value + sum(counts)))
            before = _state(cache)
            ok = model.reserve(ids, counts, values)
            if ok:
                slots = cache.reserve(ids, counts)
                next_value += len(values)
                # the caller's append: write each token's value to its slot
                cache.k_cache[0].view(-1)[slots] = torch.tensor(values, dtype=torch.float32, device=DEVICE)
            else:
                full_seen = True
                with pytest.raises(CacheFullError):
                    cache.reserve(ids, counts)
                assert _state(cache) == before
        elif op < 0.75:
            sid = rng.choice(live)
            model.fork(sid, next_sid)
            cache.fork(sid, next_sid)
            next_sid += 1
        else:
            sid = rng.choice(live)
            model.free_seq(sid)
            cache.free(sid)
        _check_against_model(cache, model)
    assert full_seen or num_blocks > 6  # the small caches do run full


# --------------------------------------------------------------------------------------------------
# Copy-on-write order, bad block ids, messages, several threads
# --------------------------------------------------------------------------------------------------


def _write(cache, slots, values):
    """The caller's append (one layer, one KV head, head_dim 1: one value per slot)."""
    cache.k_cache[0].view(-1)[slots] = torch.tensor(values, dtype=torch.float32, device=DEVICE)


def _read(cache, sid):
    table = cache.blocks(sid)
    bs = cache.block_size
    return [float(cache.k_cache[0].view(-1)[table[p // bs] * bs + p % bs]) for p in range(cache.seq_len(sid))]


@pytest.mark.parametrize("fork_before_append", [False, True])
def test_copy_on_write_documented_order(fork_before_append):
    """The documented order (append a reserve()'s slots before a later reserve() of a sequence
    sharing their block; fork before or after that append) gives every sequence its own tokens."""
    cache = PagedKVCache(1, 6, 8, 1, 1, dtype=torch.float32, device=DEVICE)
    prompt = cache.reserve([0], [5])
    if fork_before_append:
        cache.fork(0, 1)
    _write(cache, prompt, [1, 2, 3, 4, 5])
    if not fork_before_append:
        cache.fork(0, 1)
    step = cache.reserve([0, 1], [1, 1])       # 0 copies the shared block, then 1 owns it alone
    _write(cache, step, [10, 20])
    assert cache.blocks(0) != cache.blocks(1)
    assert _read(cache, 0) == [1, 2, 3, 4, 5, 10] and _read(cache, 1) == [1, 2, 3, 4, 5, 20]


def test_copy_on_write_out_of_order_is_as_documented():
    """reserve(p) -> fork(p, c) -> reserve(p) -> append: the copy is made during the second
    reserve(), before p's first tokens are written, so p reads those rows as the block held them
    then (zeros here) while c, on the original block, reads them. This pins the documented
    behaviour (README, PagedKVCache docstring); it is the reason for the documented order."""
    cache = PagedKVCache(1, 6, 8, 1, 1, dtype=torch.float32, device=DEVICE)
    prompt = cache.reserve([0], [5])
    cache.fork(0, 1)
    step = cache.reserve([0], [1])
    _write(cache, prompt, [1, 2, 3, 4, 5])
    _write(cache, step, [10])
    assert _read(cache, 1) == [1, 2, 3, 4, 5]
    assert _read(cache, 0) == [0, 0, 0, 0, 0, 10]


def test_copy_on_write_copies_only_the_filled_rows():
    """The copy carries the shared prefix's rows only: rows past it are the new owner's to write."""
    cache = PagedKVCache(1, 4, 8, 1, 1, dtype=torch.float32, device=DEVICE)
    for b in range(4):  # what earlier sequences left in each block
        cache.k_cache[0][b] = -10.0 * (b + 1)
    _write(cache, cache.reserve([0], [3]), [1, 2, 3])
    cache.fork(0, 1)
    _write(cache, cache.reserve([1], [1]), [4])
    new = cache.blocks(1)[0]
    assert new != cache.blocks(0)[0]
    assert cache.k_cache[0][new].view(-1).tolist() == [1, 2, 3, 4] + [-10.0 * (new + 1)] * 4


def test_ref_count_and_block_size_messages():
    c = _cache(num_blocks=8)
    for bad in (-1, 8, 100):
        with pytest.raises(ValueError, match=r"ref_count: block must be in \[0, num_blocks=8\)"):
            c.ref_count(bad)
    with pytest.raises(TypeError, match="ref_count: block"):
        c.ref_count(1.5)
    assert c.ref_count(torch.tensor(7)) == 0
    with pytest.raises(ValueError) as info:
        PagedKVCache(1, 4, 12, 2, 8, dtype=torch.float16, device=DEVICE)
    assert str(info.value) == ("PagedKVCache: the block size of the cache (block_size) must be a "
                               "power of two from 1 to 1024, got 12")


def _check_invariants(cache):
    """What must hold between any two calls: every block is free xor held, its count is the number
    of tables holding it, no table holds a block twice, lengths fit the tables."""
    held = {}
    for sid in cache.seq_ids:
        table = cache.blocks(sid)
        assert len(set(table)) == len(table)
        assert len(table) == -(-cache.seq_len(sid) // cache.block_size)
        for b in table:
            held[b] = held.get(b, 0) + 1
    free = cache._free
    assert len(set(free)) == len(free) and not set(free) & set(held)
    assert len(free) + len(held) == cache.num_blocks
    assert all(cache.ref_count(b) == held.get(b, 0) for b in range(cache.num_blocks))


@pytest.mark.parametrize("trial", range(3))
def test_threads_reserve_fork_free(trial):
    """Several threads share one cache, each growing, forking and freeing its own sequences (with
    the documented reserve -> append order), while another checks the invariants under the lock.
    Before the lock: IndexError (pop from empty list) and sequences holding blocks they did not
    own. Each thread's sequences must read back exactly their own tokens."""
    import sys
    import threading

    cache = PagedKVCache(1, 16, 8, 1, 1, dtype=torch.float32, device=DEVICE)
    errors, done = [], threading.Event()

    def worker(tid):
        rng = random.Random(1000 * trial + tid)
        tokens = {}               # this thread's sequences -> the values written for them
        next_sid, value = tid * 100_000, tid * 1_000_000
        try:
            for _ in range(500):
                live = list(tokens)
                op = rng.random()
                if op < 0.55 or not live:
                    sid = rng.choice(live) if live and rng.random() < 0.7 else next_sid
                    next_sid += sid == next_sid
                    n = rng.choice([1, 2, 7, 9])
                    try:
                        slots = cache.reserve([sid], [n])
                    except CacheFullError:
                        continue
                    vals = list(range(value, value + n))
                    value += n
                    _write(cache, slots, vals)
                    tokens.setdefault(sid, []).extend(vals)
                elif op < 0.75:
                    sid = rng.choice(live)
                    cache.fork(sid, next_sid)
                    tokens[next_sid] = list(tokens[sid])
                    next_sid += 1
                else:
                    sid = rng.choice(live)
                    cache.free(sid)
                    del tokens[sid]
                for sid, vals in tokens.items():
                    assert cache.seq_len(sid) == len(vals)
            for sid, vals in tokens.items():
                assert _read(cache, sid) == [float(v) for v in vals], f"thread {tid}, sequence {sid}"
        except BaseException as e:  # reported by the main thread
            errors.append((tid, e))

    def checker():
        while not done.is_set():
            with cache._lock:
                try:
                    _check_invariants(cache)
                except BaseException as e:
                    errors.append(("checker", e))
                    return

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: races show up in one run
    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
        check = threading.Thread(target=checker)
        for t in (*threads, check):
            t.start()
        for t in threads:
            t.join()
        done.set()
        check.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors
    _check_invariants(cache)
