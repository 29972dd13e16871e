"""Tensor parallelism over ``jax.sharding`` meshes, and multi-host start-up.

- ``sharding.mesh``: the ``(dp, tp)`` device mesh.
- ``sharding.rules``: logical axes of params and KV cache, rules to mesh axes, size
  checks, kv-head replication (``TensorParallelPlan``).
- ``sharding.attention``: attention and KV writes under ``shard_map`` on local heads.
- ``sharding.experts``: a mixture of experts' expert MLPs under ``shard_map`` on local columns.
- ``sharding.distributed``: ``jax.distributed`` start-up and leader -> follower broadcast.

Knows nothing of requests or scheduling.
"""

from sharding.attention import shard_attention_fns
from sharding.experts import check_expert_weights, shard_expert_fn
from sharding.mesh import DP_AXIS, TP_AXIS, make_mesh, replicated
from sharding.rules import (
    TensorParallelPlan,
    check_tensor_parallel_size,
    kv_cache_bytes_per_block_per_device,
    param_shardings_for,
)

__all__ = [
    "DP_AXIS", "TP_AXIS", "TensorParallelPlan", "check_tensor_parallel_size",
    "kv_cache_bytes_per_block_per_device", "make_mesh", "param_shardings_for", "replicated",
    "shard_attention_fns", "shard_expert_fn", "check_expert_weights",
]
