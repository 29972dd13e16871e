"""The ``serving`` workload (PROTOCOL.md): the OpenAI-compatible server under Poisson arrivals, streamed.

Starts ``scripts/serve.py`` on a free local port (or uses a running server, ``--base-url``), sends
``--num-requests`` completions of random token-id prompts whose input and output lengths are drawn
uniformly within ``--range-ratio`` of ``--input-len`` / ``--output-len`` (fixed seed, ``ignore_eos``),
arriving as a Poisson process at ``--request-rate`` requests/s (``inf``: all at once), each streamed
through the official ``openai`` client. Per request it records the time to the first text
(TTFT), the gaps between streamed chunks (ITL) and the end-to-end latency; failed requests are
counted with their messages. Writes the PROTOCOL JSON and prints a table.

A model folder with only a ``config.json`` (``--load-format dummy``, e.g. the 8B shapes in
``benchmarks/models``) gets a word-level tokenizer of its vocabulary (token ``i`` is the word
``t<i>``) in a temporary copy, so the server can stream text for random token ids.

    python scripts/bench_serving.py --request-rate 8                       # 8B dummy, 512 x 512/256
    python scripts/bench_serving.py --model <hf-folder> --load-format auto --request-rate inf
    python scripts/bench_serving.py --base-url http://127.0.0.1:8000 --model <its folder> --request-rate 4

The client never touches the accelerator: the device, JAX version and dtype in the JSON come from
the server's ``/version``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import importlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402

WORKLOAD = "serving"
DEFAULTS = dict(num_requests=512, input_len=512, output_len=256, range_ratio=0.5)  # PROTOCOL.md
MAX_ITL_SAMPLES = 2000


@dataclasses.dataclass
class RequestResult:
    prompt_len: int
    max_tokens: int
    ok: bool = False
    error: Optional[str] = None
    ttft_s: Optional[float] = None
    itl_s: list[float] = dataclasses.field(default_factory=list)
    e2e_s: Optional[float] = None
    output_tokens: int = 0
    finished_at: Optional[float] = None


def arrival_offsets(num: int, rate: float, seed: int) -> list[float]:
    """Send times (s after the start) of a Poisson process of ``rate`` requests/s; all 0 for ``inf``."""
    import numpy as np

    if rate <= 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {rate}")
    if math.isinf(rate):
        return [0.0] * num
    gaps = np.random.default_rng(seed + 1).exponential(1.0 / rate, size=num)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist()


# Every request's fields besides its model, prompt and length: greedy, streamed with a final usage chunk. Both
# clients send these, with ``ignore_eos`` (vLLM's extra field) beside them.
STREAMED = dict(temperature=0.0, stream=True, stream_options={"include_usage": True})


async def openai_chunks(client, model: str, prompt: list[int], max_tokens: int):
    """A streamed completion through the ``openai`` client: ``(carries text, completion tokens or None)`` a chunk."""
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, **STREAMED,
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        yield any(c.text for c in chunk.choices), chunk.usage.completion_tokens if chunk.usage else None


async def raw_chunks(client, model: str, prompt: list[int], max_tokens: int):
    """The same request as ``openai_chunks`` over plain ``httpx``, its server-sent events parsed with ``json``: a
    lighter client, to tell the server's ceiling from the one-process client's (the SDK builds a model object a
    chunk)."""
    body = dict(model=model, prompt=prompt, max_tokens=max_tokens, **STREAMED, ignore_eos=True)
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            usage = chunk.get("usage")
            yield any(c.get("text") for c in chunk["choices"]), usage["completion_tokens"] if usage else None


async def send_one(chunks, model: str, prompt: list[int], max_tokens: int, start: float, offset: float,
                   semaphore: Optional[asyncio.Semaphore]) -> RequestResult:
    """One streamed completion (``chunks(model, prompt, max_tokens)``: ``openai_chunks`` or ``raw_chunks`` bound
    to a client) sent at ``start + offset``; never raises (errors are recorded)."""
    result = RequestResult(prompt_len=len(prompt), max_tokens=max_tokens)
    await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
    async with semaphore if semaphore is not None else contextlib.nullcontext():
        sent = last = time.perf_counter()
        try:
            count = 0
            async for has_text, usage in chunks(model, prompt, max_tokens):
                if usage is not None:
                    result.output_tokens = usage
                if not has_text:
                    continue
                now = time.perf_counter()
                if result.ttft_s is None:
                    result.ttft_s = now - sent
                else:
                    result.itl_s.append(now - last)
                last = now
                count += 1
            result.output_tokens = result.output_tokens or count
            result.e2e_s = time.perf_counter() - sent
            result.ok = result.ttft_s is not None
            if not result.ok:
                result.error = "the stream carried no text"
        except Exception as e:  # noqa: BLE001 - a failed request is a data point (counted in `errors`)
            result.error = f"{type(e).__name__}: {e}"[:300]
        result.finished_at = time.perf_counter()
    return result


async def run_load(base_url: str, model: str, requests: list[tuple[list[int], int]], offsets: list[float],
                   max_concurrency: Optional[int], timeout_s: float,
                   client_kind: str = "openai", start: Optional[float] = None) -> tuple[list[RequestResult], float]:
    """All requests at their offsets, through the ``openai`` client or plain ``httpx`` (``client_kind``); returns
    the results and the wall time from the first send to the last completion. ``start``: the ``perf_counter`` time
    the offsets count from (now if None; a shared one for several client processes, as Linux's clock is
    system-wide)."""
    import httpx
    import openai

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    http = httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout_s)
    async with contextlib.AsyncExitStack() as stack:
        if client_kind == "openai":
            client = await stack.enter_async_context(openai.AsyncOpenAI(
                base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=timeout_s, http_client=http))
            chunks = functools.partial(openai_chunks, client)
        else:
            chunks = functools.partial(raw_chunks, await stack.enter_async_context(http))
        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        start = time.perf_counter() if start is None else start
        results = await asyncio.gather(*(send_one(chunks, model, prompt, max_tokens, start, offset, semaphore)
                                         for (prompt, max_tokens), offset in zip(requests, offsets)))
    ends = [r.finished_at for r in results if r.finished_at is not None]
    return list(results), (max(ends) - start) if ends else 0.0


def _client_process(share: tuple, ready, go, start, outbox) -> None:
    """One client process of ``run_loads``: ready (its clients' modules imported), then its share of the requests
    from the shared ``start``; puts ``(indices, results)`` in ``outbox``."""
    for module in ("httpx", "openai"):  # run_load's imports, before the start: sends ~1.4 s late after it (34b)
        importlib.import_module(module)
    indices, args = share
    ready.wait()  # the parent picks the start once every process got here
    go.wait()
    try:
        results, _ = asyncio.run(run_load(*args, start=start.value))
    except Exception as e:  # noqa: BLE001 - handed to the parent, which raises it
        results = e
    outbox.put((indices, results))


def run_loads(base_url: str, model: str, requests: list[tuple[list[int], int]], offsets: list[float],
              max_concurrency: Optional[int], timeout_s: float, client_kind: str,
              num_processes: int) -> tuple[list[RequestResult], float]:
    """``run_load`` from ``num_processes`` client processes, request i in process i mod n, all counting their
    offsets from one start: one Python process reading 512 streams at ~7,000 tokens/s fell seconds behind the server
    (run 33b: the engine idle for the last ~4 s of a 20 s run while the client read its backlog). The start is
    taken once every process has started (a fixed head start let a slow spawn send late: run 34a). A concurrency
    limit is split between the processes."""
    if num_processes <= 1:
        return asyncio.run(run_load(base_url, model, requests, offsets, max_concurrency, timeout_s, client_kind))
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready, go, start, outbox = context.Barrier(num_processes + 1), context.Event(), context.Value("d"), context.Queue()
    limit = None if not max_concurrency else max(1, max_concurrency // num_processes)
    processes = []
    for p in range(num_processes):
        indices = list(range(p, len(requests), num_processes))
        share = (indices, (base_url, model, [requests[i] for i in indices], [offsets[i] for i in indices], limit,
                           timeout_s, client_kind))
        processes.append(context.Process(target=_client_process, args=(share, ready, go, start, outbox), daemon=True))
        processes[-1].start()
    ready.wait(timeout=120)
    start.value = time.perf_counter()
    go.set()
    results: list[Optional[RequestResult]] = [None] * len(requests)
    for _ in processes:
        indices, share_results = outbox.get()
        if isinstance(share_results, Exception):
            raise RuntimeError("a client process failed") from share_results
        for i, result in zip(indices, share_results):
            results[i] = result
    for process in processes:
        process.join()
    ends = [r.finished_at for r in results if r.finished_at is not None]
    return results, (max(ends) - start.value) if ends else 0.0


def summarize(results: list[RequestResult], wall_s: float) -> dict:
    """PROTOCOL's serving fields (ms, tok/s) plus means, end-to-end percentiles and error samples."""
    import numpy as np

    ok = [r for r in results if r.ok]
    ttft = np.array([r.ttft_s for r in ok]) * 1e3
    itl = np.array([gap for r in ok for gap in r.itl_s]) * 1e3
    e2e = np.array([r.e2e_s for r in ok]) * 1e3

    def pct(a, q):
        return float(np.percentile(a, q)) if a.size else None

    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.prompt_len for r in ok)
    errors = [r.error for r in results if not r.ok]
    return dict(
        completed=len(ok), errors=len(errors), error_samples=sorted(set(errors))[:5], duration_s=wall_s,
        output_tok_s=output_tokens / wall_s if wall_s > 0 else None,
        total_tok_s=(output_tokens + input_tokens) / wall_s if wall_s > 0 else None,
        req_s=len(ok) / wall_s if wall_s > 0 else None, output_tokens=output_tokens, input_tokens=input_tokens,
        ttft_p50_ms=pct(ttft, 50), ttft_p99_ms=pct(ttft, 99), ttft_mean_ms=float(ttft.mean()) if ttft.size else None,
        itl_p50_ms=pct(itl, 50), itl_p99_ms=pct(itl, 99), itl_mean_ms=float(itl.mean()) if itl.size else None,
        e2e_p50_ms=pct(e2e, 50), e2e_p99_ms=pct(e2e, 99),
        # For the latency CDF of scripts/visualize.py: per request, and the ITL's quantiles (one per token is too many).
        ttft_ms_samples=_rounded(ttft), e2e_ms_samples=_rounded(e2e), itl_ms_samples=_rounded(_quantiles(itl)),
    )


