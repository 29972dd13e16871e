"""Weight-streaming matmuls at decode batch sizes: XLA against the Pallas kernel, per weight format.

For each matrix shape of Llama-3.1-8B (``wq``, ``wk``/``wv``, ``wo``, ``w_gate``/``w_up``,
``w_down``, ``lm_head``) and rows M (tokens in the step), times ``x[M, K] @ W`` with W in
bf16 (XLA's dot, the Pallas kernel), int8 and int4 (XLA's dequantize-then-dot, the
Pallas kernel) and fp8 (XLA's fp8 dot with per-token activation scales). Reports µs,
weight bytes read per second, and a decode-step estimate: the layer matrices times
their count in the model plus the bf16 LM head, against the step's weight bytes over
the measured read rate.

Timing: one jitted function runs at least ``MIN_CALLS`` matmuls in a chain (each one's
input depends on the previous output, as in a model: XLA merged independent dots that
share a weight into one matmul, which made a second version report 19 TB/s), cycling
over enough distinct copies of the weight that they outgrow the L2 cache: the figure is
a stream from device memory, the host's dispatch of the one call is spread over many
matmuls (a first version timed only a few per call and measured mostly dispatch:
benchmarks/NOTES.md), and launch overhead is what the engine sees inside its own
compiled step. Medians of ``--repeats``; compilation excluded.

    python scripts/bench_matmul.py                       # GPU, writes benchmarks/results/kernel-matmul-*.json
    python scripts/bench_matmul.py --smoke               # CPU: tiny shapes, interpret mode
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
import traceback
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402

# name -> (K, N, matrices of this shape per decode step of Llama-3.1-8B)
# On one device the engine joins q/k/v and gate/up (models.llama.fuse_projections).
SHAPES_8B = {"wqkv": (4096, 6144, 32), "wo": (4096, 4096, 32), "w_gate_up": (4096, 28672, 32),
             "w_down": (14336, 4096, 32), "lm_head": (4096, 128256, 1)}
SHAPES_SMOKE = {"wqkv": (256, 128, 2), "w_gate_up": (256, 384, 2), "w_down": (384, 256, 2), "lm_head": (128, 512, 1)}
# Kernel tilings tried by --sweep: (block_n, block_k, programs_per_core, num_warps, num_stages).
# int4 tiles K by its packing block whatever block_k says.
# One-row GEMV form (--sweep-form gemv): MatmulConfig fields changed from the defaults; the first, the defaults
# themselves, then the conversion before run 22a (cvt), tilings around the defaults, and loads a step ahead or not
# (the default: ahead for int8 only).
GEMV_SWEEP = ({}, dict(gemv_convert="cvt"), dict(gemv_block_k=64), dict(gemv_block_n=256),
              dict(gemv_block_n=64, gemv_block_k=64), dict(gemv_programs_per_core=16), dict(gemv_prefetch=0),
              dict(gemv_prefetch=1))
SWEEP = ((64, 128, 2, 4, 4), (128, 128, 2, 4, 4), (128, 256, 2, 4, 4), (256, 128, 1, 4, 4), (128, 256, 1, 8, 3),
         (256, 256, 1, 8, 3), (128, 512, 1, 4, 3), (64, 256, 2, 4, 4), (128, 128, 4, 4, 4), (256, 64, 2, 4, 6))
VARIANTS = ("xla-bf16", "pallas-bf16", "xla-int8", "pallas-int8", "xla-int4", "pallas-int4", "xla-fp8")
# Other ways to multiply by an fp8 weight, timed against the model's (xla-fp8: per-token activation
# scales, a raw fp8 x fp8 dot): a per-tensor activation scale written as XLA's scaled-fp8 pattern
# (convert -> scalar multiply -> dot, which its GEMM rewriter maps to one cuBLASLt fp8 matmul), and
# weight-only (the fp8 weight converted inside a bf16 dot, as int8 is).
FP8_FORMS = ("xla-fp8-tensor", "xla-fp8-wonly")
STREAM_BYTES = 128 << 20  # distinct copies of a weight: at least this many bytes (L2 is 50-60 MB)
MIN_CALLS = 64  # matmuls per timed call


def make_variant(variant: str, K: int, N: int, key, interpret: bool, config=None):
    """``(matmul(x, w), weight maker(key), bytes of one weight)`` for a variant."""
    import jax
    import jax.numpy as jnp

    from models.quantization import LinearBackend, linear, quantize_weight
    from pallas_kernels.quantized_matmul import default_config, dense_matmul, int4_matmul, int8_matmul

    backend, fmt, *form = variant.split("-")
    config = config or default_config()

    def make(key):
        w = (jax.random.normal(key, (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
        return w if fmt == "bf16" else quantize_weight(w, fmt)

    if form:
        fn = _fp8_tensor_scaled if form == ["tensor"] else _fp8_weight_only
    elif backend == "xla":
        fn = functools.partial(linear, backend=LinearBackend(kernel="xla"))
    elif fmt == "bf16":
        fn = lambda x, w: dense_matmul(x, w, config=config, interpret=interpret)  # noqa: E731
    elif fmt == "int8":
        fn = lambda x, w: int8_matmul(x, w.q, w.scale, config=config, interpret=interpret)  # noqa: E731
    else:
        fn = lambda x, w: int4_matmul(x, w.packed, w.scales, w.zeros, group_size=w.group_size,  # noqa: E731
                                      pack=w.pack, config=config, interpret=interpret)
    sample = jax.eval_shape(make, key)
    nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(sample))
    return fn, make, nbytes


def _fp8_tensor_scaled(x, w):
    import jax
    import jax.numpy as jnp

    from models.quantization import FP8_MAX

    scale = jnp.maximum(jnp.max(jnp.abs(x)).astype(jnp.float32), 1e-12) / FP8_MAX
    xq = (x.astype(jnp.float32) / scale).astype(jnp.float8_e4m3fn)
    acc = jax.lax.dot_general(xq.astype(jnp.bfloat16) * scale.astype(jnp.bfloat16), w.q.astype(jnp.bfloat16),
                              (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (acc * w.scale).astype(x.dtype)


def _fp8_weight_only(x, w):
    import jax
    import jax.numpy as jnp

    acc = jax.lax.dot_general(x, w.q.astype(x.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (acc * w.scale).astype(x.dtype)


def time_variant(variant, K, N, M, *, interpret, repeats, config=None, stream_bytes=STREAM_BYTES,
                 min_calls=MIN_CALLS, compiler_options=None):
    import jax

    key = jax.random.key(K * 7 + N)
    fn, make, nbytes = make_variant(variant, K, N, key, interpret, config)
    return dict(variant=variant, **time_chain(fn, make, nbytes, K, N, M, key=key, repeats=repeats,
                                              stream_bytes=stream_bytes, min_calls=min_calls,
                                              compiler_options=compiler_options))


def time_chain(fn, make, nbytes, K, N, M, *, key, repeats, stream_bytes=STREAM_BYTES, min_calls=MIN_CALLS,
               compiler_options=None) -> dict:
    """Times ``fn(x[M, K], w)`` in a dependent chain over enough copies ``make(key)`` of the weight to outgrow
    the L2 (module docstring); ``nbytes``: one weight's bytes."""
    import jax
    import jax.numpy as jnp

    copies = max(2, -(-stream_bytes // nbytes))
    calls = max(min_calls, copies)
    weights = [jax.jit(make)(jax.random.fold_in(key, i)) for i in range(copies)]
    xs = jax.random.normal(jax.random.fold_in(key, 1 << 20), (calls, M, K), jnp.float32).astype(jnp.bfloat16)
    def run(xs, ws):  # each matmul's input depends on the last one's output: none can merge or overlap
        carry = jnp.zeros((M, 1), xs.dtype)
        for i in range(calls):
            out = fn(xs[i] + carry, ws[i % copies])
            carry = jnp.sum(out, axis=-1, keepdims=True, dtype=jnp.float32).astype(xs.dtype) * 1e-3
        return carry

    run = jax.jit(run, compiler_options=compiler_options or None)
    start = time.perf_counter()
    jax.block_until_ready(run(xs, weights))  # compile, warm up
    compile_s = time.perf_counter() - start
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(xs, weights))
        samples.append((time.perf_counter() - start) / calls)
    seconds = statistics.median(samples)
    return dict(K=K, N=N, M=M, us=seconds * 1e6, weight_bytes=nbytes,
                weight_tb_s=nbytes / seconds / 1e12, tflop_s=2 * M * K * N / seconds / 1e12, copies=copies, calls=calls,
                compile_s=compile_s)


def probe_parser(description: str) -> argparse.ArgumentParser:
    """The command line the one-shape GEMV probes share (``scripts/probe_gemv_*.py``)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare with the reference")
    parser.add_argument("--shape", default="w_gate_up")
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="CPU: the small shapes, interpret mode, few calls")
    return parser


def probe_shape(args) -> tuple[int, int, dict]:
    """``(K, N, time_chain keywords)`` of a probe's ``--shape`` (``--smoke``: the small shapes, few calls)."""
    K, N, _ = (SHAPES_SMOKE if args.smoke else SHAPES_8B)[args.shape]
    return K, N, dict(repeats=1, stream_bytes=1 << 20, min_calls=2) if args.smoke else dict(repeats=5)


def write_probe(path: Optional[str], shape: str, rows: list[dict]) -> None:
    """A probe's rows with the device and JAX version, as JSON at ``path`` (nothing without one)."""
    import json

    import jax

    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, shape=shape, rows=rows), f,
                      indent=1)


