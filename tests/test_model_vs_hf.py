"""Our forward pass, on weights from our safetensors loader, against Hugging Face ``transformers``.

For every architecture variant in ``tiny_checkpoints.VARIANTS`` (llama untied with an
explicit head_dim and default rope; llama tied with llama3 rope scaling; mistral with a
sliding window shorter than the prompts, from a sharded checkpoint; qwen2 with qkv bias;
qwen3 with qk norm; qwen2 with YaRN; phi3 with joined projections and a sliding window; gemma2 and
gemma3_text with sliding and full layers, soft caps, sandwich norms; the mixtures of experts mixtral,
qwen3_moe and gpt_oss, whose attention has sinks and whose router and experts have biases): a random tiny checkpoint
is written with ``save_pretrained``, loaded with ``load_safetensors_params`` and
(a) a ragged batch of three prompts gives, in one step of ``forward``, the logits HF
gives each prompt alone, at every position; (b) 16 greedy tokens equal HF's.
Also: loading a bf16 checkpoint, loading onto a tensor-parallel mesh of fake CPU
devices, and dummy params.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models.batch import ModelInput, make_kv_cache
from models.config import ModelConfig
from models.dummy import load_dummy_params
from models.llama import forward, param_shapes
from models.safetensors_loader import load_safetensors_params
from tests.tiny_checkpoints import VARIANTS, write_tiny_checkpoint

BLOCK_SIZE = 8
# 5 tokens: inside one page; 16: ends exactly on a page boundary; 33: one past a boundary.
PROMPT_LENGTHS = (5, 16, 33)
NEW_TOKENS = 16
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    """(variant, HF model, our config, our params) of a freshly written tiny checkpoint."""
    variant = request.param
    path = tmp_path_factory.mktemp(variant)
    seed = list(VARIANTS).index(variant)
    # mistral also exercises the sharded layout (model-*.safetensors + index).
    shard = "64KB" if variant == "mistral" else None
    model = write_tiny_checkpoint(path, variant, seed=seed, max_shard_size=shard)
    config = ModelConfig.from_pretrained(str(path))
    params = load_safetensors_params(str(path), config, jnp.float32, progress=False)
    return variant, model, config, params


def random_prompts(vocab_size: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, n).tolist() for n in PROMPT_LENGTHS]


def scattered_ragged_batch(prompts: list[list[int]], block_size: int, rng: np.random.Generator):
    """One prefill step for all prompts, with pages in random order and padded T and S.

    Returns the step input and the number of pages the KV cache needs. Real tokens are
    followed by padding tokens that write into page 0; one padding sequence follows
    the real ones.
    """
    lengths = np.array([len(p) for p in prompts])
    pages_per_seq = -(-lengths // block_size)
    max_pages = int(pages_per_seq.max())
    num_pages = 1 + int(pages_per_seq.sum()) + 3  # page 0 is the padding sink; a few spare
    free_pages = rng.permutation(np.arange(1, num_pages))
    num_seqs, padded_seqs = len(prompts), len(prompts) + 1
    block_tables = np.zeros((padded_seqs, max_pages), np.int32)
    taken = 0
    for s, n in enumerate(pages_per_seq):
        block_tables[s, :n] = free_pages[taken:taken + n]
        taken += n
    real = int(lengths.sum())
    padded_tokens = real + 7
    token_ids = np.zeros(padded_tokens, np.int32)
    token_ids[:real] = np.concatenate(prompts)
    positions = np.zeros(padded_tokens, np.int32)
    positions[:real] = np.concatenate([np.arange(n) for n in lengths])
    seq_of_token = np.repeat(np.arange(num_seqs), lengths)
    slot_mapping = np.arange(padded_tokens, dtype=np.int32) % block_size  # padding -> page 0
    slot_mapping[:real] = (block_tables[seq_of_token, positions[:real] // block_size] * block_size
                           + positions[:real] % block_size)
    cu_q_lens = np.concatenate([[0], np.cumsum(lengths), [real]]).astype(np.int32)
    kv_lens = np.concatenate([lengths, [0]]).astype(np.int32)
    batch = ModelInput(
        token_ids=jnp.asarray(token_ids), positions=jnp.asarray(positions),
        slot_mapping=jnp.asarray(slot_mapping), cu_q_lens=jnp.asarray(cu_q_lens),
        kv_lens=jnp.asarray(kv_lens), block_tables=jnp.asarray(block_tables),
        num_seqs=jnp.asarray([num_seqs], jnp.int32),
        logits_indices=jnp.arange(real, dtype=jnp.int32),  # every real token's logits
    )
    return batch, num_pages


def hf_logits(model, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float().numpy()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by HF's own ``generate`` (the tiny configs have no eos)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_ragged_prefill_logits_match_hf(checkpoint):
    variant, model, config, params = checkpoint
    prompts = random_prompts(config.vocab_size, seed=len(variant))
    batch, num_pages = scattered_ragged_batch(prompts, BLOCK_SIZE, np.random.default_rng(1))
    cache = make_kv_cache(config, num_pages, BLOCK_SIZE, jnp.float32)
    logits, _ = jax.jit(forward, static_argnames=("config",))(params, cache, batch, config=config)
    ours = np.split(np.asarray(logits), np.cumsum(PROMPT_LENGTHS)[:-1])
    assert np.ptp(ours[0]) > 1.0, "random model gives near-constant logits: the comparison would be weak"
    for prompt, got in zip(prompts, ours):
        np.testing.assert_allclose(got, hf_logits(model, prompt), atol=1e-4, rtol=1e-4,
                                   err_msg=f"{variant}: logits of a {len(prompt)}-token prompt differ from HF")


def test_greedy_tokens_match_hf(checkpoint):
    from models.generate import greedy_generate

    variant, model, config, params = checkpoint
    prompts = random_prompts(config.vocab_size, seed=100 + len(variant))
    ours = greedy_generate(params, config, prompts, NEW_TOKENS, block_size=BLOCK_SIZE)
    wanted = [hf_greedy(model, prompt, NEW_TOKENS) for prompt in prompts]
    assert len(set(sum(wanted, []))) > 8, "near-constant continuations would make the comparison weak"
    for prompt, got, want in zip(prompts, ours, wanted):
        assert got == want, f"{variant}: greedy tokens after a {len(prompt)}-token prompt differ from HF"


def test_loaded_params_follow_param_shapes_and_hf_values(checkpoint):
    variant, model, config, params = checkpoint
    assert jax.tree_util.tree_map(lambda x: x.shape, params) == param_shapes(config)
    sd = model.state_dict()
    last = config.num_layers - 1
    if variant == "gpt_oss":  # stacked [E, in, out], gate and up columns in turn; biases; the sinks
        gate_up = sd[f"model.layers.{last}.mlp.experts.gate_up_proj"].numpy()
        np.testing.assert_array_equal(params["layers"]["expert_up"][last], gate_up[..., 1::2])
        np.testing.assert_array_equal(params["layers"]["expert_gate_bias"][last],
                                      sd[f"model.layers.{last}.mlp.experts.gate_up_proj_bias"].numpy()[..., ::2])
        np.testing.assert_array_equal(params["layers"]["expert_down"][last],
                                      sd[f"model.layers.{last}.mlp.experts.down_proj"].numpy())
        np.testing.assert_array_equal(params["layers"]["router"][last],
                                      sd[f"model.layers.{last}.mlp.router.weight"].numpy().T)
        np.testing.assert_array_equal(params["layers"]["sinks"][last],
                                      sd[f"model.layers.{last}.self_attn.sinks"].numpy())
    elif config.is_moe:  # transformers holds the experts joined: gate_up_proj [E, 2I, H], down_proj [E, H, I]
        gate_up = sd[f"model.layers.{last}.mlp.experts.gate_up_proj"].numpy()
        np.testing.assert_array_equal(params["layers"]["expert_down"][last],
                                      np.swapaxes(sd[f"model.layers.{last}.mlp.experts.down_proj"].numpy(), 1, 2))
        np.testing.assert_array_equal(params["layers"]["expert_up"][last],
                                      np.swapaxes(gate_up[:, config.intermediate_size:], 1, 2))
        np.testing.assert_array_equal(params["layers"]["router"][last],
                                      sd[f"model.layers.{last}.mlp.gate.weight"].numpy().T)
    else:
        np.testing.assert_array_equal(params["layers"]["w_down"][last],
                                      sd[f"model.layers.{last}.mlp.down_proj.weight"].numpy().T)
    if variant == "phi3":  # rows of the joined qkv_proj [q | k | v] and gate_up_proj [gate | up]
        q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
        np.testing.assert_array_equal(params["layers"]["wk"][last],
                                      sd[f"model.layers.{last}.self_attn.qkv_proj.weight"].numpy()[q:q + kv].T)
        np.testing.assert_array_equal(params["layers"]["w_up"][last],
                                      sd[f"model.layers.{last}.mlp.gate_up_proj.weight"].numpy()[inter:].T)
    if not config.pre_norms:  # OLMo 2: the blocks' outputs normed; q and k over all their heads
        for ours, theirs in (("attn_out_norm", "post_attention_layernorm"),
                             ("mlp_out_norm", "post_feedforward_layernorm"), ("q_norm", "self_attn.q_norm"),
                             ("k_norm", "self_attn.k_norm")):
            np.testing.assert_array_equal(params["layers"][ours][0], sd[f"model.layers.0.{theirs}.weight"].numpy())
        assert params["layers"]["q_norm"].shape == (config.num_layers, config.q_size)
    elif config.sandwich_norms:  # Gemma: four norms a layer, stored as w - 1 (kept as w, in float32)
        for ours, theirs in (("post_norm", "pre_feedforward_layernorm"), ("attn_out_norm", "post_attention_layernorm"),
                             ("mlp_out_norm", "post_feedforward_layernorm")):
            np.testing.assert_array_equal(params["layers"][ours][0],
                                          sd[f"model.layers.0.{theirs}.weight"].numpy() + np.float32(1))
        assert params["final_norm"].dtype == jnp.float32
    else:
        np.testing.assert_array_equal(params["layers"]["post_norm"][0],
                                      sd["model.layers.0.post_attention_layernorm.weight"].numpy())
    assert ("lm_head" in params) == (not config.tie_word_embeddings)


def test_bf16_checkpoint_is_cast_exactly(tmp_path):
    """A bf16 checkpoint (the common case) reads through the memmap path; values survive casts exactly."""
    model = write_tiny_checkpoint(tmp_path, "qwen3", seed=7, dtype=torch.bfloat16)
    config = ModelConfig.from_pretrained(str(tmp_path))
    as_f32 = load_safetensors_params(str(tmp_path), config, jnp.float32, progress=False)
    as_bf16 = load_safetensors_params(str(tmp_path), config, jnp.bfloat16, progress=False)
    want = model.state_dict()["model.layers.1.self_attn.k_proj.weight"].numpy().T  # bf16 values, as f32
    assert as_bf16["layers"]["wk"].dtype == jnp.bfloat16 and as_f32["layers"]["wk"].dtype == jnp.float32
    np.testing.assert_array_equal(as_f32["layers"]["wk"][1], want)
    np.testing.assert_array_equal(np.asarray(as_bf16["layers"]["wk"][1]).astype(np.float32), want)
    np.testing.assert_array_equal(as_f32["layers"]["k_norm"], np.asarray(as_bf16["layers"]["k_norm"], np.float32))


_SHARDED_LOAD = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from models.config import ModelConfig
    from models.dummy import load_dummy_params
    from models.llama import param_shapes
    from models.safetensors_loader import load_safetensors_params
    path = sys.argv[1]
    config = ModelConfig.from_pretrained(path)
    mesh = Mesh(np.array(jax.devices()), ("tp",))
    # Column-parallel on the last axis of 3-D weights, row-parallel wo/w_down, the rest replicated.
    def spec(path, shape):
        name = path[-1].key
        if name in ("wo", "w_down"):
            return NamedSharding(mesh, P(None, "tp", None))
        if len(shape) == 3:
            return NamedSharding(mesh, P(None, None, "tp"))
        return NamedSharding(mesh, P())
    shardings = jax.tree_util.tree_map_with_path(spec, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    sharded = load_safetensors_params(path, config, jnp.float32, shardings=shardings, progress=False)
    plain = load_safetensors_params(path, config, jnp.float32, progress=False)
    for (p, a), b, s in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree_util.tree_leaves(plain),
                            jax.tree_util.tree_leaves(shardings)):
        assert a.sharding == s, (p, a.sharding, s)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(p))
    wq = sharded["layers"]["wq"]
    assert {sh.data.shape for sh in wq.addressable_shards} == {(wq.shape[0], wq.shape[1], wq.shape[2] // 4)}
    dummy = load_dummy_params(config, jnp.bfloat16, seed=3, shardings=shardings)
    assert all(a.sharding == s for a, s in zip(jax.tree_util.tree_leaves(dummy), jax.tree_util.tree_leaves(shardings)))
    print("OK", len(jax.devices()))
""")


