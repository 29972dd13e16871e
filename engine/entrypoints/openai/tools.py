"""Tool calls in chat completions, as vLLM serves them.

Owns what a request's ``tool_choice`` makes of the output. A named function, or ``"required"``, constrains the
output with structured outputs to the function's arguments (a JSON object of its ``parameters`` schema) or to a
list of ``{"name", "parameters"}`` calls (vLLM's schema for ``"required"``), and the text that comes back is turned
into ``tool_calls``. ``"none"`` leaves the output alone. ``"auto"`` (OpenAI's default when tools are given) lets the
model choose and needs a parser of the model's own tool-call syntax (``TOOL_PARSERS``: ``hermes`` for Qwen 2.5 / 3
and Hermes-style templates, ``llama3_json`` for Llama 3.1 / 3.2), turned on as in vLLM by
``--enable-auto-tool-choice --tool-call-parser NAME``; without one it is refused with a message that says what
works. The tools go to the chat template either way, as vLLM sends them.
"""

from __future__ import annotations

import json
import re
from typing import Optional

from engine.entrypoints.openai.protocol import ChatCompletionRequest, FunctionCall, NamedToolChoice, ToolCall

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


class ToolChoiceError(ValueError):
    """A tool choice this server cannot honour (a 400 on ``tool_choice``)."""


def resolve_tool_choice(req: ChatCompletionRequest, parser: Optional["ToolParser"]) -> str | NamedToolChoice:
    """The request's tool choice: ``"none"``, ``"auto"`` (only with a ``parser``), ``"required"`` or the named
    function; ``ToolChoiceError`` for one this server cannot honour."""
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
    if choice == "none":
        return choice
    if not req.tools:
        raise ToolChoiceError(f"tool_choice {_label(choice)} needs tools")
    if choice == "auto" and parser is None:
        raise ToolChoiceError('tool_choice "auto" needs a parser of the model\'s tool-call syntax: start the server '
                              'with --enable-auto-tool-choice --tool-call-parser NAME, or give tool_choice '
                              '"required", a function\'s name, or "none"')
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in req.tools}:
        raise ToolChoiceError(f"tool_choice names function {choice.function.name!r}, which is not among the tools")
    return choice


def is_forced(choice) -> bool:
    """Whether ``choice`` makes the output a call (a named function, ``"required"``): constrained, then parsed."""
    return choice == "required" or isinstance(choice, NamedToolChoice)


def tool_call_schema(req: ChatCompletionRequest, choice: str | NamedToolChoice) -> dict:
    """The JSON schema the output must follow: the named function's arguments, or (``"required"``) a list of calls
    of the tools, at least one (exactly one with ``parallel_tool_calls=False``, which "auto" applies by keeping
    the first call)."""
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in req.tools if t.function.name == choice.function.name)
        return tool.function.parameters or EMPTY_PARAMETERS
    calls = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.function.name]},
                                               "parameters": t.function.parameters or EMPTY_PARAMETERS},
              "required": ["name", "parameters"]} for t in req.tools]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if req.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return schema


def forced_tool_calls(choice: str | NamedToolChoice, text: str) -> Optional[list[ToolCall]]:
    """The calls in a forced tool choice's output: a named function's call has the output as its arguments, whole or
    not (as vLLM's); ``"required"``'s list, None where the text is not whole (cut by ``max_tokens``)."""
    if isinstance(choice, NamedToolChoice):
        return [_tool_call(choice.function.name, text)]
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [_tool_call(call["name"], call["parameters"]) for call in calls]


