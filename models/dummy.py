"""Random ("dummy") weights for a model config: benchmarks and tests without a checkpoint.

Owns making a params pytree of ``param_shapes(config)`` filled with random values,
created directly on the device(s) by one jitted function whose ``out_shardings`` place
every tensor, so nothing is built on the host (an 8B model fits where its weights fit).
Knows nothing of checkpoints, the forward pass or requests.

Scale: matrices and biases are ``normal * 0.02`` (the usual Llama/Qwen initializer
range), norm weights are 1, so activations neither explode nor vanish over depth.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.llama import param_shapes

WEIGHT_STD = 0.02
_NORMS = ("input_norm", "post_norm", "q_norm", "k_norm", "attn_out_norm", "mlp_out_norm", "final_norm")


def _is_shape(x) -> bool:
    return isinstance(x, tuple)


def _random_params(seed: jax.Array, config: ModelConfig, dtype) -> dict:
    shapes = param_shapes(config)
    paths_and_shapes, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)
    key = jax.random.key(seed)
    leaves = []
    for i, (path, shape) in enumerate(paths_and_shapes):
        if path[-1].key in _NORMS:
            leaves.append(jnp.ones(shape, dtype))
        else:
            noise = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
            leaves.append((noise * WEIGHT_STD).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def load_dummy_params(config: ModelConfig, dtype, seed: int = 0, shardings: Optional[dict] = None) -> dict:
    """Random params for ``config`` in ``dtype``, deterministic in ``seed``.

    ``shardings``: optional pytree shaped like ``param_shapes(config)`` of
    ``jax.sharding.Sharding`` (None = default device for everything). The seed is a
    traced argument, so other seeds reuse the compiled function.
    """
    make = jax.jit(_random_params, static_argnums=(1, 2), out_shardings=shardings)
    return make(jnp.asarray(seed, jnp.uint32), config, jnp.dtype(dtype))
