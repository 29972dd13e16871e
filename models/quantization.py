"""Weight quantization: the quantized weight types, making them, reading AWQ/GPTQ/FP8 layouts, ``linear``.

Owns what a quantized weight is on the device, how a dense weight becomes one
(``quantize_weight``, on device, at load time), how the published 4-bit and FP8
checkpoint layouts convert to it (``awq_to_int4``, ``gptq_to_int4``, ``fp8_from_checkpoint``,
``packed_to_int4`` / ``packed_to_int8``: numpy, per tensor, exact), and the one function the model multiplies by
(``linear``). Knows nothing of requests, file formats or meshes.

Methods (``quantization=`` on ``LLM``, vLLM's names where vLLM has them):

- ``int8``: weight-only, symmetric, one scale per output channel, made at load time.
- ``int4``: weight-only, asymmetric 4-bit with groups of 128 (round-to-nearest), made at
  load time; the same device format as AWQ/GPTQ.
- ``awq`` / ``gptq``: 4-bit checkpoints in those layouts (packed int32 ``qweight``/``qzeros``,
  group ``scales``, GPTQ ``g_idx``, act-order included), kept 4-bit on the device; 2- and 3-bit GPTQ run as
  int4 (the same values), 8-bit GPTQ as int8 with channel scales.
- ``fp8``: float8 e4m3 weights with a scale per output channel (made at load time, or read
  from an FP8 checkpoint's ``weight_scale``: per tensor, per channel, or block-wise re-quantized per channel);
  activations are quantized per token at run time and the matmul runs on fp8 tensor cores (Hopper).
- ``compressed-tensors``: llm-compressor's checkpoints, read as the method they hold: fp8 weights, or int4 /
  int8 weights packed in int32 (``pack-quantized``: W4A16 with group or channel scales, symmetric or with zero
  points; W8A16 with channel scales), which run as ``int4`` / ``int8``.

The seven matrices of each layer are quantized, and with int8 the LM head too (``int8_lm_head``: an int8
copy ``[V, H]`` beside a tied embedding, which stays in the model dtype for the token lookup). Every weight
keeps the ``[..., K, N]`` contract of the dense model (``x @ W``); a leading layer axis is allowed on every field.

Speed: at small batches a step reads every weight once. For int4 weights ``linear`` then
runs the Pallas weight-streaming kernel (``pallas_kernels.quantized_matmul``), which reads the
packed bytes and dequantizes in registers, where XLA would first write a dequantized copy;
int8 and fp8 go to XLA, which fuses the int8 convert into its dot and has fp8 tensor-core
dots (``LinearBackend`` says what was measured); between an fp8 MLP's matmuls one Pallas kernel scales, gates and
re-quantizes the rows (``fp8_gated_mlp``). At large batches every format dequantizes
and calls XLA's matmul, then bound by arithmetic, not bytes. Under a tensor-parallel mesh the
kernel is not used (GSPMD cannot partition a Pallas call; the XLA path is partitioned as usual).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from models.config import QUANTIZATION_METHODS, quantization_method
from models.norm import DeferredNorm
from pallas_kernels import fp8_activation
from pallas_kernels import quantized_matmul as qmm
from pallas_kernels.fp8_activation import FP8_MAX, quantize_rows_fp8

logger = logging.getLogger(__name__)

QUANTIZED_LAYER_WEIGHTS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
# A mixture of experts' quantized weights (``[..., E, K, N]`` for the grouped matmul: Int8Weight, Int4Weight, or
# Fp8Weight's K-major ``[..., E, N, K]``); its router stays in the model dtype.
QUANTIZED_EXPERT_WEIGHTS = ("expert_gate", "expert_up", "expert_down")
INT4_GROUP_SIZE = 128  # group size of the load-time int4 method (and of dummy AWQ/GPTQ weights)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ int32 holds column AWQ_ORDER[i] of its 8


class QuantizationError(ValueError):
    """A quantization method or checkpoint layout that cannot be used as asked."""


# --------------------------------------------------------------------------------------
# Weight types (pytrees: arrays are leaves, layout facts are static)
# --------------------------------------------------------------------------------------


@struct.dataclass
class Int8Weight:
    """``W[K, N] = q * scale``: ``q`` int8 ``[..., K, N]``, ``scale`` float32 ``[..., N]``."""

    q: jax.Array
    scale: jax.Array

    # Axis of each field that runs over K (input) and N (output), counted from the end.
    in_axes = {"q": -2, "scale": None}
    out_axes = {"q": -1, "scale": -1}


@struct.dataclass
class Int8KMajorWeight:
    """``W[K, N] = (q * scale[:, None]).T``: ``q`` int8 ``[..., N, K]`` (K-major), ``scale`` float32 ``[..., N]``.
    The layout the K-major one-row GEMV reads (``pallas_kernels.quantized_matmul.int8_kmajor_matmul``); made by
    ``quantization="int8"`` by default (``$PAGEDJAX_INT8_LAYOUT``). Run 23b (H200, 8B at batch 1, same lease): TPOT
    3.54 ms with ``Int8Weight`` and its GEMV -> 3.11 with this layout's GEMV (``kmajor_block_k`` 256 x
    ``kmajor_block_n`` 16; 3.14 at 128 x 32, 4.52 at 64 x 64). ``gate_up_group``: 0, or a gated MLP's joined
    ``[gate | up]`` weight stored with its gate and up rows in turn, that many of each (``interleave_gate_up``), for
    the one-row GEMV that writes ``silu(gate) * up``; ``linear``'s output is ``[gate | up]`` all the same."""

    q: jax.Array
    scale: jax.Array
    gate_up_group: int = struct.field(pytree_node=False, default=0)

    in_axes = {"q": -1, "scale": None}
    out_axes = {"q": -2, "scale": -1}


@struct.dataclass
class Int4Weight:
    """4-bit weight in the kernel's block-packed layout (``pallas_kernels.quantized_matmul``).

    ``packed`` uint8 ``[..., K/2, N]``; ``scales``, ``zeros`` ``[..., K/g, N]`` (zeros may be
    fractional); ``perm`` int32 ``[..., K]`` or None: GPTQ act-order, the rows are stored
    sorted by group and ``x @ W == x[:, perm] @ W_stored``. ``codes``: the nibbles are unsigned
    integers ("uint4"), or FP4 e2m1 values ("e2m1": gpt-oss's MXFP4 experts; ``scales`` the groups'
    powers of two as uint8 E8M0 exponents, as the checkpoints store them, and ``zeros`` None; only
    as experts, ``models.moe``).
    """

    packed: jax.Array
    scales: jax.Array
    zeros: Optional[jax.Array]
    perm: Optional[jax.Array] = None
    group_size: int = struct.field(pytree_node=False, default=INT4_GROUP_SIZE)
    pack: int = struct.field(pytree_node=False, default=128)
    codes: str = struct.field(pytree_node=False, default="uint4")

    in_axes = {"packed": -2, "scales": -2, "zeros": -2, "perm": -1}
    out_axes = {"packed": -1, "scales": -1, "zeros": -1, "perm": None}


@struct.dataclass
class Fp8Weight:
    """``W[K, N] = (q * scale[:, None]).T``: ``q`` float8 e4m3 ``[..., N, K]`` (K-major, as
    the fp8 tensor cores need), ``scale`` float32 ``[..., N]``."""

    q: jax.Array
    scale: jax.Array

    in_axes = {"q": -1, "scale": None}
    out_axes = {"q": -2, "scale": -1}


QUANTIZED_WEIGHT_TYPES = (Int8Weight, Int8KMajorWeight, Int4Weight, Fp8Weight)


def is_quantized(w: Any) -> bool:
    return isinstance(w, QUANTIZED_WEIGHT_TYPES)


def weight_fields(w) -> dict[str, jax.Array]:
    """The array fields of a quantized weight (None fields left out)."""
    return {f.name: getattr(w, f.name) for f in dataclasses.fields(w)
            if f.metadata.get("pytree_node", True) and getattr(w, f.name) is not None}


