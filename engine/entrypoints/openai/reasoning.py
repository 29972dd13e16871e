"""Reasoning models' thinking, split from their answer, as vLLM's ``--reasoning-parser`` does.

Owns where a chat reply's ``<think> ... </think>`` ends: the text inside goes out as ``reasoning_content`` (vLLM's
field; in stream deltas too), the rest as ``content`` (where tool calls are then looked for). Two of vLLM's parsers:

- ``deepseek_r1`` (DeepSeek-R1 and its Qwen / Llama distillations): the template opens ``<think>`` in the prompt, so
  the output starts inside it (an opening tag in the output is dropped); everything before ``</think>`` is
  reasoning, and an output that never closes it is all reasoning.
- ``qwen3`` (Qwen 3): the output thinks only if it opens ``<think>`` itself (``enable_thinking=False`` renders an
  empty block in the prompt instead); otherwise it is all content. A block the output leaves open (cut by
  ``max_tokens``) is reasoning, streamed or not (vLLM's non-streamed parser returns it as content).
- ``openai_gptoss`` (gpt-oss): the reply is harmony messages, ``<|channel|>NAME[ to=RECIPIENT]...<|message|>BODY``
  ended by ``<|end|>`` (then ``<|start|>assistant`` and the next), ``<|return|>`` or ``<|call|>``: the analysis
  channel's bodies are the reasoning, every other channel's (final, commentary) the content (messages a newline
  apart), and a message to a recipient (a tool call; the recipient after the channel's name or in the turn's start,
  `` to=functions.f`` right after the prompt for the first) stays whole in the content for the ``openai`` tool
  parser (``tools.HarmonyToolParser``).
  Its markers are special tokens, kept in the text for it (``keeps_special_tokens``); a reply with no channel at all
  is content.
"""

from __future__ import annotations

from typing import Optional

from engine.entrypoints.openai.tools import partial_marker_length
from engine.reasoning import THINK_END as END
from engine.reasoning import THINK_START as START


class ReasoningParser:
    """``split`` a reply (whole, or as far as it has come) into its reasoning and its content."""

    opens_in_prompt = True  # the output starts inside the thinking block (deepseek_r1) or must open it (qwen3)
    keeps_special_tokens = False  # its markers are special tokens: the reply's text must keep them

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


class HarmonyReasoningParser(ReasoningParser):
    """gpt-oss's harmony messages (module docstring)."""

    keeps_special_tokens = True
    CHANNEL, MESSAGE, ENDS = "<|channel|>", "<|message|>", ("<|end|>", "<|return|>", "<|call|>")
    RECIPIENT = "to="

    def split(self, text: str, final: bool) -> tuple[Optional[str], str]:
        first = text.find(self.CHANNEL)
        head = (text if first < 0 else text[:first]).lstrip()
        names_recipient = head.startswith(self.RECIPIENT)  # " to=functions.f<|channel|>...": a first call's header
        if first < 0:  # not harmony, or its first marker (or a recipient before it) still arriving: held back
            if names_recipient or not final and (self.RECIPIENT.startswith(head[:3]) if head else True):
                return None, ""  # (a call's header cut before its channel: nothing)
            return None, text if final else text[:len(text) - partial_marker_length(text, self.CHANNEL)]
        # The reply starts inside its turn (the prompt ends with <|start|>assistant): text before the first channel
        # is content, unless it names a recipient.
        leading = text[:first] if head and not names_recipient else ""
        # content in order: text messages a newline apart (as the analysis ones), each tool call's message whole
        reasoning, content, text_last, at = [], [leading], bool(leading), 0 if not leading else first
        while (channel := text.find(self.CHANNEL, at)) >= 0:
            header_end = text.find(self.MESSAGE, channel)
            if header_end < 0:  # a header still arriving
                break
            # the channel's name first; the recipient after it or in the turn's start (<|start|>assistant to=f)
            header = text[channel + len(self.CHANNEL):header_end].split()
            to_recipient = any(word.startswith(self.RECIPIENT) for word in header + text[at:channel].split())
            body_start = header_end + len(self.MESSAGE)
            ends = [(i, end) for end in self.ENDS if (i := text.find(end, body_start)) >= 0]
            stop, end = min(ends) if ends else (len(text), "")
            body = text[body_start:stop]
            if not ends and not final:  # an end marker may be arriving
                body = body[:len(body) - max(partial_marker_length(body, end) for end in self.ENDS)]
            if to_recipient:  # a tool call: whole, for the tool parser (once it has ended)
                if ends or final:
                    content.append(text[at:stop + len(end)])
                    text_last = False
            elif header[:1] == ["analysis"]:
                reasoning.append(body)
            else:
                content.append("\n" + body if text_last else body)
                text_last = True
            if not ends:
                break
            at = stop + len(end)  # the next message's turn start (and recipient) lies between here and its channel
        return "\n".join(reasoning), "".join(content)


REASONING_PARSERS = {"deepseek_r1": DeepSeekR1ReasoningParser, "qwen3": Qwen3ReasoningParser,
                     "openai_gptoss": HarmonyReasoningParser}  # engine.reasoning's

