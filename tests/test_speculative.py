"""Speculative decoding by n-gram lookup (engine.speculative): the proposer, the acceptance rule, the options' checks,
and the engine's outputs equal to decoding a token a step (the default model; the scheduler's side is
tests/test_scheduler.py's)."""

import re

import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.sampling_params import StructuredOutputsParams
from engine.engine_args import EngineArgs
from engine.speculative import SpeculativeConfig, accepted_tokens, ngram_drafts

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}


@pytest.mark.parametrize("tokens, low, high, limit, drafts", [
    ([1, 2, 3, 4, 1, 2], 1, 3, 4, [3, 4, 1, 2]),  # "1 2" occurred: what followed it
    ([1, 2, 3, 4, 1, 2], 1, 3, 2, [3, 4]),  # at most limit
    ([7, 2, 9, 1, 2, 8, 1, 2], 1, 3, 3, [8, 1, 2]),  # the latest of two occurrences of "1 2"
    ([5, 2, 1, 2, 6, 3, 1, 2], 1, 3, 1, [6]),  # "1 2" beats the longer-ago single "2"
    ([1, 2, 3, 4, 5], 1, 3, 4, []),  # the last token never occurred before
    ([1, 2, 3, 9, 2], 2, 3, 4, []),  # only a 1-gram matches, fewer than prompt_lookup_min
    ([4, 4, 4, 4], 1, 2, 4, [4]),  # overlapping occurrences: what follows the latest one, up to the end
])
def test_ngram_drafts_follow_the_latest_occurrence_of_the_longest_matching_suffix(tokens, low, high, limit, drafts):
    assert ngram_drafts(np.asarray(tokens), low, high, limit) == drafts


def test_ngram_drafts_on_a_random_sequence_match_a_plain_search():
    """The vectorized search against a direct one: the longest suffix of low..high tokens seen before, its latest
    earlier occurrence, what follows it."""
    rng = np.random.default_rng()
    for _ in range(200):
        tokens = rng.integers(0, 4, rng.integers(2, 40)).tolist()
        low, limit = int(rng.integers(1, 3)), int(rng.integers(1, 5))
        high = low + int(rng.integers(0, 3))
        want = []
        for n in range(min(high, len(tokens) - 1), low - 1, -1):
            ends = [e for e in range(n - 1, len(tokens) - 1) if tokens[e - n + 1:e + 1] == tokens[-n:]]
            if ends:
                want = tokens[ends[-1] + 1:ends[-1] + 1 + limit]
                break
        assert ngram_drafts(np.asarray(tokens), low, high, limit) == want, (tokens, low, high, limit)


def test_a_requests_known_tokens_are_kept_as_an_array_grown_as_they_come():
    from engine.request import Request

    request = Request("r", [5, 6, 7])
    assert request.known_token_array(3).tolist() == [5, 6, 7]
    for token in range(100):  # past the first buffer's 64 entries
        request.output_token_ids.append(token)
        assert request.known_token_array(request.num_tokens).tolist() == request.all_token_ids
    assert request.known_token_array(10).tolist() == request.all_token_ids[:10]


def test_accepted_tokens_keep_drafts_up_to_the_first_the_model_samples_otherwise():
    assert accepted_tokens([5, 6, 7], [5, 6]) == [5, 6, 7]  # both kept, and the token after them
    assert accepted_tokens([5, 9, 7], [5, 6]) == [5, 9]  # the second refused: the model's own token instead
    assert accepted_tokens([4, 6, 7], [5, 6]) == [4]


