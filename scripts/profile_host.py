"""Host time per engine step: ``LLMEngine.step`` wall time minus the time spent on the device.

Host Python per step (scheduling, building the step's arrays, sampling metadata, recording
tokens, outputs) is lost device time in a synchronous engine; with asynchronous scheduling (the
default) it overlaps the device only while it is shorter than the device's step, so it still
bounds throughput at small models or large batches.
This script measures it on a tiny dummy Llama (the shape of the work on the host does not depend
on the model's size) at a full decode batch:

    python scripts/profile_host.py                        # 256 sequences, 128- and 1000-token prompts
    python scripts/profile_host.py --prompt-len 1000 --cprofile 20   # top 20 functions by own time
    python scripts/profile_host.py --num-seqs 384 --prompt-len 512 --as-server   # as the server's engine child

"Device" time is the jitted step (and any copy-on-write page copy) up to its result being ready,
compiles included: the script wraps the runner's jitted functions with ``block_until_ready``.
Host time = step wall time - device time; also printed as the engine thread's CPU time outside
the device part (``time.thread_time``), which other processes on a busy machine do not inflate.
Steps are timed after a warm-up batch (which compiles), and only while all sequences are in
decode (the prefill steps are skipped).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from engine.engine_args import EngineArgs  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.outputs import RequestOutputKind  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=1024, bos_token_id=1, eos_token_id=2)


def write_dummy_model(folder: str) -> str:
    """Llama-3.1-8B's config.json shrunk to a toy size (random weights via load_format='dummy')."""
    with open(os.path.join(ROOT, "benchmarks", "models", "llama-3.1-8b", "config.json")) as f:
        config = json.load(f)
    config.update(TINY)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return folder


class DeviceTimer:
    """Wraps the runner's jitted callables so the device's part of a step is counted apart: the call
    (dispatch, compiles, input transfers), the wait for its result and the result's transfer to the host.
    ``dispatch_seconds`` is the call's own part of that (host work inside JAX, reported for information)."""

    def __init__(self, runner):
        self.seconds = self.dispatch_seconds = self.thread_seconds = 0.0
        step_fn = runner.step_fn  # each step's jitted model step returns (logits, kv cache)
        runner.step_fn = lambda num_tokens: self._timed(step_fn(num_tokens))
        runner._sample = self._timed(runner._sample, fetch=1)  # (tokens, sampler output)
        runner._copy = self._timed(runner._copy)

    def reset(self) -> None:
        self.seconds = self.dispatch_seconds = self.thread_seconds = 0.0

    def _timed(self, fn, *, fetch: Optional[int] = None):
        def call(*args, **kwargs):
            start, start_cpu = time.perf_counter(), time.thread_time()
            out = fn(*args, **kwargs)
            self.dispatch_seconds += time.perf_counter() - start
            out = jax.block_until_ready(out)
            if fetch is not None:  # the runner's device_get of that output is then a no-op on numpy arrays
                out = (*out[:fetch], jax.device_get(out[fetch]), *out[fetch + 1:])
            self.seconds += time.perf_counter() - start
            self.thread_seconds += time.thread_time() - start_cpu
            return out

        return call


def add_batch(engine: LLMEngine, rng: np.random.Generator, prefix: str, num_seqs: int, prompt_len: int,
              params: SamplingParams, output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
              params_each: bool = False) -> None:
    """``params_each``: every request its own copy of ``params``, as a server's requests have."""
    vocab = engine.model_config.vocab_size
    for i in range(num_seqs):
        prompt = rng.integers(3, vocab, prompt_len).tolist()  # no bos/eos ids
        engine.add_request(f"{prefix}{i}", prompt, copy.copy(params) if params_each else params,
                           output_kind=output_kind)


