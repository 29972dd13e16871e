"""The fp8 MLP middle (``pallas_kernels.fp8_activation``): XLA's fusions of the reference against the kernel at each
setting, at the 8B's width (N = 14,336) and the row counts of a decode step and a prompt step.

Each timed call runs the op over ``COPIES`` distinct inputs in one jitted function (together larger than the L2
cache, and the host's dispatch spread over them); medians of ``--repeats``; compilation excluded. Reports µs a call
and the bytes moved a second (``acc`` read once, the fp8 rows written).

    python scripts/bench_fp8_activation.py --out results/fp8-activation.json     # GPU
    python scripts/bench_fp8_activation.py --smoke                                # CPU: tiny, interpreted
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.fp8_activation import gated_activation_fp8, gated_activation_fp8_reference

COPIES = 8
SETTINGS = [dict(num_warps=w, max_chunk=c) for w in (4, 8, 16) for c in (512, 1024, 2048)]


def seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / COPIES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1024,16384")
    parser.add_argument("--width", type=int, default=14336)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpreted (CPU)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows_list, n, settings = [int(r) for r in args.rows.split(",")], args.width, SETTINGS
    if args.smoke:
        rows_list, n, settings, args.repeats = [4], 256, SETTINGS[:2], 2
    rng = np.random.default_rng(0)
    records = []
    for rows in rows_list:
        accs = [jnp.asarray(rng.standard_normal((rows, 2 * n)) * 64, jnp.bfloat16) for _ in range(COPIES)]
        row_scale = jnp.asarray(rng.uniform(0.01, 0.05, (rows, 1)), jnp.float32)
        col_scale = jnp.asarray(rng.uniform(0.5, 1.5, 2 * n), jnp.float32)
        moved = rows * 2 * n * 2 + rows * n  # bytes: acc read, fp8 rows written
        variants = [("xla", gated_activation_fp8_reference)] + [
            (f"kernel w{s['num_warps']} c{s['max_chunk']}",
             functools.partial(gated_activation_fp8, interpret=args.smoke, **s)) for s in settings]
        for name, op in variants:
            fn = jax.jit(lambda accs, op=op: [op(a, row_scale, col_scale) for a in accs])
            try:
                s = seconds(fn, (accs,), args.repeats)
            except Exception as exc:  # a setting that does not compile: say so, go on
                records.append(dict(rows=rows, width=n, variant=name, error=f"{type(exc).__name__}: {exc}"[:300]))
                print(f"{rows:>6} {name:<20} failed: {records[-1]['error']}")
                continue
            records.append(dict(rows=rows, width=n, variant=name, us=s * 1e6, tb_s=moved / s / 1e12))
            print(f"{rows:>6} {name:<20} {s * 1e6:9.1f} us  {moved / s / 1e12:5.2f} TB/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
