"""Run a mixture of experts' expert MLPs per device, on each device's slice of the experts' width.

Owns wrapping ``models.moe.expert_mlp`` (routed rows in, their outputs out) in ``shard_map`` over the ``tp`` mesh
axis, Megatron's split of an MLP applied to every expert (``sharding.rules``): ``expert_gate`` / ``expert_up [E, H,
I]`` split on ``I`` (column-parallel), ``expert_down [E, I, H]`` on ``I`` (row-parallel), an int8 weight's scales
with the axis they scale (an fp8 weight's K-major ``q [E, N, K]`` on the same logical axes), an int4 weight's packed
values, scales and zeros like the weight. The routed rows and the
block -> expert table are replicated; each device runs the unmodified function (the Pallas grouped matmul on GPU)
on its ``I / tp`` columns and its down projection's partial sums are added over the mesh (one all-reduce of
``[R, H]``, as a dense MLP's). Left to GSPMD instead, the jnp form
would gather whole expert weights per block, and the kernel cannot be partitioned at all.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import Mesh, PartitionSpec

from models.quantization import Fp8Weight, Int4Weight, Int8Weight
from sharding.attention import REPLICATED, shard_map_compat
from sharding.mesh import TP_AXIS

COLUMNS = PartitionSpec(None, None, TP_AXIS)  # [E, H, I]: each device its I / tp columns
ROWS = PartitionSpec(None, TP_AXIS, None)  # [E, I, H]: each device its I / tp rows


def _spec(name: str, weight, tp: int):
    """The per-device split of one expert weight (``[E, K, N]`` dense, or an ``Int8Weight``'s / ``Fp8Weight``'s /
    ``Int4Weight``'s fields: int4 ``packed [E, K/2, N]`` and its ``scales`` / ``zeros [E, K/g, N]`` split like the
    weight)."""
    split = ROWS if name == "expert_down" else COLUMNS
    if isinstance(weight, Fp8Weight):  # q [E, N, K]: the other axis
        return weight.replace(q=COLUMNS if name == "expert_down" else ROWS,
                              scale=REPLICATED if name == "expert_down" else PartitionSpec(None, TP_AXIS))
    if isinstance(weight, Int8Weight):
        return weight.replace(q=split, scale=REPLICATED if name == "expert_down" else PartitionSpec(None, TP_AXIS))
    if isinstance(weight, Int4Weight):
        k = 2 * weight.packed.shape[-2]
        if name == "expert_down" and (k // tp) % weight.group_size:
            raise ValueError(f"int4 experts' down projection ({k} inputs, groups of {weight.group_size}) cannot be "
                             f"split over {tp} devices: each device's inputs must be whole groups")
        if name == "expert_down" and weight.perm is not None and tp > 1:
            raise ValueError("act-order GPTQ experts (desc_act=True) cannot split their down projection's inputs "
                             "over devices; use tensor_parallel_size=1")
        return weight.replace(packed=split, scales=split, zeros=split,
                              perm=None if weight.perm is None else REPLICATED)
    return split


def shard_expert_fn(expert_fn: Callable, mesh: Mesh) -> Callable:
    """``expert_fn(x, block_expert, weights)`` with the same signature, run per device on its slice of every expert
    (module docstring); the result replicated."""

    def local(x, block_expert, weights):
        return jax.lax.psum(expert_fn(x, block_expert, weights), TP_AXIS)

    def experts(x, block_expert, weights: dict):
        if "expert_gate_up" in weights:
            raise ValueError("joined expert gate/up weights run on one device; a mesh keeps them apart")
        specs = (REPLICATED, REPLICATED, {name: _spec(name, w, mesh.shape[TP_AXIS]) for name, w in weights.items()})
        return shard_map_compat(local, mesh, specs, REPLICATED)(x, block_expert, weights)

    return experts
