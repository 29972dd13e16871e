"""Partition rules: which axis of every parameter and of the KV cache is split over ``tp``.

Owns the logical axis names of the arrays of ``models.llama`` (keyed by their path in
the params pytree, so the model code names no mesh axes), the rules that map logical
names to mesh axes (flax's logical partitioning, ``logical_to_mesh_axes``), the checks
on a tensor-parallel size, and the replication of kv heads. Knows nothing of file
formats, requests or the engine.

The scheme (Megatron-style, as in vLLM), ``[in, out]`` weights, ``tp`` devices:

- ``embed [V, H]``: vocab-parallel (V over ``tp``); ``lm_head [H, V]``: vocab-parallel,
  so logits come out vocab-sharded. An int8 head (``models.quantization.quantize_lm_head``;
  a tied model has one too) is split the same way, its scales with its vocab rows. A
  vocabulary that ``tp`` does not divide is replicated instead (with a warning): JAX
  shardings must divide evenly.
- ``wq``/``wk``/``wv [L, H, heads*D]`` and ``bq``/``bk``/``bv``: column-parallel, the
  output (head) axis over ``tp``: each device computes its own heads' q/k/v.
- ``wo [L, Hq*D, H]``: row-parallel, the input (head) axis over ``tp``: each device
  multiplies its heads' attention output by its rows, a partial sum that GSPMD
  all-reduces. ``w_gate``/``w_up [L, H, I]`` column-, ``w_down [L, I, H]`` row-parallel:
  one all-reduce per MLP. So a layer costs two all-reduces of ``[T, H]``.
- A mixture of experts' ``expert_gate``/``expert_up [L, E, H, I]`` column-, ``expert_down [L, E, I, H]``
  row-parallel on ``I``, as a dense MLP (every device holds a slice of every expert, vLLM's default without
  expert parallelism; they run per device under ``sharding.experts``); the ``router [L, H, E]`` replicated.
- norms, ``q_norm``/``k_norm`` (per head, within a head): replicated.
- KV cache ``[L, Hkv, P, bs, D]``: the kv-head axis over ``tp``; each device's pages
  hold exactly the heads its query heads read, so attention needs no communication.

KV-head replication (``tp > num_kv_heads``): with ``r = tp // Hkv`` the model runs as if
it had ``Hkv * r = tp`` kv heads, kv head ``j`` of the checkpoint repeated as heads
``j*r .. j*r + r-1`` (in ``wk``/``wv``/``bk``/``bv`` and so in the cache). Device ``d``
holds query heads ``d*Hq/tp .. (d+1)*Hq/tp - 1``, whose checkpoint kv head is
``d*Hkv/tp = d // r``: exactly the copy it holds. The GQA group on each device is
``Hq/tp``; the model code is unchanged (it sees ``num_kv_heads = tp``, see
``TensorParallelPlan.config``). Cost: the kv weights and cache are stored ``r`` times
over the mesh, one head per device (the least a device can hold). Valid sizes:
``Hq % tp == 0`` and (``Hkv % tp == 0`` or ``tp % Hkv == 0``), and ``I % tp == 0``.
Loading: the checkpoint's kv weights are read replicated (they are small: ``Hkv*D``
columns), then one jitted repeat writes the expanded tensors in their sharded layout.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax.linen import logical_to_mesh_axes
from jax.sharding import Mesh, NamedSharding

from models.batch import kv_cache_bytes_per_block
from models.config import ModelConfig
from models.llama import param_shapes
from models.quantization import field_shardings, map_output_axis
from sharding.mesh import TP_AXIS

logger = logging.getLogger(__name__)

# Logical axis names of every parameter, keyed by its path in the params pytree.
PARAM_LOGICAL_AXES: dict[str, Any] = {
    "embed": ("vocab", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
    "layers": {
        "input_norm": ("layers", "embed"),
        "post_norm": ("layers", "embed"),
        "attn_out_norm": ("layers", "embed"),
        "mlp_out_norm": ("layers", "embed"),
        "wq": ("layers", "embed", "q_heads"),
        "wk": ("layers", "embed", "kv_heads"),
        "wv": ("layers", "embed", "kv_heads"),
        "bq": ("layers", "q_heads"),
        "bk": ("layers", "kv_heads"),
        "bv": ("layers", "kv_heads"),
        "bo": ("layers", "embed"),
        "q_norm": ("layers", "head_dim"),
        "k_norm": ("layers", "head_dim"),
        "wo": ("layers", "q_heads", "embed"),
        "w_gate": ("layers", "embed", "mlp"),
        "w_up": ("layers", "embed", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
        "router": ("layers", "embed", "experts"),
        "k_scale": ("layers",),
        "v_scale": ("layers",),
        "shared_expert_gate": ("layers", "embed", "gate"),
        "expert_gate": ("layers", "experts", "embed", "mlp"),
        "expert_up": ("layers", "experts", "embed", "mlp"),
        "expert_down": ("layers", "experts", "mlp", "embed"),
        "router_bias": ("layers", "experts"),  # gpt-oss's biases and sinks (one a query head)
        "expert_gate_bias": ("layers", "experts", "mlp"),
        "expert_up_bias": ("layers", "experts", "mlp"),
        "expert_down_bias": ("layers", "experts", "embed"),
        "sinks": ("layers", "q_heads"),
    },
}
KV_CACHE_LOGICAL_AXES = ("layers", "kv_heads", "pages", "page_offset", "head_dim")
# Step-input and activation axes are not named: inputs are replicated, activations follow GSPMD.
_KV_WEIGHTS = ("wk", "wv", "bk", "bv")


def logical_axis_rules(*, shard_vocab: bool = True, shard_kv_heads: bool = True) -> tuple:
    """Logical axis -> mesh axis (None: replicated), in flax's rules format."""
    return (
        ("vocab", TP_AXIS if shard_vocab else None),
        ("q_heads", TP_AXIS),
        ("kv_heads", TP_AXIS if shard_kv_heads else None),
        ("mlp", TP_AXIS),
        ("layers", None), ("embed", None), ("head_dim", None), ("pages", None), ("page_offset", None),
        ("experts", None), ("gate", None),
    )


