"""Tokenizers and chat templates, from a Hugging Face checkpoint folder or a GGUF file.

Owns turning a model path into a Hugging Face fast tokenizer (``transformers``
rebuilds one from GGUF metadata), rendering chat messages to prompt token ids with
the model's own chat template, and the end-of-sequence ids the tokenizer knows.
Knows nothing of weights, devices or scheduling. Rebuilding a tokenizer from
GGUF metadata takes seconds, so the rebuilt one is saved once to a cache folder
(``$PAGEDJAX_CACHE_DIR``, default ``~/.cache/pagedjax``) keyed by the file's
path, size and modification time, and read from there afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Iterable, Optional, Sequence

from engine.cache_dir import cache_dir
from engine.generation_config import read_generation_config
from transformers import AutoTokenizer, PreTrainedTokenizerBase


logger = logging.getLogger(__name__)

# Any one of these makes a folder loadable by ``AutoTokenizer`` without a network.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class TokenizerError(ValueError):
    """The tokenizer could not be loaded or cannot do what was asked (e.g. no chat template): a bad argument or
    model folder, as the engine's other start-up errors are."""


def load_tokenizer(model_path: str, **kwargs: Any) -> PreTrainedTokenizerBase:
    """Fast tokenizer of a checkpoint folder or of a ``.gguf`` file (never downloads)."""
    if not os.path.exists(model_path):
        raise FileNotFoundError(f"tokenizer path {model_path!r} does not exist")
    if os.path.isfile(model_path):
        if not model_path.endswith(".gguf"):
            raise TokenizerError(f"{model_path!r} is a file but not a .gguf; pass a checkpoint folder or a .gguf file")
        cached = _gguf_tokenizer_cache_dir(model_path)
        if os.path.exists(os.path.join(cached, "tokenizer.json")):
            source, extra = cached, {}
        else:
            tokenizer = _load(model_path, *os.path.split(os.path.abspath(model_path)), **kwargs)
            try:
                tokenizer.save_pretrained(cached)
            except OSError as e:  # a read-only home only costs the rebuild next time
                logger.warning("could not cache the GGUF tokenizer in %s: %s", cached, e)
            return tokenizer
    elif not any(os.path.exists(os.path.join(model_path, f)) for f in TOKENIZER_FILES):
        raise TokenizerError(f"no tokenizer in folder {model_path!r} (none of {', '.join(TOKENIZER_FILES)})")
    else:
        source, extra = model_path, {}
    return _load(model_path, source, **extra, **kwargs)


