"""The grouped matmul of a mixture of experts (``pallas_kernels.grouped_matmul``) against numpy, and its jnp
reference too: dense, int8, fp8 (``[E, N, K]``, as ``Fp8Weight`` stores them) and int4 weights, blocks past the last
expert.

The same cases run in interpret mode on CPU and compiled by Triton with ``-m gpu``; every run draws fresh random
inputs (the seed is in failures). Imports only the kernel, so the GPU machine's JAX can run it in a bare venv (CI).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.grouped_matmul import (gather_rows, grouped_matmul, grouped_matmul_int4,
                                           grouped_matmul_int4_reference, grouped_matmul_reference, swiglu_halves)
from pallas_kernels.quantized_matmul import pack_int4

RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# (blocks, block_m, E, K, N, dtype, block_n, block_k)
CPU_CASES = [
    (6, 16, 4, 64, 96, jnp.float32, 64, 64),  # N = 96: tiles of 32
    (5, 32, 3, 128, 64, jnp.bfloat16, 32, 32),
    (3, 16, 8, 48, 16, jnp.float32, 64, 64),  # K = 48: steps of 16
    (4, 16, 3, 64, 32, jnp.int8, 32, 32),  # int8 weights with their scales, bf16 rows
    (4, 16, 3, 64, 32, jnp.float8_e4m3fn, 32, 32),  # fp8 weights [E, N, K] with their scales, bf16 rows
]
# Qwen3-30B-A3B's expert shapes (gate/up joined, down), Mixtral's K with fewer columns: the numpy reference costs
# blocks x block_m x K x N float64 multiply-adds (run 35a: Mixtral's whole 28672 columns ran past 150 s on the host).
GPU_CASES = [
    (64, 16, 128, 2048, 1536, jnp.bfloat16, 64, 64),
    (64, 64, 128, 768, 2048, jnp.bfloat16, 64, 64),
    (8, 128, 8, 4096, 1024, jnp.bfloat16, 128, 64),
    (64, 16, 128, 2048, 1536, jnp.int8, 64, 64),
    (64, 16, 128, 2048, 1536, jnp.float8_e4m3fn, 64, 64),
    (64, 64, 128, 768, 2048, jnp.float8_e4m3fn, 64, 64),
]


def random_block_experts(rng, blocks: int, E: int) -> np.ndarray:
    """Each block's expert in order, at least one block past the last expert (``E``) and at least one used (with
    none used numpy's product is all zeros, and the error relative to it 0 / 0)."""
    block_expert = np.sort(rng.integers(0, E + 1, blocks))
    block_expert[-1] = E
    block_expert[0] = min(block_expert[0], E - 1)
    return block_expert


def random_blocks(rng, blocks, block_m, E, K, N, dtype):
    """``(x, w, block_expert, scale)``: experts in order with some blocks past the last expert (``E``); int8 / fp8
    ``dtype``: those weights with per-column scales (else scale None) and bf16 rows; fp8 ones stored ``[E, N, K]``.
    Only the experts some block uses are drawn, the others are zeros (a kernel reading the wrong expert still
    fails): the GPU cases' 128 experts would be 400M draws, ~15 s of the host's time a case."""
    quantized = dtype in (jnp.int8, jnp.float8_e4m3fn)
    x = jnp.asarray(rng.standard_normal((blocks * block_m, K)), jnp.bfloat16 if quantized else dtype)
    block_expert = random_block_experts(rng, blocks, E)
    used = np.unique(block_expert[block_expert < E])
    shape = (E, N, K) if dtype == jnp.float8_e4m3fn else (E, K, N)
    w = np.zeros(shape, np.int8 if dtype == jnp.int8 else np.float32)
    if dtype == jnp.int8:
        w[used] = rng.integers(-127, 128, (len(used), *shape[1:]), dtype=np.int8)
    else:
        w[used] = rng.standard_normal((len(used), *shape[1:]), dtype=np.float32) * (64 if quantized else 1 / np.sqrt(K))
    scale = jnp.asarray(rng.uniform(0.5, 1.5, (E, N)) / (64 * np.sqrt(K)), jnp.float32) if quantized else None
    return x, jnp.asarray(w, dtype), jnp.asarray(block_expert, jnp.int32), scale


