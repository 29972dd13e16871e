"""The chat replies' parsers on model-like outputs: tool calls under ``tool_choice="auto"``
(``engine.entrypoints.openai.tools``) and reasoning models' thinking (``engine.entrypoints.openai.reasoning``)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

from engine.entrypoints.openai.reasoning import (DeepSeekR1ReasoningParser, HarmonyReasoningParser,  # noqa: E402
                                                 Qwen3ReasoningParser)
from engine.entrypoints.openai.protocol import NamedToolChoice  # noqa: E402
from engine.entrypoints.openai.tools import (HarmonyToolParser, HermesToolParser, Llama3JsonToolParser,  # noqa: E402
                                             forced_tool_calls)


def _calls(calls):
    return [(c.function.name, json.loads(c.function.arguments)) for c in calls]


def test_hermes_calls_their_text_and_what_may_stream():
    parser = HermesToolParser()
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')
    content, calls = parser.extract(text)
    assert content == "Let me check.\n"
    assert _calls(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    # A call cut by max_tokens, or one that is not JSON: the text as it is, no call (as vLLM).
    assert parser.extract(text[:60]) == (text[:60], [])
    assert parser.extract("<tool_call>{not json}</tool_call>") == ("<tool_call>{not json}</tool_call>", [])
    assert parser.extract("Just text.") == ("Just text.", [])
    assert _calls(parser.extract('<tool_call>{"name": "f"}</tool_call>')[1]) == [("f", {})]
    # Streaming: text before a call goes out; a marker that may be arriving is held back.
    assert parser.content_end("Let me check.\n<tool_") == len("Let me check.\n")
    assert parser.content_end("Let me check.\n<tool_call>{\"na") == len("Let me check.\n")
    assert parser.content_end("a < b") == len("a < b") and parser.content_end("x <") == 2


def test_llama3_json_calls_and_plain_text():
    parser = Llama3JsonToolParser()
    content, calls = parser.extract('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                                    '{"name": "get_time", "arguments": {"zone": "UTC"}}')
    assert content is None and _calls(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "UTC"})]
    assert parser.extract('{"name": "f", "parameters": {}}')[1][0].function.arguments == "{}"
    both = parser.extract('{"name": "f", "arguments": {"a": 1}, "parameters": {"b": 2}}')[1]  # vLLM's order
    assert _calls(both) == [("f", {"a": 1})]
    for text in ("The weather is fine.", '{"city": "Paris"}', '{"name": "f", "parameters": {"a": 1'):
        assert parser.extract(text) == (text, [])
    assert parser.content_end("The weather") == len("The weather")
    assert parser.content_end(' {"na') == 0 and parser.content_end("<|python") == 0 and parser.content_end("") == 0


HARMONY_CALL = ('<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
                '{"city": "Paris"}<|call|>')
HARMONY_CALL_FIRST = ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'
HARMONY_REPLY = ("<|channel|>analysis<|message|>The user asks the capital. Paris.<|end|><|start|>assistant"
                 "<|channel|>final<|message|>Paris.")


@pytest.mark.parametrize("parser, text, want", [
    (DeepSeekR1ReasoningParser(), "Paris is the capital.</think>\n\nParis.", ("Paris is the capital.", "\n\nParis.")),
    (DeepSeekR1ReasoningParser(), "<think>Hmm.</think>Paris.", ("Hmm.", "Paris.")),
    (DeepSeekR1ReasoningParser(), "Still thinking", ("Still thinking", "")),  # never closed: all reasoning
    (DeepSeekR1ReasoningParser(), "  Hmm.</think>x", ("  Hmm.", "x")),  # vLLM keeps the whitespace without a tag
    (DeepSeekR1ReasoningParser(), "\n<think>Hmm.</think>x", ("Hmm.", "x")),  # ...and drops it with the tag
    (Qwen3ReasoningParser(), "<think>Hmm.</think>Paris.", ("Hmm.", "Paris.")),
    (Qwen3ReasoningParser(), "Paris.", (None, "Paris.")),  # no block opened: no thinking
    (Qwen3ReasoningParser(), "<think>Cut by max_tokens", ("Cut by max_tokens", "")),
    # gpt-oss's harmony: the analysis channel is the reasoning, the final channel the answer
    (HarmonyReasoningParser(), HARMONY_REPLY, ("The user asks the capital. Paris.", "Paris.")),
    (HarmonyReasoningParser(), HARMONY_REPLY + "<|return|>", ("The user asks the capital. Paris.", "Paris.")),
    (HarmonyReasoningParser(), "<|channel|>analysis<|message|>Cut by max_to", ("Cut by max_to", "")),
    (HarmonyReasoningParser(), "Paris.", (None, "Paris.")),  # no channel: not harmony, all content
    (HarmonyReasoningParser(), "<|channel|>analysis<|message|>Need the weather.<|end|>" + HARMONY_CALL,
     ("Need the weather.", HARMONY_CALL)),  # a tool call: whole, for the tool parser
    # several analysis messages are all reasoning; text messages a newline apart
    (HarmonyReasoningParser(), "<|channel|>analysis<|message|>A1.<|end|><|start|>assistant<|channel|>analysis"
                               "<|message|>A2.<|end|>" + HARMONY_REPLY.replace("analysis", "commentary", 1),
     ("A1.\nA2.", "The user asks the capital. Paris.\nParis.")),
    # the first message's recipient in the turn's start, right after the prompt's <|start|>assistant
    (HarmonyReasoningParser(), HARMONY_CALL_FIRST, ("", HARMONY_CALL_FIRST)),
    (HarmonyReasoningParser(), " to=functions.get_weather", (None, "")),  # a call's header cut before its channel
    (HarmonyReasoningParser(), "I set x to=5<|channel|>final<|message|>Hi", ("", "I set x to=5\nHi")),  # no recipient
])
def test_reasoning_split_and_its_growing_stream_agree(parser, text, want):
    """Whole, the reply splits as vLLM's parsers split it; streamed a character at a time, what is split so far
    only ever grows (a tag that may be arriving is held back) and ends as the whole split."""
    assert parser.split(text, final=True) == want
    reasoning_sent = content_sent = ""
    for end in range(len(text) + 1):
        reasoning, content = parser.split(text[:end], final=end == len(text))
        assert (reasoning or "").startswith(reasoning_sent) and content.startswith(content_sent), text[:end]
        reasoning_sent, content_sent = reasoning or "", content
    assert (reasoning_sent, content_sent) == ((want[0] or ""), want[1])


class _CharTokenizer:
    """One token a character (its code point): tags of several tokens, as the default model's tokenizer has."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


