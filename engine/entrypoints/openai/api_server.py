"""The OpenAI-compatible HTTP server: command line, FastAPI app, endpoints, error mapping.

    python -m engine.entrypoints.openai.api_server [--model PATH] [--port 8000] ...
    python scripts/serve.py ...                      (the same)

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both
with SSE streaming), GET /health, GET /version, GET /metrics (Prometheus); with
VLLM_ALLOW_RUNTIME_LORA_UPDATING set, POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

LoRA adapters (``--enable-lora --lora-modules name=path``, as vLLM): a request whose ``model`` is an adapter's name
runs with that adapter (``engine.lora.LoRARequest``); /v1/models lists the adapters after the base model.

Owns the translation between OpenAI's wire format (``protocol``) and the engine's
``SamplingParams`` / ``RequestOutput``: prompt tokenization and length checks,
streamed deltas (the engine's outputs hold back what a stop string may still cut,
so none is sent), logprobs in the completions and chat formats, usage, and
OpenAI-style error bodies. Generation itself is ``AsyncLLM``'s; metrics are
``ServingMetrics``'. Every request, good or bad, is answered; none stops the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextvars
import dataclasses
import functools
import gc
import importlib.metadata
import json
import logging
import os
import re
import secrets
import signal
import socket
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Iterable, Literal, Optional, Sequence, Union

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_llm import AsyncLLM, BeamSearchStream, RequestStream, final_outputs, merge_streams
from engine.beam_search import BeamSearchParams
from engine.engine_loop import PROFILER_DIR_ENV
from engine.engine_args import (DEFAULT_ADMISSION_RESERVE_TOKENS, IGNORED_VLLM_ARGS, KV_CACHE_DTYPES,
                                QUANTIZATION_METHODS, EngineArgs)
from engine.entrypoints.openai.protocol import (
    ChatCompletionChoice, ChatCompletionChunk, ChatCompletionChunkChoice, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatResponseMessage, ChatTokenLogprob, ChatTopLogprob,
    ClassificationData, ClassificationRequest, ClassificationResponse, CompletionChoice, CompletionLogprobs,
    CompletionRequest, CompletionResponse, ErrorInfo, ErrorResponse,
    DetokenizeRequest, DetokenizeResponse, EmbeddingData, EmbeddingRequest, EmbeddingResponse, LoadLoRAAdapterRequest,
    ModelCard, ModelList, PoolingData, PoolingRequest, PoolingResponse, UnloadLoRAAdapterRequest,
    UpdateWeightsFromDiskRequest,
    NamedToolChoice, PromptLogprob, PromptLogprobs, PromptTokenUsageInfo, RerankDocument, RerankRequest,
    RerankResponse, RerankResult, ScoreData, ScoreRequest, ScoreResponse,
    TokenizeRequest, TokenizeResponse, UsageInfo,
)
from engine.entrypoints.openai.reasoning import REASONING_PARSERS, ReasoningParser
from engine.entrypoints.openai.responses import (EventWriter, ResponsesRequest, ResponseStore, assistant_turn, item_id,
                                                 message_item, output_items, output_text_part, response_object,
                                                 usage_object, without_oldest_turn)
from engine.entrypoints.openai.tools import (TOOL_PARSERS, ToolChoiceError, ToolParser, forced_tool_calls, is_forced,
                                             resolve_tool_choice, template_messages, tool_call_schema)
from engine.generation_config import SAMPLING_FIELDS
from engine.lora import LoRARequest, adapter_folder_problem
from engine.metrics import ServingMetrics, cache_config_info
from engine.outputs import CompletionOutput, RequestOutput
from engine.pooling import (RUNNERS, PoolingParams, check_task, class_labels, cosine, is_classifier, pooled_data,
                            score_pairs)
from engine.sampling_params import SamplingParams
from engine.stats_log import LOG_STATS_INTERVAL_ENV, PeriodicStatsLogger
from models.config import LOAD_FORMATS, quantization_method

logger = logging.getLogger("pagedjax.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
ENGINE_WATCH_INTERVAL_S = 1.0  # how often the server checks that its engine still runs (watch_engine)

# =========================================================================================
# errors
# =========================================================================================


class APIError(Exception):
    """An error answered with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status_code: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status_code = status_code
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _error_response(status_code: int, info: ErrorInfo, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status_code, headers=headers)


def _validation_error_info(exc: RequestValidationError) -> ErrorInfo:
    """Pydantic's errors as one message; ``param`` is the top-level field (None for the body itself)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request body", "type": ""}
    loc = [str(part) for part in first.get("loc", ())[1:]]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return ErrorInfo(message=f"malformed JSON in the request body: {detail}".rstrip(": "),
                         type="invalid_request_error")
    if not loc:
        message = ("the request body is required (a JSON object)" if first.get("type") == "missing"
                   else f"the request body must be a JSON object: {first.get('msg')}")
        return ErrorInfo(message=message, type="invalid_request_error")
    message = f"{'.'.join(loc)}: {first.get('msg')}"
    others = sorted({str(e["loc"][1]) for e in errors if len(e.get("loc", ())) > 1} - {loc[0]})
    if others:
        message += f" (also invalid: {', '.join(others)})"
    return ErrorInfo(message=message, type="invalid_request_error", param=loc[0])


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        return _error_response(exc.status_code, exc.info)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        # FastAPI parses a body as JSON only under a JSON media type (or none): another one reads as "not a JSON
        # object" whatever the body holds, so say what is wrong, with vLLM's status
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type and media_type != "application/json" and not media_type.endswith("+json"):
            return _error_response(415, ErrorInfo(
                message=f"Unsupported Media Type: the request body must be sent as application/json, got "
                        f"{media_type!r}", type="invalid_request_error"))
        return _error_response(400, _validation_error_info(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(exc.status_code, ErrorInfo(message=str(exc.detail), type=kind),
                               headers=getattr(exc, "headers", None))


class _InternalErrorMiddleware:
    """Plain ASGI middleware: an unexpected error in a route is logged once and answered with an OpenAI-style 500.
    (Starlette's handler for ``Exception`` answers too, but then re-raises for the ASGI server to log it again.) A
    request cancelled before its answer began (uvicorn's shutdown) is answered with a 503."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, streaming = False, False

        async def sending(message):
            nonlocal started, streaming
            if message["type"] == "http.response.start":
                started = True
                streaming = any(name == b"content-type" and value.startswith(b"text/event-stream")
                                for name, value in message.get("headers", ()))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when its graceful shutdown times out: each got a
            # plain-text 500 (a stream: its end cut) and a traceback in the log; now an OpenAI-style 503, or a
            # stream's error event and its end
            info = ErrorInfo(message="the server is shutting down", type="server_error")
            if not started:
                await _error_response(503, info)(scope, receive, send)
            elif streaming:
                event = json.dumps(ErrorResponse(error=info).model_dump())
                await send({"type": "http.response.body", "body": f"data: {event}\n\ndata: [DONE]\n\n".encode(),
                            "more_body": False})
            else:
                raise
        except Exception as exc:
            if started:  # too late for a 500: the ASGI server ends the response
                raise
            logger.exception("request failed")
            info = ErrorInfo(message=f"internal server error: {type(exc).__name__}: {exc}", type="server_error")
            await _error_response(500, info)(scope, receive, send)


_CLIENT_REQUEST_ID: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("client_request_id", default=None)


def response_id(prefix: str, req=None) -> str:
    """A response's id, as vLLM's: ``<prefix>-`` and the request's ``X-Request-Id`` header, else its body's
    ``request_id``, else a random one."""
    return f"{prefix}-{_CLIENT_REQUEST_ID.get() or getattr(req, 'request_id', None) or uuid.uuid4().hex}"


def engine_id(request_id: str, index: int) -> str:
    """The engine's id of a response's prompt ``index``: unique whatever id a client gave (two requests may bring
    the same ``X-Request-Id``)."""
    return f"{request_id}-{index}-{uuid.uuid4().hex[:8]}"


class _RequestIdMiddleware:
    """Plain ASGI middleware: a request's ``X-Request-Id`` header names its response (``response_id``); with
    ``echo`` (vLLM's ``--enable-request-id-headers``) the response carries it back (a new one where none came). It
    also counts the API requests (``_is_api_path``) in flight, which /load reports."""

    def __init__(self, app, echo: bool):
        self.app, self.echo = app, echo

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((value.decode("latin-1") for key, value in scope["headers"] if key == b"x-request-id"), None)
        reply = (given or uuid.uuid4().hex).encode("latin-1")

        async def sending(message):
            if self.echo and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", reply)]}
            await send(message)

        token = _CLIENT_REQUEST_ID.set(given)
        counted = _is_api_path(scope["path"])  # the load /load reports
        state = scope["app"].state
        state.requests_in_flight += counted
        try:
            await self.app(scope, receive, sending)
        finally:
            state.requests_in_flight -= counted
            _CLIENT_REQUEST_ID.reset(token)


def _is_api_path(path: str) -> bool:
    """Whether a route is the API proper, which ``--api-key`` guards and ``/load`` counts: /v1/* as in vLLM, and
    /v2/* and /invocations, which answer the same requests (generation through /invocations got round the key)."""
    return path.startswith(("/v1/", "/v2/")) or path in ("/v1", "/invocations")


class _APIKeyMiddleware:
    """Plain ASGI middleware: the API's routes (``_is_api_path``) need ``Authorization: Bearer <api key>`` (checked
    before the body)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _is_api_path(scope["path"]):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self._expected):
                reason = "missing" if not given else "incorrect"
                info = ErrorInfo(message=f"{reason} API key: send the header 'Authorization: Bearer <key>' with "
                                 "the key the server was started with (--api-key)",
                                 type="invalid_request_error", code="invalid_api_key")
                await _error_response(401, info, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


# =========================================================================================
# the app
# =========================================================================================


def build_app(async_llm: AsyncLLM, served_model_names: Sequence[str], *, api_key: Optional[str] = None,
              metrics: Optional[ServingMetrics] = None, tool_parser: Optional[str] = None,
              reasoning_parser: Optional[str] = None, chat_template: Optional[str] = None,
              allowed_origins: Sequence[str] = (), lora_modules: Sequence[LoRAModulePath] = (),
              allow_runtime_lora_updating: Optional[bool] = None, dev_mode: Optional[bool] = None,
              trust_request_chat_template: bool = False, request_id_headers: bool = False,
              return_tokens_as_token_ids: bool = False) -> FastAPI:
    """The FastAPI app over ``async_llm``. Several apps may share one ``AsyncLLM`` (pass the
    same ``metrics`` to share it too; by default a new one is made and registered). ``tool_parser``: a name in
    ``TOOL_PARSERS``, which allows ``tool_choice="auto"``; ``reasoning_parser``: one in ``REASONING_PARSERS``;
    ``chat_template``: a Jinja template instead of the model's; ``allowed_origins``: web origins whose pages may call
    the server (CORS; none by default). ``lora_modules``: LoRA adapters served under their names (ids 1, 2, ... in
    order; the engine needs ``enable_lora``); ``allow_runtime_lora_updating``: serve /v1/load_lora_adapter and
    /v1/unload_lora_adapter (None: as the environment variable VLLM_ALLOW_RUNTIME_LORA_UPDATING says, as vLLM);
    ``dev_mode``: serve vLLM's development routes, /sleep, /wake_up and /is_sleeping (None: as VLLM_SERVER_DEV_MODE=1
    says, as vLLM); ``trust_request_chat_template``: render a Jinja template a request brings (``chat_template``,
    or one in ``chat_template_kwargs``); refused by default, as vLLM does, since a template is code that runs on the
    server (a loop of a billion steps, say); ``request_id_headers``: each response carries an ``X-Request-Id``
    header (the request's own, else a new one; vLLM's ``--enable-request-id-headers``);
    ``return_tokens_as_token_ids``: logprobs name their tokens ``token_id:<id>`` (a request may say otherwise).
    Raises ValueError for adapters the server cannot serve (LoRA off, a name taken twice)."""
    serving = OpenAIServing(async_llm, list(served_model_names), tool_parser, reasoning_parser, chat_template,
                            lora_modules, trust_request_chat_template, return_tokens_as_token_ids)
    if metrics is None:
        metrics = ServingMetrics(served_model_names[0], async_llm.stats, async_llm.max_model_len,
                                 cache_config=cache_config_info(async_llm.engine.args,
                                                                async_llm.stats()["num_usable_blocks"]))
        async_llm.add_stat_logger(metrics)
    app = FastAPI(title="pagedjax OpenAI-compatible server", version=server_version())
    app.state.serving, app.state.metrics, app.state.requests_in_flight = serving, metrics, 0
    _install_error_handlers(app)
    app.add_middleware(_InternalErrorMiddleware)  # the innermost of the middlewares added here
    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)
    if allowed_origins:  # a browser's preflight (OPTIONS, no key) is answered before the key check
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(_RequestIdMiddleware, echo=request_id_headers)  # outermost: its header on every answer

    @app.get("/load")
    async def load() -> dict:
        """vLLM's server load: the API requests (``_is_api_path``) being answered now, streams included."""
        return {"server_load": app.state.requests_in_flight}

    @app.get("/health")
    @app.get("/ping")  # vLLM's (SageMaker's) alias
    @app.post("/ping")
    async def health() -> Response:
        """200 while the engine runs, busy or not; 503 once it has died (vLLM's): the server then stops by itself
        (``watch_engine``), for its supervisor to start it again."""
        return Response(status_code=200 if async_llm.is_alive() else 503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": server_version(), **engine_facts(async_llm)}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(await run_in_threadpool(metrics.render), media_type=metrics.content_type)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return serving.model_list()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        return await _cancel_on_disconnect(raw, serving.create_completion(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        return await _cancel_on_disconnect(raw, serving.create_chat_completion(body))

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, raw: Request):
        return await _cancel_on_disconnect(raw, serving.create_response(body))

    @app.get("/v1/responses/{response_id}")
    async def retrieve_response(response_id: str) -> dict:
        return serving.retrieve_response(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str) -> dict:
        return serving.delete_response(response_id)

    @app.get("/v1/responses/{response_id}/input_items")
    async def response_input_items(response_id: str, order: Literal["asc", "desc"] = "desc", limit: int = 20,
                                   after: Optional[str] = None) -> dict:
        return serving.response_input_items(response_id, order, limit, after)

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str) -> dict:
        return await serving.cancel_response(response_id)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, raw: Request):
        return await _cancel_on_disconnect(raw, serving.create_embedding(body))

    @app.post("/classify")
    @app.post("/v1/classify")
    async def classify(body: ClassificationRequest, raw: Request):
        return await _cancel_on_disconnect(raw, serving.create_classification(body))

    @app.post("/pooling")
    async def pooling(body: PoolingRequest, raw: Request):
        return await _cancel_on_disconnect(raw, serving.create_pooling(body))

    @app.post("/score")
    @app.post("/v1/score")
    async def score(body: ScoreRequest, raw: Request):
        return await _cancel_on_disconnect(raw, serving.create_score(body))

    @app.post("/rerank")
    @app.post("/v1/rerank")
    @app.post("/v2/rerank")
    async def rerank(body: RerankRequest, raw: Request):
        return await _cancel_on_disconnect(raw, serving.create_rerank(body))

    if async_llm.engine.args.runner != "pooling":
        invocation_types = [(ChatCompletionRequest, chat_completions), (CompletionRequest, completions)]
    elif serving._is_classifier:
        invocation_types = [(ClassificationRequest, classify), (PoolingRequest, pooling)]
    else:
        invocation_types = [(EmbeddingRequest, embeddings), (ScoreRequest, score), (RerankRequest, rerank),
                            (PoolingRequest, pooling)]

    @app.post("/invocations")
    async def invocations(raw: Request):
        """vLLM's (Amazon SageMaker's) one route for everything: the body goes to the first of this engine's
        endpoints whose request it is (chat, then completions; for a pooling engine its pooling endpoints)."""
        try:
            body = await raw.json()
        except ValueError:
            raise bad_request("the request body is not valid JSON") from None
        for request_type, endpoint in invocation_types:
            try:
                request = request_type.model_validate(body)
            except ValidationError:
                continue
            return await endpoint(request, raw)
        raise bad_request("Cannot find suitable handler for request. Expected one of: "
                          + ", ".join(request_type.__name__ for request_type, _ in invocation_types))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        return await serving.tokenize(body)

    if allow_runtime_lora_updating is None:
        allow_runtime_lora_updating = runtime_lora_updating_allowed()
    if allow_runtime_lora_updating:  # as vLLM: only with the environment variable, else these routes are absent
        logger.warning("LoRA adapters may be loaded and unloaded at runtime (%s): any client of the API may make "
                       "the server read a folder of this machine", RUNTIME_LORA_UPDATING_ENV)

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
            return PlainTextResponse(await serving.load_lora_adapter(body))

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
            return PlainTextResponse(serving.unload_lora_adapter(body))

    if dev_mode is None:
        dev_mode = os.environ.get(DEV_MODE_ENV) == "1"
    if dev_mode:  # as vLLM: an RL loop puts the engine to sleep while its trainer uses the GPU
        @app.post("/sleep")
        async def sleep(level: int = 1) -> Response:
            try:
                await async_llm.sleep(level)
            except ValueError as e:
                raise bad_request(str(e), param="level" if level != 1 else None) from None
            return Response(status_code=200)

        @app.post("/wake_up")
        async def wake_up() -> Response:
            try:
                await async_llm.wake_up()
            except ValueError as e:
                raise bad_request(str(e)) from None
            return Response(status_code=200)

        @app.get("/is_sleeping")
        async def is_sleeping() -> dict:
            return {"is_sleeping": await async_llm.is_sleeping()}

        @app.post("/reset_prefix_cache")
        async def reset_prefix_cache() -> Response:
            await async_llm.reset_prefix_cache()
            return Response(status_code=200)

        @app.post("/update_weights_from_disk")  # SGLang's route: an RL loop's new policy, between its rollouts
        async def update_weights_from_disk(body: UpdateWeightsFromDiskRequest) -> dict:
            try:
                await async_llm.update_weights_from_disk(body.model_path, body.load_format)
            except (ValueError, OSError) as e:
                raise bad_request(str(e), param="model_path") from None
            return {"success": True, "message": f"weights loaded from {body.model_path}"}

    trace_dir = os.environ.get(PROFILER_DIR_ENV)
    if trace_dir:  # as vLLM: the profiler's routes only where its folder is set
        logger.warning("the profiler's routes are on (/start_profile, /stop_profile): traces go to %s", trace_dir)

        @app.post("/start_profile")
        async def start_profile() -> Response:
            try:
                await async_llm.start_profile(trace_dir)
            except ValueError as e:  # one runs already
                raise bad_request(str(e)) from None
            return Response(status_code=200)

        @app.post("/stop_profile")
        async def stop_profile() -> Response:
            try:
                await async_llm.stop_profile()
            except ValueError as e:  # none runs
                raise bad_request(str(e)) from None
            return Response(status_code=200)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return await serving.detokenize(body)

    return app


