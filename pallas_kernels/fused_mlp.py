"""A decode row's MLP in one launch: ``silu(x @ W_gate) * (x @ W_up) @ W_down`` for int8 K-major weights, as
partial sums over slices of the intermediate dimension.

At one row the MLP is three launches: the gate/up GEMV, the SwiGLU product, and the down GEMV. Each GEMV pays a fixed
ramp and drain (~3-5 us on an H200: NOTES.md, runs 31a-32a), which weighs most in a quantized step (int8: 2.84 ms,
of which ~0.5 ms is such fixed costs). Here program ``j`` owns the slice ``[j B, (j + 1) B)`` of the intermediate
dimension ``I``:

1. it streams those ``B`` rows of ``W_gate`` and of ``W_up`` (K-major ``[2I, H]``: gate rows, then up rows; ``B x H``
   contiguous bytes each), summing over K once after the loop, as the K-major GEMV does
   (``quantized_matmul.int8_kmajor_matmul``);
2. forms the slice's SwiGLU products ``h_j`` (gate and up rounded to x's dtype first, and ``h_j`` after, as the
   three-launch path rounds its outputs);
3. multiplies ``h_j`` into the ``B`` columns of ``W_down`` (K-major ``[H, I]``: ``B`` contiguous bytes in each of its
   ``H`` rows), writing ``h_j @ W_down[jB:(j+1)B]``: one partial sum of the output.

No program waits for another (no grid-wide barrier, nothing that can deadlock), and the result is deterministic. The
``I / B`` partials (float32 ``[I/B, 1, H]``) go to the residual add after the MLP, where XLA fuses their sum
(``models.norm.add_rms_norm``). That sum is the price: 224 x 4096 float32 (3.7 MB) for the 8B at ``B = 64``, written
and read back through L2, against a launch, its ramp and the SwiGLU launch saved.

Opt-in (``$PAGEDJAX_FUSED_MLP=1``, ``models.quantization.LinearBackend.fused_mlp``) until timed on a GPU; tiles in
``MatmulConfig.mlp_*``. ``fused_mlp_reference`` is the three-launch path's math in jnp.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.quantized_matmul import (MatmulConfig, block_size, default_config, gemv_loop_settings,
                                             integers_as_f32, int8_kmajor_matmul_reference, multiply_add, step_loop)


def _fused_mlp_kernel(x_ref, gu_ref, gu_scale_ref, d_ref, d_scale_ref, o_ref, *, inter: int, block_i: int,
                      block_k: int, block_h: int, convert: str, prefetch: int, fma: bool):
    """Program ``j``: the slice's gate and up rows over all of K, their SwiGLU products, then those times the slice's
    columns of ``W_down``, ``block_h`` output rows a step, into ``o_ref`` (this program's row of partial sums)."""
    hidden = x_ref.shape[1]
    j = pl.program_id(0)
    gate_rows = j * block_i + jnp.arange(block_i, dtype=jnp.int32)
    up_rows = gate_rows + inter

    def load_gate_up(i):  # past the last step, the last (the pair loop's look-ahead)
        ks = (jnp.minimum(i, hidden // block_k - 1) * block_k + jnp.arange(block_k, dtype=jnp.int32))[None, :]
        return tuple(pltriton.load(gu_ref.at[rows[:, None], ks], eviction_policy="evict_first")
                     for rows in (gate_rows, up_rows))

    def gate_up_step(i, acc, tiles):
        ks = (i * block_k + jnp.arange(block_k, dtype=jnp.int32))[None, :]
        # x's slice repeated down a tile of the weights' shape (their register layout: no conversion)
        x = pltriton.load(x_ref.at[jnp.zeros((block_i, 1), jnp.int32), ks]).astype(jnp.float32)
        return tuple(multiply_add(x, integers_as_f32(w, "int8", convert), a, fma) for w, a in zip(tiles, acc))

    zeros = jnp.zeros((block_i, block_k), jnp.float32)
    gate_acc, up_acc = step_loop(hidden // block_k, load_gate_up, gate_up_step, (zeros, zeros), prefetch)
    dtype = x_ref.dtype
    gate = (jnp.sum(gate_acc, axis=1) * pltriton.load(gu_scale_ref.at[gate_rows])).astype(dtype).astype(jnp.float32)
    up = (jnp.sum(up_acc, axis=1) * pltriton.load(gu_scale_ref.at[up_rows])).astype(dtype).astype(jnp.float32)
    h = (gate / (1.0 + jnp.exp(-gate)) * up).astype(dtype).astype(jnp.float32)[None, :]

    def load_down(i):
        rows = (jnp.minimum(i, hidden // block_h - 1) * block_h + jnp.arange(block_h, dtype=jnp.int32))[:, None]
        return pltriton.load(d_ref.at[rows, gate_rows[None, :]], eviction_policy="evict_first")

    def down_step(i, done, w):
        rows = pl.ds(pl.multiple_of(i * block_h, block_h), block_h)
        part = jnp.sum(integers_as_f32(w, "int8", convert) * h, axis=1)
        o_ref[rows] = part * d_scale_ref[rows]
        return done

    step_loop(hidden // block_h, load_down, down_step, jnp.zeros((), jnp.int32), prefetch)


def _check_shapes(x, gu_q, gu_scale, d_q, d_scale) -> tuple[int, int]:
    """``(H, I)`` of the MLP, after checking that the weights are int8 K-major gate/up ``[2I, H]`` and down ``[H, I]``
    and that ``x`` is one row of ``H``."""
    two_i, hidden = gu_q.shape
    inter = two_i // 2
    if (gu_q.dtype != jnp.int8 or d_q.dtype != jnp.int8 or two_i % 2 or d_q.shape != (hidden, inter)
            or gu_scale.shape != (two_i,) or d_scale.shape != (hidden,)):
        raise ValueError(f"the fused MLP needs int8 K-major gate/up [2I, H] and down [H, I] with their scales; got "
                         f"{gu_q.dtype}{gu_q.shape}, {gu_scale.shape}, {d_q.dtype}{d_q.shape}, {d_scale.shape}")
    if x.shape != (1, hidden):
        raise ValueError(f"the fused MLP takes one row x[1, H={hidden}], got shape {x.shape}")
    return hidden, inter


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def fused_mlp(x, gu_q, gu_scale, d_q, d_scale, *, config: Optional[MatmulConfig] = None,
              interpret: Optional[bool] = None) -> jax.Array:
    """``silu(g) * u @ W_down`` for one row ``x[1, H]``, ``[g | u] = x @ W_gate_up``, both int8 K-major
    (``models.quantization.Int8KMajorWeight``): float32 partial sums ``[I / B, 1, H]``, ``B = config.mlp_block_i``
    (at most; the largest power of two dividing I)."""
    hidden, inter = _check_shapes(x, gu_q, gu_scale, d_q, d_scale)
    config = config or default_config()
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    prefetch, convert = gemv_loop_settings("int8", config, interpret, default_prefetch=1)
    block = functools.partial(block_size, kernel="the fused MLP")
    block_i = block(inter, config.mlp_block_i, "I")
    kernel = functools.partial(_fused_mlp_kernel, inter=inter, block_i=block_i,
                               block_k=block(hidden, config.mlp_block_k, "H"),
                               block_h=block(hidden, config.mlp_block_h, "H"), convert=convert, prefetch=prefetch,
                               fma=config.gemv_fma and not interpret)
    out = pl.pallas_call(
        kernel,
        grid=(inter // block_i,),
        in_specs=[pl.no_block_spec] * 5,
        out_specs=pl.BlockSpec((None, hidden), lambda j: (j, 0)),
        out_shape=jax.ShapeDtypeStruct((inter // block_i, hidden), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=config.mlp_num_warps, num_stages=1),
        interpret=interpret,
        name="int8_fused_mlp",
    )(x, gu_q, gu_scale, d_q, d_scale)
    return out[:, None, :]


def fused_mlp_reference(x, gu_q, gu_scale, d_q, d_scale) -> jax.Array:
    """The three-launch path's math: ``[1, H]`` in x's dtype (gate, up and their product rounded to it)."""
    _, inter = _check_shapes(x, gu_q, gu_scale, d_q, d_scale)
    gate_up = int8_kmajor_matmul_reference(x, gu_q, gu_scale).astype(x.dtype)
    gate, up = gate_up[:, :inter], gate_up[:, inter:]
    return int8_kmajor_matmul_reference((jax.nn.silu(gate) * up).astype(x.dtype), d_q, d_scale)
