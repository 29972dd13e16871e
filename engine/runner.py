"""Model runner: turns a scheduled step into padded device arrays and runs the jitted step.

Owns the device state (params, paged KV cache) and the one jitted function
``step(params, kv_cache, model_input, sampling) -> (tokens, logprobs, kv_cache)``
with the cache donated. Shapes are padded to power-of-two buckets so the step
compiles a bounded number of times. Knows nothing of stop conditions or text.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from engine.sampler import SamplerOutput, SamplingMetadata, sample
from models.batch import KVCache, ModelInput, make_kv_cache
from models.config import ModelConfig
from models.llama import forward
from pallas_kernels import get_attention_fns

logger = logging.getLogger(__name__)


def bucket(n: int, minimum: int, maximum: Optional[int] = None) -> int:
    """Smallest power of two >= max(n, minimum), capped at ``maximum`` (if that still fits n)."""
    size = max(minimum, 1 << max(0, int(n) - 1).bit_length())
    if maximum is not None and n <= maximum:
        size = min(size, maximum)
    return size


@dataclasses.dataclass
class SequenceWork:
    """One sequence's share of a step, as the runner needs it."""

    token_ids: Sequence[int]  # the new tokens to run
    start: int  # absolute position of the first of them
    block_table: Sequence[int]
    sample: bool  # whether the step's token for this sequence is wanted


class ModelRunner:
    def __init__(
        self,
        config: ModelConfig,
        params,
        *,
        num_blocks: int,
        block_size: int,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        max_model_len: int,
        kv_dtype,
        attention_backend: str = "auto",
        kv_sharding=None,
    ):
        self.config = config
        self.params = params
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.kv_cache = make_kv_cache(config, num_blocks, block_size, kv_dtype, sharding=kv_sharding)
        attention_fn, write_kv_fn = get_attention_fns(attention_backend)
        self._forward = functools.partial(forward, config=config, attention_fn=attention_fn,
                                          write_kv_fn=write_kv_fn)
        self._step = jax.jit(self._step_impl, static_argnames=("num_logprobs",), donate_argnums=(1,))
        self._copy = jax.jit(_copy_blocks, donate_argnums=(0,))

    def _step_impl(self, params, kv_cache, model_input, sampling, *, num_logprobs):
        logits, kv_cache = self._forward(params, kv_cache, model_input)
        return sample(logits, sampling, num_logprobs=num_logprobs), kv_cache

    # -- host side -------------------------------------------------------------------------

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate pages ``src -> dst`` in every layer (before the step)."""
        if not copies:
            return
        n = bucket(len(copies), 4)
        src = np.zeros(n, np.int32)
        dst = np.zeros(n, np.int32)  # padding copies page 0 onto itself
        src[: len(copies)], dst[: len(copies)] = zip(*copies)
        self.kv_cache = self._copy(self.kv_cache, jnp.asarray(src), jnp.asarray(dst))

    def padded_num_seqs(self, num_seqs: int) -> int:
        return bucket(num_seqs, 8, self.max_num_seqs)

    def build_model_input(self, work: Sequence[SequenceWork]) -> ModelInput:
        """Flat, padded step input (DESIGN.md step 2)."""
        bs = self.block_size
        num_tokens = sum(len(w.token_ids) for w in work)
        T = bucket(num_tokens, 16, self.max_num_batched_tokens)
        S = self.padded_num_seqs(len(work))
        B = bucket(max(len(w.block_table) for w in work), 4, self.max_blocks_per_seq)
        token_ids = np.zeros(T, np.int32)
        positions = np.zeros(T, np.int32)
        slots = np.zeros(T, np.int32)  # padding writes into page 0, the sink
        cu = np.zeros(S + 1, np.int32)
        kv_lens = np.zeros(S, np.int32)
        tables = np.zeros((S, B), np.int32)
        logits_indices = np.zeros(S, np.int32)
        t = 0
        for i, w in enumerate(work):
            n = len(w.token_ids)
            table = np.asarray(w.block_table, np.int32)
            pos = np.arange(w.start, w.start + n, dtype=np.int32)
            token_ids[t : t + n] = w.token_ids
            positions[t : t + n] = pos
            slots[t : t + n] = table[pos // bs] * bs + pos % bs
            tables[i, : len(table)] = table
            kv_lens[i] = w.start + n
            logits_indices[i] = t + n - 1
            t += n
            cu[i + 1] = t
        cu[len(work) + 1 :] = t
        return ModelInput(
            token_ids=token_ids, positions=positions, slot_mapping=slots, cu_q_lens=cu,
            kv_lens=kv_lens, block_tables=tables, num_seqs=np.asarray([len(work)], np.int32),
            logits_indices=logits_indices,
        )

    def execute(self, work: Sequence[SequenceWork], sampling: SamplingMetadata, *,
                num_logprobs: Optional[int] = None) -> SamplerOutput:
        """Run one step; returns the sampler's output on the host, cut to the real sequences."""
        model_input = self.build_model_input(work)
        result, self.kv_cache = self._step(self.params, self.kv_cache, model_input, sampling,
                                           num_logprobs=num_logprobs)
        n = len(work)
        return jax.tree.map(lambda a: np.asarray(a)[:n], jax.device_get(result))


def _copy_blocks(kv_cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    return KVCache(k=kv_cache.k.at[:, :, dst].set(kv_cache.k[:, :, src]),
                   v=kv_cache.v.at[:, :, dst].set(kv_cache.v[:, :, src]))
