"""The one-row K-major int8 GEMV as a Pallas Mosaic GPU kernel (Hopper: TMA, wgmma, programmatic dependent launch).

``x[1, K] @ (qt[N, K] * scale[N, None]).T``, the engine's int8 decode GEMV at batch 1 (``int8_kmajor_matmul``'s
Triton form is the other). Why a second form: the Triton GEMVs pay ~4-5 us of fixed cost a launch (a fit over the
8B's four shapes, runs 29-31, NOTES.md), 128 launches a step. XLA launches a Mosaic GPU kernel that waits with
``griddepcontrol.wait`` as a *dependent* of the kernel before it (programmatic dependent launch, on by default in
jaxlib 0.11), so its programs start while that kernel still runs. This kernel streams its first weight tiles
(which no earlier kernel writes) before it waits, and reads ``x`` only after; Pallas Triton calls are not
launched that way.

Layout of the work (one warpgroup a program, grid ``(N / 64, k_splits)``):

- ``x`` is viewed as ``[8, K/8]`` (a free reshape): row ``r`` is the ``r``-th eighth of K. wgmma's narrowest
  product is ``[64, k] @ [k, 8]``, so the eight rows ride in its eight columns at no cost.
- each pipeline step brings 8 tiles ``[64, block_k]`` of ``qt`` by TMA, tile ``r`` from the ``r``-th eighth of
  K, into a ring of ``stages`` shared-memory slots (``plgpu.emit_pipeline``: its prologue fills the ring
  before the first step, which is where the kernel waits for the kernel before it and then copies its slice of
  ``x``, once).
- tile ``r`` goes to registers, int8 -> ``x``'s dtype (exact), and wgmma multiplies it into accumulator ``r``
  (``[64, 8]`` float32) against all eight rows of ``x``; only column ``r`` of accumulator ``r`` is wanted.
- after the loop each program sums those columns: float32 partial sums ``[k_splits, N]``, unscaled. The caller
  adds the splits and applies the scale (XLA fuses that into the next operation).

Each program triggers its dependents (``griddepcontrol.launch_dependents``) when it starts (``trigger="start"``),
so the next kernel's programs can take free multiprocessors during this one's last wave; ``"exit"``: implicitly
when it ends; ``pdl=False``: no wait, an ordinary launch (for timing the difference).

The reference is ``quantized_matmul.int8_kmajor_matmul_reference``. JAX's Mosaic GPU interpreter (JAX >= 0.11)
runs the kernel on the CPU for tests; it takes wgmma's left operand from memory only, so there each tile goes
through a shared-memory tile, and the dependent-launch calls (no-ops for the result) are left out.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.env_config import dataclass_from_env
from pallas_kernels.gpu_info import core_count
from pallas_kernels.ragged_prefill_mgpu import JAX_0_11, stable_kernel_modules

ROWS = 8  # x as [ROWS, K / ROWS]: wgmma's narrowest N
BLOCK_N = 64  # output columns a program: wgmma's M
TRIGGERS = ("start", "exit")


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """``block_k``: K bytes of each of the 8 tiles a step (64 or 128: the tile's swizzle); ``stages``: ring slots;
    ``k_splits``: None picks the most splits whose programs still fit at once (``programs_per_core`` a
    multiprocessor, their shared memory allowing); ``trigger`` and ``pdl`` as in the module docstring."""

    block_k: int = 64
    stages: int = 3
    k_splits: Optional[int] = None
    programs_per_core: int = 2
    trigger: str = "start"
    pdl: bool = True


@functools.lru_cache(maxsize=None)
def default_config() -> GemvConfig:
    """``GemvConfig()`` with the fields of the JSON object in ``$PAGEDJAX_MGPU_GEMV_CONFIG`` (read once)."""
    return dataclass_from_env(GemvConfig, "PAGEDJAX_MGPU_GEMV_CONFIG")


def supported(x_dtype, N: int, K: int, config: GemvConfig = GemvConfig()) -> bool:
    """Whether the kernel takes this GEMV on this machine: a Hopper GPU under JAX >= 0.11 (the version whose Mosaic
    GPU the device runs), ``x`` bf16 or f16, N a multiple of 64 and K of 8 tiles."""
    if jax.default_backend() != "gpu" or not JAX_0_11:
        return False
    if str(getattr(jax.devices()[0], "compute_capability", "0")).split(".")[0] != "9":
        return False
    return shape_supported(x_dtype, N, K, config)


def shape_supported(x_dtype, N: int, K: int, config: GemvConfig = GemvConfig()) -> bool:
    """The shape and dtype half of ``supported``: ``x`` bf16 / f16, ``N % 64 == 0``, ``K % (8 * block_k) == 0``."""
    return (jnp.dtype(x_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and N % BLOCK_N == 0
            and K % (ROWS * config.block_k) == 0)


def auto_k_splits(N: int, K: int, config: GemvConfig) -> int:
    """The most K splits (dividing the steps) whose ``N / 64 * splits`` programs all fit at once, at
    ``programs_per_core`` a multiprocessor; 1 when even unsplit they do not."""
    steps = K // ROWS // config.block_k
    slots = config.programs_per_core * core_count()
    best = 1
    for splits in range(1, steps + 1):
        if steps % splits == 0 and (N // BLOCK_N) * splits <= slots:
            best = splits
    return best


def int8_gemv_mgpu(x: jax.Array, qt: jax.Array, *, config: GemvConfig = GemvConfig(), interpret=None) -> jax.Array:
    """``x[1, K]`` (bf16 / f16), ``qt[N, K]`` int8 -> float32 ``[k_splits, N]``: each split's ``sum_k x[k] qt[n, k]``
    over its slice of K (no scale). ``interpret``: an ``InterpretGPUParams`` for JAX's Mosaic GPU interpreter."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    N, K = qt.shape
    if x.shape != (1, K) or qt.dtype != jnp.int8 or not shape_supported(x.dtype, N, K, config):
        raise ValueError(f"int8_gemv_mgpu needs x [1, K] bf16/f16 and qt int8 [N, K] with N % {BLOCK_N} == 0 and "
                         f"K % {ROWS * config.block_k} == 0; got x {x.dtype}{x.shape}, qt {qt.dtype}{qt.shape}")
    if config.block_k not in (64, 128) or config.trigger not in TRIGGERS or config.stages < 1:
        raise ValueError(f"GemvConfig needs block_k 64 or 128, trigger in {TRIGGERS}, stages >= 1; got {config}")
    stable_kernel_modules()
    block_k = config.block_k
    cols = K // ROWS  # x's row length in the [8, K/8] view
    steps_total = cols // block_k
    splits = config.k_splits or auto_k_splits(N, K, config)
    if steps_total % splits:
        raise ValueError(f"k_splits={splits} must divide the {steps_total} steps of {block_k} K bytes")
    split_cols = cols // splits
    steps = split_cols // block_k
    dtype = x.dtype
    w_tiles = (plgpu.TilingTransform((8, block_k)), plgpu.SwizzleTransform(block_k))  # int8: block_k bytes a row
    x_tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    dependent = config.pdl and not interpret

    def transposed(ref):
        return ref.T if JAX_0_11 else plgpu.transpose_ref(ref, (1, 0))

    def kernel(x_ref, w_ref, o_ref, x_smem, o_smem, x_ready, *rest):
        a_smem, accs = (rest[0], rest[1:]) if interpret else (None, rest)
        n, split = lax.axis_index("n"), lax.axis_index("split")
        if dependent and config.trigger == "start":
            plgpu.griddepcontrol_launch_dependents()

        def step(indices, *w_smems):
            (i,) = indices

            @pl.when(i == 0)  # the ring is filled with weights: now wait for x's writer, then copy x once
            def _():
                if dependent:
                    plgpu.griddepcontrol_wait()
                plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(split * split_cols, split_cols)], x_smem, x_ready.at[0])
                plgpu.barrier_wait(x_ready.at[0])

            x_step = transposed(x_smem.at[:, pl.ds(pl.multiple_of(i * block_k, block_k), block_k)])
            for r in range(ROWS):
                a = w_smems[r][...].astype(dtype)
                if interpret:
                    a_smem[...] = a
                    a = a_smem
                plgpu.wgmma(accs[r], a, x_step)
            plgpu.wgmma_wait(0)

        specs = [plgpu.BlockSpec((BLOCK_N, block_k), functools.partial(
                     lambda i, r: (n, r * steps_total + split * steps + i), r=r), transforms=w_tiles)
                 for r in range(ROWS)]
        plgpu.emit_pipeline(step, grid=(steps,), in_specs=specs, max_concurrent_steps=min(config.stages, steps))(
            *([w_ref] * ROWS))
        if interpret:
            column = lax.broadcasted_iota(jnp.int32, (BLOCK_N, ROWS), 1)
        else:
            column = plgpu.broadcasted_iota(jnp.int32, (BLOCK_N, ROWS), 1, layout=plgpu.Layout.WGMMA)
        total = jnp.zeros((BLOCK_N, ROWS), jnp.float32)
        for r in range(ROWS):  # column r of accumulator r: x's r-th eighth of K against the weights' r-th eighth
            total = total + jnp.where(column == r, accs[r][...], 0.0)
        o_smem[...] = jnp.sum(total, axis=1)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[split, pl.ds(n * BLOCK_N, BLOCK_N)])
        plgpu.wait_smem_to_gmem(0)

    def int8_gemv_mgpu_kernel(x_ref, w_ref, o_ref):  # the name the profiler shows
        def with_smem(*smem):
            pl.run_scoped(lambda *accs: kernel(x_ref, w_ref, o_ref, *smem, *accs),
                          *[plgpu.ACC((BLOCK_N, ROWS), jnp.float32)] * ROWS)

        pl.run_scoped(with_smem,
                      plgpu.SMEM((ROWS, split_cols), dtype, transforms=x_tiles),
                      plgpu.SMEM((BLOCK_N,), jnp.float32),
                      plgpu.Barrier(num_barriers=1),
                      *([plgpu.SMEM((BLOCK_N, block_k), dtype, transforms=x_tiles)] if interpret else []))

    return plgpu.kernel(
        int8_gemv_mgpu_kernel,
        out_type=jax.ShapeDtypeStruct((splits, N), jnp.float32),
        grid=(N // BLOCK_N, splits),
        grid_names=("n", "split"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **({"interpret": interpret} if interpret else {}),
    )(x.reshape(ROWS, cols), qt)