async def _cancel_on_disconnect(request: Request, work):
    """Await ``work`` (the response, or a streaming response that was made at once), but cancel
    it, aborting its engine requests, if the client disconnects first. (Streaming bodies are
    watched by Starlette itself, which cancels the body iterator on disconnect.)"""
    task = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server shutting down: the work's engine requests are aborted too
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        logger.info("client disconnected; request cancelled")
        return Response(status_code=499)
    return task.result()


def server_version() -> str:
    try:
        return importlib.metadata.version("pagedjax")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (pagedjax is not installed; running from a source tree)"


# =========================================================================================
# requests -> engine -> responses
# =========================================================================================


@dataclasses.dataclass
class _Prompt:
    text: Optional[str]  # None when the caller sent token ids
    token_ids: list[int]


@dataclasses.dataclass
class _ChoiceState:
    """What a stream has already sent for one choice."""

    text_sent: int = 0
    tokens_sent: int = 0
    text_offset: int = 0  # completions logprobs: offset of the next token in the choice's text
    reasoning_sent: int = 0  # chat with a reasoning parser: characters of the reasoning sent (text_sent: content)
    started: bool = False
    finished: bool = False


@dataclasses.dataclass(frozen=True)
class _Adapter:
    """A LoRA adapter the server serves: its request (name, id, folder) and its base model's served name."""

    request: LoRARequest
    parent: str


