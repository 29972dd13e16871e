"""RMSNorm, the normalization of every supported model (Llama, Qwen, Mistral, SmolLM), and its deferred form at one
row (``DeferredNorm``: the scaling left to the GEMVs that read the normed row)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from pallas_kernels.deferred_norm import add_norm_rows, norm_rows_reference
from pallas_kernels.quantized_matmul import add_splits


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def add_rms_norm(x: jax.Array, parts: jax.Array, weight: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """``(x + sum(parts), its rms_norm)`` in x's dtype: XLA's path, whose K-split sum (``parts``) fuses into the add."""
    x = x + add_splits(parts, x.dtype)
    return x, rms_norm(x, weight, eps)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeferredNorm:
    """One row's RMSNorm left to the GEMVs that read it (``pallas_kernels.deferred_norm``): ``rows = x * weight``
    and the row's blocks' sums of squares ``sum_sq``, from which a GEMV scales its output. ``value()`` is the normed
    row itself, ``rms_norm(x, weight, eps)``, for every other reader (XLA computes it only where one reads it)."""

    x: jax.Array
    weight: jax.Array
    rows: jax.Array
    sum_sq: jax.Array
    eps: float = dataclasses.field(metadata=dict(static=True))

    def value(self) -> jax.Array:
        return rms_norm(self.x, self.weight, self.eps)


def normed(h) -> jax.Array:
    """A block's input as an array: a ``DeferredNorm``'s normed row, else ``h`` as it is."""
    return h.value() if isinstance(h, DeferredNorm) else h


def add_deferred_norm(x: jax.Array, parts: jax.Array, weight: jax.Array, eps: float,
                      interpret: Optional[bool] = None) -> tuple[jax.Array, DeferredNorm]:
    """``add_rms_norm`` at one row with the norm deferred: one launch (``add_norm_rows``; ``interpret``: None runs it
    compiled on a GPU, interpreted elsewhere) for the add, the rows ``x * weight`` and their sums of squares."""
    x, rows, sum_sq = add_norm_rows(x, parts, weight, interpret=interpret)
    return x, DeferredNorm(x=x, weight=weight, rows=rows, sum_sq=sum_sq, eps=eps)


def defer_norm(x: jax.Array, weight: jax.Array, eps: float) -> DeferredNorm:
    """A row's RMSNorm deferred, in jnp (the first layer's input, which no residual add precedes)."""
    rows, sum_sq = norm_rows_reference(x, weight)
    return DeferredNorm(x=x, weight=weight, rows=rows, sum_sq=sum_sq, eps=eps)
