"""PROTOCOL offline workloads ``tput-short`` (1024 x 128/128), ``tput-long`` (512 x 1000/1000) and
``tput-prefill`` (512 x 2048/128) through ``LLM``: every request submitted at once.

Reports output tok/s, total tok/s and req/s over the run's wall time minus the
compilation it triggered (the engine compiles a step shape the first time it
meets it; a short warm-up compiles the common ones first), and for tput-prefill
the prefill MFU: useful FLOPs of the steps that ran prompt chunks (2 per weight
per token, the LM head on sampling rows, causal attention) over those steps' time
(from the engine's per-step trace), against the device's published dense bf16 peak
(989 TFLOP/s on an H100 or H200; elsewhere the bf16 matmul rate measured in the same
run; or ``--peak-tflops``), with its fraction of the measured matmul rate beside it. Several
workloads in one run share one engine.
``--peer hf`` also times Hugging Face ``generate()`` on the same device with
random weights of the same config, at the batch it can hold (``PEER_BATCH``).

    python scripts/bench_throughput.py --workload tput-short,tput-long,tput-prefill --peer hf   # GPU
    python scripts/bench_throughput.py --model /tmp/tiny --workload tput-short \\
        --num-requests 8 --input-len 16 --output-len 8                                       # CPU smoke

Writes ``benchmarks/results/<workload>-<device>-<date>.json`` per workload.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402

THROUGHPUT_WORKLOADS = ("tput-short", "tput-long", "tput-prefill")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_common.add_engine_flags(parser)
    parser.add_argument("--workload", default="tput-short",
                        help=f"one or more (comma-separated) of {', '.join(THROUGHPUT_WORKLOADS)}")
    parser.add_argument("--num-requests", type=int, default=None, help="override the workload's request count")
    parser.add_argument("--input-len", type=int, default=None, help="override the workload's input length")
    parser.add_argument("--output-len", type=int, default=None, help="override the workload's output length")
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="each request's input and output lengths drawn uniformly within this ratio of "
                             "--input-len / --output-len: with the same --seed and lengths, exactly the requests "
                             "of bench_serving.py (its default 0.5), submitted at once (its offline peer)")
    parser.add_argument("--shared-prefix-len", type=int, default=0,
                        help="every prompt starts with the same this many tokens (a shared system prompt: what "
                             "prefix caching saves; compare with --no-enable-prefix-caching)")
    parser.add_argument("--warmup-requests", type=int, default=32,
                        help="requests in the warm-up (full prompts, up to 8 output tokens each); shapes it does "
                             "not compile are compiled in the timed run and their compile time subtracted")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak for MFU (default: the device's published dense bf16 peak, 989 on H100 / H200; "
                             "else the bf16 matmul rate measured in this run)")
    parser.add_argument("--peer", choices=("none", "hf"), default="none")
    parser.add_argument("--peer-num-requests", type=int, default=None,
                        help="requests (one batch) the peer runs per workload (default PEER_BATCH)")
    parser.add_argument("--trace", action="store_true",
                        help="trace every workload's steps (always on for tput-prefill, which needs it for MFU)")
    args = parser.parse_args(argv)
    args.workloads = [w.strip() for w in args.workload.split(",") if w.strip()]
    unknown = [w for w in args.workloads if w not in THROUGHPUT_WORKLOADS]
    if unknown or not args.workloads:
        parser.error(f"--workload: unknown {unknown}; choose from {', '.join(THROUGHPUT_WORKLOADS)}")
    if args.output_json and len(args.workloads) > 1:
        parser.error("--output-json takes one workload (several write one default-named file each)")
    return args


def workload_sizes(args, workload: str) -> tuple[int, int, int]:
    n, i, o = bench_common.WORKLOADS[workload]
    return args.num_requests or n, args.input_len or i, args.output_len or o


def workload_requests(args, n: int, input_len: int, output_len: int, shared: int,
                      vocab: int) -> tuple[list[list[int]], list[int]]:
    """``(prompts, output lengths)``: fixed lengths from the fixed-seed prompts of every workload, or with
    ``--range-ratio`` the serving benchmark's requests (``bench_common.make_requests``, same seed)."""
    if args.range_ratio:
        requests = bench_common.make_requests(n, input_len, output_len, args.range_ratio, vocab, args.seed, shared)
        return [p for p, _ in requests], [m for _, m in requests]
    prompts = bench_common.random_prompts(n, input_len, vocab, args.seed)
    for prompt in prompts[1:]:
        prompt[:shared] = prompts[0][:shared]
    return prompts, [output_len] * n


