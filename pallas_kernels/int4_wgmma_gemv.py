"""A few-row int4 matmul on Hopper's tensor cores (Pallas Mosaic GPU): the weights are the wgmma's left operand.

``y[M, N] = x[M, K] @ W`` for ``M <= 8`` with ``W = (q - z) s`` in groups of ``group_size`` rows of K (AWQ / GPTQ
without act-order, groups of 128), computed transposed: ``y^T = W^T x^T``. A warpgroup takes ``block_n`` output
columns (rows of ``W^T``, 64 or a multiple) over a range of K; each pipeline step TMA-copies a ``[block_n, 128]``
int4 tile, an ``[8, 128]`` slice of x (TMA reads x's rows past M as zeros) and the group's scales and zeros into
shared memory, upcasts the tile in registers (Mosaic GPU's int4 -> bf16 conversion: a permute, a LOP3 and a packed
subtract for two weights) and multiplies it by x^T on the tensor cores (wgmma, N = 8, its smallest). The Triton GEMV
instead spends a float32 multiply-add a weight on the CUDA cores (~4.2 instructions a weight, NOTES.md "Why AWQ stays
at 2.21x").

Zero points leave the products: a step's ``sum_k q'_k x_k`` (``q' = q - 8``, the signed nibble the tile holds)
and ``sum_k x_k`` (a second wgmma with a left operand of ones) are both taken on the tensor cores, and the
step's contribution is ``s * sum q' x - (z - 8) s * sum x``, exact integer dots in float32.

Layouts: ``W^T`` as signed int4 ``[N, K]`` (``pack_weights``); the scales ``s`` and zero points ``z`` as the engine's
``models.quantization.Int4Weight`` keeps them, ``[K / group_size, N]`` in any float dtype. The kernel writes
``[k_splits, M, N]`` partial sums itself (the accumulator stored transposed), as the Triton kernels do, and can apply
a deferred RMSNorm at one row. The engine runs it at up to 8 rows where the weights carry ``W^T``
(``models.quantization.add_int4_wgmma_layout``: opt-in, ``$PAGEDJAX_INT4_WGMMA=1``; ``engine_matmul``);
``scripts/probe_gemv_wgmma.py`` times it against the Triton GEMV."""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.quantized_matmul import MatmulConfig, add_splits, auto_k_splits, default_config
from pallas_kernels.ragged_prefill_mgpu import transposed_ref

ROWS = 8  # wgmma's smallest N: x's rows padded to this many
BLOCK_N = 64  # wgmma's M: output columns a warpgroup (the default; a multiple of 64)


def pack_weights(q):
    """``q [..., K, N]`` nibbles (0..15) -> ``W^T`` as signed int4 ``[..., N, K]`` (``q - 8``)."""
    return jnp.swapaxes((q.astype(jnp.int8) - 8).astype(jnp.int4), -1, -2)


def reference(x, wt, scales, zeros, *, group_size: int):
    """float32 ``x @ W`` with ``W = (q - z) s`` from ``pack_weights``' ``W^T`` and ``[G, N]`` scales and zeros."""
    G = scales.shape[0]
    q = wt.T.astype(jnp.float32).reshape(G, group_size, -1) + 8.0
    w = (q - zeros.astype(jnp.float32)[:, None, :]) * scales.astype(jnp.float32)[:, None, :]
    return x.astype(jnp.float32) @ w.reshape(G * group_size, -1)


# How a tile's int4 values reach wgmma's register layout as bfloat16 (layouts of Mosaic GPU's ``fragmented_array``):
# "4x-2x": loaded 8 a 32-bit shared-memory read (WGMMA_UPCAST_4X), moved to WGMMA_UPCAST_2X as int4 (a shuffle),
# upcast there, then moved to WGMMA as bfloat16 (Mosaic's intended route for 4-bit left operands); "4x": loaded as
# "4x-2x", moved to WGMMA as int4, upcast there; "auto": Mosaic's layout inference picks (WGMMA for the load: a byte
# a read).
CONVERSIONS = ("4x-2x", "4x", "auto")


def _upcast(plgpu, tile, convert: str):
    L = plgpu.Layout
    if convert == "auto":
        return tile.astype(jnp.bfloat16)
    tile = plgpu.layout_cast(tile, L.WGMMA_UPCAST_4X)
    if convert == "4x":
        return plgpu.layout_cast(tile, L.WGMMA).astype(jnp.bfloat16)
    return plgpu.layout_cast(plgpu.layout_cast(tile, L.WGMMA_UPCAST_2X).astype(jnp.bfloat16), L.WGMMA)