def test_load_onto_tensor_parallel_mesh(tmp_path):
    """On 4 fake CPU devices each device gets its slice under the requested sharding, values unchanged."""
    write_tiny_checkpoint(tmp_path, "llama", seed=5)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", _SHARDED_LOAD, str(tmp_path)], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK 4" in result.stdout


def test_dummy_params_shapes_scale_and_seed():
    from tests.tiny_checkpoints import tiny_hf_config

    config = ModelConfig.from_hf_dict(tiny_hf_config("qwen2").to_dict())
    params = load_dummy_params(config, jnp.bfloat16, seed=1)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, params)
    assert shapes == param_shapes(config)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
    wq = np.asarray(params["layers"]["wq"], np.float32)
    assert 0.015 < wq.std() < 0.025 and abs(wq.mean()) < 0.002
    assert np.all(np.asarray(params["final_norm"], np.float32) == 1.0)
    assert np.asarray(params["layers"]["bq"], np.float32).std() > 0.01
    # Different tensors are not copies of one another; seeds are reproducible and distinct.
    assert not np.array_equal(np.asarray(params["layers"]["w_gate"]), np.asarray(params["layers"]["w_up"]))
    again = load_dummy_params(config, jnp.bfloat16, seed=1)
    other = load_dummy_params(config, jnp.bfloat16, seed=2)
    np.testing.assert_array_equal(np.asarray(again["embed"]), np.asarray(params["embed"]))
    assert not np.array_equal(np.asarray(other["embed"]), np.asarray(params["embed"]))


