"""Tiny random Hugging Face checkpoints (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text, granite, smollm3,
olmo2, mixtral, qwen2_moe, qwen3_moe, gpt_oss) for tests.

Owns building a small ``transformers`` model of a named variant with every weight
randomized (norm weights near 1 but not 1, biases non-zero, so a mixed-up mapping
shows) and writing it with ``save_pretrained`` (safetensors). Knows nothing of our
model code; tests compare our loader and forward against what it returns.

Usage::

    model = write_tiny_checkpoint(tmp_path, "qwen3")      # returns the torch model (eval, f32)
    config = ModelConfig.from_pretrained(str(tmp_path))
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers

# Tiny models run fastest on one thread; more threads spin-wait for one another on a busy
# 2-core machine (16 greedy steps of a tiny model: 1 s with 2 threads, 0.05 s with 1).
torch.set_num_threads(1)

# Shared small shape: 4 query heads over 2 KV heads (GQA), vocab 256.
BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    # No eos: greedy decoding of a random model must run its full length in HF and in ours.
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)

LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64, rope_theta=500000.0)

# With head_dim 16 and theta 5e5 the rotary wavelengths are 6.3, 33, 168, ... tokens: with an
# original context of 64 the llama3 rule keeps the first, smooths the second, scales the rest.
# name -> (model_type, overrides of BASE). head_dim is explicit (not hidden/heads) where it
# differs from the default, so a wrong head_dim cannot pass.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # attention_bias: biases on q, k, v and o (llama3_tied below has none).
    "llama": ("llama", dict(head_dim=32, tie_word_embeddings=False, attention_bias=True)),
    # Like Llama 3.2 1B: tied embeddings and llama3 rope scaling (head_dim implicit: 16).
    "llama3_tied": ("llama", dict(tie_word_embeddings=True, num_hidden_layers=3, rope_parameters=LLAMA3_ROPE)),
    # A window shorter than the test prompts, so the sliding-window mask matters.
    "mistral": ("mistral", dict(head_dim=32, sliding_window=12)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),  # qkv bias; head_dim implicit (16)
    # YaRN (Qwen2.5's long-context setting), an original context of 16 that the test prompts pass.
    "qwen2_yarn": ("qwen2", dict(rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                                      rope_theta=10000.0))),
    "qwen3": ("qwen3", dict(head_dim=32, rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    # Phi-3's joined qkv_proj and gate_up_proj in the checkpoint, and its sliding window (shorter than the prompts).
    "phi3": ("phi3", dict(sliding_window=12)),
    # Gemma 2: tanh GELU, sandwich norms stored as w - 1, embedding scaled, attention and final logit soft caps
    # small enough to bite, a query scale apart from head_dim, sliding and full layers alternating.
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
                              final_logit_softcapping=8.0, sliding_window=12, num_hidden_layers=3)),
    # Gemma 3: qk norms, the sliding layers' own rope theta, linear scaling on the full ones, no soft caps.
    "gemma3_text": ("gemma3_text", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=12, num_hidden_layers=3,
                                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                        rope_parameters={"full_attention": dict(rope_type="linear", factor=2.0,
                                                                                rope_theta=1e6),
                                                         "sliding_attention": dict(rope_type="default",
                                                                                   rope_theta=1e4)})),
    # Granite: multipliers of the embedding, the attention scores (instead of 1/sqrt(head_dim)), each block's output
    # before its residual add, and a divisor of the logits (untied: a tiny tied one repeats its last token).
    "granite": ("granite", dict(embedding_multiplier=3.0, attention_multiplier=0.15, residual_multiplier=0.4,
                                logits_scaling=2.5, tie_word_embeddings=False)),
    # SmolLM3: every second layer without rotary embeddings (NoPE; the published models: every fourth).
    "smollm3": ("smollm3", dict(num_hidden_layers=4, no_rope_layer_interval=2, tie_word_embeddings=False)),
    # OLMo 2: no norms before the blocks, each block's output normed; q and k normed over all their heads at once.
    "olmo2": ("olmo2", dict(head_dim=32, tie_word_embeddings=False)),
    # Mixtures of experts: 4 experts, 2 a token, renormalised (mixtral's rule); 8 experts, 3 a token, not
    # renormalised (qwen3_moe's norm_topk_prob=False), qk norm, experts narrower than the config's dense MLP.
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    # qwen2_moe: a shared expert beside 4 routed ones (2 a token), qkv bias.
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=48)),
    "qwen3_moe": ("qwen3_moe", dict(head_dim=32, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=48,
                                    norm_topk_prob=False)),
    # gpt-oss: attention sinks, q/k/v/o biases, sliding and full layers in turn, YaRN without truncation, a router
    # with a bias picking 2 of 4 experts, experts with biases and a clamped gate whose limit bites at these scales.
    "gpt_oss": ("gpt_oss", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=32,
                                sliding_window=12, swiglu_limit=0.5, max_position_embeddings=64,
                                rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                                     beta_fast=32.0, beta_slow=1.0, truncate=False,
                                                     rope_theta=150000.0))),
}


def tiny_hf_config(variant: str, **overrides: Any) -> transformers.PretrainedConfig:
    """The ``transformers`` config object of a tiny model of ``variant`` (see ``VARIANTS``)."""
    model_type, variant_overrides = VARIANTS[variant]
    kwargs = {**BASE, **variant_overrides, **overrides}
    return transformers.AutoConfig.for_model(model_type, **kwargs)


def randomize_(model: torch.nn.Module, seed: int, weight_std: float = 0.15) -> None:
    """Overwrite every parameter in place: norms ~ 1 +- 0.2, everything else normal * ``weight_std``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights are listed once
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(weight_std * noise)


