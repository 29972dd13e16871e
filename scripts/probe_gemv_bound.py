"""Probe: what bounds the one-row int8 GEMV at ~2.5 T weights/s (issue 8, batch 1).

Every batch-1 kernel tried (the byte-tile GEMV, the int32-word GEMV, JAX's mixed-type wgmma
matmul) lands at ~2.5 T weights/s on w_gate_up (benchmarks/NOTES.md, runs 16-17), where XLA's
bf16 GEMV reads 3.7 TB/s. This times, in the same chain as ``bench_matmul.time_chain``:

- ``read``: the GEMV's loads alone (the int8 weight as int32 words, XOR-ed into a register
  tile): how fast this tiling can read at all. ``layout=rows`` reads ``[K, N]`` as the
  kernel does (a tile is ``block_k`` rows of 128 bytes, ``N`` bytes apart); ``layout=tiles``
  reads a copy laid out ``[N / block_n, K, block_n]`` (a program's tile is contiguous).
- ``gemv``: the int8 GEMV's arithmetic (the engine's conversion; run 18a: the exponent trick; multiply-add into a
  ``[block_k, block_n]`` float32 tile, summed after the loop) on each layout.
- ``gemv-x``: the same with each step's slice of ``x`` loaded with its weights (a step ahead with
  ``prefetch``), not in the step that uses it.
- ``null``: a kernel that writes its output and reads nothing: the chain's cost per call;
  ``null-1``: the same from one K split (no partial sums for XLA to add).
- ``kmajor-gemv``: the engine's K-major int8 GEMV (``quantized_matmul.int8_kmajor_matmul``) on the weight
  transposed, ``[N, K]``: a tile is ``block_n`` columns of ``block_k`` contiguous K bytes, so each step's sum over K
  stays inside a thread's registers and the program keeps a ``[block_n]`` accumulator instead of the
  ``[block_k, block_n]`` one the layouts above carry to the loop's end (32 registers a thread at the default
  tiles). Hypothesis after run 22a (the byte-permute conversion left the int8 GEMV where it was): the accumulator's
  registers cap the programs a multiprocessor holds, and so the bytes in flight.

Weights are converted as the engine's default does (``gemv_convert``: byte permutes when compiled).

Run 18a (H200): the loads alone ~30 us net of the chain (3.9 TB/s), the GEMV ~40.5 us, tile-contiguous
copies < 8% faster, the chain 9.6 us a call: the arithmetic's structure binds, not the access pattern.
``gemv-x`` and ``null-1`` (added after it) ask whether x's loads and the split sums are part of that.

    python scripts/probe_gemv_bound.py --check          # CPU: interpret mode, small shapes
    python scripts/probe_gemv_bound.py --out probe.json  # GPU
"""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as pltriton  # noqa: E402

from pallas_kernels import quantized_matmul as qmm  # noqa: E402

LAYOUTS = ("rows", "tiles")
KINDS = ("read", "gemv", "gemv-x", "null", "null-1")


