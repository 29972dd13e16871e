"""The mixture-of-experts MLP (``models.moe``): the routed-row layout, the whole MLP against a token-by-token
computation in numpy, the engine against Hugging Face's greedy tokens, int8 experts, loading errors.

Fresh random inputs every run (the seed is in failures). The grouped matmul kernel's own cases are in
``tests/test_grouped_matmul.py``; the models' logits against Hugging Face's in ``tests/test_model_vs_hf.py``.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import ModelConfig
from models.moe import block_rows, expert_mlp, moe_mlp, pair_blocks, route, sort_by_expert, uses_pair_blocks


@pytest.mark.parametrize("num_tokens, top_k, E, block_m", [(1, 2, 8, 16), (37, 3, 8, 16), (200, 2, 4, 64)])
def test_sort_by_expert_puts_every_pair_once_in_single_expert_blocks(num_tokens, top_k, E, block_m):
    rng = np.random.default_rng()
    experts = np.stack([rng.choice(E, top_k, replace=False) for _ in range(num_tokens)]).astype(np.int32)
    rows = jax.tree.map(np.asarray, sort_by_expert(jnp.asarray(experts), E, block_m))
    assert rows.token.shape[0] == len(rows.block_expert) * block_m
    real = rows.token < num_tokens
    # every (token, expert) pair once, and pair_row finds it
    row_expert = np.repeat(rows.block_expert, block_m)
    assert sorted(zip(rows.token[real], row_expert[real])) == sorted(
        (t, experts[t, j]) for t in range(num_tokens) for j in range(top_k))
    assert sorted(rows.pair_row) == sorted(np.flatnonzero(real))
    pairs = np.arange(num_tokens * top_k)
    assert (rows.token[rows.pair_row] == pairs // top_k).all()
    assert (row_expert[rows.pair_row] == experts.reshape(-1)).all()
    # blocks in expert order, each expert's rows first in its blocks, unused blocks last
    assert (np.diff(rows.block_expert) >= 0).all() and rows.block_expert.max() <= E
    counts = np.bincount(experts.ravel(), minlength=E)
    assert (np.bincount(rows.block_expert[rows.block_expert < E], minlength=E) == -(-counts // block_m)).all()


@pytest.mark.parametrize("num_tokens, top_k, E", [(1, 8, 128), (3, 2, 32), (1, 2, 8)])
def test_pair_blocks_give_each_pair_its_own_block_and_the_sorted_layouts_products(num_tokens, top_k, E):
    """A few tokens' rows without sorting: block p holds pair p's token (then padding) and names its expert; the
    experts' MLP over them gives each pair the output the sorted layout gives it."""
    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    experts = np.stack([rng.choice(E, top_k, replace=False) for _ in range(num_tokens)]).astype(np.int32)
    block_m = block_rows(num_tokens, top_k, E)
    assert uses_pair_blocks(num_tokens, top_k, E)
    pairs = jax.tree.map(np.asarray, pair_blocks(jnp.asarray(experts), E, block_m))
    assert (pairs.block_expert == experts.reshape(-1)).all()
    assert (pairs.pair_row == np.arange(num_tokens * top_k) * block_m).all()
    assert (pairs.token[pairs.pair_row] == np.arange(num_tokens * top_k) // top_k).all()
    assert (np.delete(pairs.token, pairs.pair_row) == num_tokens).all()  # the rest padding
    H, I = 32, 16
    w = {"expert_gate_up": jnp.asarray(rng.standard_normal((E, H, 2 * I)) / np.sqrt(H), jnp.float32),
         "expert_down": jnp.asarray(rng.standard_normal((E, I, H)) / np.sqrt(I), jnp.float32)}
    h = jnp.asarray(rng.standard_normal((num_tokens, H)), jnp.float32)
    outs = []
    for rows in (pairs, sort_by_expert(jnp.asarray(experts), E, block_m)):
        y = expert_mlp(h, jnp.asarray(rows.token), jnp.asarray(rows.block_expert), w, use_kernel=True,
                       interpret=True)
        outs.append(np.asarray(y)[np.asarray(rows.pair_row)])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6, err_msg=f"seed {seed}")


