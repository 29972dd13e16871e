"""GGUF checkpoints: read the model config from GGUF metadata and load the weights.

Architectures: llama (Mixtral too, where it has experts), qwen2, qwen3, phi3 (its joined projections split),
gemma2, gemma3 (its text model), granite, olmo2, qwen2moe, qwen3moe, gpt-oss; the experts
come as llama.cpp merges them, one ``[E, out, in]`` tensor a layer and projection. gpt-oss's MXFP4 experts stay
4-bit: llama.cpp's MXFP4 blocks (an E8M0 exponent, then 16 bytes holding value ``j`` in the low nibble of byte ``j``
and value ``j + 16`` in its high one) are the engine's MXFP4 layout as they are (``pack_int4``'s 32-row blocks), so
their bytes are only transposed.

Owns the mapping from llama.cpp's GGUF layout (metadata keys, tensor names, row
permutation of q/k, quantized blocks) to ``ModelConfig`` and the params pytree of
``models/llama.py``. Reading and dequantization go through the ``gguf`` package
(the reference implementation from llama.cpp); only the q/k un-permutation and the
llama3 RoPE recovery are written here, because ``gguf`` has no inverse for them.
Knows nothing of tokenizers (``engine/tokenizer.py``), requests or meshes: it takes
optional shardings and places each parameter with them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from tqdm.auto import tqdm

from models.config import ModelConfig, UnsupportedModelError, gpt_oss_fields, parse_rope_scaling
from models.llama import param_shapes, rope_inv_freq
from models.quantization import MXFP4_GROUP, Int4Weight, check_mxfp4_exponents, field_shardings, mxfp4_weight

# Every type is dequantized to float32 by ``gguf.quants`` (llama.cpp's reference code) as its tensor is read, then
# cast to the model dtype (``quantization=`` then makes the weights small again on the device): the legacy types and
# llama.cpp's k-quants (Q4_K_M files are Q4_K and Q6_K tensors) and 4-bit non-linear ones.
SUPPORTED_TENSOR_TYPES = tuple(GGMLQuantizationType[name] for name in (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "MXFP4",
))  # MXFP4 experts are kept 4-bit (``_mxfp4_experts``); any other MXFP4 tensor is decoded as the rest
# GGUF ``general.architecture`` -> our ``ModelConfig.model_type``.
SUPPORTED_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe",
                           "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "gemma2": "gemma2", "gemma3": "gemma3_text",
                           "phi3": "phi3", "granite": "granite", "olmo2": "olmo2"}
# Mixtures of experts (``{arch}.expert_count > 0``; llama.cpp keeps Mixtral under "llama"): our model type, whether
# the top k routing weights are renormalised (llama.cpp's ``norm_w``, as each model's Hugging Face config).
_MOE_ARCHITECTURES = {"llama": ("mixtral", True), "qwen2moe": ("qwen2_moe", False), "qwen3moe": ("qwen3_moe", True),
                      "gpt-oss": ("gpt_oss", True)}
# llama.cpp's converter interleaves the rotary halves of q/k rows only for its
# "llama" architecture and those converted as llama (granite; it runs them with GPT-J style RoPE); the others are
# stored in Hugging Face's half-split order (NEOX RoPE) and need no un-permutation.
_QK_PERMUTED_ARCHITECTURES = ("llama", "granite")

# Our per-layer parameter name -> GGUF tensor name inside ``blk.{i}.``.
_LAYER_TENSORS = {
    "input_norm": "attn_norm.weight",
    "wq": "attn_q.weight",
    "wk": "attn_k.weight",
    "wv": "attn_v.weight",
    "bq": "attn_q.bias",
    "bk": "attn_k.bias",
    "bv": "attn_v.bias",
    "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight",
    "wo": "attn_output.weight",
    "bo": "attn_output.bias",
    "post_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
    # A mixture of experts: the router and the experts' weights merged over the experts ([E, out, in] in numpy);
    # qwen2moe's shared expert, which is our dense MLP, and its gate.
    "router": "ffn_gate_inp.weight",
    "expert_gate": "ffn_gate_exps.weight",
    "expert_up": "ffn_up_exps.weight",
    "expert_down": "ffn_down_exps.weight",
    "shared_expert_gate": "ffn_gate_inp_shexp.weight",
    # gpt-oss: the router's and the experts' biases ([E, out]), a sink logit a query head
    "router_bias": "ffn_gate_inp.bias",
    "expert_gate_bias": "ffn_gate_exps.bias",
    "expert_up_bias": "ffn_up_exps.bias",
    "expert_down_bias": "ffn_down_exps.bias",
    "sinks": "attn_sinks.weight",
}
# Where an architecture differs. Gemma's four norms: ffn_norm is its pre_feedforward_layernorm (our post_norm), and
# the attention's and the MLP's outputs are normed (post_attention_norm, post_ffw_norm) before their residual adds.
_SANDWICH_NORMS = {"attn_out_norm": "post_attention_norm.weight", "mlp_out_norm": "post_ffw_norm.weight"}
# llama.cpp's phi3 keeps Phi-3's joined projections: attn_qkv (q's rows, then k's and v's) and ffn_up (the gate's
# rows, then the up projection's); ``_joined_rows`` says which rows are whose.
_PHI3_JOINED = {"wq": "attn_qkv.weight", "wk": "attn_qkv.weight", "wv": "attn_qkv.weight", "w_gate": "ffn_up.weight",
                "w_up": "ffn_up.weight"}
# llama.cpp's converter may join each layer's experts' gate and up projections (``--fuse-gate-up-exps``): one
# ``[E, 2I, H]`` tensor, the gates' rows first, and one ``[E, 2I]`` bias (gpt-oss).
_JOINED_EXPERTS = {"expert_gate": "ffn_gate_up_exps.weight", "expert_up": "ffn_gate_up_exps.weight",
                   "expert_gate_bias": "ffn_gate_up_exps.bias", "expert_up_bias": "ffn_gate_up_exps.bias"}
_ARCH_LAYER_TENSORS = {"gpt-oss": {"post_norm": "post_attention_norm.weight"}, "gemma2": _SANDWICH_NORMS,
                       "gemma3": _SANDWICH_NORMS, "olmo2": _SANDWICH_NORMS, "phi3": _PHI3_JOINED}
# llama.cpp's Gemma: the query scale of the 27B models (by their layer counts) is 1 / sqrt(hidden / heads), of the
# others 1 / sqrt(head_dim), where the file says none (attention.scale); Gemma 3's sliding layers' rope base.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
_EXPERT_WEIGHTS = ("expert_gate", "expert_up", "expert_down")
_GPT_OSS_SWIGLU_LIMIT = 7.0  # llama.cpp's gpt-oss gate clamp, where the file names none (swiglu_clamp_exp)
_SHARED_EXPERT_TENSORS = {"w_gate": "ffn_gate_shexp.weight", "w_up": "ffn_up_shexp.weight",
                          "w_down": "ffn_down_shexp.weight"}
_GLOBAL_TENSORS = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
# Standard llama3 RoPE smoothing (Llama 3.1/3.2/3.3); llama.cpp keeps only the
# resulting per-frequency factors (tensor rope_freqs), so we recognise these values.
_LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

_REQUIRED = object()

# A path, or a reader from ``open_gguf``: parsing the metadata costs seconds for a large
# vocabulary (about 2 s for the default model), so callers reading both the config and
# the weights can open the file once.
GGUFSource = Union[str, os.PathLike, GGUFReader]


class GGUFError(ValueError):
    """The GGUF file is unreadable, incomplete, or does not match the expected model."""


class UnsupportedTensorTypeError(GGUFError):
    """A tensor is stored in a GGML type this loader cannot dequantize."""


def open_gguf(path: str) -> GGUFReader:
    """Open (memory-map) a GGUF file, turning the reader's failures into a clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path!r}")
    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct/IndexError, ... on bad bytes
        raise GGUFError(f"{path!r} is not a readable GGUF file ({type(e).__name__}: {e})") from e


