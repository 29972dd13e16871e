"""Multi-step decoding on the device: several decode steps of a batch in one program.

Owns ``decode_burst``, the traced loop a burst runs (``ModelRunner`` jits it, the scheduler plans it:
``Scheduler(num_scheduler_steps=...)``). Each iteration runs the model on one token per sequence, samples,
and feeds the sampled tokens to the next iteration, as vLLM's ``--num-scheduler-steps``: the host plans,
packs inputs and launches programs once for up to ``num_steps`` tokens a sequence instead of once a token.

A sequence runs its own number of steps (``steps``, at most ``num_steps``): the scheduler stops it at its
``max_tokens`` or ``max_model_len`` and allocated blocks for those steps only. In the iterations after its
last, it writes its K/V into the sink page (slot 0) and its position stands still, so it reads only what
it wrote; those tokens are dropped by the host, as are the tokens after a stop (eos, stop strings) that the
host finds only afterwards.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from engine.sampler import SamplerOutput, SamplingMetadata, sample
from models.batch import ModelInput


def burst_output_shapes(num_steps: int, num_seqs: int, num_logprobs: int | None) -> SamplerOutput:
    """The shapes of a burst's stacked sampler outputs (``[num_steps, S, ...]``), as ``jax.ShapeDtypeStruct``."""
    def shape(*dims, dtype=jnp.int32):
        return jax.ShapeDtypeStruct((num_steps, num_seqs, *dims), dtype)

    if num_logprobs is None:
        return SamplerOutput(token_ids=shape())
    return SamplerOutput(token_ids=shape(), logprobs=shape(dtype=jnp.float32), ranks=shape(),
                         top_token_ids=shape(num_logprobs), top_logprobs=shape(num_logprobs, dtype=jnp.float32))


def _rows_of_seqs(values: jax.Array, num_rows: int) -> jax.Array:
    """``values[S]`` of the sequences as ``[num_rows]`` of the token rows: a decode's row r is sequence r; rows past
    the sequence slots are padding (0)."""
    S = values.shape[0]
    if num_rows <= S:
        return values[:num_rows]
    return jnp.concatenate([values, jnp.zeros(num_rows - S, values.dtype)])


def decode_burst(forward, params, kv_cache, model_input: ModelInput, first_tokens: jax.Array, steps: jax.Array,
                 sampling: SamplingMetadata, outputs: SamplerOutput, *, num_steps: int, block_size: int,
                 num_logprobs: int | None):
    """Run ``num_steps`` decode iterations of ``model_input``'s batch (every sequence one token) and sample each.

    ``forward(params, kv_cache, batch) -> (logits [S, V], kv_cache)`` is the model step; ``first_tokens[T]`` the
    first iteration's tokens; ``steps[S]`` how many iterations each sequence runs (0: padding);
    ``sampling``: the first iteration's metadata (iteration ``j`` draws with ``step_indices + j``);
    ``outputs``: the buffers (``burst_output_shapes``) the stacked outputs are written into. Returns the
    stacked ``SamplerOutput``, each sequence's last sampled token ``[S]`` (the next step's feed) and the cache.
    """
    T = model_input.token_ids.shape[0]
    S = model_input.kv_lens.shape[0]
    row_steps = _rows_of_seqs(steps, T)
    row_tables = model_input.block_tables[jnp.minimum(jnp.arange(T), S - 1)]

    def body(j, carry):
        kv_cache, tokens, last, outputs = carry
        # A sequence past its last step stands still at that step's position (and writes to the sink).
        row_advance = jnp.minimum(j, jnp.maximum(row_steps - 1, 0))
        positions = model_input.positions + row_advance
        pages = jnp.take_along_axis(row_tables, (positions // block_size)[:, None], axis=1)[:, 0]
        slots = jnp.where(j < row_steps, pages * block_size + positions % block_size, 0)
        kv_lens = model_input.kv_lens + jnp.minimum(j, jnp.maximum(steps - 1, 0))
        batch = model_input.replace(token_ids=tokens, positions=positions, slot_mapping=slots, kv_lens=kv_lens)
        logits, kv_cache = forward(params, kv_cache, batch)
        result = sample(logits, sampling.replace(step_indices=sampling.step_indices + j), num_logprobs=num_logprobs)
        outputs = jax.tree.map(lambda stacked, x: stacked.at[j].set(x), outputs, result)
        last = jnp.where(j == steps - 1, result.token_ids, last)
        return kv_cache, _rows_of_seqs(result.token_ids, T), last, outputs

    carry = (kv_cache, first_tokens, jnp.zeros(S, jnp.int32), outputs)
    # $PAGEDJAX_MULTI_STEP_UNROLL: iterations a loop trip runs (XLA's while loop against straight-line code).
    unroll = int(os.environ.get("PAGEDJAX_MULTI_STEP_UNROLL", "1"))
    kv_cache, _, last, outputs = jax.lax.fori_loop(0, num_steps, body, carry, unroll=unroll)
    return outputs, last, kv_cache
