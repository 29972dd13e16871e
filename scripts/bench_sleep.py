"""Sleep mode (``LLM.sleep()`` / ``LLM.wake_up()``, vLLM's level 1) timed: what an RL loop that lends the GPU to a
trainer between rollouts waits for.

Loads the engine, runs one greedy request, then ``--cycles`` times: sleep (timed; the device memory the CUDA driver
reports free before and after), wake up (timed, until the weights and the pool are on the device), and the same
request again, whose tokens must equal the first run's and whose time to first token shows whether anything
compiled again.

    python scripts/bench_sleep.py                                     # GPU: llama-3.1-8b shape, dummy bf16
    python scripts/bench_sleep.py --model /tmp/tiny --input-len 16 --output-len 8   # CPU smoke

Writes ``benchmarks/results/sleep-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402

WORKLOAD = "sleep"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_common.add_engine_flags(parser)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--cycles", type=int, default=3, help="sleep / wake-up cycles (medians reported)")
    return parser.parse_args(argv)


def free_gib() -> float | None:
    """GiB the CUDA driver reports free on the first device (None off CUDA)."""
    from engine.device_memory import driver_memory

    reading = driver_memory()
    return None if reading is None else reading[0] / 2**30


def main(argv=None) -> dict:
    from engine import SamplingParams

    args = parse_args(argv)
    result = bench_common.engine_result_header(WORKLOAD, args)
    started = time.perf_counter()
    llm = bench_common.make_llm(args, max_model_len=args.input_len + args.output_len,
                                max_num_seqs=args.max_num_seqs or 1)
    result["ready_s"] = time.perf_counter() - started
    prompt = bench_common.random_prompts(1, args.input_len, bench_common.read_vocab_size(args.model), args.seed)[0]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    def one_request() -> tuple[list[int], float]:
        started = time.perf_counter()
        tokens = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].token_ids
        return list(tokens), time.perf_counter() - started

    expected, _ = one_request()
    _, result["request_s_before"] = one_request()
    cycles = []
    for _ in range(args.cycles):
        awake_free = free_gib()
        t0 = time.perf_counter()
        llm.sleep()
        slept = time.perf_counter()
        asleep_free = free_gib()
        llm.wake_up()
        woke = time.perf_counter()
        tokens, request_s = one_request()
        cycles.append(dict(sleep_s=slept - t0, wake_s=woke - slept, request_s_after=request_s,
                           same_tokens=tokens == expected, free_gib_awake=awake_free, free_gib_asleep=asleep_free))
        print(f"sleep {cycles[-1]['sleep_s']:.2f} s, wake {cycles[-1]['wake_s']:.2f} s, request after "
              f"{request_s:.3f} s (before {result['request_s_before']:.3f}), same tokens {tokens == expected}, "
              f"free GiB awake {awake_free} -> asleep {asleep_free}", flush=True)
    engine = llm.llm_engine
    weights, _ = bench_common.weight_bytes(engine.runner.params, engine.model_config)
    result.update(cycles=cycles, weight_gib=weights / 2**30, num_kv_blocks=engine.runner.num_kv_blocks,
                  sleep_s=statistics.median_high(c["sleep_s"] for c in cycles),
                  wake_s=statistics.median_high(c["wake_s"] for c in cycles),
                  same_tokens=all(c["same_tokens"] for c in cycles))
    result["wake_gb_s"] = weights / 1e9 / result["wake_s"]
    print(f"{WORKLOAD}: weights {result['weight_gib']:.1f} GiB; median sleep {result['sleep_s']:.2f} s, wake "
          f"{result['wake_s']:.2f} s ({result['wake_gb_s']:.1f} GB/s of weights); same tokens {result['same_tokens']}")
    print("wrote", bench_common.write_results(result, args.output_json, args.results_dir))
    llm.shutdown()
    return result


if __name__ == "__main__":
    main()