LLAMA_3_1_8B = dict(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
    rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
)


@pytest.mark.gpu
def test_dummy_params_llama_3_1_8b_fit_on_one_gpu():
    config = ModelConfig.from_hf_dict(LLAMA_3_1_8B)
    params = load_dummy_params(config, jnp.bfloat16, seed=0)
    leaves = jax.tree_util.tree_leaves(params)
    assert sum(x.size for x in leaves) == config.num_params()
    assert all(x.dtype == jnp.bfloat16 and x.devices() == {jax.devices()[0]} for x in leaves)
    std = float(jnp.std(params["layers"]["w_gate"][0].astype(jnp.float32)))
    assert 0.019 < std < 0.021
    from models.generate import prompt_logits

    logits = prompt_logits(params, config, [[1, 2, 3, 4, 5], list(range(100, 140))])
    # normal * 0.02 keeps 32 layers' activations sane: logits neither blow up nor vanish.
    assert all(np.isfinite(x).all() and 0.3 < x.std() < 5.0 for x in logits)


@pytest.mark.parametrize("variant", ["gemma2", "gemma3_text", "smollm3", "olmo2", "gpt_oss"])
def test_engine_gives_hf_greedy_tokens_for_sliding_and_full_layers(tmp_path, variant):
    """Gemma (SmolLM3: rotary and NoPE layers; OLMo 2: no pre-norms; gpt-oss: sinks) through the engine: layers
    scanned (each layer's sliding window and rope picked on the device) with the jnp attention, and unrolled (picked
    per layer when tracing) with the Pallas kernel interpreted (its query scale and soft cap), batched with chunked
    prefill: Hugging Face's greedy tokens, prompts longer than the window."""
    from engine import LLM, SamplingParams

    model = write_tiny_checkpoint(tmp_path, variant, seed=int(np.random.default_rng().integers(1 << 20)))
    prompts = random_prompts(256, seed=7)
    want = [hf_greedy(model, prompt, 8) for prompt in prompts]
    for unroll, attention in ((False, "reference"), (True, "pallas")):
        llm = LLM(str(tmp_path), dtype="float32", unroll_layers=unroll, attention_backend=attention,
                  skip_tokenizer_init=True, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32)
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        got = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                            use_tqdm=False)]
        llm.shutdown()
        assert got == want, (variant, unroll, attention)


