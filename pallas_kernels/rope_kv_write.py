"""The rotary embedding of a layer's new ``qkv`` rows and their KV write, in one launch.

Between a layer's qkv projection and its attention XLA runs two launches at a decode step: one elementwise fusion
(the sum of the projection GEMV's K-split partials, the rope on the query and key heads, the ``qkv`` buffer) and the
KV write (``ragged_paged_attention.write_kv``). At one row each is a ~1.2-1.3 us launch, ~80 us of a quantized 8B
step over its 32 layers (benchmarks/NOTES.md, run 55). ``rope_write_kv`` does both in one: each program takes one
head of a tile of rows, sums its partials, rotates it (query and key heads), stores it into the ``qkv`` buffer the
attention reads, and a key or value head also into its layer's pages (the caches are aliased to the outputs).

``apply_rope`` is the rotation in jnp (the models' own), ``rope_write_kv_reference`` the whole launch in jnp; the
layout of ``qkv`` and the pages is ``ragged_paged_attention``'s.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.quantized_matmul import add_splits
from pallas_kernels.ragged_paged_attention import (
    _head_columns,
    _rows_mask,
    query_heads,
    to_cache_dtype,
    write_kv_reference,
)

MAX_TILE_ROWS = 16  # token rows a program


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, rotate: np.ndarray | None = None) -> jax.Array:
    """Rotate ``x[T, heads, D]`` (half-split convention of Hugging Face checkpoints) by ``cos``, ``sin`` ``[T, D/2]``
    float32. ``rotate`` (bool ``[heads]``): only those heads, the others come back unchanged (the value heads of a
    ``qkv`` buffer)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return rotated if rotate is None else jnp.where(np.asarray(rotate)[None, :, None], rotated, x)


def rope_write_kv_reference(k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array | int, parts: jax.Array,
                            cos: jax.Array, sin: jax.Array, slot_mapping: jax.Array, *, dtype=None):
    """``rope_write_kv`` in jnp: ``add_splits``, ``apply_rope`` on the query and key heads, ``write_kv_reference``."""
    Hkv = k_cache.shape[1]
    qkv = add_splits(parts, dtype or parts.dtype)
    Hq = query_heads(qkv.shape, Hkv)
    qkv = apply_rope(qkv, cos, sin, rotate=np.arange(qkv.shape[1]) < Hq + Hkv)
    return (qkv, *write_kv_reference(k_cache, v_cache, layer, qkv, slot_mapping))


