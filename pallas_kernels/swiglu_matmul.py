"""Gate/up projection with the SwiGLU product in its epilogue: ``silu(x @ W_gate) * (x @ W_up)``.

A Llama MLP multiplies its input by the joined gate/up weight ``W[K, 2I]`` (``models.llama``'s
``w_gate_up``: gate columns ``[0, I)``, up columns ``[I, 2I)``), and XLA then reads the
``[M, 2I]`` product back in a pass of its own to write ``silu(gate) * up`` (``[M, I]``): 11.7 ms
of a 372 ms 16k-token prompt step on an H200 (run 18a), and XLA fuses it into neither GEMM
(run 19c). Here each program computes a ``block_m x block_n`` tile of gate and the matching tile
of up from the same ``x`` tiles (two tensor-core dots a K step) and writes only their product, so
the ``[M, 2I]`` intermediate never reaches memory.

Grid: one axis of ``(M / block_m) * (I / block_n)`` programs in groups of ``group_m`` row tiles
(Triton's grouped order: the programs in flight share a few ``x`` row tiles and a band of
weight columns in L2). ``M`` is padded to whole row tiles.

``swiglu_matmul_reference`` is the plain jnp form (float32 dot, split, product).

Measured (run 21b, H200, ``scripts/bench_swiglu.py``): the product's pass goes, but the GEMM does not keep
cuBLAS's pace: 16384 x 4096 x 28672 in 6.44 ms at its best tiling (598 TFLOP/s) against XLA's 5.77 ms for
cuBLAS's GEMM (5.47, 703 TFLOP/s) and the product pass; 1024 rows 384 against 355 us. So the model does not use it
(``models.quantization.SWIGLU_MIN_ROWS``): the epilogue needs a GEMM at cuBLAS's rate (TMA, warp-specialised
wgmma: a Mosaic GPU kernel), not this Triton one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.env_config import dataclass_from_env
from pallas_kernels.quantized_matmul import pad_rows


@dataclasses.dataclass(frozen=True)
class SwigluConfig:
    """Tile sizes and Triton launch parameters; ``block_m`` shrinks to fit fewer rows
    (``quantized_matmul.pad_rows``). ``block_n`` must divide I and ``block_k`` K."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


def default_config() -> SwigluConfig:
    """``SwigluConfig()`` with fields from ``$PAGEDJAX_SWIGLU_CONFIG`` (JSON), for timing tilings in the model."""
    return dataclass_from_env(SwigluConfig, "PAGEDJAX_SWIGLU_CONFIG")


def _column_tiles(K: int, two_i: int, config: SwigluConfig) -> Optional[tuple[int, int]]:
    """``(block_n, block_k)`` of ``config`` for a ``[K, 2I]`` weight (capped at I and K), or None where they do not
    divide it."""
    half = two_i // 2
    block_n, block_k = min(config.block_n, half), min(config.block_k, K)
    return (block_n, block_k) if two_i % 2 == 0 and half % block_n == 0 and K % block_k == 0 else None


def supported(K: int, two_i: int, config: Optional[SwigluConfig] = None) -> bool:
    """Whether the tiles of ``config`` (default: ``default_config()``) divide a ``[K, 2I]`` weight."""
    return _column_tiles(K, two_i, config or default_config()) is not None


def swiglu_matmul_reference(x: jax.Array, w_gate_up: jax.Array) -> jax.Array:
    """``silu(x @ W[:, :I]) * (x @ W[:, I:])`` in float32, cast to ``x.dtype``."""
    gate_up = jnp.dot(x, w_gate_up, preferred_element_type=jnp.float32)
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return (jax.nn.silu(gate) * up).astype(x.dtype)


def _swiglu_kernel(x_ref, w_ref, o_ref, *, block_m: int, block_n: int, block_k: int, steps: int, half: int,
                   num_m: int, group_m: int):
    pid = pl.program_id(0)
    num_n = half // block_n
    per_group = group_m * num_n
    first_m = (pid // per_group) * group_m
    size_m = jnp.minimum(num_m - first_m, group_m)  # the last group may have fewer row tiles
    m = first_m + (pid % per_group) % size_m
    n = (pid % per_group) // size_m
    rows = pl.ds(pl.multiple_of(m * block_m, block_m), block_m)
    gate_cols = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)
    up_cols = pl.ds(pl.multiple_of(half + n * block_n, block_n), block_n)

    def step(i, accs):
        k = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        x = x_ref[rows, k]
        gate, up = accs
        gate += jnp.dot(x, w_ref[k, gate_cols], preferred_element_type=jnp.float32)
        up += jnp.dot(x, w_ref[k, up_cols], preferred_element_type=jnp.float32)
        return gate, up

    zeros = jnp.zeros((block_m, block_n), jnp.float32)
    gate, up = lax.fori_loop(0, steps, step, (zeros, zeros))
    o_ref[rows, gate_cols] = (gate / (1.0 + jnp.exp(-gate)) * up).astype(o_ref.dtype)


def swiglu_matmul(x: jax.Array, w_gate_up: jax.Array, *, config: Optional[SwigluConfig] = None,
                  interpret: Optional[bool] = None) -> jax.Array:
    """``silu(x @ W[:, :I]) * (x @ W[:, I:])`` for ``x[M, K]``, ``W[K, 2I]`` of one dtype; ``[M, I]`` in x's dtype.

    ``interpret=None`` compiles on GPU and interprets elsewhere. Raises ``ValueError`` for shapes the
    tiles do not divide."""
    config = config or default_config()
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    M, K = x.shape
    if w_gate_up.ndim != 2 or w_gate_up.shape[0] != K or w_gate_up.shape[1] % 2:
        raise ValueError(f"w_gate_up must be [K={K}, 2I], got shape {w_gate_up.shape}")
    half = w_gate_up.shape[1] // 2
    tiles = _column_tiles(K, 2 * half, config)
    if tiles is None:
        raise ValueError(f"block_n={min(config.block_n, half)} must divide I={half} and "
                         f"block_k={min(config.block_k, K)} must divide K={K}")
    block_n, block_k = tiles
    x, block_m = pad_rows(x, config.block_m)
    num_m = x.shape[0] // block_m
    kernel = functools.partial(_swiglu_kernel, block_m=block_m, block_n=block_n, block_k=block_k,
                               steps=K // block_k, half=half, num_m=num_m, group_m=config.group_m)
    out = pl.pallas_call(
        kernel,
        grid=(num_m * (half // block_n),),
        in_specs=[pl.no_block_spec, pl.no_block_spec],
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct((num_m * block_m, half), x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="swiglu_matmul",
    )(x, w_gate_up)
    return out[:M]
