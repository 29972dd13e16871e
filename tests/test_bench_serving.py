"""``scripts/bench_serving.py`` (the PROTOCOL ``serving`` workload): seeded request lengths and
Poisson arrivals, the summary's percentiles and error count, and a whole run against a real
``scripts/serve.py`` child process (a tiny dummy model with the word-level tokenizer the script
writes for tokenizer-less folders), streamed through the ``openai`` client."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

for _module in ("fastapi", "uvicorn", "openai", "httpx"):  # the server's and the client's; absent on the GPU image
    pytest.importorskip(_module)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import bench_common  # noqa: E402
import bench_serving  # noqa: E402

from tests.test_bench_and_trace import TINY_CONFIG  # noqa: E402  (the tiny dummy Llama of the bench tests)


def test_requests_and_arrivals_are_seeded_and_in_range():
    requests = bench_common.make_requests(200, 100, 40, 0.5, vocab_size=384, seed=3)
    assert requests == bench_common.make_requests(200, 100, 40, 0.5, vocab_size=384, seed=3)
    assert all(50 <= len(p) <= 150 and 20 <= m <= 60 and max(p) < 384 for p, m in requests)
    assert len({len(p) for p, _ in requests}) > 10  # lengths vary
    assert [len(p) for p, _ in bench_common.make_requests(5, 7, 3, 0.0, 384, 0)] == [7] * 5

    offsets = bench_serving.arrival_offsets(4000, 20.0, seed=1)
    assert offsets[0] == 0 and all(b >= a for a, b in zip(offsets, offsets[1:]))
    assert math.isclose(offsets[-1] / (len(offsets) - 1), 1 / 20.0, rel_tol=0.1)  # mean gap 1/rate
    assert bench_serving.arrival_offsets(3, float("inf"), seed=1) == [0.0] * 3
    with pytest.raises(ValueError, match="request-rate"):
        bench_serving.arrival_offsets(3, 0.0, seed=1)
    with pytest.raises(ValueError, match="range-ratio"):
        bench_common.make_requests(3, 10, 10, 1.0, 384, 0)


def test_summary_percentiles_and_errors():
    ok = [bench_serving.RequestResult(prompt_len=10, max_tokens=4, ok=True, ttft_s=t, itl_s=[0.01, 0.03], e2e_s=t + 0.04,
                                      output_tokens=4) for t in (0.1, 0.2, 0.3)]
    failed = bench_serving.RequestResult(prompt_len=10, max_tokens=4, error="APIStatusError: 400")
    s = bench_serving.summarize(ok + [failed], wall_s=2.0)
    assert (s["completed"], s["errors"], s["error_samples"]) == (3, 1, ["APIStatusError: 400"])
    assert math.isclose(s["ttft_p50_ms"], 200.0) and s["ttft_p99_ms"] <= 300.0
    assert math.isclose(s["itl_p50_ms"], 20.0) and math.isclose(s["output_tok_s"], 6.0)
    assert math.isclose(s["total_tok_s"], 21.0)
    assert s["ttft_ms_samples"] == [100.0, 200.0, 300.0] and len(s["itl_ms_samples"]) == 6  # the latency CDF's data
    many = bench_serving._quantiles(np.arange(10_000.0))
    assert len(many) == bench_serving.MAX_ITL_SAMPLES and many[0] == 0 and many[-1] == 9999


def test_serving_run_against_a_started_server(tmp_path):
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    results = tmp_path / "results"
    r = bench_serving.main(["--model", str(model), "--num-requests", "10", "--input-len", "12", "--output-len", "6",
                            "--request-rate", "50", "--max-concurrency", "4", "--num-warmup", "1",
                            "--results-dir", str(results), "--startup-timeout-s", "300"])
    assert (r["completed"], r["errors"]) == (10, 0), r["error_samples"]
    requested = bench_common.make_requests(10, 12, 6, 0.5, vocab_size=384, seed=0)
    assert r["output_tokens"] == sum(m for _, m in requested)  # ignore_eos: every request ran to max_tokens
    assert r["input_tokens"] == sum(len(p) for p, _ in requested)
    for field in ("request_rate", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "output_tok_s", "errors"):
        assert r[field] is not None, field  # PROTOCOL's serving fields
    assert r["ttft_p50_ms"] <= r["ttft_p99_ms"] and r["itl_p50_ms"] <= r["itl_p99_ms"]
    assert r["engine_steps"] > 0 and r["tokens_per_step"] > 0 and r["engine_host_ms_per_step"] > 0  # /metrics
    assert (r["device"], r["dtype"], r["backend"]) == ("cpu", "float32", "cpu")  # from the server's /version
    (path,) = list(results.glob("serving-cpu-*.json"))
    assert json.loads(path.read_text())["output_tok_s"] == pytest.approx(r["output_tok_s"])
    assert not (model / "tokenizer.json").exists()  # the tokenizer went into a temporary copy


def test_serving_run_through_the_plain_httpx_client(tmp_path):
    """``--client httpx``: the same request stream with the events parsed by ``json`` (no SDK), here from two
    client processes; every request counted, its tokens from the usage chunk, the client named in the result."""
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    r = bench_serving.main(["--model", str(model), "--num-requests", "6", "--input-len", "12", "--output-len", "5",
                            "--request-rate", "inf", "--num-warmup", "1", "--client", "httpx", "--client-processes",
                            "2", "--results-dir", str(tmp_path / "results"), "--startup-timeout-s", "300"])
    assert (r["completed"], r["errors"], r["client"], r["client_processes"]) == (6, 0, "httpx", 2), r["error_samples"]
    requested = bench_common.make_requests(6, 12, 5, 0.5, vocab_size=384, seed=0)
    assert r["output_tokens"] == sum(m for _, m in requested)
    assert r["ttft_p50_ms"] is not None and r["itl_p50_ms"] is not None
    # The clock starts once both processes are up with their clients' modules imported, so the run's duration is
    # about its slowest request's: here ~0.1 s more, against ~0.6 s when `openai` was imported after the start.
    late = r["duration_s"] - max(r["e2e_ms_samples"]) / 1e3
    assert 0 <= late < 0.35, late
