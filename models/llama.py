"""Forward pass of Llama-family models (Llama 2/3, Mistral, Qwen2/3, Phi-3, Gemma 2/3, Granite, SmolLM2/3, OLMo 2;
their MoE forms; gpt-oss).

Pure functions over a params pytree; no classes, no state, so the whole step is one
``jax.jit`` and tensor parallelism is applied from outside (shardings on the
params). Layer weights are stacked on a leading axis and the layers run under
``lax.scan``, so compile time does not grow with depth.

``params["layers"]`` may instead be a list of per-layer dicts (same names, no leading
axis): the layers are then unrolled, which costs compile time but lets XLA read each
weight in place (see benchmarks/NOTES.md for the measured difference).

Params pytree (weights stored ``[in, out]`` so a matmul is ``x @ w``)::

    embed        [V, H]
    layers/      input_norm [L, H]      wq [L, H, Hq*D]   wk, wv [L, H, Hkv*D]
                 bq [L, Hq*D], bk, bv [L, Hkv*D]          (qkv_bias only)
                 q_norm, k_norm [L, D]                     (qk_norm only; [L, Hq*D], [L, Hkv*D]: qk_norm_full)
                 wo [L, Hq*D, H]        post_norm [L, H]
                 bo [L, H]                                 (o_bias only: attention_bias=True)
                 attn_out_norm, mlp_out_norm [L, H]        (sandwich_norms only: Gemma, OLMo 2; OLMo 2 has no
                                                            input_norm and post_norm: pre_norms False)
                 k_scale, v_scale [L] float32              (kv_cache_scales only: fp8 K/V = K / k_scale)
                 w_gate, w_up [L, H, I] w_down [L, I, H]     (dense MLP)
                 router [L, H, E]                          (mixture of experts, instead of
                 expert_gate, expert_up [L, E, H, I]        the dense MLP: ``models.moe``;
                 expert_down [L, E, I, H]                   a shared expert keeps the dense
                 shared_expert_gate [L, H, 1]               MLP, its width S, and gates it)
                 router_bias [L, E], expert_gate_bias,      (moe_biases only: gpt-oss)
                 expert_up_bias [L, E, I], expert_down_bias [L, E, H]
                 sinks [L, Hq]                             (attention_sinks only: gpt-oss)
    final_norm   [H]
    lm_head      [H, V]                                    (absent when tied, unless quantized)

On one device q/k/v and gate/up are usually joined (``fuse_projections``): ``wqkv
[L, H, (Hq+2Hkv)*D]``, ``bqkv``, ``w_gate_up [L, H, 2I]`` (``expert_gate_up [L, E, H, 2I]``); the
forward takes either form.

The seven layer matrices may instead be quantized weights (``models.quantization``:
int8, int4, fp8 pytrees with the same ``[in, out]`` meaning; a mixture's experts int8); every matmul goes through
``models.quantization.linear``. So does an int8 ``lm_head`` (``quantize_lm_head``; a tied model then has
one too, beside its ``embed``, which the token lookup still reads).

Knows nothing of requests; takes a ``ModelInput`` and a ``KVCache`` (stacked, or one
buffer per layer with unrolled layers).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from models.batch import KVCache, ModelInput
from models.config import ModelConfig
from models.lora import lora_mask, lora_update
from models.moe import ExpertFn, expert_mlp, moe_mlp
from models.norm import add_deferred_norm, add_rms_norm, defer_norm, normed, rms_norm
from models.quantization import (
    Fp8Weight,
    LinearBackend,
    concat_outputs,
    fp8_gated_mlp,
    interleave_gate_up,
    is_quantized,
    linear,
    silu_gated_linear,
)
from pallas_kernels.deferred_norm import MAX_DEFERRED_NORM_BLOCKS, column_blocks
from pallas_kernels.fp8_activation import apply_activation
from pallas_kernels.quantized_matmul import add_splits
from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference, write_kv_reference
from pallas_kernels.rope_kv_write import apply_rope


def param_shapes(config: ModelConfig) -> dict:
    """Shape of every parameter, as a pytree of tuples matching the params pytree."""
    L, H, I, V, D = (config.num_layers, config.hidden_size, config.intermediate_size,
                     config.vocab_size, config.head_dim)
    layers = {
        "input_norm": (L, H),
        "wq": (L, H, config.q_size),
        "wk": (L, H, config.kv_size),
        "wv": (L, H, config.kv_size),
        "wo": (L, config.q_size, H),
        "post_norm": (L, H),
    }
    if config.is_moe:
        E, S = config.num_experts, config.shared_expert_size
        layers.update(router=(L, H, E), expert_gate=(L, E, H, I), expert_up=(L, E, H, I), expert_down=(L, E, I, H))
        if S:  # the shared expert: a dense MLP of width S, gated
            layers.update(w_gate=(L, H, S), w_up=(L, H, S), w_down=(L, S, H), shared_expert_gate=(L, H, 1))
        if config.moe_biases:  # gpt-oss
            layers.update(router_bias=(L, E), expert_gate_bias=(L, E, I), expert_up_bias=(L, E, I),
                          expert_down_bias=(L, E, H))
    else:
        layers.update(w_gate=(L, H, I), w_up=(L, H, I), w_down=(L, I, H))
    if config.qkv_bias:
        layers.update(bq=(L, config.q_size), bk=(L, config.kv_size), bv=(L, config.kv_size))
    if config.o_bias:
        layers.update(bo=(L, H))
    if config.qk_norm:  # over each head, or over all of q's and all of k's at once (qk_norm_full)
        q_width, k_width = (config.q_size, config.kv_size) if config.qk_norm_full else (D, D)
        layers.update(q_norm=(L, q_width), k_norm=(L, k_width))
    if config.sandwich_norms:
        layers.update(attn_out_norm=(L, H), mlp_out_norm=(L, H))
    if not config.pre_norms:  # OLMo 2
        del layers["input_norm"], layers["post_norm"]
    if config.kv_cache_scales:
        layers.update(k_scale=(L,), v_scale=(L,))
    if config.attention_sinks:
        layers.update(sinks=(L, config.num_heads))
    shapes = {"embed": (V, H), "layers": layers, "final_norm": (H,)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (H, V)
    return shapes


def unstack_layers(params: dict) -> dict:
    """The same params with ``layers`` as a list of per-layer dicts (unrolled forward); ``params`` is
    left as it was (``layout_layers(..., release=True)`` cuts the caller's own weights, dropping them).

    Slices one stacked weight at a time and drops it, so the extra memory at any
    moment is one stacked tensor, not the model. Every layer is cut by the same compiled
    program, its index an argument (``_layer_of``), so the compiles do not grow with depth:
    indexing with Python ints compiled a slice per layer and shape, and one program with an
    output per layer compiled a kernel per layer (run 12-13, H200: the 8B fp8 engine's
    weights phase grew ~0.8-1.35 s a layer, 44-50 s in all; bf16 7.0 -> 2.9 s).
    """
    return _unstack_in_place(_own_layers(params))


def _own_layers(params: dict) -> dict:
    """``params`` with its own layer dict(s): what ``_fuse_in_place`` / ``_unstack_in_place`` change is not the
    caller's (the arrays are shared)."""
    layers = params["layers"]
    return {**params, "layers": [dict(d) for d in layers] if isinstance(layers, (list, tuple)) else dict(layers)}


def _unstack_in_place(params: dict) -> dict:
    """``unstack_layers`` popping each stacked weight from ``params["layers"]`` itself as it is cut."""
    stacked = params["layers"]
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    per_layer: list[dict] = [{} for _ in range(num_layers)]
    for name in list(stacked):
        weight = stacked.pop(name)  # an array, or a quantized weight (a pytree of stacked arrays)
        leaves, treedef = jax.tree.flatten(weight)
        for i in range(num_layers):
            per_layer[i][name] = jax.tree.unflatten(treedef, [_layer_of(leaf, np.int32(i)) for leaf in leaves])
        del weight, leaves
    params["layers"] = per_layer
    return params


@jax.jit
def _layer_of(a: jax.Array, i: jax.Array) -> jax.Array:
    """``a[i]`` of a stacked array; ``i`` is traced, so one program serves every layer."""
    return jax.lax.dynamic_index_in_dim(a, i, axis=0, keepdims=False)


# Fused projections: matrices that multiply the same input, joined along their outputs so a
# decode step reads them in one matmul (at one row XLA reads a narrow wk/wv at a fraction of
# the rate of a wide one; benchmarks/NOTES.md). name -> the weights it joins, in order.
FUSED_PROJECTIONS = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"), "w_gate_up": ("w_gate", "w_up"),
                     "expert_gate_up": ("expert_gate", "expert_up")}


