"""One generation request as the scheduler sees it: its tokens, progress and status.

Owns the ``Request`` record and its lifecycle states. Knows nothing of blocks,
devices or text; ``sampling_params`` is carried for the engine and opaque here.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any

import numpy as np


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"  # eos, stop token/string or max_tokens
    FINISHED_LENGTH = "finished_length"  # reached max_model_len
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclasses.dataclass(eq=False)
class Request:
    """A prompt and the tokens generated for it so far.

    ``num_computed_tokens`` counts the leading tokens of ``all_token_ids`` whose
    K/V are in the paged cache. ``priority``: lower values are served first.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: Any = None
    priority: int = 0
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # of its tokens, found in the prefix cache when first admitted
    first_scheduled_time: float | None = None  # time.monotonic() when first admitted (its queue time ends)
    # Multi-step decoding (``Scheduler(num_scheduler_steps=...)``): whether this request's decodes may run several
    # steps in one dispatch (the engine clears it where a token's sampling needs the host to see the token before
    # it: penalties, ``min_tokens``), and the most output tokens it can have (a burst stops there; None: none).
    multi_step: bool = True
    max_output_tokens: int | None = None
    # Whether admission may start it on a cached prefix (the engine clears it for prompt logprobs, which need the
    # logits of every prompt token).
    use_prefix_cache: bool = True
    lora_id: int = 0  # its LoRA adapter's lora_int_id (engine.lora; 0: none)
    # known_token_array's buffer and how many of its leading entries are filled.
    _token_buffer: Any = dataclasses.field(default=None, init=False, repr=False)
    _num_buffered: int = dataclasses.field(default=0, init=False, repr=False)

    def __post_init__(self):
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.output_token_ids = list(self.output_token_ids)
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r} has an empty prompt")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, stop: int) -> list[int]:
        """``all_token_ids[start:stop]`` without building the whole list (a decode step reads one token)."""
        p = len(self.prompt_token_ids)
        if stop <= p:
            return self.prompt_token_ids[start:stop]
        if start >= p:
            return self.output_token_ids[start - p:stop - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - p]

    def known_token_array(self, stop: int) -> np.ndarray:
        """``all_token_ids[:stop]`` as an int64 array (a view of a buffer kept with the request and grown as tokens
        come: speculative decoding searches it every step). Only for tokens known for good: outputs only ever
        append, and the engine asks for none of a step still in flight."""
        buffer, filled = self._token_buffer, self._num_buffered
        if stop > filled:
            if buffer is None or stop > len(buffer):
                grown = np.empty(max(2 * stop, 64), np.int64)
                grown[:filled] = buffer[:filled] if buffer is not None else []
                buffer = self._token_buffer = grown
            buffer[filled:stop] = self.token_ids(filled, stop)
            self._num_buffered = stop
        return buffer[:stop]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Known tokens whose K/V are not cached yet (1 for a request in decode)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished
