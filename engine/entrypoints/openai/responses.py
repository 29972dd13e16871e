"""OpenAI's Responses API (``/v1/responses``), as vLLM serves it: the request's ``input`` (a text or a list of
messages and items) and ``instructions`` become chat messages, rendered by the chat template and generated as a chat
completion is; the reply comes back as one ``message`` output item (after a ``reasoning`` item where the server
has a reasoning parser), or streamed as the Responses API's typed events. Function tools run as the chat endpoint's
tools do (``tool_choice``; "auto" with the server's tool-call parser): a call comes back as a ``function_call``
item, and ``function_call`` / ``function_call_output`` items of ``input`` go back to the chat template as the
assistant's calls and the tools' answers (with tools the events come when the reply is whole). Stored responses
(``store``, the default) can be read back (``GET /v1/responses/{id}``), deleted and continued
(``previous_response_id``); the store keeps the latest ``STORE_SIZE`` responses in memory, as vLLM keeps its own.
A ``background`` response is answered at once as ``queued``, generated on and stored when done (``cancel`` stops
it). Built-in tools (web search, files, ...) are not served.

Owns the request and response shapes and the conversion between them and a chat completion's; the server
(``api_server``) owns the generation.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.entrypoints.openai.protocol import (ChatMessage, ChatResponseMessage, ChatTool, NamedFunction,
                                                NamedToolChoice, _NullMeansDefault)

STORE_SIZE = 1024
INPUT_ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
LOGPROBS_INCLUDE = "message.output_text.logprobs"
TEXT_PART_TYPES = ("input_text", "output_text")


def item_id(prefix: str) -> str:
    """An id as OpenAI's Responses API writes them: ``resp_...``, ``msg_...``, ``fc_...``."""
    return f"{prefix}_{uuid.uuid4().hex}"


