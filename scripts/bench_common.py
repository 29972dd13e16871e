"""Shared pieces of the engine benchmarks (``bench_latency``, ``bench_throughput``,
``bench_static_vs_continuous``, ``bench_hf_peer``): the PROTOCOL workloads, engine flags,
random prompts from a fixed seed, the result header every JSON carries, device
measurements (copy bandwidth, matmul rate), compile time excluded from timings,
FLOP counting, peer ratios, the results path and a printed table.

Knows nothing of any one workload's timing loop. JAX is imported inside the
functions that need it, so the Hugging Face peer can import this module without
touching the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import faulthandler
import logging
import os
import subprocess
import sys
import time
from typing import Iterable, Optional, Sequence

if os.environ.get("BENCH_STACK_DUMP_S"):  # a run that may be killed at a limit says where it was
    faulthandler.dump_traceback_later(float(os.environ["BENCH_STACK_DUMP_S"]), exit=False)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import engine  # noqa: E402,F401  (sets JAX's GPU allocator pool before a benchmark touches the device)
from engine.compile_timer import CompileTimer  # noqa: E402,F401 (timed runs subtract compiles)
from engine.engine_args import DEFAULT_ADMISSION_RESERVE_TOKENS  # noqa: E402

DEFAULT_MODEL = os.path.join(REPO_ROOT, "benchmarks", "models", "llama-3.1-8b")
RESULTS_DIR = os.path.join("benchmarks", "results")
PROMPT_SEED = 0

# PROTOCOL.md workloads: name -> (requests, input tokens, output tokens).
WORKLOADS = {
    "latency": (1, 128, 256),
    "tput-short": (1024, 128, 128),
    "tput-long": (512, 1000, 1000),
    "tput-prefill": (512, 2048, 128),
}
# The batch Hugging Face ``generate()`` runs each workload at (it holds the whole batch's
# cache and pads nothing: all prompts have the same length). Chosen so the peer finishes
# in about a minute per workload on one H100; DESIGN.md has its measured rates.
PEER_BATCH = {"latency": 1, "tput-short": 256, "tput-long": 64, "tput-prefill": 32}

# Fields where lower is better: their ratio is peer over ours, so a ratio above 1 means we win.
LOWER_IS_BETTER = frozenset({"ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"})


# --------------------------------------------------------------------------------------
# Flags and engine construction
# --------------------------------------------------------------------------------------


def add_engine_flags(parser: argparse.ArgumentParser, *, default_model: Optional[str] = DEFAULT_MODEL,
                     default_load_format: str = "dummy") -> None:
    """Flags that pick the model and size the engine, with vLLM's names."""
    shown = os.path.relpath(default_model, REPO_ROOT) if default_model else "the embedded default model"
    parser.add_argument("--model", default=default_model,
                        help=f"checkpoint folder, .gguf, or a folder with a config.json for --load-format dummy "
                             f"(default {shown})")
    parser.add_argument("--load-format", default=default_load_format, choices=("auto", "safetensors", "gguf", "dummy"))
    parser.add_argument("--dtype", default="auto", help="auto = bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: the workload's input + output length (keeps block tables short)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs the model is split over")
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--quantization", default=None, help="int8, int4, awq, gptq, fp8, mxfp4 (dummy weights: "
                        "random weights of that method's layout; mxfp4: a mixture's experts)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8")
    from pallas_kernels import KV_WRITE_BACKENDS

    parser.add_argument("--kv-write-backend", default="auto", choices=KV_WRITE_BACKENDS,
                        help="the KV write: XLA's scatter, the Pallas kernel, or auto (the kernel on GPU)")
    parser.add_argument("--linear-backend", default="auto", choices=("auto", "pallas", "xla"),
                        help="matmuls: auto = Pallas kernel for quantized weights at small batch on GPU")
    parser.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto",
                        help="plan step N+1 while step N runs (auto: on in one process)")
    parser.add_argument("--fuse-projections", choices=("auto", "on", "off"), default="auto",
                        help="q/k/v and gate/up as one matmul each (auto: on one device)")
    parser.add_argument("--precompile-steps", choices=("auto", "on", "off"), default="auto",
                        help="compile every step shape at start-up (auto: on GPU)")
    parser.add_argument("--num-scheduler-steps", type=int, default=1,
                        help="decode steps a dispatch runs while no request waits (multi-step decoding)")
    parser.add_argument("--speculative-config", type=json.loads, default=None,
                        help='speculative decoding, JSON as vLLM\'s flag: \'{"method": "ngram", '
                             '"num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\'')
    parser.add_argument("--admission-reserve-tokens", type=int, default=DEFAULT_ADMISSION_RESERVE_TOKENS,
                        help="growth room admission keeps free for each running request (0: vLLM's admission)")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="automatic prefix caching (the engine's default; offline runs start with nothing "
                             "cached either way)")
    parser.add_argument("--num-loras", type=int, default=0,
                        help="LoRA: requests spread round-robin over this many random adapters (on every matrix; "
                             "all in device slots at once: max_loras); 0: none")
    parser.add_argument("--max-lora-rank", type=int, default=16, help="the random adapters' rank (--num-loras)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs (vLLM's flag): XLA's command buffers off for the steps and sampler")
    parser.add_argument("--compiler-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an XLA option for the step's compilation (repeatable; default: the engine's choice)")
    parser.add_argument("--seed", type=int, default=PROMPT_SEED, help="seed of the random prompts and weights")
    parser.add_argument("--output-json", default=None,
                        help="result file (default <results-dir>/<workload>-<device>-<date>.json)")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help=f"folder of default-named results ({RESULTS_DIR})")


