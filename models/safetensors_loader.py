"""Load a Hugging Face safetensors checkpoint folder into the params pytree of ``models.llama``.

Owns the name mapping from Hugging Face tensor names to our params, the layout change
(``[out, in]`` Linear weights become ``[in, out]``, per-layer tensors are stacked on a
leading layer axis), the cast to the requested dtype and the placement on devices.
Knows nothing of the forward pass beyond ``param_shapes``, and nothing of requests.

Reading: safetensors files are memory-mapped and each tensor is a zero-copy numpy view
of the map. We parse the (tiny, fully specified) safetensors header ourselves instead of
using ``safetensors.safe_open``: its ``numpy`` framework cannot represent bfloat16
(``TypeError: data type 'bfloat16' not understood``, and most real checkpoints are
bf16), and its ``flax`` framework materializes every tensor whole on the default device,
which defeats loading shard by shard for tensor parallelism. With the header we can view
bf16 bytes through ``ml_dtypes.bfloat16`` (numpy's bf16, as used by JAX) and read only
the slice each device needs.

Placement: the bytes go to the device(s) in the checkpoint's own layout (stacked per
layer), and a jitted transpose + cast on the device(s) makes our layout: numpy's strided
transpose of a large matrix runs at ~0.1 GB/s, the device's at memory speed. With
shardings, the HF-layout tensor is built by ``jax.make_array_from_callback`` under the
target sharding with its last two axes swapped, so every device reads only its own
slice from the memory map and the transpose needs no communication; a tensor-parallel
load never builds a whole stacked tensor on the host. Without shardings each stacked
tensor is built on the host once and ``jax.device_put`` on the default device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from models.config import ModelConfig
from models.llama import FUSED_PROJECTIONS, fused_widths, param_shapes
from models.quantization import (
    QUANTIZED_EXPERT_WEIGHTS,
    QUANTIZED_LAYER_WEIGHTS,
    MXFP4_GROUP,
    CheckpointQuantization,
    Fp8Weight,
    Int4Weight,
    Int8KMajorWeight,
    Int8Weight,
    QuantizationError,
    awq_to_int4,
    field_shardings,
    fp8_from_checkpoint,
    gptq8_to_int8,
    gptq_to_int4,
    int8_from_checkpoint,
    check_mxfp4_exponents,
    int8_layout_of,
    mxfp4_weight,
    packed_to_int4,
    packed_to_int8,
)
from pallas_kernels import quantized_matmul as qmm

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype tags -> numpy dtypes (little-endian by the format's definition).
_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

# Our per-layer param name -> (Hugging Face name inside ``model.layers.{i}.``, is a Linear weight).
_LAYER_NAMES = {
    "input_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "bo": ("self_attn.o_proj.bias", False),
    "q_norm": ("self_attn.q_norm.weight", False),
    "k_norm": ("self_attn.k_norm.weight", False),
    "post_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
    "router": ("mlp.gate.weight", True),
    "shared_expert_gate": ("mlp.shared_expert_gate.weight", True),
}
KV_SCALE_PARAMS = ("k_scale", "v_scale")  # one number a layer (shape [] or [1]), named as in ``KV_SCALE_NAMES``
# The names checkpoints give a layer's fp8 K and V scales, as vLLM's ``maybe_remap_kv_scale_name`` reads them, in the
# order tried: llm-compressor's, NVIDIA ModelOpt's, older compressed-tensors' output scales, and AutoFP8's one scale
# for both (deprecated).
KV_SCALE_NAMES = (("self_attn.k_scale", "self_attn.v_scale"),
                  ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"),
                  ("self_attn.k_proj.output_scale", "self_attn.v_proj.output_scale"),
                  ("self_attn.kv_scale", "self_attn.kv_scale"))
# A mixture of experts' per-expert weights: our name -> (HF name inside ``model.layers.{i}.{moe}.experts.{e}.``, by
# the model's block name ``moe``), all Linear weights; Mixtral's router is ``block_sparse_moe.gate``.
_EXPERT_NAMES = {
    "expert_gate": {"mlp": "gate_proj.weight", "block_sparse_moe": "w1.weight"},
    "expert_up": {"mlp": "up_proj.weight", "block_sparse_moe": "w3.weight"},
    "expert_down": {"mlp": "down_proj.weight", "block_sparse_moe": "w2.weight"},
}
_MOE_BLOCK = {"mixtral": "block_sparse_moe"}  # others: "mlp"
# qwen2_moe's shared expert is our dense MLP.
_SHARED_EXPERT = {name: f"mlp.shared_expert.{proj}.weight"
                  for name, proj in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))}
# Gemma's four norms a layer: ``post_norm`` (before the MLP) is its pre_feedforward_layernorm, and its
# post_attention_layernorm norms the attention's output before the residual add (``attn_out_norm``).
_RENAMED_IN_CHECKPOINT = {
    model_type: {"post_norm": "pre_feedforward_layernorm.weight", "attn_out_norm": "post_attention_layernorm.weight",
                 "mlp_out_norm": "post_feedforward_layernorm.weight"}
    for model_type in ("gemma2", "gemma3_text")
}
_RENAMED_IN_CHECKPOINT["olmo2"] = {"attn_out_norm": "post_attention_layernorm.weight",
                                   "mlp_out_norm": "post_feedforward_layernorm.weight"}
# gpt-oss: a layer's experts stacked in one tensor each, ``[E, in, out]`` (gate and up columns in turn), the biases
# ``[E, out]``; our name -> (HF name inside ``model.layers.{i}.``, our columns' (part, parts) of its last axis).
_STACKED_EXPERTS = {
    "gpt_oss": {"expert_gate": ("mlp.experts.gate_up_proj", (0, 2)), "expert_up": ("mlp.experts.gate_up_proj", (1, 2)),
                "expert_down": ("mlp.experts.down_proj", None),
                "expert_gate_bias": ("mlp.experts.gate_up_proj_bias", (0, 2)),
                "expert_up_bias": ("mlp.experts.gate_up_proj_bias", (1, 2)),
                "expert_down_bias": ("mlp.experts.down_proj_bias", None)},
}
_RENAMED_IN_CHECKPOINT["gpt_oss"] = {"router": "mlp.router.weight", "router_bias": "mlp.router.bias",
                                     "sinks": "self_attn.sinks"}
# Checkpoints that store projections joined (Phi-3's ``qkv_proj`` and ``gate_up_proj``, rows ``[q | k | v]`` and
# ``[gate | up]``): model type -> our joined name (``models.llama.FUSED_PROJECTIONS``, whose parts and widths give
# each part's rows) -> the HF name inside ``model.layers.{i}.``.
_JOINED_IN_CHECKPOINT = {
    "phi3": {"wqkv": "self_attn.qkv_proj.weight", "w_gate_up": "mlp.gate_up_proj.weight"},
}
# Our top-level param name -> (Hugging Face name, is a Linear weight).
_TOP_NAMES = {
    "embed": ("model.embed_tokens.weight", False),  # an Embedding: already [V, H]
    "final_norm": ("model.norm.weight", False),
    "lm_head": ("lm_head.weight", True),
}


class CheckpointError(ValueError):
    """The checkpoint's weight files are missing, unreadable, or disagree with its config."""