def write_tiny_checkpoint(path: str | os.PathLike, variant: str, *, seed: int = 0,
                          dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
                          **config_overrides: Any) -> torch.nn.Module:
    """Write a random tiny checkpoint of ``variant`` to folder ``path``; return the model (eval mode).

    ``max_shard_size`` (e.g. ``"40KB"``) splits the weights into ``model-*.safetensors``
    shards with an index. The returned model is float32 whatever ``dtype`` is saved, with
    the exact values on disk (rounded through ``dtype``).
    """
    config = tiny_hf_config(variant, **config_overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                          attn_implementation="eager")
    randomize_(model, seed)
    model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(path), safe_serialization=True, **kwargs)
    return model.float().eval()



def write_mxfp4_experts(path: str | os.PathLike, model: torch.nn.Module, *, seed: int = 0) -> None:
    """Rewrite a tiny gpt-oss checkpoint (``write_tiny_checkpoint(path, "gpt_oss")``, its ``model``) as the published
    ones are stored: the experts in MXFP4 (``*_blocks``: two random e2m1 codes a byte, ``*_scales``: a random power
    of two each 32 values), ``quantization_config`` mxfp4. ``model``'s experts become what transformers'
    ``convert_moe_packed_tensors`` makes of them, so it stays the reference."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    tensors = load_file(os.path.join(path, "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for i in range(model.config.num_hidden_layers):
        experts = model.model.layers[i].mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            e, k, n = getattr(experts, name).shape  # transformers' dense layout [E, in, out]
            blocks = torch.randint(0, 256, (e, n, k // 32, 16), generator=gen, dtype=torch.uint8)
            scales = torch.randint(123, 128, (e, n, k // 32), generator=gen, dtype=torch.uint8)
            del tensors[f"model.layers.{i}.mlp.experts.{name}"]
            tensors[f"model.layers.{i}.mlp.experts.{name}_blocks"] = blocks
            tensors[f"model.layers.{i}.mlp.experts.{name}_scales"] = scales
            with torch.no_grad():
                getattr(experts, name).copy_(convert_moe_packed_tensors(blocks, scales).float())
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
