"""BlockManager: on-demand allocation, reserved block 0, sharing by reference count, copy-on-write."""

import os
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.block_manager import RESERVED_BLOCK, BlockManager
from engine.prefix_cache import extend_block_keys


class PagedStore:
    """Stand-in for the device KV pages: slot -> value, with the runner's copy semantics.

    ``copy_blocks`` gathers every source page first and then scatters, as
    ``cache.at[dst].set(cache[src])`` does on device.
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.values: dict[int, object] = {}

    def copy_blocks(self, copies):
        bs = self.block_size
        pages = [[self.values.get(src * bs + i) for i in range(bs)] for src, _ in copies]
        for (_, dst), page in zip(copies, pages):
            for i, value in enumerate(page):
                self.values[dst * bs + i] = value

    def write(self, slots, values):
        for slot, value in zip(slots, values, strict=True):
            self.values[slot] = value

    def read(self, manager: BlockManager, seq_id: str, num_tokens: int) -> list:
        return [self.values.get(s) for s in manager.slots(seq_id, 0, num_tokens)]


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return random.Random(seed)


def random_tokens(rng, n):
    return [rng.randrange(1, 50_000) for _ in range(n)]


def test_block_zero_is_never_handed_out_and_exhaustion_changes_nothing(rng):
    bs = rng.choice([1, 2, 4, 16])
    num_blocks = rng.randrange(3, 12)
    bm = BlockManager(num_blocks, bs)
    tokens = (num_blocks - 1) * bs
    assert bm.allocate_slots("a", tokens) == []
    assert sorted(bm.block_table("a")) == list(range(1, num_blocks))
    assert RESERVED_BLOCK not in bm.block_table("a")
    assert bm.num_free_blocks == 0 and bm.num_used_blocks == num_blocks - 1
    assert bm.allocate_slots("a", tokens + 1) is None
    assert bm.allocate_slots("b", 1) is None
    assert "b" not in bm and bm.num_tokens("a") == tokens
    bm.check_invariants()


def test_allocation_grows_on_demand_without_moving_blocks(rng):
    bs = rng.choice([2, 4, 16])
    bm = BlockManager(64, bs)
    seen = []
    n = 0
    while n < 10 * bs:
        n += rng.randrange(1, 2 * bs)
        assert bm.allocate_slots("s", n) == []
        table = bm.block_table("s")
        assert table[: len(seen)] == seen, "existing blocks must stay where they are"
        assert len(table) == -(-n // bs)
        assert 0 <= bm.sequence_waste("s") < bs
        seen = table
        bm.check_invariants()


def test_freed_blocks_are_reused_at_once(rng):
    bs = rng.choice([1, 4, 16])
    bm = BlockManager(8, bs)
    bm.allocate_slots("a", 3 * bs)
    bm.allocate_slots("b", 2 * bs)
    freed = set(bm.block_table("a"))
    bm.free("a")
    assert bm.num_free_blocks == 5 and "a" not in bm
    bm.allocate_slots("c", 3 * bs)
    assert set(bm.block_table("c")) == freed
    bm.check_invariants()


def test_slot_maps_a_position_through_the_block_table(rng):
    bs = rng.choice([2, 4, 16])
    bm = BlockManager(32, bs)
    bm.allocate_slots("x", rng.randrange(1, 3 * bs))  # so "s" does not start at block 1
    n = rng.randrange(2 * bs, 6 * bs)
    bm.allocate_slots("s", n)
    table = bm.block_table("s")
    for pos in rng.sample(range(n), min(n, 10)):
        assert bm.slot("s", pos) == table[pos // bs] * bs + pos % bs
    start = rng.randrange(n)
    assert bm.slots("s", start, n) == [bm.slot("s", p) for p in range(start, n)]
    with pytest.raises(IndexError, match=f"outside its {n} allocated tokens"):
        bm.slot("s", n)


def test_fork_shares_blocks_and_copy_on_write_keeps_each_sequence_content(rng):
    bs = 4
    bm = BlockManager(16, bs)
    store = PagedStore(bs)
    prompt = random_tokens(rng, 10)  # 2.5 blocks: the last one is partly filled
    bm.allocate_slots("p", 10)
    store.write(bm.slots("p", 0, 10), prompt)
    bm.fork("p", "c")
    assert bm.block_table("c") == bm.block_table("p")
    assert all(bm.refcount(b) == 2 for b in bm.block_table("p"))
    assert bm.num_used_blocks == 3
    bm.check_invariants()

    shared_last = bm.block_table("p")[-1]
    copies = bm.allocate_slots("c", 11)
    assert copies == [(shared_last, bm.block_table("c")[-1])]
    assert bm.block_table("c")[:2] == bm.block_table("p")[:2]
    assert bm.refcount(shared_last) == 1
    store.copy_blocks(copies)
    child_token, parent_token = random_tokens(rng, 2)
    store.write(bm.slots("c", 10, 11), [child_token])
    assert bm.allocate_slots("p", 11) == [], "the parent now owns its last block alone: no copy"
    store.write(bm.slots("p", 10, 11), [parent_token])
    assert store.read(bm, "p", 11) == prompt + [parent_token]
    assert store.read(bm, "c", 11) == prompt + [child_token]
    bm.check_invariants()

    bm.free("p")
    assert bm.num_used_blocks == 3 and all(bm.refcount(b) == 1 for b in bm.block_table("c"))
    bm.free("c")
    assert bm.num_free_blocks == bm.num_usable_blocks
    bm.check_invariants()


def test_fork_at_a_block_boundary_needs_no_copy(rng):
    bs = rng.choice([2, 4, 16])
    bm = BlockManager(16, bs)
    bm.allocate_slots("p", 2 * bs)
    bm.fork("p", "c")
    assert bm.num_blocks_needed("c", 2 * bs + 1) == 1
    assert bm.allocate_slots("c", 2 * bs + 1) == []
    assert bm.block_table("c")[:2] == bm.block_table("p")
    bm.check_invariants()


@pytest.mark.parametrize("offset", [1, 2])  # the child's first own token starts a block / lands in a shared one
def test_fork_of_a_prefix_shares_only_the_blocks_holding_it(rng, offset):
    bs = 4
    bm = BlockManager(16, bs)
    store = PagedStore(bs)
    tokens = random_tokens(rng, 2 * bs + offset)
    bm.allocate_slots("p", len(tokens))
    store.write(bm.slots("p", 0, len(tokens)), tokens)
    prefix = len(tokens) - 1
    bm.fork("p", "c", prefix)
    assert bm.num_tokens("c") == prefix and bm.block_table("c") == bm.block_table("p")[: -(-prefix // bs)]
    copies = bm.allocate_slots("c", len(tokens))
    assert len(copies) == (1 if prefix % bs else 0)
    store.copy_blocks(copies)
    own = random_tokens(rng, 1)
    store.write(bm.slots("c", prefix, len(tokens)), own)
    assert store.read(bm, "c", len(tokens)) == tokens[:-1] + own
    assert store.read(bm, "p", len(tokens)) == tokens
    bm.check_invariants()


def test_copy_on_write_is_refused_whole_when_no_block_is_free():
    bm = BlockManager(2, 4)  # a single usable block
    bm.allocate_slots("p", 2)
    bm.fork("p", "c")
    assert bm.num_blocks_needed("c", 3) == 1
    assert bm.allocate_slots("c", 3) is None
    assert bm.block_table("c") == bm.block_table("p") and bm.num_tokens("c") == 2
    bm.check_invariants()


def test_slot_statistics_count_shared_slots_once(rng):
    bs = 8
    bm = BlockManager(16, bs)
    a = rng.randrange(bs + 1, 3 * bs)
    bm.allocate_slots("a", a)
    bm.fork("a", "b")
    assert bm.num_allocated_slots == bm.num_used_blocks * bs
    assert bm.num_used_slots == a
    assert bm.num_wasted_slots == bm.num_allocated_slots - a == bm.sequence_waste("a")
    bm.allocate_slots("b", a + 1)  # copy-on-write when a's last block is partly filled
    assert bm.num_used_slots == (a + a % bs + 1 if a % bs else a + 1)
    assert all(bm.sequence_waste(s) < bs for s in ("a", "b"))


def test_bad_input_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="num_blocks must be >= 2"):
        BlockManager(1, 16)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        BlockManager(8, 0)
    bm = BlockManager(8, 4)
    bm.allocate_slots("a", 9)
    with pytest.raises(ValueError, match="covers 9 tokens; cannot shrink to 5"):
        bm.allocate_slots("a", 5)
    with pytest.raises(KeyError, match="unknown sequence 'nope'"):
        bm.free("nope")
    with pytest.raises(KeyError, match="unknown sequence 'nope'"):
        bm.fork("nope", "b")
    bm.allocate_slots("b", 1)
    with pytest.raises(ValueError, match="sequence 'b' already has blocks"):
        bm.fork("a", "b")
    with pytest.raises(ValueError, match="cannot fork 10 tokens of sequence 'a', which covers 9"):
        bm.fork("a", "c", 10)


def test_check_invariants_names_the_broken_invariant():
    bm = BlockManager(8, 4)
    bm.allocate_slots("a", 9)
    bm._refcount[bm.block_table("a")[0]] += 1
    with pytest.raises(AssertionError, match="refcount 2 but 1 owners"):
        bm.check_invariants()

    bm = BlockManager(8, 4)
    bm.allocate_slots("a", 2)
    bm._tables["a"].append(RESERVED_BLOCK)
    with pytest.raises(AssertionError, match="outside"):
        bm.check_invariants()

    bm = BlockManager(8, 4)
    bm.allocate_slots("a", 2)
    bm._free.append(bm.block_table("a")[0])
    with pytest.raises(AssertionError, match="free"):
        bm.check_invariants()


class BlockManagerMachine(RuleBasedStateMachine):
    """Random grow/fork/free sequences, and with prefix caching sequences started on the cached blocks of earlier
    sequences' tokens; every sequence must read back exactly the tokens it wrote (or found cached)."""

    @initialize(block_size=st.sampled_from([1, 2, 4]), num_blocks=st.integers(2, 12), caching=st.booleans())
    def setup(self, block_size, num_blocks, caching):
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.store = PagedStore(block_size)
        self.tokens: dict[str, list[int]] = {}  # what each sequence has written, in order
        self.history: list[list[int]] = [[1]]  # every sequence's tokens as last grown, freed ones too
        self.next_id = 0

    def _keys(self, tokens):
        keys = []
        extend_block_keys(keys, lambda start, stop: tokens[start:stop], len(tokens), self.bm.block_size)
        return keys

    def _new_id(self):
        self.next_id += 1
        return f"s{self.next_id}"

    @rule(data=st.data(), new_tokens=st.lists(st.integers(1, 50_000), min_size=1, max_size=9))
    def grow(self, data, new_tokens):
        seq = data.draw(st.sampled_from(sorted(self.tokens) + [None]))
        seq = seq or self._new_id()
        old = self.tokens.get(seq, [])
        total = len(old) + len(new_tokens)
        free_before, needed = self.bm.num_free_blocks, self.bm.num_blocks_needed(seq, total)
        # A cached block only this sequence holds, partly: copied before the write, the original goes back to the
        # cache as evictable (a free block again).
        last = self.bm.block_table(seq)[-1] if seq in self.bm and len(old) % self.bm.block_size else None
        frees_cached = (last is not None and self.bm.refcount(last) == 1 and self.bm.prefix_cache is not None
                        and self.bm.prefix_cache.is_cached(last))
        copies = self.bm.allocate_slots(seq, total)
        if copies is None:
            assert needed > free_before and self.bm.num_free_blocks == free_before
            assert (seq in self.bm) == (seq in self.tokens)
            return
        assert self.bm.num_free_blocks == free_before - needed + int(frees_cached)
        self.store.copy_blocks(copies)
        slots = self.bm.slots(seq, len(old), total)
        assert all(self.bm.refcount(s // self.bm.block_size) == 1 for s in slots), "write into a shared block"
        self.store.write(slots, new_tokens)
        self.tokens[seq] = old + new_tokens
        self.history.append(self.tokens[seq])
        self.bm.cache_blocks(seq, self._keys(self.tokens[seq]))

    @precondition(lambda self: self.bm.prefix_cache is not None)
    @rule(data=st.data(), new_tokens=st.lists(st.integers(1, 50_000), min_size=1, max_size=5))
    def start_on_cached_prefix(self, data, new_tokens):
        earlier = data.draw(st.sampled_from(self.history))
        tokens = earlier[: data.draw(st.integers(0, len(earlier)))] + new_tokens
        prefix = self.bm.cached_prefix(self._keys(tokens), len(tokens))
        cached = len(prefix) * self.bm.block_size
        assert cached < len(tokens)
        seq, free_before = self._new_id(), self.bm.num_free_blocks
        copies = self.bm.allocate_with_prefix(seq, prefix, len(tokens))
        if copies is None:
            assert seq not in self.bm and self.bm.num_free_blocks == free_before
            return
        assert copies == [] and self.bm.block_table(seq)[: len(prefix)] == prefix
        assert self.store.read(self.bm, seq, cached) == tokens[:cached], "a cached block holds other tokens"
        slots = self.bm.slots(seq, cached, len(tokens))
        assert all(self.bm.refcount(s // self.bm.block_size) == 1 for s in slots), "write into a shared block"
        self.store.write(slots, tokens[cached:])
        self.tokens[seq] = tokens
        self.history.append(tokens)
        self.bm.cache_blocks(seq, self._keys(tokens))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        prefix = data.draw(st.integers(0, len(self.tokens[parent])))
        child = self._new_id()
        used = self.bm.num_used_blocks
        self.bm.fork(parent, child, prefix)
        assert self.bm.num_used_blocks == used
        self.tokens[child] = self.tokens[parent][:prefix]

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.free(seq)
        del self.tokens[seq]

    @invariant()
    def pool_is_consistent_and_content_is_intact(self):
        self.bm.check_invariants()
        assert self.bm.num_free_blocks + self.bm.num_used_blocks == self.bm.num_usable_blocks
        if not self.tokens:
            assert self.bm.num_free_blocks == self.bm.num_usable_blocks, "blocks leaked"
        for seq, tokens in self.tokens.items():
            assert RESERVED_BLOCK not in self.bm.block_table(seq)
            assert 0 <= self.bm.sequence_waste(seq) < self.bm.block_size
            assert self.store.read(self.bm, seq, len(tokens)) == tokens
        assert 0 <= self.bm.num_wasted_slots < self.bm.block_size * max(1, len(self.tokens))


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])


def test_block_table_array_follows_every_change_of_the_table(rng):
    """The cached int32 table (the runner's step input) is rebuilt whenever the table changes:
    growth into a new block, copy-on-write of a shared last block, fork, free."""
    bm = BlockManager(64, 4)
    live: list[str] = []
    for step in range(300):
        op = rng.random()
        if op < 0.15 or not live:
            seq_id = f"s{step}"
            if bm.allocate_slots(seq_id, rng.randrange(1, 9)) is not None:
                live.append(seq_id)
        elif op < 0.3:
            parent = rng.choice(live)
            child = f"{parent}/{step}"
            bm.fork(parent, child, rng.randrange(1, bm.num_tokens(parent) + 1))
            live.append(child)
        elif op < 0.4:
            bm.free(live.pop(rng.randrange(len(live))))
        else:
            seq_id = rng.choice(live)
            bm.allocate_slots(seq_id, bm.num_tokens(seq_id) + rng.randrange(0, 3))  # None when full: unchanged
        for seq_id in rng.sample(live, min(3, len(live))):
            array = bm.block_table_array(seq_id)
            assert array.dtype == np.int32 and not array.flags.writeable
            assert array.tolist() == bm.block_table(seq_id)
        bm.check_invariants()  # also: no cached array is stale or outlives its sequence


def test_growing_into_part_of_a_cached_block_copies_it_first():
    """The case hypothesis found (CI, 2026-12-05): a fork takes 3 of a sequence's 4 tokens, so it shares the cached
    full block [1, 2] as its partly filled last one; its owner goes, and the fork writes its 4th token. Written in
    place, the cached block would hold [1, 1] under the key of [1, 2] (its refcount is 1: only the cache's promise
    is at stake): it must be copied first, and stay cached."""
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    store, tokens = PagedStore(2), [1, 1, 1, 2]
    assert bm.allocate_slots("a", 4) == []
    store.write(bm.slots("a", 0, 4), tokens)
    keys = []
    extend_block_keys(keys, lambda start, stop: tokens[start:stop], 4, 2)
    bm.cache_blocks("a", keys)
    bm.fork("a", "b", 3)
    bm.free("a")
    cached_block = bm.block_table("b")[1]
    assert bm.refcount(cached_block) == 1 and bm.num_blocks_needed("b", 4) == 1
    copies = bm.allocate_slots("b", 4)
    assert copies == [(cached_block, bm.block_table("b")[1])] and bm.block_table("b")[1] != cached_block
    store.copy_blocks(copies)
    store.write(bm.slots("b", 3, 4), [1])
    assert bm.cached_prefix(keys, 5) == [bm.block_table("b")[0], cached_block]
    assert [store.values[cached_block * 2 + i] for i in range(2)] == [1, 2]
    assert store.read(bm, "b", 4) == [1, 1, 1, 1]
    bm.check_invariants()
