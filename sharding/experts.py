"""Run a mixture of experts' expert MLPs per device, on each device's slice of the experts' width.

Owns wrapping ``models.moe.expert_mlp`` (routed rows in, their outputs out) in ``shard_map`` over the ``tp`` mesh
axis, Megatron's split of an MLP applied to every expert (``sharding.rules``): ``expert_gate`` / ``expert_up [E, H,
I]`` split on ``I`` (column-parallel), ``expert_down [E, I, H]`` on ``I`` (row-parallel), an int8 weight's scales
with the axis they scale. The routed rows and the block -> expert table are replicated; each device runs the
unmodified function (the Pallas grouped matmul on GPU) on its ``I / tp`` columns and its down projection's partial
sums are added over the mesh (one all-reduce of ``[R, H]``, as a dense MLP's). Left to GSPMD instead, the jnp form
would gather whole expert weights per block, and the kernel cannot be partitioned at all.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import Mesh, PartitionSpec

from models.quantization import Int8Weight
from sharding.attention import REPLICATED, shard_map_compat
from sharding.mesh import TP_AXIS

COLUMNS = PartitionSpec(None, None, TP_AXIS)  # [E, H, I]: each device its I / tp columns
ROWS = PartitionSpec(None, TP_AXIS, None)  # [E, I, H]: each device its I / tp rows


def _spec(name: str, weight):
    """The per-device split of one expert weight (``[E, K, N]`` dense, or ``Int8Weight``'s fields)."""
    if name == "expert_down":
        return weight.replace(q=ROWS, scale=REPLICATED) if isinstance(weight, Int8Weight) else ROWS
    return weight.replace(q=COLUMNS, scale=PartitionSpec(None, TP_AXIS)) if isinstance(weight, Int8Weight) else COLUMNS


def shard_expert_fn(expert_fn: Callable, mesh: Mesh) -> Callable:
    """``expert_fn(x, block_expert, weights)`` with the same signature, run per device on its slice of every expert
    (module docstring); the result replicated."""

    def local(x, block_expert, weights):
        return jax.lax.psum(expert_fn(x, block_expert, weights), TP_AXIS)

    def experts(x, block_expert, weights: dict):
        if "expert_gate_up" in weights:
            raise ValueError("joined expert gate/up weights run on one device; a mesh keeps them apart")
        specs = (REPLICATED, REPLICATED, {name: _spec(name, w) for name, w in weights.items()})
        return shard_map_compat(local, mesh, specs, REPLICATED)(x, block_expert, weights)

    return experts
