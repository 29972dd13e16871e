"""A small batch generator over the model step: for demos and model tests only.

Each prompt gets its own fixed run of pages (no block manager, no scheduler): one
ragged prefill step, then one decode step per new token for every sequence. The
real engine (``engine/``) does paging and continuous batching; this exists so the
model can be checked and demonstrated on its own.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models.batch import KVCache, ModelInput, make_kv_cache
from models.config import ModelConfig
from models.llama import forward


@functools.partial(jax.jit, static_argnames=("config",), donate_argnums=(1,))
def _step(params, kv_cache: KVCache, batch: ModelInput, config: ModelConfig):
    return forward(params, kv_cache, batch, config=config)


def _contiguous_batch(lengths: Sequence[int], starts: Sequence[int], blocks_per_seq: int,
                      block_size: int, token_ids: np.ndarray, all_logits: bool) -> ModelInput:
    """Step input for sequence ``i`` writing ``lengths[i]`` tokens from position ``starts[i]``."""
    n = len(lengths)
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    positions = np.concatenate([np.arange(s, s + l) for s, l in zip(starts, lengths)]).astype(np.int32)
    seq_of_token = np.repeat(np.arange(n), lengths)
    tables = 1 + np.arange(n)[:, None] * blocks_per_seq + np.arange(blocks_per_seq)[None, :]
    slots = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    kv_lens = np.asarray(starts) + np.asarray(lengths)
    logits_indices = np.arange(cu[-1]) if all_logits else cu[1:] - 1
    return ModelInput(
        token_ids=jnp.asarray(token_ids, jnp.int32),
        positions=jnp.asarray(positions),
        slot_mapping=jnp.asarray(slots, jnp.int32),
        cu_q_lens=jnp.asarray(cu),
        kv_lens=jnp.asarray(kv_lens, jnp.int32),
        block_tables=jnp.asarray(tables, jnp.int32),
        num_seqs=jnp.asarray([n], jnp.int32),
        logits_indices=jnp.asarray(logits_indices, jnp.int32),
    )


def _empty_cache(params, config: ModelConfig, num_seqs: int, max_len: int, block_size: int):
    blocks_per_seq = -(-max_len // block_size)
    dtype = params["embed"].dtype
    return make_kv_cache(config, 1 + num_seqs * blocks_per_seq, block_size, dtype), blocks_per_seq


def prompt_logits(params, config: ModelConfig, prompts: list[list[int]], block_size: int = 16) -> list[np.ndarray]:
    """Logits ``[len, V]`` at every position of each prompt, all prompts in one ragged step."""
    lengths = [len(p) for p in prompts]
    cache, bps = _empty_cache(params, config, len(prompts), max(lengths), block_size)
    batch = _contiguous_batch(lengths, [0] * len(prompts), bps, block_size,
                              np.concatenate(prompts), all_logits=True)
    logits, _ = _step(params, cache, batch, config)
    return np.split(np.asarray(logits), np.cumsum(lengths)[:-1])


def generate(
    params,
    config: ModelConfig,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    eos_token_ids: Optional[Sequence[int]] = None,
    block_size: int = 16,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` for each prompt (greedy when temperature is 0)."""
    eos = set(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    lengths = [len(p) for p in prompts]
    cache, bps = _empty_cache(params, config, len(prompts), max(lengths) + max_new_tokens, block_size)
    key = jax.random.PRNGKey(seed)
    batch = _contiguous_batch(lengths, [0] * len(prompts), bps, block_size,
                              np.concatenate(prompts), all_logits=False)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for step in range(max_new_tokens):
        logits, cache = _step(params, cache, batch, config)
        if temperature > 0:
            tokens = jax.random.categorical(jax.random.fold_in(key, step), logits / temperature)
        else:
            tokens = jnp.argmax(logits, axis=-1)
        tokens = np.asarray(tokens)
        for i, t in enumerate(tokens):
            if not done[i]:
                outputs[i].append(int(t))
                done[i] = int(t) in eos
        if done.all():
            break
        # Finished sequences keep decoding (their tokens are dropped) so shapes stay fixed.
        starts = [lengths[i] + step for i in range(len(prompts))]
        batch = _contiguous_batch([1] * len(prompts), starts, bps, block_size, tokens, all_logits=False)
    return outputs


def greedy_generate(params, config: ModelConfig, prompts: list[list[int]], max_new_tokens: int,
                    block_size: int = 16) -> list[list[int]]:
    """Greedy continuation of each prompt (eos ignored, exactly ``max_new_tokens`` tokens)."""
    return generate(params, config, prompts, max_new_tokens, eos_token_ids=(), block_size=block_size)