def test_config_takes_vllms_fields_and_names_what_is_wrong():
    config = SpeculativeConfig.of({"method": "ngram", "num_speculative_tokens": 3})
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (5, 5)  # vLLM's defaults
    assert SpeculativeConfig.of({"num_speculative_tokens": 3, "prompt_lookup_max": 2}).prompt_lookup_min == 2
    for value, message in [({"num_speculative_tokens": 3, "method": "eagle"}, "method must be one of ngram"),
                           ({"method": "ngram"}, "needs num_speculative_tokens"),
                           ({"num_speculative_tokens": 0}, "num_speculative_tokens must be a positive integer"),
                           ({"num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
                            "prompt_lookup_min .4. must not exceed"),
                           ({"num_speculative_tokens": 2, "model": "x"}, "unknown field.s. model"),
                           ("ngram", "must be a dict")]:
        with pytest.raises(ValueError, match=message):
            SpeculativeConfig.of(value)
    for conflict, message in [({"num_scheduler_steps": 4}, "num_scheduler_steps > 1"),
                              ({"runner": "pooling"}, "runner='pooling'")]:
        with pytest.raises(ValueError, match=f"cannot be combined with {message}"):
            EngineArgs(speculative_config=NGRAM, **conflict).validate()


PROMPTS = [
    "Repeat this list exactly: apple, banana, cherry, date, elderberry, fig, grape. Again: apple, banana, cherry,",
    "Count: 1 2 3 4 5 6 7 8 9 10 1 2 3 4 5 6 7 8 9 10 1 2 3",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "The capital of France is",
]
# What a request can ask that the drafts' rows must honour as decoding a token a step would: greedy, seeded
# sampling, penalties (which count the drafts before a row), logprobs, stop strings, n > 1, min_tokens.
PARAMS = {
    "greedy": SamplingParams(temperature=0, max_tokens=24),
    "seeded": SamplingParams(temperature=0.8, top_p=0.95, max_tokens=24, seed=7),
    "penalties": SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.2, frequency_penalty=0.3),
    "logprobs": SamplingParams(temperature=0, max_tokens=16, logprobs=2),
    "stop": SamplingParams(temperature=0, max_tokens=24, stop=["7", "grape"], min_tokens=2),
    "n2": SamplingParams(temperature=1.0, max_tokens=16, n=2, seed=3),
    # Structured outputs: each draft's row sampled under the grammar's mask after the drafts before it; the regex
    # refuses the code prompt's newlines and brackets, so some drafts are the grammar's to refuse.
    "grammar": SamplingParams(temperature=0, max_tokens=24, structured_outputs={"regex": r"[a-z0-9 ,]{1,100}"}),
    "grammar-seeded": SamplingParams(temperature=0.7, max_tokens=24, seed=11,
                                     structured_outputs={"regex": r"[a-z0-9 ,.]{1,100}"}),
}
COUNTERS = ("spec_decode_num_drafts", "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")
# Under a reasoning parser the grammar starts after the token that closes the thinking. The default model never
# writes "<think>" or "</think>", so the test's tags are the counting prompt's " 8" and " 5": its last " 8" comes after
# its last " 5", so the thinking is open, and the reply " 4 5 6 ..." closes it with its fourth token, inside the first
# drafts copied from the prompt (" 4 5 6"): rows up to the closing draft free, the rows after it under the grammar,
# which allows single digits only (the free reply goes on to " 10").
THINKING_PROMPT, THINKING_TAGS = PROMPTS[1], (" 8", " 5")
THINKING = SamplingParams(temperature=0, max_tokens=30, structured_outputs={"regex": r"( [0-9])+"})


@pytest.fixture(scope="module")
def both():
    """Each PARAMS case's outputs, decoding a token a step and with n-gram drafts, the drafted engine's stats, and
    its drafting counters of each case."""
    results = {"counters": {}}
    for spec in (None, NGRAM):
        llm = LLM(dtype="float32", max_model_len=384, max_num_seqs=16, speculative_config=spec)
        results[spec is not None] = {}
        for name, params in PARAMS.items():
            before = [llm.llm_engine.stats[c] for c in COUNTERS]
            results[spec is not None][name] = llm.generate(PROMPTS, params, use_tqdm=False)
            results["counters"][name] = [llm.llm_engine.stats[c] - b for c, b in zip(COUNTERS, before)]
        results["stats"] = llm.stats()
        results[spec is not None]["thinking"], results["grammar_starts"] = _under_a_reasoning_parser(llm)
        llm.shutdown()
    return results


def _under_a_reasoning_parser(llm):
    """The THINKING request's outputs with a reasoning parser whose tags are THINKING_TAGS, and the first grammar row
    of each of its drafted steps that drafted while thinking (``LLMEngine._grammar_start``)."""
    from engine.reasoning import ReasoningEnd

    engine, tokenizer = llm.llm_engine, llm.get_tokenizer()
    engine._reasoning_end = tags = ReasoningEnd(tokenizer)
    tags.start_ids, tags.end_ids = (tokenizer.encode(tag, add_special_tokens=False) for tag in THINKING_TAGS)
    starts, grammar_start = [], engine._grammar_start

    def recorded(sample, drafts):
        start = grammar_start(sample, drafts)
        if sample.thinking and drafts:
            starts.append(start)
        return start

    engine._grammar_start = recorded
    return llm.generate([THINKING_PROMPT], THINKING, use_tqdm=False), starts


