"""The OpenAI-compatible server end to end: the real app under uvicorn on a free localhost
port, the embedded default model, the official ``openai`` client (httpx for raw bodies).

One engine for the whole module (loading takes ~30 s on CPU), in a child process as ``serve.py`` runs it
(``--engine-process``). It serves two apps: the open one, and one started with ``--api-key`` sharing the same
``AsyncLLM``.
Shows: completions and chat answers (Paris), streamed deltas equal the non-streamed
text, n, stop strings never streamed, logprobs in both formats, seeds reproduce,
usage counts the tokenizer's tokens, 32 concurrent streams are correct and batched,
a client that disconnects frees its KV blocks while other streams go on, /metrics,
and bad input answered with the right status and an OpenAI-style error body while the
server keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import random
import re
import threading
import time
import types
from typing import Optional

import pytest

for _module in ("fastapi", "uvicorn", "prometheus_client", "openai", "httpx"):  # absent on the GPU machine
    pytest.importorskip(_module)

import httpx  # noqa: E402
import openai  # noqa: E402
import uvicorn  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from engine.async_llm import AsyncLLM  # noqa: E402
from engine.entrypoints.openai.api_server import (  # noqa: E402
    bind_socket, build_app, engine_args_from_cli, make_arg_parser, served_model_names,
)
from engine.metrics import ServingMetrics  # noqa: E402
from engine.tokenizer import apply_chat_template  # noqa: E402
from models.loader import resolve_model_path  # noqa: E402

API_KEY = "test-secret-key"
MAX_MODEL_LEN = 512
MAX_NUM_SEQS = 16
SPECULATIVE = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "1, 2, 3, 4,",
           "The quick brown fox"]
GREEDY = dict(temperature=0, max_tokens=8, extra_body={"ignore_eos": True})
COPYING_PROMPT = "Repeat: red green blue, red green blue, red green blue, red green blue, red"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@dataclasses.dataclass
class Served:
    url: str
    secured_url: str
    async_llm: AsyncLLM
    model: str
    # the same engine, served with --enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser qwen3
    tools_url: str = ""

    def client(self, url: Optional[str] = None, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{url or self.url}/v1", api_key="unused", max_retries=0, timeout=120,
                             **kwargs)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=60).text
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                assert sample.labels.get("model_name") == self.model
                extra = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()) if k != "model_name")
                out[sample.name + (f"{{{extra}}}" if extra else "")] = sample.value
        return out


def _serve_in_thread(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    host, port = sock.getsockname()[:2]
    return server, thread, f"http://{host}:{port}"


@pytest.fixture(scope="module")
def served():
    # The server drafts (n-gram speculative decoding): replies equal decoding a token a step, so every test here
    # holds with drafts too, and a step can stream several tokens.
    args = make_arg_parser().parse_args(["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
                                         "--speculative-config", json.dumps(SPECULATIVE)])
    async_llm = AsyncLLM.from_engine_args(engine_args_from_cli(args), engine_process=args.engine_process)
    names = served_model_names(args)
    app = build_app(async_llm, names)
    secured = build_app(async_llm, names, api_key=API_KEY, metrics=app.state.metrics)
    tools = build_app(async_llm, names, metrics=app.state.metrics, tool_parser="hermes", reasoning_parser="qwen3",
                      trust_request_chat_template=True)
    running = [_serve_in_thread(app), _serve_in_thread(secured), _serve_in_thread(tools)]
    yield Served(running[0][2], running[1][2], async_llm, names[0], running[2][2])
    for server, thread, _ in running:
        server.should_exit = True
        thread.join(timeout=10)
    async_llm.shutdown()


@pytest.fixture(scope="module")
def reference(served):
    """Greedy non-streamed completions of PROMPTS (one request with a list of prompts)."""
    out = served.client().completions.create(model=served.model, prompt=PROMPTS, **GREEDY)
    assert [c.index for c in out.choices] == list(range(len(PROMPTS)))
    return [c.text for c in out.choices]


# -- what works --------------------------------------------------------------------------


def test_models_health_version(served):
    models = served.client().models.list().data
    assert [m.id for m in models] == [served.model] == ["SmolLM2-135M-Instruct"]
    assert httpx.get(f"{served.url}/health").status_code == 200
    assert httpx.get(f"{served.url}/ping").status_code == httpx.post(f"{served.url}/ping").status_code == 200
    version = httpx.get(f"{served.url}/version").json()
    assert isinstance(version["version"], str)
    # What a benchmark records about the engine behind the API (scripts/bench_serving.py)
    assert (version["device"], version["backend"], version["dtype"]) == ("cpu", "cpu", "float32")
    assert version["max_model_len"] == MAX_MODEL_LEN and version["tensor_parallel_size"] == 1


def test_completion_text_and_usage(served, reference):
    tokenizer = served.async_llm.tokenizer
    out = served.client().completions.create(model=served.model, prompt=PROMPTS[0], **GREEDY)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    (choice,) = out.choices
    assert choice.text == reference[0] and "Paris" in choice.text
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == len(tokenizer.encode(PROMPTS[0]))
    assert out.usage.completion_tokens == 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + 8
    # The same prompt as token ids gives the same text; echo puts the prompt in front.
    ids = tokenizer.encode(PROMPTS[0])
    by_ids = served.client().completions.create(model=served.model, prompt=ids, echo=True, **GREEDY)
    assert by_ids.choices[0].text == PROMPTS[0] + reference[0]
    assert by_ids.usage.prompt_tokens == len(ids)


def test_tokenize_and_detokenize(served):
    """vLLM's /tokenize gives the ids the generation endpoints run (a prompt; chat messages through the template);
    /detokenize gives the text back; bad input is a 400."""
    tokenizer = served.async_llm.tokenizer
    out = httpx.post(f"{served.url}/tokenize", json={"model": served.model, "prompt": PROMPTS[0]}).json()
    assert out["tokens"] == tokenizer.encode(PROMPTS[0]) and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == MAX_MODEL_LEN
    chat = httpx.post(f"{served.url}/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == apply_chat_template(tokenizer, CHAT)
    back = httpx.post(f"{served.url}/detokenize", json={"tokens": out["tokens"]}).json()
    assert back["prompt"] == PROMPTS[0]
    strs = httpx.post(f"{served.url}/tokenize", json={"prompt": PROMPTS[0], "return_token_strs": True,
                                                      "add_special_tokens": False}).json()
    assert strs["tokens"] == tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    assert strs["token_strs"] == tokenizer.convert_ids_to_tokens(strs["tokens"]) and "token_strs" in out
    assert _error(httpx.post(f"{served.url}/tokenize", json={}), 400)["param"] == "prompt"
    assert _error(httpx.post(f"{served.url}/detokenize", json={"tokens": [10**9]}), 400)["param"] == "tokens"
    assert _error(httpx.post(f"{served.url}/tokenize", json={"model": "gpt-5", "prompt": "x"}), 404)["param"] == "model"


def test_chat_template_arguments_continue_final_message_and_kwargs(served, monkeypatch):
    """vLLM's continue_final_message renders the last assistant message open (no end of turn), so the reply goes
    on from it; chat_template_kwargs reach the template (Qwen 3's enable_thinking, say); misuse is a 400."""
    turn = CHAT + [{"role": "assistant", "content": "The capital of France is"}]
    closed = httpx.post(f"{served.url}/tokenize", json={"messages": turn, "add_generation_prompt": False}).json()
    opened = httpx.post(f"{served.url}/tokenize", json={"messages": turn, "add_generation_prompt": False,
                                                        "continue_final_message": True}).json()
    assert closed["tokens"][:len(opened["tokens"])] == opened["tokens"] and len(closed["tokens"]) > len(
        opened["tokens"])
    assert served.async_llm.tokenizer.decode(opened["tokens"]).endswith("The capital of France is")
    reply = served.client().chat.completions.create(
        model=served.model, messages=turn, temperature=0, max_tokens=4,
        extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert "Paris" in reply.choices[0].message.content
    # vLLM's echo: the reply begins with the continued message, streamed as a chunk after the role's
    echo = dict(model=served.model, messages=turn, temperature=0, max_tokens=4,
                extra_body={"add_generation_prompt": False, "continue_final_message": True, "echo": True})
    echoed = served.client().chat.completions.create(**echo)
    assert echoed.choices[0].message.content == "The capital of France is" + reply.choices[0].message.content
    chunks = list(served.client().chat.completions.create(**echo, stream=True))
    assert [c.choices[0].delta.content for c in chunks[:2]] == ["", "The capital of France is"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == echoed.choices[0].message.content
    plain_echo = served.client().chat.completions.create(model=served.model, messages=CHAT, temperature=0, max_tokens=4,
                                                         extra_body={"echo": True})  # the last message is the user's
    assert plain_echo.choices[0].message.content == served.client().chat.completions.create(
        model=served.model, messages=CHAT, temperature=0, max_tokens=4).choices[0].message.content
    _error(httpx.post(f"{served.url}/v1/chat/completions", json={"messages": turn, "continue_final_message": True}),
           400)
    seen = {}  # the keyword arguments the tokenizer's template gets
    tokenizer = served.async_llm.tokenizer
    render = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda *a, **k: seen.update(k) or render(*a, **k))
    httpx.post(f"{served.url}/tokenize", json={"messages": CHAT, "chat_template_kwargs": {"enable_thinking": False}})
    assert seen["enable_thinking"] is False
    # chat_template_kwargs win over the request's own fields, as vLLM merges them
    by_kwargs = httpx.post(f"{served.url}/tokenize", json={
        "messages": CHAT, "chat_template_kwargs": {"add_generation_prompt": False}}).json()["tokens"]
    assert by_kwargs == httpx.post(f"{served.url}/tokenize", json={
        "messages": CHAT, "add_generation_prompt": False}).json()["tokens"]
    # A request's own template is code run on the server: refused unless the server trusts it (as vLLM), on either
    # route and however it comes (test_server_options_chat_template_and_cors renders one where trusted).
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    for route, fields in (("tokenize", {"chat_template": plain}),
                          ("v1/chat/completions", {"chat_template_kwargs": {"chat_template": plain}})):
        error = _error(httpx.post(f"{served.url}/{route}", json={"messages": CHAT, **fields}), 400)
        assert error["param"] == "chat_template" and "--trust-request-chat-template" in error["message"]


def test_server_options_chat_template_and_cors(served, tmp_path):
    """--chat-template (a file or the text) replaces the model's template for every request, and with
    --trust-request-chat-template a request's own replaces that (a template over the sandbox's range limit is a
    400); --allowed-origins answers a browser's preflight and marks responses for those origins only."""
    from engine.tokenizer import load_chat_template

    plain = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    (tmp_path / "t.jinja").write_text(plain)
    assert load_chat_template(str(tmp_path / "t.jinja")) == load_chat_template(plain) == plain
    with pytest.raises(ValueError, match="neither a file"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    app = build_app(served.async_llm, [served.model], metrics=ServingMetrics(served.model, served.async_llm.stats),
                    chat_template=plain, allowed_origins=["http://localhost:3000"], api_key=API_KEY,
                    trust_request_chat_template=True)
    server, thread, url = _serve_in_thread(app)
    try:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        ids = httpx.post(f"{url}/tokenize", json={"messages": CHAT}, headers=headers).json()["tokens"]
        assert served.async_llm.tokenizer.decode(ids) == f"[{CHAT[0]['content']}]"
        own = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}"
        ids = httpx.post(f"{url}/tokenize", json={"messages": CHAT, "chat_template": own}).json()["tokens"]
        assert served.async_llm.tokenizer.decode(ids) == f"user: {CHAT[0]['content']}"
        huge = "{% for i in range(10**9) %}x{% endfor %}"
        error = _error(httpx.post(f"{url}/tokenize", json={"messages": CHAT, "chat_template": huge}), 400)
        assert error["param"] == "messages"
        preflight = httpx.options(f"{url}/v1/chat/completions", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = httpx.get(f"{url}/v1/models", headers={**headers, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_request_ids_from_the_client_and_the_server_load(served):
    """vLLM's request ids: an ``X-Request-Id`` header names the response (``cmpl-<id>``), else the body's
    ``request_id``; two requests with the same id both run; with ``request_id_headers`` (--enable-request-id-headers)
    every response carries the header back (a new one where none came). ``/load`` counts the API requests in flight
    (vLLM's server load)."""
    app = build_app(served.async_llm, [served.model], metrics=ServingMetrics(served.model, served.async_llm.stats),
                    request_id_headers=True)
    server, thread, url = _serve_in_thread(app)
    try:
        body = {"prompt": "Hi", "max_tokens": 2}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # at once: the engine's ids stay apart
            same = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body, timeout=60,
                                                      headers={"X-Request-Id": "trace-7"}), range(2)))
        assert [r.json()["id"] for r in same] == ["cmpl-trace-7"] * 2
        assert [r.headers["x-request-id"] for r in same] == ["trace-7"] * 2
        chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, "request_id": "b1"},
                          timeout=60)
        assert chat.json()["id"] == "chatcmpl-b1" and len(chat.headers["x-request-id"]) == 32
        assert httpx.get(f"{url}/load").json() == {"server_load": 0}
        release = threading.Event()

        @app.get("/v1/held")  # an API route answered only once the test says so
        async def held() -> dict:
            while not release.is_set():
                await asyncio.sleep(0.01)
            return {}

        waiting = threading.Thread(target=httpx.get, args=(f"{url}/v1/held",), kwargs={"timeout": 60})
        waiting.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/load").json() != {"server_load": 1}:
            assert time.monotonic() < deadline, "the held request never counted"
            time.sleep(0.01)
        release.set()
        waiting.join()
        assert httpx.get(f"{url}/load").json() == {"server_load": 0}
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    plain = httpx.post(f"{served.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert "x-request-id" not in plain.headers and plain.json()["id"].startswith("cmpl-")


def test_invocations_routes_a_body_to_its_endpoint(served, reference):
    """vLLM's (Amazon SageMaker's) ``/invocations``: a chat body answers as /v1/chat/completions, a completion body
    as /v1/completions; a body of neither, or no JSON, is a 400 that names what it takes."""
    chat = httpx.post(f"{served.url}/invocations", json={"messages": [{"role": "user", "content": "Hi"}],
                                                         "max_tokens": 4}, timeout=120).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    completion = httpx.post(f"{served.url}/invocations", json={"prompt": PROMPTS[0], "temperature": 0,
                                                               "max_tokens": 8, "ignore_eos": True},
                            timeout=120).json()
    assert completion["object"] == "text_completion" and completion["choices"][0]["text"] == reference[0]
    for bad, says in (({"json": {"foo": 1}}, "Expected one of: ChatCompletionRequest, CompletionRequest"),
                      ({"content": b"{not json"}, "not valid JSON")):
        refused = httpx.post(f"{served.url}/invocations", timeout=60, **bad)
        assert refused.status_code == 400 and says in refused.json()["error"]["message"]


def test_chat_answers_paris(served):
    tokenizer = served.async_llm.tokenizer
    out = served.client().chat.completions.create(model=served.model, messages=CHAT, temperature=0,
                                                  max_completion_tokens=20)
    assert out.object == "chat.completion"
    message = out.choices[0].message
    assert message.role == "assistant" and "Paris" in message.content
    assert out.usage.prompt_tokens == len(apply_chat_template(tokenizer, CHAT))
    assert 0 < out.usage.completion_tokens <= 20


def test_responses_api_through_the_openai_client(served):
    """OpenAI's Responses API (``/v1/responses``) through the ``openai`` client: ``instructions`` and ``input`` give
    the chat completion's greedy reply as one message, with its token counts; streamed, the typed events in order
    carry the same text; ``previous_response_id`` continues a stored response (its turns, not its instructions, before
    the new input, as the chat endpoint renders them); ``retrieve`` reads it back; a cut reply is ``incomplete``;
    tools and an unknown response id are a 400 and a 404."""
    client = served.client()
    question = {"role": "user", "content": "What is the capital of France?"}
    greedy = dict(model=served.model, temperature=0)
    chat = client.chat.completions.create(messages=[{"role": "system", "content": "Be brief."}, question],
                                          max_completion_tokens=12, **greedy)
    first = client.responses.create(instructions="Be brief.", input=question["content"], max_output_tokens=12,
                                    **greedy)
    assert first.object == "response" and first.output_text == chat.choices[0].message.content
    assert (first.usage.input_tokens, first.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                      chat.usage.completion_tokens)
    cut = chat.choices[0].finish_reason == "length"
    assert first.status == ("incomplete" if cut else "completed")
    events = list(client.responses.create(instructions="Be brief.", input=[question], max_output_tokens=12,
                                          stream=True, **greedy))
    assert [e.type for e in events[:4]] == ["response.created", "response.in_progress", "response.output_item.added",
                                            "response.content_part.added"]
    assert [e.type for e in events[-4:]] == ["response.output_text.done", "response.content_part.done",
                                             "response.output_item.done",
                                             "response.incomplete" if cut else "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == first.output_text
    assert events[-1].response.output_text == first.output_text
    follow_up = {"role": "user", "content": "And of Germany?"}
    second = client.responses.create(previous_response_id=first.id, input=follow_up["content"], max_output_tokens=8,
                                     **greedy)
    want = client.chat.completions.create(
        messages=[question, {"role": "assistant", "content": first.output_text}, follow_up], max_completion_tokens=8,
        **greedy)
    assert second.output_text == want.choices[0].message.content and second.previous_response_id == first.id
    assert client.responses.retrieve(second.id).output_text == second.output_text
    (listed,) = client.responses.input_items.list(second.id).data  # the request's own input, not the history
    assert listed.role == "user" and listed.content[0].text == follow_up["content"]
    stream = client.responses.create(input="Count to twenty.", max_output_tokens=40, stream=True, **greedy)
    opened = next(iter(stream))
    assert client.responses.retrieve(opened.response.id).status == "in_progress"  # stored as it starts
    stream.close()
    for _ in range(100):
        if client.responses.retrieve(opened.response.id).status != "in_progress":
            break
        time.sleep(0.1)
    assert client.responses.retrieve(opened.response.id).status == "cancelled"  # the client left
    assert second.temperature == 0 and first.top_p == 1.0  # as used
    # include: each output token's logprob and the 2 most likely tokens there, as the chat endpoint gives them
    scored = client.responses.create(instructions="Be brief.", input=question["content"], max_output_tokens=12,
                                     include=["message.output_text.logprobs"], top_logprobs=2, **greedy)
    chat_scored = client.chat.completions.create(messages=[{"role": "system", "content": "Be brief."}, question],
                                                 max_completion_tokens=12, logprobs=True, top_logprobs=2, **greedy)
    entries = scored.output[0].content[0].logprobs
    assert [(e.token, len(e.top_logprobs)) for e in entries] == [(e.token, 2)
                                                                 for e in chat_scored.choices[0].logprobs.content]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in chat_scored.choices[0].logprobs.content],
                                                         abs=1e-4)
    deltas = [e for e in client.responses.create(instructions="Be brief.", input=question["content"], stream=True,
                                                 max_output_tokens=12, include=["message.output_text.logprobs"],
                                                 **greedy) if e.type == "response.output_text.delta"]
    assert [lp.token for e in deltas for lp in e.logprobs] == [e.token for e in entries]
    queued = client.responses.create(instructions="Be brief.", input=question["content"], max_output_tokens=12,
                                     background=True, **greedy)
    assert queued.status == "queued"
    for _ in range(600):  # generated on after the answer; stored when done
        done = client.responses.retrieve(queued.id)
        if done.status != "queued":
            break
        time.sleep(0.1)
    assert done.output_text == first.output_text and done.status == first.status
    stopped = client.responses.create(input="Tell me a long story.", max_output_tokens=400, background=True,
                                      extra_body={"ignore_eos": True}, **greedy)
    assert client.responses.cancel(stopped.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="not generating in the background"):
        client.responses.cancel(stopped.id)
    with pytest.raises(openai.BadRequestError, match="background responses are stored and not streamed"):
        client.responses.create(input="Hi", background=True, store=False, **greedy)
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Berlin"]}}, "required": ["city"],
              "additionalProperties": False}
    structured = client.responses.create(input=question["content"], max_output_tokens=24, text={"format": {
        "type": "json_schema", "name": "answer", "schema": schema}}, **greedy)
    assert json.loads(structured.output_text)["city"] in ("Paris", "Berlin")
    assert structured.text.format.name == "answer" and structured.text.format.schema_ == schema  # echoed as given
    raw = httpx.post(f"{served.url}/v1/responses", json={"input": "Hi", "max_output_tokens": 2, "stream": True},
                     timeout=60)
    assert "response.incomplete" in raw.text and "[DONE]" not in raw.text  # no chat-style end marker
    for body, param, message in (
            ({"input": [{"role": "tool", "content": "x"}]}, "input", "role 'tool'"),
            ({"input": [{"type": "item_reference", "id": "x"}]}, "input", "'item_reference' item"),
            ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input",
             "input_image"),
            ({"input": "Hi", "tool_choice": {"type": "web_search_preview"}}, "tool_choice", "is not served"),
            ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text", "text.format")):
        bad = httpx.post(f"{served.url}/v1/responses", json=body, timeout=60)
        assert bad.status_code == 400 and message in bad.json()["error"]["message"], (body, bad.text)
        assert bad.json()["error"]["param"] == param, bad.text
    # With a reasoning parser (the tools app's qwen3) the reasoning item comes first (empty: this model does not think)
    thinking = served.client(served.tools_url)
    reasoned = thinking.responses.create(instructions="Be brief.", input=question["content"], max_output_tokens=12,
                                         **greedy)
    assert [item.type for item in reasoned.output] == ["reasoning", "message"]
    assert reasoned.output_text == first.output_text
    streamed = list(thinking.responses.create(input="Hi", max_output_tokens=4, stream=True, **greedy))
    assert streamed[2].output_index == 1 and streamed[-1].response.output[1].id == streamed[2].item.id
    with pytest.raises(openai.BadRequestError, match="tool type 'web_search' is not served"):
        client.responses.create(input="Hi", tools=[{"type": "web_search"}], **greedy)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(input="Hi", previous_response_id="resp-none", **greedy)