def map_output_axis(w, fn):
    """Apply ``fn(array, axis)`` to every field of ``w`` along its output axis (N); fields
    without one are kept. For dense arrays the output axis is the last."""
    if not is_quantized(w):
        return fn(w, -1)
    changes = {name: fn(a, w.out_axes[name]) for name, a in weight_fields(w).items()
               if w.out_axes[name] is not None}
    return w.replace(**changes)


def concat_outputs(weights: list) -> Optional[Any]:
    """One weight whose output columns are those of ``weights`` side by side (``x @ W`` is the
    outputs of each ``x @ w`` concatenated), or None where they cannot be joined: mixed types or
    layouts, or act-order int4 weights (each multiplies its own permutation of ``x``)."""
    first = weights[0]
    if any(type(w) is not type(first) for w in weights):
        return None
    if not is_quantized(first):
        return jnp.concatenate(weights, axis=-1)
    if isinstance(first, Int4Weight) and (any(w.perm is not None for w in weights)
                                          or any((w.group_size, w.pack, w.codes) != (first.group_size, first.pack,
                                                                                     first.codes) for w in weights)):
        return None
    return first.replace(**{name: jnp.concatenate([getattr(w, name) for w in weights], axis=first.out_axes[name])
                            for name in weight_fields(first)})


def interleave_gate_up(w):
    """A gated MLP's joined ``[gate | up]`` weight as the one-row gated GEMV reads it (``Int8KMajorWeight``'s
    ``gate_up_group``: ``qmm.GATE_UP_GROUP`` rows of each in turn); any other weight, or with
    ``$PAGEDJAX_GATED_GEMV=0``, as it is."""
    if (not isinstance(w, Int8KMajorWeight) or w.gate_up_group or os.environ.get("PAGEDJAX_GATED_GEMV", "1") == "0"
            or _output_size(w) % (2 * qmm.GATE_UP_GROUP)):
        return w
    group = qmm.GATE_UP_GROUP
    return map_output_axis(w, lambda a, axis: qmm.interleave_halves(a, group, axis)).replace(gate_up_group=group)


# --------------------------------------------------------------------------------------
# Making quantized weights from dense ones (on device; stacked layers allowed)
# --------------------------------------------------------------------------------------


def _per_channel_scaled(w: jax.Array, largest: float, xp=jnp) -> tuple[jax.Array, jax.Array]:
    """``(w / scale, scale)`` in float32, ``scale[..., N]`` mapping each output column's largest
    magnitude to ``largest`` (1 for an all-zero column). ``xp``: ``jnp``, or ``np`` for a host array."""
    w32 = w.astype(xp.float32)
    scale = xp.max(xp.abs(w32), axis=-2) / xp.float32(largest)
    scale = xp.where(scale > 0, scale, xp.float32(1.0))
    return w32 / scale[..., None, :], scale


def _choice_from_env(variable: str, choices: tuple[str, ...]) -> str:
    """``$variable`` (case and surrounding spaces ignored), one of ``choices``; unset or empty: ``choices[0]``."""
    value = os.environ.get(variable, "").strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"{variable} must be one of {choices}, got {value!r}")
    return value


INT8_LAYOUTS = ("nk", "kn")  # q stored [N, K] (Int8KMajorWeight; the default since run 23b), or [K, N] (Int8Weight)


def int8_layout_from_env() -> str:
    """``$PAGEDJAX_INT8_LAYOUT`` (``INT8_LAYOUTS``; default "nk"): how load-time int8 weights are stored."""
    return _choice_from_env("PAGEDJAX_INT8_LAYOUT", INT8_LAYOUTS)


def int8_layout_of(name: str) -> str:
    """How the int8 weight of layer param ``name`` is stored (``INT8_LAYOUTS``): experts ``[K, N]``, as the grouped
    matmul reads them; the layers' matrices as ``$PAGEDJAX_INT8_LAYOUT`` says."""
    return "kn" if name in QUANTIZED_EXPERT_WEIGHTS else int8_layout_from_env()


def quantize_int8(w: jax.Array, layout: str = "kn"):
    scaled, scale = _per_channel_scaled(w, 127.0)
    q = jnp.clip(jnp.round(scaled), -127, 127).astype(jnp.int8)
    if layout == "nk":
        return Int8KMajorWeight(q=jnp.swapaxes(q, -1, -2), scale=scale)
    return Int8Weight(q=q, scale=scale)


def quantize_fp8(w: jax.Array) -> Fp8Weight:
    scaled, scale = _per_channel_scaled(w, FP8_MAX)
    return Fp8Weight(q=jnp.swapaxes(scaled.astype(jnp.float8_e4m3fn), -1, -2), scale=scale)