@pytest.mark.parametrize("case", [*PARAMS, "thinking"])
def test_drafts_give_the_outputs_of_decoding_a_token_a_step(both, case):
    for plain, drafted in zip(both[False][case], both[True][case]):
        for a, b in zip(plain.outputs, drafted.outputs, strict=True):
            assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason), plain.prompt
            if a.logprobs is not None:
                assert [sorted(e) for e in b.logprobs] == [sorted(e) for e in a.logprobs]
                assert np.allclose([e[t].logprob for e, t in zip(b.logprobs, b.token_ids)],
                                   [e[t].logprob for e, t in zip(a.logprobs, a.token_ids)], atol=1e-4)


def test_drafts_are_accepted_on_repetitive_text_and_other_steps_are_planned_ahead(both):
    """Drafts where a reply copies; where no n-gram repeats (e.g. "The capital of France is") the next step is planned
    while one runs, as without drafts."""
    stats = both["stats"]
    assert stats["spec_decode_num_drafts"] > 0
    assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]
    per_position = stats["spec_decode_num_accepted_tokens_per_pos"]  # vLLM's: a draft is kept only after the ones
    assert len(per_position) == NGRAM["num_speculative_tokens"]    # before it, so the counts never rise
    assert sum(per_position) == stats["spec_decode_num_accepted_tokens"]
    assert list(per_position) == sorted(per_position, reverse=True)
    assert stats["steps_planned_ahead"] > 0


def test_drafts_run_under_structured_outputs(both):
    """A grammar request drafts too: its drafts are accepted where the reply copies, and its outputs follow the
    grammar (the equality with decoding a token a step is the table's "grammar" cases)."""
    drafts, draft_tokens, accepted = both["counters"]["grammar"]
    assert drafts > 0 and 0 < accepted < draft_tokens
    for output in both[True]["grammar"]:
        assert re.fullmatch(r"[a-z0-9 ,]*", output.outputs[0].text), output.outputs[0].text


def test_a_grammars_rows_after_each_draft_are_its_masks_after_consuming_them():
    """``Grammars.bitmask`` with drafts: row j of a matcher is the mask after its first j drafts (the matcher left
    where it was); from the first draft the grammar refuses, rows repeat the row before it."""
    from engine.structured_output import Grammars
    from engine.tokenizer import eos_token_ids, load_tokenizer
    from models.default_model import default_model_path

    path = default_model_path()
    tokenizer = load_tokenizer(path)
    grammars = Grammars(tokenizer, 49152, eos_token_ids(tokenizer, path))
    grammar = grammars.check(StructuredOutputsParams(regex=r"(ab )+c"))
    ids = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    valid, refused = ids("ab ab ab"), ids("ab x ab")
    plain, drafted = grammars.matcher(grammar), grammars.matcher(grammar)
    rows = grammars.bitmask([plain, drafted], [[], valid + refused])

    step_by_step = grammars.matcher(grammar)
    expected = [grammars.bitmask([step_by_step])[0]]
    for token in valid:
        assert step_by_step.consume_token(token)
        expected.append(grammars.bitmask([step_by_step])[0])
    assert step_by_step.validate_tokens(refused) < len(refused)  # "x" is refused: later rows repeat the last mask
    expected += [expected[-1]] * len(refused)
    assert np.array_equal(rows[0], expected[0])
    assert np.array_equal(rows[1:], np.stack(expected))
    assert drafted.validate_tokens(valid) == len(valid) and not drafted.is_error()  # left at the start


def test_drafts_that_close_the_thinking_put_the_rows_after_it_under_the_grammar(both):
    """A drafted step whose drafts close the thinking: its rows up to the closing draft sample freely, the rest under
    the grammar (the outputs' equality with decoding a token a step is the table's "thinking" case)."""
    assert any(start is not None and start > 0 for start in both["grammar_starts"]), both["grammar_starts"]
    text = both[True]["thinking"][0].outputs[0].text
    assert text.startswith(" 4 5") and re.fullmatch(r"( [0-9])+", text[len(" 4 5"):]), text
    assert " 10" in both[True]["greedy"][1].outputs[0].text  # the grammar made the difference
