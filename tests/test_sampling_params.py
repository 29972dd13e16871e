"""SamplingParams: vLLM defaults, normalisation, and one clear error per invalid field."""

import pytest

from engine.sampling_params import MAX_LOGPROBS, MIN_SAMPLING_TEMPERATURE, SamplingParams


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.seed) == (16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert p.skip_special_tokens and not p.ignore_eos and not p.include_stop_str_in_output
    assert not p.is_greedy and not p.has_penalties


def test_normalisation():
    p = SamplingParams(stop="###", stop_token_ids=[5, 7, 5], top_k=-1, seed=-1)
    assert p.stop == ["###"] and p.stop_token_ids == [5, 7] and p.top_k == 0 and p.seed is None
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    assert SamplingParams(temperature=1e-3).temperature == MIN_SAMPLING_TEMPERATURE
    p = SamplingParams(logit_bias={}, allowed_token_ids=(3, 4), bad_words="no", stop_token_ids=(5, 7, 5))
    assert p.logit_bias is None and p.allowed_token_ids == [3, 4] and p.bad_words == ["no"]
    assert p.stop_token_ids == [5, 7]  # normalised whatever else is set
    assert SamplingParams(bad_words=[]).bad_words is None


def test_greedy_resets_truncation():
    p = SamplingParams(temperature=0.0, top_p=0.3, top_k=5, min_p=0.2)
    assert p.is_greedy and (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    assert SamplingParams(temperature=5e-6).is_greedy


def test_derived_values():
    assert SamplingParams(stop=["ab", "xyz!"]).output_text_buffer_length == 3
    assert SamplingParams(stop=["ab", "xyz!"], include_stop_str_in_output=True).output_text_buffer_length == 0
    assert SamplingParams(max_tokens=None).max_output_tokens(prompt_len=10, max_model_len=100) == 90
    assert SamplingParams(max_tokens=20).max_output_tokens(prompt_len=10, max_model_len=100) == 20
    assert SamplingParams(max_tokens=200).max_output_tokens(prompt_len=10, max_model_len=100) == 90
    assert SamplingParams(truncate_prompt_tokens=2).truncate_prompt([1, 2, 3], max_model_len=100) == [2, 3]
    assert SamplingParams(truncate_prompt_tokens=-1).truncate_prompt(list(range(9)), max_model_len=4) == [5, 6, 7, 8]
    assert SamplingParams().truncate_prompt([1, 2, 3], max_model_len=2) == [1, 2, 3]
    assert SamplingParams(repetition_penalty=1.1).has_penalties


@pytest.mark.parametrize(
    "field, value",
    [
        ("n", 0),
        ("n", 1.5),
        ("temperature", -1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 2.5),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("inf")),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.1),
        ("frequency_penalty", 3.0),
        ("frequency_penalty", -3.0),
        ("max_tokens", 0),
        ("min_tokens", -1),
        ("logprobs", -1),
        ("logprobs", MAX_LOGPROBS + 1),
        ("seed", 1.5),
        ("stop", ""),
        ("stop", ["ok", ""]),
        ("stop", 5),
        ("stop_token_ids", [3, -1]),
        ("stop_token_ids", 7),
        ("logit_bias", {-1: 1.0}),
        ("logit_bias", {3: float("nan")}),
        ("logit_bias", {"3": 1.0}),
        ("logit_bias", [(3, 1.0)]),
        ("allowed_token_ids", []),
        ("allowed_token_ids", [4, -2]),
        ("allowed_token_ids", 4),
        ("bad_words", ""),
        ("bad_words", ["ok", "  "]),
        ("bad_words", [3]),
        ("truncate_prompt_tokens", 0),
        ("truncate_prompt_tokens", -2),
        ("truncate_prompt_tokens", 2.0),
    ],
)
def test_invalid_field_names_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert message.startswith(field + " "), message
    assert repr(value) in message or str(value) in message, message


def test_temperature_message():
    with pytest.raises(ValueError, match=r"^temperature must be >= 0, got -1$"):
        SamplingParams(temperature=-1)


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens \(4\), got 5"):
        SamplingParams(min_tokens=5, max_tokens=4)
    assert SamplingParams(min_tokens=50, max_tokens=None).min_tokens == 50


def test_greedy_with_several_completions_is_rejected():
    with pytest.raises(ValueError, match=r"^n must be 1 with greedy sampling"):
        SamplingParams(n=2, temperature=0.0)


def test_vllms_best_of_and_extra_args_are_taken():
    """vLLM's ``best_of`` (None or n: V1 samples no more than n) and ``extra_args`` (for plugins, kept)."""
    assert SamplingParams(n=2, best_of=2).best_of == 2 and SamplingParams(best_of=None).best_of is None
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=1, best_of=3)
    assert SamplingParams(extra_args={"k": 1}).clone().extra_args == {"k": 1}
    with pytest.raises(ValueError, match="extra_args"):
        SamplingParams(extra_args=[1])
    with pytest.raises(ValueError, match=r"truncate_prompt_tokens value \(9\) is greater than max_model_len \(8\)"):
        SamplingParams(truncate_prompt_tokens=9).truncate_prompt(list(range(20)), max_model_len=8)


def test_logprobs_true_asks_for_one_as_in_vllm():
    p = SamplingParams(logprobs=True, prompt_logprobs=True)
    assert (p.logprobs, p.prompt_logprobs) == (1, 1)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=False)