def valid_tensor_parallel_sizes(config: ModelConfig, limit: Optional[int] = None) -> list[int]:
    """Every size ``check_tensor_parallel_size`` accepts for ``config`` (up to ``limit``)."""
    top = config.num_heads if limit is None else min(limit, config.num_heads)
    return [tp for tp in range(1, top + 1) if _size_problem(config, tp) is None]


def _size_problem(config: ModelConfig, tp: int) -> Optional[str]:
    hq, hkv = config.num_heads, config.num_kv_heads
    if hq % tp:
        return f"it does not divide the model's {hq} attention heads"
    if tp <= hkv and hkv % tp:
        return f"it does not divide the model's {hkv} kv heads"
    if tp > hkv and tp % hkv:
        return (f"it exceeds the model's {hkv} kv heads without being a multiple of them "
                "(each device must hold whole copies of the kv heads its query heads read)")
    if config.shared_expert_size % tp:
        return f"it does not divide the model's shared expert's size {config.shared_expert_size}"
    if config.intermediate_size % tp:
        width = "experts' intermediate size" if config.is_moe else "intermediate_size"
        return f"it does not divide the model's {width} {config.intermediate_size}"
    return None


def check_tensor_parallel_size(config: ModelConfig, tensor_parallel_size: int) -> None:
    """Raise ``ValueError`` if the model cannot be split over ``tensor_parallel_size`` devices."""
    tp = tensor_parallel_size
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
    problem = _size_problem(config, tp)
    if problem is not None:
        raise ValueError(f"tensor_parallel_size={tp} cannot split this model: {problem}; "
                         f"valid sizes: {valid_tensor_parallel_sizes(config)}")