def make_llm(args, *, max_model_len: int, max_num_seqs: Optional[int] = None, **overrides):
    """An ``LLM`` from the engine flags; ``overrides`` win (e.g. ``scheduling_mode``, ``trace``)."""
    from engine import LLM

    options = dict(
        load_format=args.load_format, dtype=args.dtype, block_size=args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=max_num_seqs if max_num_seqs is not None else args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len or max_model_len,
        tensor_parallel_size=args.tensor_parallel_size,
        num_gpu_blocks_override=args.num_gpu_blocks_override, seed=args.seed, skip_tokenizer_init=True,
        quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, linear_backend=args.linear_backend,
        kv_write_backend=args.kv_write_backend,
        async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
        precompile_steps={"auto": None, "on": True, "off": False}[args.precompile_steps],
        fuse_projections={"auto": None, "on": True, "off": False}[args.fuse_projections],
        compiler_options=compiler_options(args.compiler_option) if args.compiler_option else None,
        num_scheduler_steps=args.num_scheduler_steps, enable_prefix_caching=args.enable_prefix_caching,
        speculative_config=args.speculative_config, enforce_eager=args.enforce_eager,
        admission_reserve_tokens=args.admission_reserve_tokens,
    )
    if args.num_loras:
        options.update(enable_lora=True, max_loras=args.num_loras, max_lora_rank=args.max_lora_rank)
    options.update(overrides)
    # The engine's start-up line (weights, KV pool, activations) goes to the run's log.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    start = time.perf_counter()
    llm = LLM(args.model, **options)
    print(f"LLM(...) ready in {time.perf_counter() - start:.1f} s", flush=True)
    return llm


def lora_requests(args, llm) -> Optional[list]:
    """``--num-loras`` random adapters of rank ``--max-lora-rank`` on every matrix of ``llm``'s model, written to a
    temporary folder, as ``LoRARequest``s (None without ``--num-loras``)."""
    if not args.num_loras:
        return None
    import tempfile

    from engine import LoRARequest
    from models.lora import write_random_adapter

    root = tempfile.mkdtemp(prefix="bench-lora-")
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return [LoRARequest(f"lora{i}", i, write_random_adapter(os.path.join(root, str(i)), llm.llm_engine.model_config,
                                                            modules, r=args.max_lora_rank, seed=i))
            for i in range(1, args.num_loras + 1)]


