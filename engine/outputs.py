"""What callers get back: vLLM-shaped ``RequestOutput`` / ``CompletionOutput`` / ``Logprob``.

Plain data; knows nothing of scheduling or devices.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Optional


class RequestOutputKind(enum.Enum):
    """What each output of a request carries (vLLM's ``RequestOutputKind``).

    - ``CUMULATIVE``: everything so far, every step the request advances;
    - ``DELTA``: only what is new since the request's previous output (its tokens, text and logprobs entries;
      ``cumulative_logprob``, ``finish_reason`` and ``stop_reason`` as they stand), every step it advances;
      the prompt on the first output only;
    - ``FINAL_ONLY``: one cumulative output, when the request finishes.

    While a request runs, its text holds back the last ``SamplingParams.output_text_buffer_length`` characters
    (the start of a stop string may be among them, to be cut), so what an output says is never taken back and
    the ``DELTA`` outputs joined are the final output.
    """

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None  # 1 = most likely token
    decoded_token: Optional[str] = None


# One dict per generated token: token id -> Logprob (the sampled token and the top-k).
SampleLogprobs = list[dict[int, Logprob]]


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[SampleLogprobs] = None
    finish_reason: Optional[str] = None  # "stop", "length", "abort" or None while running
    stop_reason: Optional[object] = None  # the stop string or token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


def elapsed(start: Optional[float], end: Optional[float]) -> Optional[float]:
    """Seconds from ``start`` to ``end`` (``RequestMetrics``' times), None where either has not happened."""
    return None if start is None or end is None else end - start


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    """When the engine took a request, first scheduled it, had its first and latest tokens, and finished it
    (``time.monotonic()``, one clock for every process of the machine; vLLM's ``RequestMetrics`` names): its queue
    time, and the start of its prefill. None: not yet (never, for a request aborted while waiting). Through the
    engine process (the server's), the token and finish times are current on a request's first and last outputs."""

    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None

    @property
    def time_in_queue(self) -> Optional[float]:
        return elapsed(self.arrival_time, self.first_scheduled_time)


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: Optional[int] = None  # prompt tokens found in the prefix cache (None: not admitted yet)
    # SamplingParams.prompt_logprobs: for each prompt token, {token id: Logprob} of it and the most likely tokens
    # at its place; None for the first token. Complete from a request's first output on.
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None
    lora_request: Any = None  # the request's LoRA adapter (engine.lora.LoRARequest), as vLLM's
    metrics: Optional[RequestMetrics] = None  # when it arrived and was first scheduled (from its first output on)


def delta_of(output: RequestOutput, sent: dict[int, tuple[int, int]]) -> RequestOutput:
    """A cumulative ``output`` as ``RequestOutputKind.DELTA`` says it: each completion's text, tokens and logprobs
    entries past what ``sent`` records as handed out (``{index: (characters, tokens)}``, updated here); the prompt
    on the first output only (``sent`` empty). Cumulative outputs never take text back, so the deltas join to the
    final output."""
    first = not sent
    completions = []
    for c in output.outputs:
        chars, tokens = sent.get(c.index, (0, 0))
        token_ids = list(c.token_ids)
        logprobs = None if c.logprobs is None else list(c.logprobs[tokens:len(token_ids)])
        completions.append(dataclasses.replace(c, text=c.text[chars:], token_ids=token_ids[tokens:],
                                               logprobs=logprobs))
        sent[c.index] = (len(c.text), len(token_ids))
    if first:
        return dataclasses.replace(output, outputs=completions)
    return dataclasses.replace(output, outputs=completions, prompt=None, prompt_token_ids=None, prompt_logprobs=None)
