"""Weight-streaming matmul for small batches: ``x[M, K] @ W[K, N]`` with W dense, int8 or int4.

At decode a step multiplies a few rows of activations by every weight matrix once, so
its time is the time to read the weights. XLA reads a bf16 weight at about 2.5 TB/s
(DESIGN.md), and when the weight is quantized it first writes a dequantized copy
(``x @ q.astype(bf16) * s`` measured 0.92-0.96x of bf16 at M=1): the memory saving never
becomes speed. This kernel reads the stored (quantized) bytes once and dequantizes each
tile in registers just before the tensor-core dot.

Formats of ``W`` (the caller's weight types live in ``models.quantization``):

- ``dense``: ``w[K, N]`` bf16/f16/f32.
- ``int8``: ``q[K, N]`` int8 with one scale per output column, ``W = q * scale[N]``.
- int8 K-major (``int8_kmajor_matmul``; the engine's int8 layout since run 23b): ``qt[N, K]``, ``W = (qt * scale[:,
  None]).T``. One row runs a GEMV whose tile is ``block_n`` columns of ``block_k`` contiguous K bytes, its products
  kept in a ``[block_n, block_k]`` accumulator summed over K once after the loop; more rows go to XLA's dot. At 256
  K bytes x 16 columns a program it took the 8B int8 batch-1 step from 3.54 to 3.11 ms (H200, run 23b), the sum
  after the loop to 3.06 (run 26a-b).
- ``int4``: two 4-bit values per byte, ``packed[K/2, N]`` uint8, grouped scales and zeros
  ``scales[K/g, N]``, ``zeros[K/g, N]``, ``W[k] = (nibble(k) - zeros[k//g]) * scales[k//g]``.
  Packing works in blocks of ``pack`` rows (``pack`` divides ``g``): in block ``b``,
  packed row ``b*pack/2 + j`` holds row ``b*pack + j`` in its low nibble and row
  ``b*pack + pack/2 + j`` in its high nibble. So a tile's low and high halves multiply
  two contiguous slices of ``x``, and a K-shard on ``pack`` boundaries (tensor
  parallelism, row-parallel layers) holds whole blocks. ``pack_int4`` / ``unpack_int4``
  convert to and from plain ``[K, N]`` nibble values.

The one-row GEMVs write each multiply-add as one ``fma.rn.f32`` (``multiply_add``): jaxlib's Triton does not fuse a
multiply and an add by itself (run 26c's SASS), and the int4 GEMV's loop was two thirds FMUL + FADD.

Grid: ``(M / block_m, N / block_n, k_splits)``. Each program streams ``K / k_splits`` rows
of its ``block_n`` columns in ``block_k``-row steps, for one tile of ``block_m`` rows of x;
with ``k_splits > 1`` the partial sums (float32 ``[k_splits, M, N]``, small) are added by
XLA. Split-K keeps enough programs in flight to saturate memory when ``N`` is small. ``M``
is padded to at least 16 rows (the smallest tensor-core tile) and to whole row tiles.

Each format has a pure-jnp reference (``*_matmul_reference``: dequantize, then ``jnp.dot``
in float32) that is also the path for large ``M``, where the matmul is bound by
arithmetic and a dequantized copy costs little beside it.
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
from pallas_kernels.gpu_info import core_count

FORMATS = ("dense", "int8", "int4")
GEMV_CONVERSIONS = ("cvt", "exponent", "permute", "affine")
MIN_ROWS = 16  # tensor-core tile height


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
    """Tile sizes and Triton launch parameters. ``block_n``/``block_k`` are upper bounds: the
    largest power of two up to them that divides N / K is used; ``block_m`` rows per program
    (fewer rows use one tile of the next power of two, at least 16). ``k_splits=None`` picks the
    split from the shapes (enough programs for ``programs_per_core`` per multiprocessor).
    ``gemv``: a single row runs the GEMV form (``gemv_block_*`` tiles; int4 tiles K by its
    packing block) instead of padding it to a 16-row tensor-core tile."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 128
    # The tensor-core form (2 rows and up): how an int4 tile's nibbles become float32 before the tile is scaled
    # (one fused multiply-add, with ``gemv_fma``) and rounded to x's dtype for the dot: "affine" (a byte permute
    # into 0.5's mantissa, as the GEMV's ``gemv_convert``) or "cvt" (an integer-to-float conversion, a quarter of
    # the FMA rate; the form before run 30e). A third form, the dot over nibbles as bfloat16 ``128 + q`` with the
    # group's scale and zero on each step's dot (fewer loop instructions offline), lost 36% of AWQ's batch-8
    # throughput (run 65, H100: 1,200 against 1,870 output tok/s) and was removed (kept in ad81270).
    tile_convert: str = "affine"
    k_splits: Optional[int] = None
    num_warps: int = 4
    num_stages: int = 4
    programs_per_core: int = 2
    # One row (decode at batch 1): the GEMV form, tiles of gemv_block_k x gemv_block_n (int4 steps
    # through K by its packing block). Measured on the H200 (benchmarks/NOTES.md, run 17a): these
    # tiles were the fastest of the current kernel's in isolation (w_gate_up: int4 56.6 us, int8 47.6
    # with loads a step ahead) and in the 8B model at batch 1 AWQ TPOT 4.74 -> 4.56 ms, int8 4.27 ms
    # (against 128 x 128 tiles at 8 warps, 4 stages, 2 programs per core).
    gemv: bool = True
    gemv_block_n: int = 128
    gemv_block_k: int = 32
    gemv_num_warps: int = 4
    gemv_num_stages: int = 1  # Triton pipelines only loads that feed a dot: stages do nothing here
    gemv_programs_per_core: int = 8
    # GEMV: the K splits stop at this many steps a program, whatever ``gemv_programs_per_core`` asks. At 4 the 8B's int4
    # wqkv and wo launch 384 and 256 programs (a third of the 924 that 72 registers a thread let run at once; run 27b's
    # ncu) and read 1.54 / 1.20 TB/s (run 27c's profile) against w_gate_up's 2.2 at 1,792; at 2: 768 / 512, at 1:
    # 1,536 / 1,024. Run 46a (H100, AWQ 8B at batch 1, one lease): 2 against 4, kernels 2,714 against 2,749 us a step
    # (wo 216 -> 188, wqkv 265 -> 251), TPOT 2.653 against 2.711 ms. (The K-major int8 GEMV has its own:
    # kmajor_min_steps.)
    gemv_min_steps: int = 2
    # GEMV: keep a [block_k, block_n] float32 partial sum and reduce over K once at the end,
    # instead of a cross-thread reduction of every tile (int4 then dequantizes each weight).
    # Measured in the 8B model on the H200 (NOTES.md, run 16a): AWQ TPOT 6.60 -> 4.74 ms.
    gemv_defer_reduction: bool = True
    # GEMV: how int4 nibbles and int8 values become float32 (``GEMV_CONVERSIONS``):
    # "cvt": an integer-to-float conversion each (a quarter of the FMA rate).
    # "exponent": OR the integer into the mantissa of 2^23 and subtract 2^23, written in jnp (Triton
    #   emits ~5 instructions a weight: widen, add, OR, subtract). Run 16a: no gain in the model (AWQ
    #   TPOT 4.75 ms with it, 4.74 without), 1-2% in isolation.
    # "permute": the same exponent trick in inline PTX on whole 32-bit words: one byte permute (PRMT)
    #   a weight places it in the mantissa, one subtract, the nibble masks shared by 4 bytes (~2
    #   instructions a weight). Compiled on GPUs only; the interpreter runs "exponent" (same values).
    #   Run 22a (H200, 8B at batch 1, same lease): AWQ TPOT 3.85 -> 3.41 ms, int8 3.59 -> 3.57 (the int8 GEMV is not
    #   bound by its conversions); in isolation int4 wqkv / wo / w_gate_up -26% / -28% / -12%.
    # "affine" (int4; int8 values as "permute"): one byte permute a nibble places it in mantissa bits 16-19 of 0.5,
    #   so it arrives as 0.5 + q / 256 with no subtract; the group's scale and zero absorb that map once a column
    #   ((q - z) s = (f - (z + 128) / 256) * 256 s), one instruction a weight fewer than "permute".
    #   Run 25a (H200, 8B AWQ at batch 1, same lease): TPOT 3.49 -> 3.34 ms against "permute".
    gemv_convert: str = "affine"
    # GEMV: 1 issues each step's weight loads a step ahead of its arithmetic (``double_buffered_loop``).
    # Triton's pipeliner leaves loads that feed no dot alone (NOTES.md, after run 16b), so at 0 each
    # step waits a memory latency for its own tile. None: 1 for the [K, N] int8 GEMV and for the factored int4 GEMV,
    # 0 otherwise (run 17a, w_gate_up at one row: int8 56.3 -> 47.6 us; unfactored int4 56.6 -> 60.6 us; factored
    # int4: run 29b, below; the K-major int8 GEMV with its deferred sum: run 26a, below).
    gemv_prefetch: Optional[int] = None
    # GEMVs: each multiply-add as one fused instruction (``fma.rn.f32`` in inline PTX; compiled only). jaxlib's Triton
    # pipeline does not contract a multiply and an add: the int4 GEMV's loop ran 259 FMUL + 257 FADD for 128 weights a
    # thread (Nsight Compute's SASS, run 26c), 6.5 instructions a weight with the issue slots 69% busy.
    gemv_fma: bool = True
    # int4 GEMV with the deferred sum: each step's [block_k / 2, block_n] packed tile loaded as this many blocks of
    # rows, each multiplied into one accumulator of a block's shape, so a thread holds 1/subtiles of the float32
    # accumulator: 168 registers a thread at 1 (12 warps a multiprocessor, waiting on memory: ncu, run 26d), 72 at 8
    # (loop 502 -> 547 instructions). Runs 27a-c (H200, 8B AWQ at batch 1): w_gate_up 33.0 -> 28.3 us (ncu, 23 warps,
    # 2.30 TB/s; 4 blocks 29.0, 16 blocks 29.5); the decode step's int4 GEMVs 2.06 -> 1.82 ms (profile, same
    # lease); TPOT 2.93-2.98 -> 2.72-2.81 ms (same lease; single runs spread +-8%, NOTES.md). With the factored
    # form below: 4 (run 29b, H200, 8 untimed with loads ahead). 8 since runs 45b-c (H100, the 8B AWQ at batch 1, 4
    # -> 8 blocks, loads ahead): the step's kernels 2,845 / 2,837 -> 2,747 / 2,747 us (w_gate_up 868 -> 837, w_down
    # 517 -> 462), TPOT 2.81 / 2.80 -> 2.68 / 2.71 ms; not yet timed on the H200.
    gemv_subtiles: int = 8
    # int4 GEMV with the deferred sum: a step's products x * q summed without the group's scale and zero (one
    # multiply-add a weight), which each step's sum then takes once per accumulator element: ``s (sum x q - z sum x)``,
    # as the per-step reduction does. The plain form dequantizes each weight first (``(q - z) s``: two multiply-adds
    # a weight). A step is one group (the packing block divides the group), so s and z hold over it.
    # Runs 29a-b (H200, 8B AWQ at batch 1, profiles of the step's kernels; the unfactored 8 blocks 2,683-2,699 us):
    # factored at 8 blocks 3,215 (ptxas issues each block's load just before its arithmetic: a memory latency a
    # block), at 4 blocks 2,618-2,628, at 2 2,626, at 1 2,709; at 4 blocks with loads a step ahead **2,549** (-5%:
    # the int4 GEMVs 1,820 -> 1,685 us), at 2 with them 2,672. Hence the defaults: factored, 4 blocks, loads ahead.
    # (The K-major int8 GEMV with its conversion's offset factored the same way was 4% slower in run 29b: removed.)
    gemv_factor_scales: bool = True
    # The K-major int8 GEMV (``int8_kmajor_matmul``): tile of kmajor_block_n columns x kmajor_block_k K bytes
    # (upper bounds, as block_n / block_k); warps, programs per core, conversion and loads ahead as the GEMV's.
    # Run 23a-b (H200, 8B int8 at batch 1): 64 x 64 TPOT 4.52 ms, block_k 128 x block_n 32 3.14, 256 x 16 3.11
    # (the [K, N] GEMV 3.54): long rows of K bytes a program, few columns.
    kmajor_block_n: int = 16
    kmajor_block_k: int = 256
    # The K-major int8 GEMV's gemv_min_steps. Run 46a (H100, 8B int8 at batch 1, one lease): 2 lost to 4, kernels
    # 3,471 / 3,469 against 3,457 / 3,454 us a step (wo 251 -> 264), TPOT 3.404 against 3.391 ms.
    kmajor_min_steps: int = 4
    # The K-major int8 GEMV: keep a [block_n, block_k] float32 partial sum and reduce over K once after the loop (as
    # gemv_defer_reduction does for the [K, N] GEMV) instead of each step's sum across a row's threads, and read x's
    # slice as a tile of the weight tile's shape (one repeated row: its register layout, no conversion). Offline
    # compile for sm_90 (Triton 3.9, NOTES.md after run 25e): the per-step sum costs 8 barriers, 16 shuffles and
    # ~110 adds a step, 423 instructions for 32 weights a thread; deferred, no barrier and 64 registers.
    # Run 26a (H200, 8B int8 at batch 1, same lease): TPOT 3.16 ms summed each step (loads ahead) -> 3.06 deferred
    # without loads ahead (3.23 deferred with them).
    kmajor_defer_reduction: bool = True


