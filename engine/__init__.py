"""pagedjax's host side: the public API (``LLM``, ``SamplingParams``), requests, block
manager, scheduler, runner, engine loop, tokenizer and the OpenAI-compatible server.

Exports are resolved lazily so that pure-Python parts (scheduler, block manager)
import without JAX.
"""

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