@dataclasses.dataclass(frozen=True)
class _TensorSource:
    """Where one of our params comes from: one HF tensor per layer (or one for top-level params)."""

    hf_names: tuple[str, ...]  # in row-major order of ``stack``
    transpose: bool  # HF Linear [out, in] -> ours [in, out]
    stack: tuple[int, ...] = ()  # ours stacks the HF tensors on these leading axes: (layers,) or (layers, experts)
    rows: Optional[tuple[int, int, int]] = None  # (start, stop, total): ours is those rows of a joined HF tensor
    columns: Optional[tuple[int, int]] = None  # (part, parts): ours is the HF tensor's last axis [part::parts]
    offset: float = 0.0  # added to the values (Gemma's norms store w - 1), which are then kept in float32

    @property
    def column_slice(self) -> slice:
        """Our part of the HF tensor's last axis (``columns``; all of it where None)."""
        return slice(self.columns[0], None, self.columns[1]) if self.columns is not None else slice(None)


def find_safetensors_files(path: str) -> list[str]:
    """The weight files of a checkpoint folder: the index's files, ``model.safetensors``, or ``model-*``."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path!r} is not a folder or does not exist")
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{INDEX_FILE} in {path!r} names weight files that are missing: {missing}")
        return [os.path.join(path, f) for f in files]
    if os.path.exists(os.path.join(path, SINGLE_FILE)):
        return [os.path.join(path, SINGLE_FILE)]
    # Only model*.safetensors: some repos also ship e.g. consolidated.safetensors (same weights, other names).
    shards = sorted(f for f in os.listdir(path) if f.startswith("model") and f.endswith(".safetensors"))
    if not shards:
        present = sorted(os.listdir(path))
        raise CheckpointError(
            f"no safetensors weights in {path!r} (expected {SINGLE_FILE} or {INDEX_FILE} with "
            f"model-*.safetensors shards); the folder holds: {present}"
        )
    return [os.path.join(path, f) for f in shards]


def _read_header(file: str) -> dict[str, dict]:
    """Parse a safetensors header: ``{name: {"dtype", "shape", "data_offsets"}}``, checked against the file size."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file} is truncated or not a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise CheckpointError(
                f"{file} is truncated or not a safetensors file: header of {header_len} bytes "
                f"does not fit in {size} bytes"
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file} is corrupt: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} is corrupt: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype = _DTYPES.get(entry["dtype"])  # another format's tag (F8_E8M0, F4, ...): an error only if read
            count = int(np.prod(entry["shape"], dtype=np.int64))
            expected = count * dtype.itemsize if dtype is not None else end - begin
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{file} is corrupt: bad header entry for tensor {name!r} ({e!r})") from None
        if end > data_size:
            raise CheckpointError(
                f"{file} is truncated: tensor {name!r} ends at byte {end} of the data section "
                f"but the file holds only {data_size} data bytes"
            )
        if end - begin != expected:
            raise CheckpointError(
                f"{file} is corrupt: tensor {name!r} has {end - begin} bytes, "
                f"expected {expected} for {entry['dtype']}{entry['shape']}"
            )
        entry["data_start"] = 8 + header_len + begin
    return header


