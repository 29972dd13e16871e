"""Bucket padding and compile count of the PROTOCOL workloads, from the real scheduler (no model).

The runner pads every step to power-of-two buckets of tokens T, sequences S and
block-table width B (``engine.runner.bucket``), so a step computes padding rows and every
new (T, S, B) compiles the step once more. Both depend only on what the scheduler
schedules, which is pure Python: this drives the engine's own ``Scheduler`` and
``BlockManager`` through a workload (every sampled token accepted, requests finished
at their output length, as with ``ignore_eos``) and reports, per workload, the share of
computed token rows that are padding, the share of sequence slots that are padding, and
the distinct step shapes. Engine limits default to the GPU defaults; the KV pool to the
blocks the engine sized for llama-3.1-8b bf16 on an H200 (``benchmarks/results/kv-capacity-*``).

    python scripts/bench_padding.py                      # all workloads, writes bucket-padding-*.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402

H200_8B_BLOCKS = 40656  # KV blocks of llama-3.1-8b bf16 at gpu_memory_utilization 0.9 on an H200 (measured)


def simulate(num_requests: int, input_len: int, output_len: int, *, max_num_seqs: int, max_num_batched_tokens: int,
             num_blocks: int, block_size: int,
             admission_reserve_tokens: int = bench_common.DEFAULT_ADMISSION_RESERVE_TOKENS) -> dict:
    from engine.block_manager import BlockManager
    from engine.request import Request, RequestStatus
    from engine.runner import MIN_BLOCK_BUCKET, bucket, seq_bucket, token_bucket
    from engine.scheduler import Scheduler

    max_model_len = input_len + output_len
    max_blocks = -(-max_model_len // block_size)
    manager = BlockManager(num_blocks, block_size)
    scheduler = Scheduler(manager, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                          max_model_len=max_model_len, admission_reserve_tokens=admission_reserve_tokens)
    for i in range(num_requests):
        scheduler.add_request(Request(request_id=str(i), prompt_token_ids=[1] * input_len,
                                      max_output_tokens=output_len))
    tokens = padded_tokens = seqs = padded_seqs = steps = preemptions = 0
    shapes: dict[tuple, int] = {}
    while scheduler.has_unfinished_requests():
        out = scheduler.schedule()
        if out.is_empty:
            raise RuntimeError("the scheduler made no progress")
        T = out.num_batched_tokens
        S = out.num_seqs
        width = max(len(manager.block_table(s.request_id)) for s in out.scheduled)
        shape = (token_bucket(T, max_num_batched_tokens, max_num_seqs),
                 seq_bucket(T, max_num_batched_tokens, max_num_seqs), bucket(width, MIN_BLOCK_BUCKET, max_blocks))
        shapes[shape] = shapes.get(shape, 0) + 1
        tokens, padded_tokens = tokens + T, padded_tokens + shape[0]
        seqs, padded_seqs = seqs + S, padded_seqs + shape[1]
        steps += 1
        preemptions += len(out.preempted_request_ids)
        sampled = {s.request_id: 1 for s in out.scheduled if s.samples}
        scheduler.update_after_step(out, sampled)
        for s in out.scheduled:
            request = s.request
            if s.samples and not request.is_finished and len(request.output_token_ids) >= output_len:
                scheduler.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
    # Token rows computed again after preemptions: all of them beyond each request's prompt and outputs but its last.
    recomputed = tokens - num_requests * (input_len + output_len - 1)
    return dict(steps=steps, preemptions=preemptions, recomputed_tokens=recomputed, token_rows=tokens,
                padded_token_rows=padded_tokens,
                token_padding=1 - tokens / padded_tokens, seq_slots=seqs, padded_seq_slots=padded_seqs,
                seq_padding=1 - seqs / padded_seqs, distinct_step_shapes=len(shapes),
                shapes=[dict(T=t, S=s, B=b, steps=n) for (t, s, b), n in sorted(shapes.items())])


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="latency,tput-short,tput-long,tput-prefill")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--num-blocks", type=int, default=H200_8B_BLOCKS)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--admission-reserve-tokens", type=int, default=bench_common.DEFAULT_ADMISSION_RESERVE_TOKENS,
                        help="growth room admission keeps free for each running request (the engine's default)")
    parser.add_argument("--results-dir", default=bench_common.RESULTS_DIR)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(argv)
    results = []
    for workload in args.workload.split(","):
        n, i, o = bench_common.WORKLOADS[workload]
        start = time.perf_counter()
        max_seqs = 1 if workload == "latency" else args.max_num_seqs  # bench_latency runs one sequence
        figures = simulate(n, i, o, max_num_seqs=max_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                           num_blocks=args.num_blocks, block_size=args.block_size,
                           admission_reserve_tokens=args.admission_reserve_tokens)
        result = dict(workload="bucket-padding", protocol_workload=workload, commit=bench_common.git_commit(),
                      command=" ".join(["python"] + sys.argv), num_requests=n, input_len=i, output_len=o,
                      max_num_seqs=max_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                      num_blocks=args.num_blocks, block_size=args.block_size,
                      admission_reserve_tokens=args.admission_reserve_tokens,
                      simulated_s=time.perf_counter() - start, **figures)
        results.append(result)
    first = results[0]
    path = args.output_json or os.path.join(args.results_dir, f"bucket-padding-{first['commit'][:7]}.json")
    bench_common.write_results(results, path)
    bench_common.print_table(results, ["protocol_workload", "steps", "preemptions", "recomputed_tokens",
                                       "token_padding", "seq_padding", "distinct_step_shapes"],
                             title="bucket padding (scheduler simulation)")
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