class InputText(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(BaseModel):
    """A message of ``input``: ``{"role": ..., "content": a text or input_text / output_text parts}``."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Union[str, list[InputText]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionCallItem(BaseModel):
    """An earlier reply's call of a function tool, given back in ``input``."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(BaseModel):
    """A function tool's answer to a call, in ``input``."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, list[InputText]]


class ReasoningItem(BaseModel):
    """An earlier reply's reasoning given back in ``input`` (as agent loops give back whole outputs): dropped, as
    chat templates drop past turns' thinking."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["reasoning"]


InputItem = Union[InputMessage, FunctionCallItem, FunctionCallOutputItem, ReasoningItem]


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class ResponsesRequest(_NullMeansDefault):
    """The fields of OpenAI's ``POST /v1/responses`` this server honours (others are ignored, as vLLM ignores
    them); its tools are functions."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    input: Union[str, list[InputItem]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stream: bool = False
    store: bool = True
    previous_response_id: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    text: Optional[dict[str, Any]] = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    tools: Optional[list[dict[str, Any]]] = None  # function tools (checked by ``chat_tools``)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    user: Optional[str] = None
    priority: int = 0  # vLLM's
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)  # vLLM's
    background: bool = False  # answered at once (queued), generated on; retrieve or cancel it by id
    include: Optional[list[str]] = None  # "message.output_text.logprobs": each output token's logprob
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)  # with it, the most likely tokens at each
    # "auto": a conversation longer than the context loses its oldest turns (``without_oldest_turn``), as OpenAI's
    truncation: Literal["auto", "disabled"] = "disabled"

    @property
    def logprobs(self) -> Optional[int]:
        """How many top tokens an output token's logprob entry lists, or None without logprobs."""
        return (self.top_logprobs or 0) if LOGPROBS_INCLUDE in (self.include or ()) else None

    @field_validator("input", mode="before")
    @classmethod
    def _served_items(cls, value: Any) -> Any:
        """A message may leave out its ``type`` (OpenAI's "easy input messages"); an item or content part this
        server does not read is refused by its place and kind, before the union's type errors."""
        if not isinstance(value, list):
            return value
        items = [{"type": "message", **item} if isinstance(item, dict) and "type" not in item else item
                 for item in value]
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ValueError(f"input[{i}] must be an object (a message or an item)")
            if item["type"] not in INPUT_ITEM_TYPES:
                raise ValueError(f"input[{i}] is a {item['type']!r} item: this server reads "
                                 f"{', '.join(INPUT_ITEM_TYPES)} items")
            if item["type"] == "message" and item.get("role") not in ("user", "system", "developer", "assistant"):
                raise ValueError(f"input[{i}] has role {item.get('role')!r}: a message's role is user, system, "
                                 "developer or assistant (a tool's answer is a function_call_output item)")
            content = item.get("content") if item["type"] == "message" else None
            kinds = [p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content or []
                     if not isinstance(content, str)]
            if item["type"] == "message" and (content is None or any(k not in TEXT_PART_TYPES for k in kinds)):
                raise ValueError(f"input[{i}]'s content must be a text or input_text / output_text parts (this "
                                 f"server reads text only), got {content if content is None else kinds}")
        return items

    def _items(self) -> list:
        """``input`` as items (a text: one user message)."""
        return [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input

    def input_items(self) -> list[dict]:
        """``input`` as the items ``GET /v1/responses/{id}/input_items`` lists: each with an id, a message's text as
        an ``input_text`` part."""
        listed = []
        for item in self._items():
            fields = item.model_dump()
            if isinstance(item, InputMessage):
                parts = [{"type": "input_text", "text": item.content}] if isinstance(item.content, str) else [
                    part.model_dump() for part in item.content]
                fields.update(content=parts, status="completed")
            listed.append({"id": item_id("msg" if isinstance(item, InputMessage) else "item"), **fields})
        return listed

    def input_turns(self) -> list[dict]:
        """``input`` as chat turns: messages (the Responses API's ``developer`` role as ``system``, which templates
        know), function calls as an assistant turn's ``tool_calls`` (consecutive ones in one turn), their outputs as
        ``tool`` turns; reasoning dropped."""
        turns: list[dict] = []
        for item in self._items():
            if isinstance(item, InputMessage):
                turns.append({"role": "system" if item.role == "developer" else item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if turns and turns[-1]["role"] == "assistant":
                    turns[-1].setdefault("tool_calls", []).append(call)
                else:
                    turns.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputItem):
                output = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
                turns.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
        return turns

    def chat_tools(self) -> tuple[Optional[list[ChatTool]], Any]:
        """``tools`` and ``tool_choice`` as a chat completion's; what this server does not serve (a tool or a choice
        other than a function, a function without a name) is a ``ValueError`` naming the field."""
        tools = []
        for i, tool in enumerate(self.tools or []):
            if tool.get("type") != "function":
                raise ValueError(f"tools[{i}]: tool type {tool.get('type')!r} is not served: only function tools are")
            if not isinstance(tool.get("name"), str) or not tool["name"]:
                raise ValueError(f"tools[{i}]: a function tool needs a name")
            function = FunctionTool(**tool)
            tools.append(ChatTool(function=function.model_dump(include={"name", "description", "parameters"},
                                                                exclude_none=True)))
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function":
                raise ValueError(f"tool_choice of type {choice.get('type')!r} is not served: give none, auto, "
                                 "required or a function")
            choice = NamedToolChoice(function=NamedFunction(name=str(choice.get("name", ""))))
        return tools or None, choice

    def messages(self, history: list[dict]) -> list[ChatMessage]:
        """The chat to render: ``instructions`` as a system message (not carried over from an earlier response, as
        OpenAI's), the earlier responses' turns, then ``input``."""
        turns = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return [ChatMessage(**turn) for turn in turns + history + self.input_turns()]

    def text_format(self) -> dict[str, Any]:
        """``text.format`` as given (plain text where none is)."""
        return (self.text or {}).get("format") or {"type": "text"}

    def response_format(self) -> dict[str, Any]:
        """``text.format`` as a chat completion's ``response_format`` (its JSON schema one level down there)."""
        fmt = self.text_format()
        if fmt.get("type") != "json_schema":
            return fmt
        return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}


def without_oldest_turn(messages: list[ChatMessage]) -> Optional[list[ChatMessage]]:
    """``messages`` less their oldest turn for ``truncation: "auto"``: the first message that is no system one and
    what follows it up to the next user message (its reply, tool calls and their answers: a chat template may refuse
    a chat that opens with those); system messages stay where they are. None where no user message would be left."""
    turn = [i for i, m in enumerate(messages) if m.role != "system"]
    if not turn:
        return None
    end = next((i for i in turn[1:] if messages[i].role == "user"), None)
    if end is None:
        return None
    return [m for i, m in enumerate(messages) if m.role == "system" or not turn[0] <= i < end]


class ResponseStore:
    """The latest ``STORE_SIZE`` stored responses by id, each with the chat it continues (its turns, as
    ``ResponsesRequest.messages`` takes them) and its request's input items, oldest dropped first."""

    def __init__(self, size: int = STORE_SIZE):
        self.size = size
        self._responses: OrderedDict[str, tuple[dict, list[dict], list[dict]]] = OrderedDict()

    def put(self, response: dict, turns: list[dict], items: Optional[list[dict]] = None) -> None:
        """Store ``response`` (again, as it moves on: its input ``items`` kept from the first time)."""
        known = self._responses.get(response["id"])
        self._responses[response["id"]] = (response, turns, items if items is not None else known[2] if known else [])
        while len(self._responses) > self.size:
            self._responses.popitem(last=False)

    def get(self, response_id: str) -> Optional[tuple[dict, list[dict], list[dict]]]:
        return self._responses.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self._responses.pop(response_id, None) is not None


def output_items(message: ChatResponseMessage, reasoning: bool, cut: bool = False,
                 logprobs: Optional[list[dict]] = None) -> list[dict]:
    """A finished chat message as output items: its reasoning (where the server has a reasoning parser), its text
    (where it has text, or calls nothing; with its tokens' ``logprobs`` if asked for), then a ``function_call`` item
    a call; each ``incomplete`` where ``max_output_tokens`` cut the reply (``cut``), as OpenAI marks them."""
    status = "incomplete" if cut else "completed"
    items = [reasoning_item(message.reasoning_content or "")] if reasoning else []
    if message.content or not message.tool_calls:
        items.append(message_item(message.content or "", status))
        items[-1]["content"][0]["logprobs"] = logprobs or []
    items += [{"id": item_id("fc"), "type": "function_call", "call_id": call.id, "name": call.function.name,
               "arguments": call.function.arguments, "status": status} for call in message.tool_calls]
    return items


def assistant_turn(message: ChatResponseMessage) -> dict:
    """A finished chat message as the turn a later response's chat holds."""
    turn: dict = {"role": "assistant", "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    return turn


def message_item(text: str, status: str = "completed") -> dict:
    return {"id": item_id("msg"), "type": "message", "role": "assistant", "status": status,
            "content": [output_text_part(text)]}


def output_text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def reasoning_item(text: str) -> dict:
    return {"id": item_id("rs"), "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": "completed"}


def response_object(request_id: str, model: str, req: ResponsesRequest, output: list[dict], *,
                    status: str = "completed", finish_reason: Optional[str] = None, usage: Optional[dict] = None,
                    created_at: Optional[int] = None) -> dict:
    """A ``response`` object as OpenAI's API returns it; ``finish_reason`` "length" makes it ``incomplete`` for
    ``max_output_tokens``."""
    incomplete = status == "completed" and finish_reason == "length"
    return {
        "id": request_id, "object": "response", "created_at": created_at or int(time.time()), "model": model,
        "status": "incomplete" if incomplete else status,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None, "error": None,
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature, "top_p": req.top_p, "previous_response_id": req.previous_response_id,
        "metadata": req.metadata or {}, "store": req.store,
        "text": {"format": req.text_format()},
        "tools": req.tools or [], "tool_choice": req.tool_choice or "auto",
        "parallel_tool_calls": req.parallel_tool_calls is not False, "truncation": req.truncation,
        "output": output, "usage": usage, "user": req.user,
    }


def usage_object(prompt_tokens: int, output_tokens: int, cached_tokens: int, reasoning_tokens: int = 0) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt_tokens + output_tokens}


class EventWriter:
    """The Responses API's stream events (``event:`` and ``data:`` lines), numbered in order."""

    def __init__(self):
        self.sequence_number = 0

    def __call__(self, type_: str, **fields) -> str:
        event = {"type": type_, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {type_}\ndata: {json.dumps(event)}\n\n"
