"""Probe: the one-row quantized GEMV over weights packed in 32-bit words along K.

Run 16a found the GEMV of ``pallas_kernels/quantized_matmul.py`` at ~2 T weights/s for int4
and int8 alike (w_gate_up: 59 / 57 us at its best tiles), three times under its arithmetic
(~5 operations a weight) and far under memory (14 / 27 us at 4.3 TB/s). Its tiles are bytes
(``uint8`` / ``int8``), which Triton lays out 16 to a thread, while the float32 products and
sums it feeds get another layout: the suspect was a layout conversion through shared memory
each step (run 16b: words are 1.17-1.36x faster, not 3x; NOTES.md has what binds). Here the weight is stored in ``int32`` words instead, so the loaded tile, the
products and the accumulator share one 32-bit layout:

- int4: 8 nibbles a word. In a block of ``P`` rows of K (``R = P/8`` word rows), nibble ``j``
  of word row ``r`` is row ``j*R + r``: nibble ``j`` of a tile multiplies the contiguous slice
  ``x[j*R:(j+1)*R]``.
- int8: 4 bytes a word, ``q + 128`` (offset binary), the same block arrangement (``R = P/4``).

Each nibble or byte becomes float32 by the exponent trick (OR into 2^23's mantissa, subtract),
a shift, a logic op and an add a weight, then one multiply-add. This script checks the kernel
against the dequantize-then-dot reference and, on a GPU, times it beside the current kernel
at the w_gate_up shape of Llama-3.1-8B (``bench_matmul.time_chain``).

    python scripts/probe_gemv_words.py --check             # CPU: interpret mode, small shapes
    python scripts/probe_gemv_words.py --out results.json  # GPU
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as pltriton  # noqa: E402

from pallas_kernels import quantized_matmul as qmm  # noqa: E402

BITS = {"int4": 4, "int8": 8}
OFFSET = {"int4": 0, "int8": 128}  # stored value = q + offset


def pack_words(values: jax.Array, fmt: str, block_rows: int) -> jax.Array:
    """``[K, N]`` stored values (int4: 0..15, int8: q + 128) -> ``[K / per_word, N]`` int32 (module docstring);
    ``block_rows``: rows of K per block (``P``)."""
    bits = BITS[fmt]
    per_word = 32 // bits
    K, N = values.shape
    R = block_rows // per_word
    v = values.astype(jnp.uint32).reshape(K // block_rows, per_word, R, N)
    words = v[:, 0]
    for j in range(1, per_word):
        words = words | (v[:, j] << (bits * j))
    return lax.bitcast_convert_type(words.reshape(K // per_word, N), jnp.int32)


def _kernel(x_ref, w_ref, *refs, fmt, block_n, R, steps, group_size, prefetch):
    """``prefetch``: each step's loads issued a step ahead (``quantized_matmul.step_loop``), so a
    program keeps loads in flight without Triton's pipeliner."""
    o_ref = refs[-1]
    bits = BITS[fmt]
    per_word = 32 // bits
    P = R * per_word
    n, split = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)
    first, last = split * steps, split * steps + steps - 1

    def fetch(b):
        """Block ``b``'s words (and int4's scale and zero row); past the program's end, its last block again."""
        b = jnp.minimum(b, last)
        words = pltriton.load(w_ref.at[pl.ds(pl.multiple_of(b * R, R), R), cols], eviction_policy="evict_first")
        if fmt == "int4":
            group = (b * P) // group_size
            return words, refs[0][group, cols], refs[1][group, cols]
        return (words,)

    def compute(b, acc, fetched):
        words = fetched[0]
        # int8 adds its products straight into the accumulator (its scale is per column, applied after the loop)
        part = acc if fmt == "int8" else jnp.zeros((R, block_n), jnp.float32)
        xsum = jnp.zeros((R,), jnp.float32)
        for j in range(per_word):
            x_j = x_ref[0, pl.ds(pl.multiple_of(b * P + j * R, R), R)].astype(jnp.float32)
            v = lax.shift_right_logical(words, jnp.int32(bits * j)) if j else words
            if j < per_word - 1:
                v = v & ((1 << bits) - 1)
            q = qmm._small_ints_as_f32(v - OFFSET[fmt], offset=OFFSET[fmt])  # v is the stored q + offset
            part = part + x_j[:, None] * q
            xsum = xsum + x_j
        if fmt == "int4":  # sum_k x_k (q_k - z) s = s (sum_k x_k q_k - z sum_k x_k), one group a step
            s, z = fetched[1].astype(jnp.float32), fetched[2].astype(jnp.float32)
            return acc + s[None, :] * (part - z[None, :] * xsum[:, None])
        return part

    acc = jnp.zeros((R, block_n), jnp.float32)
    acc = qmm.step_loop(steps, lambda i: fetch(first + i), lambda i, a, f: compute(first + i, a, f), acc, prefetch)
    acc = jnp.sum(acc, axis=0)
    if fmt == "int8":
        acc = acc * refs[0][cols].astype(jnp.float32)
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("fmt", "R", "group_size", "block_n", "num_warps", "num_stages",
                                             "programs_per_core", "prefetch", "interpret"))
