"""Structured outputs: which tokens a request's language allows next, as a bitmask the sampler applies.

Owns the grammar of a ``StructuredOutputsParams`` (JSON schema, regex, choice, Lark grammar, any JSON object), one
matcher per output sequence that follows the tokens it is given, and the step's bitmask rows (one bit a vocabulary
entry, llguidance's layout: bit ``t % 32`` of int32 word ``t // 32``). The matching is llguidance's (Rust, the
library behind vLLM's "guidance" backend): it compiles lazily, token by token, so a new schema costs milliseconds,
and it needs no torch. Imported only when a request asks for structured output (the engine runs without the
library otherwise).
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional, Sequence

import numpy as np

from engine.sampler import bitmask_width
from engine.sampling_params import StructuredOutputsParams


def grammar_text(params: StructuredOutputsParams) -> str:
    """llguidance's grammar for ``params`` (not yet checked: ``Grammars.check``)."""
    from llguidance import LLMatcher

    kind = params.kind
    # vLLM's guidance backend's JSON options: whitespace between tokens allowed unless disable_any_whitespace
    options = {"whitespace_flexible": not params.disable_any_whitespace}
    if params.whitespace_pattern is not None:
        options["whitespace_pattern"] = params.whitespace_pattern
    if kind == "json":
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON: {e}") from None
        if params.disable_additional_properties:
            schema = closed_objects(schema)
        return LLMatcher.grammar_from_json_schema(schema, defaults=options)
    if kind == "json_object":
        return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=options)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        return LLMatcher.grammar_from_regex("|".join(re.escape(choice) for choice in params.choice))
    from llguidance import grammar_from

    # Lark, or GBNF / EBNF (``root ::= ...``: xgrammar's form, vLLM's examples), which llguidance converts to Lark
    return grammar_from("grammar", params.grammar)


# Keywords whose values are data, not schemas: left as they are.
DATA_KEYWORDS = ("const", "enum", "default", "examples")


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that names its properties
    (``properties`` / ``patternProperties``) and leaves it unset, as vLLM's guidance backend closes them for
    ``disable_additional_properties``; a free-form object stays open."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: value if key in DATA_KEYWORDS else closed_objects(value) for key, value in schema.items()}
    if ("properties" in schema or "patternProperties" in schema) and "additionalProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


class Grammars:
    """The engine's side of llguidance: its view of the tokenizer (built once, ~0.3 s for a 49k vocabulary), grammar
    checks, matchers, and the bitmask rows of a step."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        import llguidance.hf

        self.vocab_size = vocab_size
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                       eos_token=list(eos_token_ids) or None)
        self._executor = llguidance.LLExecutor()

    def check(self, params: StructuredOutputsParams) -> str:
        """``params``' grammar, or a ``ValueError`` naming ``structured_outputs`` with llguidance's message."""
        from llguidance import LLMatcher

        try:
            grammar = grammar_text(params)
        except (ValueError, KeyError, TypeError) as e:  # a conversion's refusal (a GBNF rule missing, say): vLLM's
            raise ValueError(f"structured_outputs: the {params.kind} is invalid: {e}") from None
        error = LLMatcher.validate_grammar(grammar, self._tokenizer)
        if error:
            raise ValueError(f"structured_outputs: the {params.kind} is invalid: {error.strip()}")
        return grammar

    def matcher(self, grammar: str) -> Any:
        """A matcher at the start of ``grammar`` (one per output sequence)."""
        from llguidance import LLMatcher

        return LLMatcher(self._tokenizer, grammar, log_level=0)

    def bitmask(self, matchers: Sequence[Any], drafts: Optional[Sequence[Sequence[int]]] = None) -> np.ndarray:
        """int32 bitmask rows of the tokens each matcher allows next, computed on llguidance's threads (the GIL
        released), as vLLM does for a batch of them. ``drafts`` (speculative decoding): each matcher's draft tokens;
        a matcher then has ``1 + len(drafts)`` rows, its row ``j`` the mask after its first ``j`` drafts (the matcher
        itself left where it was). A draft the grammar refuses, and those after it, take the mask of the row before
        it: the sample of that row cannot be the refused draft, so the later rows' samples are dropped anyway."""
        from llguidance.numpy import fill_next_token_bitmask_par, fill_next_token_bitmask_par_with_draft_tokens

        drafts = drafts if drafts is not None else [()] * len(matchers)
        counts = [1 + len(d) for d in drafts]
        rows = np.zeros((sum(counts), bitmask_width(self.vocab_size)), np.int32)
        plain, drafted, copies, first = [], [], [], 0  # llguidance takes no empty draft list: those go plain
        for matcher, tokens, count in zip(matchers, drafts, counts):
            valid = matcher.validate_tokens(list(tokens)) if tokens else 0
            if valid:
                drafted.append((matcher, first, list(tokens[:valid])))
            else:
                plain.append((matcher, first))
            copies.append((first + valid, first + count))
            first += count
        if plain:
            fill_next_token_bitmask_par(self._executor, plain, rows)
        if drafted:
            fill_next_token_bitmask_par_with_draft_tokens(self._executor, drafted, rows)
        for last_valid, end in copies:
            rows[last_valid + 1:end] = rows[last_valid]
        return rows
