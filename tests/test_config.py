"""``ModelConfig`` parsing of what ``transformers`` really writes, for llama, mistral, qwen2, qwen3.

Configs come from real ``transformers`` config objects (``to_dict()`` and
``save_pretrained``'s config.json, which in transformers 5 folds ``rope_theta`` and
``rope_scaling`` into ``rope_parameters``) and from a transformers-4 style config.json
(Llama-3.1-8B's), and unsupported options must be refused by name.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers

from models.config import ModelConfig, ModelConfigError, UnsupportedModelError
from tests.tiny_checkpoints import LLAMA3_ROPE, VARIANTS, tiny_hf_config

# Llama-3.1-8B's config.json as transformers 4.x wrote it (rope_theta and rope_scaling top-level).
LLAMA_3_1_8B_V4 = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}


def hf_head_dim(hf_config) -> int:
    """The head_dim transformers' own attention uses for this config."""
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return model.model.layers[0].self_attn.head_dim


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parses_transformers_config_object_and_saved_json_alike(variant, tmp_path):
    hf = tiny_hf_config(variant, vocab_size=300 + len(variant), intermediate_size=80 + 8 * len(variant))
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved or "rope_theta" in saved  # whichever this transformers writes
    from_dict = ModelConfig.from_hf_dict(hf.to_dict())
    from_file = ModelConfig.from_pretrained(str(tmp_path))
    assert from_dict == from_file and hash(from_dict) == hash(from_file)  # static jit argument
    c = from_file
    assert c.model_type == VARIANTS[variant][0]
    expert_width = getattr(hf, "moe_intermediate_size", None)  # qwen3_moe's experts; its intermediate_size is unused
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (hf.vocab_size, hf.hidden_size,
                                                                  expert_width or hf.intermediate_size)
    assert (c.num_layers, c.num_heads, c.num_kv_heads) == (
        hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads)
    assert c.head_dim == hf_head_dim(hf)
    assert c.rms_norm_eps == hf.rms_norm_eps
    assert c.rope_theta == hf.rope_parameters.get("full_attention", hf.rope_parameters)["rope_theta"]
    assert c.tie_word_embeddings == hf.tie_word_embeddings
    assert c.qkv_bias == (c.model_type in ("qwen2", "qwen2_moe") or getattr(hf, "attention_bias", False))
    assert c.o_bias == getattr(hf, "attention_bias", False)
    assert c.qk_norm == (c.model_type in ("qwen3", "qwen3_moe", "gemma3_text", "olmo2"))
    assert c.sliding_window == (hf.sliding_window if c.model_type in ("mistral", "mixtral", "phi3", "gemma2",
                                                                      "gemma3_text", "gpt_oss") else None)
    assert c.sandwich_norms == (c.model_type.startswith("gemma") or c.model_type == "olmo2")
    assert c.pre_norms == (c.model_type != "olmo2") and c.qk_norm_full == (c.model_type == "olmo2")
    assert c.is_moe == (c.model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss"))
    assert c.attention_sinks == c.moe_biases == (c.model_type == "gpt_oss")
    if c.is_moe:
        experts = getattr(hf, "num_local_experts", None) or hf.num_experts  # qwen2_moe's transformers names it so
        assert (c.num_experts, c.num_experts_per_tok) == (experts, hf.num_experts_per_tok)
        assert c.shared_expert_size == (hf.shared_expert_intermediate_size if c.model_type == "qwen2_moe" else 0)
        assert c.norm_topk_prob == (c.model_type in ("mixtral", "gpt_oss") or hf.norm_topk_prob)


def test_explicit_head_dim_differs_from_hidden_over_heads():
    c = ModelConfig.from_hf_dict(tiny_hf_config("qwen3", head_dim=48).to_dict())
    assert c.head_dim == 48 and c.hidden_size // c.num_heads == 16
    assert (c.q_size, c.kv_size) == (4 * 48, 2 * 48)
    implicit = ModelConfig.from_hf_dict(tiny_hf_config("llama3_tied").to_dict())
    assert implicit.head_dim == implicit.hidden_size // implicit.num_heads


def test_llama3_rope_scaling_from_transformers5_rope_parameters():
    c = ModelConfig.from_hf_dict(tiny_hf_config("llama3_tied").to_dict())
    assert c.rope_theta == LLAMA3_ROPE["rope_theta"]
    assert c.rope_scaling == ("llama3", LLAMA3_ROPE["factor"], LLAMA3_ROPE["low_freq_factor"],
                              LLAMA3_ROPE["high_freq_factor"], LLAMA3_ROPE["original_max_position_embeddings"])
    assert ModelConfig.from_hf_dict(tiny_hf_config("llama").to_dict()).rope_scaling is None
    # no original_max_position_embeddings: transformers fills in max_position_embeddings
    bare = dict(tiny_hf_config("llama").to_dict(), max_position_embeddings=512,
                rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0})
    assert ModelConfig.from_hf_dict(bare).rope_scaling == ("llama3", 8.0, 1.0, 4.0, 512)