def prefill_figures(run: bench_common.OfflineRun, engine, peak_flops: float, measured_flops: float) -> dict:
    """The prompt steps' FLOP rate, as MFU against ``peak_flops`` and as a fraction of the matmul rate measured
    in the run."""
    steps = [r for r in run.trace.records if r.has_prefill]
    flops = sum(bench_common.step_flops(engine.model_config, r.scheduled) for r in steps)
    seconds = sum(run.step_seconds(r) for r in steps)
    return dict(prefill_mfu=flops / seconds / peak_flops, prefill_tflop_s=flops / seconds / 1e12,
                prefill_steps=len(steps), prefill_seconds=seconds, peak_tflop_s=peak_flops / 1e12,
                measured_matmul_tflop_s=measured_flops / 1e12,
                prefill_of_measured_matmul=flops / seconds / measured_flops)


def step_breakdown(run: bench_common.OfflineRun) -> dict:
    """Where a traced run's time went: steps with prompt chunks, decode-only steps (their median
    step time and batch), and the time outside any step (the engine loop between steps)."""
    import statistics

    records = run.trace.records
    decode = [r for r in records if not r.has_prefill]
    prefill_s = sum(run.step_seconds(r) for r in records if r.has_prefill)
    decode_s = sum(run.step_seconds(r) for r in decode)
    return dict(prefill_steps_s=prefill_s, decode_steps_s=decode_s, outside_steps_s=run.seconds - prefill_s - decode_s,
                decode_steps=len(decode),
                decode_step_ms_median=statistics.median(run.step_seconds(r) for r in decode) * 1e3 if decode else None,
                decode_batch_median=statistics.median(len(r.scheduled) for r in decode) if decode else None)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    vocab = bench_common.read_vocab_size(args.model)
    peers = {}
    if args.peer == "hf":  # before JAX takes the device's memory
        sizes = {}
        for w in args.workloads:
            _, i, o = workload_sizes(args, w)
            batch = args.peer_num_requests or bench_common.PEER_BATCH[w]
            sizes[w] = (batch, i, o, batch)
        peers = bench_common.run_hf_peer(args.model, args.workloads, dtype=args.dtype, seed=args.seed, sizes=sizes)
    peak_flops = measured_flops = None
    on_cpu = bench_common.device_name() == "cpu"
    if "tput-prefill" in args.workloads:  # MFU against the data sheet's peak where the device is listed
        measured_flops = bench_common.measure_matmul_flops(1024 if on_cpu else 8192,
                                                           "float32" if on_cpu else "bfloat16")
        published = bench_common.published_bf16_peak_flops(bench_common.device_name())
        peak_flops, peak_source = ((args.peak_tflops * 1e12, "--peak-tflops") if args.peak_tflops else
                                   (published, "published bf16 peak") if published else
                                   (measured_flops, "measured matmul"))
    longest = 1 + args.range_ratio  # drawn lengths reach (1 + ratio) x the mean; serving's prompts add the prefix
    max_model_len = max(int(i * longest) + int(o * longest) + (args.shared_prefix_len if args.range_ratio else 0)
                        for _, i, o in map(functools.partial(workload_sizes, args), args.workloads))
    llm = bench_common.make_llm(args, max_model_len=max_model_len,
                                trace=args.trace or "tput-prefill" in args.workloads)
    from engine import SamplingParams

    results = []
    try:
        engine = llm.llm_engine
        loras = bench_common.lora_requests(args, llm)
        max_num_seqs = engine.scheduler.max_num_seqs
        # Limits of the tput figures, from rates measured here: the workload's FLOPs at the bf16 matmul rate
        # of the model's widest layer (gate/up, 8192 rows), everything else free ("flop_ceiling"); and
        # those plus the decode steps' K/V reads at the read bandwidth, run one after the other ("limit").
        config = engine.model_config
        matmul_flops = bench_common.measure_matmul_flops(256 if on_cpu else 8192, "float32" if on_cpu else "bfloat16",
                                                         k=config.hidden_size, n=2 * config.intermediate_size)
        bandwidth = bench_common.measure_read_bandwidth((64 if on_cpu else 2048) << 20)
        import jax

        kv_dtype = jax.tree.leaves(engine.runner.kv_cache)[0].dtype
        for workload in args.workloads:
            n, input_len, output_len = workload_sizes(args, workload)
            shared = min(args.shared_prefix_len, input_len)
            prompts, output_lens = workload_requests(args, n, input_len, output_len, shared, vocab)
            num_output, num_input = sum(output_lens), sum(len(p) for p in prompts)
            warmup = min(n, args.warmup_requests)
            started = time.perf_counter()
            bench_common.run_offline(llm, prompts[:warmup], SamplingParams(temperature=0.0, ignore_eos=True,
                                                                           max_tokens=min(8, output_len)), loras)
            print(f"{workload}: warm-up of {warmup} requests took {time.perf_counter() - started:.1f} s", flush=True)
            before = llm.stats()
            run = bench_common.run_offline(llm, prompts, [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
                                                          for m in output_lens], loras)
            after = llm.stats()
            result = bench_common.engine_result_header(workload, args)
            if shared:
                result["shared_prefix_len"] = shared
            if args.range_ratio:
                result["range_ratio"] = args.range_ratio
            ours = dict(output_tok_s=num_output / run.seconds,
                        total_tok_s=(num_input + num_output) / run.seconds, req_s=n / run.seconds)
            result.update(ours, num_requests=n, input_len=input_len, output_len=output_len,
                          max_num_seqs=max_num_seqs, max_num_batched_tokens=engine.scheduler.max_num_batched_tokens,
                          num_kv_blocks=engine.block_manager.num_usable_blocks,
                          max_concurrent_tokens=engine.max_concurrent_tokens, seconds=run.seconds,
                          wall_s=run.wall_s, compile_s_excluded=run.compile_s, traced=run.trace is not None,
                          async_scheduling_on=engine.async_scheduling,
                          # engine steps of the timed run, of them multi-step decodes, the host's wait for tokens,
                          # the prompt tokens looked up in the prefix cache and found there (a preempted request
                          # looks its prompt and outputs up again), and the preemptions
                          **{f"engine_{name}": after[name] - before[name]
                             for name in ("steps", "multi_steps", "wait_s", "prefix_cache_queries",
                                          "prefix_cache_hits", "num_preemptions")})
            lengths = [(len(p), m) for p, m in zip(prompts, output_lens)]
            matmul_s = sum(bench_common.workload_flops(config, 1, i, o) for i, o in lengths) / matmul_flops
            kv_s = sum(bench_common.workload_decode_kv_bytes(config, 1, i, o, kv_dtype) for i, o in lengths) / bandwidth
            result.update(matmul_tflop_s=matmul_flops / 1e12, read_bandwidth_tb_s=bandwidth / 1e12,
                          flop_ceiling_output_tok_s=num_output / matmul_s,
                          limit_output_tok_s=num_output / (matmul_s + kv_s),
                          of_limit=ours["output_tok_s"] * (matmul_s + kv_s) / num_output)
            if run.trace is not None and run.trace.records:
                records = run.trace.records
                result.update(steps=len(records), mean_batch_seqs=sum(len(r.scheduled) for r in records) / len(records),
                              num_preemptions=sum(len(r.preempted) for r in records), **step_breakdown(run),
                              step_timeline=[[r.num_batched_tokens, len(r.scheduled), int(r.has_prefill),
                                              round(run.step_seconds(r) * 1e3, 3)] for r in records],
                              step_timeline_fields=["tokens", "seqs", "has_prefill", "ms"])
            if workload == "tput-prefill":
                prefill = prefill_figures(run, engine, peak_flops, measured_flops)
                ours["prefill_mfu"] = prefill["prefill_mfu"]
                result.update(prefill, peak_source=peak_source)
            if workload in peers:
                peer = peers[workload]
                result["peer"] = peer
                result["ratios"] = bench_common.peer_ratios(ours, peer, ("output_tok_s", "total_tok_s", "req_s"))
                result["ratio"] = result["ratios"].get("output_tok_s")
            path = bench_common.write_results(result, args.output_json, args.results_dir)
            rows = [dict(name="pagedjax", batch=max_num_seqs, num_requests=n, **ours)]
            if workload in peers:
                rows.append({**peers[workload], "name": "hf generate", "batch": peers[workload].get("batch_size")})
            bench_common.print_table(
                rows, ["name", "num_requests", "batch", "output_tok_s", "total_tok_s", "req_s", "prefill_mfu", "error"],
                title=f"{workload} on {result['device']}: {n} x {input_len} in / {output_len} out"
                      f"{f' (+-{args.range_ratio:.0%})' if args.range_ratio else ''} "
                      f"({run.seconds:.1f} s, {run.compile_s:.1f} s of compilation excluded)")
            print(f"wrote {path}", flush=True)
            results.append(result)
    finally:
        llm.shutdown()
    return results


if __name__ == "__main__":
    main()
