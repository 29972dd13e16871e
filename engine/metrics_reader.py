"""vLLM's ``LLM.get_metrics()`` snapshot types (``vllm.v1.metrics.reader``): each ``vllm:`` metric of a Prometheus
registry as a ``Counter``, ``Gauge``, ``Histogram`` (cumulative bucket counts by their ``le``) or ``Vector`` (a
counter with a ``position`` label, as its list of values). Owns no state."""

from __future__ import annotations

import dataclasses
from prometheus_client import CollectorRegistry


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
