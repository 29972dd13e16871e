"""Model runner: turns a scheduled step into padded device arrays and runs the jitted step.

Owns the device state (params, paged KV cache) and a step's jitted programs: a tiny one staging
the step's host inputs (packed into one array, one copy) into the device buffers the last step of
that shape read, the model step ``(params, kv_cache, model_input, ...) -> (logits, kv_cache)``
with the cache donated, then the sampler ``(logits, sampling, previous tokens) -> (tokens,
logprobs, ...)``, its metadata's arrays packed into one host-to-device copy too. Every buffer a
small step touches keeps its address from step to step, so XLA replays the step's CUDA graphs
instead of re-recording them. Shapes are padded to power-of-two
buckets so the step compiles a bounded number of times (all of them at start-up with
``precompile``). Knows nothing of stop conditions or text.

Tensor parallelism: given a ``mesh``, the runner lays the params and cache out by
``sharding.rules`` (kv heads repeated where ``tp > num_kv_heads``), runs attention and
KV writes per device under ``shard_map`` (``sharding.attention``), and lets GSPMD
partition the rest of the step from those shardings. Step inputs are replicated.
With several processes (multi-host), process 0 broadcasts every step's inputs and
the others run ``follow()`` (see ``sharding.distributed``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from engine.cache_dir import cache_dir
from engine.compile_ahead import compile_ahead, compile_workers
from engine.engine_args import EAGER_COMPILER_OPTIONS
from engine.multi_step import burst_output_shapes, decode_burst
from engine.sampler import SamplerOutput, SamplingMetadata, build_sampling_metadata, sample, with_logprobs
from engine.sampling_params import SamplingParams
from models.batch import KVCache, ModelInput, make_kv_cache
from models.config import ModelConfig
from models.llama import forward, layout_layers, lm_head_logits
from models.lora import empty_lora_params, set_slot, zero_adapter
from models.moe import expert_mlp
from models.quantization import Fp8Weight, LinearBackend
from pallas_kernels import get_attention_fns, get_rope_write_kv_fn
from pallas_kernels.ragged_paged_attention import token_sequence_ids
from sharding import TensorParallelPlan, check_expert_weights, replicated, shard_attention_fns, shard_expert_fn
from sharding.distributed import broadcast_from_leader, is_leader

logger = logging.getLogger(__name__)


# Smallest bucket of each padded dimension: tokens T, sequences S, block-table width B.
MIN_TOKEN_BUCKET, MIN_SEQ_BUCKET, MIN_BLOCK_BUCKET = 16, 8, 4


# Above this many token rows, up to the step's sequence cap, buckets come every quarter of an octave (``token_bucket``).
FINE_BUCKETS_ABOVE = 256


def token_bucket(num_tokens: int, max_num_tokens: int, max_num_seqs: int = 0) -> int:
    """Padded token rows T of a step: one token runs unpadded (a decode at batch 1, where every
    matmul is then a matrix-vector product: XLA's GEMV, the int4 kernel's GEMV form), more are
    padded to a power of two of at least ``MIN_TOKEN_BUCKET``. Between ``FINE_BUCKETS_ABOVE`` and
    ``max_num_seqs`` rows, where decode steps of large batches land (a row a sequence) and a row
    costs a row's matmuls, to the next quarter of the octave instead (320, 384, 448, 512, 640, ...):
    powers of two alone padded tput-long's decode steps of 257-384 sequences to 512 rows, 15% of
    all its rows (scripts/bench_padding.py)."""
    if num_tokens == 1:
        return 1
    size = bucket(num_tokens, MIN_TOKEN_BUCKET, max_num_tokens)
    if FINE_BUCKETS_ABOVE < num_tokens <= max_num_seqs:
        quarter = (1 << (num_tokens - 1).bit_length()) // 8  # the octave (2^k / 2, 2^k] in four steps
        size = min(size, -(-num_tokens // quarter) * quarter)
    return size


def token_buckets(max_num_tokens: int, max_num_seqs: int = 0) -> list[int]:
    """Every padded token-row count a step can have (``token_bucket``), smallest first."""
    sizes, n = {1}, MIN_TOKEN_BUCKET
    while n < max_num_tokens:
        sizes.add(token_bucket(n, max_num_tokens, max_num_seqs))
        n *= 2
    sizes.update(token_bucket(n, max_num_tokens, max_num_seqs)
                 for n in range(FINE_BUCKETS_ABOVE + 1, min(max_num_seqs, max_num_tokens) + 1))
    sizes.add(token_bucket(max_num_tokens, max_num_tokens, max_num_seqs))
    return sorted(sizes)


# With a fixed block-table width every step of a token bucket is one program, so all of them can
# be compiled at start-up (ModelRunner.precompile). Used while the largest step's table stays
# small to build and send every step: at most this many int32 entries (8 MiB), e.g. 1024
# sequences of up to 32k tokens in blocks of 16; longer contexts keep a power-of-two width.
MAX_FIXED_TABLE_ENTRIES = 1 << 21


def seq_bucket(num_tokens: int, max_num_tokens: int, max_num_seqs: int) -> int:
    """Padded sequence slots S of a step of ``num_tokens`` tokens: its padded token rows T (at
    least ``MIN_SEQ_BUCKET``, at most ``max_num_seqs``). A step has no more sequences than tokens,
    so S follows T and a step's shape is set by its token count and block-table width alone:
    chunked prefill mixes prompt chunks with ever other numbers of decodes, and bucketing S on its
    own gave those steps a shape each (throughput workloads: 8-16 shapes -> 7-10, see
    scripts/bench_padding.py). Padded slots cost an LM-head row each (0.2% of a prompt step)."""
    return min(max(token_bucket(num_tokens, max_num_tokens, max_num_seqs), MIN_SEQ_BUCKET), max_num_seqs)


# XLA options of the fp8 step on GPU, by step size (default_compiler_options).
FP8_SMALL_STEP_OPTIONS = {"xla_gpu_autotune_level": 1}
FP8_LARGE_STEP_OPTIONS = {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False}


def has_fp8_weights(params) -> bool:
    return any(isinstance(leaf, Fp8Weight)
               for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, Fp8Weight)))


def default_compiler_options(num_tokens: int, *, fp8: bool) -> dict:
    """XLA options for a step of ``num_tokens`` token rows when the user gives none: XLA's
    defaults, except for fp8 weights on GPU (benchmarks/NOTES.md, H200). There XLA's default
    autotuning (level 4) spent 13-20 s on each fp8 matmul shape at 4096 rows and the engine never
    started; level 1 (no correctness checks) 2-3.6 s a shape, still > 30 s a step shape (run 11);
    no autotuning with Triton's GEMMs left every matmul on an untuned kernel (run 9). Steps of
    more than ``MIN_TOKEN_BUCKET`` rows: no autotuning and no Triton GEMMs, i.e. cuBLASLt's own
    heuristic choice (run 12: fp8 at 1,048-1,055 TFLOP/s at 4096 rows, 1.1-1.4 s to compile;
    tput-short 1.28x bf16). Smaller steps: level 1, whose Triton fp8 GEMV streams at 1 row
    (45 us for w_gate_up) where cuBLAS's heuristic kernel takes twice bf16's time.
    ``fp8``: whether the step's params hold fp8 weights (``has_fp8_weights``)."""
    if jax.default_backend() != "gpu" or not fp8:
        return {}
    return dict(FP8_SMALL_STEP_OPTIONS if num_tokens <= MIN_TOKEN_BUCKET else FP8_LARGE_STEP_OPTIONS)


def sizing_key(*parts) -> str:
    """A digest of what fixes a compiled program's memory: the traced programs' text (``jax.stages.Traced``
    among ``parts``: their jaxprs, kernels included), the avals and shardings of the arrays in ``parts``,
    the XLA options, the JAX and jaxlib versions, the devices and ``$XLA_FLAGS``."""
    import hashlib

    import jaxlib

    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, jax.stages.Traced):
            part = part.jaxpr
        else:
            part = jax.tree.map(lambda a: (getattr(a, "shape", a), getattr(a, "dtype", None),
                                           getattr(a, "sharding", None)), part)
        digest.update(str(part).encode())
    devices = [(d.platform, d.device_kind) for d in jax.devices()]
    digest.update(str((jax.__version__, jaxlib.__version__, devices, os.environ.get("XLA_FLAGS"))).encode())
    return digest.hexdigest()[:32]


# Programs that compile faster than this are not kept (JAX's default is 1 s): the engine's sub-second programs (the
# samplers, the weights' layout) were remade on every warm start, 1.6 s of run 19c's; a load takes ~10-30 ms.
MIN_CACHED_COMPILE_SECONDS = 0.25


def enable_compilation_cache() -> None:
    """Turn on JAX's persistent compilation cache (``$PAGEDJAX_CACHE_DIR/jax``, default
    ``~/.cache/pagedjax/jax``) so a restart reuses compiled steps; a cache the user set wins."""
    if jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", cache_dir("jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_CACHED_COMPILE_SECONDS)


