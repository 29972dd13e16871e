"""The residual add of one decode row, with its RMSNorm left to the GEMVs that read it.

At one row (decode at batch 1) XLA runs each residual add and the RMSNorm after it as three launches: the add (which
also sums the last matmul's K-split partials), the sum of squares, and the scaling (benchmarks/NOTES.md: ~1.2-1.4 us
each, ~250 us of a quantized 8B step over its 63 norms). The scaling need not be a pass of its own: the norm's
``rsqrt(mean(x^2) + eps)`` is one number a row, so ``norm(x) @ W = rsqrt(...) * ((x * weight) @ W)`` and the GEMV
can apply it to its output (``quantized_matmul``'s ``sum_sq``). This kernel does the rest in one launch: each
program takes a block of the row's columns, adds the partials to the residual (rounded as XLA's add rounds), and
writes the new residual, ``x * weight`` (the rows the GEMV reads) and its block's sum of squares.

The reference is ``add_norm_rows_reference``; ``models.norm.DeferredNorm`` carries the result to the matmuls.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.quantized_matmul import add_splits

MAX_BLOCK = 256  # columns a program at most
# The row in 64-column blocks where that makes a power of two of them, up to MAX_DEFERRED_NORM_BLOCKS (the 8B's 4096:
# 64 programs; a 70B's 8192 keeps 32 of 256 columns, as its GEMVs take at most 64 sums): the add after a
# GEMV of many K-split partials (AWQ's w_down: 56) is then spread wider. Run 58 (H200, one lease): AWQ's two adds 165
# -> 136 us a batch-1 step, int8's level (104 -> 105). The GEMVs read a power of two of sums at once (``_inverse_rms``).
PREFERRED_BLOCK = 64
# A row of more blocks keeps XLA's norms: each GEMV program sums the blocks' sums of squares (a hidden size of few
# factors of two, e.g. 4544 = 64 x 71, would give it 71 scalar loads).
MAX_DEFERRED_NORM_BLOCKS = 64


def column_blocks(width: int) -> tuple[int, int]:
    """``(block, groups)``: the row of ``width`` in ``groups`` programs of ``block`` columns: ``PREFERRED_BLOCK``
    where ``groups`` is then a power of two of at most ``MAX_DEFERRED_NORM_BLOCKS``, else the largest power of two up
    to ``MAX_BLOCK`` dividing ``width`` (``$PAGEDJAX_ADD_NORM_BLOCK``, unless unset or 0, in its place, for timing;
    Triton's tiles are powers of two)."""
    block = int(os.environ.get("PAGEDJAX_ADD_NORM_BLOCK", 0))
    if block < 0 or block & (block - 1):
        raise ValueError(f"PAGEDJAX_ADD_NORM_BLOCK must be a power of two, got {block}")
    if not block:
        groups = width // PREFERRED_BLOCK
        if width % PREFERRED_BLOCK == 0 and groups & (groups - 1) == 0 and groups <= MAX_DEFERRED_NORM_BLOCKS:
            return PREFERRED_BLOCK, groups
        block = MAX_BLOCK
    while width % block:
        block //= 2
    return block, width // block


def _add_norm_rows_kernel(x_ref, parts_ref, weight_ref, x_out_ref, rows_ref, sum_sq_ref, *, block: int,
                          num_parts: int):
    g = pl.program_id(0)
    cols = pl.ds(pl.multiple_of(g * block, block), block)
    total = parts_ref[0, 0, cols].astype(jnp.float32)
    for p in range(1, num_parts):
        total += parts_ref[p, 0, cols].astype(jnp.float32)
    dtype = x_out_ref.dtype
    # As XLA's path rounds (``add_splits`` then the add): the partials' sum to the row's dtype, then the sum.
    x = (x_ref[0, cols].astype(jnp.float32) + total.astype(dtype).astype(jnp.float32)).astype(dtype)
    x_out_ref[0, cols] = x
    x32 = x.astype(jnp.float32)
    rows_ref[0, cols] = (x32 * weight_ref[cols].astype(jnp.float32)).astype(rows_ref.dtype)
    sum_sq_ref[pl.ds(g, 1)] = jnp.sum(x32 * x32, keepdims=True)


@functools.partial(jax.jit, static_argnames=("interpret",))
def add_norm_rows(x: jax.Array, parts: jax.Array, weight: jax.Array, *,
                  interpret: Optional[bool] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``x[1, H]`` plus the sum of ``parts[P, 1, H]`` (a matmul's K-split partials), and its RMSNorm deferred:
    ``(x_new, x_new * weight, sum_sq)``, the first two in x's dtype, ``sum_sq[G]`` float32 partial sums of
    ``x_new^2`` over ``column_blocks(H)``'s G blocks."""
    if x.ndim != 2 or x.shape[0] != 1 or parts.ndim != 3 or parts.shape[1:] != x.shape or weight.shape != x.shape[1:]:
        raise ValueError(f"add_norm_rows wants x [1, H], parts [P, 1, H] and weight [H]; got {x.shape}, "
                         f"{parts.shape}, {weight.shape}")
    H = x.shape[1]
    block, groups = column_blocks(H)
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    kernel = functools.partial(_add_norm_rows_kernel, block=block, num_parts=parts.shape[0])
    return pl.pallas_call(
        kernel,
        grid=(groups,),
        in_specs=[pl.no_block_spec] * 3,
        out_specs=[pl.no_block_spec] * 3,
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct((groups,), jnp.float32)),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="add_norm_rows",
    )(x, parts, weight)


def add_norm_rows_reference(x: jax.Array, parts: jax.Array, weight: jax.Array):
    """``add_norm_rows`` in jnp (XLA's add of ``add_splits``, then ``norm_rows_reference``)."""
    x = x + add_splits(parts, x.dtype).astype(x.dtype)
    return (x, *norm_rows_reference(x, weight))


def norm_rows_reference(x: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A row's deferred norm in jnp: ``(x * weight`` in x's dtype, its blocks' sums of squares ``[G]`` float32)."""
    x32 = x.astype(jnp.float32)
    _, groups = column_blocks(x.shape[-1])
    sum_sq = (x32 * x32).reshape(groups, -1).sum(axis=-1)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype), sum_sq
