"""The device-side inputs of one model step: the flat ragged batch and the paged KV cache.

Owns the pytree types that cross from the engine into jitted model code. Knows
nothing of requests or scheduling: only arrays, already padded to bucket sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from models.config import ModelConfig


@struct.dataclass
class ModelInput:
    """A flat batch of new tokens from ``S`` sequences (``T`` tokens, padded).

    Padding tokens have ``slot_mapping`` pointing into page 0 (the write sink);
    padding sequences repeat the last ``cu_q_lens`` value and have ``kv_lens`` 0.
    """

    token_ids: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32, absolute position of each token
    slot_mapping: jax.Array  # [T] int32, page * block_size + offset
    cu_q_lens: jax.Array  # [S+1] int32
    kv_lens: jax.Array  # [S] int32, cached tokens after this step's writes
    block_tables: jax.Array  # [S, B] int32
    num_seqs: jax.Array  # [1] int32
    logits_indices: jax.Array  # [S] int32, row of each sequence's last token


@struct.dataclass
class KVCache:
    """Every layer's K and V pages: ``[L, num_kv_heads, num_blocks, block_size, head_dim]``."""

    k: jax.Array
    v: jax.Array

    @property
    def num_blocks(self) -> int:
        return self.k.shape[2]

    @property
    def block_size(self) -> int:
        return self.k.shape[3]


def kv_cache_shape(config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (config.num_layers, config.num_kv_heads, num_blocks, block_size, config.head_dim)


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype) -> int:
    """Bytes one block costs over all layers, K and V together."""
    return 2 * config.num_layers * config.num_kv_heads * block_size * config.head_dim * jnp.dtype(dtype).itemsize


def make_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype, sharding=None) -> KVCache:
    shape = kv_cache_shape(config, num_blocks, block_size)
    zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return KVCache(k=zeros(), v=zeros())