def quantize_int4(w: jax.Array, group_size: int = INT4_GROUP_SIZE, dtype=None) -> Int4Weight:
    """Asymmetric round-to-nearest 4-bit with groups of ``group_size`` rows (min/max per group); where K is no
    multiple of it, the groups are the largest of its halves (down to 32 rows) that divide K (SmolLM2-135M's 576:
    64)."""
    *lead, K, N = w.shape
    dtype = dtype or w.dtype
    g = min(group_size, K)
    while K % g and g > 32 and g % 2 == 0:
        g //= 2
    if K % g:
        raise QuantizationError(f"int4 quantization needs a matrix's input size to be a multiple of 32 rows, got "
                                f"{K} (a [{K}, {N}] weight)")
    pack = qmm.int4_pack_block(K, g)
    w32 = w.astype(jnp.float32).reshape(*lead, K // g, g, N)
    lo, hi = w32.min(axis=-2), w32.max(axis=-2)
    scale = jnp.where(hi > lo, (hi - lo) / 15.0, 1.0)
    zero = jnp.clip(jnp.round(-lo / scale), 0, 15)
    q = jnp.clip(jnp.round(w32 / scale[..., None, :]) + zero[..., None, :], 0, 15).reshape(*lead, K, N)
    return Int4Weight(packed=qmm.pack_int4(q, pack), scales=scale.astype(dtype), zeros=zero.astype(dtype),
                      group_size=g, pack=pack)


MXFP4_GROUP = 32  # values a power-of-two scale covers (OCP microscaling)
_E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # FP4 e2m1 codes 0-7 (8-15: their negatives)


def quantize_mxfp4(w: jax.Array) -> Int4Weight:
    """MXFP4 (gpt-oss's experts' format) made of a dense ``[..., K, N]`` weight: each 32 rows of a column scaled by
    the power of two that brings their largest magnitude to at most 6, each value rounded to the nearest FP4 e2m1
    code, a tie to the even one (``mxfp4_weight``)."""
    *lead, K, N = w.shape
    if K % MXFP4_GROUP:
        raise QuantizationError(f"mxfp4 needs a matrix's input size to be a multiple of {MXFP4_GROUP}, got {K}")
    w32 = w.astype(jnp.float32).reshape(*lead, K // MXFP4_GROUP, MXFP4_GROUP, N)
    amax = jnp.abs(w32).max(axis=-2)
    exponent = jnp.clip(jnp.ceil(jnp.log2(jnp.where(amax > 0, amax / 6.0, 1.0))), -127, qmm.MXFP4_MAX_EXPONENT - 127)
    v = w32 / jnp.exp2(exponent)[..., None, :]
    error = jnp.abs(jnp.abs(v)[..., None] - jnp.asarray(_E2M1_MAGNITUDES))
    nearest = error == error.min(axis=-1, keepdims=True)  # two where a value lies halfway: one of them even
    magnitude = jnp.argmax(jnp.where(nearest & (jnp.arange(8) % 2 == 0), 2, nearest), axis=-1)
    codes = (magnitude + 8 * (v < 0)).astype(jnp.uint8).reshape(*lead, K, N)
    return mxfp4_weight(qmm.pack_int4(codes, MXFP4_GROUP), (exponent + 127).astype(jnp.uint8))


def check_mxfp4_exponents(exponents: np.ndarray, name: str) -> None:
    """Refuse a checkpoint's E8M0 exponents (``name``'s) above what the kernels take (``MXFP4_MAX_EXPONENT``)."""
    if exponents.max(initial=0) > qmm.MXFP4_MAX_EXPONENT:
        raise QuantizationError(f"MXFP4 tensor {name} holds exponent {exponents.max()} (a scale of 2^"
                                f"{int(exponents.max()) - 127}); the kernels take at most {qmm.MXFP4_MAX_EXPONENT} "
                                f"(2^{qmm.MXFP4_MAX_EXPONENT - 127})")


def mxfp4_weight(packed, exponents) -> Int4Weight:
    """MXFP4 as the int4 kernels take it: ``packed`` e2m1 codes (``pack_int4`` in blocks of ``MXFP4_GROUP`` rows),
    ``exponents`` each group's power of two as uint8 E8M0 (``2 ** (e - 127)``), no zeros (numpy or JAX arrays)."""
    return Int4Weight(packed=packed, scales=exponents, zeros=None, group_size=MXFP4_GROUP, pack=MXFP4_GROUP,
                      codes="e2m1")


def quantize_weight(w: jax.Array, method: str, int8_layout: str = "kn"):
    """The load-time quantization of one dense ``[..., K, N]`` weight by ``method`` (int8 stored by ``int8_layout``,
    ``INT8_LAYOUTS``)."""
    if method == "int8":
        return quantize_int8(w, int8_layout)
    if method == "fp8":
        return quantize_fp8(w)
    if method in ("int4", "awq", "gptq"):  # awq/gptq here only for random (dummy) weights
        return quantize_int4(w)
    if method == "mxfp4":
        return quantize_mxfp4(w)
    raise QuantizationError(f"unknown quantization method {method!r}; choose one of {', '.join(QUANTIZATION_METHODS)}")


def dequantize(w, dtype=jnp.float32) -> jax.Array:
    """The dense ``[..., K, N]`` weight ``w`` stands for (exact for the stored values)."""
    if isinstance(w, Int8Weight):
        return (w.q.astype(jnp.float32) * w.scale[..., None, :]).astype(dtype)
    if isinstance(w, (Fp8Weight, Int8KMajorWeight)):
        dense = jnp.swapaxes(w.q.astype(jnp.float32) * w.scale[..., :, None], -1, -2).astype(dtype)
        group = getattr(w, "gate_up_group", 0)
        return qmm.deinterleave_halves(dense, group) if group else dense
    if isinstance(w, Int4Weight):
        stored = qmm.dequantize_int4(w.packed, w.scales, w.zeros, group_size=w.group_size, pack=w.pack,
                                     codes=w.codes)
        if w.perm is not None:  # stored rows are W[perm]: put them back
            inverse = jnp.argsort(w.perm, axis=-1)
            stored = jnp.take_along_axis(stored, inverse[..., :, None], axis=-2)
        return stored.astype(dtype)
    return w.astype(dtype)


def field_shardings(w, sharding):
    """Shardings for the fields of quantized weight ``w`` (or its ``jax.eval_shape``) from the
    sharding of the dense ``[..., K, N]`` weight it replaces: each field is split the way its
    K and N axes were (scales of a row-parallel weight follow K, a column-parallel one N)."""
    if not is_quantized(w):
        return sharding
    if not isinstance(sharding, NamedSharding):
        return w.replace(**{name: sharding for name in weight_fields(w)})
    fields = weight_fields(w)
    lead_ndim = stored_array(w).ndim - 2  # the [K, N]-like field
    spec = tuple(sharding.spec) + (None,) * (lead_ndim + 2 - len(sharding.spec))
    lead, k_axis, n_axis = spec[:-2], spec[-2], spec[-1]
    if k_axis is not None and getattr(w, "perm", None) is not None:
        # act-order rows are stored sorted by group: a device's share of K would hold rows of any group, so a
        # row-parallel act-order weight stays whole on every device (its input gathered, its output whole there)
        k_axis = None
    changes = {}
    for name, a in fields.items():
        parts = [None] * (a.ndim - len(lead))
        for axis, mesh_axis in ((w.in_axes[name], k_axis), (w.out_axes[name], n_axis)):
            if axis is not None and a.shape[axis] % _mesh_size(sharding.mesh, mesh_axis) == 0:
                parts[axis] = mesh_axis  # else replicated: e.g. fewer groups of K than devices
        changes[name] = NamedSharding(sharding.mesh, PartitionSpec(*lead, *parts), memory_kind=sharding.memory_kind)
    return w.replace(**changes)


def _mesh_size(mesh, axis) -> int:
    names = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
    return int(np.prod([mesh.shape[n] for n in names], dtype=np.int64))


def quantize_params(params: dict, method: str, shardings: Optional[dict] = None) -> dict:
    """Quantize the layer matrices of a dense params pytree one at a time, in place: ``params``
    is taken over (its ``layers`` dict is updated), so each dense tensor is dropped as soon as
    its quantized form exists and the peak is the dense model plus one quantized tensor. Then the
    LM head where ``int8_lm_head(method)`` says so (``quantize_lm_head``).
    ``shardings``: the dense params' shardings (a pytree like ``params``) or None."""
    layers = params["layers"]
    # mxfp4 quantizes a mixture's experts only (gpt-oss's published form), and leaves any read 4-bit as they are
    names = QUANTIZED_EXPERT_WEIGHTS if method == "mxfp4" else QUANTIZED_LAYER_WEIGHTS + QUANTIZED_EXPERT_WEIGHTS
    if method == "mxfp4" and not any(name in layers for name in names):
        raise QuantizationError("quantization='mxfp4' makes a mixture of experts' experts 4-bit; this model has none "
                                "(for its layers use 'int8', 'int4' or 'fp8')")
    for name in names:
        if name not in layers or is_quantized(layers[name]):  # a mixture has no dense MLP, a dense model no experts
            continue
        dense = layers.pop(name)
        layers[name] = _quantize_placed(dense, method, None if shardings is None else shardings["layers"][name],
                                        int8_layout_of(name))
        del dense
    if int8_lm_head(method):
        quantize_lm_head(params, shardings)
    return params


# A stacked weight larger than this is quantized a slice of its leading axis at a time: quantizing computes in
# float32, so Qwen3-30B-A3B's expert_gate ([48, 128, 2048, 768], 19 GB in bf16) whole would need 39 GB more
# beside its 61 GB of weights.
QUANTIZE_SLICE_BYTES = 1 << 30


def _quantize_placed(dense: jax.Array, method: str, sharding=None, int8_layout: Optional[str] = None):
    """``quantize_weight(dense, method)`` (int8 laid out by ``int8_layout``, else ``$PAGEDJAX_INT8_LAYOUT``), its
    fields placed as the dense weight's ``sharding`` says (``field_shardings``; None: where the computation puts
    them). A large stacked weight goes a slice of layers at a time into the result's buffers, updated in place
    (the same values: every scale is per ``[K, N]`` matrix)."""
    layout = int8_layout or int8_layout_from_env()
    shapes = jax.eval_shape(_quantizer(method, None, layout), dense)
    out = None if sharding is None else field_shardings(shapes, sharding)
    rows = dense.shape[0]
    step = max((d for d in range(1, rows + 1) if rows % d == 0 and d * dense.nbytes <= QUANTIZE_SLICE_BYTES * rows),
               default=1)
    if dense.ndim < 3 or step == rows:
        return _quantizer(method, out, layout)(dense)
    result = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes), out_shardings=out)()
    write = _slice_quantizer(method, out, layout, step)
    for start in range(0, rows, step):
        result = write(result, dense, np.int32(start))
    return result


