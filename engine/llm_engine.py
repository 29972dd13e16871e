"""The synchronous engine core: requests in, one scheduled step at a time, outputs out.

Owns the request groups (a request with ``n`` samples is ``n`` scheduler
sequences that share the prompt's blocks), the per-step glue between scheduler,
runner, sampler and detokenizer, and the stop conditions. Not thread-safe: the
``LLM`` front and the async server drive it from one loop thread.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from engine.block_manager import BlockManager
from engine.compile_timer import CompileTimer
from engine.detokenizer import IncrementalDetokenizer, StopDecision, check_stop
from engine.device_memory import live_array_bytes, memory_outside_arrays, num_kv_blocks, sizes_kv_from_memory
from engine.engine_args import EngineArgs, resolve_kv_cache_dtype
from engine.generation_config import default_sampling_fields
from engine.lora import LoRARequest, LoRASlots
from engine.metrics import ITERATION_TOKENS_BUCKETS, count_into_buckets
from engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, RequestOutputKind
from engine.pooling import (ClassificationOutput, ClassificationRequestOutput, EmbeddingOutput, EmbeddingRequestOutput,
                            PooledRows, PoolingOutput, PoolingParams, PoolingRequestOutput, check_task)
from engine.request import Request, RequestStatus
from engine.runner import (PENDING_TOKEN, ModelRunner, PendingStep, SequenceWork, delete_arrays,
                           enable_compilation_cache)
from engine.sampler import build_sampling_metadata
from engine.sampling_params import MAX_LOGPROBS, SamplingParams
from engine.scheduler import Scheduler, ScheduledSequence, SchedulerOutput
from engine.speculative import SpeculativeConfig, accepted_tokens
from engine.trace import StepRecord, StepTracer
from models.batch import kv_cache_bytes_per_block
from models.config import ModelConfig
from models.loader import load_model, resolve_model_path
from sharding import make_mesh, param_shardings_for

logger = logging.getLogger("pagedjax")

FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


def prompt_length_problem(num_tokens: int, max_model_len: int, pooled: bool) -> Optional[str]:
    """Why a prompt of ``num_tokens`` does not fit the model's context (its end of a sentence), or None: a generated
    one must leave a token to generate, a pooled one (nothing generated) may fill it, as in vLLM."""
    if num_tokens > max_model_len or (num_tokens == max_model_len and not pooled):
        return (f"is {num_tokens} tokens long, but the model's context length (max_model_len) is {max_model_len}"
                + ("" if pooled else "; at least one token must be left to generate"))
    return None


@dataclasses.dataclass
class _Sample:
    """Host state of one of a request's ``n`` output sequences."""

    request: Request
    seed: int
    detokenizer: Optional[IncrementalDetokenizer]
    logprobs: Optional[list] = None
    cumulative_logprob: float = 0.0
    finish_reason: Optional[str] = None
    stop_reason: object = None
    text: str = ""
    # What the request's outputs have handed out of this sample (RequestOutputKind.DELTA sends the rest; logprobs
    # entries go with their tokens, one a token).
    tokens_sent: int = 0
    text_sent: int = 0
    # SamplingParams.structured_outputs: the grammar's matcher (engine.structured_output), fed each token sampled.
    matcher: Any = None
    # With a reasoning parser the grammar starts after the thinking (engine.reasoning): until the output closes it,
    # no mask applies and the matcher is fed nothing.
    thinking: bool = False


@dataclasses.dataclass
class _LaunchedStep:
    """A step on the device: its plan, the (sample, group) of each scheduled sequence, its result."""

    plan: SchedulerOutput
    entries: list
    pending: PendingStep
    start_s: float
    trace: Optional[StepRecord] = None  # the tracer's capture at launch (EngineArgs.trace)
    # Speculative decoding: each scheduled sequence's first row of the sampled tokens (its drafts' rows follow);
    # None when no sequence runs drafts (row i is sequence i's).
    first_rows: Optional[list[int]] = None
    # Whether the scheduler counted the step's tokens at launch, as pending (asynchronous scheduling; not a step
    # with drafts, whose accepted tokens are known only once it is read back).
    counted_at_launch: bool = False


@dataclasses.dataclass
class _RequestGroup:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    on_output: Optional[Callable[[RequestOutput], None]]
    arrival_time: float
    max_output_tokens: int  # params.max_output_tokens for this prompt, computed once (checked every step)
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    aborted: bool = False  # some sample's finish_reason is "abort"
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    first_output: bool = True  # DELTA: the prompt goes out with the first output only
    # SamplingParams.prompt_logprobs: an entry a prompt token, None for the first (nothing comes before it); filled
    # as the first sample's prompt chunks run.
    prompt_logprobs: Optional[list] = None
    # SamplingParams.bad_words as token ids (engine.tokenizer.bad_words_token_ids), tokenized once.
    bad_words_token_ids: list = dataclasses.field(default_factory=list)
    grammar: Optional[str] = None  # SamplingParams.structured_outputs, checked (engine.structured_output.Grammars)
    # A pooling engine's request: its PoolingParams and the rows its prompt chunks returned (engine.pooling).
    pooling_params: Optional[PoolingParams] = None
    pooled: PooledRows = dataclasses.field(default_factory=PooledRows)
    lora_request: Optional[LoRARequest] = None  # its LoRA adapter (engine.lora), or None
    # Whether sampling the next token needs the tokens before it on the host first: penalties count them, a bad
    # word of several tokens bans its last only after the others, and a grammar's next tokens follow from the
    # tokens so far. Such a request decodes a step at a time and is not planned ahead of its previous step's tokens.
    # Set once (__post_init__): the step loop reads it for every scheduled sequence.
    samples_need_host_tokens: bool = dataclasses.field(init=False, default=False)

    def __post_init__(self) -> None:
        self.samples_need_host_tokens = (self.params.has_penalties or self.grammar is not None
                                         or any(len(word) > 1 for word in self.bad_words_token_ids))

    @property
    def finished(self) -> bool:
        if len(self.samples) != self.params.n:
            return False
        for sample in self.samples:  # a plain loop: this runs for every request every step
            if not sample.finish_reason:
                return False
        return True


