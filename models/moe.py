"""The mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss): each token through the ``k`` experts its router
picks.

Owns the router (softmax over the experts' logits, the top ``k``, renormalised where the config says), the layout
of the routed rows (``sort_by_expert``: every (token, expert) pair a row, sorted by expert, each expert's rows padded
to whole blocks so a block has one expert; for a token or a few, ``pair_blocks``: a block a pair, unsorted), and the
experts' SwiGLU MLPs over that layout by grouped matmuls (``pallas_kernels.grouped_matmul``), whose outputs are
gathered back to their tokens and summed with the routing weights.

Weights (``models.llama.param_shapes``): ``router [H, E]``, ``expert_gate`` / ``expert_up [E, H, I]`` (or joined,
``expert_gate_up [E, H, 2I]``), ``expert_down [E, I, H]``; the experts dense, weight-only int8 (``Int8Weight``,
``quantization="int8"``), weight-only fp8 (``Fp8Weight``: ``"fp8"``, or an FP8 checkpoint's; each tile converted to
the activations' dtype, so no fp8 tensor cores here) or 4-bit (``Int4Weight``: ``"int4"``, or an AWQ / GPTQ
checkpoint's; MXFP4's FP4 codes: ``"mxfp4"``, or gpt-oss's checkpoints). gpt-oss adds ``router_bias [E]``, the
experts' biases (``expert_gate_bias`` / ``expert_up_bias [E, I]``, ``expert_down_bias [E, H]``) and its clamped gate
(``gate_fn``) in place of SwiGLU. Every token's routing is computed: nothing is dropped (no expert capacity), so
the result does not depend on what else is in the batch. Qwen2-MoE's shared expert is the layer's dense MLP
(``models.llama``); over a mesh the experts run per device (``sharding.experts``).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.quantization import Fp8Weight, Int4Weight, Int8Weight
from pallas_kernels.grouped_matmul import (gather_rows, grouped_matmul, grouped_matmul_config, grouped_matmul_int4,
                                           grouped_matmul_int4_reference, grouped_matmul_reference, swiglu_halves)

# Rows a block of the grouped matmul: at least the tensor cores' 16, at most 128, else about the rows an expert gets
# on average (a decode step gives most experts one row or none; a long prompt gives each hundreds).
MIN_BLOCK_M, MAX_BLOCK_M = 16, 128


class ExpertRows(NamedTuple):
    """The routed rows of a batch, sorted by expert and padded to whole blocks (``sort_by_expert``)."""

    token: jax.Array  # [R] int32: the token a row multiplies (T, a zero row, for padding)
    block_expert: jax.Array  # [R / block_m] int32: each block's expert (E past the last expert's rows)
    pair_row: jax.Array  # [T * k] int32: the row of each (token, j-th expert) pair, to gather the outputs back


def route(h: jax.Array, router: jax.Array, *, top_k: int, normalize: bool,
          bias: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """``(weights [T, k] float32, experts [T, k] int32)``: the softmax of the router's logits (computed in h's
    dtype, as Hugging Face's linear is; plus ``bias [E]``, gpt-oss's) over the experts, its ``k`` largest,
    renormalised to sum to 1 if asked."""
    logits = jnp.dot(h, router.astype(h.dtype))
    if bias is not None:
        logits = logits + bias.astype(h.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def block_rows(num_tokens: int, top_k: int, num_experts: int) -> int:
    """``block_m`` for a batch of ``num_tokens``: a power of two near the rows an expert gets on average."""
    average = -(-num_tokens * top_k // num_experts)
    return min(MAX_BLOCK_M, max(MIN_BLOCK_M, 1 << (average - 1).bit_length()))


def sort_by_expert(experts: jax.Array, num_experts: int, block_m: int) -> ExpertRows:
    """Every (token, expert) pair of ``experts [T, k]`` as a row, grouped by expert in expert order, each group
    padded to a multiple of ``block_m`` rows. The row count is static: the pairs, plus ``block_m - 1`` padding rows
    for each expert that can have any, rounded up to whole blocks."""
    num_tokens, top_k = experts.shape
    pairs = num_tokens * top_k
    num_rows = -(-(pairs + min(num_experts, pairs) * (block_m - 1)) // block_m) * block_m
    flat = experts.reshape(-1)
    counts = jnp.zeros(num_experts, jnp.int32).at[flat].add(1)
    padded = -(-counts // block_m) * block_m
    padded_end = jnp.cumsum(padded)
    order = jnp.argsort(flat, stable=True)  # pairs in expert order, tokens in order within an expert
    expert_of = flat[order]
    rank = jnp.arange(pairs, dtype=jnp.int32) - (jnp.cumsum(counts) - counts)[expert_of]
    row = (padded_end - padded)[expert_of] + rank
    token = jnp.full(num_rows, num_tokens, jnp.int32).at[row].set((order // top_k).astype(jnp.int32))
    pair_row = jnp.zeros(pairs, jnp.int32).at[order].set(row)
    block_start = jnp.arange(num_rows // block_m, dtype=jnp.int32) * block_m
    # Compares, not a binary search: that is a while loop, which on a GPU waits for the host at every iteration.
    block_expert = jnp.searchsorted(padded_end, block_start, side="right", method="compare_all").astype(jnp.int32)
    return ExpertRows(token=token, block_expert=block_expert, pair_row=pair_row)


def pair_blocks(experts: jax.Array, num_experts: int, block_m: int) -> ExpertRows:
    """The rows of a few tokens without sorting: a block of ``block_m`` rows for each (token, j-th expert) pair, in
    pair order, the pair's row first and padding after. Its static size is what ``sort_by_expert`` reserves when
    there are no more pairs than experts; it makes the layout from iotas alone, where sorting takes a sort, two
    cumulative sums, scatters and a search (~10 small launches a layer: most of a batch-1 step's routing cost),
    but two pairs of one expert read its weight twice (``uses_pair_blocks`` says when that is rare)."""
    num_tokens, top_k = experts.shape
    pairs = num_tokens * top_k
    row = jnp.arange(pairs * block_m, dtype=jnp.int32)
    token = jnp.where(row % block_m == 0, row // block_m // top_k, num_tokens)
    del num_experts  # sort_by_expert's signature; every block has its pair's expert, none is past the last
    return ExpertRows(token=token, block_expert=experts.reshape(-1).astype(jnp.int32),
                      pair_row=jnp.arange(pairs, dtype=jnp.int32) * block_m)


def uses_pair_blocks(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """``pair_blocks`` for one token (its k experts are distinct: the sorted layout's weight reads exactly) and
    for a few where the pairs pick at most a quarter of the experts (Qwen3-30B-A3B: up to 4 tokens; about 12% of
    the weight reads then repeat an expert), else ``sort_by_expert``."""
    return num_tokens == 1 or 4 * num_tokens * top_k <= num_experts


def expert_rows(experts: jax.Array, num_experts: int, block_m: int) -> ExpertRows:
    """The routed rows' layout for ``experts [T, k]``: ``pair_blocks`` or ``sort_by_expert`` (``uses_pair_blocks``)."""
    layout = pair_blocks if uses_pair_blocks(*experts.shape, num_experts) else sort_by_expert
    return layout(experts, num_experts, block_m)


def gate_fn(config: ModelConfig) -> Optional[Callable[[jax.Array, jax.Array], jax.Array]]:
    """The experts' gate ``(gate, up) -> hidden`` where it is not SwiGLU's (None): gpt-oss's clamped one
    (``ModelConfig.swiglu_limit``), computed in float32 (transformers computes it in the weights' dtype)."""
    if config.swiglu_limit is None:
        return None
    return functools.partial(clamped_swiglu, limit=config.swiglu_limit, alpha=config.swiglu_alpha)


def clamped_swiglu(gate: jax.Array, up: jax.Array, *, limit: float, alpha: float) -> jax.Array:
    """gpt-oss's gate: ``(clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate, limit)``."""
    g = jnp.minimum(gate.astype(jnp.float32), limit)
    u = jnp.clip(up.astype(jnp.float32), -limit, limit)
    return ((u + 1) * g * jax.nn.sigmoid(alpha * g)).astype(gate.dtype)


def _rows_bias(bias: jax.Array, block_expert: jax.Array, num_rows: int) -> jax.Array:
    """Each routed row's expert's ``bias [E, N]``: ``[R, N]`` (padding blocks, expert E, take the last's)."""
    expert = jnp.minimum(block_expert, bias.shape[0] - 1)
    return jnp.repeat(bias[expert], num_rows // block_expert.shape[0], axis=0)


def expert_mlp(h: jax.Array, row_token: jax.Array, block_expert: jax.Array, w: dict, *, use_kernel: bool,
               interpret=None, gate: Optional[Callable] = None) -> jax.Array:
    """The experts' SwiGLU MLPs on the routed rows ``h[row_token]`` of the tokens ``h [T, H]`` (``expert_rows``'
    layout; a token ``T`` is a padding row of zeros): ``[R, H]`` in h's dtype. The kernel reads each row from ``h``
    itself (no routed copy of the rows, ~600 MB at Qwen3-30B-A3B's 16,384-token prompt step).
    ``w``: ``expert_gate_up`` or ``expert_gate`` / ``expert_up``, and ``expert_down`` (dense, ``Int8Weight``,
    ``Fp8Weight`` or ``Int4Weight``); gpt-oss's ``expert_gate_bias`` / ``expert_up_bias [E, I]`` where given (the
    down projection's bias is ``moe_mlp``'s, added once after a mesh's devices sum their parts). ``gate``: the
    gate's function where it is not SwiGLU (``gate_fn``).
    ``use_kernel``: the grouped matmuls by the Pallas kernel (``interpret``: interpreted), else by jnp. Under a
    mesh this runs per device on its slice of the experts' width (``sharding.experts``)."""

    first = [w[name] for name in ("expert_gate_up", "expert_gate", "expert_up") if name in w]
    if not use_kernel or any(isinstance(v, Int4Weight) and v.perm is not None for v in first):
        h, row_token = gather_rows(h, row_token), None  # the routed rows laid out once, for gate and up alike

    def matmul(x, weight, row_token=None, swiglu=False):
        kernel_options = {"interpret": interpret, "swiglu": swiglu} if use_kernel else {}
        if isinstance(weight, Int4Weight):
            if weight.perm is not None:  # GPTQ act-order: each expert's stored rows are W[perm]; a block's rows
                block_m = x.shape[0] // block_expert.shape[0]  # all go to one expert, so gather its columns
                expert = jnp.repeat(jnp.minimum(block_expert, weight.perm.shape[0] - 1), block_m)
                x = jnp.take_along_axis(x, weight.perm[expert], axis=1)
            fn = grouped_matmul_int4 if use_kernel else grouped_matmul_int4_reference
            return fn(x, weight.packed, weight.scales, weight.zeros, block_expert, group_size=weight.group_size,
                      pack=weight.pack, row_token=row_token, codes=weight.codes, **kernel_options)
        q, scale = (weight.q, weight.scale) if isinstance(weight, (Int8Weight, Fp8Weight)) else (weight, None)
        k_major = isinstance(weight, Fp8Weight)  # its q is [E, N, K]
        fn = grouped_matmul if use_kernel else grouped_matmul_reference
        return fn(x, q, block_expert, scale, k_major=k_major, row_token=row_token, **kernel_options)

    if gate is None and "expert_gate_bias" not in w:
        if "expert_gate_up" in w:
            if use_kernel and grouped_matmul_config().swiglu_epilogue:
                activations = matmul(h, w["expert_gate_up"], row_token, swiglu=True)
            else:
                activations = swiglu_halves(matmul(h, w["expert_gate_up"], row_token))
        else:
            activations = jax.nn.silu(matmul(h, w["expert_gate"], row_token)) * matmul(h, w["expert_up"], row_token)
    else:  # gpt-oss: biases before its own gate
        if "expert_gate_up" in w:
            halves = jnp.split(matmul(h, w["expert_gate_up"], row_token), 2, axis=-1)
        else:
            halves = [matmul(h, w[name], row_token) for name in ("expert_gate", "expert_up")]
        if "expert_gate_bias" in w:
            halves = [part + _rows_bias(w[name], block_expert, part.shape[0]).astype(part.dtype)
                      for part, name in zip(halves, ("expert_gate_bias", "expert_up_bias"))]
        activations = gate(*halves) if gate is not None else jax.nn.silu(halves[0]) * halves[1]
    return matmul(activations.astype(h.dtype), w["expert_down"])


ExpertFn = Callable[..., jax.Array]
EXPERT_WEIGHTS = ("expert_gate_up", "expert_gate", "expert_up", "expert_down", "expert_gate_bias", "expert_up_bias")


def moe_mlp(h: jax.Array, w: dict, *, config: ModelConfig, expert_fn: ExpertFn) -> jax.Array:
    """The layer's expert MLPs on ``h [T, H]``, weighted and summed per token: ``[T, H]`` in h's dtype.
    ``expert_fn(h, row_token, block_expert, weights, gate=...)``: ``expert_mlp`` with its options bound (or its
    per-device form)."""
    num_tokens = h.shape[0]
    weights, experts = route(h, w["router"], top_k=config.num_experts_per_tok, normalize=config.norm_topk_prob,
                             bias=w.get("router_bias"))
    rows = expert_rows(experts, config.num_experts,
                       block_rows(num_tokens, config.num_experts_per_tok, config.num_experts))
    y = expert_fn(h, rows.token, rows.block_expert, {name: w[name] for name in EXPERT_WEIGHTS if name in w},
                  gate=gate_fn(config))
    if "expert_down_bias" in w:
        y = y + _rows_bias(w["expert_down_bias"], rows.block_expert, y.shape[0]).astype(y.dtype)
    # Each token's k outputs gathered back and summed in a fixed order (a scatter-add would sum them in whatever
    # order a GPU's atomics land, and a token's output could differ from run to run).
    per_pair = y[rows.pair_row].reshape(num_tokens, config.num_experts_per_tok, -1).astype(jnp.float32)
    return jnp.sum(per_pair * weights[:, :, None], axis=1).astype(h.dtype)
