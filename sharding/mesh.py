"""The device mesh of a run: axis ``tp`` (tensor parallel) with room for ``dp`` (data parallel).

Owns picking the devices and shaping them into a ``jax.sharding.Mesh``, and the
one replicated sharding step inputs use. Knows nothing of models or of which array
is sharded how (``sharding.rules`` does); works the same whether the devices are
on one host or spread over several processes (``sharding.distributed``).

Device order: ``jax.devices()`` lists devices process by process, so with several
hosts the ``tp`` axis runs over the first host's devices, then the next host's.
Keep ``tp`` within a host where possible (its all-reduces run every layer); when a
model needs more devices than one host has, the same code runs unchanged.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

TP_AXIS = "tp"
DP_AXIS = "dp"


def make_mesh(tensor_parallel_size: int, data_parallel_size: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A ``(dp, tp)`` mesh over the first ``dp * tp`` of ``devices`` (default: all devices of all processes).

    Raises ``ValueError`` for a size below 1 or for more devices than there are.
    """
    for name, size in (("tensor_parallel_size", tensor_parallel_size), ("data_parallel_size", data_parallel_size)):
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    needed = tensor_parallel_size * data_parallel_size
    if needed > len(devices):
        kind = devices[0].platform.upper() if devices else "no"
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} x data_parallel_size={data_parallel_size} needs "
            f"{needed} devices, but only {len(devices)} {kind} device(s) are visible to JAX "
            f"(over {jax.process_count()} process(es))"
        )
    grid = np.asarray(devices[:needed], dtype=object).reshape(data_parallel_size, tensor_parallel_size)
    return Mesh(grid, (DP_AXIS, TP_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device of ``mesh`` holds the whole array (step inputs, sampled tokens)."""
    return NamedSharding(mesh, PartitionSpec())