def test_gemma3_image_text_checkpoint_serves_its_text_model(tmp_path):
    """A Gemma 3 image-text checkpoint (``Gemma3ForConditionalGeneration``: the decoder under
    ``language_model.model.``, its config a ``text_config`` that leaves transformers' defaults out): its text
    model's logits equal HF's for text-only prompts; the vision tower is not read."""
    import json

    import transformers

    from tests.tiny_checkpoints import randomize_

    text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, sliding_window=12, query_pre_attn_scalar=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    hf_config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                          eos_token_id=[1, 106])
    model = transformers.Gemma3ForConditionalGeneration(hf_config).eval()
    randomize_(model, seed=5)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("num_attention_heads", "num_key_value_heads", "head_dim", "query_pre_attn_scalar"):
        saved["text_config"].pop(key, None)  # as google/gemma-3-4b-it's file: transformers' defaults apply...
    saved["text_config"].update(num_hidden_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = ModelConfig.from_pretrained(str(tmp_path))
    assert config.model_type == "gemma3_text" and config.num_heads == 8 and config.eos_token_ids == (1, 106)
    # ...which these tiny shapes do not have: put them back to compare with the model as built
    saved["text_config"].update(num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = ModelConfig.from_pretrained(str(tmp_path))
    params = load_safetensors_params(str(tmp_path), config, jnp.float32, progress=False)
    prompts = random_prompts(config.vocab_size, seed=3)
    batch, num_pages = scattered_ragged_batch(prompts, BLOCK_SIZE, np.random.default_rng(2))
    cache = make_kv_cache(config, num_pages, BLOCK_SIZE, jnp.float32)
    logits, _ = jax.jit(forward, static_argnames=("config",))(params, cache, batch, config=config)
    for prompt, got in zip(prompts, np.split(np.asarray(logits), np.cumsum(PROMPT_LENGTHS)[:-1])):
        np.testing.assert_allclose(got, hf_logits(model, prompt), atol=1e-4, rtol=1e-4)


def test_gpt_oss_mxfp4_experts_stay_4_bit_and_give_transformers_logits(tmp_path):
    """gpt-oss's published checkpoints store the experts in MXFP4 (``*_blocks`` of two e2m1 codes a byte, ``*_scales``
    a power of two each 32 values): they load 4-bit (``Int4Weight(codes="e2m1")``) standing for what transformers'
    ``convert_moe_packed_tensors`` makes of them, and the model gives transformers' logits (the jnp experts) and
    greedy tokens through the engine (the grouped matmul kernel interpreted)."""
    from engine import LLM, SamplingParams
    from models.quantization import Int4Weight, QuantizationError, dequantize
    from tests.tiny_checkpoints import write_mxfp4_experts

    model = write_tiny_checkpoint(tmp_path, "gpt_oss", seed=9)
    write_mxfp4_experts(tmp_path, model, seed=0)
    config = ModelConfig.from_pretrained(str(tmp_path))
    params = load_safetensors_params(str(tmp_path), config, jnp.float32, progress=False)
    gate_up = model.model.layers[1].mlp.experts.gate_up_proj.detach().numpy()
    up = params["layers"]["expert_up"]
    assert isinstance(up, Int4Weight) and up.codes == "e2m1" and up.packed.dtype == np.uint8
    assert up.scales.dtype == np.uint8 and up.zeros is None  # the checkpoint's E8M0 exponents as they are
    np.testing.assert_array_equal(dequantize(up)[1], gate_up[..., 1::2])
    prompts = random_prompts(config.vocab_size, seed=3)
    batch, num_pages = scattered_ragged_batch(prompts, BLOCK_SIZE, np.random.default_rng(2))
    logits, _ = jax.jit(forward, static_argnames=("config",))(params, make_kv_cache(config, num_pages, BLOCK_SIZE,
                                                                                   jnp.float32), batch, config=config)
    for prompt, got in zip(prompts, np.split(np.asarray(logits), np.cumsum(PROMPT_LENGTHS)[:-1])):
        np.testing.assert_allclose(got, hf_logits(model, prompt), atol=1e-4, rtol=1e-4)
    llm = LLM(str(tmp_path), dtype="float32", linear_backend="pallas", skip_tokenizer_init=True, max_model_len=64)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=6,
                                                                                  ignore_eos=True), use_tqdm=False)
    llm.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(model, p, 6) for p in prompts]
    with pytest.raises(QuantizationError, match="quantized with mxfp4, but quantization='int8'"):
        LLM(str(tmp_path), quantization="int8", skip_tokenizer_init=True)
