"""Ragged paged attention: the Pallas kernel against the pure-jnp reference, and the KV write.

On CPU the kernel runs in interpret mode (one compile per configuration, reused by
every scenario of the same padded shapes, as the engine's buckets do); with
``-m gpu`` it is compiled by Triton. Every cache slot that no sequence owns (other
layers, unreferenced pages, page 0, the tail of each last page) is NaN in the
kernel's cache, so reading a wrong slot shows up as NaN or as a mismatch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import get_attention_fns, ragged_prefill_mgpu
from pallas_kernels.ragged_paged_attention import (
    mosaic_work_list,
    prefill_work_items,
    write_kv,
    Tiling,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv_reference,
)

FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0}  # interpret-mode programs are big
ATOL = {jnp.float32: 2e-5, jnp.float16: 4e-3, jnp.bfloat16: 3e-2}
SMALL_TILES = Tiling(decode_kv_tokens=16, prefill_q_rows=16, prefill_kv_tokens=16, k_splits=1)


@dataclasses.dataclass(frozen=True)
class Shapes:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: type
    num_tokens: int = 48
    max_seqs: int = 6
    pages_per_seq: int = 6
    num_pages: int = 48
    num_layers: int = 2
    cache_dtype: type = None  # KV pages' dtype when it differs from q's (float8 KV cache)


def make_batch(rng, shapes: Shapes, q_lens, kv_lens, layer=1, poison_value=np.nan):
    """Random step inputs: sequence i has ``q_lens[i]`` new tokens ending at ``kv_lens[i]``.

    Returns ``(kernel_args, reference_args, num_tokens_used)``; the two argument
    tuples are equal except that the kernel's caches are NaN wherever no sequence
    owns the slot (``poison_value``: the Mosaic GPU prefill kernel copies whole pages and needs finite
    values there, so its cases poison with a large finite value that shows as a mismatch instead), and
    so are the key and value heads of its ``qkv`` buffer (attention reads the query heads only).
    Padded block-table entries and the kv_lens of padded sequences
    are garbage pointing at such slots; pages are handed out in random order.
    """
    S, T, B, P = shapes.max_seqs, shapes.num_tokens, shapes.pages_per_seq, shapes.num_pages
    L, Hkv, bs, D = shapes.num_layers, shapes.num_kv_heads, shapes.block_size, shapes.head_dim
    n = len(q_lens)
    assert n <= S and sum(q_lens) <= T and all(q <= k <= B * bs for q, k in zip(q_lens, kv_lens))
    pages = rng.permutation(np.arange(1, P))
    need = sum(-(-k // bs) for k in kv_lens)
    assert need < len(pages)
    unowned = np.concatenate([[0], pages[need:]])
    block_tables = rng.choice(unowned, size=(S, B)).astype(np.int32)
    owned = np.zeros((P, bs), bool)
    used = 0
    for s, kv_len in enumerate(kv_lens):
        npg = -(-kv_len // bs)
        block_tables[s, :npg] = pages[used:used + npg]
        used += npg
        for i in range(kv_len):
            owned[block_tables[s, i // bs], i % bs] = True
    kv_lens_arr = rng.integers(1, B * bs, S).astype(np.int32)  # garbage for padded sequences
    kv_lens_arr[:n] = kv_lens
    cu = np.full(S + 1, sum(q_lens), np.int32)
    cu[: n + 1] = np.concatenate([[0], np.cumsum(q_lens)])

    k = rng.standard_normal((L, Hkv, P, bs, D), np.float32)
    v = rng.standard_normal((L, Hkv, P, bs, D), np.float32)
    poison = ~owned[None, None, :, :, None] | (np.arange(L) != layer)[:, None, None, None, None]
    q = rng.standard_normal((T, shapes.num_heads, D), np.float32)
    new_kv = rng.standard_normal((T, 2 * Hkv, D), np.float32)  # this step's K/V: already in the pages
    meta = (jnp.int32(layer), jnp.asarray(kv_lens_arr), jnp.asarray(block_tables), jnp.asarray(cu),
            jnp.asarray([n], jnp.int32))

    cache_dtype = shapes.cache_dtype or shapes.dtype

    def args(k, v, new_kv):
        qkv = jnp.asarray(np.concatenate([q, new_kv], axis=1), shapes.dtype)
        return (qkv, jnp.asarray(k, cache_dtype), jnp.asarray(v, cache_dtype)) + meta

    return (args(np.where(poison, poison_value, k), np.where(poison, poison_value, v),
                 np.full_like(new_kv, poison_value)), args(k, v, new_kv), int(cu[-1]))


def scenarios(shapes: Shapes, rng):
    """(name, q_lens, kv_lens) covering decode, prefill, mixed and random batches."""
    bs = shapes.block_size
    yield "decode", [1] * 5, [1, bs, bs + 1, 2 * bs - 1, 3 * bs + 5]
    yield "prefill", [bs + 1, bs, 1, 9], [bs + 1, bs, 1, 9]
    yield "mixed", [1, 3, bs + 2, 1, 5, 1], [2 * bs, 3 * bs + 1, 2 * bs + 3, 1, 5, bs]
    n = int(rng.integers(1, shapes.max_seqs + 1))
    q_lens = rng.multinomial(shapes.num_tokens - int(rng.integers(0, 8)), np.ones(n) / n).clip(1)
    q_lens = [int(x) for x in q_lens]
    while sum(q_lens) > shapes.num_tokens:
        q_lens[int(np.argmax(q_lens))] -= 1
    kv_lens = [int(rng.integers(q, shapes.pages_per_seq * bs + 1)) for q in q_lens]
    yield "random", q_lens, kv_lens


def assert_matches(out, ref, num_tokens_used, dtype, atol=None):
    out = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(ref.astype(jnp.float32))
    assert np.isfinite(out).all(), "kernel read a slot it does not own (NaN in the output)"
    assert (out[num_tokens_used:] == 0).all(), "padding rows must be zero"
    np.testing.assert_allclose(out, ref, atol=atol or ATOL[dtype], rtol=0)


def assert_scenario_matches(out, ref, num_tokens_used, dtype, seed, scenario: tuple, atol=None):
    """``assert_matches``, a failure named by the inputs' seed and its scenario ``(name, q_lens, kv_lens)``."""
    name, q_lens, kv_lens = scenario
    try:
        assert_matches(out, ref, num_tokens_used, dtype, atol=atol)
    except AssertionError as e:
        raise AssertionError(f"seed {seed}, scenario {name}: q_lens={q_lens} kv_lens={kv_lens}\n{e}") from None


