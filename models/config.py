"""Model configuration: the shape and options of a Llama-family model.

Owns reading Hugging Face ``config.json`` (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text, granite, smollm3,
olmo2, and
the mixture-of-experts mixtral, qwen2_moe and qwen3_moe) into a
frozen, hashable ``ModelConfig`` that jitted functions take as a static argument.
Knows nothing of weights, requests or devices. Anything we cannot run is refused
here with an ``UnsupportedModelError`` that names the offending field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Optional

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "granite", "smollm3",
                         "olmo2", "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")
GEMMA_MODEL_TYPES = ("gemma2", "gemma3_text")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")
# Model types whose transformers config class ties the LM head to the embedding by default: their config.json may
# leave ``tie_word_embeddings`` out (transformers writes only the keys that differ from the defaults).
TIED_BY_DEFAULT_MODEL_TYPES = ("gemma2", "gemma3_text", "smollm3")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "yarn")
# Named here, where no JAX is imported, for the options (the server's process parses them without it): the
# checkpoint formats ``models.loader`` reads and the weight formats ``models.quantization`` makes or reads.
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
QUANTIZATION_METHODS = ("int8", "int4", "awq", "gptq", "fp8", "compressed-tensors", "mxfp4")
# vLLM's names of its Marlin kernels for the same checkpoints, taken as the method that reads them.
QUANTIZATION_ALIASES = {"awq_marlin": "awq", "gptq_marlin": "gptq"}


def quantization_method(name: Optional[str]) -> Optional[str]:
    """A ``quantization=`` name in any case, vLLM's aliases as the method they name; an unknown one unchanged."""
    if name is None:
        return None
    lower = str(name).lower()
    lower = QUANTIZATION_ALIASES.get(lower, lower)
    return lower if lower in QUANTIZATION_METHODS else name


class UnsupportedModelError(ValueError):
    """The checkpoint asks for an architecture or option this engine does not implement."""


