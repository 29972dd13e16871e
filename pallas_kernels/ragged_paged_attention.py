"""Ragged paged attention: one call for a flat batch mixing decodes and prefill chunks.

This module holds the pure-jnp reference of the function and the Pallas GPU kernel
(Triton lowering; interpret mode on CPU) that replaces it: ``ragged_paged_attention``
has the reference's signature, so it is a drop-in. On Hopper its prefill launch can be
the Mosaic GPU kernel of ``ragged_prefill_mgpu`` (``Tiling.prefill_kernel``). It knows nothing of models or
requests: only the arrays below.

Layout and conventions (shared by the reference and every kernel):

- ``qkv``: ``[T, Hq + 2*Hkv, D]`` — the new tokens' query, key and value heads in one
  buffer (the layer's fused projection, roped): query heads ``0..Hq-1``, key heads
  ``Hq..Hq+Hkv-1``, value heads ``Hq+Hkv..Hq+2*Hkv-1``; ``Hkv`` is the cache's, so ``Hq``
  follows from the shapes. The tokens of all sequences are concatenated; sequence ``s``
  owns rows ``cu_q_lens[s]:cu_q_lens[s+1]``. Attention reads the query heads only (the
  step's K/V must already be in the pages: ``write_kv`` reads the key and value heads).
  One buffer rather than three arrays: given q, k and v apart, XLA materialises each (at
  batch-1 decode three small launches a layer between the qkv projection and attention,
  each also summing the projection GEMV's K-split partials again); the model writes them
  in one elementwise fusion and the kernels read them by head offset.
- ``k_cache``/``v_cache``: ``[L, Hkv, P, bs, D]`` — every layer's pages
  (head-major so one KV head's pages are contiguous); ``layer`` picks the layer.
  The new tokens' K/V must already be written into the pages.
- ``kv_lens[S]``: tokens in each sequence's cache *including* this step's.
- ``block_tables[S, B]``: page ids of each sequence, in order.
- ``cu_q_lens[S+1]``: cumulative query lengths; padded sequences repeat the last value.
- ``num_seqs``: int32 ``[1]``; sequences from ``num_seqs`` on are padding.
- ``sinks``: optional ``[Hq]`` float (gpt-oss): a logit a query head that joins each row's softmax
  denominator as one more key, whose value is zero; used raw (no ``sm_scale``, no soft cap).

Query token ``i`` of sequence ``s`` sits at absolute position
``kv_lens[s] - q_len[s] + i`` and attends causally to cache slots ``0..pos``
(within ``sliding_window`` if given). Rows that belong to no sequence are zero.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import ragged_prefill_mgpu
from pallas_kernels.env_config import dataclass_from_env
from pallas_kernels.gpu_info import core_count


def token_sequence_ids(cu_q_lens: jax.Array, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Sequence index of each of ``num_tokens`` rows, and a mask of rows that are real."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_q_lens[1:], t, side="right").astype(jnp.int32)
    num_seqs = cu_q_lens.shape[0] - 1
    valid = t < cu_q_lens[-1]
    return jnp.minimum(seq, num_seqs - 1), valid


def query_heads(qkv_shape: tuple, num_kv_heads: int) -> int:
    """``Hq`` of a ``qkv`` buffer ``[T, Hq + 2*Hkv, D]`` (module docstring) over a cache of ``num_kv_heads``
    heads; ``ValueError`` unless ``Hq`` is a positive multiple of ``Hkv``."""
    if len(qkv_shape) != 3:
        raise ValueError(f"qkv must be [T, Hq + 2*Hkv, D], got shape {tuple(qkv_shape)}")
    num_q_heads = qkv_shape[1] - 2 * num_kv_heads
    if num_q_heads <= 0 or num_q_heads % num_kv_heads:
        raise ValueError(f"qkv must be [T, Hq + 2*Hkv, D] with query heads Hq a positive multiple of KV heads "
                         f"(Hkv={num_kv_heads}, the cache's), got {qkv_shape[1]} heads: shape {tuple(qkv_shape)}")
    return num_q_heads


def ragged_paged_attention_reference(
    qkv: jax.Array,
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
    sinks: Optional[jax.Array] = None,
) -> jax.Array:
    """Reference ragged paged attention (see module docstring for the layout): ``[T, Hq, D]``.

    Walks the block tables one page column at a time with an online softmax, so
    memory stays ``O(T * block_size)`` whatever the context length. ``sinks [Hq]`` (gpt-oss): a logit a query
    head that joins each softmax's denominator as a key whose value is zero (the online softmax starts from it).
    """
    _, Hkv, _, bs, _ = k_cache.shape
    Hq = query_heads(qkv.shape, Hkv)
    q = qkv[:, :Hq]
    T, _, D = q.shape
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

    if sinks is None:
        m0, l0 = jnp.full((T, Hkv, group), -jnp.inf, jnp.float32), jnp.zeros((T, Hkv, group), jnp.float32)
    else:
        m0 = jnp.broadcast_to(jnp.asarray(sinks, jnp.float32).reshape(Hkv, group), (T, Hkv, group))
        l0 = jnp.ones((T, Hkv, group), jnp.float32)
    init = (m0, l0, jnp.zeros((T, Hkv, group, D), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(page_column, init, jnp.arange(block_tables.shape[1]))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.reshape(T, Hq, D).astype(q.dtype)


def write_kv_reference(
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array | int,
    qkv: jax.Array,
    slot_mapping: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Write the key and value heads of ``qkv`` ``[T, Hq + 2*Hkv, D]`` (module docstring) into
    ``layer``'s pages at ``slot_mapping[T]``.

    Slot ``p * block_size + o`` is offset ``o`` of page ``p``. Padding tokens point
    at page 0, which the block manager never hands out (a write sink).
    """
    Hkv, bs = k_cache.shape[1], k_cache.shape[3]
    Hq = query_heads(qkv.shape, Hkv)
    k, v = qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]
    page, off = slot_mapping // bs, slot_mapping % bs
    layer = jnp.asarray(layer, jnp.int32)  # all-array indices: updates are [T, Hkv, D]
    k_cache = k_cache.at[layer, :, page, off].set(to_cache_dtype(k, k_cache.dtype))
    v_cache = v_cache.at[layer, :, page, off].set(to_cache_dtype(v, v_cache.dtype))
    return k_cache, v_cache


