"""A model's ``generation_config.json`` as the defaults of the sampling fields a request leaves unset.

vLLM reads it too (``--generation-config auto``, its default): a Hugging Face checkpoint that ships, say,
``temperature: 0.6, top_p: 0.9`` (Llama 3.1 Instruct) samples that way unless a request says otherwise. ``vllm``
turns it off (``SamplingParams``' own defaults); a folder names another file's. A GGUF file has none.
"""

from __future__ import annotations

import json
import os

from engine.sampling_params import SamplingParams

GENERATION_CONFIG_FILE = "generation_config.json"
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def default_sampling_fields(model_path: str, source: str = "auto") -> dict:
    """The ``SamplingParams`` fields (of ``SAMPLING_FIELDS``) that ``source``'s generation config sets:
    "auto" the model folder's file (none for a GGUF file or a folder without one), "vllm" none, else the
    folder ``source``, which must hold one."""
    if source == "vllm":
        return {}
    if source == "auto":
        path = os.path.join(model_path, GENERATION_CONFIG_FILE)
        if not os.path.isdir(model_path) or not os.path.isfile(path):
            return {}
    else:
        path = os.path.join(source, GENERATION_CONFIG_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"generation_config must be 'auto', 'vllm' or a folder holding "
                             f"{GENERATION_CONFIG_FILE}; {source!r} has none")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    fields = {name: config[name] for name in SAMPLING_FIELDS if config.get(name) is not None}
    try:  # refused here, not as every request's 400
        SamplingParams(**fields)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    return fields