def bucket(n: int, minimum: int, maximum: Optional[int] = None) -> int:
    """Smallest power of two >= max(n, minimum), capped at ``maximum`` (if that still fits n)."""
    size = max(minimum, 1 << max(0, int(n) - 1).bit_length())
    if maximum is not None and n <= maximum:
        size = min(size, maximum)
    return size


# A sampled token not yet on the host: the previous step, still on the device, samples it.
PENDING_TOKEN = -1

# Prompt logprobs: a step's scored rows go through the LM head this many at a time, so their logits never take more
# than this many rows of vocabulary at once (float32: 64 MiB for Llama 3's vocabulary).
PROMPT_SCORE_CHUNK = 128
SCORE_TOP_LOGPROBS = 5  # the most likely tokens a scored row reports when its step asks no logprobs of its own

# Steps of at most this many sequence slots write their logits into the buffer the last such step's logits took
# (donated), so that every buffer the step's CUDA graphs touch stays where it is (``ModelRunner._run_step``):
# small batches are where the host binds. Larger steps take new logits buffers and keep the memory free.
FIXED_LOGITS_MAX_SEQS = 64


@dataclasses.dataclass(slots=True)
class SequenceWork:
    """One sequence's share of a step, as the runner needs it."""

    token_ids: Sequence[int]  # the new tokens to run
    start: int  # absolute position of the first of them
    block_table: Sequence[int]
    sample: bool  # whether the step's token for this sequence is wanted
    # Asynchronous scheduling: the one token of this decode is PENDING_TOKEN, to be taken on the
    # device from row ``feed_row`` of the previous step's sampled tokens (-1: the token is known).
    feed_row: int = -1
    decode_steps: int = 1  # multi-step decoding: a decode run this many steps in one dispatch (engine.multi_step)
    # Prompt logprobs: for each of ``token_ids``, the token whose logprob its row's logits give (the prompt's next
    # token), or -1 for none; None: no row of this work is scored.
    score_targets: Optional[Sequence[int]] = None
    # Speculative decoding: the last this many of ``token_ids`` are drafts; each of the last ``num_drafts + 1``
    # rows is sampled (the sampler's rows: the works' in order, a work's rows consecutive).
    num_drafts: int = 0
    lora_slot: int = 0  # the LoRA adapter's device slot (models.lora; 0: none)


@dataclasses.dataclass
class PendingStep:
    """A dispatched step whose sampled tokens are still on the device (``ModelRunner.fetch``)."""

    result: SamplerOutput
    num_seqs: int  # the sampler's real rows: a work's (and its drafts', speculative decoding)
    burst: bool = False  # a multi-step decode's: every array has the steps first, ``[num_steps, S, ...]``
    # Prompt logprobs: the scored rows' logprobs (``SamplerOutput`` of the targets, one row each) and, for each
    # work with ``score_targets``, its index and its first scored row there.
    scores: Optional[SamplerOutput] = None
    score_offsets: Optional[dict[int, int]] = None


@dataclasses.dataclass
class PendingPool:
    """A dispatched pooling step (``ModelRunner.dispatch_pool``): its ``(last, first, sums)`` rows on the device, and
    every token's row (``every_row``, fetched only for a per-token task's chunks)."""

    rows: tuple
    every_row: jax.Array
    num_seqs: int


