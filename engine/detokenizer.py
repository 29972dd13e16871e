"""Incremental detokenization of one output stream, and the stop conditions on it.

Owns: ``IncrementalDetokenizer`` (token ids in, text deltas out) and ``check_stop``
(end-of-sequence / stop tokens, stop strings, length, ``min_tokens``).
Knows nothing of JAX, batching or scheduling: one request's tokens and text.

Detokenization uses the ``tokenizers`` library's own ``DecodeStream`` (Rust), which
buffers tokens until they form whole UTF-8 characters and decodes each new token in
the context of the previous ones, so SentencePiece's "▁" and byte-level BPE's "Ġ"
spaces, byte-fallback tokens and multi-token emoji/CJK characters come out right.
The stream is primed with a short prompt suffix (as vLLM's
``FastIncrementalDetokenizer``), so the first output token gets its leading space.
Text is exactly what the backend decoder produces; ``transformers``'
``clean_up_tokenization_spaces`` post-processing is not applied (vLLM does the same).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Sequence
from typing import Literal

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_MIN_PRIMING_TOKENS = 4  # prompt suffix lengths tried for priming: 4 .. 23 (vLLM's values)
_MAX_PRIMING_TOKENS = 23
_INVALID_PREFIX_ERROR = "Invalid prefix encountered"  # DecodeStream's message when its state breaks


class IncrementalDetokenizer:
    """Turns one sequence's output token ids into text, one token at a time.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` or a fast ``transformers`` tokenizer
    (its ``backend_tokenizer`` is used).
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tokenizer = _backend_tokenizer(tokenizer)
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._text_parts: list[str] = []
        for token_id in self._priming_suffix(list(prompt_token_ids)):
            self._step(token_id)

    @property
    def text(self) -> str:
        """All output text so far (the concatenation of every delta returned)."""
        if len(self._text_parts) > 1:
            self._text_parts = ["".join(self._text_parts)]
        return self._text_parts[0] if self._text_parts else ""

    def append(self, token_id: int) -> str:
        """Add the next output token; return the text it completes ("" while a
        character is still incomplete, or for a skipped special token)."""
        delta = self._step(int(token_id)) or ""
        if delta:
            self._text_parts.append(delta)
        return delta

    def _priming_suffix(self, prompt_token_ids: list[int]) -> list[int]:
        """The shortest prompt suffix of >= 4 tokens that decodes to whole characters."""
        if len(prompt_token_ids) <= _MIN_PRIMING_TOKENS:
            return prompt_token_ids
        for length in range(_MIN_PRIMING_TOKENS, min(len(prompt_token_ids), _MAX_PRIMING_TOKENS) + 1):
            suffix = prompt_token_ids[-length:]
            if "\ufffd" not in self._tokenizer.decode(suffix, skip_special_tokens=self._skip_special_tokens):
                return suffix
        return prompt_token_ids[-_MAX_PRIMING_TOKENS:]

    def _step(self, token_id: int) -> str | None:
        try:
            return self._stream.step(self._tokenizer, token_id)
        except (OverflowError, TypeError):
            # An id the tokenizer cannot hold (e.g. negative): contributes no text.
            logger.warning("cannot detokenize token id %r; it contributes no text", token_id)
            return None
        except Exception as error:  # tokenizers raises a bare Exception here
            if not str(error).startswith(_INVALID_PREFIX_ERROR):
                raise
            # Some tokenizers decode a prefix non-monotonically (vllm-project/vllm#17448),
            # which breaks DecodeStream's state: restart it from this token.
            logger.warning("detokenizer state broke at token %d; restarting the stream", token_id)
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            return self._stream.step(self._tokenizer, token_id)


def _backend_tokenizer(tokenizer) -> Tokenizer:
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, Tokenizer):
        return backend
    raise TypeError(
        "IncrementalDetokenizer needs a tokenizers.Tokenizer or a fast transformers tokenizer "
        f"(with .backend_tokenizer), got {type(tokenizer).__name__}"
    )


FinishReason = Literal["stop", "length"]


@dataclasses.dataclass(frozen=True)
class StopDecision:
    """Why a sequence finished and the output text to keep.

    ``stop_reason`` is vLLM's: the matched stop string or stop token id, ``None`` for
    end-of-sequence or length.
    """

    finish_reason: FinishReason
    stop_reason: int | str | None
    text: str


def check_stop(
    params: SamplingParams,
    *,
    token_id: int,
    num_output_tokens: int,
    text: str,
    new_text_len: int,
    eos_token_ids: Collection[int],
    max_output_tokens: int | None = None,
) -> StopDecision | None:
    """Decide, after ``token_id`` was appended, whether the sequence is finished.

    ``num_output_tokens`` counts outputs including ``token_id``; ``text`` is the output
    text including its delta, which was ``new_text_len`` characters long.
    ``max_output_tokens`` is the length cap (see ``SamplingParams.max_output_tokens``);
    it defaults to ``params.max_tokens``, so it is required when that is ``None``.

    Rules, in order:
    1. Before ``num_output_tokens > min_tokens`` nothing but length stops a sequence
       (vLLM: stop tokens may come once ``min_tokens`` tokens precede them).
    2. End-of-sequence (unless ``ignore_eos``) or a ``stop_token_ids`` token: "stop";
       the token's text is dropped unless ``include_stop_str_in_output`` (vLLM v1).
    3. A stop string in the new text (or straddling its start): "stop"; the text is
       cut before the earliest match (after it if ``include_stop_str_in_output``),
       even when the match ends inside this token's text.
    4. ``num_output_tokens >= max_output_tokens``: "length", text kept whole.
    A natural stop on the last allowed token reports "stop", not "length".
    """
    if max_output_tokens is None:
        if params.max_tokens is None:
            raise ValueError("max_output_tokens is required when params.max_tokens is None")
        max_output_tokens = params.max_tokens

    if num_output_tokens > params.min_tokens:
        is_eos = not params.ignore_eos and token_id in eos_token_ids
        if is_eos or token_id in params.stop_token_ids:
            kept = text if params.include_stop_str_in_output else text[: len(text) - new_text_len]
            return StopDecision("stop", None if is_eos else token_id, kept)
        matched = _find_stop_string(text, new_text_len, params.stop)
        if matched is not None:
            stop_str, index = matched
            end = index + len(stop_str) if params.include_stop_str_in_output else index
            return StopDecision("stop", stop_str, text[:end])

    if num_output_tokens >= max_output_tokens:
        return StopDecision("length", None, text)
    return None


def _find_stop_string(text: str, new_text_len: int, stop: Sequence[str]) -> tuple[str, int] | None:
    """The stop string with the earliest match that overlaps the last ``new_text_len``
    characters, and where it starts. Older text was searched on earlier tokens."""
    if new_text_len <= 0:
        return None
    best: tuple[str, int] | None = None
    for stop_str in stop:
        start = max(0, len(text) - new_text_len - len(stop_str) + 1)
        index = text.find(stop_str, start)
        if index != -1 and (best is None or index < best[1]):
            best = (stop_str, index)
    return best
