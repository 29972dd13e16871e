"""The device-side inputs of one model step: the flat ragged batch and the paged KV cache.

Owns the pytree types that cross from the engine into jitted model code. Knows
nothing of requests or scheduling: only arrays, already padded to bucket sizes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

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
    lora_slots: jax.Array | None = None  # [T] int32, each row's LoRA slot (0: none; models.lora); None: no LoRA


@struct.dataclass
class KVCache:
    """Every layer's K and V pages, in one of two layouts (same page ids either way):

    - stacked: ``k``, ``v`` are ``[L, num_kv_heads, num_blocks, block_size, head_dim]``
      (the layer loop is a ``lax.scan``, which carries the whole cache);
    - per layer: ``k``, ``v`` are tuples of ``L`` arrays ``[num_kv_heads, num_blocks, block_size,
      head_dim]`` (the unrolled layer loop). Each layer's pages are then their own donated
      buffer, updated in place once per step; with one stacked buffer and an unrolled loop
      XLA's GPU compile kept whole-cache copies alive (out of memory at full size, see
      benchmarks/NOTES.md).
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, (tuple, list))

    @property
    def _first(self) -> jax.Array:
        return self.k[0] if self.per_layer else self.k

    @property
    def num_blocks(self) -> int:
        return self._first.shape[-3]

    @property
    def block_size(self) -> int:
        return self._first.shape[-2]

    @property
    def dtype(self):
        return self._first.dtype


def kv_cache_shape(config: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (config.num_layers, config.num_kv_heads, num_blocks, block_size, config.head_dim)


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype) -> int:
    """Bytes one block costs over all layers, K and V together."""
    return 2 * config.num_layers * config.num_kv_heads * block_size * config.head_dim * jnp.dtype(dtype).itemsize


def make_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype, sharding=None,
                  per_layer: bool = False) -> KVCache:
    """Zeroed pages, created on the device(s). ``sharding``: of the stacked 5-D cache (a
    ``NamedSharding``'s leading layer axis is dropped for per-layer arrays)."""
    shape = kv_cache_shape(config, num_blocks, block_size)
    if not per_layer:
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return KVCache(k=zeros(), v=zeros())
    if isinstance(sharding, NamedSharding):
        sharding = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    layers = config.num_layers
    zeros = jax.jit(lambda: tuple(jnp.zeros(shape[1:], dtype) for _ in range(layers)),
                    out_shardings=None if sharding is None else (sharding,) * layers)
    return KVCache(k=zeros(), v=zeros())
