"""Where a reasoning model's thinking ends, in tokens: the engine's side of vLLM's ``--reasoning-parser``.

Owns the thinking block's tags (``<think> ... </think>``: DeepSeek-R1 and its distillations, Qwen 3, QwQ; gpt-oss's
harmony channels) as the tokenizer spells them, and two questions about a request: did its prompt already close the
block (Qwen 3 with ``enable_thinking=False`` renders an empty one), and do its output tokens end by closing it. With
a reasoning parser, a request's structured output (``engine.structured_output``) constrains only what follows the
thinking, as vLLM's does by default: the model reasons freely, then answers in the grammar. The server's text split of a
reply into ``reasoning_content`` and ``content`` is ``engine.entrypoints.openai.reasoning``.
"""

from __future__ import annotations

from typing import Sequence

THINK_START, THINK_END = "<think>", "</think>"
# gpt-oss's harmony format: a reply is messages on channels, the thinking on "analysis", the answer on "final".
HARMONY_TURN_START, HARMONY_FINAL = "<|start|>assistant", "<|channel|>final<|message|>"
# vLLM's names: the first two mark the thinking with the tags above, openai_gptoss with harmony's (its thinking ends
# where the final channel's message starts; a turn's start opens it again).
REASONING_PARSERS = ("deepseek_r1", "qwen3", "openai_gptoss")
_TAGS = {"openai_gptoss": (HARMONY_TURN_START, HARMONY_FINAL)}


def _last_index(tokens: Sequence[int], part: Sequence[int]) -> int:
    """Where ``part`` last starts in ``tokens``, or -1."""
    n = len(part)
    for i in range(len(tokens) - n, -1, -1):
        if list(tokens[i:i + n]) == list(part):
            return i
    return -1


class ReasoningEnd:
    """The thinking tags of ``parser`` (one of ``REASONING_PARSERS``) as token ids of ``tokenizer`` (Qwen's and
    DeepSeek's tokenizers have each as one token; harmony's are a few special tokens and words)."""

    def __init__(self, tokenizer, parser: str = "qwen3"):
        start, end = _TAGS.get(parser, (THINK_START, THINK_END))
        self.start_ids = tokenizer.encode(start, add_special_tokens=False)
        self.end_ids = tokenizer.encode(end, add_special_tokens=False)
        if not self.end_ids:
            raise ValueError(f"the tokenizer encodes {end!r} as no tokens: no reasoning parser can find it")

    def ended_in_prompt(self, prompt_ids: Sequence[int]) -> bool:
        """Whether the prompt closes the thinking block after it last opens one (the reply starts after it)."""
        end = _last_index(prompt_ids, self.end_ids)
        return end >= 0 and end > _last_index(prompt_ids, self.start_ids)

    def ends(self, output_ids: Sequence[int]) -> bool:
        """Whether the output's last tokens close the thinking block."""
        n = len(self.end_ids)
        return len(output_ids) >= n and list(output_ids[-n:]) == list(self.end_ids)
