"""Serve a model over an OpenAI-compatible HTTP API (the same as
``python -m engine.entrypoints.openai.api_server``; flags are vLLM's).

    python scripts/serve.py                                  # embedded SmolLM2-135M-Instruct on 127.0.0.1:8000
    python scripts/serve.py --model /path/to/hf-folder --port 8080 --max-model-len 4096 --api-key secret
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.entrypoints.openai.api_server import main  # noqa: E402

if __name__ == "__main__":
    main()
