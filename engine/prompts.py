"""What a prompt may be, as ``LLM`` and ``AsyncLLM`` take it: a text, token ids (a sequence or an array), or vLLM's
dict prompts; ``as_prompt`` makes one the engine's text or list of ints. Imports nothing heavy (the server's own
process must not import JAX)."""

from __future__ import annotations

from typing import Sequence

PROMPT_KEYS = frozenset({"prompt", "prompt_token_ids"})


def as_prompt(p, index: int = 0):
    """One prompt as the engine takes it: a text, or token ids from a sequence, an array or vLLM's dict prompts
    (``{"prompt": text}``, ``{"prompt_token_ids": ids}``); ``index`` names it in errors."""
    if not isinstance(p, (str, dict, Sequence)) and not hasattr(p, "__array__"):
        raise TypeError(f"prompt {index} must be a text, token ids or a dict prompt, got {type(p).__name__}")
    if isinstance(p, dict):
        extra = sorted(set(p) - PROMPT_KEYS)
        if extra:  # vLLM's TextPrompt / TokensPrompt keys for images, processors, cache salts: none apply here
            raise ValueError(f"a dict prompt's {', '.join(map(repr, extra))} is not supported: this engine serves "
                             "text-only models (a dict prompt takes 'prompt' or 'prompt_token_ids')")
        if "prompt_token_ids" in p:
            return list(p["prompt_token_ids"])
        if "prompt" in p:
            return p["prompt"]
        raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
    return p if isinstance(p, str) else [int(t) for t in p]
