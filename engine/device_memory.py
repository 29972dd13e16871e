"""What this process's device memory holds and allows: what JAX's allocator and the CUDA driver report, the batch
limits the device's size sets, and the KV pool's size in blocks.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

from engine.engine_args import EngineArgs
from models.config import ModelConfig
from sharding import kv_cache_bytes_per_block_per_device
from sharding.distributed import agree_on_min

CPU_KV_CACHE_BYTES = 1 << 30  # the "sane default" KV pool on CPU: 1 GiB
LARGE_GPU_BYTES = 70 * 2**30  # vLLM's threshold for its larger batch defaults (H100, H200)


def default_batch_limits(usage_context: str = "llm") -> tuple[int, int]:
    """``(max_num_batched_tokens, max_num_seqs)`` when the user names neither; vLLM's choices.
    GPUs of >= 70 GiB: 16384 tokens a step for offline use (8192 for the server, whose requests
    arrive over time and whose time to first token a long prompt step would hold up) and 1024
    sequences. On the H200 (benchmarks/NOTES.md, runs 10-11) tput-short ran 19,646 output tok/s at
    these limits against 15,526-16,434 at 8192/256, tput-long 9,620 against 9,682. Smaller GPUs:
    8192/256 (vLLM: 2048 tokens for the server); CPU: 1024/64."""
    if usage_context not in ("llm", "server"):
        raise ValueError(f"usage_context must be 'llm' or 'server', got {usage_context!r}")
    if jax.default_backend() == "cpu":
        return 1024, 64
    device = device_memory_bytes()
    if device is not None and device >= LARGE_GPU_BYTES:
        return (16384 if usage_context == "llm" else 8192), 1024
    return 8192, 256


JAX_DEFAULT_MEM_FRACTION = 0.75  # of device memory, for JAX's GPU allocator pool
POOL_HEADROOM = 0.97  # of the allocator's pool, left to transient buffers the sizing does not see


def device_memory_budget(utilization: float) -> Optional[int]:
    """Bytes the engine may hold on this process's first device: ``utilization`` of the device's
    memory (what vLLM's ``gpu_memory_utilization`` means), within the pool JAX's allocator owns
    (``bytes_limit``, ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of the device; engine/__init__ asks for
    0.95). An allocator without a pool (JAX's VMM allocator: no stats) is bounded by the device
    alone, as the CUDA driver reports it. None where neither reports a limit (CPU).

    The device's memory is read back as ``bytes_limit`` over the fraction in the environment. If
    JAX started its backend before that fraction was set, the real pool is the default 75% and
    the estimate of the device is too small, so the budget errs low, never past the pool."""
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    device = device_memory_bytes()
    if device is None and jax.default_backend() == "gpu":
        raise RuntimeError("neither JAX's allocator nor the CUDA driver reports the GPU's memory, so the KV pool "
                           "cannot be sized: set num_gpu_blocks_override, or XLA_PYTHON_CLIENT_ALLOCATOR=bfc "
                           "(JAX's pool)")
    if not limit:
        return None if device is None else int(utilization * device)
    return int(min(utilization * device, POOL_HEADROOM * limit))


def driver_memory() -> Optional[tuple[int, int]]:
    """``(free, total)`` bytes of this process's first device from the CUDA driver; None off CUDA."""
    if jax.default_backend() != "gpu":
        return None
    from engine.cuda_driver import memory_info

    return memory_info(getattr(jax.local_devices()[0], "local_hardware_id", 0) or 0)


def live_array_bytes() -> int:
    """Bytes of this process's live JAX arrays on its first device."""
    device = jax.local_devices()[0]
    return sum(shard.data.nbytes for array in jax.live_arrays() for shard in array.addressable_shards
               if shard.device == device)


_least_outside_arrays: list[int] = []  # the least memory_outside_arrays this process has read


def memory_outside_arrays() -> Optional[int]:
    """Under an allocator without stats (JAX's VMM allocator): what the CUDA driver counts in use beyond this
    process's live arrays (the CUDA context, other processes, memory the allocator holds), read before the
    engine's weights load; None under an allocator with stats, or off CUDA. The least reading of the process
    so far: that allocator keeps what an engine freed at its shutdown and gives it to the next one's arrays, so a
    later reading would count that memory twice (run 41d: a second engine in one process found none left)."""
    if "bytes_in_use" in (jax.local_devices()[0].memory_stats() or {}):
        return None
    device = driver_memory()
    if device is None:
        return None
    reading = max(0, device[1] - device[0] - live_array_bytes())
    _least_outside_arrays[:] = [min([reading, *_least_outside_arrays])]
    return _least_outside_arrays[0]


def device_memory_in_use(outside_arrays: Optional[int] = None) -> int:
    """Bytes in use on this process's first device: the allocator's count; without one, ``outside_arrays``
    (``memory_outside_arrays`` before the weights) plus the live arrays, else what the driver does not report
    free. The driver alone over-counts after loading: the VMM allocator keeps memory it freed (run 21a: the
    8B engine's pool came out 31-39 GiB smaller than under JAX's default allocator)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_in_use" in stats:
        return int(stats["bytes_in_use"])
    if outside_arrays is not None:
        return outside_arrays + live_array_bytes()
    device = driver_memory()
    return 0 if device is None else device[1] - device[0]


def device_memory_bytes() -> Optional[int]:
    """Memory of this process's first device, read back as JAX's pool (``bytes_limit``) over the
    fraction in the environment, or from the CUDA driver under an allocator without a pool; None
    where neither reports it (CPU)."""
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    if not limit:
        device = driver_memory()
        return None if device is None else device[1]
    try:
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", JAX_DEFAULT_MEM_FRACTION))
    except ValueError:
        fraction = JAX_DEFAULT_MEM_FRACTION
    return int(limit / min(max(fraction, 1e-3), 1.0))


def sizes_kv_from_memory(args: EngineArgs) -> bool:
    """Whether the KV pool is sized from device memory (an accelerator, no block-count override)."""
    return not args.num_gpu_blocks_override and device_memory_budget(args.gpu_memory_utilization) is not None


def num_kv_blocks(args: EngineArgs, config: ModelConfig, kv_dtype, max_model_len: int, max_num_seqs: int,
                  activation_bytes: int = 0, outside_arrays: Optional[int] = None) -> int:
    """How many KV blocks to allocate (including the reserved sink block 0).

    With tensor parallelism each device holds its share of every block: the budget
    of one device is divided by the bytes a block costs per device. With several
    processes every one takes the smallest count any of them can hold.
    """
    if args.num_gpu_blocks_override:
        return args.num_gpu_blocks_override
    per_block = kv_cache_bytes_per_block_per_device(config, args.block_size, kv_dtype, args.tensor_parallel_size)
    budget = device_memory_budget(args.gpu_memory_utilization)
    if budget is None:
        # CPU: enough for every sequence at full length, capped at CPU_KV_CACHE_BYTES.
        wanted = max_num_seqs * -(-max_model_len // args.block_size) + 1
        return max(2, min(wanted, CPU_KV_CACHE_BYTES // per_block))
    in_use = device_memory_in_use(outside_arrays)
    free = budget - in_use - activation_bytes
    if free < 2 * per_block:
        raise ValueError(
            f"no memory left for the KV cache: budget {budget / 2**30:.2f} GiB "
            f"(gpu_memory_utilization={args.gpu_memory_utilization}), weights and buffers "
            f"{in_use / 2**30:.2f} GiB, activations {activation_bytes / 2**30:.2f} GiB"
        )
    return agree_on_min(int(free // per_block))