class LLMEngine:
    def __init__(self, args: EngineArgs, skip_tokenizer_init: bool = False):
        args.validate()
        from engine.pooling import resolve_runner

        args = dataclasses.replace(args, runner=resolve_runner(args.runner, resolve_model_path(args.model)))
        self.args = args
        start = time.perf_counter()
        mesh = make_mesh(args.tensor_parallel_size) if args.tensor_parallel_size > 1 else None
        # Before the weights: their programs (random weights, quantizers, the layer layout) are cached too (run 19c's
        # warm start remade them, 3.4 s, when the cache was first turned on by the runner, after them).
        enable_compilation_cache()
        # Under an allocator without stats the pool is sized from the driver; what it counted in use before the
        # weights, beyond live arrays, is read now (after loading it also counts memory the allocator freed).
        outside_arrays = memory_outside_arrays()
        with CompileTimer() as weight_compiles:  # programs that load, quantize and lay out the weights
            self._mesh = mesh
            self._weights_from = (args.model, args.load_format)  # where wake_up reloads discarded weights from
            loaded = self._load_model(*self._weights_from)
            self.quantization = loaded.quantization
            self.dtype = np.dtype(loaded.dtype).name  # the weights' (and activations') dtype
            kv_dtype = resolve_kv_cache_dtype(args.kv_cache_dtype, loaded.dtype)
            self.model_config = config = loaded.config
            self.tokenizer = None
            self.eos_token_ids = set(config.eos_token_ids)
            if not skip_tokenizer_init:
                from engine.tokenizer import eos_token_ids, load_tokenizer

                self.tokenizer = load_tokenizer(args.tokenizer or loaded.path,
                                                trust_remote_code=args.trust_remote_code)
                self.eos_token_ids.update(eos_token_ids(self.tokenizer, loaded.path))
            self._reasoning_end = None  # engine.reasoning.ReasoningEnd under a reasoning parser
            if args.reasoning_parser is not None and self.tokenizer is not None:
                from engine.reasoning import ReasoningEnd

                self._reasoning_end = ReasoningEnd(self.tokenizer, args.reasoning_parser)
            self.max_model_len, max_tokens, max_seqs = args.resolved_limits(config)
            self.model_config = dataclasses.replace(config, max_model_len=self.max_model_len)
            precompile = args.precompile_steps if args.precompile_steps is not None else jax.default_backend() == "gpu"
            self.pooling = None  # a pooling engine's PoolingConfig (engine.pooling): it runs its own step
            if args.runner == "pooling":
                from engine.pooling import pooling_config

                self.pooling = pooling_config(loaded.path, args.pooling_type)
            self.runner = ModelRunner(config, loaded.params, block_size=args.block_size,
                                      max_num_batched_tokens=max_tokens, max_num_seqs=max_seqs,
                                      max_model_len=self.max_model_len, kv_dtype=kv_dtype,
                                      attention_backend=args.attention_backend, kv_write_backend=args.kv_write_backend,
                                      mesh=mesh,
                                      unroll_layers=args.unroll_layers, fuse_projections=args.fuse_projections,
                                      linear_backend=args.linear_backend,
                                      compiler_options=args.compiler_options, fixed_table_width=precompile,
                                      num_scheduler_steps=args.num_scheduler_steps,
                                      max_loras=args.max_loras if args.enable_lora else 0,
                                      max_lora_rank=args.max_lora_rank, eager=args.enforce_eager)
            # LoRA adapters: read when a request first names one, put into the runner's slots as steps need them.
            self.lora_slots = None if not args.enable_lora else LoRASlots(
                config, args.max_loras, args.max_lora_rank, args.max_cpu_loras or args.max_loras, self.runner.set_lora)
            loaded.params = None  # the runner holds them, laid out for the step: free the loader's copy before sizing
            # Size the pool from memory really held: an earlier engine of this process freed (its objects sit in
            # reference cycles until collected) and this one's weights materialised (dispatch is asynchronous:
            # run 11's second engine of bench_static_vs_continuous counted 3.5 of 15 GiB and overfilled the pool).
            gc.collect()
            jax.block_until_ready(self.runner.params)
        weights_s = time.perf_counter() - start
        with CompileTimer() as compiles:  # where the compiling phases went: trace, lower, compile, cache loads
            # The KV pool gets what the weights and the largest step's activations leave.
            self.activation_bytes = self.runner.activation_bytes() if sizes_kv_from_memory(args) else 0
            self.startup_seconds = {"weights": weights_s, "sizing_compile": time.perf_counter() - start - weights_s}
            num_blocks = num_kv_blocks(args, config, kv_dtype, self.max_model_len, max_seqs,
                                       activation_bytes=self.activation_bytes, outside_arrays=outside_arrays)
            self.runner.allocate_kv_cache(num_blocks)
            compiled = 0
            if precompile and self.runner.table_width is not None:
                started = time.perf_counter()
                compiled = self.runner.precompile_pool() if self.pooling else self.runner.precompile()
                self.startup_seconds["precompile"] = time.perf_counter() - started
        self.startup_seconds["weights_compile"] = weight_compiles.seconds
        slowest = ", ".join(f"{name} {seconds:.1f} s"
                            for name, seconds in weight_compiles.slowest() + compiles.slowest())
        self.startup_seconds.update({f"{phase}_total": s for phase, s in compiles.seconds_by_phase().items()})
        if precompile and self.runner.table_width is None:
            logger.info("step shapes compile at first use: max_num_seqs x max_model_len / block_size is too large "
                        "for a fixed block-table width (engine.runner.MAX_FIXED_TABLE_ENTRIES)")
        # A cached prefix is not computed again: mean and first-token pooling need every prompt row.
        caching = args.enable_prefix_caching and (self.pooling is None or self.pooling.pooling_type == "LAST")
        self.block_manager = BlockManager(num_blocks, args.block_size, enable_prefix_caching=caching)
        self.scheduler = Scheduler(self.block_manager, max_num_batched_tokens=max_tokens,
                                   max_num_seqs=max_seqs, max_model_len=self.max_model_len,
                                   policy=args.scheduling_policy, scheduling_mode=args.scheduling_mode,
                                   num_scheduler_steps=args.num_scheduler_steps,
                                   speculative_config=SpeculativeConfig.of(args.speculative_config),
                                   max_loras=args.max_loras if args.enable_lora else 0,
                                   admission_reserve_tokens=args.admission_reserve_tokens)
        self.model_path = loaded.path
        self.default_sampling_fields = default_sampling_fields(loaded.path, args.generation_config)
        if self.default_sampling_fields:
            logger.info("requests sample by %s unless they say otherwise (the model's generation config; "
                        "generation_config='vllm' for none)", self.default_sampling_fields)
        kv_gib = num_blocks * kv_cache_bytes_per_block(config, args.block_size, kv_dtype) / 2**30
        self.max_concurrent_tokens = (num_blocks - 1) * args.block_size
        logger.info(
            "loaded %s (%s, %s, quantization %s) on %s in %.1fs (weights %.1f s, of which making programs %.1f s; "
            "compiling the largest step to size the KV pool %.1f s, precompiling %d programs %.1f s); "
            "KV cache (%s): %d blocks of %d tokens (%.2f GiB), "
            "max %d concurrent tokens; largest step's activations %.2f GiB; max_model_len=%d, max_num_seqs=%d, "
            "max_num_batched_tokens=%d; making programs: trace %.1f s, lower %.1f s, compile or load %.1f s "
            "(of which loads from the persistent cache %.1f s: %d of %d programs found there); slowest to make: %s",
            loaded.path, loaded.load_format, self.dtype, loaded.quantization,
            f"{args.tensor_parallel_size} x {jax.devices()[0].device_kind}",
            time.perf_counter() - start, weights_s, weight_compiles.seconds, self.startup_seconds["sizing_compile"],
            compiled,
            self.startup_seconds.get("precompile", 0.0), np.dtype(kv_dtype).name,
            num_blocks - 1, args.block_size, kv_gib, self.max_concurrent_tokens, self.activation_bytes / 2**30,
            self.max_model_len, max_seqs, max_tokens, *(self.startup_seconds[f"{phase}_total"]
                                                         for phase in ("trace", "lower", "compile", "cache_load")),
            *(weight_compiles.counts[k] + compiles.counts[k] for k in ("cache_hits", "cache_lookups")), slowest or "none")
        self._groups: dict[str, _RequestGroup] = {}
        # Scheduler sequence id ("id" or "id#k") -> its sample and group; read for every sequence every step.
        self._samples: dict[str, tuple[_Sample, _RequestGroup]] = {}
        self._seed_rng = np.random.default_rng(args.seed)
        self.stats = {"steps": 0, "max_batch_seqs": 0, "prompt_tokens": 0, "generation_tokens": 0,
                      # the tokens each model forward ran, in ITERATION_TOKENS_BUCKETS (a tuple, replaced)
                      "iteration_tokens": (0,) * (len(ITERATION_TOKENS_BUCKETS) + 1), "iteration_tokens_sum": 0,
                      "steps_planned_ahead": 0,  # planned while the previous step ran (async scheduling)
                      "multi_steps": 0,  # of the steps, multi-step decodes (EngineArgs.num_scheduler_steps)
                      # Speculative decoding (EngineArgs.speculative_config), vLLM's counters: decodes that ran
                      # drafts, their drafts, the drafts accepted, and those accepted at each draft position (a
                      # tuple, replaced as it grows, so copies of the dict stay as they were: how far drafts go
                      # right, for choosing num_speculative_tokens).
                      "spec_decode_num_drafts": 0, "spec_decode_num_draft_tokens": 0,
                      "spec_decode_num_accepted_tokens": 0, "spec_decode_num_accepted_tokens_per_pos": (),
                      # Seconds in step(): on the host's own work, of which putting steps on the device
                      # (runner.dispatch), and waiting for a step's tokens. A device-bound engine waits on
                      # every step; one whose host work per step exceeds the device's step never waits.
                      "host_s": 0.0, "dispatch_s": 0.0, "wait_s": 0.0}
        # Asynchronous scheduling (see step()); None: wherever it is allowed.
        self.async_scheduling = (args.async_scheduling if args.async_scheduling is not None
                                 else jax.process_count() == 1) and self.pooling is None  # pooling: prompts only
        self._in_flight: Optional[_LaunchedStep] = None
        self._grammars = None  # engine.structured_output.Grammars, made when first needed
        self.tracer: Optional[StepTracer] = None
        if args.trace:
            self.tracer = StepTracer(block_size=args.block_size, num_blocks=num_blocks,
                                     max_model_len=self.max_model_len, max_num_seqs=max_seqs,
                                     scheduling_mode=args.scheduling_mode)
        # What start-up made (traced and compiled steps, the tokenizer, the weights' pytrees) lives as long as
        # the engine: move it out of the cyclic collector's reach, so a full collection between steps walks
        # only newer objects (vLLM freezes its heap after start-up too).
        gc.collect()
        gc.freeze()

    # -- requests ---------------------------------------------------------------------------

    def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        from engine.tokenizer import encode_prompt  # transformers, as the tokenizer's loading above

        return encode_prompt(self.tokenizer, prompt, add_special_tokens)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: Optional[SamplingParams] = None,
        *,
        priority: int = 0,
        on_output: Optional[Callable[[RequestOutput], None]] = None,
        output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE,
        lora_request: Optional[LoRARequest] = None,
    ) -> None:
        """Validate and queue a request; errors are raised here, before anything is queued.
        ``output_kind`` (``engine.outputs.RequestOutputKind``): what each output carries. ``FINAL_ONLY`` gives no
        output (callback or ``step()`` result) until the request finishes, as ``LLM.generate`` wants: building
        every running request's output every step is host time; ``DELTA`` gives what changed, as the engine
        process sends across its pipe. A pooling engine takes ``PoolingParams`` (or None) and gives one
        ``EmbeddingRequestOutput`` when the prompt has run (``engine.pooling``). ``lora_request``: run it with that
        LoRA adapter (``engine.lora``; needs ``enable_lora``), read here if it is new."""
        if self.asleep:
            raise ValueError("the engine is asleep (LLM.sleep): call wake_up() before adding requests")
        pooling_params = self._pooling_params(params)
        if pooling_params is not None:  # the prompt is run and pooled; nothing is sampled
            params = SamplingParams(max_tokens=1)
        params = params if params is not None else SamplingParams()
        params.validate()  # fields set after construction (p.n = 0, say) are refused here, not in a step
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if priority != 0 and self.scheduler.policy != "priority":  # as vLLM: a priority the queue would ignore
            raise ValueError(f"priority {priority} needs priority scheduling: start the engine with "
                             "scheduling_policy='priority' (--scheduling-policy priority)")
        text = prompt if isinstance(prompt, str) else None
        prompt_ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        prompt_ids = params.truncate_prompt(prompt_ids, self.max_model_len)
        if not prompt_ids:
            raise ValueError("the prompt is empty: at least one token is required")
        too_long = prompt_length_problem(len(prompt_ids), self.max_model_len, pooled=pooling_params is not None)
        if too_long:
            raise ValueError(f"the prompt {too_long}")
        self._check_token_ids("prompt token id", prompt_ids)
        self._check_token_ids("logit_bias token id", params.logit_bias or ())
        self._check_token_ids("allowed_token_ids entry", params.allowed_token_ids or ())
        bad_words = []
        if params.bad_words:
            if self.tokenizer is None:
                raise ValueError("bad_words needs a tokenizer: this engine was started without one")
            from engine.tokenizer import bad_words_token_ids  # transformers, as the tokenizer's loading above

            bad_words = bad_words_token_ids(self.tokenizer, params.bad_words)
            self._check_token_ids("bad_words token id", [t for word in bad_words for t in word])
        grammar = None
        if params.structured_outputs is not None:
            grammar = self._structured_output_grammars().check(params.structured_outputs)
        if lora_request is not None:
            if not isinstance(lora_request, LoRARequest):
                raise ValueError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
            self.add_lora(lora_request)
        now = time.monotonic()
        base_seed = params.seed if params.seed is not None else int(self._seed_rng.integers(2**31 - 1))
        group = _RequestGroup(request_id, text, prompt_ids, params, [], on_output, now,
                              max_output_tokens=params.max_output_tokens(len(prompt_ids), self.max_model_len),
                              output_kind=output_kind,
                              prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
                              bad_words_token_ids=bad_words, grammar=grammar, pooling_params=pooling_params,
                              lora_request=lora_request)
        sample = self._new_sample(group, request_id, base_seed, now, priority)
        group.samples.append(sample)
        self.scheduler.add_request(sample.request)
        if lora_request is not None:  # its weights stay read until it ends (_forget_samples)
            self.lora_slots.acquire(lora_request.lora_int_id)
        self._groups[request_id] = group
        self._samples[request_id] = (sample, group)

    def _pooling_params(self, params) -> Optional[PoolingParams]:
        """A pooling engine's request's ``PoolingParams`` (its default for None), checked; None on a generating
        engine, which refuses ``PoolingParams`` (and a pooling one ``SamplingParams``) by name."""
        if self.pooling is None:
            if isinstance(params, PoolingParams):
                raise ValueError("PoolingParams need a pooling engine: LLM(..., runner='pooling') (--runner pooling)")
            return None
        if params is not None and not isinstance(params, PoolingParams):
            raise ValueError(f"a pooling engine (runner='pooling') takes PoolingParams, not {type(params).__name__}: "
                             "it embeds prompts and generates nothing")
        params = params or PoolingParams()
        classifier = self.pooling.classifier is not None
        check_task(params.task, classifier)
        for field, value, needs_classifier in (("dimensions", params.dimensions, False),
                                               ("normalize", params.normalize, False),
                                               ("use_activation", params.use_activation, True)):
            if value is not None and classifier != needs_classifier:
                raise ValueError(f"PoolingParams.{field} is for {'a classifier' if needs_classifier else 'embeddings'}"
                                 f"; this model is {'a classifier' if classifier else 'an embedding model'}")
        if params.dimensions is not None and params.dimensions > self.model_config.hidden_size:
            raise ValueError(f"dimensions={params.dimensions} exceeds the model's embedding size "
                             f"{self.model_config.hidden_size}")
        return params

    def _new_sample(self, group: _RequestGroup, seq_id: str, seed: int, now: float, priority: int) -> _Sample:
        params = group.params
        matcher = None if group.grammar is None else self._grammars.matcher(group.grammar)
        thinking = (matcher is not None and self._reasoning_end is not None
                    and not self._reasoning_end.ended_in_prompt(group.prompt_token_ids))
        # Multi-step decoding feeds a burst's tokens on the device: not where the host must see each token first.
        request = Request(request_id=seq_id, prompt_token_ids=list(group.prompt_token_ids), sampling_params=params,
                          priority=priority, arrival_time=now, max_output_tokens=group.max_output_tokens,
                          multi_step=not group.samples_need_host_tokens and params.min_tokens == 0,
                          # Rows a request needs (prompt logprobs, a per-token pooling task's) are not skipped.
                          use_prefix_cache=params.prompt_logprobs is None and not (
                              group.pooling_params is not None and group.pooling_params.per_token),
                          lora_id=group.lora_request.lora_int_id if group.lora_request is not None else 0)
        detok = None
        if self.tokenizer is not None and params.detokenize:
            detok = IncrementalDetokenizer(self.tokenizer, group.prompt_token_ids,
                                           skip_special_tokens=group.params.skip_special_tokens)
        return _Sample(request=request, seed=seed, detokenizer=detok,
                       logprobs=[] if group.params.logprobs is not None else None, matcher=matcher,
                       thinking=thinking)

    def _structured_output_grammars(self):
        """The engine's ``engine.structured_output.Grammars``, made at the first request that asks for structured
        output (llguidance's view of the tokenizer takes ~0.3 s)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs needs a tokenizer: this engine was started without one")
            try:
                from engine.structured_output import Grammars
            except ImportError as e:  # pragma: no cover - llguidance is a dependency
                raise ValueError(f"structured_outputs needs the llguidance package ({e})") from None
            self._grammars = Grammars(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_token_ids))
        return self._grammars

    def _check_token_ids(self, what: str, token_ids) -> None:
        vocab_size = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{what} {bad[0]} is outside the vocabulary [0, {vocab_size})")

    def add_lora(self, lora_request: LoRARequest) -> None:
        """vLLM's ``add_lora``: read (or find) the adapter now, refusing a bad one with ``LoRAAdapterError`` (a
        ``ValueError``); its requests then find it read."""
        if self.lora_slots is None:
            raise ValueError(f"LoRA adapter {lora_request.lora_name!r} requested, but LoRA is off: start the "
                             "engine with enable_lora=True (--enable-lora)")
        self.lora_slots.check(lora_request)

    def abort_request(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        self._forget_samples(group)
        for s in group.samples:
            if s.finish_reason is None:
                self.scheduler.abort_request(s.request.request_id)
                s.finish_reason = "abort"
                group.aborted = True
        self._emit(group)

    def _load_model(self, model: Optional[str], load_format: str):
        """``models.loader.load_model`` with the engine's options (dtype, seed, quantization; placed for its mesh)."""
        args = self.args
        return load_model(model, dtype=args.dtype, load_format=load_format, seed=args.seed,
                          head_optional=args.runner == "pooling", shardings=param_shardings_for(self._mesh),
                          quantization=args.quantization)

    def _new_weights(self, model: str, load_format: str):
        """The weights of checkpoint ``model`` for the running model: refused (and freed) when its config differs
        in anything (the compiled steps hold the config's values)."""
        loaded = self._load_model(model, load_format)
        if loaded.config != self.model_config:
            compared = [f.name for f in dataclasses.fields(ModelConfig) if f.compare]  # not max_model_len
            new, old = (dataclasses.asdict(c) for c in (loaded.config, self.model_config))
            fields = ", ".join(f"{k}={new[k]!r} (running: {old[k]!r})" for k in compared if new[k] != old[k])
            delete_arrays(loaded.params)
            raise ValueError(f"{model}'s config differs from the running model's: {fields}")
        return loaded.params

    def _idle_for(self, what: str) -> None:
        """Refuse ``what`` while requests are unfinished; let a last finished step end on the device."""
        if self.has_unfinished_requests():
            raise ValueError(f"requests are unfinished: {what} when the engine is idle (vLLM's contract too)")
        if self._in_flight is not None:  # a last step whose requests all finished: let it end on the device
            jax.block_until_ready(self.runner.kv_cache)
            self._in_flight = None

    def sleep(self, level: int = 1) -> None:
        """vLLM's ``sleep``: free the device memory of the weights, the KV pages and the step buffers until
        ``wake_up``, e.g. while a trainer shares the GPU. Level 1 keeps a copy of the weights in host memory;
        level 2 keeps none (for a caller that brings new weights, ``update_weights_from_disk``; else ``wake_up``
        loads the checkpoint again). Only when no request is unfinished; the prefix cache is emptied (its pages
        go); requests are refused while asleep."""
        if level not in (1, 2):
            raise ValueError(f"sleep level {level} is not supported: level 1 keeps the weights in host memory, "
                             "level 2 discards them")
        if self.asleep:
            raise ValueError("the engine is asleep already")
        self._idle_for("sleep")
        started, held = time.perf_counter(), live_array_bytes()
        if level == 1:
            self.runner.sleep()  # first: it refuses a cluster before anything changed
        else:
            self.runner.discard_weights()
        self.block_manager.reset_prefix_cache()  # the cached prefixes' pages are gone
        logger.info("asleep (level %d) in %.2f s: %.2f GiB of arrays freed on the first device (%s)", level,
                    time.perf_counter() - started, (held - live_array_bytes()) / 2**30,
                    "weights kept in host memory" if level == 1 else "weights discarded")

    def wake_up(self) -> None:
        """Back from ``sleep``: the weights (the host copy of level 1; after level 2 the checkpoint loaded again,
        or the one ``update_weights_from_disk`` named) and an empty KV pool on the device again."""
        if not self.asleep:
            raise ValueError("the engine is awake: wake_up follows sleep")
        started = time.perf_counter()
        if self.runner.weights_discarded:
            self.runner.wake_up(self._new_weights(*self._weights_from))
        else:
            self.runner.wake_up()
        jax.block_until_ready((self.runner.params, self.runner.kv_cache))
        logger.info("awake in %.2f s: weights back on the device, an empty KV pool of %d blocks",
                    time.perf_counter() - started, self.runner.num_kv_blocks)

    def update_weights_from_disk(self, model_path: str, load_format: Optional[str] = None) -> None:
        """New weights from a checkpoint of the same architecture and shapes (SGLang's ``update_weights_from_disk``,
        e.g. an RL trainer's latest policy), loaded and quantized as at start-up (``load_format``: the engine's if
        None); no step is compiled again. While awake and idle: the old weights are freed first (no second copy
        on the device; LoRA adapters' slots stay), then the new ones loaded; if they do not fit the model, the old
        ones are loaded back and the error raised. While asleep: the engine discards what it kept and ``wake_up``
        loads these (if they do not fit, ``wake_up`` raises and the engine stays asleep, for another update). The
        prefix cache is emptied (its pages were computed by the old weights)."""
        resolve_model_path(model_path)  # a path that is not there: refused before anything changes
        source = (model_path, load_format or self._weights_from[1])
        if self.asleep:
            if not self.runner.weights_discarded:
                self.runner.drop_host_weights()
            self._weights_from = source
            return
        self._idle_for("update the weights")
        started = time.perf_counter()
        self.runner.discard_weights(keep_kv_cache=True)
        try:
            self.runner.load_weights(self._new_weights(*source))
        except Exception:
            self.runner.load_weights(self._new_weights(*self._weights_from))
            raise
        self._weights_from = source
        self.block_manager.reset_prefix_cache()
        jax.block_until_ready(self.runner.params)
        logger.info("weights updated from %s in %.2f s", model_path, time.perf_counter() - started)

    @property
    def asleep(self) -> bool:
        """Sleep mode (vLLM's ``LLM.sleep``): no weights or pages on the device until ``wake_up``."""
        return self.runner.asleep

    def release_device_memory(self) -> None:
        """Free the weights, KV pages and step buffers now (shutdown), so that another engine in this process can
        size its KV cache from the memory this one held; this engine cannot step afterwards."""
        self._in_flight = None
        self.runner.release()

    # vLLM's accessors, as scripts written for it call them.
    def get_tokenizer(self):
        return self.tokenizer

    def get_model_config(self) -> ModelConfig:
        return self.model_config

    def get_num_unfinished_requests(self) -> int:
        return len(self._groups)

    def has_unfinished_requests(self) -> bool:
        # A step still in flight whose requests all finished needs no further step: the next step()
        # completes it (and drops its tokens) whenever one comes.
        return bool(self._groups)

    # -- one step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and run one model step; returns the outputs of the requests a finished step touched.

        Synchronously, the step is planned, run and read back in this call. With asynchronous
        scheduling (``EngineArgs.async_scheduling``) the step planned here is put on the device
        before the previous step's tokens are read back: the scheduler counts each in-flight token
        as ``PENDING_TOKEN``, a decode's pending token is fed to it on the device, and the host's
        bookkeeping of step N (tokens, stop checks, outputs) runs while the device runs step N+1.
        A request that step N finishes has computed one token too many in step N+1, which is
        dropped (as in vLLM). A step whose sampled tokens the next plan must see on the host
        (penalties need the output history; an ``n > 1`` request forks after its first token) is
        read back before planning.
        """
        entered, waited = time.perf_counter(), self.stats["wait_s"]
        try:
            return self._step()
        finally:
            self.stats["host_s"] += time.perf_counter() - entered - (self.stats["wait_s"] - waited)

    def _step(self) -> list[RequestOutput]:
        if not self.async_scheduling:
            launched = self._launch(self.scheduler.schedule(), previous=None)
            if launched is None:
                self._check_progress()
                return []
            return self._complete(launched)
        outputs: list[RequestOutput] = []
        previous, self._in_flight = self._in_flight, None
        if previous is not None and not self._can_plan_ahead(previous):
            outputs, previous = self._complete(previous), None
        # Planned ahead, decodes have a token still in flight: no drafts can follow it yet.
        launched = self._launch(self.scheduler.schedule(drafts=previous is None), previous=previous)
        if previous is not None:
            self.stats["steps_planned_ahead"] += launched is not None
            outputs = self._complete(previous)
        elif launched is None and not outputs:
            self._check_progress()
        self._in_flight = launched
        return outputs

    def _check_progress(self) -> None:
        if self._groups:  # nothing runnable yet requests pending: never spin silently
            raise RuntimeError(f"the scheduler made no progress with {len(self._groups)} unfinished "
                               f"requests ({self.scheduler.num_waiting} waiting, "
                               f"{self.scheduler.num_running} running)")

    def _can_plan_ahead(self, step: _LaunchedStep) -> bool:
        """Whether the next step can be planned before ``step``'s tokens are on the host. With multi-step decoding
        a step that samples a request's first token is read back first: the next step is likely a burst, whose
        planning and dispatch (~3 ms on an H200's host, run 30e) would otherwise delay that first token.
        With speculative decoding a step with drafts is read back first (the next step starts after its accepted
        tokens), and so is a step of a request whose known tokens end in a repeated n-gram (it copies: its next
        drafts need the token in flight); other steps are planned ahead, as without drafts."""
        if step.first_rows is not None:
            return False
        first_tokens_first = self.scheduler.num_scheduler_steps > 1
        speculative = self.scheduler.speculative_config
        for s, (_, group) in zip(step.plan.scheduled, step.entries):
            if s.samples and (group.samples_need_host_tokens or len(group.samples) < group.params.n or (
                    first_tokens_first and s.start + s.num_tokens == s.request.num_prompt_tokens)):
                return False
            if speculative is not None and s.samples and speculative.propose(
                    s.request.known_token_array(s.start + s.num_tokens), 1):
                return False
        return True

    def _launch(self, out: SchedulerOutput, previous: Optional[_LaunchedStep]) -> Optional[_LaunchedStep]:
        """Put a planned step on the device (None for an empty plan). ``previous``: the step still in
        flight, whose sampled tokens feed this step's pending decode tokens; the plan's tokens are then
        counted by the scheduler at once, as pending."""
        if not out.scheduled:
            return None
        step_start = time.perf_counter()
        self.runner.copy_blocks(out.block_copies)
        scheduled = out.scheduled
        entries = [self._samples[s.request.request_id] for s in scheduled]  # (sample, group) of each
        feed_rows = None  # request id -> row of `previous` that samples its pending token
        lora_slots = {} if self.lora_slots is None else self.lora_slots.slots_for(
            {s.request.lora_id for s in scheduled if s.request.lora_id})
        work = []
        for s, entry in zip(scheduled, entries):
            token_ids, feed_row = s.token_ids, -1
            scores = None if entry[1].prompt_logprobs is None else _score_targets(s, entry)
            if PENDING_TOKEN in token_ids:  # only ever the one token of a decode (else _feed_row raises)
                if feed_rows is None:
                    feed_rows = {} if previous is None else {
                        p.request.request_id: i for i, p in enumerate(previous.plan.scheduled) if p.samples}
                feed_row = self._feed_row(s, feed_rows)
            work.append(SequenceWork(token_ids=token_ids, start=s.start, sample=s.samples, feed_row=feed_row,
                                     block_table=self.block_manager.block_table_array(s.request.request_id),
                                     decode_steps=s.decode_steps, score_targets=scores,
                                     num_drafts=len(s.draft_token_ids),
                                     lora_slot=lora_slots.get(s.request.lora_id, 0)))
        if self.pooling is not None:  # prompt chunks only (no asynchronous scheduling): their hidden rows
            return _LaunchedStep(out, entries, self.runner.dispatch_pool(work), step_start)
        first_rows, row_seqs, histories = _sampled_rows(scheduled)
        params = [entries[i][1].params for i in row_seqs]
        bitmasks = None if self._grammars is None else self._token_bitmasks(scheduled, entries, first_rows,
                                                                            len(row_seqs))
        metadata = build_sampling_metadata(
            params,
            histories,
            [scheduled[i].request.prompt_token_ids for i in row_seqs],
            [entries[i][0].seed for i in row_seqs],
            [len(history) for history in histories],
            self.runner.padded_num_seqs(out.num_batched_tokens),
            eos_token_ids=sorted(self.eos_token_ids),
            bad_words_token_ids=[entries[i][1].bad_words_token_ids for i in row_seqs],
            token_bitmasks=bitmasks,
            vocab_size=self.model_config.vocab_size,
        )
        num_logprobs = _top_width(p.logprobs for p in params)
        num_prompt_logprobs = _top_width(p.prompt_logprobs for w, p in zip(work, params) if w.score_targets)
        dispatched = time.perf_counter()
        pending = self.runner.dispatch(work, metadata, num_logprobs=num_logprobs, decode_steps=out.decode_steps,
                                       num_prompt_logprobs=num_prompt_logprobs)
        self.stats["dispatch_s"] += time.perf_counter() - dispatched
        # The pool as the step leaves it (its KV slots allocated), before the scheduler counts its tokens.
        trace = (None if self.tracer is None else
                 self.tracer.capture(out, self.scheduler, self.block_manager, step_start))
        counted = self.async_scheduling and first_rows is None
        if counted:  # the scheduler counts the step's tokens now, as pending
            self.scheduler.update_after_step(out, {s.request.request_id: _pending(s) for s in scheduled if s.samples})
        return _LaunchedStep(out, entries, pending, step_start, trace, first_rows, counted)

    def _token_bitmasks(self, scheduled: list, entries: list, first_rows: Optional[list[int]],
                        num_rows: int) -> Optional[list]:
        """Each sampled row's structured-output bitmask where its sequence samples under a grammar, else None.
        ``first_rows``: each sequence's first row (``_sampled_rows``; None: row i is sequence i's). A drafted
        sequence's rows take the masks after the drafts before them (``Grammars.bitmask``); while it thinks, its rows
        up to the draft that closes the thinking take none."""
        masked = []  # (first masked row, the matcher, the drafts after that row's)
        for i, s in enumerate(scheduled):
            sample = entries[i][0]
            if not s.samples or sample.matcher is None:
                continue
            start = self._grammar_start(sample, s.draft_token_ids)
            if start is not None:
                first = i if first_rows is None else first_rows[i]
                masked.append((first + start, sample.matcher, s.draft_token_ids[start:]))
        if not masked:
            return None
        masks = iter(self._grammars.bitmask([matcher for _, matcher, _ in masked], [d for _, _, d in masked]))
        out = [None] * num_rows
        for first, _, drafts in masked:
            for row in range(first, first + 1 + len(drafts)):
                out[row] = next(masks)
        return out

    def _grammar_start(self, sample: _Sample, drafts: Sequence[int]) -> Optional[int]:
        """The first of a sequence's rows (its own, then one a draft) sampled under its grammar: 0 once its thinking
        is over (or without a reasoning parser); while it thinks, the row after the draft that closes the thinking;
        None if no draft closes it."""
        if not sample.thinking:
            return 0
        tail = sample.request.output_token_ids[-len(self._reasoning_end.end_ids):]
        return next((j for j in range(1, len(drafts) + 1) if self._reasoning_end.ends(tail + list(drafts[:j]))), None)

    def _count_iteration_tokens(self, scheduled: Sequence[ScheduledSequence], decode_steps: int) -> None:
        """vLLM's ``iteration_tokens_total``: the tokens of each model forward (a multi-step decode's each)."""
        counts = self.stats["iteration_tokens"]
        for j in range(decode_steps):
            tokens = (sum(s.num_tokens for s in scheduled) if decode_steps == 1
                      else sum(1 for s in scheduled if s.decode_steps > j))
            counts = count_into_buckets(counts, ITERATION_TOKENS_BUCKETS, tokens)
            self.stats["iteration_tokens_sum"] += tokens
        self.stats["iteration_tokens"] = counts

    @staticmethod
    def _feed_row(s: ScheduledSequence, feed_rows: dict) -> int:
        row = feed_rows.get(s.request.request_id)
        if row is None or s.num_tokens != 1:
            raise RuntimeError(f"{s.request.request_id!r}: a pending token that the step in flight does not "
                               f"sample ({s.num_tokens} tokens scheduled)")
        return row

    def _complete(self, launched: _LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched step and process its sampled tokens; the outputs of the requests touched."""
        if self.pooling is not None:
            return self._complete_pooling(launched)
        out, entries = launched.plan, launched.entries
        fetched = time.perf_counter()
        result = self.runner.fetch(launched.pending)
        self.stats["wait_s"] += time.perf_counter() - fetched
        if launched.trace is not None:  # after the KV writes, before finished requests free their blocks
            self.tracer.finish(launched.trace, time.perf_counter())
        scheduled = out.scheduled
        self.stats["steps"] += 1
        self.stats["max_batch_seqs"] = max(self.stats["max_batch_seqs"], len(scheduled))
        self._count_iteration_tokens(scheduled, out.decode_steps)
        tokens = result.token_ids.tolist()  # Python ints, converted once for the whole batch
        if launched.first_rows is not None:  # speculative decoding: a sequence's rows, then its accepted tokens
            first_rows, results = launched.first_rows, [result]

            def rows_of(i: int, s: ScheduledSequence) -> list[tuple[int, int, int]]:
                """(token, index in ``results``, row) of each token the step gives sequence ``i``."""
                row = first_rows[i]
                if not s.draft_token_ids:
                    return [(tokens[row], 0, row)]
                accepted = accepted_tokens(tokens[row:row + s.num_tokens], s.draft_token_ids)
                self._count_drafts(len(s.draft_token_ids), len(accepted) - 1)
                return [(token, 0, row + j) for j, token in enumerate(accepted)]
        elif out.decode_steps == 1:
            results = [result]

            def rows_of(i: int, s: ScheduledSequence) -> list[tuple[int, int, int]]:
                return [(tokens[i], 0, i)]
        else:  # a multi-step decode: the steps first (engine.multi_step)
            self.stats["multi_steps"] += 1
            results = [jax.tree.map(lambda a: a[j], result) for j in range(out.decode_steps)]

            def rows_of(i: int, s: ScheduledSequence) -> list[tuple[int, int, int]]:
                return [(step[i], j, i) for j, step in enumerate(tokens[:s.decode_steps])]
        sampled = {i: rows_of(i, s) for i, s in enumerate(scheduled) if s.samples}
        if not launched.counted_at_launch:
            self.scheduler.update_after_step(out, {
                s.request.request_id: [t for t, _, _ in sampled[i]] if s.draft_token_ids
                else _one_or_list([t for t, _, _ in sampled[i]]) for i, s in enumerate(scheduled) if s.samples})
        touched: dict[str, _RequestGroup] = {}
        now = time.monotonic()
        if launched.pending.score_offsets:
            self._record_prompt_logprobs(launched)
        for i, s in enumerate(scheduled):
            if not s.samples:
                continue
            sample, group = entries[i]
            if sample.finish_reason is not None:  # finished (stopped, aborted) while this step was in flight
                continue
            # The first token's place in the outputs (after the sequence's last known token; drafts follow it).
            index = s.start + s.num_tokens - len(s.draft_token_ids) - s.request.num_prompt_tokens
            group.first_token_time, group.last_token_time = group.first_token_time or now, now
            if sample is group.samples[0] and len(group.samples) < group.params.n:
                self._fork_samples(group, now)  # before the first token's stop checks may finish (and free) it
            for j, (token, result_index, row) in enumerate(sampled[i]):
                if launched.counted_at_launch:  # fill in the pending token
                    s.request.output_token_ids[index + j] = token
                self._record_token(group, sample, token, results[result_index], row, num_output_tokens=index + j + 1)
                if sample.finish_reason is not None:  # its later tokens are dropped
                    break
            touched[group.request_id] = group
        outputs = []
        for group in touched.values():
            finished = group.finished
            if finished:  # before the output goes out: a caller woken by it sees the engine without it
                del self._groups[group.request_id]
                self._forget_samples(group)
            elif group.output_kind is RequestOutputKind.FINAL_ONLY and not group.aborted:
                continue
            outputs.append(self._emit(group, finished))
        return outputs

    def _count_drafts(self, num_drafts: int, num_accepted: int) -> None:
        self.stats["spec_decode_num_drafts"] += 1
        self.stats["spec_decode_num_draft_tokens"] += num_drafts
        self.stats["spec_decode_num_accepted_tokens"] += num_accepted
        counts = self.stats["spec_decode_num_accepted_tokens_per_pos"]
        counts += (0,) * (num_drafts - len(counts))
        self.stats["spec_decode_num_accepted_tokens_per_pos"] = tuple(  # the accepted drafts are the first ones
            count + (position < num_accepted) for position, count in enumerate(counts))

    def _complete_pooling(self, launched: _LaunchedStep) -> list[EmbeddingRequestOutput]:
        """Wait for a pooling step: each chunk's rows go to its request's ``PooledRows``; a request whose prompt's
        last chunk ran is finished (its blocks freed) with its pooled vector."""
        out, entries = launched.plan, launched.entries
        fetched = time.perf_counter()
        per_token = [entry[1].pooling_params.per_token for entry in entries]
        last, first, sums, every_row = self.runner.fetch_pool(launched.pending, every_row=any(per_token))
        self.stats["wait_s"] += time.perf_counter() - fetched
        self.stats["steps"] += 1
        self.stats["max_batch_seqs"] = max(self.stats["max_batch_seqs"], len(out.scheduled))
        outputs = []
        chunk_start = 0  # the chunk's first row in the step's tokens (works in order, each one's rows in a run)
        for i, s in enumerate(out.scheduled):
            group = entries[i][1]
            chunk = slice(chunk_start, chunk_start + s.num_tokens)
            chunk_start = chunk.stop
            if group.aborted or self._groups.get(group.request_id) is not group:
                continue
            group.pooled.add_chunk(s.start, first[i], sums[i], every_row[chunk] if per_token[i] else None)
            if not s.samples:  # more of the prompt to come
                continue
            self.scheduler.finish_request(s.request.request_id, RequestStatus.FINISHED_STOPPED)
            self.stats["prompt_tokens"] += len(group.prompt_token_ids)  # prompts counted once computed
            del self._groups[group.request_id]
            self._forget_samples(group)
            output = self._pooled_output(group, last[i])
            if group.on_output is not None:
                group.on_output(output)
            outputs.append(output)
        self.scheduler.update_after_step(out, {})  # the requests still computing their prompts
        return outputs

    def _pooled_output(self, group: _RequestGroup, last_row: np.ndarray):
        """A finished pooling request's output: a classifier's head on its last row (or, ``token_classify``, on every
        row), else its pooled vector (or, ``token_embed``, a vector a token)."""
        params, classifier = group.pooling_params, self.pooling.classifier is not None
        ids = (group.request_id, group.prompt, group.prompt_token_ids)
        if params.per_token:
            rows = group.pooled.every_row()
            data = self.pooling.classify(params, rows) if classifier else self.pooling.embedding(params, rows)
            return PoolingRequestOutput(*ids, PoolingOutput(data))
        if classifier:
            return ClassificationRequestOutput(*ids, ClassificationOutput(self.pooling.classify(params,
                                                                                                last_row).tolist()))
        vector = group.pooled.vector(self.pooling, params, last_row, len(group.prompt_token_ids))
        return EmbeddingRequestOutput(*ids, EmbeddingOutput(vector))

    def _record_prompt_logprobs(self, launched: _LaunchedStep) -> None:
        """Prompt logprobs of a step's scored chunks (``SamplingParams.prompt_logprobs``): the entry of each prompt
        token the chunk's rows predict, appended in order (a chunk run again after a preemption adds nothing)."""
        scores = self.runner.fetch_scores(launched.pending)  # every scored work's rows, one copy to the host
        for i, first_row in launched.pending.score_offsets.items():
            s = launched.plan.scheduled[i]
            group = launched.entries[i][1]
            prompt, entries = group.prompt_token_ids, group.prompt_logprobs
            for row in range(s.num_tokens):
                position = s.start + row + 1  # the prompt token this row's logits predict
                if position != len(entries) or position >= len(prompt):
                    continue
                entries.append(self._logprobs_entry(prompt[position], scores, first_row + row,
                                                    group.params.prompt_logprobs, group.params.detokenize))

    def _logprobs_entry(self, token: int, result, row: int, k: int, decode: bool) -> dict[int, Logprob]:
        """``{token id: Logprob}`` of ``token`` and the ``k`` most likely tokens at row ``row`` of a sampler output
        (or a scoring step's), with their text where ``decode``."""
        entry = {token: Logprob(float(result.logprobs[row]), rank=int(result.ranks[row]))}
        for rank, (tid, lp) in enumerate(zip(result.top_token_ids[row][:k], result.top_logprobs[row][:k]), 1):
            entry.setdefault(int(tid), Logprob(float(lp), rank=rank))
        if self.tokenizer is not None and decode:
            for tid, lp in entry.items():
                lp.decoded_token = self.tokenizer.decode([tid])
        return entry

    def _forget_samples(self, group: _RequestGroup) -> None:
        """A group ended (finished or aborted): its samples are no longer looked up, its adapter no longer held."""
        for sample in group.samples:
            self._samples.pop(sample.request.request_id, None)
        if group.lora_request is not None:
            self.lora_slots.release(group.lora_request.lora_int_id)

    def _fork_samples(self, group: _RequestGroup, now: float) -> None:
        """``n > 1``: the other samples share the prompt's blocks and re-run its last token, as many as
        ``max_num_seqs`` leaves room for among the running sequences. The rest, and all of them where the first sample
        has already finished (its first token reached ``max_model_len``) or the prompt is one token (nothing before
        its last to share), wait to compute the prompt again (from the prefix cache where it is on), as vLLM's
        samples of one request each do."""
        parent = group.samples[0].request
        for index in range(1, group.params.n):
            seq_id = f"{group.request_id}#{index}"
            child = self._new_sample(group, seq_id, (group.samples[0].seed + index * 7919) % (2**31 - 1),
                                     now, parent.priority)
            if (parent.status is RequestStatus.RUNNING and len(group.prompt_token_ids) > 1
                    and self.scheduler.num_running < self.scheduler.max_num_seqs):
                child.request.num_computed_tokens = len(group.prompt_token_ids) - 1
                self.scheduler.fork_request(parent, child.request)
            else:
                self.scheduler.add_request(child.request)
            group.samples.append(child)
            self._samples[seq_id] = (child, group)

    def _record_token(self, group: _RequestGroup, sample: _Sample, token: int, result, row: int,
                      num_output_tokens: int) -> None:
        """Token ``num_output_tokens`` of ``sample`` (already in its request's outputs): logprobs, text,
        stop checks. Outputs after it are tokens of a step still in flight."""
        self.stats["generation_tokens"] += 1
        if num_output_tokens == 1:  # its prompt computed: counted then, once a sequence (vLLM's, a request of n
            self.stats["prompt_tokens"] += len(group.prompt_token_ids)  # being n requests there)
        if sample.logprobs is not None:
            sample.logprobs.append(self._logprobs_entry(token, result, row, group.params.logprobs,
                                                        group.params.detokenize))
        if result.logprobs is not None:
            sample.cumulative_logprob += float(result.logprobs[row])
        delta = ""
        if sample.detokenizer is not None:
            delta = sample.detokenizer.append(token)
            sample.text = sample.detokenizer.text
        request = sample.request
        if request.is_finished and num_output_tokens == len(request.output_token_ids):
            # The scheduler ended it (max_model_len reached) and no later token is in flight.
            sample.finish_reason = FINISH_REASONS.get(request.status, "length")
            group.aborted = group.aborted or sample.finish_reason == "abort"
            return
        decision = check_stop(
            group.params, token_id=token, num_output_tokens=num_output_tokens, text=sample.text,
            new_text_len=len(delta), eos_token_ids=self.eos_token_ids,
            max_output_tokens=group.max_output_tokens)
        if sample.thinking and decision is None:  # the grammar starts after the token that closes the thinking
            sample.thinking = not self._reasoning_end.ends(request.output_token_ids[:num_output_tokens])
        elif sample.matcher is not None and decision is None and not sample.matcher.consume_token(token):
            # Only a token the grammar refused gets here (its mask allowed it: say min_tokens banned all it allowed).
            logger.warning("request %s: structured output stopped: %s", request.request_id, sample.matcher.get_error())
            decision = StopDecision("stop", None, sample.text)
        if decision is not None:
            sample.finish_reason, sample.stop_reason, sample.text = (
                decision.finish_reason, decision.stop_reason, decision.text)
            del request.output_token_ids[num_output_tokens:]  # a token in flight after the stop is dropped
            if not request.is_finished:
                status = (RequestStatus.FINISHED_LENGTH if sample.finish_reason == "length"
                          else RequestStatus.FINISHED_STOPPED)
                self.scheduler.finish_request(request.request_id, status)

    def _emit(self, group: _RequestGroup, finished: Optional[bool] = None) -> RequestOutput:
        """Build the group's output (cumulative, or the delta since its last) and hand it to ``on_output``;
        ``finished``: ``group.finished`` when the caller has it already."""
        finished = group.finished if finished is None else finished
        holdback = group.params.output_text_buffer_length
        if group.output_kind is RequestOutputKind.DELTA:
            completions = [_delta_completion(i, s, holdback) for i, s in enumerate(group.samples)]
            prompt, prompt_token_ids, prompt_logprobs = (
                (group.prompt, group.prompt_token_ids, group.prompt_logprobs) if group.first_output
                else (None, None, None))
            group.first_output = False
        else:
            completions = [
                CompletionOutput(index=i, text=s.text[:_text_end(s, holdback)],
                                 token_ids=s.request.output_token_ids[:_known_end(s.request.output_token_ids)],
                                 cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                                 logprobs=s.logprobs, finish_reason=s.finish_reason, stop_reason=s.stop_reason)
                for i, s in enumerate(group.samples)
            ]
            prompt, prompt_token_ids, prompt_logprobs = group.prompt, group.prompt_token_ids, group.prompt_logprobs
        first = group.samples[0].request
        if (finished or group.aborted) and group.finished_time is None:
            group.finished_time = time.monotonic()
        output = RequestOutput(request_id=group.request_id, prompt=prompt, prompt_token_ids=prompt_token_ids,
                               outputs=completions, finished=finished or group.aborted,
                               num_cached_tokens=first.num_cached_tokens,
                               prompt_logprobs=prompt_logprobs, lora_request=group.lora_request,
                               metrics=RequestMetrics(first.arrival_time, first.first_scheduled_time,
                                                      group.first_token_time, group.last_token_time,
                                                      group.finished_time))
        if group.on_output is not None:
            group.on_output(output)
        return output