def words_gemv(x, words, extras, *, fmt, R, group_size=0, block_n=128, num_warps=4, num_stages=4,
               programs_per_core=4, prefetch=0, interpret=False):
    """``x[1, K] @ W`` for ``W`` in words (``extras``: int4 ``(scales, zeros)``, int8 ``(scale,)``)."""
    per_word = 32 // BITS[fmt]
    rows, N = words.shape
    K = rows * per_word
    P = R * per_word
    if N % block_n or K % P:
        raise ValueError(f"block_n={block_n} must divide N={N} and the {P} rows of a step K={K}")
    if group_size and group_size % P:
        raise ValueError(f"a step's {P} rows must lie in one group of {group_size}")
    num_steps = K // P
    splits = qmm.auto_k_splits(N // block_n, num_steps, programs_per_core)
    kernel = functools.partial(_kernel, fmt=fmt, block_n=block_n, R=R, steps=num_steps // splits,
                               group_size=group_size, prefetch=prefetch)
    out = pl.pallas_call(
        kernel, grid=(N // block_n, splits), in_specs=[pl.no_block_spec] * (2 + len(extras)),
        out_specs=pl.BlockSpec((None, block_n), lambda n, s: (s, n)),
        out_shape=jax.ShapeDtypeStruct((splits, N), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name=f"{fmt}_words_gemv")(x, words, *extras)
    return out.sum(axis=0).astype(x.dtype)[None, :]


def to_words(w, fmt: str, block_rows: int):
    """A ``models.quantization`` weight -> ``(words, extras, group_size)``."""
    if fmt == "int4":
        return pack_words(qmm.unpack_int4(w.packed, w.pack), fmt, block_rows), (w.scales, w.zeros), w.group_size
    return pack_words(w.q.astype(jnp.int32) + 128, fmt, block_rows), (w.scale,), 0


def reference(x, w, fmt):
    if fmt == "int4":
        return qmm.int4_matmul_reference(x, w.packed, w.scales, w.zeros, group_size=w.group_size, pack=w.pack)
    return qmm.int8_matmul_reference(x, w.q, w.scale)


def check(interpret: bool, K: int = 512, N: int = 256) -> list[str]:
    from models.quantization import quantize_weight

    lines = []
    for fmt, block_rows in (("int4", 128), ("int8", 128), ("int8", 64)):
        key = jax.random.key(block_rows + len(fmt))
        w = quantize_weight((jax.random.normal(key, (K, N)) * 0.02).astype(jnp.bfloat16), fmt)
        x = jax.random.normal(jax.random.fold_in(key, 1), (1, K), jnp.float32).astype(jnp.bfloat16)
        words, extras, g = to_words(w, fmt, block_rows)
        per_word = 32 // BITS[fmt]
        want = reference(x, w, fmt)
        for prefetch in (0, 1):
            got = words_gemv(x, words, extras, fmt=fmt, R=block_rows // per_word, group_size=g, block_n=64,
                             prefetch=prefetch, interpret=interpret)
            err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))) /
                        jnp.max(jnp.abs(want.astype(jnp.float32))))
            lines.append(f"check {fmt} P={block_rows} prefetch={prefetch}: max error / max |ref| = {err:.2e}")
            if err > 2e-2:
                raise AssertionError(lines[-1])
    return lines


