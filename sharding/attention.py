"""Run the attention and KV-write functions per device, on each device's own heads.

Owns wrapping an ``(attention_fn, write_kv_fn)`` pair (the reference or a Pallas
kernel, signatures of ``pallas_kernels.ragged_paged_attention``) in ``shard_map``
over the ``tp`` mesh axis: the ``qkv`` buffer ``[T, Hq + 2*Hkv, D]``, the attention output
``[T, Hq, D]`` and the cache ``[L, Hkv, P, bs, D]`` are split evenly on their head axis,
the step's metadata (lengths, block tables, slots) is replicated. Each device then runs
the unmodified function on ``Hq/tp`` query heads and their ``Hkv/tp`` kv heads (one
replicated kv head when ``tp > Hkv``, see ``sharding.rules``): no communication, and a
kernel that is correct for one device is correct for the mesh.

An even split of the head axis gives each device its own ``[q | k | v]`` heads only if the
buffer is laid out in ``tp`` blocks, block ``d`` holding device ``d``'s query, key and value
heads in that order (``models.llama.join_qkv_heads`` with ``shards=tp``; for one block that
is the plain ``[q | k | v]`` order of the contract). Knows nothing of models or of how
weights are sharded.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from sharding.mesh import TP_AXIS

HEADS = PartitionSpec(None, TP_AXIS, None)  # qkv (in tp blocks), attention output: [T, H, D]
CACHE = PartitionSpec(None, TP_AXIS)  # [L, Hkv, P, bs, D]
REPLICATED = PartitionSpec()
QUERY_HEADS = PartitionSpec(TP_AXIS)  # one number a query head: [Hq]


def shard_map_compat(fn: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
    """``jax.shard_map`` (JAX >= 0.7), else ``jax.experimental.shard_map.shard_map``.

    Replication checking is off: Pallas calls carry no rule for it, and every output
    here is split on heads (nothing is claimed replicated).
    """
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map  # pragma: no cover - older JAX

    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def shard_attention_fns(attention_fn: Callable, write_kv_fn: Callable, mesh: Mesh) -> tuple[Callable, Callable]:
    """``(attention_fn, write_kv_fn)`` with the same signatures, run per device on local heads; their
    ``qkv`` must come in ``tp`` blocks of ``[q | k | v]`` heads (module docstring)."""

    def attention(qkv, k_cache, v_cache, layer, kv_lens, block_tables, cu_q_lens, num_seqs, sinks=None, **static):
        args = (qkv, k_cache, v_cache, jnp.asarray(layer, jnp.int32), kv_lens, block_tables, cu_q_lens, num_seqs)
        specs = (HEADS, CACHE, CACHE) + (REPLICATED,) * 5
        if sinks is None:
            return shard_map_compat(functools.partial(attention_fn, **static), mesh, specs, HEADS)(*args)

        def with_sinks(*args):  # gpt-oss's sink logits [Hq], split as the query heads are
            return attention_fn(*args[:-1], sinks=args[-1], **static)

        return shard_map_compat(with_sinks, mesh, specs + (QUERY_HEADS,), HEADS)(*args, sinks)

    def write_kv(k_cache, v_cache, layer, qkv, slot_mapping):
        specs = (CACHE, CACHE, REPLICATED, HEADS, REPLICATED)
        return shard_map_compat(write_kv_fn, mesh, specs, (CACHE, CACHE))(
            k_cache, v_cache, jnp.asarray(layer, jnp.int32), qkv, slot_mapping)

    return attention, write_kv