def compiler_options(pairs: Sequence[str]) -> dict:
    """``["xla_gpu_autotune_level=0", ...]`` -> ``{"xla_gpu_autotune_level": 0}`` (ints, bools, else strings)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--compiler-option wants KEY=VALUE, got {pair!r}")
        lowered = value.lower()
        options[key] = (lowered == "true" if lowered in ("true", "false")
                        else int(value) if value.lstrip("-").isdigit() else value)
    return options


def model_name(model: Optional[str]) -> str:
    """The name results use: the checkpoint folder's name (``llama-3.1-8b``), or the default model's."""
    if model is None:
        return "smollm2-135m"
    return os.path.basename(os.path.normpath(model)).removesuffix(".gguf")


def random_prompts(num_requests: int, input_len: int, vocab_size: int, seed: int = PROMPT_SEED) -> list[list[int]]:
    """Prompt token ids drawn uniformly from the vocabulary with a fixed seed (the same for us and peers)."""
    import numpy as np

    if num_requests < 1 or input_len < 1:
        raise ValueError(f"need at least one request of at least one token, got {num_requests} x {input_len}")
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(num_requests, input_len)).tolist()


def sample_lengths(num: int, mean: int, range_ratio: float, rng) -> list[int]:
    """Lengths drawn uniformly from ``[mean * (1 - r), mean * (1 + r)]`` (at least 1)."""
    low, high = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=num).tolist()


def make_requests(num: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int,
                  seed: int, shared_prefix_len: int = 0) -> list[tuple[list[int], int]]:
    """``(prompt token ids, max_tokens)`` per request, from a fixed seed; ``shared_prefix_len``: every prompt
    starts with the same that many tokens (a system prompt), then its own (as many as its length says)."""
    import numpy as np

    if not 0 <= range_ratio < 1:
        raise ValueError(f"--range-ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)
    inputs = sample_lengths(num, input_len, range_ratio, rng)
    outputs = sample_lengths(num, output_len, range_ratio, rng)
    shared = rng.integers(0, vocab_size, size=shared_prefix_len).tolist()
    return [(shared + rng.integers(0, vocab_size, size=n).tolist(), m) for n, m in zip(inputs, outputs)]


def read_vocab_size(model: Optional[str]) -> int:
    from models.loader import resolve_model_path

    path = resolve_model_path(model)
    if path.endswith(".gguf"):
        from models.gguf_loader import open_gguf, read_gguf_config

        return read_gguf_config(open_gguf(path)).vocab_size
    with open(os.path.join(path, "config.json")) as f:
        return int(json.load(f)["vocab_size"])


# --------------------------------------------------------------------------------------
# Result JSON
# --------------------------------------------------------------------------------------


def git_commit() -> str:
    """HEAD of the repository (``BENCH_COMMIT`` overrides it where the copy has no .git), "+dirty" if
    tracked files differ from it."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        head = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, cwd=REPO_ROOT,
                                       stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO_ROOT,
                               stderr=subprocess.DEVNULL).returncode != 0
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    """The accelerator as it names itself (``NVIDIA H100 80GB HBM3``), or ``cpu``."""
    import jax

    return jax.devices()[0].device_kind


def result_header(workload: str, model: Optional[str], dtype: str, *, tensor_parallel_size: int = 1,
                  quantization: Optional[str] = None, kv_cache_dtype: str = "auto",
                  linear_backend: str = "auto", async_scheduling: str = "auto") -> dict:
    """The fields every result carries (PROTOCOL.md, "JSON fields")."""
    import jax
    import numpy as np

    from models.loader import resolve_dtype

    return dict(
        workload=workload, model=model_name(model), device=device_name(), jax_version=jax.__version__,
        commit=git_commit(), command=" ".join(["python"] + sys.argv), dtype=np.dtype(resolve_dtype(dtype)).name,
        quantization=quantization, kv_cache_dtype=kv_cache_dtype, linear_backend=linear_backend,
        async_scheduling=async_scheduling,
        tensor_parallel_size=tensor_parallel_size, date=datetime.date.today().isoformat(),
        backend=jax.default_backend(),
    )


def engine_result_header(workload: str, args) -> dict:
    """``result_header`` from the engine flags of ``add_engine_flags``."""
    header = result_header(workload, args.model, args.dtype, tensor_parallel_size=args.tensor_parallel_size,
                           quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                           linear_backend=args.linear_backend, async_scheduling=args.async_scheduling)
    if args.compiler_option:
        header["compiler_options"] = compiler_options(args.compiler_option)
    if args.num_scheduler_steps != 1:
        header["num_scheduler_steps"] = args.num_scheduler_steps
    if not args.enable_prefix_caching:
        header["enable_prefix_caching"] = False
    if args.admission_reserve_tokens != DEFAULT_ADMISSION_RESERVE_TOKENS:
        header["admission_reserve_tokens"] = args.admission_reserve_tokens
    if args.speculative_config:
        header["speculative_config"] = args.speculative_config
    if args.num_loras:
        header.update(num_loras=args.num_loras, max_lora_rank=args.max_lora_rank)
    return header