def test_the_oldest_turn_goes_and_system_messages_stay_in_place():
    """``without_oldest_turn``: the first turn (to the next user message) goes; a system message mid-conversation
    keeps its place; nothing is left to drop once one user turn remains."""
    from engine.entrypoints.openai.protocol import ChatMessage
    from engine.entrypoints.openai.responses import without_oldest_turn

    chat = [ChatMessage(role=role, content=text) for role, text in (
        ("system", "s0"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"),
        ("system", "now French"), ("user", "u3"))]
    shorter = without_oldest_turn(chat)
    assert [m.content for m in shorter] == ["s0", "u2", "a2", "now French", "u3"]
    assert [m.content for m in without_oldest_turn(shorter)] == ["s0", "now French", "u3"]
    assert without_oldest_turn(without_oldest_turn(shorter)) is None


def test_responses_truncation_auto_drops_the_oldest_turns(served):
    """``truncation: "auto"``: a conversation longer than the context loses its oldest turns (the instructions
    kept) until it fits with ``max_output_tokens``, as OpenAI's; the reply is the chat completion's of what is left.
    ``"disabled"`` (the default) is the context's 400, as is an input whose newest turn alone is too long."""
    client = served.client()
    greedy = dict(model=served.model, temperature=0, max_output_tokens=8)
    long_turn = "Tell me about the weather. " * 60  # ~360 tokens: two do not fit in 512
    conversation = [{"role": "user", "content": long_turn}, {"role": "assistant", "content": "It is sunny."},
                    {"role": "user", "content": long_turn}, {"role": "assistant", "content": "Still sunny."},
                    {"role": "user", "content": "What is the capital of France?"}]
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.responses.create(instructions="Be brief.", input=conversation, **greedy)
    cut = client.responses.create(instructions="Be brief.", input=conversation, truncation="auto", **greedy)
    kept = [{"role": "system", "content": "Be brief."}, *conversation[2:]]  # the first user turn and its reply gone
    want = client.chat.completions.create(model=served.model, messages=kept, temperature=0, max_completion_tokens=8)
    assert cut.truncation == "auto" and cut.output_text == want.choices[0].message.content
    assert cut.usage.input_tokens == want.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.responses.create(input=[{"role": "user", "content": long_turn * 2}], truncation="auto", **greedy)


def test_responses_api_function_tools(served):
    """Function tools on ``/v1/responses``: a named ``tool_choice`` makes the reply a ``function_call`` item (its
    arguments the tool's JSON), streamed as its item and arguments events; the call and its
    ``function_call_output`` given back in ``input`` reach the chat template as the chat endpoint's tool turns, so
    the next reply equals the chat completion of those turns."""
    client = served.client()
    weather = {"type": "function", "name": "get_weather", "description": "The weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                              "required": ["city"], "additionalProperties": False}}
    question = {"role": "user", "content": "What is the weather in Paris?"}
    greedy = dict(model=served.model, temperature=0, max_output_tokens=40)
    called = client.responses.create(input=[question], tools=[weather],
                                     tool_choice={"type": "function", "name": "get_weather"}, **greedy)
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    events = list(client.responses.create(input=[question], tools=[weather], stream=True,
                                          tool_choice={"type": "function", "name": "get_weather"}, **greedy))
    types = [e.type for e in events]
    assert types.index("response.output_item.added") < types.index("response.function_call_arguments.done")
    assert events[-1].response.output[-1].arguments == call.arguments
    cut = client.responses.create(input=[question], tools=[weather], tool_choice={"type": "function",
                                                                                  "name": "get_weather"},
                                  model=served.model, temperature=0, max_output_tokens=3)
    assert cut.status == "incomplete" and all(item.status == "incomplete" for item in cut.output)
    answer = client.responses.create(
        input=[question, {"type": "function_call", "call_id": call.call_id, "name": call.name,
                          "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"}],
        tools=[weather], tool_choice="none", **greedy)
    chat = client.chat.completions.create(
        model=served.model, temperature=0, max_completion_tokens=40, tool_choice="none",
        tools=[{"type": "function", "function": {k: v for k, v in weather.items() if k != "type"}}],
        messages=[question, {"role": "assistant", "content": None, "tool_calls": [
                      {"id": call.call_id, "type": "function",
                       "function": {"name": call.name, "arguments": call.arguments}}]},
                  {"role": "tool", "tool_call_id": call.call_id, "content": "Sunny, 21 C"}])
    assert answer.output_text == chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice"):  # "auto" needs a call parser
        client.responses.create(input=[question], tools=[weather], **greedy)


def test_a_repeated_system_prompt_is_served_from_the_prefix_cache(served):
    """The second conversation with the same long system prompt reports its cached prompt tokens in usage (as
    OpenAI's ``prompt_tokens_details.cached_tokens``) and in /metrics, and answers as the first did."""
    system = {"role": "system", "content": "You are a terse assistant for a travel agency. " * 6}
    messages = [system, {"role": "user", "content": "Name one city in Italy."}]
    client = served.client()
    hits_before = served.metrics()["vllm:prefix_cache_hits_total"]
    first, second = (client.chat.completions.create(model=served.model, messages=messages, temperature=0,
                                                    max_completion_tokens=8) for _ in range(2))
    assert second.choices[0].message.content == first.choices[0].message.content
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 64 <= cached < second.usage.prompt_tokens
    assert served.metrics()["vllm:prefix_cache_hits_total"] - hits_before >= cached
    stream = client.chat.completions.create(model=served.model, messages=messages, temperature=0,
                                            max_completion_tokens=8, stream=True,
                                            stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert usage[-1].prompt_tokens_details.cached_tokens == cached


def test_streaming_equals_non_streamed(served, reference):
    client = served.client()
    chunks = list(client.completions.create(model=served.model, prompt=PROMPTS[1], stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference[1]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8

    # The prompt in the prefix cache first, so both requests find the same cached tokens whatever ran before
    # (alone, the first computed its prompt and the second found 32 of its tokens cached)
    client.chat.completions.create(model=served.model, messages=CHAT, temperature=0, max_tokens=1)
    chat = client.chat.completions.create(model=served.model, messages=CHAT, temperature=0, max_tokens=12)
    stream = list(client.chat.completions.create(model=served.model, messages=CHAT, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    assert stream[-1].usage.model_dump() == chat.usage.model_dump()


def test_streamed_choices_come_one_a_chunk(served):
    """``n`` > 1 streamed: each chunk carries one choice, as vLLM's and OpenAI's (a client reading ``choices[0]``
    sees every token), and each index's text is the non-streamed one's (seeded)."""
    client = served.client()
    sampled = dict(model=served.model, n=2, max_tokens=6, temperature=1.0, seed=11)
    whole = client.completions.create(prompt=PROMPTS[0], **sampled)
    chunks = list(client.completions.create(prompt=PROMPTS[0], stream=True, **sampled))
    assert all(len(c.choices) == 1 for c in chunks)
    assert ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(2)] == \
        [choice.text for choice in whole.choices]
    chat = list(client.chat.completions.create(messages=CHAT, stream=True, **sampled))
    assert all(len(c.choices) == 1 for c in chat) and {c.choices[0].index for c in chat} == {0, 1}


def test_continuous_usage_stats_count_each_chunks_tokens(served):
    """vLLM's stream_options.continuous_usage_stats: every chunk's usage counts the tokens so far, on both
    endpoints; the last, usage-only chunk has the totals."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    for chat, chunks in ((False, served.client().completions.create(model=served.model, prompt=PROMPTS[0],
                                                                    stream=True, stream_options=options, **GREEDY)),
                         (True, served.client().chat.completions.create(model=served.model, messages=CHAT,
                                                                        stream=True, stream_options=options,
                                                                        **GREEDY))):
        counts = [c.usage.completion_tokens for c in chunks]
        assert counts == sorted(counts) and counts[-1] == 8 and len(set(counts)) > 2, counts
        assert not chat or counts[0] == 0  # the role's chunk, before any token (vLLM's count)


def test_raw_sse_format(served):
    with httpx.stream("POST", f"{served.url}/v1/completions", timeout=60,
                      json={"prompt": PROMPTS[2], "max_tokens": 3, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = body.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: {") for e in events[:-2])


def test_n2_and_prompt_list(served):
    out = served.client().completions.create(model=served.model, prompt=PROMPTS[:2], n=2, temperature=1.0,
                                             seed=11, max_tokens=5, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 4 * 5
    tokenizer = served.async_llm.tokenizer
    assert out.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in PROMPTS[:2])
    chat = served.client().chat.completions.create(model=served.model, messages=CHAT, n=2, temperature=1.0,
                                                   seed=3, max_tokens=6)
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_logit_bias_allowed_token_ids_and_bad_words(served, reference):
    """OpenAI's ``logit_bias`` (string keys, a bias past 100 clamped to it) and vLLM's ``allowed_token_ids`` and
    ``bad_words`` reach the sampler, on both endpoints."""
    client = served.client()
    token = served.async_llm.tokenizer.encode(" blue", add_special_tokens=False)[0]
    out = client.completions.create(model=served.model, prompt=PROMPTS[0], temperature=0, max_tokens=4,
                                    logit_bias={str(token): 1000})
    assert out.choices[0].text == " blue" * 4
    chat = client.chat.completions.create(model=served.model, messages=CHAT, temperature=0, max_tokens=3,
                                          extra_body={"allowed_token_ids": [token]})
    assert chat.choices[0].message.content == " blue" * 3
    first_word = reference[0].split()[0]
    out = client.completions.create(model=served.model, prompt=PROMPTS[0], **{
        **GREEDY, "extra_body": {**GREEDY["extra_body"], "bad_words": [first_word]}})
    assert first_word not in out.choices[0].text.split()[:1] and out.choices[0].text != reference[0]


def test_structured_outputs_through_response_format_and_vllms_fields(served):
    """OpenAI's response_format (json_schema, json_object; streamed too) and vLLM's structured_outputs and
    guided_* fields constrain what comes back."""
    client = served.client()
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    chat = client.chat.completions.create(
        model=served.model, messages=CHAT, temperature=0, max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}})
    assert set(json.loads(chat.choices[0].message.content)) == {"city", "country"}
    chunks = client.chat.completions.create(model=served.model, messages=CHAT, temperature=0, max_tokens=60,
                                            stream=True, response_format={"type": "json_schema", "json_schema": {
                                                "name": "place", "schema": schema}})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    out = client.completions.create(model=served.model, prompt="Is water wet? Answer:", temperature=0, max_tokens=5,
                                    extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert out.choices[0].text in ("yes", "no") and out.choices[0].finish_reason == "stop"
    out = client.completions.create(model=served.model, prompt="A phone number:", temperature=0, max_tokens=12,
                                    extra_body={"guided_regex": "[0-9]{3}-[0-9]{4}"})
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", out.choices[0].text)
    out = client.completions.create(model=served.model, prompt="A JSON object:", temperature=0, max_tokens=40,
                                    extra_body={"response_format": {"type": "json_object"}})
    assert out.choices[0].text.startswith("{")
    # vLLM's JSON options: no whitespace between tokens (structured_outputs' field, or the older guided_ one)
    for extra in ({"structured_outputs": {"json": schema, "disable_any_whitespace": True}},
                  {"guided_json": schema, "guided_whitespace_pattern": "", "guided_decoding_backend": "xgrammar"}):
        out = client.completions.create(model=served.model, prompt="A place as JSON:", temperature=0, max_tokens=40,
                                        extra_body=extra)
        text = out.choices[0].text
        compact = json.dumps(json.loads(text), ensure_ascii=False, separators=(",", ":"))
        assert set(json.loads(text)) == {"city", "country"} and text == compact, text


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}


def test_tool_calls_by_name_and_required_streamed_or_not_and_the_next_turn(served):
    """A named function or "required" makes the reply tool calls (their arguments JSON of the function's schema),
    whole in the stream's last chunk too; the conversation goes on with the call and the tool's answer in it."""
    client = served.client()
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    kwargs = dict(model=served.model, messages=messages, tools=[WEATHER, CLOCK], temperature=0, max_tokens=60)
    named = client.chat.completions.create(**kwargs, tool_choice={"type": "function",
                                                                  "function": {"name": "get_weather"}})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
    assert named.choices[0].finish_reason == "stop" and named.choices[0].message.content is None
    required = client.chat.completions.create(**kwargs, tool_choice="required", parallel_tool_calls=False)
    (other,) = required.choices[0].message.tool_calls
    assert other.function.name in ("get_weather", "get_time") and isinstance(json.loads(other.function.arguments),
                                                                             dict)
    assert required.choices[0].finish_reason == "tool_calls"
    chunks = list(client.chat.completions.create(**kwargs, stream=True, tool_choice={
        "type": "function", "function": {"name": "get_weather"}}))
    streamed = [c for chunk in chunks for choice in chunk.choices for c in (choice.delta.tool_calls or [])]
    assert [(c.index, c.function.name, c.function.arguments) for c in streamed] == [
        (0, "get_weather", call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    turn = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                       {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    reply = client.chat.completions.create(model=served.model, messages=turn, tools=[WEATHER], tool_choice="none",
                                           temperature=0, max_tokens=20)
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_streamed_tool_chat_carries_its_logprobs(served, tool_choice):
    """Under tools (the parser's "auto", or a forced call) a stream's chunks carry the tokens' logprobs as they
    come, the same entries as the whole reply's (they were dropped)."""
    client = served.client(served.tools_url)
    kwargs = dict(model=served.model, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
                  tool_choice=tool_choice, temperature=0, max_tokens=12, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [entry for chunk in client.chat.completions.create(**kwargs, stream=True) for choice in chunk.choices
                if choice.logprobs for entry in choice.logprobs.content]
    assert whole and [e.token for e in streamed] == [e.token for e in whole]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in whole], abs=1e-3)  # other steps


def test_tokenize_renders_the_tools_as_the_chat_does(served):
    """/tokenize with ``messages`` and ``tools`` counts the prompt a chat completion with those tools runs (the
    tools were dropped): a template that renders them, as the request's own (trusted on this server)."""
    template = ("{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}"
                "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:")
    body = {"messages": CHAT, "chat_template": template}
    plain = httpx.post(f"{served.tools_url}/tokenize", json=body).json()["count"]
    with_tools = httpx.post(f"{served.tools_url}/tokenize", json={**body, "tools": [WEATHER]}).json()["count"]
    chat = served.client(served.tools_url).chat.completions.create(
        model=served.model, messages=CHAT, tools=[WEATHER], tool_choice="none", max_tokens=1,
        extra_body={"chat_template": template})
    assert with_tools == chat.usage.prompt_tokens > plain


def test_auto_tool_choice_reads_the_models_own_calls(served):
    """With a tool-call parser (hermes) "auto" (the default with tools) lets the model answer in text or call: its
    calls come back as tool_calls, the text before them as content, streamed as it comes. The model is steered
    into hermes' syntax by a regex here (the small default model does not call tools by itself)."""
    client = served.client(served.tools_url)
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    steer = {"guided_regex": "Checking the weather\\." + re.escape(call)}
    kwargs = dict(model=served.model, messages=[{"role": "user", "content": "Weather in Paris?"}],
                  tools=[WEATHER, CLOCK], temperature=0, max_tokens=60, extra_body=steer)
    out = client.chat.completions.create(**kwargs)
    message = out.choices[0].message
    assert message.content == "Checking the weather." and out.choices[0].finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [choice.delta for chunk in chunks for choice in chunk.choices]
    assert "".join(d.content or "" for d in deltas) == "Checking the weather."
    assert sum(1 for d in deltas if d.content) > 1  # the text streamed before the call's end, not all at the end
    (streamed,) = [c for d in deltas for c in (d.tool_calls or [])]
    assert streamed.function.arguments == message.tool_calls[0].function.arguments
    plain = client.chat.completions.create(model=served.model, messages=CHAT, tools=[WEATHER], temperature=0,
                                           max_tokens=12)
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls
    # parallel_tool_calls=False keeps the first of two calls, streamed or not (vLLM's)
    second = '<tool_call>{"name": "get_time", "arguments": {"city": "Rome"}}</tool_call>'
    kwargs["extra_body"] = {"guided_regex": re.escape(call + second)}
    both = client.chat.completions.create(**kwargs)
    assert [c.function.name for c in both.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    for stream in (False, True):
        out = client.chat.completions.create(**kwargs, parallel_tool_calls=False, stream=stream)
        calls = (out.choices[0].message.tool_calls if not stream else
                 [c for chunk in out for choice in chunk.choices for c in (choice.delta.tool_calls or [])])
        assert [c.function.name for c in calls] == ["get_weather"]


def test_reasoning_content_apart_from_the_answer_and_its_tool_calls(served):
    """With a reasoning parser (qwen3) the thinking comes back as reasoning_content, streamed as it comes, and the
    answer (or the tool calls after the thinking) as content. The model is steered into the syntax by a regex."""
    client = served.client(served.tools_url)
    steer = {"guided_regex": "<think>The capital of France is Paris\\.</think>Paris\\."}
    kwargs = dict(model=served.model, messages=CHAT, temperature=0, max_tokens=40, extra_body=steer)
    message = client.chat.completions.create(**kwargs).choices[0].message
    assert (message.reasoning_content, message.content) == ("The capital of France is Paris.", "Paris.")
    deltas = [c.choices[0].delta for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    thinking = [d.reasoning_content for d in deltas if getattr(d, "reasoning_content", None)]
    assert "".join(thinking) == "The capital of France is Paris." and len(thinking) > 1
    assert "".join(d.content or "" for d in deltas) == "Paris."
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    out = client.chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
        temperature=0, max_tokens=60,
        extra_body={"guided_regex": "<think>I need the weather\\.</think>" + re.escape(call)})
    assert out.choices[0].message.reasoning_content == "I need the weather."
    assert [c.function.name for c in out.choices[0].message.tool_calls] == ["get_weather"]
    plain = served.client().chat.completions.create(**kwargs).choices[0].message  # no parser: all content
    assert plain.content.startswith("<think>") and getattr(plain, "reasoning_content", None) is None


def test_harmony_reasoning_of_gpt_oss_apart_from_its_answer(served):
    """``--reasoning-parser openai_gptoss``: a harmony reply's analysis channel comes back as reasoning_content, its
    final channel as content, whole and streamed, and with ``--tool-call-parser openai`` its messages to a function
    as tool calls (this model is steered into the syntax by a regex; gpt-oss's markers are special tokens, which the
    parser has the text keep)."""
    app = build_app(served.async_llm, [served.model], metrics=ServingMetrics(served.model, served.async_llm.stats),
                    reasoning_parser="openai_gptoss", tool_parser="openai")
    server, thread, url = _serve_in_thread(app)
    try:
        reply = ("<|channel|>analysis<|message|>The capital of France is Paris.<|end|><|start|>assistant"
                 "<|channel|>final<|message|>Paris.")
        kwargs = dict(model=served.model, messages=CHAT, temperature=0, max_tokens=60,
                      extra_body={"guided_regex": re.escape(reply)})
        message = served.client(url).chat.completions.create(**kwargs).choices[0].message
        assert (message.reasoning_content, message.content) == ("The capital of France is Paris.", "Paris.")
        deltas = [c.choices[0].delta for c in served.client(url).chat.completions.create(**kwargs, stream=True)
                  if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
        assert "".join(d.content or "" for d in deltas) == "Paris."
        # vLLM's openai tool parser: a message to a function is a tool call
        call = ("<|channel|>analysis<|message|>I need the weather.<|end|><|start|>assistant<|channel|>commentary "
                'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>')
        out = served.client(url).chat.completions.create(
            model=served.model, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
            temperature=0, max_tokens=80, extra_body={"guided_regex": re.escape(call)})
        assert out.choices[0].message.reasoning_content == "I need the weather."
        assert [(c.function.name, json.loads(c.function.arguments)) for c in out.choices[0].message.tool_calls] == [
            ("get_weather", {"city": "Paris"})]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"tools": [WEATHER]}, '"auto" needs a parser'),  # OpenAI's default with tools
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "both constrain"),
    ({"tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "objectz"}}}],
      "tool_choice": "required"}, "tools: the json is invalid"),  # the schema's fault, not the choice's
])
def test_tool_choices_this_server_cannot_honour(served, kwargs, fragment):
    with pytest.raises(openai.BadRequestError) as info:
        served.client().chat.completions.create(model=served.model, messages=CHAT, max_tokens=4, **kwargs)
    assert info.value.param in ("tool_choice", "response_format", "tools") and fragment in info.value.message


def test_truncate_prompt_tokens_keeps_the_prompts_end(served, reference):
    """vLLM's truncate_prompt_tokens: a prompt longer than the context keeps its last k tokens and is served."""
    tokenizer = served.async_llm.tokenizer
    ids = tokenizer.encode(PROMPTS[0])
    filler = tokenizer.encode(" word") * MAX_MODEL_LEN
    out = served.client().completions.create(model=served.model, prompt=filler + ids, **{
        **GREEDY, "extra_body": {**GREEDY["extra_body"], "truncate_prompt_tokens": len(ids)}})
    assert out.usage.prompt_tokens == len(ids) and out.choices[0].text == reference[0]


def test_prompt_logprobs_on_both_endpoints(served):
    """vLLM's prompt_logprobs field: each prompt token's logprob with the k most likely tokens there (None for the
    first), on a completion's choices and a chat response; refused in a stream, as vLLM does."""
    client = served.client()
    ids = served.async_llm.tokenizer.encode(PROMPTS[0])
    out = client.completions.create(model=served.model, prompt=ids, max_tokens=1, temperature=0,
                                    extra_body={"prompt_logprobs": 2})
    entries = out.choices[0].model_extra["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    for token, entry in zip(ids[1:], entries[1:]):
        assert str(token) in entry and 1 <= len(entry) <= 3 and all(v["logprob"] <= 0 for v in entry.values())
    chat = client.chat.completions.create(model=served.model, messages=CHAT, max_tokens=1, temperature=0,
                                          extra_body={"prompt_logprobs": 0})
    assert chat.model_extra["prompt_logprobs"][0] is None and len(chat.model_extra["prompt_logprobs"][1]) == 1
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=served.model, prompt="hi", stream=True, extra_body={"prompt_logprobs": 1})
    assert info.value.param == "prompt_logprobs"


def test_seed_reproduces(served):
    def sample(seed: int) -> str:
        return served.client().completions.create(model=served.model, prompt=PROMPTS[3], temperature=1.0, seed=seed,
                                                  max_tokens=8, extra_body={"ignore_eos": True}).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2))


def test_stop_string_never_sent(served, reference):
    text = reference[1]
    stop = text[len(text) // 2: len(text) // 2 + 4]
    assert len(stop) == 4 and stop in text
    expected = text[: text.index(stop)]
    client = served.client()
    out = client.completions.create(model=served.model, prompt=PROMPTS[1], stop=[stop], **GREEDY)
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    deltas = [c.choices[0].text for c in client.completions.create(model=served.model, prompt=PROMPTS[1],
                                                                    stop=stop, stream=True, **GREEDY)]
    assert "".join(deltas) == expected
    sent = ""
    for delta in deltas:  # no prefix of the stream ever contained the stop string
        sent += delta
        assert stop not in sent


def test_logprobs_both_formats(served, reference):
    client = served.client()
    out = client.completions.create(model=served.model, prompt=PROMPTS[0], logprobs=2, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == out.choices[0].text == reference[0]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and len(top) == 2 and top[token] == max(top.values())  # greedy: the top token
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=served.model, prompt=PROMPTS[0], logprobs=2, stream=True, **GREEDY)]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset

    chat = client.chat.completions.create(model=served.model, messages=CHAT, temperature=0, max_tokens=6,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token
        assert [t.logprob for t in c.top_logprobs] == sorted((t.logprob for t in c.top_logprobs), reverse=True)
        assert bytes(c.bytes).decode() == c.token


def test_return_tokens_as_token_ids(served):
    """vLLM's ``return_tokens_as_token_ids`` (a request's field, else --return-tokens-as-token-ids): logprobs name
    their tokens ``token_id:<id>``, the sampled ones those of the reply, on both endpoints, streamed too."""
    client = served.client()
    tokenizer = served.async_llm.tokenizer
    as_ids = dict(GREEDY, extra_body={**GREEDY["extra_body"], "return_tokens_as_token_ids": True})
    out = client.completions.create(model=served.model, prompt=PROMPTS[0], logprobs=2, **as_ids)
    tokens = out.choices[0].logprobs.tokens
    assert tokenizer.decode([int(t.removeprefix("token_id:")) for t in tokens]) == out.choices[0].text
    assert all(t.startswith("token_id:") for top in out.choices[0].logprobs.top_logprobs for t in top)
    streamed = [t for c in client.completions.create(model=served.model, prompt=PROMPTS[0], logprobs=2, stream=True,
                                                     **as_ids) for t in c.choices[0].logprobs.tokens]
    assert streamed == tokens
    chat = client.chat.completions.create(model=served.model, messages=CHAT, temperature=0, max_tokens=6,
                                          logprobs=True, top_logprobs=2,
                                          extra_body={"return_tokens_as_token_ids": True})
    content = chat.choices[0].logprobs.content
    reply = chat.choices[0].message.content
    assert tokenizer.decode([int(c.token.removeprefix("token_id:")) for c in content]) == reply
    assert all(bytes(c.bytes).decode() == c.token and c.top_logprobs[0].token == c.token for c in content)
    # the server's default applies where a request says nothing
    app = build_app(served.async_llm, [served.model], metrics=ServingMetrics(served.model, served.async_llm.stats),
                    return_tokens_as_token_ids=True)
    server, thread, url = _serve_in_thread(app)
    try:
        by_server = served.client(url).completions.create(model=served.model, prompt=PROMPTS[0], logprobs=1, **GREEDY)
        assert by_server.choices[0].logprobs.tokens == tokens
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_logprobs_of_a_structured_output_are_numbers(served):
    """A grammar forbids most tokens (their logprob -inf, which JSON cannot carry): such top logprobs come as
    -9999.0, as vLLM's server clamps them, streamed or not (a 500 and nulls before)."""
    client = served.client()
    choice = {"guided_choice": ["yes", "no"]}
    chat = [client.chat.completions.create(model=served.model, messages=CHAT, temperature=0, logprobs=True,
                                           top_logprobs=3, extra_body=choice)]
    chat += [c for c in client.chat.completions.create(model=served.model, messages=CHAT, temperature=0, stream=True,
                                                       logprobs=True, top_logprobs=3, extra_body=choice)
             if c.choices and c.choices[0].logprobs]
    tops = [t.logprob for c in chat for entry in c.choices[0].logprobs.content for t in entry.top_logprobs]
    completion = client.completions.create(model=served.model, prompt="Answer:", temperature=0, logprobs=3,
                                           extra_body=choice)
    tops += [v for top in completion.choices[0].logprobs.top_logprobs for v in top.values()]
    assert tops and all(isinstance(v, float) and -9999.0 <= v <= 0 for v in tops) and -9999.0 in tops


def test_beam_search_on_both_endpoints(served, reference):
    """vLLM's ``use_beam_search``: ``n`` beams best first, each prompt its own search (the engine's rounds of
    one-token requests), streamed as one output when the search ends. One beam is greedy decoding."""
    client = served.client()
    beam = {"use_beam_search": True}
    greedy = dict(temperature=0, max_tokens=8, extra_body={**beam, "ignore_eos": True})
    one = client.completions.create(model=served.model, prompt=PROMPTS[:2], n=1, **greedy)
    assert [c.text for c in one.choices] == reference[:2]
    three = client.completions.create(model=served.model, prompt=PROMPTS[0], n=3, **greedy)
    assert [c.index for c in three.choices] == [0, 1, 2] and len({c.text for c in three.choices}) == 3
    assert three.usage.completion_tokens == 3 * 8  # ignore_eos: every beam runs to max_tokens
    chat = client.chat.completions.create(model=served.model, messages=CHAT, n=2, max_tokens=6, temperature=0,
                                          extra_body={**beam, "length_penalty": 0.5})
    assert len(chat.choices) == 2 and all(c.message.content for c in chat.choices)
    streamed = [c for c in client.completions.create(model=served.model, prompt=PROMPTS[0], n=3, stream=True,
                                                      **greedy)]  # the search's one output, as it ends (vLLM's)
    assert {ch.index: ch.text for chunk in streamed for ch in chunk.choices if ch.text} == {
        c.index: c.text for c in three.choices}
    chat_stream = list(client.chat.completions.create(model=served.model, messages=CHAT, n=2, max_tokens=6,
                                                      temperature=0, stream=True, extra_body=beam))
    assert {ch.index for chunk in chat_stream for ch in chunk.choices if ch.finish_reason} == {0, 1}
    with pytest.raises(openai.BadRequestError, match="beam width"):
        client.completions.create(model=served.model, prompt="hi", n=11, extra_body=beam)


def test_echo_with_logprobs_scores_the_prompt(served, reference):
    """What evaluation harnesses send to score a text (``echo`` with ``logprobs``): the prompt's tokens with their
    logprobs (the first has none), then the completion's; the same streamed; the greedy completion unchanged."""
    client = served.client()
    tokenizer = served.async_llm.tokenizer
    num_prompt = len(tokenizer.encode(PROMPTS[0]))
    out = client.completions.create(model=served.model, prompt=PROMPTS[0], echo=True, logprobs=1, **GREEDY)
    (choice,) = out.choices
    lp = choice.logprobs
    assert choice.text == PROMPTS[0] + reference[0]
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == num_prompt + 8
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(num_prompt + 8)]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])
    # " Paris" after "The capital of France is": the completion's first token is the prompt's most likely next.
    plain = client.completions.create(model=served.model, prompt=PROMPTS[0], logprobs=1, **GREEDY).choices[0]
    assert lp.token_logprobs[num_prompt:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-4)
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=served.model, prompt=PROMPTS[0], echo=True, logprobs=1, stream=True, **GREEDY) if c.choices]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [x for s in streamed for x in s.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-4)
    # Without generation (max_tokens 0, as lm-eval's loglikelihood asks): the prompt's part alone, streamed or not.
    only = client.completions.create(model=served.model, prompt=PROMPTS[0], echo=True, logprobs=1, max_tokens=0,
                                     temperature=0)
    (choice,) = only.choices
    assert choice.text == PROMPTS[0] and choice.finish_reason == "length"
    assert choice.logprobs.tokens == lp.tokens[:num_prompt]
    assert choice.logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:num_prompt], abs=1e-4)
    assert only.usage.prompt_tokens == num_prompt and only.usage.completion_tokens == 0
    chunks = [c.choices[0] for c in client.completions.create(
        model=served.model, prompt=PROMPTS[0], echo=True, max_tokens=0, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == PROMPTS[0] and chunks[-1].finish_reason == "length"
    _error(httpx.post(f"{served.url}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 0}), 400)


def test_32_concurrent_streams_batched_and_queued(served, reference):
    """32 streams against max_num_seqs=16: 16 run batched, the rest wait in the engine queue, all finish right."""
    peak = {"vllm:num_requests_waiting": 0.0, "vllm:num_requests_running": 0.0}

    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        stream = await client.completions.create(model=served.model, prompt=PROMPTS[i % 4], stream=True, **GREEDY)
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    async def watch_metrics(done: asyncio.Event) -> None:
        while not done.is_set():
            metrics = await asyncio.to_thread(served.metrics)
            for name in peak:
                peak[name] = max(peak[name], metrics[name])
            await asyncio.sleep(0.2)

    async def run_all() -> list[str]:
        done = asyncio.Event()
        watcher = asyncio.create_task(watch_metrics(done))
        async with served.async_client() as client:
            texts = await asyncio.gather(*(one(client, i) for i in range(32)))
        done.set()
        await watcher
        return texts

    texts = asyncio.run(run_all())
    assert texts == [reference[i % 4] for i in range(32)]
    assert served.async_llm.stats()["max_batch_seqs"] == MAX_NUM_SEQS  # earlier tests ran at most 4 at once
    assert served.metrics()["vllm:max_batch_seqs"] == MAX_NUM_SEQS
    assert peak["vllm:num_requests_running"] > 1 and peak["vllm:num_requests_waiting"] > 0, peak


def test_a_caller_leaving_during_the_pipe_write_still_aborts_its_requests():
    """A probe found requests left running to max_tokens with their clients gone: a caller cancelled while the
    worker thread wrote its requests to the engine process's pipe (waiting for the pipe's lock, say) never got a
    stream, so nothing aborted them. Here the write takes 0.3 s and the caller leaves after 0.1 s: the requests are
    aborted once the engine has them."""
    class SlowPipe:  # the part of EngineProcess that add_requests and aborts use
        def __init__(self):
            self.added, self.aborted = [], []

        def add_requests_future(self, items):
            time.sleep(0.3)
            self.added += [item.request_id for item in items]
            done = concurrent.futures.Future()
            done.set_result(None)
            return done

        def abort_soon(self, request_id):
            self.aborted.append(request_id)

    pipe = SlowPipe()
    async_llm = AsyncLLM(pipe)

    async def leave_early() -> None:
        adding = asyncio.ensure_future(async_llm.add_requests([("r1", [1, 2, 3], None), ("r2", [4], None)]))
        await asyncio.sleep(0.1)
        adding.cancel()
        with pytest.raises(asyncio.CancelledError):
            await adding
        for _ in range(50):
            await asyncio.sleep(0.05)
            if pipe.aborted:
                break

    asyncio.run(leave_early())
    assert pipe.added == ["r1", "r2"] and sorted(pipe.aborted) == ["r1", "r2"]


def test_disconnect_frees_blocks_others_continue(served, reference):
    before = served.metrics()

    async def abandon_stream() -> int:
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"prompt": PROMPTS[2], "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
            async with client.stream("POST", f"{served.url}/v1/completions", json=body) as r:
                received = 0
                async for line in r.aiter_lines():
                    received += line.startswith("data: {")
                    if received == 3:
                        break  # leaving the block closes the connection mid-stream
        return received

    async def abandon_blocking_request() -> None:
        body = {"prompt": PROMPTS[3], "max_tokens": 400, "temperature": 0, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            async with httpx.AsyncClient(timeout=4) as client:
                await client.post(f"{served.url}/v1/completions", json=body)

    async def finish_stream() -> str:
        await asyncio.sleep(0.5)
        async with served.async_client() as client:
            stream = await client.completions.create(model=served.model, prompt=PROMPTS[0], stream=True, **GREEDY)
            return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    async def run() -> tuple:
        return await asyncio.gather(abandon_stream(), abandon_blocking_request(), finish_stream())

    received, _, text = asyncio.run(run())
    assert received == 3 and text == reference[0]
    aborted = 'vllm:request_success_total{finished_reason="abort"}'

    def settled(m: dict) -> bool:  # both abandoned requests aborted, nothing left running
        return (m.get(aborted, 0) - before.get(aborted, 0) == 2 and m["vllm:kv_cache_used_blocks"] == 0
                and m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0)

    deadline = time.monotonic() + 60
    while not settled(now := served.metrics()):
        assert time.monotonic() < deadline, f"abandoned requests not aborted / KV blocks not freed: {now}"
        time.sleep(0.5)
    assert now["vllm:kv_cache_usage_perc"] == 0
    assert now["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] < 400  # both were cut short


def test_async_llm_generate_and_leaving_early(served, reference):
    """The ``AsyncLLM`` front itself: cumulative outputs end with ``finished``; breaking out aborts."""
    from engine import SamplingParams

    llm = served.async_llm
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    async def run() -> tuple[list, int]:
        outputs = [out async for out in llm.generate(PROMPTS[0], params, request_id="direct-1")]
        seen = 0
        long = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
        async for out in llm.generate(PROMPTS[1], long, request_id="direct-2"):
            seen = len(out.outputs[0].token_ids)
            if seen >= 2:
                break
        return outputs, seen

    outputs, seen = asyncio.run(run())
    assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    assert outputs[-1].outputs[0].text == reference[0]
    lengths = [len(o.outputs[0].token_ids) for o in outputs]
    assert lengths == sorted(lengths) and lengths[-1] == 8
    assert seen >= 2
    deadline = time.monotonic() + 60
    while (stats := llm.stats())["num_used_blocks"] or stats["num_running"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
    with pytest.raises(ValueError, match="max_model_len"):  # refused at once, in the caller
        asyncio.run(llm.add_request("direct-3", [1] * MAX_MODEL_LEN))


def test_async_llm_output_kinds(served, reference):
    """vLLM's ``SamplingParams.output_kind`` on ``AsyncLLM.generate``: deltas that join to the cumulative output
    (tokens, text, logprobs; the prompt on the first only), or the final output alone."""
    from engine import RequestOutputKind, SamplingParams

    def params(kind):
        return SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1, output_kind=kind)

    async def run(kind, request_id):
        return [out async for out in served.async_llm.generate(PROMPTS[0], params(kind), request_id=request_id)]

    (final,) = asyncio.run(run(RequestOutputKind.FINAL_ONLY, "kind-final"))
    deltas = asyncio.run(run(RequestOutputKind.DELTA, "kind-delta"))
    assert final.finished and final.outputs[0].text == reference[0]
    assert deltas[-1].finished and len(deltas) > 1 and deltas[0].prompt_token_ids == final.prompt_token_ids
    assert all(d.prompt_token_ids is None for d in deltas[1:])
    assert "".join(d.outputs[0].text for d in deltas) == final.outputs[0].text
    assert [t for d in deltas for t in d.outputs[0].token_ids] == final.outputs[0].token_ids
    assert [sorted(e) for d in deltas for e in d.outputs[0].logprobs] == [sorted(e) for e in final.outputs[0].logprobs]
    with pytest.raises(ValueError, match="output_kind must be a RequestOutputKind"):
        SamplingParams(output_kind="delta")


def test_a_dead_engine_answers_503_on_health_and_stops_the_server(served, monkeypatch):
    """vLLM's: /health reads whether the engine runs at once (a busy engine answers 200 without waiting for a step),
    503 once it has died; the watchdog then stops the server (whose process exits with status 1)."""
    from engine.entrypoints.openai.api_server import watch_engine

    monkeypatch.setattr(served.async_llm, "is_alive", lambda: False)
    assert httpx.get(f"{served.url}/health").status_code == 503
    monkeypatch.undo()
    assert httpx.get(f"{served.url}/health").status_code == 200

    class FakeServer:
        should_exit = False

    alive, server = [True], FakeServer()
    watch_engine(types.SimpleNamespace(is_alive=lambda: alive[0]), server, interval_s=0.01)
    time.sleep(0.1)
    assert not server.should_exit
    alive[0] = False
    deadline = time.monotonic() + 5
    while not server.should_exit:
        assert time.monotonic() < deadline, "the watchdog did not stop the server"
        time.sleep(0.01)


def test_many_clients_leaving_at_once_are_dropped_within_a_step_or_two(served):
    """Aborts wait for nothing: 24 streams cancelled together are all dropped before the engine's next steps (one
    blocking round trip each through the worker threads took a step per handful of them)."""
    body = dict(model=served.model, prompt=PROMPTS[1], max_tokens=400, temperature=0, stream=True,
                extra_body={"ignore_eos": True})

    async def run() -> int:
        started = asyncio.Event()
        count = [0]

        async def stream() -> None:
            async with served.async_client() as client:
                async for _ in await client.completions.create(**body):
                    count[0] += 1
                    if count[0] >= 24:
                        started.set()

        tasks = [asyncio.create_task(stream()) for _ in range(24)]
        await asyncio.wait_for(started.wait(), 120)
        steps = served.async_llm.stats()["steps"]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return steps

    steps_at_cancel = asyncio.run(run())
    deadline = time.monotonic() + 60
    while (m := served.metrics())["vllm:num_requests_running"] + m["vllm:num_requests_waiting"] > 0:
        assert time.monotonic() < deadline, f"cancelled requests still in the engine: {m}"
        time.sleep(0.05)
    # measured on a 2-core CPU: 1-2 steps; 4-5 with an abort's round trip a worker thread (6 of them) each
    assert served.async_llm.stats()["steps"] - steps_at_cancel <= 3


def test_a_request_of_n_sequences_counts_as_n_in_the_latency_metrics(served):
    """vLLM splits a request of ``n`` sequences into ``n`` requests: each has its time to first token, its
    intervals between tokens, its end-to-end latency and its prompt's tokens; ``n`` itself is observed once; every
    success series exists from the start."""
    before = served.metrics()
    for reason in ("stop", "length", "abort"):
        assert f'vllm:request_success_total{{finished_reason="{reason}"}}' in before
    served.client().completions.create(model=served.model, prompt=PROMPTS[0], n=3, max_tokens=5, temperature=0.8,
                                       seed=7, extra_body={"ignore_eos": True})
    after = served.metrics()

    def grew(name: str) -> float:
        return after[name] - before[name]

    assert grew("vllm:time_to_first_token_seconds_count") == 3
    assert grew("vllm:e2e_request_latency_seconds_count") == 3
    assert grew("vllm:inter_token_latency_seconds_count") == 3 * 4
    assert grew('vllm:request_success_total{finished_reason="length"}') == 3
    # vLLM's per-request histograms: tokens, parameters, time per output token
    prompt_tokens = len(served.async_llm.tokenizer.encode(PROMPTS[0]))
    assert grew("vllm:request_prompt_tokens_count") == 3 and grew("vllm:request_prompt_tokens_sum") == 3 * prompt_tokens
    assert grew("vllm:request_generation_tokens_sum") == 3 * 5
    assert grew("vllm:prompt_tokens_total") == 3 * prompt_tokens  # each sequence's prompt, as vLLM's n requests
    # n once a request (vLLM's parent request observes it when its last child ends)
    assert grew("vllm:request_params_n_count") == 1 and grew("vllm:request_params_n_sum") == 3
    assert grew("vllm:request_params_max_tokens_sum") == 3 * 5
    assert grew("vllm:request_time_per_output_token_seconds_count") == 3
    for phase in ("queue", "prefill", "decode", "inference"):  # vLLM's phases, from the engine's scheduling time
        assert grew(f"vllm:request_{phase}_time_seconds_count") == 3 and grew(f"vllm:request_{phase}_time_seconds_sum") >= 0
    assert grew("vllm:request_inference_time_seconds_sum") >= grew("vllm:request_decode_time_seconds_sum")
    assert grew("vllm:request_inference_time_seconds_sum") <= grew("vllm:e2e_request_latency_seconds_sum")
    assert after['vllm:request_params_n_bucket{le="2.0"}'] == before['vllm:request_params_n_bucket{le="2.0"}']


def test_metrics(served):
    metrics = served.metrics()
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                 "vllm:e2e_request_latency_seconds_count", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total"):
        assert metrics[name] > 0, name
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total"):
        assert name in metrics
    # vLLM's names before 0.11, beside their successors (dashboards of those versions)
    assert metrics["vllm:gpu_cache_usage_perc"] == metrics["vllm:kv_cache_usage_perc"]
    assert metrics["vllm:gpu_prefix_cache_queries_total"] >= metrics["vllm:gpu_prefix_cache_hits_total"]
    assert metrics["vllm:time_per_output_token_seconds_count"] == metrics["vllm:inter_token_latency_seconds_count"]
    assert metrics["vllm:kv_cache_total_blocks"] == served.async_llm.stats()["num_usable_blocks"]
    assert metrics['vllm:request_success_total{finished_reason="length"}'] > 0
    assert metrics['vllm:time_to_first_token_seconds_bucket{le="+Inf"}'] == metrics[
        "vllm:time_to_first_token_seconds_count"]
    # vLLM's tokens a model forward ran: one observation a step here (no multi-step decodes), read in one snapshot
    assert metrics["vllm:iteration_tokens_total_count"] == metrics["vllm:engine_steps_total"] > 0
    assert metrics['vllm:iteration_tokens_total_bucket{le="+Inf"}'] == metrics["vllm:iteration_tokens_total_count"]
    assert metrics["vllm:iteration_tokens_total_sum"] >= metrics["vllm:iteration_tokens_total_count"]
    # vLLM's info gauge of the KV cache's settings
    blocks = served.async_llm.stats()["num_usable_blocks"]
    assert metrics[f'vllm:cache_config_info{{block_size="16",cache_dtype="auto",enable_prefix_caching="True",'
                   f'gpu_memory_utilization="0.9",num_cpu_blocks="None",num_gpu_blocks="{blocks}",'
                   f'num_gpu_blocks_override="None",swap_space="0"}}'] == 1


def _copying_reply(served: Served) -> list[str]:
    """The streamed chunks of a greedy reply that copies its prompt (n-gram drafts find it)."""
    stream = served.client().completions.create(model=served.model, prompt=COPYING_PROMPT, stream=True,
                                                temperature=0, max_tokens=24, extra_body={"ignore_eos": True})
    return [c.choices[0].text for c in stream if c.choices and c.choices[0].text]


def test_a_streamed_copying_reply_drafts(served):
    """The server drafts (``--speculative-config``): a reply that copies its prompt streams chunks of several tokens,
    and vLLM's ``spec_decode`` counters count the drafts (its text equals a server's that does not draft: the
    multi-step test)."""
    before = served.metrics()
    chunks = _copying_reply(served)
    after = served.metrics()
    tokenizer = served.async_llm.tokenizer
    assert len(chunks) < 24 and max(len(tokenizer.encode(c, add_special_tokens=False)) for c in chunks) > 1, chunks
    for name in ("drafts", "draft_tokens", "accepted_tokens"):
        assert after[f"vllm:spec_decode_num_{name}_total"] > before[f"vllm:spec_decode_num_{name}_total"], name
    per_position = [after.get(f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{position="{p}"}}', 0)
                    for p in range(SPECULATIVE["num_speculative_tokens"])]
    assert sum(per_position) == after["vllm:spec_decode_num_accepted_tokens_total"] and per_position[0] > 0


def test_token_histogram_reads_as_prometheus_histogram():
    """The inter-token histogram keeps its own counts (one lock an observation, ``count`` tokens at once) and
    exposes the same samples as ``prometheus_client``'s ``Histogram`` fed the same values one by one."""
    import prometheus_client

    from engine.metrics import INTER_TOKEN_BUCKETS, _TokenHistogram

    values = [0.0, 0.01, 0.0100001, 0.3, 79.0, 80.0, 200.0] + [random.uniform(0, 1) for _ in range(50)] + [0.5, 0.5]
    label = {"model_name": "m"}
    reference_registry, registry = prometheus_client.CollectorRegistry(), prometheus_client.CollectorRegistry()
    reference = prometheus_client.Histogram("h_seconds", "doc", list(label), buckets=INTER_TOKEN_BUCKETS,
                                            registry=reference_registry).labels(**label)
    ours = _TokenHistogram("h_seconds", "doc", INTER_TOKEN_BUCKETS, label)
    registry.register(ours)
    for v in values:
        reference.observe(v)
    for v in values[:-2]:
        ours.observe(v)
    ours.observe(0.5, 2)  # two tokens of one interval in one call

    def samples(r):
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in prometheus_client.generate_latest(r).decode().splitlines()
                if line.startswith("h_seconds") and "_created" not in line}

    want, got = samples(reference_registry), samples(registry)
    assert got.keys() == want.keys() and len(got) == len(INTER_TOKEN_BUCKETS) + 3
    for key in want:
        assert abs(got[key] - want[key]) < 1e-9, key


# -- bad input ---------------------------------------------------------------------------


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("body, fragment", [
    ('{"prompt": "hi", "max_tokens": ', "malformed JSON"),
    ("[1, 2]", "JSON object"),
    ("", "required"),
])
def test_malformed_bodies(served, body, fragment):
    r = httpx.post(f"{served.url}/v1/completions", content=body, headers={"content-type": "application/json"})
    error = _error(r, 400)
    assert fragment in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("endpoint, body, param", [
    ("completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": 5}, "prompt"),
    ("completions", {"prompt": [1, -2]}, "prompt"),
    ("completions", {"prompt": [[]]}, "prompt"),
    ("completions", {"prompt": "hi", "max_tokens": 1.5}, "max_tokens"),
    ("completions", {"prompt": "hi", "stream": "maybe"}, "stream"),
    ("chat/completions", {"messages": "hello"}, "messages"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ("chat/completions", {}, "messages"),
])
def test_wrong_types(served, endpoint, body, param):
    error = _error(httpx.post(f"{served.url}/v1/{endpoint}", json=body), 400)
    assert error["param"] == param, error


def test_a_body_sent_as_another_media_type_is_a_415_naming_it(served):
    """vLLM's rule: a JSON body under ``text/plain`` is refused as such (it read as "not a JSON object")."""
    body = json.dumps({"model": served.model, "prompt": "hi", "max_tokens": 2})
    error = _error(httpx.post(f"{served.url}/v1/completions", content=body, headers={"content-type": "text/plain"}),
                   415)
    assert "application/json" in error["message"] and "'text/plain'" in error["message"]
    ok = httpx.post(f"{served.url}/v1/completions", content=body,
                    headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_text_that_is_not_valid_unicode_is_a_400(served):
    """A lone surrogate in a text field (a 500 before: the tokenizer's TypeError), then the server serves on."""
    for path, body, param in (("/v1/completions", {"prompt": "hi \ud800"}, "prompt"),
                              ("/v1/completions", {"prompt": ["fine", "\udfff"]}, "prompt"),
                              ("/tokenize", {"prompt": "\ud800"}, "prompt"),
                              ("/v1/completions", {"prompt": "hi", "bad_words": ["\ud800"]}, "bad_words"),
                              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]},
                               "messages")):
        text = json.dumps({"model": served.model, "max_tokens": 2, **body})  # ASCII: the surrogate as \ud800
        error = _error(httpx.post(f"{served.url}{path}", content=text, headers={"content-type": "application/json"}),
                       400)
        assert error["param"] == param and "not valid Unicode" in error["message"], (path, error)
    reply = served.client().completions.create(model=served.model, prompt="hi", max_tokens=2)
    assert reply.choices[0].finish_reason == "length"


def test_a_content_part_other_than_text_is_refused_by_name(served):
    parts = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    error = _error(httpx.post(f"{served.url}/v1/chat/completions",
                              json={"messages": [{"role": "user", "content": parts}]}), 400)
    assert error["param"] == "messages" and "'image_url'" in error["message"] and "text only" in error["message"]


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"logprobs": 50}, "logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"extra_body": {"top_k": -5}}, "top_k"),
    ({"extra_body": {"min_tokens": 9, "max_tokens": 4}}, "min_tokens"),
    ({"logit_bias": {"blue": 5}}, "logit_bias"),
    ({"logit_bias": {"99999999": 5}}, "logit_bias"),  # outside the vocabulary: the engine's refusal
    ({"extra_body": {"allowed_token_ids": []}}, "allowed_token_ids"),
    ({"extra_body": {"allowed_token_ids": [1, 99999999]}}, "allowed_token_ids"),
    ({"extra_body": {"bad_words": [" "]}}, "bad_words"),
    ({"extra_body": {"truncate_prompt_tokens": 10**7}}, "truncate_prompt_tokens"),  # past max_model_len (vLLM's)
    ({"extra_body": {"guided_regex": "[0-9"}}, "guided_regex"),  # the engine's refusal, named as the request did
    ({"extra_body": {"guided_grammar": "root ::= foo"}}, "guided_grammar"),  # GBNF llguidance cannot convert
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "structured_outputs"),
    ({"extra_body": {"structured_outputs": {"bogus": 1}}}, "structured_outputs"),
    ({"extra_body": {"guided_choice": ["a"], "guided_regex": "b"}}, "guided_choice"),  # the second of two
    ({"extra_body": {"priority": 5}}, "priority"),
    ({"seed": 2**70}, "seed"),  # this server's queue is first come, first served
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream=True
    ({"logprobs": 2, "extra_body": {"use_beam_search": True}}, "logprobs"),  # what a beam search would ignore
    ({"stop": ["x"], "extra_body": {"use_beam_search": True}}, "stop"),
])
def test_out_of_range_completions(served, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        served.client().completions.create(model=served.model, prompt="hi", **kwargs)
    assert info.value.param == param and param in info.value.message


@pytest.mark.parametrize("kwargs, param", [
    ({"top_logprobs": 5}, "top_logprobs"),  # without logprobs=True
    ({"logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"frequency_penalty": -7}, "frequency_penalty"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format"),
])
def test_out_of_range_chat(served, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        served.client().chat.completions.create(model=served.model, messages=CHAT, **kwargs)
    assert info.value.param == param


def test_unknown_model_and_route(served):
    with pytest.raises(openai.NotFoundError) as info:
        served.client().completions.create(model="gpt-5", prompt="hi", max_tokens=1)
    assert info.value.code == "model_not_found" and "gpt-5" in info.value.message
    assert info.value.param == "model"
    _error(httpx.get(f"{served.url}/v1/nothing-here"), 404)


def test_api_key(served):
    url = served.secured_url
    body = {"prompt": "hi", "max_tokens": 1}
    assert _error(httpx.post(f"{url}/v1/completions", json=body), 401)["code"] == "invalid_api_key"
    wrong = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert "incorrect API key" in _error(wrong, 401)["message"]
    malformed = httpx.post(f"{url}/v1/completions", content="{", headers={"content-type": "application/json"})
    _error(malformed, 401)  # the key is checked before the body is read
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert good.completions.create(model=served.model, prompt="hi", max_tokens=1).usage.completion_tokens == 1
    assert httpx.get(f"{url}/health").status_code == 200  # health, metrics and version stay open
    # /invocations and /v2/* answer the same requests: the key guards them too (generation got round it)
    assert _error(httpx.post(f"{url}/invocations", json=body), 401)["code"] == "invalid_api_key"
    _error(httpx.post(f"{url}/v2/rerank", json={"query": "a", "documents": ["b"]}), 401)
    keyed = httpx.post(f"{url}/invocations", json=body, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert keyed.json()["usage"]["completion_tokens"] == 1


def test_context_length(served):
    tokenizer = served.async_llm.tokenizer
    long_prompt = "hello world " * 300
    n = len(tokenizer.encode(long_prompt))
    with pytest.raises(openai.BadRequestError) as info:
        served.client().completions.create(model=served.model, prompt=long_prompt, max_tokens=1)
    assert str(MAX_MODEL_LEN) in info.value.message and str(n) in info.value.message
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        served.client().chat.completions.create(model=served.model, messages=[{"role": "user", "content": long_prompt}])
    assert info.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as info:  # prompt fits, prompt + max_tokens does not
        served.client().completions.create(model=served.model, prompt=PROMPTS[0], max_tokens=MAX_MODEL_LEN)
    assert info.value.param == "max_tokens" and str(MAX_MODEL_LEN) in info.value.message
    vocab = served.async_llm.engine.model_config.vocab_size
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        served.client().completions.create(model=served.model, prompt=[1, vocab + 5], max_tokens=1)


def test_still_serving_after_errors(served, reference):
    """Bad requests sent while a good stream runs do not disturb it, and nothing is left queued."""
    async def run() -> str:
        async with served.async_client() as client, httpx.AsyncClient(timeout=60) as raw:
            stream = await client.completions.create(model=served.model, prompt=PROMPTS[1], stream=True, **GREEDY)
            bad = await asyncio.gather(
                raw.post(f"{served.url}/v1/completions", content="{oops"),
                raw.post(f"{served.url}/v1/completions", json={"prompt": "hi", "top_p": 7}),
                raw.post(f"{served.url}/v1/chat/completions", json={"model": "nope", "messages": CHAT}))
            assert [r.status_code for r in bad] == [400, 400, 404]
            return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    assert asyncio.run(run()) == reference[1]
    stats = served.async_llm.stats()
    assert stats["num_running"] == stats["num_waiting"] == stats["num_used_blocks"] == 0
    assert httpx.get(f"{served.url}/health").status_code == 200


def test_null_fields_take_their_defaults_as_openai_reads_them(served):
    """Clients generated from OpenAI's spec send unset fields as null: a field that takes no None reads it as its
    default (n, penalties, logprobs, stream were 400s), one that does keeps None (max_tokens: as many as fit)."""
    body = {"messages": CHAT, "max_tokens": 2, "temperature": 0, "n": None, "presence_penalty": None,
            "frequency_penalty": None, "logprobs": None, "stream": None, "add_generation_prompt": None,
            "top_logprobs": 0}  # vLLM refuses top_logprobs without logprobs only above 0
    chat = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60)
    assert chat.status_code == 200 and len(chat.json()["choices"]) == 1
    completion = httpx.post(f"{served.url}/v1/completions", json={
        "prompt": PROMPTS[0], "max_tokens": 2, "n": None, "echo": None, "stream": None, "ignore_eos": None},
        timeout=60)
    assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 2


def test_an_unexpected_error_is_one_500_logged_once(served, monkeypatch, caplog):
    """A route's unexpected error: an OpenAI-style 500 naming it, one traceback in the log (not the ASGI server's
    second), and the server serves on."""
    app = build_app(served.async_llm, [served.model], metrics=ServingMetrics(served.model, served.async_llm.stats))

    async def broken(_req):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app.state.serving, "create_completion", broken)
    server, thread, url = _serve_in_thread(app)
    try:
        uvicorn_log = logging.getLogger("uvicorn")  # its own handlers, not the root's: caplog's joins them here
        uvicorn_log.addHandler(caplog.handler)
        try:
            with caplog.at_level(logging.ERROR):
                error = _error(httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}), 500)
                time.sleep(0.5)  # a second traceback would come after the response
        finally:
            uvicorn_log.removeHandler(caplog.handler)
        assert error["type"] == "server_error" and "RuntimeError: a bug" in error["message"]
        assert [r.exc_info is not None for r in caplog.records] == [True]
        assert httpx.get(f"{url}/health").status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_help_names_safe_default_host():
    help_text = make_arg_parser().format_help()
    assert "127.0.0.1" in help_text and "0.0.0.0" in help_text
    for flag in ("--model", "--host", "--port", "--served-model-name", "--dtype", "--max-model-len",
                 "--tensor-parallel-size", "--gpu-memory-utilization", "--max-num-seqs", "--max-num-batched-tokens",
                 "--block-size", "--quantization", "--load-format", "--seed", "--api-key", "--num-scheduler-steps"):
        assert flag in help_text, flag
    assert engine_args_from_cli(make_arg_parser().parse_args(["--num-scheduler-steps", "8"])).num_scheduler_steps == 8
    assert engine_args_from_cli(make_arg_parser().parse_args([])).admission_reserve_tokens == 256
    assert engine_args_from_cli(make_arg_parser().parse_args(
        ["--admission-reserve-tokens", "0"])).admission_reserve_tokens == 0
    # the reasoning parser reaches the engine too: structured outputs start after the thinking (engine.reasoning)
    assert engine_args_from_cli(make_arg_parser().parse_args(["--reasoning-parser", "qwen3"])).reasoning_parser == "qwen3"
    spec = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}'  # vLLM's JSON form
    assert engine_args_from_cli(make_arg_parser().parse_args(["--speculative-config", spec])).speculative_config == {
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
    # vLLM launch lines' common flags (a GGUF's original tokenizer beside it, no CUDA graphs)
    vllm_flags = ["--tokenizer", "/models/tok", "--trust-remote-code", "--enforce-eager"]
    engine_args = engine_args_from_cli(make_arg_parser().parse_args(vllm_flags))
    assert (engine_args.tokenizer, engine_args.trust_remote_code, engine_args.enforce_eager) == ("/models/tok", True,
                                                                                                True)
    args = make_arg_parser().parse_args([])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, None)
    assert json.dumps(served_model_names(args)) == '["SmolLM2-135M-Instruct"]'


