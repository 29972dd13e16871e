"""Per-step trace of the engine: what ran in each step and how the KV pool looked after it.

Owns the trace records (``StepRecord`` with its ``ScheduledTokens`` and
``SequenceState``), the ``StepTracer`` the engine feeds once per executed step
when ``EngineArgs.trace`` is on, the views benchmarks and pictures need (per-request
spans, KV waste per step against a contiguous allocator) and a compact JSON form.

Reads the scheduler's plan, its running requests and the block manager, after the
step's KV writes and before finished requests free their blocks, so every
allocated slot of a record is either written or waste. Knows nothing of JAX,
devices, sampling or text; a request's ``sampling_params`` is read only for its
``max_tokens`` (what a contiguous allocator would reserve).

Memory: a block table is stored once per change (an unchanged table is the same
tuple object as in the previous record), so a long run costs about one tuple per
sequence per ``block_size`` tokens.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import threading
from typing import Optional

TRACE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class ScheduledTokens:
    """One sequence's share of a step: tokens ``start .. start + num_tokens - 1`` ran."""

    request_id: str
    start: int
    num_tokens: int
    samples: bool  # the step sampled a token for it (the chunk reached its last known token)
    num_prompt_tokens: int

    @property
    def is_prefill(self) -> bool:
        """The chunk computes prompt tokens (a recompute after preemption starts at 0, so it counts too)."""
        return self.start < self.num_prompt_tokens


@dataclasses.dataclass(frozen=True)
class SequenceState:
    """A running sequence after the step: the tokens its blocks hold and the blocks themselves."""

    request_id: str
    num_tokens: int  # tokens in its blocks, all written by the end of the step
    block_table: tuple[int, ...]
    reserved_tokens: int  # what a contiguous allocator reserves for it: prompt + max output, <= max_model_len


@dataclasses.dataclass(frozen=True)
class StepRecord:
    step: int  # index of the executed step since the engine started
    start_s: float  # time.perf_counter() when scheduling began
    end_s: float  # time.perf_counter() when the step's sampled tokens were on the host
    scheduled: tuple[ScheduledTokens, ...]
    sequences: tuple[SequenceState, ...]  # every running sequence (scheduled this step or not)
    num_used_blocks: int
    num_allocated_slots: int
    num_used_slots: int
    num_waiting: int
    preempted: tuple[str, ...] = ()

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def num_wasted_slots(self) -> int:
        """Allocated slots no sequence has written (internal fragmentation of the paged pool)."""
        return self.num_allocated_slots - self.num_used_slots

    @property
    def has_prefill(self) -> bool:
        return any(s.is_prefill for s in self.scheduled)


@dataclasses.dataclass
class StepTrace:
    """A run's records plus the pool's shape; what ``LLM.get_trace()`` returns."""

    block_size: int
    num_blocks: int  # including the reserved block 0
    max_model_len: int
    max_num_seqs: int
    scheduling_mode: str
    records: list[StepRecord] = dataclasses.field(default_factory=list)

    # -- views -----------------------------------------------------------------------------

    def request_ids(self) -> list[str]:
        """Every request that ran, in order of first appearance."""
        seen: dict[str, None] = {}
        for r in self.records:
            for s in r.scheduled:
                seen.setdefault(s.request_id, None)
        return list(seen)

    def request_spans(self) -> dict[str, list[tuple[int, ScheduledTokens]]]:
        """request id -> the ``(step, tokens)`` of every step it ran in, in step order."""
        spans: dict[str, list[tuple[int, ScheduledTokens]]] = {}
        for r in self.records:
            for s in r.scheduled:
                spans.setdefault(s.request_id, []).append((r.step, s))
        return spans

    def first_and_last_steps(self) -> dict[str, tuple[int, int]]:
        return {rid: (runs[0][0], runs[-1][0]) for rid, runs in self.request_spans().items()}

    def admission_steps(self) -> dict[int, list[str]]:
        """step -> the requests whose first chunk ran in it, in step order."""
        starts: dict[int, list[str]] = {}
        for rid, (first, _) in self.first_and_last_steps().items():
            starts.setdefault(first, []).append(rid)
        return dict(sorted(starts.items()))

    def kv_waste(self) -> list[dict]:
        """Per step: allocated and written slots of the paged pool, and of two contiguous allocators.

        ``contiguous_reserved`` reserves prompt + max output tokens per running
        sequence; ``contiguous_max_model_len`` reserves ``max_model_len`` each. Both
        hold the same written tokens as the paged pool.
        """
        rows = []
        for r in self.records:
            written = sum(s.num_tokens for s in r.sequences)
            rows.append(dict(
                step=r.step, num_seqs=len(r.sequences),
                paged_allocated=r.num_allocated_slots, paged_written=r.num_used_slots,
                contiguous_reserved_allocated=sum(s.reserved_tokens for s in r.sequences),
                contiguous_max_model_len_allocated=len(r.sequences) * self.max_model_len,
                written=written,
            ))
        return rows

    # -- JSON ------------------------------------------------------------------------------

    def to_json(self) -> dict:
        """Compact: a sequence's block table is written only in records where it changed."""
        last_table: dict[str, tuple[int, ...]] = {}
        records = []
        for r in self.records:
            seqs = []
            for s in r.sequences:
                changed = last_table.get(s.request_id) != s.block_table
                last_table[s.request_id] = s.block_table
                seqs.append([s.request_id, s.num_tokens, s.reserved_tokens, list(s.block_table) if changed else None])
            records.append(dict(
                step=r.step, start_s=r.start_s, end_s=r.end_s,
                scheduled=[[s.request_id, s.start, s.num_tokens, int(s.samples), s.num_prompt_tokens]
                           for s in r.scheduled],
                sequences=seqs, num_used_blocks=r.num_used_blocks, num_allocated_slots=r.num_allocated_slots,
                num_used_slots=r.num_used_slots, num_waiting=r.num_waiting, preempted=list(r.preempted)))
        return dict(format=TRACE_FORMAT, block_size=self.block_size, num_blocks=self.num_blocks,
                    max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
                    scheduling_mode=self.scheduling_mode, records=records)

    @classmethod
    def from_json(cls, data: dict) -> "StepTrace":
        if data.get("format") != TRACE_FORMAT:
            raise ValueError(f"unsupported trace format {data.get('format')!r}; this reader knows {TRACE_FORMAT}")
        last_table: dict[str, tuple[int, ...]] = {}
        records = []
        for r in data["records"]:
            seqs = []
            for rid, num_tokens, reserved, table in r["sequences"]:
                if table is not None:
                    last_table[rid] = tuple(table)
                elif rid not in last_table:
                    raise ValueError(f"step {r['step']}: sequence {rid!r} has no block table in this or an "
                                     "earlier record")
                seqs.append(SequenceState(rid, num_tokens, last_table[rid], reserved))
            records.append(StepRecord(
                step=r["step"], start_s=r["start_s"], end_s=r["end_s"],
                scheduled=tuple(ScheduledTokens(rid, start, n, bool(smp), prompt)
                                for rid, start, n, smp, prompt in r["scheduled"]),
                sequences=tuple(seqs), num_used_blocks=r["num_used_blocks"],
                num_allocated_slots=r["num_allocated_slots"], num_used_slots=r["num_used_slots"],
                num_waiting=r["num_waiting"], preempted=tuple(r.get("preempted", ()))))
        return cls(block_size=data["block_size"], num_blocks=data["num_blocks"], max_model_len=data["max_model_len"],
                   max_num_seqs=data["max_num_seqs"], scheduling_mode=data["scheduling_mode"], records=records)

    def save(self, path: str) -> None:
        """Write JSON (gzip-compressed when ``path`` ends in ``.gz``)."""
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "wt") as f:
            json.dump(self.to_json(), f, separators=(",", ":"))

    @classmethod
    def load(cls, path: str) -> "StepTrace":
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt") as f:
            return cls.from_json(json.load(f))


