"""Tokenizers from a GGUF file and from a checkpoint folder, chat templates, eos ids (engine/tokenizer.py)."""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest
from gguf import GGUFWriter

from engine.tokenizer import TokenizerError, apply_chat_template, eos_token_ids, load_tokenizer
from models.default_model import default_model_path

# SmolLM2's ChatML special tokens.
IM_START, IM_END = 1, 2
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def gguf_tokenizer():
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def folder_tokenizer(gguf_tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    gguf_tokenizer.save_pretrained(str(folder))
    return str(folder), load_tokenizer(str(folder))


def random_text(rng: random.Random, words: int = 40) -> str:
    """Fresh mixed text: ASCII words, accents, CJK, emoji, digits, punctuation and odd whitespace."""
    pieces = ["hello", "Paris", "tokenizer", "don't", "naïve", "café", "日本語", "🙂", "Ωmega", "12345",
              "3.14", "x_y", "<tag>", "!!", "?", "—", "über", "ß", "€"]
    spaces = [" ", "  ", "\n", "\t", " \n "]
    out = []
    for _ in range(words):
        word = rng.choice(pieces) if rng.random() < 0.6 else "".join(
            rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(rng.randint(1, 9)))
        out.append(word + rng.choice(spaces))
    return "".join(out)


def test_gguf_tokenizer_round_trips_text(gguf_tokenizer):
    rng = random.Random()
    for _ in range(5):
        text = random_text(rng)
        ids = gguf_tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) > 10 and max(ids) < len(gguf_tokenizer)
        assert gguf_tokenizer.decode(ids) == text


def test_gguf_tokenizer_known_ids(gguf_tokenizer):
    assert gguf_tokenizer.convert_ids_to_tokens([IM_START, IM_END]) == ["<|im_start|>", "<|im_end|>"]
    assert eos_token_ids(gguf_tokenizer) == (IM_END,)


def test_chat_template_special_tokens(gguf_tokenizer):
    question = random_text(random.Random(), words=8).strip()
    messages = [{"role": "user", "content": question}]
    ids = apply_chat_template(gguf_tokenizer, messages)
    # The GGUF's template adds SmolLM's default system prompt and ends with the assistant header.
    assert gguf_tokenizer.decode(ids) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ids[0] == IM_START and ids.count(IM_START) == 3 and ids.count(IM_END) == 2
    # The special markers are single tokens, never spelled out in pieces.
    assert ids[-4:] == [IM_START] + gguf_tokenizer.encode("assistant\n", add_special_tokens=False)


def test_chat_template_conversation_without_generation_prompt(gguf_tokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]
    ids = apply_chat_template(gguf_tokenizer, messages, add_generation_prompt=False)
    assert gguf_tokenizer.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    assert ids.count(IM_START) == ids.count(IM_END) == 3


# Writes each call's arguments with ``tojson``, as Qwen's and Hermes' templates do.
TOOL_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% for c in m.tool_calls or [] %}"
                 "[{{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}|{% endfor %}")


def test_chat_history_with_tool_calls_renders_as_vllm_hands_it_over(gguf_tokenizer):
    """An OpenAI-style tool-call turn (content None or absent, arguments as JSON text) renders as vLLM renders it
    offline and on its server: no content is "", the arguments go to the template as an object (written once,
    not as a JSON string inside JSON); text parts of the Responses API's types, and a part without a type, are
    text."""
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [{"role": "user", "content": [{"type": "input_text", "text": "Weather"}, {"text": "in Paris?"}]},
               {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "assistant", "tool_calls": []}]
    ids = apply_chat_template(gguf_tokenizer, history, add_generation_prompt=False, chat_template=TOOL_TEMPLATE)
    assert gguf_tokenizer.decode(ids) == ('<user>Weather\nin Paris?|<assistant>[get_weather {"city": "Paris"}]|'
                                          "<tool>sunny|<assistant>|")
    apply_chat_template(gguf_tokenizer, history)  # the model's own template: no UndefinedError on a missing content
    for bad, message in (("hi", "message 0 must be a dict"), ({"content": "hi"}, "message 0 has no 'role'"),
                         ({"role": "user", "content": 5}, "message 0's content must be a text"),
                         ({"role": "user", "content": [{"type": "image_url"}]}, "content parts must be text")):
        with pytest.raises(ValueError, match=message):
            apply_chat_template(gguf_tokenizer, [bad])


def test_chat_template_kwargs_win_over_the_arguments(gguf_tokenizer):
    """vLLM's LLM.chat merges ``chat_template_kwargs`` over its own arguments: ``add_generation_prompt`` or
    ``continue_final_message`` given there count (transformers refused the first twice over)."""
    started = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    open_turn = apply_chat_template(gguf_tokenizer, started, add_generation_prompt=False, continue_final_message=True)
    assert gguf_tokenizer.decode(open_turn).endswith("<|im_start|>assistant\nHello")
    assert apply_chat_template(gguf_tokenizer, started, chat_template_kwargs={
        "add_generation_prompt": False, "continue_final_message": True}) == open_turn
    closed = apply_chat_template(gguf_tokenizer, started, add_generation_prompt=False)
    assert apply_chat_template(gguf_tokenizer, started, chat_template_kwargs={"add_generation_prompt": False}) == closed
    assert apply_chat_template(gguf_tokenizer, started, add_generation_prompt=False,
                               chat_template_kwargs={"tokenize": True}) == closed  # dropped, as vLLM drops it


