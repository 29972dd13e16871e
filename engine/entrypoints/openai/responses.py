"""OpenAI's Responses API (``/v1/responses``), as vLLM serves it for text: the request's ``input`` (a text or a list of
messages) and ``instructions`` become chat messages, rendered by the chat template and generated as a chat
completion is; the reply comes back as one ``message`` output item (after a ``reasoning`` item where the server
has a reasoning parser), or streamed as the Responses API's typed events. Stored responses (``store``, the
default) can be read back (``GET /v1/responses/{id}``) and continued (``previous_response_id``); the store keeps the
latest ``STORE_SIZE`` responses in memory, as vLLM keeps its own. Tools, built-in or functions, are not served.

Owns the request and response shapes and the conversion between them and a chat completion's; the server
(``api_server``) owns the generation.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from engine.entrypoints.openai.protocol import ChatMessage, _NullMeansDefault, random_id

STORE_SIZE = 1024


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


class ResponsesRequest(_NullMeansDefault):
    """The fields of OpenAI's ``POST /v1/responses`` this server honours (others are ignored, as vLLM ignores
    them); ``tools`` must be empty."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    input: Union[str, list[InputMessage]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stream: bool = False
    store: bool = True
    previous_response_id: Optional[str] = None
    metadata: Optional[dict[str, str]] = None
    text: Optional[dict[str, Any]] = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    tools: Optional[list[dict[str, Any]]] = None
    user: Optional[str] = None
    priority: int = 0  # vLLM's
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)  # vLLM's

    def input_turns(self) -> list[dict]:
        """``input`` as chat turns; the Responses API's ``developer`` role as ``system``, which templates know."""
        items = [InputMessage(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in items]

    def messages(self, history: list[dict]) -> list[ChatMessage]:
        """The chat to render: ``instructions`` as a system message (not carried over from an earlier response, as
        OpenAI's), the earlier responses' turns, then ``input``."""
        turns = [{"role": "system", "content": self.instructions}] if self.instructions else []
        return [ChatMessage(**turn) for turn in turns + history + self.input_turns()]

    def response_format(self) -> Optional[dict[str, Any]]:
        """``text.format`` as a chat completion's ``response_format`` (its JSON schema one level down there)."""
        fmt = (self.text or {}).get("format") or {"type": "text"}
        if fmt.get("type") != "json_schema":
            return fmt
        return {"type": "json_schema", "json_schema": {k: v for k, v in fmt.items() if k != "type"}}


class ResponseStore:
    """The latest ``STORE_SIZE`` stored responses by id, each with the chat it continues (its turns, as
    ``ResponsesRequest.messages`` takes them), oldest dropped first."""

    def __init__(self, size: int = STORE_SIZE):
        self.size = size
        self._responses: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    def put(self, response: dict, turns: list[dict]) -> None:
        self._responses[response["id"]] = (response, turns)
        while len(self._responses) > self.size:
            self._responses.popitem(last=False)

    def get(self, response_id: str) -> Optional[tuple[dict, list[dict]]]:
        return self._responses.get(response_id)


def message_item(text: str, status: str = "completed") -> dict:
    return {"id": random_id("msg"), "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def reasoning_item(text: str) -> dict:
    return {"id": random_id("rs"), "type": "reasoning", "summary": [],
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
        "metadata": req.metadata or {}, "store": req.store, "text": {"format": req.response_format()},
        "tools": [], "tool_choice": "auto", "parallel_tool_calls": True, "truncation": "disabled",
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
