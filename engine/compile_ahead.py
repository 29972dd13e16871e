"""Compiling several jitted programs at once, ahead of their first call.

XLA compiles on the host's CPU and releases the GIL while it does, so threads overlap the compiles of
different programs (lowering, which is Python, stays in the calling thread). jit keeps the program an
ahead-of-time ``.lower(...).compile()`` made, so the first call with the same arguments runs it without
compiling again. On the H200 machine (16 cores) the 8B's 14 step programs took 61.9 s one after another and
28.2 s four at once (benchmarks/NOTES.md, run 18d).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Iterable, Optional

DEFAULT_WORKERS = 4


def compile_workers() -> int:
    """Programs compiled at once: ``$PAGEDJAX_PRECOMPILE_WORKERS``, else ``DEFAULT_WORKERS`` (at most the CPU
    count); 1 compiles each program at its first call, one after another."""
    value = os.environ.get("PAGEDJAX_PRECOMPILE_WORKERS")
    if value is not None:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"$PAGEDJAX_PRECOMPILE_WORKERS must be a positive integer, got {value!r}")
        return int(value)
    return max(1, min(DEFAULT_WORKERS, os.cpu_count() or 1))


def compile_ahead(lowerings: Iterable[Callable], workers: int, on_done: Optional[Callable[[], None]] = None) -> None:
    """Call each of ``lowerings`` (each returns a ``jax.stages.Lowered``: ``jitted.lower(*args)``) in this
    thread and compile what it returns in a pool of ``workers`` threads; ``on_done()`` after each compile.
    Returns when all are compiled; a failed compile raises here."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="compile-ahead") as pool:
        futures = [pool.submit(lower().compile) for lower in lowerings]
        for future in as_completed(futures):
            future.result()
            if on_done is not None:
                on_done()