def build_model_input(work: Sequence[SequenceWork], *, block_size: int, max_num_tokens: int, max_num_seqs: int,
                      max_blocks_per_seq: int, table_width: Optional[int] = None, lora: bool = False) -> ModelInput:
    """Flat step input (DESIGN.md step 2) as numpy arrays, padded to the buckets.

    Vectorized over the sequences (whole-array numpy ops, no per-sequence slicing): the
    engine calls this on the host every step, for up to ``max_num_seqs`` sequences.
    ``block_table``s may be lists or int32 arrays (``BlockManager.block_table_array``).
    ``table_width``: the block tables' width B (None: the longest table's, bucketed). ``lora``: give each row its
    work's ``lora_slot`` (``ModelInput.lora_slots``).
    """
    bs = block_size
    n = len(work)
    query_lens = np.fromiter((len(w.token_ids) for w in work), np.int32, n)
    starts = np.fromiter((w.start for w in work), np.int32, n)
    table_lens = np.fromiter((len(w.block_table) for w in work), np.int32, n)
    num_tokens = int(query_lens.sum())
    T = token_bucket(num_tokens, max_num_tokens, max_num_seqs)
    S = seq_bucket(num_tokens, max_num_tokens, max_num_seqs)
    B = table_width or bucket(int(table_lens.max()), MIN_BLOCK_BUCKET, max_blocks_per_seq)

    tables = np.zeros((S, B), np.int32)
    # Row i gets its table's entries in its first table_lens[i] columns (a boolean mask fills row-major).
    tables[:n][np.arange(B) < table_lens[:, None]] = np.concatenate(
        [np.asarray(w.block_table, np.int32) for w in work])
    cu = np.zeros(S + 1, np.int32)
    np.cumsum(query_lens, out=cu[1 : n + 1])
    cu[n + 1 :] = num_tokens
    kv_lens = np.zeros(S, np.int32)
    kv_lens[:n] = starts + query_lens
    logits_indices = np.zeros(S, np.int32)
    drafts = np.fromiter((w.num_drafts for w in work), np.int32, n)
    if not drafts.any():
        logits_indices[:n] = cu[1 : n + 1] - 1
    else:  # a work's last num_drafts + 1 rows, in order
        rows = drafts + 1
        first = np.repeat(cu[1 : n + 1] - rows, rows)
        within = np.arange(int(rows.sum()), dtype=np.int32) - np.repeat(np.cumsum(rows) - rows, rows)
        if first.size > S:
            raise ValueError(f"{first.size} sampled rows (sequences and drafts) exceed the step's {S} slots")
        logits_indices[: first.size] = first + within

    token_ids = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    slots = np.zeros(T, np.int32)  # padding writes into page 0, the sink
    token_ids[:num_tokens] = np.fromiter(itertools.chain.from_iterable(w.token_ids for w in work), np.int32,
                                         num_tokens)
    seq_of_token = np.repeat(np.arange(n), query_lens)
    pos = starts[seq_of_token] + (np.arange(num_tokens, dtype=np.int32) - cu[seq_of_token])
    positions[:num_tokens] = pos
    slots[:num_tokens] = tables[seq_of_token, pos // bs] * bs + pos % bs
    lora_slots = None
    if lora:
        lora_slots = np.zeros(T, np.int32)
        lora_slots[:num_tokens] = np.fromiter((w.lora_slot for w in work), np.int32, n)[seq_of_token]
    return ModelInput(
        token_ids=token_ids, positions=positions, slot_mapping=slots, cu_q_lens=cu,
        kv_lens=kv_lens, block_tables=tables, num_seqs=np.asarray([n], np.int32),
        logits_indices=logits_indices, lora_slots=lora_slots,
    )


def score_rows(work: Sequence[SequenceWork], cu_q_lens) -> Optional[tuple[np.ndarray, np.ndarray, dict[int, int]]]:
    """The token rows a step scores (prompt logprobs) and each one's target token, padded to a whole number of
    ``PROMPT_SCORE_CHUNK`` rows, and each scored work's first row among them; None when no work scores.
    A work's rows are all its tokens' (those without a target score token 0, and are not read)."""
    scored = [(i, w) for i, w in enumerate(work) if w.score_targets is not None]
    if not scored:
        return None
    cu = np.asarray(cu_q_lens)
    rows, targets, offsets = [], [], {}
    for i, w in scored:
        offsets[i] = len(rows)
        rows.extend(range(int(cu[i]), int(cu[i]) + len(w.token_ids)))
        targets.extend(max(t, 0) for t in w.score_targets)
    num_chunks = -(-len(rows) // PROMPT_SCORE_CHUNK)
    padded = PROMPT_SCORE_CHUNK << (num_chunks - 1).bit_length()  # a power of two of chunks: few programs
    row_array = np.zeros(padded, np.int32)
    target_array = np.zeros(padded, np.int32)
    row_array[: len(rows)], target_array[: len(targets)] = rows, targets
    return row_array, target_array, offsets


def _shapes_of(leaves: list[np.ndarray]) -> tuple:
    """The key of a step's staged input buffers: its host inputs' shapes."""
    return tuple(leaf.shape for leaf in leaves)


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where each array of a pytree of 32-bit arrays lies in its flat int32 copy (``pack_arrays``): hashable, a
    jit's static argument."""

    treedef: Any
    shapes: tuple
    dtypes: tuple


def pack_arrays(tree) -> tuple[np.ndarray, PackedLayout]:
    """A pytree of 32-bit numpy arrays as one flat int32 array (float32 and uint32 by their bits), and its layout:
    one host-to-device copy instead of one an array (the sampler's metadata: 12 arrays a step)."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [np.asarray(leaf) for leaf in leaves]
    if any(a.dtype.itemsize != 4 for a in arrays):
        raise ValueError(f"pack_arrays takes 32-bit arrays, got {[str(a.dtype) for a in arrays]}")
    flat = np.concatenate([np.ravel(a).view(np.int32) for a in arrays]) if arrays else np.zeros(0, np.int32)
    return flat, PackedLayout(treedef, tuple(a.shape for a in arrays), tuple(a.dtype.str for a in arrays))


def _split_flat(flat: jax.Array, shapes: Sequence[tuple]) -> list[jax.Array]:
    """Consecutive pieces of ``flat`` in ``shapes`` (traced)."""
    offsets = np.cumsum([0] + [int(np.prod(shape)) for shape in shapes])
    return [flat[start:stop].reshape(shape) for shape, start, stop in zip(shapes, offsets[:-1], offsets[1:])]


def unpack_arrays(flat: jax.Array, layout: PackedLayout):
    """``pack_arrays``' inverse, traced: the pytree back, each array in its own dtype."""
    pieces = [piece if np.dtype(dtype) == np.int32 else jax.lax.bitcast_convert_type(piece, np.dtype(dtype))
              for piece, dtype in zip(_split_flat(flat, layout.shapes), layout.dtypes)]
    return jax.tree.unflatten(layout.treedef, pieces)


class ModelRunner:
    def __init__(
        self,
        config: ModelConfig,
        params,
        *,
        num_blocks: Optional[int] = None,
        block_size: int,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        kv_dtype,
        attention_backend: str = "auto",
        kv_write_backend: str = "auto",
        mesh: Optional[Mesh] = None,
        unroll_layers: Optional[bool] = None,
        linear_backend: str = "auto",
        fuse_projections: Optional[bool] = None,
        compiler_options: Optional[dict] = None,
        fixed_table_width: bool = False,
        num_scheduler_steps: int = 1,
        max_loras: int = 0,
        max_lora_rank: int = 16,
        eager: bool = False,
    ):
        """``unroll_layers``: unstack the layer weights and unroll the layer loop (None: on GPU only).
        ``mesh``: shard over its ``tp`` axis (params may arrive anywhere, ideally placed with
        ``TensorParallelPlan.load_shardings``); None runs on the default device.
        ``linear_backend``: see ``EngineArgs.linear_backend`` (a mesh always uses XLA's matmuls,
        which GSPMD partitions; a Pallas call it cannot). ``fuse_projections``: join q/k/v and
        gate/up into one matmul each (``models.llama.fuse_projections``; None: on one device, never
        over a mesh). ``num_blocks``: the KV pool; without it, call ``allocate_kv_cache`` (after
        ``activation_bytes``, to size the pool from what is left). ``compiler_options``: XLA options
        for the step (None: ``default_compiler_options``). ``fixed_table_width``: every step's block
        tables as wide as ``max_model_len`` needs, where that is cheap (``MAX_FIXED_TABLE_ENTRIES``;
        ``table_width`` says whether it is), so ``precompile`` can compile every step shape.
        ``num_scheduler_steps``: the decode steps of a multi-step dispatch (``engine.multi_step``; 1: none).
        ``max_loras``: device slots for that many LoRA adapters of rank up to ``max_lora_rank`` (``models.lora``;
        ``set_lora`` fills one; 0: no LoRA). ``eager``: vLLM's ``enforce_eager``, no CUDA graphs: the steps and the
        sampler compile with XLA's command buffers off (``EAGER_COMPILER_OPTIONS``, on GPU)."""
        enable_compilation_cache()
        self.config = config  # the checkpoint's; the step may run a kv-head-replicated copy
        self.mesh = mesh
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.num_scheduler_steps = num_scheduler_steps
        fits = max_num_seqs * self.max_blocks_per_seq <= MAX_FIXED_TABLE_ENTRIES
        self.table_width = self.max_blocks_per_seq if fixed_table_width and fits else None
        attention_fn, write_kv_fn = get_attention_fns(attention_backend, kv_write_backend)
        step_config, kv_sharding, self._input_sharding, self._logits_sharding = config, None, None, None
        qkv_shards = 1
        if mesh is not None:
            plan = TensorParallelPlan(config, mesh)
            params, step_config = plan.shard_params(params), plan.config
            check_expert_weights(params["layers"], mesh)
            kv_sharding = plan.kv_cache_sharding()
            attention_fn, write_kv_fn = shard_attention_fns(attention_fn, write_kv_fn, mesh)
            qkv_shards = plan.tp  # each device's slice of the qkv buffer its own [q | k | v] heads
            self._input_sharding = replicated(mesh)
            self._logits_sharding = plan.logits_sharding()
        if unroll_layers is None:  # see EngineArgs.unroll_layers
            unroll_layers = jax.default_backend() == "gpu"
        if fuse_projections is None:
            fuse_projections = mesh is None
        elif fuse_projections and mesh is not None:
            raise ValueError("fused projections run on one device; a mesh splits q/k/v and gate/up apart")
        self.lora, self.max_lora_rank = max_loras > 0, max_lora_rank
        # An adapter's k / v updates over a mesh that repeats the kv heads: repeated with them (set_lora).
        self._repeat_kv_heads = None if mesh is None or plan.kv_replicas == 1 else plan.repeat_kv_heads
        if self.lora:  # zeroed slots, beside the layer weights (replicated over a mesh; joined as q/k/v and gate/up)
            lora = jax.device_put(empty_lora_params(step_config, max_loras, max_lora_rank, params["embed"].dtype,
                                                    joined=fuse_projections), self._input_sharding)
            params = {**params, "layers": {**params["layers"], "lora": lora["lora"]},
                      "lora_columns": lora["lora_columns"]}
            self._set_lora = jax.jit(set_slot)
        self._plan = None if mesh is None else plan
        self._layout = dict(unroll=unroll_layers, fuse=fuse_projections)
        self.params = layout_layers(params, unroll=unroll_layers, fuse=fuse_projections, release=True)
        # What the compiled steps take: every weight's tree position, shape and dtype (``load_weights`` checks it).
        self._weights_signature = _signature(self.params)
        # Unrolled layers get one KV buffer per layer (models.batch.KVCache says why).
        self._make_kv_cache = functools.partial(make_kv_cache, step_config, block_size=block_size, dtype=kv_dtype,
                                                sharding=kv_sharding, per_layer=unroll_layers)
        linear = LinearBackend(kernel="xla" if mesh is not None else linear_backend)
        expert_fn = None  # a mixture of experts over a mesh: each device its slice of every expert, the kernel's
        if mesh is not None and config.is_moe:  # choice as on one device
            expert_fn = shard_expert_fn(functools.partial(
                expert_mlp, use_kernel=LinearBackend(kernel=linear_backend).use_grouped_kernel()), mesh)
        self._forward = functools.partial(forward, config=step_config, attention_fn=attention_fn,
                                          write_kv_fn=write_kv_fn, linear_backend=linear, qkv_shards=qkv_shards,
                                          rope_write_kv_fn=get_rope_write_kv_fn(write_kv_fn), expert_fn=expert_fn)
        self._lm_head = functools.partial(lm_head_logits, config=step_config, linear_backend=linear)
        self._multi_process = jax.process_count() > 1
        # The user's options hold for every step; the defaults depend on the step's size.
        self._options_given = compiler_options is not None
        self._eager_options = dict(EAGER_COMPILER_OPTIONS) if eager and jax.default_backend() == "gpu" else {}
        self._has_fp8 = has_fp8_weights(self.params)
        self.compiler_options = (dict(compiler_options) if self._options_given
                                 else self.step_compiler_options(max_num_batched_tokens))
        self.kv_cache = None
        self._asleep = None  # sleep mode: the weights in host memory and their shardings
        if num_blocks is not None:
            self.allocate_kv_cache(num_blocks)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Create the KV pool (zeroed pages) and the jitted model step and page copy that update it in
        place, and the jitted sampler."""
        self.kv_cache = self._make_kv_cache(num_blocks)
        self.num_kv_blocks = num_blocks
        # jit's out_shardings, only when sharded
        step_placement, sample_placement, copy_placement, stage_placement, burst_placement = {}, {}, {}, {}, {}
        score_placement = {}
        self._sampled = self._zero_sampled()  # the last step's tokens, fed to the next
        if self.mesh is not None:
            kv_placement = jax.tree.map(lambda a: a.sharding, self.kv_cache)
            step_placement = {"out_shardings": (self._logits_sharding, kv_placement)}
            sample_placement = {"out_shardings": (self._input_sharding, self._input_sharding)}  # tokens, output
            copy_placement = {"out_shardings": kv_placement}
            stage_placement = {"out_shardings": self._input_sharding}
            burst_placement = {"out_shardings": (self._input_sharding, self._input_sharding, kv_placement)}
            score_placement = {"out_shardings": (self._logits_sharding, kv_placement, self._input_sharding)}
        self._step_fns = {}  # XLA options -> the jitted model step compiled with them (step_compiler_options)
        # The step's logits buffer (when given) is donated and only its shape read: ``keep_unused`` keeps it (and
        # its donation), as in ``_stage_step_input``. The sampler writes its tokens over the donated previous ones.
        self._make_step = functools.partial(jax.jit, self._model_step, donate_argnums=(1, 5), keep_unused=True,
                                            **step_placement)
        self._stage = jax.jit(_stage_step_input, donate_argnums=(0,), keep_unused=True, **stage_placement)
        self._staged = {}  # the step inputs' shapes -> their device buffers (``_on_device``)
        self._logits_buffers = {}  # sequence slots -> the last step's logits, the next one's output buffer
        self._sample = jax.jit(self._sample_step, static_argnames=("layout", "num_logprobs"), donate_argnums=(2,),
                               compiler_options=self._eager_options or None,
                               **sample_placement)
        # Host seconds a step in each of dispatch()'s parts: its inputs (built, packed, copied and staged), the
        # model step's call and the sampler's (metadata packed and copied, the call): LLM.stats() reports them.
        self.dispatch_stats = {"dispatch_inputs_s": 0.0, "dispatch_model_s": 0.0, "dispatch_sampler_s": 0.0}
        self._copy = jax.jit(_copy_blocks, donate_argnums=(0,), **copy_placement)
        # Multi-step decoding: the burst program writes its tokens over the last such step's (donated) as the
        # model step its logits, and a copy of them goes to the host (``_dispatch_burst``).
        self._burst_fns = {}  # XLA options -> the jitted burst (burst_fn)
        self._make_burst = functools.partial(jax.jit, self._burst_step, donate_argnums=(1, 3, 4), keep_unused=True,
                                             static_argnames=("layout", "num_logprobs"), **burst_placement)
        self._burst_outputs = {}  # (sequence slots, num_logprobs) -> the last burst's outputs, the next one's buffer
        # Prompt logprobs: steps that score rows (rare: compiled at first use, a program a token bucket).
        self._score_fns = {}  # XLA options -> the jitted scoring step (score_fn)
        self._make_score = functools.partial(jax.jit, self._score_step, donate_argnums=(1,), keep_unused=True,
                                             static_argnames=("num_logprobs",), **score_placement)
        self._take = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), **stage_placement)
        # Pooling (embedding) steps: each sequence's last, first and summed hidden rows instead of logits.
        self._pool_fns = {}  # XLA options -> the jitted pooling step (pool_fn)
        pool_placement = {} if self.mesh is None else {
            "out_shardings": (self._input_sharding,) * 4 + (kv_placement,)}
        self._make_pool = functools.partial(jax.jit, self._pool_step, donate_argnums=(1,), **pool_placement)

    def _zero_sampled(self) -> jax.Array:
        """The last step's sampled tokens before any step: zeros, replicated over a mesh."""
        zeros = jnp.zeros(self.max_num_seqs, jnp.int32)
        return zeros if self.mesh is None else jax.device_put(zeros, self._input_sharding)

    def release(self) -> None:
        """Free the device memory this runner holds (weights, KV pages, step buffers) at once, not when Python
        collects it; the runner cannot step afterwards (its compiled programs stay, for inspection)."""
        buffers = ("_staged", "_logits_buffers", "_burst_outputs")
        owned = [self.params, self.kv_cache, getattr(self, "_sampled", None)]
        owned += [list(getattr(self, name, {}).values()) for name in buffers]
        delete_arrays(owned)
        self.params = self.kv_cache = self._sampled = None
        for name in buffers:
            setattr(self, name, {})

    def sleep(self) -> None:
        """vLLM's sleep mode (level 1): the weights copied to host memory, then the weights, KV pages and step
        buffers freed on the device; the compiled programs stay, so the steps after ``wake_up`` compile nothing. One
        process only (a cluster's other processes hold their own shards)."""
        if self._multi_process:
            raise ValueError("sleep mode runs in one process, not across a cluster")
        # Over a mesh each weight goes back to its sharding; on one device uncommitted, as it came (a committed
        # array would be another argument signature to the jitted steps: each would trace and lower again).
        shardings = None if self.mesh is None else jax.tree.map(lambda a: a.sharding, self.params)
        self._asleep = (jax.device_get(self.params), shardings)
        self.release()

    def wake_up(self, params=None) -> None:
        """Back from ``sleep``: the weights put back as they were placed (or ``params``, a new set as
        ``load_weights`` takes them: the only way back from ``discard_weights``), a zeroed KV pool of the same
        size."""
        host_params, shardings = self._asleep
        if params is not None:
            self.load_weights(params)
        elif host_params is None:
            raise ValueError("the weights were discarded (sleep level 2): wake up with new ones")
        else:
            self.params = jax.device_put(host_params, shardings)
        self.kv_cache = self._make_kv_cache(self.num_kv_blocks)
        self._sampled = self._zero_sampled()
        self._asleep = None

    def discard_weights(self, keep_kv_cache: bool = False) -> None:
        """vLLM's sleep level 2 (unless ``keep_kv_cache``): the weights freed on the device with no copy kept
        (and the KV pages and step buffers, as ``sleep``), until ``load_weights`` or ``wake_up(params)``. With
        ``keep_kv_cache`` (a weight update while awake) the LoRA adapters' slots stay, for ``load_weights``."""
        if self._multi_process:
            raise ValueError("the weights are discarded in one process, not across a cluster")
        if keep_kv_cache:
            base, self._kept_lora = _split_lora(self.params) if self.lora else (self.params, None)
            delete_arrays(base)
            self.params = None
            return
        if self.lora:
            raise ValueError("sleep level 2 would lose the LoRA adapters' slots with the weights: not with "
                             "enable_lora (level 1 keeps them)")
        self._asleep = (None, None)
        self.release()

    def load_weights(self, params) -> None:
        """New weights for the compiled steps: ``params`` as ``models.loader.load_model`` gives them (placed
        as the engine loads, ``param_shardings_for``), sharded and laid out as at start-up. Refused, and freed, when
        any weight's position, shape or dtype differs from what the steps were compiled for."""
        if self._plan is not None:
            params = self._plan.shard_params(params)
        params = layout_layers(params, **self._layout, release=True)
        if self.lora:  # the adapters' slots of the weights replaced (discard_weights kept them)
            params = _join_lora(params, self._kept_lora)
        mismatch = _first_difference(self._weights_signature, _signature(params))
        if mismatch:  # the new weights go (the kept LoRA slots stay, for the old weights' return)
            delete_arrays(_split_lora(params)[0] if self.lora else params)
            raise ValueError(f"the new weights do not fit the running model: {mismatch}")
        self.params = params

    @property
    def asleep(self) -> bool:
        return self._asleep is not None

    @property
    def weights_discarded(self) -> bool:
        """Asleep with no copy of the weights (``discard_weights``, ``drop_host_weights``)."""
        return self._asleep is not None and self._asleep[0] is None

    def drop_host_weights(self) -> None:
        """Asleep at level 1: forget the host copy of the weights (new ones come at ``wake_up``)."""
        if self.lora:
            raise ValueError("new weights while asleep would lose the LoRA adapters' slots: update them awake "
                             "with enable_lora")
        self._asleep = (None, None)

    def _abstract(self, shape, dtype=jnp.int32, sharding=None) -> jax.ShapeDtypeStruct:
        """A step input's shape, placed as the runner places that input (replicated over a mesh)."""
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding or self._input_sharding)

    @staticmethod
    def _uniform_sampling(params: SamplingParams, num_seqs: int) -> SamplingMetadata:
        """Host sampling metadata of ``num_seqs`` slots under one ``params`` (one real sequence, no
        history): the shapes and dtypes of that sampler variant."""
        return build_sampling_metadata([params], [[]], [[0]], [0], [0], num_seqs)

    def _abstract_sampling(self, params: SamplingParams, num_seqs: int) -> tuple[jax.ShapeDtypeStruct, PackedLayout]:
        """The sampler's packed metadata for ``num_seqs`` slots under ``params``: abstract array and its layout."""
        flat, layout = pack_arrays(self._uniform_sampling(params, num_seqs))
        return self._abstract(flat.shape), layout

    def _abstract_logits(self, num_seqs: int) -> jax.ShapeDtypeStruct:
        return self._abstract([num_seqs, self.config.vocab_size], jnp.float32, self._logits_sharding)

    def activation_bytes(self) -> int:
        """Device memory a step of the largest bucket (every token and sequence slot used) needs
        beyond the params and the cache: XLA's temporary bytes for the model step, compiled (not
        run) against a two-block cache (the pages are updated in place, so the pool's size does not
        change the temporaries), plus the logits it hands the sampler and the sampler's temporaries, and
        the small steps' logits buffers kept from step to step (``FIXED_LOGITS_MAX_SEQS``).
        The figure is kept on disk under ``sizing_key`` of the two traced programs, so a restart traces
        them but neither lowers nor compiles them (2.3 s of the 8B's 16.2 s warm start, run 18d)."""
        T, S = self.max_num_batched_tokens, self.max_num_seqs
        model_input, feed = jax.tree.map(lambda x: self._abstract(x.shape, x.dtype),
                                         self._empty_step_input(T, self.max_blocks_per_seq))
        cache = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                             self._make_kv_cache(2))
        sampled = self._abstract([self.max_num_seqs])
        step = jax.jit(self._model_step).trace(self.params, cache, model_input, sampled, feed, None)
        packed, layout = self._abstract_sampling(SamplingParams(), S)
        sampler = jax.jit(self._sample_step, static_argnames=("layout", "num_logprobs")).trace(
            self._abstract_logits(S), packed, sampled, layout=layout, num_logprobs=None)
        options = self.step_compiler_options(T) or None
        path = cache_dir("activation-bytes", sizing_key(step, sampler, options, self.params, cache) + ".json")
        if os.path.exists(path):
            with open(path) as f:
                return int(json.load(f)["activation_bytes"])
        step, sampler = step.lower().compile(compiler_options=options), sampler.lower().compile()

        def nbytes(compiled, field: str) -> int:
            memory = compiled.memory_analysis()
            return int(getattr(memory, field, 0) or 0) if memory is not None else 0

        kept_logits = sum(S * self.config.vocab_size * 4 for S in self._slot_buckets() if S <= FIXED_LOGITS_MAX_SEQS)
        total = (nbytes(step, "temp_size_in_bytes") + nbytes(sampler, "temp_size_in_bytes")
                 + nbytes(sampler, "argument_size_in_bytes") + kept_logits)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump({"activation_bytes": total}, f)
        os.replace(path + ".tmp", path)
        return total

    def _model_step(self, params, kv_cache, model_input, last_sampled, feed_index, logits_out):
        """The model's part of a step: logits ``[S, V]`` at ``logits_indices`` and the cache. ``logits_out``:
        a donated ``[S, V]`` buffer the logits take (None: a new one).
        ``feed_index[T]``: for each token row, the row of ``last_sampled`` (the previous step's
        tokens, ``[max_num_seqs]``) that is its token, or -1 to keep ``model_input``'s. The sampler
        is a program of its own (``_sample_step``): its variants (greedy, top-k/top-p, penalties,
        logprobs) then compile in a fraction of a second each, not as new model steps."""
        model_input = model_input.replace(token_ids=_fed_tokens(model_input, last_sampled, feed_index))
        return self._forward(params, kv_cache, model_input)

    def _score_step(self, params, kv_cache, model_input, last_sampled, feed_index, score_rows, score_targets, *,
                    num_logprobs):
        """``_model_step`` (without a logits buffer) that also scores token rows: for each of ``score_rows`` the
        logprob and rank of its ``score_targets`` token and the ``num_logprobs`` most likely tokens, from the LM
        head applied ``PROMPT_SCORE_CHUNK`` rows at a time (prompt logprobs)."""
        model_input = model_input.replace(token_ids=_fed_tokens(model_input, last_sampled, feed_index))
        hidden, kv_cache = self._forward(params, kv_cache, model_input, return_hidden=True)
        head = functools.partial(self._lm_head, params)
        logits = head(hidden[model_input.logits_indices])

        def score(chunk):
            rows, targets = chunk
            return with_logprobs(targets, head(hidden[rows]), num_logprobs)

        chunks = (score_rows.reshape(-1, PROMPT_SCORE_CHUNK), score_targets.reshape(-1, PROMPT_SCORE_CHUNK))
        scores = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), jax.lax.map(score, chunks))
        return logits, kv_cache, scores

    def _pool_step(self, params, kv_cache, model_input):
        """A pooling step (``engine.pooling``): for each sequence slot its chunk's last row (at
        ``logits_indices``), first row and the sum of its rows of the last layer's normed hidden states, float32
        ``[S, H]`` each; every token's row (``[T, H]`` in the model's dtype: the per-token tasks'); and the cache."""
        every_row, kv_cache = self._forward(params, kv_cache, model_input, return_hidden=True)
        hidden = every_row.astype(jnp.float32)
        cu = jnp.minimum(model_input.cu_q_lens, model_input.cu_q_lens[model_input.num_seqs[0]])
        seq, valid = token_sequence_ids(cu, hidden.shape[0])
        sums = jax.ops.segment_sum(jnp.where(valid[:, None], hidden, 0.0), seq, num_segments=cu.shape[0] - 1)
        first = hidden[jnp.minimum(cu[:-1], hidden.shape[0] - 1)]
        return hidden[model_input.logits_indices], first, sums, every_row, kv_cache

    def pool_fn(self, num_tokens: int):
        """The jitted pooling step (``_pool_step``) for ``num_tokens`` (padded) token rows."""
        return self._with_step_options(num_tokens, self._pool_fns, self._make_pool)

    def dispatch_pool(self, work: Sequence[SequenceWork]) -> PendingPool:
        """Start a pooling step of prompt chunks (no sampling); ``fetch_pool`` waits for its rows."""
        self._lead("dispatch_pool", list(work))
        model_input = jax.device_put(self.build_model_input(work), self._input_sharding)
        *rows, every_row, self.kv_cache = self.pool_fn(model_input.token_ids.shape[0])(self.params, self.kv_cache,
                                                                                     model_input)
        return PendingPool(tuple(rows), every_row, len(work))

    @staticmethod
    def fetch_pool(pending: PendingPool, every_row: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """``(last, first, sums)`` rows of a pooling step's real sequences, on the host, and with ``every_row``
        each token's row (float32 ``[T, H]``, in the step's token order; else None)."""
        fetched = jax.device_get(pending.rows + ((pending.every_row,) if every_row else ()))
        rows = tuple(np.asarray(a)[:pending.num_seqs] for a in fetched[:3])
        return *rows, np.asarray(fetched[3], np.float32) if every_row else None

    def _burst_step(self, params, kv_cache, staged, last_sampled, outputs, *, layout, num_logprobs):
        """A multi-step decode (``engine.multi_step.decode_burst``) of ``num_scheduler_steps`` steps: the last
        tokens written over ``last_sampled`` (donated, as ``_sample_step``'s), the stacked outputs over
        ``outputs`` (donated) and the cache. ``staged``: ``(model_input, feed_index, steps, packed_sampling)``,
        the first step's inputs as ``_model_step`` takes them, each sequence's steps and its sampling metadata
        packed by ``layout``."""
        model_input, feed_index, steps, packed_sampling = staged
        outputs, last, kv_cache = decode_burst(
            self._forward, params, kv_cache, model_input, _fed_tokens(model_input, last_sampled, feed_index), steps,
            unpack_arrays(packed_sampling, layout), outputs, num_steps=self.num_scheduler_steps,
            block_size=self.block_size, num_logprobs=num_logprobs)
        n = last.shape[0]
        return last_sampled.at[:n].set(last).at[n:].set(0), outputs, kv_cache

    def _sample_step(self, logits, packed_sampling, previous_sampled, *, layout, num_logprobs):
        """This step's tokens as the next step's ``last_sampled``, written over ``previous_sampled`` (donated:
        it keeps its buffer), and the sampler's output. The tokens come first: jit hands a donated buffer to
        the first output of its shape, and the output's ``token_ids`` have that shape when ``S`` is
        ``max_num_seqs``. ``packed_sampling``: the step's ``SamplingMetadata`` packed by ``layout``
        (``pack_arrays``)."""
        result = sample(logits, unpack_arrays(packed_sampling, layout), num_logprobs=num_logprobs)
        n = result.token_ids.shape[0]
        return previous_sampled.at[:n].set(result.token_ids).at[n:].set(0), result

    def step_compiler_options(self, num_tokens: int) -> dict:
        """XLA options of a step of ``num_tokens`` (padded) token rows: the user's, or the defaults."""
        if self._options_given:
            return {**self.compiler_options, **self._eager_options}
        return {**default_compiler_options(num_tokens, fp8=self._has_fp8), **self._eager_options}

    def step_fn(self, num_tokens: int):
        """The jitted model step for ``num_tokens`` (padded) token rows, compiled with its XLA options."""
        return self._with_step_options(num_tokens, self._step_fns, self._make_step)

    def score_fn(self, num_tokens: int):
        """The jitted scoring step (``_score_step``) for ``num_tokens`` (padded) token rows."""
        return self._with_step_options(num_tokens, self._score_fns, self._make_score)

    def burst_fn(self, num_tokens: int):
        """The jitted multi-step decode for ``num_tokens`` (padded) token rows, compiled as that step is."""
        return self._with_step_options(num_tokens, self._burst_fns, self._make_burst)

    def _with_step_options(self, num_tokens: int, jitted: dict, make):
        """``make(compiler_options=...)`` for a step of ``num_tokens`` rows, kept in ``jitted`` by its XLA options."""
        options = self.step_compiler_options(num_tokens)
        key = tuple(sorted(options.items()))
        if key not in jitted:
            jitted[key] = make(compiler_options=options or None)
        return jitted[key]

    def burst_buckets(self) -> list[int]:
        """The token rows a multi-step decode can have (one row a sequence): none when it is off."""
        if self.num_scheduler_steps == 1:
            return []
        largest = self.padded_num_tokens(min(self.max_num_seqs, self.max_num_batched_tokens))
        return [T for T in self.token_buckets() if T <= largest]

    def precompile(self, *, progress: bool = True, workers: Optional[int] = None) -> int:
        """Compile, before the first request and under a progress bar, what steps will run: the
        model step of every token bucket (``token_buckets``) at the fixed table width and the program
        staging its inputs (``_on_device``), and the greedy and the plain random sampler (no
        top-k/top-p, penalties or logprobs) of each one's sequence slots; other sampler variants
        compile at first use, in a fraction of a second. Each program
        runs once, on an empty batch (every token padding: its K/V go to the sink page, no sequence
        attends), so steps find it in jit's own cache. ``workers``: programs compiled before that,
        several at once (``engine.compile_ahead``; default ``compile_workers()``); 1: each compiled by
        its run, one after another. Returns how many programs ran. Needs the fixed table width
        (``table_width``) and the KV pool."""
        from tqdm import tqdm

        workers = compile_workers() if workers is None else workers
        if self.table_width is None:
            raise RuntimeError("precompile needs a fixed block-table width (ModelRunner(fixed_table_width=True) "
                               "with max_num_seqs x max_model_len / block_size <= MAX_FIXED_TABLE_ENTRIES)")
        buckets = self.token_buckets()
        slots = self._slot_buckets()
        samplers = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0)]
        # With LoRA slots, each bucket's step with adapters' updates and without (steps of none: build_model_input).
        host_inputs = {(T, lora): self._empty_step_input(T, self.table_width, lora=lora)
                       for T in buckets for lora in self._lora_forms}
        bursts = self.burst_buckets()  # multi-step decodes: the burst and its staging program of each, per sampler
        with tqdm(total=2 * len(host_inputs) + len(slots) * len(samplers)
                  + len(self._lora_forms) * len(bursts) * (1 + len(samplers)) + self.lora,
                  desc="Compiling steps", unit="program", disable=not progress) as bar:
            if workers > 1:  # compiled here, several at once; else by each one's run below
                leaves = {key: jax.tree.leaves(host) for key, host in host_inputs.items()}
                staging = {key: self._staging_buffers(_shapes_of(leaves[key]), host)
                           for key, host in host_inputs.items()}
                compile_ahead([functools.partial(self.step_fn(T).lower, self.params, self.kv_cache, model_input,
                                                 self._sampled, feed, self._logits_buffer(T, take=False))
                               for (T, _), (model_input, feed) in staging.items()]
                              + [functools.partial(self._stage.lower, staging[key], self._packed(leaves[key])[0])
                                 for key in host_inputs], workers, on_done=bar.update)
            inputs = {}
            for key, host in host_inputs.items():
                inputs[key] = self._on_device(host)
                if workers <= 1:
                    bar.update()
            logits_of = {}  # sequence slots -> logits of a step with that many
            for (T, _), (model_input, feed) in inputs.items():
                logits_of[self.padded_num_seqs(T)] = logits = self._run_step(T, model_input, feed)
                # Wait for it: compiled one after another, the next program's compile times candidate GEMMs
                # on the GPU (XLA's autotuning), which a step still running there would skew. (Two compiles of
                # the same 16384-row matmuls chose kernels of 753 and 874 TFLOP/s, run 14c; waiting left
                # tput-short as it was, run 14d, and so did compiles autotuning side by side, run 18d.)
                jax.block_until_ready(logits)
                if workers <= 1:
                    bar.update()
            sampler_inputs = [(logits_of[S], *self._packed(self._uniform_sampling(params, S)))
                              for S in slots for params in samplers]
            if workers > 1:
                compile_ahead([functools.partial(self._sample.lower, logits, packed, self._sampled, layout=layout,
                                                 num_logprobs=None)
                               for logits, packed, layout in sampler_inputs], workers, on_done=bar.update)
            for logits, packed, layout in sampler_inputs:
                self._sampled, _ = self._sample(logits, packed, self._sampled, layout=layout, num_logprobs=None)
                jax.block_until_ready(self._sampled)
                if workers <= 1:
                    bar.update()
            self._precompile_bursts(bursts, samplers, workers, bar)
            if self.lora:
                self._precompile_lora_writer()
                bar.update()
        return bar.n

    @property
    def _lora_forms(self) -> tuple[bool, ...]:
        """Whether the steps ``precompile`` makes have rows' LoRA slots: both forms with LoRA slots (a step of no
        adapter runs without: ``build_model_input``), else without."""
        return (True, False) if self.lora else (False,)

    def _precompile_lora_writer(self) -> None:
        """Compile the program that writes an adapter into a slot: zeros into slot 1, which holds zeros."""
        self._write_lora(1, zero_adapter(self.config, self.max_lora_rank))
        jax.block_until_ready(self.params["layers"])

    def precompile_pool(self, *, progress: bool = True) -> int:
        """``precompile`` for a pooling engine: the pooling step (``_pool_step``) of every token bucket at the fixed
        table width, each run once on an empty batch. Returns how many programs ran."""
        from tqdm import tqdm

        if self.table_width is None:
            raise RuntimeError("precompile needs a fixed block-table width (ModelRunner(fixed_table_width=True))")
        shapes = [(T, lora) for T in self.token_buckets() for lora in self._lora_forms]
        for T, lora in tqdm(shapes, desc="Compiling pooling steps", unit="program", disable=not progress):
            model_input = jax.device_put(self._empty_step_input(T, self.table_width, lora)[0], self._input_sharding)
            *rows, self.kv_cache = self.pool_fn(T)(self.params, self.kv_cache, model_input)
            jax.block_until_ready(rows)
        if self.lora:
            self._precompile_lora_writer()
        return len(shapes) + self.lora

    def _precompile_bursts(self, buckets: list[int], samplers: list[SamplingParams], workers: int, bar) -> None:
        """``precompile``'s multi-step decodes: the staging program and each sampler's burst of every bucket."""
        host_inputs = {(T, lora): self._empty_burst_input(T, samplers, lora)  # as precompile's steps
                       for T in buckets for lora in self._lora_forms}
        if workers > 1:
            lowerings = []
            for (T, _), (host, layouts) in host_inputs.items():
                leaves = jax.tree.leaves(host)
                staging = self._staging_buffers(_shapes_of(leaves), host)
                outputs = self._burst_output_buffer(self.padded_num_seqs(T), None, take=False)
                lowerings.append(functools.partial(self._stage.lower, staging, self._packed(leaves)[0]))
                lowerings += [functools.partial(self.burst_fn(T).lower, self.params, self.kv_cache, staging,
                                                self._sampled, outputs, layout=layout, num_logprobs=None)
                              for layout in layouts]
            compile_ahead(lowerings, workers, on_done=bar.update)
        for (T, _), (host, layouts) in host_inputs.items():
            staged = self._on_device(host)
            if workers <= 1:
                bar.update()
            for layout in layouts:
                jax.block_until_ready(self._run_burst(T, staged, layout, None))
                if workers <= 1:
                    bar.update()

    def _empty_burst_input(self, num_tokens: int, samplers: list[SamplingParams],
                           lora: Optional[bool] = None) -> tuple[tuple, list[PackedLayout]]:
        """A multi-step decode of ``num_tokens`` padding rows and no sequence, as ``_dispatch_burst`` stages it (the
        empty step's inputs, no steps, the first sampler's packed metadata), and each sampler's metadata layout (the
        samplers' packed metadata all have one shape): what ``precompile`` runs. ``lora``: as
        ``_empty_step_input``'s."""
        S = self.padded_num_seqs(num_tokens)
        packed = [pack_arrays(self._uniform_sampling(params, S)) for params in samplers]
        host = (*self._empty_step_input(num_tokens, self.table_width, lora), np.zeros(S, np.int32), packed[0][0])
        return host, [layout for _, layout in packed]

    def _empty_step_input(self, num_tokens: int, table_width: int, lora: Optional[bool] = None
                          ) -> tuple[ModelInput, np.ndarray]:
        """A step of ``num_tokens`` padding rows and no sequence, and its feed index (none fed): what
        ``precompile`` runs, and the shapes ``activation_bytes`` compiles. ``lora``: with rows' LoRA slots (None:
        whenever the runner has LoRA slots)."""
        lora = self.lora if lora is None else lora
        T, S, B = num_tokens, self.padded_num_seqs(num_tokens), table_width
        zeros = functools.partial(np.zeros, dtype=np.int32)
        model_input = ModelInput(token_ids=zeros(T), positions=zeros(T), slot_mapping=zeros(T),
                                 cu_q_lens=zeros(S + 1), kv_lens=zeros(S), block_tables=zeros((S, B)),
                                 num_seqs=zeros(1), logits_indices=zeros(S), lora_slots=zeros(T) if lora else None)
        return model_input, np.full(T, -1, np.int32)

    # -- host side -------------------------------------------------------------------------

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate pages ``src -> dst`` in every layer (before the step)."""
        if not copies:
            return
        self._lead("copy_blocks", list(copies))
        n = bucket(len(copies), 4)
        src = np.zeros(n, np.int32)
        dst = np.zeros(n, np.int32)  # padding copies page 0 onto itself
        src[: len(copies)], dst[: len(copies)] = zip(*copies)
        if self._input_sharding is not None:
            src, dst = jax.device_put((src, dst), self._input_sharding)
        self.kv_cache = self._copy(self.kv_cache, jnp.asarray(src), jnp.asarray(dst))

    def padded_num_tokens(self, num_tokens: int) -> int:
        """Token rows of a step of ``num_tokens`` tokens (``token_bucket``)."""
        return token_bucket(num_tokens, self.max_num_batched_tokens, self.max_num_seqs)

    def token_buckets(self) -> list[int]:
        """Every step's possible token rows (``token_buckets``), smallest first."""
        return token_buckets(self.max_num_batched_tokens, self.max_num_seqs)

    def padded_num_seqs(self, num_tokens: int) -> int:
        """Sequence slots of a step of ``num_tokens`` tokens (``seq_bucket``): the sampler's rows."""
        return seq_bucket(num_tokens, self.max_num_batched_tokens, self.max_num_seqs)

    def build_model_input(self, work: Sequence[SequenceWork]) -> ModelInput:
        return build_model_input(work, block_size=self.block_size, max_num_tokens=self.max_num_batched_tokens,
                                 max_num_seqs=self.max_num_seqs, max_blocks_per_seq=self.max_blocks_per_seq,
                                 table_width=self.table_width, lora=self.lora and any(w.lora_slot for w in work))

    def set_lora(self, slot: int, adapter: dict) -> None:
        """Put an adapter (``models.lora.read_adapter``'s arrays) into LoRA slot ``slot`` (1 .. max_loras) for the
        steps dispatched after this; those in flight keep the slots as they were (new arrays, none donated)."""
        self._lead("set_lora", slot, adapter)
        self._write_lora(slot, adapter)

    def _write_lora(self, slot: int, adapter: dict) -> None:
        """``set_lora`` on this process alone (``precompile`` runs it on every process of a cluster)."""
        dtype = self.params["embed"].dtype
        repeat = self._repeat_kv_heads
        adapter = {name: (a.astype(dtype), (repeat(b) if repeat and name in ("wk", "wv") else b).astype(dtype))
                   for name, (a, b) in adapter.items()}
        layers = self.params["layers"]
        if isinstance(layers, (list, tuple)):  # per-layer weights: each layer's slots from its rows (one program)
            for i, layer in enumerate(layers):
                rows = {name: (a[i], b[i]) for name, (a, b) in adapter.items()}
                layer["lora"] = self._set_lora(layer["lora"], self._placed(rows), np.int32(slot))
        else:
            layers["lora"] = self._set_lora(layers["lora"], self._placed(adapter), np.int32(slot))

    def dispatch(self, work: Sequence[SequenceWork], sampling: SamplingMetadata, *,
                 num_logprobs: Optional[int] = None, decode_steps: int = 1,
                 num_prompt_logprobs: Optional[int] = None) -> PendingStep:
        """Start one step on the device and return at once (JAX dispatches asynchronously); the
        tokens of works with a ``feed_row`` come from the step dispatched before this one.
        ``decode_steps`` > 1: a multi-step decode of that many steps (``num_scheduler_steps``; every work a
        one-token decode of ``work.decode_steps`` <= that many), whose result has the steps first.
        Works with ``score_targets`` (prompt logprobs) have their rows scored with the ``num_prompt_logprobs``
        most likely tokens (``fetch_scores``)."""
        self._lead("dispatch", list(work), sampling, num_logprobs=num_logprobs, decode_steps=decode_steps,
                   num_prompt_logprobs=num_prompt_logprobs)
        started = time.perf_counter()
        model_input = self.build_model_input(work)
        feed = np.full(model_input.token_ids.shape, -1, np.int32)
        fed = [(i, w.feed_row) for i, w in enumerate(work) if w.feed_row >= 0]
        if fed:
            seqs, rows = zip(*fed)
            feed[model_input.cu_q_lens[list(seqs)]] = rows  # a fed work is a single-token decode
        if decode_steps > 1:
            return self._dispatch_burst(work, model_input, feed, sampling, num_logprobs, decode_steps, started)
        scored = score_rows(work, model_input.cu_q_lens)
        model_input, feed = self._on_device((model_input, feed))
        staged = time.perf_counter()
        scores = None
        if scored is None:
            logits = self._run_step(model_input.token_ids.shape[0], model_input, feed)
        else:
            rows, targets, offsets = scored
            rows, targets = jax.device_put((rows, targets), self._input_sharding)
            logits, self.kv_cache, scores = self.score_fn(model_input.token_ids.shape[0])(
                self.params, self.kv_cache, model_input, self._sampled, feed, rows, targets,
                num_logprobs=num_prompt_logprobs or SCORE_TOP_LOGPROBS)
        stepped = time.perf_counter()
        packed, layout = self._packed(sampling)
        self._sampled, result = self._sample(logits, packed, self._sampled, layout=layout, num_logprobs=num_logprobs)
        self._count_dispatch(inputs=staged - started, model=stepped - staged, sampler=time.perf_counter() - stepped)
        return PendingStep(result, len(work) + sum(w.num_drafts for w in work), scores=scores,
                           score_offsets=None if scored is None else offsets)

    def _dispatch_burst(self, work: Sequence[SequenceWork], model_input: ModelInput, feed: np.ndarray,
                        sampling: SamplingMetadata, num_logprobs: Optional[int], decode_steps: int,
                        started: float) -> PendingStep:
        """``dispatch`` of a multi-step decode: its inputs, each sequence's steps and its sampling metadata staged
        together (one copy, fixed addresses), one program for every step, and a copy of its outputs for the host
        (their buffer stays as the next burst's, so the program's CUDA graphs are replayed, not re-recorded)."""
        if decode_steps != self.num_scheduler_steps:
            raise ValueError(f"a multi-step decode runs num_scheduler_steps={self.num_scheduler_steps} steps, "
                             f"got {decode_steps}")
        if any(len(w.token_ids) != 1 for w in work):
            raise ValueError("a multi-step decode takes one-token decodes only")
        T = model_input.token_ids.shape[0]
        steps = np.zeros(self.padded_num_seqs(T), np.int32)
        steps[: len(work)] = [w.decode_steps for w in work]
        packed, layout = pack_arrays(sampling)
        staged = self._on_device((model_input, feed, steps, packed))
        stepped = time.perf_counter()
        result = self._run_burst(T, staged, layout, num_logprobs)
        self._count_dispatch(inputs=stepped - started, model=time.perf_counter() - stepped, sampler=0.0)
        return PendingStep(result, len(work), burst=True)

    def _run_burst(self, num_tokens: int, staged: tuple, layout: PackedLayout,
                   num_logprobs: Optional[int]) -> SamplerOutput:
        """Run the multi-step decode of ``num_tokens`` rows on staged inputs (``_burst_step``); a copy of its
        outputs, whose buffer the next burst of that shape writes over."""
        S = staged[2].shape[0]
        outputs = self._burst_output_buffer(S, num_logprobs)
        self._sampled, outputs, self.kv_cache = self.burst_fn(num_tokens)(
            self.params, self.kv_cache, staged, self._sampled, outputs, layout=layout, num_logprobs=num_logprobs)
        self._burst_outputs[(S, num_logprobs)] = outputs
        return self._take(outputs)

    def _burst_output_buffer(self, num_seqs: int, num_logprobs: Optional[int], *, take: bool = True) -> SamplerOutput:
        """The buffers a burst of ``num_seqs`` slots writes its outputs into, as ``_logits_buffer`` gives a step's
        logits: the last such burst's, or zeros. ``take``: hand them over (they are donated), else leave them (for a
        lowering)."""
        shapes = burst_output_shapes(self.num_scheduler_steps, num_seqs, num_logprobs)
        return _kept_buffer(self._burst_outputs, (num_seqs, num_logprobs), take, lambda: jax.device_put(
            jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes), self._input_sharding))

    def _count_dispatch(self, **seconds: float) -> None:
        for part, value in seconds.items():
            self.dispatch_stats[f"dispatch_{part}_s"] += value

    def _placed(self, inputs):
        """Host step inputs as the step takes them: replicated over the mesh, else left to jit."""
        return inputs if self._input_sharding is None else jax.device_put(inputs, self._input_sharding)

    def _packed(self, tree) -> tuple[jax.Array, PackedLayout]:
        """Host step inputs (the leaves of ``(model_input, feed)``; the sampler's metadata) as one flat array,
        placed, and its layout (``pack_arrays``): one host-to-device copy each a step, not nine and twelve."""
        flat, layout = pack_arrays(tree)
        return self._placed(flat), layout

    def _on_device(self, host: tuple) -> tuple:
        """A step's host inputs (``(model_input, feed)``; a burst's add its steps and packed sampling metadata)
        in device buffers that stay where they are from step to step: packed
        (``_packed``) and staged into the buffers the last step of that shape read, donated
        (``_stage_step_input``). XLA records the step's kernels into CUDA graphs and re-records a graph
        whenever a buffer it touches has moved: with new input buffers every step, the 8B's decode step
        re-recorded its ~580 kernels every step, ~1 ms of host time (benchmarks/NOTES.md, runs 20a-b). (XLA's
        own temporaries still move under JAX's default allocator: see ``engine/__init__``.)"""
        leaves = jax.tree.leaves(host)
        key = _shapes_of(leaves)
        staged = self._stage(self._staging_buffers(key, host), self._packed(leaves)[0])
        self._staged[key] = staged
        return staged

    def _staging_buffers(self, key: tuple, host: tuple) -> tuple:
        """The device buffers steps of ``host``'s shapes (``_on_device``; ``key``: ``_shapes_of`` its leaves)
        read: zeros until a step's inputs are staged."""
        if key not in self._staged:
            self._staged[key] = jax.device_put(jax.tree.map(np.zeros_like, host), self._input_sharding)
        return self._staged[key]

    def _run_step(self, num_tokens: int, model_input: ModelInput, feed: jax.Array) -> jax.Array:
        """Run the model step of ``num_tokens`` (padded) rows on staged inputs; its logits, which a small
        step keeps as the next such step's output buffer (``FIXED_LOGITS_MAX_SEQS``)."""
        logits, self.kv_cache = self.step_fn(num_tokens)(self.params, self.kv_cache, model_input, self._sampled,
                                                         feed, self._logits_buffer(num_tokens))
        num_seqs = self.padded_num_seqs(num_tokens)
        if num_seqs <= FIXED_LOGITS_MAX_SEQS:
            self._logits_buffers[num_seqs] = logits
        return logits

    def _logits_buffer(self, num_tokens: int, *, take: bool = True) -> Optional[jax.Array]:
        """The output buffer of a step's logits (None for steps of more than ``FIXED_LOGITS_MAX_SEQS`` slots):
        the last such step's, or zeros placed as the step places its logits. ``take``: hand it over (it is
        donated), else leave it for the step (for a lowering)."""
        S = self.padded_num_seqs(num_tokens)
        if S > FIXED_LOGITS_MAX_SEQS:
            return None
        return _kept_buffer(self._logits_buffers, S, take, lambda: jax.device_put(
            np.zeros((S, self.config.vocab_size), np.float32), self._logits_sharding))

    def _slot_buckets(self) -> list[int]:
        """The sequence slots of the steps' token buckets, ascending."""
        return sorted({self.padded_num_seqs(T) for T in self.token_buckets()})

    @staticmethod
    def fetch_scores(pending: PendingStep) -> SamplerOutput:
        """A fetched step's scored rows (prompt logprobs) on the host: work ``i``'s rows start at
        ``pending.score_offsets[i]``, in its tokens' order."""
        return jax.tree.map(np.asarray, jax.device_get(pending.scores))

    @staticmethod
    def fetch(pending: PendingStep) -> SamplerOutput:
        """Wait for a dispatched step; its sampler output on the host, cut to the real sequences."""
        n = pending.num_seqs
        cut = (slice(None), slice(n)) if pending.burst else slice(n)
        return jax.tree.map(lambda a: np.asarray(a)[cut], jax.device_get(pending.result))

    # -- multi-host: process 0 leads, the others repeat its calls ----------------------------

    def _lead(self, method: str, *args: Any, **kwargs: Any) -> None:
        """On the leader of a multi-process run, send this call to the followers (else nothing)."""
        if self._multi_process and is_leader():
            broadcast_from_leader((method, args, kwargs))

    def follow(self) -> None:
        """On processes other than 0: run the leader's steps until ``release_followers``."""
        if is_leader():
            raise RuntimeError("follow() runs on processes other than 0; process 0 schedules")
        while True:
            method, args, kwargs = broadcast_from_leader()
            if method == "release":
                return
            getattr(self, method)(*args, **kwargs)

    def release_followers(self) -> None:
        """On process 0 of a multi-process run: end the other processes' ``follow()`` loops."""
        self._lead("release")


