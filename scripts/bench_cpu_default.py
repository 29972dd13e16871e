"""PROTOCOL workload ``cpu-default``: the embedded default model (SmolLM2-135M-Instruct, its Q4_1 GGUF) through
``LLM`` on the CPU.

A chat prompt, 64 new tokens (end-of-sequence ignored, so every request makes all 64), greedy:

- single stream: one ``LLM.chat`` call at a time; output tok/s = 64 over its wall time;
- 16 concurrent: 16 threads each calling ``LLM.chat`` at once (the engine batches concurrent callers); aggregate
  output tok/s = 16 x 64 over the wall time until the last returns.

Each is timed ``--repeats`` times after an untimed round of the same (median reported); compiles inside a timed
round are subtracted, as in the other benchmarks. The peer (``--peer hf``, the default) is Hugging Face
``transformers`` ``generate()`` on the same GGUF file (which it dequantizes to float32) with the same prompt token
ids: one request, then one batch of 16 (the prompts are alike, so nothing is padded), on all of the CPU's cores.

    python scripts/bench_cpu_default.py                  # ~4 minutes on a 2-core machine
    python scripts/bench_cpu_default.py --peer none --repeats 1

Writes ``benchmarks/results/cpu-default-cpu-<date>.json``.
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

WORKLOAD = "cpu-default"
MESSAGES = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of each (median reported)")
    parser.add_argument("--peer", default="hf", choices=("hf", "none"))
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--results-dir", default=bench_common.RESULTS_DIR)
    return parser.parse_args(argv)


def timed_seconds(fn) -> float:
    """Wall seconds of ``fn()`` less the compiles that happened meanwhile."""
    with bench_common.CompileTimer() as compiles:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    return wall - compiles.seconds


def record_rounds(result: dict, name: str, fn, tokens: int, repeats: int) -> None:
    """``result[name]``: ``tokens`` over the median seconds of ``repeats`` timed ``fn()`` after an untimed one (which
    compiles what the CPU compiles at first use); the rounds' seconds as ``*_runs_s``."""
    fn()
    seconds = [timed_seconds(fn) for _ in range(repeats)]
    result[name] = tokens / statistics.median(seconds)
    result[name.replace("_tok_s", "_runs_s")] = seconds


def run_ours(args) -> tuple[dict, list[int]]:
    """Our figures, and the prompt's token ids (for the peer)."""
    from engine import LLM, SamplingParams
    from engine.tokenizer import apply_chat_template

    llm = LLM(seed=0, enable_prefix_caching=False)  # every round computes the prompt, as the peer does
    try:
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
        prompt_ids = list(apply_chat_template(llm.get_tokenizer(), MESSAGES, add_generation_prompt=True))

        def one() -> None:
            out = llm.chat(MESSAGES, params, use_tqdm=False)[0]
            if len(out.outputs[0].token_ids) != args.output_len:
                raise RuntimeError(f"a request made {len(out.outputs[0].token_ids)} tokens, expected {args.output_len}")

        def concurrent() -> None:
            threads = [threading.Thread(target=one) for _ in range(args.concurrency)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

        result = {"engine_dtype": llm.llm_engine.dtype}
        record_rounds(result, "single_stream_tok_s", one, args.output_len, args.repeats)
        record_rounds(result, "aggregate_tok_s", concurrent, args.concurrency * args.output_len, args.repeats)
        return result, prompt_ids
    finally:
        llm.shutdown()


def run_hf_peer(args, prompt_ids: list[int]) -> dict:
    """``transformers`` ``generate()`` on the default model's GGUF: one request, then a batch of ``concurrency``."""
    import torch
    import transformers

    from models.default_model import default_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    path = default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    generation = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False,
                      pad_token_id=model.config.eos_token_id)

    def generate(batch: int) -> None:
        ids = torch.tensor([prompt_ids] * batch)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **generation)
        if out.shape[1] != len(prompt_ids) + args.output_len:
            raise RuntimeError(f"the peer made {out.shape[1] - len(prompt_ids)} tokens, expected {args.output_len}")

    result = {"transformers_version": transformers.__version__, "torch_threads": torch.get_num_threads()}
    for name, batch in (("single_stream_tok_s", 1), ("aggregate_tok_s", args.concurrency)):
        record_rounds(result, name, lambda: generate(batch), batch * args.output_len, args.repeats)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    ours, prompt_ids = run_ours(args)
    result = bench_common.result_header(WORKLOAD, None, ours["engine_dtype"])
    result.update(ours, prompt_tokens=len(prompt_ids), output_len=args.output_len, concurrency=args.concurrency,
                  num_cpus=os.cpu_count())
    fields = ("single_stream_tok_s", "aggregate_tok_s")
    if args.peer == "hf":
        result["peer"] = {"name": "hf-transformers-gguf", **run_hf_peer(args, prompt_ids)}
        result["ratio"] = bench_common.peer_ratios(result, result["peer"], fields)
    rows = [{"who": "pagedjax", **{f: result[f] for f in fields}}]
    if "peer" in result:
        rows.append({"who": "transformers", **{f: result["peer"][f] for f in fields}})
    bench_common.print_table(rows, ["who", *fields],
                             title=f"{WORKLOAD}: chat prompt of {len(prompt_ids)} tokens, {args.output_len} new, "
                                   f"{args.concurrency} concurrent, {os.cpu_count()} CPUs")
    print("wrote", bench_common.write_results(result, args.output_json, args.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