class _Checkpoint:
    """All tensors of a checkpoint folder, as lazily mapped numpy views in the HF layout (and which names are MXFP4
    pairs, gpt-oss's experts: ``X_blocks`` and ``X_scales``, which ``mxfp4_experts`` reads)."""

    def __init__(self, files: list[str]):
        self._entries: dict[str, tuple[str, dict]] = {}
        for file in files:
            for name, entry in _read_header(file).items():
                self._entries[name] = (file, entry)
        self._maps: dict[str, np.memmap] = {}
        self._mxfp4 = {name.removesuffix("_blocks") for name in self._entries
                       if name.endswith("_blocks") and name.removesuffix("_blocks") + "_scales" in self._entries}

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def is_mxfp4(self, name: str) -> bool:
        """Whether ``name`` is stored as an MXFP4 pair (``name_blocks``, ``name_scales``)."""
        return name in self._mxfp4

    @property
    def names(self):
        return self._entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def dtype(self, name: str) -> str:
        """The safetensors dtype name (``BF16``, ``F8_E4M3``, ``I32``, ...)."""
        return self._entries[name][1]["dtype"]

    def array(self, name: str) -> np.ndarray:
        """A read-only zero-copy view of one tensor (nothing is read until it is touched)."""
        file, entry = self._entries[name]
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"tensor {name!r} in {file} has dtype {entry['dtype']}, which this loader does not "
                                  f"read (it reads {', '.join(_DTYPES)})")
        start = entry["data_start"]
        nbytes = entry["data_offsets"][1] - entry["data_offsets"][0]
        return self._maps[file][start:start + nbytes].view(dtype).reshape(entry["shape"])


def _mxfp4_codes(blocks: np.ndarray) -> np.ndarray:
    """``blocks [..., N, K / 32, 16]`` -> the e2m1 codes ``[..., N, K]`` (the low nibble first along K)."""
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)
    return codes.reshape(*blocks.shape[:-2], -1)


