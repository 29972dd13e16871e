"""The one-row residual add with its RMSNorm deferred (``pallas_kernels.deferred_norm``) and the GEMVs that apply
the norm to their output, against XLA's add and ``rms_norm`` then the matmul.

The same cases run interpreted on CPU and compiled by Triton with ``-m gpu``; every run draws fresh inputs (the seed
is in failures)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.norm import add_rms_norm, defer_norm, rms_norm
from pallas_kernels import quantized_matmul as qmm
from pallas_kernels.deferred_norm import add_norm_rows, add_norm_rows_reference, column_blocks

EPS = 1e-5


@pytest.mark.parametrize("width,blocks", [(4096, (64, 64)), (2048, (64, 32)), (8192, (256, 32)), (576, (64, 9)),
                                         (3584, (256, 14)), (96, (32, 3))])
def test_column_blocks_are_powers_of_two_covering_the_row(width, blocks):
    assert column_blocks(width) == blocks


def test_column_block_for_timing_must_be_a_power_of_two(monkeypatch):
    monkeypatch.setenv("PAGEDJAX_ADD_NORM_BLOCK", "256")
    assert column_blocks(4096) == (256, 16)
    monkeypatch.setenv("PAGEDJAX_ADD_NORM_BLOCK", "96")
    with pytest.raises(ValueError, match="PAGEDJAX_ADD_NORM_BLOCK must be a power of two"):
        column_blocks(4096)


def random_row(rng, width: int, num_parts: int, dtype):
    x = jnp.asarray(rng.standard_normal((1, width)) * 3, dtype)
    parts = jnp.asarray(rng.standard_normal((num_parts, 1, width)), jnp.float32 if num_parts > 1 else dtype)
    weight = jnp.asarray(rng.uniform(0.2, 2.0, width), dtype)
    return x, parts, weight


CASES = [(4096, 4, jnp.bfloat16), (4096, 1, jnp.bfloat16), (576, 3, jnp.bfloat16), (576, 1, jnp.float32),
         (96, 2, jnp.float32)]


def run_add_norm_case(width, num_parts, dtype, interpret):
    seed = np.random.SeedSequence().entropy
    x, parts, weight = random_row(np.random.default_rng(seed), width, num_parts, dtype)
    x_new, rows, sum_sq = add_norm_rows(x, parts, weight, interpret=interpret)
    want_x, want_h = add_rms_norm(x, parts, weight, EPS)
    ref_x, ref_rows, ref_sum_sq = add_norm_rows_reference(x, parts, weight)
    assert x_new.dtype == rows.dtype == dtype and sum_sq.shape == (column_blocks(width)[1],)
    # The residual stream exactly as XLA's add rounds it (up to the partials' float32 summation order).
    np.testing.assert_allclose(np.asarray(x_new, np.float32), np.asarray(want_x, np.float32), rtol=1e-2 if
                               num_parts > 2 else 0, atol=0, err_msg=f"seed {seed}")
    np.testing.assert_array_equal(np.asarray(x_new), np.asarray(ref_x), err_msg=f"seed {seed}")
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(ref_rows), err_msg=f"seed {seed}")
    np.testing.assert_allclose(np.asarray(sum_sq), np.asarray(ref_sum_sq), rtol=1e-5, err_msg=f"seed {seed}")
    # The normed row the GEMVs stand for: rows x rsqrt(mean(x^2) + eps) is rms_norm within its rounding.
    scale = jax.lax.rsqrt(jnp.sum(sum_sq) / width + EPS)
    got_h = np.asarray(rows, np.float32) * float(scale)
    np.testing.assert_allclose(got_h, np.asarray(rms_norm(x_new, weight, EPS), np.float32),
                               rtol=2e-2 if dtype == jnp.bfloat16 else 1e-5, atol=1e-2 if dtype == jnp.bfloat16
                               else 1e-5, err_msg=f"seed {seed}")


@pytest.mark.parametrize("width,num_parts,dtype", CASES)
def test_add_norm_rows_matches_xla_interpret(width, num_parts, dtype):
    run_add_norm_case(width, num_parts, dtype, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("width,num_parts,dtype", CASES)
def test_add_norm_rows_matches_xla_on_gpu(width, num_parts, dtype):
    run_add_norm_case(width, num_parts, dtype, interpret=False)


def test_add_norm_rows_lowers_to_one_triton_call_and_checks_shapes():
    x, parts, weight = jnp.ones((1, 4096), jnp.bfloat16), jnp.ones((4, 1, 4096), jnp.float32), jnp.ones(4096)
    fn = jax.jit(functools.partial(add_norm_rows, interpret=False))
    assert fn.trace(x, parts, weight).lower(lowering_platforms=("cuda",)).as_text().count("__gpu$xla.gpu.triton") == 1
    with pytest.raises(ValueError, match="x \\[1, H\\]"):
        add_norm_rows(jnp.ones((2, 4096)), parts, weight)
    with pytest.raises(ValueError, match="parts \\[P, 1, H\\]"):
        add_norm_rows(x, jnp.ones((4, 4096)), weight)


def gemv_cases():
    """(name, matmul(x, **norm), reference(h)) for each GEMV form over a random [K, N] weight."""
    rng = np.random.default_rng()
    K, N = 512, 256
    q = jnp.asarray(rng.integers(-127, 128, (K, N)), jnp.int8)
    scale = jnp.asarray(rng.uniform(0.005, 0.02, N), jnp.float32)
    pack = qmm.int4_pack_block(K, 128)
    packed = jnp.asarray(qmm.pack_int4(rng.integers(0, 16, (K, N)), pack))
    scales = jnp.asarray(rng.uniform(0.001, 0.05, (K // 128, N)), jnp.float32)
    zeros = jnp.asarray(rng.uniform(0, 15, (K // 128, N)), jnp.float32)
    dense = jnp.asarray(rng.standard_normal((K, N)), jnp.float32)
    int4 = dict(group_size=128, pack=pack)
    return [
        ("int8 k-major", functools.partial(qmm.int8_kmajor_matmul, qt=q.T, scale=scale),
         lambda h: qmm.int8_kmajor_matmul_reference(h, q.T, scale)),
        ("int8 k-major, split", functools.partial(qmm.int8_kmajor_matmul, qt=q.T, scale=scale, config=qmm.MatmulConfig(
            k_splits=2, kmajor_block_k=64)), lambda h: qmm.int8_kmajor_matmul_reference(h, q.T, scale)),
        ("int8", functools.partial(qmm.int8_matmul, q=q, scale=scale),
         lambda h: qmm.int8_matmul_reference(h, q, scale)),
        ("int4", functools.partial(qmm.int4_matmul, packed=packed, scales=scales, zeros=zeros, **int4),
         lambda h: qmm.int4_matmul_reference(h, packed, scales, zeros, **int4)),
        ("int4, dot form", functools.partial(qmm.int4_matmul, packed=packed, scales=scales, zeros=zeros, **int4,
                                             config=qmm.MatmulConfig(gemv=False)),
         lambda h: qmm.int4_matmul_reference(h, packed, scales, zeros, **int4)),
        ("dense, split", functools.partial(qmm.dense_matmul, w=dense, config=qmm.MatmulConfig(k_splits=4)),
         lambda h: qmm.dense_matmul_reference(h, dense)),
    ]


def run_gemv_cases(interpret, dtype=jnp.float32):
    seed = np.random.SeedSequence().entropy
    x, parts, weight = random_row(np.random.default_rng(seed), 512, 2, dtype)
    x_new, rows, sum_sq = add_norm_rows(x, parts, weight, interpret=interpret)
    h = rms_norm(x_new, weight, EPS)
    for name, matmul, reference in gemv_cases():
        want = np.asarray(reference(h), np.float64)
        got = matmul(rows, interpret=interpret, sum_sq=sum_sq, norm_eps=EPS, keep_splits=True)
        got = np.asarray(got.astype(jnp.float32).sum(axis=0), np.float64)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < (2e-2 if dtype == jnp.bfloat16 else 1e-5), f"seed {seed}: {name}: max error {err:.2e}"


def test_gemvs_apply_the_deferred_norm_interpret():
    run_gemv_cases(interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gemvs_apply_the_deferred_norm_on_gpu(dtype):
    run_gemv_cases(interpret=False, dtype=dtype)


def test_a_deferred_norm_is_for_one_row_gemvs_only():
    rows, sum_sq = jnp.ones((2, 512)), jnp.ones((2,), jnp.float32)
    with pytest.raises(ValueError, match="at one row only"):
        qmm.dense_matmul(rows, jnp.ones((512, 64)), sum_sq=sum_sq, interpret=True)
    with pytest.raises(ValueError, match="one-row GEMV only"):
        qmm.int8_kmajor_matmul(rows, jnp.ones((64, 512), jnp.int8), jnp.ones(64), sum_sq=sum_sq, interpret=True)
    with pytest.raises(ValueError, match="sum_sq must be float32"):
        qmm.dense_matmul(rows[:1], jnp.ones((512, 64)), sum_sq=jnp.ones((2,), jnp.bfloat16), interpret=True)


def test_defer_norm_in_jnp_is_the_kernels_form():
    """The first layer's input (no residual add before it) deferred in jnp: the kernel's rows and sums of squares."""
    x, _, weight = random_row(np.random.default_rng(), 576, 1, jnp.bfloat16)
    d = defer_norm(x, weight, EPS)
    _, rows, sum_sq = add_norm_rows(jnp.zeros_like(x), x[None], weight, interpret=True)
    np.testing.assert_array_equal(np.asarray(d.rows), np.asarray(rows))
    np.testing.assert_allclose(np.asarray(d.sum_sq), np.asarray(sum_sq), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(d.value()), np.asarray(rms_norm(x, weight, EPS)))
