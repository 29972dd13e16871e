"""Residual add and RMSNorm in one kernel: ``x + sum(parts)`` and its RMSNorm, for steps of a few rows.

A Llama layer adds each of two projections (``wo``, ``w_down``) to the residual stream and normalizes the sum
for the next matmul. At one row XLA runs that as three small kernels (the add, the sum of squares, the scaling;
~1.3 us each on an H200, run 25b's profile), and the one-row GEMVs before it leave their K-split partial sums for
XLA to add first. Here one program a row reads the partials, adds them and the residual, and writes both the new
residual and its normalized copy: one launch instead of three.

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
    """The kernel holds a row as one power-of-two block."""
    return hidden_size >= 16 and hidden_size & (hidden_size - 1) == 0


def _add_rms_norm_kernel(x_ref, parts_ref, w_ref, x_out_ref, h_out_ref, *, eps: float, num_parts: int):
    """One row: its parts summed in float32 and rounded to x's dtype, added to x (rounded), then normalized."""
    t = pl.program_id(0)
    dtype = x_ref.dtype
    y = parts_ref[0, t, :].astype(jnp.float32)
    for p in range(1, num_parts):
        y = y + parts_ref[p, t, :].astype(jnp.float32)
    x = (x_ref[t, :].astype(jnp.float32) + y.astype(dtype).astype(jnp.float32)).astype(dtype)
    x_out_ref[t, :] = x
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32) + eps)
    h_out_ref[t, :] = (x32 * inv_rms * w_ref[...].astype(jnp.float32)).astype(dtype)


@functools.partial(jax.jit, static_argnames=("eps", "num_warps", "interpret"))
def add_rms_norm(x: jax.Array, parts: jax.Array, weight: jax.Array, *, eps: float, num_warps: int = 8,
                 interpret: Optional[bool] = None):
    """Pallas (Triton) ``add_rms_norm_reference``: ``x[T, D]``, ``parts[P, T, D]``, ``weight[D]``; grid ``(T,)``.

    ``interpret=None`` compiles on GPU and interprets elsewhere. Raises ``ValueError`` for inconsistent shapes or
    a hidden size the kernel does not hold (``supported``)."""
    T, D = x.shape
    if parts.ndim != 3 or parts.shape[1:] != (T, D) or weight.shape != (D,):
        raise ValueError(f"add_rms_norm needs x [T, D], parts [P, T, D] and weight [D]; got {x.shape}, "
                         f"{parts.shape}, {weight.shape}")
    if not supported(D):
        raise ValueError(f"add_rms_norm needs a power-of-two hidden size of at least 16, got {D}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return pl.pallas_call(
        functools.partial(_add_rms_norm_kernel, eps=eps, num_parts=parts.shape[0]),
        grid=(T,),
        in_specs=[pl.no_block_spec] * 3,
        out_specs=[pl.no_block_spec] * 2,
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype)),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="add_rms_norm",
    )(x, parts, weight)