def test_transformers4_style_llama_3_1_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_1_8B_V4))
    c = ModelConfig.from_pretrained(str(tmp_path))
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 8192)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (32, 32, 8, 128)
    assert c.eos_token_ids == (128001, 128008, 128009) and c.bos_token_id == 128000
    assert not c.tie_word_embeddings and not c.qkv_bias and not c.qk_norm
    assert c.num_params() == 8_030_261_248  # Llama-3.1-8B's published parameter count
    # transformers 5 reads the same file into the same model shape.
    assert ModelConfig.from_hf_dict(transformers.LlamaConfig(**LLAMA_3_1_8B_V4).to_dict()) == c


@pytest.mark.parametrize("fields", [
    dict(factor=4.0, original_max_position_embeddings=32768),  # Qwen2.5 / Qwen3's long-context setting
    dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0,
         mscale_all_dim=0.707),  # DeepSeek's: the attention factor from mscale / mscale_all_dim
    dict(factor=8.0, original_max_position_embeddings=8192, attention_factor=1.3, truncate=False, beta_fast=16),
])
def test_yarn_frequencies_and_attention_factor_are_transformers(fields):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from models.llama import rope_attention_factor, rope_inv_freq

    hf = tiny_hf_config("llama", head_dim=128, max_position_embeddings=131072,
                        rope_parameters=dict(rope_type="yarn", rope_theta=1e6, **fields))
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    ours = ModelConfig.from_hf_dict(hf.to_dict())
    np.testing.assert_allclose(rope_inv_freq(ours), inv_freq.numpy(), rtol=1e-6)
    assert rope_attention_factor(ours) == pytest.approx(attention_factor, rel=1e-12)


def test_linear_rope_scaling_and_legacy_type_key():
    d = tiny_hf_config("llama").to_dict()
    d["rope_parameters"] = {"rope_type": "linear", "factor": 2.5, "rope_theta": 20000.0}
    c = ModelConfig.from_hf_dict(d)
    assert c.rope_scaling == ("linear", 2.5) and c.rope_theta == 20000.0
    legacy = {k: v for k, v in d.items() if k != "rope_parameters"}
    legacy.update(rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 2.5})
    assert ModelConfig.from_hf_dict(legacy) == c


def _transformers_rope(d: dict) -> tuple:
    """The rope type, factor and base transformers' config class reads from a config.json dict."""
    rope = transformers.AutoConfig.for_model(**json.loads(json.dumps(d))).rope_parameters
    rope = rope.get("full_attention", rope)
    return rope.get("rope_type", "default"), rope.get("factor"), rope["rope_theta"]


