"""LoRA adapters in the OpenAI-compatible server, as vLLM serves them: ``--enable-lora --lora-modules name=path``,
a request whose ``model`` is an adapter's name runs with it, /v1/models lists the adapters after the base model,
and (with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) /v1/load_lora_adapter and /v1/unload_lora_adapter.

One engine for the module, in a child process as the server runs it by default (``--engine-process``: each
request's ``LoRARequest`` crosses the pipe), serving two apps: one as started from the command line, one with the
runtime load/unload endpoints. Random rank-8 PEFT adapters for the embedded default model are written here (shapes
from the model's own config); the offline ``LLM`` gives the reference texts. The real ``openai`` client over HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os

import pytest

for _module in ("fastapi", "uvicorn", "prometheus_client", "openai", "httpx", "safetensors"):
    pytest.importorskip(_module)

import httpx  # noqa: E402
import openai  # noqa: E402

from engine import LoRARequest, SamplingParams  # noqa: E402
from engine.async_llm import AsyncLLM  # noqa: E402
from engine.entrypoints.openai.api_server import (  # noqa: E402
    RUNTIME_LORA_UPDATING_ENV, build_app, engine_args_from_cli, lora_modules_problem, main, make_arg_parser,
    served_model_names,
)
from tests.test_server import _serve_in_thread  # noqa: E402

MAX_MODEL_LEN = 512
RANK = 8
ADAPTER_CONFIG = {"peft_type": "LORA", "r": RANK, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = dict(temperature=0, max_tokens=8, extra_body={"ignore_eos": True})
OFFLINE_GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, str]:
    """Two random adapters for the default model: ``myadapter`` (served from the start) and ``second`` (loaded at
    runtime)."""
    from models.default_model import default_model_path
    from models.gguf_loader import read_gguf_config
    from models.lora import write_random_adapter

    config = read_gguf_config(default_model_path())
    root = tmp_path_factory.mktemp("adapters")
    return {name: write_random_adapter(str(root / name), config, ADAPTER_CONFIG["target_modules"], r=RANK,
                                       lora_alpha=ADAPTER_CONFIG["lora_alpha"], std=0.05, seed=seed)
            for seed, name in enumerate(("myadapter", "second"))}


@pytest.fixture(scope="module")
def offline(adapters) -> dict[str, str]:
    """The offline engine's greedy texts of PROMPT: the base model's and each adapter's."""
    from engine import LLM

    llm = LLM(enable_lora=True, max_lora_rank=RANK, max_model_len=MAX_MODEL_LEN)
    try:
        texts = {"base": llm.generate([PROMPT], OFFLINE_GREEDY, use_tqdm=False)[0].outputs[0].text}
        for lora_id, (name, path) in enumerate(adapters.items(), start=1):
            out = llm.generate([PROMPT], OFFLINE_GREEDY, use_tqdm=False, lora_request=LoRARequest(name, lora_id, path))
            texts[name] = out[0].outputs[0].text
    finally:
        llm.shutdown()
    return texts


@dataclasses.dataclass
class Served:
    url: str  # the app as the command line builds it
    runtime_url: str  # the same engine and adapters, built with VLLM_ALLOW_RUNTIME_LORA_UPDATING=true
    async_llm: AsyncLLM
    base: str  # the base model's served name
    runtime_serving: object  # the runtime app's OpenAIServing


@pytest.fixture(scope="module")
def served(adapters):
    """The engine (in its child process, as the server runs it) behind two apps (``Served``)."""
    argv = ["--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "16", "--enable-lora",
            "--lora-modules", f"myadapter={adapters['myadapter']}", "--max-lora-rank", str(RANK)]
    args = make_arg_parser().parse_args(argv)
    assert lora_modules_problem(args) is None and args.engine_process
    async_llm = AsyncLLM.from_engine_args(engine_args_from_cli(args), engine_process=args.engine_process)
    names = served_model_names(args)
    with pytest.MonkeyPatch.context() as env:
        env.delenv(RUNTIME_LORA_UPDATING_ENV, raising=False)
        app = build_app(async_llm, names, lora_modules=args.lora_modules)
        env.setenv(RUNTIME_LORA_UPDATING_ENV, "true")
        runtime = build_app(async_llm, names, metrics=app.state.metrics, lora_modules=args.lora_modules)
    running = [_serve_in_thread(app), _serve_in_thread(runtime)]
    yield Served(running[0][2], running[1][2], async_llm, names[0], runtime.state.serving)
    for server, thread, _ in running:
        server.should_exit = True
        thread.join(timeout=10)
    async_llm.shutdown()


