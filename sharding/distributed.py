"""Multi-host runs: join this process to a JAX cluster, and pass step inputs from the leader.

Owns start-up of JAX's multi-controller runtime (``jax.distributed.initialize``), the
command-line flags scripts add for it, and ``broadcast_from_leader`` (any picklable
object from process 0 to every process). Knows nothing of models or requests.

How it works: every process runs the same program (SPMD). After ``initialize``,
``jax.devices()`` lists the devices of all processes, ``sharding.mesh.make_mesh``
spans them, and every jitted step runs on all of them at once; each process loads
only the weight slices of its own devices. Every process must therefore make the
same JAX calls in the same order. The engine keeps that true by scheduling on
process 0 only: its runner broadcasts each step's inputs, and the other processes
run ``ModelRunner.follow()``, which executes what they receive until the leader
calls ``ModelRunner.release_followers()``.

Launch (2 hosts with 8 GPUs each, one process per host, tensor parallel over 16)::

    host-a$ python my_script.py --tensor-parallel-size 16 \\
                --coordinator-address host-a:8476 --num-processes 2 --process-id 0
    host-b$ python my_script.py --tensor-parallel-size 16 \\
                --coordinator-address host-a:8476 --num-processes 2 --process-id 1

where ``my_script.py`` calls ``initialize_from_args(args)`` before any other JAX call,
builds the engine on every process, then serves/generates on process 0 and calls
``engine.runner.follow()`` on the others. On one machine, several CPU processes form
a cluster the same way (``--xla_force_host_platform_device_count`` devices each);
their collectives go through gloo (``jax_cpu_collectives_implementation``). On a
managed cluster (SLURM, Open MPI, Kubernetes) the three flags may be omitted: JAX
detects them.
"""

from __future__ import annotations

import argparse
import pickle
from typing import Any, Optional

import jax
import numpy as np

_MIN_PAYLOAD_BYTES = 1024  # broadcast payloads are padded to powers of two from here (few compiles)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--coordinator-address``, ``--num-processes``, ``--process-id`` to a script's parser."""
    group = parser.add_argument_group("multi-host (JAX multi-controller; omit all three on one host)")
    group.add_argument("--coordinator-address", default=None,
                       help="host:port of process 0, which every process connects to (e.g. host-a:8476)")
    group.add_argument("--num-processes", type=int, default=None, help="how many processes take part")
    group.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. num-processes-1")


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, local_device_ids=None) -> None:
    """Join the cluster; call before any other JAX operation (it fixes the device list).

    Thin wrapper over ``jax.distributed.initialize`` that also routes CPU collectives
    through gloo (JAX's CPU backend has no cross-process collectives otherwise; the
    option only affects the CPU client, so it is harmless on GPU hosts). Raises
    ``ValueError`` for inconsistent arguments before contacting anyone.
    """
    if coordinator_address is None and (num_processes is not None or process_id is not None):
        raise ValueError("--num-processes/--process-id need --coordinator-address (host:port of process 0)")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:  # pragma: no cover - a JAX without the option (gloo is then the default)
        pass
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)


def initialize_from_args(args: argparse.Namespace) -> bool:
    """``initialize`` from the flags of ``add_cli_args``; does nothing (returns False) when none is set."""
    if args.coordinator_address is None and args.num_processes is None and args.process_id is None:
        return False
    initialize(args.coordinator_address, args.num_processes, args.process_id)
    return True


def is_leader() -> bool:
    """Whether this process schedules (process 0); always true on one host."""
    return jax.process_index() == 0


def broadcast_from_leader(obj: Any = None) -> Any:
    """Process 0's ``obj`` on every process (others pass anything; they get the leader's).

    Pickled and sent through ``multihost_utils.broadcast_one_to_all`` (a device
    collective): first the length, then the bytes padded to a power of two, so few
    shapes compile. A no-op on one process. Every process must call it together.
    """
    if jax.process_count() == 1:
        return obj
    from jax.experimental import multihost_utils

    payload = pickle.dumps(obj) if is_leader() else b""
    size = int(multihost_utils.broadcast_one_to_all(np.asarray([len(payload)], np.int64))[0])
    padded = max(_MIN_PAYLOAD_BYTES, 1 << (size - 1).bit_length())
    buffer = np.zeros(padded, np.uint8)
    buffer[: len(payload)] = np.frombuffer(payload, np.uint8)
    received = multihost_utils.broadcast_one_to_all(buffer)
    return pickle.loads(np.asarray(received[:size], np.uint8).tobytes())


def agree_on_min(value: int) -> int:
    """The smallest of every process's ``value`` (e.g. KV blocks that fit everywhere)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.asarray([value], np.int64))))