def to_cache_dtype(x: jax.Array, dtype) -> jax.Array:
    """Cast new K/V to the cache's dtype; float8 pages saturate at their largest finite value
    instead of overflowing to NaN (scale 1, vLLM's default for a checkpoint without KV scales)."""
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits == 8:
        limit = float(jnp.finfo(dtype).max)
        x = jnp.clip(x.astype(jnp.float32), -limit, limit)
    return x.astype(dtype)


# --------------------------------------------------------------------------------------
# Pallas kernel (Triton lowering) and its jitted wrapper.
#
# Two launches share one kernel body:
#   * the decode launch: grid (Hkv, S[, k_splits]); one program per (kv head, sequence)
#     for sequences with at most ``max_decode_tokens`` new tokens. Its query tile packs
#     those tokens x the GQA group's heads into >= 16 rows, so a KV page is read once
#     per KV head. With ``k_splits > 1`` each program covers a slice of the context
#     (split-K) and a third launch, grid (Hkv, S), merges the partial softmaxes.
#   * the prefill launch: grid (Hkv, items); items are query tiles of the longer
#     sequences, found inside the kernel from ``cu_q_lens`` (a cumsum over sequences),
#     then tiles that zero the padding rows past ``cu_q_lens[num_seqs]``.
# Both grids depend only on the static shapes T, S, B: the prefill/decode mix never
# recompiles. Every KV block is fetched by gathering rows ``(layer, head, page, offset)``
# straight out of the full ``[L, Hkv, P, bs, D]`` cache: no layer slice is copied.
# --------------------------------------------------------------------------------------

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)
_F16_MAX = float(jnp.finfo(jnp.float16).max)
_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
# KV pages may also be float8 (kv_cache_dtype="fp8"): the kernel widens each tile to q's dtype.
_SUPPORTED_CACHE_DTYPES = _SUPPORTED_DTYPES + (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile sizes and Triton launch parameters of the two launches (all powers of two).

    ``decode_kv_tokens``/``prefill_kv_tokens``: KV positions per inner-loop step
    (any multiple or fraction of the page size). ``prefill_q_rows``: (token, head)
    rows per prefill query tile. ``k_splits``: context splits of the decode launch;
    ``None`` picks them from the static shapes (more when few programs would run).
    ``prefill_prefetch_pages``: each KV step of the prefill launch loads the next step's page
    numbers (a hand-pipelined block-table read; run 15c, H200: 8 x 2048 prompt step's attention
    40.5 -> 38.3 ms, kernel-prefill 653 -> 601-609 us; in the decode launch it cost 3%, so it is
    the prefill launch's only). ``prefill_longest_first``: the prefill launch runs its work list
    backwards, so a sequence's longest (last) query tiles start first and the last wave is short.
    Defaults: the best of the sweep in ``benchmarks/NOTES.md`` (H200 and H100).
    """

    decode_kv_tokens: int = 128
    decode_warps: int = 4
    decode_stages: int = 2
    prefill_q_rows: int = 128
    prefill_kv_tokens: int = 64
    prefill_warps: int = 8
    prefill_stages: int = 3
    k_splits: Optional[int] = None
    prefill_prefetch_pages: bool = True
    prefill_longest_first: bool = True
    # "mosaic": the prefill launch by the Mosaic GPU kernel (``ragged_prefill_mgpu``: TMA page copies,
    # wgmma, warp-specialised) where it applies (sm_90, 16-bit q and pages alike, head_dim 64/128, no
    # soft cap, window or sinks, steps of at least ``prefill_mosaic_min_tokens`` token rows); the Triton launch
    # elsewhere. "triton": always the Triton launch. Run 18a (H200): tput-prefill's prompt steps 574 ->
    # 589 TFLOP/s (the 8 x 2048 step's attention 38.3 -> 23.6 ms), but each step program it enters costs
    # ~3.6 s more to make (0.7 s of it Python lowering, paid again on a warm start): so only the largest
    # step shapes, where prompt tokens come in bulk, take it.
    prefill_kernel: str = "mosaic"
    prefill_mosaic_min_tokens: int = 8192
    # 8-bit pages: a partly visible KV step loads its K/V tiles whole (False: the tail reads whatever its pages hold,
    # which the scores' mask then weighs by exactly 0; pages are zeroed when made and written only through
    # ``to_cache_dtype``, which saturates, so they hold finite values), or masked, zeros past the context, as 16-bit
    # pages always are (True: for callers whose pages may hold NaN or inf). Triton has no float8 fill value, so the
    # masked form selects after widening the tile to float16, in the load's layout, and the widened K and V go through
    # shared memory (offline compile for sm_90, NOTES.md after run 42f: 100 KB a program against 40 KB whole, 1,587
    # instructions in the longest loop against 999). Run 43a-b (H100): decode attention at 1,024 x 192 10.25 -> 8.77
    # ms, at 448 x 1,536 18.54 -> 18.01; tput-short fp8 with fp8 pages 25,224 -> 25,814 tok/s, tput-long 10,169 ->
    # 10,301.
    masked_8bit_loads: bool = False


@functools.lru_cache(maxsize=None)
def default_tiling() -> Tiling:
    """``Tiling()`` with the fields of the JSON object in ``$PAGEDJAX_ATTENTION_TILING`` (read once),
    e.g. ``'{"prefill_kv_tokens": 128}'``: the engine's tiling, for timing one inside the whole model."""
    return dataclass_from_env(Tiling, "PAGEDJAX_ATTENTION_TILING")


def _next_power_of_2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def padded_head_dim(head_dim: int) -> int:
    """The head columns the Triton kernels compute on: Triton's blocks are powers of two and its dots take
    K >= 16, so a head of another size (Phi-3's 96) runs in the next power of two >= 16. Its loads and stores
    are masked to the real columns (``_rows_mask``): the extra ones load as zeros and are never stored."""
    return max(16, _next_power_of_2(head_dim))


def _head_columns(head_dim: int) -> jax.Array:
    """The ``padded_head_dim`` column indices (past a padded head's end they are only ever masked)."""
    return jnp.arange(padded_head_dim(head_dim), dtype=jnp.int32)


def _rows_mask(valid: Optional[jax.Array], head_dim: int, rows: Optional[int] = None) -> Optional[jax.Array]:
    """``[rows, padded_head_dim]``: the ``valid`` rows' (all ``rows`` rows' for None) real head columns; None where
    nothing is masked. A power-of-two head's mask is its rows' alone, which Triton's loads and stores vectorise as
    they do a mask constant along the row; a padded head's column test (against a multiple of 8 for the usual
    sizes) keeps 16-byte chunks whole."""
    padded = padded_head_dim(head_dim)
    if padded == head_dim:
        return None if valid is None else jnp.broadcast_to(valid[:, None], (valid.shape[0], padded))
    columns = (_head_columns(head_dim) < head_dim)[None, :]
    return columns & (valid[:, None] if valid is not None else jnp.ones((rows, 1), jnp.bool_))


def _is_power_of_2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _tile_rows(h, start, end, *, rows, group, group_pad, num_tokens, head_dim):
    """Rows of a query tile: row ``r`` is token ``start + r // group_pad`` x query head
    ``h * group + r % group_pad``. Returns (token in tile, token, head, valid, store index); the
    index has ``padded_head_dim(head_dim)`` columns (``_store_rows`` masks those past the head)."""
    r = jnp.arange(rows, dtype=jnp.int32)
    tok_in_tile = r // group_pad
    g = r % group_pad
    head = h * group + jnp.minimum(g, group - 1)
    tok = start + tok_in_tile
    valid = (g < group) & (tok < end)
    d = _head_columns(head_dim)
    store_tok = jnp.where(valid, tok, num_tokens)  # out of bounds: never written
    return tok_in_tile, tok, head, valid, (store_tok[:, None], head[:, None], d[None, :])


def prefill_work_items(cu_q_lens: jax.Array, num_seqs: jax.Array, *, num_items: int, tokens_per_tile: int,
                       max_decode_tokens: int, num_tokens: int) -> jax.Array:
    """The prefill launch's work list, int32 ``[6, num_items]``: for each item its sequence, that
    sequence's first and end row, the tile's first and end row, and whether it attends. Items are
    the query tiles of the sequences with more than ``max_decode_tokens`` new tokens, in order,
    then tiles that zero the padding rows past ``cu_q_lens[num_seqs]``. Built once per step in
    plain jnp (a cumsum and a search over the sequences) instead of in each of the launch's
    programs: a decode-only step's prefill launch then costs its empty programs only (run 12,
    H200, 8B at 1024 decodes: the in-kernel search cost 19 us a layer; kernels 28.48 -> 28.18 ms)."""
    S = cu_q_lens.shape[0] - 1
    cu = cu_q_lens.astype(jnp.int32)
    cu_end = cu[jnp.asarray(num_seqs, jnp.int32).reshape(-1)[0]]
    lo, hi = jnp.minimum(cu[:-1], cu_end), jnp.minimum(cu[1:], cu_end)
    q_len = hi - lo
    n_tiles = jnp.where(q_len > max_decode_tokens, (q_len + tokens_per_tile - 1) // tokens_per_tile, 0)
    tiles_through = jnp.cumsum(n_tiles)
    total = tiles_through[-1]
    item = jnp.arange(num_items, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(tiles_through, item, side="right").astype(jnp.int32), S - 1)
    attend = item < total
    seq_start, seq_end = lo[seq], hi[seq]
    start = jnp.where(attend, seq_start + (item - (tiles_through[seq] - n_tiles[seq])) * tokens_per_tile,
                      cu_end + (item - total) * tokens_per_tile)
    end = jnp.minimum(start + tokens_per_tile, jnp.where(attend, seq_end, num_tokens))
    return jnp.stack([seq, seq_start, seq_end, start, end, attend.astype(jnp.int32)])


def _compute_dtype(q_dtype, cache_dtype):
    """The dtype of the kernel's dots: q's, except over 8-bit pages with 16-bit q, where it is float16.
    An e4m3/e5m2 pair widens to float16 in one instruction (sm89+); to bfloat16 it goes through
    float32, which made the decode over fp8 pages slower than over bf16 ones although it reads half
    the bytes (run 14b, H200: 448 sequences at context 1536, 22.2 ms against 20.6 ms a step).
    float16 holds every fp8 value exactly and keeps more of q's mantissa than bfloat16."""
    if jnp.dtype(cache_dtype).itemsize == 1 and jnp.dtype(q_dtype).itemsize == 2:
        return jnp.dtype(jnp.float16)
    return jnp.dtype(q_dtype)


def _masked_load_as(ref, mask, dtype):
    """Masked load (zeros where masked), widened to ``dtype``. Triton cannot make a float8 fill
    value, so 8-bit pages are loaded unfilled and zeroed after the widening."""
    if jnp.dtype(ref.dtype).itemsize == 1:
        return jnp.where(mask, pltriton.load(ref, mask=mask).astype(dtype), 0)
    return pltriton.load(ref, mask=mask, other=0).astype(dtype)


def _store_rows(o_ref, idx, valid, value):
    """Store ``value`` ``[rows, padded_head_dim]`` at ``idx`` (``_tile_rows``): the valid rows' real columns."""
    mask = _rows_mask(valid, o_ref.shape[-1])
    pltriton.store(o_ref.at[idx], value.astype(o_ref.dtype), mask=mask)


def _attention_kernel(
    layer_ref, num_seqs_ref, kv_lens_ref, cu_ref, block_tables_ref, items_ref, *refs,
    has_sinks: bool,
    group: int,
    group_pad: int,
    rows: int,
    kv_tokens: int,
    k_splits: int,
    decode_launch: bool,
    max_decode_tokens: int,
    prefetch_pages: bool,
    longest_first: bool,
    sm_scale: float,
    soft_cap: Optional[float],
    sliding_window: Optional[int],
    masked_loads: bool = True,
):
    """One program: one KV head x one query tile (x one context split). ``refs``: the sinks ``[Hq]`` where
    ``has_sinks``, then ``q_ref``, the ``qkv`` buffer (query head ``i`` is its head ``i``; the key and value heads
    after them are not read), ``k_ref``, ``v_ref`` and the outputs. ``masked_loads``: a partly visible KV step zeroes
    the tiles' positions past the context as it loads them (else it loads them whole: ``Tiling.masked_8bit_loads``).
    A row's sink starts its online softmax (in the first context split only: the merge then counts it once)."""
    sinks_ref = refs[0] if has_sinks else None
    q_ref, k_ref, v_ref, *out_refs = refs[1:] if has_sinks else refs
    T, _, D = q_ref.shape
    S, B = block_tables_ref.shape
    bs = k_ref.shape[3]
    h = pl.program_id(0)
    item = pl.program_id(1)
    if longest_first:
        item = pl.num_programs(1) - 1 - item
    split = pl.program_id(2) if k_splits > 1 else 0
    layer = layer_ref[0]
    d = _head_columns(D)  # D padded to a power of two (padded_head_dim)
    Dp = d.shape[0]

    if decode_launch:
        cu_end = cu_ref[num_seqs_ref[0]]  # rows from here on belong to no sequence
        seq = item
        seq_start = jnp.minimum(cu_ref[seq], cu_end)
        seq_end = jnp.minimum(cu_ref[seq + 1], cu_end)
        q_len = seq_end - seq_start
        start, end = seq_start, seq_end
        attend_here = (q_len > 0) & (q_len <= max_decode_tokens)
        zero_here = None
    else:  # the step's work list (prefill_work_items), the same for every layer
        seq, seq_start, seq_end = items_ref[0, item], items_ref[1, item], items_ref[2, item]
        start, end = items_ref[3, item], items_ref[4, item]
        attend_here = items_ref[5, item] > 0
        zero_here = jnp.logical_not(attend_here) & (start < T)

    tok_in_tile, tok, head, row_valid, out_idx = _tile_rows(
        h, start, end, rows=rows, group=group, group_pad=group_pad, num_tokens=T, head_dim=D)

    @pl.when(attend_here)
    def _attend():
        kv_len = kv_lens_ref[seq]
        first_pos = kv_len - (seq_end - seq_start) + (start - seq_start)
        last_pos = first_pos + (end - start) - 1
        pos = first_pos + tok_in_tile  # absolute position of each row's token
        hi = last_pos + 1  # KV positions [lo, hi) are needed by some row
        if sliding_window is None:
            lo = 0
            full_lo_pos = 0
        else:
            lo = jnp.maximum(first_pos - sliding_window + 1, 0)
            full_lo_pos = jnp.maximum(last_pos - sliding_window + 1, 0)
        blk_lo = lo // kv_tokens
        blk_hi = (hi + kv_tokens - 1) // kv_tokens
        if k_splits > 1:
            per_split = (blk_hi - blk_lo + k_splits - 1) // k_splits
            blk_lo = jnp.minimum(blk_lo + split * per_split, blk_hi)
            blk_hi = jnp.minimum(blk_lo + per_split, blk_hi)

        def clamp(b):
            return jnp.minimum(jnp.maximum(b, blk_lo), blk_hi)

        # Blocks in [unmasked_lo, unmasked_hi) are visible to every row of the tile.
        unmasked_lo = clamp((full_lo_pos + kv_tokens - 1) // kv_tokens)
        unmasked_hi = jnp.maximum(unmasked_lo, clamp((first_pos + 1) // kv_tokens))

        q = pltriton.load(q_ref.at[jnp.minimum(tok, T - 1)[:, None], head[:, None], d[None, :]],
                          mask=_rows_mask(row_valid, D), other=0)
        compute_dtype = _compute_dtype(q.dtype, k_ref.dtype)
        if compute_dtype != q.dtype:  # bfloat16 q onto float16 dots: past float16's range it saturates
            q = jnp.clip(q.astype(jnp.float32), -_F16_MAX, _F16_MAX)
        q = q.astype(compute_dtype)
        precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

        def pages_of(j):
            c = j * kv_tokens + jnp.arange(kv_tokens, dtype=jnp.int32)
            return pltriton.load(block_tables_ref.at[seq, jnp.minimum(c // bs, B - 1)], mask=c < hi, other=0)

        def block(j, carry, masked):
            if prefetch_pages:  # this step's pages came with the carry; the next step's load now
                m, l, acc, page = carry
                next_page = pages_of(j + 1)
            else:
                m, l, acc = carry
            c = j * kv_tokens + jnp.arange(kv_tokens, dtype=jnp.int32)
            if masked:
                in_kv = c < hi
                if not prefetch_pages:
                    page = pages_of(j)
                kv_idx = (layer, h, page[:, None], (c % bs)[:, None], d[None, :])
                # Past the context unmasked: page 0 (pages_of's fill) or the last page's unused slots, finite.
                kv_mask = _rows_mask(in_kv if masked_loads else None, D, kv_tokens)
            else:
                if not prefetch_pages:
                    page = block_tables_ref[seq, c // bs]
                kv_idx = (layer, h, page[:, None], (c % bs)[:, None], d[None, :])
                kv_mask = _rows_mask(None, D, kv_tokens)
            if kv_mask is None:
                k, v = k_ref[kv_idx], v_ref[kv_idx]
            else:
                k = _masked_load_as(k_ref.at[kv_idx], kv_mask, q.dtype)
                v = _masked_load_as(v_ref.at[kv_idx], kv_mask, q.dtype)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32, precision=precision)
            if soft_cap is not None:
                s = jnp.tanh(s * (sm_scale / soft_cap)) * (soft_cap * _LOG2E)
            else:
                s = s * (sm_scale * _LOG2E)
            if masked:
                visible = c[None, :] <= pos[:, None]
                if sliding_window is not None:
                    visible &= c[None, :] > pos[:, None] - sliding_window
                s = jnp.where(visible, s, _MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - m_new[:, None])
            l = l * alpha + p.sum(axis=1)
            pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32, precision=precision)
            if prefetch_pages:
                return m_new, l, acc * alpha[:, None] + pv, next_page
            return m_new, l, acc * alpha[:, None] + pv

        m0, l0 = jnp.full((rows,), _MASK_VALUE, jnp.float32), jnp.zeros((rows,), jnp.float32)
        if sinks_ref is not None:  # base 2, as the scores
            first_split = split == 0
            m0 = jnp.where(first_split, pltriton.load(sinks_ref.at[head]).astype(jnp.float32) * _LOG2E, m0)
            l0 = jnp.where(first_split, 1.0, l0)
        carry = (m0, l0, jnp.zeros((rows, Dp), jnp.float32))
        if prefetch_pages:
            carry += (pages_of(blk_lo),)
        masked_block = functools.partial(block, masked=True)
        unmasked_block = functools.partial(block, masked=False)
        carry = lax.fori_loop(blk_lo, unmasked_lo, masked_block, carry)
        carry = lax.fori_loop(unmasked_lo, unmasked_hi, unmasked_block, carry)
        m, l, acc = lax.fori_loop(unmasked_hi, blk_hi, masked_block, carry)[:3]

        if k_splits > 1:
            acc_ref, m_ref, l_ref = out_refs
            acc_ref[split, item, h] = acc
            m_ref[split, item, h] = m
            l_ref[split, item, h] = l
        else:
            _store_rows(out_refs[-1], out_idx, row_valid, acc / jnp.where(l > 0, l, 1.0)[:, None])

    if zero_here is not None:

        @pl.when(zero_here)
        def _zero_padding_rows():
            _store_rows(out_refs[-1], out_idx, row_valid, jnp.zeros((rows, Dp), jnp.float32))


def _merge_splits_kernel(num_seqs_ref, cu_ref, acc_ref, m_ref, l_ref, _, o_ref, *,
                         group: int, group_pad: int, max_decode_tokens: int):
    """Combine the decode launch's per-split softmax partials of one (kv head, sequence)
    and write its rows of the output (which the launch before filled elsewhere)."""
    k_splits, _, _, rows, Dp = acc_ref.shape  # Dp: padded_head_dim of the output's head_dim
    T, _, D = o_ref.shape
    h, seq = pl.program_id(0), pl.program_id(1)
    cu_end = cu_ref[num_seqs_ref[0]]
    start = jnp.minimum(cu_ref[seq], cu_end)
    end = jnp.minimum(cu_ref[seq + 1], cu_end)
    _, _, _, row_valid, out_idx = _tile_rows(
        h, start, end, rows=rows, group=group, group_pad=group_pad, num_tokens=T, head_dim=D)

    @pl.when((end - start > 0) & (end - start <= max_decode_tokens))
    def _merge():
        m = jnp.full((rows,), _MASK_VALUE, jnp.float32)
        l = jnp.zeros((rows,), jnp.float32)
        acc = jnp.zeros((rows, Dp), jnp.float32)
        for k in range(k_splits):
            m_k, l_k, acc_k = m_ref[k, seq, h], l_ref[k, seq, h], acc_ref[k, seq, h]
            m_new = jnp.maximum(m, m_k)
            a, b = jnp.exp2(m - m_new), jnp.exp2(m_k - m_new)
            l = l * a + l_k * b
            acc = acc * a[:, None] + acc_k * b[:, None]
            m = m_new
        _store_rows(o_ref, out_idx, row_valid, acc / jnp.where(l > 0, l, 1.0)[:, None])


def _check_inputs(qkv, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, num_seqs, sliding_window, sinks):
    if k_cache.ndim != 5:
        raise ValueError(f"k_cache must be [L, Hkv, P, block_size, D], got shape {k_cache.shape}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must have the same shape")
    _, Hkv, _, _, Dk = k_cache.shape
    Hq = query_heads(qkv.shape, Hkv)
    D = qkv.shape[2]
    if Dk != D:
        raise ValueError(f"head_dim of qkv ({D}) and of the cache ({Dk}) differ")
    if jnp.dtype(qkv.dtype) not in _SUPPORTED_DTYPES:
        raise ValueError(f"qkv dtype must be bfloat16, float16 or float32, got {qkv.dtype}")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if jnp.dtype(x.dtype) not in _SUPPORTED_CACHE_DTYPES:
            raise ValueError(f"{name} dtype must be bfloat16, float16, float32, float8_e4m3fn or float8_e5m2, "
                             f"got {x.dtype}")
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be [S, B], got shape {block_tables.shape}")
    S = block_tables.shape[0]
    if kv_lens.shape != (S,):
        raise ValueError(f"kv_lens must be [S={S}], got shape {kv_lens.shape}")
    if cu_q_lens.shape != (S + 1,):
        raise ValueError(f"cu_q_lens must be [S+1={S + 1}], got shape {cu_q_lens.shape}")
    if jnp.size(num_seqs) != 1:
        raise ValueError(f"num_seqs must hold one value, got shape {jnp.shape(num_seqs)}")
    for name, x in (("kv_lens", kv_lens), ("block_tables", block_tables), ("cu_q_lens", cu_q_lens),
                    ("num_seqs", num_seqs)):
        if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
            raise ValueError(f"{name} must be an integer array, got {jnp.result_type(x)}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    # The kernel gathers a row's sink by its query head, unchecked on the GPU: another length would read past it.
    if sinks is not None and (jnp.shape(sinks) != (Hq,) or not jnp.issubdtype(jnp.result_type(sinks), jnp.floating)):
        raise ValueError(f"sinks must be a float array [Hq={Hq}] (a logit a query head), got "
                         f"{jnp.result_type(sinks)} of shape {jnp.shape(sinks)}")


def _check_tiling(tiling: Tiling):
    for name in ("decode_kv_tokens", "prefill_q_rows", "prefill_kv_tokens"):
        value = getattr(tiling, name)
        if not _is_power_of_2(value) or value < 16:
            raise ValueError(f"Tiling.{name} must be a power of two >= 16, got {value}")
    if tiling.k_splits is not None and tiling.k_splits < 1:
        raise ValueError(f"Tiling.k_splits must be >= 1 or None, got {tiling.k_splits}")
    if tiling.prefill_kernel not in PREFILL_KERNELS:
        raise ValueError(f"Tiling.prefill_kernel must be one of {', '.join(PREFILL_KERNELS)}, got {tiling.prefill_kernel!r}")
    if tiling.prefill_mosaic_min_tokens < 0:
        raise ValueError(f"Tiling.prefill_mosaic_min_tokens must be >= 0, got {tiling.prefill_mosaic_min_tokens}")


PREFILL_KERNELS = ("triton", "mosaic")


def mosaic_work_list(cu_q_lens, kv_lens, num_seqs, *, num_items: int, tokens_per_tile: int, block_kv: int,
                     max_decode_tokens: int, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """The Mosaic GPU prefill launch's work list: ``prefill_work_items``' six rows and a seventh, the
    K/V blocks of ``block_kv`` tokens an item reads (up to its last row's position; 0 where it attends to
    nothing), sorted by that cost, most first (its persistent programs take items in turn, so the longest
    go first and the last round is short), the padding items after them, then the empty ones; and the
    count of non-empty items, int32 [1]."""
    items = prefill_work_items(cu_q_lens, num_seqs, num_items=num_items, tokens_per_tile=tokens_per_tile,
                               max_decode_tokens=max_decode_tokens, num_tokens=num_tokens)
    seq, seq_start, seq_end, start, end, attend = items
    last_pos = kv_lens.astype(jnp.int32)[seq] - (seq_end - seq_start) + (end - 1 - seq_start)
    blocks = jnp.where(attend > 0, last_pos // block_kv + 1, 0)
    cost = jnp.where(attend > 0, blocks, jnp.where(start < num_tokens, 0, -1))
    order = jnp.argsort(-cost, stable=True)
    return jnp.concatenate([items, blocks[None]])[:, order], jnp.sum(cost >= 0, dtype=jnp.int32).reshape(1)


def auto_k_splits(num_programs: int, max_kv_blocks: int) -> int:
    """Context splits for the decode launch: enough programs to fill the GPU (about
    four per multiprocessor), each split keeping at least four KV blocks."""
    target = 4 * core_count()
    k = 1
    while k < 16 and 2 * k * num_programs <= target and max_kv_blocks >= 8 * k:
        k *= 2
    return k


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "soft_cap", "sliding_window", "tiling", "interpret"))
def ragged_paged_attention(
    qkv: jax.Array,
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
    sinks: Optional[jax.Array] = None,
    tiling: Tiling = Tiling(),
    interpret: Optional[bool] = None,
) -> jax.Array:
    """Pallas (Triton) ragged paged attention; same contract as the reference: ``[T, Hq, D]``.

    The Triton launches read the query heads straight out of ``qkv`` (query head ``i`` is head ``i``
    of the buffer: no slice is made); the Mosaic GPU prefill launch gets them sliced out (not with ``sinks``,
    whose prompts take the Triton prefill launch).
    ``interpret=None`` compiles on GPU and interprets elsewhere. Raises ``ValueError``
    for inconsistent shapes or unsupported head dims / dtypes.
    """
    _check_inputs(qkv, k_cache, v_cache, kv_lens, block_tables, cu_q_lens, num_seqs, sliding_window, sinks)
    _check_tiling(tiling)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    _, Hkv, _, bs, _ = k_cache.shape
    Hq = query_heads(qkv.shape, Hkv)
    T, _, D = qkv.shape
    S, B = block_tables.shape
    group = Hq // Hkv
    group_pad = _next_power_of_2(group)
    decode_rows = max(16, group_pad)
    max_decode_tokens = decode_rows // group_pad
    prefill_rows = max(tiling.prefill_q_rows, group_pad)
    prefill_tokens = prefill_rows // group_pad
    scale = float(sm_scale) if sm_scale is not None else D**-0.5

    metadata = (
        jnp.asarray(layer, jnp.int32).reshape(1),
        jnp.asarray(num_seqs, jnp.int32).reshape(1),
        kv_lens.astype(jnp.int32),
        cu_q_lens.astype(jnp.int32),
        block_tables.astype(jnp.int32),
    )
    kernel = functools.partial(
        _attention_kernel, has_sinks=sinks is not None, group=group, group_pad=group_pad,
        max_decode_tokens=max_decode_tokens,
        sm_scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
        masked_loads=tiling.masked_8bit_loads or jnp.dtype(k_cache.dtype).itemsize != 1)
    out_shape = jax.ShapeDtypeStruct((T, Hq, D), qkv.dtype)

    # Prefill launch: query tiles of sequences with more than max_decode_tokens new
    # tokens, then the tiles that zero padding rows. Upper bound on the item count:
    # sum over (long sequences + padding) of ceil(len / tile) < T / tile + n_long + 1.
    max_long_seqs = min(S, T // (max_decode_tokens + 1))
    sink_refs = () if sinks is None else (jnp.asarray(sinks, jnp.float32),)  # after the work list
    use_mosaic = (tiling.prefill_kernel == "mosaic" and T >= tiling.prefill_mosaic_min_tokens and not interpret
                  and sinks is None
                  and ragged_prefill_mgpu.supported(qkv.dtype, k_cache.dtype, D, bs, soft_cap=soft_cap,
                                                    sliding_window=sliding_window))
    if use_mosaic:
        tokens = 2 * ragged_prefill_mgpu.BLOCK_Q
        items, count = mosaic_work_list(cu_q_lens, kv_lens, num_seqs, num_items=pl.cdiv(T, tokens) + max_long_seqs,
                                        tokens_per_tile=tokens, block_kv=ragged_prefill_mgpu.BLOCK_KV,
                                        max_decode_tokens=max_decode_tokens, num_tokens=T)
        metadata += (items,)  # the decode launch reads no work list
        layer_i32, _, kv_lens_i32, _, tables_i32 = metadata[:5]
        # Its TMA copies take q as [T, Hq, D]: an XLA slice of the query heads (in steps of >= 8192 rows, small
        # beside the attention itself).
        out = ragged_prefill_mgpu.ragged_prefill_mgpu(
            qkv[:, :Hq], k_cache, v_cache, layer_i32, kv_lens_i32, tables_i32, items, count, sm_scale=scale,
            workers_per_head=max(1, core_count() // Hq))
    elif max_long_seqs == 0:
        # No sequence can have more than max_decode_tokens new tokens (T <= max_decode_tokens: batch-1 decode):
        # the decode launch does all the work, and zeros stand in for the launch that would only zero padding
        # rows (a memset, not a kernel a layer: ~1.4 us each at batch 1 on an H200, run 18c).
        metadata += (jnp.zeros((1,), jnp.int32),)  # the decode launch reads no work list
        out = jnp.zeros(out_shape.shape, out_shape.dtype)
    else:
        num_items = pl.cdiv(T, prefill_tokens) + max_long_seqs
        metadata += (prefill_work_items(cu_q_lens, num_seqs, num_items=num_items, tokens_per_tile=prefill_tokens,
                                        max_decode_tokens=max_decode_tokens, num_tokens=T),)
        out = pl.pallas_call(
            functools.partial(kernel, rows=prefill_rows, kv_tokens=tiling.prefill_kv_tokens, k_splits=1,
                              decode_launch=False, prefetch_pages=tiling.prefill_prefetch_pages,
                              longest_first=tiling.prefill_longest_first),
            grid=(Hkv, num_items),
            out_shape=out_shape,
            compiler_params=pltriton.CompilerParams(num_warps=tiling.prefill_warps,
                                                    num_stages=tiling.prefill_stages),
            interpret=interpret,
            name="ragged_paged_attention_prefill",
        )(*metadata, *sink_refs, qkv, k_cache, v_cache)

    # Decode launch: one program per (kv head, sequence[, context split]).
    max_kv_blocks = pl.cdiv(B * bs, tiling.decode_kv_tokens)
    k_splits = tiling.k_splits or auto_k_splits(Hkv * S, max_kv_blocks)
    decode_kernel = functools.partial(kernel, rows=decode_rows, kv_tokens=tiling.decode_kv_tokens,
                                      k_splits=k_splits, decode_launch=True, prefetch_pages=False,
                                      longest_first=False)
    params = pltriton.CompilerParams(num_warps=tiling.decode_warps, num_stages=tiling.decode_stages)
    if k_splits == 1:
        return pl.pallas_call(
            decode_kernel,
            grid=(Hkv, S),
            out_shape=out_shape,
            input_output_aliases={len(metadata) + len(sink_refs) + 3: 0},
            compiler_params=params,
            interpret=interpret,
            name="ragged_paged_attention_decode",
        )(*metadata, *sink_refs, qkv, k_cache, v_cache, out)
    partial_shape = (k_splits, S, Hkv, decode_rows)
    acc, m, l = pl.pallas_call(
        decode_kernel,
        grid=(Hkv, S, k_splits),
        out_shape=(
            jax.ShapeDtypeStruct(partial_shape + (padded_head_dim(D),), jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
            jax.ShapeDtypeStruct(partial_shape, jnp.float32),
        ),
        compiler_params=params,
        interpret=interpret,
        name="ragged_paged_attention_decode_split",
    )(*metadata, *sink_refs, qkv, k_cache, v_cache)
    return pl.pallas_call(
        functools.partial(_merge_splits_kernel, group=group, group_pad=group_pad,
                          max_decode_tokens=max_decode_tokens),
        grid=(Hkv, S),
        out_shape=out_shape,
        input_output_aliases={5: 0},
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="ragged_paged_attention_merge_splits",
    )(metadata[1], metadata[3], acc, m, l, out)


# --------------------------------------------------------------------------------------
# KV write: a Pallas kernel with the reference's contract (write_kv_reference).
#
# Grid (Hkv, token tiles): each program copies a tile of one KV head's new K and V rows
# (read out of the qkv buffer by head offset) into their pages, in place (the caches are
# aliased to the outputs). XLA's scatter of
# the reference wrote K and V in two launches at ~0.26 TB/s on the H200 (run 12: 4.2 ms
# each per 16384-token prompt step of the 8B); this kernel took 1.1 ms (run 13a) and is the
# GPU default. Like the attention wrapper it is jitted: the unrolled step's layers then share
# one traced kernel and one lowering (un-jitted, each of the 8B's 32 layers traced and lowered
# its own copy: on the CPU machine 34 kernel lowerings of ~0.25 s for a step, now 3).
# --------------------------------------------------------------------------------------

KV_WRITE_TOKENS = 64  # token rows per program


def _write_kv_kernel(layer_ref, slots_ref, qkv_ref, _k_in, _v_in, k_out, v_out, *, tokens: int, k_head: int):
    """Key head ``h`` is head ``k_head + h`` of the ``qkv`` buffer, value head ``h`` head ``k_head + Hkv + h``."""
    T, _, D = qkv_ref.shape
    Hkv, bs = k_out.shape[1], k_out.shape[3]
    h = pl.program_id(0)
    t = pl.program_id(1) * tokens + jnp.arange(tokens, dtype=jnp.int32)
    valid = t < T
    t = jnp.minimum(t, T - 1)
    # Rows past T aim at the sink page 0: a masked store there is harmless wherever it lands (the
    # interpreter writes masked rows back with their old value, which must not hit a real slot).
    slot = jnp.where(valid, slots_ref[t], 0)
    d = _head_columns(D)  # padded to a power of two: the extra columns are masked
    mask = _rows_mask(valid, D)
    dst = (layer_ref[0], h, (slot // bs)[:, None], (slot % bs)[:, None], d[None, :])
    for src_head, out_ref in ((k_head + h, k_out), (k_head + Hkv + h, v_out)):
        rows = pltriton.load(qkv_ref.at[t[:, None], src_head, d[None, :]], mask=mask, other=0)
        pltriton.store(out_ref.at[dst], to_cache_dtype(rows, out_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("tokens_per_program", "interpret"))
def write_kv(
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer: jax.Array | int,
    qkv: jax.Array,
    slot_mapping: jax.Array,
    *,
    tokens_per_program: int = KV_WRITE_TOKENS,
    interpret: Optional[bool] = None,
) -> tuple[jax.Array, jax.Array]:
    """Pallas KV write, in place; same contract as ``write_kv_reference``: the key and value heads
    of ``qkv`` ``[T, Hq + 2*Hkv, D]``, read by head offset (padding tokens write into page 0, the
    sink). Raises ``ValueError`` for inconsistent shapes."""
    if k_cache.ndim != 5 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must be [L, Hkv, P, block_size, D] alike, got {k_cache.shape} "
                         f"and {v_cache.shape}")
    _, Hkv, _, _, D = k_cache.shape
    Hq = query_heads(qkv.shape, Hkv)
    if qkv.shape[2] != D:
        raise ValueError(f"qkv must be [T, Hq + 2*Hkv, D={D}] (the cache's head_dim), got shape {qkv.shape}")
    T = qkv.shape[0]
    if slot_mapping.shape != (T,):
        raise ValueError(f"slot_mapping must be [T={T}], got shape {slot_mapping.shape}")
    if not _is_power_of_2(tokens_per_program):
        raise ValueError(f"tokens_per_program must be a power of two, got {tokens_per_program}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return pl.pallas_call(
        functools.partial(_write_kv_kernel, tokens=tokens_per_program, k_head=Hq),
        grid=(Hkv, pl.cdiv(T, tokens_per_program)),
        out_shape=(jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                   jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
        input_output_aliases={3: 0, 4: 1},  # operands: layer, slots, qkv, k_cache, v_cache
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="write_kv",
    )(jnp.asarray(layer, jnp.int32).reshape(1), slot_mapping.astype(jnp.int32), qkv, k_cache, v_cache)
