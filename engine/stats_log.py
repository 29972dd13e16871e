"""vLLM's periodic stats line (its ``LoggingStatLogger``): every ``$VLLM_LOG_STATS_INTERVAL`` seconds (10 by default)
one line of the prompt and generation throughputs since the line before, the running and waiting requests, the KV
cache's usage and the prefix cache's hit rate, and a second line of speculative decoding's acceptance when drafts
ran. At INFO while the engine works (and once more when it has gone idle), else at DEBUG, so an idle server's log
stays quiet. Reads the engine's stats dict (``engine_loop.engine_stats``'s keys) through a callable, so the same
logger serves an in-process engine and one in a child process; owns a daemon thread and nothing else.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Optional

logger = logging.getLogger("pagedjax")

LOG_STATS_INTERVAL_ENV = "VLLM_LOG_STATS_INTERVAL"  # vLLM's name and default
DEFAULT_LOG_STATS_INTERVAL_S = 10.0


def log_stats_interval() -> float:
    """Seconds between two stats lines: ``$VLLM_LOG_STATS_INTERVAL``, else 10; a value that is no positive number
    is warned of and taken as 10 (vLLM takes one <= 0 as its default too)."""
    text = os.environ.get(LOG_STATS_INTERVAL_ENV, "")
    if not text:
        return DEFAULT_LOG_STATS_INTERVAL_S
    try:
        interval = float(text)
    except ValueError:
        interval = 0.0
    if not 0 < interval < float("inf"):
        logger.warning("$%s=%r is no positive number of seconds: stats are logged every %g s", LOG_STATS_INTERVAL_ENV,
                       text, DEFAULT_LOG_STATS_INTERVAL_S)
        return DEFAULT_LOG_STATS_INTERVAL_S
    return interval


class StatsLines:
    """The lines of one interval from two snapshots of the engine's stats: the one at the last line and now's."""

    def __init__(self, stats: dict, now: float):
        self._last, self._last_time = stats, now
        self._last_throughputs = (0.0, 0.0)
        self._hit_rate = 0.0  # kept through intervals without lookups, as vLLM's rate over recent requests

    def lines(self, stats: dict, now: float) -> tuple[list[str], bool]:
        """This interval's lines, and whether they are news (INFO): tokens ran in it or in the one before."""
        last, seconds = self._last, max(now - self._last_time, 1e-9)
        prompt = (stats["prompt_tokens"] - last["prompt_tokens"]) / seconds
        generation = (stats["generation_tokens"] - last["generation_tokens"]) / seconds
        queries = stats["prefix_cache_queries"] - last["prefix_cache_queries"]
        if queries > 0:
            self._hit_rate = (stats["prefix_cache_hits"] - last["prefix_cache_hits"]) / queries
        usable = stats["num_usable_blocks"]
        usage = stats["num_used_blocks"] / usable if usable else 0.0
        lines = [f"Avg prompt throughput: {prompt:.1f} tokens/s, Avg generation throughput: {generation:.1f} "
                 f"tokens/s, Running: {stats['num_running']} reqs, Waiting: {stats['num_waiting']} reqs, "
                 f"GPU KV cache usage: {100 * usage:.1f}%, Prefix cache hit rate: {100 * self._hit_rate:.1f}%"]
        drafts = stats.get("spec_decode_num_drafts", 0) - last.get("spec_decode_num_drafts", 0)
        if drafts > 0:
            drafted = stats["spec_decode_num_draft_tokens"] - last["spec_decode_num_draft_tokens"]
            accepted = stats["spec_decode_num_accepted_tokens"] - last["spec_decode_num_accepted_tokens"]
            before = last.get("spec_decode_num_accepted_tokens_per_pos") or ()
            per_position = [(n - (before[i] if i < len(before) else 0)) / drafts
                            for i, n in enumerate(stats["spec_decode_num_accepted_tokens_per_pos"])]
            lines.append(
                f"SpecDecoding metrics: Mean acceptance length: {1 + accepted / drafts:.2f}, Accepted throughput: "
                f"{accepted / seconds:.2f} tokens/s, Drafted throughput: {drafted / seconds:.2f} tokens/s, "
                f"Accepted: {accepted} tokens, Drafted: {drafted} tokens, Per-position acceptance rate: "
                f"{', '.join(f'{rate:.3f}' for rate in per_position)}, Avg Draft acceptance rate: "
                f"{100 * accepted / max(drafted, 1):.1f}%")
        news = any((prompt, generation, *self._last_throughputs))
        self._last, self._last_time, self._last_throughputs = stats, now, (prompt, generation)
        return lines, news


class PeriodicStatsLogger:
    """Logs ``StatsLines`` every ``interval_s`` seconds from a daemon thread until ``stop()``; a failing
    ``read_stats`` (the engine has died, or shut down) ends the thread quietly."""

    def __init__(self, read_stats: Callable[[], dict], interval_s: Optional[float] = None,
                 log: logging.Logger = logger):
        self._read_stats, self._log = read_stats, log
        self.interval_s = log_stats_interval() if interval_s is None else interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pagedjax-stats-log", daemon=True)

    def start(self) -> "PeriodicStatsLogger":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            lines = StatsLines(self._read_stats(), time.monotonic())
            while not self._stopped.wait(self.interval_s):
                texts, news = lines.lines(self._read_stats(), time.monotonic())
                for text in texts:
                    self._log.log(logging.INFO if news else logging.DEBUG, text)
        except Exception as e:  # the engine is gone: its own error is reported where requests see it
            if not self._stopped.is_set():
                self._log.debug("periodic stats logging stopped: %s", e)
