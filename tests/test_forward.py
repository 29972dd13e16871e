"""The two layer loops of the forward pass (scan over stacked weights, unrolled per-layer
weights) compute the same logits and write the same KV cache."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.batch import make_kv_cache
from models.config import ModelConfig
from models.dummy import load_dummy_params
from models.llama import forward, unstack_layers
from engine.runner import SequenceWork, build_model_input


def test_unrolled_layers_equal_scanned_layers():
    config = ModelConfig(model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3,
                         num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True)
    params = jax.tree.map(lambda a: a * 8.0, load_dummy_params(config, jnp.float32, seed=5))  # peakier than 0.02
    rng = np.random.default_rng(0)
    work = [SequenceWork(token_ids=rng.integers(0, 128, n).tolist(), start=0,
                         block_table=list(range(1 + 4 * i, 5 + 4 * i)), sample=True) for i, n in enumerate((5, 13, 1))]
    batch = build_model_input(work, block_size=4, max_num_tokens=64, max_num_seqs=8, max_blocks_per_seq=4)
    step = jax.jit(forward, static_argnames=("config",))
    scanned, cache_a = step(params, make_kv_cache(config, 16, 4, jnp.float32), batch, config=config)
    assert np.abs(np.asarray(cache_a.k)).sum() > 0
    for per_layer in (False, True):  # one stacked cache threaded through, or one buffer per layer
        cache = make_kv_cache(config, 16, 4, jnp.float32, per_layer=per_layer)
        unrolled, cache_b = step(unstack_layers(params), cache, batch, config=config)
        assert cache_b.per_layer == per_layer
        # Float32 rounding only: XLA's CPU fusions of the qkv buffer's per-head norm and rope differ between the scan
        # body and the unrolled calls by an ulp here and there, which three layers of these weights grow to ~4e-5
        # (values up to ~40).
        np.testing.assert_allclose(np.asarray(unrolled), np.asarray(scanned), rtol=1e-5, atol=1e-4)
        for new, old in ((cache_b.k, cache_a.k), (cache_b.v, cache_a.v)):
            np.testing.assert_allclose(np.stack(new) if per_layer else np.asarray(new), np.asarray(old),
                                       rtol=1e-5, atol=1e-4)


def test_unrolled_layers_are_one_traced_function_called_per_layer():
    """The unrolled loop calls one jitted layer function: its body is traced and lowered once whatever the depth
    (the 8B's step program: trace 0.67 -> 0.29 s, lower 1.11 -> 0.63 s, StableHLO 402 -> 164 kB on the CPU for cuda),
    which is most of a warm start's Python time per step program."""
    config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=4,
                         num_heads=2, num_kv_heads=1, head_dim=16)
    params = unstack_layers(load_dummy_params(config, jnp.float32))
    batch = build_model_input([SequenceWork(token_ids=[1, 2, 3], start=0, block_table=[1], sample=True)],
                              block_size=4, max_num_tokens=16, max_num_seqs=8, max_blocks_per_seq=4)
    cache = make_kv_cache(config, 4, 4, jnp.float32, per_layer=True)
    jaxpr = jax.make_jaxpr(lambda p, c, b: forward(p, c, b, config=config))(params, cache, batch)
    calls = [e for e in jaxpr.eqns if e.primitive.name in ("pjit", "jit")]
    assert len(calls) == config.num_layers and len({id(e.params["jaxpr"]) for e in calls}) == 1
    text = jax.jit(lambda p, c, b: forward(p, c, b, config=config)).lower(params, cache, batch).as_text()
    assert text.count("func.func private @layer_call(") == 1 and text.count("call @layer_call(") == 4


def test_per_layer_cache_needs_unstacked_weights():
    config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=2, num_kv_heads=1, head_dim=16)
    params = load_dummy_params(config, jnp.float32)
    batch = build_model_input([SequenceWork(token_ids=[1, 2], start=0, block_table=[1], sample=True)], block_size=4,
                              max_num_tokens=16, max_num_seqs=8, max_blocks_per_seq=4)
    with pytest.raises(ValueError, match="per-layer KV cache needs per-layer"):
        forward(params, make_kv_cache(config, 4, 4, jnp.float32, per_layer=True), batch, config=config)


