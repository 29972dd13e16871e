"""PROTOCOL workload ``latency``: one request at a time (128 tokens in, 256 out) through ``LLM``.

Reports time to first token (submit to the first token's arrival on the host), time
per output token (median interval between token arrivals, through the engine's
per-request output callback as a streaming client sees them), output tok/s (output tokens over the request's wall
time) and the roofline TPOT: the bytes of weights a decode step must read over the
device's read bandwidth measured in the same run (a sum over a large buffer; the
copy rate, read + write counted, is recorded too). ``--peer hf`` also times Hugging Face
``generate()`` on the same device with random weights of the same config.

    python scripts/bench_latency.py --peer hf                        # GPU: llama-3.1-8b shape, bf16
    python scripts/bench_latency.py --model /tmp/tiny --input-len 16 --output-len 8   # CPU smoke

Writes ``benchmarks/results/latency-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402

WORKLOAD = "latency"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_common.add_engine_flags(parser)
    _, input_len, output_len = bench_common.WORKLOADS[WORKLOAD]
    parser.add_argument("--workload", default=WORKLOAD, choices=(WORKLOAD,))
    parser.add_argument("--input-len", type=int, default=input_len)
    parser.add_argument("--output-len", type=int, default=output_len)
    parser.add_argument("--num-requests", type=int, default=3,
                        help="timed requests, one after another after a warm-up one (medians reported)")
    parser.add_argument("--bandwidth-mib", type=int, default=None,
                        help="buffer for the bandwidth measurement (default 2048 on GPU, 64 on CPU)")
    parser.add_argument("--peer", choices=("none", "hf"), default="none")
    args = parser.parse_args(argv)
    if args.output_len < 2:
        parser.error("--output-len must be >= 2 (TPOT needs a decode step)")
    return args


def time_one_request(llm, prompt: list[int], output_len: int, lora=None) -> dict:
    """TTFT, token-to-token intervals and wall time of one request, from the times its tokens
    reach the host (the engine's per-request output callback, as a streaming client sees them).
    Tokens that arrive together (a multi-step decode's) share the interval since the last arrival:
    each token's interval is that divided by their number (one token an arrival: the plain interval).
    ``lora``: the request's LoRA adapter (``bench_common.lora_requests``)."""
    from engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    token_times: list[float] = []
    intervals: list[float] = []  # ms, one a token after the first
    errors: list[BaseException] = []
    done = threading.Event()

    def on_output(output) -> None:
        now = time.perf_counter()
        new = len(output.outputs[0].token_ids) - len(token_times)
        if new > 0:
            intervals.extend([(now - token_times[-1]) * 1e3 / new] * new if token_times else [])
            token_times.extend([now] * new)
        if output.finished:
            done.set()

    def on_error(exc: BaseException) -> None:
        errors.append(exc)
        done.set()

    with bench_common.CompileTimer() as compiles:
        submit = time.perf_counter()
        llm.submit(list(prompt), params, on_output=on_output, on_error=on_error, lora_request=lora)  # each token
        done.wait()
    if errors:
        raise errors[0]
    if len(token_times) != output_len:
        raise RuntimeError(f"{len(token_times)} tokens arrived, expected {output_len}")
    return dict(ttft_ms=(token_times[0] - submit) * 1e3, itl_ms=intervals, e2e_ms=(token_times[-1] - submit) * 1e3,
                compile_s=compiles.seconds)


def host_split(before: dict, after: dict) -> dict:
    """Per engine step of the timed requests (``LLMEngine.stats``): ms of the host's own work, of which putting the
    step on the device, and ms waiting for a step's tokens. Waiting on every step: the device binds; a host
    step as long as TPOT with no wait: the host does."""
    steps = max(1, after["steps"] - before["steps"])
    return {f"{name}_ms_per_step": 1e3 * (after[f"{name}_s"] - before[f"{name}_s"]) / steps
            for name in ("host", "dispatch", "wait", "dispatch_inputs", "dispatch_model", "dispatch_sampler")} | {
                "steps": steps, "multi_steps": after["multi_steps"] - before["multi_steps"]} | {
                name: after[name] - before[name] for name in (  # speculative decoding's drafts
                    "spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")}


def main(argv=None) -> dict:
    args = parse_args(argv)
    vocab = bench_common.read_vocab_size(args.model)
    peer = None
    if args.peer == "hf":  # before JAX takes the device's memory
        sizes = {WORKLOAD: (1, args.input_len, args.output_len, 1)}
        peer = bench_common.run_hf_peer(args.model, [WORKLOAD], dtype=args.dtype, seed=args.seed, sizes=sizes)[WORKLOAD]
    result = bench_common.engine_result_header(WORKLOAD, args)
    on_cpu = result["backend"] == "cpu"
    # PROTOCOL's roofline: the weights a step reads at the read bandwidth measured here (the copy rate, reads and
    # writes counted, is recorded beside it)
    probe_bytes = (args.bandwidth_mib or (64 if on_cpu else 2048)) << 20
    bandwidth = bench_common.measure_read_bandwidth(probe_bytes)
    copy_bandwidth = bench_common.measure_copy_bandwidth(probe_bytes)
    started = time.perf_counter()
    llm = bench_common.make_llm(args, max_model_len=args.input_len + args.output_len,
                                max_num_seqs=args.max_num_seqs or 1)
    ready_s = time.perf_counter() - started
    try:
        engine = llm.llm_engine
        total_bytes, read_bytes = bench_common.weight_bytes(engine.runner.params, engine.model_config)
        prompts = bench_common.random_prompts(args.num_requests + 1, args.input_len, vocab, args.seed)
        lora = (bench_common.lora_requests(args, llm) or [None])[0]
        warmup = time_one_request(llm, prompts[0], args.output_len, lora)  # warm-up: compiles every step shape
        max_concurrent_tokens, async_on = engine.max_concurrent_tokens, engine.async_scheduling
        before = llm.stats()
        runs = [time_one_request(llm, p, args.output_len, lora) for p in prompts[1:]]
        host = host_split(before, llm.stats())
    finally:
        llm.shutdown()
    itl = [x for r in runs for x in r["itl_ms"]]
    e2e_ms = statistics.median(r["e2e_ms"] for r in runs)
    roofline_ms = read_bytes / bandwidth * 1e3
    ours = dict(
        ttft_ms=statistics.median(r["ttft_ms"] for r in runs), tpot_ms=statistics.median(itl),
        output_tok_s=args.output_len / (e2e_ms / 1e3), e2e_ms=e2e_ms, roofline_tpot_ms=roofline_ms,
    )
    result.update(ours)
    result.update(
        input_len=args.input_len, output_len=args.output_len, num_requests=args.num_requests,
        tpot_over_roofline=ours["tpot_ms"] / roofline_ms, decode_tok_s=1e3 / ours["tpot_ms"],
        weight_bytes=total_bytes, weight_bytes_read_per_step=read_bytes, read_bandwidth_tb_s=bandwidth / 1e12,
        copy_bandwidth_tb_s=copy_bandwidth / 1e12,
        max_concurrent_tokens=max_concurrent_tokens, warmup_compile_s=warmup["compile_s"],
        # Start-up (issue 9): LLM(...) until ready, and until the first request's first token (its
        # steps compile then; JAX's persistent compilation cache makes a second run reuse them).
        llm_ready_s=ready_s, startup_to_first_token_s=ready_s + warmup["ttft_ms"] / 1e3,
        async_scheduling_on=async_on,
        itl_p90_ms=statistics.quantiles(itl, n=10)[-1] if len(itl) > 1 else itl[0],
        compile_s_in_timed=sum(r["compile_s"] for r in runs), **host,
        itl_ms_samples=[round(x, 4) for x in runs[-1]["itl_ms"]],
        notes="TTFT: submit to the first token's arrival on the host (the engine's output callback); TPOT: "
              "median interval between the timed requests' token arrivals (tokens that arrive together, a "
              "multi-step decode's, each take an equal share of the interval since the last arrival); roofline: "
              "weight bytes a decode step reads (the embedding table excluded where the model has a head of its "
              "own, KV ignored) over the copy bandwidth measured in this run (read + write counted).",
    )
    if peer is not None:
        result["peer"] = peer
        result["ratios"] = bench_common.peer_ratios(ours, peer, ("ttft_ms", "tpot_ms", "output_tok_s"))
        result["ratio"] = result["ratios"].get("output_tok_s")
    path = bench_common.write_results(result, args.output_json, args.results_dir)
    rows = [dict(name="pagedjax", **ours)]
    if peer is not None:
        rows.append({**peer, "name": "hf generate"})
    bench_common.print_table(rows, ["name", "ttft_ms", "tpot_ms", "output_tok_s", "roofline_tpot_ms", "error"],
                             title=f"{WORKLOAD} on {result['device']}: {args.input_len} in / {args.output_len} out")
    print("engine, per step of the timed requests: host {host_ms_per_step:.2f} ms (dispatch "
          "{dispatch_ms_per_step:.2f}: inputs {dispatch_inputs_ms_per_step:.2f}, "
          "model {dispatch_model_ms_per_step:.2f}, sampler {dispatch_sampler_ms_per_step:.2f}), "
          "waiting for the device {wait_ms_per_step:.2f} ms".format(**result))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
