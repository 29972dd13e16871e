"""The rope and KV write of a small step in one launch (``pallas_kernels.rope_kv_write``), against XLA's rope and the
KV write it replaces, alone and inside the model (``models.llama.forward``'s ``rope_write_kv_fn``).

The kernel's cases run interpreted on CPU and compiled by Triton with ``-m gpu``; every run draws fresh inputs (the
seed is in failures)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine import LLM, SamplingParams
from models.batch import ModelInput, make_kv_cache
from models.llama import MAX_FUSED_ROPE_ROWS, forward, layout_layers
from models.loader import load_model
from pallas_kernels import get_attention_fns, get_rope_write_kv_fn
from pallas_kernels.ragged_paged_attention import write_kv, write_kv_reference
from pallas_kernels.rope_kv_write import apply_rope, rope_write_kv, rope_write_kv_reference
from tests.launches import pallas_launches
from tests.tiny_checkpoints import write_tiny_checkpoint

# (partials, rows, query heads, kv heads, head_dim, cache dtype): the GEMV's float32 K splits or one bf16 output;
# one row and several tiles; a head of 96 (half 48: padded columns); fp8 pages.
CASES = [(4, 1, 32, 8, 128, jnp.bfloat16), (1, 1, 8, 2, 64, jnp.bfloat16), (1, 3, 6, 2, 96, jnp.bfloat16),
         (2, 20, 4, 1, 64, jnp.float32), (1, 5, 4, 2, 128, jnp.float8_e4m3fn)]


def run_case(num_parts, rows, Hq, Hkv, D, cache_dtype, interpret):
    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    H, layers, pages, bs = Hq + 2 * Hkv, 2, 8, 4
    parts = jnp.asarray(rng.standard_normal((num_parts, rows, H, D)), jnp.float32 if num_parts > 1 else jnp.bfloat16)
    angles = rng.uniform(0, 1000, (rows, 1)) / 10000 ** (np.arange(0, D, 2) / D)
    cos, sin = jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)
    k_cache, v_cache = (jnp.asarray(rng.standard_normal((layers, Hkv, pages, bs, D)), cache_dtype) for _ in range(2))
    slots = jnp.asarray(rng.permutation(np.arange(bs, pages * bs))[:rows], jnp.int32)  # page 0 is the sink
    got = rope_write_kv(k_cache, v_cache, 1, parts, cos, sin, slots, dtype=jnp.bfloat16, interpret=interpret)
    want = rope_write_kv_reference(k_cache, v_cache, 1, parts, cos, sin, slots, dtype=jnp.bfloat16)
    # The reference is XLA's path itself: the partials' sum, apply_rope on the query and key heads, write_kv.
    qkv = apply_rope(parts.astype(jnp.float32).sum(0).astype(jnp.bfloat16), cos, sin, rotate=np.arange(H) < Hq + Hkv)
    np.testing.assert_array_equal(np.asarray(want[0], np.float32), np.asarray(qkv, np.float32), err_msg=f"seed {seed}")
    assert got[0].shape == (rows, H, D) and got[0].dtype == jnp.bfloat16
    for a, b in zip(got, want):  # a float32 rounding apart at most (the fused multiply-adds), then bf16's
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-2,
                                   err_msg=f"seed {seed}")
    np.testing.assert_array_equal(np.asarray(got[0][:, Hq + Hkv:]), np.asarray(want[0][:, Hq + Hkv:]))  # values


@pytest.mark.parametrize("case", CASES)
def test_rope_write_kv_interpreted_matches_xla(case):
    run_case(*case, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_rope_write_kv_compiled_matches_xla(case):
    run_case(*case, interpret=False)


def test_rope_write_kv_rejects_inconsistent_shapes():
    cache = jnp.zeros((1, 2, 4, 4, 64))
    cos = jnp.zeros((1, 32))
    with pytest.raises(ValueError, match="parts must be"):
        rope_write_kv(cache, cache, 0, jnp.zeros((1, 1, 8, 32)), cos, cos, jnp.zeros(1, jnp.int32))
    with pytest.raises(ValueError, match="cos and sin must be"):
        rope_write_kv(cache, cache, 0, jnp.zeros((1, 1, 8, 64)), cos[:, :16], cos, jnp.zeros(1, jnp.int32))


def test_only_the_pallas_kv_write_on_one_device_gets_the_fused_launch(monkeypatch):
    assert get_rope_write_kv_fn(write_kv) is rope_write_kv
    assert get_rope_write_kv_fn(write_kv_reference) is None
    assert get_rope_write_kv_fn(functools.partial(write_kv)) is None  # e.g. a mesh's per-device wrapper
    monkeypatch.setenv("PAGEDJAX_FUSE_ROPE_KV", "0")
    assert get_rope_write_kv_fn(write_kv) is None


def decode_batch(config, rng, kv_lens, block_size=8, width=4):
    """One decode row for each sequence of ``kv_lens`` tokens (this step's included), at its last position."""
    tokens, positions, slots, tables = [], [], [], []
    for s, n in enumerate(kv_lens):
        pages = [1 + s * width + i for i in range(width)]
        tokens.append(int(rng.integers(config.vocab_size)))
        positions.append(n - 1)
        slots.append(pages[(n - 1) // block_size] * block_size + (n - 1) % block_size)
        tables.append(pages)
    S = len(kv_lens)
    batch = ModelInput(token_ids=jnp.asarray(tokens, jnp.int32), positions=jnp.asarray(positions, jnp.int32),
                       slot_mapping=jnp.asarray(slots, jnp.int32), cu_q_lens=jnp.arange(S + 1, dtype=jnp.int32),
                       kv_lens=jnp.asarray(kv_lens, jnp.int32), block_tables=jnp.asarray(tables, jnp.int32),
                       num_seqs=jnp.asarray([S], jnp.int32), logits_indices=jnp.arange(S, dtype=jnp.int32))
    return batch, 1 + S * width


def fused_launches(params, cache, batch, config, **kwargs) -> int:
    """How many ``rope_write_kv`` kernels a forward step traces."""
    jaxpr = jax.make_jaxpr(lambda p, c: forward(p, c, batch, config=config, **kwargs))(params, cache)
    return pallas_launches(jaxpr, "rope_write_kv")


# (variant, layers that fuse): plain rope; every layer sliding (mistral); sliding and full layers apart (gemma2, each
# with its own static choice); NoPE layers (smollm3: 2 of 4 rotate); biases (llama here, qwen2) and q/k norms (qwen3)
# keep XLA's rope.
VARIANTS = [("llama3_tied", 3), ("mistral", 2), ("gemma2", 3), ("phi3", 2), ("smollm3", 2), ("llama", 0),
            ("qwen2", 0), ("qwen3", 0)]


@pytest.mark.parametrize("variant,fused", VARIANTS)
def test_model_decode_rows_with_the_fused_launch_match_xla(tmp_path, variant, fused):
    """Unrolled layers, a step of decode rows at positions past 0 over random pages: the logits and the pages equal
    XLA's rope and ``write_kv``'s within float32 rounding, with one ``rope_write_kv`` a layer that allows it; a prompt
    step of more than ``MAX_FUSED_ROPE_ROWS`` rows keeps XLA's rope, as do scanned layers of a traced choice."""
    seed = int(np.random.default_rng().integers(1 << 20))
    write_tiny_checkpoint(tmp_path, variant, seed=seed)
    loaded = load_model(str(tmp_path), dtype="float32")
    config = loaded.config
    params = layout_layers(loaded.params, unroll=True, fuse=True)
    rng = np.random.default_rng(seed)
    batch, num_pages = decode_batch(config, rng, kv_lens=(9, 14, 3))
    cache = make_kv_cache(config, num_pages, 8, jnp.float32)
    cache = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), cache)
    attention_fn, write_kv_fn = get_attention_fns("reference", "pallas")
    pallas_write = dict(attention_fn=attention_fn, write_kv_fn=functools.partial(write_kv_fn, interpret=True))
    fused_fn = functools.partial(rope_write_kv, interpret=True)
    assert fused_launches(params, cache, batch, config, rope_write_kv_fn=fused_fn, **pallas_write) == fused
    got = forward(params, cache, batch, config=config, rope_write_kv_fn=fused_fn, **pallas_write)
    want = forward(params, cache, batch, config=config, **pallas_write)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5, err_msg=f"seed {seed}")
    T = MAX_FUSED_ROPE_ROWS + 1  # one prompt's rows, in the first sequence's pages
    prompt = dataclasses.replace(batch, token_ids=jnp.zeros(T, jnp.int32), positions=jnp.arange(T, dtype=jnp.int32),
                                 slot_mapping=jnp.arange(T, dtype=jnp.int32) + 8, cu_q_lens=jnp.asarray([0, T]),
                                 kv_lens=jnp.asarray([T]), block_tables=batch.block_tables[:1],
                                 num_seqs=jnp.asarray([1]), logits_indices=jnp.asarray([T - 1]))
    assert fused_launches(params, cache, prompt, config, rope_write_kv_fn=fused_fn, **pallas_write) == 0
    stacked = make_kv_cache(config, num_pages, 8, jnp.float32)
    scanned = layout_layers(loaded.params, unroll=False, fuse=True)  # a traced sliding or rotary choice: unfused
    assert fused_launches(scanned, stacked, batch, config, rope_write_kv_fn=fused_fn, **pallas_write) == (
        min(fused, 1) if config.sliding_layers is None and config.rope_layers is None else 0)  # the body traced once