@pytest.mark.parametrize("method", [None, "int8", "int4", "fp8", "gptq-act-order"])
@pytest.mark.parametrize("unrolled", [False, True])
def test_fused_projections_equal_separate_ones(method, unrolled):
    """q/k/v (with biases) and gate/up joined into one matmul each give the logits and KV of the
    separate matrices, dense and quantized; act-order int4 weights stay apart."""
    from models.llama import fuse_projections
    from models.quantization import Int4Weight, quantize_params

    config = ModelConfig(model_type="qwen2", vocab_size=128, hidden_size=128, intermediate_size=256, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=32, qkv_bias=True)
    params = jax.tree.map(lambda a: a * 8.0, load_dummy_params(config, jnp.float32, seed=3))
    if method == "gptq-act-order":
        params = quantize_params(params, "int4")
        layers = params["layers"]
        for name in ("wq", "wk", "wv", "w_gate", "w_up"):  # a permutation of the rows (the kernel's act-order)
            w = layers[name]
            layers[name] = w.replace(perm=jnp.broadcast_to(jnp.arange(w.packed.shape[-2] * 2)[::-1],
                                                            w.packed.shape[:-2] + (w.packed.shape[-2] * 2,)))
    elif method is not None:
        params = quantize_params(params, method)
    if unrolled:
        params = unstack_layers(params)
    fused = fuse_projections(params)
    layer = fused["layers"][0] if unrolled else fused["layers"]
    if method == "gptq-act-order":
        assert "wqkv" not in layer and "w_gate_up" not in layer and isinstance(layer["wq"], Int4Weight)
    else:
        assert {"wqkv", "bqkv", "w_gate_up"} <= set(layer) and not {"wq", "wk", "wv", "bq", "w_gate"} & set(layer)
    rng = np.random.default_rng(1)
    work = [SequenceWork(token_ids=rng.integers(0, 128, n).tolist(), start=0,
                         block_table=list(range(1 + 4 * i, 5 + 4 * i)), sample=True) for i, n in enumerate((6, 1))]
    batch = build_model_input(work, block_size=4, max_num_tokens=64, max_num_seqs=8, max_blocks_per_seq=4)
    step = jax.jit(forward, static_argnames=("config",))
    cache = lambda: make_kv_cache(config, 16, 4, jnp.float32, per_layer=unrolled)  # noqa: E731
    separate, cache_a = step(params, cache(), batch, config=config)
    joined, cache_b = step(fused, cache(), batch, config=config)
    np.testing.assert_allclose(np.asarray(joined), np.asarray(separate), rtol=1e-4, atol=1e-4)  # f32 sum order
    np.testing.assert_allclose(np.asarray(jax.tree.leaves(cache_b)[0]), np.asarray(jax.tree.leaves(cache_a)[0]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", [None, "int8", "int4", "fp8"])
def test_layout_joined_on_the_stack_equals_joined_per_layer(method):
    """The runner's layout (``layout_layers``: join q/k/v and gate/up on the stacked weights, then cut
    the layers apart) holds the same bits as cutting first and joining each layer."""
    from models.llama import fuse_projections, layout_layers
    from models.quantization import quantize_params

    config = ModelConfig(model_type="qwen2", vocab_size=64, hidden_size=128, intermediate_size=256, num_layers=3,
                         num_heads=4, num_kv_heads=2, head_dim=32, qkv_bias=True)
    params = load_dummy_params(config, jnp.float32, seed=11)
    if method is not None:
        params = quantize_params(params, method)
    per_layer = fuse_projections(unstack_layers(params))
    laid_out = layout_layers(params, unroll=True, fuse=True)
    assert len(laid_out["layers"]) == 3 and {"wqkv", "bqkv", "w_gate_up"} <= set(laid_out["layers"][0])
    assert jax.tree.structure(laid_out) == jax.tree.structure(per_layer)
    for a, b in zip(jax.tree.leaves(laid_out), jax.tree.leaves(per_layer)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    assert layout_layers(params, unroll=False, fuse=False) is params


def test_layout_with_release_drops_the_callers_stacked_weights_and_otherwise_leaves_them():
    """``layout_layers(release=True)`` (the runner's) cuts the caller's own layer dict, so the stacked weights are
    freed as they are cut (a model and its largest tensor at the peak, not twice the model); without it the
    caller's params are untouched."""
    import gc
    import weakref

    from models.llama import layout_layers

    config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16)
    params = load_dummy_params(config, jnp.float32, seed=3)
    names = sorted(params["layers"])
    kept = layout_layers(params, unroll=True, fuse=True)
    assert sorted(params["layers"]) == names  # left as it was
    stacked = [weakref.ref(a) for a in params["layers"].values()]
    released = layout_layers(params, unroll=True, fuse=True, release=True)
    del kept
    gc.collect()
    assert all(ref() is None for ref in stacked), "a stacked weight outlived its layout"
    assert len(released["layers"]) == 2 and "w_gate_up" in released["layers"][0]


def _qkv_test_model(**overrides):
    """A tiny model with every per-head step of the qkv buffer (bias, qk-norm, rope), peaky weights, a batch of a
    prompt and a decode."""
    config = ModelConfig(**{**dict(model_type="qwen3", vocab_size=128, hidden_size=64, intermediate_size=96,
                                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True,
                                   qk_norm=True), **overrides})
    params = jax.tree.map(lambda a: a * 8.0, load_dummy_params(config, jnp.float32, seed=7))
    layers = params["layers"]
    layers["q_norm"], layers["k_norm"] = layers["q_norm"] + 1.0, layers["k_norm"] - 1.0  # not 0.02-ish
    rng = np.random.default_rng(3)
    work = [SequenceWork(token_ids=rng.integers(0, 128, n).tolist(), start=0,
                         block_table=list(range(1 + 4 * i, 5 + 4 * i)), sample=True) for i, n in enumerate((7, 1))]
    batch = build_model_input(work, block_size=4, max_num_tokens=16, max_num_seqs=8, max_blocks_per_seq=4)
    return config, params, batch


def test_qkv_buffer_in_shard_blocks():
    """``join_qkv_heads`` lays the heads out in ``shards`` blocks of [q | k | v], as ``qkv_head_kinds`` says."""
    from models.llama import KEY, QUERY, VALUE, join_qkv_heads, qkv_head_kinds

    T, Hq, Hkv, D = 3, 4, 2, 8
    q, k, v = (jnp.arange(T * h * D, dtype=jnp.float32).reshape(T, h, D) + 1000 * i
               for i, h in enumerate((Hq, Hkv, Hkv)))
    np.testing.assert_array_equal(join_qkv_heads(q, k, v), jnp.concatenate([q, k, v], axis=1))
    blocks = np.asarray(join_qkv_heads(q, k, v, shards=2)).reshape(T, 2, -1, D)
    for d in range(2):
        np.testing.assert_array_equal(blocks[:, d], np.concatenate([q[:, 2 * d:2 * d + 2], k[:, d:d + 1],
                                                                    v[:, d:d + 1]], axis=1))
    assert qkv_head_kinds(Hq, Hkv, 2).tolist() == [QUERY, QUERY, KEY, VALUE] * 2
    with pytest.raises(ValueError, match="qkv_shards=4 must divide"):
        qkv_head_kinds(Hq, Hkv, 4)


def test_pallas_kernels_on_the_qkv_buffer_equal_the_reference():
    """The model's one roped qkv buffer through the Pallas KV write and attention (interpreted), which read q, k
    and v out of it by head offset, gives the reference's logits and cache; fused and separate projections."""
    from models.llama import fuse_projections
    from pallas_kernels.ragged_paged_attention import Tiling, ragged_paged_attention, write_kv

    config, params, batch = _qkv_test_model()
    tiles = Tiling(decode_kv_tokens=16, prefill_q_rows=16, prefill_kv_tokens=16, k_splits=2)
    pallas = dict(attention_fn=functools.partial(ragged_paged_attention, interpret=True, tiling=tiles),
                  write_kv_fn=functools.partial(write_kv, interpret=True, tokens_per_program=16))
    want, want_cache = jax.jit(functools.partial(forward, config=config))(
        params, make_kv_cache(config, 16, 4, jnp.float32), batch)
    for weights in (params, fuse_projections(params)):
        got, got_cache = jax.jit(functools.partial(forward, config=config, **pallas))(
            weights, make_kv_cache(config, 16, 4, jnp.float32), batch)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
        for new, old in ((got_cache.k, want_cache.k), (got_cache.v, want_cache.v)):
            np.testing.assert_allclose(np.asarray(new), np.asarray(old), rtol=1e-5, atol=1e-5)


def test_qkv_shards_give_each_block_its_own_heads():
    """``qkv_shards=2`` with attention and KV-write functions run per block of heads (as ``shard_attention_fns``
    runs them per device, here without a mesh) gives the logits and cache of one block; a fused wqkv (one
    [q | k | v] block over all heads) is refused."""
    from models.llama import fuse_projections
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention_reference, write_kv_reference

    config, params, batch = _qkv_test_model(num_kv_heads=2)
    blocks = 2

    def per_block(fn, qkv, caches):
        return [fn(b, *c) for b, c in zip(jnp.split(qkv, blocks, axis=1), zip(*[jnp.split(c, blocks, axis=1)
                                                                               for c in caches]))]

    def attention(qkv, k_cache, v_cache, *args, **kw):
        fn = lambda b, k, v: ragged_paged_attention_reference(b, k, v, *args, **kw)  # noqa: E731
        return jnp.concatenate(per_block(fn, qkv, (k_cache, v_cache)), axis=1)

    def write(k_cache, v_cache, layer, qkv, slots):
        fn = lambda b, k, v: write_kv_reference(k, v, layer, b, slots)  # noqa: E731
        ks, vs = zip(*per_block(fn, qkv, (k_cache, v_cache)))
        return jnp.concatenate(ks, axis=1), jnp.concatenate(vs, axis=1)

    step = functools.partial(forward, config=config)
    want, want_cache = jax.jit(step)(params, make_kv_cache(config, 16, 4, jnp.float32), batch)
    got, got_cache = jax.jit(functools.partial(step, attention_fn=attention, write_kv_fn=write, qkv_shards=blocks))(
        params, make_kv_cache(config, 16, 4, jnp.float32), batch)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(got_cache.k), np.asarray(want_cache.k))
    np.testing.assert_array_equal(np.asarray(got_cache.v), np.asarray(want_cache.v))
    with pytest.raises(ValueError, match="fused wqkv"):
        step(fuse_projections(params), make_kv_cache(config, 16, 4, jnp.float32), batch, qkv_shards=blocks)
