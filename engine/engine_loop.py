"""The one background thread that drives an ``LLMEngine``, shared by every caller.

Callers from any thread add requests (validated at once, in the caller's thread,
under the loop's lock) and get their outputs through callbacks; the loop steps
the engine while any request is unfinished, so requests from concurrent callers
run in the same steps. Knows nothing of HTTP or asyncio.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Sequence, Union

from engine.outputs import RequestOutput, RequestOutputKind
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:  # the engine process's parent uses this module's types without JAX (engine.engine_process)
    from engine.llm_engine import LLMEngine

logger = logging.getLogger("pagedjax")

WAIT_SLICE_S = 0.1  # the engine loop's waits are counted in its stats in slices of this length

PROFILER_DIR_ENV = "VLLM_TORCH_PROFILER_DIR"  # vLLM's: where start_profile writes its trace


def profile_dir(given: Optional[str] = None) -> str:
    """The profiler's folder: ``given``, else ``$VLLM_TORCH_PROFILER_DIR``; a ValueError without either."""
    folder = given or os.environ.get(PROFILER_DIR_ENV)
    if not folder:
        raise ValueError(f"the profiler needs a folder: start_profile(profile_dir) or ${PROFILER_DIR_ENV}")
    return folder


OnOutput = Callable[[RequestOutput], None]
OnError = Callable[[BaseException], None]


# Loops not yet shut down: at interpreter exit each is stopped after its step in flight, before Python tears down
# what the step uses (a daemon thread inside a JAX step at exit could abort the process).
_LIVE_LOOPS: "weakref.WeakSet[EngineLoop]" = weakref.WeakSet()


@atexit.register
def _stop_live_loops() -> None:
    for loop in list(_LIVE_LOOPS):
        loop._stop()


class NewRequest(NamedTuple):
    """A request for ``EngineLoop.add_requests``: what ``add_request`` takes."""

    request_id: str
    prompt: Union[str, list[int]]
    params: Optional[SamplingParams]
    on_output: OnOutput
    on_error: OnError
    priority: int = 0
    lora_request: Any = None  # engine.lora.LoRARequest