@pytest.mark.parametrize("fields", [
    # transformers 5's file, plus the 4.x rope_scaling block model cards tell users to add (Qwen2.5's YaRN)
    dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4},
         rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}, rope_scaling={"type": "linear", "factor": 2.0}),
    dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
         rope_scaling={"rope_type": "linear", "factor": 3.0, "rope_theta": 3e3}, rope_theta=7.0),
    dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}, rope_theta=100.0),  # the parameters' base wins
    dict(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=500.0),
], ids=["added-yarn", "added-linear", "scaling-base", "parameters-base", "v4"])
@pytest.mark.parametrize("variant", ["qwen2", "mixtral"])
def test_rope_fields_in_both_places_read_as_transformers_reads_them(variant, fields):
    """A config.json with both ``rope_parameters`` and ``rope_scaling``, or a base in both places: transformers 5
    takes the ``rope_scaling`` block whole (a probe found it ignored: YaRN silently off, logits off by up to 6), and
    the parameters' base over the top-level one where no block is added."""
    d = {k: v for k, v in tiny_hf_config(variant).to_dict().items() if k not in ("rope_parameters", "rope_theta")}
    d.update(json.loads(json.dumps(fields)), max_position_embeddings=64)
    rope_type, factor, theta = _transformers_rope(d)
    ours = ModelConfig.from_hf_dict(d)
    assert ours.rope_theta == theta and (ours.rope_scaling or ("default", None))[:2] == (rope_type, factor)


def test_a_base_the_added_block_drops_is_warned_of(caplog):
    """transformers 5 takes an added ``rope_scaling`` block whole, so ``rope_parameters``' base (1e6 here) is not
    read: faithful to it, but a likely mistake in the file, so the load says so."""
    d = {k: v for k, v in tiny_hf_config("qwen2").to_dict().items() if k != "rope_theta"}
    d.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6},
             rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    with caplog.at_level("WARNING"):
        assert ModelConfig.from_hf_dict(d).rope_theta == _transformers_rope(d)[2] == 10000.0
    assert "rope_theta 1000000.0) and rope_scaling" in caplog.text


def test_an_unsupported_rope_type_in_an_added_block_is_refused():
    d = tiny_hf_config("phi3").to_dict()
    d["rope_scaling"] = {"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    with pytest.raises(UnsupportedModelError, match="longrope"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("variant", ["llama", "mistral", "qwen3", "phi3", "gemma2", "gemma3_text", "smollm3", "olmo2",
                                     "mixtral", "qwen3_moe"])
def test_fields_left_out_take_transformers_defaults(variant):
    """A hand-made config.json without the optional fields: the model type's transformers defaults (rope base,
    norm epsilon, head size, window, Gemma 2's soft caps and activation, context length), not generic ones."""
    hf = tiny_hf_config(variant)
    keep = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "num_local_experts", "num_experts",
            "num_experts_per_tok")
    d = {k: v for k, v in hf.to_dict().items() if k in keep}
    default = transformers.AutoConfig.for_model(**d)
    ours = ModelConfig.from_hf_dict(d)
    assert ours.rope_theta == _transformers_rope(default.to_dict())[2]
    assert (ours.rms_norm_eps, ours.max_position_embeddings) == (default.rms_norm_eps,
                                                                 default.max_position_embeddings)
    assert ours.head_dim == (getattr(default, "head_dim", None) or default.hidden_size // default.num_attention_heads)
    assert ours.sliding_window == (getattr(default, "sliding_window", None) or None)
    if variant == "gemma2":
        assert (ours.attn_soft_cap, ours.final_soft_cap, ours.hidden_act) == (50.0, 30.0, "gelu_pytorch_tanh")


def test_tied_and_untied_embeddings():
    tied = ModelConfig.from_hf_dict(tiny_hf_config("llama", tie_word_embeddings=True).to_dict())
    untied = ModelConfig.from_hf_dict(tiny_hf_config("llama", tie_word_embeddings=False).to_dict())
    assert tied.tie_word_embeddings and not untied.tie_word_embeddings
    assert untied.num_params() - tied.num_params() == tied.vocab_size * tied.hidden_size


@pytest.mark.parametrize("variant", ["gemma2", "gemma3_text", "smollm3"])
def test_tied_by_default_where_transformers_ties(variant):
    """transformers writes only the keys that differ from a config class's defaults, so a tied Gemma 2 / 3 or
    SmolLM3 config.json may have no ``tie_word_embeddings``: tied, as those classes default to."""
    d = tiny_hf_config(variant).to_dict()
    d.pop("tie_word_embeddings", None)
    assert ModelConfig.from_hf_dict(d).tie_word_embeddings
    llama = tiny_hf_config("llama").to_dict()
    llama.pop("tie_word_embeddings", None)
    assert not ModelConfig.from_hf_dict(llama).tie_word_embeddings


def test_yarn_extends_the_context_length_as_vllm_derives_it():
    """Qwen2.5's long-context recipe: YaRN (factor 4 over the original 64) added to a config of 64 positions."""
    from engine.engine_args import EngineArgs

    yarn = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)
    c = ModelConfig.from_hf_dict(tiny_hf_config("qwen2", max_position_embeddings=64, rope_scaling=yarn).to_dict())
    assert c.max_context_len == 256
    assert EngineArgs().resolved_limits(c)[0] == 256
    with pytest.raises(ValueError, match="max_model_len=257 exceeds the model's context length 256 .*with YaRN"):
        EngineArgs(max_model_len=257).resolved_limits(c)
    plain = ModelConfig.from_hf_dict(tiny_hf_config("qwen2", max_position_embeddings=64).to_dict())
    assert plain.max_context_len == 64