def variant_tag(result: dict) -> str:
    """File-name tag of a non-default engine variant (``-int8``, ``-kvfp8``), so variants keep their files."""
    tag = f"-{result['quantization']}" if result.get("quantization") else ""
    if result.get("kv_cache_dtype", "auto") != "auto":
        tag += f"-kv{result['kv_cache_dtype']}"
    if result.get("linear_backend", "auto") != "auto":
        tag += f"-{result['linear_backend']}"
    if result.get("async_scheduling", "auto") != "auto":
        tag += f"-async-{result['async_scheduling']}"
    if result.get("num_scheduler_steps", 1) != 1:
        tag += f"-ms{result['num_scheduler_steps']}"
    if result.get("shared_prefix_len"):
        tag += f"-prefix{result['shared_prefix_len']}"
    if result.get("enable_prefix_caching") is False:
        tag += "-nocache"
    if result.get("admission_reserve_tokens", DEFAULT_ADMISSION_RESERVE_TOKENS) != DEFAULT_ADMISSION_RESERVE_TOKENS:
        tag += f"-reserve{result['admission_reserve_tokens']}"
    speculative = result.get("speculative_config")
    if speculative:
        tag += f"-{speculative.get('method', 'ngram')}{speculative['num_speculative_tokens']}"
    if result.get("num_loras"):
        tag += f"-lora{result['num_loras']}r{result['max_lora_rank']}"
    if result.get("compiler_options"):
        tag += "-xla-" + "-".join(f"{k.removeprefix('xla_gpu_')}{v}" for k, v in result["compiler_options"].items())
    return tag


def result_path(workload: str, device: str, date: str, out_dir: str = RESULTS_DIR, tag: str = "") -> str:
    return os.path.join(out_dir, f"{workload}{tag}-{device.replace(' ', '-')}-{date}.json")


def write_results(results: dict | list[dict], path: Optional[str] = None, results_dir: str = RESULTS_DIR) -> str:
    """Write one result (or a list) as JSON; the default path comes from the (first) result."""
    first = results[0] if isinstance(results, list) else results
    path = path or result_path(first["workload"], first["device"], first["date"], results_dir, variant_tag(first))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=float)
        f.write("\n")
    return path


def peer_ratios(ours: dict, peer: dict, fields: Iterable[str]) -> dict:
    """field -> how many times better we are (ours / peer; peer / ours where lower is better)."""
    ratios = {}
    for field in fields:
        a, b = ours.get(field), peer.get(field)
        if a and b:
            ratios[field] = (b / a) if field in LOWER_IS_BETTER else (a / b)
    return ratios


def print_table(rows: Sequence[dict], columns: Sequence[str], title: str = "") -> None:
    """A plain fixed-width table on stdout (floats to 3 significant figures)."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
        return "-" if value is None else str(value)

    table = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in table]) for i, c in enumerate(columns)]
    if title:
        print(title)
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    sys.stdout.flush()


# --------------------------------------------------------------------------------------
# Device measurements and timing
# --------------------------------------------------------------------------------------


def _median_seconds(fn, *args, repeats: int, calls: int = 10) -> float:
    """The median time of one call of ``fn``, each sample ``calls`` back-to-back calls under one wait: a wait for
    every call (as before 2026-12-07) timed its launch and the host's sync with it, and read the H100's bandwidth
    as 2.2-2.5 TB/s where ``bench_kernels.py`` (10 calls a wait) reads 3.0."""
    import statistics

    import jax

    jax.block_until_ready(fn(*args))  # compile and warm up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def measure_copy_bandwidth(num_bytes: int, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s from an elementwise pass over ``num_bytes`` of bf16
    (``x * 2``: read once, written once, both counted). The buffers are freed on return."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (num_bytes // 2,), jnp.bfloat16)
    seconds = _median_seconds(jax.jit(lambda a: a * 2), x, repeats=repeats)
    del x
    return 2 * num_bytes / seconds


def measure_read_bandwidth(num_bytes: int, repeats: int = 10) -> float:
    """Device memory read bandwidth in bytes/s: a sum over ``num_bytes`` of bf16 (read once, a
    scalar written), the access pattern of streaming weights or K/V pages."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (num_bytes // 2,), jnp.bfloat16)
    seconds = _median_seconds(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), x, repeats=repeats)
    del x
    return num_bytes / seconds


