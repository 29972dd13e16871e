"""Continuous-batching scheduler: which requests run in the next step, and how many tokens each.

Owns the waiting and running queues, the per-step token budget and sequence
cap, chunked prefill, admission, preemption (recompute mode) and forking for
parallel sampling. Allocates KV blocks through the ``BlockManager``.

Knows nothing of JAX, devices, sampling or text: stop conditions (eos, stop
strings, max_tokens) are decided by the engine, which calls ``finish_request``;
the scheduler itself only finishes a request that reaches ``max_model_len``.

Policy (DESIGN.md step 1), each ``schedule()``:
  1. running requests in decode (one uncomputed token) get one token each, in
     queue order;
  2. the remaining budget goes to prefill chunks, first of running (partly
     prefilled or recomputing) requests, then of waiting requests, admitted in
     queue order while there are free blocks and sequence slots. A chunk is
     ``min(uncomputed tokens, remaining budget)``. The head waiting request that
     does not fit blocks those behind it (no overtaking), and nothing is admitted
     in a step that had to preempt. Admission also leaves every running request
     room to grow (``admission_reserve_tokens``, capped by what it may still
     generate): a request admitted into the last free blocks would soon force a
     preemption, whose recompute costs more than the wait (tput-long: 213
     preemptions recomputed 294k tokens, 30% of its prompts, in run 51). The
     request admitted keeps no room of its own (in simulation that cut
     tput-long's preemptions no further and lengthened small pools' runs).
With prefix caching (the ``BlockManager``'s), a request is admitted on the cached
blocks of the longest prefix of its tokens (all but its last token at most) and
computes only the rest; its full blocks join the cache as their steps are
dispatched. A preempted request's blocks stay cached, so its recompute is mostly a
cache hit.
When a running request's blocks cannot be allocated, the last request in queue
order (lowest priority, latest arrival; possibly the request itself) is
preempted: its blocks are freed, its computed tokens forgotten (its output
tokens kept) and it goes back to the waiting queue at its place in queue order
(under "fifo": ahead of every request that arrived after it). Queue order is ``(arrival_time, add order)`` for
"fifo" and ``(priority, arrival_time, add order)`` for "priority".

Speculative decoding (``speculative_config``, engine.speculative): once every decode has its token (the usual
case: free blocks for all), each decode that proposes drafts gets them as more tokens of its step, with the token
budget, the step's sampled rows (``max_num_seqs``) and free blocks that prompt chunks and admissions leave (drafts
come last: they never hold back a waiting request, and never preempt). After the step the request keeps the
accepted tokens' K/V and gives back the blocks past them.

Scheduling modes: "continuous" (above: a waiting request is admitted as soon as
a sequence slot and blocks are free) and "static", the baseline that continuous
batching is measured against: when nothing runs, the first ``max_num_seqs``
waiting requests in queue order become the batch, and no other request is
admitted until every request of that batch has finished (a finished request's
slot sits idle). Members of the batch are still prefilled in chunks under the
token budget and may be preempted and re-admitted; they are the only ones
admitted while the batch lasts.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import time
from typing import Optional

from engine.block_manager import BlockManager
from engine.prefix_cache import extend_block_keys, root_key
from engine.request import Request, RequestStatus
from engine.speculative import SpeculativeConfig

POLICIES = ("fifo", "priority")
SCHEDULING_MODES = ("continuous", "static")


@dataclasses.dataclass(slots=True)
class ScheduledSequence:
    """One request's share of a step: tokens ``start .. start+num_tokens-1`` are computed. Not
    changed once made (not frozen: a frozen dataclass costs 4x the time to build, and one is built
    per sequence per step)."""

    request: Request
    start: int  # == request.num_computed_tokens before the step
    num_tokens: int
    samples: bool  # the chunk ends at the last known token: the step's sampled token is kept
    # Multi-step decoding: a decode (num_tokens 1) run for this many steps in one dispatch, each feeding the token
    # the one before sampled: tokens start .. start+decode_steps-1 computed, decode_steps tokens sampled.
    decode_steps: int = 1
    # Speculative decoding: drafts run after the decode's token (counted in num_tokens), each position sampled.
    draft_token_ids: tuple[int, ...] = ()

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def token_ids(self) -> list[int]:
        """The tokens this step feeds the model for the request."""
        if self.draft_token_ids:
            return self.request.token_ids(self.start, self.start + 1) + list(self.draft_token_ids)
        return self.request.token_ids(self.start, self.start + self.num_tokens)


@dataclasses.dataclass
class SchedulerOutput:
    """The plan of one step.

    ``block_copies``: ``(src, dst)`` page copies (copy-on-write) to apply before the
    step's KV writes; every ``src`` must be read as it was before the step (a gather
    of all sources, then a scatter to all destinations, is right).
    """

    scheduled: list[ScheduledSequence]
    block_copies: list[tuple[int, int]]
    preempted_request_ids: list[str]
    # The steps one dispatch runs (multi-step decoding, ``Scheduler(num_scheduler_steps=...)``): 1 for an ordinary
    # step; else every sequence is a decode of ``decode_steps`` <= this many steps.
    decode_steps: int = 1

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def num_seqs(self) -> int:
        return len(self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class _StepPlan:
    """What one ``schedule()`` call has decided so far; preemption can undo a request's share."""

    def __init__(self, budget: int):
        self.budget = budget
        self.scheduled: dict[str, ScheduledSequence] = {}
        self.copies: dict[str, list[tuple[int, int]]] = {}
        self.preempted: list[str] = []
        self.num_drafts = 0
        self.loras: Optional[set[int]] = None  # the running requests' LoRA adapters and those admitted (max_loras)

    @property
    def num_rows(self) -> int:
        """Rows the step samples: one a sequence, one more a draft."""
        return len(self.scheduled) + self.num_drafts

    def add(self, seq: ScheduledSequence, copies: list[tuple[int, int]]) -> None:
        request_id = seq.request.request_id
        self.scheduled[request_id] = seq
        self.copies[request_id] = copies
        self.budget -= seq.num_tokens

    def add_drafts(self, seq: ScheduledSequence, copies: list[tuple[int, int]]) -> None:
        """Replace a scheduled decode by ``seq``, the same decode with drafts, in its place; its copies are kept."""
        request_id = seq.request.request_id
        self.budget -= seq.num_tokens - self.scheduled[request_id].num_tokens
        self.num_drafts += len(seq.draft_token_ids)
        self.scheduled[request_id] = seq
        self.copies[request_id] = self.copies[request_id] + copies

    def drop(self, request_id: str) -> None:
        seq = self.scheduled.pop(request_id, None)
        if seq is not None:
            self.budget += seq.num_tokens
            self.num_drafts -= len(seq.draft_token_ids)
            del self.copies[request_id]

    def output(self, decode_steps: int = 1) -> SchedulerOutput:
        return SchedulerOutput(
            scheduled=list(self.scheduled.values()),
            block_copies=[c for rid in self.scheduled for c in self.copies[rid]],
            preempted_request_ids=self.preempted,
            decode_steps=decode_steps,
        )


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int,
                 max_model_len: int, policy: str = "fifo", scheduling_mode: str = "continuous",
                 num_scheduler_steps: int = 1, speculative_config: Optional[SpeculativeConfig] = None,
                 max_loras: int = 0, admission_reserve_tokens: int = 0):
        if admission_reserve_tokens < 0:
            raise ValueError(f"admission_reserve_tokens must be >= 0, got {admission_reserve_tokens}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if scheduling_mode not in SCHEDULING_MODES:
            raise ValueError(f"scheduling_mode must be one of {SCHEDULING_MODES}, got {scheduling_mode!r}")
        for name, value in (("max_num_batched_tokens", max_num_batched_tokens), ("max_num_seqs", max_num_seqs),
                            ("max_model_len", max_model_len), ("num_scheduler_steps", num_scheduler_steps)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        blocks_per_longest = -(-max_model_len // block_manager.block_size)
        if blocks_per_longest > block_manager.num_usable_blocks:
            # Otherwise a lone long request could preempt itself forever.
            raise ValueError(
                f"max_model_len {max_model_len} needs {blocks_per_longest} blocks of "
                f"{block_manager.block_size} tokens but the pool has only {block_manager.num_usable_blocks}")
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.policy = policy
        self.scheduling_mode = scheduling_mode
        self.num_scheduler_steps = num_scheduler_steps
        self.speculative_config = speculative_config
        self.max_loras = max_loras  # LoRA adapters the running requests may use at once (0: no limit)
        # Tokens of growth each running request keeps free when a waiting one is admitted (``_reserved_blocks``).
        self.admission_reserve_tokens = admission_reserve_tokens
        self._static_batch: set[str] = set()  # "static": ids of the unfinished requests of the batch in flight
        self._requests: dict[str, Request] = {}  # unfinished ones
        self._order_keys: dict[str, tuple] = {}
        self._add_counter = itertools.count()
        self._waiting: list[Request] = []  # both queues kept sorted by _order_key
        self._running: list[Request] = []
        self.num_preemptions = 0
        self.num_steps = 0
        # Prefix caching: each unfinished request's block keys (engine.prefix_cache), as far as its tokens are
        # known; and the admitted requests' tokens looked up in the cache and found there (vLLM's counters).
        self._block_keys: dict[str, list[bytes]] | None = {} if block_manager.prefix_cache is not None else None
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # -- queries ---------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def running_requests(self) -> tuple[Request, ...]:
        """The running requests (those holding blocks), in queue order."""
        return tuple(self._running)

    @property
    def waiting_requests(self) -> tuple[Request, ...]:
        """The waiting requests, in queue order."""
        return tuple(self._waiting)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self._requests.get(request_id)

    def block_table(self, request_id: str) -> list[int]:
        return self.block_manager.block_table(request_id)

    def slot_mapping(self, seq: ScheduledSequence) -> list[int]:
        """Physical KV slots the scheduled tokens write to (valid until the next ``schedule``)."""
        return self.block_manager.slots(seq.request_id, seq.start, seq.start + seq.num_tokens)

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if queues, statuses and block ownership disagree (call between steps)."""

        def require(ok: bool, message: str) -> None:
            if not ok:
                raise AssertionError(message)

        self.block_manager.check_invariants()
        for name, queue, status in (("waiting", self._waiting, RequestStatus.WAITING),
                                    ("running", self._running, RequestStatus.RUNNING)):
            keys = [self._order_key(r) for r in queue]
            require(keys == sorted(keys), f"the {name} queue is out of order")
            for r in queue:
                require(r.status is status, f"{r.request_id!r} is {r.status.name} in the {name} queue")
                require(self._requests.get(r.request_id) is r, f"{r.request_id!r} is queued but not registered")
        require(len(self._waiting) + len(self._running) == len(self._requests), "a request is lost or queued twice")
        for r in self._waiting:
            require(r.request_id not in self.block_manager and r.num_computed_tokens == 0,
                    f"waiting request {r.request_id!r} holds blocks or computed tokens")
        for r in self._running:
            require(r.request_id in self.block_manager
                    and self.block_manager.num_tokens(r.request_id) == r.num_computed_tokens,
                    f"running request {r.request_id!r}: blocks do not cover exactly its computed tokens")
            require(1 <= r.num_uncomputed_tokens and r.num_tokens <= self.max_model_len,
                    f"running request {r.request_id!r} has nothing left to compute or is past max_model_len")
        require(self.block_manager.num_sequences == len(self._running), "a sequence holds blocks but is not running")
        if self._block_keys is not None:
            require(self._block_keys.keys() == self._requests.keys(), "block keys kept for other requests")
            block_size = self.block_manager.block_size
            for r in self._requests.values():
                require(len(self._block_keys[r.request_id]) <= r.num_tokens // block_size,
                        f"{r.request_id!r} has more block keys than full blocks of tokens")
        if self.scheduling_mode == "static":
            require(all(r.request_id in self._static_batch for r in self._running),
                    "static mode: a running request is not in the batch in flight")
            require(self._static_batch <= self._requests.keys(),
                    "static mode: a finished request is still in the batch")

    # -- requests in and out ---------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.num_tokens > self.max_model_len:
            raise ValueError(f"request {request.request_id!r} has {request.num_tokens} tokens, more than "
                             f"max_model_len {self.max_model_len}")
        if request.num_computed_tokens != 0 or request.status is not RequestStatus.WAITING:
            raise ValueError(f"request {request.request_id!r} is not fresh: status {request.status.name}, "
                             f"{request.num_computed_tokens} computed tokens")
        self._register(request)
        self._insert(self._waiting, request)

    def fork_request(self, parent: Request, child: Request) -> None:
        """Start ``child`` running on ``parent``'s cached tokens, sharing its blocks (n > 1 sampling).

        Call between steps. The child reuses the parent's KV for its first
        ``child.num_computed_tokens`` tokens, which must not exceed the parent's and
        must be the parent's tokens. Two common uses: the child has the parent's
        outputs but its own last (uncomputed) token; or the child has only the
        prompt with ``num_computed_tokens = len(prompt) - 1``, so it re-runs the
        prompt's last token and samples its own first token.
        """
        if self._requests.get(parent.request_id) is not parent or parent.status is not RequestStatus.RUNNING:
            raise ValueError(f"parent {parent.request_id!r} is not a running request of this scheduler")
        if child.request_id in self._requests:
            raise ValueError(f"request id {child.request_id!r} is already in use")
        if self.block_manager.num_tokens(parent.request_id) != parent.num_computed_tokens:
            raise RuntimeError(f"fork of {parent.request_id!r} in the middle of a step: call it between steps")
        n = child.num_computed_tokens
        if n == 0:
            raise ValueError(f"child {child.request_id!r} has no computed tokens to share: set its "
                             f"num_computed_tokens before forking, or add it with add_request")
        if not 0 < n <= parent.num_computed_tokens or child.all_token_ids[:n] != parent.all_token_ids[:n]:
            raise ValueError(f"child {child.request_id!r} has {n} computed tokens; they must be among the parent's "
                             f"{parent.num_computed_tokens} computed tokens and equal to them")
        if child.num_uncomputed_tokens < 1 or child.num_tokens > self.max_model_len:
            raise ValueError(f"child {child.request_id!r} has {child.num_tokens} tokens; it needs between "
                             f"{n + 1} and max_model_len {self.max_model_len}")
        if child.status is not RequestStatus.WAITING:
            raise ValueError(f"child {child.request_id!r} is not fresh: status {child.status.name}")
        self.block_manager.fork(parent.request_id, child.request_id, n)
        if parent.request_id in self._static_batch:
            self._static_batch.add(child.request_id)
        self._register(child)
        if self._block_keys is not None:  # the shared tokens' keys are the parent's
            num_shared_blocks = n // self.block_manager.block_size
            self._block_keys[child.request_id] = self._block_keys[parent.request_id][:num_shared_blocks]
        child.status = RequestStatus.RUNNING
        self._insert(self._running, child)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request:
        """Finish an unfinished request (waiting or running) with ``status`` and free its blocks."""
        if not status.is_finished:
            raise ValueError(f"{status.name} is not a finished status")
        request = self._requests.pop(request_id, None)
        if request is None:
            raise KeyError(f"no unfinished request {request_id!r}")
        del self._order_keys[request_id]
        if self._block_keys is not None:
            if request.status is RequestStatus.RUNNING and request_id in self.block_manager:
                # Blocks that filled while their last token was still on the device (asynchronous scheduling)
                # were not offered then: offer them now, so a follow-up turn's prompt finds its whole reply.
                self._cache_blocks(request)
            del self._block_keys[request_id]
        self._static_batch.discard(request_id)
        queue = self._running if request.status is RequestStatus.RUNNING else self._waiting
        queue.remove(request)
        if request_id in self.block_manager:
            self.block_manager.free(request_id)
        request.status = status
        return request

    def abort_request(self, request_id: str) -> Request | None:
        """Abort a waiting or running request; returns it, or None if it is unknown or already finished."""
        if request_id not in self._requests:
            return None
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    # -- one step --------------------------------------------------------------------------

    def schedule(self, drafts: bool = True) -> SchedulerOutput:
        """Plan the next step. ``drafts``: whether decodes may run drafts (speculative decoding): not while a step
        whose tokens they follow is still in flight."""
        self.num_steps += 1
        plan = _StepPlan(self.max_num_batched_tokens)
        decodes, prefills = [], []
        for r in self._running:  # one pass: this runs over every running request every step
            uncomputed = r.num_uncomputed_tokens
            if uncomputed == 1:
                decodes.append(r)
            elif uncomputed > 1:
                prefills.append(r)
        if not prefills and not self._waiting and self._schedule_burst(decodes, plan):
            return plan.output(decode_steps=self.num_scheduler_steps)
        drafting = []  # decodes that may get drafts: after every other piece of work, with what it leaves
        if self._decodes_always_fit(decodes, plan):
            self._schedule_decodes(decodes, plan)
            if drafts and self.speculative_config is not None:
                drafting = decodes
            decodes = []
        for request in decodes + prefills:
            if not self._has_room(plan):
                break
            if request.status is RequestStatus.RUNNING:  # not preempted earlier in this step
                self._schedule_running(request, plan)
        self._admit_waiting(plan)
        self._add_drafts(drafting, plan)
        return plan.output()

    def update_after_step(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Record a step's results; returns the requests this finished at ``max_model_len``.

        ``sampled`` maps request id to the step's sampled token (a list of ``decode_steps``
        tokens for a multi-step decode, the accepted tokens of a decode with drafts:
        ``engine.speculative.accepted_tokens``); it is read only for sequences whose ``samples`` is
        True. Requests finished or aborted since ``schedule()`` are skipped.
        """
        finished = []
        caching, block_size = self._block_keys is not None, self.block_manager.block_size
        for seq in output.scheduled:
            request = seq.request
            if self._requests.get(request.request_id) is not request:
                continue
            if request.num_computed_tokens != seq.start:
                raise RuntimeError(f"stale output for {request.request_id!r}: it has "
                                   f"{request.num_computed_tokens} computed tokens, the step started at {seq.start}")
            if seq.draft_token_ids:  # the accepted drafts' K/V stay, the blocks past them go
                accepted = sampled[request.request_id]
                if not 1 <= len(accepted) <= seq.num_tokens:
                    raise ValueError(f"{request.request_id!r} ran {len(seq.draft_token_ids)} drafts, got "
                                     f"{len(accepted)} tokens")
                request.num_computed_tokens += len(accepted)
                self.block_manager.shrink(request.request_id, request.num_computed_tokens)
                request.output_token_ids.extend(accepted)
            else:
                request.num_computed_tokens += seq.num_tokens + seq.decode_steps - 1
            if caching and request.num_computed_tokens // block_size > seq.start // block_size:  # a block filled
                self._cache_blocks(request)
            if seq.samples and not seq.draft_token_ids:
                self._append_sampled(seq, sampled)
            # (a pooled prompt may fill max_model_len: it ends when its last chunk has run, not before)
            if request.num_tokens >= self.max_model_len and request.num_uncomputed_tokens <= 1:
                finished.append(self.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH))
        return finished

    @staticmethod
    def _append_sampled(seq: ScheduledSequence, sampled: dict) -> None:
        """A decode's or a last prompt chunk's sampled token (a multi-step decode's tokens) into its outputs."""
        request = seq.request
        if request.request_id not in sampled:
            raise KeyError(f"no sampled token for {request.request_id!r}, which samples this step")
        if seq.decode_steps == 1:
            request.output_token_ids.append(sampled[request.request_id])
            return
        tokens = sampled[request.request_id]
        if len(tokens) != seq.decode_steps:
            raise ValueError(f"{request.request_id!r} ran {seq.decode_steps} decode steps, got {len(tokens)} tokens")
        request.output_token_ids.extend(tokens)

    # -- internals -------------------------------------------------------------------------

    def _order_key(self, request: Request) -> tuple:
        return self._order_keys[request.request_id]

    def _register(self, request: Request) -> None:
        time_key = (request.arrival_time, next(self._add_counter))
        self._order_keys[request.request_id] = (request.priority, *time_key) if self.policy == "priority" else time_key
        self._requests[request.request_id] = request
        if self._block_keys is not None:
            self._block_keys[request.request_id] = []

    def _insert(self, queue: list[Request], request: Request) -> None:
        bisect.insort(queue, request, key=self._order_key)

    def _has_room(self, plan: _StepPlan) -> bool:
        return plan.budget > 0 and plan.num_rows < self.max_num_seqs

    def _decodes_always_fit(self, decodes: list[Request], plan: _StepPlan) -> bool:
        """Whether every decode gets its token without running out of budget, sequence slots or blocks.

        A decode needs at most one free block (a new last block, or a copy of a shared one), so with
        at least as many free blocks as decodes no allocation fails and nothing is preempted: the
        general one-at-a-time loop would schedule them all, as ``_schedule_decodes`` does.
        """
        n = len(decodes)
        return self._has_room_for(n, plan) and n <= self.block_manager.num_free_blocks

    def _has_room_for(self, num_seqs: int, plan: _StepPlan) -> bool:
        """Whether ``num_seqs`` more one-token sequences fit the step's token budget and sequence slots."""
        return num_seqs <= plan.budget and plan.num_rows + num_seqs <= self.max_num_seqs

    def _schedule_burst(self, decodes: list[Request], plan: _StepPlan) -> bool:
        """Multi-step decoding: when every running request is a decode and none waits, each runs up to
        ``num_scheduler_steps`` steps in one dispatch (vLLM's ``--num-scheduler-steps``): the host's share of a step
        (planning, inputs, the programs' launches) is paid once for them. A request's steps stop at
        ``max_model_len`` and at its ``max_output_tokens``; its blocks for all of them are allocated now. Returns
        whether it scheduled them: not when some request forbids it (``Request.multi_step``), when every request
        has one step left, or when the free blocks do not cover every step (the ordinary step then runs, with
        preemption as usual)."""
        k = self.num_scheduler_steps
        # (Forked samples can leave more requests running than a step's sequence slots: those take ordinary steps.)
        if k == 1 or not decodes or not self._has_room_for(len(decodes), plan):
            return False
        steps = []
        for r in decodes:
            if not r.multi_step:
                return False
            limit = min(k, self.max_model_len - r.num_tokens)
            if r.max_output_tokens is not None:
                limit = min(limit, r.max_output_tokens - len(r.output_token_ids))
            steps.append(max(limit, 1))
        manager = self.block_manager
        if max(steps) == 1 or sum(manager.num_blocks_needed(r.request_id, r.num_computed_tokens + n)
                                  for r, n in zip(decodes, steps)) > manager.num_free_blocks:
            return False
        for r, n in zip(decodes, steps):
            start = r.num_computed_tokens
            plan.add(ScheduledSequence(r, start, 1, samples=True, decode_steps=n),
                     manager.allocate_slots(r.request_id, start + n))
        return True

    def _schedule_decodes(self, decodes: list[Request], plan: _StepPlan) -> None:
        """One token for each decode, in order; only when ``_decodes_always_fit`` (the usual case), which
        spares the per-request room, preemption and chunk-size checks of ``_schedule_running``."""
        allocate = self.block_manager.allocate_slots
        for request in decodes:
            start = request.num_computed_tokens
            copies = allocate(request.request_id, start + 1)
            plan.add(ScheduledSequence(request, start, 1, samples=True), copies)

    def _add_drafts(self, decodes: list[Request], plan: _StepPlan) -> None:
        """Speculative decoding: each decode's drafts (``SpeculativeConfig.propose``) become more tokens of its step,
        in order, while the token budget, the step's rows and free blocks last (called last: with what the rest of
        the step leaves). A request's drafts stop where all of them and the token after could no longer be outputs
        (``max_model_len``, its ``max_output_tokens``)."""
        config, allocate = self.speculative_config, self.block_manager.allocate_slots
        for request in decodes:
            room = min(plan.budget, self.max_num_seqs - plan.num_rows)
            if room < 1:
                return
            if request.request_id not in plan.scheduled:  # preempted by a prompt chunk after its decode was planned
                continue
            room = min(room, self.max_model_len - request.num_tokens - 1)
            if request.max_output_tokens is not None:
                room = min(room, request.max_output_tokens - len(request.output_token_ids) - 1)
            drafts = config.propose(request.known_token_array(request.num_tokens), room) if room > 0 else []
            start = request.num_computed_tokens
            copies = allocate(request.request_id, start + 1 + len(drafts)) if drafts else None
            if copies is not None:
                plan.add_drafts(ScheduledSequence(request, start, 1 + len(drafts), samples=True,
                                                  draft_token_ids=tuple(drafts)), copies)

    def _schedule_running(self, request: Request, plan: _StepPlan) -> None:
        """Give a running request its chunk, preempting from the back of the queue until it fits."""
        while True:  # a preempted request may give back budget: size the chunk again each time
            num_tokens = min(request.num_uncomputed_tokens, plan.budget)
            copies = self.block_manager.allocate_slots(request.request_id, request.num_computed_tokens + num_tokens)
            if copies is not None:
                break
            victim = self._running[-1]
            self._preempt(victim, plan)
            if victim is request:
                return
        plan.add(self._chunk(request, num_tokens), copies)

    def _admit_waiting(self, plan: _StepPlan) -> None:
        """Admit waiting requests in queue order while the step has room and their blocks are free. A request
        whose LoRA adapter would be one more than ``max_loras`` running at once is passed over, as vLLM does, for
        the requests behind it (of running adapters, or none) to start."""
        passed_over, reserved = 0, None
        while not plan.preempted and self._has_room(plan) and len(self._running) < self.max_num_seqs:
            request = self._next_admissible(passed_over)
            if request is None:
                return
            if self._waits_for_lora(request, plan):
                passed_over += 1
                continue
            if reserved is None:
                reserved = sum(map(self._reserved_blocks, self._running)) if self.admission_reserve_tokens else 0
            if not self._admit(request, plan, reserved):
                return
            reserved += self._reserved_blocks(request)

    def _reserved_blocks(self, request: Request) -> int:
        """Blocks a running request still needs for its uncomputed tokens and ``admission_reserve_tokens`` more (no
        more than it may still generate) beyond those it holds: admission keeps them free."""
        if not self.admission_reserve_tokens:
            return 0
        room = min(self.admission_reserve_tokens, self.max_model_len - request.num_tokens)
        if request.max_output_tokens is not None:
            room = min(room, request.max_output_tokens - len(request.output_token_ids))
        manager = self.block_manager
        needed = -(-(request.num_tokens + room) // manager.block_size)
        return max(0, needed - manager.num_blocks_held(request.request_id))

    def _waits_for_lora(self, request: Request, plan: _StepPlan) -> bool:
        """Whether the request's LoRA adapter is not among those running (or admitted in this step) and
        ``max_loras`` of them are."""
        if not (request.lora_id and self.max_loras):
            return False
        if plan.loras is None:
            plan.loras = {r.lora_id for r in self._running if r.lora_id}
        return request.lora_id not in plan.loras and len(plan.loras) >= self.max_loras

    def _next_admissible(self, passed_over: int = 0) -> Request | None:
        """The waiting request admission would start next: the head of the queue after the ``passed_over`` first
        ("continuous"), or the first waiting member of the batch in flight ("static"; a new batch opens when none
        is; nothing is passed over)."""
        if self.scheduling_mode == "continuous":
            return self._waiting[passed_over] if passed_over < len(self._waiting) else None
        if passed_over:
            return None
        if not self._static_batch:
            self._static_batch = {r.request_id for r in self._waiting[: self.max_num_seqs]}
        return next((r for r in self._waiting if r.request_id in self._static_batch), None)

    def _admit(self, request: Request, plan: _StepPlan, reserved: int = 0) -> bool:
        """Start a waiting request if its first chunk's blocks are free (never preempts) and, with an admission
        reserve while requests run, its whole prompt's leave the ``reserved`` blocks free (``_reserved_blocks``);
        with prefix caching the chunk starts after its cached prefix."""
        manager = self.block_manager
        looks_up = self._block_keys is not None and request.use_prefix_cache
        if not looks_up:
            prefix, num_cached = [], 0
        else:
            keys = self._block_keys[request.request_id]
            extend_block_keys(keys, request.token_ids, request.num_tokens, manager.block_size,
                              root_key(request.lora_id))
            prefix = manager.cached_prefix(keys, request.num_tokens)
            num_cached = len(prefix) * manager.block_size
        num_tokens = min(request.num_tokens - num_cached, plan.budget)
        if (self.admission_reserve_tokens and self._running
                and manager.num_blocks_to_start(prefix, request.num_tokens) + reserved > manager.num_free_blocks):
            return False
        copies = (manager.allocate_with_prefix(request.request_id, prefix, num_cached + num_tokens) if prefix
                  else manager.allocate_slots(request.request_id, num_tokens))
        if copies is None:
            return False
        if looks_up:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_cached
            if not request.num_preemptions:
                request.num_cached_tokens = num_cached
        request.num_computed_tokens = num_cached
        if request.first_scheduled_time is None:
            request.first_scheduled_time = time.monotonic()
        self._waiting.remove(request)
        request.status = RequestStatus.RUNNING
        self._insert(self._running, request)
        plan.add(self._chunk(request, num_tokens), copies)
        if plan.loras is not None and request.lora_id:  # the step's adapters (_waits_for_lora)
            plan.loras.add(request.lora_id)
        return True

    def _cache_blocks(self, request: Request) -> None:
        """Offer the request's newly full blocks (their step dispatched) to the prefix cache. A block holding a
        token still on the device (asynchronous scheduling) is offered when the next block fills."""
        keys = self._block_keys[request.request_id]
        block_size = self.block_manager.block_size
        num_known = min(request.num_computed_tokens, request.num_tokens)
        if num_known // block_size > len(keys):
            extend_block_keys(keys, request.token_ids, num_known, block_size, root_key(request.lora_id))
        self.block_manager.cache_blocks(request.request_id, keys)

    @staticmethod
    def _chunk(request: Request, num_tokens: int) -> ScheduledSequence:
        start = request.num_computed_tokens
        return ScheduledSequence(request, start, num_tokens, samples=start + num_tokens == request.num_tokens)

    def _preempt(self, request: Request, plan: _StepPlan) -> None:
        plan.drop(request.request_id)
        plan.preempted.append(request.request_id)
        self._running.remove(request)
        self.block_manager.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._insert(self._waiting, request)
