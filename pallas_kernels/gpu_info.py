"""Facts about the GPU the kernels size their grids for; defaults where none is visible (interpret mode)."""

from __future__ import annotations

import jax

DEFAULT_CORE_COUNT = 132  # H100 / H200 SXM


def core_count() -> int:
    """Streaming multiprocessors of the first device (``DEFAULT_CORE_COUNT`` off a GPU)."""
    return getattr(jax.devices()[0], "core_count", None) or DEFAULT_CORE_COUNT


def is_hopper() -> bool:
    """Whether JAX runs on a GPU of compute capability 9.x (sm_90: wgmma, TMA), the Mosaic GPU kernels' target."""
    if jax.default_backend() != "gpu":
        return False
    return str(getattr(jax.devices()[0], "compute_capability", "0")).split(".")[0] == "9"
