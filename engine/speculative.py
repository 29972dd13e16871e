"""Speculative decoding by n-gram lookup: vLLM's ``speculative_config={"method": "ngram", ...}`` ("prompt lookup
decoding"). Owns the config and the proposer.

A decoding request whose last ``n`` tokens (``prompt_lookup_max >= n >= prompt_lookup_min``) occurred before in its
prompt or output proposes the (up to ``num_speculative_tokens``) tokens that followed there: the longest ``n`` that
matches, its latest occurrence. The scheduler runs the drafts as more tokens of the request's decode step
(``ScheduledSequence.draft_token_ids``); the engine samples each of those positions as it samples a decode (the
same sampler, the draw of the same output index) and keeps the drafts up to the first whose sampled token differs,
then that sampled token (``accepted_tokens``). So the outputs are those of decoding a token a step: greedy gives the
same tokens, sampling the same distribution (and the same tokens for a seed); only a step yields more of them when
drafts are right. No draft model, so no rejection sampling: a draft is kept exactly when the target's own sample
equals it. Under a structured output each position is sampled under the grammar's mask after the drafts before it
(``engine.structured_output.Grammars.bitmask``), so the rule holds there too. "The same" is exact in float32; in
bfloat16 (the GPU's default) a step with drafts computes its logits in other matmul and attention shapes, so a
near-tie can round the other way, as batching a request with others can without drafts (vLLM: lossless "up to
hardware numerics").

Hand-written: a few lines of numpy; vLLM's proposer is not a dependency.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

METHODS = ("ngram",)


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's names. Without ``prompt_lookup_min`` / ``_max`` both are 5 (vLLM's choice); one given sets both."""

    num_speculative_tokens: int
    method: str = "ngram"
    prompt_lookup_max: Optional[int] = None
    prompt_lookup_min: Optional[int] = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config: method must be one of {', '.join(METHODS)} (drafts looked up in "
                             f"the request's own tokens), got {self.method!r}")
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        low, high = (5, 5) if low is None and high is None else (low or high, high or low)
        object.__setattr__(self, "prompt_lookup_min", low)
        object.__setattr__(self, "prompt_lookup_max", high)
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config: {name} must be a positive integer, got {value!r}")
        if low > high:
            raise ValueError(f"speculative_config: prompt_lookup_min ({low}) must not exceed prompt_lookup_max "
                             f"({high})")

    @classmethod
    def of(cls, value: Any) -> Optional["SpeculativeConfig"]:
        """From a dict of vLLM's fields (or a config, or None); unknown fields are named."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(value).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"speculative_config: unknown field(s) {', '.join(unknown)} (known: "
                             f"{', '.join(sorted(fields))})")
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config needs num_speculative_tokens")
        return cls(**value)

    def propose(self, token_ids: Sequence[int] | np.ndarray, max_tokens: int) -> list[int]:
        """Drafts to follow ``token_ids`` (a list, or an int64 array: ``Request.known_token_array``, no copy): at most
        ``min(num_speculative_tokens, max_tokens)``, possibly none."""
        limit = min(self.num_speculative_tokens, max_tokens)
        if limit < 1 or len(token_ids) <= self.prompt_lookup_min:
            return []
        return ngram_drafts(np.asarray(token_ids, np.int64), self.prompt_lookup_min, self.prompt_lookup_max, limit)


def ngram_drafts(tokens: np.ndarray, low: int, high: int, limit: int) -> list[int]:
    """The up to ``limit`` tokens after the latest earlier occurrence of the longest suffix of ``tokens`` of
    ``low`` to ``high`` tokens; [] if none occurs. Candidates are the earlier places of the last token; each is
    extended backwards while it matches (vectorized over the candidates, ``high`` passes)."""
    last = len(tokens) - 1
    ends = np.flatnonzero(tokens[:last] == tokens[last])  # an occurrence ends here; something follows it
    if ends.size == 0:
        return []
    length = np.ones(ends.size, np.int64)
    for back in range(1, min(high, last)):
        before = ends - back
        extends = (length == back) & (before >= 0)
        extends[extends] = tokens[before[extends]] == tokens[last - back]
        if not extends.any():
            break
        length[extends] += 1
    best = length.max()
    if best < low:
        return []
    end = ends[np.flatnonzero(length == best)[-1]]
    return tokens[end + 1:end + 1 + limit].tolist()


def accepted_tokens(sampled: Sequence[int], drafts: Sequence[int]) -> list[int]:
    """What a step that ran ``drafts`` yields: ``sampled[j]`` is the token sampled after draft ``j - 1`` (after the
    request's last token for ``j = 0``); the drafts are kept while each equals the token sampled at its place, then
    the first sampled token that differs (or the one after the last draft)."""
    kept = 0
    while kept < len(drafts) and sampled[kept] == drafts[kept]:
        kept += 1
    return list(sampled[:kept + 1])