def test_sorting_takes_over_once_pairs_would_share_experts():
    assert uses_pair_blocks(1, 2, 8) and uses_pair_blocks(4, 8, 128) and not uses_pair_blocks(5, 8, 128)
    assert not uses_pair_blocks(2, 2, 8) and not uses_pair_blocks(64, 8, 128)


def test_block_rows_follows_the_rows_an_expert_gets():
    assert block_rows(1, 8, 128) == 16 and block_rows(64, 8, 128) == 16  # decode: a row or none an expert
    assert block_rows(512, 8, 128) == 32 and block_rows(8192, 8, 128) == 128 and block_rows(100, 2, 8) == 32


def numpy_moe(h, w, config):
    """Token by token: softmax, top k (renormalised if asked), each picked expert's SwiGLU MLP, weighted sum."""
    h = np.asarray(h, np.float64)
    out = np.zeros_like(h)
    for t, row in enumerate(h):
        logits = row @ np.asarray(w["router"], np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[:config.num_experts_per_tok]
        gates = probs[top] / (probs[top].sum() if config.norm_topk_prob else 1.0)
        for e, g in zip(top, gates):
            gate, up = (row @ np.asarray(w[name][e], np.float64) for name in ("expert_gate", "expert_up"))
            out[t] += g * ((gate / (1 + np.exp(-gate)) * up) @ np.asarray(w["expert_down"][e], np.float64))
    return out


@pytest.fixture
def swiglu_epilogue(request, monkeypatch):
    """``GroupedMatmulConfig.swiglu_epilogue`` as the test's parameter, through ``$PAGEDJAX_MOE_CONFIG``."""
    from pallas_kernels.grouped_matmul import grouped_matmul_config

    monkeypatch.setenv("PAGEDJAX_MOE_CONFIG", json.dumps({"swiglu_epilogue": request.param}))
    grouped_matmul_config.cache_clear()
    yield request.param
    monkeypatch.delenv("PAGEDJAX_MOE_CONFIG")
    grouped_matmul_config.cache_clear()


# The last two: the gate/up kernel's activation epilogue (one K step here: in the kernel; K splits are
# tests/test_grouped_matmul.py's).
@pytest.mark.parametrize("num_tokens, normalize, use_kernel, joined, swiglu_epilogue", [
    (1, True, True, False, False), (1, False, False, True, False), (5, False, True, True, False),
    (40, True, False, True, False), (40, False, True, False, False), (1, True, True, True, True),
    (40, False, True, True, True)], indirect=["swiglu_epilogue"])
def test_moe_mlp_matches_token_by_token_numpy(num_tokens, normalize, use_kernel, joined, swiglu_epilogue):
    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    config = ModelConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=16, num_experts=6, num_experts_per_tok=2,
                         norm_topk_prob=normalize)
    H, I, E = config.hidden_size, config.intermediate_size, config.num_experts
    w = {"router": rng.standard_normal((H, E)), "expert_gate": rng.standard_normal((E, H, I)) / np.sqrt(H),
         "expert_up": rng.standard_normal((E, H, I)) / np.sqrt(H),
         "expert_down": rng.standard_normal((E, I, H)) / np.sqrt(I)}
    w = {k: jnp.asarray(v, jnp.float32) for k, v in w.items()}
    h = jnp.asarray(rng.standard_normal((num_tokens, H)), jnp.float32)
    want = numpy_moe(h, w, config)
    if joined:
        w["expert_gate_up"] = jnp.concatenate([w.pop("expert_gate"), w.pop("expert_up")], axis=-1)
    experts = functools.partial(expert_mlp, use_kernel=use_kernel, interpret=True)
    got = jax.jit(functools.partial(moe_mlp, config=config, expert_fn=experts))(h, w)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4, err_msg=f"seed {seed}")