def step_estimates(rows: list[dict], shapes: dict, read_tb_s: float) -> list[dict]:
    """Per (variant, M): layer matrices x their count + the bf16 LM head (XLA), against bytes / read rate."""
    by = {(r["variant"], r["M"], r["name"]): r for r in rows if "us" in r}
    out = []
    for variant in VARIANTS + FP8_FORMS:
        for M in sorted({r["M"] for r in rows}):
            parts = [(by.get((variant, M, name)), count) for name, (_, _, count) in shapes.items() if name != "lm_head"]
            head = by.get(("xla-bf16", M, "lm_head"))
            if head is None or any(p is None for p, _ in parts):
                continue
            us = sum(p["us"] * c for p, c in parts) + head["us"]
            nbytes = sum(p["weight_bytes"] * c for p, c in parts) + head["weight_bytes"]
            out.append(dict(variant=variant, M=M, step_us=us, weight_bytes=nbytes,
                            floor_us=nbytes / (read_tb_s * 1e12) * 1e6))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,16,64", help="comma-separated M values")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"also: {', '.join(FP8_FORMS)}")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sweep", action="store_true", help="also sweep the kernel's tiles (SWEEP) at M=1")
    parser.add_argument("--sweep-shapes", default="w_gate_up,wqkv")
    parser.add_argument("--sweep-variants", default="pallas-int8,pallas-int4")
    parser.add_argument("--sweep-configs", type=json.loads, default=None,
                        help="the GEMV form's list of MatmulConfig field objects instead of GEMV_SWEEP, e.g. "
                             "'[{}, {\"gemv_subtiles\": 8}]' (each timed in this one process: an A/B without "
                             "the model's run-to-run spread)")
    parser.add_argument("--sweep-form", choices=("dot", "gemv"), default="dot",
                        help="which form's tiles to sweep: the row-tiled dot (SWEEP) or the one-row GEMV (GEMV_SWEEP)")
    parser.add_argument("--compiler-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an XLA option for the timed functions' compilation (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--results-dir", default=bench_common.RESULTS_DIR)
    args = parser.parse_args(argv)
    import jax

    from pallas_kernels.quantized_matmul import MatmulConfig

    interpret = jax.default_backend() != "gpu"
    shapes = SHAPES_SMOKE if args.smoke else SHAPES_8B
    stream, calls = ((1 << 20), 2) if args.smoke else (STREAM_BYTES, MIN_CALLS)
    repeats = 2 if args.smoke else args.repeats
    result = bench_common.result_header("kernel-matmul", None if args.smoke else bench_common.DEFAULT_MODEL,
                                        "bfloat16")
    read_tb_s = bench_common.measure_copy_bandwidth((64 if args.smoke else 2048) << 20) / 1e12
    options = bench_common.compiler_options(args.compiler_option)
    result["compiler_options"] = options
    rows = []
    for M in [int(m) for m in args.rows.split(",")]:
        for name, (K, N, _) in shapes.items():
            variants = ["xla-bf16"] if name == "lm_head" else args.variants.split(",")
            for variant in variants:
                try:
                    row = time_variant(variant, K, N, M, interpret=interpret, repeats=repeats, stream_bytes=stream,
                                       min_calls=calls, compiler_options=options)
                except Exception as e:  # noqa: BLE001 - one failing variant must not lose the others
                    traceback.print_exc()
                    row = dict(variant=variant, K=K, N=N, M=M, error=f"{type(e).__name__}: {e}"[:500])
                rows.append(dict(name=name, **row))
                print(f"M={M:3d} {name:12s} {variant:14s} " + (f"{row['us']:9.1f} us {row['weight_tb_s']:6.2f} TB/s {row['tflop_s']:6.1f} TFLOP/s "
                                                               f"(compile + first call {row['compile_s']:.1f} s)"
                                                               if "us" in row else row["error"][:120]), flush=True)
    sweep = []
    if args.sweep:
        for name in args.sweep_shapes.split(","):
            K, N, _ = shapes[name]
            for variant in args.sweep_variants.split(","):
                for tiling in (SWEEP if args.sweep_form == "dot" else args.sweep_configs or GEMV_SWEEP):
                    if args.sweep_form == "dot":
                        block_n, block_k, per_core, warps, stages = tiling
                        config = MatmulConfig(block_n=block_n, block_k=block_k, programs_per_core=per_core,
                                              num_warps=warps, num_stages=stages, gemv=False)
                    else:
                        config = MatmulConfig(**tiling)
                    try:
                        row = time_variant(variant, K, N, 1, interpret=interpret, repeats=repeats, config=config,
                                           stream_bytes=stream, min_calls=calls)
                        sweep.append(dict(name=name, config=dataclasses.asdict(config), **row))
                        print(f"sweep {name} {variant} {dataclasses.asdict(config)}: {row['us']:.1f} us "
                              f"{row['weight_tb_s']:.2f} TB/s", flush=True)
                    except Exception as e:  # noqa: BLE001
                        sweep.append(dict(name=name, config=dataclasses.asdict(config), variant=variant,
                                          error=f"{type(e).__name__}: {e}"[:300]))
    estimates = step_estimates(rows, shapes, read_tb_s)
    result.update(read_tb_s=read_tb_s, rows=rows, sweep=sweep, decode_step_estimates=estimates,
                  notes="read_tb_s: elementwise x*2 over 2 GiB, read + write counted; floor_us: the step's "
                        "weight bytes over it. step_us: layer matrices x count + bf16 lm_head (XLA).")
    path = bench_common.write_results(result, args.output_json, args.results_dir)
    bench_common.print_table(estimates, ["variant", "M", "step_us", "floor_us", "weight_bytes"],
                             title=f"decode-step matmuls of llama-3.1-8b on {result['device']} "
                                   f"(read rate {read_tb_s:.2f} TB/s)")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