def test_vllm_command_lines_start_as_they_are(monkeypatch, caplog):
    """A `vllm serve` command line: the model as the first word, 32k-style lengths, -tp / -q, vLLM's no-op flags
    taken with a warning each, the key from $VLLM_API_KEY (ignored before, so such a server ran without one); a port
    out of range is a one-line error."""
    from engine.entrypoints.openai.api_server import parse_cli

    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    with caplog.at_level("WARNING"):
        args = parse_cli(make_arg_parser(), ["/models/m", "--max-model-len", "32K", "--max-num-batched-tokens", "8k",
                                             "-tp", "1", "-q", "int8", "--disable-log-requests", "--swap-space", "4",
                                             "--no-enable-chunked-prefill"])
    engine_args = engine_args_from_cli(args)
    assert (engine_args.model, engine_args.max_model_len, engine_args.max_num_batched_tokens) == ("/models/m", 32768,
                                                                                                  8000)
    assert (engine_args.tensor_parallel_size, engine_args.quantization, args.api_key) == (1, "int8", "from-env")
    for flag in ("--disable-log-requests", "--swap-space", "--enable-chunked-prefill"):
        assert f"{flag} has no effect here" in caplog.text
    assert parse_cli(make_arg_parser(), ["--api-key", "given"]).api_key == "given"
    monkeypatch.delenv("VLLM_API_KEY")
    assert parse_cli(make_arg_parser(), []).api_key is None
    for bad in (["--port", "99999"], ["--max-model-len", "1.5K"], ["/a", "--model", "/b"]):
        with pytest.raises(SystemExit):
            parse_cli(make_arg_parser(), bad)
    # vLLM's server flags: taken, with an effect where one exists here
    args = parse_cli(make_arg_parser(), ["--max-log-len", "100", "--enable-request-id-headers",
                                         "--disable-uvicorn-access-log", "--show-hidden-metrics-for-version", "0.10",
                                         "--enable-prompt-tokens-details", "--enable-server-load-tracking",
                                         "--disable-frontend-multiprocessing"])
    assert args.enable_request_id_headers and args.disable_uvicorn_access_log and not args.engine_process
    assert not args.disable_log_stats and parse_cli(make_arg_parser(), ["--disable-log-stats"]).disable_log_stats