def _open(source: GGUFSource) -> GGUFReader:
    return source if isinstance(source, GGUFReader) else open_gguf(os.fspath(source))


def _file_of(reader: GGUFReader) -> str:
    """The file behind a reader, for error messages."""
    return str(getattr(reader.data, "filename", "<GGUF reader>"))


def _metadata(reader: GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise GGUFError(f"{_file_of(reader)!r}: GGUF metadata lacks required key {key!r}")
        return default
    return field.contents()


def _architecture(reader: GGUFReader) -> str:
    arch = _metadata(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def read_gguf_config(source: GGUFSource) -> ModelConfig:
    """Build a ``ModelConfig`` from the metadata (and tensor list) of a GGUF file."""
    reader = _open(source)
    path, arch = _file_of(reader), _architecture(reader)

    def arch_key(key: str, default: Any = _REQUIRED) -> Any:
        return _metadata(reader, f"{arch}.{key}", default)

    num_experts = int(arch_key("expert_count", 0) or 0)
    if num_experts and arch not in _MOE_ARCHITECTURES:
        raise UnsupportedModelError(f"{path!r}: mixture-of-experts models of GGUF architecture {arch!r} are not "
                                    f"supported; supported: {', '.join(_MOE_ARCHITECTURES)}")
    model_type, normalize = _MOE_ARCHITECTURES[arch] if num_experts else (SUPPORTED_ARCHITECTURES[arch], True)
    normalize = bool(arch_key("expert_weights_norm", normalize))  # where the file says
    tensors = {t.name: t for t in reader.tensors}
    try:
        hidden = int(arch_key("embedding_length"))
        num_heads = int(arch_key("attention.head_count"))
        num_kv_heads = int(arch_key("attention.head_count_kv", num_heads))
    except TypeError:  # a per-layer list of head counts
        raise UnsupportedModelError(f"{path!r} has per-layer head counts, which are not supported") from None
    head_dim = int(arch_key("attention.key_length", hidden // num_heads))
    rope_dim = int(arch_key("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UnsupportedModelError(f"partial rotary embedding (rope.dimension_count={rope_dim}, head_dim={head_dim})")
    if "token_embd.weight" in tensors:
        vocab_size = int(tensors["token_embd.weight"].shape[1])  # GGUF dims are (in, out): (H, V)
    else:
        vocab_size = int(arch_key("vocab_size", 0)) or len(reader.get_field("tokenizer.ggml.tokens").data)
    config = ModelConfig(
        model_type=model_type,
        vocab_size=vocab_size,
        hidden_size=hidden,
        # an expert's width: its own key where the architecture has one (qwen*moe), else the MLP's (Mixtral)
        intermediate_size=int(arch_key("expert_feed_forward_length", 0) or arch_key("feed_forward_length")),
        num_experts=num_experts,
        num_experts_per_tok=int(arch_key("expert_used_count", 0) or 0),
        norm_topk_prob=normalize,
        shared_expert_size=int(arch_key("expert_shared_feed_forward_length", 0) or 0),
        num_layers=int(arch_key("block_count")),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(arch_key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(arch_key("rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        qk_norm=arch in ("qwen3", "qwen3moe") or "blk.0.attn_q_norm.weight" in tensors,
        max_position_embeddings=int(arch_key("context_length", 4096)),
        bos_token_id=_metadata(reader, "tokenizer.ggml.bos_token_id", None),
        eos_token_ids=tuple(dict.fromkeys(
            int(v) for key in ("eos_token_id", "eot_token_id", "eom_token_id")
            if (v := _metadata(reader, f"tokenizer.ggml.{key}", None)) is not None
        )),
    )
    if config.num_heads % config.num_kv_heads:
        raise GGUFError(f"head_count={num_heads} is not a multiple of head_count_kv={num_kv_heads}")
    if arch == "gpt-oss":
        return _gpt_oss_config(config, arch_key)
    if arch in ("gemma2", "gemma3"):
        return _gemma_config(config, arch, arch_key)
    if arch == "phi3":
        if "rope_factors_long.weight" in tensors:
            raise UnsupportedModelError(f"{path!r}: Phi-3's longrope scaling (the 128k models) is not supported")
        window = int(arch_key("attention.sliding_window", 0) or 0)  # 0: none (Phi-4)
        config = dataclasses.replace(config, sliding_window=window or None)
    rope_scaling = _rope_scaling(reader, arch, config, tensors.get("rope_freqs.weight"))
    if rope_scaling is not None:
        config = dataclasses.replace(config, rope_scaling=rope_scaling)
    if arch == "granite":  # its multipliers, which llama.cpp's keys call scales (each written where not 0)
        config = dataclasses.replace(_as_hf_config(config, arch, dict(
            embedding_multiplier=arch_key("embedding_scale", 1.0),
            attention_multiplier=arch_key("attention.scale", None) or config.head_dim ** -0.5,
            residual_multiplier=arch_key("residual_scale", 1.0), logits_scaling=arch_key("logit_scale", 1.0))),
            rope_scaling=config.rope_scaling)
    elif arch == "olmo2":  # norms after the blocks, q and k normed over all their heads
        if arch_key("attention.sliding_window", 0):  # llama.cpp converts OLMo 3 as olmo2, with sliding layers
            raise UnsupportedModelError(f"{path!r}: an olmo2 file with sliding-window layers (OLMo 3) is not "
                                        "supported")
        config = dataclasses.replace(_as_hf_config(config, arch, {}), rope_scaling=config.rope_scaling)
    return config


def _gpt_oss_config(config: ModelConfig, arch_key) -> ModelConfig:
    """gpt-oss's fields (``models.config.gpt_oss_fields``) from llama.cpp's keys: the sliding window (sliding and full
    layers in turn from a sliding one, as llama.cpp runs them), YaRN (gpt-oss's, without truncation, as its
    ``config.json`` says), the gate's clamp (``swiglu_clamp_exp``, one a layer, else llama.cpp's 7)."""
    limits = arch_key("swiglu_clamp_exp", None)
    limits = [float(v) for v in limits] if isinstance(limits, (list, tuple)) else [limits]
    limit = _GPT_OSS_SWIGLU_LIMIT if limits[0] is None else float(limits[0])
    if any(v != limit for v in limits[1:]):
        raise UnsupportedModelError(f"gpt-oss with a gate clamp that differs between layers ({limits})")
    kind = arch_key("rope.scaling.type", "none")
    if kind not in ("none", "", "yarn"):
        raise UnsupportedModelError(f"unsupported GGUF rope scaling type {kind!r} for gpt-oss; supported: none, yarn")
    rope = None if kind != "yarn" else dict(
        rope_type="yarn", factor=float(arch_key("rope.scaling.factor")),
        original_max_position_embeddings=int(arch_key("rope.scaling.original_context_length")),
        beta_fast=float(arch_key("rope.scaling.yarn_beta_fast", 32.0)),
        beta_slow=float(arch_key("rope.scaling.yarn_beta_slow", 1.0)), truncate=False)
    window = int(arch_key("attention.sliding_window"))
    fields = gpt_oss_fields(dict(sliding_window=window, swiglu_limit=limit), config.num_layers)
    return dataclasses.replace(config, sliding_window=window, **fields,
                               rope_scaling=None if rope is None else parse_rope_scaling(
                                   rope, config.max_position_embeddings))


def _gemma_config(config: ModelConfig, arch: str, arch_key) -> ModelConfig:
    """Gemma 2 / 3 as ``ModelConfig.from_hf_dict`` reads their ``config.json`` (tanh GELU, the scaled embedding,
    sandwich norms, soft caps, sliding layers), from llama.cpp's keys and its fixed choices: sliding layers by
    ``attention.sliding_window_pattern`` (a period, or a flag a layer; else a full layer in 2 for Gemma 2, in 6 for
    Gemma 3), the query scale (``attention.scale``, else ``_GEMMA_27B_LAYERS``' rule), Gemma 3's rope (the file's
    base and linear scaling on the full layers, ``rope.freq_base_swa`` or 10,000 on the sliding ones). Norm weights
    are stored as llama.cpp's converter writes them, ``1 + w``: what the engine keeps (``norm_weight_offset``)."""
    L = config.num_layers
    pattern = arch_key("attention.sliding_window_pattern", 6 if arch == "gemma3" else 2)
    sliding = ([bool(v) for v in pattern] if isinstance(pattern, (list, tuple))
               else [not pattern or (i + 1) % int(pattern) != 0 for i in range(L)])  # 0: every layer slides
    window = int(arch_key("attention.sliding_window", 0) or 0)  # none (as llama.cpp): no layer slides
    scale = arch_key("attention.scale", None)
    scalar = (float(scale) ** -2 if scale else config.hidden_size / config.num_heads
              if L == _GEMMA_27B_LAYERS[arch] else config.head_dim)
    kind = arch_key("rope.scaling.type", "none")
    if kind not in ("none", "", "linear"):
        raise UnsupportedModelError(f"unsupported GGUF rope scaling type {kind!r} for {arch}; supported: none, linear")
    full_rope = dict(rope_type="linear", factor=float(arch_key("rope.scaling.factor"))) if kind == "linear" else {}
    full_rope["rope_theta"] = config.rope_theta
    d = dict(hidden_activation="gelu_pytorch_tanh", sliding_window=window or None,
             query_pre_attn_scalar=scalar,
             layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
             attn_logit_softcapping=arch_key("attn_logit_softcapping", None),
             final_logit_softcapping=arch_key("final_logit_softcapping", None))
    if arch == "gemma3":
        d["rope_parameters"] = {"full_attention": full_rope, "sliding_attention": dict(
            rope_type="default", rope_theta=float(arch_key("rope.freq_base_swa", _GEMMA3_LOCAL_ROPE_BASE)))}
    elif full_rope.get("rope_type"):
        d["rope_scaling"] = full_rope
    return _as_hf_config(config, arch, d)


def _as_hf_config(config: ModelConfig, arch: str, fields: dict) -> ModelConfig:
    """``ModelConfig.from_hf_dict`` of the ``config.json`` the GGUF file's model has: ``config``'s sizes (read as for
    every architecture) and ``fields``, so that an architecture's own departures are made in one place, whichever
    format a checkpoint comes in."""
    d = dict(model_type=SUPPORTED_ARCHITECTURES[arch], vocab_size=config.vocab_size, hidden_size=config.hidden_size,
             intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
             num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
             rms_norm_eps=config.rms_norm_eps, max_position_embeddings=config.max_position_embeddings,
             rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings, **fields)
    return dataclasses.replace(ModelConfig.from_hf_dict(d), bos_token_id=config.bos_token_id,
                               eos_token_ids=config.eos_token_ids)


def has_mxfp4_experts(source: GGUFSource) -> bool:
    """Whether the file's experts are MXFP4 (gpt-oss's published form): loaded 4-bit, its quantization "mxfp4"."""
    return any(t.tensor_type == GGMLQuantizationType.MXFP4 and t.name.endswith("_exps.weight")
               for t in _open(source).tensors)


def _rope_scaling(reader: GGUFReader, arch: str, config: ModelConfig, rope_freqs) -> Optional[tuple]:
    """``ModelConfig.rope_scaling`` from ``{arch}.rope.scaling.*`` or llama3's ``rope_freqs`` tensor."""
    kind = _metadata(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        return ("linear", float(_metadata(reader, f"{arch}.rope.scaling.factor")))
    if kind not in ("none", ""):
        raise UnsupportedModelError(f"unsupported GGUF rope scaling type {kind!r}; supported: none, linear")
    if rope_freqs is None:
        return None
    factors = np.asarray(dequantize(rope_freqs.data, rope_freqs.tensor_type), np.float64).reshape(-1)
    if factors.shape[0] != config.head_dim // 2:
        raise GGUFError(f"rope_freqs has {factors.shape[0]} entries, expected head_dim/2 = {config.head_dim // 2}")
    if np.allclose(factors, 1.0):
        return None
    # llama.cpp divides each inverse frequency by its factor; the largest factor is llama3's `factor`.
    candidate = ("llama3", float(factors.max()), *_LLAMA3_ROPE.values())
    expected = rope_inv_freq(dataclasses.replace(config, rope_scaling=None)) / factors
    if not np.allclose(rope_inv_freq(dataclasses.replace(config, rope_scaling=candidate)), expected, rtol=1e-4):
        raise UnsupportedModelError("rope_freqs tensor does not match any llama3 RoPE scaling we recognise")
    return candidate


def unpermute_qk_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (rows ``(head, rotary pair, 2)`` -> ``(head, 2, half)``).

    The converter maps Hugging Face's half-split rotary layout to interleaved pairs;
    this is the inverse used by transformers' GGUF loader. Works on weights
    ``[out, in]`` and biases ``[out]``.
    """
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _TensorSource:
    """Dequantizes named GGUF tensors into our ``[in, out]`` float32 layout."""

    def __init__(self, reader: GGUFReader):
        self._tensors = {t.name: t for t in reader.tensors}
        self._path = _file_of(reader)
        self.unpermute = _architecture(reader) in _QK_PERMUTED_ARCHITECTURES

    def check(self, names: list[str]) -> None:
        """Fail before any work when a tensor is missing or of a type we cannot dequantize."""
        for name in names:
            t = self._tensors.get(name)
            if t is None:
                raise GGUFError(f"{self._path!r} lacks tensor {name!r}")
            if t.tensor_type not in SUPPORTED_TENSOR_TYPES:
                raise UnsupportedTensorTypeError(
                    f"tensor {name!r} in {self._path!r} has GGML type {t.tensor_type.name}, which is not "
                    f"supported; supported types: {', '.join(q.name for q in SUPPORTED_TENSOR_TYPES)}"
                )

    def get(self, name: str, expected_shape: tuple, permute_heads: Optional[int] = None,
            rows: Optional[slice] = None) -> np.ndarray:
        """The tensor in our layout (``rows``: only those of its outputs, a joined projection's part)."""
        t = self._tensors[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)  # numpy shape [out, in]
        if rows is not None:  # a weight's output rows, a bias's entries
            w = w[..., rows] if name.endswith(".bias") else w[..., rows, :]
        if permute_heads is not None and self.unpermute:
            w = unpermute_qk_rows(w, permute_heads)
        if w.ndim >= 2 and name != _GLOBAL_TENSORS["embed"] and not name.endswith(".bias"):
            w = np.swapaxes(w, -1, -2)  # token_embd is already [V, H]; linear weights become [in, out] (per expert)
        if w.ndim == 1 and len(expected_shape) == 2 and w.size == np.prod(expected_shape):
            w = w.reshape(expected_shape)  # a Linear with one output (qwen2moe's shared expert gate) stored as [H]
        if w.shape != tuple(expected_shape):
            raise GGUFError(f"tensor {name!r} has shape {w.shape} after loading, expected {tuple(expected_shape)}")
        return w

    def is_mxfp4(self, name: str) -> bool:
        return self._tensors[name].tensor_type == GGMLQuantizationType.MXFP4

    def mxfp4(self, name: str, expected_shape: tuple, rows: Optional[slice] = None) -> tuple[np.ndarray, np.ndarray]:
        """An MXFP4 tensor ``[E, N, K]`` (``rows``: those outputs of a joined one) as the engine keeps it: ``(packed
        [E, K/2, N], exponents [E, K/32, N])``, its bytes only moved (module docstring)."""
        E, K, N = expected_shape
        blocks = np.asarray(self._tensors[name].data).reshape(E, -1, K // MXFP4_GROUP, 1 + MXFP4_GROUP // 2)
        blocks = blocks if rows is None else blocks[:, rows]
        if blocks.shape[1] != N:
            raise GGUFError(f"MXFP4 tensor {name!r} has {blocks.shape[1]} outputs, expected {N}")
        exponents = blocks[..., 0]
        check_mxfp4_exponents(exponents, f"{name!r} in {self._path!r}")
        return (np.swapaxes(blocks[..., 1:].reshape(E, N, K // 2), -1, -2), np.swapaxes(exponents, -1, -2))


def load_gguf_params(source: GGUFSource, config: ModelConfig, dtype: Any, shardings: Optional[dict] = None,
                     progress: bool = True) -> dict:
    """Load (dequantize, un-permute, transpose, stack) every weight of a GGUF file.

    ``source`` is a path or a reader from ``open_gguf`` (reuse the one the config
    was read from to parse the metadata once). Returns the params pytree of
    ``models/llama.py`` in ``dtype``. ``shardings`` is an optional pytree of
    ``jax.sharding.Sharding`` of the same structure (a None leaf: default device);
    each parameter is placed with ``jax.device_put`` as soon as it is built.
    ``progress`` shows a tqdm bar over tensors.
    """
    shapes = param_shapes(config)
    layer_shapes = shapes.pop("layers")
    np_dtype = jnp.dtype(dtype)
    permute_heads = {"wq": config.num_heads, "bq": config.num_heads,
                     "wk": config.num_kv_heads, "bk": config.num_kv_heads}
    reader = _open(source)
    arch = _architecture(reader)
    joined_experts = config.is_moe and any(t.name == "blk.0.ffn_gate_up_exps.weight" for t in reader.tensors)
    tensor_of = {**_LAYER_TENSORS, **(_SHARED_EXPERT_TENSORS if config.shared_expert_size else {}),
                 **_ARCH_LAYER_TENSORS.get(arch, {}), **(_JOINED_EXPERTS if joined_experts else {})}
    joined = {**(_PHI3_JOINED if arch == "phi3" else {}), **(_JOINED_EXPERTS if joined_experts else {})}
    layer_names = {p: [f"blk.{i}.{tensor_of[p]}" for i in range(config.num_layers)] for p in layer_shapes}
    tensors = _TensorSource(reader)
    tensors.check([_GLOBAL_TENSORS[p] for p in shapes] + [n for names in layer_names.values() for n in names])

    def place(value: np.ndarray, *keys: str) -> jax.Array:
        sharding = shardings
        for key in keys:
            sharding = sharding[key] if sharding is not None else None
        return jax.device_put(value, sharding)

    params: dict = {"layers": {}}
    with tqdm(total=len(shapes) + config.num_layers * len(layer_shapes), desc="Loading GGUF tensors",
              unit="tensor", leave=False, disable=not progress) as bar:
        for p, shape in shapes.items():
            params[p] = place(tensors.get(_GLOBAL_TENSORS[p], shape).astype(np_dtype), p)
            bar.update()
        for p, shape in layer_shapes.items():
            rows = _joined_rows(config, p) if p in joined else None
            if p in _EXPERT_WEIGHTS and any(map(tensors.is_mxfp4, layer_names[p])):
                weight = _mxfp4_experts(tensors, layer_names[p], shape, rows)
                sharding = shardings["layers"][p] if shardings is not None else None
                params["layers"][p] = jax.device_put(weight, None if sharding is None
                                                     else field_shardings(weight, sharding))
                bar.update(len(layer_names[p]))
                continue
            stacked = np.empty(shape, np_dtype)  # fill layer by layer: one float32 layer at a time
            for i, name in enumerate(layer_names[p]):
                stacked[i] = tensors.get(name, shape[1:], permute_heads.get(p), rows)
                bar.update()
            params["layers"][p] = place(stacked, "layers", p)
    return params


def _joined_rows(config: ModelConfig, param: str) -> slice:
    """The rows of a joined projection (``_PHI3_JOINED``, ``_JOINED_EXPERTS``) that are ``param``'s."""
    q, kv, inter = config.q_size, config.kv_size, config.intermediate_size
    gate, up = slice(0, inter), slice(inter, 2 * inter)
    return {"wq": slice(0, q), "wk": slice(q, q + kv), "wv": slice(q + kv, q + 2 * kv), "w_gate": gate, "w_up": up,
            "expert_gate": gate, "expert_up": up, "expert_gate_bias": gate, "expert_up_bias": up}[param]


def _mxfp4_experts(tensors: _TensorSource, names: list[str], shape: tuple, rows: Optional[slice] = None
                   ) -> Int4Weight:
    """A stack of MXFP4 expert matrices (``names``: one a layer, each ``[E, N, K]`` in the file, or ``rows`` of a
    joined one) kept 4-bit: ``Int4Weight(codes="e2m1")`` of ``shape`` ``[L, E, K, N]``."""
    L, E, K, N = shape
    if not all(map(tensors.is_mxfp4, names)):
        raise GGUFError(f"{names[0].split('.', 2)[-1]!r} is MXFP4 in some layers only; the engine keeps a stack of "
                        "experts in one format")
    packed = np.empty((L, E, K // 2, N), np.uint8)
    exponents = np.empty((L, E, K // MXFP4_GROUP, N), np.uint8)
    for layer, name in enumerate(names):
        packed[layer], exponents[layer] = tensors.mxfp4(name, (E, K, N), rows)
    return mxfp4_weight(packed, exponents)
