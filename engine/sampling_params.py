"""Per-request sampling parameters, with vLLM's names, defaults and meanings.

Owns validation and normalisation of what a caller asks for (``SamplingParams``).
Knows nothing of JAX, tokenizers or the engine loop: the sampler reads these values
through ``engine.sampler.build_sampling_metadata``, the stop logic through
``engine.detokenizer.check_stop``.

Deliberate differences from vLLM (``vllm/sampling_params.py``):
- ``top_k=-1`` is accepted (as vLLM does) and normalised to ``0``: one "off" value
  downstream.
- ``temperature`` has no upper bound (vLLM recently added ``<= 2``; OpenAI's API caps
  at 2, but nothing numerical requires it).
- ``logprobs`` and ``prompt_logprobs`` are capped at ``MAX_LOGPROBS`` (20, OpenAI's and
  vLLM's default ``max_logprobs``); vLLM's ``-1`` (whole vocabulary) is not supported.
- Only the fields listed below exist (no logits processors; beam search is ``LLM.beam_search``
  with ``engine.beam_search.BeamSearchParams``, as in vLLM).
- ``structured_outputs`` takes vLLM's forms (``json``, ``regex``, ``choice``, ``grammar``,
  ``json_object``); ``grammar`` is a Lark grammar (llguidance's syntax, vLLM's "guidance"
  backend) or a GBNF / EBNF one (``root ::= ...``, xgrammar's form), which llguidance converts.
- ``logit_bias`` values must be finite (vLLM adds whatever it is given); the server clamps
  them to [-100, 100] first, as OpenAI and vLLM's server do.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from numbers import Integral, Real
from typing import Any

from engine.outputs import RequestOutputKind

logger = logging.getLogger(__name__)

GREEDY_TEMPERATURE_EPS = 1e-5
"""Temperatures below this mean greedy decoding (vLLM's ``_SAMPLING_EPS``)."""

MIN_SAMPLING_TEMPERATURE = 1e-2
"""Non-greedy temperatures below this are raised to it (vLLM's ``_MAX_TEMP``): dividing
logits by a tiny temperature overflows float32. (vLLM also raises those below
``GREEDY_TEMPERATURE_EPS``; here they stay greedy.)"""

MAX_LOGPROBS = 20
"""Largest ``logprobs`` a request may ask for (OpenAI's limit, vLLM's default)."""


@dataclasses.dataclass
class StructuredOutputsParams:
    """Constrain a request's output to a language (vLLM's ``StructuredOutputsParams``); exactly one field set.

    json: a JSON schema (a dict, or its JSON text) the output must satisfy.
    regex: a regular expression the whole output must match.
    choice: the output is exactly one of these strings.
    grammar: a Lark grammar (llguidance's syntax), or a GBNF / EBNF one, the output must parse as.
    json_object: any JSON object (OpenAI's ``response_format={"type": "json_object"}``).

    vLLM's options of the JSON forms: ``disable_any_whitespace`` (no whitespace between tokens),
    ``whitespace_pattern`` (a regex the whitespace must match), ``disable_additional_properties`` (an object schema
    naming its properties without ``additionalProperties`` is closed, as xgrammar closes it); ``disable_fallback``,
    ``backend`` and ``backend_was_auto`` are taken and change nothing (llguidance is the one backend, with none to
    fall back to). ``structural_tag`` is refused.
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None
    disable_additional_properties: bool = False
    disable_fallback: bool = False
    backend: str | None = None
    backend_was_auto: bool = False
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        _require(self.structural_tag is None, "structured_outputs",
                 "structural_tag is not supported (json, regex, choice, grammar or json_object are)", "structural_tag")
        _require(self.whitespace_pattern is None or isinstance(self.whitespace_pattern, str), "structured_outputs",
                 "whitespace_pattern must be a regular expression", self.whitespace_pattern)
        given = [name for name in STRUCTURED_OUTPUT_KINDS if getattr(self, name) not in (None, False)]
        _require(len(given) == 1, "structured_outputs", f"must set exactly one of {', '.join(STRUCTURED_OUTPUT_KINDS)}",
                 given)
        _require(self.json is None or isinstance(self.json, (str, dict)), "structured_outputs",
                 "json must be a JSON schema (a dict or its text)", self.json)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, str) and value), "structured_outputs",
                     f"{name} must be a non-empty string", value)
        _require(self.choice is None or (isinstance(self.choice, list) and self.choice
                                         and all(isinstance(c, str) and c for c in self.choice)),
                 "structured_outputs", "choice must be a non-empty list of non-empty strings", self.choice)

    @property
    def kind(self) -> str:
        return next(name for name in STRUCTURED_OUTPUT_KINDS if getattr(self, name) not in (None, False))


STRUCTURED_OUTPUT_KINDS = ("json", "regex", "choice", "grammar", "json_object")
STRUCTURED_OUTPUT_FIELDS = tuple(field.name for field in dataclasses.fields(StructuredOutputsParams))
GuidedDecodingParams = StructuredOutputsParams  # vLLM's name before 0.11 (SamplingParams.guided_decoding)


@dataclasses.dataclass
class SamplingParams:
    """How to pick each next token and when to stop, for one request.

    n: number of independent completions for the prompt.
    presence_penalty: subtracted once from the logit of every token already in the
        output (not the prompt). In [-2, 2]; > 0 discourages repetition.
    frequency_penalty: subtracted from a token's logit once per occurrence in the
        output (not the prompt). In [-2, 2].
    repetition_penalty: for tokens seen in the prompt or the output, positive logits
        are divided by it and negative ones multiplied by it (> 1 discourages
        repetition). > 0; 1 = off.
    temperature: logits are divided by it; below ``GREEDY_TEMPERATURE_EPS`` the
        token is the argmax (greedy) and top_p/top_k/min_p are reset to off.
    top_p: keep the smallest set of most likely tokens whose probability reaches
        top_p. In (0, 1]; 1 = off.
    top_k: keep the top_k most likely tokens; 0 (or -1, normalised to 0) = off.
    min_p: drop tokens whose probability is below min_p times the top token's.
        In [0, 1]; 0 = off.
    seed: makes this request's samples reproducible, whatever else is batched with
        it. ``-1`` is normalised to ``None`` (as vLLM does).
    stop: strings that end generation; the output is cut before the first one
        (after it if ``include_stop_str_in_output``). Normalised to a list.
    stop_token_ids: token ids that end generation. Normalised to a de-duplicated
        list.
    ignore_eos: keep generating after the model's end-of-sequence token.
    max_tokens: most output tokens per completion; ``None`` = until the model's
        context length (``max_model_len``) is full.
    min_tokens: no stop of any kind except length before this many output tokens
        (the end-of-sequence and stop tokens are masked out until then).
    logprobs: if not ``None``, return the log-probability of each sampled token and
        of the ``logprobs`` most likely tokens at that step (0 = the sampled token
        only). At most ``MAX_LOGPROBS``.
    prompt_logprobs: if not ``None``, return for each prompt token after the first its
        log-probability given the tokens before it, and the ``prompt_logprobs`` most
        likely tokens there (0 = the prompt token only). At most ``MAX_LOGPROBS``. Such a
        request computes its whole prompt (no prefix cache hits), as in vLLM.
    skip_special_tokens: leave special tokens out of the output text.
    spaces_between_special_tokens: vLLM's field, taken for its API. The engine's tokenizers are fast ones, which
        decode special tokens as they are whatever it says (as vLLM's fast detokenizer does).
    detokenize: make the output text (False: token ids only, text and logprob tokens left empty; no stop strings).
    include_stop_str_in_output: keep the matched stop string (or stop token's text)
        at the end of the output text.
    logit_bias: ``{token id: bias}`` added to those tokens' logits before the penalties
        and sampling (greedy included). The engine refuses ids outside the vocabulary.
    allowed_token_ids: sample only among these token ids (every other logit is masked
        out before the rest of sampling). Non-empty when given.
    bad_words: words never to generate. Each is tokenized as it is and after a space
        (vLLM's rule); a word's last token is masked out whenever the output ends with
        the tokens before it. A word of several tokens makes the request decode one step
        at a time (the host must see each token).
    truncate_prompt_tokens: keep only the prompt's last k tokens (left truncation); -1:
        the last ``max_model_len``. None: the whole prompt.
    structured_outputs: ``StructuredOutputsParams`` (or a dict of its fields): every
        token is drawn among those the language allows next, so the output follows it.
        Such a request decodes one step at a time.
    best_of: vLLM's field: None or ``n`` (the best ``n`` of more samples is not supported, as in vLLM V1).
    extra_args: vLLM's free-form arguments for plugins; kept on the request, read by nothing here.
    output_kind: what each of ``AsyncLLM.generate``'s outputs carries
        (``engine.outputs.RequestOutputKind``: everything so far, only what is new, or only
        the final output), as vLLM's; ``LLM.generate`` returns final outputs whatever it is.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: str | list[str] | None = None
    structured_outputs: StructuredOutputsParams | dict | None = None
    guided_decoding: StructuredOutputsParams | dict | None = None  # vLLM's name before 0.11: the same as the above
    truncate_prompt_tokens: int | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    best_of: int | None = None
    extra_args: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def clone(self) -> "SamplingParams":
        """A deep copy (vLLM's): changing it leaves this one as it is."""
        return copy.deepcopy(self)

    def validate(self) -> None:
        """Normalize and check the fields, as at construction; the engine does it again for each request it
        takes, since a caller may have set fields since (ValueError naming the field)."""
        self._normalize()
        self._validate()
        if self.is_greedy:
            # As vLLM: truncation is meaningless for argmax, so switch it off (the
            # sampler then need not sort for this row).
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    # -- derived values --------------------------------------------------

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def output_text_buffer_length(self) -> int:
        """Characters a running request's outputs hold back until it finishes (``RequestOutputKind``).

        A stop string may arrive split over several tokens and must then vanish
        from the output, so its first ``len(stop) - 1`` characters cannot be sent
        early. 0 when there are no stop strings or they are kept in the output.
        """
        if not self.stop or self.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.stop) - 1

    def truncate_prompt(self, prompt_token_ids: list[int], max_model_len: int) -> list[int]:
        """The prompt tokens the request keeps: the last ``truncate_prompt_tokens`` (-1: ``max_model_len``)."""
        if self.truncate_prompt_tokens is None:
            return prompt_token_ids
        if self.truncate_prompt_tokens > max_model_len:  # vLLM's refusal: no prompt of that length would fit
            raise ValueError(f"truncate_prompt_tokens value ({self.truncate_prompt_tokens}) is greater than "
                             f"max_model_len ({max_model_len}); select a smaller truncation size")
        keep = max_model_len if self.truncate_prompt_tokens == -1 else self.truncate_prompt_tokens
        return prompt_token_ids[-keep:]

    def max_output_tokens(self, prompt_len: int, max_model_len: int) -> int:
        """The output-length cap for a prompt: ``max_tokens``, never past ``max_model_len``."""
        room = max_model_len - prompt_len
        return room if self.max_tokens is None else min(self.max_tokens, room)

    # -- checks ----------------------------------------------------------

    def _normalize(self) -> None:
        if self.seed == -1:
            self.seed = None
        if self.top_k == -1:
            self.top_k = 0
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))
        if isinstance(self.logit_bias, dict) and not self.logit_bias:
            self.logit_bias = None
        if isinstance(self.allowed_token_ids, tuple):
            self.allowed_token_ids = list(self.allowed_token_ids)
        if self.guided_decoding is not None and self.guided_decoding is not self.structured_outputs:
            _require(self.structured_outputs is None, "guided_decoding",
                     "is the older name of structured_outputs: give one", self.guided_decoding)
            self.structured_outputs = self.guided_decoding
        if isinstance(self.structured_outputs, dict):
            unknown = sorted(set(self.structured_outputs) - set(STRUCTURED_OUTPUT_FIELDS))
            _require(not unknown, "structured_outputs", f"takes only {', '.join(STRUCTURED_OUTPUT_FIELDS)}", unknown)
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.guided_decoding is not None:  # the same object under both names, as code written for either reads
            self.guided_decoding = self.structured_outputs
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is True:  # as vLLM takes it: one most likely token
                setattr(self, name, 1)
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        elif isinstance(self.bad_words, (list, tuple)):
            self.bad_words = list(self.bad_words) or None
        if _is_real(self.temperature) and GREEDY_TEMPERATURE_EPS <= self.temperature < MIN_SAMPLING_TEMPERATURE:
            logger.warning(
                "temperature %s is below %s, which overflows float32 logits; using %s",
                self.temperature, MIN_SAMPLING_TEMPERATURE, MIN_SAMPLING_TEMPERATURE,
            )
            self.temperature = MIN_SAMPLING_TEMPERATURE

    def _validate(self) -> None:
        _require(_is_int(self.n) and self.n >= 1, "n", "must be an integer >= 1", self.n)
        _require(self.best_of is None or self.best_of == self.n, "best_of",
                 "must be None or equal to n (the best n of more samples is not supported)", self.best_of)
        _require(self.extra_args is None or isinstance(self.extra_args, dict), "extra_args", "must be a dict or None",
                 self.extra_args)
        _require(isinstance(self.output_kind, RequestOutputKind), "output_kind", "must be a RequestOutputKind",
                 self.output_kind)
        _require(self.detokenize or not self.stop, "stop", "strings need detokenize=True (the output's text)",
                 self.stop)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(_is_real(value) and -2.0 <= value <= 2.0, name, "must be in [-2, 2]", value)
        _require(
            _is_real(self.repetition_penalty) and math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty", "must be a finite number > 0", self.repetition_penalty,
        )
        _require(
            _is_real(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0,
            "temperature", "must be >= 0", self.temperature,
        )
        _require(_is_real(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]", self.top_p)
        _require(
            _is_int(self.top_k) and self.top_k >= 0,
            "top_k", "must be an integer: 0 or -1 (off), or >= 1", self.top_k,
        )
        _require(_is_real(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]", self.min_p)
        _require(self.seed is None or _is_int(self.seed), "seed", "must be an integer or None", self.seed)
        _require(
            isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop),
            "stop", "must be a non-empty string or a list of them", self.stop,
        )
        _require(
            isinstance(self.stop_token_ids, list) and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids", "must be a list of non-negative integers", self.stop_token_ids,
        )
        _require(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            "max_tokens", "must be an integer >= 1 or None", self.max_tokens,
        )
        _require(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "must be an integer >= 0", self.min_tokens)
        if self.max_tokens is not None:
            _require(
                self.min_tokens <= self.max_tokens,
                "min_tokens", f"must be <= max_tokens ({self.max_tokens})", self.min_tokens,
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _require(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS),
                     name, f"must be None or an integer in [0, {MAX_LOGPROBS}]", value)
        _require(
            self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
                _is_int(t) and t >= 0 and _is_real(b) and math.isfinite(b) for t, b in self.logit_bias.items())),
            "logit_bias", "must map token ids (integers >= 0) to finite numbers", self.logit_bias,
        )
        _require(
            self.allowed_token_ids is None or (isinstance(self.allowed_token_ids, list) and self.allowed_token_ids
                                               and all(_is_int(t) and t >= 0 for t in self.allowed_token_ids)),
            "allowed_token_ids", "must be a non-empty list of non-negative integers", self.allowed_token_ids,
        )
        _require(
            self.bad_words is None or all(isinstance(w, str) and w.strip() for w in self.bad_words),
            "bad_words", "must be a non-blank string or a list of them", self.bad_words,
        )
        _require(self.truncate_prompt_tokens is None or (_is_int(self.truncate_prompt_tokens) and (
            self.truncate_prompt_tokens >= 1 or self.truncate_prompt_tokens == -1)),
            "truncate_prompt_tokens", "must be an integer >= 1, -1 (max_model_len) or None", self.truncate_prompt_tokens)
        _require(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
                 "structured_outputs", "must be a StructuredOutputsParams or a dict of its fields",
                 self.structured_outputs)
        if self.is_greedy:
            _require(self.n == 1, "n", "must be 1 with greedy sampling (temperature 0)", self.n)


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _require(ok: bool, field: str, rule: str, value) -> None:
    if not ok:
        raise ValueError(f"{field} {rule}, got {value!r}")
