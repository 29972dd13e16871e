"""Embedding throughput of a pooling engine (``LLM(runner="pooling").embed``): prompts and tokens a second.

Not a PROTOCOL workload (PROTOCOL fixes generation's); this one is ``embed``: ``--num-requests`` random token-id
prompts of ``--input-len`` tokens (default 1024 x 512), all submitted at once after a warm-up, timed with
compilation excluded. Also reported: the FLOP ceiling (the prompts' FLOPs at the bf16 rate of the model's gate/up
matmul measured in the run) and the share of it reached (a prefill-only workload: ``of_ceiling`` is its MFU-like
figure). Dummy weights by default, like the other benchmarks.

    python scripts/bench_embed.py                       # the 8B's shapes, dummy weights (GPU)
    python scripts/bench_embed.py --model /tmp/tiny --num-requests 64 --input-len 128   # CPU smoke

Writes ``benchmarks/results/embed-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402

WORKLOAD = "embed"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench_common.add_engine_flags(parser)
    parser.add_argument("--num-requests", type=int, default=1024)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--pooling-type", default=None, choices=["LAST", "MEAN", "CLS"])
    parser.add_argument("--warmup-requests", type=int, default=64)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    vocab = bench_common.read_vocab_size(args.model)
    prompts = bench_common.random_prompts(args.num_requests + args.warmup_requests, args.input_len, vocab, args.seed)
    on_cpu = bench_common.device_name() == "cpu"
    llm = bench_common.make_llm(args, max_model_len=args.input_len + 1, runner="pooling",
                                pooling_type=args.pooling_type)
    try:
        config = llm.llm_engine.model_config
        matmul_flops = bench_common.measure_matmul_flops(256 if on_cpu else 8192, "float32" if on_cpu else "bfloat16",
                                                         k=config.hidden_size, n=2 * config.intermediate_size)
        llm.embed([{"prompt_token_ids": p} for p in prompts[:args.warmup_requests]], use_tqdm=False)
        timed = [{"prompt_token_ids": p} for p in prompts[args.warmup_requests:]]
        before = llm.stats()
        with bench_common.CompileTimer() as compiles:
            started = time.perf_counter()
            outputs = llm.embed(timed, use_tqdm=False)
            wall = time.perf_counter() - started
        after = llm.stats()
    finally:
        llm.shutdown()
    if len(outputs) != args.num_requests or any(len(o.outputs.embedding) != config.hidden_size for o in outputs):
        raise RuntimeError("an embedding is missing or has the wrong size")
    seconds = wall - compiles.seconds
    tokens = args.num_requests * args.input_len
    flops = args.num_requests * bench_common.model_flops(
        config, tokens=args.input_len, sampled=0, attention_pairs=args.input_len * (args.input_len + 1) // 2)
    result = bench_common.engine_result_header(WORKLOAD, args)
    result.update(num_requests=args.num_requests, input_len=args.input_len, req_s=args.num_requests / seconds,
                  input_tok_s=tokens / seconds, seconds=seconds, wall_s=wall, compile_s_excluded=compiles.seconds,
                  pooling_type=llm.llm_engine.pooling.pooling_type, engine_steps=after["steps"] - before["steps"],
                  matmul_tflop_s=matmul_flops / 1e12, flop_ceiling_req_s=args.num_requests * matmul_flops / flops,
                  of_ceiling=flops / seconds / matmul_flops)
    path = bench_common.write_results(result, args.output_json, args.results_dir)
    bench_common.print_table([dict(name="pagedjax", **{k: result[k] for k in ("req_s", "input_tok_s", "of_ceiling")})],
                             ["name", "req_s", "input_tok_s", "of_ceiling"],
                             title=f"{WORKLOAD} on {result['device']}: {args.num_requests} x {args.input_len} tokens "
                                   f"({seconds:.1f} s, {compiles.seconds:.1f} s of compilation excluded)")
    print(f"wrote {path}", flush=True)
    return result


if __name__ == "__main__":
    main()
