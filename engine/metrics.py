"""Prometheus metrics of a serving engine, with vLLM's metric names under the ``vllm:`` prefix.

The prefix is vLLM's own, so dashboards, alerts and autoscalers written for vLLM
read this server unchanged; the few metrics vLLM lacks (KV blocks used and
total, largest batch) use the same prefix. Every metric carries a ``model_name``
label, as vLLM's do. vLLM's names from before 0.11 (``gpu_cache_usage_perc``,
``gpu_prefix_cache_queries`` / ``_hits``, ``time_per_output_token_seconds``) are served beside
their successors, so dashboards of those versions read this server too.

Owns one ``CollectorRegistry`` per ``ServingMetrics`` (never the global default,
so several servers or tests in one process do not collide): latency histograms
fed through the ``StatLogger`` calls of ``engine.async_llm`` (or, offline, from ``LLM``'s finished outputs:
``offline_finished_sequences``), and engine state
(queues, KV cache, token and preemption counters) read from a stats snapshot at
scrape time. Knows nothing of HTTP or of how the engine works inside.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from typing import TYPE_CHECKING, Callable, Optional, Sequence

if TYPE_CHECKING:
    from engine.async_llm import FinishedSequence
    from engine.outputs import RequestOutput
    from engine.sampling_params import SamplingParams

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

METRIC_PREFIX = "vllm:"
FINISH_REASONS = ("stop", "length", "abort")  # vLLM's request_success series, made at start-up

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), in seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                       20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
N_BUCKETS = (1, 2, 5, 10, 20)
# vLLM's iteration_tokens_total buckets: the tokens one model step runs (the engine counts them: LLMEngine.stats).
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def count_into_buckets(counts: tuple, bounds: Sequence[float], value: float) -> tuple:
    """``counts`` (one a bucket of ``bounds``, then one above them) with ``value`` counted: a new tuple, so a stats
    snapshot that holds the old one keeps it as it was."""
    index = bisect.bisect_left(bounds, value)
    return counts[:index] + (counts[index] + 1,) + counts[index + 1:]


def one_two_five_buckets(largest: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``largest`` (vLLM's ``build_1_2_5_buckets``: token-count histograms)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > largest:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


def cache_config_info(args, num_gpu_blocks: int) -> dict:
    """The KV cache's settings (``EngineArgs``), as vLLM's ``vllm:cache_config_info`` labels them."""
    return dict(block_size=args.block_size, cache_dtype=args.kv_cache_dtype,
                enable_prefix_caching=args.enable_prefix_caching, gpu_memory_utilization=args.gpu_memory_utilization,
                num_gpu_blocks=num_gpu_blocks, num_gpu_blocks_override=args.num_gpu_blocks_override,
                num_cpu_blocks=None, swap_space=0)


class ServingMetrics:
    """The server's metrics; pass it to ``AsyncLLM.add_stat_logger`` and serve ``render()``.

    ``read_stats`` returns the dict of ``AsyncLLM.stats()``; it is called on every
    scrape, from the thread that calls ``render()``.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, read_stats: Callable[[], dict], max_model_len: int = 2**20,
                 cache_config: Optional[dict] = None):
        self.registry = CollectorRegistry()
        label = {"model_name": model_name}
        if cache_config is not None:  # vLLM's info gauge: the KV cache's settings as labels, the value 1
            Gauge(f"{METRIC_PREFIX}cache_config_info", "Information of the LLMEngine's CacheConfig.",
                  [*label, *cache_config], registry=self.registry).labels(
                **label, **{k: str(v) for k, v in cache_config.items()}).set(1)

        def histogram(name: str, documentation: str, buckets) -> Histogram:
            return Histogram(f"{METRIC_PREFIX}{name}", documentation, list(label), buckets=buckets,
                             registry=self.registry).labels(**label)

        tokens = one_two_five_buckets(max_model_len)
        self._prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens of a finished request.", tokens)
        self._generation_tokens = histogram("request_generation_tokens", "Generated tokens of a finished request.",
                                            tokens)
        self._params_n = histogram("request_params_n", "The n parameter of a finished request.", N_BUCKETS)
        self._params_max_tokens = histogram("request_params_max_tokens",
                                            "The max_tokens parameter of a finished request.", tokens)
        self._phases = {  # vLLM's request phase histograms (FinishedSequence's fields)
            field: histogram(f"request_{name}_time_seconds", documentation, E2E_BUCKETS)
            for field, name, documentation in (
                ("queue_s", "queue", "Time a finished request waited before its first scheduling, in seconds."),
                ("prefill_s", "prefill", "Time from a finished request's first scheduling to its first token."),
                ("decode_s", "decode", "Time from a finished request's first token to its last, in seconds."),
                ("inference_s", "inference", "Time from a finished request's first scheduling to its last token."))}
        self._time_per_output_token = histogram(
            "request_time_per_output_token_seconds",
            "A finished request's mean time between its output tokens after the first, in seconds.",
            INTER_TOKEN_BUCKETS)
        self._ttft = histogram("time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS)
        self._inter_token = _TokenHistogram(f"{METRIC_PREFIX}inter_token_latency_seconds",
                                            "Time between consecutive output tokens of a request, in seconds.",
                                            INTER_TOKEN_BUCKETS, label,
                                            also_named=[f"{METRIC_PREFIX}time_per_output_token_seconds"])
        self.registry.register(self._inter_token)
        self._e2e = histogram("e2e_request_latency_seconds",
                              "End-to-end request latency (arrival to last output) in seconds.", E2E_BUCKETS)
        self._success = Counter(f"{METRIC_PREFIX}request_success", "Finished requests, by finish reason.",
                                ["model_name", "finished_reason"], registry=self.registry)
        for reason in FINISH_REASONS:  # every series from the start at 0, as vLLM's (dashboards read 0, not no data)
            self._success.labels(model_name=model_name, finished_reason=reason)
        self._model_name = model_name
        self.registry.register(_EngineStateCollector(model_name, read_stats))

    # -- StatLogger ----------------------------------------------------------------------

    def on_first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def on_inter_token(self, seconds: float, count: int = 1) -> None:
        self._inter_token.observe(seconds, count)

    def on_finished(self, finished: "FinishedSequence") -> None:
        """A sequence finished: one observation each of its latency, tokens and parameters, one success (vLLM's
        counts, a request of ``n`` sequences being ``n`` requests there; ``n`` itself once a request)."""
        self._e2e.observe(finished.e2e_s)
        self._success.labels(model_name=self._model_name, finished_reason=finished.finish_reason).inc()
        self._prompt_tokens.observe(finished.prompt_tokens)
        self._generation_tokens.observe(finished.generation_tokens)
        if finished.n is not None:
            self._params_n.observe(finished.n)
        if finished.max_tokens is not None:
            self._params_max_tokens.observe(finished.max_tokens)
        if finished.time_per_output_token_s is not None:
            self._time_per_output_token.observe(finished.time_per_output_token_s)
        for field, phase in self._phases.items():
            seconds = getattr(finished, field)
            if seconds is not None:
                phase.observe(seconds)

    # -- exposition -----------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text format of every metric (reads engine stats: may wait one step)."""
        return generate_latest(self.registry)


class _TokenHistogram(Collector):
    """A histogram observed once a generated token: its bucket counts kept under one lock and handed to Prometheus
    at scrape time, in the text ``Histogram`` gives. ``prometheus_client``'s ``Histogram.observe`` takes a lock for
    its sum and another for its bucket with a Python loop over the bounds between; at 512 streams the inter-token
    histogram was ~15% of the server process's samples (``py-spy``, benchmarks/NOTES.md), on the thread that hands
    the engine's outputs to the streams. ``count``: that many tokens of the same interval in one call."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float], labels: dict,
                 also_named: Sequence[str] = ()):
        self._names, self._documentation, self._labels = (name, *also_named), documentation, dict(labels)
        self._bounds = list(buckets)  # upper bounds; +Inf after them
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float, count: int = 1) -> None:
        bucket = bisect.bisect_left(self._bounds, value)  # the first bound >= value: Prometheus's "le"
        with self._lock:
            self._counts[bucket] += count
            self._sum += value * count

    def describe(self):
        return []

    def collect(self):
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, buckets = 0, []
        for bound, n in zip([*map(floatToGoString, self._bounds), "+Inf"], counts):
            cumulative += n
            buckets.append((bound, cumulative))
        for name in self._names:
            family = HistogramMetricFamily(name, self._documentation, labels=list(self._labels))
            family.add_metric(list(self._labels.values()), buckets, total)
            yield family


class _EngineStateCollector(Collector):
    """Gauges and counters read from one engine stats snapshot per scrape."""

    def __init__(self, model_name: str, read_stats: Callable[[], dict]):
        self._model_name = model_name
        self._read_stats = read_stats

    def describe(self):
        return []  # values are read at scrape time; nothing to describe up front

    def collect(self):
        stats = self._read_stats()
        labels = [self._model_name]
        used, usable = stats["num_used_blocks"], stats["num_usable_blocks"]
        usage = used / usable if usable else 0.0
        gauges = [
            ("num_requests_running", "Sequences in the running batch.", stats["num_running"]),
            ("num_requests_waiting", "Sequences waiting to be scheduled.", stats["num_waiting"]),
            ("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", usage),
            ("gpu_cache_usage_perc", "kv_cache_usage_perc under vLLM's name before 0.11.", usage),
            ("kv_cache_used_blocks", "KV-cache blocks in use.", used),
            ("kv_cache_total_blocks", "KV-cache blocks that can be handed out.", usable),
            ("max_batch_seqs", "Largest number of sequences run in one engine step so far.", stats["max_batch_seqs"]),
        ]
        for name, doc, value in gauges:
            family = GaugeMetricFamily(f"{METRIC_PREFIX}{name}", doc, labels=["model_name"])
            family.add_metric(labels, value)
            yield family
        counters = [
            ("prompt_tokens", "Prompt tokens computed (a sequence's once its first token came).",
             stats["prompt_tokens"]),
            ("generation_tokens", "Tokens generated.", stats["generation_tokens"]),
            ("num_preemptions", "Sequences preempted (KV blocks freed, recomputed later).", stats["num_preemptions"]),
            ("prefix_cache_queries", "Tokens of admitted requests looked up in the prefix cache.",
             stats["prefix_cache_queries"]),
            ("prefix_cache_hits", "Tokens of admitted requests found in the prefix cache.", stats["prefix_cache_hits"]),
            ("gpu_prefix_cache_queries", "prefix_cache_queries under vLLM's name before 0.11.",
             stats["prefix_cache_queries"]),
            ("gpu_prefix_cache_hits", "prefix_cache_hits under vLLM's name before 0.11.", stats["prefix_cache_hits"]),
            ("spec_decode_num_drafts", "Decodes that ran speculative drafts.", stats.get("spec_decode_num_drafts", 0)),
            ("spec_decode_num_draft_tokens", "Speculative draft tokens run.",
             stats.get("spec_decode_num_draft_tokens", 0)),
            ("spec_decode_num_accepted_tokens", "Speculative draft tokens accepted.",
             stats.get("spec_decode_num_accepted_tokens", 0)),
            ("engine_steps", "Engine steps run.", stats["steps"]),
            ("engine_steps_planned_ahead", "Engine steps planned while the step before them ran on the device "
             "(asynchronous scheduling).", stats["steps_planned_ahead"]),
            ("engine_host_seconds", "Seconds the engine loop spent in steps on its own (host) work.", stats["host_s"]),
            ("engine_yield_seconds", "Seconds the engine loop waited between steps, with requests unfinished, for "
             "callers holding the engine (adding or aborting requests, reading stats).",
             stats.get("loop_yield_s", 0.0)),
            ("engine_idle_seconds", "Seconds the engine loop waited with no request unfinished.",
             stats.get("loop_idle_s", 0.0)),
            ("engine_after_step_seconds", "Seconds the engine loop spent after steps handing their outputs on.",
             stats.get("after_step_s", 0.0)),
            ("engine_wait_seconds", "Seconds the engine loop waited in steps for the device's results.",
             stats["wait_s"]),
        ]
        for name, doc, value in counters:
            family = CounterMetricFamily(f"{METRIC_PREFIX}{name}", doc, labels=["model_name"])
            family.add_metric(labels, value)
            yield family
        counts = stats.get("iteration_tokens")
        if counts is not None:  # vLLM's histogram of the tokens an engine step (one model forward) ran
            cumulative = itertools.accumulate(counts)
            family = HistogramMetricFamily(f"{METRIC_PREFIX}iteration_tokens_total",
                                           "Tokens run in one engine step (a model forward).", labels=["model_name"])
            family.add_metric(labels, [(floatToGoString(b), c) for b, c in
                                       zip((*ITERATION_TOKENS_BUCKETS, float("inf")), cumulative)],
                              sum_value=stats["iteration_tokens_sum"])
            yield family
        family = CounterMetricFamily(f"{METRIC_PREFIX}spec_decode_num_accepted_tokens_per_pos",
                                     "Speculative draft tokens accepted at each draft position (0: the first).",
                                     labels=["model_name", "position"])
        for position, value in enumerate(stats.get("spec_decode_num_accepted_tokens_per_pos", [])):
            family.add_metric([*labels, str(position)], value)
        yield family
        lora = stats.get("lora")
        if lora is not None:  # vLLM's: the adapters in use as labels, the time of this reading as the value
            family = GaugeMetricFamily(f"{METRIC_PREFIX}lora_requests_info", "Running stats on LoRA requests.",
                                       labels=["model_name", "max_lora", "waiting_lora_adapters",
                                               "running_lora_adapters"])
            family.add_metric([*labels, str(lora["max_lora"]), ",".join(lora["waiting"]), ",".join(lora["running"])],
                              time.time())
            yield family


def offline_finished_sequences(output: RequestOutput, params: Optional[SamplingParams]) -> list[FinishedSequence]:
    """A finished request's sequences as the server's per-request metrics observe them, from its
    ``RequestOutput.metrics`` (the offline ``LLM`` reads only final outputs: its sequences share the request's
    first and last token times)."""
    from engine.async_llm import FinishedSequence
    from engine.outputs import elapsed

    metrics = getattr(output, "metrics", None)
    if metrics is None:
        return []

    arrival, scheduled = metrics.arrival_time, metrics.first_scheduled_time
    first, last = metrics.first_token_time, metrics.last_token_time
    end = metrics.finished_time or last or arrival
    completions = getattr(output, "outputs", None)
    if not isinstance(completions, list):  # a pooled request: one output, no tokens
        return [FinishedSequence(end - arrival, "stop", len(output.prompt_token_ids or ()), 0)]
    return [FinishedSequence(
        end - arrival, c.finish_reason or "abort", len(output.prompt_token_ids or ()), len(c.token_ids),
        elapsed(arrival, first if c.token_ids else None), (params.n if params is not None else 1) if i == 0 else None,
        params.max_tokens if params is not None else None, queue_s=metrics.time_in_queue,
        prefill_s=elapsed(scheduled, first), decode_s=elapsed(first, last), inference_s=elapsed(scheduled, last))
        for i, c in enumerate(completions)]
