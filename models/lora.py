"""LoRA adapters on the decoder's seven layer matrices (vLLM's multi-LoRA serving): reading PEFT adapter folders,
the device slots they run from, and each matrix's low-rank update in the forward pass.

An adapter adds ``scaling * (x @ A) @ B`` to a matrix's output (PEFT stores ``lora_A [r, in]``, ``lora_B [out, r]``;
``scaling`` is ``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA). The engine keeps ``max_loras`` adapters on the
device at once, each padded to ``max_lora_rank`` and laid side by side along the rank axis of one stacked ``A``
and ``B`` a matrix (``params["layers"]["lora"][name]``: ``a [L, in, max_loras * R]``, ``b [L, max_loras * R, out]``,
the scaling folded into ``b``). Slot ``s`` (1 .. ``max_loras``) owns columns ``(s - 1) * R .. s * R``; slot 0 is
"no adapter". Each token row carries its sequence's slot (``ModelInput.lora_slots``), and a row's update is
``((x @ a) * mask) @ b`` with ``mask`` keeping only its slot's columns: two dense matmuls a matrix, whatever
the mix of adapters in the step (the segmented gather-matmuls of vLLM's Punica kernels, for few slots).
``params["lora_columns"] [max_loras * R]`` holds each column's slot. Where the step joins q/k/v and gate/up into one
matmul each, their updates are joined too (``lora_groups``): one ``a`` of the parts' columns side by side and one
block-diagonal ``b``, two dots for the three (two) matrices.

Knows nothing of requests or slot assignment (``engine.lora``).
"""

from __future__ import annotations

import json
import math
import os
import re
import jax
import jax.numpy as jnp
import numpy as np

from models.config import ModelConfig

# PEFT's module names (Hugging Face's) -> the params they update, in column order of the module's output.
# Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` share one A; their B's rows split between the parts.
TARGET_MODULES = {
    "q_proj": ("wq",), "k_proj": ("wk",), "v_proj": ("wv",), "o_proj": ("wo",),
    "gate_proj": ("w_gate",), "up_proj": ("w_up",), "down_proj": ("w_down",),
    "qkv_proj": ("wq", "wk", "wv"), "gate_up_proj": ("w_gate", "w_up"),
}
LORA_PARAMS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# The matrices whose updates run as one where the step joins their weights (models.llama.FUSED_PROJECTIONS).
JOINED_UPDATES = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"  # older trainers' PyTorch pickle: read with torch, weights only
# ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` (PEFT; ``.default`` in some saves).
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")
ATTENTION_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"})  # under self_attn; others mlp


class LoRAAdapterError(ValueError):
    """The adapter folder is missing, unreadable, or does not fit the model or the engine's LoRA limits."""


