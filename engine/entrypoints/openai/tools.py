"""Tool calls in chat completions, as vLLM serves them without a model-specific tool-call parser.

Owns what a request's ``tool_choice`` makes of the output: a named function, or ``"required"``, constrains the
output with structured outputs to the function's arguments (a JSON object of its ``parameters`` schema) or to a
list of ``{"name", "parameters"}`` calls (vLLM's schema for ``"required"``), and the text that comes back is turned
into ``tool_calls``. ``"none"`` leaves the output alone; ``"auto"`` (OpenAI's default when tools are given) needs
a parser of the model's own tool-call syntax, which this server does not have, so it is refused with a message
that says what works, as vLLM refuses it without ``--tool-call-parser``. The tools go to the chat template either
way, as vLLM sends them.
"""

from __future__ import annotations

import json
from typing import Optional

from engine.entrypoints.openai.protocol import ChatCompletionRequest, FunctionCall, NamedToolChoice, ToolCall

EMPTY_PARAMETERS = {"type": "object", "properties": {}}


class ToolChoiceError(ValueError):
    """A tool choice this server cannot honour (a 400 on ``tool_choice``)."""


def forced_tool_choice(req: ChatCompletionRequest) -> Optional[str | NamedToolChoice]:
    """``"required"`` or the named function the output must call; None where the output is free text."""
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
    if choice == "none":
        return None
    if not req.tools:
        raise ToolChoiceError(f"tool_choice {_label(choice)} needs tools")
    if choice == "auto":
        raise ToolChoiceError('tool_choice "auto" needs a parser of the model\'s tool-call syntax, which this server '
                              'does not have: give tool_choice "required", name a function, or "none"')
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in req.tools}:
        raise ToolChoiceError(f"tool_choice names function {choice.function.name!r}, which is not among the tools")
    return choice


def tool_call_schema(req: ChatCompletionRequest, choice: str | NamedToolChoice) -> dict:
    """The JSON schema the output must follow: the named function's arguments, or (``"required"``) a list of calls
    of the tools, at least one (exactly one with ``parallel_tool_calls=False``)."""
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


def tool_calls_of(choice: str | NamedToolChoice, text: str) -> Optional[list[ToolCall]]:
    """The calls in a forced tool choice's output; None where the text is not whole (cut by ``max_tokens``)."""
    if isinstance(choice, NamedToolChoice):
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return None
        return [ToolCall(function=FunctionCall(name=choice.function.name, arguments=text))]
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [ToolCall(function=FunctionCall(name=call["name"], arguments=json.dumps(call["parameters"],
                                                                                   ensure_ascii=False)))
            for call in calls]


def template_messages(req: ChatCompletionRequest) -> list[dict]:
    """The messages as the chat template takes them: an assistant turn's tool calls with their arguments as
    objects (Hugging Face templates write them out themselves; vLLM converts them the same way)."""
    messages = []
    for m in req.messages:
        message = {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            message["tool_calls"] = [_with_argument_object(call) for call in m.tool_calls]
        messages.append(message)
    return messages


def _with_argument_object(call: dict) -> dict:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def _label(choice) -> str:
    return f"function {choice.function.name!r}" if isinstance(choice, NamedToolChoice) else f'"{choice}"'
