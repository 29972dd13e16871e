"""``AsyncLLM``: the asyncio front of the one ``EngineLoop`` (in this process, or in a child of its own:
``engine.engine_process``, the server's default), for servers.

Owns turning the loop thread's callbacks into per-request async streams of
cumulative ``RequestOutput`` snapshots, aborting a request whose consumer goes away
(client disconnect, task cancelled, stream closed) so its KV blocks are freed, and
per-request latency accounting (time to first token, inter-token latency,
end-to-end latency) handed to stat loggers.

Knows nothing of HTTP, OpenAI's formats or Prometheus. Calls that take the engine
loop's lock (adding, reading stats) run in a worker thread, never on the event loop,
because the loop holds that lock for a whole engine step; with an engine process the
worker only writes to its pipe and the event loop awaits the answer. Aborts wait for
nothing (the engine drops them before its next step), nor does the health check.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import logging
import threading
import time
import weakref
from typing import TYPE_CHECKING, AsyncIterator, Callable, Optional, Protocol, Sequence, Union

from engine.beam_search import BeamSearchParams, beam_search
from engine.engine_args import EngineArgs
from engine.engine_loop import EngineLoop, NewRequest
from engine.outputs import CompletionOutput, RequestOutput, RequestOutputKind, delta_of, elapsed
from engine.pooling import POOLED_OUTPUTS
from engine.prompts import as_prompt
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.engine_process import EngineProcess
    from engine.lora import LoRARequest

logger = logging.getLogger("pagedjax")

PromptType = Union[str, list[int], dict]  # a dict: vLLM's {"prompt": text} or {"prompt_token_ids": ids}


@dataclasses.dataclass(frozen=True)
class FinishedSequence:
    """One finished sequence of a request (a request of ``n`` has ``n``, as vLLM's split requests): what the
    per-request metrics observe."""

    e2e_s: float  # arrival to the sequence's last output
    finish_reason: str  # "stop", "length" or "abort"
    prompt_tokens: int
    generation_tokens: int
    first_token_s: Optional[float] = None  # arrival to its first token (None: it made none)
    n: Optional[int] = 1  # the request's SamplingParams.n (None: another of its sequences reported it) and
    # max_tokens (None: unset)
    max_tokens: Optional[int] = None
    # vLLM's phases: waiting before its first scheduling; that to its first token (prefill); its first token to
    # its last (decode); its first scheduling to its last token (inference). None where a phase never began.
    queue_s: Optional[float] = None
    prefill_s: Optional[float] = None
    decode_s: Optional[float] = None
    inference_s: Optional[float] = None

    @property
    def time_per_output_token_s(self) -> Optional[float]:
        """The mean interval between its tokens after the first (None below two tokens)."""
        if self.first_token_s is None or self.generation_tokens < 2:
            return None
        return (self.e2e_s - self.first_token_s) / (self.generation_tokens - 1)


class StatLogger(Protocol):
    """Receives per-request latencies, called from the engine loop's thread."""

    def on_first_token(self, seconds: float) -> None: ...

    def on_inter_token(self, seconds: float, count: int) -> None: ...  # count: tokens of that interval

    def on_finished(self, finished: FinishedSequence) -> None: ...


class RequestStream:
    """Async iterator over one request's cumulative outputs; the last one has ``finished``.

    A consumer that falls behind gets the newest snapshot (outputs are cumulative,
    so nothing is lost). Closing the stream, or cancelling the task that waits on
    it, before the request finishes aborts the request.
    """

    def __init__(self, request_id: str, queue: asyncio.Queue, abort: Callable[[str], None]):
        self.request_id = request_id
        self._queue = queue
        self._abort = abort
        self._done = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled: the consumer is gone
            self.close()
            raise
        while not isinstance(item, BaseException) and not self._queue.empty():
            item = self._queue.get_nowait()  # skip to the newest snapshot
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    def close(self) -> None:
        """Abort the request unless it already finished (idempotent)."""
        if not self._done:
            self._done = True
            self._abort(self.request_id)


class AsyncLLM:
    """Async generation over one shared ``EngineLoop`` (requests from every caller batch together)."""

    def __init__(self, loop: Union[EngineLoop, "EngineProcess"], stat_loggers: Sequence[StatLogger] = ()):
        self._loop = loop
        self._stat_loggers = list(stat_loggers)
        self._mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its _Mailbox

    @classmethod
    def from_engine_args(cls, args: EngineArgs, stat_loggers: Sequence[StatLogger] = (), *,
                         engine_process: bool = False) -> "AsyncLLM":
        """``engine_process``: run the engine loop in a child process (``engine.engine_process``), so the
        event loop's work never holds up the engine's (one GIL each)."""
        if engine_process:  # this process then never imports JAX
            from engine.engine_process import EngineProcess

            return cls(EngineProcess(args), stat_loggers)
        from engine.llm_engine import LLMEngine

        return cls(EngineLoop(LLMEngine(args)), stat_loggers)

    # -- what the server reads ------------------------------------------------------------

    @property
    def engine(self):
        """The engine (or, in a child process, ``EngineView``: what it fixed at start-up); only read attributes
        fixed at start-up (tokenizer, limits) without ``stats``."""
        return self._loop.engine

    def device_facts(self) -> dict:
        """The engine's device, device count, JAX version and backend."""
        return self._loop.device_facts()

    @property
    def tokenizer(self):
        return self._loop.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self._loop.engine.max_model_len

    def add_stat_logger(self, stat_logger: StatLogger) -> None:
        self._stat_loggers.append(stat_logger)

    def stats(self) -> dict:
        """Engine counters and queue/KV-cache state, read between steps (blocks up to one step)."""
        return self._loop.stats()

    async def sleep(self, level: int = 1) -> None:
        """vLLM's sleep mode (``LLMEngine.sleep``): off the event loop, the weights' copy to the host takes a while."""
        await asyncio.get_running_loop().run_in_executor(None, self._loop.sleep, level)

    async def wake_up(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._loop.wake_up)

    async def is_sleeping(self) -> bool:
        return await asyncio.get_running_loop().run_in_executor(None, self._loop.is_sleeping)

    async def update_weights_from_disk(self, model_path: str, load_format: Optional[str] = None) -> None:
        """``LLMEngine.update_weights_from_disk``, off the event loop (loading takes a while)."""
        await asyncio.get_running_loop().run_in_executor(None, self._loop.update_weights_from_disk, model_path,
                                                         load_format)

    async def reset_prefix_cache(self) -> int:
        """vLLM's: forget every cached prefix (off the event loop: it waits for a step to end); the blocks freed."""
        return await asyncio.get_running_loop().run_in_executor(None, self._loop.reset_prefix_cache)

    async def start_profile(self, profile_dir: str) -> None:
        """JAX's profiler traces the engine's process into ``profile_dir`` until ``stop_profile``."""
        await asyncio.get_running_loop().run_in_executor(None, self._loop.start_profile, profile_dir)

    async def stop_profile(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._loop.stop_profile)

    async def add_lora(self, lora_request: "LoRARequest") -> None:
        """vLLM's ``add_lora``: the engine reads the adapter now (off the event loop), a bad one a ``ValueError``."""
        await asyncio.get_running_loop().run_in_executor(None, self._loop.add_lora, lora_request)

    def is_alive(self) -> bool:
        """Whether the engine (its loop's thread, or its process) still runs; read at once, as vLLM's health check
        reads its error flag: a busy engine is a live one."""
        return self._loop.is_alive()

    # -- requests -------------------------------------------------------------------------

    def new_request_id(self) -> str:
        return self._loop.new_request_id()

    async def add_request(self, request_id: str, prompt: PromptType, params: Optional[SamplingParams] = None,
                          *, priority: int = 0, lora_request: Optional["LoRARequest"] = None) -> RequestStream:
        """Queue a request and return its stream; raises ValueError (before queueing) for bad input."""
        (stream,) = await self.add_requests([(request_id, prompt, params)], priority=priority,
                                            lora_request=lora_request)
        return stream

    async def add_requests(self, requests: Sequence[tuple[str, PromptType, Optional[SamplingParams]]],
                           *, priority: int = 0, lora_request: Optional["LoRARequest"] = None) -> list[RequestStream]:
        """Queue ``(request_id, prompt, params)`` requests all between the same two engine steps, so
        they start together; all or none (if one is refused, none stays queued and the error is raised).
        ``lora_request``: every one runs with that LoRA adapter (``engine.lora``; the engine needs ``enable_lora``,
        and reads the adapter when a request first names it: a bad one is a ``ValueError`` here)."""
        loop = asyncio.get_running_loop()
        arrival = time.monotonic()
        queues = [asyncio.Queue() for _ in requests]
        request_ids = [request_id for request_id, _, _ in requests]

        items = [NewRequest(request_id, as_prompt(prompt, i), params,
                            *self._callbacks(loop, queue, _RequestTimer(arrival, params, self._stat_loggers)),
                            priority, lora_request)
                 for i, ((request_id, prompt, params), queue) in enumerate(zip(requests, queues))]
        if hasattr(self._loop, "add_requests_future"):  # an engine process: a worker thread only for the pipe write
            submitted = loop.run_in_executor(None, self._loop.add_requests_future, items)

            async def added():
                return await asyncio.wrap_future(await submitted)

            # One task for the pipe write and the engine's answer, shielded whole: a caller that leaves during the
            # write (waiting for the pipe's lock, say) had its requests queued with no stream to abort them.
            add = asyncio.ensure_future(added())
        else:  # the loop in this process: the worker waits for the step in flight to end
            add = loop.run_in_executor(None, self._loop.add_requests, items)
        try:
            await asyncio.shield(add)
        except asyncio.CancelledError:  # the caller left while the requests were being queued
            def abort_added(future) -> None:
                if not future.cancelled() and future.exception() is None:
                    for request_id in request_ids:
                        self._abort_soon(request_id)

            add.add_done_callback(abort_added)
            raise
        return [RequestStream(request_id, queue, self._abort_soon) for request_id, queue in zip(request_ids, queues)]

    def _callbacks(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, timer: "_RequestTimer"):
        """The engine-thread callbacks of one request: record latencies, hand outputs to the event loop."""
        mailbox = self._mailboxes.get(loop)
        if mailbox is None:
            mailbox = self._mailboxes[loop] = _Mailbox(loop)

        def on_output(output: RequestOutput) -> None:
            try:
                timer.record(output)
            except Exception:  # a stat logger must never fail an engine step
                logger.exception("stat logger failed")
            mailbox.put(queue, output)

        def on_error(exc: BaseException) -> None:
            mailbox.put(queue, exc)

        return on_output, on_error

    async def generate(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None, *, priority: int = 0,
                       lora_request: Optional["LoRARequest"] = None) -> AsyncIterator[RequestOutput]:
        """The outputs of one request as they arrive, as ``params.output_kind`` says (vLLM's: cumulative by default;
        only what is new; only the final one); leaving early aborts it."""
        stream = await self.add_request(request_id or self.new_request_id(), prompt, params, priority=priority,
                                        lora_request=lora_request)
        kind = params.output_kind if params is not None else RequestOutputKind.CUMULATIVE
        sent: dict[int, tuple[int, int]] = {}
        try:
            async for output in stream:
                if kind is RequestOutputKind.FINAL_ONLY and not output.finished:
                    continue
                yield delta_of(output, sent) if kind is RequestOutputKind.DELTA else output
        finally:
            stream.close()

    def beam_search(self, request_id: str, prompt_token_ids: list[int], params: BeamSearchParams, *,
                    prompt: Optional[str] = None, lora_request: Optional["LoRARequest"] = None) -> "BeamSearchStream":
        """vLLM's ``EngineClient.beam_search``: a stream whose one output, when the search ends, holds the
        ``params.beam_width`` best sequences as its completions, best first (``engine.beam_search``; each round's
        one-token requests go through this engine with the others in flight)."""
        return BeamSearchStream(self, request_id, prompt_token_ids, params, prompt, lora_request)

    async def abort(self, request_id: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._loop.abort, request_id)

    def _abort_soon(self, request_id: str) -> None:
        """Abort without waiting for the engine: it drops the request before its next step (many clients leaving
        at once are dropped together). The pipe write to an engine process runs in a worker thread."""
        try:
            asyncio.get_running_loop().run_in_executor(None, self._loop.abort_soon, request_id)
        except RuntimeError:  # no running event loop (closed, or called from a plain thread)
            self._loop.abort_soon(request_id)

    def shutdown(self) -> None:
        self._loop.shutdown()


class BeamSearchStream:
    """One prompt's beam search as a request stream (``AsyncLLM.beam_search``). The search's loop runs in a worker
    thread, each round's requests on the caller's event loop; closing the stream stops the search at its next round.
    """

    def __init__(self, llm: AsyncLLM, request_id: str, prompt_token_ids: list[int], params: BeamSearchParams,
                 prompt: Optional[str], lora_request):
        self._llm, self.request_id, self._params = llm, request_id, params
        self._prompt, self._prompt_token_ids, self._lora_request = prompt, list(prompt_token_ids), lora_request
        self._closed = threading.Event()
        self._rounds = 0
        self._done = False

    def __aiter__(self) -> "BeamSearchStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        self._done = True
        loop = asyncio.get_running_loop()
        engine = self._llm.engine

        def generate(batch: list, sampling: SamplingParams) -> list[RequestOutput]:  # one round, on the loop
            future = asyncio.run_coroutine_threadsafe(self._round(batch, sampling), loop)
            while True:
                if self._closed.is_set() or loop.is_closed():
                    future.cancel()
                    raise RuntimeError(f"beam search {self.request_id} was closed")
                try:
                    return future.result(timeout=0.5)
                except concurrent.futures.TimeoutError:
                    continue

        decode = None if engine.tokenizer is None else engine.tokenizer.decode
        try:
            (result,) = await loop.run_in_executor(None, functools.partial(
                beam_search, generate, [self._prompt_token_ids], self._params, eos_token_ids=engine.eos_token_ids,
                max_model_len=engine.max_model_len, decode=decode, use_tqdm=False))
        except asyncio.CancelledError:  # the caller left: the search stops at its next round
            self._closed.set()
            raise
        start = len(self._prompt_token_ids)
        completions = [CompletionOutput(index=i, text=seq.text or "", token_ids=seq.tokens[start:],
                                        cumulative_logprob=seq.cum_logprob, finish_reason=seq.finish_reason)
                       for i, seq in enumerate(result.sequences)]
        return RequestOutput(request_id=self.request_id, prompt=self._prompt, prompt_token_ids=self._prompt_token_ids,
                             outputs=completions, finished=True, lora_request=self._lora_request)

    async def _round(self, batch: list, sampling: SamplingParams) -> list[RequestOutput]:
        self._rounds += 1
        streams = await self._llm.add_requests(
            [(f"{self.request_id}-beam{self._rounds}-{i}", tokens, sampling) for i, tokens in enumerate(batch)],
            lora_request=self._lora_request)
        return await final_outputs(streams)

    def close(self) -> None:
        self._closed.set()


async def merge_streams(streams: Sequence[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as ``(stream index, output)`` in arrival order.

    Leaving early, or an error in one stream, closes them all (aborting unfinished requests).
    """
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()
    finished = object()

    async def pump(index: int, stream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
            queue.put_nowait((index, finished))
        except Exception as exc:
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is finished:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            close = getattr(stream, "close", None)
            if close is not None:
                close()


async def final_outputs(streams: Sequence[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    """Each stream's last (final) output, in the streams' order."""
    finals: list[Optional[RequestOutput]] = [None] * len(streams)
    async for index, output in merge_streams(streams):
        finals[index] = output
    return finals  # type: ignore[return-value]


@dataclasses.dataclass
class _SequenceClock:
    """What a request timer has seen of one of its sequences (times on ``time.monotonic()``)."""

    tokens: int = 0
    first_token: Optional[float] = None
    last_token: Optional[float] = None
    finished: bool = False


class _RequestTimer:
    """Latencies of one request, measured when its outputs leave the engine step: each of its ``n`` sequences is
    timed on its own (vLLM splits such a request into ``n`` requests), so a sequence's time to first token, each of
    its inter-token intervals and its end-to-end latency are one observation each."""

    def __init__(self, arrival: float, params: Optional[SamplingParams], stat_loggers: Sequence[StatLogger]):
        self.arrival = arrival
        self.params = params
        self.stat_loggers = stat_loggers
        self.sequences: dict[int, _SequenceClock] = {}  # by completion index
        self.n_reported = False  # the request's n goes with its first finished sequence only

    def record(self, output: RequestOutput) -> None:
        if not self.stat_loggers:
            return
        now = time.monotonic()
        if isinstance(output, POOLED_OUTPUTS):  # a pooling engine's: one output, no tokens
            finished = FinishedSequence(now - self.arrival, "stop", len(output.prompt_token_ids), 0)
            for stat_logger in self.stat_loggers:
                stat_logger.on_finished(finished)
            return
        for c in output.outputs:
            clock = self.sequences.setdefault(c.index, _SequenceClock())
            if len(c.token_ids) > clock.tokens:
                # Tokens that arrive together (a multi-step decode's) share the interval since the last arrival.
                new, first = len(c.token_ids) - clock.tokens, clock.first_token is None
                intervals = new - 1 if first else new
                for stat_logger in self.stat_loggers:
                    if first:
                        stat_logger.on_first_token(now - self.arrival)
                    if intervals:
                        stat_logger.on_inter_token(0.0 if first else (now - clock.last_token) / new, intervals)
                clock.tokens, clock.last_token = len(c.token_ids), now
                if first:
                    clock.first_token = now
            if not clock.finished and (c.finish_reason is not None or output.finished):
                clock.finished = True
                sequence = self._finished(output, c.finish_reason or "abort", clock, now)
                for stat_logger in self.stat_loggers:
                    stat_logger.on_finished(sequence)

    def _finished(self, output: RequestOutput, reason: str, clock: _SequenceClock, now: float) -> FinishedSequence:
        params, metrics = self.params, output.metrics
        scheduled = metrics.first_scheduled_time if metrics is not None else None
        n = None if self.n_reported else params.n if params is not None else 1
        self.n_reported = True
        return FinishedSequence(
            now - self.arrival, reason, len(output.prompt_token_ids or ()), clock.tokens,
            elapsed(self.arrival, clock.first_token), n,
            params.max_tokens if params is not None else None,
            queue_s=metrics.time_in_queue if metrics is not None else None,
            prefill_s=elapsed(scheduled, clock.first_token), decode_s=elapsed(clock.first_token, clock.last_token),
            inference_s=elapsed(scheduled, clock.last_token))


class _Mailbox:
    """Hands items from other threads to an event loop's queues, waking the loop once for everything that arrives
    before it runs: ``call_soon_threadsafe`` writes to the loop's wake-up pipe and queues a callback each call, and
    at 512 streams the engine's outputs made that one system call and one callback a request a step."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._items: list[tuple[asyncio.Queue, object]] = []
        self._lock = threading.Lock()

    def put(self, queue: asyncio.Queue, item) -> None:
        with self._lock:
            self._items.append((queue, item))
            wake = len(self._items) == 1  # else a delivery is already due and takes this item too
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._deliver)
            except RuntimeError:  # the consumers' event loop is closed: nobody is listening
                with self._lock:
                    self._items.clear()

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)