def test_multi_step_decoding_streams_the_same_text_and_counts_each_tokens_interval(served, reference):
    """``--num-scheduler-steps 4``: a decode's tokens reach the client four at a time, the streamed text equals the
    one-step server's, and the inter-token histogram gets one observation a token after the first. This server runs
    the engine loop in its own process (``--no-engine-process``), the shared one in a child: the same text. And the
    shared server drafts where this one does not: a copying reply's text is the same."""
    args = make_arg_parser().parse_args(["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS),
                                         "--num-scheduler-steps", "4"])
    async_llm = AsyncLLM.from_engine_args(engine_args_from_cli(args))
    server, thread, url = _serve_in_thread(build_app(async_llm, served_model_names(args)))
    try:
        multi = Served(url, url, async_llm, served.model)
        chunks = list(multi.client().completions.create(model=served.model, prompt=PROMPTS[1], stream=True,
                                                        **GREEDY))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == reference[1]
        assert async_llm.stats()["multi_steps"] > 0
        metrics = multi.metrics()
        assert metrics["vllm:inter_token_latency_seconds_count"] == GREEDY["max_tokens"] - 1
        assert metrics["vllm:time_to_first_token_seconds_count"] == 1
        assert "".join(_copying_reply(multi)) == "".join(_copying_reply(served))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        async_llm.shutdown()


