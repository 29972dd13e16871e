"""vLLM's ``LLM.get_metrics()`` snapshot types (``vllm.v1.metrics.reader``): each ``vllm:`` metric of a Prometheus
registry as a ``Counter``, ``Gauge``, ``Histogram`` (cumulative bucket counts by their ``le``) or ``Vector`` (a
counter with a ``position`` label, as its list of values), and ``offline_finished_sequences``: what the offline
``LLM``'s finished requests give the per-request metrics. Owns no state."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

from prometheus_client import CollectorRegistry

if TYPE_CHECKING:
    from engine.async_llm import FinishedSequence
    from engine.outputs import RequestOutput
    from engine.sampling_params import SamplingParams


@dataclasses.dataclass
class Metric:
    name: str
    labels: dict[str, str]


@dataclasses.dataclass
class Counter(Metric):
    value: int


@dataclasses.dataclass
class Vector(Metric):
    values: list[int]


@dataclasses.dataclass
class Gauge(Metric):
    value: float


@dataclasses.dataclass
class Histogram(Metric):
    count: int
    sum: float
    buckets: dict[str, int]


def metrics_snapshot(registry: CollectorRegistry) -> list[Metric]:
    """The registry's ``vllm:`` metrics now, one entry a labelled series, as vLLM's ``get_metrics_snapshot``."""
    out: list[Metric] = []
    for family in registry.collect():
        if not family.name.startswith("vllm:"):
            continue
        if family.type == "counter":
            samples = [s for s in family.samples if s.name.endswith("_total")]
            if samples and all("position" in s.labels for s in samples):  # per position: one vector
                labels = {k: v for k, v in samples[0].labels.items() if k != "position"}
                ordered = sorted(samples, key=lambda s: int(s.labels["position"]))
                out.append(Vector(family.name, labels, [int(s.value) for s in ordered]))
                continue
            out += [Counter(family.name, dict(s.labels), int(s.value)) for s in samples]
        elif family.type == "gauge":
            out += [Gauge(family.name, dict(s.labels), float(s.value)) for s in family.samples]
        elif family.type == "histogram":
            series: dict[tuple, Histogram] = {}
            for s in family.samples:
                labels = {k: v for k, v in s.labels.items() if k != "le"}
                histogram = series.setdefault(tuple(sorted(labels.items())), Histogram(family.name, labels, 0, 0.0, {}))
                if s.name.endswith("_bucket"):
                    histogram.buckets[s.labels["le"]] = int(s.value)
                elif s.name.endswith("_count"):
                    histogram.count = int(s.value)
                elif s.name.endswith("_sum"):
                    histogram.sum = float(s.value)
            out += series.values()
    return out


def offline_finished_sequences(output: RequestOutput, params: Optional[SamplingParams]) -> list[FinishedSequence]:
    """A finished request's sequences as the server's per-request metrics observe them, from its
    ``RequestOutput.metrics`` (the offline ``LLM`` reads only final outputs: its sequences share the request's
    first and last token times)."""
    from engine.async_llm import FinishedSequence

    metrics = getattr(output, "metrics", None)
    if metrics is None:
        return []

    def since(start: Optional[float], end: Optional[float]) -> Optional[float]:
        return None if start is None or end is None else end - start

    arrival, scheduled = metrics.arrival_time, metrics.first_scheduled_time
    first, last = metrics.first_token_time, metrics.last_token_time
    end = metrics.finished_time or last or arrival
    completions = getattr(output, "outputs", None)
    if not isinstance(completions, list):  # a pooled request: one output, no tokens
        return [FinishedSequence(end - arrival, "stop", len(output.prompt_token_ids or ()), 0)]
    return [FinishedSequence(
        end - arrival, c.finish_reason or "abort", len(output.prompt_token_ids or ()), len(c.token_ids),
        since(arrival, first if c.token_ids else None), (params.n if params is not None else 1) if i == 0 else None,
        params.max_tokens if params is not None else None, queue_s=metrics.time_in_queue,
        prefill_s=since(scheduled, first), decode_s=since(first, last), inference_s=since(scheduled, last))
        for i, c in enumerate(completions)]
