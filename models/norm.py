"""RMSNorm, the normalization of every supported model (Llama, Qwen, Mistral, SmolLM)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