def test_models_lists_the_adapter_after_the_base_model(served, adapters):
    url, base = served.url, served.base
    assert [m.id for m in _client(url).models.list().data] == [base, "myadapter"]
    cards = httpx.get(f"{url}/v1/models").json()["data"]
    assert cards[0]["parent"] is None and cards[0]["max_model_len"] == MAX_MODEL_LEN
    assert (cards[1]["root"], cards[1]["parent"]) == (adapters["myadapter"], base)


def test_completion_with_the_adapter_equals_the_offline_engines(served, offline):
    url, base = served.url, served.base
    client = _client(url)
    assert offline["myadapter"] != offline["base"]  # the adapter changes the greedy text
    out = client.completions.create(model="myadapter", prompt=PROMPT, **GREEDY)
    assert out.model == "myadapter" and out.choices[0].text == offline["myadapter"]
    assert out.usage.completion_tokens == 8
    plain = client.completions.create(model=base, prompt=PROMPT, **GREEDY)
    assert plain.model == base and plain.choices[0].text == offline["base"]
    chunks = list(client.completions.create(model="myadapter", prompt=PROMPT, stream=True, **GREEDY))
    assert {c.model for c in chunks} == {"myadapter"}
    assert "".join(c.choices[0].text for c in chunks if c.choices) == offline["myadapter"]


def test_streamed_chat_with_the_adapter(served):
    """A streamed chat with the adapter equals the non-streamed one; the adapter changes the model's probabilities
    (its answer here may still be the base model's: it is sure of Paris)."""
    url, base = served.url, served.base
    client = _client(url)
    whole = client.chat.completions.create(model="myadapter", messages=CHAT, logprobs=True, **GREEDY)
    assert whole.model == "myadapter"
    chunks = list(client.chat.completions.create(model="myadapter", messages=CHAT, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert {c.model for c in chunks} == {"myadapter"}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and chunks[-1].usage.completion_tokens == 8
    plain = client.chat.completions.create(model=base, messages=CHAT, logprobs=True, **GREEDY)
    first = [c.choices[0].logprobs.content[0] for c in (whole, plain)]
    assert first[0].token != first[1].token or abs(first[0].logprob - first[1].logprob) > 1e-3


def test_base_and_adapter_requests_batched_together_keep_their_own_text(served, offline):
    """Requests of the base model and of the adapter in the same steps: each row gets its own update (or none)."""
    url, base = served.url, served.base

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
            outs = await asyncio.gather(*[client.completions.create(model=model, prompt=PROMPT, **GREEDY)
                                          for model in [base, "myadapter"] * 3])
        return [o.choices[0].text for o in outs]

    assert asyncio.run(run()) == [offline["base"], offline["myadapter"]] * 3


def test_an_unknown_model_is_still_a_404_naming_the_adapters(served):
    url = served.url
    with pytest.raises(openai.NotFoundError) as info:
        _client(url).completions.create(model="other-adapter", prompt="hi", max_tokens=1)
    assert info.value.code == "model_not_found" and info.value.param == "model"
    assert "other-adapter" in info.value.message and "myadapter" in info.value.message


def test_runtime_endpoints_are_absent_without_the_environment_variable(served, adapters):
    url = served.url
    _error(httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": adapters["second"]}), 404)
    _error(httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "myadapter"}), 404)
    assert [m.id for m in _client(url).models.list().data][1:] == ["myadapter"]


def test_load_use_and_unload_an_adapter_at_runtime(served, adapters, offline, tmp_path):
    url, async_llm, base = served.runtime_url, served.async_llm, served.base
    client = _client(url)
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "second", "lora_path": adapters["second"]})
    assert loaded.status_code == 200 and "second" in loaded.text
    cards = httpx.get(f"{url}/v1/models").json()["data"]
    assert [c["id"] for c in cards] == [base, "myadapter", "second"]
    assert (cards[2]["root"], cards[2]["parent"]) == (adapters["second"], base)
    out = client.completions.create(model="second", prompt=PROMPT, **GREEDY)
    assert out.model == "second" and out.choices[0].text == offline["second"]
    assert offline["second"] not in (offline["base"], offline["myadapter"])
    # a name already served, the base model's name, a folder that is no adapter: 400s with OpenAI's error body
    again = _error(httpx.post(f"{url}/v1/load_lora_adapter",
                              json={"lora_name": "second", "lora_path": adapters["myadapter"]}), 400)
    assert "already been loaded" in again["message"] and again["param"] == "lora_name"
    _error(httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": base, "lora_path": adapters["second"]}), 400)
    (tmp_path / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG))
    no_weights = _error(httpx.post(f"{url}/v1/load_lora_adapter",
                                   json={"lora_name": "broken", "lora_path": str(tmp_path)}), 400)
    assert "adapter_model.safetensors" in no_weights["message"] and no_weights["param"] == "lora_path"
    missing = _error(httpx.post(f"{url}/v1/load_lora_adapter",
                                json={"lora_name": "broken", "lora_path": str(tmp_path / "nowhere")}), 400)
    assert "does not exist" in missing["message"]
    _error(httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "broken"}), 400)
    # unloading: the name becomes an unknown model; unloading it again is a 404, as vLLM's
    unloaded = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "second"})
    assert unloaded.status_code == 200 and "second" in unloaded.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="second", prompt=PROMPT, max_tokens=1)
    assert _error(httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "second"}), 404)["param"] == \
        "lora_name"
    assert [m.id for m in client.models.list().data] == [base, "myadapter"]
    # ids continue after the largest used, never reusing an unloaded adapter's
    assert httpx.post(f"{url}/v1/load_lora_adapter",
                      json={"lora_name": "second", "lora_path": adapters["second"]}).status_code == 200
    ids = {name: a.request.lora_int_id for name, a in served.runtime_serving.lora_adapters.items()}
    assert ids == {"myadapter": 1, "second": 3}
    assert client.completions.create(model="second", prompt=PROMPT, **GREEDY).choices[0].text == offline["second"]
    httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "second"})
    stats = async_llm.stats()
    assert stats["num_running"] == stats["num_waiting"] == 0


