"""The grouped matmul of a mixture-of-experts layer: blocks of rows, each multiplied by its own expert's weight.

``x[R, K]`` holds the rows routed to experts, sorted by expert and padded so that every block of ``block_m`` rows
belongs to one expert (``models.moe.sort_by_expert`` makes that layout); ``block_expert[R / block_m]`` names each
block's expert, or ``E`` for a block past the last expert's rows. The result is ``y[r] = x[r] @ w[block_expert[r //
block_m]]``, and zeros in the unused blocks.

The kernel (Triton through Pallas; vLLM's ``fused_moe`` has the same shape): program ``(b, n)`` reads its block's
expert id, then streams ``block_k`` rows of that expert's ``[K, N]`` weight a step for its ``block_n`` output
columns, accumulating ``x``'s block times the tile on the tensor cores in float32. A block with no expert returns
zeros without reading a weight, so a decode step, whose padded layout has many more blocks than rows, pays only for
the experts it routed to. Weight-only int8 experts (``scale[E, N]`` per output column) are converted tile by tile
(exact) and scaled once after the K loop, so they cost half the bytes of bf16 ones. XLA's own ``lax.ragged_dot``
on CUDA (jaxlib 0.10-0.11) multiplies every row by every expert (a dense fallback), ``E`` times the work; hence
this kernel.

``grouped_matmul_reference`` is the same product in jnp (one gathered weight a block), for CPU runs and tests.
Untimed on a GPU so far (benchmarks/NOTES.md).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.quantized_matmul import block_size


def _grouped_matmul_kernel(block_expert_ref, x_ref, w_ref, *refs, num_experts: int, block_m: int, block_n: int,
                           block_k: int):
    scale_ref, o_ref = refs if len(refs) == 2 else (None, refs[0])
    b, n = pl.program_id(0), pl.program_id(1)
    expert = block_expert_ref[b]
    rows = pl.ds(pl.multiple_of(b * block_m, block_m), block_m)
    cols = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)

    @pl.when(expert < num_experts)
    def _():
        def step(i, acc):
            ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
            w = w_ref[expert, ks, cols].astype(x_ref.dtype)  # int8 weights: exact in bf16 / f32
            return acc + jnp.dot(x_ref[rows, ks], w, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, x_ref.shape[1] // block_k, step, jnp.zeros((block_m, block_n), jnp.float32))
        if scale_ref is not None:
            acc = acc * scale_ref[expert, cols][None, :]
        o_ref[...] = acc.astype(o_ref.dtype)

    @pl.when(expert >= num_experts)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def _check_shapes(x, w, block_expert, scale) -> int:
    """``block_m``: the rows of a block, after checking the operands agree."""
    rows, k = x.shape
    if w.ndim != 3 or w.shape[1] != k:
        raise ValueError(f"the grouped matmul needs x[R, K] and w[E, K, N]; got {x.shape} and {w.shape}")
    if (scale is None) != (w.dtype != jnp.int8) or (scale is not None and scale.shape != (w.shape[0], w.shape[2])):
        raise ValueError(f"int8 weights need their scale[E, N] and other weights none; got {w.dtype} weights and "
                         f"scale {None if scale is None else scale.shape}")
    if block_expert.ndim != 1 or not block_expert.shape[0] or rows % block_expert.shape[0]:
        raise ValueError(f"block_expert {block_expert.shape} must name the expert of each equal block of {rows} rows")
    return rows // block_expert.shape[0]


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "num_warps", "interpret"))
def grouped_matmul(x: jax.Array, w: jax.Array, block_expert: jax.Array, scale: Optional[jax.Array] = None, *,
                   block_n: int = 64, block_k: int = 64, num_warps: int = 4,
                   interpret: Optional[bool] = None) -> jax.Array:
    """``y[R, N]`` (x's dtype): each block of rows of ``x[R, K]`` times its expert's ``w[E, K, N]`` (module doc);
    int8 ``w`` with its per-column ``scale[E, N]`` (``models.quantization.Int8Weight``): ``w * scale``."""
    block_m = _check_shapes(x, w, block_expert, scale)
    num_experts, k, n = w.shape
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    block = functools.partial(block_size, kernel="the grouped matmul")
    block_n, block_k = block(n, block_n, "N"), block(k, block_k, "K")
    kernel = functools.partial(_grouped_matmul_kernel, num_experts=num_experts, block_m=block_m, block_n=block_n,
                               block_k=block_k)
    return pl.pallas_call(
        kernel,
        grid=(block_expert.shape[0], n // block_n),
        in_specs=[pl.no_block_spec] * (3 if scale is None else 4),
        out_specs=pl.BlockSpec((block_m, block_n), lambda b, j: (b, j)),
        out_shape=jax.ShapeDtypeStruct((x.shape[0], n), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="moe_grouped_matmul" if scale is None else "moe_grouped_matmul_int8",
    )(block_expert.astype(jnp.int32), x, w, *(() if scale is None else (scale,)))


def grouped_matmul_reference(x: jax.Array, w: jax.Array, block_expert: jax.Array,
                             scale: Optional[jax.Array] = None) -> jax.Array:
    """The same product in jnp: every block times its expert's gathered weight (zeros past the last expert)."""
    block_m = _check_shapes(x, w, block_expert, scale)
    blocks = x.reshape(block_expert.shape[0], block_m, x.shape[1])
    used = block_expert < w.shape[0]
    expert = jnp.where(used, block_expert, 0)
    y = jnp.einsum("bmk,bkn->bmn", blocks, w[expert].astype(x.dtype), preferred_element_type=jnp.float32)
    if scale is not None:
        y = y * scale[expert][:, None, :]
    return jnp.where(used[:, None, None], y, 0).astype(x.dtype).reshape(x.shape[0], -1)
