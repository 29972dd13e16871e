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


def read_generation_config(folder: str) -> dict:
    """A checkpoint folder's ``generation_config.json``; {} where there is none (a GGUF file, a folder without
    one). A file that is not a JSON object raises ``ValueError``."""
    path = os.path.join(folder, GENERATION_CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"cannot read {path}: a generation config is a JSON object")
    return config


def default_sampling_fields(model_path: str, source: str = "auto") -> dict:
    """The ``SamplingParams`` fields (of ``SAMPLING_FIELDS``, and ``max_tokens`` from ``max_new_tokens``) that
    ``source``'s generation config sets:
    "auto" the model folder's file (none for a GGUF file or a folder without one), "vllm" none, else the
    folder ``source``, which must hold one."""
    if source == "vllm":
        return {}
    folder = model_path if source == "auto" else source
    if source != "auto" and not os.path.isfile(os.path.join(source, GENERATION_CONFIG_FILE)):
        raise ValueError(f"generation_config must be 'auto', 'vllm' or a folder holding "
                         f"{GENERATION_CONFIG_FILE}; {source!r} has none")
    config = read_generation_config(folder)
    fields = {name: config[name] for name in SAMPLING_FIELDS if config.get(name) is not None}
    if config.get("max_new_tokens") is not None:  # vLLM's default max_tokens, and the server's cap on it
        fields["max_tokens"] = config["max_new_tokens"]
    try:  # refused here, not as every request's 400
        SamplingParams(**fields)
    except ValueError as e:
        raise ValueError(f"{os.path.join(folder, GENERATION_CONFIG_FILE)}: {e}") from e
    return fields