def test_qkv_bias_for_qwen2_and_llama_attention_bias():
    assert ModelConfig.from_hf_dict(tiny_hf_config("qwen2").to_dict()).qkv_bias
    assert ModelConfig.from_hf_dict(tiny_hf_config("llama", attention_bias=True).to_dict()).qkv_bias
    assert not ModelConfig.from_hf_dict(tiny_hf_config("qwen3").to_dict()).qkv_bias


def test_attention_bias_puts_a_bias_on_o_proj_too():
    """transformers' ``attention_bias`` biases o_proj as well as q / k / v (llama, qwen3, ...); qwen2's q / k / v
    biases come without one."""
    for variant in ("llama", "qwen3"):
        c = ModelConfig.from_hf_dict(tiny_hf_config(variant, attention_bias=True).to_dict())
        assert c.qkv_bias and c.o_bias
    assert not ModelConfig.from_hf_dict(tiny_hf_config("qwen2").to_dict()).o_bias
    assert not ModelConfig.from_hf_dict(tiny_hf_config("qwen3").to_dict()).o_bias


def test_qk_norm_only_for_qwen3():
    assert ModelConfig.from_hf_dict(tiny_hf_config("qwen3").to_dict()).qk_norm
    for variant in ("llama", "mistral", "qwen2"):
        assert not ModelConfig.from_hf_dict(tiny_hf_config(variant).to_dict()).qk_norm


def test_sliding_window_only_where_used():
    assert ModelConfig.from_hf_dict(tiny_hf_config("mistral", sliding_window=37).to_dict()).sliding_window == 37
    assert ModelConfig.from_hf_dict(tiny_hf_config("mistral", sliding_window=None).to_dict()).sliding_window is None
    # Qwen2 configs carry a sliding_window but use_sliding_window=False switches it off.
    d = tiny_hf_config("qwen2").to_dict()
    d["sliding_window"] = 4096
    assert ModelConfig.from_hf_dict(d).sliding_window is None