def _kept_buffer(kept: dict, key, take: bool, make):
    """The device buffer a program's output is written over (donated), kept from its last run under ``key`` in
    ``kept``, or ``make()``'s new one. ``take``: hand it over (the program consumes it), else leave it there (for a
    lowering, which only reads its shape; a new one is then kept)."""
    buffer = kept.pop(key, None) if take else kept.get(key)
    if buffer is None:
        buffer = make()
        if not take:
            kept[key] = buffer
    return buffer


def _fed_tokens(model_input: ModelInput, last_sampled: jax.Array, feed_index: jax.Array) -> jax.Array:
    """A step's token ids: ``model_input``'s, or where ``feed_index[T]`` >= 0 that row of ``last_sampled`` (the
    previous step's tokens, ``[max_num_seqs]``, still on the device)."""
    fed = last_sampled[jnp.maximum(feed_index, 0)]
    return jnp.where(feed_index >= 0, fed, model_input.token_ids)


def _stage_step_input(staged, flat: jax.Array):
    """``staged``'s arrays (donated) overwritten by consecutive pieces of ``flat``: each output takes its donated
    input's buffer, so the step's inputs keep their device addresses. Only the arrays' shapes are read, so the
    jit needs ``keep_unused=True``, or it drops them and their donation with them."""
    leaves, treedef = jax.tree.flatten(staged)
    return jax.tree.unflatten(treedef, _split_flat(flat, [leaf.shape for leaf in leaves]))