class OpenAIServing:
    """The two generation endpoints, the model list and its LoRA adapters, over one ``AsyncLLM``."""

    def __init__(self, async_llm: AsyncLLM, served_model_names: list[str], tool_parser: Optional[str] = None,
                 reasoning_parser: Optional[str] = None, chat_template: Optional[str] = None,
                 lora_modules: Sequence[LoRAModulePath] = (), trust_request_chat_template: bool = False,
                 return_tokens_as_token_ids: bool = False):
        self.async_llm = async_llm
        self.return_tokens_as_token_ids = return_tokens_as_token_ids
        self.served_model_names = served_model_names
        # LoRA adapters by name (vLLM's --lora-modules, /v1/load_lora_adapter), in the order they came; each has an
        # id of its own, never reused (the engine keys its adapters and prefix cache by id).
        self.lora_adapters: dict[str, _Adapter] = {}
        self._last_lora_id = 0
        if lora_modules and not async_llm.engine.args.enable_lora:
            raise ValueError("LoRA adapters need an engine started with enable_lora (--enable-lora)")
        for module in lora_modules:
            problem = self._lora_name_problem(module.name)
            if problem:
                raise ValueError(problem)
            self._add_lora(module.name, module.path, module.base_model_name)
        self.chat_template = chat_template  # instead of the model's (--chat-template)
        # a request's own template is rendered only where trusted (--trust-request-chat-template)
        self.trust_request_chat_template = trust_request_chat_template
        # tool_choice="auto": the model's tool-call syntax (engine.entrypoints.openai.tools.TOOL_PARSERS)
        self.tool_parser: Optional[ToolParser] = TOOL_PARSERS[tool_parser]() if tool_parser else None
        # a reasoning model's thinking as reasoning_content (engine.entrypoints.openai.reasoning)
        self.reasoning_parser: Optional[ReasoningParser] = (REASONING_PARSERS[reasoning_parser]()
                                                            if reasoning_parser else None)
        self.created = int(time.time())
        self.responses = ResponseStore()  # /v1/responses' stored responses
        self._background: dict[str, asyncio.Task] = {}  # background responses still generating, by id

    def model_list(self) -> ModelList:
        """The served names of the base model, then the LoRA adapters (``root`` their folder, ``parent`` their base
        model), as vLLM lists them."""
        engine = self.async_llm.engine
        return ModelList(data=[ModelCard(id=name, created=self.created, root=engine.model_path,
                                         max_model_len=engine.max_model_len)
                               for name in self.served_model_names] +
                         [ModelCard(id=name, created=self.created, root=adapter.request.lora_path,
                                    parent=adapter.parent) for name, adapter in self.lora_adapters.items()])

    # -- LoRA adapters (vLLM's --lora-modules, /v1/load_lora_adapter, /v1/unload_lora_adapter) -------------------

    def _add_lora(self, name: str, path: str, base_model_name: Optional[str] = None) -> LoRARequest:
        self._last_lora_id += 1
        request = LoRARequest(name, self._last_lora_id, path)
        parent = base_model_name if base_model_name in self.served_model_names else self.served_model_names[0]
        self.lora_adapters[name] = _Adapter(request, parent)
        return request

    def _lora_name_problem(self, name: str) -> Optional[str]:
        """Why ``name`` cannot name a new adapter (it names the base model or another adapter), or None."""
        if name in self.served_model_names:
            return f"{name!r} is the base model's name: give the LoRA adapter another"
        if name in self.lora_adapters:
            return f"The lora adapter '{name}' has already been loaded."
        return None

    async def load_lora_adapter(self, req: LoadLoRAAdapterRequest) -> str:
        """vLLM's ``/v1/load_lora_adapter``: serve ``req.lora_path`` under the model name ``req.lora_name``, with
        the next id. The engine reads the adapter before the answer, as vLLM's: one it cannot serve (its folder,
        its files, its rank, its shapes) is a 400 on ``lora_path`` and is not listed."""
        if not req.lora_name or not req.lora_path:
            raise bad_request("Both 'lora_name' and 'lora_path' must be provided.",
                              param="lora_path" if req.lora_name else "lora_name")
        if not self.async_llm.engine.args.enable_lora:
            raise bad_request("LoRA is off: start the server with --enable-lora to serve LoRA adapters",
                              param="lora_name")
        problem = await run_in_threadpool(adapter_folder_problem, req.lora_path)
        if problem is not None:
            raise bad_request(problem, param="lora_path")
        problem = self._lora_name_problem(req.lora_name)  # checked and taken with no await between
        if problem is not None:
            raise bad_request(problem, param="lora_name")
        request = self._add_lora(req.lora_name, req.lora_path)
        try:
            await self.async_llm.add_lora(request)
        except ValueError as e:
            del self.lora_adapters[req.lora_name]
            raise bad_request(f"cannot load LoRA adapter {req.lora_name!r}: {e}", param="lora_path") from None
        except BaseException:  # the engine's loop stopped, the client left: not listed, and the error goes on
            self.lora_adapters.pop(req.lora_name, None)
            raise
        logger.info("loaded LoRA adapter %r (id %d) from %s", request.lora_name, request.lora_int_id,
                    request.lora_path)
        return f"Success: LoRA adapter '{req.lora_name}' added successfully."

    def unload_lora_adapter(self, req: UnloadLoRAAdapterRequest) -> str:
        """vLLM's ``/v1/unload_lora_adapter``: stop serving the adapter named ``req.lora_name`` (a 404 if none is);
        its requests in flight finish with it."""
        if self.lora_adapters.pop(req.lora_name, None) is None:
            raise APIError(404, f"The lora adapter '{req.lora_name}' cannot be found.", type="not_found_error",
                           param="lora_name", code="model_not_found")
        logger.info("unloaded LoRA adapter %r", req.lora_name)
        return f"Success: LoRA adapter '{req.lora_name}' removed successfully."

    # -- /v1/completions -------------------------------------------------------------------

    async def create_completion(self, req: CompletionRequest):
        model, lora_request = self._resolve_model(req)
        _refuse_unsupported(req)
        structured = _structured_outputs(req)
        # vLLM's echo without generation (OpenAI's legacy API too): the prompt, with its logprobs if asked, and no
        # new token (one is sampled for the prompt's pass and dropped), as scoring harnesses ask for it.
        echo_only = req.echo and req.max_tokens == 0
        params = _sampling_params(req, max_tokens=1 if echo_only else req.max_tokens, logprobs=req.logprobs,
                                  structured=structured, renames={},
                                  defaults=self.async_llm.engine.default_sampling_fields)
        if req.echo and req.logprobs is not None:  # the echoed prompt's tokens come with their logprobs too
            params.prompt_logprobs = max(req.logprobs, params.prompt_logprobs or 0)
        prompts = await run_in_threadpool(self._completion_prompts, req.prompt, "prompt", req.add_special_tokens)
        prompts = [_Prompt(p.text, self._truncated(params, p.token_ids)) for p in prompts]
        for prompt in prompts:
            self._check_length(len(prompt.token_ids), params.max_tokens if "max_tokens" in req.model_fields_set
                               else None, "prompt", "max_tokens")
        request_id = response_id("cmpl", req)
        if req.use_beam_search:
            streams = self._beam_searches(request_id, prompts, params, req, lora_request)
        else:
            streams = await self._add_requests(request_id, prompts, params, req.priority, "prompt",
                                               renames={"structured_outputs": structured[1]},
                                               lora_request=lora_request)
        if echo_only:
            streams = [_PromptOnly(stream) for stream in streams]
        if req.stream:
            body = self._stream_completion(request_id, model, prompts, streams, params, req)
            return _sse_response(body, streams)
        finals = await final_outputs(streams)
        choices = []
        for p, output in enumerate(finals):
            for completion in output.outputs:
                echo = prompts[p].text if req.echo else None
                text = (echo or "") + completion.text
                logprobs = None
                if req.logprobs is not None:
                    logprobs = CompletionLogprobs()
                    offset = self._echo_logprobs(logprobs, output, self._as_ids(req)) if req.echo else 0
                    _extend_completion_logprobs(logprobs, completion, 0, offset, self._as_ids(req))
                choices.append(CompletionChoice(index=p * req.n + completion.index, text=text, logprobs=logprobs,
                                                finish_reason=completion.finish_reason,
                                                stop_reason=completion.stop_reason,
                                                prompt_logprobs=_prompt_logprobs(output, req.prompt_logprobs)))
        return CompletionResponse(id=request_id, model=model, choices=choices, usage=_usage(finals))

    def _pooling_model(self, req) -> tuple:
        """``(model name, LoRA request)`` of an embeddings or classify request, whose input must not be empty."""
        model, lora = self._resolve_model(req)
        _nonempty_input(req)
        return model, lora

    async def create_embedding(self, req: EmbeddingRequest) -> EmbeddingResponse:
        """OpenAI's embeddings, from an engine started with ``--runner pooling`` (``engine.pooling``)."""
        model, lora = self._pooling_model(req)
        try:
            params = PoolingParams(dimensions=req.dimensions, normalize=req.normalize)
        except ValueError as e:
            raise bad_request(str(e), param="dimensions") from None
        request_id = response_id("embd", req)
        vectors, tokens = await self._embedded(request_id, req.input, "input", params, req.priority, lora,
                                               add_special_tokens=req.add_special_tokens,
                                               truncate_prompt_tokens=req.truncate_prompt_tokens)
        data = [EmbeddingData(index=i, embedding=_encode_embedding(v, req.encoding_format))
                for i, v in enumerate(vectors)]
        return EmbeddingResponse(id=request_id, model=model, data=data,
                                 usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens))

    async def create_classification(self, req: ClassificationRequest) -> ClassificationResponse:
        """vLLM's ``/classify``: each input's class probabilities (or logits) from a sequence classifier's engine,
        and its most likely class's name."""
        model, lora = self._pooling_model(req)
        if not self._is_classifier:
            raise bad_request("classify needs a sequence classifier (a ...ForSequenceClassification checkpoint)",
                              param="model", code="model_not_supported")
        request_id = response_id("classify", req)
        finals, tokens = await self._pooled(request_id, req.input, "input", PoolingParams(
            use_activation=req.use_activation), req.priority, lora)
        labels = self._class_labels
        data = []
        for i, output in enumerate(finals):
            probs = output.outputs.probs
            best = int(np.argmax(probs))
            data.append(ClassificationData(index=i, label=labels.get(best, f"LABEL_{best}"), probs=probs,
                                           num_classes=len(probs)))
        return ClassificationResponse(id=request_id, model=model, data=data,
                                      usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens))

    async def create_pooling(self, req: PoolingRequest) -> PoolingResponse:
        """vLLM's ``/pooling``: each input's (or the rendered chat's) pooled output as the model pools it, an
        embedding model's vector or a classifier's class probabilities, as floats or base64; with ``task``
        "token_embed" or "token_classify", a row of them for each prompt token (base64: the rows' floats in turn)."""
        model, lora = self._resolve_model(req)
        if (req.input is None) == (req.messages is None):
            raise bad_request("give either input (texts or token ids) or chat messages", param="input")
        if req.messages is not None:
            if not req.messages:
                raise bad_request("messages is empty", param="messages")
            self._require_tokenizer("messages")
            texts = (await run_in_threadpool(self._chat_prompt, req)).token_ids
        else:
            texts = _nonempty_input(req)
        try:
            task = check_task(req.task, self._is_classifier)
        except ValueError as e:
            raise bad_request(str(e), param="task") from None
        wrong = ("dimensions", "normalize") if self._is_classifier else ("use_activation",)
        given = [name for name in wrong if getattr(req, name) is not None]
        if given:
            kind = "a classifier's probabilities" if self._is_classifier else "an embedding model's vector"
            raise bad_request(f"{given[0]} does not apply to {kind}", param=given[0])
        try:
            params = PoolingParams(dimensions=req.dimensions, normalize=req.normalize,
                                   use_activation=req.use_activation, task=task)
        except ValueError as e:
            raise bad_request(str(e), param="dimensions") from None
        request_id = response_id("pool", req)
        finals, tokens = await self._pooled(request_id, texts, "messages" if req.messages else "input", params,
                                            req.priority, lora, add_special_tokens=req.add_special_tokens,
                                            truncate_prompt_tokens=req.truncate_prompt_tokens)
        data = [PoolingData(index=i, data=_encode_embedding(pooled_data(output), req.encoding_format))
                for i, output in enumerate(finals)]
        return PoolingResponse(id=request_id, model=model, data=data,
                               usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens))

    async def create_score(self, req: ScoreRequest) -> ScoreResponse:
        """vLLM's ``/score`` for an embedding model: the cosine of ``text_1``'s and each ``text_2``'s embeddings."""
        model, lora = self._resolve_model(req)
        first, second = ([t] if isinstance(t, str) else list(t) for t in (req.text_1, req.text_2))
        try:
            pairs = score_pairs(first, second)
        except ValueError as e:
            raise bad_request(str(e), param="text_2") from None
        request_id = response_id("score", req)
        vectors, tokens = await self._embedded(request_id, first + second, "text_1", PoolingParams(), req.priority,
                                               lora)
        data = [ScoreData(index=k, score=cosine(vectors[i], vectors[len(first) + j])) for k, (i, j) in enumerate(pairs)]
        return ScoreResponse(id=request_id, model=model, data=data,
                             usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens))

    async def create_rerank(self, req: RerankRequest) -> RerankResponse:
        """vLLM's ``/rerank`` for an embedding model: the documents by their embeddings' cosine with the query's,
        most relevant first, the first ``top_n``."""
        model, lora = self._resolve_model(req)
        if not req.documents:
            raise bad_request("documents is empty", param="documents")
        request_id = response_id("rerank", req)
        vectors, tokens = await self._embedded(request_id, [req.query] + req.documents, "documents", PoolingParams(),
                                               req.priority, lora)
        results = sorted((RerankResult(index=i, document=RerankDocument(text=text),
                                       relevance_score=cosine(vectors[0], vectors[i + 1]))
                          for i, text in enumerate(req.documents)), key=lambda r: -r.relevance_score)
        top_n = req.top_n if req.top_n and req.top_n > 0 else None  # vLLM's: 0 (or less) is every document
        return RerankResponse(id=request_id, model=model, results=results[:top_n],
                              usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens))

    async def _embedded(self, request_id: str, texts, param: str, params: PoolingParams, priority: int,
                        lora_request: Optional[LoRARequest] = None, **prompt_options) -> tuple[list[list[float]], int]:
        """The embedding engine's vectors of ``texts`` (a text, texts or token ids, as a prompt is given) and their
        token count (``_pooled``); a classifier's refusal a 400."""
        if self._is_classifier:
            raise bad_request("this model is a sequence classifier: use /classify", param="model",
                              code="model_not_supported")
        finals, tokens = await self._pooled(request_id, texts, param, params, priority, lora_request, **prompt_options)
        return [o.outputs.embedding for o in finals], tokens

    @functools.cached_property
    def _is_classifier(self) -> bool:
        return is_classifier(self.async_llm.engine.model_path)

    @functools.cached_property
    def _class_labels(self) -> dict[int, str]:
        return class_labels(self.async_llm.engine.model_path)

    async def _pooled(self, request_id: str, texts, param: str, params: PoolingParams, priority: int,
                      lora_request: Optional[LoRARequest] = None, add_special_tokens: bool = True,
                      truncate_prompt_tokens: Optional[int] = None) -> tuple[list, int]:
        """The pooling engine's final outputs for ``texts`` (a text, texts or token ids, as a prompt is given; with
        ``lora_request``'s adapter if given; each cut to its last ``truncate_prompt_tokens`` tokens if given, -1:
        max_model_len, as many as fit) and their token count; a generating engine's refusal, a bad or too long text a
        400 naming ``param``."""
        if self.async_llm.engine.args.runner != "pooling":
            raise bad_request("this server generates text: embeddings, pooling, scores, reranking and classification "
                              "need a pooling engine (--runner pooling, or a classifier's checkpoint)", param="model",
                              code="model_not_supported")
        prompts = await run_in_threadpool(self._completion_prompts, texts, param, add_special_tokens)
        limit = self.async_llm.max_model_len
        if truncate_prompt_tokens is not None:  # a pooled text may fill the context: nothing is generated
            keep = limit if truncate_prompt_tokens == -1 else truncate_prompt_tokens
            if not 1 <= keep <= limit:
                raise bad_request(f"truncate_prompt_tokens must be -1 or in [1, {limit}] (max_model_len), got "
                                  f"{truncate_prompt_tokens}", param="truncate_prompt_tokens")
            prompts = [_Prompt(p.text, p.token_ids[-keep:]) for p in prompts]
        for prompt in prompts:
            if len(prompt.token_ids) > limit:
                raise bad_request(f"This model's maximum context length is {limit} tokens, but a text of {param} has "
                                  f"{len(prompt.token_ids)} tokens", param=param, code="context_length_exceeded")
        streams = await self._add_requests(request_id, prompts, params, priority, param, renames={},
                                           lora_request=lora_request)
        return await final_outputs(streams), sum(len(p.token_ids) for p in prompts)

    def _echo_logprobs(self, out: CompletionLogprobs, output: RequestOutput, as_ids: bool = False) -> int:
        """Append the prompt's tokens to ``out`` in the completions format (the first with no logprob, as OpenAI's
        legacy API and vLLM give it), from ``output.prompt_logprobs``; returns the text offset after them."""
        tokenizer = self.async_llm.tokenizer
        decode = None if tokenizer is None else (lambda token_id: tokenizer.decode([token_id]))
        return _append_completion_logprobs(out, zip(output.prompt_token_ids, output.prompt_logprobs), 0, decode,
                                           as_ids)

    def _as_ids(self, req) -> bool:
        """vLLM's ``return_tokens_as_token_ids``: the request's own choice, else the server's."""
        own = getattr(req, "return_tokens_as_token_ids", None)
        return self.return_tokens_as_token_ids if own is None else own

    def _tokenize(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        """The engine's token ids of a text field; its refusal (text that is not valid Unicode) a 400 naming it."""
        try:
            return self.async_llm.engine.tokenize(text, add_special_tokens)
        except ValueError as e:
            raise bad_request(f"{param}: {e}", param=param) from e

    def _completion_prompts(self, prompt, param: str = "prompt", add_special_tokens: bool = True) -> list[_Prompt]:
        """Runs in a worker thread (tokenizing may be slow). ``param``: the request field, for its errors."""
        engine, tokenizer = self.async_llm.engine, self.async_llm.tokenizer
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                out.append(_Prompt(p, self._tokenize(p, add_special_tokens, param)))
            else:
                ids = list(p)
                vocab = engine.model_config.vocab_size
                bad = [t for t in ids if not 0 <= t < vocab]
                if bad:
                    raise bad_request(f"{param} token id {bad[0]} is outside the vocabulary [0, {vocab})",
                                      param=param)
                out.append(_Prompt(tokenizer.decode(ids) if tokenizer is not None else None, ids))
        for i, p in enumerate(out):
            if not p.token_ids:
                raise bad_request(f"{param} {i} is empty: at least one token is required", param=param)
        return out

    async def _stream_completion(self, request_id: str, model: str, prompts: list[_Prompt],
                                 streams: list[RequestStream], params: SamplingParams,
                                 req: CompletionRequest) -> AsyncIterator[str]:
        created, as_ids = int(time.time()), self._as_ids(req)
        states: dict[int, _ChoiceState] = {}
        finals: dict[int, RequestOutput] = {}
        async for p, output in merge_streams(streams):
            finals[p] = output
            choices = []
            for completion in output.outputs:
                index = p * req.n + completion.index
                state = states.setdefault(index, _ChoiceState())
                if state.finished:
                    continue
                prefix, logprobs = "", None
                if req.logprobs is not None:
                    logprobs = CompletionLogprobs()
                if not state.started:
                    state.started = True
                    if req.echo:
                        prefix = prompts[p].text or ""
                        state.text_offset = len(prefix) if logprobs is None else self._echo_logprobs(
                            logprobs, output, as_ids)
                delta = _text_delta(completion, state)
                if logprobs is not None:
                    state.text_offset = _extend_completion_logprobs(
                        logprobs, completion, state.tokens_sent, state.text_offset, as_ids)
                state.tokens_sent = len(completion.token_ids)
                state.finished = completion.finish_reason is not None
                if prefix or delta or state.finished or (logprobs and logprobs.tokens):
                    choices.append(CompletionChoice(index=index, text=prefix + delta, logprobs=logprobs,
                                                    finish_reason=completion.finish_reason,
                                                    stop_reason=completion.stop_reason))
            for choice in choices:  # one choice a chunk, as vLLM and OpenAI send them
                yield _sse(CompletionResponse(id=request_id, created=created, model=model, choices=[choice],
                                              usage=_usage([output]) if _continuous_usage(req) else None))
        if req.stream_options is not None and req.stream_options.include_usage:
            yield _sse(CompletionResponse(id=request_id, created=created, model=model, choices=[],
                                          usage=_usage([finals[p] for p in sorted(finals)])))

    # -- /v1/chat/completions --------------------------------------------------------------

    async def create_chat_completion(self, req: ChatCompletionRequest):
        model, lora_request = self._resolve_model(req)
        _refuse_unsupported(req)
        if req.top_logprobs and not req.logprobs:  # as vLLM: 0 asks for nothing, so it needs nothing
            raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
        max_tokens_field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        tool_choice, structured, params, prompt = await self._chat_inputs(
            req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
            {"max_tokens": max_tokens_field, "logprobs": "top_logprobs"})
        request_id = response_id("chatcmpl", req)
        if req.use_beam_search:
            streams = self._beam_searches(request_id, [prompt], params, req, lora_request)
        else:
            # A forced call's schema is its tools' parameters: a bad one is the tools' fault.
            source = "tools" if structured[1] == "tool_choice" else structured[1]
            streams = await self._add_requests(request_id, [prompt], params, req.priority, "messages",
                                               renames={"structured_outputs": source}, lora_request=lora_request)
        if req.stream:
            return _sse_response(self._stream_chat(request_id, model, streams[0], params, req, tool_choice), streams)
        (final,) = await final_outputs(streams)
        choices = []
        echo = _echoed_message(req)
        for c in final.outputs:
            message, finish_reason = self._chat_message(c, tool_choice, req.parallel_tool_calls is not False)
            if echo:
                message.content = echo + (message.content or "")
            logprobs = _chat_logprobs(c, 0, params.logprobs, self._as_ids(req)) if req.logprobs else None
            choices.append(ChatCompletionChoice(index=c.index, message=message, logprobs=logprobs,
                                                finish_reason=finish_reason, stop_reason=c.stop_reason))
        return ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=_usage([final]),
                                      prompt_logprobs=_prompt_logprobs(final, req.prompt_logprobs))

    # -- /tokenize, /detokenize (vLLM's) ----------------------------------------------------

    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """The token ids the generation endpoints would run for a prompt or chat messages."""
        self._check_model(req)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give either prompt or messages", param="prompt")
        self._require_tokenizer("prompt" if req.prompt is not None else "messages")
        if req.prompt is not None:
            ids = await run_in_threadpool(self._tokenize, req.prompt, req.add_special_tokens, "prompt")
        else:
            ids = (await run_in_threadpool(self._chat_prompt, req)).token_ids
        token_strs = self.async_llm.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.async_llm.max_model_len, tokens=ids,
                                token_strs=token_strs)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self._check_model(req)
        self._require_tokenizer("tokens")
        vocab = self.async_llm.engine.model_config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=await run_in_threadpool(self.async_llm.tokenizer.decode, req.tokens))

    def _require_tokenizer(self, param: str) -> None:
        if self.async_llm.tokenizer is None:
            raise bad_request("this server's model has no tokenizer", param=param)

    def _chat_prompt(self, req: ChatCompletionRequest | TokenizeRequest) -> _Prompt:
        """Runs in a worker thread: renders the messages with the model's chat template."""
        from jinja2 import TemplateError

        from engine.tokenizer import TokenizerError, apply_chat_template

        if req.continue_final_message and (req.add_generation_prompt or req.messages[-1].role != "assistant"):
            raise bad_request("continue_final_message continues a last message from the assistant, with "
                              "add_generation_prompt false", param="continue_final_message")
        if not self.trust_request_chat_template and (req.chat_template or "chat_template" in (
                req.chat_template_kwargs or {})):
            raise bad_request("a request's own chat_template is refused: this server was not started with "
                              "--trust-request-chat-template", param="chat_template")
        tools = getattr(req, "tools", None)
        try:
            ids = apply_chat_template(self.async_llm.tokenizer, template_messages(req),
                                      add_generation_prompt=req.add_generation_prompt,
                                      continue_final_message=req.continue_final_message,
                                      tools=[t.model_dump(exclude_none=True) for t in tools] if tools else None,
                                      chat_template=req.chat_template or self.chat_template,
                                      chat_template_kwargs=req.chat_template_kwargs)
        # TypeError: a clashing template kwarg; OverflowError: a template's range() over Jinja's sandbox limit
        except (TokenizerError, TemplateError, ValueError, TypeError, OverflowError) as e:
            raise bad_request(f"cannot apply the chat template to these messages: {e}", param="messages") from e
        return _Prompt(None, list(ids))

    async def _stream_chat(self, request_id: str, model: str, stream: RequestStream, params: SamplingParams,
                           req: ChatCompletionRequest, tool_choice) -> AsyncIterator[str]:
        """The chunks of a chat completion; with tools (``tool_choice`` not "none") the calls come whole in a
        choice's last chunk, the text before them as it comes where the parser can tell it is text."""
        created, as_ids = int(time.time()), self._as_ids(req)
        states: dict[int, _ChoiceState] = {}
        final: Optional[RequestOutput] = None
        echo = _echoed_message(req)

        def chunk(choices: list[ChatCompletionChunkChoice], usage: Optional[UsageInfo] = None) -> str:
            if usage is None and final is not None and _continuous_usage(req):
                usage = _usage([final])
            return _sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices,
                                            usage=usage))

        async for output in stream:
            final = output
            choices = []
            for completion in output.outputs:
                state = states.setdefault(completion.index, _ChoiceState())
                if state.finished:
                    continue
                if not state.started:  # OpenAI's first chunk of a choice carries the role (no token yet: vLLM's 0)
                    state.started = True
                    yield chunk([ChatCompletionChunkChoice(index=completion.index,
                                                           delta=ChatDelta(role="assistant", content=""))],
                                usage=_usage([dataclasses.replace(output, outputs=[])])
                                if _continuous_usage(req) else None)
                    if echo:
                        yield chunk([ChatCompletionChunkChoice(index=completion.index, delta=ChatDelta(content=echo))])
                state.finished = completion.finish_reason is not None
                logprobs = (_chat_logprobs(completion, state.tokens_sent, params.logprobs, as_ids) if req.logprobs
                            else None)
                state.tokens_sent = len(completion.token_ids)
                if tool_choice != "none":  # text as it may be streamed, the calls whole when the choice ends
                    choices.extend(self._tool_chunk(completion, state, tool_choice, logprobs,
                                                    req.parallel_tool_calls is not False))
                    continue
                thinking, content = self._reasoning_delta(completion, state)
                delta = content[state.text_sent:]
                state.text_sent = len(content)
                if delta or thinking or state.finished or (logprobs and logprobs.content):
                    choices.append(ChatCompletionChunkChoice(
                        index=completion.index, delta=ChatDelta(content=delta or None,
                                                                reasoning_content=thinking or None),
                        logprobs=logprobs, finish_reason=completion.finish_reason,
                        stop_reason=completion.stop_reason))
            for choice in choices:  # one choice a chunk, as vLLM and OpenAI send them
                yield chunk([choice])
        if req.stream_options is not None and req.stream_options.include_usage and final is not None:
            yield chunk([], usage=_usage([final]))

    # -- /v1/responses (engine.entrypoints.openai.responses) --------------------------------------------------

    async def create_response(self, req: ResponsesRequest):
        """OpenAI's Responses API: the input (after an earlier stored response's turns) generated as a chat
        completion with its function tools, returned as a ``response`` or streamed as its events."""
        try:
            tools, tool_choice = req.chat_tools()
        except ValueError as e:
            raise bad_request(str(e), param="tool_choice" if str(e).startswith("tool_choice") else "tools") from None
        if req.background and (req.stream or not req.store):
            raise bad_request("background responses are stored and not streamed: give store true and stream false",
                              param="background")
        history: list[dict] = []
        if req.previous_response_id is not None:
            history = self._stored_response(req.previous_response_id, "previous_response_id")[1]
        messages = req.messages(history)
        while True:
            try:
                chat = ChatCompletionRequest(model=req.model, messages=messages, seed=req.seed,
                                             max_completion_tokens=req.max_output_tokens, temperature=req.temperature,
                                             top_p=req.top_p, response_format=req.response_format(),
                                             priority=req.priority, add_generation_prompt=True, tools=tools,
                                             tool_choice=tool_choice, parallel_tool_calls=req.parallel_tool_calls)
            except ValidationError as e:
                raise bad_request(f"invalid input: {e.errors()[0]['msg']}", param="input") from None
            model, lora_request = self._resolve_model(chat)
            try:
                tool_choice, structured, params, prompt = await self._chat_inputs(
                    chat, req.max_output_tokens, req.logprobs,
                    {"max_tokens": "max_output_tokens", "structured_outputs": "text", "messages": "input",
                     "logprobs": "top_logprobs"})
                break
            except APIError as e:
                shorter = without_oldest_turn(messages) if req.truncation == "auto" else None
                if e.info.code == "context_length_exceeded" and shorter is not None:
                    messages = shorter  # rendered and counted again: a template may join turns across a boundary
                    continue
                if e.info.param == "response_format":  # the chat request's name of text.format
                    e.info.param, e.info.message = "text", e.info.message.replace("response_format", "text.format")
                raise
        req.temperature, req.top_p = params.temperature, params.top_p  # echoed as used, as vLLM's
        request_id = item_id("resp")
        source = "tools" if structured[1] == "tool_choice" else "text"
        streams = await self._add_requests(request_id, [prompt], params, req.priority, "input",
                                           renames={"structured_outputs": source}, lora_request=lora_request)
        turns = history + req.input_turns()
        started = response_object(request_id, model, req, [], status="in_progress")
        if req.store:  # stored now (in progress, with its input items); stored again when it ends
            self.responses.put(started, turns, req.input_items())
        if req.stream:
            return _sse_response(self._stream_response(started, streams[0], req, turns, tool_choice), streams,
                                 done=False)
        if req.background:
            return self._start_background(started, req, streams, turns, tool_choice)
        try:
            (final,) = await final_outputs(streams)
        except asyncio.CancelledError:  # the client left
            self._store_ended(started, req, turns, "cancelled")
            raise
        return self._finished_response(request_id, model, req, final, turns, tool_choice)

    def _store_ended(self, started: dict, req: ResponsesRequest, turns: list[dict], status: str, **fields) -> None:
        """Store a response that ended unfinished (cancelled, failed) where it is stored."""
        if req.store:
            self.responses.put({**started, "status": status, **fields}, turns)

    def _start_background(self, started: dict, req: ResponsesRequest, streams: list[RequestStream],
                          turns: list[dict], tool_choice) -> dict:
        """Store the response as ``queued`` and generate it on in a task, which stores the finished response (or a
        ``cancelled`` / ``failed`` one)."""
        request_id, model, created = started["id"], started["model"], started["created_at"]
        queued = {**started, "status": "queued"}
        self.responses.put(queued, turns)

        async def generate() -> None:
            try:
                (final,) = await final_outputs(streams)
                self._finished_response(request_id, model, req, final, turns, tool_choice, created)
            except asyncio.CancelledError:
                for stream in streams:
                    stream.close()
                self._store_ended(queued, req, turns, "cancelled")
                raise
            except Exception as e:  # the engine failed it: the stored response says so
                logger.exception("background response %s failed", request_id)
                self._store_ended(queued, req, turns, "failed",
                                  error={"code": "server_error", "message": f"{type(e).__name__}: {e}"})
            finally:
                self._background.pop(request_id, None)

        self._background[request_id] = asyncio.create_task(generate())
        return queued

    async def cancel_response(self, response_id: str) -> dict:
        """OpenAI's cancel of a background response still generating: stopped and stored as ``cancelled``."""
        task = self._background.get(response_id)
        if task is None:
            self._stored_response(response_id, "response_id")  # unknown: a 404
            raise bad_request("Cannot cancel a response that is not generating in the background.",
                              param="response_id")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return self.responses.get(response_id)[0]

    def retrieve_response(self, response_id: str) -> dict:
        return self._stored_response(response_id, "response_id")[0]

    def _stored_response(self, response_id: str, param: str) -> tuple[dict, list[dict], list[dict]]:
        """A stored response (with its chat and its input items); an unknown id is a 404 naming ``param``."""
        stored = self.responses.get(response_id)
        if stored is None:
            raise _response_not_found(response_id, param)
        return stored

    def response_input_items(self, response_id: str, order: str, limit: int, after: Optional[str]) -> dict:
        """OpenAI's list of a stored response's input items: newest first unless ``order`` is "asc", ``limit`` of
        them (1-100) after the item ``after``."""
        stored = self._stored_response(response_id, "response_id")
        if not 1 <= limit <= 100:
            raise bad_request(f"limit must be between 1 and 100, got {limit}", param="limit")
        items = stored[2] if order == "asc" else stored[2][::-1]
        ids = [item["id"] for item in items]
        if after is not None:
            if after not in ids:
                raise bad_request(f"after names no input item of response {response_id!r}: {after!r}", param="after")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    def delete_response(self, response_id: str) -> dict:
        if not self.responses.delete(response_id):
            raise _response_not_found(response_id, "response_id")
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    def _finished_response(self, request_id: str, model: str, req: ResponsesRequest, final: RequestOutput,
                           turns: list[dict], tool_choice, created_at: Optional[int] = None) -> dict:
        """The ``response`` of a finished request (stored with its chat where ``req.store``): its output items
        (``responses.output_items``) from the chat message the chat endpoint would give."""
        completion = final.outputs[0]
        message, _ = self._chat_message(completion, tool_choice, req.parallel_tool_calls is not False)
        usage = usage_object(len(final.prompt_token_ids), len(completion.token_ids), final.num_cached_tokens or 0)
        logprobs = None if req.logprobs is None else _dumped_logprobs(completion, 0, req.logprobs)
        items = output_items(message, self.reasoning_parser is not None, cut=completion.finish_reason == "length",
                             logprobs=logprobs)
        response = response_object(request_id, model, req, items, finish_reason=completion.finish_reason, usage=usage,
                                   created_at=created_at)
        if req.store:
            self.responses.put(response, turns + [assistant_turn(message)])
        return response

    async def _stream_response(self, started: dict, stream: RequestStream, req: ResponsesRequest, turns: list[dict],
                               tool_choice) -> AsyncIterator[str]:
        """The Responses API's events: created, then each output item added, its content (a message's text as
        deltas: the answer after any reasoning, as it comes where no tool may be called, else whole at the end; a
        function call's arguments whole) and done, then the response completed (or incomplete). A stream that ends
        before (the client left) stores its response as cancelled."""
        request_id, model, created, event = started["id"], started["model"], started["created_at"], EventWriter()
        response = None
        try:
            yield event("response.created", response=started)
            yield event("response.in_progress", response=started)
            live = tool_choice == "none" or tool_choice is None  # the text streams as it comes
            index = 1 if self.reasoning_parser else 0  # after the reasoning item
            item = {**message_item("", status="in_progress"), "content": []}
            where = dict(item_id=item["id"], output_index=index, content_index=0)
            if live:
                yield event("response.output_item.added", output_index=index, item=item)
                yield event("response.content_part.added", **where, part=output_text_part(""))
            state, final = _ChoiceState(), None
            async for output in stream:
                final, completion = output, output.outputs[0]
                state.finished = completion.finish_reason is not None
                _, content = self._reasoning_delta(completion, state)
                delta = content[state.text_sent:]
                state.text_sent = len(content)
                logprobs = [] if req.logprobs is None else _dumped_logprobs(completion, state.tokens_sent,
                                                                            req.logprobs)
                state.tokens_sent = len(completion.token_ids)
                if (delta or logprobs) and live:
                    yield event("response.output_text.delta", **where, delta=delta, logprobs=logprobs)
            response = self._finished_response(request_id, model, req, final, turns, tool_choice, created)
        finally:
            if response is None:
                self._store_ended(started, req, turns, "cancelled")
        for i, done in enumerate(response["output"]):
            if live and i == index:
                done["id"] = item["id"]
            elif done["type"] != "reasoning":  # the reasoning item is the response's alone, as vLLM streams none
                yield event("response.output_item.added", output_index=i, item={**done, "status": "in_progress"})
                if done["type"] == "function_call":
                    call = dict(item_id=done["id"], output_index=i)
                    yield event("response.function_call_arguments.delta", **call, delta=done["arguments"])
                    yield event("response.function_call_arguments.done", **call, arguments=done["arguments"])
                else:
                    where = dict(item_id=done["id"], output_index=i, content_index=0)
                    yield event("response.content_part.added", **where, part={**done["content"][0], "text": ""})
                    yield event("response.output_text.delta", **where, delta=done["content"][0]["text"],
                                logprobs=done["content"][0]["logprobs"])
            if done["type"] == "message":
                where = dict(item_id=done["id"], output_index=i, content_index=0)
                yield event("response.output_text.done", **where, text=done["content"][0]["text"],
                            logprobs=done["content"][0]["logprobs"])
                yield event("response.content_part.done", **where, part=done["content"][0])
            if done["type"] != "reasoning":
                yield event("response.output_item.done", output_index=i, item=done)
        yield event("response.completed" if response["status"] == "completed" else "response.incomplete",
                    response=response)

    async def _chat_inputs(self, req: ChatCompletionRequest, max_tokens: Optional[int], logprobs: Optional[int],
                           fields: dict[str, str]) -> tuple[Any, tuple, SamplingParams, _Prompt]:
        """What a chat generates from: its tool choice, structured output (``_structured_outputs``), sampling params
        and rendered prompt, checked against the context. ``fields``: the request's own names for what errors name
        (``max_tokens``, and ``messages`` where the request calls them otherwise)."""
        tool_choice = self._tool_choice(req)
        structured = _structured_outputs(req, tool_call_schema(req, tool_choice) if is_forced(tool_choice) else None)
        params = _sampling_params(req, max_tokens=max_tokens, logprobs=logprobs, structured=structured, renames=fields,
                                  defaults=self.async_llm.engine.default_sampling_fields)
        # The model's call markers (or a reasoning parser's: gpt-oss's harmony) may be special tokens: keep them for the
        # parser (vLLM).
        if tool_choice == "auto" or (self.reasoning_parser is not None and self.reasoning_parser.keeps_special_tokens):
            params.skip_special_tokens = False
        prompt = await run_in_threadpool(self._chat_prompt, req)
        prompt.token_ids = self._truncated(params, prompt.token_ids)
        self._check_length(len(prompt.token_ids), max_tokens, fields.get("messages", "messages"), fields["max_tokens"])
        return tool_choice, structured, params, prompt

    def _tool_choice(self, req: ChatCompletionRequest):
        """``tools.resolve_tool_choice`` under this server's parser, its refusals a 400 on ``tool_choice``."""
        try:
            return resolve_tool_choice(req, self.tool_parser)
        except ToolChoiceError as e:
            raise bad_request(str(e), param="tool_choice") from None

    def _reasoning(self, text: str, final: bool) -> tuple[Optional[str], str]:
        """``(reasoning, content)`` of a reply (``ReasoningParser.split``); without a parser, all content."""
        return self.reasoning_parser.split(text, final) if self.reasoning_parser else (None, text)

    def _reasoning_delta(self, completion: CompletionOutput, state: _ChoiceState) -> tuple[str, str]:
        """A streamed choice's new reasoning since the last chunk, and its content so far."""
        reasoning, content = self._reasoning(completion.text, state.finished)
        new = (reasoning or "")[state.reasoning_sent:]
        state.reasoning_sent += len(new)
        return new, content

    def _chat_message(self, completion: CompletionOutput, tool_choice, parallel: bool = True
                      ) -> tuple[ChatResponseMessage, Optional[str]]:
        """A finished choice's message and finish reason: its reasoning (with a reasoning parser) and its content,
        or the tool calls in that (a forced choice's whole output, or what the parser finds under "auto"; the first
        alone unless ``parallel``, as vLLM keeps it for ``parallel_tool_calls=False``); "tool_calls" as the reason
        where the model chose to call ("auto", "required"); a named function's call ends with "stop", as OpenAI's."""
        reasoning, text = self._reasoning(completion.text, final=True)
        reason = completion.finish_reason
        if tool_choice == "auto":
            content, calls = self.tool_parser.extract(text)
            calls = calls if parallel else calls[:1]
        else:
            content, calls = None, forced_tool_calls(tool_choice, text) if is_forced(tool_choice) else None
        if not calls:
            return ChatResponseMessage(content=text if reasoning is None else text or None,
                                       reasoning_content=reasoning), reason
        if reason == "stop" and not isinstance(tool_choice, NamedToolChoice):
            reason = "tool_calls"
        return ChatResponseMessage(content=content, reasoning_content=reasoning, tool_calls=calls), reason

    def _tool_chunk(self, completion: CompletionOutput, state: _ChoiceState, tool_choice,
                    logprobs: Optional[ChatLogprobs], parallel: bool = True) -> list[ChatCompletionChunkChoice]:
        """A streamed choice's chunk under tools: its new reasoning, and under "auto" the new content the parser says
        is not a call yet; at the end the rest of the content and the calls. ``logprobs``: its new tokens' (they
        come as the tokens do, whether their text is sent yet or held as a call's)."""
        thinking, content = self._reasoning_delta(completion, state)
        if not state.finished:
            end = self.tool_parser.content_end(content) if tool_choice == "auto" else 0
            delta = content[state.text_sent:end] if end > state.text_sent else ""
            state.text_sent = max(state.text_sent, end)
            if not (delta or thinking or (logprobs and logprobs.content)):
                return []
            return [ChatCompletionChunkChoice(index=completion.index, delta=ChatDelta(
                content=delta or None, reasoning_content=thinking or None), logprobs=logprobs)]
        message, reason = self._chat_message(completion, tool_choice, parallel)
        calls = [{"index": i, **call.model_dump()} for i, call in enumerate(message.tool_calls)]
        return [ChatCompletionChunkChoice(
            index=completion.index, delta=ChatDelta(content=(message.content or "")[state.text_sent:] or None,
                                                    reasoning_content=thinking or None, tool_calls=calls or None),
            logprobs=logprobs, finish_reason=reason, stop_reason=completion.stop_reason)]

    # -- shared checks ---------------------------------------------------------------------

    def _check_model(self, req) -> str:
        """The request's model name (the base model's first name when it gives none); an unknown one is a 404."""
        return self._resolve_model(req)[0]

    def _resolve_model(self, req) -> tuple[str, Optional[LoRARequest]]:
        """The request's model name and its LoRA adapter (None for the base model); an unknown name is a 404."""
        if req.model is None:
            return self.served_model_names[0], None
        if req.model in self.served_model_names:
            return req.model, None
        adapter = self.lora_adapters.get(req.model)
        if adapter is None:
            raise APIError(404, f"The model `{req.model}` does not exist. This server serves: "
                           f"{', '.join([*self.served_model_names, *self.lora_adapters])}", param="model",
                           code="model_not_found")
        return req.model, adapter.request

    def _truncated(self, params: SamplingParams, token_ids: list[int]) -> list[int]:
        """The prompt's tokens under the request's ``truncate_prompt_tokens``; one past max_model_len is a 400."""
        try:
            return params.truncate_prompt(token_ids, self.async_llm.max_model_len)
        except ValueError as e:
            raise bad_request(str(e), param="truncate_prompt_tokens") from None

    def _check_length(self, num_prompt_tokens: int, max_tokens: Optional[int], prompt_param: str,
                      max_tokens_param: str) -> None:
        limit = self.async_llm.max_model_len
        if num_prompt_tokens >= limit:
            what = "the prompt has" if prompt_param == "prompt" else f"the {prompt_param} (after the chat template) have"
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but {what} {num_prompt_tokens} tokens; "
                "at least one token must be left to generate", param=prompt_param, code="context_length_exceeded")
        if max_tokens is not None and isinstance(max_tokens, int) and num_prompt_tokens + max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens, but {num_prompt_tokens} prompt tokens "
                f"plus {max_tokens_param}={max_tokens} is {num_prompt_tokens + max_tokens}; lower "
                f"{max_tokens_param} to at most {limit - num_prompt_tokens}", param=max_tokens_param,
                code="context_length_exceeded")

    def _beam_searches(self, request_id: str, prompts: list[_Prompt], params: SamplingParams, req,
                       lora_request: Optional[LoRARequest]) -> list[BeamSearchStream]:
        """vLLM's ``use_beam_search``: each prompt's ``n`` best beams (``AsyncLLM.beam_search``), as many tokens as
        ``max_tokens`` says (the rest of the context when it is None)."""
        limit = self.async_llm.max_model_len
        try:
            searches = [BeamSearchParams(
                beam_width=req.n, max_tokens=params.max_tokens or limit - len(prompt.token_ids),
                ignore_eos=params.ignore_eos, temperature=params.temperature, length_penalty=req.length_penalty)
                for prompt in prompts]
        except ValueError as e:  # the width: max_tokens leaves at least one token (_check_length)
            raise bad_request(f"n (the beam width) with use_beam_search: {e}", param="n") from None
        return [self.async_llm.beam_search(engine_id(request_id, i), prompt.token_ids, search, prompt=prompt.text,
                                           lora_request=lora_request)
                for i, (prompt, search) in enumerate(zip(prompts, searches))]

    async def _add_requests(self, request_id: str, prompts: list[_Prompt], params: SamplingParams, priority: int,
                            prompt_param: str, renames: dict[str, Optional[str]],
                            lora_request: Optional[LoRARequest] = None) -> list[RequestStream]:
        """Queue every prompt (together: one engine step sees them all), with ``lora_request``'s adapter if given; a
        refusal is a 400, none queued, naming the request field (``renames``: the request's name of an engine field
        it set another way; the engine's refusal of the adapter, read when a request first names it: ``model``)."""
        try:
            return await self.async_llm.add_requests(
                [(engine_id(request_id, i), prompt.token_ids, params) for i, prompt in enumerate(prompts)],
                priority=priority, lora_request=lora_request)
        except ValueError as e:  # the engine's refusals name the field first when it is not the prompt
            if lora_request is not None and _about_adapter(str(e), lora_request):
                raise bad_request(f"LoRA adapter {lora_request.lora_name!r} cannot be used: {e}",
                                  param="model") from e
            raise _refusal(e, ENGINE_CHECKED_FIELDS, renames, default=prompt_param) from e