def as_tiles(q: jax.Array, block_n: int) -> jax.Array:
    """``[K, N]`` -> ``[N / block_n, K, block_n]``: each column block's rows contiguous."""
    K, N = q.shape
    return q.reshape(K, N // block_n, block_n).transpose(1, 0, 2)


def _kernel(x_ref, w_ref, scale_ref, o_ref, *, kind, layout, block_k, block_n, steps, prefetch, convert):
    n, split = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(pl.multiple_of(n * block_n, block_n), block_n)
    first_k = split * (steps * block_k)
    if kind.startswith("null"):
        o_ref[...] = jnp.zeros((block_n,), jnp.float32)
        return

    def k_start(i):
        return pl.multiple_of(first_k + i * block_k, block_k)

    def load(i):
        rows = pl.ds(k_start(jnp.minimum(i, steps - 1)), block_k)
        tile = w_ref.at[rows, cols] if layout == "rows" else w_ref.at[n, rows, :]
        w = pltriton.load(tile, eviction_policy="evict_first")
        return (w, x_ref[0, rows]) if kind == "gemv-x" else w  # gemv-x: x's slice issued with the weights

    if kind == "read":  # w: int32 words, block_n words a row
        def body(i, acc, w):
            return acc ^ w
        acc = jnp.zeros((block_k, block_n), jnp.int32)
    else:
        def body(i, acc, loaded):
            w, x = loaded if kind == "gemv-x" else (loaded, x_ref[0, pl.ds(k_start(i), block_k)])
            return acc + x.astype(jnp.float32)[:, None] * qmm.integers_as_f32(w, "int8", convert)
        acc = jnp.zeros((block_k, block_n), jnp.float32)
    acc = qmm.step_loop(steps, load, body, acc, prefetch)
    total = jnp.sum(acc.astype(jnp.float32) if kind == "read" else acc, axis=0)
    if kind.startswith("gemv"):
        total = total * scale_ref[cols].astype(jnp.float32)
    o_ref[...] = total


@functools.partial(jax.jit, static_argnames=("kind", "layout", "block_k", "block_n", "num_warps",
                                             "programs_per_core", "prefetch", "interpret"))
def probe_gemv(x, w, scale, *, kind, layout, block_k=32, block_n=128, num_warps=4, programs_per_core=8, prefetch=1,
               interpret=False):
    """``x[1, K]`` times the int8 weight ``w`` (``[K, N]``, or ``as_tiles``; for ``read``, int32 words of it:
    ``block_n`` then counts words) -> ``[1, N]`` float32 (``read``: a checksum, ``null``: zeros; ``null-1``: zeros
    from one K split, so no partial sums to add)."""
    K = x.shape[1]
    N = w.shape[1] if layout == "rows" else w.shape[0] * w.shape[2]
    # The engine's conversion (byte permutes, compiled only; the interpreter's equal jnp form).
    _, convert = qmm.gemv_loop_settings("int8", qmm.MatmulConfig(), interpret, default_prefetch=0)
    num_steps = K // block_k
    splits = 1 if kind == "null-1" else qmm.auto_k_splits(N // block_n, num_steps, programs_per_core)
    kernel = functools.partial(_kernel, kind=kind, layout=layout, block_k=block_k, block_n=block_n,
                               steps=num_steps // splits, prefetch=prefetch, convert=convert)
    out = pl.pallas_call(
        kernel, grid=(N // block_n, splits), in_specs=[pl.no_block_spec] * 3,
        out_specs=pl.BlockSpec((None, block_n), lambda n, s: (s, n)),
        out_shape=jax.ShapeDtypeStruct((splits, N), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name=f"probe_{kind}_{layout}")(x, w, scale)
    return out.sum(axis=0)[None, :]


def as_words(q: jax.Array) -> jax.Array:
    """int8 ``[..., N]`` -> int32 ``[..., N / 4]`` (four bytes a word)."""
    return lax.bitcast_convert_type(q.reshape(*q.shape[:-1], q.shape[-1] // 4, 4), jnp.int32)


def weight_for(kind: str, layout: str, q: jax.Array, block_n: int) -> jax.Array:
    w = as_words(q) if kind == "read" else q
    return as_tiles(w, block_n // 4 if kind == "read" else block_n) if layout == "tiles" else w


def read_checksum(words: jax.Array, *, block_k: int, block_n: int, programs_per_core: int = 8) -> jax.Array:
    """What ``kind="read"`` returns for int32 ``words[K, Nw]``: in each K split, each tile row's XOR over the
    split's steps, summed over the tile's rows, then over the splits (``[1, Nw]`` float32)."""
    K, Nw = words.shape
    steps = K // block_k
    splits = qmm.auto_k_splits(Nw // block_n, steps, programs_per_core)
    tiles = words.reshape(splits, steps // splits, block_k, Nw)
    xor = functools.reduce(jnp.bitwise_xor, [tiles[:, i] for i in range(steps // splits)])
    return xor.astype(jnp.float32).sum(axis=(0, 1))[None, :]


def check(interpret: bool, K: int = 256, N: int = 512) -> list[str]:
    from models.quantization import quantize_weight

    key = jax.random.key(0)
    w = quantize_weight((jax.random.normal(key, (K, N)) * 0.02).astype(jnp.bfloat16), "int8")
    x = jax.random.normal(jax.random.fold_in(key, 1), (1, K), jnp.float32).astype(jnp.bfloat16)
    want_gemv = qmm.int8_matmul_reference(x, w.q, w.scale).astype(jnp.float32)
    want_read = read_checksum(as_words(w.q), block_k=32, block_n=32)
    lines = []
    for layout in LAYOUTS:
        for prefetch in (0, 1):
            kw = dict(layout=layout, block_k=32, block_n=128, prefetch=prefetch, interpret=interpret)
            err = max(float(jnp.max(jnp.abs(probe_gemv(x, weight_for(kind, layout, w.q, 128), w.scale, kind=kind, **kw)
                                            - want_gemv)) / jnp.max(jnp.abs(want_gemv))) for kind in ("gemv", "gemv-x"))
            got_read = probe_gemv(x, weight_for("read", layout, w.q, 128), w.scale, kind="read",
                                  **dict(kw, block_n=32))
            read_err = float(jnp.max(jnp.abs(got_read - want_read)) / jnp.max(jnp.abs(want_read)))
            lines.append(f"check {layout} prefetch={prefetch}: gemv max error / max |ref| = {err:.2e}, "
                         f"read checksum {read_err:.1e}")
            if err > 2e-2 or read_err > 1e-6:
                raise AssertionError(lines[-1])
    return lines


# (block_k, block_n bytes, warps, programs per core, loads ahead): the current default first.
TILINGS = ((32, 128, 4, 8, 1), (32, 128, 4, 8, 0), (64, 128, 4, 8, 1), (32, 256, 4, 8, 1), (16, 512, 4, 8, 1),
           (32, 128, 4, 16, 1), (64, 256, 8, 4, 1))
# kmajor-gemv's, (kmajor_block_k, kmajor_block_n, warps, programs per core, loads ahead): the first default (64 x 64)
# first, then longer runs of K a column (each a thread's in-register sum) and more programs a core (the engine's
# default since run 23b: 256 x 16, 4 warps, 8 programs a core, loads ahead).
KMAJOR_TILINGS = ((64, 64, 4, 8, 1), (32, 128, 4, 8, 1), (128, 32, 4, 8, 1), (128, 64, 4, 16, 1), (256, 16, 4, 16, 1),
                  (128, 32, 2, 16, 1), (64, 64, 4, 16, 0))



def main(argv=None):
    import bench_matmul
    from models.quantization import quantize_weight

    args = bench_matmul.probe_parser(__doc__).parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    for line in check(interpret):
        print(line, flush=True)
    if args.check:
        return
    K, N, timing = bench_matmul.probe_shape(args)
    tilings = TILINGS[:1] if args.smoke else TILINGS
    key = jax.random.key(K * 7 + N)
    rows = []

    def record(label, row):
        rows.append(dict(kernel=label, **row))
        print(f"{label:48s} " + (f"{row['us']:7.1f} us {row['weight_tb_s']:.2f} TB/s" if "us" in row
                                 else row["error"]), flush=True)

    def timed(label, fn, make):
        try:
            row = bench_matmul.time_chain(fn, make, nbytes, K, N, 1, key=key, **timing)
        except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
            row = dict(error=f"{type(e).__name__}: {e}"[:300])
        record(label, row)

    for variant in ("xla-bf16", "pallas-int8"):
        fn, make, nbytes = bench_matmul.make_variant(variant, K, N, key, interpret)
        record(variant, bench_matmul.time_chain(fn, make, nbytes, K, N, 1, key=key, **timing))
    nbytes = K * N  # the int8 weight's bytes (the scale's 4N left out)
    for kind in KINDS:
        for layout in LAYOUTS if kind.startswith(("read", "gemv")) else ("rows",):
            # The x slices issued with the weights (gemv-x) and the kernels that read nothing: the default tiles only.
            for block_k, block_n, warps, per_core, prefetch in tilings if kind in ("read", "gemv") else tilings[:1]:
                def make(k, block_n=block_n, kind=kind, layout=layout):
                    w = quantize_weight((jax.random.normal(k, (K, N)) * 0.02).astype(jnp.bfloat16), "int8")
                    return weight_for(kind, layout, w.q, block_n), w.scale
                fn = functools.partial(
                    lambda x, w, **kw: probe_gemv(x, w[0], w[1], **kw).astype(x.dtype), kind=kind, layout=layout,
                    block_k=block_k, block_n=block_n // 4 if kind == "read" else block_n, num_warps=warps,
                    programs_per_core=per_core, prefetch=prefetch, interpret=interpret)
                timed(f"{kind} {layout} {block_k}x{block_n} w={warps} ppc={per_core} ahead={prefetch}", fn, make)

    def make_kmajor(k):
        w = quantize_weight((jax.random.normal(k, (K, N)) * 0.02).astype(jnp.bfloat16), "int8", int8_layout="nk")
        return w.q, w.scale
    for block_k, block_n, warps, per_core, prefetch in KMAJOR_TILINGS[:1] if args.smoke else KMAJOR_TILINGS:
        config = qmm.MatmulConfig(kmajor_block_k=block_k, kmajor_block_n=block_n, gemv_num_warps=warps,
                                  gemv_programs_per_core=per_core, gemv_prefetch=prefetch)
        fn = functools.partial(lambda x, w, **kw: qmm.int8_kmajor_matmul(x, w[0], w[1], **kw), config=config,
                               interpret=interpret)
        timed(f"kmajor-gemv {block_k}x{block_n} w={warps} ppc={per_core} ahead={prefetch}", fn, make_kmajor)
    bench_matmul.write_probe(args.out, args.shape, rows)


if __name__ == "__main__":
    main()