def test_engine_with_the_pallas_kv_write_on_cpu_keeps_greedy_tokens(tmp_path, monkeypatch):
    """The engine with ``kv_write_backend="pallas"`` on the CPU (interpreted) fuses the rope into the KV write at its
    decode steps; the greedy tokens equal those of the two launches (``$PAGEDJAX_FUSE_ROPE_KV=0``)."""
    write_tiny_checkpoint(tmp_path, "llama3_tied", seed=int(np.random.default_rng().integers(1 << 20)))
    prompts = [[5, 9, 2, 7, 1, 3, 8, 4, 6, 11, 12], [3, 1, 4]]
    tokens = {}
    for switch in ("0", "1"):
        monkeypatch.setenv("PAGEDJAX_FUSE_ROPE_KV", switch)
        llm = LLM(str(tmp_path), dtype="float32", kv_write_backend="pallas", unroll_layers=True, max_num_seqs=2,
                  max_model_len=64, skip_tokenizer_init=True, precompile_steps=False)
        assert (llm.llm_engine.runner._forward.keywords["rope_write_kv_fn"] is not None) == (switch == "1")
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
        tokens[switch] = [o.outputs[0].token_ids for o in outputs]
        llm.shutdown()
    assert tokens["0"] == tokens["1"]


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "int8"])
def test_engine_on_the_gpu_gives_the_two_launches_tokens(tmp_path, monkeypatch, quantization):
    """float32 on the GPU, decode steps of one to four rows (the int8 ones through the one-row GEMV's K-split
    partials): the greedy tokens with the fused launch equal those of XLA's rope and ``write_kv``."""
    write_tiny_checkpoint(tmp_path, "llama3_tied", seed=7)
    prompts = [np.random.default_rng(2).integers(0, 256, size=n).tolist() for n in (3, 17, 40, 9)]
    tokens = {}
    for switch in ("0", "1"):
        monkeypatch.setenv("PAGEDJAX_FUSE_ROPE_KV", switch)
        llm = LLM(model=str(tmp_path), dtype="float32", quantization=quantization, skip_tokenizer_init=True,
                  max_model_len=128, max_num_batched_tokens=64, max_num_seqs=4 if quantization is None else 1,
                  num_gpu_blocks_override=64)
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
        tokens[switch] = [o.outputs[0].token_ids for o in outputs]
        llm.shutdown()
    assert tokens["1"] == tokens["0"]