def test_route_picks_the_largest_probabilities():
    h = jnp.eye(3, dtype=jnp.float32)
    router = jnp.asarray([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    weights, experts = route(h, router, top_k=2, normalize=True)
    assert np.asarray(experts).tolist() == [[3, 2], [0, 1], [2, 0]]
    np.testing.assert_allclose(np.asarray(weights).sum(axis=1), 1.0, rtol=1e-6)


def test_llm_gives_hugging_faces_greedy_tokens_for_a_mixture_of_experts(tmp_path):
    """A qwen3_moe checkpoint through the engine (batched, chunked prefill, preemption), scanned layers with
    separate gate/up experts and unrolled layers with them joined, the latter through the grouped matmul kernel
    (interpreted): Hugging Face's greedy tokens."""
    import torch

    from engine import LLM, SamplingParams
    from tests.tiny_checkpoints import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path, "qwen3_moe", seed=int(np.random.default_rng().integers(1 << 20)))
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in (3, 17, 30, 9)]
    new_tokens = 10
    with torch.no_grad():
        want = [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for unroll, fuse, backend in ((False, False, "auto"), (True, None, "pallas")):
        llm = LLM(str(tmp_path), dtype="float32", unroll_layers=unroll, fuse_projections=fuse,
                  linear_backend=backend, skip_tokenizer_init=True, max_model_len=48, max_num_seqs=4,
                  max_num_batched_tokens=16, block_size=8, num_gpu_blocks_override=8,
                  admission_reserve_tokens=0)  # vLLM's admission: fills the pool, so preempts
        layer = llm.llm_engine.runner.params["layers"][0] if unroll else llm.llm_engine.runner.params["layers"]
        assert ("expert_gate_up" in layer) == (fuse is None), sorted(layer)
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                            use_tqdm=False)]
        assert llm.stats()["num_preemptions"] > 0
        llm.shutdown()
        assert got == want, (unroll, fuse, backend)


def test_missing_expert_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    from models.safetensors_loader import CheckpointError, load_safetensors_params
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "mixtral", seed=3)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    config = ModelConfig.from_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"experts\.2\.w3\.weight.*expert_up"):
        load_safetensors_params(str(tmp_path), config, jnp.float32, progress=False)


# int4 groups need K a multiple of 32: the tiny models' narrower experts widened for them.
INT4_WIDTHS = {"qwen2_moe": dict(moe_intermediate_size=64, shared_expert_intermediate_size=64),
               "qwen3_moe": dict(moe_intermediate_size=64)}


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_quantized_experts_logits_close_to_dense_and_kernel_matches_jnp(tmp_path, variant, method):
    """``quantization="int8"`` / ``"int4"`` / ``"fp8"`` made at load time: the experts (and attention) quantized, the
    router not; the interpreted kernels' logits equal the jnp path's at the median position. Against the unquantized model: the median position
    within the dense models' tolerance for the method. Not every position: a token whose router scores two experts
    nearly alike may pick the other under the rounding and move further (int8, 12 seeds: medians 0.014-0.029, but
    up to 26% of positions past 0.05 and the whole batch's error 0.02-0.18 for mixtral's 4 experts)."""
    from models.loader import load_model
    from models.quantization import Fp8Weight, Int4Weight, Int8Weight, LinearBackend
    from tests.test_quantization import LOGIT_TOLERANCE, logits_of, ragged_batch, relative_error
    from tests.tiny_checkpoints import write_tiny_checkpoint

    seed = int(np.random.default_rng().integers(1 << 20))
    write_tiny_checkpoint(tmp_path, variant, seed=seed, **(INT4_WIDTHS.get(variant, {}) if method == "int4" else {}))
    dense = load_model(str(tmp_path), dtype="float32")
    quant = load_model(str(tmp_path), dtype="float32", quantization=method)
    layers, kind = quant.params["layers"], {"int8": Int8Weight, "int4": Int4Weight, "fp8": Fp8Weight}[method]
    assert all(isinstance(layers[n], kind) for n in ("expert_gate", "expert_up", "expert_down"))
    if method == "int8":
        assert layers["expert_down"].scale.shape == (quant.config.num_layers, quant.config.num_experts,
                                                     quant.config.hidden_size)
    assert isinstance(layers["router"], jax.Array)
    batch, pages = ragged_batch(dense.config, np.random.default_rng(seed))
    reference = logits_of(dense, batch, pages + 1)
    jnp_path = logits_of(quant, batch, pages + 1, linear_backend=LinearBackend(kernel="xla"))
    replay, quantization_error = f"{variant} {method}, checkpoint and batch seed {seed}", per_position_error(jnp_path,
                                                                                                             reference)
    assert np.median(quantization_error) < LOGIT_TOLERANCE[method], f"{replay}: {np.round(quantization_error, 3)}"
    assert relative_error(jnp_path, reference) < {"int8": 0.3, "int4": 0.9, "fp8": 0.6}[method], replay
    kernel = logits_of(quant, batch, pages + 1, linear_backend=LinearBackend(kernel="pallas", interpret=True))
    assert_equal_but_router_ties(kernel, jnp_path, replay)