def run(engine: LLMEngine, timer: DeviceTimer, *, num_seqs: int, prompt_len: int, max_tokens: int,
        params: SamplingParams, prefix: str, profiler: cProfile.Profile | None = None,
        output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE, params_each: bool = False) -> dict:
    """Add ``num_seqs`` requests, step to the end; time the steps where every sequence decodes."""
    engine.block_manager.reset_prefix_cache()  # the warm-up's prompts are this run's: computed again
    add_batch(engine, np.random.default_rng(0), prefix, num_seqs, prompt_len, params, output_kind, params_each)
    host, device, dispatch, host_cpu = [], [], [], []
    while engine.has_unfinished_requests():
        all_decode = (engine.scheduler.num_running == num_seqs
                      and all(r.num_uncomputed_tokens == 1 for r in engine.scheduler.running_requests))
        timer.reset()
        if all_decode and profiler is not None:
            profiler.enable()
        start, start_cpu = time.perf_counter(), time.thread_time()
        engine.step()
        wall, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
        if profiler is not None:
            profiler.disable()
        if all_decode:
            host.append(wall - timer.seconds)
            device.append(timer.seconds)
            dispatch.append(timer.dispatch_seconds)
            host_cpu.append(cpu - timer.thread_seconds)
    return {"prompt_len": prompt_len, "num_seqs": num_seqs, "decode_steps": len(host),
            "host_ms_median": 1e3 * float(np.median(host)),
            "host_cpu_ms_median": 1e3 * float(np.median(host_cpu)), "host_ms_mean": 1e3 * float(np.mean(host)),
            "device_ms_median": 1e3 * float(np.median(device)),
            "dispatch_ms_median": 1e3 * float(np.median(dispatch))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, nargs="+", default=[128, 1000])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--penalties", action="store_true", help="repetition/presence/frequency penalties on")
    parser.add_argument("--output-kind", choices=[k.name.lower() for k in RequestOutputKind], default="cumulative",
                        help="what the requests' outputs carry: everything every step, what changed (as the engine "
                             "process asks for), or the finished output only (as LLM.generate asks for)")
    parser.add_argument("--final-only", dest="output_kind", action="store_const", const="final_only",
                        help="short for --output-kind final_only")
    parser.add_argument("--as-server", action="store_true",
                        help="as the server's engine child runs: delta outputs, a tokenizer (text, detokenized a "
                             "token at a time) and sampling params of each request's own")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="the engine's default; off to see what keying the full blocks costs a step")
    parser.add_argument("--speculative-config", type=json.loads, default=None,
                        help="speculative decoding (JSON, as the server's flag): what its n-gram checks cost a step "
                             "where the random prompts draft nothing")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="also print the N functions with the most own time over the decode steps")
    args = parser.parse_args()

    extra = dict(repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.1) if args.penalties else {}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, **extra)
    with tempfile.TemporaryDirectory() as folder:
        model = write_dummy_model(folder)
        if args.as_server:
            from bench_serving import with_tokenizer  # a word-level tokenizer of the dummy's vocabulary

            model = with_tokenizer(model, os.path.join(folder, "with-tokenizer"))
        engine = LLMEngine(EngineArgs(model=model, load_format="dummy",
                                      max_num_seqs=args.num_seqs, max_num_batched_tokens=8192,
                                      num_gpu_blocks_override=20000, block_size=16,
                                      enable_prefix_caching=args.enable_prefix_caching,
                                      speculative_config=args.speculative_config),
                           skip_tokenizer_init=not args.as_server)
    timer = DeviceTimer(engine.runner)
    output_kind = RequestOutputKind.DELTA if args.as_server else RequestOutputKind[args.output_kind.upper()]
    for prompt_len in args.prompt_len:
        # Warm-up: compiles the prefill and decode buckets of this prompt length.
        run(engine, timer, num_seqs=args.num_seqs, prompt_len=prompt_len, max_tokens=args.max_tokens,
            params=params, prefix=f"warm{prompt_len}-")
        profiler = cProfile.Profile() if args.cprofile else None
        result = run(engine, timer, num_seqs=args.num_seqs, prompt_len=prompt_len, max_tokens=args.max_tokens,
                     params=params, prefix=f"run{prompt_len}-", profiler=profiler, output_kind=output_kind,
                     params_each=args.as_server)
        print(f"prompt {prompt_len:5d}, {result['num_seqs']} seqs, {result['decode_steps']} decode steps: "
              f"host {result['host_ms_median']:.2f} ms/step (mean {result['host_ms_mean']:.2f}; "
              f"CPU time of the engine thread {result['host_cpu_ms_median']:.2f}), "
              f"device {result['device_ms_median']:.2f} ms/step (of which the jitted call's dispatch "
              f"{result['dispatch_ms_median']:.2f} ms)", flush=True)
        if profiler is not None:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(args.cprofile)


if __name__ == "__main__":
    main()
