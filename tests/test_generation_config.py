"""The model's generation_config.json as the defaults of unset sampling fields (vLLM's ``--generation-config``)."""

from __future__ import annotations

import json
import types

import pytest

from engine import LLM, SamplingParams
from engine.engine_args import EngineArgs
from engine.entrypoints.openai.api_server import _sampling_params
from engine.generation_config import default_sampling_fields


def _write(folder, config: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_sampling_fields_come_from_the_model_folder_a_named_folder_or_nowhere(tmp_path):
    model = _write(tmp_path / "model", {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "top_k": None,
                                        "eos_token_id": [1, 2], "max_new_tokens": 64})
    # set sampling fields only, max_new_tokens as max_tokens (vLLM's name for it)
    assert default_sampling_fields(str(model)) == {"temperature": 0.6, "top_p": 0.9, "max_tokens": 64}
    assert default_sampling_fields(str(model), "vllm") == {}
    other = _write(tmp_path / "other", {"repetition_penalty": 1.1, "min_p": 0.05})
    assert default_sampling_fields(str(model), str(other)) == {"repetition_penalty": 1.1, "min_p": 0.05}
    assert default_sampling_fields(str(tmp_path / "model.gguf")) == {}  # a GGUF file: none
    assert default_sampling_fields(str(tmp_path)) == {}  # a folder without the file: none
    with pytest.raises(ValueError, match="has none"):
        default_sampling_fields(str(model), str(tmp_path))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        default_sampling_fields(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="generation_config.json: top_p"):  # refused at load, not per request
        default_sampling_fields(str(_write(tmp_path / "wrong", {"top_p": 0.0})))


def test_a_named_folder_without_the_file_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="generation_config must be"):
        EngineArgs(model=str(tmp_path), generation_config=str(tmp_path)).validate()


def test_llm_samples_by_the_generation_config_unless_told_otherwise(tmp_path):
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "llama", seed=5)
    _write(tmp_path, {"temperature": 0.0, "repetition_penalty": 1.3})
    kwargs = dict(dtype="float32", skip_tokenizer_init=True, max_model_len=64, max_num_seqs=4,
                  max_num_batched_tokens=64)
    llm = LLM(str(tmp_path), **kwargs)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.repetition_penalty, defaults.top_p) == (0.0, 1.3, 1.0)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    unset = llm.generate(prompts, use_tqdm=False)  # greedy and penalized, from the config
    told = llm.generate(prompts, SamplingParams(temperature=0.0, repetition_penalty=1.3), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in unset] == [o.outputs[0].token_ids for o in told]
    llm.shutdown()
    plain = LLM(str(tmp_path), generation_config="vllm", **kwargs)
    assert plain.get_default_sampling_params() == SamplingParams()
    plain.shutdown()


def test_the_server_fills_only_the_fields_a_request_leaves_unset():
    fields = dict(n=1, presence_penalty=0.0, frequency_penalty=0.0, seed=None, stop=None, stop_token_ids=None,
                  ignore_eos=False, min_tokens=0, skip_special_tokens=True, spaces_between_special_tokens=True,
                  include_stop_str_in_output=False,
                  temperature=None, top_p=0.5, top_k=None, min_p=None, repetition_penalty=None, logit_bias=None,
                  allowed_token_ids=None, bad_words=None, truncate_prompt_tokens=None, prompt_logprobs=None,
                  stream=False, stream_options=None)
    request = types.SimpleNamespace(**fields)

    def params_of(max_tokens, defaults):
        return _sampling_params(request, max_tokens=max_tokens, logprobs=None, structured=(None, None), renames={},
                                defaults=defaults)

    params = params_of(8, {"temperature": 0.6, "top_p": 0.9, "top_k": 40})
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.6, 0.5, 40, 0.0)
    params = params_of(8, {})
    assert (params.temperature, params.top_p, params.top_k) == (SamplingParams().temperature, 0.5, 0)
    # max_new_tokens (as max_tokens) caps a request's max_tokens and stands in for an unset one, as in vLLM.
    assert [params_of(m, {"max_tokens": 32}).max_tokens for m in (8, 100, None)] == [8, 32, 32]