# -- LoRA adapters -----------------------------------------------------------------------

RUNTIME_LORA_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"  # vLLM's switch for the load/unload endpoints
API_KEY_ENV = "VLLM_API_KEY"  # vLLM's: the API key when --api-key is not given
DEV_MODE_ENV = "VLLM_SERVER_DEV_MODE"  # vLLM's switch for /sleep, /wake_up and /is_sleeping


@dataclasses.dataclass(frozen=True)
class LoRAModulePath:
    """One ``--lora-modules`` adapter, as vLLM's: the model name requests give, its folder, and (optional) the
    served name of its base model (``parent`` in /v1/models; by default the base model's first name)."""

    name: str
    path: str
    base_model_name: Optional[str] = None


def parse_lora_module(spec: str) -> LoRAModulePath:
    """A ``--lora-modules`` value: ``name=path``, or vLLM's JSON ``{"name": ..., "path": ..., "base_model_name":
    ...}``; anything else is an ``argparse.ArgumentTypeError`` saying what is expected."""
    forms = 'name=path or JSON {"name": "...", "path": "...", "base_model_name": "..."}'
    text = spec.strip()
    if text.startswith("{"):
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{spec!r} is not valid JSON ({e}); expected {forms}") from None
        unknown = sorted(set(fields) - {"name", "path", "base_model_name"})  # a JSON text "{...}" is an object
        if unknown:
            raise argparse.ArgumentTypeError(f"{spec!r} has unknown field(s) {', '.join(unknown)}; expected {forms}")
        name, path, base = fields.get("name"), fields.get("path"), fields.get("base_model_name")
        if not all(isinstance(v, str) and v for v in (name, path)) or not isinstance(base, (str, type(None))):
            raise argparse.ArgumentTypeError(f"{spec!r} needs name and path, non-empty strings (and base_model_name, "
                                             f"if given, a string); expected {forms}")
        return LoRAModulePath(name, path, base)
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"{spec!r} is not an adapter: expected {forms}")
    return LoRAModulePath(name.strip(), path.strip())