class ModelConfigError(ValueError):
    """The config is missing, unreadable or inconsistent."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_pos) or ("linear", factor) or
    # ("yarn", factor, original_max_pos, beta_fast, beta_slow, attention_factor, truncate) or None; a tuple so the
    # config stays hashable.
    rope_scaling: Optional[tuple] = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # qwen2 (and llama with attention_bias=True)
    o_bias: bool = False  # attention_bias=True (llama, qwen3, ...): o_proj has a bias too (qwen2's has none)
    qk_norm: bool = False  # qwen3: RMSNorm over each head of q and k before RoPE
    qk_norm_full: bool = False  # olmo2: the qk norms over the whole q and k projections (weights [Hq*D], [Hkv*D])
    pre_norms: bool = True  # olmo2: False, no norm before attention or the MLP (their outputs are normed instead)
    sliding_window: Optional[int] = None
    max_position_embeddings: int = 4096
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple = ()
    # Mixture of experts (mixtral, qwen2_moe, qwen3_moe): every layer's MLP is ``num_experts`` SwiGLU MLPs of width
    # ``intermediate_size``, of which a router picks ``num_experts_per_tok`` a token (0: a dense MLP).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = True  # the picked experts' weights renormalised to sum to 1 (mixtral always)
    # qwen2_moe's shared expert: a dense SwiGLU MLP this wide (w_gate / w_up / w_down) that every token also runs,
    # its output times sigmoid(x @ shared_expert_gate) (0: none).
    shared_expert_size: int = 0
    # Gemma 2 / 3: the MLP's activation; the embedding times sqrt(hidden); "sandwich" norms (each block's output
    # normed before its residual add: attn_out_norm, mlp_out_norm); the attention's scale and logit soft cap;
    # the LM head's soft cap; which layers slide (a bool a layer; None: every layer, when sliding_window is set);
    # the sliding layers' own rope theta (no scaling); norms stored as ``w`` where the checkpoint has ``w - 1``.
    hidden_act: str = "silu"
    embed_scale: Optional[float] = None
    sandwich_norms: bool = False
    attn_scale: Optional[float] = None
    attn_soft_cap: Optional[float] = None
    final_soft_cap: Optional[float] = None
    sliding_layers: Optional[tuple] = None
    local_rope_theta: Optional[float] = None
    norm_weight_offset: float = 0.0
    # Granite: each block's output times ``residual_scale`` before its residual add; the logits divided by
    # ``logits_divisor`` (its embedding and attention multipliers are ``embed_scale`` and ``attn_scale``).
    residual_scale: Optional[float] = None
    logits_divisor: Optional[float] = None
    # SmolLM3: which layers apply rotary embeddings (a bool a layer; its NoPE layers do not); None: every layer.
    rope_layers: Optional[tuple] = None
    # gpt-oss: a learned sink logit a query head in each layer's softmax (``sinks [L, Hq]``); the router's and the
    # experts' biases (``router_bias [L, E]``, ``expert_gate_bias`` / ``expert_up_bias [L, E, I]``,
    # ``expert_down_bias [L, E, H]``); and its experts' clamped gate: ``(clip(up, -l, l) + 1) * g * sigmoid(alpha g)``,
    # ``g = min(gate, l)``, ``l = swiglu_limit`` (None: SwiGLU, ``silu(gate) * up``).
    attention_sinks: bool = False
    moe_biases: bool = False
    swiglu_limit: Optional[float] = None
    swiglu_alpha: float = 1.702
    # The checkpoint's per-layer scales of its fp8 K and V (``self_attn.k_scale`` / ``v_scale``, as llm-compressor
    # writes them): params ``k_scale`` / ``v_scale [L]``, used where the KV pages are fp8 (set by the loader).
    kv_cache_scales: bool = False
    # The engine's context length (its max_model_len), where vLLM code reads it (``llm_engine.model_config``); set
    # by the engine, outside equality and hashing, so the compiled steps never depend on it.
    max_model_len: Optional[int] = dataclasses.field(default=None, compare=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def max_context_len(self) -> int:
        """The longest context the checkpoint supports: ``max_position_embeddings``, or YaRN's original length times
        its factor where that is longer (Qwen2.5's long-context recipe adds YaRN to a 32k config), as vLLM derives
        ``max_model_len``. (vLLM also multiplies by a linear factor; Gemma 3's 131,072 already includes its 8x.)"""
        if self.rope_scaling is not None and self.rope_scaling[0] == "yarn":
            _, factor, original = self.rope_scaling[:3]
            return max(self.max_position_embeddings, int(original * factor))
        return self.max_position_embeddings

    def num_params(self) -> int:
        h, i, L = self.hidden_size, self.intermediate_size, self.num_layers
        mlp = (self.num_experts * 3 * h * i + h * self.num_experts + 3 * h * self.shared_expert_size
               + (h if self.shared_expert_size else 0)) if self.is_moe else 3 * h * i
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + embed + h

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from the dict of a Hugging Face ``config.json`` (a Gemma 3 image-text checkpoint: its text model)."""
        if d.get("model_type") == "gemma3":
            d = _gemma3_text_config(d)
        model_type = d.get("model_type")
        d = {**_HF_CONFIG_DEFAULTS.get(model_type, {}), **d}  # what transformers assumes of a field left out
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = d.get("architectures") or []
            raise UnsupportedModelError(
                f"unsupported model_type {model_type!r} (architectures {arch}); "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            hidden = int(d["hidden_size"])
            num_heads = int(d["num_attention_heads"])
            fields = dict(
                model_type=model_type,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["moe_intermediate_size"] if model_type in ("qwen2_moe", "qwen3_moe")
                                      else d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
                head_dim=int(d.get("head_dim") or hidden // num_heads),
            )
        except KeyError as e:
            raise ModelConfigError(f"config.json lacks required field {e.args[0]!r}") from None
        act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
        if act not in SUPPORTED_ACTIVATIONS or (act != "silu" and model_type not in GEMMA_MODEL_TYPES):
            raise UnsupportedModelError(f"unsupported hidden_act {act!r}; implemented: 'silu' (and "
                                        "'gelu_pytorch_tanh' for gemma)")
        if d.get("mlp_bias"):
            raise UnsupportedModelError("unsupported option mlp_bias=True")
        if fields["num_heads"] % fields["num_kv_heads"]:
            raise ModelConfigError(
                f"num_attention_heads={num_heads} is not a multiple of "
                f"num_key_value_heads={fields['num_kv_heads']}"
            )
        rope, rope_theta = _rope_fields(d)
        partial_rotary = float(d.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0)
        if partial_rotary != 1.0:
            raise UnsupportedModelError(f"unsupported option partial_rotary_factor={partial_rotary} "
                                        "(rotary embedding on part of each head)")
        sliding = None
        if model_type in ("mistral", "mixtral", "phi3", "gpt_oss", *GEMMA_MODEL_TYPES) or d.get("use_sliding_window"):
            sliding = d.get("sliding_window")
        if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "smollm3") and d.get("use_sliding_window"):
            raise UnsupportedModelError(f"unsupported option use_sliding_window=True for {model_type}")
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            **fields,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=parse_rope_scaling(rope, int(d.get("max_position_embeddings", 4096))),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", model_type in TIED_BY_DEFAULT_MODEL_TYPES)),
            qkv_bias=(model_type == "qwen2" or bool(d.get("attention_bias", False))
                      or (model_type == "qwen2_moe" and bool(d.get("qkv_bias", True)))),
            o_bias=bool(d.get("attention_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text", "olmo2"),
            sliding_window=int(sliding) if sliding else None,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            **(_moe_fields(d, model_type) if model_type in MOE_MODEL_TYPES else {}),
            **(_gemma_fields(d, model_type, fields, act) if model_type in GEMMA_MODEL_TYPES else {}),
            **(_granite_fields(d) if model_type == "granite" else {}),
            **(_smollm3_fields(d, fields["num_layers"]) if model_type == "smollm3" else {}),
            # OLMo 2: each block's output normed before its residual add, no norm before the blocks; q and k normed
            # over all their heads at once.
            **(dict(sandwich_norms=True, pre_norms=False, qk_norm_full=True) if model_type == "olmo2" else {}),
            **(gpt_oss_fields(d, fields["num_layers"]) if model_type == "gpt_oss" else {}),
        )

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        """Read ``config.json`` from a checkpoint folder (or the file itself)."""
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise ModelConfigError(f"no config.json in {path!r}")
        try:
            with open(file) as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelConfigError(f"{file} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ModelConfigError(f"{file} does not hold a JSON object")
        return cls.from_hf_dict(d)


def _rope_fields(d: dict[str, Any]) -> tuple[dict, float]:
    """The rotary embedding's parameters and base, read as transformers 5 reads them: a ``rope_scaling`` block (the
    4.x name, which model cards still tell users to add) replaces ``rope_parameters`` whole, its base then its own
    ``rope_theta`` or the top-level one; else ``rope_parameters`` (Gemma 3: one a layer type) with its base before
    the top-level one (which ``_HF_CONFIG_DEFAULTS`` fills with the model type's default)."""
    scaling = d.get("rope_scaling")
    parameters = d.get("rope_parameters") or {}
    parameters = parameters.get("full_attention", parameters)
    rope = scaling or parameters
    theta = float(rope.get("rope_theta") or d.get("rope_theta") or 10000.0)
    dropped = parameters.get("rope_theta") if scaling else None
    if dropped and float(dropped) != theta:
        logging.getLogger(__name__).warning(
            "config.json has both rope_parameters (rope_theta %s) and rope_scaling: as transformers 5 does, the "
            "rope is rope_scaling's, with rope_theta %s; add rope_theta to the rope_scaling block if the model's is "
            "%s", dropped, theta, dropped)
    return rope, theta


def _moe_fields(d: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The mixture-of-experts fields of a mixtral / qwen2_moe / qwen3_moe config (transformers 5 names the expert
    count ``num_local_experts`` for some; Qwen's own configs say ``num_experts``)."""
    try:
        experts = int(d.get("num_local_experts") or d["num_experts"])
        per_token = int(d["num_experts_per_tok"])
    except KeyError as e:
        raise ModelConfigError(f"config.json lacks required field {e.args[0]!r}") from None
    if not 0 < per_token <= experts:
        raise ModelConfigError(f"num_experts_per_tok={per_token} must be between 1 and the {experts} experts")
    if model_type not in ("mixtral", "gpt_oss"):
        # Layers with a dense MLP instead of experts would break the one stacked layer scan.
        if d.get("mlp_only_layers") or int(d.get("decoder_sparse_step") or 1) != 1:
            raise UnsupportedModelError(f"unsupported {model_type} layout: mlp_only_layers / decoder_sparse_step != 1 "
                                        "(layers with a dense MLP between the expert layers)")
        if model_type == "qwen3_moe" and d.get("shared_expert_intermediate_size"):
            raise UnsupportedModelError("unsupported option shared_expert_intermediate_size for qwen3_moe")
    return dict(num_experts=experts, num_experts_per_tok=per_token,
                # gpt-oss: the softmax of the top k logits, the same as the top k of the softmax renormalised
                norm_topk_prob=True if model_type in ("mixtral", "gpt_oss") else bool(d.get("norm_topk_prob", False)),
                shared_expert_size=int(d.get("shared_expert_intermediate_size") or 0)
                if model_type == "qwen2_moe" else 0)


# transformers' defaults (its config classes', 5.x) where they differ from the engine's generic ones (rms_norm_eps
# 1e-6, rope base 10,000, max_position_embeddings 4096, head_dim hidden / heads, no sliding window, SiLU), for a
# config.json that leaves the field out: Hub files write them all, a hand-made config may not.
_HF_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(max_position_embeddings=2048),
    "mistral": dict(sliding_window=4096, max_position_embeddings=131072),
    "qwen2": dict(max_position_embeddings=32768),
    "qwen3": dict(head_dim=128, max_position_embeddings=32768),
    "phi3": dict(rms_norm_eps=1e-5),
    "gemma2": dict(hidden_activation="gelu_pytorch_tanh", head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                   max_position_embeddings=8192),
    "granite": dict(max_position_embeddings=2048),
    "smollm3": dict(rope_theta=2_000_000.0, max_position_embeddings=32768),
    "olmo2": dict(rms_norm_eps=1e-5, max_position_embeddings=2048),
    "mixtral": dict(rope_theta=1_000_000.0, rms_norm_eps=1e-5, max_position_embeddings=131072),
    "qwen2_moe": dict(max_position_embeddings=32768),
    "qwen3_moe": dict(max_position_embeddings=32768),
    "gpt_oss": dict(head_dim=64, sliding_window=128, rope_theta=150000.0, rms_norm_eps=1e-5, attention_bias=True,
                    max_position_embeddings=131072),
}

# transformers' Gemma3TextConfig defaults, which Gemma 3's image-text config.json files leave out of their
# text_config (google/gemma-3-4b-it names only the sizes, the window and the rope scaling there).
_GEMMA3_TEXT_DEFAULTS = dict(
    vocab_size=262208, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
    query_pre_attn_scalar=256, sliding_window=4096, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
    sliding_window_pattern=6, tie_word_embeddings=True)


_HF_CONFIG_DEFAULTS["gemma3_text"] = _GEMMA3_TEXT_DEFAULTS


def _gemma3_text_config(d: dict[str, Any]) -> dict[str, Any]:
    """The text model's config of a Gemma 3 image-text checkpoint (``Gemma3ForConditionalGeneration``): its
    ``text_config`` over transformers' defaults, the outer file's token ids (the model's: end of turn too) over the
    text config's. Served as text only (its vision tower's weights are not read)."""
    text = {**_GEMMA3_TEXT_DEFAULTS, **(d.get("text_config") or {}), "model_type": "gemma3_text"}
    text.update({key: d[key] for key in ("eos_token_id", "bos_token_id") if d.get(key) is not None})
    return text


def _gemma_fields(d: dict[str, Any], model_type: str, fields: dict[str, Any], act: str) -> dict[str, Any]:
    """Gemma 2 / 3's departures from Llama (transformers' Gemma2 / Gemma3Text models)."""
    # older config.json files without layer_types: Gemma 2 alternates from a sliding layer, Gemma 3 has a full one in 6
    types = _layer_types(d, fields["num_layers"],
                         int(d.get("sliding_window_pattern") or 6) if model_type == "gemma3_text" else 2)
    if d.get("use_bidirectional_attention"):
        raise UnsupportedModelError("unsupported option use_bidirectional_attention=True")
    local = (d.get("rope_parameters") or {}).get("sliding_attention", {})
    local_theta = local.get("rope_theta") or d.get("rope_local_base_freq")
    if local.get("rope_type", "default") != "default":
        raise UnsupportedModelError(f"unsupported rope_type {local['rope_type']!r} on the sliding layers")
    return dict(
        hidden_act=act, embed_scale=float(fields["hidden_size"]) ** 0.5, sandwich_norms=True,
        attn_scale=float(d.get("query_pre_attn_scalar") or fields["head_dim"]) ** -0.5,
        # Gemma 3's attention takes no soft cap (transformers' Gemma3Attention keeps the field and never applies it)
        attn_soft_cap=_positive_or_none(d.get("attn_logit_softcapping")) if model_type == "gemma2" else None,
        final_soft_cap=_positive_or_none(d.get("final_logit_softcapping")),
        sliding_layers=_sliding_layers(d, types),
        local_rope_theta=float(local_theta) if local_theta else None, norm_weight_offset=1.0)


def _layer_types(d: dict[str, Any], num_layers: int, pattern: int) -> list[str]:
    """``layer_types`` (a sliding or full attention layer each), else a full layer every ``pattern``-th."""
    types = d.get("layer_types")
    if not types:
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    if len(types) != num_layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ModelConfigError(f"layer_types must name sliding_attention or full_attention for each of the "
                               f"{num_layers} layers, got {types}")
    return types


def _sliding_layers(d: dict[str, Any], types: list[str]) -> Optional[tuple]:
    return tuple(t == "sliding_attention" for t in types) if d.get("sliding_window") else None


def gpt_oss_fields(d: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """gpt-oss's departures from a Llama mixture of experts (transformers' GptOss model): sliding and full layers in
    turn (from a sliding one), attention sinks, biases in the router and the experts, and the clamped gate."""
    limit = d.get("swiglu_limit", 7.0)
    return dict(sliding_layers=_sliding_layers(d, _layer_types(d, num_layers, 2)), attention_sinks=True,
                moe_biases=True, swiglu_limit=float(limit) if limit is not None else None,
                swiglu_alpha=float(d.get("swiglu_alpha", 1.702)))


def _granite_fields(d: dict[str, Any]) -> dict[str, Any]:
    """Granite's multipliers (transformers' GraniteModel): the embedding's, the attention's scale (instead of
    1/sqrt(head_dim)), each block output's before its residual add, and the logits' divisor."""
    return dict(embed_scale=float(d.get("embedding_multiplier", 1.0)),
                attn_scale=float(d.get("attention_multiplier", 1.0)),
                residual_scale=float(d.get("residual_multiplier", 1.0)),
                logits_divisor=float(d.get("logits_scaling", 1.0)))


def _smollm3_fields(d: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """SmolLM3's NoPE layers: ``no_rope_layers`` holds 1 for each layer that applies rotary embeddings (transformers'
    default: all but every ``no_rope_layer_interval``-th)."""
    flags = d.get("no_rope_layers")
    if flags is None:
        interval = int(d.get("no_rope_layer_interval") or 4)
        flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
    if len(flags) != num_layers:
        raise ModelConfigError(f"no_rope_layers must have one entry for each of the {num_layers} layers, got {flags}")
    rotary = tuple(bool(f) for f in flags)
    return dict(rope_layers=None if all(rotary) else rotary)


def _positive_or_none(value: Any) -> Optional[float]:
    return float(value) if value else None


def parse_rope_scaling(rope: dict, max_position_embeddings: int) -> Optional[tuple]:
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "llama3":
        return (
            "llama3",
            float(rope["factor"]),
            float(rope.get("low_freq_factor", 1.0)),
            float(rope.get("high_freq_factor", 4.0)),
            int(rope.get("original_max_position_embeddings") or max_position_embeddings),  # transformers' fill
        )
    if rope_type == "linear":
        return ("linear", float(rope["factor"]))
    if rope_type == "yarn":
        return _yarn_scaling(rope, max_position_embeddings)
    return None


def _yarn_scaling(rope: dict, max_position_embeddings: int) -> tuple:
    """YaRN's fields (transformers' ``_compute_yarn_parameters``): the attention factor that scales cos and sin is
    computed here, from ``mscale`` / ``mscale_all_dim`` when both are given, else ``0.1 ln(factor) + 1``."""
    original = int(rope.get("original_max_position_embeddings") or max_position_embeddings)
    factor = float(rope.get("factor") or max_position_embeddings / original)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return ("yarn", factor, original, float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1),
            float(attention_factor), bool(rope.get("truncate", True)))
