"""Where start-up goes, by layer count: the engine's start-up phases and its first steps' compiles.

For each quantization x layer count x layer layout (unrolled or scanned), a copy of the
model's config.json with ``num_hidden_layers`` set, dummy weights, a small engine (16
sequences, 256 tokens a step); records the engine's start-up phases (weights, the compile
of the largest step that sizes the KV pool) and the wall time of a first request (one
prompt of 16 tokens, 3 new tokens: a prompt step and decode steps, compiled). If the
compile time grows with the layer count, the unrolled step is what costs (run 11: the 8B
fp8 engine took 66-69 s to start and > 30 s per step shape, bf16 12-14 s).

    python scripts/profile_compile.py --quantization none,fp8 --layers 2,8 --weight-phases --out /tmp/c.json
    python scripts/profile_compile.py --model <tiny> --quantization none --layers 1,2 --unroll off   # CPU smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402


def config_with_layers(model_dir: str, num_layers: int, folder: str) -> str:
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] = num_layers
    path = os.path.join(folder, f"layers{num_layers}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def probe(model_dir: str, quantization, unroll, options) -> dict:
    from engine import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model_dir, load_format="dummy", quantization=quantization, unroll_layers=unroll, max_num_seqs=16,
              max_num_batched_tokens=256, max_model_len=256, skip_tokenizer_init=True, compiler_options=options)
    ready_s = time.perf_counter() - start
    try:
        request_s = []  # the first request compiles its steps, the second reuses them
        for _ in range(2):
            started = time.perf_counter()
            llm.generate([{"prompt_token_ids": list(range(1, 17))}],
                         SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
            request_s.append(time.perf_counter() - started)
        first_request_s, second_request_s = request_s
        phases = dict(llm.llm_engine.startup_seconds)
    finally:
        llm.shutdown()
        del llm
        gc.collect()
    return dict(ready_s=ready_s, first_request_s=first_request_s, second_request_s=second_request_s, **phases)


def weight_phases(model_dir: str, quantization) -> dict:
    """Seconds of each step that lays the weights out for the unrolled step: the runner's order
    (``models.llama.layout_layers``: join q/k/v and gate/up on the stack, then cut the layers apart),
    then the order before it (cut, then join per layer). The runner's order runs first, so it
    also pays the compiles the two share."""
    import jax

    from models.llama import fuse_projections, layout_layers, unstack_layers
    from models.loader import load_model

    def timed(fn, *args):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        return out, time.perf_counter() - start

    load = lambda: load_model(model_dir, load_format="dummy", quantization=quantization).params  # noqa: E731
    params, load_s = timed(load)
    laid_out, layout_s = timed(lambda p: layout_layers(p, unroll=True, fuse=True), params)
    del params, laid_out
    cut, unstack_s = timed(unstack_layers, load())
    _, fuse_per_layer_s = timed(fuse_projections, cut)
    return dict(load_s=load_s, layout_s=layout_s, unstack_s=unstack_s, fuse_per_layer_s=fuse_per_layer_s)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=bench_common.DEFAULT_MODEL, help="a folder with a config.json")
    parser.add_argument("--quantization", default="none,fp8", help="comma-separated; none = the checkpoint dtype")
    parser.add_argument("--layers", default="2,8")
    parser.add_argument("--unroll", default="on", help="comma-separated on/off/auto (auto: unrolled on GPU)")
    parser.add_argument("--compiler-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--weight-phases", action="store_true",
                        help="also time loading and laying out the layers' weights (the runner's order and the old one)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    options = bench_common.compiler_options(args.compiler_option) if args.compiler_option else None
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for quantization in args.quantization.split(","):
            for unroll in args.unroll.split(","):
                for num_layers in (int(n) for n in args.layers.split(",")):
                    model_dir = config_with_layers(args.model, num_layers, folder)
                    q = None if quantization == "none" else quantization
                    row = dict(quantization=quantization, unroll=unroll, layers=num_layers,
                               **probe(model_dir, q, {"on": True, "off": False, "auto": None}[unroll], options))
                    if args.weight_phases and unroll != "off":
                        row.update(weight_phases(model_dir, q))
                    rows.append(row)
                    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                          flush=True)
    if args.out:
        result = bench_common.result_header("profile-compile", bench_common.model_name(args.model), "auto")
        result.update(compiler_options=options, probes=rows)
        bench_common.write_results(result, args.out)
    return rows


if __name__ == "__main__":
    main()