# --------------------------------------------------------------------------------------
# int4 packing and the references
# --------------------------------------------------------------------------------------


def int4_pack_block(num_rows: int, group_size: int) -> int:
    """Rows per packing block: the largest of 128, 64, 32 dividing both ``K`` and ``g``. The block is also the int4
    kernels' K step: the one-row GEMV's tile is ``pack / 2`` bytes x ``block_n`` columns. Blocks of 64 or 32 rows at
    groups of 128 (fewer registers, more warps, more instructions a weight) were slower at batch 1 (AWQ TPOT, H200):
    3.43 / 3.57 ms against 3.30 (run 26b, unfused multiply-adds), 3.22 / 3.30 against 3.12 (run 26e, fused)."""
    for pack in (128, 64, 32):
        if num_rows % pack == 0 and group_size % pack == 0:
            return pack
    raise ValueError(f"int4 weights need K ({num_rows}) and the group size ({group_size}) to be "
                     "multiples of 32")


def pack_int4(values: jax.Array, pack: int) -> jax.Array:
    """``[..., K, N]`` integers in [0, 16) -> ``[..., K/2, N]`` uint8 in the block layout above."""
    *lead, K, N = values.shape
    v = values.astype(jnp.uint8).reshape(*lead, K // pack, 2, pack // 2, N)
    return (v[..., 0, :, :] | (v[..., 1, :, :] << 4)).reshape(*lead, K // 2, N)


def unpack_int4(packed: jax.Array, pack: int) -> jax.Array:
    """Inverse of ``pack_int4``: ``[..., K/2, N]`` uint8 -> ``[..., K, N]`` uint8 nibbles."""
    *lead, half_k, N = packed.shape
    p = packed.reshape(*lead, half_k // (pack // 2), 1, pack // 2, N)
    both = jnp.concatenate([p & 0xF, p >> 4], axis=-3)
    return both.reshape(*lead, 2 * half_k, N)


def e2m1_as_f32(nibbles: jax.Array) -> jax.Array:
    """FP4 e2m1 codes (0-15, the sign in bit 3: MXFP4's values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives) as
    float32: the exponent and mantissa bits moved into a float32's, its exponent biased by 126 (code 2 is 1.0); the
    two codes without an exponent (0 and 0.5, FP4's subnormals) set apart: moved so they would read 0.5 and 0.75."""
    q = nibbles.astype(jnp.int32)
    magnitude = q & 7
    normal = lax.bitcast_convert_type((magnitude << 22) + (126 << 23), jnp.float32)
    value = jnp.where(magnitude < 2, magnitude.astype(jnp.float32) * 0.5, normal)
    return jnp.where(q >= 8, -value, value)


def e8m0_as_f32(exponents: jax.Array) -> jax.Array:
    """MXFP4's scales, uint8 E8M0 exponents (``2 ** (e - 127)``), as float32: ``e`` moved into a float32's exponent
    bits; 0 (2^-127, a float32 subnormal) set apart. 255 (E8M0's NaN) reads infinity."""
    e = exponents.astype(jnp.int32)
    return jnp.where(e == 0, jnp.float32(2.0 ** -127), lax.bitcast_convert_type(e << 23, jnp.float32))


MXFP4_MAX_EXPONENT = 240  # E8M0 exponents the kernels take: 2^(e - 127) * 2^14 must be a float32 (e + 14 <= 254)


def e2m1_tile_weights(packed: jax.Array, exponents: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """A packed MXFP4 tile's low- and high-nibble halves in ``dtype``: FP4 values times their group's power of two
    (``exponents``, E8M0, one a column, at most ``MXFP4_MAX_EXPONENT``); exact where the product is a normal float32
    (exponents from 2: below, XLA's CPU flushes it to 0, as it does ``dequantize_int4``'s). An FP4 code's sign,
    exponent and mantissa bits moved into a float16's (``s00eem000000000``) read as the code's value times 2^-14, the
    two codes without an exponent (0 and 0.5) included, as float16 subnormals; so a weight costs two shifts, a bitwise
    merge, a float16 -> float32 conversion and a multiply by ``2^(e - 127) * 2^14`` (the scale's exponent bits
    moved up by 14), not ``e2m1_as_f32``'s selects and conversions."""
    scale = lax.bitcast_convert_type((exponents.astype(jnp.int32) + 14) << 23, jnp.float32)
    bytes_ = packed.astype(jnp.int32)
    low = ((bytes_ & 0x8) << 12) | ((bytes_ & 0x7) << 9)
    high = ((bytes_ & 0x80) << 8) | ((bytes_ & 0x70) << 5)
    return tuple((lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.float16).astype(jnp.float32) * scale)
                 .astype(dtype) for bits in (low, high))


def dequantize_int4(packed, scales, zeros, *, group_size: int, pack: int, dtype=jnp.float32,
                    codes: str = "uint4") -> jax.Array:
    """The ``[K, N]`` weight an int4 tensor stands for: ``(q - zero) * scale`` of unsigned integer nibbles, or for
    ``codes`` "e2m1" FP4 values times their group's power of two (``scales`` uint8 E8M0 exponents, ``zeros`` None)."""
    q = unpack_int4(packed, pack)
    if codes == "e2m1":
        return (e2m1_as_f32(q) * jnp.repeat(e8m0_as_f32(scales), group_size, axis=-2)).astype(dtype)
    s = jnp.repeat(scales.astype(jnp.float32), group_size, axis=-2)
    z = jnp.repeat(zeros.astype(jnp.float32), group_size, axis=-2)
    return ((q.astype(jnp.float32) - z) * s).astype(dtype)


def dense_matmul_reference(x, w):
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def int8_matmul_reference(x, q, scale):
    acc = jnp.dot(x, q.astype(x.dtype), preferred_element_type=jnp.float32)
    return (acc * scale.astype(jnp.float32)).astype(x.dtype)


def int8_kmajor_matmul_reference(x, qt, scale):
    acc = lax.dot_general(x, qt.astype(x.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (acc * scale.astype(jnp.float32)).astype(x.dtype)


# A gated MLP's joined K-major int8 weight may be stored with its gate and up rows in turn, GATE_UP_GROUP of each
# (``interleave_halves``), so that one program of the one-row GEMV reads a block of gate rows and the up rows they
# pair with, contiguous, and writes ``silu(gate) * up`` (``int8_kmajor_gated_matmul``): the SwiGLU product is then no
# launch of its own. 8 pairs: the 16 rows a program of the plain GEMV reads (``kmajor_block_n``).
GATE_UP_GROUP = 8


def _transpose_blocks(a: jax.Array, rows: int, group: int, axis: int) -> jax.Array:
    """``a``'s blocks of ``group`` along ``axis``, read as a grid of ``rows`` rows, in the grid's column order."""
    axis = axis % a.ndim
    shape = a.shape
    a = a.reshape(*shape[:axis], rows, shape[axis] // (rows * group), group, *shape[axis + 1:])
    return jnp.swapaxes(a, axis, axis + 1).reshape(shape)


def interleave_halves(a: jax.Array, group: int, axis: int) -> jax.Array:
    """``a``'s two halves along ``axis`` (``[gate | up]``) as blocks of ``group`` from each in turn."""
    return _transpose_blocks(a, 2, group, axis)


def deinterleave_halves(a: jax.Array, group: int, axis: int = -1) -> jax.Array:
    """The inverse of ``interleave_halves``: ``[gate | up]`` again."""
    return _transpose_blocks(a, a.shape[axis] // (2 * group), group, axis)


def int8_kmajor_gated_reference(x, qt, scale, *, group: int):
    """``silu(x @ W_gate) * (x @ W_up)`` for a K-major int8 ``qt[2I, K]`` of gate and up rows in turn, ``group``
    each: the unfused model's matmul, split and product."""
    gate, up = jnp.split(deinterleave_halves(int8_kmajor_matmul_reference(x, qt, scale), group), 2, axis=-1)
    return jax.nn.silu(gate) * up


def int4_matmul_reference(x, packed, scales, zeros, *, group_size: int, pack: int):
    w = dequantize_int4(packed, scales, zeros, group_size=group_size, pack=pack, dtype=x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


# --------------------------------------------------------------------------------------
# Pallas kernel (Triton lowering) and its jitted wrappers
# --------------------------------------------------------------------------------------


def _matmul_kernel(x_ref, w_ref, *refs, fmt: str, block_m: int, block_n: int, block_k: int, steps: int,
                   group_size: int, convert: str = "cvt", fma: bool = False, norm: tuple = ()):
    """One program: ``block_m`` rows x ``block_n`` output columns over ``steps * block_k`` rows of K.
    ``convert`` (int4): how nibbles become floats (``MatmulConfig.tile_convert``); ``fma``: the dequantization's
    multiply-add as one instruction (``multiply_add``). ``norm`` (one row): as ``_gemv_kernel``'s."""
    o_ref = refs[-1]
    m, n, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = pl.ds(pl.multiple_of(m * block_m, block_m), block_m)
    cols = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)
    first_k = split * (steps * block_k)
    dtype = x_ref.dtype

    def step(i, acc):
        k0 = pl.multiple_of(first_k + i * block_k, block_k)
        if fmt == "int4":
            half = block_k // 2
            scale_ref, zero_ref = refs[0], refs[1]
            group = pl.ds(k0 // group_size, 1)  # block_k divides group_size: one group per step
            s = scale_ref[group, cols].astype(jnp.float32)
            z = zero_ref[group, cols].astype(jnp.float32)
            packed = pltriton.load(w_ref.at[pl.ds(pl.multiple_of(k0 // 2, half), half), cols],
                                   eviction_policy="evict_first")
            w_lo, w_hi = int4_tile_weights(packed, s, z, dtype, convert=convert, fma=fma)
            acc += jnp.dot(x_ref[rows, pl.ds(k0, half)], w_lo, preferred_element_type=jnp.float32)
            acc += jnp.dot(x_ref[rows, pl.ds(k0 + half, half)], w_hi, preferred_element_type=jnp.float32)
            return acc
        w = pltriton.load(w_ref.at[pl.ds(k0, block_k), cols], eviction_policy="evict_first").astype(dtype)
        return acc + jnp.dot(x_ref[rows, pl.ds(k0, block_k)], w, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, steps, step, jnp.zeros((block_m, block_n), jnp.float32))
    if fmt == "int8":
        acc = acc * refs[0][cols].astype(jnp.float32)[None, :]
    if norm:
        acc = acc * _inverse_rms(refs[-2], *norm, width=x_ref.shape[1])
    o_ref[...] = acc.astype(o_ref.dtype)


_TWO_23 = 8388608.0  # 2^23: float32 0x4B000000; OR-ing an integer 0 <= i < 2^23 into its mantissa gives 2^23 + i


def _small_ints_as_f32(v: jax.Array, offset: int = 0) -> jax.Array:
    """int32 ``v`` with ``0 <= v + offset < 2^23`` as float32, exactly, without an integer-to-float
    conversion: the bits of ``2^23 + v + offset`` reinterpreted, minus ``2^23 + offset``."""
    bits = (v + offset) | 0x4B000000
    return lax.bitcast_convert_type(bits, jnp.float32) - (_TWO_23 + offset)


_HALF_BITS = 0x3F000000  # float32 0.5: a byte b < 128 in its bits 16-23 (mantissa bits 16-22) gives 0.5 + b / 256


def _half_plus_over_256(b: jax.Array) -> jax.Array:
    """Integers ``0 <= b < 128`` as the float32 ``0.5 + b / 256``, exactly: ``b`` shifted into the mantissa of 0.5."""
    return lax.bitcast_convert_type((b.astype(jnp.int32) << 16) | _HALF_BITS, jnp.float32)


# Inline PTX for the "permute" and "affine" conversions: ``prmt.b32 d, a, e, sel`` builds d from the bytes of a (indices
# 0-3) and of e (indices 4-7), byte i of d from the byte numbered by hex digit i of sel. With e = 0x4B000000 and byte_j
# of a in byte 0 of d, d is the bits of 2^23 + byte_j; with e = 0.5's bits and byte_j in byte 2, of 0.5 + byte_j / 256.
def _bytes_ptx(*prologue: str, base: int = 0x4B000000, position: int = 0) -> str:
    """PTX of one ``elementwise_inline_asm`` instance: ``prologue`` turns the input word ``$4`` into ``u``, four
    unsigned bytes; output ``$j`` is the bits of ``base`` with byte ``position`` replaced by byte ``j`` of ``u``."""
    def selector(j):
        return sum((j if i == position else 4 + i) << (4 * i) for i in range(4))

    permutes = [f"prmt.b32 ${j}, u, e, {selector(j):#x};" for j in range(4)]
    return "\n".join(["{", ".reg .b32 u, e;", f"mov.b32 e, {base:#x};", *prologue, *permutes, "}"])


_LOW_NIBBLES = ("and.b32 u, $4, 0x0F0F0F0F;",)
_HIGH_NIBBLES = ("shr.u32 u, $4, 4;", "and.b32 u, u, 0x0F0F0F0F;")
_PERMUTES = {  # name -> (PTX, the value to subtract from the permuted word's float32)
    "int8": (_bytes_ptx("xor.b32 u, $4, 0x80808080;"), _TWO_23 + 128),  # signed + 128 (each sign bit flipped)
    "low_nibbles": (_bytes_ptx(*_LOW_NIBBLES), _TWO_23),
    "high_nibbles": (_bytes_ptx(*_HIGH_NIBBLES), _TWO_23),
    # 0.5 + nibble / 256, nothing subtracted ("affine")
    "low_nibbles_affine": (_bytes_ptx(*_LOW_NIBBLES, base=_HALF_BITS, position=2), 0.0),
    "high_nibbles_affine": (_bytes_ptx(*_HIGH_NIBBLES, base=_HALF_BITS, position=2), 0.0),
}


def _permute_to_f32(kind: str, w: jax.Array) -> jax.Array:
    """8-bit integers ``w`` -> float32 (``_PERMUTES[kind]``: int8 values or the nibbles of bytes exactly, or nibbles
    as ``0.5 + q / 256``), four bytes (one 32-bit register) an asm instance, then one subtract each where the kind
    has one. One result a call: JAX's lowering of the primitive returns only the first of several."""
    ptx, offset = _PERMUTES[kind]
    (bits,) = pltriton.elementwise_inline_asm(ptx, args=[w], constraints="=r,=r,=r,=r,r", pack=4,
                                              result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, jnp.int32)])
    f = lax.bitcast_convert_type(bits, jnp.float32)
    return f - offset if offset else f


def multiply_add(a: jax.Array, b: jax.Array, c: jax.Array, fused: bool) -> jax.Array:
    """``a * b + c`` in float32 (broadcast), with ``fused`` one ``fma.rn.f32`` an element (inline PTX, compiled
    kernels only: ``MatmulConfig.gemv_fma``), else the plain expression."""
    if not fused:
        return a * b + c
    shape = jnp.broadcast_shapes(a.shape, b.shape, c.shape)
    args = [jnp.broadcast_to(v.astype(jnp.float32), shape) for v in (a, b, c)]
    (out,) = pltriton.elementwise_inline_asm("fma.rn.f32 $0, $1, $2, $3;", args=args, constraints="=f,f,f,f", pack=1,
                                             result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])
    return out


def integers_as_f32(v: jax.Array, kind: str, convert: str) -> jax.Array:
    """The integers a weight tile ``v`` holds as float32, by ``convert`` (``MatmulConfig.gemv_convert``): ``kind``
    "int8" (int8 values) or "low_nibbles" / "high_nibbles" (of uint8 bytes)."""
    if convert == "permute":
        return _permute_to_f32(kind, v)
    ints = {"int8": v, "low_nibbles": v & 0xF, "high_nibbles": v >> 4}[kind]
    if convert == "exponent":
        return _small_ints_as_f32(ints.astype(jnp.int32), offset=128 if kind == "int8" else 0)
    return ints.astype(jnp.float32)


def _nibbles_as_f32(packed: jax.Array, s: jax.Array, z: jax.Array, convert: str):
    """A packed int4 tile's low and high nibbles as float32 with the float32 scale and zero that make ``(q - z) * s``
    its weights: ``(q_lo, q_hi, s, z)``, the integers themselves with ``s`` and ``z`` as given, or for "affine"
    (inline PTX; "affine_jnp" the interpreter's equal form) ``0.5 + q / 256`` with ``256 s`` and ``(z + 128) / 256``.
    (MXFP4's FP4 codes: ``e2m1_tile_weights``.)"""
    if convert == "affine":
        q_lo, q_hi = (_permute_to_f32(f"{kind}_affine", packed) for kind in ("low_nibbles", "high_nibbles"))
    elif convert == "affine_jnp":
        q_lo, q_hi = _half_plus_over_256(packed & 0xF), _half_plus_over_256(packed >> 4)
    else:
        return (integers_as_f32(packed, "low_nibbles", convert), integers_as_f32(packed, "high_nibbles", convert),
                s, z)
    return q_lo, q_hi, s * 256.0, (z + 128.0) * (1 / 256)


def int4_tile_weights(packed: jax.Array, s: jax.Array, z: jax.Array, dtype, *, convert: str, fma: bool):
    """A packed int4 tile's weights for a tensor-core dot: its low- and high-nibble halves ``(q - z) * s`` in
    ``dtype``, the nibbles made float32 by ``convert`` (``_nibbles_as_f32``) and scaled by one multiply-add each
    (``multiply_add``, fused with ``fma``)."""
    q_lo, q_hi, s, z = _nibbles_as_f32(packed, s, z, convert)
    zs = -z * s  # (q - z) s = q s + zs
    return multiply_add(q_lo, s, zs, fma).astype(dtype), multiply_add(q_hi, s, zs, fma).astype(dtype)


def interpreted_conversion(convert: str) -> str:
    """The jnp form of a conversion that runs inline PTX compiled (equal values): the interpreter's."""
    return {"permute": "exponent", "affine": "affine_jnp"}.get(convert, convert)


def _gemv_kernel(x_ref, w_ref, *refs, fmt: str, block_n: int, block_k: int, steps: int, group_size: int,
                 defer_reduction: bool, convert: str, prefetch: int, fma: bool = False, subtiles: int = 1,
                 factor_scales: bool = False, norm: tuple = ()):
    """One program of the one-row form: ``block_n`` output columns over ``steps * block_k`` rows of K.

    No tensor cores: each weight tile is dequantized to float32, scaled by its slice of ``x``
    and summed over K on the CUDA cores. At one row the dot's 16-row tile did 16x the
    arithmetic for nothing and its small tiles kept too few bytes in flight (benchmarks/NOTES.md,
    run 6); here a program streams wide tiles and only reads and adds. ``defer_reduction``:
    the tile products accumulate elementwise and are summed over K once, after the loop.
    ``convert``: how integer weights become float32 (``MatmulConfig.gemv_convert``).
    ``prefetch``: each step's weight loads are issued a step ahead (``double_buffered_loop``; Triton
    pipelines only loads that feed a dot, so otherwise each step waits for its own tile).
    ``fma``: the deferred sum's multiply-adds as fused instructions (``multiply_add``).
    ``subtiles`` (int4, deferred sum): each step's packed tile loaded as that many blocks of rows, each multiplied
    into one accumulator of a block's shape (``MatmulConfig.gemv_subtiles``).
    ``factor_scales`` (int4, deferred sum): the group's scale and zero leave the products (``gemv_factor_scales``).
    ``norm``: ``(groups, eps)`` where x is a row's ``x * weight`` whose RMSNorm is applied to the output (the ref
    before the output: the row's ``groups`` sums of squares; ``pallas_kernels.deferred_norm``).
    """
    o_ref = refs[-1]
    n, split = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)
    first_k = split * (steps * block_k)

    def k_start(i):
        return pl.multiple_of(first_k + i * block_k, block_k)

    parts = subtiles if fmt == "int4" and defer_reduction else 1
    part_rows = block_k // 2 // parts  # int4: packed rows a part of a step's tile

    def load(i):
        """Step ``i``'s weight loads (int4: the packed tile's ``parts`` blocks of rows, then its group's scale and
        zero rows); past the last step, the last."""
        k0 = k_start(jnp.minimum(i, steps - 1))
        if fmt == "int4":
            packed = tuple(pltriton.load(w_ref.at[pl.ds(pl.multiple_of(k0 // 2 + j * part_rows, part_rows),
                                                        part_rows), cols], eviction_policy="evict_first")
                           for j in range(parts))
            group = k0 // group_size
            return packed, refs[0][group, cols], refs[1][group, cols]
        return (pltriton.load(w_ref.at[pl.ds(k0, block_k), cols], eviction_policy="evict_first"),)

    def tile(i, loaded, part=0):
        """Step ``i``'s float32 slices: int4 ``(scale, zero, x_lo, q_lo, x_hi, q_hi)`` (the low and high nibbles
        of the packed tile's block of rows ``part`` and their slices of ``x``), else ``(x, w)``."""
        k0 = k_start(i)
        if fmt == "int4":
            packed, s, z = loaded
            s, z = s.astype(jnp.float32), z.astype(jnp.float32)
            q_lo, q_hi, s, z = _nibbles_as_f32(packed[part], s, z, convert)
            lo = k0 + part * part_rows  # the block's low nibbles are K rows lo.., its high ones lo + block_k / 2..
            x_lo, x_hi = (x_ref[0, pl.ds(k, part_rows)].astype(jnp.float32) for k in (lo, lo + block_k // 2))
            return s, z, x_lo, q_lo, x_hi, q_hi
        (w,) = loaded
        w = integers_as_f32(w, "int8", convert) if fmt == "int8" else w.astype(jnp.float32)
        return x_ref[0, pl.ds(k0, block_k)].astype(jnp.float32), w

    def step(i, acc, loaded):  # acc: [block_n]; each tile summed over K at once
        if fmt == "int4":
            s, z, x_lo, q_lo, x_hi, q_hi = tile(i, loaded)
            # sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k): the zero leaves the tile.
            dot = jnp.sum(x_lo[:, None] * q_lo + x_hi[:, None] * q_hi, axis=0)
            return acc + s * (dot - z * (jnp.sum(x_lo) + jnp.sum(x_hi)))
        x, w = tile(i, loaded)
        return acc + jnp.sum(x[:, None] * w, axis=0)

    def deferred_step(i, acc, loaded):  # acc: [block_k (int4: a part's rows), block_n]; summed over K after the loop
        if fmt == "int4" and factor_scales:  # the step's x * q and x summed bare, then scaled once: s (xq - z x)
            products = x_sums = None
            tiles = [tile(i, loaded, part) for part in range(parts)]  # every slice of x read before any arithmetic
            for s, z, x_lo, q_lo, x_hi, q_hi in tiles:
                for x, q in ((x_lo, q_lo), (x_hi, q_hi)):
                    products = x[:, None] * q if products is None else multiply_add(x[:, None], q, products, fma)
                x_sums = x_lo + x_hi if x_sums is None else x_sums + x_lo + x_hi
            acc = multiply_add(products, s[None, :], acc, fma)
            return multiply_add(x_sums[:, None], (-z * s)[None, :], acc, fma)
        if fmt == "int4":
            for part in range(parts):
                s, z, x_lo, q_lo, x_hi, q_hi = tile(i, loaded, part)
                s, zs = s[None, :], (-z * s)[None, :]
                acc = multiply_add(x_lo[:, None], multiply_add(q_lo, s, zs, fma), acc, fma)
                acc = multiply_add(x_hi[:, None], multiply_add(q_hi, s, zs, fma), acc, fma)
            return acc
        x, w = tile(i, loaded)
        return multiply_add(x[:, None], w, acc, fma)

    body = deferred_step if defer_reduction else step
    rows = (part_rows if fmt == "int4" else block_k) if defer_reduction else None
    acc = step_loop(steps, load, body, jnp.zeros((rows, block_n) if rows else (block_n,), jnp.float32), prefetch)
    if defer_reduction:
        acc = jnp.sum(acc, axis=0)
    if fmt == "int8":
        acc = acc * refs[0][cols].astype(jnp.float32)
    if norm:
        acc = acc * _inverse_rms(refs[-2], *norm, width=x_ref.shape[1])
    o_ref[...] = acc.astype(o_ref.dtype)


def _kmajor_gemv_kernel(x_ref, w_ref, scale_ref, *refs, block_n: int, block_k: int, steps: int, convert: str,
                        prefetch: int, defer_reduction: bool = False, fma: bool = False, norm: tuple = (),
                        gated: bool = False):
    """One program of the K-major int8 GEMV: ``block_n`` output columns (rows of ``qt``) over ``steps * block_k``
    of K; each step's products summed over K at once (inside each thread for the most part: a tile row is
    contiguous K), so the accumulator is one float32 a column. ``defer_reduction``: the products accumulate in a
    ``[block_n, block_k]`` tile summed over K once, after the loop, and x's slice is read as a tile of w's shape.
    ``norm``: as ``_gemv_kernel``'s. ``gated``: ``qt``'s rows are a gated MLP's gate and up rows in turn,
    ``block_n`` each (``interleave_halves``); the program reads the next ``2 * block_n`` rows (a block of each) and
    writes ``silu(gate) * up`` for its ``block_n`` columns."""
    o_ref = refs[-1]
    n, split = pl.program_id(0), pl.program_id(1)
    row_blocks = [pl.ds(pl.multiple_of((2 * n + i if gated else n) * block_n, block_n), block_n)
                  for i in range(2 if gated else 1)]
    first_k = split * (steps * block_k)

    def k_start(i):
        return pl.multiple_of(first_k + i * block_k, block_k)

    def load(i):  # past the last step, the last (the pair loop's look-ahead)
        k = pl.ds(k_start(jnp.minimum(i, steps - 1)), block_k)
        return tuple(pltriton.load(w_ref.at[rows, k], eviction_policy="evict_first") for rows in row_blocks)

    def body(i, acc, tiles):
        if defer_reduction:  # x's slice repeated down a tile of w's shape (w's register layout: no conversion)
            ks = (k_start(i) + jnp.arange(block_k, dtype=jnp.int32))[None, :]
            x = pltriton.load(x_ref.at[jnp.zeros((block_n, 1), jnp.int32), ks]).astype(jnp.float32)
        else:
            x = x_ref[0, pl.ds(k_start(i), block_k)].astype(jnp.float32)[None, :]
        sums = []
        for a, w in zip(acc, tiles):
            w = integers_as_f32(w, "int8", convert)
            sums.append(multiply_add(x, w, a, fma) if defer_reduction else a + jnp.sum(x * w, axis=1))
        return tuple(sums)

    zeros = jnp.zeros((block_n, block_k) if defer_reduction else (block_n,), jnp.float32)
    acc = step_loop(steps, load, body, (zeros,) * len(row_blocks), prefetch)
    out = [(jnp.sum(a, axis=1) if defer_reduction else a) * scale_ref[rows].astype(jnp.float32)
           for a, rows in zip(acc, row_blocks)]
    if norm:
        inverse_rms = _inverse_rms(refs[0], *norm, width=x_ref.shape[1])
        out = [o * inverse_rms for o in out]
    o_ref[...] = silu_product(*out, o_ref.dtype) if gated else out[0].astype(o_ref.dtype)


def silu_product(gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
    """``silu(gate) * up`` from float32 matmul outputs, rounded to ``dtype`` where the unfused model rounds (each
    matmul's output, the sigmoid, the SiLU, the product: XLA rounds each op of a 16-bit type)."""
    def rounded(v):
        return v.astype(dtype).astype(jnp.float32)

    gate, up = rounded(gate), rounded(up)
    return (rounded(gate * rounded(1.0 / (1.0 + jnp.exp(-gate)))) * up).astype(dtype)


def _inverse_rms(sum_sq_ref, groups: int, eps: float, *, width: int) -> jax.Array:
    """``rsqrt(mean(x^2) + eps)`` of a row from its ``groups`` blocks' sums of squares (``deferred_norm``): a few
    scalar loads a program (one vector load where more than 16, a power of two)."""
    if groups > 16 and not groups & (groups - 1):
        total = jnp.sum(sum_sq_ref[...])
    else:
        total = sum_sq_ref[0]
        for i in range(1, groups):
            total += sum_sq_ref[i]
    return lax.rsqrt(total / width + eps)


def step_loop(steps: int, load, body, acc, prefetch: int):
    """``acc = body(i, acc, load(i))`` for ``i < steps``: each step's loads issued a step ahead of its arithmetic
    (``double_buffered_loop``) when ``prefetch``, else just before it (a ``fori_loop``)."""
    if prefetch:
        return double_buffered_loop(steps, load, body, acc)
    return lax.fori_loop(0, steps, lambda i, acc: body(i, acc, load(i)), acc)


def double_buffered_loop(steps: int, load, body, acc):
    """``acc = body(i, acc, load(i))`` for ``i < steps``, each step's loads issued a step before its arithmetic.

    The loop runs over pairs of steps with two tiles that swap roles (load the odd tile, use the even one, load the
    next even tile into the registers just freed, use the odd one), so the tile carried round the loop keeps its
    registers. A carried queue of loaded tiles made the compiler copy each new tile into the carried registers at
    the loop's end, and the copy waits for the load (the SASS of Triton 3.9 for sm_90a, NOTES.md after run 16b).
    ``load(i)`` must accept ``i == steps`` (the pair loop's last look-ahead; clamp it)."""
    def pair(p, carry):
        acc, even = carry
        i = 2 * p
        odd = load(i + 1)
        acc = body(i, acc, even)
        even = load(i + 2)
        return body(i + 1, acc, odd), even

    acc, last = lax.fori_loop(0, steps // 2, pair, (acc, load(0)))
    return body(steps - 1, acc, last) if steps % 2 else acc


def _largest_power_of_2_dividing(n: int, upper: int, lower: int = 16) -> Optional[int]:
    size = upper
    while size >= lower:
        if n % size == 0:
            return size
        size //= 2
    return None


def auto_k_splits(num_col_blocks: int, num_k_steps: int, programs_per_core: int = 2, min_steps: int = 4) -> int:
    """The fewest K splits (a divisor of the step count) that give ``programs_per_core``
    programs per multiprocessor; each split keeps at least ``min_steps`` steps."""
    target = programs_per_core * core_count()
    best = 1
    for splits in range(1, num_k_steps + 1):
        if num_k_steps % splits or num_k_steps // splits < min_steps:
            continue
        best = splits
        if num_col_blocks * splits >= target:
            break
    return best


def _tile_sizes(fmt: str, K: int, N: int, pack: int, max_n: int, max_k: int) -> tuple[int, int]:
    """``(block_n, block_k)``: the largest powers of two up to ``max_n`` / ``max_k`` dividing N / K
    (int4 steps through K by its packing block)."""
    block_n = block_size(N, max_n, "N")
    return (block_n, pack) if fmt == "int4" else (block_n, block_size(K, max_k, "K"))


def block_size(n: int, upper: int, name: str, kernel: str = "the Pallas matmul") -> int:
    """The largest power of two up to ``upper`` dividing ``n`` (a dimension called ``name``), at least 16."""
    size = _largest_power_of_2_dividing(n, upper)
    if size is None:
        raise ValueError(f"{name}={n} must be a multiple of 16 for {kernel}")
    return size


def _k_splits(config: MatmulConfig, col_blocks: int, num_steps: int, block_k: int, programs_per_core: int,
              min_steps: int = 4) -> int:
    splits = config.k_splits or auto_k_splits(col_blocks, num_steps, programs_per_core, min_steps)
    if num_steps % splits:
        raise ValueError(f"k_splits={splits} must divide the {num_steps} K steps of {block_k} rows")
    return splits


def add_splits(partials: jax.Array, dtype, keep: bool = False) -> jax.Array:
    """``[k_splits, ...]`` partial sums (float32 when split) -> the result in ``dtype``; ``keep``: the partials as
    they are, for a consumer that adds them itself (``models.norm.add_rms_norm``: XLA fuses the sum into its add)."""
    if keep:
        return partials
    return partials[0] if partials.shape[0] == 1 else partials.sum(axis=0).astype(dtype)


@functools.lru_cache(maxsize=None)
def default_config() -> MatmulConfig:
    """``MatmulConfig()`` with the fields of the JSON object in ``$PAGEDJAX_MATMUL_CONFIG`` (read
    once), e.g. ``'{"gemv_defer_reduction": true}'``: a knob for timing a tiling inside the whole
    model (the matmul benchmark in isolation did not predict it: benchmarks/NOTES.md, run 9)."""
    return dataclass_from_env(MatmulConfig, "PAGEDJAX_MATMUL_CONFIG")


def pad_rows(x: jax.Array, max_block_m: int) -> tuple[jax.Array, int]:
    """``x[M, K]`` padded to whole row tiles, and the tile height: ``max_block_m``, or for fewer rows the next
    power of two of M (at least ``MIN_ROWS``, the tensor-core tile), so a few rows make one small tile."""
    M = x.shape[0]
    block_m = min(max_block_m, max(MIN_ROWS, 1 << max(0, M - 1).bit_length()))
    rows = -(-M // block_m) * block_m
    return (x if rows == M else jnp.pad(x, ((0, rows - M), (0, 0)))), block_m


def _call_settings(x, K: int, config: Optional[MatmulConfig], interpret: Optional[bool]) -> tuple[MatmulConfig, bool]:
    """A wrapper's ``(config, interpret)``: the defaults filled in (``default_config()``; compiled on GPU,
    interpreted elsewhere), after checking that ``x`` is ``[M, K]``."""
    if x.ndim != 2 or x.shape[1] != K:
        raise ValueError(f"x must be [M, K={K}], got shape {x.shape}")
    return config or default_config(), jax.default_backend() != "gpu" if interpret is None else interpret


def _weight_streaming_matmul(x, w, extras, *, fmt, K, N, group_size, pack, config, interpret, keep_splits=False,
                             sum_sq=None, norm_eps=0.0):
    config, interpret = _call_settings(x, K, config, interpret)
    M = x.shape[0]
    if M == 1 and config.gemv:
        return _gemv(x, w, extras, fmt=fmt, K=K, N=N, group_size=group_size, pack=pack, config=config,
                     interpret=interpret, keep_splits=keep_splits, sum_sq=sum_sq, norm_eps=norm_eps)
    if sum_sq is not None and M != 1:
        raise ValueError("a deferred RMSNorm (sum_sq) is applied at one row only (the one-row GEMV or dot)")
    block_n, block_k = _tile_sizes(fmt, K, N, pack, config.block_n, config.block_k)
    x, block_m = pad_rows(x, config.block_m)
    rows = x.shape[0]
    num_steps = K // block_k
    splits = _k_splits(config, (rows // block_m) * (N // block_n), num_steps, block_k, config.programs_per_core)
    if config.tile_convert not in ("affine", "cvt"):
        raise ValueError(f"tile_convert must be 'affine' or 'cvt', got {config.tile_convert!r}")
    convert = interpreted_conversion(config.tile_convert) if interpret else config.tile_convert
    kernel = functools.partial(_matmul_kernel, fmt=fmt, block_m=block_m, block_n=block_n, block_k=block_k,
                               steps=num_steps // splits, group_size=group_size, convert=convert,
                               fma=config.gemv_fma and not interpret)
    kernel, extras = _with_deferred_norm(kernel, extras, sum_sq, norm_eps)
    out = pl.pallas_call(
        kernel,
        # Row tiles first: the programs that read the same weight tile run side by side (L2 reuse).
        grid=(rows // block_m, N // block_n, splits),
        in_specs=[pl.no_block_spec] * (2 + len(extras)),
        out_specs=pl.BlockSpec((None, block_m, block_n), lambda m, n, s: (s, m, n)),
        out_shape=jax.ShapeDtypeStruct((splits, rows, N), x.dtype if splits == 1 else jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=f"{fmt}_weight_streaming_matmul",
    )(x, w, *extras)
    return add_splits(out[:, :M], x.dtype, keep_splits)


def gemv_loop_settings(fmt: str, config: MatmulConfig, interpret: bool, default_prefetch: int) -> tuple[int, str]:
    """``(prefetch, convert)`` of a one-row kernel: loads a step ahead or not (``gemv_prefetch``; None: the kernel's
    ``default_prefetch``), and the integer-to-float conversion (``gemv_convert``; "affine" is for nibbles, int8
    values go as "permute"; inline PTX runs only compiled, so the interpreter takes the same trick written in jnp,
    equal values)."""
    prefetch = default_prefetch if config.gemv_prefetch is None else config.gemv_prefetch
    if prefetch not in (0, 1):
        raise ValueError(f"gemv_prefetch must be 0 or 1 (loads a step ahead), got {config.gemv_prefetch}")
    if config.gemv_convert not in GEMV_CONVERSIONS:
        raise ValueError(f"gemv_convert must be one of {GEMV_CONVERSIONS}, got {config.gemv_convert!r}")
    convert = "permute" if config.gemv_convert == "affine" and fmt != "int4" else config.gemv_convert
    return prefetch, interpreted_conversion(convert) if interpret else convert


def _with_deferred_norm(kernel, extras: tuple, sum_sq, norm_eps: float):
    """``(kernel, extras)`` for a one-row matmul that applies a deferred RMSNorm (``sum_sq``, an input after
    ``extras``: ``pallas_kernels.deferred_norm``), or as given without one."""
    if sum_sq is None:
        return kernel, extras
    if sum_sq.ndim != 1 or sum_sq.dtype != jnp.float32:
        raise ValueError(f"sum_sq must be float32 [groups], got {sum_sq.dtype}{sum_sq.shape}")
    return functools.partial(kernel, norm=(sum_sq.shape[0], float(norm_eps))), (*extras, sum_sq)


def _one_row_call(kernel, x, w, extras, *, N, block_n, splits, config, interpret, name, keep_splits=False,
                  sum_sq=None, norm_eps=0.0):
    """``kernel`` over the grid ``(N / block_n, splits)`` of one-row programs, each writing ``block_n`` columns of
    its split's partial sums; the splits added (``add_splits``): ``[1, N]``. ``sum_sq``: x is a row's ``x * weight``
    and the output gets its RMSNorm's scale (``pallas_kernels.deferred_norm``), an input after ``extras``."""
    kernel, extras = _with_deferred_norm(kernel, extras, sum_sq, norm_eps)
    out = pl.pallas_call(
        kernel,
        grid=(N // block_n, splits),
        in_specs=[pl.no_block_spec] * (2 + len(extras)),
        out_specs=pl.BlockSpec((None, block_n), lambda n, s: (s, n)),
        out_shape=jax.ShapeDtypeStruct((splits, N), x.dtype if splits == 1 else jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=config.gemv_num_warps, num_stages=config.gemv_num_stages),
        interpret=interpret,
        name=name,
    )(x, w, *extras)
    return add_splits(out[:, None, :], x.dtype, keep_splits)


def _gemv(x, w, extras, *, fmt, K, N, group_size, pack, config, interpret, keep_splits=False, sum_sq=None,
          norm_eps=0.0):
    """The one-row form (``_gemv_kernel``): grid ``(N / block_n, k_splits)``."""
    prefetch, convert = gemv_loop_settings(fmt, config, interpret, default_prefetch=int(
        fmt == "int8" or (fmt == "int4" and config.gemv_factor_scales and config.gemv_defer_reduction)))
    block_n, block_k = _tile_sizes(fmt, K, N, pack, config.gemv_block_n, config.gemv_block_k)
    if fmt == "int4" and (config.gemv_subtiles < 1 or (block_k // 2) % config.gemv_subtiles):
        raise ValueError(f"gemv_subtiles must divide the {block_k // 2} packed rows of a step, "
                         f"got {config.gemv_subtiles}")
    num_steps = K // block_k
    splits = _k_splits(config, N // block_n, num_steps, block_k, config.gemv_programs_per_core, config.gemv_min_steps)
    kernel = functools.partial(_gemv_kernel, fmt=fmt, block_n=block_n, block_k=block_k, steps=num_steps // splits,
                               group_size=group_size, defer_reduction=config.gemv_defer_reduction,
                               convert=convert, prefetch=prefetch, fma=config.gemv_fma and not interpret,
                               subtiles=config.gemv_subtiles, factor_scales=config.gemv_factor_scales)
    return _one_row_call(kernel, x, w, extras, N=N, block_n=block_n, splits=splits, config=config,
                         interpret=interpret, name=f"{fmt}_weight_streaming_gemv", keep_splits=keep_splits,
                         sum_sq=sum_sq, norm_eps=norm_eps)


# keep_splits: the result as ``[k_splits, M, N]`` partial sums (float32 when split), not added (``add_splits``).
# sum_sq / norm_eps (one row): x is a row's ``x * weight`` whose RMSNorm the GEMV applies to its output, from the row's
# blocks' sums of squares (``pallas_kernels.deferred_norm``).
_STATIC = ("config", "interpret", "keep_splits", "norm_eps")


@functools.partial(jax.jit, static_argnames=_STATIC)
def dense_matmul(x, w, *, config: Optional[MatmulConfig] = None, interpret: Optional[bool] = None,
                 keep_splits: bool = False, sum_sq=None, norm_eps: float = 0.0):
    """``x[M, K] @ w[K, N]`` streaming a dense weight (bf16/f16/f32); float32 accumulation."""
    K, N = w.shape
    return _weight_streaming_matmul(x, w, (), fmt="dense", K=K, N=N, group_size=0, pack=0, config=config,
                                    interpret=interpret, keep_splits=keep_splits, sum_sq=sum_sq, norm_eps=norm_eps)


@functools.partial(jax.jit, static_argnames=_STATIC)
def int8_matmul(x, q, scale, *, config: Optional[MatmulConfig] = None, interpret: Optional[bool] = None,
                keep_splits: bool = False, sum_sq=None, norm_eps: float = 0.0):
    """``x[M, K] @ (q[K, N] * scale[N])`` with ``q`` int8, dequantized in registers."""
    K, N = q.shape
    if q.dtype != jnp.int8 or scale.shape != (N,):
        raise ValueError(f"int8 weights need q int8 [K, N] and scale [N]; got {q.dtype}{q.shape}, {scale.shape}")
    return _weight_streaming_matmul(x, q, (scale,), fmt="int8", K=K, N=N, group_size=0, pack=0, config=config,
                                    interpret=interpret, keep_splits=keep_splits, sum_sq=sum_sq, norm_eps=norm_eps)


def _kmajor_kernel(config: MatmulConfig, interpret: bool, **tiling):
    """``_kmajor_gemv_kernel`` with ``config``'s loop settings (conversion, loads ahead, deferred sum, fused
    multiply-adds) and ``tiling`` (its tile and step counts; ``gated``)."""
    prefetch, convert = gemv_loop_settings("int8", config, interpret,
                                            default_prefetch=int(not config.kmajor_defer_reduction))
    return functools.partial(_kmajor_gemv_kernel, convert=convert, prefetch=prefetch,
                             defer_reduction=config.kmajor_defer_reduction, fma=config.gemv_fma and not interpret,
                             **tiling)


@functools.partial(jax.jit, static_argnames=_STATIC)
def int8_kmajor_matmul(x, qt, scale, *, config: Optional[MatmulConfig] = None, interpret: Optional[bool] = None,
                       keep_splits: bool = False, sum_sq=None, norm_eps: float = 0.0):
    """``x[M, K] @ (qt[N, K] * scale[N, None]).T`` with ``qt`` int8 stored K-major: one row by the K-major GEMV
    (``_kmajor_gemv_kernel``), more rows by XLA's dot (which fuses the int8 convert into it)."""
    N, K = qt.shape
    if qt.dtype != jnp.int8 or scale.shape != (N,):
        raise ValueError(f"K-major int8 weights need qt int8 [N, K] and scale [N]; got {qt.dtype}{qt.shape}, "
                         f"{scale.shape}")
    config, interpret = _call_settings(x, K, config, interpret)
    if x.shape[0] != 1:
        if sum_sq is not None:
            raise ValueError("a deferred RMSNorm (sum_sq) is applied by the one-row GEMV only")
        out = int8_kmajor_matmul_reference(x, qt, scale)
        return out[None] if keep_splits else out
    block_n, block_k = _tile_sizes("int8", K, N, 0, config.kmajor_block_n, config.kmajor_block_k)
    num_steps = K // block_k
    splits = _k_splits(config, N // block_n, num_steps, block_k, config.gemv_programs_per_core, config.kmajor_min_steps)
    kernel = _kmajor_kernel(config, interpret, block_n=block_n, block_k=block_k, steps=num_steps // splits)
    return _one_row_call(kernel, x, qt, (scale,), N=N, block_n=block_n, splits=splits, config=config,
                         interpret=interpret, name="int8_kmajor_gemv", keep_splits=keep_splits, sum_sq=sum_sq,
                         norm_eps=norm_eps)


@functools.partial(jax.jit, static_argnames=("group", "config", "interpret", "norm_eps"))
def int8_kmajor_gated_matmul(x, qt, scale, *, group: int, config: Optional[MatmulConfig] = None,
                             interpret: Optional[bool] = None, sum_sq=None, norm_eps: float = 0.0):
    """``int8_kmajor_gated_reference`` at one row by the K-major GEMV with the SiLU product in its epilogue: a
    program reads ``group`` gate rows and their ``group`` up rows (adjacent in ``qt``) over the whole of K and
    writes ``group`` columns of ``[1, I]``. ``sum_sq`` / ``norm_eps``: as ``int8_kmajor_matmul``'s."""
    two_i, K = qt.shape
    if qt.dtype != jnp.int8 or scale.shape != (two_i,) or two_i % (2 * group) or x.shape[0] != 1:
        raise ValueError(f"the gated GEMV takes one row and K-major int8 qt [2I, K] (2I a multiple of {2 * group}) "
                         f"with scale [2I]; got x {x.shape}, {qt.dtype}{qt.shape}, {scale.shape}")
    config, interpret = _call_settings(x, K, config, interpret)
    _, block_k = _tile_sizes("int8", K, 2 * group, 0, 2 * group, config.kmajor_block_k)
    kernel = _kmajor_kernel(config, interpret, block_n=group, block_k=block_k, steps=K // block_k, gated=True)
    return _one_row_call(kernel, x, qt, (scale,), N=two_i // 2, block_n=group, splits=1, config=config,
                         interpret=interpret, name="int8_kmajor_gated_gemv", sum_sq=sum_sq, norm_eps=norm_eps)


def _int4_shape(packed, scales, zeros, group_size: int, pack: int) -> tuple[int, int]:
    """``(K, N)`` of an int4 weight, after checking its layout."""
    half_k, N = packed.shape
    K = 2 * half_k
    groups = K // group_size
    if packed.dtype != jnp.uint8 or K % group_size or group_size % pack or K % pack:
        raise ValueError(f"int4 weights need packed uint8 [K/2, N] with pack ({pack}) dividing the group "
                         f"size ({group_size}) and K ({K}); got {packed.dtype}{packed.shape}")
    if scales.shape != (groups, N) or zeros.shape != (groups, N):
        raise ValueError(f"int4 scales and zeros must be [K/g={groups}, N={N}], got {scales.shape}, {zeros.shape}")
    return K, N


@functools.partial(jax.jit, static_argnames=("group_size", "pack") + _STATIC)
def int4_matmul(x, packed, scales, zeros, *, group_size: int, pack: int, config: Optional[MatmulConfig] = None,
                interpret: Optional[bool] = None, keep_splits: bool = False, sum_sq=None, norm_eps: float = 0.0):
    """``x[M, K] @ W`` for an int4 ``W`` (layout in the module docstring)."""
    K, N = _int4_shape(packed, scales, zeros, group_size, pack)
    return _weight_streaming_matmul(x, packed, (scales, zeros), fmt="int4", K=K, N=N, group_size=group_size,
                                    pack=pack, config=config, interpret=interpret, keep_splits=keep_splits,
                                    sum_sq=sum_sq, norm_eps=norm_eps)
