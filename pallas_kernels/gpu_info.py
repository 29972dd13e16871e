"""Facts about the GPU the kernels size their grids for; defaults where none is visible (interpret mode)."""

from __future__ import annotations

import jax

DEFAULT_CORE_COUNT = 132  # H100 / H200 SXM


def core_count() -> int:
    """Streaming multiprocessors of the first device (``DEFAULT_CORE_COUNT`` off a GPU)."""
    return getattr(jax.devices()[0], "core_count", None) or DEFAULT_CORE_COUNT
