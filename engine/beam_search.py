"""Beam search over the engine, as vLLM's ``LLM.beam_search``: a loop of one-token generations on the host.

Owns ``BeamSearchParams`` and the search. Each round generates one token for every live beam of every prompt,
asking for the ``2 * beam_width`` most likely next tokens with their logprobs; each prompt keeps the
``beam_width`` extensions of highest cumulative logprob, and sets aside those that end (an end-of-sequence
token) as finished. After ``max_tokens`` rounds (or when no beam is left) the finished and live beams of a prompt
are ranked by vLLM's score, the cumulative logprob over the sequence length to the ``length_penalty``. The rounds
share the beams' common prefixes through the prefix cache, so a round computes little more than each beam's last
block and new token. Knows nothing of the engine's insides: it calls ``generate``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

from tqdm.auto import tqdm

from engine.outputs import Logprob, RequestOutput
from engine.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_BEAM_WIDTH = MAX_LOGPROBS // 2


@dataclasses.dataclass
class BeamSearchParams:
    """vLLM's ``BeamSearchParams``: beams kept a prompt, tokens to generate, whether end-of-sequence tokens end a
    beam, the temperature of the logprobs, and the length penalty of the final ranking."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.beam_width > MAX_BEAM_WIDTH:
            raise ValueError(f"beam_width must be at most {MAX_BEAM_WIDTH} (each round asks for the 2 * beam_width "
                             f"most likely next tokens), got {self.beam_width}")


@dataclasses.dataclass
class BeamSearchSequence:
    """One beam: ``tokens`` (the prompt's, then the generated ones, as vLLM's), each generated token's candidates
    with their logprobs, the cumulative logprob of the generated tokens, the generated text (an ending
    end-of-sequence token left out) and why it ended ("stop": end of sequence; "length"; None: still live)."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: Optional[str] = None
    finish_reason: Optional[str] = None


@dataclasses.dataclass
class BeamSearchOutput:
    """A prompt's best ``beam_width`` sequences, best first."""

    sequences: list[BeamSearchSequence]


def beam_search_score(tokens: Sequence[int], cum_logprob: float, eos_token_ids, length_penalty: float) -> float:
    """vLLM's ``get_beam_search_score``: the cumulative logprob over the length (prompt included, an ending
    end-of-sequence token not) to the ``length_penalty``."""
    length = len(tokens) - (1 if tokens and tokens[-1] in eos_token_ids else 0)
    return cum_logprob / (length ** length_penalty)


def beam_search(generate: Callable[[list, SamplingParams], list[RequestOutput]], prompts: list[list[int]],
                params: BeamSearchParams, *, eos_token_ids, max_model_len: int, decode=None,
                use_tqdm: bool = True) -> list[BeamSearchOutput]:
    """Beam search for each prompt (token ids). ``generate(prompts, sampling_params)`` runs one round (``LLM``'s,
    without its progress bar); ``decode`` (token ids -> text) fills each sequence's text where given."""
    width = params.beam_width
    live = [[BeamSearchSequence(tokens=list(p), logprobs=[])] for p in prompts]
    finished: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    round_params = SamplingParams(n=1, temperature=params.temperature, max_tokens=1, logprobs=2 * width,
                                  ignore_eos=True)
    for _ in tqdm(range(params.max_tokens), desc="Beam search", disable=not use_tqdm, unit="token"):
        beams = [beam for group in live for beam in group]
        if not beams:
            break
        outputs = iter(generate([beam.tokens for beam in beams], round_params))
        for p, group in enumerate(live):
            candidates = []
            for beam, output in zip(group, outputs):
                entry = output.outputs[0].logprobs[0]
                for token, logprob in entry.items():
                    candidates.append(BeamSearchSequence(tokens=beam.tokens + [token],
                                                         logprobs=beam.logprobs + [entry],
                                                         cum_logprob=beam.cum_logprob + logprob.logprob))
            kept = []
            for beam in sorted(candidates, key=lambda b: b.cum_logprob, reverse=True):
                if beam.tokens[-1] in eos_token_ids and not params.ignore_eos:
                    beam.finish_reason = "stop"
                    finished[p].append(beam)
                elif len(kept) < width:
                    kept.append(beam)
            for beam in kept:  # a beam at the context's end cannot grow
                if len(beam.tokens) >= max_model_len:
                    beam.finish_reason = "length"
                    finished[p].append(beam)
            live[p] = [beam for beam in kept if beam.finish_reason is None]
    results = []
    for p, prompt in enumerate(prompts):
        for beam in live[p]:
            beam.finish_reason = "length"
        best = sorted(finished[p] + live[p], reverse=True, key=lambda b: beam_search_score(
            b.tokens, b.cum_logprob, eos_token_ids, params.length_penalty))[:width]
        if decode is not None:
            for beam in best:
                generated = beam.tokens[len(prompt):]
                beam.text = decode(generated[:-1] if beam.finish_reason == "stop" else generated)
        results.append(BeamSearchOutput(sequences=best))
    return results
