"""Continuous batching against static batching, and paged KV against contiguous reservations.

Runs the same requests (random prompts, output lengths drawn uniformly from
``--min-output-len .. --max-output-len`` with a fixed seed, greedy, ``ignore_eos``)
through ``LLM`` once with ``scheduling_mode="continuous"`` and once with
``"static"`` (a batch of ``max_num_seqs`` is admitted together and nothing else is
admitted until all of it finished), in one process, with the same KV pool. Reports
the output tok/s of each (compilation excluded) and their ratio, checks that both
produced the same tokens, and from the per-step traces:

- KV waste: allocated but unwritten slots over allocated slots, averaged over the
  steps, for the paged pool as run, and for a contiguous allocator holding the same
  sequences that reserves prompt + max_tokens per request, or max_model_len;
- the most sequences each allocator fits in the same pool: paged = pool slots /
  mean slots a running sequence held; contiguous = pool slots / reservation.

    python scripts/bench_static_vs_continuous.py                      # embedded default model, CPU
    python scripts/bench_static_vs_continuous.py --model /tmp/tiny --load-format dummy --num-requests 6 \\
        --max-output-len 12                                            # smoke

Writes ``benchmarks/results/static-vs-continuous-<device>-<date>.json`` and the two
traces next to it (``.<mode>.trace.json.gz``) for ``scripts/visualize.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402

WORKLOAD = "static-vs-continuous"
MODES = ("continuous", "static")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_common.add_engine_flags(parser, default_model=None, default_load_format="auto")
    parser.add_argument("--workload", default=WORKLOAD, choices=(WORKLOAD,))
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--min-output-len", type=int, default=16)
    parser.add_argument("--max-output-len", type=int, default=512)
    # Synchronous steps by default: the KV accounting (waste, sequences that fit) then counts exactly
    # what each request computes; an asynchronous step runs a finishing request one dropped token
    # further (runs 11-12 were synchronous too, being traced).
    parser.set_defaults(max_num_seqs=8, async_scheduling="off")
    args = parser.parse_args(argv)
    if not 1 <= args.min_output_len <= args.max_output_len:
        parser.error(f"need 1 <= --min-output-len <= --max-output-len, got {args.min_output_len}, "
                     f"{args.max_output_len}")
    return args


def output_lengths(num_requests: int, low: int, high: int, seed: int) -> list[int]:
    import numpy as np

    return np.random.default_rng(seed + 1).integers(low, high + 1, size=num_requests).tolist()


def kv_summary(trace, pool_slots: int) -> dict:
    """Waste of the paged pool and of contiguous allocators over a run's steps (see module doc)."""
    rows = [r for r in trace.kv_waste() if r["num_seqs"]]

    def mean_waste(allocated_key: str) -> float:
        return statistics.fmean(1 - r["written"] / r[allocated_key] for r in rows)

    per_seq = [len(s.block_table) * trace.block_size - s.num_tokens for rec in trace.records for s in rec.sequences]
    mean_held = statistics.fmean(r["paged_allocated"] / r["num_seqs"] for r in rows)
    reserved = {s.request_id: s.reserved_tokens for rec in trace.records for s in rec.sequences}
    return dict(
        waste=dict(paged=mean_waste("paged_allocated"),
                   contiguous_reserved=mean_waste("contiguous_reserved_allocated"),
                   contiguous_max_model_len=mean_waste("contiguous_max_model_len_allocated")),
        max_wasted_slots_per_seq=max(per_seq, default=0), block_size=trace.block_size,
        max_concurrent_seqs=dict(
            pool_slots=pool_slots,
            paged=pool_slots / mean_held,
            contiguous_reserved=pool_slots // statistics.fmean(reserved.values()),
            contiguous_max_model_len=pool_slots // trace.max_model_len,
            observed_peak=max(r["num_seqs"] for r in rows),
        ),
        mean_slots_held_per_seq=mean_held,
    )