class ToolParser:
    """A model's own tool-call syntax in its output text (``tool_choice="auto"``)."""

    def extract(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        """``(content, calls)``: the text before the calls (None if empty) and the calls; where the calls do not
        parse, the whole text as content and no call (as vLLM's parsers fall back)."""
        raise NotImplementedError

    def content_end(self, text: str) -> int:
        """How much of a growing output can be streamed as content now: up to where a call starts or may start."""
        raise NotImplementedError


class HermesToolParser(ToolParser):
    """Calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes; Qwen 2.5 and 3)."""

    START = "<tool_call>"
    CALLS = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        start = text.find(self.START)
        if start < 0:
            return text, []
        calls = []
        for body in self.CALLS.findall(text):
            call = _json_object(body)
            if call is None or not isinstance(call.get("name"), str):
                return text, []
            calls.append(_tool_call(call["name"], call.get("arguments", {})))
        return text[:start] or None, calls

    def content_end(self, text: str) -> int:
        start = text.find(self.START)
        return start if start >= 0 else len(text) - partial_marker_length(text, self.START)


class Llama3JsonToolParser(ToolParser):
    """Llama 3.1 / 3.2's JSON calls: an optional ``<|python_tag|>``, then ``{"name": ..., "parameters": {...}}``
    objects (``;`` between several); an output that starts otherwise is content."""

    PYTHON_TAG = "<|python_tag|>"

    def extract(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        body = text.strip().removeprefix(self.PYTHON_TAG).strip()
        if not body.startswith("{"):
            return text, []
        calls, decoder, at = [], json.JSONDecoder(), 0
        while at < len(body):
            try:
                call, at = decoder.raw_decode(body, at)
            except json.JSONDecodeError:
                return text, []
            if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
                return text, []
            arguments = call.get("arguments", call.get("parameters"))  # vLLM's order
            if arguments is None:
                return text, []
            calls.append(_tool_call(call["name"], arguments))
            while at < len(body) and body[at] in " \t\n;":
                at += 1
        return None, calls

    def content_end(self, text: str) -> int:
        head = text.lstrip()
        if head.startswith(("{", self.PYTHON_TAG)) or self.PYTHON_TAG.startswith(head):
            return 0  # a call may be coming: hold the text until the end
        return len(text)


class HarmonyToolParser(ToolParser):
    """gpt-oss's harmony calls (vLLM's ``openai`` parser): messages to a function,
    ``<|channel|>commentary to=functions.NAME [<|constrain|>json]<|message|>ARGUMENTS<|call|>``, as the
    ``openai_gptoss`` reasoning parser leaves them in the content; the text before the first is content."""

    MARKERS = ("<|channel|>", "<|start|>")  # a call's message starts with one
    # The recipient after the channel's name, or before the channel (in the turn's start).
    CALLS = re.compile(r"\bto=functions\.([^\s<]+)[^<]*(?:<\|channel\|>[^<]*)?(?:<\|constrain\|>[^<]*)?"
                       r"<\|message\|>(.*?)(?:<\|call\|>|<\|end\|>|$)", re.DOTALL)

    def extract(self, text: str) -> tuple[Optional[str], list[ToolCall]]:
        calls = self.CALLS.findall(text)
        if not calls:
            return text, []
        head = text[:self.content_end(text)]
        return head if head.strip() else None, [_tool_call(name, arguments.strip()) for name, arguments in calls]

    def content_end(self, text: str) -> int:
        """Up to the first marker, or a recipient (`` to=functions.f<|channel|>...``: a first message's call)."""
        starts = [i for marker in self.MARKERS if (i := text.find(marker)) >= 0]
        if (call := self.CALLS.search(text)) is not None:
            starts.append(call.start())
        if starts:
            return min(starts)
        return len(text) - max(partial_marker_length(text, marker) for marker in self.MARKERS)


TOOL_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser, "openai": HarmonyToolParser}


def _json_object(text: str) -> Optional[dict]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _tool_call(name: str, arguments) -> ToolCall:
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(function=FunctionCall(name=name, arguments=arguments))


def partial_marker_length(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker``: a growing output holds that back (the
    marker may be arriving)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def template_messages(req: ChatCompletionRequest) -> list[dict]:
    """The messages as plain dicts for the chat template (``engine.tokenizer.template_message`` turns an assistant
    turn's tool-call arguments into objects, as vLLM's)."""
    messages = []
    for m in req.messages:
        message = {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            message["tool_calls"] = m.tool_calls
        messages.append(message)
    return messages


def _label(choice) -> str:
    return f"function {choice.function.name!r}" if isinstance(choice, NamedToolChoice) else f'"{choice}"'