def kv_head_replicas(config: ModelConfig, tensor_parallel_size: int) -> int:
    """How many copies of each kv head the mesh holds (1 unless ``tp > num_kv_heads``)."""
    return max(1, tensor_parallel_size // config.num_kv_heads)


def kv_cache_bytes_per_block_per_device(config: ModelConfig, block_size: int, dtype,
                                        tensor_parallel_size: int = 1) -> int:
    """Bytes one KV block costs on each device (replicated kv heads included)."""
    kv_heads_per_device = max(config.num_kv_heads // tensor_parallel_size, 1)
    return kv_cache_bytes_per_block(config, block_size, dtype) // config.num_kv_heads * kv_heads_per_device


def _map_shapes(fn: Callable[[tuple, tuple], Any], shapes: dict, path: tuple = ()) -> dict:
    """``fn(path, shape)`` over a ``param_shapes`` dict (its tuple leaves are pytree nodes to JAX)."""
    return {k: _map_shapes(fn, v, path + (k,)) if isinstance(v, dict) else fn(path + (k,), v)
            for k, v in shapes.items()}


def _logical_axes(path: tuple) -> tuple:
    names = PARAM_LOGICAL_AXES
    for key in path:
        names = names[key]
    return names


def _repeat_heads(w, replicas: int, head_dim: int):
    """Output axis ``Hkv*D -> Hkv*replicas*D``, each head repeated ``replicas`` times in place
    (every field of a quantized weight along its own output axis)."""

    def repeat(a: jax.Array, axis: int) -> jax.Array:
        a = jnp.moveaxis(a, axis, -1)
        heads = a.reshape(*a.shape[:-1], -1, head_dim)
        return jnp.moveaxis(jnp.repeat(heads, replicas, axis=-2).reshape(*a.shape[:-1], -1), -1, axis)

    return map_output_axis(w, repeat)


def _shardings_like(params: dict, shardings: dict) -> dict:
    """``shardings`` (for dense params) expanded to the fields of the quantized weights in ``params``."""
    return {k: _shardings_like(v, shardings[k]) if isinstance(v, dict) else field_shardings(v, shardings[k])
            for k, v in params.items()}


@dataclasses.dataclass(frozen=True)
class TensorParallelPlan:
    """How one model is laid out on ``mesh``: shardings for loading and running, the run config.

    Raises ``ValueError`` on construction if ``mesh``'s ``tp`` size cannot split the model.
    """

    checkpoint_config: ModelConfig
    mesh: Mesh

    def __post_init__(self):
        check_tensor_parallel_size(self.checkpoint_config, self.tp)
        if not self.shard_vocab:
            logger.warning("vocab_size=%d is not divisible by tensor_parallel_size=%d: the embedding and "
                           "lm_head are replicated on every device", self.checkpoint_config.vocab_size, self.tp)

    @property
    def tp(self) -> int:
        return int(self.mesh.shape[TP_AXIS])

    @property
    def kv_replicas(self) -> int:
        return kv_head_replicas(self.checkpoint_config, self.tp)

    @property
    def shard_vocab(self) -> bool:
        return self.checkpoint_config.vocab_size % self.tp == 0

    @functools.cached_property
    def config(self) -> ModelConfig:
        """The config the forward pass and the KV cache see (kv heads replicated where needed)."""
        c = self.checkpoint_config
        return dataclasses.replace(c, num_kv_heads=c.num_kv_heads * self.kv_replicas)

    def _named(self, axes: tuple, *, shard_kv_heads: bool = True) -> NamedSharding:
        rules = logical_axis_rules(shard_vocab=self.shard_vocab, shard_kv_heads=shard_kv_heads)
        return NamedSharding(self.mesh, logical_to_mesh_axes(axes, rules))

    def load_shardings(self) -> dict:
        """Shardings for ``param_shapes(checkpoint_config)``: what the loaders place weights with."""
        shard_kv = self.kv_replicas == 1
        return _map_shapes(lambda path, _: self._named(_logical_axes(path), shard_kv_heads=shard_kv),
                           param_shapes(self.checkpoint_config))

    def param_shardings(self) -> dict:
        """Shardings for ``param_shapes(config)``: the params the step runs on."""
        return _map_shapes(lambda path, _: self._named(_logical_axes(path)), param_shapes(self.config))

    def kv_cache_sharding(self) -> NamedSharding:
        return self._named(KV_CACHE_LOGICAL_AXES)

    def logits_sharding(self) -> NamedSharding:
        """Logits ``[S, V]`` as the vocab-parallel LM head leaves them (the sampler takes them so)."""
        return self._named((None, "vocab"))

    def repeat_kv_heads(self, w):
        """A k / v weight (or bias: its output axis ``Hkv*D``) as ``config`` has it: each kv head repeated
        ``kv_replicas`` times in place."""
        return _repeat_heads(w, self.kv_replicas, self.checkpoint_config.head_dim)

    def shard_params(self, params: dict) -> dict:
        """Checkpoint params (loaded with ``load_shardings``, or anywhere) -> params of ``config``, sharded.

        Repeats the kv heads when ``kv_replicas > 1``; arrays already in place are not copied.
        """
        target = self.param_shardings()
        if "lm_head" not in target and "lm_head" in params:  # a tied model's int8 head
            target["lm_head"] = self._named(PARAM_LOGICAL_AXES["lm_head"])
        if self.kv_replicas > 1:
            layers = dict(params["layers"])
            names = [n for n in _KV_WEIGHTS if n in layers]
            kv_weights = {n: layers[n] for n in names}
            expand = jax.jit(lambda ws: {n: self.repeat_kv_heads(w) for n, w in ws.items()},
                             out_shardings=_shardings_like(kv_weights, {n: target["layers"][n] for n in names}))
            layers.update(expand(kv_weights))
            params = {**params, "layers": layers}
        return jax.device_put(params, _shardings_like(params, target))


def param_shardings_for(mesh: Optional[Mesh]) -> Optional[Callable[[ModelConfig], dict]]:
    """The ``shardings`` argument of ``models.loader.load_model`` for ``mesh`` (None: no mesh).

    Validates the tensor-parallel size against the model's config before any weight is read.
    """
    if mesh is None:
        return None
    return lambda config: TensorParallelPlan(config, mesh).load_shardings()
