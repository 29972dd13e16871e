"""PagedAttention memory management: which KV-cache blocks each sequence owns.

Owns the free list, per-block reference counts and per-sequence block tables
(logical block i of a sequence -> physical block id), and turns a token position
into a physical slot ``block * block_size + offset``. Blocks are shared by
reference count (``fork`` for parallel sampling) and copied on write. Block 0 is
reserved as the write sink for padding tokens and is never handed out.

With prefix caching (``enable_prefix_caching``), full blocks are kept under their
content keys (``engine.prefix_cache``) after their sequences end, counted as free,
and a new sequence can start on the cached blocks of its prefix
(``allocate_with_prefix``).

Knows nothing of requests, scheduling policy or devices: sequences are opaque
ids, and copy-on-write is returned as ``(src, dst)`` block pairs for the caller
to apply to the device pages before the step that writes them.

Hand-written: it is a few dozen lines of bookkeeping on Python lists, with no
library that matches these semantics (vLLM's own block pool is not a dependency).
"""

from __future__ import annotations

import numpy as np

from engine.prefix_cache import PrefixCache

RESERVED_BLOCK = 0  # padding tokens write here; never in a block table


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block {RESERVED_BLOCK} is reserved), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: the most recently freed block is handed out next; initially 1, 2, 3, ...
        self._free: list[int] = list(range(num_blocks - 1, RESERVED_BLOCK, -1))
        self._refcount: list[int] = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        self._num_tokens: dict[str, int] = {}  # tokens each table covers (written or about to be)
        # Read-only int32 copies of the tables for the runner's step input, rebuilt only when a
        # table changes (a decode step appends a block once every block_size tokens).
        self._table_arrays: dict[str, np.ndarray] = {}
        self.prefix_cache = PrefixCache() if enable_prefix_caching else None
        self._num_keyed: dict[str, int] = {}  # leading blocks of each sequence offered to the prefix cache

    # -- queries ---------------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out: never-cached free ones and evictable cached ones."""
        return len(self._free) + (self.prefix_cache.num_evictable if self.prefix_cache is not None else 0)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.num_free_blocks

    @property
    def num_sequences(self) -> int:
        return len(self._tables)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def block_table(self, seq_id: str) -> list[int]:
        return list(self._table(seq_id))

    def block_table_array(self, seq_id: str) -> np.ndarray:
        """The block table as a read-only int32 array, valid until the table next changes."""
        array = self._table_arrays.get(seq_id)
        if array is None:
            array = np.array(self._table(seq_id), np.int32)
            array.flags.writeable = False
            self._table_arrays[seq_id] = array
        return array

    def num_blocks_held(self, seq_id: str) -> int:
        """Blocks in the sequence's table (0 for one that holds none), without copying it."""
        return len(self._tables.get(seq_id, ()))

    def num_blocks_to_start(self, prefix_blocks: list[int], num_tokens_total: int) -> int:
        """Free blocks that starting a sequence of ``num_tokens_total`` tokens on cached ``prefix_blocks`` takes: its
        new blocks, and the prefix's cached blocks no sequence holds (counted free until held)."""
        return (_cdiv(num_tokens_total, self.block_size) - len(prefix_blocks)
                + sum(self._refcount[b] == 0 for b in prefix_blocks))

    def num_tokens(self, seq_id: str) -> int:
        """Tokens the sequence's blocks cover (the last ``allocate_slots`` total)."""
        self._table(seq_id)
        return self._num_tokens[seq_id]

    def refcount(self, block: int) -> int:
        return self._refcount[block]

    def slots(self, seq_id: str, start: int, stop: int) -> list[int]:
        """Physical KV slots of positions ``start .. stop-1`` of a sequence."""
        table, bs = self._table(seq_id), self.block_size
        if not 0 <= start <= stop <= self._num_tokens[seq_id]:
            raise IndexError(f"positions [{start}, {stop}) of sequence {seq_id!r} are outside "
                             f"its {self._num_tokens[seq_id]} allocated tokens")
        return [table[p // bs] * bs + p % bs for p in range(start, stop)]

    def slot(self, seq_id: str, position: int) -> int:
        return self.slots(seq_id, position, position + 1)[0]

    def num_blocks_needed(self, seq_id: str, num_tokens_total: int) -> int:
        """Free blocks ``allocate_slots(seq_id, num_tokens_total)`` would take (copy-on-write included)."""
        table = self._tables.get(seq_id, [])
        return max(0, _cdiv(num_tokens_total, self.block_size) - len(table)) + int(
            self._needs_copy_on_write(seq_id, num_tokens_total))

    # -- stats -----------------------------------------------------------------------------

    def sequence_waste(self, seq_id: str) -> int:
        """Allocated but unwritten slots of a sequence (all in its last block)."""
        return len(self._table(seq_id)) * self.block_size - self._num_tokens[seq_id]

    @property
    def num_allocated_slots(self) -> int:
        return self.num_used_blocks * self.block_size

    @property
    def num_used_slots(self) -> int:
        """Slots of used blocks that hold (or are about to hold) a token; a shared slot counts once."""
        filled: dict[int, int] = {}
        for seq_id, table in self._tables.items():
            n = self._num_tokens[seq_id]
            for i, block in enumerate(table):
                filled[block] = max(filled.get(block, 0), min(self.block_size, n - i * self.block_size))
        return sum(filled.values())

    @property
    def num_wasted_slots(self) -> int:
        """Internal fragmentation: allocated slots no sequence has written."""
        return self.num_allocated_slots - self.num_used_slots

    # -- mutations -------------------------------------------------------------------------

    def allocate_slots(self, seq_id: str, num_tokens_total: int) -> list[tuple[int, int]] | None:
        """Grow ``seq_id``'s table (created if new) to cover ``num_tokens_total`` tokens.

        Returns the ``(src, dst)`` block copies the caller must apply before writing
        (copy-on-write of a shared, partly filled last block), or ``None`` -- with
        nothing changed -- when there are not enough free blocks.
        """
        current = self._num_tokens.get(seq_id, 0)
        table = self._tables.get(seq_id)
        if (table is not None and current < num_tokens_total <= len(table) * self.block_size
                and self._refcount[table[-1]] == 1 and not self._is_cached(table[-1])):
            # Growing inside its own last block (most decode steps): nothing to take or copy.
            self._num_tokens[seq_id] = num_tokens_total
            return []
        if num_tokens_total < current:
            raise ValueError(f"sequence {seq_id!r} covers {current} tokens; cannot shrink to {num_tokens_total}")
        num_owned = 0 if table is None else len(table)
        # Computed once each (this runs for every running sequence every step).
        copy_on_write = self._needs_copy_on_write(seq_id, num_tokens_total)
        num_new = max(0, _cdiv(num_tokens_total, self.block_size) - num_owned)
        if not self.can_allocate(num_new + int(copy_on_write)):
            return None
        if table is None:
            table = self._tables[seq_id] = []
        copies = []
        if copy_on_write:
            src = table[-1]
            self._release(src)
            table[-1] = self._take_free_block()
            copies.append((src, table[-1]))
        for _ in range(num_new):
            table.append(self._take_free_block())
        if copy_on_write or num_new:
            self._table_arrays.pop(seq_id, None)
        self._num_tokens[seq_id] = num_tokens_total
        return copies

    def shrink(self, seq_id: str, num_tokens_total: int) -> None:
        """Cover only the first ``num_tokens_total`` tokens: the blocks past them go back (speculative decoding
        grows a sequence by its drafts and keeps those the model accepted). Only blocks never offered to the
        prefix cache may go, i.e. blocks of tokens past those ``cache_blocks`` saw."""
        table, current = self._table(seq_id), self._num_tokens[seq_id]
        if not 0 < num_tokens_total <= current:
            raise ValueError(f"sequence {seq_id!r} covers {current} tokens; cannot shrink to {num_tokens_total}")
        keep = _cdiv(num_tokens_total, self.block_size)
        if keep < self._num_keyed.get(seq_id, 0):
            raise ValueError(f"sequence {seq_id!r}: its first {self._num_keyed[seq_id]} blocks are in the prefix "
                             f"cache; cannot shrink to {num_tokens_total} tokens")
        if keep < len(table):
            for block in reversed(table[keep:]):
                self._release(block)
            del table[keep:]
            self._table_arrays.pop(seq_id, None)
        self._num_tokens[seq_id] = num_tokens_total

    def fork(self, parent_id: str, child_id: str, num_tokens: int | None = None) -> None:
        """Make ``child_id`` share the blocks holding ``parent_id``'s first ``num_tokens`` tokens (default: all).

        Reference counts go up; a later write into a shared block copies it first.
        """
        table = self._table(parent_id)
        parent_tokens = self._num_tokens[parent_id]
        num_tokens = parent_tokens if num_tokens is None else num_tokens
        if not 0 <= num_tokens <= parent_tokens:
            raise ValueError(f"cannot fork {num_tokens} tokens of sequence {parent_id!r}, which covers {parent_tokens}")
        if child_id in self._tables:
            raise ValueError(f"sequence {child_id!r} already has blocks")
        shared = table[: _cdiv(num_tokens, self.block_size)]
        for block in shared:
            self._refcount[block] += 1
        self._tables[child_id] = list(shared)
        self._num_tokens[child_id] = num_tokens
        if self.prefix_cache is not None:
            self._num_keyed[child_id] = min(self._num_keyed.get(parent_id, 0), num_tokens // self.block_size)

    def free(self, seq_id: str) -> None:
        """Drop a sequence; blocks nobody else references go back to the free list at once (a cached one stays
        cached, evictable; its last blocks first, as they are the least likely to be shared)."""
        table = self._table(seq_id)
        for block in reversed(table):
            self._release(block)
        del self._tables[seq_id], self._num_tokens[seq_id]
        self._table_arrays.pop(seq_id, None)
        self._num_keyed.pop(seq_id, None)

    # -- prefix caching --------------------------------------------------------------------

    def cached_prefix(self, keys: list[bytes], num_tokens: int) -> list[int]:
        """The cached blocks of the longest prefix of a sequence of ``num_tokens`` tokens whose full blocks have
        ``keys``; at most ``(num_tokens - 1) // block_size`` blocks, so at least its last token is computed (its
        step samples from it). Empty without prefix caching."""
        if self.prefix_cache is None:
            return []
        return self.prefix_cache.lookup(keys[: (num_tokens - 1) // self.block_size])

    def allocate_with_prefix(self, seq_id: str, prefix_blocks: list[int],
                             num_tokens_total: int) -> list[tuple[int, int]] | None:
        """Start ``seq_id`` on cached ``prefix_blocks`` (from ``cached_prefix``) and grow it to ``num_tokens_total``
        tokens, as ``allocate_slots``; ``None``, with nothing changed, when the free blocks do not cover it (a
        cached block no sequence holds counts as free, so holding it takes one)."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        num_cached = len(prefix_blocks) * self.block_size
        if not num_cached < num_tokens_total:
            raise ValueError(f"sequence {seq_id!r}: {num_tokens_total} tokens, of which {num_cached} cached; "
                             "at least one must be computed")
        if self.num_blocks_to_start(prefix_blocks, num_tokens_total) > self.num_free_blocks:
            return None
        for block in prefix_blocks:
            if self._refcount[block] == 0:
                self.prefix_cache.unpark(block)
            self._refcount[block] += 1
        self._tables[seq_id] = list(prefix_blocks)
        self._num_tokens[seq_id] = num_cached
        self._num_keyed[seq_id] = len(prefix_blocks)
        return self.allocate_slots(seq_id, num_tokens_total)

    def cache_blocks(self, seq_id: str, keys: list[bytes]) -> None:
        """Offer the sequence's full blocks to the prefix cache under ``keys`` (its tokens' block keys, as far as
        they are known). Call once the step writing them is dispatched: a later step reads them."""
        if self.prefix_cache is None:
            return
        done = self._num_keyed.get(seq_id, 0)
        full = min(len(keys), self._num_tokens[seq_id] // self.block_size)
        if full > done:
            table = self._tables[seq_id]
            for index in range(done, full):
                self.prefix_cache.insert(keys[index], table[index])
            self._num_keyed[seq_id] = full

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (blocks in use stay with their sequences); returns the blocks it freed."""
        if self.prefix_cache is None:
            return 0
        freed = self.prefix_cache.clear()
        self._free.extend(freed)
        return len(freed)

    # -- checks ----------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` naming the first broken invariant of the pool."""

        def require(ok: bool, message: str) -> None:
            if not ok:
                raise AssertionError(message)

        usable = range(RESERVED_BLOCK + 1, self.num_blocks)
        owners = [0] * self.num_blocks
        for seq_id, table in self._tables.items():
            require(len(set(table)) == len(table), f"sequence {seq_id!r} lists a block twice: {table}")
            require(all(b in usable for b in table), f"sequence {seq_id!r} holds a block outside {usable}: {table}")
            n = self._num_tokens[seq_id]
            require(len(table) == _cdiv(n, self.block_size),
                    f"sequence {seq_id!r} covers {n} tokens with {len(table)} blocks of {self.block_size}")
            for block in table:
                owners[block] += 1
            cached = self._table_arrays.get(seq_id)
            require(cached is None or cached.tolist() == table,
                    f"sequence {seq_id!r}: its cached table array {cached} is stale (table {table})")
        require(self._table_arrays.keys() <= self._tables.keys(), "a freed sequence has a cached table array")
        free = set(self._free)
        require(len(free) == len(self._free), "the free list has duplicates")
        require(all(b in usable for b in free), f"the free list holds a block outside {usable}")
        require(self._refcount[RESERVED_BLOCK] == 0, f"reserved block {RESERVED_BLOCK} has a reference")
        cache = self.prefix_cache
        if cache is not None:
            cache.check_invariants(self._refcount)
            require(not any(cache.is_cached(b) for b in free), "a block on the free list is still cached")
            free |= {b for b in usable if cache.is_evictable(b)}
        for block in usable:
            require(owners[block] == self._refcount[block],
                    f"block {block}: refcount {self._refcount[block]} but {owners[block]} owners")
            require((block in free) == (owners[block] == 0),
                    f"block {block} is {'free' if block in free else 'not free'} with {owners[block]} owners")
        require(self.num_free_blocks + self.num_used_blocks == self.num_usable_blocks, "blocks lost")
        require(self._num_keyed.keys() <= self._tables.keys(), "a freed sequence has a count of keyed blocks")

    # -- internals -------------------------------------------------------------------------

    def _table(self, seq_id: str) -> list[int]:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def _needs_copy_on_write(self, seq_id: str, num_tokens_total: int) -> bool:
        """Whether growing would write into a partly filled last block that others share, or that the prefix cache
        holds full (a fork of part of a cached block: its owner may have gone, but the cache promises its
        tokens)."""
        current = self._num_tokens.get(seq_id, 0)
        if num_tokens_total <= current or current % self.block_size == 0:
            return False
        last = self._tables[seq_id][-1]
        return self._refcount[last] > 1 or self._is_cached(last)

    def _is_cached(self, block: int) -> bool:
        return self.prefix_cache is not None and self.prefix_cache.is_cached(block)

    def _release(self, block: int) -> None:
        """One reference fewer; a block nobody references goes back: parked in the cache (evictable) if cached,
        else to the free list."""
        self._refcount[block] -= 1
        if self._refcount[block] == 0:
            if self._is_cached(block):
                self.prefix_cache.park(block)
            else:
                self._free.append(block)

    def _take_free_block(self) -> int:
        """A never-cached free block if there is one, else the cached block freed longest ago, evicted."""
        block = self._free.pop() if self._free else self.prefix_cache.evict()
        self._refcount[block] = 1
        return block