def test_folder_tokenizer_matches_gguf_tokenizer(gguf_tokenizer, folder_tokenizer):
    folder, tokenizer = folder_tokenizer
    text = random_text(random.Random())
    assert tokenizer.encode(text, add_special_tokens=False) == gguf_tokenizer.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": text}]
    assert apply_chat_template(tokenizer, messages) == apply_chat_template(gguf_tokenizer, messages)
    assert eos_token_ids(tokenizer, folder) == (IM_END,)


def test_generation_config_adds_eos_ids(gguf_tokenizer, tmp_path):
    gguf_tokenizer.save_pretrained(str(tmp_path))
    extra = sorted(np.random.default_rng().choice(np.arange(3, 100), size=2, replace=False).tolist())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END, *extra]}))
    assert eos_token_ids(load_tokenizer(str(tmp_path)), str(tmp_path)) == (IM_END, *extra)


def test_no_chat_template_is_a_clear_error(gguf_tokenizer, tmp_path):
    gguf_tokenizer.save_pretrained(str(tmp_path))
    os.remove(tmp_path / "chat_template.jinja")
    tokenizer = load_tokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match="no chat template"):
        apply_chat_template(tokenizer, [{"role": "user", "content": "hi"}])


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-model"):
        load_tokenizer(str(tmp_path / "missing-model"))
    with pytest.raises(ValueError, match="no tokenizer in folder"):  # a ValueError: the server's one-line start-up
        load_tokenizer(str(tmp_path))                               # error, not a traceback (a TokenizerError)
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 16)
    with pytest.raises(TokenizerError, match="not a .gguf"):
        load_tokenizer(str(tmp_path / "weights.bin"))
    (tmp_path / "junk.gguf").write_bytes(np.random.default_rng().integers(0, 256, 512, np.uint8).tobytes())
    with pytest.raises(TokenizerError, match="junk.gguf"):
        load_tokenizer(str(tmp_path / "junk.gguf"))


def test_gguf_without_tokenizer_is_a_clear_error(tmp_path):
    writer = GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    writer.add_block_count(1)
    writer.add_tensor("output_norm.weight", np.random.default_rng().normal(size=8).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TokenizerError, match="bare.gguf"):
        load_tokenizer(str(tmp_path / "bare.gguf"))


def test_gguf_tokenizer_cache_gives_the_same_tokenizer(gguf_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDJAX_CACHE_DIR", str(tmp_path))
    built = load_tokenizer(default_model_path())  # rebuilt from GGUF metadata, then saved
    assert list((tmp_path / "tokenizers").iterdir()), "the rebuilt tokenizer was not cached"
    cached = load_tokenizer(default_model_path())  # read back from the cache folder
    text = random_text(random.Random(3))
    messages = [{"role": "user", "content": text}]
    for tok in (built, cached):
        assert tok.encode(text) == gguf_tokenizer.encode(text)
        assert apply_chat_template(tok, messages) == apply_chat_template(gguf_tokenizer, messages)
        assert tok.eos_token_id == gguf_tokenizer.eos_token_id


def test_llm_takes_a_separate_tokenizer_as_vllm_does(folder_tokenizer, tmp_path):
    """vLLM's ``tokenizer=`` (``--tokenizer``): a checkpoint folder without tokenizer files runs with another
    folder's; ``trust_remote_code`` and ``enforce_eager`` are taken; a missing tokenizer path fails before loading."""
    from engine import LLM, SamplingParams
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path / "model", "llama", seed=int(np.random.default_rng().integers(1 << 20)))
    with pytest.raises(TokenizerError, match="no tokenizer"):
        LLM(str(tmp_path / "model"), max_model_len=64, num_gpu_blocks_override=16)
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "model"), tokenizer=str(tmp_path / "missing"))
    path, tokenizer = folder_tokenizer
    prompt = {"prompt_token_ids": [int(t) for t in np.random.default_rng().integers(3, 256, 12)]}
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    llm = LLM(str(tmp_path / "model"), tokenizer=path, trust_remote_code=True, enforce_eager=True,
              max_model_len=64, num_gpu_blocks_override=16)
    assert llm.get_tokenizer().get_vocab() == tokenizer.get_vocab()
    out = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    llm.shutdown()
    # the same text as the checkpoint with those tokenizer files in its own folder
    shutil.copytree(tmp_path / "model", tmp_path / "with-tokenizer")
    for name in os.listdir(path):
        shutil.copy(os.path.join(path, name), tmp_path / "with-tokenizer")
    own = LLM(str(tmp_path / "with-tokenizer"), max_model_len=64, num_gpu_blocks_override=16)
    expected = own.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 6 and (out.text, out.token_ids) == (expected.text, expected.token_ids)


def test_text_that_is_not_valid_unicode_is_a_clear_error(folder_tokenizer):
    """A lone surrogate (JSON's "\\ud800") reached the tokenizer, whose TypeError the server answered with a 500."""
    from engine.tokenizer import bad_words_token_ids, encode_prompt

    _, folder_tokenizer = folder_tokenizer
    with pytest.raises(ValueError, match=r"the prompt is not valid Unicode: a lone surrogate '\\ud800' at character 3"):
        encode_prompt(folder_tokenizer, "abc\ud800")
    with pytest.raises(ValueError, match="bad_words is not valid Unicode"):
        bad_words_token_ids(folder_tokenizer, ["ok", "\udfff"])
    with pytest.raises(ValueError, match="a chat message is not valid Unicode"):
        apply_chat_template(folder_tokenizer, [{"role": "user", "content": "hi \ud83d"}])
    assert encode_prompt(folder_tokenizer, "caf\u00e9 \U0001F600") == folder_tokenizer.encode("caf\u00e9 \U0001F600")
