"""Probe: the int4 matmul on Hopper's tensor cores (``pallas_kernels/int4_wgmma_gemv.py``) against the engine's
Triton GEMV at one row, at the 8B's shapes (issue 8: AWQ's 2.5x needs the int4 GEMVs at ~2.6 TB/s; the Triton GEMV
reads ~2.1 at ~4.2 instructions a weight).

For each shape: the Triton GEMV timed in ``bench_matmul.time_chain``'s dependent chain, then the wgmma kernel over
``SETTINGS`` (conversion route, output columns a warpgroup, pipeline depth) and two K splits, each setting checked
against the float32 reference on one weight and x (made once a shape) before it is timed. Rows as
``bench_matmul``'s (us, weight TB/s).

    python scripts/probe_gemv_wgmma.py --out probe.json     # GPU (sm_90, JAX >= 0.11)
"""

from __future__ import annotations

import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_matmul  # noqa: E402
from pallas_kernels import int4_wgmma_gemv as wg  # noqa: E402

GROUP = 128
SHAPES = ("w_gate_up", "w_down", "wqkv", "wo")
# (conversion, output columns a warpgroup, pipeline stages, x padded to 8 rows by XLA), in the order timed; the
# padded form keeps every TMA copy in bounds (the others read x's one row as an 8-row tile and store 1 of 8 rows)
SETTINGS = (("4x", 64, 4, False), ("4x", 64, 4, True), ("4x-2x", 64, 4, False), ("4x", 128, 4, False),
            ("4x", 64, 8, False), ("auto", 64, 4, False))


def auto_splits(N: int, groups: int, target: int, block_n: int) -> int:
    """The fewest K splits (dividing the groups) giving ``target`` programs."""
    for splits in range(1, groups + 1):
        if groups % splits == 0 and (N // block_n) * splits >= target:
            return splits
    return groups


def make_weights(K: int, N: int):
    """``key -> (W^T, scales, zeros)``: random nibbles, bfloat16 scales and zeros (the engine's AWQ layout's)."""
    def make(key):
        k1, k2, k3 = jax.random.split(key, 3)
        q = jax.random.randint(k1, (K, N), 0, 16, jnp.int32)
        scales = jax.random.uniform(k2, (K // GROUP, N), jnp.float32, 0.001, 0.01).astype(jnp.bfloat16)
        zeros = jax.random.randint(k3, (K // GROUP, N), 0, 16, jnp.int32).astype(jnp.bfloat16)
        return wg.pack_weights(q), scales, zeros
    return make


def check_case(K: int, N: int) -> tuple:
    """``(x, weights, reference)`` at one row, for ``relative_error``."""
    weights = jax.jit(make_weights(K, N))(jax.random.key(K + N))
    x = jax.random.normal(jax.random.key(7), (1, K), jnp.float32).astype(jnp.bfloat16)
    return x, weights, wg.reference(x, *weights, group_size=GROUP)


def relative_error(case: tuple, **options) -> float:
    """Max |error| of the kernel over max |reference| on ``check_case``'s inputs."""
    x, weights, ref = case
    out = wg.int4_wgmma_matmul(x, *weights, group_size=GROUP, **options)
    return float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))


def main():
    parser = bench_matmul.probe_parser(__doc__)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--deadline-s", type=float, default=1e9)
    args = parser.parse_args()
    start = time.time()
    rows = []
    cores = jax.devices()[0].core_count
    for shape in args.shapes.split(","):
        if time.time() - start > args.deadline_s:
            break
        K, N, _ = bench_matmul.SHAPES_8B[shape]
        groups = K // GROUP
        try:
            rows.append(dict(name=shape, M=1, **bench_matmul.time_variant("pallas-int4", K, N, 1, interpret=False,
                                                                             repeats=5)))
            print(rows[-1], flush=True)
        except Exception:
            traceback.print_exc()
        make, case = make_weights(K, N), check_case(K, N)
        nbytes = N * K // 2 + 2 * (K // GROUP) * N * 2  # int4 weights + 16-bit scales and zeros, as AWQ's
        for convert, block_n, stages, pad_rows in SETTINGS:
            for splits in sorted({auto_splits(N, groups, m * cores, block_n) for m in (2, 4)}):
                if time.time() - start > args.deadline_s:
                    break
                options = dict(k_splits=splits, stages=stages, convert=convert, block_n=block_n, pad_rows=pad_rows)
                row = dict(name=shape, variant=f"wgmma-{convert}" + "-padded" * pad_rows, **options)
                try:
                    row["rel_err"] = relative_error(case, **options)
                    fn = (lambda x, w, options=options:  # noqa: E731
                          wg.int4_wgmma_matmul(x, *w, group_size=GROUP, **options))
                    row.update(bench_matmul.time_chain(fn, make, nbytes, K, N, 1, key=jax.random.key(K * 7 + N),
                                                       repeats=5))
                except Exception as e:
                    traceback.print_exc()
                    row["error"] = repr(e)[:500]
                rows.append(row)
                print(row, flush=True)
        bench_matmul.write_probe(args.out, args.shapes, rows)


if __name__ == "__main__":
    main()