@functools.lru_cache(maxsize=None)
def _slice_quantizer(method: str, out_shardings, int8_layout: str, step: int):
    """``result`` with rows ``[start, start + step)`` of its every field quantized from ``dense``'s (donated: in
    place)."""

    def write(result, dense, start):
        part = quantize_weight(jax.lax.dynamic_slice_in_dim(dense, start, step, 0), method, int8_layout)
        return jax.tree.map(lambda whole, rows: jax.lax.dynamic_update_slice_in_dim(whole, rows, start, 0),
                            result, part)

    return jax.jit(write, donate_argnums=(0,), out_shardings=out_shardings,
                   compiler_options=QUANTIZER_COMPILER_OPTIONS)


INT8_LM_HEAD_CHOICES = ("1", "0")


def int8_lm_head(method: Optional[str], made_at_load: bool = True) -> bool:
    """Whether a model whose layers are quantized by ``method`` gets an int8 LM head at load time
    (``quantize_lm_head``): ``$PAGEDJAX_INT8_LM_HEAD`` "1" or "0"; unset, "1" for int8 made at load time and "0"
    otherwise (int4, awq, gptq, fp8 and a quantized checkpoint's int8 may opt in: the head is made the same way
    whatever the layers are; a checkpoint's head stays as its maker stored it); never for an unquantized model.

    Why: a decode step reads the whole head, and at batch 1 the 8B model's bf16 head (128256 x 4096, 1.05 GB)
    was ~8% of the int8 step; int8 halves its bytes. Weight-only 8-bit with one scale per vocab row (per
    output channel, as the layers' int8) is the precision llama.cpp's Q8_0 files keep the output matrix in
    (there a scale per 32 values)."""
    if method is None:
        return False
    choices = INT8_LM_HEAD_CHOICES if method == "int8" and made_at_load else INT8_LM_HEAD_CHOICES[::-1]  # first: default
    return _choice_from_env("PAGEDJAX_INT8_LM_HEAD", choices) == "1"


def quantize_lm_head(params: dict, shardings: Optional[dict] = None) -> dict:
    """The LM head of a dense-headed params pytree made int8, in place, as ``quantize_params`` makes the layers'
    int8 weights (K-major ``[V, H]`` with a scale per vocab row by default): an untied ``lm_head [H, V]`` is
    replaced; a tied model keeps ``embed`` for the token lookup and gets its int8 transpose as ``lm_head``
    (the forward reads ``lm_head`` whenever it is present). Placed like the dense head under ``shardings``:
    the tied head like the embedding with its axes swapped (vocab-parallel stays vocab-parallel). No-op for
    params without a head or with one quantized already."""
    if "lm_head" in params:
        if is_quantized(params["lm_head"]):
            return params
        dense = params.pop("lm_head")
        sharding = None if shardings is None else shardings["lm_head"]
    elif "embed" in params:
        dense = params["embed"].T
        sharding = None if shardings is None else _transposed(shardings["embed"])
    else:
        return params
    params["lm_head"] = _quantize_placed(dense, "int8", sharding)
    return params


def _transposed(sharding):
    """The sharding of a 2-D array's transpose."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[::-1]), memory_kind=sharding.memory_kind)


# XLA options of the load-time quantize programs: no autotuning. Each runs once per weight, so the kernel XLA's
# heuristic picks costs at most a fraction of a second, where autotuning candidates on the stacked [32, K, N]
# weights made each fp8 quantizer take 4-7 s to compile on an H200 (28.2 s for four, run 15b; 48.1 s in 19b).
QUANTIZER_COMPILER_OPTIONS = {"xla_gpu_autotune_level": 0}


@functools.lru_cache(maxsize=None)
def _quantizer(method: str, out_shardings=None, int8_layout: str = "kn"):
    """One jitted ``quantize_weight`` per method, output sharding and int8 layout, so weights of one shape (k and v
    projections, gate and up) share a compile (``QUANTIZER_COMPILER_OPTIONS``: without autotuning each
    compiles in a fraction of a second, so compiling them several at once gained nothing, run 19b)."""
    return jax.jit(functools.partial(quantize_weight, method=method, int8_layout=int8_layout),
                   out_shardings=out_shardings, compiler_options=QUANTIZER_COMPILER_OPTIONS)


# --------------------------------------------------------------------------------------
# Which method a checkpoint was quantized with, and which one to run
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointQuantization:
    """How a checkpoint's layer matrices are stored (from ``config.json``'s ``quantization_config``,
    or AutoGPTQ's ``quantize_config.json``)."""

    # what runs: "awq" | "gptq" | "fp8" | "mxfp4" (gpt-oss's experts), or for compressed-tensors' packed weights
    # "int4" | "int8"
    method: str
    group_size: int = -1  # 4-bit methods; -1: one group over all of K
    zero_offset: int = 0  # gptq v1 checkpoints store zero - 1
    block: Optional[tuple[int, int]] = None  # block-wise fp8: rows x columns of [N, K] a scale covers
    checkpoint_format: str = ""  # "compressed-tensors", "gptq" (8-bit, run as int8), or "" where it is the method's own
    symmetric: bool = True  # compressed-tensors' packed weights: no zero points stored
    bits: int = 4  # GPTQ's 2- and 3-bit checkpoints run as int4 (their values unchanged)
    packed: bool = True  # compressed-tensors' int8: packed in int32 (pack-quantized), or plain int8 (int-quantized)

    @property
    def format(self) -> str:
        """The checkpoint's ``quant_method``: the name ``quantization=`` may give besides ``method``."""
        return self.checkpoint_format or self.method

    @classmethod
    def from_hf_dict(cls, q: dict) -> "CheckpointQuantization":
        method = str(q.get("quant_method", "")).lower()
        bits = q.get("bits", q.get("w_bit", 4))
        if method == "gptq" and bits == 8:  # Qwen's GPTQ-Int8 checkpoints, say: run as int8 with channel scales
            group = int(q.get("group_size", -1))
            offset = 1 if q.get("checkpoint_format", "gptq") != "gptq_v2" else 0
            return cls("int8", group, offset, checkpoint_format="gptq")
        if method in ("awq", "gptq"):
            if bits != 4 and not (method == "gptq" and bits in (2, 3)):
                hint = "" if isinstance(bits, int) else "; bits must be an integer"
                raise QuantizationError(f"{method} checkpoints with bits={bits!r} are not supported (4-bit AWQ; 2-, "
                                        f"3-, 4- and 8-bit GPTQ{hint})")
            if method == "awq" and str(q.get("version", "gemm")).lower() != "gemm":
                raise QuantizationError(f"awq version {q.get('version')!r} is not supported (only the 'gemm' layout)")
            if method == "awq" and not q.get("zero_point", True):
                raise QuantizationError("awq checkpoints without zero points are not supported")
            group = int(q.get("group_size", q.get("q_group_size", -1)))
            offset = 1 if method == "gptq" and q.get("checkpoint_format", "gptq") != "gptq_v2" else 0
            return cls(method, group, offset, bits=int(bits))
        if method == "fp8":
            block = q.get("weight_block_size")
            if block and (len(block) != 2 or min(block) < 1):
                raise QuantizationError(f"fp8 weight_block_size={block} is not [rows, columns]")
            if q.get("activation_scheme") == "static":
                logger.info("an fp8 checkpoint with static activation scales: activations are scaled per token "
                            "as they come (its input_scale tensors are not read)")
            return cls("fp8", block=tuple(int(b) for b in block) if block else None)
        if method == "compressed-tensors":
            return cls._compressed_tensors(q)
        raise QuantizationError(f"unsupported checkpoint quantization {method or q!r}; "
                                "supported checkpoint formats: awq, gptq, fp8, compressed-tensors")

    @classmethod
    def _compressed_tensors(cls, q: dict) -> "CheckpointQuantization":
        """llm-compressor's ``quantization_config``: one weight scheme for every quantized layer (its
        ``config_groups``), fp8 with tensor, channel or block scales, or ``pack-quantized`` int4 (group or channel
        scales) / int8 (channel scales) with unquantized activations (W4A16 / W8A16)."""
        groups = list((q.get("config_groups") or {}).values())
        weights = [g.get("weights") or {} for g in groups]
        ct = "compressed-tensors"
        blocks = {tuple(w.get("block_structure") or ()) for w in weights}
        if weights and len(blocks) == 1 and all(w.get("type") == "float" and w.get("num_bits") == 8
                                                and w.get("strategy") in ("tensor", "channel", "block")
                                                for w in weights):
            block = blocks.pop()
            if weights[0].get("strategy") == "block" and (len(block) != 2 or min(block) < 1):
                raise QuantizationError(f"compressed-tensors fp8 block_structure={list(block)} is not [rows, columns]")
            return cls("fp8", block=block or None, checkpoint_format=ct)
        supported = ("compressed-tensors checkpoints are supported for fp8 weights with per-tensor, per-channel or "
                     "block scales, pack-quantized int4 (group or channel scales) or int8 (channel scales, "
                     "symmetric) weights with unquantized activations, and int-quantized int8 weights (W8A8)")
        activations = groups[0].get("input_activations") if len(groups) == 1 else None
        if (q.get("format") == "int-quantized" and len(weights) == 1 and weights[0].get("type") == "int"
                and weights[0].get("num_bits") == 8 and weights[0].get("strategy") == "channel"
                and weights[0].get("symmetric", True) and (not activations or (
                    activations.get("type") == "int" and activations.get("num_bits") == 8))):
            if activations:
                logger.warning("a W8A8 compressed-tensors checkpoint: its int8 weights run weight-only, the "
                               "activations unquantized in the model dtype (vLLM quantizes them to int8)")
            return cls("int8", checkpoint_format=ct, packed=False)
        if len(weights) != 1 or q.get("format") != "pack-quantized" or groups[0].get("input_activations"):
            raise QuantizationError(f"{supported}; this one has format {q.get('format')!r} and config_groups "
                                    f"{q.get('config_groups')}")
        w = weights[0]
        bits, strategy, symmetric = w.get("num_bits"), w.get("strategy"), bool(w.get("symmetric", True))
        if w.get("type") == "int" and bits == 4 and strategy in ("group", "channel"):
            group = int(w.get("group_size") or -1) if strategy == "group" else -1
            return cls("int4", group_size=group, checkpoint_format=ct, symmetric=symmetric)
        if w.get("type") == "int" and bits == 8 and strategy == "channel" and symmetric:
            return cls("int8", checkpoint_format=ct)
        raise QuantizationError(f"{supported}; this one's weights are {w}")

    @classmethod
    def from_checkpoint(cls, path: str) -> Optional["CheckpointQuantization"]:
        """None for an unquantized checkpoint folder (or a file path)."""
        import json
        import os

        if not os.path.isdir(path):
            return None
        config = os.path.join(path, "config.json")
        q = None
        if os.path.exists(config):
            with open(config) as f:
                q = json.load(f).get("quantization_config")
        # Before transformers' integration: AutoAWQ's quant_config.json, AutoGPTQ's quantize_config.json (which some
        # AWQ exports use too; vLLM reads both for AWQ). Without a quant_method, AutoAWQ's keys say AWQ.
        for name in ("quant_config.json", "quantize_config.json"):
            legacy = os.path.join(path, name)
            if q is None and os.path.exists(legacy):
                with open(legacy) as f:
                    q = json.load(f)
                awq = bool({"w_bit", "q_group_size", "zero_point", "version"} & set(q))
                q = {"quant_method": "awq" if awq else "gptq", **q}
        if q is not None and str(q.get("quant_method", "")).lower() == "mxfp4":
            return cls("mxfp4")  # gpt-oss's: its experts read 4-bit (models.safetensors_loader), the rest dense
        return None if q is None else cls.from_hf_dict(q)