# (block_n, num_warps, num_stages, programs_per_core, prefetch): run 16b's best (128, 4, 3, 8, 0), then loads issued
# a step ahead (Triton's pipeliner does not pipeline loads that feed no dot: the SASS of run 16b's kernels, compiled
# on the CPU, loads each tile in the step that uses it). Registers (CPU compile, Triton 3.9, 4 warps, without / with
# loads ahead): int8 P=64 n=128 40 / 56; int4 P=128 n=128 90 / 96, P=64 n=128 56 / 56.
TILINGS = ((128, 4, 3, 8, 0), (128, 4, 1, 8, 1), (128, 4, 1, 4, 1), (64, 4, 1, 8, 1), (64, 4, 1, 16, 1),
           (64, 2, 1, 16, 1), (256, 8, 1, 4, 1), (64, 4, 1, 8, 0))
BEST_16A = qmm.MatmulConfig(gemv_block_n=128, gemv_block_k=64, gemv_programs_per_core=4, gemv_num_warps=4,
                            gemv_num_stages=6, gemv_defer_reduction=True, gemv_convert="exponent")


# The current (byte-tile) kernel: its default, run 16a's best, and its loads issued a step ahead (gemv_prefetch).
# Registers (CPU compile, 4 warps, without / with loads ahead): int8 32 x 128 tiles 56 / 67, 64 x 64 56 / 72; int4
# (128-row packing blocks) 64 columns 96 / 162.
_G = dict(gemv_num_warps=4, gemv_num_stages=1)
CURRENT = (("current-default", qmm.MatmulConfig()), ("current-best16a", BEST_16A),
           ("current 32x128 ppc8 ahead1", qmm.MatmulConfig(gemv_block_k=32, gemv_programs_per_core=8, gemv_prefetch=1,
                                                           **_G)),
           ("current 64x64 ppc8 ahead1", qmm.MatmulConfig(gemv_block_k=64, gemv_block_n=64, gemv_programs_per_core=8,
                                                          gemv_prefetch=1, **_G)),
           ("current 64x64 ppc4 ahead1", qmm.MatmulConfig(gemv_block_k=64, gemv_block_n=64, gemv_programs_per_core=4,
                                                          gemv_prefetch=1, **_G)),
           ("current 32x128 ppc8 ahead0", qmm.MatmulConfig(gemv_block_k=32, gemv_programs_per_core=8, gemv_prefetch=0,
                                                           **_G)))


def launch_once(K: int, N: int, interpret: bool) -> None:
    from models.quantization import quantize_weight

    key = jax.random.key(0)
    x = jax.random.normal(key, (1, K), jnp.float32).astype(jnp.bfloat16)
    for fmt in ("int4", "int8"):
        w = quantize_weight((jax.random.normal(key, (K, N)) * 0.02).astype(jnp.bfloat16), fmt)
        if fmt == "int4":
            current = qmm.int4_matmul(x, w.packed, w.scales, w.zeros, group_size=w.group_size, pack=w.pack,
                                      config=BEST_16A, interpret=interpret)
        else:
            current = qmm.int8_matmul(x, w.q, w.scale, config=BEST_16A, interpret=interpret)
        words, extras, g = to_words(w, fmt, 128)
        for prefetch, stages in ((0, 3), (1, 1)):
            new = words_gemv(x, words, extras, fmt=fmt, R=128 // (32 // BITS[fmt]), group_size=g, num_stages=stages,
                             prefetch=prefetch, interpret=interpret)
            print(fmt, f"prefetch {prefetch}: max |current - words|",
                  float(jnp.max(jnp.abs(current.astype(jnp.float32) - new.astype(jnp.float32)))), flush=True)


