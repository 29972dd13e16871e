"""``LLM``: vLLM's offline Python API (``generate``, ``chat``) over one shared engine loop.

Safe to call from many threads at once: every call feeds the same background
loop, so concurrent callers are batched into the same steps.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import sys
import threading
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
from tqdm.auto import tqdm

from engine.beam_search import BeamSearchOutput, BeamSearchParams, beam_search
from engine.engine_args import DEFAULT_ADMISSION_RESERVE_TOKENS, IGNORED_VLLM_ARGS, EngineArgs
from engine import engine_loop
from engine.engine_loop import EngineLoop, NewRequest
from engine.lora import LoRARequest
from engine.llm_engine import LLMEngine, prompt_length_problem
from engine.metrics import ServingMetrics, cache_config_info, offline_finished_sequences
from engine.metrics_reader import Metric, metrics_snapshot
from engine.outputs import RequestOutput, RequestOutputKind
from engine.pooling import (ClassificationRequestOutput, EmbeddingRequestOutput, PoolingParams, PoolingRequestOutput,
                            ScoringOutput, ScoringRequestOutput, as_pooling_output, check_task, cosine, score_pairs)
from engine.prompts import as_prompt
from engine.sampling_params import SamplingParams
from engine.stats_log import PeriodicStatsLogger
from models.default_model import DEFAULT_MODEL_NAME

PromptType = Union[str, list[int], dict]
logger = logging.getLogger(__name__)


CONFIGURE_LOGGING_ENV = "VLLM_CONFIGURE_LOGGING"  # vLLM's: "0" leaves the engine's logging to the application


def show_engine_logs() -> None:
    """As vLLM does unless ``$VLLM_CONFIGURE_LOGGING`` is "0": the engine's INFO lines (its start-up line, the
    periodic stats) on stderr, where the application has set up no logging of its own (no handler on the root
    logger nor on "pagedjax"; Python would otherwise show only warnings)."""
    engine_logger = logging.getLogger("pagedjax")
    if (os.environ.get(CONFIGURE_LOGGING_ENV, "1") == "0" or engine_logger.handlers
            or logging.getLogger().handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    engine_logger.addHandler(handler)
    engine_logger.setLevel(logging.INFO)


class LLM:
    """An LLM for offline generation; arguments mean what they mean in vLLM.

    ``model`` is a Hugging Face checkpoint folder, a ``.gguf`` file, or None for the
    embedded default model (SmolLM2-135M-Instruct).
    """

    def __init__(
        self,
        model: Optional[str] = None,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        quantization: Optional[str] = None,
        block_size: int = 16,
        max_num_batched_tokens: Optional[int] = None,
        max_num_seqs: Optional[int] = None,
        gpu_memory_utilization: float = 0.9,
        max_model_len: Optional[int] = None,
        seed: int = 0,
        load_format: str = "auto",
        kv_cache_dtype: str = "auto",
        num_gpu_blocks_override: Optional[int] = None,
        scheduling_policy: str = "fifo",
        admission_reserve_tokens: int = DEFAULT_ADMISSION_RESERVE_TOKENS,
        attention_backend: str = "auto",
        kv_write_backend: str = "auto",
        linear_backend: str = "auto",
        unroll_layers: Optional[bool] = None,
        fuse_projections: Optional[bool] = None,
        skip_tokenizer_init: bool = False,
        scheduling_mode: str = "continuous",
        trace: bool = False,
        async_scheduling: Optional[bool] = None,
        compiler_options: Optional[dict] = None,
        precompile_steps: Optional[bool] = None,
        num_scheduler_steps: int = 1,
        enable_prefix_caching: bool = True,
        generation_config: str = "auto",
        reasoning_parser: Optional[str] = None,
        runner: str = "auto",
        pooling_type: Optional[str] = None,
        speculative_config: Optional[dict] = None,
        enable_lora: bool = False,
        max_loras: int = 1,
        max_lora_rank: int = 16,
        max_cpu_loras: Optional[int] = None,
        tokenizer: Optional[str] = None,
        trust_remote_code: bool = False,
        enforce_eager: bool = False,
        disable_log_stats: bool = True,
        **vllm_args: Any,
    ):
        show_engine_logs()
        unknown = sorted(set(vllm_args) - set(IGNORED_VLLM_ARGS))
        if unknown:
            raise TypeError(f"LLM() got an unexpected keyword argument {unknown[0]!r}")
        for name in vllm_args:
            logger.warning("LLM(%s=...) has no effect here: %s", name, IGNORED_VLLM_ARGS[name])
        args = EngineArgs(
            model=model, dtype=dtype, block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs, gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, seed=seed, load_format=load_format,
            tensor_parallel_size=tensor_parallel_size, quantization=quantization,
            kv_cache_dtype=kv_cache_dtype, num_gpu_blocks_override=num_gpu_blocks_override,
            scheduling_policy=scheduling_policy, admission_reserve_tokens=admission_reserve_tokens,
            attention_backend=attention_backend, linear_backend=linear_backend,
            kv_write_backend=kv_write_backend,
            unroll_layers=unroll_layers, fuse_projections=fuse_projections,
            scheduling_mode=scheduling_mode, trace=trace, async_scheduling=async_scheduling,
            compiler_options=compiler_options, precompile_steps=precompile_steps,
            num_scheduler_steps=num_scheduler_steps, enable_prefix_caching=enable_prefix_caching,
            generation_config=generation_config, reasoning_parser=reasoning_parser, runner=runner,
            pooling_type=pooling_type, speculative_config=speculative_config, enable_lora=enable_lora,
            max_loras=max_loras, max_lora_rank=max_lora_rank, max_cpu_loras=max_cpu_loras,
            tokenizer=tokenizer, trust_remote_code=trust_remote_code, enforce_eager=enforce_eager,
        )
        # Off by default offline, as in vLLM: its periodic stats line (engine.stats_log) and the metrics that
        # get_metrics() reads
        self._stats_logger = self._metrics = None
        self.llm_engine = LLMEngine(args, skip_tokenizer_init=skip_tokenizer_init)
        self._loop = EngineLoop(self.llm_engine)
        if not disable_log_stats:
            engine = self.llm_engine
            self._metrics = ServingMetrics(
                model or DEFAULT_MODEL_NAME, self._loop.stats, engine.max_model_len,
                cache_config=cache_config_info(engine.args, engine.block_manager.num_usable_blocks))
            self._stats_logger = PeriodicStatsLogger(self._loop.stats).start()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What a call without ``sampling_params`` samples by: ``SamplingParams()`` with the fields the model's
        generation config sets (``generation_config``; vLLM's)."""
        return SamplingParams(**self.llm_engine.default_sampling_fields)

    def generate(
        self,
        prompts: Union[PromptType, Sequence[PromptType]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        priority: Optional[Sequence[int]] = None,
        lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None,
    ) -> list[RequestOutput]:
        """Generate for one or many prompts (text, token ids, or ``{"prompt_token_ids": [...]}``).

        Returns one ``RequestOutput`` per prompt, in input order. All prompts are
        validated before any is queued, so a bad one raises and queues nothing.
        ``lora_request``: the LoRA adapter of every prompt, or one (or None) a prompt (needs ``enable_lora``).
        """
        prompts = _as_prompt_list(prompts)
        params = self.get_default_sampling_params() if sampling_params is None else sampling_params
        params_list = _per_prompt(params, len(prompts), "sampling_params", SamplingParams)
        return self._run(prompts, params_list, use_tqdm, priority, "Generating",
                         _per_prompt(lora_request, len(prompts), "lora_requests"))

    def embed(self, prompts: Union[PromptType, Sequence[PromptType]],
              pooling_params: Optional[PoolingParams] = None, use_tqdm: bool = True,
              priority: Optional[Sequence[int]] = None,
              lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None
              ) -> list[EmbeddingRequestOutput]:
        """vLLM's ``LLM.embed`` on a pooling engine (``LLM(..., runner="pooling")``): one
        ``EmbeddingRequestOutput`` per prompt, in input order, its vector in ``.outputs.embedding``
        (``engine.pooling``: the checkpoint's pooling, normalised unless ``pooling_params`` says otherwise);
        ``lora_request`` as ``generate``'s."""
        return self._pool(prompts, pooling_params, use_tqdm, priority, lora_request, "embed")

    def classify(self, prompts: Union[PromptType, Sequence[PromptType]],
                 pooling_params: Optional[PoolingParams] = None, use_tqdm: bool = True,
                 priority: Optional[Sequence[int]] = None,
                 lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None
                 ) -> list[ClassificationRequestOutput]:
        """vLLM's ``LLM.classify`` on a sequence classifier (a ``...ForSequenceClassification`` checkpoint, which
        ``runner="auto"`` serves as a pooling engine): one ``ClassificationRequestOutput`` per prompt, in input
        order, its class probabilities in ``.outputs.probs`` (``PoolingParams(use_activation=False)``: the logits);
        ``lora_request`` as ``generate``'s."""
        return self._pool(prompts, pooling_params, use_tqdm, priority, lora_request, "classify")

    def encode(self, prompts: Union[PromptType, Sequence[PromptType]],
               pooling_params: Optional[PoolingParams] = None, use_tqdm: bool = True,
               priority: Optional[Sequence[int]] = None,
               lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None,
               pooling_task: Optional[str] = None) -> list[PoolingRequestOutput]:
        """vLLM's ``LLM.encode`` on a pooling engine: one ``PoolingRequestOutput`` per prompt, in input order, its
        numbers in ``.outputs.data`` (float32 numpy). ``pooling_task``: "embed" (an embedding model's vector) or
        "classify" (a classifier's class probabilities), None for ``pooling_params.task`` or else the model's; per
        token (``[tokens, ...]``, every prompt token's row, none skipped by the prefix cache): "token_embed" (an
        embedding model's vector a token) or "token_classify" (a classifier's head on each token: ``reward``)."""
        given = pooling_params.task if pooling_params is not None else None
        task = check_task(pooling_task or given, self._is_classifier())
        outputs = self._pool(prompts, pooling_params, use_tqdm, priority, lora_request, task)
        return [as_pooling_output(output) for output in outputs]

    def reward(self, prompts: Union[PromptType, Sequence[PromptType]],
               pooling_params: Optional[PoolingParams] = None, use_tqdm: bool = True,
               priority: Optional[Sequence[int]] = None,
               lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None
               ) -> list[PoolingRequestOutput]:
        """vLLM's ``LLM.reward``: ``encode`` with ``pooling_task="token_classify"``, a sequence classifier's
        (a reward model's) head on every prompt token, ``.outputs.data`` float32 ``[tokens, labels]``."""
        return self.encode(prompts, pooling_params, use_tqdm, priority, lora_request, pooling_task="token_classify")

    def _pool(self, prompts, pooling_params: Optional[PoolingParams], use_tqdm: bool,
              priority: Optional[Sequence[int]], lora_request, task: str) -> list:
        """``embed`` / ``classify`` / ``encode``: the call checked against the model's pooling task, then every prompt
        run with ``task`` in its ``PoolingParams``."""
        self._check_pooling_task(classify=task in ("classify", "token_classify"))
        if pooling_params is not None and pooling_params.task not in (None, task):  # as vLLM: no silent override
            raise ValueError(f"PoolingParams.task={pooling_params.task!r} conflicts with this call's task {task!r}")
        prompts = _as_prompt_list(prompts)
        params = dataclasses.replace(pooling_params or PoolingParams(), task=task)
        return self._run(prompts, [params] * len(prompts), use_tqdm, priority,
                         "Classifying" if "classify" in task else "Embedding",
                         _per_prompt(lora_request, len(prompts), "lora_requests"))

    def _is_classifier(self) -> bool:
        pooling = self.llm_engine.pooling
        return pooling is not None and pooling.classifier is not None

    def _check_pooling_task(self, classify: bool) -> None:
        """Refuse ``embed`` on a classifier and ``classify`` on anything else, naming the call that fits."""
        pooling = self.llm_engine.pooling
        is_classifier = self._is_classifier()
        if classify and not is_classifier:
            raise ValueError("classify needs a sequence classifier (a ...ForSequenceClassification checkpoint)"
                             + ("; this is an embedding model: use embed" if pooling is not None else ""))
        if not classify and is_classifier:
            raise ValueError("this model is a sequence classifier: use classify, not embed")

    def score(self, text_1: Union[PromptType, Sequence[PromptType]], text_2: Union[PromptType, Sequence[PromptType]],
              use_tqdm: bool = True, lora_request: Optional[LoRARequest] = None) -> list[ScoringRequestOutput]:
        """vLLM's ``LLM.score`` for an embedding model: the cosine of the two sides' embeddings, one ``text_1``
        against each ``text_2`` or pair by pair (``engine.pooling.score_pairs``), in that order; each text is
        embedded once (through ``lora_request``'s adapter if given)."""
        first, second = _as_prompt_list(text_1), _as_prompt_list(text_2)
        pairs = score_pairs(first, second)
        embedded = self.embed(first + second, use_tqdm=use_tqdm, lora_request=lora_request)
        out = []
        for i, j in pairs:
            a, b = embedded[i], embedded[len(first) + j]
            out.append(ScoringRequestOutput(f"score-{i}-{j}", a.prompt_token_ids + b.prompt_token_ids,
                                            ScoringOutput(cosine(a.outputs.embedding, b.outputs.embedding))))
        return out

    def _run(self, prompts: list, params_list: list, use_tqdm: bool, priority: Optional[Sequence[int]],
             desc: str, loras: Optional[list] = None) -> list:
        """Queue every prompt with its params (all checked first: a bad one raises and queues nothing), wait for
        them all under a progress bar; their final outputs in input order."""
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        self._check_prompts(prompts, params_list)
        futures = [concurrent.futures.Future() for _ in prompts]
        requests = [NewRequest(self._loop.new_request_id(), prompt, params,
                               _resolve_when_finished(future, self._metrics, params),
                               _fail(future), priority[i] if priority else 0, loras[i] if loras else None)
                    for i, (prompt, params, future) in enumerate(zip(prompts, params_list, futures))]
        self._loop.add_requests(requests, output_kind=RequestOutputKind.FINAL_ONLY)
        try:
            with tqdm(total=len(futures), desc=desc, disable=not use_tqdm, unit="req") as bar:
                for _ in concurrent.futures.as_completed(futures):
                    bar.update(1)
        except BaseException:  # Ctrl-C, say: nobody will read these outputs, so the engine stops computing them
            for request, future in zip(requests, futures):
                if not future.done():
                    self._loop.abort_soon(request.request_id)
            raise
        return [f.result() for f in futures]

    def beam_search(self, prompts: Union[PromptType, Sequence[PromptType]], params: BeamSearchParams,
                    use_tqdm: bool = True, lora_request: Optional[LoRARequest] = None) -> list[BeamSearchOutput]:
        """vLLM's ``LLM.beam_search``: the ``params.beam_width`` best sequences of each prompt, best first
        (``engine.beam_search``: rounds of one-token ``generate`` calls sharing their prefixes' KV blocks), with
        ``lora_request``'s adapter if given."""
        engine = self.llm_engine  # the first round's generate checks the prompts (empty, too long) before any work
        ids = [engine.tokenize(p) if isinstance(p, str) else p for p in _as_prompt_list(prompts)]
        return beam_search(lambda batch, sampling: self.generate(batch, sampling, use_tqdm=False,
                                                                 lora_request=lora_request), ids, params,
                           eos_token_ids=engine.eos_token_ids, max_model_len=engine.max_model_len,
                           decode=None if engine.tokenizer is None else engine.tokenizer.decode, use_tqdm=use_tqdm)

    def _check_prompts(self, prompts: list, params_list: list) -> None:
        """Each prompt, as its params truncate it (``truncate_prompt_tokens``), has a token and leaves one to
        generate."""
        engine = self.llm_engine
        for i, (prompt, params) in enumerate(zip(prompts, params_list)):
            ids = engine.tokenize(prompt) if isinstance(prompt, str) else prompt
            if isinstance(params, SamplingParams):
                ids = params.truncate_prompt(ids, engine.max_model_len)
            if not ids:
                raise ValueError(f"prompt {i} is empty: at least one token is required")
            too_long = prompt_length_problem(len(ids), engine.max_model_len, pooled=isinstance(params, PoolingParams))
            if too_long:
                raise ValueError(f"prompt {i} {too_long}")

    def chat(
        self,
        messages: Union[list[dict], list[list[dict]]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Optional[list[dict]] = None,
        chat_template_kwargs: Optional[dict] = None,
        chat_template: Optional[str] = None,
        lora_request: Union[LoRARequest, Sequence[Optional[LoRARequest]], None] = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate. As vLLM's:
        ``continue_final_message`` renders the last (assistant) message open, so the reply goes on from it (with
        ``add_generation_prompt=False``); ``tools`` (OpenAI's function tools) and ``chat_template_kwargs`` (e.g.
        Qwen 3's ``enable_thinking``) go to the template; ``chat_template``: a Jinja template instead of the
        model's. A message's content may be OpenAI's list of text parts. Each output's ``prompt`` is the rendered
        text."""
        from engine.tokenizer import render_chat_template

        if not isinstance(messages, (list, tuple)):
            raise TypeError(f"messages must be a conversation (a list of message dicts) or a list of them, got "
                             f"{type(messages).__name__} (a plain text prompt goes to generate)")
        tokenizer = self.get_tokenizer()
        conversations = messages if messages and isinstance(messages[0], (list, tuple)) else [messages]
        texts = [render_chat_template(tokenizer, conv, add_generation_prompt=add_generation_prompt,
                                      continue_final_message=continue_final_message, tools=tools,
                                      chat_template=chat_template, chat_template_kwargs=chat_template_kwargs)
                 for conv in conversations]
        outputs = self.generate([tokenizer.encode(text, add_special_tokens=False) for text in texts],
                                sampling_params, use_tqdm=use_tqdm, lora_request=lora_request)
        for output, text in zip(outputs, texts):  # the template writes the special tokens: ids from the text bare
            output.prompt = text
        return outputs

    def submit(self, prompt: Union[str, list[int]], sampling_params: Optional[SamplingParams] = None, *,
               on_output: Callable[[RequestOutput], None], on_error: Callable[[BaseException], None],
               priority: int = 0, output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
               lora_request: Optional[LoRARequest] = None) -> str:
        """Start one request without waiting: ``on_output`` gets its output after every step that adds a
        token (on the engine's thread: keep it short; cumulative unless ``output_kind`` says otherwise),
        ``on_error`` the exception that ends it. Returns the request id (for ``abort``). ``generate`` is built
        on the same loop."""
        sampling_params = self.get_default_sampling_params() if sampling_params is None else sampling_params
        self._check_prompts([prompt], [sampling_params])
        request_id = self._loop.new_request_id()
        self._loop.add_request(request_id, prompt, sampling_params,
                               priority=priority, on_output=on_output, on_error=on_error, output_kind=output_kind,
                               lora_request=lora_request)
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request started by ``submit`` (its blocks are freed at the next step)."""
        self._loop.abort(request_id)

    def stats(self) -> dict:
        """Engine counters (steps, largest batch, tokens, preemptions), read between steps."""
        return self._loop.call(lambda e: {**e.stats, **e.runner.dispatch_stats,
                                          "num_preemptions": e.scheduler.num_preemptions,
                                          "prefix_cache_queries": e.scheduler.prefix_cache_queries,
                                          "prefix_cache_hits": e.scheduler.prefix_cache_hits})

    def get_metrics(self) -> list[Metric]:
        """vLLM's snapshot of the engine's ``vllm:`` metrics (``engine.metrics_reader``: counters, gauges,
        histograms, vectors), as the server's ``/metrics`` has them; needs ``LLM(disable_log_stats=False)``, as in
        vLLM. Offline, a request's sequences are timed from its final output (``RequestOutput.metrics``): they
        share its first and last token times, and the inter-token histogram takes each sequence's mean interval
        once a token after its first."""
        if self._metrics is None:
            raise ValueError("stat logging is disabled: construct LLM(..., disable_log_stats=False) for get_metrics()")
        return metrics_snapshot(self._metrics.registry)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (as vLLM's ``LLM.reset_prefix_cache``; e.g. between benchmark rounds that
        repeat prompts); returns the KV blocks that were freed."""
        return self._loop.reset_prefix_cache()

    def start_profile(self, profile_dir: Optional[str] = None) -> None:
        """vLLM's ``LLM.start_profile``: JAX's profiler traces what this process runs (the engine's steps, their
        kernels) into ``profile_dir``, by default ``$VLLM_TORCH_PROFILER_DIR`` (vLLM's variable; the trace is
        XLA's, for Perfetto or TensorBoard), until ``stop_profile``."""
        self._loop.start_profile(engine_loop.profile_dir(profile_dir))

    def stop_profile(self) -> None:
        """End ``start_profile``'s trace and write it (``plugins/profile/<run>/`` under its folder)."""
        self._loop.stop_profile()

    def sleep(self, level: int = 1) -> None:
        """vLLM's sleep mode: free the GPU memory of the weights (kept in host memory at level 1, discarded at level
        2), the KV cache and the step buffers, e.g. while an RL trainer uses the GPU; the prefix cache is emptied.
        Only while no request is unfinished; requests are refused until ``wake_up``."""
        self._loop.sleep(level)

    def wake_up(self) -> None:
        """Back from ``sleep``: the weights (after level 2 loaded again, or those ``update_weights_from_disk``
        named) and an empty KV cache on the device; the steps are not compiled again."""
        self._loop.wake_up()

    def update_weights_from_disk(self, model_path: str, load_format: Optional[str] = None) -> None:
        """New weights from a checkpoint of the same model shape (SGLang's call of that name; e.g. an RL trainer's
        policy after a step), loaded as at start-up, no step compiled again: ``LLMEngine.update_weights_from_disk``.
        While idle or asleep (then they come at ``wake_up``)."""
        self._loop.update_weights_from_disk(model_path, load_format)

    def is_sleeping(self) -> bool:
        return self._loop.is_sleeping()

    def collective_rpc(self, method: Union[str, Callable], timeout: Optional[float] = None, args: tuple = (),
                       kwargs: Optional[dict] = None) -> list:
        """vLLM's call on every worker, between steps: ``method`` names a method of the worker, or is a function
        taking the worker first, then ``args`` and ``kwargs``. One worker here, the engine's ``ModelRunner`` (its
        ``params``, ``kv_caches``, ``config``; one process drives every device, tensor-parallel too), so the list
        holds one result. ``timeout``: seconds to wait for it (a step may be running), else ``TimeoutError``; the
        call itself still runs."""
        def on_worker(engine):
            worker = engine.runner
            call = getattr(worker, method) if isinstance(method, str) else functools.partial(method, worker)
            return call(*args, **(kwargs or {}))

        if isinstance(method, str) and not callable(getattr(self.llm_engine.runner, method, None)):
            raise AttributeError(f"the worker (engine.runner.ModelRunner) has no method {method!r}")
        if timeout is None:
            return [self._loop.call(on_worker, running=True)]
        result: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(self._loop.call(on_worker, running=True))
            except BaseException as e:
                result.set_exception(e)

        threading.Thread(target=run, name="pagedjax-collective-rpc", daemon=True).start()
        try:
            return [result.result(timeout)]
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"collective_rpc({method!r}) took longer than {timeout} s") from None

    def get_trace(self, reset: bool = False):
        """The per-step trace (``engine.trace.StepTrace``) of an engine built with ``trace=True``;
        ``reset`` drops the records returned (e.g. after a warm-up)."""
        tracer = self.llm_engine.tracer
        if tracer is None:
            raise ValueError("tracing is off: construct LLM(..., trace=True)")
        return tracer.snapshot(reset=reset)

    def shutdown(self) -> None:
        if self._stats_logger is not None:
            self._stats_logger.stop()
        self._loop.shutdown()

    def __del__(self, _is_finalizing=sys.is_finalizing):  # bound now: at interpreter exit `sys` may be None
        if getattr(self, "_loop", None) is not None and not _is_finalizing():  # at exit the (daemon) loop just stops
            self.shutdown()


def _per_prompt(value, num_prompts: int, name: str, kind: Optional[type] = None) -> list:
    """One ``value`` for every prompt, or a list of one a prompt (checked: as many as there are prompts; each a
    ``kind`` where one is given)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * num_prompts
    if len(values) != num_prompts:
        raise ValueError(f"got {len(values)} {name} for {num_prompts} prompts")
    wrong = [v for v in values if not isinstance(v, kind)] if kind is not None else []
    if wrong:
        raise TypeError(f"{name} must be {kind.__name__} (or a list of one a prompt), got {type(wrong[0]).__name__}")
    return values


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str) or isinstance(prompts, dict):
        prompts = [prompts]
    elif not isinstance(prompts, Sequence) and not hasattr(prompts, "__array__"):
        raise TypeError(f"prompts must be a text, token ids, a dict prompt or a list of those, got "
                        f"{type(prompts).__name__}")
    elif len(prompts) and isinstance(prompts[0], (int, np.integer)):
        prompts = [prompts]
    return [as_prompt(p, i) for i, p in enumerate(prompts)]


def _resolve_when_finished(future: concurrent.futures.Future, metrics: Optional[ServingMetrics] = None,
                           params=None):
    """The output callback of an offline request: its final output resolves ``future``, after it is recorded in
    ``metrics`` (stats on). Holds nothing of the ``LLM`` (the engine keeps a finished request's callbacks, so a
    reference back would keep an ``LLM`` dropped without ``shutdown`` alive, its engine thread and memory too)."""
    def on_output(output: RequestOutput) -> None:
        if output.finished and not future.done():
            if metrics is not None:
                try:
                    _record_metrics(metrics, output, params)
                except Exception:  # a metric must never fail a step or leave a caller waiting
                    logger.exception("recording the metrics of request %s failed", output.request_id)
            future.set_result(output)

    return on_output


def _record_metrics(metrics: ServingMetrics, output, params) -> None:
    """A finished request's per-request metrics."""
    for sequence in offline_finished_sequences(output, params):
        if sequence.first_token_s is not None:
            metrics.on_first_token(sequence.first_token_s)
        if sequence.time_per_output_token_s is not None:
            metrics.on_inter_token(sequence.time_per_output_token_s, sequence.generation_tokens - 1)
        metrics.on_finished(sequence)


def _fail(future: concurrent.futures.Future):
    def on_error(exc: BaseException) -> None:
        if not future.done():
            future.set_exception(exc)

    return on_error