def _check_shapes(x, wt, scales, zeros, sum_sq, group_size: int, k_splits: int, block_n: int):
    M, K = x.shape
    N = wt.shape[0]
    if M > ROWS:
        raise ValueError(f"the int4 wgmma matmul takes at most {ROWS} rows of x, got {M}")
    G = K // group_size if group_size else 0
    if (x.dtype != jnp.bfloat16 or group_size != 128 or block_n % 64 or N % block_n or K % group_size
            or G % k_splits or wt.shape != (N, K) or scales.shape != (G, N) or zeros.shape != (G, N)):
        raise ValueError(f"x must be [M, K] bfloat16, the groups of 128 rows, block_n a multiple of 64 and N of "
                         f"block_n ({block_n}), K of the group size, the groups of k_splits, W^T [N, K] and the "
                         f"scales and zeros [K / 128, N]: got x {x.shape} {x.dtype}, W^T {wt.shape}, "
                         f"scales {scales.shape}, group {group_size}, splits {k_splits}")
    if sum_sq is not None and (M != 1 or sum_sq.ndim != 1 or sum_sq.dtype != jnp.float32):
        raise ValueError(f"a deferred RMSNorm (sum_sq float32 [groups]) is applied at one row only: got x {x.shape}, "
                         f"sum_sq {sum_sq.dtype}{sum_sq.shape}")


