"""Times a mixture of experts' grouped matmul (``pallas_kernels.grouped_matmul``) at a model's expert shapes, per
routed batch, weight format and tile setting: the sweep behind ``GroupedMatmulConfig``'s defaults.

Each call of a timed chain routes a fresh batch (each token's top-k of random router logits, laid out by
``models.moe.expert_rows`` as the model lays its rows out; the gate/up matmul reads each row from the tokens, as
the model's does), so a decode call's experts are not in the L2 from the call before; each call's input depends on
the last one's output. Compilation is excluded. Reports µs a call,
TFLOP/s of the routed rows' useful products (``2 * tokens * k * K * N``) and TB/s of the touched experts' weight
bytes; the fastest setting per (format, matmul, tokens); results written after every setting (a killed run keeps
what it measured).

    python scripts/bench_grouped_matmul.py --model benchmarks/models/qwen3-30b-a3b --tokens 1,1024,16384 \\
        --formats bf16,int8,int4 --configs '[{}, {"decode_k_splits": 4}, {"large_block_n": 128, "large_num_warps": 8}]'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FORMATS = ("bf16", "int8", "fp8", "int4", "mxfp4")
GROUP = 128  # int4 groups and packing blocks (AWQ's and the engine's int4 default)
MXFP4_GROUP = 32  # mxfp4: FP4 codes, a power of two (a uint8 exponent) each 32 rows, no zeros (gpt-oss's experts)


def expert_shapes(model: str) -> tuple[dict, int, int]:
    """``({matmul: (K, N)}, experts, top_k)`` of the model folder's ``config.json``."""
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    H = cfg["hidden_size"]
    inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    return {"gate_up": (H, 2 * inter), "down": (inter, H)}, experts, cfg["num_experts_per_tok"]


def make_weight(fmt: str, E: int, K: int, N: int, key):
    """``(call(x, block_expert, row_token=None, **tiles), bytes of one expert)`` for random experts in ``fmt``."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_int4
    from pallas_kernels.quantized_matmul import pack_int4

    if fmt in ("int4", "mxfp4"):
        group = GROUP if fmt == "int4" else MXFP4_GROUP
        q = jax.random.randint(key, (E, K, N), 0, 16, jnp.uint8)
        packed = jax.jit(pack_int4, static_argnums=1)(q, group)
        if fmt == "int4":
            scales = jnp.full((E, K // group, N), 1 / (8 * K ** 0.5), jnp.bfloat16)
            zeros = jnp.full((E, K // group, N), 8, jnp.bfloat16)
        else:
            scales, zeros = jnp.full((E, K // group, N), 127 - 6, jnp.uint8), None  # 2^-6
        del q

        def call(x, block_expert, row_token=None, block_k=None, **tiles):  # a K step is a packing block (group)
            return grouped_matmul_int4(x, packed, scales, zeros, block_expert, group_size=group, pack=group,
                                       row_token=row_token, codes="e2m1" if fmt == "mxfp4" else "uint4", **tiles)

        return call, K * N // 2 + (0 if zeros is None else zeros.nbytes // E) + scales.nbytes // E
    if fmt == "bf16":
        w, scale, k_major = jax.random.normal(key, (E, K, N), jnp.bfloat16) / K ** 0.5, None, False
    elif fmt == "int8":
        w, k_major = jax.random.randint(key, (E, K, N), -127, 128, jnp.int8), False
        scale = jnp.full((E, N), 1 / (64 * K ** 0.5), jnp.float32)
    else:
        w, k_major = (jax.random.normal(key, (E, N, K), jnp.bfloat16) * 64).astype(jnp.float8_e4m3fn), True
        scale = jnp.full((E, N), 1 / (64 * K ** 0.5), jnp.float32)

    def call(x, block_expert, row_token=None, **tiles):
        return grouped_matmul(x, w, block_expert, scale, k_major=k_major, row_token=row_token, **tiles)

    return call, K * N * w.dtype.itemsize + (0 if scale is None else 4 * N)


def routed_batches(tokens: int, E: int, top_k: int, K: int, calls: int, key, gather: bool):
    """``(xs, row_tokens, block_experts [calls, R / block_m], block_m, mean experts touched)``: with ``gather`` (the
    gate/up matmul, as the model runs it) the tokens ``xs [calls, T, K]`` and each routed row's token ``row_tokens
    [calls, R]``, else the routed rows ``xs [calls, R, K]`` and ``row_tokens`` None."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models.moe import block_rows, expert_rows

    block_m = block_rows(tokens, top_k, E)
    keys = jax.random.split(key, calls)

    @jax.jit
    def one(k):
        _, experts = jax.lax.top_k(jax.random.normal(k, (tokens, E)), top_k)
        layout = expert_rows(experts.astype(jnp.int32), E, block_m)
        return layout.block_expert, layout.token

    block_experts, row_tokens = (jnp.stack(a) for a in zip(*[one(k) for k in keys]))
    rows = block_experts.shape[1] * block_m
    xs = jax.random.normal(jax.random.fold_in(key, 1), (calls, tokens if gather else rows, K), jnp.bfloat16)
    be = np.asarray(block_experts)
    touched = float(np.mean([len(np.unique(b[b < E])) for b in be]))
    return xs, row_tokens if gather else None, block_experts, block_m, touched


