"""Residual add and RMSNorm in one launch: ``x + sum(parts)`` and its ``rms_norm``.

Between a decoder layer's projections the model adds a matmul's result to the residual stream and
normalizes the sum for the next matmul. XLA compiles that as three kernels: the add (which also sums
the one-row GEMVs' K-split partials), the norm's reduction and its scaling. At batch-1 decode each is
a ~1.3 us launch that moves a few KB (run 28b, H200: 6 of a layer's 9 small launches, two such sites
a layer). Here one program per row reads the residual row and the partials, writes the new residual
row and its normalized form, so a site is one launch.

``parts[P, T, N]``: the matmul's result as ``P`` partial sums (a GEMV's K splits, float32; ``P = 1``
for a plain result, in x's dtype), summed and rounded to x's dtype (``quantized_matmul.add_splits``),
then added to ``x`` in x's dtype: the same roundings as the unfused ``x + y`` then ``rms_norm``.
``add_rms_norm_reference`` is that unfused form. Rows are whole programs, so the kernel is for few
rows (decode batches); ``supported`` says for which widths (a power of two: Triton's block shapes).

Measured (run 28c, H200, the 8B at batch 1): slower than XLA's three launches, so the model leaves it off
(``models.quantization.ADD_NORM_MAX_ROWS``). One program pulls a row's partials through one multiprocessor: 5.5 us
after wo and 12.8 us after w_down's K-split partials (AWQ; the step's kernels 2,690 -> 3,030 us), 3.0 us for bf16
(whose GEMM's own split-K sum then runs apart: level). It needs the row spread over programs to pay.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.quantized_matmul import add_splits


def add_rms_norm_reference(x: jax.Array, parts: jax.Array, weight: jax.Array, eps: float
                           ) -> tuple[jax.Array, jax.Array]:
    """``(x + sum(parts), rms_norm(x + sum(parts), weight, eps))``, both in x's dtype (the norm as
    ``models.norm.rms_norm``: float32, scaled by ``1 / sqrt(mean(x^2) + eps)``, then by the weight)."""
    x = x + add_splits(parts, x.dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x, (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def supported(num_columns: int) -> bool:
    """Whether the kernel takes rows of ``num_columns`` (a power of two of at least 32)."""
    return num_columns >= 32 and num_columns & (num_columns - 1) == 0


def _kernel(x_ref, parts_ref, w_ref, x_out, h_out, *, eps: float):
    """One row: ``parts_ref`` is the whole ``[P, T, N]`` array (a block over P would need P a power of two)."""
    t = pl.program_id(0)
    dtype = x_out.dtype
    y = parts_ref[0, t, :].astype(jnp.float32)
    for p in range(1, parts_ref.shape[0]):
        y = y + parts_ref[p, t, :].astype(jnp.float32)
    x = (x_ref[0, :].astype(jnp.float32) + y.astype(dtype).astype(jnp.float32)).astype(dtype)
    x_out[0, :] = x
    x32 = x.astype(jnp.float32)
    inv_rms = lax.rsqrt(jnp.sum(x32 * x32) / x32.shape[0] + eps)
    h_out[0, :] = (x32 * inv_rms * w_ref[...].astype(jnp.float32)).astype(dtype)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def add_rms_norm(x: jax.Array, parts: jax.Array, weight: jax.Array, *, eps: float,
                 interpret: Optional[bool] = None) -> tuple[jax.Array, jax.Array]:
    """Pallas (Triton) form of ``add_rms_norm_reference``: grid ``(T,)``, one row a program. ``x[T, N]``,
    ``parts[P, T, N]``, ``weight[N]``. Raises ``ValueError`` for inconsistent shapes or an unsupported width."""
    if x.ndim != 2 or parts.ndim != 3 or parts.shape[1:] != x.shape or weight.shape != x.shape[1:]:
        raise ValueError(f"need x [T, N], parts [P, T, N] and weight [N]; got {x.shape}, {parts.shape}, "
                         f"{weight.shape}")
    T, N = x.shape
    if not supported(N):
        raise ValueError(f"the kernel needs a power-of-two row width >= 32, got {N}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    row = pl.BlockSpec((1, N), lambda t: (t, 0))
    return pl.pallas_call(
        functools.partial(_kernel, eps=eps),
        grid=(T,),
        in_specs=[row, pl.no_block_spec, pl.BlockSpec((N,), lambda t: (0,))],
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype)] * 2,
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="add_rms_norm",
    )(x, parts, weight)