def runtime_lora_updating_allowed() -> bool:
    """vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``: "1" or "true" (any case) serves the load/unload endpoints."""
    return os.environ.get(RUNTIME_LORA_UPDATING_ENV, "0").strip().lower() in ("1", "true")


def _about_adapter(message: str, lora_request: LoRARequest) -> bool:
    """Whether an engine refusal of a request with ``lora_request`` is about the adapter (its folder, its files,
    its id, LoRA's limits), not the prompt or the sampling fields."""
    return lora_request.lora_path in message or any(word in message for word in ("LoRA", "lora_", "adapter"))


# -- conversions shared by both endpoints -------------------------------------------------


def _sampling_params(req, *, max_tokens: Optional[int], logprobs: Optional[int], structured: tuple,
                     renames: dict[str, str], defaults: dict) -> SamplingParams:
    """``SamplingParams`` from a request, the sampling fields it leaves unset from ``defaults`` (the model's
    generation config) or else the engine's own; its validation errors become 400s naming the request field.
    ``structured``: ``_structured_outputs(req)``."""
    if req.stream_options is not None and not req.stream:  # as vLLM: options of a stream there is not
        raise bad_request("stream_options can only be given with stream=true", param="stream_options")
    structured_outputs, structured_field = structured
    if structured_field:
        renames = {**renames, "structured_outputs": structured_field}
    if defaults.get("max_tokens") is not None:  # the generation config's max_new_tokens caps max_tokens (vLLM)
        max_tokens = defaults["max_tokens"] if max_tokens is None else min(max_tokens, defaults["max_tokens"])
    kwargs: dict[str, Any] = dict(  # a beam search's n is its width, each round's requests one sample each
        n=1 if getattr(req, "use_beam_search", False) else req.n, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, seed=req.seed,
        stop=req.stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, max_tokens=max_tokens,
        min_tokens=req.min_tokens, logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
        spaces_between_special_tokens=req.spaces_between_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output, logit_bias=_logit_bias(req.logit_bias),
        allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words, structured_outputs=structured_outputs,
        truncate_prompt_tokens=req.truncate_prompt_tokens, prompt_logprobs=req.prompt_logprobs)
    for name in SAMPLING_FIELDS:  # None: the generation config's, or the engine's default
        value = getattr(req, name)
        if value is not None or name in defaults:
            kwargs[name] = value if value is not None else defaults[name]
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        raise _refusal(e, kwargs, renames) from e