def too_big_adapter(adapters, folder) -> str:
    """``second``'s weights under a config whose rank is above --max-lora-rank: files in place, refused when read."""
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(open(os.path.join(adapters["second"],
                                                                         "adapter_model.safetensors"), "rb").read())
    (folder / "adapter_config.json").write_text(json.dumps({**ADAPTER_CONFIG, "r": 4 * RANK}))
    return str(folder)


def test_an_adapter_the_engine_refuses_is_a_400_when_loaded(served, adapters, tmp_path):
    """The engine reads an adapter when it is loaded, as vLLM's: its refusal (here a rank above --max-lora-rank)
    is the load's 400 on ``lora_path``, the adapter is not listed, and the server serves on."""
    url, base = served.runtime_url, served.base
    error = _error(httpx.post(f"{url}/v1/load_lora_adapter",
                              json={"lora_name": "too-big", "lora_path": too_big_adapter(adapters, tmp_path / "big")}),
                   400)
    assert error["param"] == "lora_path" and "max_lora_rank" in error["message"]
    assert "too-big" not in [m.id for m in _client(url).models.list().data]
    with pytest.raises(openai.NotFoundError):
        _client(url).completions.create(model="too-big", prompt=PROMPT, max_tokens=2)
    assert _client(url).completions.create(model=base, prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2


def test_an_adapter_whose_load_fails_otherwise_is_not_listed(served, adapters, monkeypatch):
    """A load that fails for another reason than the adapter (here the engine's loop gone) is a 500, and the name
    is not left listed as a model that every request would then fail on."""
    url = served.runtime_url

    async def engine_gone(request):
        raise RuntimeError("the engine's loop has stopped")

    monkeypatch.setattr(served.async_llm, "add_lora", engine_gone)
    reply = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": adapters["second"]})
    assert reply.status_code == 500
    assert "late" not in [m.id for m in _client(url).models.list().data]
    assert "late" not in served.runtime_serving.lora_adapters


def test_an_adapter_the_engine_refuses_stops_start_up(adapters, tmp_path, capsys):
    """``--lora-modules`` adapters are read once the engine has started, as vLLM's: a bad one ends start-up with
    exit status 2 and a message naming it."""
    with pytest.raises(SystemExit) as info:
        main(["--port", "0", "--max-model-len", "64", "--enable-lora", "--max-lora-rank", str(RANK),
              "--lora-modules", f"too-big={too_big_adapter(adapters, tmp_path / 'big')}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--lora-modules: adapter 'too-big'" in err and "max_lora_rank" in err, err


@pytest.mark.parametrize("argv, fragment", [
    (["--enable-lora", "--lora-modules", "no-equals-sign"], "is not an adapter: expected name=path or JSON"),
    (["--enable-lora", "--lora-modules", '{"name": "a"}'], "needs name and path"),
    (["--enable-lora", "--lora-modules", '{"name": "a", "path": "/x", "colour": 1}'], "unknown field(s) colour"),
    (["--enable-lora", "--lora-modules", "{bad json"], "is not valid JSON"),
    (["--lora-modules", "a={folder}"], "--lora-modules needs --enable-lora"),
    (["--enable-lora", "--lora-modules", "a={folder}", "a={folder}"], "given twice"),
    (["--enable-lora", "--lora-modules", "SmolLM2-135M-Instruct={folder}"], "given twice"),
    (["--enable-lora", "--lora-modules", "a=/no/such/adapter"], "does not exist"),
])
def test_bad_lora_flags_fail_at_start_up_clearly(adapters, capsys, argv, fragment):
    """Refused before the engine loads (or the port is bound): exit status 2 and a message naming the flag."""
    argv = [a.replace("{folder}", adapters["myadapter"]) for a in argv]
    with pytest.raises(SystemExit) as info:
        main(["--port", "0"] + argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--lora-modules" in err and fragment in err, err


def test_lora_flags_reach_the_engine_and_the_help():
    help_text = make_arg_parser().format_help()
    for flag in ("--enable-lora", "--lora-modules", "--max-loras", "--max-lora-rank", "--max-cpu-loras",
                 RUNTIME_LORA_UPDATING_ENV):
        assert flag in help_text, flag
    args = make_arg_parser().parse_args(["--enable-lora", "--max-loras", "2", "--max-lora-rank", "32",
                                         "--max-cpu-loras", "4", "--lora-modules", "a=/x",
                                         '{"name": "b", "path": "/y", "base_model_name": "m"}', "--lora-modules",
                                         "c=/z"])
    engine_args = engine_args_from_cli(args)
    assert (engine_args.enable_lora, engine_args.max_loras, engine_args.max_lora_rank,
            engine_args.max_cpu_loras) == (True, 2, 32, 4)
    assert [(m.name, m.path, m.base_model_name) for m in args.lora_modules] == [
        ("a", "/x", None), ("b", "/y", "m"), ("c", "/z", None)]


def test_an_engine_error_of_a_jax_module_crosses_the_pipe_as_its_builtin_class():
    """The engine process sends a ``models.lora.LoRAAdapterError`` up as a ``ValueError`` with its message:
    unpickling the original would import ``models.lora``, and with it JAX, into the server's process."""
    import pickle

    from engine.engine_process import _portable
    from models.lora import LoRAAdapterError

    sent = pickle.loads(pickle.dumps(_portable(LoRAAdapterError("r=32 exceeds max_lora_rank=8"))))
    assert type(sent) is ValueError and str(sent) == "r=32 exceeds max_lora_rank=8"
    kept = _portable(ValueError("plain"))
    assert type(kept) is ValueError and str(kept) == "plain"


def test_metrics_name_the_lora_adapters(served):
    """vLLM's ``vllm:lora_requests_info`` gauge: max_lora and the adapters of running / waiting requests."""
    _client(served.url).completions.create(model="myadapter", prompt=PROMPT, **GREEDY)
    text = httpx.get(f"{served.url}/metrics").text
    line = next(l for l in text.splitlines() if l.startswith("vllm:lora_requests_info{"))
    assert 'max_lora="1"' in line and 'running_lora_adapters=""' in line and 'waiting_lora_adapters=""' in line


def test_embeddings_with_an_adapter_from_a_pooling_server(adapters):
    """``--runner pooling --enable-lora``: /v1/embeddings with ``model`` an adapter's name runs that adapter (its
    embedding, the same each time, is not the base model's; offline, embeddings with an adapter equal peft's:
    ``tests/test_lora.py``)."""
    import numpy as np

    argv = ["--runner", "pooling", "--max-model-len", str(MAX_MODEL_LEN), "--enable-lora", "--lora-modules",
            f"myadapter={adapters['myadapter']}", "--max-lora-rank", str(RANK)]
    args = make_arg_parser().parse_args(argv)
    async_llm = AsyncLLM.from_engine_args(engine_args_from_cli(args), engine_process=args.engine_process)
    server, thread, url = _serve_in_thread(build_app(async_llm, served_model_names(args),
                                                     lora_modules=args.lora_modules))
    try:
        client = _client(url)
        base, adapted, again = (client.embeddings.create(model=model, input=PROMPT)
                                for model in (served_model_names(args)[0], "myadapter", "myadapter"))
        assert adapted.model == "myadapter"
        vectors = [np.asarray(out.data[0].embedding) for out in (base, adapted, again)]
        np.testing.assert_allclose(vectors[2], vectors[1], atol=1e-6)
        assert not np.allclose(vectors[0], vectors[1], atol=1e-3)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        async_llm.shutdown()