def resolve_method(requested: Optional[str], checkpoint: Optional[CheckpointQuantization],
                   load_format: str) -> Optional[str]:
    """The method to run: the checkpoint's if it has one (``requested`` must agree), else
    ``requested`` made at load time. Raises ``QuantizationError`` on a mismatch."""
    requested = quantization_method(requested)
    if requested is not None and requested not in QUANTIZATION_METHODS:
        raise QuantizationError(f"unknown quantization {requested!r}; choose one of {', '.join(QUANTIZATION_METHODS)}")
    if checkpoint is not None:
        if requested not in (None, checkpoint.method, checkpoint.format):
            raise QuantizationError(f"the checkpoint is quantized with {checkpoint.format}, but quantization="
                                    f"{requested!r} was asked for; pass quantization={checkpoint.format!r} or None")
        return checkpoint.method
    if requested == "compressed-tensors" or (requested in ("awq", "gptq") and load_format != "dummy"):
        raise QuantizationError(f"quantization={requested!r} needs a checkpoint quantized with {requested} "
                                "(config.json quantization_config); this checkpoint has none. To quantize a "
                                "dense checkpoint at load time use 'int8', 'int4' or 'fp8'")
    return requested


# --------------------------------------------------------------------------------------
# Published checkpoint layouts -> ours (numpy, one layer's tensor at a time)
# --------------------------------------------------------------------------------------


def _unpack_int32_fields(x: np.ndarray, axis: int, bits: int = 4) -> np.ndarray:
    """int32 ``x`` -> uint8 fields of ``bits`` (2, 4: nibbles, 8: bytes), ``axis`` 32 / bits times longer: field j
    of element i lands at ``(32 / bits) * i + j``. 3-bit fields (GPTQ's) run across words: ``axis`` is read as one
    little-endian stream of bits, 32 fields to 3 words."""
    if 32 % bits:
        return _unpack_bit_stream(x, axis, bits)
    u = np.ascontiguousarray(x).view(np.uint32)
    axis %= u.ndim
    per_word = 32 // bits
    fields = np.stack([(u >> (bits * j)) & ((1 << bits) - 1) for j in range(per_word)], axis=axis + 1)
    shape = list(u.shape)
    shape[axis] *= per_word
    return fields.astype(np.uint8).reshape(shape)