def param_widths(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of each matrix an adapter may update: a mixture of experts' attention only (its experts'
    updates are not supported)."""
    h, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    attention = {"wq": (h, q), "wk": (h, kv), "wv": (h, kv), "wo": (q, h)}
    return attention if config.is_moe else {**attention, "w_gate": (h, i), "w_up": (h, i), "w_down": (i, h)}


def _in_out(widths: dict[str, tuple[int, int]], parts: tuple[str, ...]) -> tuple[int, int]:
    """``(in, out)`` of matrices ``parts`` joined along their outputs (they share their input)."""
    return widths[parts[0]][0], sum(widths[p][1] for p in parts)


def lora_groups(config: ModelConfig, joined: bool) -> dict[str, tuple[str, ...]]:
    """The updates a step runs, each over the matrices it covers (``param_widths``): q/k/v's and gate/up's
    joined, or one a matrix."""
    names = param_widths(config)
    groups = ({"wqkv": JOINED_UPDATES["wqkv"], "wo": ("wo",), "w_gate_up": JOINED_UPDATES["w_gate_up"],
               "w_down": ("w_down",)} if joined else {name: (name,) for name in LORA_PARAMS})
    return {group: parts for group, parts in groups.items() if parts[0] in names}


def empty_lora_params(config: ModelConfig, max_loras: int, max_rank: int, dtype, joined: bool = False) -> dict:
    """Zeroed slots (numpy): ``{"lora": {group: {"a", "b"}}, "lora_columns"}`` (``lora_groups(joined)``; module
    doc) for ``params["layers"]["lora"]`` and ``params["lora_columns"]``."""
    L, width, widths = config.num_layers, max_loras * max_rank, param_widths(config)
    lora = {}
    for group, parts in lora_groups(config, joined).items():
        n_in, n_out = _in_out(widths, parts)
        lora[group] = {"a": np.zeros((L, n_in, len(parts) * width), dtype),
                       "b": np.zeros((L, len(parts) * width, n_out), dtype)}
    return {"lora": lora, "lora_columns": np.repeat(np.arange(1, max_loras + 1, dtype=np.int32), max_rank)}


def read_adapter(path: str, config: ModelConfig, max_rank: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A PEFT LoRA adapter folder as ``{name: (a [L, in, max_rank], b [L, max_rank, out])}`` float32, the scaling
    folded into ``b``, zero-padded to ``max_rank``, zeros for matrices and layers it leaves alone; each matrix's rank
    and alpha PEFT's ``rank_pattern`` / ``alpha_pattern`` or the config's. The folder holds its config and weights
    (``engine.lora.adapter_folder_problem``, checked by the engine before it reads one)."""
    config_file = os.path.join(path, ADAPTER_CONFIG)
    try:
        with open(config_file) as f:
            peft = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAAdapterError(f"{config_file} is unreadable: {e}") from None
    default_rank, default_alpha = _adapter_rank_and_alpha(peft, config_file, max_rank)
    weights_file, tensors = _adapter_tensors(path)
    widths = param_widths(config)
    out = zero_adapter(config, max_rank)
    seen = set()
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if (match is None or match.group(3) not in TARGET_MODULES
                or (match.group(3) in ATTENTION_MODULES) != (match.group(2) == "self_attn")):
            raise LoRAAdapterError(f"{weights_file}: tensor {key!r} is not a LoRA update of a decoder layer's "
                                   f"{', '.join(TARGET_MODULES)} (embeddings, the LM head, experts, DoRA and biases "
                                   "are not supported)")
        layer, module, which = int(match.group(1)), match.group(3), match.group(4)
        if layer >= config.num_layers:
            raise LoRAAdapterError(f"{weights_file}: tensor {key!r} is for layer {layer}, but the model has "
                                   f"{config.num_layers} layers")
        parts = TARGET_MODULES[module]
        if parts[0] not in widths:
            raise LoRAAdapterError(f"{weights_file}: tensor {key!r} updates the MLP of {config.model_type}, a "
                                   "mixture of experts: only its attention's updates are supported")
        n_in, n_out = _in_out(widths, parts)
        module_name = f"model.layers.{layer}.{match.group(2)}.{module}"
        rank = _pattern_value(peft.get("rank_pattern"), module_name, default_rank)
        alpha = _pattern_value(peft.get("alpha_pattern"), module_name, default_alpha)
        if rank > max_rank:
            raise LoRAAdapterError(f"{config_file}: rank_pattern gives {module_name} rank {rank}, above "
                                   f"max_lora_rank={max_rank} (raise max_lora_rank, --max-lora-rank)")
        scaling = alpha / (math.sqrt(rank) if peft.get("use_rslora") else rank)
        expected = (rank, n_in) if which == "A" else (n_out, rank)
        if tuple(tensor.shape) != expected:
            raise LoRAAdapterError(f"{weights_file}: tensor {key!r} has shape {list(tensor.shape)}, expected "
                                   f"{list(expected)} for this model and r={rank}")
        weight = np.asarray(tensor, np.float32)
        if which == "A":
            for p in parts:
                out[p][0][layer, :, :rank] = weight.T
        else:
            start = 0
            for p in parts:
                stop = start + widths[p][1]
                out[p][1][layer, :rank, :] = weight[start:stop].T * scaling
                start = stop
        seen.add((layer, module, which))
    unpaired = sorted({(layer, module) for layer, module, _ in seen
                       if not {(layer, module, "A"), (layer, module, "B")} <= seen})
    if unpaired:
        raise LoRAAdapterError(f"{weights_file}: lora_A and lora_B must come in pairs; missing for (layer, "
                               f"module) {unpaired[:4]}")
    if not seen:
        raise LoRAAdapterError(f"{weights_file} holds no LoRA weights")
    return out