def test_engine_process_serves_the_same_text_and_fails_cleanly_when_it_dies(served, reference):
    """``--engine-process`` (the server's default, which the shared server runs too; the multi-step test's server
    runs the loop in its own process): a second engine child streams the same text, refuses an over-long prompt with
    a 400 and re-raises the child's ``ValueError`` in the caller, reports the child's device and carries each
    prompt on every output; once the child is killed, requests and the health check fail with a server error
    instead of hanging."""
    args = make_arg_parser().parse_args(["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(MAX_NUM_SEQS)])
    assert args.engine_process
    async_llm = AsyncLLM.from_engine_args(engine_args_from_cli(args), engine_process=True)
    server, thread, url = _serve_in_thread(build_app(async_llm, served_model_names(args)))
    try:
        remote = Served(url, url, async_llm, served.model)
        client = remote.client()
        chunks = list(client.completions.create(model=served.model, prompt=PROMPTS[1], stream=True, **GREEDY))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == reference[1]
        batch = client.completions.create(model=served.model, prompt=PROMPTS, **GREEDY)
        assert [c.text for c in batch.choices] == reference
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.completions.create(model=served.model, prompt=[1] * MAX_MODEL_LEN, max_tokens=4)
        with pytest.raises(ValueError, match="outside the vocabulary"):  # raised in the child, re-raised here
            asyncio.run(async_llm.add_request("refused", [10 ** 7]))
        assert httpx.get(f"{url}/version", timeout=60).json()["backend"] == "cpu"
        assert remote.metrics()["vllm:time_to_first_token_seconds_count"] == 1 + len(PROMPTS)
        assert async_llm.stats()["num_running"] == 0

        async def outputs() -> list:
            from engine import SamplingParams

            return [out async for out in async_llm.generate([5, 6, 7], SamplingParams(max_tokens=6, ignore_eos=True))]

        streamed = asyncio.run(outputs())  # the prompt travels once; every output carries it
        assert streamed[-1].finished and all(out.prompt_token_ids == [5, 6, 7] for out in streamed)

        async def twice() -> list:  # a second request under a running one's id is refused; the first goes on
            from engine import SamplingParams

            params = SamplingParams(max_tokens=12, ignore_eos=True)
            first = await async_llm.add_request("dup", [5, 6], params)
            with pytest.raises(ValueError, match="already in use"):
                await async_llm.add_request("dup", [7], params)
            return [out async for out in first]

        assert len(asyncio.run(twice())[-1].outputs[0].token_ids) == 12

        async_llm._loop._process.kill()
        deadline = time.monotonic() + 30
        while async_llm._loop._dead is None:
            assert time.monotonic() < deadline, "the engine process's death went unnoticed"
            time.sleep(0.1)
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model=served.model, prompt=PROMPTS[0], max_tokens=4)
        assert httpx.get(f"{url}/health", timeout=60).status_code >= 500
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        async_llm.shutdown()


def test_the_servers_own_process_never_imports_jax(tmp_path):
    """With the engine in its child (the server's default), the server's process runs without JAX: its import set
    a collector hook that ran at every garbage collection there (~5% of the server's samples at 512 streams,
    py-spy), and a server process that never loads it can never touch the GPU the child owns."""
    import subprocess
    import sys

    script = tmp_path / "serve_without_jax.py"
    script.write_text(
        "import asyncio, sys\n"
        "from engine import SamplingParams\n"
        "from engine.async_llm import AsyncLLM\n"
        "from engine.entrypoints.openai.api_server import build_app, engine_args_from_cli, make_arg_parser\n"
        "if __name__ == '__main__':\n"
        "    args = make_arg_parser().parse_args(['--max-model-len', '128', '--max-num-seqs', '2'])\n"
        "    llm = AsyncLLM.from_engine_args(engine_args_from_cli(args), engine_process=True)\n"
        "    build_app(llm, ['m'])\n"
        "    params = SamplingParams(max_tokens=4, logprobs=1, stop=['zz'])\n"
        "    async def run():\n"
        "        return [out async for out in llm.generate('Hello', params)]\n"
        "    outputs = asyncio.run(run())\n"
        "    llm.stats()\n"
        "    llm.shutdown()\n"
        "    print(outputs[-1].finished, len(outputs[-1].outputs[0].token_ids), 'jax' in sys.modules)\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=repo,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "4", "False"]


def test_mailbox_wakes_the_event_loop_once_for_what_arrives_before_it_runs():
    """Items handed over from another thread reach their queues in order, one wake-up of the loop for all the
    items that arrive before it runs (``async_llm._Mailbox``); a closed loop drops them quietly."""
    from engine.async_llm import _Mailbox

    async def scenario():
        loop = asyncio.get_running_loop()
        mailbox, queues = _Mailbox(loop), [asyncio.Queue(), asyncio.Queue()]
        wakeups = []
        original = loop.call_soon_threadsafe

        def counting(callback, *args):
            wakeups.append(callback)
            return original(callback, *args)

        loop.call_soon_threadsafe = counting
        try:
            def producer():
                for i in range(50):
                    mailbox.put(queues[i % 2], i)

            thread = threading.Thread(target=producer)
            thread.start()
            thread.join()  # the loop has not run since: all 50 wait for one delivery
            got = [[await q.get() for _ in range(25)] for q in queues]
        finally:
            del loop.call_soon_threadsafe
        return got, len(wakeups)

    got, wakeups = asyncio.run(scenario())
    assert got == [list(range(0, 50, 2)), list(range(1, 50, 2))] and wakeups == 1
    closed = asyncio.new_event_loop()
    closed.close()
    _Mailbox(closed).put(asyncio.Queue(), 1)  # no error: nobody is listening


def test_embeddings_from_a_pooling_server(served):
    """``--runner pooling``: the default model's embeddings through the ``openai`` client (which asks for base64
    and decodes it), its engine in a process of its own: unit vectors, a text's equal to its token ids', the
    float form the same, ``dimensions`` cut then normalised; ``/score`` and ``/rerank`` their cosines; generating
    there, and embeddings on a generating server, are 400s that say why."""
    import base64

    import numpy as np

    args = make_arg_parser().parse_args(["--runner", "pooling", "--max-model-len", "128"])
    async_llm = AsyncLLM.from_engine_args(engine_args_from_cli(args), engine_process=args.engine_process)
    server, thread, url = _serve_in_thread(build_app(async_llm, served_model_names(args)))
    try:
        client, tokenizer = served.client(url), served.async_llm.tokenizer
        texts = ["The capital of France is", "Paris is a city in"]
        out = client.embeddings.create(model=served.model, input=texts)
        vectors = [np.asarray(d.embedding) for d in out.data]
        assert [d.index for d in out.data] == [0, 1] and all(v.shape == (576,) for v in vectors)
        assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors) and not np.allclose(*vectors, atol=1e-3)
        assert out.usage.prompt_tokens == out.usage.total_tokens == sum(len(tokenizer.encode(t)) for t in texts)
        by_ids = client.embeddings.create(model=served.model, input=[tokenizer.encode(texts[0])])
        np.testing.assert_allclose(by_ids.data[0].embedding, vectors[0], atol=1e-6)
        as_floats = httpx.post(f"{url}/v1/embeddings", json={"input": texts[0], "encoding_format": "float"},
                               timeout=60).json()
        np.testing.assert_allclose(as_floats["data"][0]["embedding"], vectors[0], atol=1e-7)
        as_base64 = httpx.post(f"{url}/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"},
                               timeout=60).json()["data"][0]["embedding"]
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(as_base64), "<f4"),
                                      np.asarray(as_floats["data"][0]["embedding"], np.float32))
        cut = np.asarray(client.embeddings.create(model=served.model, input=texts[0], dimensions=32).data[0].embedding)
        np.testing.assert_allclose(cut, vectors[0][:32] / np.linalg.norm(vectors[0][:32]), atol=1e-5)
        with pytest.raises(openai.BadRequestError, match="takes PoolingParams"):
            client.completions.create(model=served.model, prompt="Hi", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="dimensions=1000 exceeds"):
            client.embeddings.create(model=served.model, input=texts[0], dimensions=1000)
        with pytest.raises(openai.BadRequestError, match="maximum context length is 128 tokens, but a text of input "
                                                         "has 200 tokens"):
            client.embeddings.create(model=served.model, input=[list(range(200))])
        full = client.embeddings.create(model=served.model, input=[list(range(128))])  # a pooled text may fill it
        assert full.usage.prompt_tokens == 128
        with pytest.raises(openai.BadRequestError, match="input is empty"):
            client.embeddings.create(model=served.model, input=[])
        # vLLM's /score and /rerank for an embedding model: the cosine of the embeddings
        texts_vectors = {t: v for t, v in zip(texts, vectors)}
        scored = httpx.post(f"{url}/score", json={"text_1": texts[0], "text_2": texts}, timeout=60).json()
        assert [d["score"] for d in scored["data"]] == pytest.approx(
            [1.0, float(texts_vectors[texts[0]] @ texts_vectors[texts[1]])], abs=1e-5)
        ranked = httpx.post(f"{url}/v1/rerank", json={"query": texts[1], "documents": texts, "top_n": 1},
                            timeout=60).json()
        assert [(r["index"], r["document"]["text"]) for r in ranked["results"]] == [(1, texts[1])]
        every = httpx.post(f"{url}/rerank", json={"query": texts[1], "documents": texts, "top_n": 0}, timeout=60)
        assert [r["index"] for r in every.json()["results"]] == [1, 0]  # vLLM's: top_n 0 is every document
        v2 = httpx.post(f"{url}/v2/rerank", json={"query": texts[1], "documents": texts, "top_n": 1}, timeout=60)
        assert [r["index"] for r in v2.json()["results"]] == [1]
        # vLLM's (SageMaker's) /invocations: a pooling engine's bodies go to its pooling endpoints
        invoked = httpx.post(f"{url}/invocations", json={"input": texts[0], "encoding_format": "float"},
                             timeout=60).json()
        np.testing.assert_allclose(invoked["data"][0]["embedding"], vectors[0], atol=1e-6)
        invoked = httpx.post(f"{url}/invocations", json={"query": texts[1], "documents": texts}, timeout=60).json()
        assert [r["index"] for r in invoked["results"]] == [1, 0]
        neither = httpx.post(f"{url}/invocations", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert neither.status_code == 400 and "input" in neither.json()["error"]["message"]  # /pooling's answer
        # vLLM's fields: normalize, truncate_prompt_tokens (the input's last k tokens)
        raw = httpx.post(f"{url}/v1/embeddings", json={"input": texts[0], "normalize": False}, timeout=60).json()
        assert abs(np.linalg.norm(raw["data"][0]["embedding"]) - 1) > 1e-3
        np.testing.assert_allclose(raw["data"][0]["embedding"] / np.linalg.norm(raw["data"][0]["embedding"]),
                                   vectors[0], atol=1e-5)
        ids = tokenizer.encode(texts[0] + " and " * 150)
        cut = httpx.post(f"{url}/v1/embeddings", json={"input": [ids], "truncate_prompt_tokens": 10},
                         timeout=60).json()
        last = client.embeddings.create(model=served.model, input=[ids[-10:]]).data[0].embedding
        assert cut["usage"]["prompt_tokens"] == 10
        np.testing.assert_allclose(cut["data"][0]["embedding"], last, atol=1e-6)
        bad = httpx.post(f"{url}/v1/embeddings", json={"input": [ids], "truncate_prompt_tokens": 500}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "truncate_prompt_tokens"
        for prompt in ([5, -1], [[5], [-3]]):  # a negative token id was a 500
            negative = httpx.post(f"{url}/v1/embeddings", json={"input": prompt}, timeout=60)
            assert negative.status_code == 400 and negative.json()["error"]["param"] == "input"
        assert ranked["results"][0]["relevance_score"] == pytest.approx(1.0, abs=1e-5)
        bad = httpx.post(f"{url}/v1/score", json={"text_1": texts, "text_2": texts[:1] * 3}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "text_2"
        # vLLM's /pooling: the model's pooled output of texts, or of chat messages as the chat template renders them
        pooled = httpx.post(f"{url}/pooling", json={"input": texts}, timeout=60).json()
        assert pooled["object"] == "list" and pooled["id"].startswith("pool")
        assert [d["object"] for d in pooled["data"]] == ["pooling"] * 2
        np.testing.assert_allclose([d["data"] for d in pooled["data"]], vectors, atol=1e-6)
        messages = [{"role": "user", "content": texts[0]}]
        chat_ids = httpx.post(f"{url}/tokenize", json={"messages": messages, "add_generation_prompt": False},
                              timeout=60).json()["tokens"]
        chat = httpx.post(f"{url}/pooling", json={"messages": messages, "dimensions": 16}, timeout=60).json()
        want = np.asarray(client.embeddings.create(model=served.model, input=[chat_ids]).data[0].embedding)[:16]
        np.testing.assert_allclose(chat["data"][0]["data"], want / np.linalg.norm(want), atol=1e-5)
        assert chat["usage"]["prompt_tokens"] == len(chat_ids)
        # vLLM's per-token task: a unit vector a token, the last the text's embedding (last-token pooling)
        rows = httpx.post(f"{url}/pooling", json={"input": texts[:1], "task": "token_embed"}, timeout=60).json()
        rows = np.asarray(rows["data"][0]["data"])
        assert rows.shape == (len(tokenizer.encode(texts[0])), 576)
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-5)
        np.testing.assert_allclose(rows[-1], vectors[0], atol=1e-6)
        packed = httpx.post(f"{url}/pooling", json={"input": texts[:1], "task": "token_embed",
                                                    "encoding_format": "base64"}, timeout=60).json()["data"][0]["data"]
        np.testing.assert_array_equal(np.frombuffer(base64.b64decode(packed), "<f4").reshape(rows.shape),
                                      rows.astype(np.float32))
        for body, param in (({}, "input"), ({"input": texts, "messages": messages}, "input"),
                            ({"input": texts, "use_activation": False}, "use_activation"),
                            ({"input": texts, "task": "classify"}, "task"),
                            ({"input": texts, "task": "token_classify"}, "task"),
                            ({"input": texts, "task": "reward"}, "task")):
            bad = httpx.post(f"{url}/pooling", json=body, timeout=60)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        async_llm.shutdown()
    with pytest.raises(openai.BadRequestError, match="--runner pooling"):
        served.client().embeddings.create(model=served.model, input="Hi")


def test_classify_from_a_sequence_classifier_server(tmp_path):
    """vLLM's ``/classify``: a ``...ForSequenceClassification`` checkpoint (with the default model's tokenizer) served
    as a pooling engine by ``--runner auto``: each input's class probabilities equal the softmax of transformers'
    logits, its label config.json's name of the most likely class; ``use_activation: false`` gives the logits;
    embeddings there are a 400 that says to classify."""
    import numpy as np
    import torch
    import transformers

    from engine.tokenizer import load_tokenizer
    from models.default_model import default_model_path
    from tests.tiny_checkpoints import randomize_, tiny_hf_config

    tokenizer = load_tokenizer(default_model_path())
    config = tiny_hf_config("llama", num_labels=2, vocab_size=len(tokenizer), pad_token_id=0,
                            id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32,
                                                                        attn_implementation="eager")
    randomize_(model, seed=11)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp_path))
    prompts = [tokenizer.encode("I loved this film"), tokenizer.encode("The capital of France is")]
    with torch.no_grad():
        logits = [model.eval()(torch.tensor([p])).logits[0].numpy().astype(np.float64) for p in prompts]
    args = make_arg_parser().parse_args(["--model", str(tmp_path), "--max-model-len", "64", "--dtype", "float32"])
    async_llm = AsyncLLM.from_engine_args(engine_args_from_cli(args), engine_process=args.engine_process)
    server, thread, url = _serve_in_thread(build_app(async_llm, served_model_names(args)))
    try:
        out = httpx.post(f"{url}/classify", json={"input": prompts}, timeout=60).json()
        for data, want in zip(out["data"], logits):
            probs = np.exp(want) / np.exp(want).sum()
            np.testing.assert_allclose(data["probs"], probs, atol=2e-5)
            assert data["num_classes"] == 2 and data["label"] == ["negative", "positive"][int(np.argmax(probs))]
        assert out["usage"]["prompt_tokens"] == sum(len(p) for p in prompts) and out["object"] == "list"
        raw = httpx.post(f"{url}/v1/classify", json={"input": prompts[:1], "use_activation": False}, timeout=60).json()
        np.testing.assert_allclose(raw["data"][0]["probs"], logits[0], atol=1e-4, rtol=1e-4)
        text = httpx.post(f"{url}/classify", json={"input": "I loved this film"}, timeout=60).json()
        assert len(text["data"]) == 1 and len(text["data"][0]["probs"]) == 2
        refused = httpx.post(f"{url}/v1/embeddings", json={"input": "Hi"}, timeout=60)
        assert refused.status_code == 400 and "use /classify" in refused.json()["error"]["message"]
        empty = httpx.post(f"{url}/classify", json={"input": []}, timeout=60)
        assert empty.status_code == 400 and empty.json()["error"]["param"] == "input"
        pooled = httpx.post(f"{url}/pooling", json={"input": prompts}, timeout=60).json()  # vLLM's: probabilities
        np.testing.assert_allclose([d["data"] for d in pooled["data"]], [d["probs"] for d in out["data"]], atol=1e-6)
        refused = httpx.post(f"{url}/pooling", json={"input": prompts, "dimensions": 1}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "dimensions"
        # vLLM's token_classify (a reward model's per-token rewards): the head's probabilities at every token
        rewards = httpx.post(f"{url}/pooling", json={"input": prompts, "task": "token_classify"}, timeout=60).json()
        with torch.no_grad():
            every = [model.score(model.model(torch.tensor([p])).last_hidden_state)[0].numpy().astype(np.float64)
                     for p in prompts]
        for data, want in zip(rewards["data"], every):
            np.testing.assert_allclose(data["data"], np.exp(want) / np.exp(want).sum(1, keepdims=True), atol=2e-5)
        # pooled requests count in the metrics (a classifier's output failed the stat logger before)
        metrics = httpx.get(f"{url}/metrics", timeout=60).text
        assert re.search(r'vllm:request_success_total\{[^}]*finished_reason="stop"[^}]*\} 8\.0', metrics), metrics
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        async_llm.shutdown()


def test_sleep_and_wake_up_in_dev_mode(tmp_path):
    """vLLM's development routes (``VLLM_SERVER_DEV_MODE=1``) over the engine process: /sleep frees the engine's
    device memory while idle, /is_sleeping says so, a completion meanwhile is a 400 that says to wake it, /wake_up
    brings it back to the same greedy replies; level 3 is a 400; SGLang's /update_weights_from_disk loads a checkpoint
    (a missing one is a 400 and the old weights serve on), a level-2 sleep's wake-up loads the weights again; without
    dev mode the routes do not exist. /reset_prefix_cache empties the prefix cache; the profiler's routes exist where
    $VLLM_TORCH_PROFILER_DIR is set."""
    args = make_arg_parser().parse_args(["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "4"])
    assert args.engine_process
    async_llm = AsyncLLM.from_engine_args(engine_args_from_cli(args), engine_process=args.engine_process)
    names = served_model_names(args)
    (server, thread, url), (plain, plain_thread, plain_url) = (
        _serve_in_thread(build_app(async_llm, names, dev_mode=True)), _serve_in_thread(build_app(async_llm, names)))
    body = {"model": names[0], "prompt": PROMPTS[0], "temperature": 0, "max_tokens": 8, "ignore_eos": True}
    try:
        before = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        assert httpx.get(f"{url}/is_sleeping", timeout=60).json() == {"is_sleeping": False}
        refused = httpx.post(f"{url}/sleep", params={"level": 3}, timeout=60)
        assert refused.status_code == 400 and "level 3" in refused.json()["error"]["message"]
        assert httpx.post(f"{url}/sleep", timeout=120).status_code == 200
        assert httpx.get(f"{url}/is_sleeping", timeout=60).json() == {"is_sleeping": True}
        asleep = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert asleep.status_code == 400 and "wake_up" in asleep.json()["error"]["message"]
        assert httpx.post(f"{plain_url}/sleep", timeout=60).status_code == 404
        assert httpx.post(f"{url}/wake_up", timeout=120).status_code == 200
        after = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        assert after == before and httpx.post(f"{url}/wake_up", timeout=60).status_code == 400
        # SGLang's /update_weights_from_disk (the same checkpoint again: the same replies), and level 2's wake-up
        # loading the weights again
        update = {"model_path": resolve_model_path(None)}
        assert httpx.post(f"{url}/update_weights_from_disk", json=update, timeout=300).json()["success"] is True
        assert httpx.post(f"{url}/sleep", params={"level": 2}, timeout=120).status_code == 200
        assert httpx.post(f"{url}/wake_up", timeout=300).status_code == 200
        again = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        assert again == before
        missing = httpx.post(f"{url}/update_weights_from_disk", json={"model_path": "/no/such/model"}, timeout=120)
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "model_path"
        assert httpx.post(f"{plain_url}/update_weights_from_disk", json=update, timeout=60).status_code == 404
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"] == before
        # vLLM's /reset_prefix_cache: a repeated prompt finds its blocks cached, not after the reset
        long_body = {**body, "prompt": PROMPTS[0] * 8, "max_tokens": 2}

        def cached_tokens() -> int:
            out = httpx.post(f"{url}/v1/completions", json=long_body, timeout=120).json()
            return out["usage"]["prompt_tokens_details"]["cached_tokens"]

        cached_tokens()
        assert cached_tokens() > 0
        assert httpx.post(f"{url}/reset_prefix_cache", timeout=60).status_code == 200
        assert cached_tokens() == 0
        assert httpx.post(f"{plain_url}/reset_prefix_cache", timeout=60).status_code == 404
        # vLLM's /start_profile and /stop_profile where $VLLM_TORCH_PROFILER_DIR is set: JAX's trace of the
        # engine's process
        assert httpx.post(f"{url}/start_profile", timeout=60).status_code == 404
        with pytest.MonkeyPatch.context() as env:
            env.setenv("VLLM_TORCH_PROFILER_DIR", str(tmp_path))
            profiled, profiled_thread, profiled_url = _serve_in_thread(build_app(async_llm, names))
        try:
            assert "no profile is running" in _error(httpx.post(f"{profiled_url}/stop_profile", timeout=60),
                                                     400)["message"]
            assert httpx.post(f"{profiled_url}/start_profile", timeout=60).status_code == 200
            assert "running already" in _error(httpx.post(f"{profiled_url}/start_profile", timeout=60), 400)["message"]
            httpx.post(f"{profiled_url}/v1/completions", json=body, timeout=120)
            assert httpx.post(f"{profiled_url}/stop_profile", timeout=120).status_code == 200
            assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))
            # a trace still running at shutdown is written then (a second later: a trace's folder is named by the
            # second it started)
            time.sleep(1.1)
            assert httpx.post(f"{profiled_url}/start_profile", timeout=60).status_code == 200
        finally:
            profiled.should_exit = True
            profiled_thread.join(timeout=10)
    finally:
        for running, runner in ((server, thread), (plain, plain_thread)):
            running.should_exit = True
            runner.join(timeout=10)
        async_llm.shutdown()
    assert len(list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))) == 2


