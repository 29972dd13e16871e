"""One entry point for loading a model: resolve where it is, read its config, load weights.

Dispatches to the format-specific loaders (Hugging Face safetensors folders, GGUF
files, random "dummy" weights), picks the dtype and the quantization method (the
checkpoint's own AWQ / GPTQ / FP8 layout, or int8 / int4 / fp8 made after loading,
see ``models.quantization``; int8 makes the LM head int8 too). Knows nothing of requests.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from models.config import LOAD_FORMATS, ModelConfig, ModelConfigError

logger = logging.getLogger(__name__)
DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32,
          "bf16": jnp.bfloat16, "fp16": jnp.float16, "half": jnp.float16, "float": jnp.float32}


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    params: Any
    path: str  # checkpoint folder or .gguf file (what the tokenizer is read from)
    load_format: str
    dtype: Any
    quantization: Optional[str] = None  # the method the layer matrices are stored in, or None


def resolve_dtype(dtype: Any) -> Any:
    """``"auto"``: bfloat16 on accelerators, float32 on CPU (XLA's CPU bf16 matmuls are slow)."""
    if dtype is None or dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def resolve_model_path(model: Optional[str]) -> str:
    """The embedded default model when ``model`` is None; a folder holding one .gguf resolves to it."""
    if model is None:
        from models.default_model import default_model_path

        return default_model_path()
    if not os.path.exists(model):
        raise FileNotFoundError(
            f"model path {model!r} does not exist (pagedjax never downloads weights: "
            "pass a local Hugging Face checkpoint folder or a .gguf file)"
        )
    if os.path.isdir(model) and not os.path.exists(os.path.join(model, "config.json")):
        ggufs = [f for f in os.listdir(model) if f.endswith(".gguf")]
        if len(ggufs) == 1:
            return os.path.join(model, ggufs[0])
    return model


def detect_format(path: str, load_format: str) -> str:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unsupported load_format {load_format!r}; choose one of {', '.join(LOAD_FORMATS)}")
    if load_format == "safetensors" and path.endswith(".gguf"):  # it read the file as a config.json before
        raise ValueError(f"{path} is a GGUF file: load it with load_format 'gguf' or 'auto', not 'safetensors'")
    if load_format != "auto":
        return load_format
    return "gguf" if path.endswith(".gguf") else "safetensors"


def load_model(
    model: Optional[str] = None,
    *,
    dtype: Any = "auto",
    load_format: str = "auto",
    seed: int = 0,
    shardings: Optional[Callable[[ModelConfig], Any]] = None,
    quantization: Optional[str] = None,
    head_optional: bool = False,
) -> LoadedModel:
    """Load config and weights. ``shardings(config)`` may give a pytree of shardings for the
    (dense) params; quantized weights are placed to match. ``head_optional`` (a pooling engine, which never
    applies the LM head): a safetensors checkpoint without ``lm_head.weight`` (an embedding model saved as its
    decoder alone) loads as if tied, its embedding standing in for the head's shape."""
    from models.quantization import (CheckpointQuantization, int8_lm_head, quantize_lm_head, quantize_params,
                                     resolve_method)

    path = resolve_model_path(model)
    fmt = detect_format(path, load_format)
    jdtype = resolve_dtype(dtype)
    if fmt == "gguf":
        from models.gguf_loader import has_mxfp4_experts, load_gguf_params, open_gguf, read_gguf_config

        source = open_gguf(path)  # parse the metadata once for config and weights
        config = read_gguf_config(source)
    else:
        config = ModelConfig.from_pretrained(path)  # first: it reports a missing or broken config.json
        if fmt == "safetensors":
            from models.safetensors_loader import checkpoint_tensor_names, kv_scale_names

            names = checkpoint_tensor_names(path)
            if head_optional and not config.tie_word_embeddings and "lm_head.weight" not in names:
                config = dataclasses.replace(config, tie_word_embeddings=True)
            kv_scales = kv_scale_names(names)  # fp8 KV scales (llm-compressor, ModelOpt, AutoFP8)
            if kv_scales is not None:
                if kv_scales[0] == kv_scales[1]:
                    logger.warning("%s stores one kv_scale a layer for K and V (a deprecated format, as vLLM says): "
                                   "it scales both", path)
                config = dataclasses.replace(config, kv_cache_scales=True)
    stored = CheckpointQuantization.from_checkpoint(path) if fmt == "safetensors" else None
    if fmt == "gguf" and has_mxfp4_experts(source):  # gpt-oss's experts, kept 4-bit
        stored = CheckpointQuantization("mxfp4")
    method = resolve_method(quantization, stored, fmt)
    sh = shardings(config) if shardings is not None else None
    if fmt == "gguf":
        params = load_gguf_params(source, config, jdtype, shardings=sh)
    elif fmt == "dummy":
        from models.dummy import load_dummy_params

        params = load_dummy_params(config, jdtype, seed=seed, shardings=sh)
    elif fmt == "safetensors":
        from models.safetensors_loader import load_safetensors_params

        params = load_safetensors_params(path, config, jdtype, shardings=sh, quantization=stored)
    else:  # pragma: no cover - detect_format guards this
        raise ModelConfigError(f"unknown format {fmt}")
    if method is not None and stored is None:
        params = quantize_params(params, method, sh)  # the layers, and the LM head where int8_lm_head says so
    elif int8_lm_head(method, made_at_load=False):  # a quantized checkpoint's layers are read as stored
        params = quantize_lm_head(params, sh)
    return LoadedModel(config=config, params=params, path=path, load_format=fmt, dtype=jdtype, quantization=method)