def changed_fields(config: qmm.MatmulConfig) -> dict:
    """The fields of ``config`` that differ from the defaults."""
    default = qmm.MatmulConfig()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(default, f.name)}


def best_config(path: str, fmt: str) -> str:
    """The fastest current-kernel row of ``fmt`` in a results file, as ``$PAGEDJAX_MATMUL_CONFIG`` JSON."""
    with open(path) as f:
        rows = [r for r in json.load(f)["rows"] if r["fmt"] == fmt and "config" in r and "us" in r]
    return json.dumps(min(rows, key=lambda r: r["us"])["config"])


def main(argv=None):
    import bench_matmul
    from models.quantization import quantize_weight

    parser = bench_matmul.probe_parser(__doc__)
    parser.add_argument("--best-config", metavar="JSON", default=None,
                        help="print, as JSON for $PAGEDJAX_MATMUL_CONFIG, the fastest current-kernel config for "
                             "--fmt in a results file this script wrote")
    parser.add_argument("--fmt", choices=tuple(BITS), default="int4")
    parser.add_argument("--ncu", action="store_true",
                        help="one launch of each kernel at the shape (int4, int8; current and words), for "
                             "Nsight Compute")
    args = parser.parse_args(argv)
    if args.best_config:
        return print(best_config(args.best_config, args.fmt))
    interpret = jax.default_backend() != "gpu"
    K, N, timing = bench_matmul.probe_shape(args)
    if args.ncu:
        return launch_once(K, N, interpret)
    for line in check(interpret):
        print(line, flush=True)
    if args.check:
        return
    rows = []
    for fmt in ("int4", "int8"):
        key = jax.random.key(K * 7 + N)
        def make_q(k, fmt=fmt):
            return quantize_weight((jax.random.normal(k, (K, N)) * 0.02).astype(jnp.bfloat16), fmt)
        for label, config in CURRENT:
            fn, make, nbytes = bench_matmul.make_variant(f"pallas-{fmt}", K, N, key, interpret, config)
            row = bench_matmul.time_chain(fn, make, nbytes, K, N, 1, key=key, **timing)
            rows.append(dict(fmt=fmt, kernel=label, config=changed_fields(config), **row))
            print(f"{fmt} {label:40s} {row['us']:7.1f} us {row['weight_tb_s']:.2f} TB/s", flush=True)
        per_word = 32 // BITS[fmt]
        nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(jax.eval_shape(make_q, key)))
        for block_rows in (64, 128):
            for block_n, warps, stages, per_core, prefetch in TILINGS:
                def make(k, block_rows=block_rows):
                    words, extras, _ = to_words(make_q(k), fmt, block_rows)
                    return words, extras
                g = 128 if fmt == "int4" else 0
                fn = functools.partial(lambda x, w, **kw: words_gemv(x, w[0], w[1], **kw), fmt=fmt,
                                       R=block_rows // per_word, group_size=g, block_n=block_n, num_warps=warps,
                                       num_stages=stages, programs_per_core=per_core, prefetch=prefetch,
                                       interpret=interpret)
                label = f"words P={block_rows} n={block_n} w={warps} s={stages} ppc={per_core} ahead={prefetch}"
                try:
                    row = bench_matmul.time_chain(fn, make, nbytes, K, N, 1, key=key, **timing)
                except Exception as e:  # noqa: BLE001 - one failing tiling must not lose the others
                    row = dict(error=f"{type(e).__name__}: {e}"[:300])
                rows.append(dict(fmt=fmt, kernel=label, **row))
                print(f"{fmt} {label:40s} " + (f"{row['us']:7.1f} us {row['weight_tb_s']:.2f} TB/s" if "us" in row
                                               else row["error"]), flush=True)
    bench_matmul.write_probe(args.out, args.shape, rows)


if __name__ == "__main__":
    main()
