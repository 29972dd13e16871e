"""Quantization (``models.quantization``): load-time int8 / int4 / fp8, AWQ / GPTQ / FP8 checkpoints,
the engine's ``quantization=`` and ``kv_cache_dtype=`` options, and their errors.

AWQ and GPTQ checkpoints are packed here, by code written from the published layouts
(independent of the loader's unpacking), from known integer weights; loading them must
give exactly the weights they encode. Logits of quantized models are compared with the
dense model they came from, within tolerances stated per method.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from engine import LLM, SamplingParams
from engine.device_memory import num_kv_blocks
from engine.engine_args import EngineArgs
from models.batch import ModelInput, make_kv_cache
from models.config import QUANTIZATION_METHODS, ModelConfig
from models.llama import forward
from models.loader import load_model
from models.quantization import (
    AWQ_ORDER,
    QUANTIZED_LAYER_WEIGHTS,
    CheckpointQuantization,
    Fp8Weight,
    Int4Weight,
    Int8KMajorWeight,
    Int8Weight,
    LinearBackend,
    QuantizationError,
    awq_to_int4,
    dequantize,
    fp8_from_checkpoint,
    gptq_to_int4,
    int8_lm_head,
    is_quantized,
    quantize_lm_head,
    quantize_params,
    quantize_weight,
)
from models.safetensors_loader import KV_SCALE_NAMES, CheckpointError
from pallas_kernels import quantized_matmul as qmm
from pallas_kernels.ragged_paged_attention import to_cache_dtype
from tests.launches import pallas_launches
from tests.tiny_checkpoints import write_tiny_checkpoint

HF_LINEAR = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
             "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj"}
GROUP = 32  # divides every K of the tiny models (64, 96, 128)
# Relative error ||ours - dense|| / ||dense|| of the logits against the dense model, on the tiny
# random models (weights far from any grid, std 0.15): measured over 8 seeds int8 0.018-0.026,
# fp8 (weights and activations) 0.11-0.13, int4 (groups of 64 = all of K here) 0.27-0.35, fp8 KV
# pages 0.05-0.07. A wrong layout gives about 1.4 (uncorrelated logits).
LOGIT_TOLERANCE = {"int8": 0.05, "fp8": 0.2, "int4": 0.5}
# The int8 LM head (on by default with int8) in those: over 6 seeds int8 layers alone 0.018-0.026 (untied) and
# 0.023-0.031 (tied), with the int8 head 0.019-0.027 and 0.024-0.032; the int8 head alone (dense layers)
# 0.0058-0.0062 over 8 seeds, tied or not.
INT8_HEAD_TOLERANCE = 0.015
FP8_KV_TOLERANCE = 0.12


# ------------------------------------------------------------------ packing, from the published layouts


def pack_int32_nibbles(values: np.ndarray, axis: int, order=tuple(range(8))) -> np.ndarray:
    """Pack 4-bit ``values`` 8 to an int32 along ``axis``: nibble ``i`` holds element ``order[i]`` of its 8."""
    v = np.moveaxis(np.asarray(values, np.uint32), axis, -1)
    v = v.reshape(*v.shape[:-1], -1, 8)
    packed = np.zeros(v.shape[:-1], np.uint32)
    for i, j in enumerate(order):
        packed |= v[..., j] << np.uint32(4 * i)
    return np.ascontiguousarray(np.moveaxis(packed.view(np.int32), -1, axis))  # save_file needs C order


def awq_tensors(values, zeros, scales):
    """AutoAWQ GEMM: qweight [K, N/8] and qzeros [K/g, N/8] packed along N in AWQ_ORDER."""
    return dict(qweight=pack_int32_nibbles(values, -1, AWQ_ORDER), qzeros=pack_int32_nibbles(zeros, -1, AWQ_ORDER),
                scales=scales.astype(np.float16))


def gptq_tensors(values, zeros, scales, g_idx, v1=True):
    """GPTQ: qweight [K/8, N] packed along K, qzeros [K/g, N/8] along N (v1 stores zero - 1)."""
    stored_zeros = zeros - 1 if v1 else zeros
    return dict(qweight=pack_int32_nibbles(values, 0), qzeros=pack_int32_nibbles(stored_zeros, -1),
                scales=scales.astype(np.float16), g_idx=g_idx.astype(np.int32))


def pack_int32_stream(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """AutoGPTQ's packing of ``bits``-bit ``values`` along ``axis``, written as its loops write it: 32 / bits to a
    word for 2 bits, and for 3 bits 32 values to 3 words, the 11th and 22nd split across two words."""
    v = np.moveaxis(np.asarray(values, np.uint32), axis, -1)
    if bits == 2:
        v = v.reshape(*v.shape[:-1], -1, 16)
        packed = np.zeros(v.shape[:-1], np.uint32)
        for j in range(16):
            packed |= v[..., j] << np.uint32(2 * j)
    else:  # AutoGPTQ's pack for bits=3, one run of 32 values into words 3r, 3r + 1, 3r + 2
        v = v.reshape(*v.shape[:-1], -1, 32)
        w = np.zeros((*v.shape[:-1], 3), np.uint32)
        u = np.uint32
        for j in range(10):
            w[..., 0] |= v[..., j] << u(3 * j)
        w[..., 0] |= v[..., 10] << u(30)
        w[..., 1] |= (v[..., 10] >> u(2)) & u(1)
        for j in range(10):
            w[..., 1] |= v[..., 11 + j] << u(3 * j + 1)
        w[..., 1] |= v[..., 21] << u(31)
        w[..., 2] |= (v[..., 21] >> u(1)) & u(3)
        for j in range(10):
            w[..., 2] |= v[..., 22 + j] << u(3 * j + 2)
        packed = w.reshape(*w.shape[:-2], -1)
    return np.ascontiguousarray(np.moveaxis(packed.view(np.int32), -1, axis))


def pack_int32_signed(values: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """compressed-tensors' ``pack_to_int32``: signed ``values`` + 2^(bits-1), 32 / bits to an int32 along ``axis``,
    element j of each run in bits ``bits * j``."""
    v = np.moveaxis(np.asarray(values, np.int64) + (1 << (bits - 1)), axis, -1).astype(np.uint32)
    v = v.reshape(*v.shape[:-1], -1, 32 // bits)
    packed = np.zeros(v.shape[:-1], np.uint32)
    for j in range(32 // bits):
        packed |= v[..., j] << np.uint32(bits * j)
    return np.ascontiguousarray(np.moveaxis(packed.view(np.int32), -1, axis))


def compressed_tensors_tensors(q, scale, zero_point=None, g_idx=None, bits=4):
    """llm-compressor's ``pack-quantized``: signed ``q [N, K]`` packed along K, ``scale [N, K/g]``, a signed
    ``zero_point [N, K/g]`` packed along N (asymmetric), ``g_idx [K]``, ``weight_shape``."""
    out = dict(weight_packed=pack_int32_signed(q, bits, -1), weight_scale=scale.astype(np.float16),
               weight_shape=np.asarray(q.shape, np.int64))
    if zero_point is not None:
        out["weight_zero_point"] = pack_int32_signed(zero_point, bits, 0)
    if g_idx is not None:
        out["weight_g_idx"] = g_idx.astype(np.int32)
    return out


def random_int4(rng, K, N, group=GROUP, zero_low=0):
    values = rng.integers(0, 16, (K, N))
    zeros = rng.integers(zero_low, 16, (K // group, N))
    scales = rng.uniform(0.005, 0.05, (K // group, N)).astype(np.float16).astype(np.float32)
    return values, zeros, scales


def test_awq_layout_unpacks_to_exactly_the_packed_weights():
    rng = np.random.default_rng()
    K, N = 128, 64
    values, zeros, scales = random_int4(rng, K, N)
    fields = awq_to_int4(**awq_tensors(values, zeros, scales), group_size=GROUP)
    w = Int4Weight(**{k: jnp.asarray(v) for k, v in fields.items() if k != "pack"}, group_size=GROUP,
                   pack=fields["pack"])
    expected = (values - np.repeat(zeros, GROUP, 0)) * np.repeat(scales, GROUP, 0)
    np.testing.assert_array_equal(np.asarray(dequantize(w)), expected.astype(np.float32))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("v1", [True, False])
def test_gptq_layout_unpacks_to_exactly_the_packed_weights(act_order, v1):
    rng = np.random.default_rng()
    K, N = 128, 64
    values, zeros, scales = random_int4(rng, K, N, zero_low=1)  # v1 stores zero - 1 in 4 bits
    g_idx = np.arange(K) // GROUP
    if act_order:  # desc_act: rows are assigned to groups in the order of their Hessian diagonal
        g_idx = rng.permutation(g_idx)
    fields = gptq_to_int4(**gptq_tensors(values, zeros, scales, g_idx, v1=v1), group_size=GROUP,
                          zero_offset=1 if v1 else 0)
    assert ("perm" in fields) == act_order
    w = Int4Weight(**{k: jnp.asarray(v) for k, v in fields.items() if k != "pack"}, group_size=GROUP,
                   pack=fields["pack"])
    expected = (values - zeros[g_idx]) * scales[g_idx]
    np.testing.assert_array_equal(np.asarray(dequantize(w)), expected.astype(np.float32))
    x = jnp.asarray(rng.standard_normal((3, K)), jnp.float32)
    from models.quantization import linear

    np.testing.assert_allclose(np.asarray(linear(x, w)), np.asarray(x) @ expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bit_gptq_unpacks_to_exactly_the_packed_weights(bits):
    """2- and 3-bit GPTQ (AutoGPTQ's packing; 3-bit values run across words) load as int4 weights holding exactly
    the values packed, act-order included."""
    rng = np.random.default_rng()
    K, N = 256, 64
    top = 1 << bits
    values, zeros = rng.integers(0, top, (K, N)), rng.integers(1, top, (K // GROUP, N))  # v1 stores zero - 1
    scales = rng.uniform(0.005, 0.05, (K // GROUP, N)).astype(np.float16).astype(np.float32)
    g_idx = rng.permutation(np.arange(K) // GROUP)
    fields = gptq_to_int4(pack_int32_stream(values, bits, 0), pack_int32_stream(zeros - 1, bits, -1), scales, g_idx,
                          GROUP, zero_offset=1, bits=bits)
    w = Int4Weight(**{k: jnp.asarray(v) for k, v in fields.items() if k != "pack"}, group_size=GROUP,
                   pack=fields["pack"])
    expected = (values - zeros[g_idx]) * scales[g_idx]
    np.testing.assert_array_equal(np.asarray(dequantize(w)), expected.astype(np.float32))


def test_fp8_checkpoint_scales_per_tensor_and_per_channel():
    rng = np.random.default_rng()
    q = jnp.asarray(rng.standard_normal((16, 32)), jnp.float8_e4m3fn)
    for scale, expected in ((np.float32(0.5), np.full(16, 0.5)), (np.arange(16, dtype=np.float32)[:, None],
                                                                  np.arange(16))):
        fields = fp8_from_checkpoint(np.asarray(q), scale)
        np.testing.assert_array_equal(fields["scale"], expected)
        w = Fp8Weight(q=jnp.asarray(fields["q"]), scale=jnp.asarray(fields["scale"]))
        np.testing.assert_allclose(np.asarray(dequantize(w)), (np.asarray(q, np.float32) * expected[:, None]).T)
    with pytest.raises(QuantizationError, match="needs the config's weight_block_size"):
        fp8_from_checkpoint(np.asarray(q), np.ones((4, 2), np.float32))


def test_block_wise_fp8_is_requantized_per_channel_within_one_rounding():
    """Qwen3 / DeepSeek FP8 layout: a scale per [rows, columns] block of ``[N, K]`` (partial blocks at the edges).
    Re-quantized per output channel: each value within one e4m3 rounding (2^-4 relative) of the decoded weight, or
    of the channel's subnormal step; exact where every block's scale is the channel's times a power of two."""
    rng = np.random.default_rng()
    N, K, block = 80, 72, (32, 32)
    q = np.asarray(jnp.asarray(rng.standard_normal((N, K)) * 50, jnp.float8_e4m3fn))
    scale = rng.uniform(0.001, 0.01, (3, 3)).astype(np.float32)
    decoded = q.astype(np.float32) * np.repeat(np.repeat(scale, 32, 0), 32, 1)[:N, :K]
    fields = fp8_from_checkpoint(q, scale, block)
    assert fields["q"].dtype == q.dtype and fields["scale"].shape == (N,)
    got = np.asarray(dequantize(Fp8Weight(q=jnp.asarray(fields["q"]), scale=jnp.asarray(fields["scale"])))).T
    step = fields["scale"][:, None] * 2.0 ** -9  # e4m3's smallest subnormal, in the channel's scale
    assert (np.abs(got - decoded) <= 2.0 ** -4 * np.abs(decoded) + step).all()
    assert np.abs(got - decoded).max() > 0  # scales not a power of two apart: it did re-round
    # Exact: column 0 holds 448 under its block's scale 0.01, the largest, so each channel's scale is 0.01 and
    # every other block's 0.01 / 2^k: its values only move exponent (none falls below e4m3's normal range).
    q = np.array(jnp.asarray(rng.choice([-1, 1], (N, K)) * rng.uniform(0.25, 400, (N, K)), jnp.float8_e4m3fn))
    q[:, 0] = 448
    powers = (0.01 * 2.0 ** -rng.integers(0, 4, (3, 3))).astype(np.float32)
    powers[:, 0] = 0.01
    fields = fp8_from_checkpoint(q, powers, block)
    exact = q.astype(np.float32) * np.repeat(np.repeat(powers, 32, 0), 32, 1)[:N, :K]
    got = dequantize(Fp8Weight(q=jnp.asarray(fields["q"]), scale=jnp.asarray(fields["scale"])))
    np.testing.assert_array_equal(np.asarray(got).T, exact)
    with pytest.raises(QuantizationError, match="does not tile a weight"):
        fp8_from_checkpoint(q, scale[:2], block)


@pytest.mark.parametrize("method", ["int8", "int4", "fp8", "mxfp4"])
def test_load_time_quantization_error_is_bounded(method):
    rng = np.random.default_rng()
    w = jnp.asarray(rng.standard_normal((2, 256, 96)) * 0.02, jnp.float32)  # stacked: 2 layers
    qw = quantize_weight(w, method)
    err = np.abs(np.asarray(dequantize(qw)) - np.asarray(w))
    if method == "int8":  # half a step of the channel's scale
        bound = np.asarray(qw.scale)[:, None, :] / 2
    elif method == "int4":
        bound = np.repeat(np.asarray(qw.scales, np.float32), qw.group_size, axis=-2) / 2
    elif method == "mxfp4":  # e2m1 of w / scale: steps of 0.5 up to 2, 1 up to 4, 2 up to 6; half a step
        assert qw.scales.dtype == jnp.uint8 and qw.zeros is None  # E8M0 exponents, as the checkpoints store them
        scale = np.repeat(np.exp2(np.asarray(qw.scales, np.float64) - 127), qw.group_size, axis=-2)
        v = np.abs(np.asarray(w)) / scale
        assert v.max() <= 6 and (v.reshape(2, 8, 32, 96).max(axis=2) > 3).all()  # the smallest power of two
        bound = scale * np.where(v <= 2, 0.25, np.where(v <= 4, 0.5, 1.0))
    else:  # e4m3: 3 mantissa bits, relative half-step 2^-4 (subnormals: the smallest step, 2^-9 * scale)
        bound = np.maximum(np.abs(np.asarray(w)) * 2.0**-4, 2.0**-10 * np.asarray(qw.scale)[:, None, :])
    assert (err <= bound * (1 + 1e-5) + 1e-9).all(), f"largest error over bound {np.max(err / bound):.3f}"
    assert {Int8Weight: "int8", Int4Weight: "int4", Fp8Weight: "fp8"}[type(qw)] == method.replace("mxfp4", "int4")
    assert (getattr(qw, "codes", None) == "e2m1") == (method == "mxfp4")


def test_int4_groups_divide_an_input_size_that_128_does_not():
    """SmolLM2-135M's hidden size 576 is no multiple of 128: groups of 64 there; sizes off 32 are refused."""
    rng = np.random.default_rng()
    w = jnp.asarray(rng.standard_normal((576, 64)) * 0.02, jnp.float32)
    qw = quantize_weight(w, "int4")
    assert qw.group_size == 64 and qw.scales.shape == (9, 64)
    bound = np.repeat(np.asarray(qw.scales, np.float32), 64, axis=-2) / 2
    assert (np.abs(np.asarray(dequantize(qw)) - np.asarray(w)) <= bound * (1 + 1e-5) + 1e-9).all()
    with pytest.raises(QuantizationError, match="multiple of 32 rows, got 200"):
        quantize_weight(jnp.zeros((200, 64)), "int4")


def test_e8m0_exponents_read_as_their_powers_of_two():
    """MXFP4's scales: every uint8 E8M0 exponent ``e`` is ``2 ** (e - 127)`` exactly (0: the float32 subnormal
    2^-127), 255 (E8M0's NaN) infinity; a weight of all zeros gets the exponent of 1."""
    e = np.arange(256, dtype=np.uint8)
    got = np.asarray(jax.jit(qmm.e8m0_as_f32)(jnp.asarray(e)), np.float64)
    np.testing.assert_array_equal(got[:255], np.exp2(e[:255].astype(np.float64) - 127))
    assert np.isinf(got[255])
    assert (np.asarray(quantize_weight(jnp.zeros((2, 64, 8)), "mxfp4").scales) == 127).all()
    # A checkpoint's exponents above what the kernels take are refused (both loaders ask this check).
    from models.quantization import check_mxfp4_exponents

    check_mxfp4_exponents(np.array([0, 127, qmm.MXFP4_MAX_EXPONENT], np.uint8), "w_scales")
    with pytest.raises(QuantizationError, match="w_scales holds exponent 241 .* the kernels take at most 240"):
        check_mxfp4_exponents(np.array([3, 241], np.uint8), "w_scales")
    # Values halfway between two FP4 values round to the even one (OCP's round-half-to-even), either sign.
    halfway = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    w = np.concatenate([halfway, -halfway, np.zeros(16)])[:, None]  # one group, its largest magnitude 6: scale 1
    got = np.asarray(dequantize(quantize_weight(jnp.asarray(w, jnp.float32), "mxfp4")))[:16, 0]
    np.testing.assert_array_equal(got, np.array([0, 1, 1, 2, 2, 4, 4, 6, 0, -1, -1, -2, -2, -4, -4, -6]))


def test_the_kernels_mxfp4_tile_decoding_is_exact():
    """``e2m1_tile_weights`` (FP4 codes read through float16's bits, the scale's exponent moved up by 14): every byte's
    two codes times every power of two the kernels take, exactly, signs of zero included; float32 subnormal products
    (exponents 0 and 1) left out, which XLA's CPU flushes whatever the decoding."""
    values = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
    b = np.arange(256, dtype=np.uint8)[:, None]
    e = np.arange(2, qmm.MXFP4_MAX_EXPONENT + 1, dtype=np.uint8)[None, :]
    low, high = jax.jit(qmm.e2m1_tile_weights, static_argnums=2)(jnp.asarray(b), jnp.asarray(e), jnp.float32)
    for got, codes in ((low, b & 15), (high, b >> 4)):
        want = values[codes] * np.exp2(e.astype(np.float64) - 127)
        np.testing.assert_array_equal(np.asarray(got, np.float64), want)
        assert (np.signbit(np.asarray(got)) == np.signbit(want)).all()


def test_mxfp4_quantizes_only_a_mixtures_experts():
    """``quantization="mxfp4"`` (gpt-oss's form): a mixture's experts 4-bit, its other matrices dense; a model
    without experts is refused by name, as is an input size off 32."""
    from models.quantization import quantize_params

    rng = np.random.default_rng()
    dense = {"wq": jnp.asarray(rng.standard_normal((2, 64, 64)), jnp.float32)}
    experts = {"expert_down": jnp.asarray(rng.standard_normal((2, 4, 64, 64)), jnp.float32), **dense}
    out = quantize_params({"layers": dict(experts)}, "mxfp4")["layers"]
    assert out["expert_down"].codes == "e2m1" and out["wq"] is experts["wq"]
    with pytest.raises(QuantizationError, match="this model has none"):
        quantize_params({"layers": dict(dense)}, "mxfp4")
    with pytest.raises(QuantizationError, match="multiple of 32, got 48"):
        quantize_weight(jnp.zeros((48, 64)), "mxfp4")


# ------------------------------------------------------------------ whole models


def ragged_batch(config: ModelConfig, rng, lengths=(5, 17, 9), block_size=8):
    """One prefill step of several prompts, every position's logits."""
    tokens, positions, slots, cu, tables = [], [], [], [0], []
    page = 1
    for n in lengths:
        tokens += rng.integers(0, config.vocab_size, n).tolist()
        positions += list(range(n))
        pages = list(range(page, page + -(-n // block_size)))
        page += len(pages)
        slots += [pages[i // block_size] * block_size + i % block_size for i in range(n)]
        tables.append(pages + [0] * (8 - len(pages)))
        cu.append(cu[-1] + n)
    T = cu[-1]
    batch = ModelInput(
        token_ids=jnp.asarray(tokens, jnp.int32), positions=jnp.asarray(positions, jnp.int32),
        slot_mapping=jnp.asarray(slots, jnp.int32), cu_q_lens=jnp.asarray(cu, jnp.int32),
        kv_lens=jnp.asarray(lengths, jnp.int32), block_tables=jnp.asarray(tables, jnp.int32),
        num_seqs=jnp.asarray([len(lengths)], jnp.int32), logits_indices=jnp.arange(T, dtype=jnp.int32))
    return batch, page


def logits_of(loaded, batch, num_pages, **kwargs):
    cache = make_kv_cache(loaded.config, num_pages, 8, kwargs.pop("kv_dtype", jnp.float32))
    logits, _ = forward(loaded.params, cache, batch, config=loaded.config, **kwargs)
    return np.asarray(logits)


def relative_error(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    write_tiny_checkpoint(path, "llama", seed=int(np.random.default_rng().integers(1 << 20)))
    return str(path)


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_quantized_logits_close_to_dense_and_kernel_matches_xla(tiny, method):
    rng = np.random.default_rng()
    dense = load_model(tiny, dtype="float32")
    quant = load_model(tiny, dtype="float32", quantization=method)
    assert quant.quantization == method
    assert all(not isinstance(quant.params["layers"][n], jax.Array) for n in QUANTIZED_LAYER_WEIGHTS)
    batch, pages = ragged_batch(dense.config, rng)
    reference = logits_of(dense, batch, pages + 1)
    xla = logits_of(quant, batch, pages + 1, linear_backend=LinearBackend(kernel="xla"))
    err = relative_error(xla, reference)
    assert err < LOGIT_TOLERANCE[method], f"{method}: logits differ from the dense model by {err:.3f}"
    kernel = logits_of(quant, batch, pages + 1, linear_backend=LinearBackend(kernel="pallas", interpret=True))
    # fp8: XLA's fp8 dots, and the MLP's middle in one kernel (pallas_kernels.fp8_activation), whose exp rounds
    # otherwise: a hidden value may land on the next fp8 step
    assert relative_error(kernel, xla) < (2e-2 if method == "fp8" else 1e-5)


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense_tied")
    write_tiny_checkpoint(path, "llama3_tied", seed=int(np.random.default_rng().integers(1 << 20)))
    return str(path)


@pytest.mark.parametrize("tied", [False, True])
def test_int8_lm_head_is_int8_and_keeps_logits_close(tiny, tiny_tied, tied, monkeypatch):
    """``quantization="int8"`` makes the LM head int8 K-major ``[V, H]`` with a scale per vocab row (a tied model
    keeps its embedding for the lookup and gets an int8 copy as ``lm_head``): the logits stay within the int8
    tolerance, the head alone within ``INT8_HEAD_TOLERANCE``, float32 under bf16 weights too; one decode row runs
    the head through the K-major GEMV (interpreted) with XLA's logits. ``$PAGEDJAX_INT8_LM_HEAD=0`` keeps the
    dense head."""
    path = tiny_tied if tied else tiny
    rng = np.random.default_rng()
    dense = load_model(path, dtype="float32")
    config = dense.config
    assert config.tie_word_embeddings == tied
    V, H = config.vocab_size, config.hidden_size
    quant = load_model(path, dtype="float32", quantization="int8")
    head = quant.params["lm_head"]
    assert isinstance(head, Int8KMajorWeight) and head.q.dtype == jnp.int8
    assert head.q.shape == (V, H) and head.scale.shape == (V,)
    assert quant.params["embed"].dtype == jnp.float32 and quant.params["embed"].shape == (V, H)
    dense_head = dense.params["embed"].T if tied else dense.params["lm_head"]
    np.testing.assert_array_equal(np.asarray(dequantize(head)),
                                  np.asarray(dequantize(quantize_weight(dense_head, "int8", int8_layout="nk"))))

    batch, pages = ragged_batch(config, rng)
    reference = logits_of(dense, batch, pages + 1)
    err = relative_error(logits_of(quant, batch, pages + 1), reference)
    assert err < LOGIT_TOLERANCE["int8"], f"int8 layers and head: logits differ from the dense model by {err:.3f}"
    head_only = load_model(path, dtype="float32")
    quantize_lm_head(head_only.params)
    err = relative_error(logits_of(head_only, batch, pages + 1), reference)
    assert err < INT8_HEAD_TOLERANCE, f"the int8 head alone moved the logits by {err:.4f}"

    one_row, pages = ragged_batch(config, rng, lengths=(1,))
    gemv_shapes = []
    gemv = qmm.int8_kmajor_matmul
    monkeypatch.setattr(qmm, "int8_kmajor_matmul", lambda x, qt, *a, **k: gemv_shapes.append(qt.shape) or gemv(
        x, qt, *a, **k))
    kernel = logits_of(quant, one_row, pages + 1, linear_backend=LinearBackend(kernel="pallas", interpret=True))
    assert (V, H) in gemv_shapes
    xla = logits_of(quant, one_row, pages + 1, linear_backend=LinearBackend(kernel="xla"))
    assert relative_error(kernel, xla) < 1e-5
    bf16 = load_model(path, dtype="bfloat16", quantization="int8")
    logits, _ = forward(bf16.params, make_kv_cache(config, pages + 1, 8, jnp.bfloat16), one_row, config=config)
    assert logits.dtype == jnp.float32 and isinstance(bf16.params["lm_head"], Int8KMajorWeight)

    monkeypatch.setenv("PAGEDJAX_INT8_LM_HEAD", "0")
    kept = load_model(path, dtype="float32", quantization="int8")
    assert ("lm_head" not in kept.params) if tied else kept.params["lm_head"].dtype == jnp.float32
    assert all(isinstance(kept.params["layers"][n], Int8KMajorWeight) for n in QUANTIZED_LAYER_WEIGHTS)


def test_int8_lm_head_switch_follows_the_environment(tiny, tmp_path, monkeypatch):
    """``$PAGEDJAX_INT8_LM_HEAD``: unset, on for int8 only; "1" turns it on for every method (a load-time int4
    model, an AWQ checkpoint), "0" off; never for an unquantized model; a bad value is refused."""
    assert int8_lm_head("int8") and not any(int8_lm_head(m) for m in (None, "int4", "awq", "gptq", "fp8"))
    assert isinstance(load_model(tiny, dtype="float32", quantization="int4").params["lm_head"], jax.Array)
    monkeypatch.setenv("PAGEDJAX_INT8_LM_HEAD", "1")
    assert all(int8_lm_head(m) for m in QUANTIZATION_METHODS) and not int8_lm_head(None)
    assert isinstance(load_model(tiny, dtype="float32", quantization="int4").params["lm_head"], Int8KMajorWeight)
    awq = str(tmp_path / "awq")
    write_quantized_checkpoint(tiny, awq, "awq", np.random.default_rng())
    loaded = load_model(awq, dtype="float32")
    assert isinstance(loaded.params["lm_head"], Int8KMajorWeight) and isinstance(loaded.params["layers"]["wq"],
                                                                                 Int4Weight)
    assert isinstance(load_model(tiny, dtype="float32").params["lm_head"], jax.Array)
    monkeypatch.setenv("PAGEDJAX_INT8_LM_HEAD", "0")
    assert not int8_lm_head("int8")
    pallas = LinearBackend(kernel="pallas")  # a vocabulary the kernels cannot tile (N % 16) goes to XLA's dot
    assert not pallas.use_kernel(quantize_weight(jnp.ones((64, 40)), "int8", int8_layout="nk"), 1)
    assert pallas.use_kernel(quantize_weight(jnp.ones((64, 48)), "int8", int8_layout="nk"), 1)
    monkeypatch.setenv("PAGEDJAX_INT8_LM_HEAD", "yes")
    with pytest.raises(ValueError, match="PAGEDJAX_INT8_LM_HEAD"):
        load_model(tiny, dtype="float32", quantization="int8")


def test_kernel_row_limit_follows_the_environment(monkeypatch):
    """``$PAGEDJAX_MAX_KERNEL_ROWS`` moves the row count up to which int4 weights go through the Pallas kernel (the
    dequantized weight and XLA's dot above it); a bad value is refused."""
    w = quantize_weight(jnp.zeros((64, 32), jnp.float32), "int4")
    assert LinearBackend(kernel="pallas").max_kernel_rows == 256
    monkeypatch.setenv("PAGEDJAX_MAX_KERNEL_ROWS", "64")
    backend = LinearBackend(kernel="pallas")
    assert backend.use_kernel(w, 64) and not backend.use_kernel(w, 65)
    for bad in ("0", "many"):
        monkeypatch.setenv("PAGEDJAX_MAX_KERNEL_ROWS", bad)
        with pytest.raises(ValueError, match="PAGEDJAX_MAX_KERNEL_ROWS"):
            LinearBackend()


def test_int8_stored_k_major_is_the_same_weight_and_model(tiny, monkeypatch):
    """``$PAGEDJAX_INT8_LAYOUT=nk``: load-time int8 weights stored ``[N, K]`` dequantize to exactly the ``[K, N]``
    layout's weights, the model's logits equal that layout's (XLA's dot and the K-major kernel, interpreted,
    one decode row), q/k/v and gate/up still join, and a bad value is refused."""
    rng = np.random.default_rng()
    w = jnp.asarray(rng.standard_normal((2, 64, 96)) * 0.02, jnp.float32)
    kn, nk = quantize_weight(w, "int8"), quantize_weight(w, "int8", int8_layout="nk")
    assert isinstance(nk, Int8KMajorWeight) and nk.q.shape == (2, 96, 64)
    np.testing.assert_array_equal(np.asarray(dequantize(nk)), np.asarray(dequantize(kn)))
    row_major = load_model(tiny, dtype="float32", quantization="int8")
    monkeypatch.setenv("PAGEDJAX_INT8_LAYOUT", "nk")
    k_major = load_model(tiny, dtype="float32", quantization="int8")
    assert all(isinstance(k_major.params["layers"][n], Int8KMajorWeight) for n in QUANTIZED_LAYER_WEIGHTS)
    config = row_major.config
    for lengths in ((5, 17, 9), (1,)):  # a prompt step, and one decode row (the GEMV)
        batch, pages = ragged_batch(config, rng, lengths=lengths)
        want = logits_of(row_major, batch, pages + 1)
        assert relative_error(logits_of(k_major, batch, pages + 1), want) < 1e-5
        kernel = logits_of(k_major, batch, pages + 1, linear_backend=LinearBackend(kernel="pallas", interpret=True))
        assert relative_error(kernel, want) < 1e-5
    from models.llama import fuse_projections
    fused = fuse_projections({"layers": dict(k_major.params["layers"])})["layers"]
    assert isinstance(fused["w_gate_up"], Int8KMajorWeight)
    assert fused["w_gate_up"].q.shape[-2] == 2 * config.intermediate_size
    monkeypatch.setenv("PAGEDJAX_INT8_LAYOUT", "kmajor")
    with pytest.raises(ValueError, match="PAGEDJAX_INT8_LAYOUT"):
        load_model(tiny, dtype="float32", quantization="int8")


def add_norm_launches(loaded, batch, num_pages, backend) -> int:
    """How many ``add_norm_rows`` kernels a forward step traces (a residual add with its norm deferred)."""
    cache = make_kv_cache(loaded.config, num_pages, 8, jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, c: forward(p, c, batch, config=loaded.config, linear_backend=backend))(
        loaded.params, cache)
    return pallas_launches(jaxpr, "add_norm_rows")


@pytest.mark.parametrize("method", ["int8", "int4", None])
def test_one_row_steps_leave_each_norm_to_the_gemvs_with_the_same_logits(tiny, method, monkeypatch):
    """Unrolled layers at one decode row with every q/k/v and gate/up matmul a Pallas GEMV (interpreted): each
    residual add and its RMSNorm are one ``add_norm_rows`` launch and the GEMVs apply the norm; the logits equal
    XLA's norms' within float32 rounding. Prompt steps, XLA's matmuls, ``$PAGEDJAX_DEFER_NORMS=0`` and scanned
    layers keep XLA's norms."""
    import dataclasses

    from models.llama import layout_layers

    rng = np.random.default_rng()
    loaded = load_model(tiny, dtype="float32", quantization=method)
    unrolled = dataclasses.replace(loaded, params=layout_layers(loaded.params, unroll=True, fuse=True))
    pallas = LinearBackend(kernel="pallas", interpret=True)
    assert pallas.defers_norms(unrolled.params["layers"][0])
    assert not LinearBackend(kernel="xla").defers_norms(unrolled.params["layers"][0])
    one_row, pages = ragged_batch(loaded.config, rng, lengths=(1,))
    layers = loaded.config.num_layers
    assert add_norm_launches(unrolled, one_row, pages + 1, pallas) == 2 * layers
    deferred = logits_of(unrolled, one_row, pages + 1, linear_backend=pallas)
    xla_norms = logits_of(unrolled, one_row, pages + 1, linear_backend=dataclasses.replace(pallas, defer_norms=False))
    # (int4: the GEMV's factored sum s (sum x q - z sum x) cancels, and its x is the unnormed row here)
    tolerance = 1e-4 if method == "int4" else 1e-5
    assert relative_error(deferred, xla_norms) < tolerance
    assert relative_error(deferred, logits_of(loaded, one_row, pages + 1, linear_backend=pallas)) < tolerance
    prompt, pages = ragged_batch(loaded.config, rng, lengths=(5, 3))
    for backend, params in ((pallas, unrolled), (LinearBackend(kernel="xla"), unrolled), (pallas, loaded)):
        assert add_norm_launches(params, prompt if params is unrolled and backend is pallas else one_row,
                                 pages + 1, backend) == 0
    monkeypatch.setenv("PAGEDJAX_DEFER_NORMS", "0")
    assert not LinearBackend(kernel="pallas").defers_norms(unrolled.params["layers"][0])


def test_int8_gate_up_rows_in_turn_give_one_gated_launch_and_the_same_logits(tiny, monkeypatch):
    """int8 K-major gate/up joined with its gate and up rows in turn (``interleave_gate_up``): a one-row step's MLP
    middle is one gated GEMV a layer (``silu(gate) * up`` in its epilogue, the norm deferred into it too), and every
    other reader gets ``[gate | up]`` as before: the logits at one row (Pallas, interpreted) and of a prompt step
    (XLA's dot) equal those of the plain join (``$PAGEDJAX_GATED_GEMV=0``), and ``dequantize`` gives its weight."""
    import dataclasses

    from models.llama import layout_layers
    from models.quantization import dequantize

    loaded = load_model(tiny, dtype="float32", quantization="int8")
    interleaved = dataclasses.replace(loaded, params=layout_layers(loaded.params, unroll=True, fuse=True))
    monkeypatch.setenv("PAGEDJAX_GATED_GEMV", "0")
    plain = dataclasses.replace(loaded, params=layout_layers(loaded.params, unroll=True, fuse=True))
    joined, plain_joined = (m.params["layers"][0]["w_gate_up"] for m in (interleaved, plain))
    assert joined.gate_up_group == qmm.GATE_UP_GROUP and plain_joined.gate_up_group == 0
    np.testing.assert_array_equal(np.asarray(dequantize(joined)), np.asarray(dequantize(plain_joined)))
    rng = np.random.default_rng()
    pallas = LinearBackend(kernel="pallas", interpret=True)
    assert pallas.runs_gated_gemv(joined, 1) and not pallas.runs_gated_gemv(joined, 2)
    assert not LinearBackend(kernel="xla").runs_gated_gemv(joined, 1) and not pallas.runs_gated_gemv(plain_joined, 1)
    one_row, pages = ragged_batch(loaded.config, rng, lengths=(1,))
    cache = make_kv_cache(loaded.config, pages + 1, 8, jnp.float32)
    for model, launches in ((interleaved, loaded.config.num_layers), (plain, 0)):
        jaxpr = jax.make_jaxpr(lambda p, c: forward(p, c, one_row, config=loaded.config, linear_backend=pallas))(
            model.params, cache)
        assert pallas_launches(jaxpr, "int8_kmajor_gated_gemv") == launches
    one_row_logits = [logits_of(m, one_row, pages + 1, linear_backend=pallas) for m in (interleaved, plain)]
    assert relative_error(*one_row_logits) < 1e-5
    prompt, pages = ragged_batch(loaded.config, rng, lengths=(5, 3))
    prompt_logits = [logits_of(m, prompt, pages + 1, linear_backend=LinearBackend(kernel="xla"))
                     for m in (interleaved, plain)]
    np.testing.assert_allclose(*prompt_logits, rtol=1e-5, atol=1e-5)


def test_engine_with_pallas_matmuls_on_cpu_defers_norms_and_keeps_greedy_tokens(tiny, monkeypatch):
    """``linear_backend="pallas"`` with unrolled layers on the CPU, one sequence (one-row decode steps): the deferred
    norms' kernel runs interpreted like the GEMVs (it was compiled, and failed, when the backend left ``interpret``
    unset), and the greedy int8 tokens are those of XLA's norms."""
    tokens = {}
    for switch in ("0", "1"):
        monkeypatch.setenv("PAGEDJAX_DEFER_NORMS", switch)
        llm = LLM(tiny, dtype="float32", quantization="int8", linear_backend="pallas", unroll_layers=True,
                  max_num_seqs=1, max_model_len=64, skip_tokenizer_init=True, precompile_steps=False)
        out = llm.generate([{"prompt_token_ids": [5, 17, 33, 9, 81, 2, 44]}],
                           SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        tokens[switch] = out[0].outputs[0].token_ids
        llm.shutdown()
    assert tokens["1"] == tokens["0"] and len(tokens["1"]) == 4


def test_float16_keeps_xlas_norms_at_one_row(tiny):
    """float16 rows ``x * weight`` are read before the norm scales them, and may leave its range: no deferral."""
    import dataclasses

    from models.llama import layout_layers

    loaded = load_model(tiny, dtype="float16")
    unrolled = dataclasses.replace(loaded, params=layout_layers(loaded.params, unroll=True, fuse=True))
    one_row, pages = ragged_batch(loaded.config, np.random.default_rng(), lengths=(1,))
    assert add_norm_launches(unrolled, one_row, pages + 1, LinearBackend(kernel="pallas", interpret=True)) == 0


def test_fp8_dot_in_the_activation_type_keeps_logits_close(tiny, monkeypatch):
    """The fp8 dot returns bf16 before the scales by default (one more rounding) or float32
    (``$PAGEDJAX_FP8_DOT_OUTPUT``): the logits stay close."""
    rng = np.random.default_rng()
    quant = load_model(tiny, dtype="bfloat16", quantization="fp8")
    batch, pages = ragged_batch(quant.config, rng)
    default = logits_of(quant, batch, pages + 1)
    monkeypatch.setenv("PAGEDJAX_FP8_DOT_OUTPUT", "float32")
    err = relative_error(default, logits_of(quant, batch, pages + 1))
    assert err < 0.05, f"bf16 fp8-dot output moved the logits by {err:.3f}"
    monkeypatch.setenv("PAGEDJAX_FP8_DOT_OUTPUT", "float16x")
    with pytest.raises(ValueError, match="PAGEDJAX_FP8_DOT_OUTPUT"):
        logits_of(quant, batch, pages + 1)


# ------------------------------------------------------------------ AWQ / GPTQ / FP8 checkpoints on disk


def encode_linear(tensors: dict, prefix: str, method: str, rng, act_order=False) -> np.ndarray:
    """Replace the Linear ``{prefix}weight`` of ``tensors`` by ``method``'s tensors of random grid values;
    returns the dense ``[K, N]`` weight they encode."""
    N, K = tensors.pop(prefix + "weight").shape
    # Block-wise fp8: a scale per 32 x 32 block here, named weight_scale_inv by Qwen3 and DeepSeek, weight_scale by
    # llm-compressor.
    if method in ("fp8-block", "ct-fp8-block"):
        q = np.asarray(jnp.asarray(rng.standard_normal((N, K)), jnp.float8_e4m3fn))
        scale = rng.uniform(0.01, 0.03, (-(-N // 32), -(-K // 32))).astype(np.float32)
        name = "weight_scale" if method.startswith("ct-") else "weight_scale_inv"
        tensors[prefix + "weight"], tensors[prefix + name] = q, scale
        return (q.astype(np.float32) * np.repeat(np.repeat(scale, 32, 0), 32, 1)[:N, :K]).T
    if method == "fp8":
        q = np.asarray(jnp.asarray(rng.standard_normal((N, K)), jnp.float8_e4m3fn))
        scale = rng.uniform(0.01, 0.03, (N, 1)).astype(np.float32)
        tensors[prefix + "weight"], tensors[prefix + "weight_scale"] = q, scale
        return (q.astype(np.float32) * scale).T
    if method.startswith("ct-int"):  # compressed-tensors: ct-int8, ct-int4 (symmetric), ct-int4-zp (zero points)
        return encode_compressed_tensors(tensors, prefix, method, rng, N, K, act_order)
    if method == "gptq8":  # 8-bit GPTQ (Qwen's GPTQ-Int8): qweight [K/4, N], qzeros [K/g, N/4] (v1: zero - 1), act-order
        values, zeros = rng.integers(0, 256, (K, N)), rng.integers(100, 156, (K // GROUP, N))
        scales = rng.uniform(1e-4, 1e-3, (K // GROUP, N)).astype(np.float16).astype(np.float32)
        g_idx = rng.permutation(np.arange(K) // GROUP) if act_order else np.arange(K) // GROUP
        tensors.update({prefix + "qweight": pack_int32_signed(values - 128, 8, 0),
                        prefix + "qzeros": pack_int32_signed(zeros - 1 - 128, 8, -1),
                        prefix + "scales": scales.astype(np.float16), prefix + "g_idx": g_idx.astype(np.int32)})
        return (values - zeros[g_idx]) * scales[g_idx]
    if method in ("gptq2", "gptq3"):  # AutoGPTQ's 2- and 3-bit layouts (act-order too)
        bits = int(method[-1])
        values, zeros = rng.integers(0, 1 << bits, (K, N)), rng.integers(1, 1 << bits, (K // GROUP, N))
        scales = rng.uniform(0.005, 0.05, (K // GROUP, N)).astype(np.float16).astype(np.float32)
        g_idx = rng.permutation(np.arange(K) // GROUP) if act_order else np.arange(K) // GROUP
        tensors.update({prefix + "qweight": pack_int32_stream(values, bits, 0),
                        prefix + "qzeros": pack_int32_stream(zeros - 1, bits, -1),
                        prefix + "scales": scales.astype(np.float16), prefix + "g_idx": g_idx.astype(np.int32)})
        return (values - zeros[g_idx]) * scales[g_idx]
    values, zeros, scales = random_int4(rng, K, N, zero_low=1)
    g_idx = np.arange(K) // GROUP
    if method == "awq":
        packed = awq_tensors(values, zeros, scales)
    else:
        g_idx = rng.permutation(g_idx) if act_order else g_idx
        packed = gptq_tensors(values, zeros, scales, g_idx)
    tensors.update({prefix + k: v for k, v in packed.items()})
    return (values - zeros[g_idx]) * scales[g_idx]


def encode_compressed_tensors(tensors: dict, prefix: str, method: str, rng, N: int, K: int, act_order: bool):
    """``encode_linear`` for compressed-tensors' pack-quantized layouts; the dense ``[K, N]`` weight they encode."""
    if method in ("ct-int8", "ct-int8-w8a8"):
        q, scale = rng.integers(-128, 128, (N, K)), rng.uniform(0.001, 0.01, (N, 1)).astype(np.float16)
        if method == "ct-int8":
            tensors.update({prefix + k: v for k, v in compressed_tensors_tensors(q, scale, bits=8).items()})
        else:  # int-quantized: the int8 weight as it is
            tensors.update({prefix + "weight": q.astype(np.int8), prefix + "weight_scale": scale})
        return (q * scale.astype(np.float32)).T
    group = K if method == "ct-int4-channel" else GROUP
    q = rng.integers(-8, 8, (N, K))
    scale = rng.uniform(0.005, 0.05, (N, K // group)).astype(np.float16)
    zero = rng.integers(-8, 8, (N, K // group)) if method == "ct-int4-zp" else np.zeros((N, K // group), np.int64)
    g_idx = rng.permutation(np.arange(K) // group) if act_order else np.arange(K) // group
    packed = compressed_tensors_tensors(q, scale, zero if method == "ct-int4-zp" else None,
                                        g_idx if act_order else None)
    tensors.update({prefix + k: v for k, v in packed.items()})
    return ((q - zero[:, g_idx]) * scale.astype(np.float32)[:, g_idx]).T


def compressed_tensors_config(method: str, act_order=False) -> dict:
    """llm-compressor's ``quantization_config`` for W4A16 (group scales, ``ct-int4-zp``: asymmetric,
    ``ct-int4-channel``: one scale a channel), W8A16, or fp8 weights with 32 x 32 block scales and dynamic
    activations (``ct-fp8-block``, its FP8_BLOCK scheme)."""
    activations = None
    if method == "ct-fp8-block":
        weights = dict(num_bits=8, type="float", symmetric=True, strategy="block", block_structure=[32, 32])
        activations = dict(num_bits=8, type="float", symmetric=True, strategy="group", group_size=128, dynamic=True)
    elif method in ("ct-int8", "ct-int8-w8a8"):
        weights = dict(num_bits=8, type="int", symmetric=True, strategy="channel")
        if method == "ct-int8-w8a8":  # llm-compressor's W8A8: int8 activations per token, run here unquantized
            activations = dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True)
    elif method == "ct-int4-channel":
        weights = dict(num_bits=4, type="int", symmetric=True, strategy="channel")
    else:
        weights = dict(num_bits=4, type="int", symmetric=method != "ct-int4-zp", strategy="group", group_size=GROUP,
                       actorder="group" if act_order else None)
    return dict(quant_method="compressed-tensors", ignore=["lm_head"], quantization_status="compressed",
                format={"ct-fp8-block": "float-quantized", "ct-int8-w8a8": "int-quantized"}.get(method, "pack-quantized"),
                config_groups={"group_0": dict(targets=["Linear"], weights=weights, input_activations=activations)})


def mark_quantized(path: str, method: str, act_order=False) -> None:
    """Write ``method``'s ``quantization_config`` into the checkpoint's config.json."""
    config = json.load(open(os.path.join(path, "config.json")))
    config["quantization_config"] = compressed_tensors_config(method, act_order) if method.startswith("ct-") else {
        "awq": dict(quant_method="awq", bits=4, group_size=GROUP, zero_point=True, version="gemm"),
        "gptq": dict(quant_method="gptq", bits=4, group_size=GROUP, desc_act=act_order, sym=False),
        "gptq8": dict(quant_method="gptq", bits=8, group_size=GROUP, desc_act=act_order, sym=False),
        "gptq2": dict(quant_method="gptq", bits=2, group_size=GROUP, desc_act=act_order, sym=False),
        "gptq3": dict(quant_method="gptq", bits=3, group_size=GROUP, desc_act=act_order, sym=False),
        "fp8": dict(quant_method="fp8", activation_scheme="dynamic"),
        "fp8-block": dict(quant_method="fp8", activation_scheme="dynamic", weight_block_size=[32, 32]),
    }[method]
    json.dump(config, open(os.path.join(path, "config.json"), "w"))


def write_quantized_checkpoint(dense_path: str, out: str, method: str, rng, act_order=False, left_dense=()):
    """The dense checkpoint's layer matrices replaced by ``method``'s tensors of random grid values, but for the
    ``(our name, layer)`` pairs of ``left_dense``. Returns the dense ``{our name: [L, K, N]}`` weights the new
    checkpoint encodes (those of the matrices it quantized in every layer)."""
    shutil.copytree(dense_path, out)
    tensors = load_file(os.path.join(out, "model.safetensors"))
    num_layers = json.load(open(os.path.join(out, "config.json")))["num_hidden_layers"]
    encoded = {name: [encode_linear(tensors, f"model.layers.{i}.{hf}.", method, rng, act_order)
                      for i in range(num_layers) if (name, i) not in left_dense] for name, hf in HF_LINEAR.items()}
    encoded = {name: ws for name, ws in encoded.items() if len(ws) == num_layers}
    save_file(tensors, os.path.join(out, "model.safetensors"))
    mark_quantized(out, method, act_order)
    return {n: jnp.asarray(np.stack(ws), jnp.float32) for n, ws in encoded.items()}


@pytest.mark.parametrize("layout,act_order", [("awq", False), ("gptq", False), ("gptq", True), ("gptq2", False),
                                              ("gptq3", True), ("fp8", False),
                                              ("fp8-block", False), ("ct-int4", False), ("ct-int4-zp", True),
                                              ("ct-int4-channel", False), ("ct-int8", False), ("ct-int8-w8a8", False),
                                              ("ct-fp8-block", False)])
def test_quantized_checkpoint_loads_the_weights_it_encodes(tiny, tmp_path, layout, act_order):
    """Exactly the weights it encodes (2- and 3-bit GPTQ too, as int4); block-wise fp8 within one e4m3 rounding
    (re-quantized per channel).
    compressed-tensors' pack-quantized checkpoints (W4A16 symmetric, with zero points and act-order; W8A16) run
    as int4 / int8, their LM head as stored; its block-wise fp8 (FP8_BLOCK) as the fp8 one."""
    rng = np.random.default_rng()
    path = str(tmp_path / layout)
    method = {"ct-int4": "int4", "ct-int4-zp": "int4", "ct-int4-channel": "int4", "ct-int8": "int8",
              "ct-int8-w8a8": "int8",
              "ct-fp8-block": "fp8", "gptq2": "gptq", "gptq3": "gptq"}.get(layout, layout.removesuffix("-block"))
    encoded = write_quantized_checkpoint(tiny, path, layout, rng, act_order=act_order)
    assert CheckpointQuantization.from_checkpoint(path).method == method
    quant = load_model(path, dtype="float32")  # the method comes from config.json
    assert quant.quantization == method
    assert not is_quantized(quant.params.get("lm_head", quant.params["embed"]))
    for name, dense in encoded.items():
        np.testing.assert_allclose(np.asarray(dequantize(quant.params["layers"][name])), np.asarray(dense),
                                   rtol=2.0 ** -4 if layout.endswith("fp8-block") else 1e-6, atol=1e-7, err_msg=name)
    # The model runs on them: same logits as a dense model holding the decoded weights.
    decoded = load_model(tiny, dtype="float32")
    decoded.params["layers"].update(encoded)
    batch, pages = ragged_batch(decoded.config, rng)
    tolerance = LOGIT_TOLERANCE["fp8"] if method == "fp8" else 1e-5  # fp8 also quantizes the activations
    assert relative_error(logits_of(quant, batch, pages + 1), logits_of(decoded, batch, pages + 1)) < tolerance
    # And the engine serves it.
    llm = LLM(path, dtype="float32", quantization="compressed-tensors" if layout.startswith("ct-") else method,
              skip_tokenizer_init=True, max_model_len=64)
    out = llm.generate([[1, 2, 3, 4, 5]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)
    llm.shutdown()
    assert len(out[0].outputs[0].token_ids) == 6


@pytest.mark.parametrize("layout", ["awq", "fp8"])
def test_a_matrix_left_unquantized_in_every_layer_loads_plain(tiny, tmp_path, layout):
    """A checkpoint whose quantization_config leaves a module out (AWQ's ``modules_to_not_convert``, llm-compressor's
    ``ignore``, GPTQModel's ``dynamic``) stores it as a plain weight: in every layer it loads so, beside the others
    quantized, and the logits are those of the decoded weights; in some layers only it is refused by name."""
    rng = np.random.default_rng()
    num_layers = ModelConfig.from_pretrained(tiny).num_layers
    path = str(tmp_path / layout)
    encoded = write_quantized_checkpoint(tiny, path, layout, rng, left_dense={("w_down", i) for i in range(num_layers)})
    assert "w_down" not in encoded
    quant = load_model(path, dtype="float32")
    assert not is_quantized(quant.params["layers"]["w_down"]) and is_quantized(quant.params["layers"]["w_up"])
    decoded = load_model(tiny, dtype="float32")
    decoded.params["layers"].update(encoded)
    batch, pages = ragged_batch(decoded.config, rng)
    tolerance = LOGIT_TOLERANCE["fp8"] if layout == "fp8" else 1e-5
    assert relative_error(logits_of(quant, batch, pages + 1), logits_of(decoded, batch, pages + 1)) < tolerance
    partly = str(tmp_path / "partly")
    write_quantized_checkpoint(tiny, partly, layout, rng, left_dense={("w_down", num_layers - 1)})
    with pytest.raises(CheckpointError, match=f"stores model.layers.{num_layers - 1}.mlp.down_proj unquantized .* "
                                              "other layers quantized"):
        load_model(partly, dtype="float32")


@pytest.mark.parametrize("act_order", [False, True])
def test_8_bit_gptq_runs_as_int8_within_half_a_channel_step(tiny, tmp_path, act_order):
    """8-bit GPTQ checkpoints (Qwen's GPTQ-Int8, act-order too), as vLLM serves them: run as int8 with one scale an
    output channel, each weight within half its channel's step of the one the checkpoint encodes, the logits within
    int8's tolerance of the encoded weights'; the engine serves it under quantization="gptq" too."""
    rng = np.random.default_rng()
    path = str(tmp_path / "gptq8")
    encoded = write_quantized_checkpoint(tiny, path, "gptq8", rng, act_order=act_order)
    quant = load_model(path, dtype="float32")
    assert quant.quantization == "int8"
    for name, dense in encoded.items():
        weight = quant.params["layers"][name]
        step = np.asarray(weight.scale)[:, None, :] if weight.scale.ndim == 2 else np.asarray(weight.scale)
        error = np.abs(np.asarray(dequantize(weight)) - np.asarray(dense))
        assert (error <= step / 2 * (1 + 1e-5) + 1e-7).all(), name
    decoded = load_model(tiny, dtype="float32")
    decoded.params["layers"].update(encoded)
    batch, pages = ragged_batch(decoded.config, rng)
    assert relative_error(logits_of(quant, batch, pages + 1),
                          logits_of(decoded, batch, pages + 1)) < LOGIT_TOLERANCE["int8"]
    llm = LLM(path, dtype="float32", quantization="gptq", skip_tokenizer_init=True, max_model_len=64)
    out = llm.generate([[1, 2, 3, 4, 5]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)
    llm.shutdown()
    assert len(out[0].outputs[0].token_ids) == 6


@pytest.mark.parametrize("file", ["quant_config.json", "quantize_config.json"])
def test_autoawq_settings_file_beside_the_config(tiny, tmp_path, file):
    """AutoAWQ checkpoints made before transformers' integration keep their settings in quant_config.json (or
    quantize_config.json), under AutoAWQ's own key names; vLLM reads both files."""
    path = str(tmp_path / "awq")
    write_quantized_checkpoint(tiny, path, "awq", np.random.default_rng())
    config = json.load(open(os.path.join(path, "config.json")))
    del config["quantization_config"]
    json.dump(config, open(os.path.join(path, "config.json"), "w"))
    json.dump({"zero_point": True, "q_group_size": GROUP, "w_bit": 4, "version": "GEMM"},
              open(os.path.join(path, file), "w"))
    quant = CheckpointQuantization.from_checkpoint(path)
    assert (quant.method, quant.group_size) == ("awq", GROUP)


def test_checkpoint_and_option_errors_are_clear(tiny, tmp_path):
    rng = np.random.default_rng()
    for layout, stored, asked in (("awq", "awq", "gptq"), ("ct-int4", "compressed-tensors", "awq")):
        with pytest.raises(QuantizationError, match=f"needs a checkpoint quantized with {stored}"):
            load_model(tiny, quantization=stored)
        write_quantized_checkpoint(tiny, str(tmp_path / layout), layout, rng)
        with pytest.raises(QuantizationError, match=f"quantized with {stored}, but quantization='{asked}'"):
            load_model(str(tmp_path / layout), quantization=asked)
    awq = str(tmp_path / "awq")
    tensors = load_file(os.path.join(awq, "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.qzeros"]
    save_file(tensors, os.path.join(awq, "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks tensor 'model.layers.1.mlp.up_proj.qzeros'"):
        load_model(awq)
    awq = str(tmp_path / "awq-groups")  # tensors in groups of GROUP rows, the config saying twice that
    write_quantized_checkpoint(tiny, awq, "awq", rng)
    config = json.load(open(os.path.join(awq, "config.json")))
    config["quantization_config"]["group_size"] = 2 * GROUP
    json.dump(config, open(os.path.join(awq, "config.json"), "w"))
    with pytest.raises(QuantizationError, match=r"self_attn.q_proj .*its scales are \[.*group_size does not match"):
        load_model(awq)
    config["quantization_config"]["group_size"] = 3 * GROUP  # no whole number of groups in a matrix's input rows
    json.dump(config, open(os.path.join(awq, "config.json"), "w"))
    with pytest.raises(QuantizationError, match="input rows, not a multiple of the group_size 96"):
        load_model(awq)
    for config, message in (
        (dict(quant_method="gptq", bits=5, group_size=128), "bits=5"),
        (dict(quant_method="awq", bits=3, group_size=128), "bits=3"),
        (dict(quant_method="gptq", bits="4", group_size=128), "bits='4' .*bits must be an integer"),
        (dict(quant_method="fp8", weight_block_size=[128]), r"weight_block_size=\[128\] is not \[rows, columns\]"),
        (dict(quant_method="bitsandbytes"), "unsupported checkpoint quantization 'bitsandbytes'"),
        (dict(quant_method="awq", bits=4, version="gemv"), "only the 'gemm' layout"),
        # compressed-tensors: int8 activations beside packed weights, a per-tensor int4 scale, another format
        ({**compressed_tensors_config("ct-int8"), "config_groups": {"group_0": dict(
            targets=["Linear"], weights=dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
            input_activations=dict(num_bits=8, type="int", dynamic=True, strategy="token"))}},
         "int-quantized int8 weights \\(W8A8\\); this one has format 'pack-quantized'"),
        ({**compressed_tensors_config("ct-int4"), "config_groups": {"group_0": dict(
            targets=["Linear"], weights=dict(num_bits=4, type="int", symmetric=True, strategy="tensor"))}},
         "this one's weights are .*'strategy': 'tensor'"),
        ({**compressed_tensors_config("ct-int4"), "format": "marlin-24"}, "this one has format 'marlin-24'"),
    ):
        with pytest.raises(QuantizationError, match=message):
            CheckpointQuantization.from_hf_dict(config)
    gptq = str(tmp_path / "gptq-head")  # a quantized LM head (GPTQ's lm_head: true)
    write_quantized_checkpoint(tiny, gptq, "gptq", rng)
    tensors = load_file(os.path.join(gptq, "model.safetensors"))
    encode_linear(tensors, "lm_head.", "gptq", rng)
    save_file(tensors, os.path.join(gptq, "model.safetensors"))
    with pytest.raises(CheckpointError, match="stores lm_head quantized .*lm_head.qweight.*read only in the decoder"):
        load_model(gptq)
    with pytest.raises(ValueError, match="quantization must be None or one of"):
        EngineArgs(quantization="int3").validate()
    for name, method in (("AWQ", "awq"), ("awq_marlin", "awq"), ("GPTQ_Marlin", "gptq"), ("FP8", "fp8")):
        args = EngineArgs(quantization=name)  # vLLM's names of its Marlin kernels, any case
        args.validate()
        assert args.quantization == method
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineArgs(kv_cache_dtype="int2").validate()


# ------------------------------------------------------------------ fp8 KV cache


def test_fp8_kv_pages_saturate_instead_of_overflowing():
    x = jnp.asarray([1.0, -3.5, 1000.0, -1e6, 0.0], jnp.bfloat16)
    out = np.asarray(to_cache_dtype(x, jnp.float8_e4m3fn).astype(jnp.float32))
    np.testing.assert_array_equal(out, [1.0, -3.5, 448.0, -448.0, 0.0])


def test_fp8_kv_cache_halves_block_bytes_and_keeps_logits_close(tiny):
    config = ModelConfig.from_pretrained(tiny)
    args = EngineArgs(max_num_seqs=1 << 16, max_model_len=256)
    # On CPU the pool is capped in bytes (CPU_KV_CACHE_BYTES): fp8 pages fit twice the tokens.
    blocks = {dt: num_kv_blocks(args, config, dt, 256, 1 << 16) for dt in (jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn)}
    assert blocks[jnp.float8_e4m3fn] == 2 * blocks[jnp.bfloat16] == 4 * blocks[jnp.float32]
    rng = np.random.default_rng()
    loaded = load_model(tiny, dtype="float32")
    batch, pages = ragged_batch(loaded.config, rng)
    reference = logits_of(loaded, batch, pages + 1)
    fp8 = logits_of(loaded, batch, pages + 1, kv_dtype=jnp.float8_e4m3fn)
    assert relative_error(fp8, reference) < FP8_KV_TOLERANCE
    llm = LLM(tiny, dtype="float32", kv_cache_dtype="fp8", skip_tokenizer_init=True, max_model_len=64)
    assert llm.llm_engine.runner.kv_cache.dtype == jnp.float8_e4m3fn
    out = llm.generate([[3, 1, 4, 1, 5, 9]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)
    llm.shutdown()
    assert len(out[0].outputs[0].token_ids) == 5


def test_fp8_kv_pages_use_the_checkpoints_kv_scales(tiny, tmp_path):
    """K and V ~1000x past fp8's range: ``k_proj`` and ``v_proj`` times 1000, ``q_proj`` and ``o_proj`` divided by
    1000, is the same model, but unscaled fp8 pages saturate. With the checkpoint's ``self_attn.k_scale`` /
    ``v_scale`` (llm-compressor's per-layer tensors, shape [] or [1]) the pages hold K / k_scale and V / v_scale,
    and the logits stay within the fp8 KV tolerance; pages in the model's dtype ignore the scales."""
    rng = np.random.default_rng()
    tensors = load_file(os.path.join(tiny, "model.safetensors"))
    scales = {}
    for i in range(ModelConfig.from_pretrained(tiny).num_layers):
        prefix = f"model.layers.{i}.self_attn."
        for proj, factor in (("q", 1e-3), ("k", 1e3), ("v", 1e3), ("o", 1e-3)):
            tensors[f"{prefix}{proj}_proj.weight"] = tensors[f"{prefix}{proj}_proj.weight"] * np.float32(factor)
            if proj != "o" and f"{prefix}{proj}_proj.bias" in tensors:  # o_proj's bias comes after the scaling
                tensors[f"{prefix}{proj}_proj.bias"] = tensors[f"{prefix}{proj}_proj.bias"] * np.float32(factor)
        scales[prefix + "k_scale"] = np.asarray(rng.uniform(500, 2000), np.float32)  # shape []
        scales[prefix + "v_scale"] = np.asarray([rng.uniform(500, 2000)], np.float32)  # shape [1]
    paths = {name: str(tmp_path / name) for name in ("unscaled", "scaled")}
    for name, weights in (("unscaled", tensors), ("scaled", {**tensors, **scales})):
        shutil.copytree(tiny, paths[name])
        save_file(weights, os.path.join(paths[name], "model.safetensors"))
    scaled, unscaled = load_model(paths["scaled"], dtype="float32"), load_model(paths["unscaled"], dtype="float32")
    assert scaled.config.kv_cache_scales and not unscaled.config.kv_cache_scales
    np.testing.assert_array_equal(np.asarray(scaled.params["layers"]["k_scale"]),
                                  [scales[f"model.layers.{i}.self_attn.k_scale"] for i in range(len(scales) // 2)])
    batch, pages = ragged_batch(scaled.config, rng)
    reference = logits_of(load_model(tiny, dtype="float32"), batch, pages + 1)
    assert relative_error(logits_of(scaled, batch, pages + 1), reference) < 1e-4  # float32 pages: scales unused
    fp8 = {name: logits_of(model, batch, pages + 1, kv_dtype=jnp.float8_e4m3fn)
           for name, model in (("scaled", scaled), ("unscaled", unscaled))}
    assert relative_error(fp8["scaled"], reference) < FP8_KV_TOLERANCE
    assert relative_error(fp8["unscaled"], reference) > 3 * FP8_KV_TOLERANCE  # saturated: the test has teeth
    llm = LLM(paths["scaled"], dtype="float32", kv_cache_dtype="fp8", skip_tokenizer_init=True, max_model_len=64)
    out = llm.generate([[3, 1, 4, 1, 5, 9]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)
    llm.shutdown()
    assert len(out[0].outputs[0].token_ids) == 5
    # The other names vLLM reads them by: ModelOpt's, older compressed-tensors' output scales, AutoFP8's one kv_scale
    # for both (here K's; it covers V, both ~1000x)
    for k_name, v_name in KV_SCALE_NAMES[1:]:
        renamed, want = {}, {"k_scale": [], "v_scale": []}
        for i in range(len(scales) // 2):
            for kind, name in (("k_scale", k_name), ("v_scale", v_name)):
                value = scales[f"model.layers.{i}.self_attn.{'k_scale' if k_name == v_name else kind}"]
                renamed[f"model.layers.{i}.{name}"] = value
                want[kind].append(float(value.reshape(())))
        save_file({**tensors, **renamed}, os.path.join(paths["scaled"], "model.safetensors"))
        model = load_model(paths["scaled"], dtype="float32")
        assert model.config.kv_cache_scales, k_name
        for kind in want:
            np.testing.assert_array_equal(np.asarray(model.params["layers"][kind]), np.float32(want[kind]))
        assert relative_error(logits_of(model, batch, pages + 1, kv_dtype=jnp.float8_e4m3fn),
                              reference) < FP8_KV_TOLERANCE, k_name
    tensors["model.layers.0.self_attn.k_scale"] = np.ones(2, np.float32)
    save_file(tensors, os.path.join(paths["unscaled"], "model.safetensors"))
    with pytest.raises(CheckpointError, match="non-scalar tensor 'model.layers.0.self_attn.k_scale'"):
        load_model(paths["unscaled"])


# ------------------------------------------------------------------ the embedded default model


def test_default_model_int8_greedy_text_agrees_with_unquantized():
    """The default model (float32 on CPU) against its int8 version: greedy chat completions of
    a set of prompts. Reports the agreement rate; most prompts must give identical text."""
    prompts = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?",
               "Write a haiku about the sea.", "Who wrote Hamlet?", "Give me a synonym for happy.",
               "What is the boiling point of water?", "Translate 'thank you' into Spanish."]
    params = SamplingParams(temperature=0, max_tokens=24)
    texts = {}
    for method in (None, "int8"):
        llm = LLM(quantization=method, max_model_len=256, max_num_seqs=8)
        texts[method] = [o.outputs[0].text for o in llm.chat([[{"role": "user", "content": p}] for p in prompts],
                                                              params, use_tqdm=False)]
        llm.shutdown()
    same = [a == b for a, b in zip(texts[None], texts["int8"])]
    rate = sum(same) / len(same)
    print(f"int8 vs float32 greedy agreement: {sum(same)}/{len(same)} prompts identical ({rate:.0%})")
    assert rate >= 0.5, list(zip(texts[None], texts["int8"]))


def test_fp8_step_options_on_gpu_follow_the_step_size(monkeypatch):
    """engine.runner.default_compiler_options: for fp8 weights on GPU, autotuning level 1 for
    steps of up to 16 rows and cuBLAS's heuristic (no autotuning, no Triton GEMMs) above; XLA's
    defaults otherwise (benchmarks/NOTES.md, runs 8-12)."""
    import engine.runner as runner

    w = (jax.random.normal(jax.random.key(0), (64, 32)) * 0.1).astype(jnp.bfloat16)
    fp8 = {"layers": [{"wq": quantize_weight(w, "fp8"), "norm": jnp.ones(64)}]}
    int8 = {"layers": [{"wq": quantize_weight(w, "int8")}]}
    def options(params, num_tokens):
        return runner.default_compiler_options(num_tokens, fp8=runner.has_fp8_weights(params))

    assert options(fp8, 1) == {}  # CPU
    monkeypatch.setattr(runner.jax, "default_backend", lambda: "gpu")
    assert options(fp8, 1) == options(fp8, 16) == {"xla_gpu_autotune_level": 1}
    assert options(fp8, 32) == {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False}
    assert options(int8, 1) == {} and options({"w": w}, 4096) == {}


def test_unstacking_fp8_layers_keeps_every_byte():
    from models.llama import unstack_layers

    stacked = quantize_weight((jax.random.normal(jax.random.key(1), (3, 64, 32)) * 0.1).astype(jnp.bfloat16), "fp8")
    layers = unstack_layers({"layers": {"wq": stacked}})["layers"]
    assert len(layers) == 3
    for i, layer in enumerate(layers):
        assert layer["wq"].q.dtype == jnp.float8_e4m3fn
        np.testing.assert_array_equal(np.asarray(layer["wq"].q.astype(jnp.float32)),
                                      np.asarray(stacked.q[i].astype(jnp.float32)))
        np.testing.assert_array_equal(np.asarray(layer["wq"].scale), np.asarray(stacked.scale[i]))


@pytest.mark.parametrize("method", ["fp8", "int8"])
def test_load_time_quantization_compiles_once_per_weight_shape(method):
    """Weights of one shape (q and o projections, k and v, gate and up) share one compiled quantizer."""
    from engine.compile_timer import CompileTimer

    from models import quantization

    quantization._quantizer.cache_clear()  # new jitted quantizers: nothing compiled by an earlier case
    L, H, I, kv = 2, 64, 128, 32
    shapes = dict(wq=(L, H, H), wk=(L, H, kv), wv=(L, H, kv), wo=(L, H, H), w_gate=(L, H, I), w_up=(L, H, I),
                  w_down=(L, I, H))
    params = {"layers": {name: jnp.full(shape, 0.5, jnp.bfloat16) for name, shape in shapes.items()}}
    with CompileTimer() as timer:
        quantized = quantize_params(params, method)
    assert sum(1 for phase, *_ in timer.events if phase == "compile") == len(set(shapes.values()))
    for name, shape in shapes.items():
        np.testing.assert_allclose(np.asarray(dequantize(quantized["layers"][name])), 0.5, rtol=1e-2)


@pytest.mark.parametrize("method", ["int8", "int4", "fp8"])
def test_large_stacked_weights_quantize_a_slice_at_a_time_to_the_same_values(method, monkeypatch):
    """A stacked weight over ``QUANTIZE_SLICE_BYTES`` is quantized a slice of layers at a time into buffers
    updated in place (a MoE's experts would not fit twice in float32): the values of quantizing it whole."""
    import models.quantization as quantization

    dense = jnp.asarray(np.random.default_rng().standard_normal((6, 2, 256, 64)), jnp.bfloat16)
    whole = quantization.quantize_weight(dense, method, "kn")
    monkeypatch.setattr(quantization, "QUANTIZE_SLICE_BYTES", dense.nbytes // 3)  # slices of 2 layers
    sliced = quantization._quantize_placed(dense, method, int8_layout="kn")
    assert jax.tree.structure(sliced) == jax.tree.structure(whole)
    for a, b in zip(jax.tree.leaves(sliced), jax.tree.leaves(whole)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


def test_fp8_weights_with_float16_activations_stay_finite():
    """Full-range e4m3 weights and activations: their unscaled products overflow float16, so the fp8 dot of float16
    activations returns float32 before the scales (it gave NaN logits); close to the float32 matmul."""
    from models.quantization import linear

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((256, 256)) * 0.15, jnp.float32)
    x = jnp.asarray(rng.standard_normal((4, 256)) * 3.0, jnp.float32)
    want = np.asarray(x @ w)
    for dtype in (jnp.float16, jnp.bfloat16):
        got = np.asarray(jax.jit(linear)(x.astype(dtype), quantize_weight(w.astype(dtype), "fp8")), np.float32)
        assert np.isfinite(got).all(), dtype
        assert np.abs(got - want).max() / np.abs(want).max() < 0.1, dtype


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_act_order_int4_matmul_runs_jitted_at_several_rows(dtype):
    """GPTQ act-order weights permute x before the dot; XLA:CPU has no bf16 dot after that gather, so the CPU's XLA
    path runs it in float32 (bf16 act-order checkpoints failed at their first prompt)."""
    from models.quantization import linear

    rng = np.random.default_rng(1)
    w = quantize_weight(jnp.asarray(rng.standard_normal((128, 64)), jnp.float32), "int4")
    perm = jnp.asarray(rng.permutation(128), jnp.int32)
    w = w.replace(perm=perm)
    x = jnp.asarray(rng.standard_normal((5, 128)), dtype)
    got = jax.jit(linear)(x, w)
    want = np.asarray(x.astype(jnp.float32)[:, perm] @ dequantize(w.replace(perm=None)).astype(jnp.float32))
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0.02, atol=0.02 * np.abs(want).max())
