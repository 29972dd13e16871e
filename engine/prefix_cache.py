"""Automatic prefix caching: which full KV blocks hold which token prefixes (vLLM's automatic prefix caching).

A full block's key is the SHA-256 digest of its parent block's key and its own token ids, so equal keys mean
equal whole prefixes, not just equal blocks. The digest is cryptographic because a forged collision would hand
one request another's K/V; vLLM moved to SHA-256 for that reason.

``PrefixCache`` maps keys to physical blocks. When a cached block's last sequence ends, the block stays cached
but evictable. Evictable blocks count as free: the pool hands out never-cached free blocks first, then evicts
the block freed longest ago.

Knows nothing of requests or scheduling. The ``BlockManager`` consults it when blocks are freed and taken, and
the scheduler keys each request's tokens (``extend_block_keys``).
"""

from __future__ import annotations

import functools
import hashlib
from array import array
from collections import OrderedDict
from typing import Callable

ROOT_KEY = b""  # the parent key of a sequence's first block


def block_key(parent: bytes, token_ids: list[int]) -> bytes:
    """The key of a full block holding ``token_ids`` after the prefix whose last block's key is ``parent``."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


@functools.lru_cache(maxsize=None)
def root_key(lora_id: int = 0) -> bytes:
    """The parent key of a sequence's first block: K/V computed under a LoRA adapter (``lora_id`` >= 1) are that
    adapter's, so its sequences' keys start from a root of their own (kept: the scheduler asks every step)."""
    return ROOT_KEY if not lora_id else hashlib.sha256(b"lora:" + lora_id.to_bytes(8, "little")).digest()


def extend_block_keys(keys: list[bytes], token_ids: Callable[[int, int], list[int]], num_tokens: int,
                      block_size: int, root: bytes = ROOT_KEY) -> None:
    """Append the keys of the full blocks among the first ``num_tokens`` tokens that ``keys`` lacks (the first
    block's parent: ``root``).

    ``token_ids(start, stop)`` returns tokens ``start .. stop-1``. Stops at a block holding a token that is not
    known yet (a negative id: a sampled token still on the device), to go on once it is.
    """
    for index in range(len(keys), num_tokens // block_size):
        tokens = token_ids(index * block_size, (index + 1) * block_size)
        if min(tokens) < 0:
            return
        keys.append(block_key(keys[-1] if keys else root, tokens))


class PrefixCache:
    """Key -> block for full blocks whose K/V are written (or being written by a step already dispatched), and
    the evictable ones among them: cached blocks no sequence holds, least recently freed first."""

    def __init__(self):
        self._block_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._block_of)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def is_cached(self, block: int) -> bool:
        return block in self._key_of

    def is_evictable(self, block: int) -> bool:
        return block in self._evictable

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The blocks of the longest run of ``keys`` from the first that are all cached."""
        blocks = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def insert(self, key: bytes, block: int) -> None:
        """Cache ``block`` (held by a sequence, full) under ``key``; no change if the key is cached already (another
        sequence computed the same prefix: its block stays the one found) or the block is (a shared block)."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def park(self, block: int) -> None:
        """A cached block's last holder let it go: evictable, after every block parked before it."""
        self._evictable[block] = None

    def unpark(self, block: int) -> None:
        """An evictable block is held again (a new sequence's cached prefix)."""
        del self._evictable[block]

    def evict(self) -> int:
        """Forget the block parked longest ago and return it, to be reused; the caller checks ``num_evictable``."""
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        return block

    def clear(self) -> list[int]:
        """Forget every key; returns the blocks that were evictable (free now)."""
        freed = list(self._evictable)
        self._block_of.clear()
        self._key_of.clear()
        self._evictable.clear()
        return freed

    def check_invariants(self, refcount: list[int]) -> None:
        if {b: k for k, b in self._block_of.items()} != self._key_of:
            raise AssertionError("the prefix cache's key -> block and block -> key maps disagree")
        for block in self._evictable:
            if block not in self._key_of or refcount[block] != 0:
                raise AssertionError(f"evictable block {block} is uncached or held (refcount {refcount[block]})")
        for block in self._key_of:
            if refcount[block] == 0 and block not in self._evictable:
                raise AssertionError(f"cached block {block} is held by nobody but not evictable")
