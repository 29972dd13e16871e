"""Run a mixture of experts' expert MLPs per device, on each device's slice of the experts' width.

Owns wrapping ``models.moe.expert_mlp`` (tokens and routing in, routed outputs out) in ``shard_map`` over the
``tp`` mesh axis, Megatron's split of an MLP applied to every expert (``sharding.rules``): ``expert_gate`` /
``expert_up [E, H, I]`` split on ``I`` (column-parallel), ``expert_down [E, I, H]`` on ``I`` (row-parallel), a
quantized weight's fields (int8 / fp8 values and scales, int4 packed values, scales and zeros) as
``field_shardings`` splits them. The tokens, the routed rows' tokens and the block -> expert table are replicated;
each device runs the unmodified function (the Pallas grouped matmul on GPU) on its ``I / tp`` columns and its down
projection's partial sums are added over the mesh (one all-reduce of ``[R, H]``, as a dense MLP's). Left to GSPMD
instead, the jnp form would gather whole expert weights per block, and the kernel cannot be partitioned at all.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models.quantization import Int4Weight, field_shardings, is_quantized
from sharding.attention import REPLICATED, shard_map_compat
from sharding.mesh import TP_AXIS

COLUMNS = PartitionSpec(None, None, TP_AXIS)  # [E, H, I]: each device its I / tp columns
ROWS = PartitionSpec(None, TP_AXIS, None)  # [E, I, H]: each device its I / tp rows
BIAS_COLUMNS = PartitionSpec(None, TP_AXIS)  # [E, I]


def _spec(name: str, weight, mesh: Mesh):
    """The per-device split of one expert weight: ``[E, K, N]`` dense, or a quantized weight's fields each split
    the way its K and N axes are (``models.quantization.field_shardings``, as the loader places them); gpt-oss's
    gate and up biases ``[E, I]`` as their weights' columns."""
    if name.endswith("_bias"):
        return BIAS_COLUMNS
    split = ROWS if name == "expert_down" else COLUMNS
    if not is_quantized(weight):
        return split
    if isinstance(weight, Int4Weight) and name == "expert_down":
        if weight.perm is not None:  # a dense layer keeps such a weight whole; a device's experts need their rows
            raise ValueError("act-order (desc_act=True) int4 experts cannot be split over devices: their down "
                             "projection's rows are stored sorted by group; use tensor_parallel_size=1")
        k, tp = 2 * weight.packed.shape[-2], mesh.shape[TP_AXIS]
        if (k // tp) % weight.group_size:  # else its scales would stay whole beside its split values
            raise ValueError(f"{'mxfp4' if weight.codes == 'e2m1' else 'int4'} experts' down projection ({k} inputs, "
                             f"groups of {weight.group_size}) cannot be split over {tp} devices: each device's "
                             "inputs must be whole groups")
    return jax.tree.map(lambda sharding: sharding.spec, field_shardings(weight, NamedSharding(mesh, split)))


def check_expert_weights(layers: dict, mesh: Mesh) -> None:
    """Raise ``ValueError`` now (at start-up, not at the first step's trace) if an expert weight of ``layers`` cannot
    be split over ``mesh``."""
    for name, weight in layers.items():
        if name.startswith("expert_"):
            _spec(name, weight, mesh)


def shard_expert_fn(expert_fn: Callable, mesh: Mesh) -> Callable:
    """``expert_fn(h, row_token, block_expert, weights, **options)`` with the same signature, run per device on its
    slice of every expert (module docstring); the result replicated. ``options`` (``expert_mlp``'s ``gate``) are
    static."""

    def experts(h, row_token, block_expert, weights: dict, **options):
        if "expert_gate_up" in weights:
            raise ValueError("joined expert gate/up weights run on one device; a mesh keeps them apart")

        def local(h, row_token, block_expert, weights):
            return jax.lax.psum(expert_fn(h, row_token, block_expert, weights, **options), TP_AXIS)

        specs = (REPLICATED, REPLICATED, REPLICATED, {name: _spec(name, w, mesh) for name, w in weights.items()})
        return shard_map_compat(local, mesh, specs, REPLICATED)(h, row_token, block_expert, weights)

    return experts