class EngineLoop:
    """``after_step``: called in the loop's thread after each step, still between steps (the engine process
    sends a step's outputs up its pipe together)."""

    def __init__(self, engine: LLMEngine, after_step: Optional[Callable[[], None]] = None):
        self.engine = engine
        self._after_step = after_step
        self._cond = threading.Condition(threading.RLock())
        # Callers waiting for the lock; the loop yields to them between steps. Without this the
        # loop re-takes the lock right after each step and a caller can wait many seconds.
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._error_callbacks: dict[str, OnError] = {}
        self._to_abort: list[str] = []  # abort_soon's, dropped by the loop before its next step
        self._to_abort_lock = threading.Lock()
        self._ids = itertools.count()
        self._profile_lock = threading.Lock()
        self._profile_dir: Optional[str] = None  # start_profile's, while its trace runs
        self._running = True
        self._thread = threading.Thread(target=self._run, name="pagedjax-engine", daemon=True)
        self._thread.start()
        _LIVE_LOOPS.add(self)

    @contextlib.contextmanager
    def _between_steps(self):
        """Hold the engine between two steps; the loop lets waiting callers in first."""
        with self._pending_lock:
            self._pending += 1
        with self._cond:
            with self._pending_lock:
                self._pending -= 1
            try:
                yield
            finally:
                self._cond.notify_all()  # the loop re-checks: more work, or no callers left waiting

    def new_request_id(self) -> str:
        return str(next(self._ids))

    def add_request(self, request_id: str, prompt, params: Optional[SamplingParams], *, priority: int = 0,
                    on_output: OnOutput, on_error: OnError,
                    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE, lora_request=None) -> None:
        """Queue a request; raises (ValueError etc.) in the caller's thread when it is invalid.
        ``output_kind``: what each output carries (``RequestOutputKind``; ``FINAL_ONLY``: ``on_output`` is called
        once, when the request finished)."""
        with self._between_steps():
            if not self._running:
                raise RuntimeError("the engine loop has been shut down")
            self.engine.add_request(request_id, prompt, params, priority=priority,
                                    on_output=self._wrap(request_id, on_output), output_kind=output_kind,
                                    lora_request=lora_request)
            self._error_callbacks[request_id] = on_error

    def _wrap(self, request_id: str, on_output: OnOutput) -> OnOutput:
        def deliver(output: RequestOutput) -> None:
            if output.finished:
                self._error_callbacks.pop(request_id, None)
            on_output(output)

        return deliver

    def add_requests(self, requests: Sequence[NewRequest], *,
                     output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> None:
        """Queue requests between the same two steps, so the first step sees them all (as in vLLM), all or none: if
        one is refused (its ValueError raised here), those already queued are aborted. ``output_kind``: as
        ``add_request``'s."""
        with self._between_steps():
            added = []
            try:
                for r in requests:
                    self.add_request(r.request_id, r.prompt, r.params, priority=r.priority, on_output=r.on_output,
                                     on_error=r.on_error, output_kind=output_kind, lora_request=r.lora_request)
                    added.append(r.request_id)
            except BaseException:
                for request_id in added:
                    self.engine.abort_request(request_id)
                raise

    def abort(self, request_id: str) -> None:
        with self._between_steps():
            self.engine.abort_request(request_id)

    def abort_soon(self, request_id: str) -> None:
        """Abort without waiting for the step in flight: the loop drops the request before its next step."""
        with self._to_abort_lock:
            self._to_abort.append(request_id)

    def is_alive(self) -> bool:
        """Whether the loop's thread still runs (read at once: the server's /health)."""
        return self._running and self._thread.is_alive()

    def _drop_aborted(self) -> None:
        with self._to_abort_lock:
            request_ids, self._to_abort = self._to_abort, []
        for request_id in request_ids:
            self.engine.abort_request(request_id)

    def stats(self) -> dict:
        """Engine counters and queue / KV-cache state, read between steps (blocks up to one step)."""
        return self.call(engine_stats)

    @staticmethod
    def device_facts() -> dict:
        """This process's accelerator: device kind and count, JAX version, backend."""
        import jax

        return dict(device=jax.devices()[0].device_kind, num_devices=jax.device_count(),
                    jax_version=jax.__version__, backend=jax.default_backend())

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix, between steps; the KV blocks that were freed."""
        return self.call(lambda engine: engine.block_manager.reset_prefix_cache())

    def start_profile(self, profile_dir: str) -> None:
        """JAX's profiler traces what this process runs (the engine's steps, their kernels) into ``profile_dir``
        until ``stop_profile`` or shutdown (XLA's trace, for Perfetto or TensorBoard); a ValueError while one
        runs (the profiler is the process's)."""
        import jax

        with self._profile_lock:
            if self._profile_dir is not None:
                raise ValueError(f"a profile is running already (into {self._profile_dir}): stop_profile() first")
            jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
            self._profile_dir = profile_dir

    def stop_profile(self) -> None:
        """End ``start_profile``'s trace and write it (``plugins/profile/<run>/`` under its folder); a ValueError
        when none runs."""
        import jax

        with self._profile_lock:
            if self._profile_dir is None:
                raise ValueError("no profile is running: start_profile() first")
            self._profile_dir = None
            jax.profiler.stop_trace()

    def sleep(self, level: int = 1) -> None:
        """The engine's sleep mode (``LLMEngine.sleep``), between steps."""
        self.call(lambda engine: engine.sleep(level), running=True)

    def wake_up(self) -> None:
        self.call(lambda engine: engine.wake_up(), running=True)

    def is_sleeping(self) -> bool:
        return self.call(lambda engine: engine.asleep)

    def update_weights_from_disk(self, model_path: str, load_format: Optional[str] = None) -> None:
        """``LLMEngine.update_weights_from_disk``, between steps."""
        self.call(lambda engine: engine.update_weights_from_disk(model_path, load_format), running=True)

    def add_lora(self, lora_request) -> None:
        """``LLMEngine.add_lora``, between steps."""
        self.call(lambda engine: engine.add_lora(lora_request), running=True)

    def call(self, fn: Callable, running: bool = False):
        """Run ``fn(engine)`` between steps (for stats, inspection, or a batch of an engine process's commands);
        ``running``: only while the loop runs (what would put memory back on the device: not after shutdown)."""
        with self._between_steps():
            if running and not self._running:
                raise RuntimeError("the engine loop has been shut down")
            return fn(self.engine)

    def _run(self) -> None:
        # Where the loop's time goes outside steps (engine.stats, LLMEngine.step has the steps'): waiting between
        # steps while requests are unfinished (callers holding the engine: adds, aborts, stats), waiting with none,
        # and the after-step hook (the engine process's send of a step's outputs). A wait is counted every
        # WAIT_SLICE_S, so stats read during a long idle spell include it.
        stats = self.engine.stats
        stats.update(loop_yield_s=0.0, loop_idle_s=0.0, after_step_s=0.0)

        def ready() -> bool:
            return not self._running or (self._pending == 0 and self.engine.has_unfinished_requests())

        while True:
            with self._cond:
                while True:
                    busy, started = self.engine.has_unfinished_requests(), time.perf_counter()
                    done = self._cond.wait_for(ready, timeout=WAIT_SLICE_S)
                    stats["loop_yield_s" if busy else "loop_idle_s"] += time.perf_counter() - started
                    if done:
                        break
                if not self._running:
                    return
                self._drop_aborted()
                if not self.engine.has_unfinished_requests():
                    continue
                try:
                    self.engine.step()
                except Exception as exc:  # a failed step must not leave callers waiting forever
                    logger.exception("engine step failed; failing the requests in flight")
                    self._fail_all(exc)
                if self._after_step is not None:
                    started = time.perf_counter()
                    self._after_step()
                    stats["after_step_s"] += time.perf_counter() - started

    def _fail_all(self, exc: BaseException) -> None:
        callbacks, self._error_callbacks = self._error_callbacks, {}
        for request_id, on_error in callbacks.items():
            on_error(exc)
            self.engine.abort_request(request_id)

    def shutdown(self) -> None:
        """Stop the loop after its step in flight; requests still unfinished fail (their callers' waits end with
        the error), and the device memory is freed."""
        self._stop()
        if self._profile_dir is not None:  # a trace still running is written, not lost
            self.stop_profile()
        if not self._thread.is_alive():  # else a step still runs on the buffers
            self._fail_all(RuntimeError("the engine loop has been shut down"))
            self.engine.release_device_memory()

    def _stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        self._thread.join(timeout=30)


def engine_stats(engine: LLMEngine) -> dict:
    scheduler, blocks = engine.scheduler, engine.block_manager
    return {
        **engine.stats,
        "num_preemptions": scheduler.num_preemptions,
        "num_running": scheduler.num_running,
        "num_waiting": scheduler.num_waiting,
        "num_used_blocks": blocks.num_used_blocks,
        "num_usable_blocks": blocks.num_usable_blocks,
        "prefix_cache_queries": scheduler.prefix_cache_queries,
        "prefix_cache_hits": scheduler.prefix_cache_hits,
        **({} if engine.lora_slots is None else {"lora": engine.lora_slots.usage(scheduler)}),
    }