@pytest.mark.parametrize("signal_name,interrupts", [("SIGINT", 1), ("SIGINT", 2), ("SIGTERM", 1)])
def test_ctrl_c_stops_serve_py_cleanly(signal_name, interrupts):
    """``scripts/serve.py`` interrupted (Ctrl-C, once or twice) after a request: it exits with 0 and no traceback
    (uvicorn 0.55 logged the ASGI lifespan task's cancellation as an ERROR with one). One more Ctrl-C as uvicorn
    finishes lands while asyncio closes the event loop: uvloop failed there (`Cannot close a running event loop`,
    exit 1, or the process hung on a thread pool's worker) before the server ignored Ctrl-C once stopped. A
    supervisor's SIGTERM (to the server's process alone) stops it the same way: uvicorn raised it again once it had
    stopped serving, which killed the process before it stopped the engine (exit -15). Requests still running when
    its 5 s of graceful shutdown end get an OpenAI-style 503, a stream an error event and its end (each was a
    plain-text 500, or a cut stream, and a traceback in the log); the engine's process, which a supervisor's SIGTERM
    may reach too, serves them until then."""
    import signal
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "scripts/serve.py", "--host", "127.0.0.1", "--port", "0",
                             "--max-model-len", "1024", "--max-num-seqs", "2"],
                            cwd=repo, stderr=subprocess.PIPE, text=True, start_new_session=True)
    cut_short = {}
    lines = []
    try:
        for line in proc.stderr:  # the start-up line says where it serves
            lines.append(line)
            if "OpenAI API at" in line:
                break
        url = line.split("OpenAI API at ")[-1].strip().removesuffix("/v1")
        for _ in range(300):  # until uvicorn answers (its signal handlers are then in place)
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        reply = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert reply.status_code == 200  # (a server that has served a request printed the traceback; an idle one not)
        # A terminal's Ctrl-C goes to the process group (the engine's process too); twice, as an impatient user:
        # uvicorn then stops at once.
        # A supervisor's SIGTERM goes to the server's process group (systemd's default), with two long requests
        # running: past the graceful shutdown's 5 s
        send = (lambda: os.killpg(proc.pid, getattr(signal, signal_name)))
        long_body = {"prompt": "Hi", "max_tokens": 1000, "ignore_eos": True}

        def plain() -> None:
            cut_short["plain"] = httpx.post(f"{url}/v1/completions", json=long_body, timeout=60)

        def streamed() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json={**long_body, "stream": True}, timeout=60) as r:
                cut_short["stream"] = list(r.iter_lines())

        clients = [threading.Thread(target=plain), threading.Thread(target=streamed)] if signal_name == "SIGTERM" \
            else []
        for client in clients:
            client.start()
        time.sleep(1.0 if clients else 0)
        for i in range(interrupts):
            if i:
                time.sleep(0.2)
            send()
        for line in proc.stderr:
            lines.append(line)
            if "Finished server process" in line:
                send()
                break
        lines += proc.stderr.read().splitlines(keepends=True)
        assert proc.wait(timeout=60) == 0, "".join(lines[-40:])
        for client in clients:
            client.join(timeout=30)
        if clients:
            assert cut_short["plain"].status_code == 503
            assert cut_short["plain"].json()["error"]["message"] == "the server is shutting down"
            events = [line for line in cut_short["stream"] if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and "the server is shutting down" in events[-2]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group
        except ProcessLookupError:
            pass
    log = "".join(lines)
    assert "OpenAI API at" in log and "Finished server process" in log and "stopping the engine" in log
    assert "Traceback" not in log, log[-3000:]


def test_async_llm_takes_vllm_dict_prompts(served):
    """``AsyncLLM.generate`` takes vLLM's ``{"prompt_token_ids": ids}`` and ``{"prompt": text}`` as ``LLM.generate``
    does (a dict read as token ids before: "invalid literal for int()")."""
    from engine import SamplingParams

    text = "The capital of France is"
    ids = served.async_llm.tokenizer.encode(text)
    params = SamplingParams(temperature=0.0, max_tokens=4)

    async def tokens(prompt):
        return [o async for o in served.async_llm.generate(prompt, params)][-1].outputs[0].token_ids

    assert asyncio.run(tokens({"prompt_token_ids": ids})) == asyncio.run(tokens(ids))
    assert asyncio.run(tokens({"prompt": text})) == asyncio.run(tokens(text))
    with pytest.raises(ValueError, match="'multi_modal_data' is not supported"):
        asyncio.run(tokens({"prompt": text, "multi_modal_data": {}}))