def compile_for_cpu(fn, args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_CPU_COMPILE)


CPU_CASES = [
    # (shapes, kernel keyword arguments)
    pytest.param(Shapes(4, 4, 64, 16, jnp.float32), dict(tiling=SMALL_TILES), id="ratio1-d64-bs16-f32"),
    pytest.param(Shapes(8, 2, 128, 32, jnp.bfloat16, num_tokens=96),
                 dict(tiling=Tiling(decode_kv_tokens=32, prefill_q_rows=32, prefill_kv_tokens=32, k_splits=1)),
                 id="ratio4-d128-bs32-bf16"),
    pytest.param(Shapes(8, 1, 64, 16, jnp.float16), dict(tiling=dataclasses.replace(SMALL_TILES, k_splits=2)),
                 id="ratio8-d64-bs16-f16-split2"),
    pytest.param(Shapes(6, 2, 64, 32, jnp.float32, num_tokens=96),
                 dict(tiling=SMALL_TILES), id="ratio3-d64-bs32-f32-tiles-smaller-than-pages"),
    pytest.param(Shapes(4, 2, 64, 16, jnp.float32),
                 dict(tiling=dataclasses.replace(SMALL_TILES, k_splits=3), sliding_window=20, soft_cap=5.0,
                      sm_scale=0.3), id="window-softcap-scale-split3"),
    pytest.param(Shapes(8, 2, 128, 16, jnp.bfloat16), dict(), id="default-tiling-bf16"),
    pytest.param(Shapes(8, 2, 64, 16, jnp.bfloat16, cache_dtype=jnp.float8_e4m3fn),
                 dict(tiling=dataclasses.replace(SMALL_TILES, k_splits=2, masked_8bit_loads=True)),
                 id="fp8-e4m3-pages-bf16-split2-masked"),
    pytest.param(Shapes(4, 4, 64, 16, jnp.float32, cache_dtype=jnp.float8_e5m2),
                 dict(tiling=dataclasses.replace(SMALL_TILES, masked_8bit_loads=True)), id="fp8-e5m2-pages-f32-masked"),
    pytest.param(Shapes(4, 2, 64, 16, jnp.float32),
                 dict(tiling=dataclasses.replace(SMALL_TILES, k_splits=2, prefill_prefetch_pages=False,
                                                 prefill_longest_first=False),
                      sliding_window=20), id="pages-read-in-step-work-list-in-order-window-split2"),
    # Heads of no power-of-two size run padded to the next one (padded_head_dim): Phi-3's 96, and 8 (to 16).
    pytest.param(Shapes(4, 2, 96, 16, jnp.float32), dict(tiling=dataclasses.replace(SMALL_TILES, k_splits=2)),
                 id="d96-f32-split2"),
    pytest.param(Shapes(8, 2, 24, 16, jnp.bfloat16, cache_dtype=jnp.float8_e4m3fn),
                 dict(tiling=dataclasses.replace(SMALL_TILES, masked_8bit_loads=True), sliding_window=20),
                 id="d24-fp8-pages-bf16-masked-window"),
    pytest.param(Shapes(4, 4, 8, 16, jnp.float16), dict(tiling=SMALL_TILES), id="d8-f16"),
    # gpt-oss's sinks (a logit a query head, large enough to matter), counted once over context splits.
    pytest.param(Shapes(8, 2, 64, 16, jnp.float32),
                 dict(tiling=dataclasses.replace(SMALL_TILES, k_splits=3), sliding_window=20,
                      sinks=np.linspace(-5.0, 5.0, 8, dtype=np.float32)), id="sinks-window-split3-f32"),
    pytest.param(Shapes(4, 4, 64, 16, jnp.bfloat16),
                 dict(tiling=SMALL_TILES, sinks=np.array([3.0, -3.0, 0.5, 6.0], np.float32)), id="sinks-bf16"),
    # The sink is not soft-capped (transformers concatenates it after the cap); sinks of another float dtype.
    pytest.param(Shapes(8, 2, 64, 16, jnp.float16),
                 dict(tiling=dataclasses.replace(SMALL_TILES, k_splits=2), sliding_window=20, soft_cap=2.0,
                      sm_scale=0.3, sinks=np.array([5, -5, 1, -1, 2.5, 0, -2.5, 4], jnp.bfloat16)),
                 id="sinks-softcap-scale-window-split2-f16-bf16-sinks"),
]


@pytest.mark.parametrize("shapes,kwargs", CPU_CASES)
def test_kernel_matches_reference_interpret(shapes, kwargs):
    seed = np.random.SeedSequence().entropy  # fresh inputs every run; the seed is in failures
    rng = np.random.default_rng(seed)
    kernel_fn = functools.partial(ragged_paged_attention, interpret=True, **kwargs)
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "tiling"}
    ref_fn = functools.partial(ragged_paged_attention_reference, **ref_kwargs)
    kernel = reference = None
    for scenario in scenarios(shapes, rng):
        kernel_args, ref_args, used = make_batch(rng, shapes, *scenario[1:])
        kernel = kernel or compile_for_cpu(kernel_fn, kernel_args)
        reference = reference or compile_for_cpu(ref_fn, ref_args)
        assert_scenario_matches(kernel(*kernel_args), reference(*ref_args), used, shapes.dtype, seed, scenario)