def _rope_write_kv_kernel(layer_ref, slots_ref, parts_ref, cos_ref, sin_ref, _k_in, _v_in, qkv_ref, k_out, v_out, *,
                          tokens: int, num_q_heads: int):
    """Program ``(h, i)``: head ``h`` of rows ``i * tokens ...``; the first ``num_q_heads + Hkv`` heads are rotated,
    key head ``h - num_q_heads`` and value head ``h - num_q_heads - Hkv`` are also written to the pages."""
    P, T, _, D = parts_ref.shape
    Hkv, bs = k_out.shape[1], k_out.shape[3]
    half = D // 2
    h = pl.program_id(0)
    t = pl.program_id(1) * tokens + jnp.arange(tokens, dtype=jnp.int32)
    valid = t < T
    t = jnp.minimum(t, T - 1)
    c = _head_columns(half)  # padded to a power of two: the extra columns are masked
    mask = _rows_mask(valid, half)
    rows, first, second = t[:, None], c[None, :], half + c[None, :]

    def summed(cols):  # the partials' sum, rounded to qkv's dtype as ``add_splits`` rounds it
        total = pltriton.load(parts_ref.at[0, rows, h, cols], mask=mask, other=0).astype(jnp.float32)
        for p in range(1, P):
            total += pltriton.load(parts_ref.at[p, rows, h, cols], mask=mask, other=0).astype(jnp.float32)
        return total.astype(qkv_ref.dtype).astype(jnp.float32)

    x1, x2 = summed(first), summed(second)
    cos = pltriton.load(cos_ref.at[rows, first], mask=mask, other=0)
    sin = pltriton.load(sin_ref.at[rows, first], mask=mask, other=0)
    rotate = h < num_q_heads + Hkv
    y1 = jnp.where(rotate, x1 * cos - x2 * sin, x1).astype(qkv_ref.dtype)
    y2 = jnp.where(rotate, x2 * cos + x1 * sin, x2).astype(qkv_ref.dtype)
    out = (jnp.where(valid, t, T)[:, None], h)  # rows past T: out of bounds, never written
    pltriton.store(qkv_ref.at[out + (first,)], y1, mask=mask)
    pltriton.store(qkv_ref.at[out + (second,)], y2, mask=mask)
    # Rows past T aim at the sink page 0 (``write_kv``'s rule: the interpreter writes masked rows back).
    slot = jnp.where(valid, slots_ref[t], 0)
    page, offset = (slot // bs)[:, None], (slot % bs)[:, None]

    def write(cache_ref, head):
        dst = (layer_ref[0], head, page, offset)
        pltriton.store(cache_ref.at[dst + (first,)], to_cache_dtype(y1, cache_ref.dtype), mask=mask)
        pltriton.store(cache_ref.at[dst + (second,)], to_cache_dtype(y2, cache_ref.dtype), mask=mask)

    kv_head = h - num_q_heads
    pl.when((kv_head >= 0) & (kv_head < Hkv))(lambda: write(k_out, kv_head))
    pl.when(kv_head >= Hkv)(lambda: write(v_out, kv_head - Hkv))


@functools.partial(jax.jit, static_argnames=("dtype", "interpret"))
def rope_write_kv(k_cache: jax.Array, v_cache: jax.Array, layer: jax.Array | int, parts: jax.Array, cos: jax.Array,
                  sin: jax.Array, slot_mapping: jax.Array, *, dtype=None,
                  interpret: Optional[bool] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(qkv, k_cache, v_cache)``: ``qkv[T, Hq + 2*Hkv, D]`` in ``dtype`` (None: the partials') the sum of the
    projection's K-split partials ``parts[P, T, Hq + 2*Hkv, D]`` (``add_splits``), its query and key heads rotated by
    ``cos``, ``sin`` ``[T, D/2]`` float32; its key and value heads written into ``layer``'s pages at
    ``slot_mapping[T]``, in place (``write_kv``'s contract). Raises ``ValueError`` for inconsistent shapes."""
    if k_cache.ndim != 5 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must be [L, Hkv, P, block_size, D] alike, got {k_cache.shape} "
                         f"and {v_cache.shape}")
    _, Hkv, _, _, D = k_cache.shape
    if parts.ndim != 4 or parts.shape[3] != D or D % 2:
        raise ValueError(f"parts must be [P, T, Hq + 2*Hkv, D={D}] with D even, got shape {parts.shape}")
    _, T, H, _ = parts.shape
    Hq = query_heads(parts.shape[1:], Hkv)
    if cos.shape != (T, D // 2) or sin.shape != cos.shape or slot_mapping.shape != (T,):
        raise ValueError(f"cos and sin must be [T={T}, {D // 2}] and slot_mapping [T], got {cos.shape}, {sin.shape} "
                         f"and {slot_mapping.shape}")
    dtype = jnp.dtype(dtype or parts.dtype)
    tokens = min(MAX_TILE_ROWS, 1 << max(0, (T - 1).bit_length()))
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return pl.pallas_call(
        functools.partial(_rope_write_kv_kernel, tokens=tokens, num_q_heads=Hq),
        grid=(H, pl.cdiv(T, tokens)),
        out_shape=(jax.ShapeDtypeStruct((T, H, D), dtype), jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
        input_output_aliases={5: 1, 6: 2},  # operands: layer, slots, parts, cos, sin, k_cache, v_cache
        compiler_params=pltriton.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="rope_write_kv",
    )(jnp.asarray(layer, jnp.int32).reshape(1), slot_mapping.astype(jnp.int32), parts, cos.astype(jnp.float32),
      sin.astype(jnp.float32), k_cache, v_cache)
