"""Engine options with vLLM's names, their defaults and validation.

Owns the options and the batch limits they resolve to; how much the device holds (the KV pool's size) is
``engine.device_memory``'s. Knows nothing of requests. Imports no JAX: the server's process, whose engine runs in
a child (``engine.engine_process``), parses these options and never needs it.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import os
from typing import Optional

from models.config import QUANTIZATION_METHODS, ModelConfig, quantization_method

logger = logging.getLogger(__name__)
ALLOW_LONG_MAX_MODEL_LEN_ENV = "VLLM_ALLOW_LONG_MAX_MODEL_LEN"  # vLLM's: a max_model_len past the model's, warned

# vLLM's engine arguments that change nothing here, and why: ``LLM`` and the server take them (with a warning), so
# that vLLM scripts and command lines run as they are.
IGNORED_VLLM_ARGS = {
    "swap_space": "preemption recomputes; nothing is swapped to host memory",
    "enable_chunked_prefill": "prefill is always chunked",
    "max_seq_len_to_capture": "XLA's command buffers capture every step shape",
    "disable_custom_all_reduce": "all-reduces are XLA's",
}

# vLLM's names: "fp8" is e4m3. Pages hold K/V at scale 1 (vLLM's default without calibrated scales).
KV_CACHE_DTYPES = {"auto": None, "bfloat16": "bfloat16", "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn",
                   "fp8_e5m2": "float8_e5m2"}
LINEAR_BACKENDS = ("auto", "pallas", "xla")
# enforce_eager's XLA options: no command buffers (an empty list of the command types XLA captures in CUDA graphs).
EAGER_COMPILER_OPTIONS = {"xla_gpu_enable_command_buffer": ""}


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype):
    """The KV pages' dtype: the model's for "auto", else the named float8 type."""
    import jax.numpy as jnp

    name = KV_CACHE_DTYPES[kv_cache_dtype]
    return getattr(jnp, name) if name else model_dtype


# Tokens of growth each running request keeps free when a waiting one is admitted (EngineArgs.admission_reserve_tokens):
# tput-long's best in the scheduler's simulation (benchmarks/NOTES.md, run 52).
DEFAULT_ADMISSION_RESERVE_TOKENS = 256


@dataclasses.dataclass
class EngineArgs:
    model: Optional[str] = None
    dtype: str = "auto"
    block_size: int = 16
    max_num_batched_tokens: Optional[int] = None
    max_num_seqs: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    max_model_len: Optional[int] = None
    seed: int = 0
    load_format: str = "auto"
    tensor_parallel_size: int = 1
    quantization: Optional[str] = None
    kv_cache_dtype: str = "auto"
    num_gpu_blocks_override: Optional[int] = None
    scheduling_policy: str = "fifo"
    # Tokens of growth every running request keeps free when a waiting one is admitted (no more than it may still
    # generate): fewer preemptions, whose recompute costs more than the wait (engine.scheduler). 0: admit whenever
    # the first chunk's blocks are free, as vLLM does.
    admission_reserve_tokens: int = DEFAULT_ADMISSION_RESERVE_TOKENS
    attention_backend: str = "auto"
    # The KV write: "reference" (XLA's scatter, in place), "pallas" (one kernel for K and V) or "auto"
    # (the kernel on GPU: 1.3-1.4% of an 8B step faster on an H200, run 13a; the scatter on CPU).
    kv_write_backend: str = "auto"
    # Matmuls: "auto" = the Pallas weight-streaming kernel for int4 weights at small batches on
    # GPU, XLA otherwise (models.quantization.LinearBackend); "pallas" also for int8 and dense
    # weights; "xla" never the kernel.
    linear_backend: str = "auto"
    # Unroll the layer loop over per-layer weights instead of lax.scan over stacked ones.
    # None = on GPU only: there XLA copies each layer's weight slice inside the scan, which
    # measured 17.3 ms vs 7.6 ms per batch-1 decode step of Llama-3.1-8B on an H100
    # (benchmarks/NOTES.md); on CPU the scan compiles faster and runs as fast.
    unroll_layers: Optional[bool] = None
    # Join q/k/v and gate/up into one matmul each (models.llama.fuse_projections). None = on one device (a
    # mesh splits them apart); False keeps seven matmuls a layer (for measuring what joining costs large steps).
    fuse_projections: Optional[bool] = None
    # "continuous" batching, or "static" (the baseline: a fixed batch, nothing admitted until all of it finished).
    scheduling_mode: str = "continuous"
    trace: bool = False  # record a per-step trace (engine.trace), read with LLM.get_trace()
    # Plan step N+1 while step N runs on the device (LLMEngine.step). None = on, except over several
    # processes (followers replay steps in order).
    async_scheduling: Optional[bool] = None
    # XLA options for compiling the step (jax.jit's compiler_options, e.g. {"xla_gpu_autotune_level": 0}).
    # None = the engine's choice (engine.runner.default_compiler_options: for fp8 weights, by step size).
    compiler_options: Optional[dict] = None
    # Compile every step shape at start-up under a progress bar (ModelRunner.precompile), so no request
    # waits for a compile; None = on GPU (on CPU the steps compile at first use, as tests want).
    precompile_steps: Optional[bool] = None
    # Who drives the engine: "llm" (offline LLM.generate) or "server" (the HTTP server). It picks the
    # default batch limits on large GPUs (``default_batch_limits``), as vLLM's usage context does.
    usage_context: str = "llm"
    # vLLM's --reasoning-parser (engine.reasoning.REASONING_PARSERS): a request's structured output then constrains
    # only what follows the model's thinking (its </think>), as vLLM's does.
    reasoning_parser: Optional[str] = None
    # vLLM's --runner: "generate", "pooling" (embeddings: engine.pooling; LLM.embed, /v1/embeddings) or "auto" (what
    # the checkpoint's architectures say: engine.pooling.resolve_runner), and the pooling's type ("LAST", "MEAN",
    # "CLS"; None: the checkpoint's sentence-transformers files, else LAST).
    runner: str = "auto"
    pooling_type: Optional[str] = None
    # Multi-step decoding (vLLM's --num-scheduler-steps): when every running request decodes and none waits, run
    # this many decode steps in one dispatch, each step's tokens fed to the next on the device (engine.multi_step).
    # The host's share of a step is then paid once for them; a request's tokens come out that many at a time.
    num_scheduler_steps: int = 1
    # Automatic prefix caching (vLLM's, on by default as in vLLM V1): full KV blocks stay cached under a key of
    # their whole prefix after their request ends, and a request whose prompt starts with a cached prefix computes
    # only the rest (engine.prefix_cache).
    enable_prefix_caching: bool = True
    # Defaults of the sampling fields a request leaves unset (engine.generation_config): "auto" from the model
    # folder's generation_config.json, as vLLM; "vllm" none; or a folder holding one.
    generation_config: str = "auto"
    # Speculative decoding (vLLM's --speculative-config): {"method": "ngram", "num_speculative_tokens": k,
    # "prompt_lookup_max": n, "prompt_lookup_min": m}: drafts looked up in a request's own tokens, checked by the
    # model in the decode's step (engine.speculative). A step with drafts, or of a request whose text repeats, is
    # read back before the next is planned (asynchronous scheduling plans the others ahead, as without drafts).
    speculative_config: Optional[dict] = None
    # LoRA adapters (vLLM's --enable-lora): requests may name a PEFT adapter (engine.lora.LoRARequest); up to
    # max_loras adapters of rank up to max_lora_rank run in one step, from device slots; max_cpu_loras adapters stay
    # read on the host (None: max_loras).
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: Optional[int] = None
    # vLLM's --tokenizer: a folder (or .gguf) whose tokenizer is used instead of the model's (None: the model's).
    tokenizer: Optional[str] = None
    # vLLM's --trust-remote-code: the tokenizer may run the code its folder ships (transformers'
    # ``trust_remote_code``). The model's code is always the engine's own (models/), so for the weights it changes
    # nothing: an architecture the engine does not implement is refused either way.
    trust_remote_code: bool = False
    # vLLM's --enforce-eager: no CUDA graphs. XLA's command buffers (its CUDA graphs) off for every step
    # (``EAGER_COMPILER_OPTIONS``); steps still compile, each kernel then launches on its own.
    enforce_eager: bool = False

    def validate(self) -> None:
        import jax

        from pallas_kernels import KV_WRITE_BACKENDS

        if self.tokenizer is not None and not os.path.exists(self.tokenizer):
            raise ValueError(f"tokenizer {self.tokenizer!r} does not exist (a folder with the tokenizer's files, or a "
                             ".gguf file; nothing is downloaded)")
        if self.block_size not in (8, 16, 32, 64):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, got {self.block_size!r}")
        if (not isinstance(self.gpu_memory_utilization, numbers.Real) or isinstance(self.gpu_memory_utilization, bool)
                or not 0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"gpu_memory_utilization must be a number in (0, 1], got {self.gpu_memory_utilization!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.usage_context not in ("llm", "server"):
            raise ValueError(f"usage_context must be 'llm' or 'server', got {self.usage_context!r}")
        if not isinstance(self.num_scheduler_steps, int) or self.num_scheduler_steps < 1:
            raise ValueError(f"num_scheduler_steps must be a positive integer, got {self.num_scheduler_steps!r}")
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_model_len", "num_gpu_blocks_override"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 2:
            raise ValueError(f"num_gpu_blocks_override must be >= 2 (block 0 is reserved), got "
                             f"{self.num_gpu_blocks_override}")
        if self.generation_config not in ("auto", "vllm"):
            from engine.generation_config import default_sampling_fields

            default_sampling_fields("", self.generation_config)  # a named folder must hold one: fail before loading
        from engine.reasoning import REASONING_PARSERS

        from engine.pooling import POOLING_TYPES, RUNNERS

        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {self.runner!r}")
        if self.pooling_type is not None and str(self.pooling_type).upper() not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be None or one of {', '.join(POOLING_TYPES)}, got "
                             f"{self.pooling_type!r}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be None or one of {', '.join(REASONING_PARSERS)}, "
                             f"got {self.reasoning_parser!r}")
        if not isinstance(self.admission_reserve_tokens, int) or self.admission_reserve_tokens < 0:
            raise ValueError(f"admission_reserve_tokens must be an integer >= 0, got {self.admission_reserve_tokens!r}")
        if self.scheduling_policy not in ("fifo", "priority"):
            raise ValueError(f"scheduling_policy must be 'fifo' or 'priority', got {self.scheduling_policy!r}")
        if self.scheduling_mode not in ("continuous", "static"):
            raise ValueError(f"scheduling_mode must be 'continuous' or 'static', got {self.scheduling_mode!r}")
        self._validate_tensor_parallel_size()
        self._validate_speculative_config()
        self._validate_lora()
        self.quantization = quantization_method(self.quantization)
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be None or one of {', '.join(QUANTIZATION_METHODS)}, "
                             f"got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.async_scheduling and jax.process_count() > 1:
            raise ValueError("async_scheduling=True cannot be combined with several processes")
        if self.kv_write_backend not in KV_WRITE_BACKENDS:
            raise ValueError(f"kv_write_backend must be one of {', '.join(KV_WRITE_BACKENDS)}, "
                             f"got {self.kv_write_backend!r}")
        if self.linear_backend not in LINEAR_BACKENDS:
            raise ValueError(f"linear_backend must be one of {', '.join(LINEAR_BACKENDS)}, got {self.linear_backend!r}")

    def _validate_speculative_config(self) -> None:
        from engine.speculative import SpeculativeConfig

        if SpeculativeConfig.of(self.speculative_config) is None:
            return
        for conflict, ok in (("num_scheduler_steps > 1", self.num_scheduler_steps == 1),
                             ("runner='pooling'", self.runner != "pooling")):
            if not ok:
                raise ValueError(f"speculative_config cannot be combined with {conflict}")

    def _validate_lora(self) -> None:
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            value = getattr(self, name)
            if (value is not None or name != "max_cpu_loras") and (
                    not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")

    def _validate_tensor_parallel_size(self) -> None:
        """Sizes the devices allow; whether the model's heads divide is checked once its config is read."""
        import jax

        tp = self.tensor_parallel_size
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
        devices = jax.devices()
        if tp > len(devices):
            raise ValueError(f"tensor_parallel_size={tp} needs {tp} devices, but only {len(devices)} "
                             f"{devices[0].platform.upper()} device(s) are visible to JAX")
        if jax.process_count() > 1 and tp != len(devices):
            raise ValueError(f"with {jax.process_count()} processes, tensor_parallel_size must span every "
                             f"device of the cluster ({len(devices)}), got {tp}")

    def resolved_limits(self, config: ModelConfig) -> tuple[int, int, int]:
        """``(max_model_len, max_num_batched_tokens, max_num_seqs)`` with defaults filled in."""
        max_model_len = self.max_model_len or config.max_context_len
        if max_model_len > config.max_context_len:
            yarn = ", with YaRN" if config.max_context_len > config.max_position_embeddings else ""
            problem = (f"max_model_len={max_model_len} exceeds the model's context length {config.max_context_len} "
                       f"(max_position_embeddings={config.max_position_embeddings}{yarn})")
            if os.environ.get(ALLOW_LONG_MAX_MODEL_LEN_ENV, "").lower() not in ("1", "true"):
                raise ValueError(f"{problem}; set {ALLOW_LONG_MAX_MODEL_LEN_ENV}=1 to run it anyway (as vLLM)")
            logger.warning("%s: taken (%s); positions past the model's training may give wrong outputs", problem,
                           ALLOW_LONG_MAX_MODEL_LEN_ENV)
        from engine.device_memory import default_batch_limits

        default_tokens, default_seqs = default_batch_limits(self.usage_context)
        max_num_seqs = self.max_num_seqs or default_seqs
        max_tokens = self.max_num_batched_tokens or default_tokens
        return max_model_len, max(max_tokens, 1), max_num_seqs
