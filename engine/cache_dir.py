"""Where pagedjax keeps what it can rebuild (converted tokenizers, compiled steps)."""

from __future__ import annotations

import os


def cache_dir(*parts: str) -> str:
    """``$PAGEDJAX_CACHE_DIR`` (default ``~/.cache/pagedjax``) joined with ``parts``."""
    root = os.environ.get("PAGEDJAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "pagedjax")
    return os.path.join(root, *parts)