def dense_attention_with_sinks(ref_args, sinks, sliding_window=None, soft_cap=None, sm_scale=None):
    """Each token's attention as transformers' gpt-oss computes it: its visible keys gathered from the pages, the
    sink's logit (raw: after the scale and the soft cap) as one more column of the softmax, that column dropped:
    ``[T, Hq, D]`` float64."""
    qkv, k_cache, v_cache, layer, kv_lens, block_tables, cu, num_seqs = (np.asarray(a) for a in ref_args)
    _, Hkv, _, bs, D = k_cache.shape
    Hq = qkv.shape[1] - 2 * Hkv
    out = np.zeros((qkv.shape[0], Hq, D))
    for i in range(int(num_seqs[0])):
        q_len = cu[i + 1] - cu[i]
        for t in range(cu[i], cu[i + 1]):
            pos = kv_lens[i] - q_len + (t - cu[i])
            keys = np.arange(max(0, pos - sliding_window + 1) if sliding_window else 0, pos + 1)
            pages, slots = block_tables[i, keys // bs], keys % bs
            for h in range(Hq):
                kv_head = h // (Hq // Hkv)
                k = k_cache[layer, kv_head, pages, slots].astype(np.float64)
                v = v_cache[layer, kv_head, pages, slots].astype(np.float64)
                logits = k @ qkv[t, h].astype(np.float64) * (sm_scale or D**-0.5)
                if soft_cap is not None:
                    logits = soft_cap * np.tanh(logits / soft_cap)
                logits = np.append(logits, sinks[h])
                probs = np.exp(logits - logits.max())
                out[t, h] = (probs / probs.sum())[:-1] @ v
    return out


@pytest.mark.parametrize("kwargs", [dict(), dict(sliding_window=7), dict(sliding_window=7, soft_cap=1.5, sm_scale=0.4)])
def test_reference_sinks_are_a_softmax_column_dropped(kwargs):
    """The reference with gpt-oss's sinks equals attention over the visible keys plus one sink column, softmaxed,
    the column dropped (transformers' eager form), on fresh random inputs of decode and prefill rows."""
    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    shapes = Shapes(8, 2, 16, 8, jnp.float32, num_tokens=24)
    sinks = rng.normal(0.0, 3.0, 8).astype(np.float32)
    _, ref_args, used = make_batch(rng, shapes, [1, 9, 1, 6], [13, 9, 30, 20])
    got = ragged_paged_attention_reference(*ref_args, sinks=sinks, **kwargs)
    want = dense_attention_with_sinks(ref_args, sinks, **kwargs)
    np.testing.assert_allclose(np.asarray(got)[:used], want[:used], atol=2e-5, err_msg=f"seed {seed}")
    assert (np.asarray(got)[used:] == 0).all()  # padding rows
    plain = ragged_paged_attention_reference(*ref_args, **kwargs)
    assert np.abs(np.asarray(plain)[:used] - want[:used]).max() > 1e-2  # the sinks matter at these sizes


def test_sinks_are_traced_and_minus_infinity_is_no_sink():
    """``sinks`` is an array argument, not a static one: one compiled kernel serves any sink values (here ±5 with a
    context split, then -inf), and sinks of -inf give attention without sinks, in the kernel and the reference."""
    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    shapes = Shapes(8, 2, 64, 16, jnp.float32)
    tiling = dataclasses.replace(SMALL_TILES, k_splits=2)
    scenario = ("mixed", [1, 3, 20, 1, 5], [40, 49, 35, 1, 5])
    kernel_args, ref_args, used = make_batch(rng, shapes, *scenario[1:])

    def with_sinks(*args):
        return ragged_paged_attention(*args[:-1], sinks=args[-1], tiling=tiling, interpret=True)

    kernel = compile_for_cpu(with_sinks, kernel_args + (jnp.zeros(8, jnp.float32),))
    reference = jax.jit(ragged_paged_attention_reference)
    plain = reference(*ref_args)
    for sinks in (np.tile(np.float32([5.0, -5.0]), 4), np.full(8, -np.inf, np.float32)):
        want = reference(*ref_args, sinks=sinks)
        assert_scenario_matches(kernel(*kernel_args, jnp.asarray(sinks)), want, used, shapes.dtype, seed, scenario)
    assert_scenario_matches(want, plain, used, shapes.dtype, seed, scenario)  # -inf: no sink


@pytest.mark.parametrize("cache_dtype,tiling", [
    (jnp.float8_e4m3fn, SMALL_TILES),
    (jnp.float8_e5m2, dataclasses.replace(SMALL_TILES, k_splits=2)),
    (jnp.float8_e4m3fn, Tiling()),
])
def test_unmasked_8bit_loads_match_reference_over_finite_pages(cache_dtype, tiling):
    """The default ``masked_8bit_loads=False``: a KV step past a context's end loads its 8-bit tiles whole; the slots
    no sequence owns hold a finite value (as the engine's zeroed, saturated pages do) that the scores' mask weighs by
    exactly 0, over every scenario (decode, prefill, mixed, random). The masked form, for pages that may hold NaN,
    is the ``-masked`` cases of ``CPU_CASES``."""
    check_unmasked_8bit_loads(Shapes(8, 2, 64, 16, jnp.bfloat16, cache_dtype=cache_dtype), tiling, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("decode_kv_tokens,head_dim", [(128, 128), (64, 128), (128, 96)])
def test_unmasked_8bit_loads_match_reference_on_gpu(decode_kv_tokens, head_dim):
    shapes = Shapes(32, 8, head_dim, 16, jnp.bfloat16, num_tokens=256, max_seqs=16, pages_per_seq=40, num_pages=700,
                    num_layers=3, cache_dtype=jnp.float8_e4m3fn)
    check_unmasked_8bit_loads(shapes, Tiling(decode_kv_tokens=decode_kv_tokens),
                              interpret=False)


def check_unmasked_8bit_loads(shapes: Shapes, tiling: Tiling, interpret: bool):
    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    kernel = functools.partial(ragged_paged_attention, interpret=interpret, tiling=tiling)
    for scenario in scenarios(shapes, rng):
        kernel_args, ref_args, used = make_batch(rng, shapes, *scenario[1:], poison_value=300.0)
        assert_scenario_matches(kernel(*kernel_args), ragged_paged_attention_reference(*ref_args), used, shapes.dtype,
                                seed, scenario)


@pytest.mark.parametrize("kv_len", [1, 16, 17, 90])
def test_one_token_step_matches_reference_interpret(kv_len):
    """T = 1 (the engine runs a decode at batch 1 unpadded): one query row, padded sequence slots."""
    shapes = Shapes(8, 2, 64, 16, jnp.bfloat16, num_tokens=1)
    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    kernel_args, ref_args, used = make_batch(rng, shapes, [1], [kv_len])
    out = ragged_paged_attention(*kernel_args, interpret=True, tiling=dataclasses.replace(SMALL_TILES, k_splits=2))
    assert out.shape == (1, 8, 64)
    assert_matches(out, ragged_paged_attention_reference(*ref_args), used, shapes.dtype)


def test_fp8_pages_compute_in_float16_and_saturate_a_huge_query():
    """Over 8-bit pages the kernel's dots run in float16 (one conversion from e4m3); a bfloat16 q past
    float16's range saturates there instead of overflowing to inf (the reference sees the same clipped q)."""
    shapes = Shapes(8, 2, 64, 16, jnp.bfloat16, cache_dtype=jnp.float8_e4m3fn)
    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    kernel_args, ref_args, used = make_batch(rng, shapes, [1, 5, 1], [20, 5, 33], poison_value=300.0)  # finite pages
    q = kernel_args[0].at[:, 0, 0].set(1e6)  # past float16's 65504
    clipped = jnp.clip(q.astype(jnp.float32), -65504, 65504).astype(jnp.bfloat16)
    out = ragged_paged_attention(q, *kernel_args[1:], interpret=True, tiling=SMALL_TILES)
    ref = ragged_paged_attention_reference(clipped, *ref_args[1:])
    try:
        assert_matches(out, ref, used, shapes.dtype)
    except AssertionError as e:
        raise AssertionError(f"seed {seed}\n{e}") from None


def test_prefill_work_list_matches_a_plain_enumeration():
    """Items: each long sequence's query tiles in order, then tiles zeroing the padding rows."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    q_lens = rng.choice([1, 2, 3, 4, 5, 9, 33, 70], size=7)
    num_seqs, T, S, tile, max_decode, num_items = 5, 256, 8, 16, 4, 40
    cu = np.zeros(S + 1, np.int32)
    cu[1 : num_seqs + 1] = np.cumsum(q_lens[:num_seqs])
    cu[num_seqs + 1 :] = cu[num_seqs]
    expected = []
    for s in range(num_seqs):
        lo, hi = cu[s], cu[s + 1]
        if hi - lo > max_decode:
            expected += [(s, lo, hi, t, min(t + tile, hi), 1) for t in range(lo, hi, tile)]
    pad = cu[num_seqs]
    while len(expected) < num_items:
        expected.append((None, None, None, pad, min(pad + tile, T), 0))
        pad += tile
    items = np.asarray(prefill_work_items(jnp.asarray(cu), jnp.asarray([num_seqs]), num_items=num_items,
                                          tokens_per_tile=tile, max_decode_tokens=max_decode, num_tokens=T))
    for i, want in enumerate(expected):
        got = tuple(int(v) for v in items[:, i])
        if want[5]:
            assert got == want, (seed, i)
        else:
            assert got[3:] == want[3:], (seed, i)


def test_mosaic_work_list_sorts_the_items_by_cost_longest_first():
    """The Mosaic GPU launch's work list: the same items as the Triton launch's, most K/V blocks first,
    then the padding items, then the empty ones, and the count of the non-empty."""
    T, tile, block_kv = 700, 128, 128
    q_lens, kv_lens = [3, 300, 1, 129, 0, 40], [900, 300, 5, 1000, 7, 40]
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    kw = dict(num_items=12, tokens_per_tile=tile, max_decode_tokens=4, num_tokens=T)
    plain = np.asarray(prefill_work_items(cu, jnp.int32([6]), **kw))
    items, count = mosaic_work_list(cu, jnp.asarray(kv_lens, jnp.int32), jnp.int32([6]), block_kv=block_kv, **kw)
    items = np.asarray(items)
    assert sorted(map(tuple, items[:6].T)) == sorted(map(tuple, plain.T))
    seq, seq_start, seq_end, start, end, attend, blocks = items
    last_pos = np.asarray(kv_lens)[seq] - (seq_end - seq_start) + (end - 1 - seq_start)
    cost = np.where(attend > 0, last_pos // block_kv + 1, np.where(start < T, 0, -1))
    assert (np.diff(cost) <= 0).all(), cost
    assert (blocks == np.maximum(cost, 0)).all()  # the K/V blocks each item reads, for the kernel
    # 300 tokens: 3 items; 129: 2; 40: 1; the padding rows 473..700: 2 items.
    assert int(count[0]) == (cost >= 0).sum() == 8
    assert list(cost[:8]) == [8, 8, 3, 2, 1, 1, 0, 0]


# The Mosaic GPU prefill launch in every step that has prompt rows, however few (the default takes it from 8192).
MOSAIC_EVERY_STEP = Tiling(prefill_kernel="mosaic", prefill_mosaic_min_tokens=0)


def abstract_attention_args(T, Hq, Hkv, D, bs, dtype, *, L=2, P=64, S=4, B=16) -> tuple:
    """``ragged_paged_attention``'s arguments as shapes: ``T`` token rows of ``Hq`` query heads (in a ``qkv`` buffer),
    ``L`` layers of ``P`` pages, ``S`` sequence slots with ``B``-entry block tables (for lowering without arrays)."""
    sd = jax.ShapeDtypeStruct
    cache = sd((L, Hkv, P, bs, D), dtype)
    return (sd((T, Hq + 2 * Hkv, D), dtype), cache, cache, sd((), jnp.int32), sd((S,), jnp.int32), sd((S, B), jnp.int32),
            sd((S + 1,), jnp.int32), sd((1,), jnp.int32))


def test_mosaic_prefill_lowers_for_cuda(monkeypatch):
    """On the CPU the Mosaic GPU prefill launch cannot run, but it lowers (JAX 0.10's Mosaic GPU
    lowering; the device runs 0.11): beside the Triton decode launch, for both head dims; smaller steps than
    ``prefill_mosaic_min_tokens`` take the Triton prefill launch."""
    monkeypatch.setattr(ragged_prefill_mgpu, "supported", lambda *a, **k: True)
    T = 512
    for Hq, Hkv, D, bs, dtype in ((8, 2, 128, 16, jnp.bfloat16), (16, 2, 64, 32, jnp.float16)):
        args = abstract_attention_args(T, Hq, Hkv, D, bs, dtype)
        fn = functools.partial(ragged_paged_attention, tiling=MOSAIC_EVERY_STEP, interpret=False)
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text and "ragged_paged_attention_decode" in text
    # The default tiling takes the Mosaic launch only in steps of at least prefill_mosaic_min_tokens rows.
    fn = functools.partial(ragged_paged_attention, tiling=Tiling(prefill_mosaic_min_tokens=T + 1), interpret=False)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" not in text and "ragged_paged_attention_prefill" in text
    # The Mosaic kernel has no sinks: with them, prompts take the Triton prefill launch.
    fn = functools.partial(ragged_paged_attention, tiling=MOSAIC_EVERY_STEP, interpret=False)
    text = jax.jit(fn).trace(*args, sinks=jax.ShapeDtypeStruct((Hq,), jnp.float32)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" not in text and "ragged_paged_attention_prefill" in text


def test_mosaic_kernel_module_is_the_same_in_every_lowering():
    """The Mosaic GPU kernel lowers to the same text however many Mosaic kernels the process lowered before: JAX
    0.11 numbered each kernel module (``stable_kernel_modules`` drops the number), which gave a step program
    another persistent-cache key, and a recompile, whenever the lowering order changed (run 19a's warm start)."""
    sd = jax.ShapeDtypeStruct

    def lowered(T, Hq):
        cache = sd((2, 2, 64, 16, 128), jnp.bfloat16)
        args = (sd((T, Hq, 128), jnp.bfloat16), cache, cache, sd((), jnp.int32), sd((4,), jnp.int32),
                sd((4, 16), jnp.int32), sd((7, 64), jnp.int32), sd((1,), jnp.int32))
        fn = functools.partial(ragged_prefill_mgpu.ragged_prefill_mgpu, sm_scale=0.1, workers_per_head=4)
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

    first = lowered(512, 8)
    lowered(256, 16)  # another kernel in between
    assert "mosaic_gpu" in first and lowered(512, 8) == first


@pytest.mark.skipif(not ragged_prefill_mgpu.JAX_0_11,
                    reason="JAX's Mosaic GPU interpreter runs this kernel from 0.11 on (0.10's hangs on its barriers)")
def test_mosaic_prefill_matches_reference_in_the_interpreter():
    """The Mosaic GPU prefill launch in JAX's Mosaic GPU interpreter (threads, barriers and TMA copies simulated
    on the CPU): prompts of several work items, chunks after context, a decode and padding rows, with 2 workers
    per head so each program walks several items. Needs JAX >= 0.11 (Python 3.12): the GPU machine's version."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    shapes = Shapes(4, 2, 64, 16, jnp.bfloat16, num_tokens=384, max_seqs=5, pages_per_seq=20, num_pages=80)
    q_lens, kv_lens = [1, 150, 3, 70, 130], [9, 150, 40, 100, 300]
    kernel_args, ref_args, used = make_batch(rng, shapes, q_lens, kv_lens, poison_value=1e4)
    qkv, k_cache, v_cache, layer, kv_lens_arr, tables, cu, num_seqs = kernel_args
    q = qkv[:, :shapes.num_heads]  # the launch takes the query heads alone (ragged_paged_attention slices them)
    items, count = mosaic_work_list(cu, kv_lens_arr, num_seqs, num_items=3 + 5, tokens_per_tile=128, block_kv=128,
                                    max_decode_tokens=2, num_tokens=shapes.num_tokens)
    out = ragged_prefill_mgpu.ragged_prefill_mgpu(q, k_cache, v_cache, layer, kv_lens_arr, tables, items, count,
                                                  sm_scale=0.125, workers_per_head=2, interpret=InterpretGPUParams())
    ref = ragged_paged_attention_reference(*ref_args)
    rows = np.zeros(shapes.num_tokens, bool)  # the launch's rows: long sequences' and padding (zeros)
    for s, n in enumerate(q_lens):
        rows[sum(q_lens[:s]):sum(q_lens[:s + 1])] = n > 2
    rows[used:] = True
    got, want = (np.asarray(a.astype(jnp.float32))[rows] for a in (out, ref))
    np.testing.assert_allclose(got, want, atol=ATOL[jnp.bfloat16], rtol=0, err_msg=f"seed {seed}")


def test_changing_the_batch_mix_does_not_recompile():
    shapes = Shapes(4, 2, 64, 16, jnp.float32)
    rng = np.random.default_rng(0)
    fn = jax.jit(functools.partial(ragged_paged_attention, interpret=True, tiling=SMALL_TILES))
    traces = []
    for _, q_lens, kv_lens in scenarios(shapes, rng):
        args, _, _ = make_batch(rng, shapes, q_lens, kv_lens)
        traces.append(fn.trace(*args).jaxpr)  # tracing only: cheap, no compile
    assert all(str(t) == str(traces[0]) for t in traces[1:])


@pytest.mark.parametrize("kwargs,launches,cache_dtype,head_dim", [
    (dict(tiling=Tiling(k_splits=1)), 2, None, 128),  # prefill + decode
    (dict(tiling=Tiling(k_splits=4), soft_cap=20.0, sliding_window=64), 3, None, 128),  # + merge of the splits
    (dict(tiling=Tiling(k_splits=2)), 3, jnp.float8_e4m3fn, 128),  # float8 pages
    (dict(tiling=Tiling(k_splits=1, prefill_prefetch_pages=False, prefill_longest_first=False)), 2, None, 128),
    (dict(tiling=Tiling(k_splits=2)), 3, None, 96),  # a head padded to 128 columns
    (dict(tiling=Tiling(k_splits=2), sinks=np.zeros(32, np.float32)), 3, None, 128),  # gpt-oss's sinks
])
def test_kernel_lowers_to_triton_for_cuda(kwargs, launches, cache_dtype, head_dim):
    """The Triton lowering (not only the interpreter) accepts the kernel: cross-platform lowering on CPU."""
    shapes = Shapes(32, 8, head_dim, 16, jnp.bfloat16, num_tokens=64, max_seqs=8, pages_per_seq=8,
                    cache_dtype=cache_dtype)
    rng = np.random.default_rng(1)
    args, _, _ = make_batch(rng, shapes, [1] * 4 + [20], [17, 5, 33, 100, 40])
    fn = jax.jit(functools.partial(ragged_paged_attention, interpret=False, **kwargs))
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == launches


def test_kernel_reads_layer_in_place_without_slicing_it():
    """The caches reach the Pallas calls whole: no per-layer slice is materialised; nor is the qkv buffer sliced
    (the launches read its query heads in place)."""
    shapes = Shapes(4, 2, 64, 16, jnp.float32)
    args, _, _ = make_batch(np.random.default_rng(2), shapes, [1, 3], [9, 20])
    jaxpr = jax.make_jaxpr(functools.partial(ragged_paged_attention, interpret=False,
                                             tiling=Tiling(k_splits=2)))(*args)
    qkv_shape, cache_shape = args[0].shape, args[1].shape
    calls = [e for e in jaxpr.jaxpr.eqns[0].params["jaxpr"].eqns if e.primitive.name == "pallas_call"]
    attention_calls = [c for c in calls if cache_shape in [v.aval.shape for v in c.invars]]
    assert len(attention_calls) == 2  # the prefill and decode launches; the merge reads no cache
    for call in attention_calls:
        assert [v.aval.shape for v in call.invars].count(cache_shape) == 2
        assert [v.aval.shape for v in call.invars].count(qkv_shape) == 1
    assert not any(e.primitive.name in ("slice", "dynamic_slice", "gather")
                   for e in jaxpr.jaxpr.eqns[0].params["jaxpr"].eqns
                   if any(v.aval.shape in (cache_shape, qkv_shape) for v in e.invars))


def _good_args():
    shapes = Shapes(4, 2, 64, 16, jnp.float32)
    args, _, _ = make_batch(np.random.default_rng(3), shapes, [1, 2], [5, 7])
    return list(args)


@pytest.mark.parametrize(
    "mutate,message",
    [
        ({0: lambda qkv: qkv[:, :3]}, "multiple of KV heads"),  # fewer heads than 2 * Hkv + Hkv
        ({0: lambda qkv: qkv[:, :7]}, "multiple of KV heads"),  # 3 query heads over 2 KV heads
        ({0: lambda qkv: qkv[0]}, r"qkv must be \[T, Hq \+ 2\*Hkv, D\]"),
        ({2: lambda v: v[:, :1]}, "same shape"),
        ({0: lambda qkv: qkv[..., :32]}, "head_dim of qkv"),
        ({6: lambda cu: cu[:-1]}, "cu_q_lens must be"),
        ({4: lambda kv_lens: kv_lens[:-1]}, "kv_lens must be"),
        ({5: lambda block_tables: block_tables[0]}, "block_tables must be"),
        ({0: lambda q: q.astype(jnp.int8)}, "dtype must be"),
        ({4: lambda kv_lens: kv_lens.astype(jnp.float32)}, "integer array"),
    ],
)
def test_wrapper_rejects_bad_shapes_with_clear_errors(mutate, message):
    args = _good_args()
    for i, change in mutate.items():
        args[i] = change(args[i])
    with pytest.raises(ValueError, match=message):
        ragged_paged_attention(*args, interpret=True)


def test_wrapper_rejects_bad_tiling_and_window():
    args = _good_args()
    with pytest.raises(ValueError, match="prefill_q_rows"):
        ragged_paged_attention(*args, tiling=Tiling(prefill_q_rows=24), interpret=True)
    with pytest.raises(ValueError, match="sliding_window"):
        ragged_paged_attention(*args, sliding_window=0, interpret=True)


@pytest.mark.parametrize("sinks", [np.zeros(2, np.float32), np.zeros(5, np.float32), np.zeros((1, 4), np.float32),
                                   np.zeros(4, np.int32)])
def test_wrapper_rejects_sinks_not_one_float_a_query_head(sinks):
    """The kernel gathers each row's sink by query head (Hq = 4 here) unchecked: any other shape is an error."""
    with pytest.raises(ValueError, match=r"sinks must be a float array \[Hq=4\]"):
        ragged_paged_attention(*_good_args(), sinks=sinks, interpret=True)


def new_qkv(rng, T, Hq, Hkv, D, dtype, scale=1.0):
    """A random ``qkv`` buffer ``[T, Hq + 2*Hkv, D]`` and its key and value heads."""
    qkv = jnp.asarray(rng.standard_normal((T, Hq + 2 * Hkv, D)) * scale, dtype)
    return qkv, qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]


def test_write_kv_writes_exactly_the_slots():
    """The key and value heads of the qkv buffer (after its query heads) land in their slots."""
    rng = np.random.default_rng(4)
    L, Hq, Hkv, P, bs, D, T = 3, 6, 2, 10, 16, 32, 12
    k_cache = jnp.asarray(rng.standard_normal((L, Hkv, P, bs, D)), jnp.bfloat16)
    v_cache = jnp.asarray(rng.standard_normal((L, Hkv, P, bs, D)), jnp.bfloat16)
    slots = rng.choice(np.arange(bs, P * bs), T, replace=False).astype(np.int32)
    qkv, k, v = new_qkv(rng, T, Hq, Hkv, D, jnp.float32)
    new_k, new_v = jax.jit(write_kv_reference)(k_cache, v_cache, jnp.int32(1), qkv, jnp.asarray(slots))
    expect_k, expect_v = np.asarray(k_cache).copy(), np.asarray(v_cache).copy()
    for t, slot in enumerate(slots):
        expect_k[1, :, slot // bs, slot % bs] = np.asarray(k[t].astype(jnp.bfloat16))
        expect_v[1, :, slot // bs, slot % bs] = np.asarray(v[t].astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(new_k), expect_k)
    np.testing.assert_array_equal(np.asarray(new_v), expect_v)


@pytest.mark.parametrize("cache_dtype,D", [(jnp.bfloat16, 32), (jnp.float8_e4m3fn, 32), (jnp.bfloat16, 96)])
def test_kv_write_kernel_matches_the_reference_scatter_interpret(cache_dtype, D):
    """Fresh random qkv buffers and slots (one tile partly past T, padding rows aimed at the sink page 0); every
    other page must come back bit for bit. A head of 96 runs padded to 128 columns: the padding is never stored."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    L, Hq, Hkv, P, bs, T, pad = 3, 4, 2, 12, 16, 75, 6
    k_cache, v_cache = (jnp.asarray(rng.standard_normal((L, Hkv, P, bs, D)), jnp.float32).astype(cache_dtype)
                        for _ in range(2))
    slots = np.concatenate([rng.choice(np.arange(bs, P * bs), T - pad, replace=False), np.zeros(pad)]).astype(np.int32)
    qkv, _, _ = new_qkv(rng, T, Hq, Hkv, D, jnp.bfloat16, scale=200)  # fp8 saturates
    got = write_kv(k_cache, v_cache, 2, qkv, jnp.asarray(slots), tokens_per_program=16)
    want = write_kv_reference(k_cache, v_cache, 2, qkv, jnp.asarray(slots))
    for g, w in zip(got, want):
        g, w = np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32))
        np.testing.assert_array_equal(g[:, :, 1:], w[:, :, 1:], err_msg=f"seed {seed}")


def test_kv_write_kernel_lowers_to_triton_and_rejects_bad_shapes():
    k_cache = jnp.zeros((2, 8, 16, 16, 128), jnp.bfloat16)
    qkv = jnp.zeros((40, 32 + 2 * 8, 128), jnp.bfloat16)
    fn = jax.jit(functools.partial(write_kv, interpret=False))
    text = fn.trace(k_cache, k_cache, 1, qkv, jnp.zeros(40, jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1  # K and V in one launch
    assert "slice" not in text  # both read out of the qkv buffer by head offset
    with pytest.raises(ValueError, match="Hkv=8"):
        write_kv(k_cache, k_cache, 0, qkv[:, :20], jnp.zeros(40, jnp.int32))
    with pytest.raises(ValueError, match=r"qkv must be \[T, Hq \+ 2\*Hkv, D\]"):
        write_kv(k_cache, k_cache, 0, qkv[0], jnp.zeros(40, jnp.int32))
    with pytest.raises(ValueError, match="D=128"):
        write_kv(k_cache, k_cache, 0, qkv[..., :64], jnp.zeros(40, jnp.int32))
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(k_cache, k_cache, 0, qkv, jnp.zeros(39, jnp.int32))
    with pytest.raises(ValueError, match="KV write backend"):
        get_attention_fns("reference", kv_write="triton")


def test_get_attention_fns_picks_backends():
    assert get_attention_fns("reference")[0] is ragged_paged_attention_reference
    assert get_attention_fns("pallas")[0] is ragged_paged_attention
    on_gpu = jax.default_backend() == "gpu"
    assert get_attention_fns("auto")[0] is (ragged_paged_attention if on_gpu else ragged_paged_attention_reference)
    assert get_attention_fns("auto")[1] is (write_kv if on_gpu else write_kv_reference)  # kv_write="auto"
    assert get_attention_fns("auto", kv_write="reference")[1] is write_kv_reference
    assert get_attention_fns("reference", kv_write="pallas")[1] is write_kv
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_fns("cuda")


def test_attention_tiling_from_the_environment(monkeypatch):
    from pallas_kernels import default_tiling

    default_tiling.cache_clear()
    monkeypatch.setenv("PAGEDJAX_ATTENTION_TILING", '{"prefill_prefetch_pages": false, "prefill_kv_tokens": 128}')
    try:
        fn = get_attention_fns("pallas")[0]
        assert fn.keywords["tiling"] == Tiling(prefill_prefetch_pages=False, prefill_kv_tokens=128)
        default_tiling.cache_clear()
        monkeypatch.setenv("PAGEDJAX_ATTENTION_TILING", '{"prefill_rows": 64}')
        with pytest.raises(ValueError, match="PAGEDJAX_ATTENTION_TILING must be a JSON object of Tiling fields"):
            get_attention_fns("pallas")
    finally:
        default_tiling.cache_clear()


# ------------------------------------------------------------------------------------
# Compiled on a CUDA GPU (python -m pytest tests/test_ragged_paged_attention.py -m gpu)
# ------------------------------------------------------------------------------------

GPU_CASES = [
    pytest.param(Shapes(32, 8, 128, 16, jnp.bfloat16, num_tokens=256, max_seqs=16, pages_per_seq=40,
                        num_pages=700, num_layers=3), dict(), id="llama8b-heads-bf16-default"),
    pytest.param(Shapes(32, 8, 128, 16, jnp.bfloat16, num_tokens=256, max_seqs=16, pages_per_seq=40,
                        num_pages=700, num_layers=3), dict(tiling=Tiling(k_splits=4)), id="split4-bf16"),
    pytest.param(Shapes(16, 16, 64, 32, jnp.float16, num_tokens=128, max_seqs=8, pages_per_seq=12,
                        num_pages=120), dict(), id="ratio1-d64-bs32-f16"),
    pytest.param(Shapes(32, 4, 64, 16, jnp.float32, num_tokens=128, max_seqs=8, pages_per_seq=20, num_pages=200),
                 dict(sliding_window=50, soft_cap=30.0), id="ratio8-f32-window-softcap"),
    pytest.param(Shapes(24, 8, 128, 32, jnp.bfloat16, num_tokens=128, max_seqs=8, pages_per_seq=12,
                        num_pages=120), dict(tiling=Tiling(decode_kv_tokens=64, k_splits=2)), id="ratio3-bs32-bf16"),
    pytest.param(Shapes(32, 8, 128, 16, jnp.bfloat16, num_tokens=256, max_seqs=16, pages_per_seq=40,
                        num_pages=700, num_layers=3, cache_dtype=jnp.float8_e4m3fn),
                 dict(tiling=Tiling(masked_8bit_loads=True)), id="fp8-pages-bf16-masked"),
    pytest.param(Shapes(32, 8, 128, 16, jnp.bfloat16, num_tokens=256, max_seqs=16, pages_per_seq=40,
                        num_pages=700, num_layers=3),
                 dict(tiling=Tiling(k_splits=2, prefill_prefetch_pages=False, prefill_longest_first=False),
                      sliding_window=100), id="pages-read-in-step-work-list-in-order-window-bf16"),
    pytest.param(Shapes(32, 32, 96, 16, jnp.bfloat16, num_tokens=256, max_seqs=16, pages_per_seq=40,
                        num_pages=1400, num_layers=3), dict(), id="phi3-heads-d96-bf16"),
    pytest.param(Shapes(32, 8, 96, 16, jnp.bfloat16, num_tokens=256, max_seqs=16, pages_per_seq=40,
                        num_pages=700, num_layers=3, cache_dtype=jnp.float8_e4m3fn),
                 dict(tiling=Tiling(k_splits=4, masked_8bit_loads=True)), id="d96-fp8-pages-split4-masked"),
    pytest.param(Shapes(64, 8, 64, 16, jnp.bfloat16, num_tokens=256, max_seqs=16, pages_per_seq=40,
                        num_pages=700, num_layers=3),
                 dict(tiling=Tiling(k_splits=2), sliding_window=128,
                      sinks=np.random.default_rng(0).normal(0.0, 2.0, 64).astype(np.float32)),
                 id="gpt-oss-heads-sinks-window-split2"),
    pytest.param(Shapes(64, 8, 64, 16, jnp.bfloat16, num_tokens=256, max_seqs=16, pages_per_seq=40,
                        num_pages=700, num_layers=3),
                 dict(sinks=np.random.default_rng(1).normal(0.0, 2.0, 64).astype(np.float32)),
                 id="gpt-oss-heads-sinks-default"),
    pytest.param(Shapes(64, 8, 64, 16, jnp.bfloat16, num_tokens=256, max_seqs=16, pages_per_seq=40,
                        num_pages=700, num_layers=3),
                 dict(tiling=MOSAIC_EVERY_STEP, soft_cap=30.0,
                      sinks=np.random.default_rng(2).normal(0.0, 2.0, 64).astype(jnp.bfloat16)),
                 id="gpt-oss-heads-bf16-sinks-softcap-mosaic-tiling"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shapes,kwargs", GPU_CASES)
def test_kernel_matches_reference_on_gpu(shapes, kwargs):
    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    kernel = jax.jit(functools.partial(ragged_paged_attention, interpret=False, **kwargs))
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "tiling"}
    reference = jax.jit(functools.partial(ragged_paged_attention_reference, **ref_kwargs))
    cases = list(scenarios(shapes, rng))
    bs, B = shapes.block_size, shapes.pages_per_seq
    cases.append(("long-decode", [1] * shapes.max_seqs, [int(x) for x in rng.integers(1, B * bs + 1, shapes.max_seqs)]))
    cases.append(("long-chunks", [40, 1, 64, 1], [B * bs - 3, B * bs, 64, 2 * bs]))
    for scenario in cases:
        kernel_args, ref_args, used = make_batch(rng, shapes, *scenario[1:], layer=shapes.num_layers - 1)
        with jax.default_matmul_precision("highest"):
            ref = reference(*ref_args)
        atol = 1e-4 if shapes.dtype == jnp.float32 else None
        assert_scenario_matches(kernel(*kernel_args), ref, used, shapes.dtype, seed, scenario, atol=atol)


MOSAIC_GPU_CASES = [
    pytest.param(Shapes(32, 8, 128, 16, jnp.bfloat16, num_tokens=1024, max_seqs=16, pages_per_seq=48,
                        num_pages=900, num_layers=3), id="llama8b-heads-bs16-bf16"),
    pytest.param(Shapes(16, 2, 64, 32, jnp.float16, num_tokens=512, max_seqs=8, pages_per_seq=24, num_pages=200),
                 id="ratio8-d64-bs32-f16"),
    pytest.param(Shapes(8, 8, 128, 16, jnp.bfloat16, num_tokens=384, max_seqs=8, pages_per_seq=32, num_pages=300),
                 id="ratio1-bs16-bf16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shapes", MOSAIC_GPU_CASES)
def test_mosaic_prefill_matches_reference_on_gpu(shapes):
    """The Mosaic GPU prefill launch (with the Triton decode launch) against the reference: the
    scenarios above plus prompts of several work items each and chunks after a long context."""
    if not ragged_prefill_mgpu.supported(shapes.dtype, shapes.dtype, shapes.head_dim, shapes.block_size,
                                         soft_cap=None, sliding_window=None):
        pytest.skip("the Mosaic GPU prefill kernel needs an sm_90 GPU")
    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    kernel = jax.jit(functools.partial(ragged_paged_attention, interpret=False, tiling=MOSAIC_EVERY_STEP))
    reference = jax.jit(ragged_paged_attention_reference)
    T, bs = shapes.num_tokens, shapes.block_size
    cases = list(scenarios(shapes, rng))
    cases.append(("long-prompts", [T // 3, 1, T // 2 - 5, 7], [T // 3, 60, T // 2 + 95, 7]))
    cases.append(("chunks-after-context", [128, 64, 65, 2], [shapes.pages_per_seq * bs, 64 + 3 * bs, 65, 40]))
    for scenario in cases:
        kernel_args, ref_args, used = make_batch(rng, shapes, *scenario[1:], layer=shapes.num_layers - 1,
                                                 poison_value=1e4)
        with jax.default_matmul_precision("highest"):
            ref = reference(*ref_args)
        out = kernel(*kernel_args)  # outside the helper's try: a compiler's own AssertionError keeps its traceback
        assert_scenario_matches(out, ref, used, shapes.dtype, seed, scenario)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype,D", [(jnp.bfloat16, 128), (jnp.float8_e4m3fn, 128), (jnp.bfloat16, 96)])
def test_kv_write_kernel_matches_the_reference_on_gpu(cache_dtype, D):
    seed = int(np.random.SeedSequence().entropy % 2**31)
    rng = np.random.default_rng(seed)
    L, Hkv, P, bs, T = 2, 8, 300, 16, 1000
    k_cache, v_cache = (jnp.asarray(rng.standard_normal((L, Hkv, P, bs, D)), jnp.float32).astype(cache_dtype)
                        for _ in range(2))
    slots = jnp.asarray(rng.choice(np.arange(bs, P * bs), T, replace=False).astype(np.int32))
    qkv, _, _ = new_qkv(rng, T, 32, Hkv, D, jnp.bfloat16)
    want = [np.asarray(a.astype(jnp.float32)) for a in jax.jit(write_kv_reference)(k_cache, v_cache, 1, qkv, slots)]
    got = jax.jit(write_kv, donate_argnums=(0, 1))(k_cache, v_cache, 1, qkv, slots)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), w, err_msg=f"seed {seed}")