def _quantiles(values, count: int = MAX_ITL_SAMPLES):
    """``values`` itself if short, else ``count`` evenly spaced quantiles of it (the same CDF, smaller)."""
    import numpy as np

    return values if values.size <= count else np.quantile(values, np.linspace(0, 1, count))


def _rounded(values) -> list[float]:
    return [round(float(v), 3) for v in values]


# --------------------------------------------------------------------------------------
# The server under test
# --------------------------------------------------------------------------------------


def with_tokenizer(model: Optional[str], folder: str) -> Optional[str]:
    """``model`` if it has a tokenizer; else a copy of its ``config.json`` in ``folder`` beside a
    word-level tokenizer of its vocabulary (token ``i`` is the word ``t<i>``)."""
    from engine.tokenizer import TOKENIZER_FILES

    if model is None or not os.path.isdir(model) or any(os.path.exists(os.path.join(model, f)) for f in TOKENIZER_FILES):
        return model
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab_size = bench_common.read_vocab_size(model)
    copy = os.path.join(folder, os.path.basename(os.path.normpath(model)))
    os.makedirs(copy, exist_ok=True)
    shutil.copy(os.path.join(model, "config.json"), copy)
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(os.path.join(copy, "tokenizer.json"))
    with open(os.path.join(copy, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0"}, f)
    return copy


def free_port(host: str) -> int:
    with socket.create_server((host, 0)) as sock:
        return sock.getsockname()[1]


def start_server(args, model: Optional[str], max_model_len: int, log_path: str) -> tuple[subprocess.Popen, str]:
    """``scripts/serve.py`` in a child process, its output in ``log_path``; returns once ``/health``
    answers 200 (raises with the log's tail if the server exits or the start-up timeout passes)."""
    import httpx

    port = free_port(args.host)
    argv = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py"),
            *(["--model", model] if model is not None else []), "--host", args.host, "--port", str(port), "--load-format", args.load_format, "--dtype", args.dtype,
            "--max-model-len", str(max_model_len), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
            "--seed", str(args.seed), "--uvicorn-log-level", "warning"]
    for flag, value in (("--max-num-seqs", args.max_num_seqs), ("--max-num-batched-tokens", args.max_num_batched_tokens),
                        ("--quantization", args.quantization), ("--kv-cache-dtype", args.kv_cache_dtype)):
        if value is not None:
            argv += [flag, str(value)]
    argv += args.serve_arg
    log = open(log_path, "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{args.host}:{port}"
    deadline = time.monotonic() + args.startup_timeout_s
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc)
            with open(log_path) as f:
                tail = f.read()[-3000:]
            why = f"exited with {proc.returncode}" if proc.returncode is not None else "did not answer in time"
            raise RuntimeError(f"the server {why}; its log ({log_path}) ends:\n{tail}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def server_facts(url: str) -> dict:
    """The served model's name and the engine facts of ``/version`` (device, JAX version, dtype, ...)."""
    import httpx

    facts = httpx.get(f"{url}/version", timeout=30).json()
    facts["served_model"] = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    return facts


ENGINE_COUNTERS = ("engine_steps", "generation_tokens", "engine_host_seconds", "engine_wait_seconds")
PREFIX_CACHE_COUNTERS = ("prefix_cache_queries", "prefix_cache_hits")
# The loop's time outside steps, and the steps planned while the one before ran (asynchronous scheduling).
LOOP_COUNTERS = ("engine_yield_seconds", "engine_after_step_seconds", "engine_idle_seconds",
                 "engine_steps_planned_ahead")


def engine_counters(url: str) -> dict:
    """The engine's counters from the server's ``/metrics`` (steps, generated tokens, host and device-wait
    seconds); empty where the server has none of them."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=60).text):
        name = family.name.split(":", 1)[-1]
        if name in ENGINE_COUNTERS + PREFIX_CACHE_COUNTERS + LOOP_COUNTERS:
            values[name] = sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
    return values


def engine_figures(before: dict, after: dict) -> dict:
    """Per engine step over the timed run: steps, generated tokens a step, host and device-wait ms a step."""
    if not all(name in before and name in after for name in ENGINE_COUNTERS):
        return {}
    delta = {name: after[name] - before[name] for name in ENGINE_COUNTERS}
    steps = max(delta["engine_steps"], 1)
    figures = dict(engine_steps=int(delta["engine_steps"]), tokens_per_step=delta["generation_tokens"] / steps,
                   engine_host_ms_per_step=1e3 * delta["engine_host_seconds"] / steps,
                   engine_wait_ms_per_step=1e3 * delta["engine_wait_seconds"] / steps)
    if all(name in before and name in after for name in PREFIX_CACHE_COUNTERS):  # prompt tokens found cached
        figures.update({name: int(after[name] - before[name]) for name in PREFIX_CACHE_COUNTERS})
    if all(name in before and name in after for name in LOOP_COUNTERS):
        figures.update(engine_yield_s=after["engine_yield_seconds"] - before["engine_yield_seconds"],
                       engine_after_step_s=after["engine_after_step_seconds"] - before["engine_after_step_seconds"],
                       engine_idle_s=after["engine_idle_seconds"] - before["engine_idle_seconds"],
                       engine_planned_ahead_share=(after["engine_steps_planned_ahead"]
                                                   - before["engine_steps_planned_ahead"]) / steps,
                       engine_steps_s=1e-3 * steps * (figures["engine_host_ms_per_step"]
                                                       + figures["engine_wait_ms_per_step"]))
    return figures


# --------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=bench_common.DEFAULT_MODEL,
                        help="the model folder (served, or the one --base-url serves: its vocabulary sizes the prompts); "
                             "'default': the embedded SmolLM2-135M-Instruct (with --load-format auto)")
    parser.add_argument("--base-url", default=None, help="a running server (default: start scripts/serve.py)")
    parser.add_argument("--num-requests", type=int, default=DEFAULTS["num_requests"])
    parser.add_argument("--input-len", type=int, default=DEFAULTS["input_len"])
    parser.add_argument("--output-len", type=int, default=DEFAULTS["output_len"])
    parser.add_argument("--range-ratio", type=float, default=DEFAULTS["range_ratio"],
                        help="lengths uniform within this fraction of --input-len / --output-len")
    parser.add_argument("--shared-prefix-len", type=int, default=0,
                        help="tokens every timed prompt starts with (a shared system prompt) before its own "
                             "--input-len; the warm-up's prompts do not share them")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    parser.add_argument("--max-concurrency", type=int, default=None, help="at most this many requests in flight")
    parser.add_argument("--num-warmup", type=int, default=2, help="requests sent one by one before the timed run")
    parser.add_argument("--client", default="openai", choices=("openai", "httpx"),
                        help="the official openai client, or plain httpx with the events parsed by json (lighter: "
                             "tells the server's ceiling from the one-process client's)")
    parser.add_argument("--client-processes", type=int, default=1,
                        help="client processes sharing the requests (one process reading 512 streams falls behind "
                             "a fast server: its time then measures the client)")
    parser.add_argument("--request-timeout-s", type=float, default=3600.0)
    parser.add_argument("--seed", type=int, default=bench_common.PROMPT_SEED, help="seed of prompts, lengths, arrivals")
    server = parser.add_argument_group("the server this script starts (ignored with --base-url)")
    server.add_argument("--load-format", default="dummy", choices=("auto", "safetensors", "gguf", "dummy"))
    server.add_argument("--dtype", default="auto")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--max-model-len", type=int, default=None,
                        help="default: the longest prompt plus the longest output of the run")
    server.add_argument("--max-num-seqs", type=int, default=None)
    server.add_argument("--max-num-batched-tokens", type=int, default=None)
    server.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    server.add_argument("--quantization", default=None)
    server.add_argument("--kv-cache-dtype", default=None)
    server.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for scripts/serve.py (repeatable, e.g. --serve-arg=--no-precompile-steps)")
    server.add_argument("--startup-timeout-s", type=float, default=900.0)
    parser.add_argument("--output-json", default=None,
                        help="result file (default <results-dir>/serving-<device>-<date>.json)")
    parser.add_argument("--results-dir", default=bench_common.RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.model == "default":
        args.model = None
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    vocab_size = bench_common.read_vocab_size(args.model)
    requests = bench_common.make_requests(args.num_requests, args.input_len, args.output_len, args.range_ratio,
                                          vocab_size, args.seed, args.shared_prefix_len)
    warmup = bench_common.make_requests(args.num_warmup, args.input_len, args.output_len, 0.0, vocab_size,
                                        args.seed + 7)
    offsets = arrival_offsets(args.num_requests, args.request_rate, args.seed)
    max_model_len = args.max_model_len or max(len(p) + m for p, m in requests + warmup)
    with tempfile.TemporaryDirectory() as folder:
        proc = None
        if args.base_url:
            url = args.base_url.rstrip("/")
        else:
            log_path = os.path.join(args.results_dir, "serving-server.log")
            os.makedirs(args.results_dir, exist_ok=True)
            started = time.perf_counter()
            proc, url = start_server(args, with_tokenizer(args.model, folder), max_model_len, log_path)
            print(f"server ready at {url} in {time.perf_counter() - started:.1f} s (log {log_path})", flush=True)
        try:
            facts = server_facts(url)
            for prompt, max_tokens in warmup:  # compiles at first use off a GPU; excluded from the figures
                asyncio.run(run_load(url, facts["served_model"], [(prompt, max_tokens)], [0.0], None,
                                     args.request_timeout_s, args.client))
            before = engine_counters(url)
            results, wall_s = run_loads(url, facts["served_model"], requests, offsets, args.max_concurrency,
                                        args.request_timeout_s, args.client, args.client_processes)
            engine = engine_figures(before, engine_counters(url))
        finally:
            if proc is not None:
                stop_server(proc)
    summary = summarize(results, wall_s)
    result = dict(
        workload=WORKLOAD, model=bench_common.model_name(args.model), device=facts.get("device", "unknown"),
        jax_version=facts.get("jax_version"), commit=bench_common.git_commit(),
        command=" ".join(["python"] + sys.argv), dtype=facts.get("dtype"), quantization=facts.get("quantization"),
        kv_cache_dtype=facts.get("kv_cache_dtype", "auto"), tensor_parallel_size=facts.get("tensor_parallel_size", 1),
        date=time.strftime("%Y-%m-%d"), backend=facts.get("backend"), server_version=facts.get("version"),
        request_rate="inf" if math.isinf(args.request_rate) else args.request_rate,
        max_concurrency=args.max_concurrency, num_requests=args.num_requests, input_len=args.input_len,
        **({"shared_prefix_len": args.shared_prefix_len} if args.shared_prefix_len else {}),
        enable_prefix_caching=facts.get("enable_prefix_caching"),
        output_len=args.output_len, range_ratio=args.range_ratio, max_model_len=facts.get("max_model_len"),
        client=args.client, client_processes=args.client_processes,
        **summary, **engine,
    )
    path = bench_common.write_results(result, args.output_json, args.results_dir)
    bench_common.print_table(
        [dict(result, name="pagedjax")],
        ["name", "request_rate", "completed", "errors", "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms",
         "itl_p99_ms"],
        title=f"serving on {result['device']}: {args.num_requests} x {args.input_len}/{args.output_len} "
              f"(+-{args.range_ratio:.0%}), {wall_s:.1f} s")
    if engine:
        print(f"engine: {engine['engine_steps']} steps, {engine['tokens_per_step']:.1f} tokens a step, host "
              f"{engine['engine_host_ms_per_step']:.2f} ms and device wait {engine['engine_wait_ms_per_step']:.2f} ms "
              "a step" + ("" if "engine_yield_s" not in engine else
                          f"; of the run's {result['duration_s']:.1f} s: steps {engine['engine_steps_s']:.1f} s, "
                          f"yielding to callers {engine['engine_yield_s']:.1f} s, handing outputs on "
                          f"{engine['engine_after_step_s']:.1f} s, idle {engine['engine_idle_s']:.1f} s; planned "
                          f"ahead {engine['engine_planned_ahead_share']:.0%} of steps"))
    if result["error_samples"]:
        print("errors:", *result["error_samples"], sep="\n  ")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
