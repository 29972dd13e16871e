"""The structured-output grammars' options (``engine.structured_output``) against llguidance matchers on the default
model's tokenizer; the generation side is in ``test_llm.py`` (``test_structured_outputs_follow_their_grammar``)."""

from __future__ import annotations

import pytest

from engine.sampling_params import GuidedDecodingParams, SamplingParams, StructuredOutputsParams
from engine.structured_output import Grammars, closed_objects
from engine.tokenizer import load_tokenizer
from models.default_model import default_model_path

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "object", "properties": {}},
                                          "free": {"type": "object"}, "c": {"const": {"properties": {}}}},
          "required": ["a"]}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def accepts(grammars, tokenizer, params: StructuredOutputsParams, text: str) -> bool:
    """Whether ``params``' language takes ``text`` whole (token by token, then the end)."""
    matcher = grammars.matcher(grammars.check(params))
    ok = all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False))
    return ok and not matcher.is_error() and matcher.is_accepting()


def test_vllm_json_options_change_the_language(grammars, tokenizer):
    """vLLM's options: whitespace between JSON tokens unless ``disable_any_whitespace``; a ``whitespace_pattern``
    bounds it; ``disable_additional_properties`` closes the object schemas with properties that leave it open
    (nested ones too), not a free-form object nor a ``const``'s value."""
    spaced, tight, extra = '{ "a" : 1 }', '{"a":1}', '{"a":1,"x":2}'
    assert accepts(grammars, tokenizer, StructuredOutputsParams(json=SCHEMA), spaced)
    assert not accepts(grammars, tokenizer, StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True), spaced)
    assert accepts(grammars, tokenizer, StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True), tight)
    assert not accepts(grammars, tokenizer, StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
                       '{ "x": 1}')
    assert not accepts(grammars, tokenizer, StructuredOutputsParams(json=SCHEMA, whitespace_pattern=r"[ ]?"),
                       '{  "a":1}')
    assert accepts(grammars, tokenizer, StructuredOutputsParams(json=SCHEMA), extra)
    assert not accepts(grammars, tokenizer, StructuredOutputsParams(json=SCHEMA, disable_additional_properties=True),
                       extra)
    closed = closed_objects(SCHEMA)
    assert closed["additionalProperties"] is False and closed["properties"]["b"]["additionalProperties"] is False
    assert closed["properties"]["free"] == {"type": "object"}  # a free-form map stays open, as vLLM's
    assert closed["properties"]["c"] == SCHEMA["properties"]["c"]  # data, not a schema
    assert closed_objects({**SCHEMA, "additionalProperties": True})["additionalProperties"] is True


def test_vllm_older_names_and_options():
    """``guided_decoding`` / ``GuidedDecodingParams`` (vLLM before 0.11) are ``structured_outputs``; the options
    ``disable_fallback`` and ``backend`` are taken; ``structural_tag`` and both names at once are refused."""
    params = SamplingParams(guided_decoding=GuidedDecodingParams(regex="[0-9]+", backend="xgrammar",
                                                                 disable_fallback=True))
    assert params.structured_outputs.regex == "[0-9]+" and params.guided_decoding is params.structured_outputs
    params.validate()  # as the engine checks a request's params again
    assert params.clone().guided_decoding.regex == "[0-9]+"
    assert SamplingParams(guided_decoding={"choice": ["a", "b"]}).structured_outputs.choice == ["a", "b"]
    with pytest.raises(ValueError, match="structural_tag is not supported"):
        StructuredOutputsParams(structural_tag="{}")
    with pytest.raises(ValueError, match="older name of structured_outputs"):
        SamplingParams(guided_decoding={"regex": "a"}, structured_outputs={"regex": "b"})
    with pytest.raises(ValueError, match="takes only"):
        SamplingParams(structured_outputs={"regex": "a", "bogus": 1})