def fuse_projections(params: dict) -> dict:
    """The same params with q/k/v (and their biases) and gate/up joined (``FUSED_PROJECTIONS``),
    stacked or per-layer layers alike; a group that cannot be joined (``concat_outputs``) stays
    apart; ``params`` is left as it was. For one device: a column split of a fused weight over a
    mesh would not give each device its own q, k and v heads."""
    return _fuse_in_place(_own_layers(params))


def _fuse_in_place(params: dict) -> dict:
    """``fuse_projections`` on ``params``' own layer dict(s): each group's parts are dropped from them as its
    fused weight is made."""
    layers = params["layers"]
    for layer in layers if isinstance(layers, (list, tuple)) else [layers]:
        for fused, parts in FUSED_PROJECTIONS.items():
            if not all(p in layer for p in parts):
                continue
            joined = concat_outputs([layer[p] for p in parts])
            if fused == "w_gate_up":  # int8 K-major: gate and up rows in turn, for the one-row gated GEMV
                joined = interleave_gate_up(joined)
            if joined is not None:
                for p in parts:
                    del layer[p]
                layer[fused] = joined
    return params


def layout_layers(params: dict, *, unroll: bool, fuse: bool, release: bool = False) -> dict:
    """The layer weights as the step reads them: q/k/v and gate/up joined (``fuse``), then cut
    into per-layer dicts (``unroll``). Joining comes first, on the stacked weights: one program
    per joined array instead of one per layer and array, whatever the layer count (run 12, H200:
    the 8B fp8 engine spent ~1.35 s a layer laying out its unrolled weights, 47-50 s in all, where
    the scanned layout, joined on the stack, took 0.7-0.9 s).
    ``release``: lay out ``params``' own layer dicts, dropping each weight from them once replaced, so
    the caller's reference does not keep the model's old layout alive: the peak is the model plus its
    largest stacked tensor, not twice the model (run 36: Qwen3-30B-A3B's 61 GB in bf16 ran out of an
    H200's 141 GB while cut into layers). ``params`` is unusable after."""
    if not (fuse or unroll):
        return params
    params = params if release else _own_layers(params)
    if fuse:
        params = _fuse_in_place(params)
    return _unstack_in_place(params) if unroll else params


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies of rotary embedding, with llama3 / linear / yarn scaling applied."""
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, D, 2, dtype=np.float64) / D))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    if scaling[0] == "linear":
        return (inv_freq / scaling[1]).astype(np.float32)
    if scaling[0] == "yarn":
        return _yarn_inv_freq(inv_freq, config.rope_theta, D, *scaling[1:5], truncate=scaling[6])
    _, factor, low_freq_factor, high_freq_factor, old_context = scaling
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn_inv_freq(inv_freq: np.ndarray, base: float, dim: int, factor: float, original: int, beta_fast: float,
                   beta_slow: float, *, truncate: bool) -> np.ndarray:
    """YaRN (arXiv 2309.00071, as transformers computes it): frequencies that turn fewer than ``beta_slow`` times
    over the original context are interpolated (divided by ``factor``), those turning more than ``beta_fast`` times
    kept, with a linear ramp between."""

    def dim_of(rotations: float) -> float:  # the dimension whose frequency turns ``rotations`` times
        return dim * np.log(original / (rotations * 2 * np.pi)) / (2 * np.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = np.floor(low), np.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / ((high - low) or 0.001), 0, 1)
    keep = 1 - ramp
    return (inv_freq / factor * (1 - keep) + inv_freq * keep).astype(np.float32)


def rope_attention_factor(config: ModelConfig) -> float:
    """What cos and sin are multiplied by (YaRN's attention factor; 1 otherwise)."""
    return config.rope_scaling[5] if config.rope_scaling and config.rope_scaling[0] == "yarn" else 1.0


def rope_cos_sin(positions: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)`` ``[T, D/2]`` of the rotary embedding at ``positions`` (times YaRN's attention factor)."""
    freqs = positions.astype(jnp.float32)[:, None] * jnp.asarray(rope_inv_freq(config))[None, :]
    cos, sin = jnp.cos(freqs), jnp.sin(freqs)
    if rope_attention_factor(config) != 1.0:
        cos, sin = cos * rope_attention_factor(config), sin * rope_attention_factor(config)
    return cos, sin


# The attention and KV-write functions take one ``qkv[T, Hq + 2*Hkv, D]`` buffer (query, key, value heads in
# that order; pallas_kernels.ragged_paged_attention) rather than q, k and v apart. Given three arrays XLA makes
# each in a launch of its own: at batch-1 decode three ~1.3 us kernels a layer between the qkv projection and
# the KV write (rope on q, rope on k, the v slice), each summing the projection GEMV's K-split partials again.
# The one buffer is one elementwise fusion of the projection's output (bias, qk-norm, rope on the q and k heads);
# the kernels read q, k and v out of it by head offset (an 8B-shaped decode step compiled on an H200: one
# kernel a layer there instead of three, logits bit for bit the same). At small steps of plain rotary heads that
# fusion and the KV write are one launch (``rope_write_kv_fn``: pallas_kernels.rope_kv_write).
QUERY, KEY, VALUE = 0, 1, 2


def qkv_head_kinds(num_heads: int, num_kv_heads: int, shards: int = 1) -> np.ndarray:
    """What each head of the ``qkv`` buffer is (``QUERY``, ``KEY``, ``VALUE``), int8 ``[Hq + 2*Hkv]``: ``shards``
    blocks of ``[q | k | v]`` heads, one per device of a tensor-parallel mesh (``sharding.attention``)."""
    if num_heads % shards or num_kv_heads % shards:
        raise ValueError(f"qkv_shards={shards} must divide the {num_heads} query and {num_kv_heads} kv heads")
    block = [QUERY] * (num_heads // shards) + [KEY] * (num_kv_heads // shards) + [VALUE] * (num_kv_heads // shards)
    return np.tile(np.asarray(block, np.int8), shards)


def join_qkv_heads(q: jax.Array, k: jax.Array, v: jax.Array, shards: int = 1) -> jax.Array:
    """``q[T, Hq, D]``, ``k``, ``v[T, Hkv, D]`` -> ``qkv[T, Hq + 2*Hkv, D]`` laid out as ``qkv_head_kinds``
    says: ``shards`` blocks, block ``d`` holding the ``d``-th slice of q's, k's and v's heads. Over a mesh of
    ``shards`` devices splitting every head axis evenly, each device's slice of the result is made of its own
    q, k and v heads, so the join moves nothing between devices."""
    T, D = q.shape[0], q.shape[-1]
    return jnp.concatenate([a.reshape(T, shards, -1, D) for a in (q, k, v)], axis=2).reshape(T, -1, D)


def split_columns(x: jax.Array, widths: tuple) -> tuple:
    """``x[..., sum(widths)]`` -> the parts ``x[..., w_i]`` (the outputs of a fused projection)."""
    return tuple(jnp.split(x, np.cumsum(widths)[:-1].tolist(), axis=-1))


def fused_widths(config: ModelConfig) -> dict[str, tuple]:
    """Output width of each part of every ``FUSED_PROJECTIONS`` entry, in its order."""
    qkv = (config.q_size, config.kv_size, config.kv_size)
    experts = (config.intermediate_size,) * 2
    dense = (config.shared_expert_size,) * 2 if config.is_moe else experts
    return {"wqkv": qkv, "bqkv": qkv, "w_gate_up": dense, "expert_gate_up": experts}


AttentionFn = Callable[..., jax.Array]
WriteKVFn = Callable[..., tuple]
RopeWriteKVFn = Callable[..., tuple]
# Steps of at most this many rows (decodes of small batches) rotate and write their new K/V in one launch where the
# model allows (``rope_write_kv_fn``); larger ones keep XLA's rope fusion and ``write_kv_fn`` (untimed there).
MAX_FUSED_ROPE_ROWS = 16


def forward(
    params: dict,
    kv_cache: KVCache,
    batch: ModelInput,
    *,
    config: ModelConfig,
    attention_fn: AttentionFn = ragged_paged_attention_reference,
    write_kv_fn: WriteKVFn = write_kv_reference,
    rope_write_kv_fn: Optional[RopeWriteKVFn] = None,
    linear_backend: LinearBackend = LinearBackend(),
    qkv_shards: int = 1,
    expert_fn: Optional[ExpertFn] = None,
    return_hidden: bool = False,
) -> tuple[jax.Array, KVCache]:
    """Run the new tokens of ``batch`` through the model.

    Writes their K/V into ``kv_cache`` and returns float32 logits ``[S, V]`` at
    ``batch.logits_indices`` together with the updated cache (``return_hidden``: the
    last layer's normed output of every token row, ``[T, hidden]``, for ``lm_head_logits``
    to take the rows it wants). Layer weights may be
    dense arrays or quantized weights (``models.quantization``); ``linear_backend`` says
    how those are multiplied. ``attention_fn`` and ``write_kv_fn`` take each layer's
    ``qkv`` buffer (``QUERY`` above says why); ``qkv_shards``: its heads in that many blocks
    of ``[q | k | v]`` (``qkv_head_kinds``), the tensor-parallel size under
    ``sharding.shard_attention_fns`` (a fused ``wqkv`` is one block). ``rope_write_kv_fn``
    (``pallas_kernels.rope_kv_write``'s contract), where given: the rope and the KV write of small steps in one
    launch, for layers of a fused ``wqkv`` and plain rotary heads (no biases, q/k norms, KV scales or adapters in
    the step; one device). ``expert_fn``: how a mixture of experts'
    experts run on their routed rows (``models.moe.expert_mlp`` by ``linear_backend``'s choice where None; per
    device under ``sharding.shard_expert_fn``).
    """
    T = batch.token_ids.shape[0]
    D = config.head_dim
    eps = config.rms_norm_eps
    head_kinds = qkv_head_kinds(config.num_heads, config.num_kv_heads, qkv_shards)
    x = params["embed"][batch.token_ids]
    if config.embed_scale is not None:  # Gemma: sqrt(hidden), rounded to the model dtype as Hugging Face's; Granite
        x = x * jnp.asarray(config.embed_scale, x.dtype)
    # (cos, sin) of the full-attention layers, then of the sliding ones (Gemma 3's own theta; else the same).
    rope = (rope_cos_sin(batch.positions, config),) * 2
    if config.local_rope_theta is not None:
        local = dataclasses.replace(config, rope_theta=config.local_rope_theta, rope_scaling=None)
        rope = (rope[0], rope_cos_sin(batch.positions, local))
    attend = functools.partial(attention_fn, sm_scale=config.attn_scale, soft_cap=config.attn_soft_cap)
    activation_name = "silu" if config.hidden_act == "silu" else "gelu_tanh"  # pallas_kernels.fp8_activation's
    activation = functools.partial(apply_activation, activation_name)
    mm = functools.partial(linear, backend=linear_backend)
    mm_parts = functools.partial(linear, backend=linear_backend, keep_splits=True)

    widths = fused_widths(config)

    def lora_updates(h, w, fused: str, mask, joined: bool):
        """Each row's LoRA updates (``models.lora``) of ``fused``'s parts: one array of their columns side by side
        (``joined``), else one a part; from one joined update where the layer's slots have it."""
        h = normed(h)
        if fused in w["lora"]:
            update = lora_update(h, w["lora"], fused, mask)
            return update if joined else split_columns(update, widths[fused])
        updates = tuple(lora_update(h, w["lora"], p, mask) for p in FUSED_PROJECTIONS[fused])
        return jnp.concatenate(updates, axis=-1) if joined else updates

    def joined_output(h, w, fused: str, mask):
        """``h @ w[fused]`` (the layer's fused weight), plus each row's LoRA updates of its parts where ``mask``
        (``models.lora.lora_mask``) is given."""
        out = mm(h, w[fused])
        return out if mask is None else out + lora_updates(h, w, fused, mask, joined=True)

    def project(h, w, fused: str, mask=None) -> tuple:
        """``h @ w[part]`` for each part of ``fused``: one matmul of the fused weight when the layer has it; plus
        each row's LoRA updates where ``mask`` is given."""
        if fused in w:
            return split_columns(joined_output(h, w, fused, mask), widths[fused])
        parts = tuple(mm(h, w[p]) for p in FUSED_PROJECTIONS[fused])
        if mask is None:
            return parts
        return tuple(y + u for y, u in zip(parts, lora_updates(h, w, fused, mask, joined=False)))

    def with_lora(parts, x, w, name: str, mask):
        """A matmul's partial sums (``keep_splits``) and each row's LoRA update of ``name`` as one more."""
        if mask is None:
            return parts
        return jnp.concatenate([parts, lora_update(x, w["lora"], name, mask)[None].astype(parts.dtype)])

    def mlp_hidden(h, w, mask=None):
        """``act(h @ w_gate) * (h @ w_up)`` (SiLU; Gemma's tanh GELU); at one row of an interleaved int8 gate/up
        weight, SiLU's in one launch (``silu_gated_linear``)."""
        if mask is None and activation_name == "silu" and linear_backend.runs_gated_gemv(w.get("w_gate_up"), T):
            return silu_gated_linear(h, w["w_gate_up"], linear_backend)
        gate, up = project(h, w, "w_gate_up", mask)
        return activation(gate) * up

    def mlp_parts(h, w, mask):
        """The MLP's output as partial sums for ``add_rms_norm``: the experts' (``models.moe``) in a mixture of
        experts; else the gate/up matmul, the SwiGLU product and the down matmul (with LoRA updates: ``mask``)."""
        if config.is_moe:
            h = normed(h)
            out = moe_mlp(h, w, config=config, expert_fn=expert_fn or functools.partial(
                expert_mlp, use_kernel=linear_backend.use_grouped_kernel(), interpret=linear_backend.interpret))
            if config.shared_expert_size:  # qwen2_moe: every token through the shared expert too, gated
                shared = add_splits(mm_parts(mlp_hidden(h, w), w["w_down"]), h.dtype).astype(h.dtype)
                out = out + jax.nn.sigmoid(mm(h, w["shared_expert_gate"])) * shared
            return out[None]
        if mask is None and isinstance(w.get("w_gate_up"), Fp8Weight) and isinstance(w["w_down"], Fp8Weight):
            return fp8_gated_mlp(normed(h), w["w_gate_up"], w["w_down"], activation_name, linear_backend)[None]
        hidden = mlp_hidden(h, w, mask)
        return with_lora(mm_parts(hidden, w["w_down"]), hidden, w, "w_down", mask)

    def biases(w, fused: str) -> tuple:
        return split_columns(w[fused], widths[fused]) if fused in w else tuple(w[p] for p in FUSED_PROJECTIONS[fused])

    def qkv_heads(h, w, mask):
        """The layer's ``qkv[T, Hq + 2*Hkv, D]`` (biases and LoRA updates added; not normed or roped yet): a fused
        ``wqkv``'s output, whose columns are ``[q | k | v]`` already, is only reshaped; separate projections are
        joined."""
        if "wqkv" in w:
            if qkv_shards != 1:
                raise ValueError(f"a fused wqkv's columns are one [q | k | v] block, not qkv_shards={qkv_shards}")
            qkv = joined_output(h, w, "wqkv", mask)
            if config.qkv_bias:
                qkv = qkv + (w["bqkv"] if "bqkv" in w else jnp.concatenate(biases(w, "bqkv")))
            return qkv.reshape(T, -1, D)
        q, k, v = project(h, w, "wqkv", mask)
        if config.qkv_bias:
            bq, bk, bv = biases(w, "bqkv")
            q, k, v = q + bq, k + bk, v + bv
        return join_qkv_heads(*(a.reshape(T, -1, D) for a in (q, k, v)), shards=qkv_shards)

    def block_output(x, parts, w, norm_name: str):
        """A block's output partial sums as ``add_rms_norm`` adds them: normed first where the model has
        sandwich norms (Gemma), scaled where it has a residual multiplier (Granite)."""
        if config.residual_scale is not None:
            parts = parts * jnp.asarray(config.residual_scale, parts.dtype)
        if not config.sandwich_norms:
            return parts
        return rms_norm(add_splits(parts, x.dtype).astype(x.dtype), w[norm_name], eps)[None]

    def layer_call(x, h, k_cache, v_cache, layer, w, next_norm, batch, rope, mask, sliding=None, rotary=None):
        """One decoder layer on the residual stream ``x`` and its norm ``h`` (by the layer's ``input_norm``),
        everything it reads an argument (so one trace serves every layer). Returns the next residual stream
        and its norm by ``next_norm`` (the next layer's ``input_norm``, or the final norm after the last layer):
        each residual add and the norm after it are one ``add_rms_norm``, fed the matmul's K-split partials.
        ``sliding``: None where every layer attends alike (within ``config.sliding_window`` if set), else whether
        this layer slides (``config.sliding_layers``): a bool (unrolled layers: static) or a traced one (scan).
        ``rotary``: likewise whether the layer applies rotary embeddings (``config.rope_layers``; None: it does).
        ``mask``: which LoRA slot columns each row takes (``models.lora.lora_mask``), or None without adapters."""
        fused = fuses_rope(w, sliding, rotary)
        # fp8 pages with the checkpoint's K / V scales: pages hold K / k_scale and V / v_scale, q is multiplied by
        # k_scale (q . K unchanged) and the attention's output by v_scale; the kernels are unchanged (rope is
        # linear, so before it is as good as after).
        kv_scaled = "k_scale" in w and jnp.dtype(k_cache.dtype).itemsize == 1
        qkv = None if fused else unrotated_qkv(h, w, mask, kv_scaled)
        args = (k_cache, v_cache, layer, batch.kv_lens, batch.block_tables, batch.cu_q_lens, batch.num_seqs)
        sinks = {"sinks": w["sinks"]} if "sinks" in w else {}  # gpt-oss: a sink logit a query head
        def rotated(qkv, cos, sin):  # SmolLM3's NoPE layers: none (a traced choice: cos 1, sin 0, exactly x)
            if rotary is False:
                return qkv
            if rotary is not None and not isinstance(rotary, bool):
                cos, sin = jnp.where(rotary, cos, 1.0), jnp.where(rotary, sin, 0.0)
            return apply_rope(qkv, cos, sin, rotate=head_kinds != VALUE)

        if sliding is None or isinstance(sliding, bool):
            cos, sin = rope[1] if sliding else rope[0]
            if fused:  # the projection's partials summed, rotated and written in one launch
                parts = mm_parts(h, w["wqkv"])
                parts = parts.reshape(*parts.shape[:2], -1, D)
                qkv, k_cache, v_cache = rope_write_kv_fn(k_cache, v_cache, layer, parts, cos, sin, batch.slot_mapping,
                                                         dtype=x.dtype)
            else:
                qkv = rotated(qkv, cos, sin)
                k_cache, v_cache = write_kv_fn(k_cache, v_cache, layer, qkv, batch.slot_mapping)
            window = config.sliding_window if sliding is not False else None
            attn = attend(qkv, k_cache, v_cache, *args[2:], sliding_window=window, **sinks)
        else:  # a traced choice between the sliding and the full layer's rope and attention
            cos, sin = (jnp.where(sliding, local, full) for local, full in zip(rope[1], rope[0]))
            qkv = rotated(qkv, cos, sin)
            k_cache, v_cache = write_kv_fn(k_cache, v_cache, layer, qkv, batch.slot_mapping)
            attn = jax.lax.cond(sliding, lambda: attend(qkv, k_cache, v_cache, *args[2:],
                                                        sliding_window=config.sliding_window, **sinks),
                                lambda: attend(qkv, k_cache, v_cache, *args[2:], sliding_window=None, **sinks))
        if kv_scaled:
            attn = (attn * w["v_scale"]).astype(attn.dtype)
        attn = attn.reshape(T, config.q_size)
        attn_parts = with_lora(mm_parts(attn, w["wo"]), attn, w, "wo", mask)
        if config.o_bias:  # one more partial sum: o_proj's bias on every row
            attn_parts = jnp.concatenate([attn_parts, jnp.broadcast_to(w["bo"], (T, w["bo"].shape[-1]))[None]
                                          .astype(attn_parts.dtype)])
        x, h = pre_norm(*add_norm(x, block_output(x, attn_parts, w, "attn_out_norm"), w.get("post_norm", next_norm)))
        x, h = pre_norm(*add_norm(x, block_output(x, mlp_parts(h, w, mask), w, "mlp_out_norm"), next_norm))
        return x, h, k_cache, v_cache

    def unrotated_qkv(h, w, mask, kv_scaled: bool):
        """The layer's ``qkv`` buffer before the rope: ``qkv_heads``, its q/k norms, and its heads scaled for pages
        of the checkpoint's K / V scales (``kv_scaled``)."""
        qkv = qkv_heads(h, w, mask)
        if config.qk_norm_full:  # OLMo 2: over all of q's heads at once, and of k's
            if qkv_shards != 1:
                raise ValueError(f"{config.model_type}'s q/k norms span every head: not split over a mesh")
            Hq, Hkv = config.num_heads, config.num_kv_heads
            q = rms_norm(qkv[:, :Hq].reshape(T, -1), w["q_norm"], eps).reshape(T, Hq, D)
            k = rms_norm(qkv[:, Hq:Hq + Hkv].reshape(T, -1), w["k_norm"], eps).reshape(T, Hkv, D)
            qkv = jnp.concatenate([q, k, qkv[:, Hq + Hkv:]], axis=1)
        elif config.qk_norm:  # per head: q_norm's weight on the query heads, k_norm's on the key heads
            norm_weight = jnp.where((head_kinds == QUERY)[:, None], w["q_norm"], w["k_norm"])
            qkv = jnp.where((head_kinds != VALUE)[None, :, None], rms_norm(qkv, norm_weight, eps), qkv)
        if kv_scaled:
            head_scale = jnp.where(head_kinds == QUERY, w["k_scale"],
                                   1.0 / jnp.where(head_kinds == KEY, w["k_scale"], w["v_scale"]))
            qkv = (qkv * head_scale[None, :, None]).astype(qkv.dtype)
        return qkv

    def fuses_rope(w, sliding, rotary) -> bool:
        """Whether the layer's rope and KV write are ``rope_write_kv_fn``'s one launch (the docstring's conditions;
        a traced ``sliding`` or ``rotary`` choice, under a scan, keeps the two)."""
        plain = not (config.qkv_bias or config.qk_norm or config.qk_norm_full or "k_scale" in w)
        return (rope_write_kv_fn is not None and T <= MAX_FUSED_ROPE_ROWS and mask is None and qkv_shards == 1
                and "wqkv" in w and plain and (rotary is None or rotary is True)
                and (sliding is None or isinstance(sliding, bool)))

    def pre_norm(x, h):
        """A block's input: the residual stream normed, or as it is (OLMo 2: no norm before the blocks)."""
        return (x, h) if config.pre_norms else (x, x)

    def add_norm(x, parts, weight):
        """``add_rms_norm``, or where ``defer_norms`` its one-launch form leaving the norm to the GEMVs."""
        if defer_norms:
            return add_deferred_norm(x, parts, weight, eps, interpret=linear_backend.interpret)
        return add_rms_norm(x, parts, weight, eps)

    def layer_step(carry, layer_weights_and_next_norm):
        layer, w, next_norm, sliding, rotary = layer_weights_and_next_norm
        return layer_call(*carry, layer, w, next_norm, batch, rope, mask, sliding, rotary), None

    sliding_layers = config.sliding_layers or (None,) * config.num_layers
    rope_layers = config.rope_layers or (None,) * config.num_layers
    # LoRA adapters (models.lora): each row's slot columns, once for every layer (a step without ``lora_slots``, none
    # of whose rows has an adapter, runs no updates).
    mask = (None if batch.lora_slots is None or "lora_columns" not in params
            else lora_mask(batch.lora_slots, params["lora_columns"], x.dtype))
    # At one row, where every matmul reading a normed row is a Pallas GEMV, each residual add and its RMSNorm are one
    # launch and the GEMVs apply the norm (models.norm.DeferredNorm; XLA's way is three launches). Unrolled layers
    # only: a scan's carry keeps one form. Not for a hidden size of few factors of two (more than 64 column blocks),
    # nor float16 (the rows x * weight are read unnormed, and may leave its range where the normed row would not).
    defer_norms = (T == 1 and mask is None and config.pre_norms and not config.is_moe and x.dtype != jnp.float16
                   and column_blocks(config.hidden_size)[1] <= MAX_DEFERRED_NORM_BLOCKS
                   and isinstance(params["layers"], (list, tuple)) and linear_backend.defers_norms(params["layers"][0]))
    if isinstance(params["layers"], (list, tuple)):  # unstacked: one weight set per layer, unrolled
        # Each layer a call of one jitted function: traced and lowered once for all layers of equal shapes (and
        # kind: sliding or not) (XLA inlines the calls, so the compiled step is the same as one written out layer
        # by layer).
        unrolled_layer = jax.jit(layer_call, static_argnames=("sliding", "rotary"))
        norms = [w.get("input_norm", params["final_norm"]) for w in params["layers"]] + [params["final_norm"]]
        h = defer_norm(x, norms[0], eps) if defer_norms else pre_norm(x, rms_norm(x, norms[0], eps))[1]
        k_cache, v_cache = kv_cache.k, kv_cache.v
        new_k, new_v = [], []
        for i, w in enumerate(params["layers"]):
            if kv_cache.per_layer:  # layer i's own pages, as a one-layer 5-D cache
                x, h, k, v = unrolled_layer(x, h, k_cache[i][None], v_cache[i][None], jnp.int32(0), w, norms[i + 1],
                                            batch, rope, mask, sliding=sliding_layers[i], rotary=rope_layers[i])
                new_k.append(k[0])
                new_v.append(v[0])
            else:
                x, h, k_cache, v_cache = unrolled_layer(x, h, k_cache, v_cache, jnp.int32(i), w, norms[i + 1], batch,
                                                        rope, mask, sliding=sliding_layers[i], rotary=rope_layers[i])
        if kv_cache.per_layer:
            k_cache, v_cache = tuple(new_k), tuple(new_v)
        # The last layer's residual stream is read no further; left unused, JAX would drop it from that call and
        # lower the layer a second time for it (the sum is computed for the norm anyway).
        h, _ = jax.lax.optimization_barrier((normed(h), x))
    else:
        if kv_cache.per_layer:
            raise ValueError("a per-layer KV cache needs per-layer (unstacked) weights; see unstack_layers")
        final_norm = params["final_norm"][None]
        input_norms = params["layers"].get("input_norm", jnp.broadcast_to(final_norm, (config.num_layers,
                                                                                       final_norm.shape[-1])))
        next_norms = jnp.concatenate([input_norms[1:], final_norm.astype(input_norms.dtype)])
        layers = (jnp.arange(config.num_layers, dtype=jnp.int32), params["layers"], next_norms,
                  None if config.sliding_layers is None else jnp.asarray(config.sliding_layers),
                  None if config.rope_layers is None else jnp.asarray(config.rope_layers))
        carry = (x, pre_norm(x, rms_norm(x, input_norms[0], eps))[1], kv_cache.k, kv_cache.v)
        (x, h, k_cache, v_cache), _ = jax.lax.scan(layer_step, carry, layers)
    if not config.pre_norms:  # the last layer's output was left unnormed: the final norm
        h = rms_norm(x, params["final_norm"], eps)
    cache = KVCache(k=k_cache, v=v_cache)
    if return_hidden:
        return h, cache
    # The last layer's output by the final norm, at each sequence's row.
    return lm_head_logits(params, h[batch.logits_indices], config=config, linear_backend=linear_backend), cache


def lm_head_logits(params: dict, x: jax.Array, *, config: ModelConfig,
                   linear_backend: LinearBackend = LinearBackend()) -> jax.Array:
    """Float32 logits ``[N, V]`` of rows ``x`` of the last layer's normed output (soft-capped: Gemma 2)."""
    if is_quantized(params.get("lm_head")):  # tied or not: the layers' matmul path (one row: the int8 GEMV)
        # ``linear`` returns x's dtype: with bf16 activations the logits are rounded to bf16 before this cast.
        logits = linear(x, params["lm_head"], backend=linear_backend).astype(jnp.float32)
    else:
        lm_head = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
        logits = jnp.dot(x, lm_head, preferred_element_type=jnp.float32)
    if config.logits_divisor is not None:  # Granite
        logits = logits / config.logits_divisor
    if config.final_soft_cap is not None:
        logits = config.final_soft_cap * jnp.tanh(logits / config.final_soft_cap)
    return logits