def _refusal(error: ValueError, fields, renames: dict, default: Optional[str] = None) -> APIError:
    """The 400 of a refusal whose message starts with the field it is about (``SamplingParams``', the engine's):
    its param that field as the request named it (``renames``), and its message starting with that name; a
    message about none of ``fields`` goes to ``default``."""
    message = str(error)
    field = re.match(r"\w+", message)
    field = field.group(0) if field else None
    if field not in fields:
        return bad_request(message, param=default)
    param = renames.get(field) or field
    return bad_request(param + message[len(field):], param=param)


# Request fields the engine checks (token ids against its vocabulary, grammars); its refusals start with the name.
ENGINE_CHECKED_FIELDS = ("logit_bias", "allowed_token_ids", "bad_words", "structured_outputs", "priority",
                         "dimensions")
GUIDED_FIELDS = ("json", "regex", "choice", "grammar")  # vLLM's older guided_<name> request fields


def _echoed_message(req: ChatCompletionRequest) -> str:
    """vLLM's chat ``echo``: the last message's text, put before the reply where that message has the reply's role
    (the assistant's under ``add_generation_prompt``, else the last message's own); else ""."""
    last = req.messages[-1]
    if not req.echo or (req.add_generation_prompt and last.role != "assistant"):
        return ""
    return last.text()


def _structured_outputs(req, tool_schema: Optional[dict] = None) -> tuple[Optional[dict], Optional[str]]:
    """The request's structured output as ``StructuredOutputsParams`` fields, and the request field that set it
    (``response_format``, ``structured_outputs``, a ``guided_*`` field, or ``tool_choice``, whose forced call's
    schema is ``tool_schema``); ``(None, None)`` without one."""
    given = [("tool_choice", {"json": tool_schema})] if tool_schema is not None else []
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        given.append(("response_format", _response_format_fields(req.response_format)))
    if req.structured_outputs:
        given.append(("structured_outputs", dict(req.structured_outputs)))
    given += [(f"guided_{name}", {name: getattr(req, f"guided_{name}")}) for name in GUIDED_FIELDS
              if getattr(req, f"guided_{name}") is not None]
    if len(given) > 1:
        raise bad_request(f"{given[0][0]} and {given[1][0]} both constrain the output: give one",
                          param=given[1][0])
    if given and getattr(req, "guided_whitespace_pattern", None) is not None:
        given[0][1]["whitespace_pattern"] = req.guided_whitespace_pattern
    return (given[0][1], given[0][0]) if given else (None, None)


def _response_format_fields(response_format: dict) -> dict:
    """OpenAI's ``response_format`` (``json_object``, or ``json_schema`` with its ``schema``) as
    ``StructuredOutputsParams`` fields."""
    kind = response_format.get("type")
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request("response_format of type json_schema needs json_schema.schema, a JSON schema object",
                              param="response_format")
        return {"json": schema}
    raise bad_request(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                      param="response_format")


LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a bias, to which vLLM's server clamps too


def _logit_bias(logit_bias: Optional[dict[str, float]]) -> Optional[dict[int, float]]:
    """OpenAI's ``{"token id": bias}`` as ``SamplingParams.logit_bias``, each bias clamped to +-100."""
    if not logit_bias:
        return None
    out = {}
    for key, bias in logit_bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids (integers), got {key!r}",
                              param="logit_bias") from None
        out[token_id] = min(max(bias, -LOGIT_BIAS_LIMIT), LOGIT_BIAS_LIMIT)
    return out


def _refuse_unsupported(req) -> None:
    unsupported = req.unsupported_fields()
    if unsupported:
        what = "with use_beam_search" if req.use_beam_search and unsupported[0] != "best_of" else "by this server"
        raise bad_request(f"{unsupported[0]} is not supported {what}", param=unsupported[0])
    if req.prompt_logprobs is not None and req.stream:  # as vLLM
        raise bad_request("prompt_logprobs are not available when stream is true", param="prompt_logprobs")


def _text_delta(completion: CompletionOutput, state: _ChoiceState) -> str:
    """New text since the last chunk. The engine's outputs never take text back: while a request runs they hold
    back what a stop string may still cut (``RequestOutputKind``)."""
    delta = completion.text[state.text_sent:]
    state.text_sent = len(completion.text)
    return delta