def int4_wgmma_partials(x, wt, scales, zeros, sum_sq=None, *, group_size: int, k_splits: int = 1, stages: int = 4,
                        convert: str = "4x", block_n: int = BLOCK_N, norm_eps: float = 0.0, interpret=None):
    """``[k_splits, M, N]`` partial sums of ``x @ W`` (``x [M <= 8, K]`` bfloat16): bfloat16 unsplit, else float32,
    as the engine's Triton kernels write them (``quantized_matmul.add_splits``). x's rows are read straight from
    ``x`` (TMA fills the rows past M with zeros) and the result is stored transposed back to ``[M, N]`` (TMA skips
    the rows past M). ``sum_sq`` (one row): x is a row's ``x * weight`` and each output gets its RMSNorm's scale
    ``rsqrt(sum(sum_sq) / K + norm_eps)`` (``pallas_kernels.deferred_norm``). ``interpret``: JAX's Mosaic GPU
    interpreter (``InterpretGPUParams``, JAX >= 0.11), for tests: it has no register layouts and takes wgmma's left
    operand from memory only, so there the upcast tile (and the ones) go through shared memory."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _check_shapes(x, wt, scales, zeros, sum_sq, group_size, k_splits, block_n)
    M, K = x.shape
    N = wt.shape[0]
    steps = K // group_size // k_splits
    out_dtype = x.dtype if k_splits == 1 else jnp.float32
    w_swizzle = group_size // 2  # bytes of a tile row: 128 int4 = 64
    w_tiled = (plgpu.TilingTransform((8, group_size)), plgpu.SwizzleTransform(w_swizzle))
    x_tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    o_tiled = (plgpu.TilingTransform((8, 128 // jnp.dtype(out_dtype).itemsize)), plgpu.SwizzleTransform(128))
    norm = sum_sq is not None

    def cast(v, layout):  # the interpreter keeps values in their logical layout
        return v if interpret else plgpu.layout_cast(v, layout)

    def kernel(x_gmem, w_gmem, s_gmem, z_gmem, *refs):
        if norm:
            sq_gmem, o_gmem, o_smem, sq_smem, sq_barrier, *a_smem = refs
            plgpu.copy_gmem_to_smem(sq_gmem, sq_smem, sq_barrier)  # waited for after the K loop
        else:
            o_gmem, o_smem, *a_smem = refs
        n, split = lax.axis_index("n"), lax.axis_index("split")
        cols = pl.ds(n * block_n, block_n)
        first = split * steps

        ones = jnp.full((block_n, group_size), 1, jnp.bfloat16)  # x's group sums' left operand, set once
        if interpret:
            a_smem[1][...] = ones
            ones = a_smem[1]
        else:
            ones = plgpu.layout_cast(ones, plgpu.Layout.WGMMA)

        def body(_, w_smem, x_smem, s_smem, z_smem, total):
            if interpret:
                a_smem[0][...] = w_smem[...].astype(jnp.bfloat16)
                a = a_smem[0]
            else:
                a = _upcast(plgpu, w_smem[...], convert)

            def products(acc_q, acc_x):
                plgpu.wgmma(acc_q, a, transposed_ref(x_smem))
                plgpu.wgmma(acc_x, ones, transposed_ref(x_smem))
                return acc_q[...], acc_x[...]

            qx, xs = pl.run_scoped(products, plgpu.ACC((block_n, ROWS), jnp.float32),
                                   plgpu.ACC((block_n, ROWS), jnp.float32))
            row = plgpu.Layout.WGMMA.reduce(1)
            sv = cast(s_smem[0], row).astype(jnp.float32)
            zv = (cast(z_smem[0], row).astype(jnp.float32) - 8.0) * sv  # (z - 8) s
            return (total + lax.broadcast_in_dim(sv, qx.shape, [0]) * qx
                    - lax.broadcast_in_dim(zv, xs.shape, [0]) * xs)

        zero = cast(jnp.zeros((block_n, ROWS), jnp.float32), plgpu.Layout.WGMMA)
        pipeline = plgpu.emit_pipeline(
            body,
            grid=(steps,),
            in_specs=[
                plgpu.BlockSpec((block_n, group_size), lambda k: (0, k), transforms=w_tiled),
                # ROWS rows from x's M: TMA reads the rows past M as zeros
                plgpu.BlockSpec((ROWS, group_size), lambda k: (0, k), transforms=x_tiled),
                plgpu.BlockSpec((1, block_n), lambda k: (k, 0)),
                plgpu.BlockSpec((1, block_n), lambda k: (k, 0)),
            ],
            max_concurrent_steps=stages,
            init_carry=zero,
        )
        ks = pl.ds(first * group_size, steps * group_size)
        gs = pl.ds(first, steps)
        total = pipeline(w_gmem.at[cols, ks], x_gmem.at[:, ks], s_gmem.at[gs, cols], z_gmem.at[gs, cols])
        if norm:
            plgpu.barrier_wait(sq_barrier)
            sum_of_squares = functools.reduce(lambda a, b: a + b, [sq_smem[i] for i in range(sum_sq.shape[0])])
            total = total * lax.rsqrt(sum_of_squares / K + norm_eps)
        # [block_n, ROWS] -> the [ROWS, block_n] tile of the output (a shuffle a register pair to the transposed
        # layout, then a swizzled store), and by TMA to rows :M of the output (the rows past M are skipped)
        transposed_ref(o_smem)[...] = cast(total.astype(out_dtype), plgpu.Layout.WGMMA_TRANSPOSED)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[split, pl.ds(0, ROWS), cols])
        plgpu.wait_smem_to_gmem(0)

    scratch = [plgpu.SMEM((ROWS, block_n), out_dtype, transforms=o_tiled)]
    if norm:
        scratch += [plgpu.SMEM(sum_sq.shape, jnp.float32), plgpu.Barrier(num_arrivals=1)]
    if interpret:
        scratch += [plgpu.SMEM((block_n, group_size), jnp.bfloat16, transforms=x_tiled)] * 2
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((k_splits, M, N), out_dtype),
        grid=(N // block_n, k_splits),
        grid_names=("n", "split"),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({"interpret": interpret} if interpret else {}),
    )(x, wt, scales, zeros, *([sum_sq] if norm else []))


@functools.partial(jax.jit, static_argnames=("group_size", "k_splits", "stages", "convert", "block_n", "keep_splits",
                                             "norm_eps", "pad_rows", "interpret"))
def int4_wgmma_matmul(x, wt, scales, zeros, *, group_size: int, k_splits: int = 1, stages: int = 4,
                      convert: str = "4x", block_n: int = BLOCK_N, keep_splits: bool = False, sum_sq=None,
                      norm_eps: float = 0.0, pad_rows: bool = False, interpret=None):
    """``x [M <= 8, K] @ W`` -> ``[M, N]`` in x's dtype (the splits added in float32), or with ``keep_splits`` the
    ``[k_splits, M, N]`` partial sums for a consumer that adds them (``quantized_matmul.add_splits``). ``sum_sq`` /
    ``norm_eps``: a deferred RMSNorm, as ``int4_wgmma_partials``. ``pad_rows``: x padded to 8 rows by an XLA op and the
    result sliced back (every TMA copy then in bounds; for timing against the kernel's own reads of M rows)."""
    M = x.shape[0]
    if pad_rows and M < ROWS:
        x = jnp.pad(x, ((0, ROWS - M), (0, 0)))
    partials = int4_wgmma_partials(x, wt, scales, zeros, sum_sq, group_size=group_size, k_splits=k_splits,
                                    stages=stages, convert=convert, block_n=block_n, norm_eps=norm_eps,
                                    interpret=interpret)
    return add_splits(partials[:, :M], x.dtype, keep_splits)


def engine_matmul(x, wt, scales, zeros, *, group_size: int, config: Optional[MatmulConfig] = None,
                  keep_splits: bool = False, sum_sq=None, norm_eps: float = 0.0):
    """``int4_wgmma_matmul`` with the engine's settings (``MatmulConfig``'s ``wgmma_*``; ``default_config()``, i.e.
    ``$PAGEDJAX_MATMUL_CONFIG``, unless given): K splits for ``wgmma_programs_per_core`` programs a multiprocessor."""
    config = config or default_config()
    N, K = wt.shape
    splits = auto_k_splits(N // config.wgmma_block_n, K // group_size, config.wgmma_programs_per_core,
                           config.wgmma_min_steps)
    return int4_wgmma_matmul(x, wt, scales, zeros, group_size=group_size, k_splits=splits, stages=config.wgmma_stages,
                             convert=config.wgmma_convert, block_n=config.wgmma_block_n, keep_splits=keep_splits,
                             sum_sq=sum_sq, norm_eps=norm_eps)
