"""Generate from a prompt with the embedded default model (or any model): the demo CLI.

    python scripts/generate.py "What is the capital of France?"
    python scripts/generate.py --model /path/to/hf-folder --max-tokens 64 --temperature 0.7 "Hello"
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLM, SamplingParams  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="*", default=["What is the capital of France?"])
    parser.add_argument("--model", default=None, help="HF checkpoint folder or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="complete the text as is, without the chat template")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    llm = LLM(model=args.model, dtype=args.dtype, seed=args.seed)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    prompt = " ".join(args.prompt)
    if args.raw:
        out = llm.generate(prompt, params, use_tqdm=False)[0]
    else:
        out = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)[0]
    print(out.outputs[0].text)
    llm.shutdown()


if __name__ == "__main__":
    main()