def _token_logprobs(completion: CompletionOutput, start: int):
    """``(token id, its entry)`` for output tokens ``start..`` (snapshot lists may have grown since)."""
    entries = (completion.logprobs or [])[: len(completion.token_ids)]
    return list(zip(completion.token_ids[start:], entries[start:]))


def _extend_completion_logprobs(out: CompletionLogprobs, completion: CompletionOutput, start: int,
                                text_offset: int, as_ids: bool = False) -> int:
    """Append the completions-format logprobs of tokens ``start..``; returns the next text offset."""
    return _append_completion_logprobs(out, _token_logprobs(completion, start), text_offset, as_ids=as_ids)


def _token_text(token_id: int, text: Optional[str], as_ids: bool) -> str:
    """A logprob entry's token as the response names it: its text, or vLLM's ``token_id:<id>``
    (``--return-tokens-as-token-ids``: exact ids for tokens whose text is no valid UTF-8 alone)."""
    return f"token_id:{token_id}" if as_ids else (text or "")


def _append_completion_logprobs(out: CompletionLogprobs, tokens_and_entries: Iterable[tuple[int, Optional[dict]]],
                                text_offset: int, decode: Optional[Callable[[int], str]] = None,
                                as_ids: bool = False) -> int:
    """Append ``(token id, logprobs entry)`` pairs in the completions format; returns the next text offset. An entry
    of None (a prompt's first token: nothing comes before it) has no logprobs, and its text from ``decode``."""
    for token_id, entry in tokens_and_entries:
        if entry is None:
            text = decode(token_id) if decode is not None and not as_ids else None
            token, logprob, top = _token_text(token_id, text, as_ids), None, None
        else:
            chosen = entry[token_id]
            token, logprob = _token_text(token_id, chosen.decoded_token, as_ids), _finite(chosen.logprob)
            top = {_token_text(t, lp.decoded_token, as_ids): _finite(lp.logprob) for t, lp in entry.items()}
        out.tokens.append(token)
        out.token_logprobs.append(logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return text_offset


def _chat_logprobs(completion: CompletionOutput, start: int, top_k: Optional[int],
                   as_ids: bool = False) -> ChatLogprobs:
    content = []
    for token_id, entry in _token_logprobs(completion, start):
        chosen = _token_text(token_id, entry[token_id].decoded_token, as_ids)
        top = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= (top_k or 0)),
                     key=lambda item: item[1].rank)
        content.append(ChatTokenLogprob(
            token=chosen, logprob=_finite(entry[token_id].logprob), bytes=_utf8(chosen),
            top_logprobs=[ChatTopLogprob(token=(text := _token_text(t, lp.decoded_token, as_ids)),
                                         logprob=_finite(lp.logprob),
                                         bytes=_utf8(text)) for t, lp in top]))
    return ChatLogprobs(content=content)


def _dumped_logprobs(completion: CompletionOutput, start: int, top_k: int) -> list[dict]:
    """Output tokens ``start..``'s logprob entries as JSON objects (the Responses API's, the chat's shape)."""
    return [entry.model_dump() for entry in _chat_logprobs(completion, start, top_k).content]


def _finite(logprob: float) -> float:
    """A logprob JSON can carry: a token a structured output's grammar forbids has -inf, sent as -9999.0 (vLLM's
    server clamps alike; JSON has no infinity, and OpenAI's schema wants a number)."""
    return max(logprob, -9999.0)


def _utf8(text: Optional[str]) -> list[int]:
    return list((text or "").encode("utf-8"))


def _prompt_logprobs(output: RequestOutput, asked: Optional[int]) -> Optional[PromptLogprobs]:
    """vLLM's ``prompt_logprobs`` of a response, where the request asked for them: each prompt token's entry (the
    token and the ``asked`` most likely tokens there; an echo may have had the engine compute more)."""
    if asked is None or output.prompt_logprobs is None:
        return None
    return [None if entry is None else {
        token: PromptLogprob(logprob=_finite(lp.logprob), rank=lp.rank, decoded_token=lp.decoded_token)
        for i, (token, lp) in enumerate(entry.items()) if i == 0 or (lp.rank is not None and lp.rank <= asked)}
        for entry in output.prompt_logprobs]


def _continuous_usage(req) -> bool:
    """vLLM's ``stream_options.continuous_usage_stats``: each chunk carries its request's usage so far."""
    return req.stream_options is not None and req.stream_options.include_usage and \
        req.stream_options.continuous_usage_stats


def _usage(outputs: Sequence[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens or 0 for o in outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokenUsageInfo(cached_tokens=cached))


class _PromptOnly:
    """A request stream whose outputs come with their completions emptied (no token, text or logprob; finished by
    length): the completions endpoint's echo without generation. Closing it closes (aborts) the request's."""

    def __init__(self, stream: RequestStream):
        self.stream = stream

    def __aiter__(self) -> "_PromptOnly":
        return self

    async def __anext__(self) -> RequestOutput:
        output = await self.stream.__anext__()
        return dataclasses.replace(output, outputs=[dataclasses.replace(
            c, text="", token_ids=[], cumulative_logprob=None, logprobs=None if c.logprobs is None else [],
            finish_reason=c.finish_reason and "length", stop_reason=None) for c in output.outputs])

    def close(self) -> None:
        self.stream.close()


def _response_not_found(response_id: str, param: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", type="not_found_error", param=param)


def _nonempty_input(req):
    """A pooling request's ``input``, which must not be empty."""
    if not req.input:
        raise bad_request("input is empty: give a text, a list of texts or token ids", param="input")
    return req.input


def _encode_embedding(vector: list, encoding_format: str) -> Union[list, str]:
    """A vector (or a per-token task's rows) as OpenAI returns it: floats, or base64 of its little-endian float32
    bytes."""
    if encoding_format == "float":
        return vector
    return base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")


def _sse(payload) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def _sse_response(body: AsyncIterator[str], streams: Sequence[RequestStream], done: bool = True) -> StreamingResponse:
    """SSE over ``body``, ending with ``data: [DONE]`` (``done``: the Responses API ends with its own last event
    instead); an error mid-stream becomes an error event.
    The body is closed however it ends (disconnect, error), which aborts unfinished requests."""

    async def events() -> AsyncIterator[str]:
        try:
            async for event in body:
                yield event
        except Exception as e:  # headers are sent: report the error in the stream
            logger.exception("streaming request failed")
            info = ErrorInfo(message=f"{type(e).__name__}: {e}", type="server_error")
            yield f"data: {json.dumps(ErrorResponse(error=info).model_dump())}\n\n"
        finally:
            await body.aclose()
            for stream in streams:
                stream.close()
        if done:
            yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# =========================================================================================
# command line
# =========================================================================================


def make_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedjax serve",
        description="OpenAI-compatible HTTP server for pagedjax (flags named as vLLM's). "
                    "With no arguments it serves the embedded SmolLM2-135M-Instruct on http://127.0.0.1:8000.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="the model, as vLLM's `vllm serve MODEL` takes it (the same as --model)")
    parser.add_argument("--model", default=None,
                        help="Hugging Face checkpoint folder or .gguf file (default: the embedded "
                             "SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on. Unlike vLLM (0.0.0.0) the default is 127.0.0.1 (this machine "
                             "only) for safety; pass --host 0.0.0.0 to accept connections from other machines")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT, help="port to listen on (0: any free port)")
    parser.add_argument("--served-model-name", nargs="+", default=None,
                        help="model name(s) clients use in the 'model' field (default: --model, or "
                             "SmolLM2-135M-Instruct); the first is reported in metrics")
    parser.add_argument("--api-key", default=None,
                        help="if set, /v1/* requests need the header 'Authorization: Bearer <key>' (default: "
                             f"${API_KEY_ENV}, as vLLM's)")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help="allow tool_choice='auto' (OpenAI's default with tools): the model decides, and "
                             "--tool-call-parser reads its calls out of its text")
    parser.add_argument("--chat-template", default=None,
                        help="a Jinja chat template (a file, or the template itself) instead of the model's")
    parser.add_argument("--trust-request-chat-template", action="store_true",
                        help="render a chat template a request brings (chat_template); refused by default, since "
                             "a template is code that runs on the server")
    parser.add_argument("--allowed-origins", nargs="+", default=[],
                        help="web origins whose pages may call the server (CORS), e.g. http://localhost:3000 or '*'; "
                             "none by default (vLLM allows '*': here a page on any site could reach a local server)")
    parser.add_argument("--reasoning-parser", default=None, choices=list(REASONING_PARSERS),
                        help="split a reasoning model's <think> ... </think> from its answer into reasoning_content "
                             "(and start structured outputs after it): deepseek_r1 (DeepSeek-R1 and its "
                             "distillations), qwen3")
    parser.add_argument("--tool-call-parser", default=None, choices=list(TOOL_PARSERS),
                        help="the model's tool-call syntax: hermes (Qwen 2.5 / 3, Hermes), llama3_json (Llama 3.1 / "
                             "3.2)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--tokenizer", default=None,
                        help="a folder (or .gguf file) whose tokenizer is used instead of the model's, e.g. the "
                             "original checkpoint's beside a GGUF")
    engine.add_argument("--trust-remote-code", action="store_true",
                        help="let the tokenizer run the code its folder ships; the model's code is always the "
                             "engine's own (an architecture it lacks is refused either way)")
    engine.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs: the steps compile with XLA's command buffers off, so each kernel "
                             "launches on its own (slower small steps)")
    engine.add_argument("--dtype", default="auto", help="weights and KV-cache dtype: auto (bfloat16 on GPU, "
                        "float32 on CPU), bfloat16, float16, float32")
    engine.add_argument("--max-model-len", type=human_readable_int, default=None,
                        help="context length (prompt + output), e.g. 8192, 32k (32,000) or 32K (32,768); default: "
                             "the model's")
    engine.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="devices to shard the model over")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="fraction of device memory for weights, activations and the KV cache")
    engine.add_argument("--max-num-seqs", type=int, default=None,
                        help="most sequences in one step (default: 1024 on GPUs of >= 70 GiB, else 256; 64 on CPU)")
    engine.add_argument("--max-num-batched-tokens", type=human_readable_int, default=None,
                        help="token budget of one step (default: 8192 on GPU, 1024 on CPU)")
    engine.add_argument("--block-size", type=int, default=16, choices=[8, 16, 32, 64],
                        help="tokens per KV-cache block")
    engine.add_argument("--quantization", "-q", default=None, type=quantization_method,
                        choices=list(QUANTIZATION_METHODS),
                        help="weight quantization: int8/int4/fp8 made at load time, or awq/gptq/fp8 "
                             "checkpoints (default: the checkpoint's own, else none)")
    engine.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                        help="KV-cache pages: auto (the model dtype) or fp8 (e4m3; fp8_e5m2)")
    engine.add_argument("--load-format", default="auto", choices=list(LOAD_FORMATS),
                        help="checkpoint format ('dummy': random weights)")
    engine.add_argument("--seed", type=int, default=0, help="seed of requests that set none")
    engine.add_argument("--num-gpu-blocks-override", type=int, default=None,
                        help="use this many KV-cache blocks instead of sizing from memory")
    engine.add_argument("--precompile-steps", action=argparse.BooleanOptionalAction, default=None,
                        help="compile every step shape at start-up under a progress bar (default: on GPU)")
    engine.add_argument("--num-scheduler-steps", type=int, default=1,
                        help="decode steps run in one dispatch while no request waits (multi-step decoding)")
    engine.add_argument("--speculative-config", type=json.loads, default=None,
                        help='speculative decoding, as JSON: \'{"method": "ngram", "num_speculative_tokens": 4, '
                             '"prompt_lookup_max": 4}\' looks drafts up in each request\'s own tokens')
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="keep full KV blocks cached by their prefix, so a prompt that starts with a cached "
                             "prefix (a shared system prompt, an earlier turn) computes only the rest")
    engine.add_argument("--generation-config", default="auto",
                        help="defaults of the sampling fields a request leaves unset: 'auto' from the model "
                             "folder's generation_config.json, 'vllm' none, or a folder holding one")
    engine.add_argument("--runner", default="auto", choices=list(RUNNERS),
                        help="'pooling': an embedding model, served on /v1/embeddings, /score and /rerank (its "
                             "checkpoint's sentence-transformers pooling, else the last token's; normalised); "
                             "'auto': pooling where the checkpoint's architectures are bare decoders "
                             "(e.g. MistralModel), else generate")
    engine.add_argument("--pooling-type", default=None, choices=["LAST", "MEAN", "CLS"],
                        help="with --runner pooling: the pooling, instead of the checkpoint's")
    engine.add_argument("--scheduling-policy", default="fifo", choices=["fifo", "priority"],
                        help="'priority': requests' priority field orders the queue (lower first)")
    engine.add_argument("--admission-reserve-tokens", type=int, default=DEFAULT_ADMISSION_RESERVE_TOKENS,
                        help="tokens of growth every running request keeps free when a waiting request is admitted "
                             "(fewer preemptions); 0 admits whenever a prompt's first blocks are free, as vLLM does")
    lora = parser.add_argument_group("LoRA adapters")
    lora.add_argument("--enable-lora", action="store_true",
                      help="serve LoRA adapters (local PEFT folders): a request whose 'model' is an adapter's name "
                           "runs with it; the base model's name runs without")
    lora.add_argument("--lora-modules", nargs="+", action="extend", type=parse_lora_module, default=None,
                      metavar="ADAPTER",
                      help="adapters served under their own model names (needs --enable-lora), each name=path or "
                           'JSON {"name": "...", "path": "...", "base_model_name": "..."}; set '
                           f"{RUNTIME_LORA_UPDATING_ENV}=true to add and remove adapters at runtime too "
                           "(POST /v1/load_lora_adapter, /v1/unload_lora_adapter)")
    lora.add_argument("--max-loras", type=int, default=1, help="most adapters run in one step (held on the device)")
    lora.add_argument("--max-lora-rank", type=int, default=16, help="largest rank r of an adapter")
    lora.add_argument("--max-cpu-loras", type=int, default=None,
                      help="adapters kept read in host memory (default: --max-loras)")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                        help="run the engine loop in a child process of its own, so streaming many responses "
                             "never holds up the engine's steps (one GIL each; engine.engine_process)")
    parser.add_argument("--disable-frontend-multiprocessing", dest="engine_process", action="store_false",
                        help="vLLM's name of --no-engine-process: the engine loop in the server's process")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])
    parser.add_argument("--disable-uvicorn-access-log", action="store_true",
                        help="no line a request in uvicorn's access log")
    parser.add_argument("--disable-log-stats", action="store_true",
                        help=f"no periodic stats line (throughputs, queue, KV cache) every "
                             f"${LOG_STATS_INTERVAL_ENV} seconds (default 10) while the engine works (unlike "
                             "vLLM's, /metrics stays on)")
    parser.add_argument("--enable-request-id-headers", action="store_true",
                        help="each response carries an X-Request-Id header (the request's own, else a new one)")
    parser.add_argument("--return-tokens-as-token-ids", action="store_true",
                        help="logprobs name their tokens 'token_id:<id>' (exact ids where a token's text is no valid "
                             "UTF-8 alone)")
    ignored = parser.add_argument_group("vLLM flags taken for its command lines, with no effect here")
    for flag, kwargs in IGNORED_VLLM_FLAGS.items():
        ignored.add_argument(flag, dest=_ignored_dest(flag), default=None, help=kwargs["why"],
                             **{k: v for k, v in kwargs.items() if k != "why"})
    return parser


