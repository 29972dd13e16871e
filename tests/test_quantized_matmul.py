"""The weight-streaming matmul kernel (dense, int8, int4) against its references.

The same cases run in interpret mode on CPU and compiled by Triton with ``-m gpu``. Every
run draws fresh random inputs (the seed is in failures); the references themselves are
checked against a float64 numpy product of the dense weight the quantized one stands for.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quantized_matmul import (
    MatmulConfig,
    auto_k_splits,
    dense_matmul,
    dense_matmul_reference,
    int4_matmul,
    int4_matmul_reference,
    int4_pack_block,
    int8_matmul,
    int8_matmul_reference,
    pack_int4,
    unpack_int4,
)

RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 3e-3}


def random_weight(rng, fmt: str, K: int, N: int, group: int = 0, dtype=jnp.float32):
    """``(kernel args after x, reference kwargs, dense float64 [K, N] they stand for)``."""
    if fmt == "dense":
        w = rng.standard_normal((K, N)).astype(np.float32)
        return (jnp.asarray(w, dtype),), {}, np.asarray(jnp.asarray(w, dtype), np.float64)
    if fmt == "int8":
        q = rng.integers(-127, 128, (K, N)).astype(np.int8)
        scale = rng.uniform(0.001, 0.02, N).astype(np.float32)
        return (jnp.asarray(q), jnp.asarray(scale)), {}, q * scale.astype(np.float64)
    pack = int4_pack_block(K, group)
    values = rng.integers(0, 16, (K, N))
    scales = rng.uniform(0.001, 0.05, (K // group, N)).astype(np.float32)
    zeros = rng.uniform(0, 15, (K // group, N)).round(1).astype(np.float32)  # fractional zeros are allowed
    scales_d, zeros_d = np.asarray(jnp.asarray(scales, dtype), np.float64), np.asarray(jnp.asarray(zeros, dtype), np.float64)
    dense = (values - np.repeat(zeros_d, group, 0)) * np.repeat(scales_d, group, 0)
    args = (jnp.asarray(pack_int4(values, pack)), jnp.asarray(scales, dtype), jnp.asarray(zeros, dtype))
    return args, dict(group_size=group, pack=pack), dense


KERNELS = {"dense": (dense_matmul, dense_matmul_reference), "int8": (int8_matmul, int8_matmul_reference),
           "int4": (int4_matmul, int4_matmul_reference)}

# (format, rows M, K, N, int4 group size, dtype, config)
CPU_CASES = [
    ("dense", 1, 256, 192, 0, jnp.float32, MatmulConfig()),
    ("dense", 20, 384, 96, 0, jnp.bfloat16, MatmulConfig(block_k=64, k_splits=3)),
    ("int8", 1, 512, 320, 0, jnp.bfloat16, MatmulConfig()),
    ("int8", 33, 256, 64, 0, jnp.float32, MatmulConfig(block_n=32, k_splits=2)),
    ("int4", 1, 512, 256, 128, jnp.bfloat16, MatmulConfig()),
    ("int4", 9, 192, 64, 64, jnp.float32, MatmulConfig(k_splits=3)),
    ("int4", 16, 96, 96, 32, jnp.float32, MatmulConfig()),  # pack block of 32 rows, N not a power of 2
    ("int8", 150, 256, 64, 0, jnp.float32, MatmulConfig()),  # 3 row tiles of 64, the last one padded
    ("int4", 100, 128, 64, 64, jnp.bfloat16, MatmulConfig(block_m=32, k_splits=2)),
    ("int4", 9, 192, 64, 64, jnp.bfloat16, MatmulConfig(tile_convert="cvt", gemv_fma=False)),  # before run 30e
    # One row: the GEMV form (the M=1 cases above), split over K, and the dot form at one row.
    ("int4", 1, 512, 192, 64, jnp.float32, MatmulConfig(k_splits=4, gemv_block_n=64)),
    ("int8", 1, 384, 96, 0, jnp.float32, MatmulConfig(k_splits=3, gemv_block_k=32)),
    ("int4", 1, 256, 128, 128, jnp.bfloat16, MatmulConfig(gemv=False)),
    ("dense", 1, 128, 64, 0, jnp.float32, MatmulConfig(gemv=False)),
    # The GEMV form with a cross-thread sum over K each step (gemv_defer_reduction off), each format, split too.
    ("int4", 1, 512, 192, 64, jnp.float32, MatmulConfig(k_splits=2, gemv_block_n=64, gemv_defer_reduction=False)),
    ("int4", 1, 512, 256, 128, jnp.bfloat16, MatmulConfig(gemv_defer_reduction=False)),
    ("int8", 1, 384, 96, 0, jnp.float32, MatmulConfig(k_splits=3, gemv_block_k=32, gemv_defer_reduction=False)),
    ("dense", 1, 256, 192, 0, jnp.bfloat16, MatmulConfig(gemv_defer_reduction=False)),
    # Integer weights to float32 (gemv_convert): the exponent trick, both reductions; "permute" (int8's default) is the
    # same trick in inline PTX, compiled on GPUs only (the interpreter runs the jnp form); "cvt" converts each.
    ("int4", 1, 512, 192, 64, jnp.bfloat16, MatmulConfig(k_splits=2, gemv_block_n=64, gemv_convert="exponent",
                                                         gemv_defer_reduction=False)),
    ("int8", 1, 384, 96, 0, jnp.float32, MatmulConfig(gemv_block_k=32, gemv_convert="exponent",
                                                      gemv_defer_reduction=True)),
    ("int4", 1, 512, 256, 128, jnp.bfloat16, MatmulConfig(gemv_convert="exponent", gemv_defer_reduction=True)),
    ("int8", 1, 384, 96, 0, jnp.float32, MatmulConfig(k_splits=3, gemv_block_k=32, gemv_convert="cvt")),
    ("int8", 1, 224, 96, 0, jnp.bfloat16, MatmulConfig(gemv_convert="permute", gemv_defer_reduction=False)),
    ("int4", 1, 512, 192, 64, jnp.float32, MatmulConfig(k_splits=2, gemv_block_n=64, gemv_convert="cvt")),
    ("int4", 1, 512, 256, 128, jnp.bfloat16, MatmulConfig(gemv_convert="permute", gemv_defer_reduction=False)),
    # "affine" (the default): nibbles as 0.5 + q / 256, the map folded into the group's scale and zero (the
    # interpreter's jnp form), both reductions, split, pack blocks of 64 and 32; int8 values then go as "permute".
    ("int4", 1, 512, 256, 128, jnp.bfloat16, MatmulConfig(gemv_convert="affine")),
    ("int4", 1, 512, 192, 64, jnp.float32, MatmulConfig(k_splits=2, gemv_block_n=64, gemv_convert="affine",
                                                        gemv_defer_reduction=False)),
    ("int4", 1, 96, 96, 32, jnp.float32, MatmulConfig(gemv_convert="affine", gemv_prefetch=1)),
    ("int8", 1, 384, 96, 0, jnp.float32, MatmulConfig(k_splits=3, gemv_block_k=32, gemv_convert="affine")),
    # The int4 step's packed tile in blocks of rows, each into an accumulator of its shape (gemv_subtiles, 8 by
    # default): one block (the layout before run 27c), 2 / 4 / 16, split, loads ahead, pack blocks of 64 and 32, each
    # conversion; without the deferred sum the setting is ignored.
    ("int4", 1, 512, 256, 128, jnp.bfloat16, MatmulConfig(gemv_subtiles=1)),
    ("int4", 1, 512, 256, 128, jnp.bfloat16, MatmulConfig(gemv_subtiles=4)),
    ("int4", 1, 512, 192, 64, jnp.float32, MatmulConfig(k_splits=2, gemv_block_n=64, gemv_subtiles=2,
                                                        gemv_prefetch=1)),
    ("int4", 1, 96, 96, 32, jnp.float32, MatmulConfig(gemv_convert="exponent")),
    ("int4", 1, 512, 256, 128, jnp.float32, MatmulConfig(gemv_convert="cvt")),
    ("int4", 1, 512, 192, 64, jnp.float32, MatmulConfig(k_splits=2, gemv_block_n=64, gemv_subtiles=16)),
    ("int4", 1, 512, 256, 128, jnp.bfloat16, MatmulConfig(gemv_subtiles=4, gemv_defer_reduction=False)),
    # The unfactored form (the default before run 29b: (q - z) s a weight, 8 blocks): loads ahead or not, split.
    ("int4", 1, 512, 256, 128, jnp.bfloat16, MatmulConfig(gemv_factor_scales=False, gemv_subtiles=8)),
    ("int4", 1, 512, 192, 64, jnp.float32, MatmulConfig(k_splits=2, gemv_block_n=64, gemv_factor_scales=False,
                                                        gemv_subtiles=8, gemv_prefetch=1)),
    # The group's scale and zero out of the products (gemv_factor_scales, the default): each conversion, blocks of
    # rows, split, loads ahead, pack blocks of 128 / 64 / 32.
    ("int4", 1, 512, 256, 128, jnp.bfloat16, MatmulConfig(gemv_factor_scales=True)),
    ("int4", 1, 512, 192, 64, jnp.float32, MatmulConfig(k_splits=2, gemv_block_n=64, gemv_subtiles=2,
                                                        gemv_prefetch=1, gemv_factor_scales=True)),
    ("int4", 1, 96, 96, 32, jnp.float32, MatmulConfig(gemv_convert="exponent", gemv_factor_scales=True)),
    ("int4", 1, 512, 256, 128, jnp.float32, MatmulConfig(gemv_convert="cvt", gemv_subtiles=1,
                                                         gemv_factor_scales=True)),
    # Weight loads issued a step ahead (gemv_prefetch), even and odd step counts, split, both reductions.
    ("int4", 1, 512, 192, 64, jnp.float32, MatmulConfig(k_splits=2, gemv_block_n=64, gemv_prefetch=1)),
    ("int4", 1, 512, 256, 128, jnp.bfloat16, MatmulConfig(gemv_prefetch=1, gemv_defer_reduction=False)),
    ("int8", 1, 384, 96, 0, jnp.float32, MatmulConfig(k_splits=3, gemv_block_k=32, gemv_prefetch=1)),
    ("int8", 1, 224, 96, 0, jnp.float32, MatmulConfig(gemv_block_k=32, gemv_prefetch=1)),  # 7 steps
    ("dense", 1, 256, 192, 0, jnp.bfloat16, MatmulConfig(gemv_prefetch=1)),
]


def run_case(fmt, M, K, N, group, dtype, config, *, interpret, seed=None):
    seed = np.random.SeedSequence().entropy if seed is None else seed
    rng = np.random.default_rng(seed)
    kernel, reference = KERNELS[fmt]
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    args, static, dense = random_weight(rng, fmt, K, N, group, dtype)
    out = jax.jit(functools.partial(kernel, config=config, interpret=interpret, **static))(x, *args)
    ref = reference(x, *args, **static)
    exact = np.asarray(x, np.float64) @ dense
    assert out.shape == (M, N) and out.dtype == x.dtype
    scale = np.abs(exact).max()
    for name, got in (("kernel", out), ("reference", ref)):
        err = np.abs(np.asarray(got, np.float64) - exact).max() / scale
        assert err < RTOL[dtype], f"seed {seed}: {name} max error {err:.2e} (of the largest output)"


@pytest.mark.parametrize("fmt,M,K,N,group,dtype,config", CPU_CASES)
def test_kernel_matches_reference_interpret(fmt, M, K, N, group, dtype, config):
    run_case(fmt, M, K, N, group, dtype, config, interpret=True)


def test_small_ints_become_float32_exactly_without_a_conversion():
    from pallas_kernels.quantized_matmul import _small_ints_as_f32

    nibbles = jnp.arange(16, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(_small_ints_as_f32(nibbles)), np.arange(16, dtype=np.float32))
    int8 = jnp.arange(-128, 128, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(_small_ints_as_f32(int8, offset=128)), np.arange(-128, 128))


def test_affine_nibbles_and_their_permute_selectors():
    """Nibbles become 0.5 + q / 256 exactly (the jnp form), and the PTX places each byte of the word in byte 2 of
    0.5's bits (selector digit j at position 2, 0.5's own bytes 4-7 elsewhere); "permute" keeps its byte 0."""
    from pallas_kernels.quantized_matmul import _PERMUTES, _half_plus_over_256

    q = jnp.arange(16, dtype=jnp.uint8)
    np.testing.assert_array_equal(np.asarray(_half_plus_over_256(q)), 0.5 + np.arange(16) / 256)
    ptx, offset = _PERMUTES["high_nibbles_affine"]
    assert offset == 0.0 and "mov.b32 e, 0x3f000000;" in ptx and "shr.u32 u, $4, 4;" in ptx
    assert [f"prmt.b32 ${j}, u, e, {0x7054 + (j << 8):#x};" in ptx for j in range(4)] == [True] * 4
    assert "prmt.b32 $3, u, e, 0x7653;" in _PERMUTES["low_nibbles"][0]


def test_int4_subtiles_must_divide_a_step():
    x = jnp.ones((1, 256), jnp.float32)
    args, static, _ = random_weight(np.random.default_rng(0), "int4", 256, 128, 128)
    with pytest.raises(ValueError, match="gemv_subtiles"):
        int4_matmul(x, *args, config=MatmulConfig(gemv_subtiles=3), interpret=True, **static)


@pytest.mark.parametrize("rows,defer,convert", [(100, False, "cvt"), (1, False, "cvt"), (1, True, "exponent"),
                                                (1, True, "permute"), (1, True, "affine"), (1, False, "affine")])
@pytest.mark.parametrize("fmt", ["dense", "int8", "int4"])
def test_kernel_lowers_to_triton_for_cuda(fmt, rows, defer, convert):
    """The Triton lowering (not only the interpreter) accepts every format, in the dot form (two
    row tiles) and the one-row GEMV form (both reductions): cross-platform lowering on CPU."""
    rng = np.random.default_rng(0)
    kernel, _ = KERNELS[fmt]
    args, static, _ = random_weight(rng, fmt, 1024, 512, 128, jnp.bfloat16)
    x = jnp.ones((rows, 1024), jnp.bfloat16)
    config = MatmulConfig(k_splits=2, gemv_defer_reduction=defer, gemv_convert=convert, gemv_prefetch=int(defer),
                          gemv_fma=convert != "cvt", gemv_subtiles=4 if convert == "affine" else 1)
    fn = jax.jit(functools.partial(kernel, interpret=False, config=config, **static))
    text = fn.trace(x, *args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


KMAJOR_CASES = [  # (M, K, N, dtype, config): the K-major int8 GEMV at one row (split, loads ahead or not), XLA's dot
    # The default: the sum over K deferred to after the loop (x read as tiles of w's shape), no loads ahead.
    (1, 512, 256, jnp.bfloat16, MatmulConfig()),
    (1, 384, 96, jnp.float32, MatmulConfig(k_splits=3, kmajor_block_k=32, kmajor_block_n=32)),
    (1, 224, 96, jnp.float32, MatmulConfig(kmajor_block_k=32, gemv_prefetch=1)),  # 7 steps
    (1, 256, 128, jnp.float32, MatmulConfig(gemv_convert="cvt")),
    (5, 256, 128, jnp.float32, MatmulConfig()),
    # Programs of one step each (kmajor_min_steps 1: 16 K splits of a small weight).
    (1, 512, 64, jnp.float32, MatmulConfig(kmajor_block_k=32, kmajor_min_steps=1, gemv_programs_per_core=64)),
    # Each step's products summed over K at once (the default before run 26a): split, loads ahead or not, 7 steps.
    (1, 512, 256, jnp.bfloat16, MatmulConfig(kmajor_defer_reduction=False)),
    (1, 384, 96, jnp.float32, MatmulConfig(k_splits=3, kmajor_block_k=32, kmajor_block_n=32,
                                           kmajor_defer_reduction=False)),
    (1, 224, 96, jnp.float32, MatmulConfig(kmajor_block_k=32, gemv_prefetch=0, kmajor_defer_reduction=False)),
]


def run_kmajor_case(M, K, N, dtype, config, *, interpret):
    from pallas_kernels.quantized_matmul import int8_kmajor_matmul, int8_kmajor_matmul_reference

    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    qt = jnp.asarray(rng.integers(-127, 128, (N, K)), jnp.int8)
    scale = jnp.asarray(rng.uniform(0.005, 0.02, N), jnp.float32)
    out = int8_kmajor_matmul(x, qt, scale, config=config, interpret=interpret)
    exact = np.asarray(x, np.float64) @ (np.asarray(qt, np.float64) * np.asarray(scale, np.float64)[:, None]).T
    assert out.shape == (M, N) and out.dtype == x.dtype
    for name, got in (("kernel", out), ("reference", int8_kmajor_matmul_reference(x, qt, scale))):
        err = np.abs(np.asarray(got, np.float64) - exact).max() / np.abs(exact).max()
        assert err < RTOL[dtype], f"seed {seed}: {name} max error {err:.2e} (of the largest output)"


@pytest.mark.parametrize("M,K,N,dtype,config", KMAJOR_CASES)
def test_kmajor_int8_matches_reference_interpret(M, K, N, dtype, config):
    run_kmajor_case(M, K, N, dtype, config, interpret=True)


def test_kmajor_int8_lowers_to_triton_for_cuda_and_checks_its_inputs():
    from pallas_kernels.quantized_matmul import int8_kmajor_matmul

    x, qt, scale = jnp.ones((1, 1024), jnp.bfloat16), jnp.ones((512, 1024), jnp.int8), jnp.ones((512,), jnp.float32)
    for defer in (False, True):
        fn = jax.jit(functools.partial(int8_kmajor_matmul, interpret=False,
                                       config=MatmulConfig(kmajor_defer_reduction=defer)))
        assert fn.trace(x, qt, scale).lower(lowering_platforms=("cuda",)).as_text().count("__gpu$xla.gpu.triton") == 1
    with pytest.raises(ValueError, match="scale"):
        int8_kmajor_matmul(x, qt, jnp.ones((1024,)))
    with pytest.raises(ValueError, match="x must be"):
        int8_kmajor_matmul(jnp.ones((1, 512)), qt, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("K,N", [(4096, 6144), (14336, 4096), (4096, 28672)])
@pytest.mark.parametrize("defer,fma", [(False, True), (True, True), (True, False)],
                         ids=["summed-each-step", "kmajor_defer", "kmajor_defer-unfused"])
def test_kmajor_int8_matches_reference_on_gpu(K, N, defer, fma):
    run_kmajor_case(1, K, N, jnp.bfloat16, MatmulConfig(kmajor_defer_reduction=defer, gemv_fma=fma), interpret=False)


def run_gated_case(K, I, dtype, config, *, interpret, norm=False):
    """The one-row gated GEMV (``silu(gate) * up`` in its epilogue) on an interleaved ``[gate | up]`` weight against
    float64, and against the unfused model's path (the plain GEMV's reference, split, ``jax.nn.silu``, product)."""
    from models.norm import rms_norm
    from pallas_kernels.deferred_norm import norm_rows_reference
    from pallas_kernels.quantized_matmul import (
        GATE_UP_GROUP,
        deinterleave_halves,
        int8_kmajor_gated_matmul,
        int8_kmajor_gated_reference,
        int8_kmajor_matmul_reference,
        interleave_halves,
    )

    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((1, K)), dtype)
    qt = jnp.asarray(rng.integers(-127, 128, (2 * I, K)), jnp.int8)
    scale = jnp.asarray(rng.uniform(0.005, 0.02, 2 * I), jnp.float32)
    g = GATE_UP_GROUP
    stored_q, stored_scale = interleave_halves(qt, g, -2), interleave_halves(scale, g, -1)
    np.testing.assert_array_equal(np.asarray(deinterleave_halves(stored_q, g, -2)), np.asarray(qt))
    np.testing.assert_array_equal(np.asarray(stored_q[g:2 * g]), np.asarray(qt[I:I + g]))  # up rows after g gate rows
    options = {}
    if norm:  # x is a row's x * weight, its RMSNorm applied by the GEMV
        weight = jnp.asarray(rng.uniform(0.5, 1.5, K), dtype)
        rows, sum_sq = norm_rows_reference(x, weight)
        options, x_in, x = dict(sum_sq=sum_sq, norm_eps=1e-5), rows, rms_norm(x, weight, 1e-5)
    else:
        x_in = x
    out = int8_kmajor_gated_matmul(x_in, stored_q, stored_scale, group=g, config=config, interpret=interpret,
                                   **options)
    assert out.shape == (1, I) and out.dtype == dtype
    y = np.asarray(x, np.float64) @ (np.asarray(qt, np.float64) * np.asarray(scale, np.float64)[:, None]).T
    exact = y[:, :I] / (1 + np.exp(-y[:, :I])) * y[:, I:]
    for name, got in (("kernel", out), ("reference", int8_kmajor_gated_reference(x, stored_q, stored_scale, group=g))):
        err = np.abs(np.asarray(got, np.float64) - exact).max() / np.abs(exact).max()
        assert err < 4 * RTOL[dtype], f"seed {seed}: {name} max error {err:.2e} (of the largest output)"
    gate, up = jnp.split(int8_kmajor_matmul_reference(x, qt, scale), 2, axis=-1)
    np.testing.assert_array_equal(np.asarray(int8_kmajor_gated_reference(x, stored_q, stored_scale, group=g)),
                                  np.asarray(jax.nn.silu(gate) * up))


GATED_CASES = [(512, 64, jnp.float32, MatmulConfig(kmajor_block_k=128)),
               (768, 96, jnp.bfloat16, MatmulConfig(kmajor_block_k=256)),
               (256, 32, jnp.float32, MatmulConfig(kmajor_block_k=64, kmajor_defer_reduction=False))]


@pytest.mark.parametrize("K,I,dtype,config", GATED_CASES)
@pytest.mark.parametrize("norm", [False, True])
def test_gated_kmajor_gemv_interpret(K, I, dtype, config, norm):
    run_gated_case(K, I, dtype, config, interpret=True, norm=norm)


def test_gated_kmajor_gemv_lowers_to_one_triton_call_and_checks_its_inputs():
    from pallas_kernels.quantized_matmul import int8_kmajor_gated_matmul

    x, qt, scale = jnp.ones((1, 1024), jnp.bfloat16), jnp.ones((512, 1024), jnp.int8), jnp.ones((512,), jnp.float32)
    fn = jax.jit(functools.partial(int8_kmajor_gated_matmul, group=8, interpret=False))
    assert fn.trace(x, qt, scale).lower(lowering_platforms=("cuda",)).as_text().count("__gpu$xla.gpu.triton") == 1
    with pytest.raises(ValueError, match="the gated GEMV takes one row"):
        int8_kmajor_gated_matmul(jnp.ones((2, 1024)), qt, scale, group=8)


@pytest.mark.gpu
@pytest.mark.parametrize("K,I", [(4096, 14336), (2048, 8192)])
@pytest.mark.parametrize("norm", [False, True])
def test_gated_kmajor_gemv_on_gpu(K, I, norm):
    run_gated_case(K, I, jnp.bfloat16, MatmulConfig(), interpret=False, norm=norm)


def test_int4_packing_round_trips_and_keeps_blocks_contiguous():
    rng = np.random.default_rng()
    values = rng.integers(0, 16, (256, 48))
    for pack in (32, 64, 128):
        packed = np.asarray(pack_int4(values, pack))
        assert packed.shape == (128, 48) and packed.dtype == np.uint8
        np.testing.assert_array_equal(np.asarray(unpack_int4(packed, pack)), values)
        # A K-shard on a block boundary holds exactly its own rows (tensor parallelism).
        np.testing.assert_array_equal(np.asarray(unpack_int4(packed[64:], pack)), values[128:])
    assert int4_pack_block(4096, 128) == 128 and int4_pack_block(576, 64) == 64 and int4_pack_block(96, 32) == 32
    with pytest.raises(ValueError, match="multiples of 32"):
        int4_pack_block(100, 100)


def test_auto_split_fills_the_gpu_and_divides_the_steps():
    assert auto_k_splits(num_col_blocks=2004, num_k_steps=32) == 1  # lm_head: plenty of columns
    s = auto_k_splits(num_col_blocks=16, num_k_steps=32)  # a small N: split K
    assert 32 % s == 0 and 32 // s >= 4 and s > 1
    s = auto_k_splits(num_col_blocks=64, num_k_steps=112)  # w_down of Llama-3.1-8B: K = 14336
    assert 112 % s == 0 and s > 1
    # The 8B's int4 wqkv (48 column blocks, 32 steps) cannot fill the GPU at 4 steps a program: fewer steps allowed.
    assert [auto_k_splits(48, 32, programs_per_core=8, min_steps=m) for m in (4, 2, 1)] == [8, 16, 32]


def test_gemv_min_steps_sets_the_split_of_a_small_weight():
    """``MatmulConfig.gemv_min_steps`` lets a small int4 weight split K into programs of fewer steps; the result is
    the same."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 512)), jnp.float32)
    args, static, _ = random_weight(rng, "int4", 512, 128, 128, jnp.float32)
    outs = [int4_matmul(x, *args, config=MatmulConfig(gemv_min_steps=m, gemv_programs_per_core=64), interpret=True,
                        **static) for m in (4, 1)]
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call,message", [
    (lambda: int8_matmul(jnp.ones((2, 64)), jnp.ones((64, 32), jnp.int8), jnp.ones(16)), "scale"),
    (lambda: int8_matmul(jnp.ones((2, 48)), jnp.ones((64, 32), jnp.int8), jnp.ones(32)), "x must be"),
    (lambda: dense_matmul(jnp.ones((2, 64)), jnp.ones((64, 40))), "multiple of 16"),
    (lambda: int4_matmul(jnp.ones((2, 64)), jnp.ones((32, 32), jnp.uint8), jnp.ones((1, 32)), jnp.ones((2, 32)),
                         group_size=64, pack=64), "scales and zeros"),
    (lambda: dense_matmul(jnp.ones((2, 64)), jnp.ones((64, 32)), config=MatmulConfig(block_k=16, k_splits=3)),
     "must divide"),
])
def test_wrapper_rejects_bad_shapes_with_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# Shapes of Llama-3.1-8B's matrices (K, N) at decode batch sizes, and a small-N / split-K case.
GPU_CASES = [
    (fmt, M, K, N, 128, jnp.bfloat16, MatmulConfig())
    for fmt in ("dense", "int8", "int4")
    for M, K, N in ((1, 4096, 6144), (16, 14336, 4096), (64, 4096, 1024))
] + [(fmt, 1, K, N, 128, jnp.bfloat16, MatmulConfig(gemv_convert="cvt"))  # the default before run 22a
       for fmt in ("int8", "int4") for K, N in ((4096, 6144), (14336, 4096))
] + [("int4", 1, K, N, 128, jnp.bfloat16, MatmulConfig(gemv_convert="affine", gemv_defer_reduction=defer))
     for K, N in ((4096, 6144), (14336, 4096), (4096, 28672)) for defer in (True, False)
] + [("int4", 1, K, N, 128, jnp.bfloat16, MatmulConfig(gemv_subtiles=subtiles))
     for K, N in ((4096, 6144), (14336, 4096), (4096, 28672)) for subtiles in (1, 4, 16)
] + [("int4", 1, K, N, 128, jnp.bfloat16, MatmulConfig(gemv_min_steps=1))  # 32 splits of one step
     for K, N in ((4096, 6144), (4096, 4096))
] + [("int4", 1, K, N, 128, jnp.bfloat16, MatmulConfig(gemv_factor_scales=False, gemv_subtiles=8))  # before 29b
     for K, N in ((4096, 6144), (4096, 28672))
] + [("int4", 1, K, N, 128, jnp.bfloat16, MatmulConfig(gemv_factor_scales=True, gemv_prefetch=prefetch))
     for K, N in ((4096, 6144), (14336, 4096), (4096, 28672), (4096, 4096)) for prefetch in (0, 1)
] + [("int4", 1, K, N, 128, jnp.bfloat16, MatmulConfig(gemv_factor_scales=True, gemv_subtiles=subtiles,
                                                      gemv_prefetch=prefetch))
     for K, N in ((4096, 6144), (14336, 4096)) for subtiles in (8, 4, 2, 1) for prefetch in (0, 1)
] + [(fmt, 1, 4096, 6144, 128, jnp.bfloat16, MatmulConfig(gemv_fma=False))  # multiply and add apart (before 26d)
     for fmt in ("int8", "int4")
] + [("int4", M, K, N, 128, jnp.bfloat16, MatmulConfig(tile_convert="cvt"))  # the tensor-core form before 30e
     for M, K, N in ((16, 14336, 4096), (64, 4096, 28672))
] + [("int4", 3, 4096, 14336, 128, jnp.float16, MatmulConfig(num_stages=2)),
      ("int8", 256, 4096, 4096, 128, jnp.bfloat16, MatmulConfig()), ("int4", 200, 14336, 4096, 128, jnp.bfloat16,
                                                                     MatmulConfig())]