def _adapter_tensors(path: str) -> tuple[str, dict]:
    """An adapter folder's weights file and its tensors by name (numpy arrays; read lazily from safetensors)."""
    from models.safetensors_loader import _Checkpoint

    weights_file = os.path.join(path, ADAPTER_WEIGHTS)
    if os.path.exists(weights_file):
        ckpt = _Checkpoint([weights_file])
        return weights_file, {name: ckpt.array(name) for name in ckpt.names}
    weights_file = os.path.join(path, ADAPTER_BIN)
    try:
        import torch
    except ImportError:
        raise LoRAAdapterError(f"{weights_file}: reading a PyTorch .bin adapter needs torch (pip install torch); "
                               "or save the adapter as safetensors") from None
    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle torch refuses (not weights only) or a broken file
        raise LoRAAdapterError(f"{weights_file} is unreadable: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoRAAdapterError(f"{weights_file} is not a dictionary of tensors")
    return weights_file, {name: value.float().numpy() for name, value in state.items()}


def zero_adapter(config: ModelConfig, rank: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """An adapter of rank ``rank`` that changes nothing, in ``read_adapter``'s form (its starting point)."""
    return {name: (np.zeros((config.num_layers, n_in, rank), np.float32),
                   np.zeros((config.num_layers, rank, n_out), np.float32))
            for name, (n_in, n_out) in param_widths(config).items()}


def write_random_adapter(path: str, config: ModelConfig, modules: list[str], *, r: int = 16,
                         lora_alpha: float = 32.0, std: float = 0.02, seed: int = 0) -> str:
    """A PEFT adapter folder of random A and B (normal * ``std``) for every layer's ``modules`` (Hugging Face
    names) of a model of ``config``, as ``read_adapter`` reads it: for tests and benchmarks without an adapter."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    widths = param_widths(config)
    tensors = {}
    for layer in range(config.num_layers):
        for module in modules:
            parts = TARGET_MODULES[module]
            n_in, n_out = _in_out(widths, parts)
            block = "self_attn" if parts[0] in ("wq", "wk", "wv", "wo") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (std * rng.standard_normal((r, n_in))).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = (std * rng.standard_normal((n_out, r))).astype(np.float32)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "target_modules": modules}, f)
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS))
    return str(path)


def _adapter_rank_and_alpha(peft: dict, config_file: str, max_rank: int) -> tuple[int, float]:
    """``(r, lora_alpha)`` of an adapter config, refusing what this engine does not run."""
    if peft.get("peft_type", "LORA") != "LORA":
        raise LoRAAdapterError(f"{config_file}: peft_type {peft.get('peft_type')!r} is not LORA")
    for option, off in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if peft.get(option, off) not in (off, None):
            raise LoRAAdapterError(f"{config_file}: {option}={peft[option]!r} is not supported (only {off!r})")
    if peft.get("modules_to_save"):
        raise LoRAAdapterError(f"{config_file}: modules_to_save is not supported ({peft['modules_to_save']!r})")
    for option in ("rank_pattern", "alpha_pattern"):
        pattern, kind = peft.get(option) or {}, int if option == "rank_pattern" else (int, float)
        if not isinstance(pattern, dict) or not all(isinstance(v, kind) and not isinstance(v, bool) and v > 0
                                                    for v in pattern.values()):
            raise LoRAAdapterError(f"{config_file}: {option} must map module names to positive numbers, got "
                                   f"{pattern!r}")
        try:
            for key in pattern:
                re.compile(key)
        except re.error as e:
            raise LoRAAdapterError(f"{config_file}: {option} key {key!r} is not a regular expression: {e}") from None
    rank, alpha = peft.get("r"), peft.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1 or not isinstance(alpha, (int, float)):
        raise LoRAAdapterError(f"{config_file}: r must be an integer >= 1 and lora_alpha a number, got r={rank!r}, "
                               f"lora_alpha={alpha!r}")
    if rank > max_rank:
        raise LoRAAdapterError(f"the adapter's rank r={rank} exceeds max_lora_rank={max_rank} (raise "
                               "max_lora_rank, --max-lora-rank)")
    return rank, float(alpha)


def _pattern_value(pattern, module_name: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: the value of the first key (a regular expression) matching the
    end of ``module_name`` at a dot (``model.layers.3.self_attn.q_proj``), else ``default``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?(?:{key})$", module_name):
            return value
    return default


def set_slot(lora_layers: dict, adapter: dict, slot: jax.Array) -> dict:
    """The slots ``lora_layers`` (stacked ``[L, ...]``, or one layer's) with ``slot``'s columns replaced by
    ``adapter``'s ``(a, b)`` of each matrix (``read_adapter``'s arrays, or one layer's of them): in a joined group,
    part ``p``'s among the ``p``-th block of columns of ``a`` and its rows and output columns of ``b``."""

    def put(stacked, rows, start):
        offsets = [0] * (stacked.ndim - len(start)) + list(start)
        return jax.lax.dynamic_update_slice(stacked, rows.astype(stacked.dtype), offsets)

    out = {}
    for group, w in lora_layers.items():
        a, b = w["a"], w["b"]
        parts = JOINED_UPDATES.get(group, (group,))
        width = a.shape[-1] // len(parts)  # max_loras * R
        out_start = 0
        for p, part in enumerate(parts):
            rank = adapter[part][0].shape[-1]
            column = p * width + (slot - 1) * rank
            a = put(a, adapter[part][0], (column,))
            b = put(b, adapter[part][1], (column, out_start))
            out_start += adapter[part][1].shape[-1]
        out[group] = {"a": a, "b": b}
    return out


def lora_mask(lora_slots: jax.Array, lora_columns: jax.Array, dtype) -> jax.Array:
    """``[T, max_loras * R]``: 1 where a column belongs to the row's slot (none for slot 0)."""
    return (lora_slots[:, None] == lora_columns[None, :]).astype(dtype)


def lora_update(x: jax.Array, lora: dict, group: str, mask: jax.Array) -> jax.Array:
    """Each row's adapter update of ``group`` (a matrix, or joined ones: their output columns side by side) for
    input rows ``x [T, in]``: ``[T, out]`` in x's dtype."""
    a, b = lora[group]["a"], lora[group]["b"]
    parts = a.shape[-1] // mask.shape[-1]
    return jnp.dot(jnp.dot(x, a) * (jnp.tile(mask, (1, parts)) if parts > 1 else mask), b).astype(x.dtype)