def check_against_numpy(seed, x, dense, block_expert, E: int, got, reference) -> None:
    """The kernel's and the reference's ``[R, N]`` against numpy's float64 product of each block of ``x`` with its
    expert's weight (``dense [blocks, K, N]``, each block's expert decoded alone: E can be 128), zeros past the
    last expert, which the kernel must write."""
    block_expert = np.asarray(block_expert)
    blocks = len(block_expert)
    block_m = x.shape[0] // blocks
    want = np.matmul(np.asarray(x, np.float64).reshape(blocks, block_m, -1), dense)  # BLAS, a block at a time
    want[block_expert == E] = 0
    want = want.reshape(x.shape[0], -1)
    assert got.shape == want.shape and got.dtype == x.dtype
    for name, y in (("kernel", got), ("reference", reference)):
        err = np.abs(np.asarray(y, np.float64) - want).max() / np.abs(want).max()
        assert err < RTOL[x.dtype.type], f"seed {seed}: {name} max error {err:.2e} (of the largest output)"
    assert not np.asarray(got, np.float64)[np.repeat(block_expert == E, block_m)].any()


def run_case(blocks, block_m, E, K, N, dtype, block_n, block_k, *, interpret, **tiles):
    seed = np.random.SeedSequence().entropy
    x, w, block_expert, scale = random_blocks(np.random.default_rng(seed), blocks, block_m, E, K, N, dtype)
    k_major = dtype == jnp.float8_e4m3fn
    got = grouped_matmul(x, w, block_expert, scale, k_major=k_major, block_n=block_n, block_k=block_k,
                         interpret=interpret, **tiles)
    experts = np.minimum(np.asarray(block_expert), E - 1)
    stored = np.asarray(w[experts].astype(jnp.float32), np.float64)
    dense = (np.swapaxes(stored, 1, 2) if k_major else stored) * (
        1.0 if scale is None else np.asarray(scale, np.float64)[experts][:, None, :])
    check_against_numpy(seed, x, dense, block_expert, E, got,
                        grouped_matmul_reference(x, w, block_expert, scale, k_major=k_major))


@pytest.mark.parametrize("case", CPU_CASES)
def test_grouped_matmul_matches_numpy_interpret(case):
    run_case(*case, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_grouped_matmul_matches_numpy_on_gpu(case):
    run_case(*case, interpret=False)


@pytest.mark.parametrize("case", [CPU_CASES[1], CPU_CASES[3], CPU_CASES[4]])
def test_k_splits_sum_their_partial_products(case):
    """Programs sharing a block's K steps (``k_splits``; capped at a divisor of the steps: 3 of 4 steps runs 2), and
    launched column tiles first."""
    for splits in (4, 3):
        run_case(*case, interpret=True, k_splits=splits, num_stages=3, columns_first=splits == 4)


def cuda_lowering(fn, *args) -> str:
    """``fn(*args)`` lowered for CUDA on this CPU. JAX 0.11's Triton lowering asks the GPU for its architecture, so
    there it is given an abstract H100 (the GPU machine's JAX; CI runs these tests under it too)."""
    lower = lambda: jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()  # noqa: E731
    try:
        from jax._src.mesh import AbstractDevice
        h100 = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
            device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"))
    except (ImportError, TypeError):  # JAX 0.10: no abstract device, none needed
        return lower()
    with jax.sharding.use_abstract_mesh(h100):
        return lower()


def test_grouped_matmul_lowers_to_one_triton_call_and_checks_its_inputs():
    x, w, block_expert = (jnp.zeros((1024, 2048), jnp.bfloat16), jnp.zeros((128, 2048, 1536), jnp.bfloat16),
                          jnp.zeros((64,), jnp.int32))
    text = cuda_lowering(functools.partial(grouped_matmul, interpret=False), x, w, block_expert)
    assert text.count("__gpu$xla.gpu.triton") == 1
    with pytest.raises(ValueError, match=r"w\[E, K, N\]"):
        grouped_matmul(x, w[:, :1024], block_expert)
    with pytest.raises(ValueError, match="equal block"):
        grouped_matmul(x, w, jnp.zeros((48,), jnp.int32))
    with pytest.raises(ValueError, match="int8 and fp8 weights need their scale"):
        grouped_matmul(x, w.astype(jnp.int8), block_expert)
    int8 = cuda_lowering(functools.partial(grouped_matmul, interpret=False), x, w.astype(jnp.int8), block_expert,
                         jnp.ones((128, 1536), jnp.float32))
    assert int8.count("__gpu$xla.gpu.triton") == 1
    gathered = cuda_lowering(functools.partial(grouped_matmul, interpret=False, row_token=jnp.zeros(1024, jnp.int32)),
                             x[:128], w, block_expert)
    assert gathered.count("__gpu$xla.gpu.triton") == 1 and "gather" not in gathered.split("__gpu$xla.gpu.triton")[0]
    with pytest.raises(ValueError, match="row_token must be"):
        grouped_matmul(x[:128], w, block_expert, row_token=jnp.zeros((1024, 1), jnp.int32))
    int8_affine = cuda_lowering(functools.partial(grouped_matmul, convert="affine", interpret=False), x,
                                w.astype(jnp.int8), block_expert, jnp.ones((128, 1536), jnp.float32))
    assert int8_affine.count("__gpu$xla.gpu.triton") == 1
    swiglu = cuda_lowering(functools.partial(grouped_matmul, swiglu=True, k_splits=1, interpret=False), x, w,
                           block_expert)
    assert swiglu.count("__gpu$xla.gpu.triton") == 1 and "1024x768xbf16" in swiglu  # the [R, N / 2] activations
    with pytest.raises(ValueError, match="two halves"):
        grouped_matmul(x, w[:, :, :1520], block_expert, swiglu=True)
    fp8 = cuda_lowering(functools.partial(grouped_matmul, k_major=True, interpret=False), x,
                        jnp.zeros((128, 1536, 2048), jnp.float8_e4m3fn), block_expert,
                        jnp.ones((128, 1536), jnp.float32))
    assert fp8.count("__gpu$xla.gpu.triton") == 1


# int4: (blocks, block_m, E, K, N, group_size, pack, block_n)
INT4_CPU_CASES = [(4, 16, 3, 256, 64, 128, 128, 32), (3, 32, 2, 128, 32, 64, 64, 32)]
INT4_GPU_CASES = [(64, 16, 128, 2048, 1536, 128, 128, 64), (64, 64, 128, 768, 2048, 128, 128, 64),
                  (8, 128, 8, 4096, 1024, 128, 128, 64)]


E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])  # MXFP4's values by code


