"""Which of a step's device buffers move from one step to the next.

XLA records a step's kernels into CUDA graphs and re-records a graph whenever a buffer it touches sits at a new
address (benchmarks/NOTES.md, runs 20a-c). This runs one request through the engine at batch 1 (``latency``'s
shape) and prints, for each step shape, how many distinct addresses each buffer the model step touches had over
the steps of that shape (its first step left out): 1 means it stayed put.

    python scripts/probe_step_buffers.py --quantization int8 --out /tmp/buffers.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import bench_common  # noqa: E402


def step_buffers(runner, model_input, feed, logits) -> dict:
    """Name -> device address of what a model step read and wrote (after it was dispatched)."""
    buffers = {f"input.{field.name}": getattr(model_input, field.name) for field in dataclasses.fields(model_input)
               if getattr(model_input, field.name) is not None}  # (lora_slots: only with LoRA)
    buffers.update({"input.feed_index": feed, "logits": logits, "kv_cache.k[0]": jax.tree.leaves(runner.kv_cache)[0]})
    return {name: array.unsafe_buffer_pointer() for name, array in buffers.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_common.add_engine_flags(parser)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--out", default=None, help="JSON file for the counts")
    args = parser.parse_args(argv)

    from engine import SamplingParams

    llm = bench_common.make_llm(args, max_model_len=args.input_len + args.output_len, max_num_seqs=1)
    runner = llm.llm_engine.runner
    run_step = runner._run_step
    seen = {}  # step shape -> buffer name -> addresses, one per step

    def recording_run_step(num_tokens, model_input, feed):
        sampled = runner._sampled.unsafe_buffer_pointer()
        logits = run_step(num_tokens, model_input, feed)
        addresses = {"last_sampled": sampled, **step_buffers(runner, model_input, feed, logits)}
        for name, address in addresses.items():
            seen.setdefault(f"T={num_tokens}", {}).setdefault(name, []).append(address)
        return logits

    runner._run_step = recording_run_step
    prompt = np.random.default_rng(args.seed).integers(3, llm.llm_engine.model_config.vocab_size, args.input_len)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([{"prompt_token_ids": prompt.tolist()}], params, use_tqdm=False)
    llm.shutdown()
    counts = {shape: {name: len(set(addresses[1:])) for name, addresses in buffers.items()}
              for shape, buffers in seen.items()}
    steps = {shape: len(next(iter(buffers.values()))) for shape, buffers in seen.items()}
    for shape, buffers in counts.items():
        moved = {name: n for name, n in buffers.items() if n > 1}
        print(f"{shape}: {steps[shape]} steps; buffers that moved after the first: {moved or 'none'}")
    result = {"steps": steps, "distinct_addresses_after_the_first_step": counts}
    if args.out:
        bench_common.write_results(result, args.out)
    return result


if __name__ == "__main__":
    main()