@pytest.mark.parametrize("prompt, ended", [
    ("Q?<think>\n\n</think>\n\n", True),  # Qwen 3 with enable_thinking=False: an empty block, closed
    ("Q?<think>\n", False),  # DeepSeek-R1's template opens the block for the reply
    ("Q?", False),  # Qwen 3 thinking: the reply opens it
    ("<think>a</think>b<think>\n", False),  # an earlier turn's block closed, this one open
])
def test_reasoning_end_in_prompt_and_output(prompt, ended):
    from engine.reasoning import ReasoningEnd

    end = ReasoningEnd(_CharTokenizer())
    assert end.ended_in_prompt(_CharTokenizer().encode(prompt)) == ended
    assert end.ends(_CharTokenizer().encode("thinking...</think>")) and not end.ends(_CharTokenizer().encode("</think>."))


@pytest.mark.parametrize("prompt, ended", [
    ("<|start|>user<|message|>Q?<|end|><|start|>assistant", False),  # the reply thinks first
    ("<|start|>assistant<|channel|>final<|message|>A.<|end|><|start|>user<|message|>Q?<|end|><|start|>assistant",
     False),  # an earlier turn's answer, this turn open
    ("<|start|>user<|message|>Q?<|end|><|start|>assistant<|channel|>final<|message|>", True),  # the answer prefilled
])
def test_harmony_reasoning_ends_where_the_final_channel_starts(prompt, ended):
    """gpt-oss (``openai_gptoss``): the thinking ends with the final channel's header, a turn's start opens it."""
    from engine.reasoning import ReasoningEnd

    end = ReasoningEnd(_CharTokenizer(), "openai_gptoss")
    assert end.ended_in_prompt(_CharTokenizer().encode(prompt)) == ended
    assert end.ends(_CharTokenizer().encode(HARMONY_REPLY[:-len("Paris.")]))
    assert not end.ends(_CharTokenizer().encode(HARMONY_REPLY))


def test_a_named_functions_call_is_the_whole_output_cut_or_not():
    """vLLM's named tool choice: the output is the call's arguments, also when max_tokens cut it (it came back as
    content); "required"'s list is a call only when whole."""
    named = NamedToolChoice(function={"name": "get_weather"})
    for text in ('{"city": "Paris"}', '{"city": "Pa'):
        (call,) = forced_tool_calls(named, text)
        assert (call.function.name, call.function.arguments) == ("get_weather", text)
    assert forced_tool_calls("required", '[{"name": "get_weather", "parameters": {"ci') is None


@pytest.mark.parametrize("content, want", [
    (HARMONY_CALL, (None, [("get_weather", {"city": "Paris"})])),
    (HARMONY_CALL_FIRST, (None, [("get_weather", {"city": "Paris"})])),
    # the recipient in the turn's start, a preamble on the final channel before it
    ('Let me look.<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{"zone": "UTC"}'
     "<|call|>", ("Let me look.", [("get_time", {"zone": "UTC"})])),
    ("Paris.", ("Paris.", [])),
])
def test_harmony_tool_calls_as_the_reasoning_parser_leaves_them(content, want):
    """vLLM's ``openai`` tool parser: gpt-oss's messages to a function (left whole in the content by the
    ``openai_gptoss`` reasoning parser) are the calls; the text before them is content, streamed up to them."""
    parser = HarmonyToolParser()
    text, calls = parser.extract(content)
    assert (text, _calls(calls)) == want
    assert content[:parser.content_end(content)].strip() == (want[0] or "")
    assert parser.content_end("Let me look.<|sta") == len("Let me look.")
