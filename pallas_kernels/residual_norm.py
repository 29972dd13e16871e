"""Residual add and RMSNorm in one kernel: ``x + sum(parts)`` and its RMSNorm, for steps of a few rows.

A Llama layer adds each of two projections (``wo``, ``w_down``) to the residual stream and normalizes the sum
for the next matmul. At one row XLA runs that as three small kernels (the add, the sum of squares, the scaling;
~1.3 us each on an H200, run 25b's profile), and the one-row GEMVs before it leave their K-split partial sums for
XLA to add first. Here the work of a row is spread over programs of ``CHUNK`` columns (a row's partials can be
hundreds of kB: one program a row read them on one multiprocessor at ~50 GB/s, 9.5 us a call in run 25c): the first
launch adds the partials and the residual and keeps each chunk's sum of squares, the second scales: two launches
instead of three.

``parts[P, T, D]``: a projection's output as parts whose sum over P is it (``quantized_matmul``'s ``sum_splits=False``:
float32 partial sums when P > 1, else the output itself). The rounding is the unfused one's: the parts' sum rounded
to ``x``'s dtype, the residual sum rounded, then the norm in float32.

``add_rms_norm_reference`` is the plain jnp form.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.quantized_matmul import sum_parts


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis in float32, scaled by ``weight``, in ``x``'s dtype (the model's norm)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def add_rms_norm_reference(x: jax.Array, parts: jax.Array, weight: jax.Array, *, eps: float):
    """``(x + sum(parts), rms_norm(x + sum(parts)) * weight)``."""
    x = x + sum_parts(parts, x.dtype)
    return x, rms_norm(x, weight, eps)


def supported(hidden_size: int) -> bool:
    """The kernels take a row in power-of-two chunks."""
    return hidden_size >= 16 and hidden_size & (hidden_size - 1) == 0


CHUNK = 256  # columns a program


def _add_kernel(x_ref, parts_ref, x_out_ref, sumsq_ref, *, num_parts: int, chunk: int):
    """Row t's column chunk c: its parts summed in float32 and rounded to x's dtype, added to x (rounded); the new
    residual stored with the chunk's sum of squares."""
    t, c = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
    dtype = x_ref.dtype
    y = parts_ref[0, t, cols].astype(jnp.float32)
    for p in range(1, num_parts):
        y = y + parts_ref[p, t, cols].astype(jnp.float32)
    x = (x_ref[t, cols].astype(jnp.float32) + y.astype(dtype).astype(jnp.float32)).astype(dtype)
    x_out_ref[t, cols] = x
    x32 = x.astype(jnp.float32)
    sumsq_ref[t, pl.ds(c, 1)] = jnp.sum(x32 * x32, keepdims=True)


def _scale_kernel(x_ref, sumsq_ref, w_ref, h_ref, *, eps: float, chunk: int):
    """Row t's column chunk c scaled by the row's inverse RMS (from every chunk's sum of squares) and the weight."""
    t, c = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(pl.multiple_of(c * chunk, chunk), chunk)
    inv_rms = jax.lax.rsqrt(jnp.sum(sumsq_ref[t, :]) / x_ref.shape[1] + eps)
    h_ref[t, cols] = (x_ref[t, cols].astype(jnp.float32) * inv_rms * w_ref[cols].astype(jnp.float32)).astype(
        h_ref.dtype)


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def add_rms_norm(x: jax.Array, parts: jax.Array, weight: jax.Array, *, eps: float, num_warps: int = 2,
                 interpret: Optional[bool] = None):
    """Pallas (Triton) ``add_rms_norm_reference``: ``x[T, D]``, ``parts[P, T, D]``, ``weight[D]``. Two launches
    over ``(T, D / CHUNK)`` programs: the sum and residual add with each chunk's sum of squares, then the scaling.

    ``interpret=None`` compiles on GPU and interprets elsewhere. Raises ``ValueError`` for inconsistent shapes or
    a hidden size the kernels do not take (``supported``)."""
    T, D = x.shape
    if parts.ndim != 3 or parts.shape[1:] != (T, D) or weight.shape != (D,):
        raise ValueError(f"add_rms_norm needs x [T, D], parts [P, T, D] and weight [D]; got {x.shape}, "
                         f"{parts.shape}, {weight.shape}")
    if not supported(D):
        raise ValueError(f"add_rms_norm needs a power-of-two hidden size of at least 16, got {D}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    chunk = min(CHUNK, D)
    grid = (T, D // chunk)
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=1)
    x, sumsq = pl.pallas_call(
        functools.partial(_add_kernel, num_parts=parts.shape[0], chunk=chunk),
        grid=grid,
        in_specs=[pl.no_block_spec] * 2,
        out_specs=[pl.no_block_spec] * 2,
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((T, D // chunk), jnp.float32)),
        compiler_params=params,
        interpret=interpret,
        name="add_residual",
    )(x, parts)
    h = pl.pallas_call(
        functools.partial(_scale_kernel, eps=eps, chunk=chunk),
        grid=grid,
        in_specs=[pl.no_block_spec] * 3,
        out_specs=pl.no_block_spec,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=params,
        interpret=interpret,
        name="rms_scale",
    )(x, sumsq, weight)
    return x, h
