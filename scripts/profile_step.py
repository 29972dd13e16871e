"""Where the device time goes: a per-kernel profile of engine steps, and the GPU's idle share of a run.

Two measurements from JAX's own profiler (``jax.profiler.trace`` with a Perfetto trace,
read back as JSON; no TensorBoard needed):

- ``--step decode|prefill``: the engine's jitted step (its runner: unrolled layers, fused
  projections, per-layer KV) on a synthetic batch, e.g. 256 decodes at context 192, run
  ``--repeats`` times under the profiler; device kernels summed by name and by kind
  (matmul, attention, other), per step.
- ``--run``: a decode-heavy offline run through ``LLM.generate`` (its step shapes compiled
  by a first, untraced run); the GPU's busy time (the union of kernel intervals) over the
  span from the first kernel to the last: issue 9's "GPU idle < 5%". ``--host-events``
  also traces the host's threads (off by default: it slows the loop being measured) and lists
  their events by name, per decode step: where the host's time per step goes when it binds.

    python scripts/profile_step.py --step decode --batch 256 --ctx 192 --out /tmp/p.json
    python scripts/profile_step.py --case decode:256:1500 --case prefill:16:1000   # several steps, one engine
    python scripts/profile_step.py --run --batch 256 --input-len 32 --output-len 128
    python scripts/profile_step.py --model <tiny> --load-format dummy --step decode --batch 4   # CPU smoke
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402

# (The engine's one Mosaic GPU kernel is the Hopper prefill attention, named "entry_mosaic_gpu_kernel" in traces.)
KINDS = (("matmul", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|matmul|dot|gemv|wgmma", re.I)),
         ("attention", re.compile(r"ragged|paged|attention|flash|mha|mosaic_gpu", re.I)))


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def read_trace(log_dir: str) -> dict:
    paths = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True) + \
        glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no Perfetto/Chrome trace under {log_dir}: {os.listdir(log_dir)}")
    with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
        return json.load(f)


def gpu_processes(events: list[dict]) -> set:
    """The pids of the trace's device processes (``/device:GPU:*``)."""
    return {e["pid"] for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name" and "GPU" in e["args"]["name"]}


def device_events(trace: dict) -> tuple[list[dict], dict]:
    """Complete events on a device's kernel lines (``/device:GPU:*`` processes, their stream
    threads; on CPU, for the smoke run, the executable's thread), and the lines they came from."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[(e["pid"], e["tid"])] = e["args"]["name"]
    gpu_pids = gpu_processes(events)
    def line(e) -> str:
        return thread.get((e["pid"], e.get("tid")), "")
    if gpu_pids:  # kernels sit on "Stream #N(Compute,...)" lines; "XLA Ops" repeats them under HLO names
        def compute_stream(e) -> bool:
            name = line(e)
            return name.startswith("Stream") and ("Compute" in name or "(" not in name)
        streams = any(compute_stream(e) for e in events if e.get("pid") in gpu_pids and e.get("ph") == "X")
        def on_kernel_line(e) -> bool:
            return e["pid"] in gpu_pids and (compute_stream(e) if streams else "XLA Ops" in line(e))
    else:  # CPU smoke: the executable's own thread
        def on_kernel_line(e) -> bool:
            return "XLAPjRtCpuClient" in line(e) and not e["name"].startswith(("ThreadpoolListener", "end:", "Thunk"))
    kernels = [e for e in events if e.get("ph") == "X" and "dur" in e and on_kernel_line(e)]
    seen = kernels or [e for e in events if e.get("ph") == "X"]  # nothing matched: say what the trace holds
    lines = collections.Counter(f"{process.get(e['pid'], e['pid'])} / {line(e)}" for e in seen)
    return kernels, dict(lines.most_common(40))


def busy_intervals(kernels: list[dict]) -> list[tuple[float, float]]:
    """The union of the kernels' [ts, ts + dur) intervals (streams may overlap), in order."""
    merged: list[list[float]] = []
    for start, stop in sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [(a, b) for a, b in merged]


def busy_us(kernels: list[dict]) -> float:
    return sum(b - a for a, b in busy_intervals(kernels))


def idle_gaps(kernels: list[dict], top: int = 10) -> dict:
    """Where the device waited: gaps between the busy intervals, by size, and the largest ones
    (µs from the first kernel), so an idle share can be traced to its steps."""
    busy = busy_intervals(kernels)
    gaps = [(b[0] - a[1], a[1] - busy[0][0]) for a, b in zip(busy, busy[1:])]
    bins = {"under_10us": (0, 10), "10_100us": (10, 100), "100us_1ms": (100, 1000), "over_1ms": (1000, float("inf"))}
    return {"count": len(gaps),
            "total_us_by_size": {name: sum(g for g, _ in gaps if lo <= g < hi) for name, (lo, hi) in bins.items()},
            "largest": [dict(us=g, at_us=at) for g, at in sorted(gaps, reverse=True)[:top]]}


def summarize(kernels: list[dict], steps: int, top: int = 25) -> dict:
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_name[e["name"]][0] += float(e["dur"])
        by_name[e["name"]][1] += 1
    by_kind = collections.Counter()
    for name, (us, _) in by_name.items():
        by_kind[kind_of(name)] += us / steps
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])
    return {"per_step_us": sum(v[0] for v in by_name.values()) / steps,
            "per_step_us_by_kind": dict(by_kind),
            "top": [dict(name=name[:160], kind=kind_of(name), per_step_us=us / steps, calls_per_step=n / steps)
                    for name, (us, n) in rows[:top]]}