# Dense bf16 tensor-core peaks (NVIDIA's data sheets, without sparsity), the conventional MFU denominator, by the
# start of JAX's device kind: the SXM H100 (80GB HBM3) and the H200; the PCIe and NVL H100 are slower parts.
PUBLISHED_BF16_PEAK_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 SXM": 989.0, "NVIDIA H200": 989.0,
                              "NVIDIA H100 NVL": 835.0, "NVIDIA H100 PCIe": 756.0}


def published_bf16_peak_flops(device: str) -> Optional[float]:
    """The data-sheet bf16 peak of a device kind (e.g. "NVIDIA H100 80GB HBM3"), None where not listed."""
    return next((tflops * 1e12 for name, tflops in PUBLISHED_BF16_PEAK_TFLOPS.items() if device.startswith(name)),
                None)


def measure_matmul_flops(m: int, dtype: str = "bfloat16", repeats: int = 10, *, k: Optional[int] = None,
                         n: Optional[int] = None) -> float:
    """FLOP/s of an ``m x k @ k x n`` matmul in ``dtype`` (square ``m`` by default: the practical
    peak for MFU)."""
    import jax
    import jax.numpy as jnp

    k, n = k or m, n or m
    a = jax.random.normal(jax.random.key(1), (m, k), dtype)
    b = jax.random.normal(jax.random.key(2), (k, n), dtype)
    seconds = _median_seconds(jax.jit(jnp.dot), a, b, repeats=repeats)
    return 2 * m * k * n / seconds


@dataclasses.dataclass
class OfflineRun:
    """One ``LLM.generate`` of a whole workload, timed with compilation taken out."""

    outputs: list
    submit_s: float  # perf_counter just before generate()
    wall_s: float
    compile_s: float
    trace: object  # engine.trace.StepTrace, or None when the engine does not trace
    compiles: CompileTimer

    @property
    def seconds(self) -> float:
        seconds = self.wall_s - self.compile_s
        if seconds <= 0:
            raise RuntimeError(f"the run took {self.wall_s:.3f} s of which {self.compile_s:.3f} s were compilation: "
                               "too short to time; give it more work")
        return seconds

    def step_seconds(self, record) -> float:
        """A traced step's duration without the compilation it triggered."""
        return record.duration_s - self.compiles.seconds_within(record.start_s, record.end_s)


def run_offline(llm, prompts: list[list[int]], params, loras: Optional[list] = None) -> OfflineRun:
    """Submit every prompt at once and wait for all; checks each request made exactly its max_tokens. Starts with
    nothing in the prefix cache: a warm-up's prompts (often the timed run's own) are computed again, as a peer's.
    ``loras``: LoRA adapters the prompts take in turn (``lora_requests``)."""
    llm.reset_prefix_cache()
    traced = llm.llm_engine.tracer is not None
    if traced:
        llm.get_trace(reset=True)
    with CompileTimer() as compiles:
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False,
                               lora_request=[loras[i % len(loras)] for i in range(len(prompts))] if loras else None)
        wall = time.perf_counter() - start
    params_list = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
    for out, p in zip(outputs, params_list):
        if len(out.outputs[0].token_ids) != p.max_tokens:
            raise RuntimeError(f"request {out.request_id} made {len(out.outputs[0].token_ids)} tokens, "
                               f"expected {p.max_tokens} (ignore_eos should guarantee it)")
    return OfflineRun(outputs=outputs, submit_s=start, wall_s=wall, compile_s=compiles.seconds,
                      trace=llm.get_trace(reset=True) if traced else None, compiles=compiles)


# --------------------------------------------------------------------------------------
# Model size and FLOPs
# --------------------------------------------------------------------------------------


def weight_bytes(params, config) -> tuple[int, int]:
    """``(all weight bytes, bytes a decode step reads)``: a step gathers one row of the embedding
    table rather than reading it, so that table is left out of the second unless it is the LM head
    (tied, with no head of its own: an int8 head is one, ``models.quantization.quantize_lm_head``).
    A mixture of experts' one-token step reads only its ``k`` of the ``E`` experts."""
    import jax

    total = sum(x.nbytes for x in jax.tree.leaves(params))
    read = total - params["embed"].nbytes if "lm_head" in params else total
    layers = params["layers"] if isinstance(params["layers"], (list, tuple)) else [params["layers"]]
    experts = sum(x.nbytes for layer in layers for name, w in layer.items() if name.startswith("expert_")
                  for x in jax.tree.leaves(w))
    return int(total), int(read - experts * (1 - active_expert_share(config)))


