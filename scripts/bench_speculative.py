"""Speculative decoding by n-gram lookup (``speculative_config``) against decoding a token a step, one request at a
time, on a real model's real text (drafts come from a request's own tokens, so random prompts and dummy weights
say nothing here).

The requests are the kind n-gram drafts serve: replies that copy from their prompt (repeat a text, edit code,
continue a list), as chat turns of the model's template; greedy, ``--output-len`` new tokens at most. For each
engine (plain, then with drafts) every request runs once untimed (compiles), then ``--repeats`` timed rounds; the
per-request time of a 1-token reply is subtracted to give the decode's time per output token. Checks that both
engines reply alike (greedy), and reports the drafts' acceptance and the tokens a decode step yields.

    python scripts/bench_speculative.py                          # the embedded default model, CPU: ~3 minutes
    python scripts/bench_speculative.py --model /path/to/Llama-3.1-8B-Instruct --num-speculative-tokens 4
    python scripts/bench_speculative.py --structured-outputs '{"regex": "[^<]{1,2000}"}'   # drafts under a grammar

Writes ``benchmarks/results/speculative-<device>-<date>.json`` (``BENCH_COMMIT`` names the commit where the copy
has no git metadata).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402

WORKLOAD = "speculative"
TEXT = ("The committee met on Tuesday to review the budget for the coming year. After a long discussion, the "
        "members agreed to increase funding for the library, reduce spending on travel, and set aside money for "
        "repairs to the community hall.")
CODE = ("def total_price(items, tax_rate):\n    subtotal = 0\n    for item in items:\n        subtotal += item.price "
        "* item.quantity\n    tax = subtotal * tax_rate\n    return subtotal + tax\n")
CONVERSATIONS = [
    [{"role": "user", "content": f"Repeat the following text exactly, word for word:\n\n{TEXT}"}],
    [{"role": "user", "content": f"Rename the function total_price to order_total in this code and show the whole "
                                 f"code:\n\n{CODE}"}],
    [{"role": "user", "content": "Continue this list in the same format up to 20: 1. one, 2. two, 3. three, "
                                 "4. four, 5. five,"}],
    [{"role": "user", "content": f"Rewrite this text in capital letters:\n\n{TEXT}"}],
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder or .gguf (default: the embedded model)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--prompt-lookup-max", type=int, default=4)
    parser.add_argument("--prompt-lookup-min", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--structured-outputs", type=json.loads, default=None,
                        help='every reply under this structured output (SamplingParams.structured_outputs as JSON), '
                             'e.g. \'{"regex": "[^<]{1,2000}"}\': drafts are then sampled under its masks')
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--results-dir", default=bench_common.RESULTS_DIR)
    return parser.parse_args(argv)


def run(args, speculative_config) -> dict:
    from engine import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, max_model_len=1024, max_num_seqs=8,
              speculative_config=speculative_config)
    greedy = SamplingParams(temperature=0, max_tokens=args.output_len, structured_outputs=args.structured_outputs)
    first = SamplingParams(temperature=0, max_tokens=1, structured_outputs=args.structured_outputs)

    def reply(conversation, params):
        started = time.perf_counter()
        out = llm.chat(conversation, params, use_tqdm=False)[0].outputs[0]
        return time.perf_counter() - started, out

    for conversation in CONVERSATIONS:  # untimed: compiles
        reply(conversation, greedy), reply(conversation, first)
    counted = ("steps", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")
    totals = dict.fromkeys(counted, 0)
    tpot, tokens, texts, seconds = [], 0, [], 0.0
    for _ in range(args.repeats):
        for conversation in CONVERSATIONS:
            before = {name: llm.llm_engine.stats[name] for name in counted}
            with bench_common.CompileTimer() as compiles:
                full_s, out = reply(conversation, greedy)
            for name in counted:  # the reply's own steps (its prompt's and its decodes')
                totals[name] += llm.llm_engine.stats[name] - before[name]
            with bench_common.CompileTimer() as first_compiles:
                first_s, _ = reply(conversation, first)
            full_s, first_s = full_s - compiles.seconds, first_s - first_compiles.seconds
            tpot.append((full_s - first_s) / max(len(out.token_ids) - 1, 1))
            tokens += len(out.token_ids)
            seconds += full_s
            texts.append(out.text)
    llm.shutdown()
    drafts, accepted = totals["spec_decode_num_draft_tokens"], totals["spec_decode_num_accepted_tokens"]
    return {"tpot_ms_median": 1e3 * statistics.median(tpot), "output_tok_s": tokens / seconds,
            "output_tokens": tokens, "steps": totals["steps"], "tokens_per_step": tokens / totals["steps"],
            "draft_tokens": drafts, "accepted_tokens": accepted,
            "acceptance_rate": accepted / drafts if drafts else None, "texts": texts}


def main(argv=None) -> None:
    args = parse_args(argv)
    spec = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens,
            "prompt_lookup_max": args.prompt_lookup_max, "prompt_lookup_min": args.prompt_lookup_min}
    plain, drafted = run(args, None), run(args, spec)
    same = plain.pop("texts") == drafted.pop("texts")
    result = {**bench_common.result_header(WORKLOAD, args.model, args.dtype),
              "output_len": args.output_len, "repeats": args.repeats, "speculative_config": spec,
              "structured_outputs": args.structured_outputs,
              "plain": plain, "ngram": drafted, "same_text": same,
              "tpot_speedup": plain["tpot_ms_median"] / drafted["tpot_ms_median"],
              "output_tok_s_speedup": drafted["output_tok_s"] / plain["output_tok_s"]}
    print(json.dumps(result, indent=1))
    print(f"wrote {bench_common.write_results(result, args.output_json, args.results_dir)}")
    if not same:
        sys.exit("the replies with drafts differ from the plain engine's")


if __name__ == "__main__":
    main()
