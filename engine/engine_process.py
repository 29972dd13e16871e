"""The engine loop in a child process of its own, for the server (vLLM V1's split of API server and engine core).

In one process the HTTP side (Starlette sending a chunk per token per stream) and the engine loop's host work
share one GIL. At 512 streams on a 2-core CPU the event loop held it 46% of the time and the engine thread 37%
(``py-spy --gil``), so the engine stepped at a fraction of its offline rate; on an H200 the server gave 3,750
output tok/s where the engine alone does several times that (benchmarks/NOTES.md, run 31c). Here each side has
its own interpreter.

``EngineProcess`` offers what ``AsyncLLM`` uses of an ``EngineLoop`` (``add_requests``, ``abort``, ``stats``,
``check``, ``device_facts``, ``engine``, ``shutdown``), backed by a spawned child that builds the ``LLMEngine`` and
runs an ``EngineLoop``:

- commands go down one pipe as ``(call_id, name, payload)`` (a request's with its ``LoRARequest``, if any); the child
  answers each with a reply, so a refused request raises its ``ValueError`` in the caller, as in one process (an
  error class of a module that imports JAX, ``models.lora.LoRAAdapterError`` say, arrives as its builtin base:
  ``_portable``);
- outputs and replies come up the other pipe in batches: the child's engine thread gathers what a step (or a batch
  of commands) produced and a sender thread sends it as one message; each output travels as what is new since
  the request's last (``RequestOutputKind.DELTA``, ``engine.output_deltas``); a receiver thread here rebuilds the
  cumulative outputs and hands them to each request's callbacks;
- ``engine`` is an ``EngineView``: what the server reads of the engine (limits, tokenizer, model facts), fixed at
  start-up and sent up once;
- if the child dies, every request in flight and every call waiting fails with ``EngineDeadError``.

The child is spawned (a fork would copy the parent's JAX state), so a script that starts one needs the usual
``if __name__ == "__main__":`` guard around its own work.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
from typing import Any, Callable, Optional, Sequence

from engine.engine_args import EngineArgs
from engine.engine_loop import EngineLoop, NewRequest
from engine.output_deltas import DeltaDecoder
from engine.output_deltas import encode as encode_delta
from engine.outputs import RequestOutputKind
from engine.tokenizer import encode_prompt

logger = logging.getLogger("pagedjax")


class EngineDeadError(RuntimeError):
    """The engine's process exited; nothing more will come from it."""


@dataclasses.dataclass
class _InFlight:
    """A request the child runs for this process: its callbacks, and the decoder that rebuilds its cumulative
    outputs from the deltas the child sends (``engine.output_deltas``)."""

    on_output: Callable
    on_error: Callable
    outputs: DeltaDecoder = dataclasses.field(default_factory=DeltaDecoder)


@dataclasses.dataclass
class EngineView:
    """What the server reads of an engine in another process: fixed at start-up."""

    args: EngineArgs
    model_path: str
    model_config: Any
    max_model_len: int
    dtype: str
    quantization: Optional[str]
    tokenizer: Any
    facts: dict
    default_sampling_fields: dict
    eos_token_ids: frozenset

    @classmethod
    def of(cls, engine, facts: dict) -> "EngineView":
        return cls(args=engine.args, model_path=engine.model_path, model_config=engine.model_config,
                   max_model_len=engine.max_model_len, dtype=engine.dtype, quantization=engine.quantization,
                   tokenizer=engine.tokenizer, facts=facts, default_sampling_fields=engine.default_sampling_fields,
                   eos_token_ids=frozenset(engine.eos_token_ids))

    def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, add_special_tokens)