def run_mode(args, mode: str, prompts, lengths, max_model_len: int) -> tuple[dict, list, object]:
    from engine import SamplingParams

    llm = bench_common.make_llm(args, max_model_len=max_model_len, scheduling_mode=mode, trace=True)
    try:
        engine = llm.llm_engine
        batch = engine.scheduler.max_num_seqs
        warmup = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        bench_common.run_offline(llm, prompts[:batch], warmup)  # compiles the prefill and small decode shapes
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
        run = bench_common.run_offline(llm, prompts, params)
        records = run.trace.records
        figures = dict(
            output_tok_s=sum(lengths) / run.seconds, seconds=run.seconds, wall_s=run.wall_s,
            compile_s_excluded=run.compile_s, steps=len(records), max_num_seqs=batch,
            mean_batch_seqs=statistics.fmean(len(r.scheduled) for r in records),
            num_preemptions=sum(len(r.preempted) for r in records),
            **kv_summary(run.trace, engine.block_manager.num_usable_blocks * engine.block_manager.block_size),
        )
        return figures, [o.outputs[0].token_ids for o in run.outputs], run.trace
    finally:
        llm.shutdown()


def main(argv=None) -> dict:
    args = parse_args(argv)
    vocab = bench_common.read_vocab_size(args.model)
    prompts = bench_common.random_prompts(args.num_requests, args.input_len, vocab, args.seed)
    lengths = output_lengths(args.num_requests, args.min_output_len, args.max_output_len, args.seed)
    max_model_len = args.input_len + args.max_output_len
    result = bench_common.result_header(WORKLOAD, args.model, args.dtype)
    result.update(num_requests=args.num_requests, input_len=args.input_len, output_len_range=[
        args.min_output_len, args.max_output_len], total_output_tokens=sum(lengths), max_model_len=max_model_len)
    path = args.output_json or bench_common.result_path(WORKLOAD, result["device"], result["date"],
                                                                 args.results_dir)
    tokens, result["traces"] = {}, {}
    for mode in MODES:
        result[mode], tokens[mode], trace = run_mode(args, mode, prompts, lengths, max_model_len)
        trace_path = f"{os.path.splitext(path)[0]}.{mode}.trace.json.gz"
        os.makedirs(os.path.dirname(os.path.abspath(trace_path)), exist_ok=True)
        trace.save(trace_path)
        result["traces"][mode] = os.path.basename(trace_path)  # next to the result file
    result["ratio"] = result["continuous"]["output_tok_s"] / result["static"]["output_tok_s"]
    result["step_ratio"] = result["static"]["steps"] / result["continuous"]["steps"]  # steps static needs per continuous step
    result["same_tokens"] = tokens["continuous"] == tokens["static"]
    result["notes"] = ("ratio: continuous over static output tok/s, same requests, same KV pool, compilation "
                       "excluded; step_ratio: static steps over continuous steps. waste: mean over steps of (allocated - written) / allocated slots; contiguous "
                       "allocators hold the same running sequences. max_concurrent_seqs: pool slots over the mean "
                       "slots a running sequence held (paged) or over the reservation (contiguous); observed_peak is "
                       "capped by max_num_seqs.")
    bench_common.write_results(result, path)
    rows = [dict(mode=m, output_tok_s=result[m]["output_tok_s"], steps=result[m]["steps"],
                 mean_batch=result[m]["mean_batch_seqs"], paged_waste=result[m]["waste"]["paged"],
                 contig_reserved_waste=result[m]["waste"]["contiguous_reserved"],
                 contig_max_len_waste=result[m]["waste"]["contiguous_max_model_len"]) for m in MODES]
    bench_common.print_table(rows, list(rows[0]), title=(
        f"{WORKLOAD} on {result['device']} ({result['model']}): {args.num_requests} requests, {args.input_len} in / "
        f"{args.min_output_len}..{args.max_output_len} out, max_num_seqs {result['continuous']['max_num_seqs']}"))
    seqs = result["continuous"]["max_concurrent_seqs"]
    print(f"continuous / static: {result['ratio']:.2f}x; same tokens: {result['same_tokens']}; sequences that fit "
          f"in {seqs['pool_slots']} slots: paged {seqs['paged']:.0f}, contiguous (prompt + max_tokens) "
          f"{seqs['contiguous_reserved']:.0f}, contiguous (max_model_len) {seqs['contiguous_max_model_len']}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
