"""vLLM's periodic stats line (``engine.stats_log``) and ``LLM.get_metrics``' reader, from made-up engine stats: the
rates of one interval, the queue, the KV cache, the prefix cache's hit rate, speculative decoding's acceptance; INFO
only while the engine works; each kind of metric as vLLM's reader gives it."""

import logging
import threading

from engine.stats_log import LOG_STATS_INTERVAL_ENV, PeriodicStatsLogger, StatsLines, log_stats_interval

IDLE = dict(prompt_tokens=0, generation_tokens=0, prefix_cache_queries=0, prefix_cache_hits=0, num_running=0,
            num_waiting=0, num_used_blocks=0, num_usable_blocks=100)


def test_an_intervals_rates_queue_and_caches():
    lines = StatsLines(IDLE, now=0.0)
    busy = {**IDLE, "prompt_tokens": 500, "generation_tokens": 120, "prefix_cache_queries": 400,
            "prefix_cache_hits": 100, "num_running": 3, "num_waiting": 2, "num_used_blocks": 25}
    texts, news = lines.lines(busy, now=10.0)
    assert news and texts == ["Avg prompt throughput: 50.0 tokens/s, Avg generation throughput: 12.0 tokens/s, "
                              "Running: 3 reqs, Waiting: 2 reqs, GPU KV cache usage: 25.0%, "
                              "Prefix cache hit rate: 25.0%"]
    # Idle after work: one more line at INFO (the rates fall to 0; the hit rate stays the last measured), then DEBUG
    done = {**busy, "num_running": 0, "num_waiting": 0, "num_used_blocks": 0}
    texts, news = lines.lines(done, now=20.0)
    assert news and texts[0].startswith("Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 0.0")
    assert texts[0].endswith("Prefix cache hit rate: 25.0%")
    assert lines.lines(done, now=30.0)[1] is False


def test_speculative_decodings_line_when_drafts_ran():
    start = {**IDLE, "spec_decode_num_drafts": 10, "spec_decode_num_draft_tokens": 40,
             "spec_decode_num_accepted_tokens": 20, "spec_decode_num_accepted_tokens_per_pos": (8, 6, 4, 2)}
    lines = StatsLines(start, now=0.0)
    assert len(lines.lines({**start, "generation_tokens": 5}, now=1.0)[0]) == 1  # no drafts this interval
    later = {**start, "generation_tokens": 60, "spec_decode_num_drafts": 20, "spec_decode_num_draft_tokens": 80,
             "spec_decode_num_accepted_tokens": 50, "spec_decode_num_accepted_tokens_per_pos": (18, 14, 10, 8)}
    spec = lines.lines(later, now=2.0)[0][1]
    assert spec == ("SpecDecoding metrics: Mean acceptance length: 4.00, Accepted throughput: 30.00 tokens/s, "
                    "Drafted throughput: 40.00 tokens/s, Accepted: 30 tokens, Drafted: 40 tokens, Per-position "
                    "acceptance rate: 1.000, 0.800, 0.600, 0.600, Avg Draft acceptance rate: 75.0%")


def test_the_interval_from_the_environment(monkeypatch, caplog):
    """``$VLLM_LOG_STATS_INTERVAL``; one that is no positive number is warned of and taken as 10 (it raised, after
    the server's engine had started, and the server hung)."""
    monkeypatch.delenv(LOG_STATS_INTERVAL_ENV, raising=False)
    assert log_stats_interval() == 10.0
    monkeypatch.setenv(LOG_STATS_INTERVAL_ENV, "2.5")
    assert log_stats_interval() == 2.5
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv(LOG_STATS_INTERVAL_ENV, bad)
        with caplog.at_level(logging.WARNING, logger="pagedjax"):
            assert log_stats_interval() == 10.0
        assert f"${LOG_STATS_INTERVAL_ENV}={bad!r} is no positive number" in caplog.text


def test_the_thread_logs_until_stopped_and_ends_quietly_when_the_engine_is_gone(caplog):
    reads, gone = [], threading.Event()

    def read_stats():
        reads.append(1)
        if len(reads) > 4:  # the first read starts the interval; reads 2-4 make a line each
            gone.set()
            raise RuntimeError("the engine loop has shut down")
        return {**IDLE, "generation_tokens": 10 * len(reads)}

    with caplog.at_level(logging.INFO, logger="pagedjax"):
        stats_logger = PeriodicStatsLogger(read_stats, interval_s=0.01).start()
        assert gone.wait(5)
        stats_logger.stop()
    infos = [r for r in caplog.records if r.levelno == logging.INFO and "generation throughput" in r.getMessage()]
    assert len(infos) == 3 and not [r for r in caplog.records if r.levelno > logging.INFO]
    stopped = PeriodicStatsLogger(lambda: IDLE, interval_s=60).start()
    stopped.stop()  # at once, not after the interval
    assert not stopped._thread.is_alive()


def test_the_metrics_snapshot_reads_each_kind_as_vllms_reader_does():
    """``LLM.get_metrics()``'s reader (``engine.metrics_reader``): counters, gauges, histograms with cumulative
    buckets, and a counter by draft position as one vector; metrics not named ``vllm:`` are left out."""
    from engine.metrics import ServingMetrics
    from engine.metrics_reader import Counter, Gauge, Histogram, Vector, metrics_snapshot

    stats = {**IDLE, "num_preemptions": 2, "max_batch_seqs": 3, "steps": 5, "steps_planned_ahead": 0, "host_s": 0.0,
             "wait_s": 0.0, "spec_decode_num_accepted_tokens_per_pos": (7, 4, 1)}
    metrics = ServingMetrics("m", lambda: stats, max_model_len=64)
    metrics.on_first_token(0.02)
    metrics.on_first_token(0.3)
    snapshot = {m.name: m for m in metrics_snapshot(metrics.registry)}
    assert snapshot["vllm:num_preemptions"] == Counter("vllm:num_preemptions", {"model_name": "m"}, 2)
    assert snapshot["vllm:num_requests_waiting"] == Gauge("vllm:num_requests_waiting", {"model_name": "m"}, 0.0)
    assert snapshot["vllm:spec_decode_num_accepted_tokens_per_pos"] == Vector(
        "vllm:spec_decode_num_accepted_tokens_per_pos", {"model_name": "m"}, [7, 4, 1])
    ttft = snapshot["vllm:time_to_first_token_seconds"]
    assert isinstance(ttft, Histogram) and (ttft.count, round(ttft.sum, 6)) == (2, 0.32)
    assert ttft.buckets["0.02"] == 1 and ttft.buckets["0.5"] == ttft.buckets["+Inf"] == 2
    assert all(name.startswith("vllm:") for name in snapshot)