def time_calls(call, xs, row_tokens, block_experts, tiles: dict, repeats: int) -> tuple[float, float]:
    """``(seconds a call, compile seconds)`` of the dependent chain over the routed batches: a loop over them, so
    the kernel is compiled once (run 36f unrolled the calls: ~10 s of compiling a setting)."""
    import jax
    import jax.numpy as jnp

    def run(xs, row_tokens, block_experts):
        def body(i, carry):
            row_token = None if row_tokens is None else row_tokens[i]
            out = call(xs[i] + carry, block_experts[i], row_token=row_token, **tiles)
            return (jnp.sum(out[:1, :1], dtype=jnp.float32) * 1e-3).astype(xs.dtype).reshape(1, 1)

        return jax.lax.fori_loop(0, xs.shape[0], body, jnp.zeros((1, 1), xs.dtype))

    run = jax.jit(run)
    start = time.perf_counter()
    jax.block_until_ready(run(xs, row_tokens, block_experts))
    compile_s = time.perf_counter() - start
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(xs, row_tokens, block_experts))
        samples.append((time.perf_counter() - start) / xs.shape[0])
    return statistics.median(samples), compile_s


def best_config(record: dict) -> dict:
    """The overrides that were fastest in each regime of ``GroupedMatmulConfig`` (its ``decode_*`` fields for
    decode-sized blocks, ``large_*`` for the largest, the others for the blocks between), each setting scored by its
    time over the default's summed over every complete (format, matmul, tokens) of the regime (every setting ran: a
    deadline can cut the last one); ``{}`` where nothing beat the default."""
    from pallas_kernels.grouped_matmul import GroupedMatmulConfig

    config = GroupedMatmulConfig()
    merged = {}
    finished = {tuple(case) for case in record.get("complete", ())}
    for regime in config.REGIMES:
        rows = [r for r in record["rows"] if config.regime(r["block_m"]) == regime and r["error"] is None
                and (r["format"], r["matmul"], r["tokens"]) in finished]
        default = {(r["format"], r["matmul"], r["tokens"]): r["us"] for r in rows if not r["config"]}
        scores: dict = {}
        for r in rows:
            case = (r["format"], r["matmul"], r["tokens"])
            fields = {k: v for k, v in r["config"].items() if config.field_regime(k) == regime}
            if case in default and (fields or not r["config"]):  # "{}" scores the default row alone
                scores.setdefault(json.dumps(fields, sort_keys=True), {})[case] = r["us"] / default[case]
        totals = {k: sum(v.values()) for k, v in scores.items() if set(v) == set(default)}
        if totals:
            merged.update(json.loads(min(totals, key=totals.get)))
    return merged


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/models/qwen3-30b-a3b", help="folder with config.json")
    parser.add_argument("--tokens", default="1,1024,16384", help="routed tokens a call, comma-separated")
    parser.add_argument("--formats", default="bf16,int8,int4", help=f"of {', '.join(FORMATS)}")
    parser.add_argument("--matmuls", default="gate_up,down")
    parser.add_argument("--configs", default="[{}]", help="JSON list of GroupedMatmulConfig field overrides")
    parser.add_argument("--calls", type=int, default=None,
                        help="routed batches a chain (default: 64 up to 256 tokens, so a decode call's few "
                             "microseconds outweigh the launch of the chain; else 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--deadline-s", type=float, default=None, help="stop starting settings after this")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--results-dir", default=None, help="where to write the JSON when --output-json is not given")
    parser.add_argument("--best-of", default=None, help="print the best overrides of a result JSON (best_config) "
                        "as $PAGEDJAX_MOE_CONFIG takes them, and exit")
    args = parser.parse_args(argv)
    if args.best_of:
        with open(args.best_of) as f:
            print(json.dumps(best_config(json.load(f))))
        return

    import jax

    from pallas_kernels.grouped_matmul import grouped_matmul_config
    from scripts.bench_common import device_name, git_commit, result_path

    start = time.monotonic()
    if args.output_json is None and args.results_dir is not None:
        args.output_json = result_path("kernel-grouped-matmul", device_name(), time.strftime("%Y-%m-%d"),
                                       args.results_dir)
    shapes, E, top_k = expert_shapes(args.model)
    configs = json.loads(args.configs)
    base = grouped_matmul_config()
    record = dict(workload="kernel-grouped-matmul", model=os.path.basename(os.path.normpath(args.model)),
                  device=device_name(), jax_version=jax.__version__, commit=git_commit(), experts=E, top_k=top_k,
                  rows=[], best=[], complete=[])
    stopped = False  # the deadline passed: no further case is started
    key = jax.random.key(0)
    for fmt in args.formats.split(","):
        if fmt not in FORMATS:
            parser.error(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
        for matmul in args.matmuls.split(","):
            if stopped:
                break
            K, N = shapes[matmul]
            call, expert_bytes = make_weight(fmt, E, K, N, jax.random.fold_in(key, K * 131 + N))
            for tokens in (int(t) for t in args.tokens.split(",")):
                if stopped:
                    break
                calls = args.calls or (64 if tokens <= 256 else 8)
                xs, row_tokens, block_experts, block_m, touched = routed_batches(
                    tokens, E, top_k, K, calls, jax.random.fold_in(key, tokens), gather=matmul == "gate_up")
                seen, rows = set(), []
                for overrides in configs:
                    tiles = dataclasses.replace(base, **overrides).tiles(block_m, int8=fmt == "int8")
                    if fmt in ("int4", "mxfp4"):
                        tiles["block_k"] = GROUP if fmt == "int4" else MXFP4_GROUP
                    if tuple(sorted(tiles.items())) in seen:
                        continue  # the same effective setting at this block size
                    if args.deadline_s is not None and time.monotonic() - start > args.deadline_s:
                        print(f"deadline: stopped before {fmt} {matmul} {tokens} {tiles}", flush=True)
                        stopped = True
                        break
                    seen.add(tuple(sorted(tiles.items())))
                    try:
                        seconds, compile_s = time_calls(call, xs, row_tokens, block_experts, tiles, args.repeats)
                        error = None
                    except Exception as exc:  # a setting Triton cannot compile (shared memory, registers)
                        seconds, compile_s, error = float("nan"), 0.0, f"{type(exc).__name__}: {str(exc)[:300]}"
                    row = dict(format=fmt, matmul=matmul, K=K, N=N, tokens=tokens, block_m=block_m, tiles=tiles,
                               config=overrides, us=seconds * 1e6, compile_s=round(compile_s, 2), error=error,
                               tflop_s=2 * tokens * top_k * K * N / seconds / 1e12,
                               weight_tb_s=touched * expert_bytes / seconds / 1e12, experts_touched=touched)
                    rows.append(row)
                    record["rows"].append(row)
                    print(f"{fmt:5} {matmul:8} T={tokens:<6} m={block_m:<4} {json.dumps(tiles):110} "
                          f"{row['us']:9.1f} us {row['tflop_s']:7.1f} TFLOP/s {row['weight_tb_s']:5.2f} TB/s"
                          + (f"  {error}" if error else ""), flush=True)
                    if args.output_json:
                        with open(args.output_json, "w") as f:
                            json.dump(record, f, indent=1)
                else:
                    record["complete"].append([fmt, matmul, tokens])  # every setting ran: best_config may use it
                timed = [r for r in rows if r["error"] is None]
                if timed:
                    best = min(timed, key=lambda r: r["us"])
                    default = next((r for r in timed if not r["config"]), None)
                    record["best"].append(dict(format=fmt, matmul=matmul, tokens=tokens, us=best["us"],
                                               tiles=best["tiles"], config=best["config"],
                                               default_us=default["us"] if default else None))
                    print(f"  best {fmt} {matmul} T={tokens}: {best['us']:.1f} us {json.dumps(best['config'])}"
                          + (f" (default {default['us']:.1f} us)" if default else ""), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