class StepTracer:
    """Collects a ``StepRecord`` per executed step. The engine calls ``capture`` when it has put a
    step on the device (its plan made, before the scheduler counts the step's tokens) and
    ``finish`` when the step's tokens are on the host, before finished requests free their
    blocks. With asynchronous scheduling the next step is planned between the two, so the state
    is read at ``capture``; a step's ``start_s`` is the later of its launch and the previous
    step's end, so records tile the timeline. ``snapshot`` and ``clear`` may be called from
    other threads."""

    def __init__(self, *, block_size: int, num_blocks: int, max_model_len: int, max_num_seqs: int,
                 scheduling_mode: str):
        self._header = dict(block_size=block_size, num_blocks=num_blocks, max_model_len=max_model_len,
                            max_num_seqs=max_num_seqs, scheduling_mode=scheduling_mode)
        self._records: list[StepRecord] = []
        self._tables: dict[str, tuple[int, ...]] = {}  # last stored table of each sequence, to share tuples
        self._num_steps = 0
        self._last_end_s = float("-inf")
        self._lock = threading.Lock()

    def capture(self, plan, scheduler, block_manager, start_s: float) -> StepRecord:
        """The record of a step just launched, its end not known yet (``finish`` sets it)."""
        max_model_len = self._header["max_model_len"]
        sequences = []
        tables = {}
        for request in scheduler.running_requests:
            rid = request.request_id
            table = tuple(block_manager.block_table(rid))
            previous = self._tables.get(rid)
            tables[rid] = table = previous if previous == table else table
            sequences.append(SequenceState(rid, block_manager.num_tokens(rid), table,
                                           _reserved_tokens(request, max_model_len)))
        self._tables = tables  # only the engine's loop thread captures
        return StepRecord(
            step=-1, start_s=start_s, end_s=start_s,
            scheduled=tuple(ScheduledTokens(s.request_id, s.start, s.num_tokens, s.samples, s.request.num_prompt_tokens)
                            for s in plan.scheduled),
            sequences=tuple(sequences), num_used_blocks=block_manager.num_used_blocks,
            num_allocated_slots=block_manager.num_allocated_slots, num_used_slots=block_manager.num_used_slots,
            num_waiting=scheduler.num_waiting, preempted=tuple(plan.preempted_request_ids))

    def finish(self, captured: StepRecord, end_s: float) -> None:
        """Store a captured step that ended at ``end_s`` (steps finish in launch order)."""
        start_s = max(captured.start_s, self._last_end_s)
        self._last_end_s = end_s
        with self._lock:
            self._records.append(dataclasses.replace(captured, step=self._num_steps, start_s=start_s, end_s=end_s))
            self._num_steps += 1

    def snapshot(self, reset: bool = False) -> StepTrace:
        """The records so far (a copy); ``reset`` drops them (step indices keep counting)."""
        with self._lock:
            records = list(self._records)
            if reset:
                self._records.clear()
        return StepTrace(records=records, **self._header)

    def clear(self) -> None:
        self.snapshot(reset=True)


def _reserved_tokens(request, max_model_len: int) -> int:
    max_tokens: Optional[int] = getattr(request.sampling_params, "max_tokens", None)
    if max_tokens is None:
        return max_model_len
    return min(request.num_prompt_tokens + max_tokens, max_model_len)
