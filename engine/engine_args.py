"""Engine options with vLLM's names, their defaults and validation; KV-cache sizing.

Owns turning user options plus the loaded model into concrete numbers (blocks,
batch limits). Knows nothing of requests.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp

from models.config import ModelConfig
from models.quantization import METHODS
from pallas_kernels import KV_WRITE_BACKENDS
from sharding import kv_cache_bytes_per_block_per_device
from sharding.distributed import agree_on_min

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # the "sane default" KV pool on CPU: 1 GiB
QUANTIZATION_METHODS = METHODS
# vLLM's names: "fp8" is e4m3. Pages hold K/V at scale 1 (vLLM's default without calibrated scales).
KV_CACHE_DTYPES = {"auto": None, "fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn,
                   "fp8_e5m2": jnp.float8_e5m2}
LINEAR_BACKENDS = ("auto", "pallas", "xla")


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype):
    """The KV pages' dtype: the model's for "auto", else the named float8 type."""
    return KV_CACHE_DTYPES[kv_cache_dtype] or model_dtype


@dataclasses.dataclass
class EngineArgs:
    model: Optional[str] = None
    dtype: str = "auto"
    block_size: int = 16
    max_num_batched_tokens: Optional[int] = None
    max_num_seqs: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    max_model_len: Optional[int] = None
    seed: int = 0
    load_format: str = "auto"
    tensor_parallel_size: int = 1
    quantization: Optional[str] = None
    kv_cache_dtype: str = "auto"
    num_gpu_blocks_override: Optional[int] = None
    scheduling_policy: str = "fifo"
    attention_backend: str = "auto"
    # The KV write: "reference" (XLA's scatter, in place), "pallas" (one kernel for K and V) or "auto"
    # (the kernel on GPU: 1.3-1.4% of an 8B step faster on an H200, run 13a; the scatter on CPU).
    kv_write_backend: str = "auto"
    # Matmuls: "auto" = the Pallas weight-streaming kernel for int4 weights at small batches on
    # GPU, XLA otherwise (models.quantization.LinearBackend); "pallas" also for int8 and dense
    # weights; "xla" never the kernel.
    linear_backend: str = "auto"
    # Unroll the layer loop over per-layer weights instead of lax.scan over stacked ones.
    # None = on GPU only: there XLA copies each layer's weight slice inside the scan, which
    # measured 17.3 ms vs 7.6 ms per batch-1 decode step of Llama-3.1-8B on an H100
    # (benchmarks/NOTES.md); on CPU the scan compiles faster and runs as fast.
    unroll_layers: Optional[bool] = None
    # Join q/k/v and gate/up into one matmul each (models.llama.fuse_projections). None = on one device (a
    # mesh splits them apart); False keeps seven matmuls a layer (for measuring what joining costs large steps).
    fuse_projections: Optional[bool] = None
    # "continuous" batching, or "static" (the baseline: a fixed batch, nothing admitted until all of it finished).
    scheduling_mode: str = "continuous"
    trace: bool = False  # record a per-step trace (engine.trace), read with LLM.get_trace()
    # Plan step N+1 while step N runs on the device (LLMEngine.step). None = on, except over several
    # processes (followers replay steps in order).
    async_scheduling: Optional[bool] = None
    # XLA options for compiling the step (jax.jit's compiler_options, e.g. {"xla_gpu_autotune_level": 0}).
    # None = the engine's choice (engine.runner.default_compiler_options: for fp8 weights, by step size).
    compiler_options: Optional[dict] = None
    # Compile every step shape at start-up under a progress bar (ModelRunner.precompile), so no request
    # waits for a compile; None = on GPU (on CPU the steps compile at first use, as tests want).
    precompile_steps: Optional[bool] = None
    # Who drives the engine: "llm" (offline LLM.generate) or "server" (the HTTP server). It picks the
    # default batch limits on large GPUs (``default_batch_limits``), as vLLM's usage context does.
    usage_context: str = "llm"
    # Multi-step decoding (vLLM's --num-scheduler-steps): when every running request decodes and none waits, run
    # this many decode steps in one dispatch, each step's tokens fed to the next on the device (engine.multi_step).
    # The host's share of a step is then paid once for them; a request's tokens come out that many at a time.
    num_scheduler_steps: int = 1

    def validate(self) -> None:
        if self.block_size not in (8, 16, 32, 64):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.usage_context not in ("llm", "server"):
            raise ValueError(f"usage_context must be 'llm' or 'server', got {self.usage_context!r}")
        if not isinstance(self.num_scheduler_steps, int) or self.num_scheduler_steps < 1:
            raise ValueError(f"num_scheduler_steps must be a positive integer, got {self.num_scheduler_steps!r}")
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "num_gpu_blocks_override"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.scheduling_policy not in ("fifo", "priority"):
            raise ValueError(f"scheduling_policy must be 'fifo' or 'priority', got {self.scheduling_policy!r}")
        if self.scheduling_mode not in ("continuous", "static"):
            raise ValueError(f"scheduling_mode must be 'continuous' or 'static', got {self.scheduling_mode!r}")
        self._validate_tensor_parallel_size()
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be None or one of {', '.join(QUANTIZATION_METHODS)}, "
                             f"got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.async_scheduling and jax.process_count() > 1:
            raise ValueError("async_scheduling=True cannot be combined with several processes")
        if self.kv_write_backend not in KV_WRITE_BACKENDS:
            raise ValueError(f"kv_write_backend must be one of {', '.join(KV_WRITE_BACKENDS)}, "
                             f"got {self.kv_write_backend!r}")
        if self.linear_backend not in LINEAR_BACKENDS:
            raise ValueError(f"linear_backend must be one of {', '.join(LINEAR_BACKENDS)}, got {self.linear_backend!r}")

    def _validate_tensor_parallel_size(self) -> None:
        """Sizes the devices allow; whether the model's heads divide is checked once its config is read."""
        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        devices = jax.devices()
        if tp > len(devices):
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} devices, but only {len(devices)} "
                             f"{devices[0].platform.upper()} device(s) are visible to JAX")
        if jax.process_count() > 1 and tp != len(devices):
            raise ValueError(f"with {jax.process_count()} processes, tensor_parallel_size must span every "
                             f"device of the cluster ({len(devices)}), got {tp}")

    def resolved_limits(self, config: ModelConfig) -> tuple[int, int, int]:
        """``(max_model_len, max_num_batched_tokens, max_num_seqs)`` with defaults filled in."""
        max_model_len = self.max_model_len or config.max_position_embeddings
        if max_model_len > config.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's "
                             f"max_position_embeddings={config.max_position_embeddings}")
        default_tokens, default_seqs = default_batch_limits(self.usage_context)
        max_num_seqs = self.max_num_seqs or default_seqs
        max_tokens = self.max_num_batched_tokens or default_tokens
        return max_model_len, max(max_tokens, 1), max_num_seqs


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


def memory_outside_arrays() -> Optional[int]:
    """Under an allocator without stats (JAX's VMM allocator): what the CUDA driver counts in use beyond this
    process's live arrays (the CUDA context, other processes, memory the allocator holds), read before the
    engine's weights load; None under an allocator with stats, or off CUDA."""
    if "bytes_in_use" in (jax.local_devices()[0].memory_stats() or {}):
        return None
    device = driver_memory()
    return None if device is None else max(0, device[1] - device[0] - live_array_bytes())


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
