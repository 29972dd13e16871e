"""Ragged paged attention: one call for a flat batch mixing decodes and prefill chunks.

This module holds the pure-jnp reference of the function; the Pallas GPU kernel
that replaces it lives beside it (same signature, so it is a drop-in).

Layout and conventions (shared by the reference and every kernel):

- ``q``: ``[T, Hq, D]`` — the new tokens of all sequences, concatenated; sequence
  ``s`` owns rows ``cu_q_lens[s]:cu_q_lens[s+1]``.
- ``k_cache``/``v_cache``: ``[L, Hkv, P, bs, D]`` — every layer's pages
  (head-major so one KV head's pages are contiguous); ``layer`` picks the layer.
  The new tokens' K/V must already be written into the pages.
- ``kv_lens[S]``: tokens in each sequence's cache *including* this step's.
- ``block_tables[S, B]``: page ids of each sequence, in order.
- ``cu_q_lens[S+1]``: cumulative query lengths; padded sequences repeat the last value.
- ``num_seqs``: int32 ``[1]``; sequences from ``num_seqs`` on are padding.

Query token ``i`` of sequence ``s`` sits at absolute position
``kv_lens[s] - q_len[s] + i`` and attends causally to cache slots ``0..pos``
(within ``sliding_window`` if given). Rows that belong to no sequence are zero.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def token_sequence_ids(cu_q_lens: jax.Array, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Sequence index of each of ``num_tokens`` rows, and a mask of rows that are real."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)
    num_seqs = cu_q_lens.shape[0] - 1
    valid = t < cu_q_lens[-1]
    return jnp.minimum(seq, num_seqs - 1), valid


def ragged_paged_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array | int,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: Optional[float] = None,
    soft_cap: Optional[float] = None,
    sliding_window: Optional[int] = None,
) -> jax.Array:
    """Reference ragged paged attention (see module docstring for the layout).

    Walks the block tables one page column at a time with an online softmax, so
    memory stays ``O(T * block_size)`` whatever the context length.
    """
    T, Hq, D = q.shape
    _, Hkv, _, bs, _ = k_cache.shape
    group = Hq // Hkv
    scale = sm_scale if sm_scale is not None else D**-0.5
    num_seqs = jnp.asarray(num_seqs, jnp.int32).reshape(())
    # Sequences from num_seqs on are padding: clamp their query ranges to empty.
    cu = jnp.minimum(cu_q_lens, cu_q_lens[num_seqs])
    seq, valid = token_sequence_ids(cu, T)
    q_len = cu[seq + 1] - cu[seq]
    pos = kv_lens[seq] - q_len + (jnp.arange(T) - cu[seq])  # [T]
    qg = q.reshape(T, Hkv, group, D).astype(jnp.float32) * scale
    layer = jnp.asarray(layer, jnp.int32)  # an array index keeps gathered dims first

    def page_column(carry, b):
        m, l, acc = carry
        page = block_tables[seq, b]  # [T]
        k = k_cache[layer, :, page].astype(jnp.float32)  # [T, Hkv, bs, D]
        v = v_cache[layer, :, page].astype(jnp.float32)
        s = jnp.einsum("thgd,thsd->thgs", qg, k)
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kv_pos = b * bs + jnp.arange(bs)  # [bs]
        mask = (kv_pos[None, :] <= pos[:, None]) & valid[:, None]
        if sliding_window is not None:
            mask &= kv_pos[None, :] > pos[:, None] - sliding_window
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + jnp.einsum("thgs,thsd->thgd", p, v)
        return (m_new, l, acc), None

    init = (
        jnp.full((T, Hkv, group), -jnp.inf, jnp.float32),
        jnp.zeros((T, Hkv, group), jnp.float32),
        jnp.zeros((T, Hkv, group, D), jnp.float32),
    )
    (m, l, acc), _ = jax.lax.scan(page_column, init, jnp.arange(block_tables.shape[1]))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.reshape(T, Hq, D).astype(q.dtype)


def write_kv_reference(
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array | int,
    k: jax.Array,
    v: jax.Array,
    slot_mapping: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Write new ``k``/``v`` ``[T, Hkv, D]`` into ``layer``'s pages at ``slot_mapping[T]``.

    Slot ``p * block_size + o`` is offset ``o`` of page ``p``. Padding tokens point
    at page 0, which the block manager never hands out (a write sink).
    """
    bs = k_cache.shape[3]
    page, off = slot_mapping // bs, slot_mapping % bs
    layer = jnp.asarray(layer, jnp.int32)  # all-array indices: updates are [T, Hkv, D]
    k_cache = k_cache.at[layer, :, page, off].set(k.astype(k_cache.dtype))
    v_cache = v_cache.at[layer, :, page, off].set(v.astype(v_cache.dtype))
    return k_cache, v_cache