def per_position_error(logits: np.ndarray, reference: np.ndarray) -> np.ndarray:
    return np.linalg.norm(logits - reference, axis=1) / np.linalg.norm(reference, axis=1)


def assert_equal_but_router_ties(logits: np.ndarray, reference: np.ndarray, replay: str) -> None:
    """Two computations of the same logits (float32, summed in other orders) agree to 1e-5 at the median position and
    to 5% overall: where a router scores two experts nearly alike, the orders' rounding may pick the other at a
    position (and move the positions after it a little), while a kernel or layout wired wrongly moves every one."""
    from tests.test_quantization import relative_error

    error = per_position_error(logits, reference)
    assert np.median(error) < 1e-5 and relative_error(logits, reference) < 0.05, f"{replay}: {np.round(error, 7)}"


@pytest.mark.parametrize("variant, layout", [("qwen2_moe", "awq"), ("mixtral", "gptq"), ("qwen3_moe", "gptq-act-order"),
                                             ("qwen3_moe", "fp8"), ("qwen3_moe", "fp8-block"),
                                             ("qwen3_moe", "ct-int4-zp-act-order"), ("mixtral", "ct-int8")])
def test_quantized_moe_checkpoint_loads_the_weights_it_encodes(tmp_path, variant, layout):
    """An AWQ / GPTQ (act-order too) / FP8 / compressed-tensors (W4A16, W8A16) mixture-of-experts checkpoint (every
    projection quantized, experts and shared expert included; the router and the shared expert's gate dense, as the
    published ones): the logits of a dense checkpoint of the weights it encodes (exactly for 4 and 8 bits; fp8 also
    quantizes the attention's activations), jnp path and interpreted kernel; the engine serves it."""
    import os
    import re
    import shutil

    from safetensors.numpy import load_file, save_file

    from engine import LLM, SamplingParams
    from models.loader import load_model
    from models.quantization import Fp8Weight, Int4Weight, Int8KMajorWeight, Int8Weight, LinearBackend
    from tests.test_quantization import (LOGIT_TOLERANCE, encode_linear, logits_of, mark_quantized, ragged_batch,
                                         relative_error)
    from tests.tiny_checkpoints import write_tiny_checkpoint

    seed = int(np.random.default_rng().integers(1 << 20))
    rng, replay = np.random.default_rng(seed), f"{variant} {layout}, checkpoint, weights and batch seed {seed}"
    paths = {name: str(tmp_path / name) for name in ("dense", "decoded", "quantized")}
    write_tiny_checkpoint(paths["dense"], variant, seed=seed, **INT4_WIDTHS.get(variant, {}))
    tensors = load_file(os.path.join(paths["dense"], "model.safetensors"))
    linear = [name.removesuffix("weight") for name in tensors if re.search(r"(_proj|\.w[123])\.weight$", name)]
    decoded = dict(tensors)
    act_order, layout = layout.endswith("-act-order"), layout.removesuffix("-act-order")
    for prefix in linear:
        decoded[prefix + "weight"] = np.ascontiguousarray(
            encode_linear(tensors, prefix, layout, rng, act_order=act_order).T, np.float32)
    for name, weights in (("decoded", decoded), ("quantized", tensors)):
        shutil.copytree(paths["dense"], paths[name])
        save_file(weights, os.path.join(paths[name], "model.safetensors"))
    mark_quantized(paths["quantized"], layout, act_order)
    method = {"ct-int4-zp": "int4", "ct-int8": "int8"}.get(layout, layout.removesuffix("-block"))
    quant, dense = load_model(paths["quantized"], dtype="float32"), load_model(paths["decoded"], dtype="float32")
    assert quant.quantization == method
    kind = {"fp8": Fp8Weight, "int8": (Int8Weight, Int8KMajorWeight)}.get(method, Int4Weight)
    assert all(isinstance(quant.params["layers"][n], kind) for n in ("expert_gate", "expert_up", "expert_down", "wq"))
    assert (getattr(quant.params["layers"]["expert_down"], "perm", None) is not None) == act_order
    batch, pages = ragged_batch(dense.config, rng)
    reference = logits_of(dense, batch, pages + 1)
    jnp_path, kernel = (logits_of(quant, batch, pages + 1, linear_backend=backend)
                        for backend in (LinearBackend(kernel="xla"), LinearBackend(kernel="pallas", interpret=True)))
    if method == "fp8":
        assert relative_error(jnp_path, reference) < LOGIT_TOLERANCE["fp8"], replay
    else:
        assert_equal_but_router_ties(jnp_path, reference, replay)
    assert_equal_but_router_ties(kernel, jnp_path, replay)
    llm = LLM(paths["quantized"], dtype="float32", skip_tokenizer_init=True, max_model_len=64)
    out = llm.generate([[1, 2, 3, 4, 5]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)
    llm.shutdown()
    assert len(out[0].outputs[0].token_ids) == 6


@pytest.mark.gpu
@pytest.mark.parametrize("swiglu_epilogue", [False, True], indirect=True)
@pytest.mark.parametrize("num_tokens", [1, 64, 3000])
def test_moe_mlp_kernel_matches_jnp_on_gpu(num_tokens, swiglu_epilogue):
    """Qwen3-30B-A3B's expert layer (128 experts, 8 a token, bf16): the compiled kernels (with and without the
    activation epilogue) give the jnp path's output."""
    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    config = ModelConfig(model_type="qwen3_moe", vocab_size=64, hidden_size=2048, intermediate_size=768,
                         num_layers=1, num_heads=32, num_kv_heads=4, head_dim=128, num_experts=128,
                         num_experts_per_tok=8, norm_topk_prob=True)
    H, I, E = config.hidden_size, config.intermediate_size, config.num_experts
    normal = functools.partial(rng.standard_normal, dtype=np.float32)  # 600M draws: float64 held the host ~15 s
    w = {"router": normal((H, E)) / np.sqrt(H), "expert_gate_up": normal((E, H, 2 * I)) / np.sqrt(H),
         "expert_down": normal((E, I, H)) / np.sqrt(I)}
    w = {k: jnp.asarray(v, jnp.bfloat16) for k, v in w.items()}
    h = jnp.asarray(rng.standard_normal((num_tokens, H)), jnp.bfloat16)
    outs = [np.asarray(jax.jit(functools.partial(moe_mlp, config=config, expert_fn=functools.partial(
        expert_mlp, use_kernel=k)))(h, w), np.float32) for k in (True, False)]
    err = np.abs(outs[0] - outs[1]).max() / np.abs(outs[1]).max()
    assert err < 2e-2, f"seed {seed}: max error {err:.2e} (of the largest output)"