def host_events(trace: dict, per: int, top: int = 25) -> list[dict]:
    """Complete events off the device lines (the host's threads: JAX's dispatch, PjRt's execute, XLA's thunks,
    CUDA API calls), summed by name and divided by ``per`` (the steps); nested events each count."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = gpu_processes(events)
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") == "X" and "dur" in e and e.get("pid") not in gpu_pids:
            by_name[e["name"]][0] += float(e["dur"])
            by_name[e["name"]][1] += 1
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return [dict(name=name[:160], us_per_step=us / per, calls_per_step=n / per) for name, (us, n) in rows]


def profiled(fn, log_dir: str, *, host: bool = False) -> float:
    import jax

    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # the Python tracer alone wrote a million events for a 64-step run
    if jax.default_backend() == "gpu" and not host:  # host events slow the host loop being measured; kernels stay
        options.host_tracer_level = 0
    start = time.perf_counter()
    with jax.profiler.trace(log_dir, create_perfetto_trace=True, profiler_options=options):
        fn()
    return time.perf_counter() - start


def profile_step(llm, args, step: str, batch: int, ctx: int) -> dict:
    """The runner's step on ``batch`` decodes at context ``ctx`` (or prompt chunks of ``ctx`` tokens)."""
    from engine import SamplingParams
    from engine.runner import SequenceWork
    from engine.sampler import build_sampling_metadata

    runner = llm.llm_engine.runner
    bs = runner.block_size
    blocks = -(-(ctx + 1) // bs)
    pool = llm.llm_engine.block_manager.num_blocks
    if 1 + batch * blocks > pool:
        raise SystemExit(f"{batch} x {blocks} blocks do not fit the pool of {pool}")
    def table(i):
        return list(range(1 + i * blocks, 1 + (i + 1) * blocks))
    def slot(i):  # --num-loras: the rows spread over the adapter slots (zeroed: the same work as filled ones)
        return 1 + i % args.num_loras if args.num_loras else 0
    if step == "decode":
        work = [SequenceWork(token_ids=[7], start=ctx, block_table=table(i), sample=True, lora_slot=slot(i))
                for i in range(batch)]
    else:
        work = [SequenceWork(token_ids=[7] * ctx, start=0, block_table=table(i), sample=True,
                             lora_slot=slot(i)) for i in range(batch)]
    n = len(work)
    sampling = build_sampling_metadata([SamplingParams(temperature=0.0)] * n, [[]] * n, [[0]] * n, [0] * n, [0] * n,
                                       runner.padded_num_seqs(sum(len(w.token_ids) for w in work)))
    def run(repeats):
        for _ in range(repeats):
            runner.fetch(runner.dispatch(work, sampling))
    run(2)  # compile, warm up
    start = time.perf_counter()
    run(args.repeats)
    wall_ms = (time.perf_counter() - start) / args.repeats * 1e3
    with tempfile.TemporaryDirectory() as log_dir:
        profiled(lambda: run(args.repeats), log_dir)
        kernels, lines = device_events(read_trace(log_dir))
    model_input = runner.build_model_input(work)
    result = dict(step=step, batch=batch, ctx=ctx, T=int(model_input.token_ids.shape[0]),
                  S=int(model_input.kv_lens.shape[0]), wall_ms_per_step=wall_ms, kernel_lines=lines,
                  **summarize(kernels, args.repeats))
    return result


def profile_run(llm, args) -> dict:
    """GPU busy share of a decode-heavy offline run (compiled first by an identical untraced run)."""
    from engine import SamplingParams

    prompts = bench_common.random_prompts(args.batch, args.input_len, bench_common.read_vocab_size(args.model))
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(inputs, params, use_tqdm=False)  # compiles every step shape of the run
    llm.reset_prefix_cache()  # the profiled run computes its prompts again
    with tempfile.TemporaryDirectory() as log_dir:
        wall_s = profiled(lambda: llm.generate(inputs, params, use_tqdm=False), log_dir, host=args.host_events)
        trace = read_trace(log_dir)
        kernels, lines = device_events(trace)
    host = host_events(trace, per=args.output_len) if args.host_events else None
    if not kernels:
        raise SystemExit(f"no device kernels in the trace (lines: {lines})")
    first = min(float(e["ts"]) for e in kernels)
    last = max(float(e["ts"]) + float(e["dur"]) for e in kernels)
    busy = busy_us(kernels)
    return dict(run="decode-heavy", batch=args.batch, input_len=args.input_len, output_len=args.output_len,
                wall_s=wall_s, kernel_span_s=(last - first) / 1e6, busy_s=busy / 1e6,
                gpu_idle_fraction=1.0 - busy / (last - first), idle_gaps=idle_gaps(kernels), kernel_lines=lines,
                async_scheduling=llm.llm_engine.async_scheduling, host_events_per_step=host)


def parse_case(text: str) -> tuple[str, int, int]:
    """``--case decode:256:1500`` -> ("decode", 256, 1500)."""
    try:
        step, batch, ctx = text.split(":")
        if step not in ("decode", "prefill"):
            raise ValueError
        return step, int(batch), int(ctx)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected decode|prefill:BATCH:CTX, got {text!r}") from None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_common.add_engine_flags(parser)
    parser.add_argument("--step", choices=("decode", "prefill"), default=None)
    parser.add_argument("--case", action="append", default=[], type=parse_case, metavar="STEP:BATCH:CTX",
                        help="profile this step (as --step, --batch, --ctx) in the same engine (repeatable; "
                             "e.g. decode:256:1500 decode:1024:192 prefill:16:1000)")
    parser.add_argument("--run", action="store_true", help="GPU idle share of a decode-heavy LLM.generate run")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--ctx", type=int, default=192, help="decode: context length; prefill: chunk length")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--host-events", action="store_true",
                        help="--run: trace the host's threads too and list their events per decode step")
    parser.add_argument("--gc-unfreeze", action="store_true",
                        help="undo the engine's gc.freeze() after start-up (to measure what the freeze does)")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    if not (args.step or args.case or args.run):
        parser.error("give --step decode|prefill, --case and/or --run")
    cases = args.case + ([(args.step, args.batch, args.ctx)] if args.step else [])
    max_len = max([ctx + 1 for _, _, ctx in cases] + [args.input_len + args.output_len])
    llm = bench_common.make_llm(args, max_model_len=max_len,
                                max_num_seqs=args.max_num_seqs or max(b for _, b, _ in cases or [(0, args.batch, 0)]))
    if args.gc_unfreeze:
        import gc

        gc.unfreeze()
    result = bench_common.engine_result_header("profile", args)  # the variant profiled: quantization, KV dtype, ...
    for kind, batch, ctx in cases:
        step = profile_step(llm, args, kind, batch, ctx)
        result.setdefault("step_profiles", []).append(step)
        result.setdefault("step_profile", step)  # the first, where older readers look
        print(f"{kind} step of {batch} x {ctx}: T={step['T']} S={step['S']}: wall {step['wall_ms_per_step']:.2f} ms, "
              f"kernels {step['per_step_us'] / 1e3:.2f} ms: " +
              ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in step["per_step_us_by_kind"].items()), flush=True)
        for row in step["top"]:
            print(f"  {row['per_step_us']:9.1f} us  x{row['calls_per_step']:5.1f}  {row['kind']:9s} {row['name'][:110]}")
    if args.run:
        result["run_profile"] = run = profile_run(llm, args)
        print(f"decode-heavy run ({args.batch} x {args.input_len}/{args.output_len}): wall {run['wall_s']:.2f} s, "
              f"kernels span {run['kernel_span_s']:.2f} s, busy {run['busy_s']:.2f} s, "
              f"GPU idle {100 * run['gpu_idle_fraction']:.1f}%", flush=True)
        gaps = run["idle_gaps"]
        print(f"  {gaps['count']} gaps, us by size: " +
              ", ".join(f"{k} {v:.0f}" for k, v in gaps["total_us_by_size"].items()) + "; largest (us at us): " +
              ", ".join(f"{g['us']:.0f}@{g['at_us']:.0f}" for g in gaps["largest"]), flush=True)
        for row in run["host_events_per_step"] or []:
            print(f"  host {row['us_per_step']:9.1f} us  x{row['calls_per_step']:6.1f}  {row['name'][:110]}")
    if args.out:
        bench_common.write_results(result, args.out)
    return result


if __name__ == "__main__":
    main()
