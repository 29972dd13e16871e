"""The MLP's gate/up projection and SwiGLU product: XLA's way against the fused Pallas kernel.

For Llama-3.1-8B's ``w_gate_up`` (K=4096, 2I=28672) and rows M (tokens in a step), times
``silu(x @ W_gate) * (x @ W_up)`` as the model writes it for XLA (one GEMM to ``[M, 2I]``, then
a fused elementwise pass: ``xla``), XLA's GEMM alone (``xla-gemm``) and
``pallas_kernels.swiglu_matmul`` at each tiling of ``--configs`` (``pallas``). Reports µs per
call, TFLOP/s of the GEMM's 2·M·K·2I FLOPs and the kernel's largest error against the float32
reference. Medians of ``--repeats`` (each the mean of ``--inner`` back-to-back calls);
compilation excluded.

    python scripts/bench_swiglu.py --output-json benchmarks/results/swiglu.json   # GPU
    python scripts/bench_swiglu.py --smoke                                         # CPU: tiny, interpreted
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_common  # noqa: E402
from bench_kernels import time_us  # noqa: E402
from pallas_kernels.swiglu_matmul import SwigluConfig, swiglu_matmul, swiglu_matmul_reference  # noqa: E402

# (block_m, block_n, block_k, group_m, num_warps, num_stages); the first is the default.
CONFIGS = ((128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 128, 32, 8, 8, 4), (128, 128, 64, 16, 8, 3),
           (256, 64, 64, 8, 8, 3), (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (128, 128, 64, 8, 4, 3))
SMOKE_CONFIGS = ((32, 32, 32, 2, 4, 2),)
# JAX's Hopper Mosaic GPU matmul (``jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu``, a plain GEMM: TMA, wgmma,
# a producer warpgroup) at these TuningConfigs, beside cuBLAS's GEMM: whether a Mosaic GPU GEMM keeps cuBLAS's pace,
# i.e. whether a SwiGLU epilogue built on that pattern can pay. (tile_m, tile_n, tile_k, max_concurrent_steps,
# grid_minor_dim, grid_tile_width, wg_dimension).
MGPU_CONFIGS = ((128, 128, 64, 4, "N", 8, "N"), (128, 128, 64, 4, "M", 16, "N"), (128, 128, 64, 4, "N", 8, "M"),
                (256, 64, 64, 4, "N", 8, "N"))


def mgpu_gemm(config):
    """JAX's Hopper Mosaic GPU matmul ``x @ w`` at ``config`` (a ``MGPU_CONFIGS`` tuple); None where that module
    or Mosaic GPU is missing."""
    try:
        from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
    except Exception as e:  # noqa: BLE001 (an older JAX, no Mosaic GPU, no absl for its test_util import)
        print(f"hopper_matmul_mgpu unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    tile_m, tile_n, tile_k, steps, minor, width, wg = config
    tuning = hm.TuningConfig(tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, max_concurrent_steps=steps,
                             grid_minor_dim=hm.MatmulDimension[minor], grid_tile_width=width,
                             wg_dimension=hm.MatmulDimension[wg])
    return lambda x, w: hm.matmul(x, w, None, tuning)


def xla_swiglu(x, w):
    """The model's form for XLA (``models.llama``): the joined projection, then silu(gate) * up."""
    gate, up = jnp.split(x @ w, 2, axis=-1)
    return jax.nn.silu(gate) * up


def print_best_config(path: str, rows: int) -> int:
    """``--best-config``: 0 (and the tiling printed) if the fastest kernel tiling at ``rows`` beats ``xla``."""
    with open(path) as f:
        timed = [r for r in json.load(f)["rows"] if r["rows"] == rows and "us" in r]
    xla = min((r["us"] for r in timed if r["variant"] == "xla"), default=None)
    kernels = sorted((r for r in timed if r["variant"] == "pallas"), key=lambda r: r["us"])
    if xla is None or not kernels or kernels[0]["us"] >= xla:
        print(f"no kernel tiling beats XLA at {rows} rows", file=sys.stderr)
        return 1
    names = [f.name for f in dataclasses.fields(SwigluConfig)]
    print(json.dumps(dict(zip(names, kernels[0]["config"]))))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="16384,4096,1024,256")
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--configs", default=None, help="';'-separated tuples 'bm,bn,bk,group,warps,stages'")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--mgpu", action="store_true", help="also time JAX's Hopper Mosaic GPU GEMM (MGPU_CONFIGS)")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--best-config", default=None, metavar="JSON",
                        help="print the fastest kernel tiling at --rows (one count) in this result as "
                             "$PAGEDJAX_SWIGLU_CONFIG's JSON and exit 0 if it beats XLA there, else exit 1")
    args = parser.parse_args(argv)
    if args.best_config:
        sys.exit(print_best_config(args.best_config, int(args.rows)))
    if args.smoke:
        args.rows, args.k, args.intermediate, args.repeats, args.inner = "8,40", 64, 64, 1, 1
    interpret = jax.default_backend() != "gpu"
    configs = (tuple(tuple(int(v) for v in c.split(",")) for c in args.configs.split(";")) if args.configs
               else SMOKE_CONFIGS if args.smoke else CONFIGS)
    K, I = args.k, args.intermediate
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((K, 2 * I)) / np.sqrt(K), jnp.bfloat16)
    rows_out = []
    for M in (int(m) for m in args.rows.split(",")):
        x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
        flops = 2 * M * K * 2 * I
        ref = np.asarray(swiglu_matmul_reference(x, w).astype(jnp.float32))
        scale = float(np.abs(ref).max())
        variants = [("xla", None, jax.jit(xla_swiglu)), ("xla-gemm", None, jax.jit(lambda x, w: x @ w))]
        variants += [("pallas", c, jax.jit(functools.partial(
            swiglu_matmul, config=SwigluConfig(*c), interpret=interpret))) for c in configs]
        if args.mgpu and not interpret:
            variants += [("mgpu-gemm", c, jax.jit(mgpu_gemm(c))) for c in MGPU_CONFIGS if mgpu_gemm(c) is not None]
        for name, config, fn in variants:
            row = {"rows": M, "variant": name, "config": config}
            try:
                us, _ = time_us(fn, (x, w), args.repeats, args.inner)
                row.update(us=round(us, 1), tflop_s=round(flops / us / 1e6, 1))
                if not name.endswith("-gemm"):
                    row["max_rel_err"] = float(np.abs(np.asarray(fn(x, w).astype(jnp.float32)) - ref).max() / scale)
            except Exception as e:  # a tiling Triton rejects (shared memory, registers): say so, go on
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(json.dumps(row), flush=True)
            rows_out.append(row)
    if args.output_json:
        header = bench_common.result_header("swiglu", None, "bfloat16")
        with open(args.output_json, "w") as f:
            json.dump({**header, "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