def active_expert_share(config) -> float:
    """The share of a mixture of experts' expert weights one token multiplies (``k / E``; 1 for a dense model)."""
    return config.num_experts_per_tok / config.num_experts if config.is_moe else 1.0


def step_flops(config, scheduled) -> int:
    """Useful FLOPs of a step's chunks (``engine.trace.ScheduledTokens``): 2 per layer weight per
    token, the LM head on the sequences that sample, and causal attention (QK^T and PV)."""
    tokens = sum(s.num_tokens for s in scheduled)
    sampled = sum(1 for s in scheduled if s.samples)
    pairs = sum(s.num_tokens * s.start + s.num_tokens * (s.num_tokens + 1) // 2 for s in scheduled)
    return model_flops(config, tokens=tokens, sampled=sampled, attention_pairs=pairs)


def model_flops(config, *, tokens: int, sampled: int, attention_pairs: int) -> int:
    """2 FLOPs per layer weight per token (per active weight: a mixture's ``k`` experts), the LM head per sampled
    token, causal attention over
    ``attention_pairs`` (query, key) pairs (QK^T and PV)."""
    import numpy as np

    from models.llama import param_shapes

    # From the config's shapes, not the arrays: a quantized weight's arrays hold packed values and scales. A token
    # multiplies only its share of a mixture's experts.
    layer_params = sum(int(np.prod(shape)) * (active_expert_share(config) if name.startswith("expert_") else 1)
                       for name, shape in param_shapes(config)["layers"].items())
    head_params = config.hidden_size * config.vocab_size
    attention = 4 * config.head_dim * config.num_heads * config.num_layers * attention_pairs
    return int(2 * layer_params * tokens) + 2 * head_params * sampled + attention


def workload_decode_kv_bytes(config, num_requests: int, input_len: int, output_len: int, kv_dtype) -> int:
    """K/V bytes the workload's decode steps read: each fed output token attends over its whole
    context, every layer's K and V (prompt steps, compute-bound, are counted in FLOPs only)."""
    from models.batch import kv_cache_bytes_per_block

    per_token = kv_cache_bytes_per_block(config, 1, kv_dtype)
    contexts = sum(input_len + j for j in range(1, output_len))
    return num_requests * per_token * contexts


def workload_flops(config, num_requests: int, input_len: int, output_len: int) -> int:
    """Useful FLOPs of a whole offline workload: every request's prompt and all but its last output
    token run through the model once (the last is sampled, never fed back), ``output_len`` samples."""
    tokens = input_len + output_len - 1
    return num_requests * model_flops(config, tokens=tokens, sampled=output_len,
                                      attention_pairs=tokens * (tokens + 1) // 2)


# --------------------------------------------------------------------------------------
# The Hugging Face peer, in a child process
# --------------------------------------------------------------------------------------


def run_hf_peer(model: str, workloads: Sequence[str], *, dtype: str, seed: int, sizes: dict[str, tuple],
                timeout_s: Optional[float] = None) -> dict[str, dict]:
    """Time ``transformers`` ``generate()`` on the same device, in a child process.

    Run it before this process touches the GPU: JAX reserves most of the device's
    memory at start-up, and the child frees all of its own when it exits.
    ``sizes``: workload -> (requests, input, output, batch). Returns workload -> figures
    (an ``error`` entry where the peer failed).
    """
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peer.json")
        command = [sys.executable, os.path.join(REPO_ROOT, "scripts", "bench_hf_peer.py"), "--model", model,
                   "--dtype", dtype, "--seed", str(seed), "--json-out", out]
        for workload in workloads:
            n, i, o, b = sizes[workload]
            command += ["--run", f"{workload}:{n}:{i}:{o}:{b}"]
        print("peer:", " ".join(command[1:]), flush=True)
        proc = subprocess.run(command, timeout=timeout_s)
        if proc.returncode != 0 or not os.path.exists(out):
            return {w: {"error": f"peer exited with status {proc.returncode}"} for w in workloads}
        with open(out) as f:
            return json.load(f)
