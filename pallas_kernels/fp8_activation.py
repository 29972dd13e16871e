"""A gated MLP's middle with fp8 weights, in one pass: the gate/up product's scales, the activation and the down
matmul's per-row fp8 quantization.

With fp8 weights (``models.quantization.Fp8Weight``) the MLP runs ``acc = fp8(h) @ W_gate_up`` (unscaled, as the
tensor cores give it), then ``hidden = act(gate) * up`` with ``gate, up = acc * row_scale * col_scale``, then
quantizes ``hidden`` by the abs-max of each row for the down matmul. XLA writes that middle as a row reduction (the
abs-max) and an elementwise pass (scale, convert), each reading all of ``acc`` (``[T, 2N]``): on an H100 the two
took 1.4 ms a layer of the 8B's 240 ms prompt step at 16,384 tokens, and 0.1 ms a layer of its 25 ms decode step
at 1,024 rows (run 41a), at ~1.2-1.5 TB/s. This kernel reads ``acc`` once and writes the fp8 rows and their scales:
0.64 ms and 45 us a layer there (run 41c; ``tput-short`` with fp8 weights +6.2%).

Grid: one program a row. The row's activations stay in registers, in chunks of ``chunk`` columns (a power of two
that divides N; Triton's tensors are powers of two), until the row's abs-max is known; then each chunk is scaled,
converted and stored. So N is bounded by the registers: ``MAX_COLUMNS``.

``gated_activation_fp8_reference`` is the same computation in jnp, and the path everywhere the kernel does not run
(CPU, a tensor-parallel mesh, wider rows).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

FP8_MAX = float(jnp.finfo(jnp.float8_e4m3fn).max)  # 448
ACTIVATIONS = ("silu", "gelu_tanh")
MAX_CHUNK = 2048
MAX_CHUNKS = 64
MAX_COLUMNS = 16384  # a row's f32 activations over 8 warps: 64 registers a thread


def apply_activation(name: str, x: jax.Array) -> jax.Array:
    """A gated MLP's activation by its name in ``ACTIVATIONS`` (SiLU, or tanh-approximated GELU)."""
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def quantize_rows_fp8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(xq, scale)``: ``x[..., K]`` as float8 e4m3 by the abs-max of each row, ``x ~ xq * scale[..., 1]``."""
    x32 = x.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(x32), axis=-1, keepdims=True), 1e-12) / FP8_MAX
    return (x32 / scale).astype(jnp.float8_e4m3fn), scale


def gated_activation_fp8_reference(acc: jax.Array, row_scale: jax.Array, col_scale: jax.Array, *,
                                   activation: str = "silu", dtype=jnp.bfloat16) -> tuple[jax.Array, jax.Array]:
    """``quantize_rows_fp8(act(gate) * up)`` with ``[gate | up] = (acc * row_scale * col_scale)`` rounded to
    ``dtype`` (the activations' type), as the unfused model computes it. ``acc[T, 2N]``, ``row_scale[T, 1]``,
    ``col_scale[2N]``; returns ``(q[T, N] float8_e4m3fn, scale[T, 1] float32)``."""
    gate_up = (acc.astype(jnp.float32) * row_scale * col_scale).astype(dtype)
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return quantize_rows_fp8(apply_activation(activation, gate) * up)


def _chunk_size(n: int, max_chunk: int = MAX_CHUNK) -> Optional[int]:
    """The largest power of two up to ``max_chunk`` that divides ``n`` in at most ``MAX_CHUNKS`` chunks (the
    kernel unrolls its loop over them), else None."""
    chunk = max_chunk
    while chunk >= 16 and n // chunk <= MAX_CHUNKS:
        if n % chunk == 0:
            return chunk
        chunk //= 2
    return None


def kernel_fits(n: int) -> bool:
    """Whether the kernel takes rows of ``n`` activations (``2n`` columns of ``acc``)."""
    return n <= MAX_COLUMNS and _chunk_size(n) is not None


def _kernel(acc_ref, row_scale_ref, col_scale_ref, q_ref, scale_ref, *, n: int, chunk: int, activation: str,
            dtype):
    row = pl.ds(pl.program_id(0), 1)
    row_scale = row_scale_ref[row].astype(jnp.float32)[:, None]  # [1, 1]

    def part(start: int) -> jax.Array:
        cols = pl.ds(start, chunk)
        scaled = acc_ref[row, cols].astype(jnp.float32) * row_scale * col_scale_ref[cols][None, :]
        return scaled.astype(dtype).astype(jnp.float32)

    hidden = []
    for start in range(0, n, chunk):  # unrolled: every chunk stays live in registers
        gate, up = part(start), part(n + start)
        if activation == "silu":
            act = gate / (1.0 + jnp.exp(-gate))
        else:  # tanh-GELU as x * sigmoid(2y), the same value: 0.5 * (1 + tanh(y)) cancels where tanh(y) ~ -1
            inner = 1.5957691216057308 * (gate + 0.044715 * gate * gate * gate)
            act = gate / (1.0 + jnp.exp(-inner))
        hidden.append((act.astype(dtype).astype(jnp.float32) * up).astype(dtype).astype(jnp.float32))
    peak = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(h), axis=1) for h in hidden])  # [1]
    scale = jnp.maximum(peak, 1e-12) / FP8_MAX
    scale_ref[row] = scale
    for i, h in enumerate(hidden):
        q_ref[row, pl.ds(i * chunk, chunk)] = (h / scale[:, None]).astype(jnp.float8_e4m3fn)


def gated_activation_fp8(acc: jax.Array, row_scale: jax.Array, col_scale: jax.Array, *, activation: str = "silu",
                         dtype=jnp.bfloat16, interpret: Optional[bool] = None, num_warps: Optional[int] = None,
                         max_chunk: int = MAX_CHUNK) -> tuple[jax.Array, jax.Array]:
    """``gated_activation_fp8_reference`` in one Pallas kernel (shapes there; ``kernel_fits(N)`` must hold).
    ``interpret``: None runs it compiled on a GPU and interpreted elsewhere. ``num_warps`` (None: 8 for rows over
    4,096 activations, else 4) and ``max_chunk``: the settings ``scripts/bench_fp8_activation.py`` sweeps."""
    T, two_n = acc.shape
    n = two_n // 2
    if two_n % 2 or row_scale.shape != (T, 1) or col_scale.shape != (two_n,):
        raise ValueError(f"want acc[T, 2N], row_scale[T, 1], col_scale[2N]; got {acc.shape}, {row_scale.shape}, "
                         f"{col_scale.shape}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not kernel_fits(n):
        raise ValueError(f"rows of {n} activations do not fit the kernel (at most {MAX_COLUMNS}, in at most "
                         f"{MAX_CHUNKS} chunks of a power of two)")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    chunk = _chunk_size(n, max_chunk) or _chunk_size(n)
    kernel = functools.partial(_kernel, n=n, chunk=chunk, activation=activation, dtype=jnp.dtype(dtype))
    if num_warps is None:
        num_warps = 8 if n > 4096 else 4
    q, scale = pl.pallas_call(
        kernel,
        grid=(T,),
        in_specs=[pl.no_block_spec] * 3,
        out_specs=[pl.no_block_spec] * 2,
        out_shape=[jax.ShapeDtypeStruct((T, n), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((T,), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="gated_activation_fp8",
    )(acc, row_scale.reshape(T).astype(jnp.float32), col_scale.astype(jnp.float32))
    return q, scale[:, None]
