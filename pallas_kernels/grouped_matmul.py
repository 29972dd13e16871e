"""The grouped matmul of a mixture-of-experts layer: blocks of rows, each multiplied by its own expert's weight.

``x[R, K]`` holds the rows routed to experts, sorted by expert and padded so that every block of ``block_m`` rows
belongs to one expert (``models.moe.sort_by_expert`` makes that layout); ``block_expert[R / block_m]`` names each
block's expert, or ``E`` for a block past the last expert's rows. The result is ``y[r] = x[r] @ w[block_expert[r //
block_m]]``, and zeros in the unused blocks. With ``row_token[R]`` the rows are not laid out beforehand: ``x`` holds
the tokens and the kernel loads row ``r`` as ``x[row_token[r]]`` (zeros for the padding's token ``T``), so no routed
copy of the tokens is written and read back (``gather_rows`` is that copy, for the references).

The kernel (Triton through Pallas; vLLM's ``fused_moe`` has the same shape): program ``(b, n)`` reads its block's
expert id, then streams ``block_k`` rows of that expert's ``[K, N]`` weight a step for its ``block_n`` output
columns, accumulating ``x``'s block times the tile on the tensor cores in float32. A block with no expert returns
zeros without reading a weight, so a decode step, whose padded layout has many more blocks than rows, pays only for
the experts it routed to. Weight-only int8 experts (``scale[E, N]`` per output column) are converted tile by tile
(exact) and scaled once after the K loop, so they cost half the bytes of bf16 ones (fp8 experts alike, their
weight stored ``[E, N, K]`` and each tile transposed: weight-only, no fp8 tensor cores); 4-bit experts
(``grouped_matmul_int4``: AWQ / GPTQ groups, a quarter of the bytes) are dequantized a packing block a step.
XLA's own ``lax.ragged_dot`` on CUDA (jaxlib 0.10-0.11) multiplies every row by every expert (a dense fallback),
``E`` times the work; hence this kernel.

``grouped_matmul_reference`` / ``grouped_matmul_int4_reference`` are the same products in jnp (one gathered weight a
block), for CPU runs and tests.
Run on an H200 in run 36 (benchmarks/NOTES.md): correct compiled, but at prompt sizes 182-248 TFLOP/s and at
batch 1 ~0.6 TB/s of expert weights under its first tiles. ``GroupedMatmulConfig`` holds the settings that
``scripts/bench_grouped_matmul.py`` sweeps; its defaults are run 37's winners (H100: int4 gate/up at 16,384 tokens
261 TFLOP/s, 1.76x the first tiles; at one token 1.26x).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.env_config import dataclass_from_env
from pallas_kernels.quantized_matmul import (block_size, dequantize_int4, e2m1_tile_weights, int4_tile_weights,
                                             integers_as_f32, interpreted_conversion)

CONVERSIONS = ("cvt", "affine")


def _grouped_matmul_kernel(block_expert_ref, *refs, num_experts: int, block_m: int, block_n: int, block_k: int,
                           group_size: int, k_major: bool, steps_per_split: int, k_unroll: int, columns_first: bool,
                           convert: str, int8_convert: str, fma: bool, gather: bool, swiglu: bool, up_start: int):
    """``refs``: where ``gather``, the rows' tokens (``row_token``); then x, the weight, the int8 / fp8 scale, the
    int4 scales and zeros or MXFP4's exponents (``convert`` "e2m1"), and the output. ``gather``: row ``r`` of a
    block is ``x[row_token[r]]``, zeros where that is past x's last row (the padding), loaded by the kernel. An int4
    step's ``block_k`` rows are one packing block (``quantized_matmul.pack_int4``): low nibbles its first half, high
    nibbles its second.
    ``k_major``: ``w`` is ``[E, N, K]`` (fp8 experts, as ``Fp8Weight`` stores them), each tile transposed.
    Program ``(b, n, s)`` (``(n, b, s)`` where ``columns_first``) sums K steps ``[s * steps_per_split, (s + 1) *
    steps_per_split)``, ``k_unroll`` of them a loop iteration. ``convert`` / ``int8_convert``: how int4 nibbles /
    int8 values become floats (``quantized_matmul``'s forms, from ``GroupedMatmulConfig.convert`` / ``int8_convert``;
    the interpreter's jnp form where it runs inline PTX compiled); ``fma``: the int4 dequantization's multiply-add
    as one instruction.
    ``swiglu``: the weight's N columns are a gate's and an up projection's halves (the up's from ``up_start``), and
    a program's output tile is ``silu(gate) * up`` of its columns in each half (a step's x tiles loaded once for
    both)."""
    row_token_ref, (x_ref, w_ref, *quant_refs, o_ref) = (refs[0], refs[1:]) if gather else (None, refs)
    int4 = len(quant_refs) == 2 or convert == "e2m1"
    b, n, split = pl.program_id(1 if columns_first else 0), pl.program_id(0 if columns_first else 1), pl.program_id(2)
    expert = block_expert_ref[b]
    rows = pl.ds(pl.multiple_of(b * block_m, block_m), block_m)
    cols = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)
    # The weight columns each accumulator sums: the tile's own, or its gate's and its up projection's.
    column_sets = (cols, pl.ds(pl.multiple_of(up_start + n * block_n, block_n), block_n)) if swiglu else (cols,)
    if gather:
        token = row_token_ref[rows]
        present = token < x_ref.shape[0]
        token = jnp.where(present, token, 0)[:, None]

    def x_tile(start, size):
        """``x``'s rows of this block, columns ``[start, start + size)``."""
        if not gather:
            return x_ref[rows, pl.ds(pl.multiple_of(start, size), size)]
        columns = (start + jnp.arange(size, dtype=jnp.int32))[None, :]
        return pltriton.load(x_ref.at[token, columns], mask=jnp.broadcast_to(present[:, None], (block_m, size)),
                             other=0)

    def loaded_once(load):
        """``load()``'s tile, loaded where first used and shared by the column sets."""
        tile = []

        def get():
            if not tile:
                tile.append(load())
            return tile[0]

        return get

    def dense_step(i, accs):
        ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
        x = loaded_once(lambda: x_tile(i * block_k, block_k))

        def product(acc, cols):
            # int8 / fp8 weights: exact in bf16 / f32
            w = w_ref[expert, cols, ks].T if k_major else w_ref[expert, ks, cols]
            if w.dtype == jnp.int8 and int8_convert != "cvt":
                w = integers_as_f32(w, "int8", int8_convert)
            w = w.astype(x_ref.dtype)
            return acc + jnp.dot(x(), w, preferred_element_type=jnp.float32)

        return tuple(map(product, accs, column_sets))

    def int4_step(i, accs):
        half = block_k // 2
        xs = [loaded_once(lambda start=start: x_tile(start, half)) for start in (i * block_k, i * block_k + half)]
        group = i * block_k // group_size

        def product(acc, cols):
            packed = w_ref[expert, pl.ds(pl.multiple_of(i * half, half), half), cols]
            if convert == "e2m1":
                tiles = e2m1_tile_weights(packed, quant_refs[0][expert, group, cols][None, :], x_ref.dtype)
            else:
                scale = quant_refs[0][expert, group, cols].astype(jnp.float32)[None, :]
                zero = quant_refs[1][expert, group, cols].astype(jnp.float32)[None, :]
                tiles = int4_tile_weights(packed, scale, zero, x_ref.dtype, convert=convert, fma=fma)
            for w, x in zip(tiles, xs):
                acc = acc + jnp.dot(x(), w, preferred_element_type=jnp.float32)
            return acc

        return tuple(map(product, accs, column_sets))

    def unrolled_steps(i, accs):
        for j in range(k_unroll):
            accs = (int4_step if int4 else dense_step)(i * k_unroll + j, accs)
        return accs

    @pl.when(expert < num_experts)
    def _():
        first = split * steps_per_split // k_unroll
        accs = jax.lax.fori_loop(first, first + steps_per_split // k_unroll, unrolled_steps,
                                 tuple(jnp.zeros((block_m, block_n), jnp.float32) for _ in column_sets))
        if not int4 and quant_refs:
            accs = tuple(acc * quant_refs[0][expert, cols][None, :] for acc, cols in zip(accs, column_sets))
        out = jax.nn.silu(accs[0]) * accs[1] if swiglu else accs[0]
        o_ref[...] = out.astype(o_ref.dtype).reshape(o_ref.shape)

    @pl.when(expert >= num_experts)
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def _check_shapes(x, w, block_expert, scale, k: int, n: int, row_token=None, swiglu: bool = False) -> int:
    """``block_m``: the rows of a block, after checking the operands agree (``k``, ``n``: the weight's K and N)."""
    if row_token is not None and row_token.ndim != 1:
        raise ValueError(f"row_token must be [R] (each row's token), got {row_token.shape}")
    if swiglu and n % 32:
        raise ValueError(f"swiglu needs a weight of two halves (gate, up) of 16-column tiles: N = {n} is not a "
                         "multiple of 32")
    rows = x.shape[0] if row_token is None else row_token.shape[0]
    if w.ndim != 3 or x.shape[1] != k:
        raise ValueError(f"the grouped matmul needs x[R, K] and w[E, K, N] (or [E, N, K]); got {x.shape} and a "
                         f"weight of {w.shape[0]} experts of K = {k}")
    quantized = w.dtype in (jnp.int8, jnp.float8_e4m3fn)
    if (scale is None) == quantized or (scale is not None and scale.shape != (w.shape[0], n)):
        raise ValueError(f"int8 and fp8 weights need their scale[E, N] and other weights none; got {w.dtype} "
                         f"weights and scale {None if scale is None else scale.shape}")
    if block_expert.ndim != 1 or not block_expert.shape[0] or rows % block_expert.shape[0]:
        raise ValueError(f"block_expert {block_expert.shape} must name the expert of each equal block of {rows} rows")
    return rows // block_expert.shape[0]


