"""The two layer loops of the forward pass (scan over stacked weights, unrolled per-layer
weights) compute the same logits and write the same KV cache."""

from __future__ import annotations

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
        np.testing.assert_allclose(np.asarray(unrolled), np.asarray(scanned), rtol=1e-5, atol=1e-5)
        for new, old in ((cache_b.k, cache_a.k), (cache_b.v, cache_a.v)):
            np.testing.assert_allclose(np.stack(new) if per_layer else np.asarray(new), np.asarray(old),
                                       rtol=1e-6, atol=1e-6)


def test_per_layer_cache_needs_unstacked_weights():
    config = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                         num_heads=2, num_kv_heads=1, head_dim=16)
    params = load_dummy_params(config, jnp.float32)
    batch = build_model_input([SequenceWork(token_ids=[1, 2], start=0, block_table=[1], sample=True)], block_size=4,
                              max_num_tokens=16, max_num_seqs=8, max_blocks_per_seq=4)
    with pytest.raises(ValueError, match="per-layer KV cache needs per-layer"):
        forward(params, make_kv_cache(config, 4, 4, jnp.float32, per_layer=True), batch, config=config)