def _copy_blocks(kv_cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    """Pages ``src`` -> ``dst`` in every array of the cache (the page axis is third from the end)."""

    def copy(pages: jax.Array) -> jax.Array:
        index = (slice(None),) * (pages.ndim - 3)
        return pages.at[index + (dst,)].set(pages[index + (src,)])

    return jax.tree.map(copy, kv_cache)


def delete_arrays(tree) -> None:
    """Free the device memory of every JAX array in ``tree`` now, not when Python collects it."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_deleted():
            leaf.delete()


def _split_lora(params: dict) -> tuple[dict, tuple]:
    """Laid-out params without the LoRA slots, and the slots: each layer's ``lora`` entry (or the stacked one) and
    ``lora_columns``."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        base_layers, slots = [{k: v for k, v in layer.items() if k != "lora"} for layer in layers], [
            layer["lora"] for layer in layers]
    else:
        base_layers, slots = {k: v for k, v in layers.items() if k != "lora"}, layers["lora"]
    base = {k: v for k, v in params.items() if k != "lora_columns"}
    return {**base, "layers": base_layers}, (slots, params["lora_columns"])


def _join_lora(params: dict, lora: tuple) -> dict:
    """``_split_lora``'s inverse: the slots put back beside laid-out ``params``."""
    slots, columns = lora
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        layers = [{**layer, "lora": slot} for layer, slot in zip(layers, slots)]
    else:
        layers = {**layers, "lora": slots}
    return {**params, "layers": layers, "lora_columns": columns}


def _signature(params) -> tuple[dict, Any]:
    """Each weight's path in the tree -> ``(shape, dtype)``, and the tree's structure (quantized weights' layout
    facts included)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    return {jax.tree_util.keystr(path): (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves}, treedef


def _first_difference(want: tuple[dict, Any], got: tuple[dict, Any]) -> str:
    """The first weight ``got`` lacks, adds, or holds in another shape or dtype than ``want`` ("" if none)."""
    for path, spec in want[0].items():
        if path not in got[0]:
            return f"{path} is missing"
        if got[0][path] != spec:
            return f"{path} is {got[0][path][0]} {got[0][path][1]}, the model's {spec[0]} {spec[1]}"
    extra = sorted(set(got[0]) - set(want[0]))
    if extra:
        return f"{extra[0]} is not in the model"
    return "" if got[1] == want[1] else "the weights are laid out otherwise (another quantization's settings)"