def _text_end(sample: _Sample, holdback: int) -> int:
    """How much of the sample's text an output may show: all of it once finished, less the last ``holdback``
    characters while running (they may begin a stop string; ``RequestOutputKind``)."""
    if not holdback or sample.finish_reason is not None:
        return len(sample.text)
    return max(0, len(sample.text) - holdback)


def _delta_completion(index: int, sample: _Sample, holdback: int) -> CompletionOutput:
    """What ``sample`` has that its request's outputs have not handed out yet (``RequestOutputKind.DELTA``).
    Tokens and their logprobs entries (one a known token) only ever append, and the held-back text makes text only
    grow."""
    tokens = sample.request.output_token_ids
    tokens_end = _known_end(tokens)
    text_end = max(sample.text_sent, _text_end(sample, holdback))
    logprobs = sample.logprobs
    completion = CompletionOutput(
        index=index, text=sample.text[sample.text_sent:text_end], token_ids=tokens[sample.tokens_sent:tokens_end],
        cumulative_logprob=sample.cumulative_logprob if logprobs is not None else None,
        logprobs=None if logprobs is None else logprobs[sample.tokens_sent:tokens_end],
        finish_reason=sample.finish_reason, stop_reason=sample.stop_reason)
    sample.tokens_sent, sample.text_sent = tokens_end, text_end
    return completion