def mxfp4_experts(ckpt: "_Checkpoint", source: "_TensorSource", shape: tuple[int, ...]) -> Int4Weight:
    """A stack of gpt-oss's MXFP4 expert matrices (one ``*_blocks`` / ``*_scales`` pair a layer) kept 4-bit on the
    device: their e2m1 codes in the int4 layout (``pack_int4``, blocks of 32 rows), each 32 values' power of two its
    E8M0 exponent as stored (``quantization.mxfp4_weight``); ``shape`` is ours, ``[L, E, K, N]``."""
    L, E, K, N = shape
    columns = source.column_slice
    packed = np.empty((L, E, K // 2, N), np.uint8)
    scales = np.empty((L, E, K // MXFP4_GROUP, N), np.uint8)
    for layer, name in enumerate(source.hf_names):
        blocks, exponents = ckpt.array(name + "_blocks")[:, columns], ckpt.array(name + "_scales")[:, columns]
        if blocks.shape != (E, N, K // MXFP4_GROUP, MXFP4_GROUP // 2):
            raise CheckpointError(f"MXFP4 tensor {name}_blocks has shape {list(blocks.shape)} (part {columns}), but "
                                  f"the config implies {[E, N, K // MXFP4_GROUP, MXFP4_GROUP // 2]}")
        check_mxfp4_exponents(exponents, name + "_scales")
        codes = np.swapaxes(_mxfp4_codes(blocks), -1, -2)  # [E, K, N]
        packed[layer] = np.asarray(qmm.pack_int4(jnp.asarray(codes), MXFP4_GROUP))
        scales[layer] = np.swapaxes(exponents, -1, -2)
    return mxfp4_weight(packed, scales)


# Where a checkpoint keeps its decoder: ``model.`` (a causal LM), under an image-text model's
# ``language_model.model.`` (Gemma 3's published files; transformers 5's own layout ``model.language_model.``), or at
# the top (an embedding model saved as its decoder alone, e.g. Qwen3-Embedding).
_DECODER_PREFIXES = ("model.", "language_model.model.", "model.language_model.", "")  # "": a decoder saved alone


def checkpoint_tensor_names(path: str) -> set[str]:
    """The tensor names of a safetensors checkpoint folder (its headers only)."""
    return {name for file in find_safetensors_files(path) for name in _read_header(file)}


def kv_scale_names(tensor_names) -> Optional[tuple[str, str]]:
    """The names (inside a layer) of a checkpoint's K and V scales, by its tensor names; None where it has none."""
    names = [name for name in tensor_names if ".layers.0." in name or name.startswith("layers.0.")]
    return next((pair for pair in KV_SCALE_NAMES if any(name.endswith(f"layers.0.{pair[0]}") for name in names)),
                None)


def _decoder_prefix(ckpt: "_Checkpoint") -> str:
    return next((p for p in _DECODER_PREFIXES if f"{p}embed_tokens.weight" in ckpt), "model.")


def _sources(config: ModelConfig, prefix: str = "model.", kv_scales: tuple[str, str] = KV_SCALE_NAMES[0]) -> dict:
    """A pytree shaped like ``param_shapes(config)`` of the HF tensors each param is made of (the decoder's under
    ``prefix``; the K and V scales, where the config has them, named ``kv_scales``)."""
    shapes = param_shapes(config)
    L = config.num_layers
    moe = _MOE_BLOCK.get(config.model_type, "mlp")
    # our param -> (the joined HF tensor it is a part of, its FUSED_PROJECTIONS entry): the part's rows follow
    joined = {part: (hf_name, fused) for fused, hf_name in _JOINED_IN_CHECKPOINT.get(config.model_type, {}).items()
              for part in FUSED_PROJECTIONS[fused]}
    renamed = _RENAMED_IN_CHECKPOINT.get(config.model_type, {})
    stacked = _STACKED_EXPERTS.get(config.model_type, {})
    if config.shared_expert_size:
        renamed = {**renamed, **_SHARED_EXPERT}

    def per_layer(hf_name: str, transpose: bool, **fields) -> _TensorSource:
        return _TensorSource(tuple(f"{prefix}layers.{i}.{hf_name}" for i in range(L)), transpose=transpose,
                             stack=(L,), **fields)

    layers = {}
    for name in shapes["layers"]:
        if name in joined:
            hf_name, fused = joined[name]
            widths, part = fused_widths(config)[fused], FUSED_PROJECTIONS[fused].index(name)
            start = sum(widths[:part])
            layers[name] = per_layer(hf_name, True, rows=(start, start + widths[part], sum(widths)))
        elif name in stacked:
            hf_name, columns = stacked[name]
            layers[name] = per_layer(hf_name, False, columns=columns)
        elif name in _EXPERT_NAMES:
            layers[name] = _TensorSource(
                tuple(f"{prefix}layers.{i}.{moe}.experts.{e}.{_EXPERT_NAMES[name][moe]}"
                      for i in range(L) for e in range(config.num_experts)),
                transpose=True, stack=(L, config.num_experts))
        elif name in renamed:
            layers[name] = per_layer(renamed[name], not name.endswith(("norm", "_bias", "sinks")))
        elif name in KV_SCALE_PARAMS:
            layers[name] = per_layer(kv_scales[KV_SCALE_PARAMS.index(name)], False)
        else:
            hf_name, transpose = _LAYER_NAMES[name]
            layers[name] = per_layer(hf_name.replace("mlp.", f"{moe}.", 1) if name == "router" else hf_name,
                                     transpose)
    def top_name(hf_name: str) -> str:  # the decoder's under ``prefix``; lm_head stays where it is
        return prefix + hf_name.removeprefix("model.") if hf_name.startswith("model.") else hf_name

    top = {name: _TensorSource((top_name(_TOP_NAMES[name][0]),), transpose=_TOP_NAMES[name][1])
           for name in shapes if name != "layers"}
    if config.norm_weight_offset:
        for group in (top, layers):
            for name in group:
                if name.endswith("norm"):
                    group[name] = dataclasses.replace(group[name], offset=config.norm_weight_offset)
    return {**top, "layers": layers}


def _hf_shape(shape: tuple[int, ...], source: _TensorSource) -> tuple[int, ...]:
    """The shape one HF tensor must have for our param of ``shape``."""
    per_tensor = shape[len(source.stack):]
    return tuple(reversed(per_tensor)) if source.transpose else tuple(per_tensor)


def _check_tensors(ckpt: _Checkpoint, sources: dict, shapes: dict, path: str) -> None:
    """Fail before reading any data if a tensor is missing or its shape disagrees with the config."""
    for key, source in _leaves(sources):
        expected = _hf_shape(_get(shapes, key), source)
        if source.rows is not None:  # the joined tensor this param is a part of
            expected = (source.rows[2],) + expected[1:]
        if source.columns is not None:  # the interleaved tensor whose columns this param takes a part of
            expected = expected[:-1] + (expected[-1] * source.columns[1],)
        for name in source.hf_names:
            if name not in ckpt:
                base = name.removesuffix("weight")
                stored = sorted(n for n in ckpt.names if n.startswith(base))
                if stored:  # e.g. a GPTQ lm_head (lm_head: true): qweight, qzeros, scales
                    raise CheckpointError(f"checkpoint {path!r} stores {base.rstrip('.')} quantized ("
                                          f"{', '.join(stored)}); quantized weights are read only in the decoder's "
                                          "layers")
                raise CheckpointError(f"checkpoint {path!r} lacks tensor {name!r} (needed for params {'/'.join(key)})")
            if ckpt.shape(name) != expected:
                raise CheckpointError(
                    f"tensor {name!r} in {path!r} has shape {list(ckpt.shape(name))} but the config "
                    f"implies {list(expected)}"
                )


# Small dict-tree helpers instead of jax.tree_util: in param_shapes the leaves are tuples
# (pytree nodes to JAX), and a None sharding leaf is an empty subtree to JAX, not a leaf.
def _leaves(tree: dict, prefix: tuple = ()) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for k, v in tree.items():
        out.extend(_leaves(v, prefix + (k,)) if isinstance(v, dict) else [(prefix + (k,), v)])
    return out


def _get(tree: Optional[dict], key: tuple[str, ...]) -> Any:
    for k in key:
        if tree is None:
            return None
        tree = tree[k]
    return tree


def _set(tree: dict, key: tuple[str, ...], value: Any) -> None:
    for k in key[:-1]:
        tree = tree.setdefault(k, {})
    tree[key[-1]] = value


def _hf_layout_sharding(sharding: Optional[jax.sharding.Sharding], source: _TensorSource, ndim: int):
    """The sharding of the HF-layout tensor whose on-device transpose has ``sharding``."""
    if sharding is None or not source.transpose or sharding.is_fully_replicated:
        return sharding
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return NamedSharding(sharding.mesh, PartitionSpec(*spec[:-2], spec[-1], spec[-2]),
                             memory_kind=sharding.memory_kind)
    raise TypeError(f"cannot load a transposed weight onto {type(sharding).__name__}; "
                    "pass NamedSharding (or replicated / single-device) shardings")


def _read_hf_layout(ckpt: _Checkpoint, source: _TensorSource, index: tuple = ()) -> np.ndarray:
    """``[index]`` of the HF tensors stacked on ``source.stack``, as stored: no transpose, no cast.

    Copies only contiguous runs out of the memory map (a strided host transpose of a
    large matrix runs at ~0.1 GB/s; the device does it at memory speed instead).
    """
    if not source.stack:
        # A copy, never a view: on CPU, JAX may alias a host buffer, and params must not
        # hang on the file's memory map (a rewritten checkpoint would crash the process).
        return np.array(ckpt.array(source.hf_names[0])[tuple(index)])
    index = tuple(index) + (slice(None),) * (len(source.stack) - len(index))
    depth = len(source.stack)
    names = np.array(source.hf_names, dtype=object).reshape(source.stack)[index[:depth]]
    rows = slice(*source.rows[:2]) if source.rows is not None else slice(None)  # a contiguous run of HF rows

    def part(name: str) -> np.ndarray:
        return ckpt.array(name)[rows][..., source.column_slice][index[depth:]]

    first = part(names.flat[0])
    out = np.empty(names.shape + first.shape, first.dtype)
    for at, name in np.ndenumerate(names):
        out[at] = part(name)
    return out


def _to_our_layout(x: jax.Array, transpose: bool, dtype) -> jax.Array:
    return (jnp.swapaxes(x, -1, -2) if transpose else x).astype(dtype)


def _load_param(ckpt: _Checkpoint, source: _TensorSource, shape: tuple[int, ...], dtype,
                sharding: Optional[jax.sharding.Sharding]) -> jax.Array:
    """One param on its device(s): HF-layout bytes go to the device(s), which transpose and cast."""
    hf_shape = source.stack + _hf_shape(shape, source)
    hf_sharding = _hf_layout_sharding(sharding, source, len(shape))
    if hf_sharding is None:
        hf_array = jax.device_put(_read_hf_layout(ckpt, source))
    else:  # each device reads only its own slice
        hf_array = jax.make_array_from_callback(hf_shape, hf_sharding,
                                                lambda index: _read_hf_layout(ckpt, source, index))
    if source.offset:  # float32: 1 + w in the model dtype would round what the checkpoint's norm computes exactly
        return jax.jit(lambda a: a.astype(jnp.float32) + source.offset, out_shardings=sharding)(hf_array)
    if not source.transpose and hf_array.dtype == dtype:
        return hf_array
    finish = jax.jit(_to_our_layout, static_argnums=(1, 2), out_shardings=sharding)
    return finish(hf_array, source.transpose, dtype)


def _stored_unquantized(ckpt: _Checkpoint, base: str) -> bool:
    """Whether the Linear ``base`` is stored as a plain 16 / 32-bit weight."""
    return f"{base}.weight" in ckpt and ckpt.dtype(f"{base}.weight") in ("BF16", "F16", "F32")


def _quantized_weight(ckpt: _Checkpoint, source: _TensorSource, shape: tuple[int, ...],
                      quant: CheckpointQuantization, dtype, path: str, int8_layout: str = "nk"):
    """One stacked layer (or expert) matrix of an AWQ / GPTQ / FP8 / compressed-tensors checkpoint as an
    ``Int4Weight`` / ``Fp8Weight`` / int8 weight (stored by ``int8_layout``, ``INT8_LAYOUTS``) on the host,
    converted a tensor at a time from the published layout (exactly; block-wise fp8 within one rounding) into
    arrays of the whole stack. ``source`` names the dense tensors it replaces (``name.weight``); ``shape`` is ours,
    ``source.stack + (K, N)``."""
    K, N = shape[-2:]
    bases = [name.removesuffix(".weight") for name in source.hf_names]
    if source.rows is not None:
        raise CheckpointError(f"{quant.method} checkpoint {path!r}: joined projections ({bases[0]}) cannot be read "
                              "quantized")

    def tensor(base: str, suffix: str, required: bool = True) -> Optional[np.ndarray]:
        full = f"{base}.{suffix}"
        if full not in ckpt:
            if not required:
                return None
            if suffix != "weight" and _stored_unquantized(ckpt, base):
                raise CheckpointError(
                    f"{quant.format} checkpoint {path!r} stores {base} unquantized (its quantization_config leaves "
                    "it out: modules_to_not_convert, ignore or dynamic) but the same matrix of other layers "
                    "quantized; a matrix is read unquantized only where every layer has it so")
            raise CheckpointError(f"{quant.method} checkpoint {path!r} lacks tensor {full!r}")
        return np.array(ckpt.array(full))

    scale_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == jnp.bfloat16 else np.dtype(dtype)
    stacked: dict[str, np.ndarray] = {}  # each field of every tensor, filled in place (no second copy of the stack)
    for j, base in enumerate(bases):
        try:
            fields = _quantized_fields(quant, base, tensor, scale_dtype)
        except QuantizationError as e:
            raise QuantizationError(f"{quant.method} tensors of {base} in {path!r}: {e}") from None
        pack = fields.pop("pack", None)
        if "perm" in fields and "perm" not in stacked:  # act-order in some tensors: the others' rows in order
            stacked["perm"] = np.tile(np.arange(K, dtype=np.int32), (len(bases), 1))
        for k, v in fields.items():
            if k not in stacked:
                stacked[k] = np.empty((len(bases),) + v.shape, v.dtype)
            if v.shape != stacked[k].shape[1:]:
                raise CheckpointError(f"{quant.method} tensors of {base} in {path!r} unpack to {k} of shape "
                                      f"{list(v.shape)}, unlike {bases[0]}'s {list(stacked[k].shape[1:])}")
            stacked[k][j] = v
    stacked = {k: v.reshape(source.stack + v.shape[1:]) for k, v in stacked.items()}
    if quant.method == "fp8":
        weight, stored, expected = Fp8Weight(**stacked), stacked["q"].shape[len(source.stack):], (N, K)
    elif quant.method == "int8":  # experts' grouped matmul reads [K, N], the layers' GEMV [N, K] (as made at load)
        weight, stored, expected = Int8KMajorWeight(**stacked), stacked["q"].shape[len(source.stack):], (N, K)
        if int8_layout != "nk":
            weight = Int8Weight(q=np.ascontiguousarray(np.swapaxes(weight.q, -1, -2)), scale=weight.scale)
    else:
        weight = Int4Weight(**stacked, group_size=quant.group_size if quant.group_size > 0 else K, pack=pack)
        stored, expected = stacked["packed"].shape[len(source.stack):], (K // 2, N)
    if stored != expected:
        pattern = bases[0].replace(".0.", ".*.")
        raise CheckpointError(f"{quant.method} tensors of {pattern} in {path!r} unpack to {list(stored)} but the "
                              f"config implies {list(expected)}")
    return weight


def _quantized_fields(quant, base: str, tensor, scale_dtype) -> dict:
    """The fields of one quantized weight ``base`` (``tensor(base, suffix)`` reads its checkpoint tensors)."""
    if quant.checkpoint_format == "compressed-tensors" and not quant.packed:
        fields = int8_from_checkpoint(tensor(base, "weight"), tensor(base, "weight_scale"))
    elif quant.checkpoint_format == "compressed-tensors" and quant.method in ("int4", "int8"):
        stored_shape = tensor(base, "weight_shape")  # [N, K]: the packed rows may carry padding
        if quant.method == "int8":
            fields = packed_to_int8(tensor(base, "weight_packed"), tensor(base, "weight_scale"),
                                    int(stored_shape[1]))
        else:
            fields = packed_to_int4(tensor(base, "weight_packed"), tensor(base, "weight_scale"),
                                    tensor(base, "weight_zero_point", required=not quant.symmetric),
                                    tensor(base, "weight_g_idx", required=False), int(stored_shape[1]),
                                    dtype=scale_dtype)
    elif quant.method == "awq":
        fields = awq_to_int4(tensor(base, "qweight"), tensor(base, "qzeros"), tensor(base, "scales"),
                             quant.group_size, dtype=scale_dtype)
    elif quant.format == "gptq" and quant.method == "int8":
        fields = gptq8_to_int8(tensor(base, "qweight"), tensor(base, "qzeros"), tensor(base, "scales"),
                               tensor(base, "g_idx", required=False), quant.group_size, zero_offset=quant.zero_offset)
    elif quant.method == "gptq":
        fields = gptq_to_int4(tensor(base, "qweight"), tensor(base, "qzeros"), tensor(base, "scales"),
                              tensor(base, "g_idx", required=False), quant.group_size,
                              zero_offset=quant.zero_offset, bits=quant.bits, dtype=scale_dtype)
    else:
        # block-wise checkpoints (DeepSeek's layout) name the scale weight_scale_inv; it multiplies all the same
        scale = tensor(base, "weight_scale", required=quant.block is None)
        fields = fp8_from_checkpoint(tensor(base, "weight"),
                                     scale if scale is not None else tensor(base, "weight_scale_inv"), quant.block)
    return fields


def _scales(ckpt: _Checkpoint, source: _TensorSource, path: str) -> np.ndarray:
    """float32 ``[L]``: one number from each of ``source``'s tensors (a per-tensor scale, stored as [] or [1])."""
    for name in source.hf_names:
        if name not in ckpt or int(np.prod(ckpt.shape(name))) != 1:
            raise CheckpointError(f"checkpoint {path!r} has {'no' if name not in ckpt else 'a non-scalar'} "
                                  f"tensor {name!r}; its KV scales need one number in every layer")
    return np.array([np.asarray(ckpt.array(name), np.float32).reshape(()) for name in source.hf_names])


def load_safetensors_params(path: str, config: ModelConfig, dtype, shardings: Optional[dict] = None,
                            progress: bool = True, quantization: Optional[CheckpointQuantization] = None) -> dict:
    """Load the safetensors checkpoint folder ``path`` as params for ``config``, cast to ``dtype``.

    ``shardings``: optional pytree shaped like ``param_shapes(config)`` of
    ``jax.sharding.Sharding`` (a leaf may be None = default device); weights that are
    transposed need a ``NamedSharding`` (or a replicated / single-device one). Each
    device reads only its own slice. Raises ``CheckpointError`` for missing or corrupt
    files, missing tensors and shapes that disagree with ``config``. ``lm_head.weight``
    is ignored when the config ties embeddings. ``quantization``: the checkpoint's own
    (AWQ / GPTQ / FP8 / compressed-tensors) layout of the layer matrices, which load as quantized weights.
    """
    dtype = jnp.dtype(dtype)
    ckpt = _Checkpoint(find_safetensors_files(path))
    shapes = param_shapes(config)
    sources = _sources(config, _decoder_prefix(ckpt), kv_scale_names(ckpt.names) or KV_SCALE_NAMES[0])
    # A matrix the checkpoint leaves unquantized in every layer (its modules_to_not_convert, ignore or dynamic) loads
    # as a plain weight beside the quantized ones; left out in some layers only, it is refused (``_quantized_weight``).
    quantized = {} if quantization is None or quantization.method == "mxfp4" else {
        name: sources["layers"].pop(name) for name in QUANTIZED_LAYER_WEIGHTS + QUANTIZED_EXPERT_WEIGHTS
        if name in sources["layers"] and not all(_stored_unquantized(ckpt, hf_name.removesuffix(".weight"))
                                                 for hf_name in sources["layers"][name].hf_names)}
    kv_scales = {name: sources["layers"].pop(name) for name in KV_SCALE_PARAMS if name in sources["layers"]}
    # gpt-oss's MXFP4 experts stay 4-bit (whatever quantization= makes of the other matrices)
    mxfp4 = {name: sources["layers"].pop(name) for name in QUANTIZED_EXPERT_WEIGHTS
             if name in sources["layers"] and ckpt.is_mxfp4(sources["layers"][name].hf_names[0])}
    _check_tensors(ckpt, sources, shapes, path)
    params: dict = {}
    leaves = _leaves(sources)
    total = sum(len(s.hf_names) for _, s in leaves + list(quantized.items()) + list(mxfp4.items()))
    for name, source in kv_scales.items():
        _set(params, ("layers", name), jax.device_put(_scales(ckpt, source, path), _get(shardings, ("layers", name))))
    with tqdm(total=total, unit="tensor", desc="Loading safetensors", disable=not progress) as bar:
        for key, source in leaves:
            _set(params, key, _load_param(ckpt, source, _get(shapes, key), dtype, _get(shardings, key)))
            bar.update(len(source.hf_names))
        for name, source in list(quantized.items()) + list(mxfp4.items()):
            weight = (mxfp4_experts(ckpt, source, shapes["layers"][name]) if name in mxfp4 else
                      _quantized_weight(ckpt, source, shapes["layers"][name], quantization, dtype, path,
                                        int8_layout_of(name)))
            sharding = _get(shardings, ("layers", name))
            params["layers"][name] = (jax.device_put(weight) if sharding is None
                                      else jax.device_put(weight, field_shardings(weight, sharding)))
            bar.update(len(source.hf_names))
    return params
