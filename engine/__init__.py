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
# engine.engine_args.device_memory_budget sizes from the fraction in effect.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

_EXPORTS = {
    "LLM": "engine.llm",
    "SamplingParams": "engine.sampling_params",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
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
