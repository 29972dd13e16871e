"""Seconds JAX spends making programs (tracing, lowering, compiling or loading from the
persistent cache), read from ``jax.monitoring``'s duration events.

The engine reports its start-up by phase with it, and the benchmarks subtract the
compiles that happen inside a timed run. Knows nothing of models or requests.
"""

from __future__ import annotations

import threading
import time

import jax

# jax.monitoring event -> phase name. The backend event spans XLA's compile, or the load of the
# executable when the persistent compilation cache has it (counted apart as "cache_load" too).
PHASES = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
    "/jax/compilation_cache/cache_retrieval_time_sec": "cache_load",
}
_TOTAL_PREFIX = "/jax/core/compile/"  # trace + lower + compile: the time JAX took making programs
# jax.monitoring counter events -> their names here: programs looked up in the persistent cache, and found.
COUNTS = {
    "/jax/compilation_cache/compile_requests_use_cache": "cache_lookups",
    "/jax/compilation_cache/cache_hits": "cache_hits",
}


class CompileTimer:
    """While active (a context manager, any thread): every compile event with the time it ended.

    ``seconds``: trace + lower + compile; ``seconds_within(a, b)``: those that ended in
    ``[a, b]`` (a traced step's own compiles); ``seconds_by_phase()``: the sum per phase; ``compiled()``: the
    programs compiled;
    ``slowest(n)``: the ``n`` programs (jitted functions, by name) that took longest to make;
    ``counts``: persistent-cache lookups and hits (``COUNTS``; a warm start should hit every lookup).
    """

    _lock = threading.Lock()
    _active: list["CompileTimer"] = []
    _registered = False

    def __init__(self):
        self.events: list[tuple[str, float, float, str]] = []  # (phase, perf_counter at the end, seconds, program)
        self.counts = dict.fromkeys(COUNTS.values(), 0)

    @property
    def seconds(self) -> float:
        return sum(d for phase, _, d, _ in self.events if phase != "cache_load")

    def seconds_within(self, start: float, end: float) -> float:
        return sum(d for phase, t, d, _ in self.events if start <= t <= end and phase != "cache_load")

    def seconds_by_phase(self) -> dict[str, float]:
        totals = dict.fromkeys(PHASES.values(), 0.0)
        for phase, _, d, _ in self.events:
            totals[phase] += d
        return totals

    def compiled(self) -> list[str]:
        """The programs compiled (or loaded from the persistent cache) while active, by name, in order."""
        return [name for phase, _, _, name in self.events if phase == "compile"]

    def slowest(self, n: int = 3) -> list[tuple[str, float]]:
        """``(program name, seconds to trace, lower and compile it)`` of the ``n`` slowest, slowest first
        (a name made several times, e.g. at several shapes, sums them)."""
        totals: dict[str, float] = {}
        for phase, _, d, name in self.events:
            if phase != "cache_load":
                totals[name] = totals.get(name, 0.0) + d
        return sorted(totals.items(), key=lambda item: -item[1])[:n]

    @classmethod
    def _listener(cls, event: str, duration: float, fun_name: str = "?", **_) -> None:
        phase = PHASES.get(event)
        if phase is None and event.startswith(_TOTAL_PREFIX):
            phase = "compile"  # an event newer JAX versions may add under the same prefix
        if phase is None:
            return
        now = time.perf_counter()
        name = str(fun_name)
        if name.startswith("jit(") and name.endswith(")"):  # lowering and compiling name it jit(f); tracing, f
            name = name[4:-1]
        with cls._lock:
            for timer in cls._active:
                timer.events.append((phase, now, duration, name))

    @classmethod
    def _counter(cls, event: str, **_) -> None:
        name = COUNTS.get(event)
        if name is not None:
            with cls._lock:
                for timer in cls._active:
                    timer.counts[name] += 1

    def __enter__(self) -> "CompileTimer":
        with CompileTimer._lock:
            if not CompileTimer._registered:
                jax.monitoring.register_event_duration_secs_listener(CompileTimer._listener)
                jax.monitoring.register_event_listener(CompileTimer._counter)
                CompileTimer._registered = True
            CompileTimer._active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with CompileTimer._lock:
            CompileTimer._active.remove(self)