@pytest.mark.parametrize("field, value, named", [
    ("model_type", "gemma", "'gemma'"),  # Gemma 1: its norms and activation differ again
    ("hidden_act", "gelu_pytorch_tanh", "'gelu_pytorch_tanh'"),
    ("rope_parameters", {"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e4}, "'longrope'"),
    ("mlp_bias", True, "mlp_bias"),
    ("partial_rotary_factor", 0.75, "partial_rotary_factor=0.75"),  # Phi-4-mini's
])
def test_unsupported_options_are_refused_by_name(field, value, named):
    d = tiny_hf_config("llama").to_dict()
    d[field] = value
    with pytest.raises(UnsupportedModelError, match=named):
        ModelConfig.from_hf_dict(d)


def test_unsupported_architecture_from_real_transformers_config():
    d = transformers.AutoConfig.for_model("gpt2", n_layer=2, n_embd=64, n_head=4).to_dict()
    with pytest.raises(UnsupportedModelError, match="'gpt2'") as e:
        ModelConfig.from_hf_dict(d)
    assert "llama" in str(e.value)  # lists what is supported


def test_qwen_sliding_window_is_refused():
    d = tiny_hf_config("qwen2").to_dict()
    d.update(use_sliding_window=True, sliding_window=64)
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        ModelConfig.from_hf_dict(d)


def test_gemma_configs_as_published():
    """Gemma-2-2B's and Gemma-3-1B's config.json fields (transformers 4's layout: no layer_types, Gemma 3's local
    rope theta apart): the published parameter counts' shapes, the layer kinds, scales and caps."""
    gemma2 = ModelConfig.from_hf_dict(dict(
        model_type="gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
        rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=8192, tie_word_embeddings=True))
    assert gemma2.sliding_layers == (True, False) * 13 and (gemma2.attn_soft_cap, gemma2.final_soft_cap) == (50, 30)
    assert gemma2.attn_scale == 256 ** -0.5 and gemma2.embed_scale == 2304 ** 0.5 and gemma2.local_rope_theta is None
    gemma3 = ModelConfig.from_hf_dict(dict(
        model_type="gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=256, sliding_window=512, sliding_window_pattern=6, rope_theta=1000000.0,
        rope_local_base_freq=10000.0, rope_scaling=None, rms_norm_eps=1e-6, max_position_embeddings=32768,
        final_logit_softcapping=None, attn_logit_softcapping=None))
    assert gemma3.sliding_layers == tuple((i + 1) % 6 != 0 for i in range(26)) and gemma3.sliding_window == 512
    assert (gemma3.rope_theta, gemma3.local_rope_theta, gemma3.qk_norm) == (1e6, 1e4, True)
    assert gemma3.attn_soft_cap is None and gemma3.final_soft_cap is None and gemma3.norm_weight_offset == 1.0
    # Gemma 3's attention applies no soft cap, even where its config.json names one (transformers' Gemma3Attention)
    capped = ModelConfig.from_hf_dict(dict(tiny_hf_config("gemma3_text").to_dict(), attn_logit_softcapping=50.0))
    assert capped.attn_soft_cap is None


def test_mixture_of_experts_configs_as_published():
    """Mixtral-8x7B's and Qwen3-30B-A3B's config.json fields (as their repositories write them: Qwen's names the
    expert count ``num_experts``) give the published parameter counts, 46.7B and 30.5B."""
    mixtral = ModelConfig.from_hf_dict(dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        rope_theta=1e6, sliding_window=None, hidden_act="silu"))
    assert (mixtral.num_experts, mixtral.num_experts_per_tok, mixtral.norm_topk_prob) == (8, 2, True)
    assert round(mixtral.num_params() / 1e9, 1) == 46.7
    qwen = ModelConfig.from_hf_dict(dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], tie_word_embeddings=False, hidden_act="silu"))
    assert (qwen.intermediate_size, qwen.num_experts, qwen.num_experts_per_tok, qwen.norm_topk_prob) == (
        768, 128, 8, True)
    assert qwen.qk_norm and round(qwen.num_params() / 1e9, 1) == 30.5
    qwen15 = ModelConfig.from_hf_dict(dict(  # Qwen1.5-MoE-A2.7B: 60 experts, 4 a token, a shared expert; 14.3B
        model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        num_experts=60, num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        tie_word_embeddings=False, hidden_act="silu"))
    assert (qwen15.shared_expert_size, qwen15.qkv_bias, qwen15.norm_topk_prob) == (5632, True, False)
    assert round(qwen15.num_params() / 1e9, 1) == 14.3


@pytest.mark.parametrize("field, value, error, named", [
    ("mlp_only_layers", [1], UnsupportedModelError, "mlp_only_layers"),
    ("decoder_sparse_step", 2, UnsupportedModelError, "decoder_sparse_step"),
    ("num_experts_per_tok", 9, ModelConfigError, "num_experts_per_tok=9"),
    ("shared_expert_intermediate_size", 128, UnsupportedModelError, "shared_expert"),  # qwen3_moe has none
])
def test_mixture_of_experts_layouts_we_cannot_run_are_refused(field, value, error, named):
    d = tiny_hf_config("qwen3_moe").to_dict()
    d[field] = value
    with pytest.raises(error, match=named):
        ModelConfig.from_hf_dict(d)