# vLLM flags that change nothing here: taken (with a warning) so that a vLLM command line starts as it is.
_IGNORED_FLAG_KINDS = {"swap_space": dict(type=float), "max_seq_len_to_capture": dict(type=int),
                       "enable_chunked_prefill": dict(action=argparse.BooleanOptionalAction)}  # else a switch
IGNORED_VLLM_FLAGS = {
    "--disable-log-requests": dict(action="store_true", why="requests are not logged anyway"),
    "--enable-log-requests": dict(action="store_true", why="requests are not logged"),
    "--max-log-len": dict(type=int, why="requests are not logged"),
    "--enable-server-load-tracking": dict(action="store_true", why="/load counts the API requests in flight always"),
    "--enable-prompt-tokens-details": dict(action="store_true",
                                           why="usage always has prompt_tokens_details (cached_tokens)"),
    "--show-hidden-metrics-for-version": dict(type=str, why="vLLM's older metric names are always served "
                                                            "beside the new ones"),
    **{"--" + name.replace("_", "-"): dict(why=why, **_IGNORED_FLAG_KINDS.get(name, dict(action="store_true")))
       for name, why in IGNORED_VLLM_ARGS.items()},
}


def _ignored_dest(flag: str) -> str:
    return "ignored_" + flag.lstrip("-").replace("-", "_")


def ignored_flags_given(args: argparse.Namespace) -> list[str]:
    """The ``IGNORED_VLLM_FLAGS`` a command line set."""
    return [flag for flag in IGNORED_VLLM_FLAGS if getattr(args, _ignored_dest(flag)) is not None]


def human_readable_int(text: str) -> int:
    """An integer flag as vLLM's take them: ``8192``, ``32k`` (32,000; decimals allowed: ``25.6k``), ``32K`` (32,768);
    ``m``/``M`` and ``g``/``G`` likewise."""
    text = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgKMG])", text)
    if match is None:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r} (e.g. 8192, 32k or 32K)") from None
    number, suffix = match.groups()
    power = "kmg".index(suffix.lower()) + 1
    if suffix.islower():
        return int(float(number) * 1000 ** power)
    if "." in number:
        raise argparse.ArgumentTypeError(f"{text!r}: a binary suffix (K, M, G) takes a whole number")
    return int(number) * 1024 ** power


def port_number(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {port}")
    return port


def engine_args_from_cli(args: argparse.Namespace) -> EngineArgs:
    """``EngineArgs`` from the parsed flags (every flag named as an ``EngineArgs`` field)."""
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    return EngineArgs(**{k: v for k, v in vars(args).items() if k in names}, usage_context="server")


def lora_modules_problem(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with the ``--lora-modules`` flags (as a start-up error), or None: they need --enable-lora, a
    name of its own each, and adapter folders (checked before the engine starts; it reads them once started)."""
    modules = args.lora_modules or []
    if modules and not args.enable_lora:
        return "--lora-modules needs --enable-lora (as vLLM's)"
    taken = set(served_model_names(args))
    for module in modules:
        if module.name in taken:
            return (f"--lora-modules: the name {module.name!r} is given twice (adapter names and "
                    "--served-model-name must all differ)")
        taken.add(module.name)
        problem = adapter_folder_problem(module.path)
        if problem is not None:
            return f"--lora-modules: adapter {module.name!r}: {problem}"
    return None


def served_model_names(args: argparse.Namespace) -> list[str]:
    from models.default_model import DEFAULT_MODEL_NAME

    return list(args.served_model_name or [args.model or DEFAULT_MODEL_NAME])


def engine_facts(async_llm: AsyncLLM) -> dict:
    """What a benchmark records about the engine behind the API (``/version``): device, JAX version,
    dtype, quantization, KV cache dtype, tensor parallelism, max_model_len, prefix caching."""
    engine = async_llm.engine
    return dict(**async_llm.device_facts(), dtype=engine.dtype, quantization=engine.quantization,
                kv_cache_dtype=engine.args.kv_cache_dtype, tensor_parallel_size=engine.args.tensor_parallel_size,
                max_model_len=engine.max_model_len, enable_prefix_caching=engine.args.enable_prefix_caching)


def startup_line(async_llm: AsyncLLM, names: Sequence[str], url: str) -> str:
    facts, stats, engine = engine_facts(async_llm), async_llm.stats(), async_llm.engine
    return (f"pagedjax serving {', '.join(names)} ({engine.model_path}) on {facts['num_devices']}x "
            f"{facts['device']}; KV cache {stats['num_usable_blocks']} blocks of {engine.args.block_size} "
            f"tokens; max_model_len {facts['max_model_len']}; OpenAI API at {url}/v1")


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a taken port fails at once, not after the load."""
    try:
        return socket.create_server((host, port), reuse_port=False)
    except OSError as e:
        raise SystemExit(f"error: cannot listen on {host}:{port}: {e.strerror or e}") from None


def parse_cli(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line as vLLM's server reads it: the model as the first word or ``--model``, the API key from
    ``--api-key`` or ``$VLLM_API_KEY``, and a warning for each flag taken with no effect here."""
    args = parser.parse_args(argv)
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            parser.error(f"the model is given twice: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    for flag in ignored_flags_given(args):
        logger.warning("%s has no effect here: %s", flag, IGNORED_VLLM_FLAGS[flag]["why"])
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = make_arg_parser()
    args = parse_cli(parser, argv)
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        parser.error("--enable-auto-tool-choice needs --tool-call-parser")
    lora_problem = lora_modules_problem(args)
    if lora_problem:
        parser.error(lora_problem)
    from engine.tokenizer import load_chat_template

    try:
        chat_template = None if args.chat_template is None else load_chat_template(args.chat_template)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = bind_socket(args.host, args.port)
    try:
        async_llm = AsyncLLM.from_engine_args(engine_args_from_cli(args), engine_process=args.engine_process)
    except (ValueError, NotImplementedError, FileNotFoundError) as e:
        sock.close()
        parser.exit(2, f"error: cannot start the engine: {e}\n")
    names = served_model_names(args)
    app = build_app(async_llm, names, api_key=args.api_key,
                    tool_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
                    reasoning_parser=args.reasoning_parser, chat_template=chat_template,
                    allowed_origins=args.allowed_origins, lora_modules=args.lora_modules or (),
                    trust_request_chat_template=args.trust_request_chat_template,
                    request_id_headers=args.enable_request_id_headers,
                    return_tokens_as_token_ids=args.return_tokens_as_token_ids)
    for name, adapter in app.state.serving.lora_adapters.items():  # read now, as vLLM: a bad one stops start-up
        try:
            asyncio.run(async_llm.add_lora(adapter.request))
        except ValueError as e:
            async_llm.shutdown()
            sock.close()
            parser.exit(2, f"error: --lora-modules: adapter {name!r}: {e}\n")
    # What start-up made (the tokenizer, the app, imported modules) lives as long as the server: out of the cyclic
    # collector's reach, so the collections that streaming's many small objects set off walk only newer ones (the
    # engine does the same in its own process; vLLM freezes its heap after start-up too).
    gc.collect()
    gc.freeze()
    host, port = sock.getsockname()[:2]
    logger.info(startup_line(async_llm, names, f"http://{_url_host(host)}:{port}"))
    for adapter in app.state.serving.lora_adapters.values():
        logger.info("LoRA adapter %r (id %d): %s", adapter.request.lora_name, adapter.request.lora_int_id,
                    adapter.request.lora_path)
    # No ASGI lifespan: the app has no start-up or shutdown handlers, and under uvicorn 0.55 a second Ctrl-C logged
    # the lifespan task's cancellation as an ERROR with a traceback.
    stats_logger = None
    try:
        stats_logger = None if args.disable_log_stats else PeriodicStatsLogger(async_llm.stats).start()
        config = uvicorn.Config(app, log_level=args.uvicorn_log_level, timeout_graceful_shutdown=5, lifespan="off",
                                access_log=not args.disable_uvicorn_access_log)
        server = InterruptibleUntilStopped(config)
        watch_engine(async_llm, server)
        signal.signal(signal.SIGTERM, _terminated)  # what uvicorn puts back, and raises again, once it has stopped
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: uvicorn has shut down gracefully and raised the signal again
        pass
    finally:
        # A further Ctrl-C would leave the engine's process behind: it stops first (within its join's timeouts).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        logger.info("stopping the engine")
        if stats_logger is not None:
            stats_logger.stop()
        dead = not async_llm.is_alive()
        async_llm.shutdown()
    if dead:  # a supervisor (systemd, Docker, Kubernetes) restarts a server that fails
        raise SystemExit(1)


def _terminated(signum, frame) -> None:
    """SIGTERM as Ctrl-C (vLLM's server does the same): ``main`` then stops the engine and exits 0."""
    raise KeyboardInterrupt("terminated")


class InterruptibleUntilStopped(uvicorn.Server):
    """uvicorn's server, deaf to Ctrl-C and SIGTERM from the moment it has stopped serving: a Ctrl-C while asyncio
    closes the event loop interrupted uvloop inside its close (``RuntimeError: Cannot close a running event loop``,
    or a traceback from its executor's shutdown thread). (uvicorn raises the signal that stopped it again as it
    returns: ``main`` makes SIGTERM's handler ``_terminated`` first, whose default action had killed the process
    before it stopped the engine, exit -15.)"""

    async def serve(self, sockets=None) -> None:
        try:
            await super().serve(sockets=sockets)
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)


def watch_engine(async_llm: AsyncLLM, server: "uvicorn.Server", interval_s: float = ENGINE_WATCH_INTERVAL_S) -> None:
    """Stop ``server`` once the engine has died, as vLLM's launcher does: requests already failed with the engine's
    error and every new one would, so serving on helps nobody; the process then exits with status 1."""
    def watch() -> None:
        while not server.should_exit:
            if not async_llm.is_alive():
                logger.error("the engine has died: stopping the server")
                server.should_exit = True
                return
            time.sleep(interval_s)

    threading.Thread(target=watch, name="pagedjax-engine-watchdog", daemon=True).start()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    main()