def _check_int4(x, packed, scales, zeros, block_expert, group_size: int, pack: int, row_token=None,
                swiglu: bool = False, codes: str = "uint4") -> int:
    """``block_m`` for int4 operands (``quantized_matmul.pack_int4``'s layout), after checking them."""
    E, half_k, n = packed.shape
    k = 2 * half_k
    if packed.dtype != jnp.uint8 or group_size % pack or k % group_size:
        raise ValueError(f"int4 experts need uint8 packed [E, K/2, N] and packing blocks ({pack}) dividing the "
                         f"group size ({group_size}) dividing K ({k}); got {packed.dtype} {packed.shape}")
    if codes == "e2m1":
        if scales.shape != (E, k // group_size, n) or scales.dtype != jnp.uint8 or zeros is not None:
            raise ValueError(f"MXFP4 experts need uint8 exponents [E, K/g, N] = {[E, k // group_size, n]} and no "
                             f"zeros; got {scales.dtype} {scales.shape} and zeros {getattr(zeros, 'shape', None)}")
    elif zeros is None or scales.shape != (E, k // group_size, n) or zeros.shape != scales.shape:
        raise ValueError(f"int4 experts need scales and zeros [E, K/g, N] = {[E, k // group_size, n]}; got "
                         f"{scales.shape} and {getattr(zeros, 'shape', None)}")
    return _check_shapes(x, packed, block_expert, None, k, n, row_token, swiglu)


@dataclasses.dataclass(frozen=True)
class GroupedMatmulConfig:
    """Tiles and Triton launch settings of the grouped matmul, one set (``decode_*``) for blocks of up to
    ``decode_max_block_m`` rows (small decode batches: most experts get a row or none, so a launch has few blocks and
    each must stream its expert's weight fast), one (``large_*``) for blocks of at least ``large_min_block_m`` rows
    (long prompts) and one for the blocks between (large decode batches, short prompts). ``block_n`` / ``block_k``
    are upper bounds (the largest power of two dividing N / K); an int4 K step is its packing block whatever
    ``block_k`` says; ``k_splits`` programs share a block's K steps (their float32 partial sums added after),
    capped at what divides the steps. ``$PAGEDJAX_MOE_CONFIG`` (a JSON object of these fields) overrides them
    for timing (``scripts/bench_grouped_matmul.py``)."""

    decode_max_block_m: int = 32
    # The launch order: a block of rows with each of its column tiles in turn (the first grid axis varies fastest),
    # instead of each column tile over every block. At a prompt's 16,384 tokens the routed rows are ~600 MB: row
    # blocks first re-read them from memory for every column tile (24 x for Qwen3's gate/up, ~14 GB a call); columns
    # first read a block once while its tiles run, and an expert's weight (3-6 MB) stays in the L2 across its
    # neighbouring blocks. Run 37 (H100): int4 gate/up at 16,384 tokens 5.56 -> 3.16 ms with 3 stages, and MoE
    # int8 tput-short 11,688 -> 15,007 output tok/s with both.
    columns_first: bool = True
    # How int4 nibbles (``convert``) and int8 values (``int8_convert``) become floats before the dot: "cvt"
    # (integer-to-float conversions, a quarter of the FMA rate, and (q - z) s in two operations) or "affine" (byte
    # permutes into a float's mantissa and one fused multiply-add a weight: the dense kernels' form since run 30e,
    # ``quantized_matmul.int4_tile_weights``). Run 38a (H200, Qwen3-30B-A3B shapes): int4 gate/up at 1 / 1,024 /
    # 16,384 tokens 37.5 -> 33.7 us, 417 -> 357 us, 3.82 -> 3.57 ms, down -10% / -8% / -7%; int8 gate/up at one
    # token 30.6 -> 33.1 us (slower), at 1,024 tokens 357 -> 326 us, and the int8 engine's tput-short level (38b-d).
    convert: str = "affine"
    int8_convert: str = "cvt"
    # Whether the MoE layer asks its joined gate/up matmul for ``silu(gate) * up`` (``swiglu=True``): the [R, 2I]
    # product is then neither written nor read back by a separate fusion (Qwen3-30B-A3B's 16k-token prompt step:
    # ~450 MB written and read again a layer). Off until the engine measures it (two accumulators a program).
    swiglu_epilogue: bool = False
    # K steps a loop iteration of every program (capped at what divides its steps): MXFP4's steps are 32 rows (a
    # scale's group, 16 bytes a column), so a step's loads are small; 2 or 4 give the pipeline more bytes an
    # iteration. Untimed: 1 (a step an iteration) until measured.
    k_unroll: int = 1
    # Decode-sized blocks: 4 programs share a block's K steps, 3 stages (run 37, H100: int4 gate/up at one token
    # 44.7 -> 35.4 us; AWQ Qwen3-30B-A3B batch-1 TPOT 3.83 -> 3.46 ms). 128 columns in every regime (run 39 sweep,
    # H100, Qwen3-30B-A3B shapes: at one token int8 gate/up 28.9 -> 25.3 us, int4 30.6 -> 29.1; at 1,024 tokens int8
    # gate/up 311 -> 273 us and down 209 -> 177, int4 level to -2%).
    decode_block_n: int = 128
    decode_block_k: int = 64
    decode_num_warps: int = 4
    decode_num_stages: int = 3
    decode_k_splits: int = 4
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    k_splits: int = 1
    # Blocks of 128 rows (prompts of 2,048+ tokens for Qwen3-30B-A3B): 128 columns and 8 warps (run 39, H100, at
    # 16,384 tokens: int4 gate/up 3.50 -> 2.99 ms, down 2.03 -> 1.81; int8 gate/up 2.42 -> 2.11). With the three
    # regimes' winners the int8 engine's 16k-token prompt step took 299.9 -> 282.4 ms of kernels and its tput-short
    # went 16,409 -> 17,819 output tok/s (same lease). bf16 and fp8 experts take the same tiles, untimed.
    large_min_block_m: int = 128
    large_block_n: int = 128
    large_block_k: int = 64
    large_num_warps: int = 8
    large_num_stages: int = 3
    large_k_splits: int = 1

    REGIMES = ("decode_", "", "large_")  # the prefixes of each regime's fields

    def __post_init__(self):
        counts = {name: getattr(self, name) for name in ("k_unroll", *(p + "k_splits" for p in self.REGIMES))}
        if any(not isinstance(v, int) or v < 1 for v in counts.values()):
            raise ValueError(f"the grouped matmul's K step counts must be positive integers, got {counts}")

    def regime(self, block_m: int) -> str:
        """The prefix of the fields that set blocks of ``block_m`` rows: "decode_", "large_" or ""."""
        if block_m <= self.decode_max_block_m:
            return "decode_"
        return "large_" if block_m >= self.large_min_block_m else ""

    @classmethod
    def field_regime(cls, name: str) -> str:
        """The regime whose blocks field ``name`` sets ("" also for the fields every regime shares)."""
        return next((prefix for prefix in cls.REGIMES if prefix and name.startswith(prefix)), "")

    def tiles(self, block_m: int, int8: bool = False) -> dict:
        """``block_n``, ``block_k``, ``num_warps``, ``num_stages``, ``k_splits`` for blocks of ``block_m`` rows, and
        the launch order, unrolling and conversion (``columns_first``, ``k_unroll``, ``convert``: the same for all;
        ``int8_convert`` as ``convert`` for int8 weights)."""
        prefix = self.regime(block_m)
        return {**{name: getattr(self, prefix + name) for name in ("block_n", "block_k", "num_warps", "num_stages",
                                                                    "k_splits")},
                "columns_first": self.columns_first, "k_unroll": self.k_unroll,
                "convert": self.int8_convert if int8 else self.convert}


@functools.cache
def grouped_matmul_config() -> GroupedMatmulConfig:
    """``GroupedMatmulConfig()`` with the fields of ``$PAGEDJAX_MOE_CONFIG`` (read once)."""
    return dataclass_from_env(GroupedMatmulConfig, "PAGEDJAX_MOE_CONFIG")


def swiglu_halves(y: jax.Array) -> jax.Array:
    """``silu(gate) * up`` where ``y``'s last axis is a gate projection's half, then an up projection's."""
    gate, up = jnp.split(y, 2, axis=-1)
    return jax.nn.silu(gate) * up


def _call(x, block_expert, operands: tuple, *, row_token, n: int, k: int, block_m: int, block_n: int, block_k: int,
          group_size: int, tiles: dict, interpret, name: str, k_major: bool = False, swiglu: bool = False,
          codes: str = "uint4"):
    """The launch; ``block_n`` / ``block_k`` as they divide N / K, the rest of the settings from ``tiles``; the rows
    ``x[row_token]`` where ``row_token`` is given (loaded by the kernel), else ``x``'s. ``swiglu``: ``swiglu_halves``
    of the product, by the kernel, or after adding the K splits' partial sums. ``codes`` "e2m1": int4 nibbles are
    MXFP4's FP4 codes, decoded as such whatever ``tiles`` says of integer nibbles."""
    interpret = jax.default_backend() != "gpu" if interpret is None else interpret
    columns_first, convert = tiles["columns_first"], tiles["convert"]
    if convert not in CONVERSIONS:
        raise ValueError(f"the grouped matmul's convert must be one of {CONVERSIONS}, got {convert!r}")
    steps = k // block_k
    splits = max(d for d in range(1, min(tiles["k_splits"], steps) + 1) if steps % d == 0)
    unroll = max(d for d in range(1, min(tiles["k_unroll"], steps // splits) + 1) if steps // splits % d == 0)
    form = interpreted_conversion if interpret else str  # inline PTX runs compiled only: the interpreter's jnp form
    int8_convert = "permute" if convert == "affine" else "cvt"  # int8's form of the byte-permute conversion
    fused = swiglu and splits == 1  # split partial sums are added first, so then the activation follows outside
    if fused:  # two accumulators of half the columns: the plain product's weight bytes and registers a program
        block_n = block_size(n // 2, max(16, block_n // 2), "N / 2", kernel="the grouped matmul's swiglu")
    out_n = n // 2 if fused else n
    kernel = functools.partial(_grouped_matmul_kernel, num_experts=operands[0].shape[0], block_m=block_m,
                               block_n=block_n, block_k=block_k, group_size=group_size, k_major=k_major,
                               steps_per_split=steps // splits, k_unroll=unroll, columns_first=columns_first,
                               convert="e2m1" if codes == "e2m1" else form(convert), int8_convert=form(int8_convert),
                               fma=convert == "affine" and codes != "e2m1" and not interpret,
                               gather=row_token is not None, swiglu=fused, up_start=n // 2)
    blocks, col_tiles = block_expert.shape[0], out_n // block_n
    num_rows = x.shape[0] if row_token is None else row_token.shape[0]
    rows = () if row_token is None else (row_token.astype(jnp.int32),)
    out = pl.pallas_call(
        kernel,
        grid=(col_tiles, blocks, splits) if columns_first else (blocks, col_tiles, splits),
        in_specs=[pl.no_block_spec] * (2 + len(rows) + len(operands)),
        out_specs=pl.BlockSpec((None, block_m, block_n), (lambda j, b, s: (s, b, j)) if columns_first
                               else (lambda b, j, s: (s, b, j))),
        out_shape=jax.ShapeDtypeStruct((splits, num_rows, out_n), jnp.float32 if splits > 1 else x.dtype),
        compiler_params=pltriton.CompilerParams(num_warps=tiles["num_warps"], num_stages=tiles["num_stages"]),
        interpret=interpret,
        name=name,
    )(block_expert.astype(jnp.int32), *rows, x, *operands)
    if splits == 1:
        return out[0]
    y = jnp.sum(out, axis=0)
    return (swiglu_halves(y) if swiglu else y).astype(x.dtype)


def _weight_dims(w, k_major: bool) -> tuple[int, int]:
    return (w.shape[2], w.shape[1]) if k_major else (w.shape[1], w.shape[2])


def _tiles(block_m: int, overrides: dict, int8: bool = False) -> dict:
    return {**grouped_matmul_config().tiles(block_m, int8), **{k: v for k, v in overrides.items() if v is not None}}


@functools.partial(jax.jit, static_argnames=("k_major", "block_n", "block_k", "num_warps", "num_stages", "k_splits",
                                             "k_unroll", "columns_first", "convert", "swiglu", "interpret"))
def grouped_matmul(x: jax.Array, w: jax.Array, block_expert: jax.Array, scale: Optional[jax.Array] = None, *,
                   k_major: bool = False, block_n: Optional[int] = None, block_k: Optional[int] = None,
                   num_warps: Optional[int] = None, num_stages: Optional[int] = None, k_splits: Optional[int] = None,
                   k_unroll: Optional[int] = None, columns_first: Optional[bool] = None,
                   convert: Optional[str] = None, swiglu: bool = False,
                   row_token: Optional[jax.Array] = None, interpret: Optional[bool] = None) -> jax.Array:
    """``y[R, N]`` (x's dtype): each block of rows of ``x[R, K]`` times its expert's ``w[E, K, N]`` (module doc),
    or ``w[E, N, K]`` where ``k_major``; int8 / fp8 ``w`` with its per-column ``scale[E, N]``
    (``models.quantization.Int8Weight`` / ``Fp8Weight``, weight-only: each tile converted to x's dtype exactly):
    ``w * scale``. ``row_token [R]``: the rows are ``gather_rows(x, row_token)``, read by the kernel from ``x`` (no
    gathered copy written and read back). ``swiglu``: ``swiglu_halves(y)`` instead, ``[R, N / 2]`` (``w``'s columns
    a gate's, then an up projection's): no ``[R, N]`` product written and read back. Tile settings left None come
    from ``grouped_matmul_config()`` for the block's rows."""
    k, n = _weight_dims(w, k_major)
    block_m = _check_shapes(x, w, block_expert, scale, k, n, row_token, swiglu)
    tiles = _tiles(block_m, dict(block_n=block_n, block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                                 k_splits=k_splits, k_unroll=k_unroll, columns_first=columns_first, convert=convert),
                   int8=w.dtype == jnp.int8)
    block = functools.partial(block_size, kernel="the grouped matmul")
    name = "moe_grouped_matmul" + ("" if scale is None else "_" + jnp.dtype(w.dtype).name)
    return _call(x, block_expert, (w,) if scale is None else (w, scale), row_token=row_token, n=n, k=k,
                 block_m=block_m, block_n=block(n, tiles["block_n"], "N"), block_k=block(k, tiles["block_k"], "K"),
                 group_size=k, tiles=tiles, interpret=interpret, name=name, k_major=k_major, swiglu=swiglu)


@functools.partial(jax.jit, static_argnames=("group_size", "pack", "block_n", "num_warps", "num_stages", "k_splits",
                                             "k_unroll", "columns_first", "convert", "swiglu", "interpret", "codes"))
def grouped_matmul_int4(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: Optional[jax.Array],
                        block_expert: jax.Array, *, group_size: int, pack: int, block_n: Optional[int] = None,
                        num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                        k_splits: Optional[int] = None, k_unroll: Optional[int] = None,
                        columns_first: Optional[bool] = None, convert: Optional[str] = None, swiglu: bool = False,
                        row_token: Optional[jax.Array] = None,
                        interpret: Optional[bool] = None, codes: str = "uint4") -> jax.Array:
    """The grouped matmul with 4-bit experts (``models.quantization.Int4Weight``'s fields: ``packed [E, K/2, N]``
    in ``pack``-row blocks, ``scales`` / ``zeros [E, K/g, N]``): each tile is dequantized, ``(q - zero) * scale``
    in float32 then x's dtype, and multiplied as a dense one; a K step is one packing block. ``row_token`` and
    ``swiglu`` as ``grouped_matmul``'s. ``codes`` "e2m1": the nibbles are MXFP4's FP4 codes (gpt-oss's experts),
    ``scales`` their groups' E8M0 exponents (uint8) and ``zeros`` None."""
    block_m = _check_int4(x, packed, scales, zeros, block_expert, group_size, pack, row_token, swiglu, codes)
    n = packed.shape[2]
    tiles = _tiles(block_m, dict(block_n=block_n, num_warps=num_warps, num_stages=num_stages, k_splits=k_splits,
                                 k_unroll=k_unroll, columns_first=columns_first, convert=convert))
    quant = (scales,) if codes == "e2m1" else (scales, zeros)
    return _call(x, block_expert, (packed, *quant), row_token=row_token, n=n, k=2 * packed.shape[1],
                 block_m=block_m, block_n=block_size(n, tiles["block_n"], "N", kernel="the grouped matmul"),
                 block_k=pack, group_size=group_size, tiles=tiles, interpret=interpret, name="moe_grouped_matmul_int4",
                 swiglu=swiglu, codes=codes)


def _blocks_times(x, block_expert, num_experts: int, block_m: int, weight_of, scale=None) -> jax.Array:
    """Every block of ``x`` times ``weight_of(expert ids)`` (``[blocks, K, N]``) in float32, times its expert's
    ``scale [E, N]`` if given, zeros past the last expert; in x's dtype."""
    blocks = x.reshape(block_expert.shape[0], block_m, x.shape[1])
    used = block_expert < num_experts
    expert = jnp.where(used, block_expert, 0)
    y = jnp.einsum("bmk,bkn->bmn", blocks, weight_of(expert), preferred_element_type=jnp.float32)
    if scale is not None:
        y = y * scale[expert][:, None, :]
    return jnp.where(used[:, None, None], y, 0).astype(x.dtype).reshape(x.shape[0], -1)


def gather_rows(x: jax.Array, row_token: Optional[jax.Array]) -> jax.Array:
    """``x[row_token]``, zeros where a token is past x's last row (the routed layout's padding); ``x`` if None."""
    return x if row_token is None else jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])[row_token]


def grouped_matmul_reference(x: jax.Array, w: jax.Array, block_expert: jax.Array,
                             scale: Optional[jax.Array] = None, *, k_major: bool = False,
                             row_token: Optional[jax.Array] = None) -> jax.Array:
    """The same product in jnp: every block times its expert's gathered weight (zeros past the last expert)."""
    x = gather_rows(x, row_token)
    k, n = _weight_dims(w, k_major)
    block_m = _check_shapes(x, w, block_expert, scale, k, n)
    weight_of = (lambda e: jnp.swapaxes(w[e].astype(x.dtype), -1, -2)) if k_major else (lambda e: w[e].astype(x.dtype))
    return _blocks_times(x, block_expert, w.shape[0], block_m, weight_of, scale)


def grouped_matmul_int4_reference(x: jax.Array, packed: jax.Array, scales: jax.Array, zeros: Optional[jax.Array],
                                  block_expert: jax.Array, *, group_size: int, pack: int,
                                  row_token: Optional[jax.Array] = None, codes: str = "uint4") -> jax.Array:
    """``grouped_matmul_int4`` in jnp: each block's expert dequantized as the kernel's tiles are, then multiplied."""
    x = gather_rows(x, row_token)
    block_m = _check_int4(x, packed, scales, zeros, block_expert, group_size, pack, codes=codes)
    expert_zeros = (lambda e: None) if zeros is None else (lambda e: zeros[e])
    return _blocks_times(x, block_expert, packed.shape[0], block_m, lambda e: dequantize_int4(
        packed[e], scales[e], expert_zeros(e), group_size=group_size, pack=pack, codes=codes).astype(x.dtype))
