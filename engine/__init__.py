"""pagedjax's host side: the public API (``LLM``, ``SamplingParams``), requests, block
manager, scheduler, runner, engine loop, tokenizer and the OpenAI-compatible server.

Exports are resolved lazily so that pure-Python parts (scheduler, block manager)
import without JAX.
"""

import os

# JAX's GPU allocator takes 75% of device memory unless told otherwise, and the engine cannot
# use what the allocator does not own: with that default gpu_memory_utilization=0.9 held 67.5%
# of an H200 (benchmarks/NOTES.md, run 10). A larger pool is asked for here, before any device
# is touched (the fraction is read when JAX starts its GPU backend); a value the user set wins.
# engine.device_memory.device_memory_budget sizes from the fraction in effect.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

# XLA runs a step's kernels as CUDA graphs and re-records a graph (~1-2 ms of host time for the 8B's ~580
# kernels) whenever a buffer it touches moved. The runner keeps its buffers in place; XLA's temporaries, allocated
# per run, still move every step under JAX's default allocator (benchmarks/NOTES.md, run 20d). So on CUDA with
# jaxlib >= 0.11.2 the engine uses JAX's VMM allocator and asks XLA for its temporaries at a reserved virtual
# address: a decode step replays its graph. Batch-1 TPOT int8 4.98 -> 3.61 ms, AWQ 4.90 -> 3.87 on a slow host
# (run 20e), int8 3.69 -> 3.57 on a fast one, tput-short unchanged (runs 21a-b). That allocator reports no stats, so
# the KV pool is sized from the CUDA driver (engine.engine_args). Only where one GPU is visible: tensor parallelism
# under it has not run yet. The user's allocator or update mode wins (XLA_PYTHON_CLIENT_ALLOCATOR=bfc: JAX's pool).
VMM_ALLOCATOR = "vmm"
FIXED_TEMPORARIES_FLAG = "--xla_gpu_command_buffer_update_mode=SKIP_TEMP"


def _installed(name: str):
    """The installed version of distribution ``name``, or None."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _on_cuda() -> bool:
    """Whether a JAX CUDA plugin is installed (the flags set here concern XLA's GPU compiler only)."""
    return any(_installed(name) for name in ("jax-cuda13-pjrt", "jax-cuda12-pjrt"))


def _on_cuda_with_fixed_temporaries() -> bool:
    """Whether JAX's CUDA plugin is installed with a jaxlib whose XLA knows ``FIXED_TEMPORARIES_FLAG`` (0.11.2
    does; 0.10.2 rejects the flag)."""
    try:
        version = tuple(int(part) for part in (_installed("jaxlib") or "0").split(".")[:3])
    except ValueError:
        return False
    return version >= (0, 11, 2) and _on_cuda()


def _append_xla_flag(flag: str) -> None:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def _one_visible_gpu() -> bool:
    from engine.cuda_driver import device_count

    return device_count() == 1


if _on_cuda_with_fixed_temporaries():
    if "XLA_PYTHON_CLIENT_ALLOCATOR" not in os.environ and _one_visible_gpu():
        os.environ["XLA_PYTHON_CLIENT_ALLOCATOR"] = VMM_ALLOCATOR
    if (os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR") == VMM_ALLOCATOR
            and "xla_gpu_command_buffer_update_mode" not in os.environ.get("XLA_FLAGS", "")):
        _append_xla_flag(FIXED_TEMPORARIES_FLAG)

# XLA's GPU compiler budgets a program's memory at 80% of the card less its arguments; the KV pool and the weights
# alone exceed that, so every step compiles against a limit of zero and the rematerialisation pass recomputes ops
# near their uses to shorten live ranges (the profiles' "_remat" kernels), for nothing: the engine sizes the pool
# after measuring the largest step's temporaries, under these same flags. Without the pass (run 38c-d, H200, one
# lease): the Qwen3-30B-A3B int8 16k-token prompt step's kernels 298.2 -> 289.8 ms and its tput-short 16,682 ->
# 17,146 output tok/s; the 8B AWQ batch-1 TPOT 2.53 -> 2.52 ms (level). A user's choice of disabled passes wins.
NO_REMATERIALIZATION_FLAG = "--xla_disable_hlo_passes=rematerialization"
if _on_cuda() and "xla_disable_hlo_passes" not in os.environ.get("XLA_FLAGS", ""):
    _append_xla_flag(NO_REMATERIALIZATION_FLAG)

_EXPORTS = {
    "LLM": "engine.llm",
    "SamplingParams": "engine.sampling_params",
    "StructuredOutputsParams": "engine.sampling_params",
    "GuidedDecodingParams": "engine.sampling_params",
    "BeamSearchParams": "engine.beam_search",
    "LoRARequest": "engine.lora",
    "PoolingParams": "engine.pooling",
    "EmbeddingRequestOutput": "engine.pooling",
    "ClassificationRequestOutput": "engine.pooling",
    "PoolingRequestOutput": "engine.pooling",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
    "RequestOutputKind": "engine.outputs",
    "EngineArgs": "engine.engine_args",
    "LLMEngine": "engine.llm_engine",
    "AsyncLLM": "engine.async_llm",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