def check_unicode(text: str, what: str) -> str:
    """``text`` if it is valid Unicode, else a ValueError naming ``what`` and where: a lone surrogate (JSON's
    ``"\\ud800"``, say) reaches the tokenizer as a TypeError about its input types otherwise."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: a lone surrogate {text[e.start]!r} at character "
                         f"{e.start}") from None
    return text


def encode_prompt(tokenizer: Optional[PreTrainedTokenizerBase], prompt: str, add_special_tokens: bool = True
                  ) -> list[int]:
    """A text prompt's token ids (with the tokenizer's BOS and such unless ``add_special_tokens`` is False); a clear
    error for an engine started without a tokenizer, or for text that is not valid Unicode."""
    if tokenizer is None:
        raise ValueError("this engine was started without a tokenizer: pass prompt token ids")
    return list(tokenizer.encode(check_unicode(prompt, "the prompt"), add_special_tokens=add_special_tokens))


def bad_words_token_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[list[int]]:
    """``SamplingParams.bad_words`` as token-id lists, by vLLM's rule: each word as it is (leading spaces
    stripped), and after a space too where that makes a different first token of the same length (the word in
    mid-text)."""
    token_ids: list[list[int]] = []
    for word in words:
        alone = tokenizer.encode(check_unicode(word, "bad_words").lstrip(), add_special_tokens=False)
        token_ids.append(alone)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced[0] != alone[0] and len(spaced) == len(alone):
            token_ids.append(spaced)
    return token_ids


def _load(model_path: str, source: str, gguf_file: Optional[str] = None, **kwargs: Any) -> PreTrainedTokenizerBase:
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=True, **extra, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise TokenizerError(f"cannot load a tokenizer from {model_path!r}: {e}") from e


def _gguf_tokenizer_cache_dir(path: str) -> str:
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir("tokenizers", key)


def apply_chat_template(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict],
                        add_generation_prompt: bool = True, **options) -> list[int]:
    """Token ids of ``messages`` rendered with the model's chat template (``render_chat_template``; its options).
    The text is encoded without adding special tokens, since the template already writes the ones the model
    expects."""
    text = render_chat_template(tokenizer, messages, add_generation_prompt, **options)
    return tokenizer.encode(check_unicode(text, "a chat message"), add_special_tokens=False)


def render_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict],
    add_generation_prompt: bool = True,
    *,
    continue_final_message: bool = False,
    tools: Optional[Sequence[dict]] = None,
    chat_template: Optional[str] = None,
    chat_template_kwargs: Optional[dict] = None,
) -> str:
    """``messages`` as the text the model's chat template makes of them.

    vLLM's chat arguments: ``continue_final_message`` renders the last message open, so a reply goes on from it
    (not with ``add_generation_prompt``); ``tools`` (OpenAI's function tools) and ``chat_template_kwargs`` (e.g.
    Qwen 3's ``enable_thinking``) go to the template; ``chat_template`` replaces the tokenizer's. A message's content
    may be OpenAI's list of text parts (joined, as vLLM does); other parts (images, audio) raise ValueError.
    """
    # chat_template_kwargs over the arguments, as vLLM's LLM.chat merges them
    template_kwargs = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
                       **({"tools": list(tools)} if tools else {}),
                       **({"chat_template": chat_template} if chat_template else {}), **(chat_template_kwargs or {})}
    template_kwargs.pop("tokenize", None)  # the text is what comes back here (vLLM drops it too)
    if template_kwargs["continue_final_message"] and template_kwargs["add_generation_prompt"]:
        raise ValueError("continue_final_message continues the last message: pass add_generation_prompt=False")
    if not getattr(tokenizer, "chat_template", None) and not template_kwargs.get("chat_template"):
        raise TokenizerError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
            "use a plain text prompt, give one (chat_template; the server's --chat-template), or a model whose "
            "tokenizer_config.json / GGUF carries one"
        )
    return tokenizer.apply_chat_template([template_message(i, m) for i, m in enumerate(messages)], tokenize=False,
                                         **template_kwargs)


TEXT_PART_TYPES = ("text", "input_text", "output_text")  # vLLM's chat reads the Responses API's text parts too


def non_text_part_kinds(content: list) -> list[str]:
    """The types of an OpenAI content-part list's parts other than text, sorted (a part that is no dict is named by
    its Python type; one without a type but with a text is text): what a text-only model cannot read."""
    kinds = {str(part.get("type", "text" if "text" in part else None)) if isinstance(part, dict)
             else type(part).__name__ for part in content}
    return sorted(kinds - set(TEXT_PART_TYPES))


def template_message(i: int, message: dict) -> dict:
    """Message ``i`` as a chat template takes it, as vLLM hands it over: content given as OpenAI's list of parts
    joined into its text (text parts only, one a line: ``join_text_parts``), none as "", an assistant turn's tool
    calls with their JSON arguments as objects (Hugging Face templates write them out themselves). Raises
    ValueError naming the message for what no template can render."""
    if not isinstance(message, dict):
        raise ValueError(f"message {i} must be a dict with a 'role' and a 'content', got {type(message).__name__}")
    if not isinstance(message.get("role"), str):
        raise ValueError(f"message {i} has no 'role' (system, user, assistant or tool)")
    content = message.get("content")
    if isinstance(content, list):
        kinds = non_text_part_kinds(content)
        if kinds:
            raise ValueError(f"message {i}'s content parts must be text (type 'text'); got "
                             f"{', '.join(map(repr, kinds))}")
        content = join_text_parts(part.get("text") or "" for part in content)
    elif content is not None and not isinstance(content, str):
        raise ValueError(f"message {i}'s content must be a text or a list of text parts, got "
                         f"{type(content).__name__}")
    message = {**message, "content": content or ""}
    if isinstance(message.get("tool_calls"), list):
        message["tool_calls"] = [_with_argument_object(call) for call in message["tool_calls"]]
    return message


def _with_argument_object(call: dict) -> dict:
    """A tool call whose ``function.arguments`` is JSON text, with them as the object (vLLM's ``json.loads``)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


def join_text_parts(texts: Iterable[str]) -> str:
    """A message's text parts as its one text: a part a line (vLLM's ``_parse_chat_message_content_parts``)."""
    return "\n".join(texts)


def load_chat_template(value: str) -> str:
    """A chat template given as vLLM's ``--chat-template`` takes it: a file's path, or the Jinja text itself."""
    if os.path.isfile(value):
        with open(value) as f:
            return f.read()
    if "{" not in value:  # neither a file nor a template: most likely a mistyped path
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return value


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model_path: Optional[str] = None) -> tuple[int, ...]:
    """End-of-sequence ids: the tokenizer's eos plus, for a checkpoint folder,
    those of its ``generation_config.json`` (Llama 3 lists several there)."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if model_path is not None:
        ids.extend(_generation_config_eos(model_path))
    return tuple(dict.fromkeys(ids))


def _generation_config_eos(model_path: str) -> Iterable[int]:
    try:
        eos = read_generation_config(model_path).get("eos_token_id")
    except ValueError as e:
        raise TokenizerError(str(e)) from None
    if eos is None:
        return ()
    return [int(i) for i in (eos if isinstance(eos, list) else [eos])]