def _unpack_bit_stream(x: np.ndarray, axis: int, bits: int) -> np.ndarray:
    """int32 ``x`` -> uint8 fields of ``bits``, reading ``axis`` as one little-endian stream of bits (word i's bit b
    is the stream's bit 32 i + b; field j its bits ``[bits * j, bits * (j + 1))``): ``bits`` words hold 32 fields,
    each read from the 64-bit window of the word it starts in and the next (one row of words at a time)."""
    words = np.moveaxis(np.ascontiguousarray(x).view(np.uint32), axis, 0)
    if words.shape[0] % bits:
        raise QuantizationError(f"{words.shape[0]} words of {bits}-bit fields do not end on a field")
    groups = words.reshape(-1, bits, *words.shape[1:])
    out = np.empty((groups.shape[0], 32, *words.shape[1:]), np.uint8)
    mask = np.uint64((1 << bits) - 1)
    for w in range(bits):  # the fields that start in word w of each group
        low = groups[:, w].astype(np.uint64)
        window = low | groups[:, w + 1].astype(np.uint64) << np.uint64(32) if w + 1 < bits else low
        for j in range(-(-32 * w // bits), -(-32 * (w + 1) // bits)):
            out[:, j] = (window >> np.uint64(bits * j - 32 * w)) & mask
    return np.moveaxis(out.reshape(-1, *words.shape[1:]), 0, axis)


def _int4_from_values(values: np.ndarray, zeros: np.ndarray, scales: np.ndarray, group_size: int,
                      perm: Optional[np.ndarray], dtype) -> dict[str, np.ndarray]:
    K, N = values.shape
    if not group_size or K % group_size:
        raise QuantizationError(f"its weight has {K} input rows, not a multiple of the group_size {group_size}: "
                                "int4 weights need whole groups (vLLM refuses these too)")
    groups = K // group_size
    for name, x in (("scales", scales), ("zeros", zeros)):
        if x.shape != (groups, N):
            raise QuantizationError(
                f"its {name} are {list(x.shape)}, but groups of {group_size} rows of its [{K}, {N}] weight make "
                f"[{K}/{group_size}, {N}]: the checkpoint's group_size does not match its tensors")
    pack = qmm.int4_pack_block(K, group_size)
    packed = qmm.pack_int4(values, pack)  # numpy in, numpy out
    out = dict(packed=packed, scales=scales.astype(dtype), zeros=zeros.astype(dtype), pack=pack)
    if perm is not None:
        out["perm"] = perm.astype(np.int32)
    return out


def awq_to_int4(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group_size: int,
                dtype=np.float32) -> dict[str, np.ndarray]:
    """AutoAWQ GEMM layout (``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32 ``[K/g, N/8]``, both
    packed along N in ``AWQ_ORDER``; ``scales`` ``[K/g, N]``) -> the fields of an ``Int4Weight``."""
    order = np.argsort(AWQ_ORDER)  # position of column c's nibble within its int32

    def columns(x):
        nib = _unpack_int32_fields(x, axis=-1)  # [rows, N], nibble-major per int32
        n = nib.shape[-1]
        index = (np.arange(n) // 8) * 8 + order[np.arange(n) % 8]
        return nib[:, index]

    g = group_size if group_size > 0 else qweight.shape[0]
    return _int4_from_values(columns(qweight), columns(qzeros), scales, g, None, dtype)


def gptq_to_int4(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: Optional[np.ndarray],
                 group_size: int, *, zero_offset: int = 1, bits: int = 4, dtype=np.float32) -> dict[str, np.ndarray]:
    """GPTQ layout (``qweight`` int32 ``[K/8, N]`` packed along K, ``qzeros`` int32 ``[K/g, N/8]``
    packed along N, ``scales`` ``[K/g, N]``, ``g_idx`` ``[K]``) -> the fields of an ``Int4Weight``.

    ``bits``: 2- and 3-bit checkpoints (``[K * bits / 32, N]``, their zeros likewise along N; 3-bit fields run
    across words) hold values an int4 weight holds exactly: they run as int4, unchanged.
    ``zero_offset``: GPTQ's v1 checkpoints store ``zero - 1`` (1); ``gptq_v2`` stores the zero (0).
    A ``g_idx`` that is not ``k // g`` (act-order) sorts the rows by group and records ``perm``.
    """
    values = _unpack_int32_fields(qweight, axis=0, bits=bits)  # [K, N]
    zeros = _unpack_int32_fields(qzeros, axis=-1, bits=bits).astype(np.int32) + zero_offset  # [K/g, N]
    K = values.shape[0]
    g = group_size if group_size > 0 else K
    perm = _group_order(g_idx, K, g)
    if perm is not None:
        values = values[perm]
    return _int4_from_values(values, zeros.astype(np.float32), scales, g, perm, dtype)


def gptq8_to_int8(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: Optional[np.ndarray],
                  group_size: int, *, zero_offset: int = 1) -> dict[str, np.ndarray]:
    """GPTQ's 8-bit layout (``qweight`` int32 ``[K/4, N]`` packed along K, ``qzeros`` int32 ``[K/g, N/4]`` packed
    along N, ``scales [K/g, N]``, ``g_idx [K]``, act-order too) -> the fields of an ``Int8KMajorWeight``, quantized
    again with one symmetric scale per output channel (the int8 matmuls here take channel scales): a value moves by
    at most half its channel's step, as a dense checkpoint's does under ``quantization="int8"``."""
    values = _unpack_int32_fields(qweight, axis=0, bits=8).astype(np.float32)  # [K, N]
    zeros = _unpack_int32_fields(qzeros, axis=-1, bits=8).astype(np.float32) + zero_offset  # [K/g, N]
    K = values.shape[0]
    groups = np.asarray(g_idx) if g_idx is not None else np.arange(K) // (group_size if group_size > 0 else K)
    dense = (values - zeros[groups]) * np.asarray(scales, np.float32)[groups]
    scale = np.maximum(np.abs(dense).max(axis=0), np.finfo(np.float32).tiny) / 127
    q = np.clip(np.rint(dense / scale), -127, 127).astype(np.int8)
    return dict(q=np.ascontiguousarray(q.T), scale=scale.astype(np.float32))


def _group_order(g_idx: Optional[np.ndarray], K: int, g: int) -> Optional[np.ndarray]:
    """The row order that sorts act-order rows by their group (``g_idx [K]``), or None where ``g_idx`` is absent or
    already ``k // g``."""
    if g_idx is None or np.array_equal(g_idx, np.arange(K) // g):
        return None
    perm = np.argsort(g_idx, kind="stable")
    if not np.array_equal(np.asarray(g_idx)[perm], np.arange(K) // g):
        raise QuantizationError("g_idx does not assign exactly group_size rows to each group")
    return perm


def packed_to_int4(weight_packed: np.ndarray, weight_scale: np.ndarray, weight_zero_point: Optional[np.ndarray],
                   weight_g_idx: Optional[np.ndarray], K: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """compressed-tensors' ``pack-quantized`` int4 (W4A16) -> the fields of an ``Int4Weight``: ``weight_packed``
    int32 ``[N, K/8]`` packed along K (element j of 8 in bits 4j, stored as the signed value + 8),
    ``weight_scale`` ``[N, K/g]`` (``[N, 1]``: one group over K), ``weight_zero_point`` (asymmetric only) int32
    ``[N/8, K/g]`` packed along N the same way, ``weight_g_idx [K]`` (act-order), ``K`` from ``weight_shape``.
    ``W = (q - zero) * scale``, so the stored unsigned values keep zero + 8 as their zero (8: symmetric)."""
    values = _unpack_int32_fields(weight_packed, axis=-1)[:, :K].T  # [K, N], signed + 8
    scales = np.asarray(weight_scale, np.float32).T  # [K/g, N]
    zeros = (np.full(scales.shape, 8, np.float32) if weight_zero_point is None
             else _unpack_int32_fields(weight_zero_point, axis=0)[:values.shape[1]].T.astype(np.float32))
    g = K // scales.shape[0]
    perm = _group_order(weight_g_idx, K, g)
    if perm is not None:
        values = values[perm]
    return _int4_from_values(values, zeros, scales, g, perm, dtype)


def int8_from_checkpoint(weight: np.ndarray, weight_scale: np.ndarray) -> dict[str, np.ndarray]:
    """compressed-tensors' ``int-quantized`` int8 (W8A8: ``weight`` int8 ``[N, K]``, ``weight_scale [N, 1]``) -> the
    fields of an ``Int8KMajorWeight``."""
    return dict(q=np.asarray(weight, np.int8), scale=np.asarray(weight_scale, np.float32).reshape(-1))


def packed_to_int8(weight_packed: np.ndarray, weight_scale: np.ndarray, K: int) -> dict[str, np.ndarray]:
    """compressed-tensors' ``pack-quantized`` int8 (W8A16, symmetric, channel scales) -> the fields of an
    ``Int8KMajorWeight``: ``weight_packed`` int32 ``[N, K/4]`` (byte j of 4 in bits 8j, the signed value + 128),
    ``weight_scale [N, 1]``."""
    q = (_unpack_int32_fields(weight_packed, axis=-1, bits=8)[:, :K].astype(np.int16) - 128).astype(np.int8)
    return dict(q=q, scale=np.asarray(weight_scale, np.float32).reshape(-1))


def fp8_from_checkpoint(weight: np.ndarray, weight_scale: np.ndarray,
                        block: Optional[tuple[int, int]] = None) -> dict[str, np.ndarray]:
    """An FP8 checkpoint's ``weight`` (e4m3 ``[N, K]``) and ``weight_scale`` (per tensor ``[]``/
    ``[1]`` or per channel ``[N]``/``[N, 1]``) -> the fields of an ``Fp8Weight`` (exact).

    Block-wise checkpoints (``block``: ``weight_block_size``, e.g. Qwen3's and DeepSeek's ``[128, 128]``; the scale
    ``[ceil(N / rows), ceil(K / columns)]``, named ``weight_scale_inv`` there) are decoded and quantized again with
    a scale per output channel, the form the fp8 matmul here takes (XLA's fp8 dot scales whole rows and columns):
    e4m3 is a floating-point grid, so a value only moves where its block's scale and its channel's differ by other
    than a power of two, by at most one rounding (2^-4 of it)."""
    N = weight.shape[0]
    if block is not None:
        rows, cols = block
        scale = np.asarray(weight_scale, np.float32)
        K = weight.shape[1]
        if scale.shape != (-(-N // rows), -(-K // cols)):
            raise QuantizationError(f"block-wise fp8 weight_scale {list(scale.shape)} does not tile a weight of "
                                    f"{[N, K]} in blocks of {[rows, cols]}")
        dense = weight.astype(np.float32) * np.repeat(np.repeat(scale, rows, 0), cols, 1)[:N, :K]
        scaled, channel = _per_channel_scaled(dense.T, FP8_MAX, xp=np)  # as load-time fp8 scales a [K, N] weight
        return dict(q=np.ascontiguousarray(scaled.T).astype(weight.dtype), scale=channel)
    scale = np.asarray(weight_scale, np.float32).reshape(-1)
    if scale.size == 1:
        scale = np.full((N,), scale[0], np.float32)
    elif scale.size != N:
        raise QuantizationError(f"fp8 weight_scale of {scale.size} values fits neither per-tensor nor "
                                f"per-channel scaling of a weight with {N} rows (a block-wise scale needs the "
                                "config's weight_block_size)")
    return dict(q=weight, scale=scale)


# --------------------------------------------------------------------------------------
# The matmul the model calls
# --------------------------------------------------------------------------------------

# The kernel pays off while a step reads more weight bytes than it does arithmetic. int4 above this row count is
# dequantized to a bf16 copy for XLA's dot. Run 27a-b (H200, 8B AWQ, same lease): 256 rows against 64 took a
# 128-token prompt's TTFT from 25.3 to 14.6 ms at the same TPOT; tput-short 13,610 against 13,581 tok/s (128 rows
# 13,564); at 1024 rows 9,363 (the Triton dot at 64-row tiles against cuBLAS on the dequantized copy).
MAX_KERNEL_ROWS = 256


@dataclasses.dataclass(frozen=True)
class LinearBackend:
    """How ``linear`` multiplies. ``kernel``: "auto" (on GPU the Pallas kernel for int4 weights at up
    to ``max_kernel_rows`` rows and for int8 weights at one row), "pallas" (for int8 and dense weights
    at any row count too), or "xla" (never). ``interpret``: run the kernel in interpret mode (CPU tests).

    Why "auto" leaves int8 at more than one row to XLA: on the H200 (benchmarks/NOTES.md) the 8B
    decode step with int8 weights took 7.89 ms through the kernel and 6.15 ms through XLA at 16
    rows (run 6); XLA fuses the int8 -> bf16 convert into its dot. At one row the kernel's GEMV form
    wins since run 17a (TPOT 4.27 ms against XLA's 5.19 in runs 8-9). For int4 XLA first writes a
    dequantized copy."""

    kernel: str = "auto"
    max_kernel_rows: int = dataclasses.field(default_factory=lambda: _max_kernel_rows_from_env())
    interpret: Optional[bool] = None
    # One-row steps: the residual add and RMSNorm as one launch, the norm applied by the GEMVs (``defers_norms``);
    # ``$PAGEDJAX_DEFER_NORMS=0`` turns it off (for timing against XLA's three launches).
    defer_norms: bool = dataclasses.field(default_factory=lambda: os.environ.get("PAGEDJAX_DEFER_NORMS", "1") != "0")

    def use_kernel(self, w, rows: int) -> bool:
        if (self.kernel == "xla" or rows > self.max_kernel_rows or isinstance(w, Fp8Weight)
                or _output_size(w) % KERNEL_MIN_BLOCK_N):
            return False
        if self.kernel == "auto":
            on_gpu = jax.default_backend() == "gpu"
            return on_gpu and (isinstance(w, Int4Weight)
                               or (isinstance(w, (Int8Weight, Int8KMajorWeight)) and rows == 1))
        return self.kernel == "pallas"

    def runs_gated_gemv(self, w, rows: int) -> bool:
        """Whether ``silu_gated_linear`` may take ``w`` (a gated MLP's joined gate/up weight) at ``rows`` rows: an
        interleaved K-major int8 weight (``interleave_gate_up``) at one row, where ``linear`` runs its GEMV."""
        return isinstance(w, Int8KMajorWeight) and w.gate_up_group > 0 and rows == 1 and self.use_kernel(w, rows)

    def defers_norms(self, layer: dict) -> bool:
        """Whether a one-row step may leave each RMSNorm to the GEMVs (``models.norm.DeferredNorm``): where
        ``defer_norms`` and every matmul of ``layer`` (one layer's weights) that reads a normed row, the attention's
        q/k/v and the MLP's gate/up, runs a Pallas GEMV at one row. The model decides the rest (``models.llama``'s
        ``defer_norms``: pre-norms, no mixture of experts, no adapters, not float16)."""
        readers = [w for name, w in layer.items() if name in NORMED_ROW_READERS]
        return (self.defer_norms and any(name in layer for name in ("wqkv", "wq"))
                and any(name in layer for name in ("w_gate_up", "w_gate"))
                and all(self.applies_norm(w, 1) for w in readers))

    def applies_norm(self, w, rows: int) -> bool:
        """Whether ``linear`` of ``w`` at ``rows`` rows runs a Pallas kernel at one row (its GEMV, or its dot form
        where ``MatmulConfig.gemv`` is off), which can apply a deferred norm."""
        return rows == 1 and self.use_kernel(w, rows)

    def use_fp8_activation_kernel(self, width: int) -> bool:
        """Whether an fp8 MLP's middle (``fp8_gated_mlp``) on rows of ``width`` activations runs the Pallas kernel:
        on a GPU under "auto", and under "pallas"; never under "xla" (and so not on a mesh)."""
        if self.kernel == "xla" or not fp8_activation.kernel_fits(width):
            return False
        return self.kernel == "pallas" or jax.default_backend() == "gpu"

    def use_grouped_kernel(self) -> bool:
        """Whether a mixture-of-experts layer's grouped matmuls run the Pallas kernel (``models.moe``): on a GPU
        under "auto" (XLA's ``ragged_dot`` there multiplies every row by every expert), and under "pallas"."""
        return self.kernel == "pallas" or (self.kernel == "auto" and jax.default_backend() == "gpu")


# The matmuls of a layer that read a normed row (the block inputs): the attention's q/k/v and the MLP's gate/up.
NORMED_ROW_READERS = ("wqkv", "wq", "wk", "wv", "w_gate_up", "w_gate", "w_up")

# The kernels tile a weight's output columns by a power of two of at least 16 (``quantized_matmul._tile_sizes``); a
# weight they cannot tile, e.g. an int8 LM head over a vocabulary of 32001, goes to XLA's dot.
KERNEL_MIN_BLOCK_N = 16


def _output_size(w) -> int:
    """N of a dense or quantized ``[..., K, N]`` weight."""
    if not is_quantized(w):
        return w.shape[-1]
    name = "packed" if isinstance(w, Int4Weight) else "q"
    return getattr(w, name).shape[w.out_axes[name]]


def _row_count_from_env(variable: str, default: int, minimum: int, meaning: str) -> int:
    """``$variable`` as a row count of at least ``minimum`` (``meaning``: what it says, for the error), else
    ``default``."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < minimum:
        raise ValueError(f"{variable} must be {meaning}, got {text!r}")
    return int(text)


def _max_kernel_rows_from_env() -> int:
    """``$PAGEDJAX_MAX_KERNEL_ROWS`` (a row count; for timing the int4 kernel against XLA's dot of the dequantized
    weight at prompt and batch sizes), else ``MAX_KERNEL_ROWS``."""
    return _row_count_from_env("PAGEDJAX_MAX_KERNEL_ROWS", MAX_KERNEL_ROWS, 1, "a positive row count")


FP8_DOT_OUTPUTS = ("activation", "float32")  # the first is the default


def _fp8_dot_output_from_env() -> str:
    """``$PAGEDJAX_FP8_DOT_OUTPUT``: the fp8 dot's result type before the scales are applied (``FP8_DOT_OUTPUTS``):
    the activations' type (bf16; the default), which halves the bytes the GEMM writes and the scaling pass reads
    back in large steps at the cost of one more rounding at the activations' precision, or float32. Run 22b (H200,
    8B, same lease): ``tput-short`` with fp8 weights 24,404 (float32) -> 25,663 output tok/s (1.41x bf16's 18,170)."""
    return _choice_from_env("PAGEDJAX_FP8_DOT_OUTPUT", FP8_DOT_OUTPUTS)


def _fp8_dot(xq: jax.Array, w: Fp8Weight, dtype) -> jax.Array:
    """``xq @ w.q.T``, unscaled: the fp8 x fp8 tensor-core matmul with both operands K-major, its result in
    ``dtype`` (the activations') or float32 (``$PAGEDJAX_FP8_DOT_OUTPUT``). float16 activations always get float32:
    the unscaled products of two full-range e4m3 operands (up to 448^2 each, summed over K) overflow float16's 65,504
    (NaN logits), where bfloat16 has float32's range."""
    wide = _fp8_dot_output_from_env() == "float32" or jnp.dtype(dtype) == jnp.dtype(jnp.float16)
    dot_type = jnp.float32 if wide else dtype
    return jax.lax.dot_general(xq, w.q, (((xq.ndim - 1,), (1,)), ((), ())), preferred_element_type=dot_type)


def _fp8_scaled_dot(xq: jax.Array, x_scale: jax.Array, w: Fp8Weight, dtype) -> jax.Array:
    """``x @ W`` in ``dtype`` from fp8 rows ``xq`` with their scales ``x_scale [..., 1]``: the fp8 dot, then the rows'
    and the weight's channel scales."""
    return (_fp8_dot(xq, w, dtype).astype(jnp.float32) * x_scale * w.scale).astype(dtype)


def _fp8_linear(x: jax.Array, w: Fp8Weight) -> jax.Array:
    """Per-token dynamic activation scales, fp8 x fp8 matmul with both operands K-major."""
    return _fp8_scaled_dot(*quantize_rows_fp8(x), w, x.dtype)


def fp8_gated_mlp(h: jax.Array, w_gate_up: Fp8Weight, w_down: Fp8Weight, activation: str,
                  backend: LinearBackend = LinearBackend()) -> jax.Array:
    """``(act(h @ W_gate) * (h @ W_up)) @ W_down`` with fp8 weights (``w_gate_up``'s columns ``[gate | up]``). The
    middle (the gate/up product's scales, the activation, the down matmul's per-row quantization) is one Pallas
    kernel where ``backend.use_fp8_activation_kernel`` says so (``pallas_kernels.fp8_activation``: XLA reads the
    gate/up product twice there), else its jnp reference, the unfused model's arithmetic."""
    hq, h_scale = quantize_rows_fp8(h)
    acc = _fp8_dot(hq, w_gate_up, h.dtype)
    if backend.use_fp8_activation_kernel(acc.shape[-1] // 2):
        middle = functools.partial(fp8_activation.gated_activation_fp8, interpret=backend.interpret)
    else:
        middle = fp8_activation.gated_activation_fp8_reference
    hidden_q, hidden_scale = middle(acc, h_scale, w_gate_up.scale, activation=activation, dtype=h.dtype)
    return _fp8_scaled_dot(hidden_q, hidden_scale, w_down, h.dtype)


def stored_array(w) -> jax.Array:
    """The array that holds most of a (dense or quantized) weight's bytes: what a matmul of it mostly reads."""
    if isinstance(w, Int4Weight):
        return w.packed
    return w.q if isinstance(w, (Int8Weight, Int8KMajorWeight, Fp8Weight)) else w


def _matmul_input(x, w, backend: LinearBackend) -> tuple[jax.Array, dict]:
    """``(rows, norm options)`` a matmul of ``w`` reads from ``x``: a ``models.norm.DeferredNorm``'s rows and its
    ``sum_sq`` / ``norm_eps`` where its Pallas GEMV applies the norm (``backend.applies_norm``), else the normed row;
    any other ``x`` as it is."""
    if not isinstance(x, DeferredNorm):
        return x, {}
    if backend.applies_norm(w, x.rows.shape[0]):
        return x.rows, dict(sum_sq=x.sum_sq, norm_eps=x.eps)
    return x.value(), {}


def silu_gated_linear(x, w: Int8KMajorWeight, backend: LinearBackend = LinearBackend()) -> jax.Array:
    """``silu(x @ W_gate) * (x @ W_up)`` of one row by the gated GEMV (``backend.runs_gated_gemv``), the SwiGLU
    product in its epilogue; ``x`` may be a ``models.norm.DeferredNorm``."""
    x, norm = _matmul_input(x, w, backend)
    return qmm.int8_kmajor_gated_matmul(x, w.q, w.scale, group=w.gate_up_group, interpret=backend.interpret, **norm)


def linear(x, w, backend: LinearBackend = LinearBackend(), *, keep_splits: bool = False) -> jax.Array:
    """``x[M, K] @ W`` for a dense or quantized ``W`` (one layer's, no leading axis). ``keep_splits``: the result as
    ``[P, M, N]`` partial sums (a kernel's K splits, float32 when ``P > 1``; else ``P = 1``), for
    ``models.norm.add_rms_norm``, where XLA fuses their sum into the residual add (no launch of its own).
    ``x`` may be a ``models.norm.DeferredNorm`` (one row): the Pallas GEMVs read its rows and apply its norm to their
    output; every other path reads its normed row (``value()``)."""
    whole = (lambda y: y[None]) if keep_splits else (lambda y: y)
    x, norm = _matmul_input(x, w, backend)
    if isinstance(w, Fp8Weight):
        return whole(_fp8_linear(x, w))
    kernel = backend.use_kernel(w, x.shape[0])
    options = dict(interpret=backend.interpret, keep_splits=keep_splits, **norm)
    if isinstance(w, Int8Weight):
        if kernel:
            return qmm.int8_matmul(x, w.q, w.scale, **options)
        return whole(qmm.int8_matmul_reference(x, w.q, w.scale))
    if isinstance(w, Int8KMajorWeight):  # the kernel's one-row GEMV; more rows are XLA's dot inside it too
        if kernel:
            out = qmm.int8_kmajor_matmul(x, w.q, w.scale, **options)
        else:
            out = whole(qmm.int8_kmajor_matmul_reference(x, w.q, w.scale))
        return qmm.deinterleave_halves(out, w.gate_up_group) if w.gate_up_group else out
    if isinstance(w, Int4Weight):
        if w.codes != "uint4":
            raise ValueError(f"{w.codes} int4 weights run only as a mixture's experts (models.moe)")
        if w.perm is not None:
            x = jnp.take(x, w.perm, axis=-1)
        args = (x, w.packed, w.scales, w.zeros)
        if kernel:
            return qmm.int4_matmul(*args, group_size=w.group_size, pack=w.pack, **options)
        if w.perm is not None and jax.default_backend() == "cpu":
            # XLA:CPU has no bf16 x bf16 -> f32 dot after the permuting gather ("Unsupported element type for
            # DotThunk::Execute", JAX 0.10.2, more than one row): the dot in float32 there, the same products.
            out = qmm.int4_matmul_reference(x.astype(jnp.float32), *args[1:], group_size=w.group_size, pack=w.pack)
            return whole(out.astype(x.dtype))
        return whole(qmm.int4_matmul_reference(*args, group_size=w.group_size, pack=w.pack))
    if kernel:
        return qmm.dense_matmul(x, w, **options)
    return whole(x @ w)