def _known_end(output_token_ids: list[int]) -> int:
    """How many of the outputs are known: all but the tokens of a step still in flight (always the last, if
    any)."""
    end = len(output_token_ids)
    while end and output_token_ids[end - 1] == PENDING_TOKEN:
        end -= 1
    return end


def _score_targets(s: ScheduledSequence, entry: tuple) -> Optional[list[int]]:
    """The tokens a prompt chunk's rows predict, for ``SamplingParams.prompt_logprobs`` (-1 past the prompt's end),
    or None: not a chunk of the first sample's prompt, its request asks none, or it predicts nothing not yet
    recorded (a chunk run again after a preemption)."""
    sample, group = entry
    prompt, recorded = group.prompt_token_ids, group.prompt_logprobs
    if (recorded is None or sample is not group.samples[0] or s.start >= len(prompt) - 1
            or s.start + s.num_tokens < len(recorded)):
        return None
    return [prompt[p + 1] if p + 1 < len(prompt) else -1 for p in range(s.start, s.start + s.num_tokens)]


def _sampled_rows(scheduled: list[ScheduledSequence]) -> tuple[Optional[list[int]], Sequence[int], list[list[int]]]:
    """The rows a step samples: each sequence's, then one for each of its drafts (speculative decoding). Returns
    each sequence's first row (None without drafts: row i is sequence i's), each row's sequence, and the outputs
    before each row's token: a draft's row sees the drafts before it, so penalties, ``min_tokens`` and bad words
    treat it as they would decoding a token a step."""
    if not any(s.draft_token_ids for s in scheduled):
        return None, range(len(scheduled)), [s.request.output_token_ids for s in scheduled]
    first_rows, row_seqs, histories = [], [], []
    for i, s in enumerate(scheduled):
        outputs = s.request.output_token_ids
        first_rows.append(len(row_seqs))
        row_seqs += [i] * (1 + len(s.draft_token_ids))
        histories += [outputs] + [outputs + list(s.draft_token_ids[:j]) for j in range(1, len(s.draft_token_ids) + 1)]
    return first_rows, row_seqs, histories


def _top_width(wanted) -> Optional[int]:
    """The static width of a step's top-k logprobs: 5 or the maximum (few variants compile), None if none asked."""
    wanted = max((k for k in wanted if k is not None), default=None)
    return None if wanted is None else (5 if wanted <= 5 else MAX_LOGPROBS)


def _pending(s: ScheduledSequence):
    """What a step in flight adds to a sequence's outputs: one ``PENDING_TOKEN`` a decode step."""
    return _one_or_list([PENDING_TOKEN] * s.decode_steps)


def _one_or_list(tokens: list[int]):
    """A sequence's sampled tokens as ``Scheduler.update_after_step`` takes them: the token of a one-step
    sequence, the list of a multi-step decode's."""
    return tokens[0] if len(tokens) == 1 else tokens