def test_missing_field_and_inconsistent_heads():
    d = tiny_hf_config("llama").to_dict()
    del d["num_hidden_layers"]
    with pytest.raises(ModelConfigError, match="num_hidden_layers"):
        ModelConfig.from_hf_dict(d)
    d = tiny_hf_config("llama").to_dict()
    d["num_key_value_heads"] = 3
    with pytest.raises(ModelConfigError, match="num_key_value_heads=3"):
        ModelConfig.from_hf_dict(d)


def test_default_batch_limits_follow_vllm_by_usage_context(monkeypatch):
    from engine import device_memory
    from engine.device_memory import default_batch_limits
    from engine.engine_args import EngineArgs

    assert default_batch_limits("llm") == (1024, 64)  # this CPU
    monkeypatch.setattr(device_memory.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(device_memory, "device_memory_bytes", lambda: 141 * 2**30)  # an H200
    assert default_batch_limits("llm") == (16384, 1024)
    assert default_batch_limits("server") == (8192, 1024)
    monkeypatch.setattr(device_memory, "device_memory_bytes", lambda: 40 * 2**30)
    assert default_batch_limits("llm") == (8192, 256)
    with pytest.raises(ValueError, match="usage_context"):
        EngineArgs(usage_context="batch").validate()


@pytest.mark.parametrize("steps", [0, -1, 1.5, "4"])
def test_num_scheduler_steps_must_be_a_positive_integer(steps):
    from engine.engine_args import EngineArgs

    with pytest.raises(ValueError, match="num_scheduler_steps must be a positive integer"):
        EngineArgs(num_scheduler_steps=steps).validate()


@pytest.mark.parametrize("tokens", [-1, 1.5, "256"])
def test_admission_reserve_tokens_must_be_a_whole_number(tokens):
    from engine.engine_args import EngineArgs

    with pytest.raises(ValueError, match="admission_reserve_tokens must be an integer >= 0"):
        EngineArgs(admission_reserve_tokens=tokens).validate()


@pytest.mark.parametrize("field, value", [("max_num_seqs", 1.5), ("max_num_batched_tokens", 0),
                                          ("max_model_len", "128"), ("num_gpu_blocks_override", True)])
def test_batch_limits_must_be_positive_integers(field, value):
    """A limit that is no whole number is refused by name, before any shape is made of it (1.5 sequences reached
    a JAX shape error)."""
    from engine.engine_args import EngineArgs

    with pytest.raises(ValueError, match=f"{field} must be an integer >= 1"):
        EngineArgs(**{field: value}).validate()


@pytest.mark.parametrize("field, value, message", [
    ("gpu_memory_utilization", "0.5", "gpu_memory_utilization must be a number in"),  # was a TypeError of '<'
    ("gpu_memory_utilization", 1.5, "gpu_memory_utilization must be a number in"),
    ("seed", "abc", "seed must be an integer"),  # was numpy's TypeError
    ("num_gpu_blocks_override", 1, "num_gpu_blocks_override must be >= 2"),  # named an internal variable
])
def test_engine_arguments_of_the_wrong_kind_are_refused_by_name(field, value, message):
    from engine.engine_args import EngineArgs

    with pytest.raises(ValueError, match=message):
        EngineArgs(**{field: value}).validate()


def test_a_max_model_len_past_the_models_is_taken_with_vllms_switch(monkeypatch, caplog):
    """VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 turns the refusal into a warning, as in vLLM."""
    from engine.engine_args import EngineArgs

    c = ModelConfig.from_hf_dict(tiny_hf_config("qwen2", max_position_embeddings=64).to_dict())
    with pytest.raises(ValueError, match="set VLLM_ALLOW_LONG_MAX_MODEL_LEN=1"):
        EngineArgs(max_model_len=100).resolved_limits(c)
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    with caplog.at_level("WARNING"):
        assert EngineArgs(max_model_len=100).resolved_limits(c)[0] == 100
    assert "max_model_len=100 exceeds" in caplog.text
