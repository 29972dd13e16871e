"""Test-session hygiene: one pytest process runs the whole CPU suite, so what each module compiles is released
after it.

XLA's CPU executables hold their JIT'd code in memory mappings, and a Linux process may have at most
``vm.max_map_count`` (65,530 by default) of them: the suite's ~750 tests compile enough programs that, kept for
the whole session, the count ran into that limit and XLA crashed mid-compile (a segfault; 64,500 mappings at the
crash). The engine also freezes its start-up objects out of the garbage collector's way (``gc.freeze``), which
keeps every engine a test made; they are unfrozen here, between modules, so they can be collected.
"""

from __future__ import annotations

import gc

import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    import jax

    gc.unfreeze()
    gc.collect()
    jax.clear_caches()