class EngineProcess:
    """An ``EngineLoop`` in a spawned child process (module docstring). Blocks until the engine is built; raises
    what building it raised (``ValueError`` for a bad model or argument, as ``LLMEngine`` does)."""

    def __init__(self, args: EngineArgs):
        context = multiprocessing.get_context("spawn")  # a fork would copy this process's JAX state
        child_commands, self._commands = context.Pipe(duplex=False)
        self._outputs, child_outputs = context.Pipe(duplex=False)
        self._process = context.Process(target=_child_main, args=(args, child_commands, child_outputs),
                                        name="pagedjax-engine-process", daemon=True)
        self._process.start()
        child_commands.close()
        child_outputs.close()
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._ids = itertools.count()
        self._calls = itertools.count()
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._in_flight: dict[str, _InFlight] = {}
        self._dead: Optional[EngineDeadError] = None
        try:
            (kind, value), = self._outputs.recv()
        except (EOFError, OSError):
            self._process.join(timeout=5)
            raise EngineDeadError(f"the engine process exited (code {self._process.exitcode}) while starting")
        if kind == "failed":
            self._process.join(timeout=30)
            raise value
        self.engine: EngineView = value
        self._receiver = threading.Thread(target=self._receive, name="pagedjax-engine-outputs", daemon=True)
        self._receiver.start()

    # -- EngineLoop's interface -------------------------------------------------------------

    def new_request_id(self) -> str:
        return str(next(self._ids))

    def add_requests(self, requests: Sequence[NewRequest]) -> None:
        """Requests all queued between two steps or none (the child's ``EngineLoop.add_requests``); a refused one's
        error is raised here. Their callbacks stay here: the child gets the rest."""
        self.add_requests_future(requests).result()

    def add_requests_future(self, requests: Sequence[NewRequest]) -> concurrent.futures.Future:
        """``add_requests`` without waiting for the child: the future ends when the child has queued them (or
        refused them: its exception), so a caller's thread is held only for the pipe write, not a step."""
        with self._state_lock:
            taken = [r.request_id for r in requests if r.request_id in self._in_flight]
            if taken:  # checked here: registering would take over the running request's callbacks
                raise ValueError(f"request id {taken[0]!r} is already in use")
            for r in requests:
                self._in_flight[r.request_id] = _InFlight(r.on_output, r.on_error)

        def unregister(future: concurrent.futures.Future) -> None:
            if future.cancelled() or future.exception() is not None:
                with self._state_lock:
                    for r in requests:
                        self._in_flight.pop(r.request_id, None)

        try:
            future = self._submit("add", [(r.request_id, r.prompt, r.params, r.priority, r.lora_request)
                                          for r in requests])
        except BaseException as exc:  # the engine is gone: the future says so
            future = concurrent.futures.Future()
            future.set_exception(exc)
        future.add_done_callback(unregister)  # refused or failed: their callbacks go
        return future

    def abort(self, request_id: str) -> None:
        if self._dead is None:
            self._call("abort", request_id)

    def abort_soon(self, request_id: str) -> None:
        """Abort without waiting for the child's answer: it drops the request before its next step (a crowd of
        clients leaving at once is dropped together, not one step each)."""
        if self._dead is not None:
            return
        try:
            with self._send_lock:
                self._commands.send((None, "abort", request_id))
        except (OSError, ValueError):  # the child is gone: its receiver fails what was in flight
            pass

    def is_alive(self) -> bool:
        """Whether the engine process still runs (read at once: the server's /health)."""
        return self._dead is None and self._process.is_alive()

    def stats(self) -> dict:
        return self._call("stats", None)

    def sleep(self, level: int = 1) -> None:
        self._call("sleep", level)

    def wake_up(self) -> None:
        self._call("wake_up", None)

    def is_sleeping(self) -> bool:
        return self._call("is_sleeping", None)

    def update_weights_from_disk(self, model_path: str, load_format: Optional[str] = None) -> None:
        self._call("update_weights_from_disk", (model_path, load_format))

    def add_lora(self, lora_request) -> None:
        self._call("add_lora", lora_request)

    def reset_prefix_cache(self) -> int:
        return self._call("reset_prefix_cache", None)

    def start_profile(self, profile_dir: str) -> None:  # the engine's process is where the steps run
        self._call("start_profile", profile_dir)

    def stop_profile(self) -> None:
        self._call("stop_profile", None)

    def device_facts(self) -> dict:
        return dict(self.engine.facts)

    def shutdown(self) -> None:
        try:
            with self._send_lock:
                self._commands.send((None, "shutdown", None))
        except (OSError, ValueError):  # the child is gone already
            pass
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=10)

    # -- plumbing ---------------------------------------------------------------------------

    def _call(self, name: str, payload):
        """Send one command and wait for the child's reply (its result, or the exception it raised)."""
        return self._submit(name, payload).result()

    def _submit(self, name: str, payload) -> concurrent.futures.Future:
        """Send one command; the future holds the child's reply."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._state_lock:
            if self._dead is not None:
                raise self._dead
            call_id = next(self._calls)
            self._futures[call_id] = future
        try:
            with self._send_lock:
                self._commands.send((call_id, name, payload))
        except (OSError, ValueError) as exc:
            with self._state_lock:
                self._futures.pop(call_id, None)
            raise EngineDeadError("the engine process is gone") from exc
        return future

    def _receive(self) -> None:
        while True:
            try:
                batch = self._outputs.recv()
            except (EOFError, OSError):
                break
            for kind, key, value in batch:
                if kind == "reply":
                    with self._state_lock:
                        future = self._futures.pop(key, None)
                    ok, result = value
                    if future is not None and ok:
                        future.set_result(result)
                    elif future is not None:
                        future.set_exception(result)
                    continue
                with self._state_lock:
                    request = self._in_flight.get(key)
                    if request is not None and (kind == "error" or value[0]):  # an error, or a finished output
                        del self._in_flight[key]
                if request is None:
                    continue
                if kind == "error":
                    request.on_error(value)
                    continue
                request.on_output(request.outputs.decode(key, value))
        self._fail_all()

    def _fail_all(self) -> None:
        self._process.join(timeout=5)
        error = EngineDeadError(f"the engine process exited (code {self._process.exitcode})")
        with self._state_lock:
            self._dead = error
            futures, self._futures = self._futures, {}
            in_flight, self._in_flight = self._in_flight, {}
        if in_flight:
            logger.error("%s; failing %d requests in flight", error, len(in_flight))
        for future in futures.values():
            future.set_exception(error)
        for request in in_flight.values():
            request.on_error(error)


# -- the child ------------------------------------------------------------------------------


# Packages whose errors the parent must not unpickle: that imports the error's module, and these import JAX.
_JAX_PACKAGES = frozenset({"models", "pallas_kernels", "sharding", "jax", "jaxlib"})


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError with its message. An error of a package that imports JAX
    (``models.lora.LoRAAdapterError``, say: unpickling it would load JAX into the server's process) travels as the
    nearest builtin class it derives from, with its message (a ``ValueError`` stays a ``ValueError``)."""
    if (type(exc).__module__ or "").split(".")[0] in _JAX_PACKAGES:
        base = next(c for c in type(exc).__mro__ if c.__module__ == "builtins")
        try:
            exc = base(str(exc))
        except Exception:
            return RuntimeError(f"{type(exc).__name__}: {exc}")
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class _Outbox:
    """The child's one writer of the outputs pipe. Outputs, errors and replies are gathered (``add``) while the
    engine loop's thread runs a step or a batch of commands and handed to a sender thread together (``flush``,
    after each): one step's outputs travel as one message, and adding one costs the engine thread a list append,
    not a wake-up of the sender (py-spy: a queue put per output was 5% of the child's samples at 512 streams)."""

    def __init__(self, connection):
        self._connection = connection
        self._items: list = []
        self._lock = threading.Lock()
        self._batches: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pagedjax-outbox", daemon=True)
        self._thread.start()

    def add(self, item) -> None:
        with self._lock:
            self._items.append(item)

    def flush(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        if items:
            self._batches.put(items)

    def close(self) -> None:
        self.flush()
        self._batches.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        done = False
        while not done:
            batch = self._batches.get()
            if batch is None:
                return
            while True:  # whatever else was flushed meanwhile goes in the same message
                try:
                    more = self._batches.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    done = True
                    break
                batch.extend(more)
            try:
                self._connection.send(batch)
            except (OSError, ValueError):  # the parent is gone
                return


def _child_main(args: EngineArgs, commands, outputs) -> None:
    # Ctrl-C reaches the whole process group, and a supervisor's SIGTERM may too (systemd's default): the parent
    # stops this process (a shutdown command, or its pipe closing) after its server's graceful shutdown, so the
    # requests still running meanwhile are not failed by a dead engine.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine(args)
        view = EngineView.of(engine, EngineLoop.device_facts())
    except BaseException as exc:
        outputs.send([("failed", _portable(exc))])
        return
    outputs.send([("ready", view)])
    outbox = _Outbox(outputs)
    loop = EngineLoop(engine, after_step=outbox.flush)

    def callbacks(request_id: str):
        return (lambda output: outbox.add(("output", request_id, encode_delta(output))),
                lambda exc: outbox.add(("error", request_id, _portable(exc))))

    handlers = {
        "add": lambda payload: loop.add_requests([  # each output says what is new (the prompt once)
            NewRequest(request_id, prompt, params, *callbacks(request_id), priority, lora_request)
            for request_id, prompt, params, priority, lora_request in payload], output_kind=RequestOutputKind.DELTA),
        "abort": loop.abort,
        "stats": lambda _: loop.stats(),
        "sleep": loop.sleep,
        "wake_up": lambda _: loop.wake_up(),
        "is_sleeping": lambda _: loop.is_sleeping(),
        "update_weights_from_disk": lambda payload: loop.update_weights_from_disk(*payload),
        "add_lora": loop.add_lora,
        "reset_prefix_cache": lambda _: loop.reset_prefix_cache(),
        "start_profile": loop.start_profile,
        "stop_profile": lambda _: loop.stop_profile(),
    }

    def run(batch) -> bool:
        """Answer a batch of commands; False once one of them is ``shutdown``."""
        for call_id, name, payload in batch:
            if name == "shutdown":
                return False
            try:
                reply = (True, handlers[name](payload))
            except Exception as exc:
                reply = (False, _portable(exc))
            if call_id is not None:  # None: nobody waits for the answer (an abort_soon)
                outbox.add(("reply", call_id, reply))
            elif not reply[0]:
                logger.warning("command %s failed: %s", name, reply[1])
        outbox.flush()
        return True

    try:
        while True:
            try:
                batch = [commands.recv()]
                while commands.poll():  # whatever queued up meanwhile: one pause between steps for all of it
                    batch.append(commands.recv())
            except (EOFError, OSError):  # the parent is gone
                break
            # Commands one at a time would each wait for a step to end: 512 requests arriving together took
            # ~500 steps to admit (run 31d). Under the loop's lock they all go in between the same two steps.
            if not loop.call(lambda _engine: run(batch)):
                break
    finally:
        loop.shutdown()
        outbox.close()