def run_int4_case(blocks, block_m, E, K, N, group_size, pack, block_n, *, interpret, codes="uint4", **tiles):
    """``codes`` "e2m1": MXFP4's experts (gpt-oss): FP4 codes, a power of two a group (its uint8 E8M0 exponent, the
    subnormal 2^-127 included), no zeros."""
    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((blocks * block_m, K)), jnp.bfloat16)
    q = rng.integers(0, 16, (E, K, N), dtype=np.uint8)
    block_expert = random_block_experts(rng, blocks, E)
    experts = np.minimum(block_expert, E - 1)
    if codes == "e2m1":
        exponents = rng.integers(127 - 9, 127 - 4, (E, K // group_size, N), dtype=np.uint8)
        exponents[0, 0, 0] = 0  # 2^-127, a float32 subnormal
        scales, zeros = jnp.asarray(exponents), None
        stored_scales = np.exp2(exponents.astype(np.float64) - 127)[experts]
        stored_zeros = np.zeros_like(stored_scales)
    else:
        scales = jnp.asarray(rng.uniform(0.5, 1.5, (E, K // group_size, N)) / (8 * np.sqrt(K)), jnp.bfloat16)
        zeros = jnp.asarray(rng.integers(0, 16, (E, K // group_size, N)), jnp.bfloat16)
        # the bf16 scales and zeros the kernel reads
        stored_scales, stored_zeros = (np.asarray(a, np.float64)[experts] for a in (scales, zeros))
    operands = (x, pack_int4(jnp.asarray(q), pack), scales, zeros, jnp.asarray(block_expert, jnp.int32))
    got = grouped_matmul_int4(*operands, group_size=group_size, pack=pack, block_n=block_n, interpret=interpret,
                              codes=codes, **tiles)
    values = E2M1[q[experts]] if codes == "e2m1" else q[experts]
    dense = (values - np.repeat(stored_zeros, group_size, axis=1)) * np.repeat(stored_scales, group_size, axis=1)
    check_against_numpy(seed, x, dense, block_expert, E, got,
                        grouped_matmul_int4_reference(*operands, group_size=group_size, pack=pack, codes=codes))


@pytest.mark.parametrize("case", INT4_CPU_CASES)
def test_int4_grouped_matmul_matches_numpy_interpret(case):
    run_int4_case(*case, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", INT4_GPU_CASES)
def test_int4_grouped_matmul_matches_numpy_on_gpu(case):
    run_int4_case(*case, interpret=False)


def test_int4_k_splits_sum_their_partial_products():
    run_int4_case(*INT4_CPU_CASES[0], interpret=True, k_splits=2, columns_first=True)


@pytest.mark.parametrize("k_unroll", [1, 2])
def test_mxfp4_codes_interpret(k_unroll):
    """gpt-oss's MXFP4 experts: FP4 e2m1 codes in 32-row groups (a power-of-two scale each), split over K, and
    with two K steps a loop iteration."""
    run_int4_case(4, 16, 3, 128, 64, 32, 32, 32, interpret=True, codes="e2m1", k_splits=2, k_unroll=k_unroll)


@pytest.mark.gpu
@pytest.mark.parametrize("k_unroll", [1, 2, 4])
def test_mxfp4_codes_on_gpu(k_unroll):
    run_int4_case(64, 16, 32, 2880, 1024, 32, 32, 64, interpret=False, codes="e2m1",  # gpt-oss-20b's K
                  k_unroll=k_unroll)


def check_row_gather(seed, call, reference, x, num_rows: int) -> None:
    """``call(x, row_token=...)`` (the kernel loading row ``r`` as ``x[row_token[r]]``, zeros for the padding's
    token ``T``) equals ``call`` on the gathered rows, and the reference with ``row_token`` equals the reference on
    them: the same products, without the gathered copy."""
    rng = np.random.default_rng(seed)
    row_token = jnp.asarray(rng.integers(0, x.shape[0] + 1, num_rows), jnp.int32)  # T: a padding row
    gathered = gather_rows(x, row_token)
    assert not np.asarray(gathered, np.float32)[np.asarray(row_token) == x.shape[0]].any()
    np.testing.assert_array_equal(np.asarray(call(x, row_token=row_token), np.float32),
                                  np.asarray(call(gathered), np.float32), err_msg=f"seed {seed}")
    np.testing.assert_array_equal(np.asarray(reference(x, row_token=row_token), np.float32),
                                  np.asarray(reference(gathered), np.float32), err_msg=f"seed {seed}")


GATHER_CASES = [(CPU_CASES[1], False), (CPU_CASES[3], False), (CPU_CASES[4], False), (INT4_CPU_CASES[0], True)]


def case_calls(rng, case, int4: bool, *, interpret, **tiles):
    """Random operands for ``case`` (an int4 case where ``int4``): ``x``, then the kernel and the reference as
    functions of the rows (``x`` or its tokens) and their keyword arguments."""
    if int4:
        blocks, block_m, E, K, N, group_size, pack, block_n = case
        x = jnp.asarray(rng.standard_normal((blocks * block_m, K)), jnp.bfloat16)
        block_expert = jnp.asarray(random_block_experts(rng, blocks, E), jnp.int32)
        packed = pack_int4(jnp.asarray(rng.integers(0, 16, (E, K, N), dtype=np.uint8)), pack)
        scales = jnp.asarray(rng.uniform(0.5, 1.5, (E, K // group_size, N)) / (8 * np.sqrt(K)), jnp.bfloat16)
        zeros = jnp.asarray(rng.integers(0, 16, scales.shape), jnp.bfloat16)
        operands, options = (packed, scales, zeros, block_expert), dict(group_size=group_size, pack=pack)
        call = functools.partial(grouped_matmul_int4, block_n=block_n, interpret=interpret, **options, **tiles)
        reference = functools.partial(grouped_matmul_int4_reference, **options)
    else:
        blocks, block_m, E, K, N, dtype, block_n, block_k = case
        x, w, block_expert, scale = random_blocks(rng, blocks, block_m, E, K, N, dtype)
        k_major = dtype == jnp.float8_e4m3fn
        operands = (w, block_expert, scale)
        call = functools.partial(grouped_matmul, k_major=k_major, block_n=block_n, block_k=block_k,
                                 interpret=interpret, **tiles)
        reference = functools.partial(grouped_matmul_reference, k_major=k_major)
    return x, (lambda t, **kw: call(t, *operands, **kw)), (lambda t, **kw: reference(t, *operands, **kw))


def run_gather_case(case, int4: bool, *, interpret, **tiles):
    seed = np.random.SeedSequence().entropy
    x, call, reference = case_calls(np.random.default_rng(seed), case, int4, interpret=interpret, **tiles)
    tokens = x[: max(1, x.shape[0] // 3)]  # fewer tokens than rows: each is read by several rows
    check_row_gather(seed, call, reference, tokens, x.shape[0])


@pytest.mark.parametrize("case, int4", GATHER_CASES)
def test_rows_gathered_by_the_kernel_interpret(case, int4):
    run_gather_case(case, int4, interpret=True, columns_first=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case, int4", [(GPU_CASES[0], False), (GPU_CASES[3], False), (GPU_CASES[4], False),
                                        (INT4_GPU_CASES[0], True), (INT4_GPU_CASES[2], True)])
def test_rows_gathered_by_the_kernel_on_gpu(case, int4):
    run_gather_case(case, int4, interpret=False)


def run_swiglu_case(case, int4: bool, *, interpret, **tiles):
    """``swiglu=True`` (the activation on the float32 products, in the kernel; after the K splits are added where
    there are several) against ``swiglu_halves`` of the plain products (rounded to x's dtype first, as the model's
    unfused path is), with and without the rows gathered by the kernel."""
    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    x, call, _ = case_calls(rng, case, int4, interpret=interpret, **tiles)
    plain = np.asarray(swiglu_halves(call(x).astype(jnp.float32)), np.float32)
    fused = call(x, swiglu=True)
    assert fused.shape == (x.shape[0], plain.shape[1]) and fused.dtype == x.dtype
    scale = np.abs(plain).max() + 1e-6
    np.testing.assert_allclose(np.asarray(fused, np.float32) / scale, plain / scale, atol=2e-2, err_msg=f"seed {seed}")
    tokens = x[: max(1, x.shape[0] // 3)]
    row_token = jnp.asarray(rng.integers(0, tokens.shape[0] + 1, x.shape[0]), jnp.int32)
    np.testing.assert_array_equal(np.asarray(call(tokens, row_token=row_token, swiglu=True), np.float32),
                                  np.asarray(call(gather_rows(tokens, row_token), swiglu=True), np.float32),
                                  err_msg=f"seed {seed}")


SWIGLU_CASES = [(CPU_CASES[1], False), (CPU_CASES[3], False), (CPU_CASES[4], False), (INT4_CPU_CASES[0], True)]


@pytest.mark.parametrize("case, int4", SWIGLU_CASES)
@pytest.mark.parametrize("k_splits", [1, 2])
def test_swiglu_epilogue_interpret(case, int4, k_splits):
    run_swiglu_case(case, int4, interpret=True, k_splits=k_splits)


@pytest.mark.gpu
@pytest.mark.parametrize("case, int4", [(GPU_CASES[0], False), (GPU_CASES[3], False), (GPU_CASES[4], False),
                                        (INT4_GPU_CASES[0], True), (INT4_GPU_CASES[2], True)])
@pytest.mark.parametrize("k_splits", [1, 4])
def test_swiglu_epilogue_on_gpu(case, int4, k_splits):
    run_swiglu_case(case, int4, interpret=False, k_splits=k_splits)


@pytest.mark.parametrize("run, case", [(run_case, CPU_CASES[3]), (run_int4_case, INT4_CPU_CASES[0]),
                                       (run_int4_case, INT4_CPU_CASES[1])])
@pytest.mark.parametrize("convert", ["affine", "cvt"])
def test_each_conversion_gives_the_same_products(run, case, convert):
    """``convert="affine"`` (int8 values and int4 nibbles placed in a float's mantissa, interpreted as the same
    trick in jnp, and one multiply-add a weight; int4's default) and ``"cvt"`` (integer-to-float conversions; int8's
    default), against numpy as the conversions' form is."""
    run(*case, interpret=True, convert=convert)


@pytest.mark.gpu
@pytest.mark.parametrize("run, case", [(run_case, GPU_CASES[0]), (run_case, GPU_CASES[3]),
                                       (run_case, GPU_CASES[0][:6] + (128, 64)), (run_int4_case, INT4_GPU_CASES[0]),
                                       (run_int4_case, INT4_GPU_CASES[0][:7] + (128,))])
@pytest.mark.parametrize("tiles", [dict(k_splits=4, num_stages=3),
                                   dict(num_warps=8, num_stages=4, columns_first=True, k_unroll=2),
                                   dict(num_warps=2, k_splits=4, columns_first=False, convert="cvt")])
def test_tile_settings_on_gpu(run, case, tiles):
    """The settings ``scripts/bench_grouped_matmul.py`` sweeps compile and give numpy's products (the cases' last
    fields are the tiles' columns)."""
    run(*case, interpret=False, **tiles)


def test_config_from_the_environment_picks_tiles_by_block_rows(monkeypatch):
    from pallas_kernels.grouped_matmul import GroupedMatmulConfig, grouped_matmul_config

    config = GroupedMatmulConfig(decode_block_n=32, block_n=128, large_block_n=256)
    assert [config.tiles(m)["block_n"] for m in (16, 32, 64, 128, 256)] == [32, 32, 128, 256, 256]
    assert config.tiles(64)["convert"] == "affine" and config.tiles(64, int8=True)["convert"] == "cvt"
    monkeypatch.setenv("PAGEDJAX_MOE_CONFIG", '{"decode_k_splits": 4}')
    grouped_matmul_config.cache_clear()
    try:
        assert grouped_matmul_config().tiles(16)["k_splits"] == 4
        monkeypatch.setenv("PAGEDJAX_MOE_CONFIG", '{"no_such_field": 1}')
        grouped_matmul_config.cache_clear()
        with pytest.raises(ValueError, match="GroupedMatmulConfig"):
            grouped_matmul_config()
        monkeypatch.setenv("PAGEDJAX_MOE_CONFIG", '{"k_unroll": 0}')
        grouped_matmul_config.cache_clear()
        with pytest.raises(ValueError, match="K step counts must be positive integers"):
            grouped_matmul_config()
    finally:
        monkeypatch.delenv("PAGEDJAX_MOE_CONFIG")
        grouped_matmul_config.cache_clear()


def test_int4_grouped_matmul_lowers_to_one_triton_call_and_checks_its_inputs():
    x, block_expert = jnp.zeros((1024, 2048), jnp.bfloat16), jnp.zeros((64,), jnp.int32)
    packed, scales = jnp.zeros((128, 1024, 1536), jnp.uint8), jnp.ones((128, 16, 1536), jnp.bfloat16)
    call = functools.partial(grouped_matmul_int4, group_size=128, pack=128, interpret=False)
    assert cuda_lowering(call, x, packed, scales, scales, block_expert).count("__gpu$xla.gpu.triton") == 1
    cvt = functools.partial(call, convert="cvt")
    assert cuda_lowering(cvt, x, packed, scales, scales, block_expert).count("__gpu$xla.gpu.triton") == 1
    swiglu = functools.partial(call, swiglu=True, k_splits=1)
    assert cuda_lowering(swiglu, x, packed, scales, scales, block_expert).count("__gpu$xla.gpu.triton") == 1
    e2m1 = functools.partial(grouped_matmul_int4, group_size=32, pack=32, interpret=False, codes="e2m1")
    exponents = jnp.full((128, 64, 1536), 127, jnp.uint8)
    assert cuda_lowering(e2m1, x, packed, exponents, None, block_expert).count("__gpu$xla.gpu.triton") == 1
    assert cuda_lowering(functools.partial(e2m1, k_unroll=4), x, packed, exponents, None,
                         block_expert).count("__gpu$xla.gpu.triton") == 1
    with pytest.raises(ValueError, match="MXFP4 experts need uint8 exponents"):
        e2m1(x, packed, exponents.astype(jnp.bfloat16), None, block_expert)
    with pytest.raises(ValueError, match="convert must be one of"):
        grouped_matmul_int4(x, packed, scales, scales, block_expert, group_size=128, pack=128, convert="exponent")
    with pytest.raises(ValueError, match=r"scales and zeros \[E, K/g, N\]"):
        call(x, packed, scales[:, :8], scales[:, :8], block_expert)
    with pytest.raises(ValueError, match="packing blocks"):
        grouped_matmul_int4(x, packed, scales, scales, block_expert, group_size=96, pack=64)