def case_id(value):
    """Test ids name a config's conversion (and unfused multiply-adds, row blocks other than the default), so
    ``-k permute`` picks the inline-PTX cases."""
    if not isinstance(value, MatmulConfig):
        return None
    return (f"convert-{value.gemv_convert}" + ("" if value.gemv_fma else "-unfused")
            + (f"-tile-{value.tile_convert}" if value.tile_convert != MatmulConfig.tile_convert else "")
            + (f"-subtiles{value.gemv_subtiles}" if value.gemv_subtiles != MatmulConfig.gemv_subtiles else "")
            + (f"-min_steps{value.gemv_min_steps}" if value.gemv_min_steps != MatmulConfig.gemv_min_steps else "")
            + ("-factored" if value.gemv_factor_scales else "-unfactored")
            + ("-prefetch" if value.gemv_prefetch else ""))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,M,K,N,group,dtype,config", GPU_CASES, ids=case_id)
def test_kernel_matches_reference_on_gpu(fmt, M, K, N, group, dtype, config):
    run_case(fmt, M, K, N, group, dtype, config, interpret=False)


def test_matmul_config_from_the_environment(monkeypatch):
    from pallas_kernels import quantized_matmul as qmm

    qmm.default_config.cache_clear()
    monkeypatch.setenv("PAGEDJAX_MATMUL_CONFIG", '{"gemv_defer_reduction": true, "gemv_block_n": 64}')
    try:
        assert qmm.default_config() == MatmulConfig(gemv_defer_reduction=True, gemv_block_n=64)
        run_case("int8", 1, 256, 128, 0, jnp.float32, None, interpret=True)  # the kernel takes it
        qmm.default_config.cache_clear()
        monkeypatch.setenv("PAGEDJAX_MATMUL_CONFIG", '{"gemv_block": 64}')
        with pytest.raises(ValueError, match="MatmulConfig fields"):
            qmm.default_config()
    finally:
        qmm.default_config.cache_clear()
