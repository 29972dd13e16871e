"""Reasoning models' thinking, split from their answer, as vLLM's ``--reasoning-parser`` does.

Owns where a chat reply's ``<think> ... </think>`` ends: the text inside goes out as ``reasoning_content`` (vLLM's
field; in stream deltas too), the rest as ``content`` (where tool calls are then looked for). Two of vLLM's parsers:

- ``deepseek_r1`` (DeepSeek-R1 and its Qwen / Llama distillations): the template opens ``<think>`` in the prompt, so
  the output starts inside it (an opening tag in the output is dropped); everything before ``</think>`` is
  reasoning, and an output that never closes it is all reasoning.
- ``qwen3`` (Qwen 3): the output thinks only if it opens ``<think>`` itself (``enable_thinking=False`` renders an
  empty block in the prompt instead); otherwise it is all content. A block the output leaves open (cut by
  ``max_tokens``) is reasoning, streamed or not (vLLM's non-streamed parser returns it as content).
"""

from __future__ import annotations

from typing import Optional

from engine.entrypoints.openai.tools import partial_marker_length
from engine.reasoning import THINK_END as END
from engine.reasoning import THINK_START as START


class ReasoningParser:
    """``split`` a reply (whole, or as far as it has come) into its reasoning and its content."""

    opens_in_prompt = True  # the output starts inside the thinking block (deepseek_r1) or must open it (qwen3)

    def split(self, text: str, final: bool) -> tuple[Optional[str], str]:
        """``(reasoning, content)`` of ``text``; reasoning None where the reply does not think. Before the end
        (``final`` false) a tag that may be arriving is held back, so what is split never changes later."""
        head = text.lstrip()
        if not self.opens_in_prompt and not head.startswith(START):
            if not final and START.startswith(head):
                return "", ""  # it may be opening the block: wait
            return None, text
        body = head[len(START):] if head.startswith(START) else text  # vLLM's: whitespace before a tag goes
        if not final and not head.startswith(START) and START.startswith(head):
            return "", ""  # an opening tag may be arriving (dropped once whole)
        end = body.find(END)
        if end >= 0:
            return body[:end], body[end + len(END):]
        return (body if final else body[:len(body) - partial_marker_length(body, END)]), ""


class DeepSeekR1ReasoningParser(ReasoningParser):
    opens_in_prompt = True


class Qwen3ReasoningParser(ReasoningParser):
    opens_in_prompt = False


REASONING_PARSERS = {"deepseek_r1": DeepSeekR1ReasoningParser, "qwen3": Qwen3ReasoningParser}  # engine.reasoning's

