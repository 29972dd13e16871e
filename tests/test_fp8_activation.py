"""The fp8 MLP middle kernel (``pallas_kernels.fp8_activation``) against its jnp reference: interpreted here, and
lowered to one Triton call for a GPU."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fp8_activation import (
    FP8_MAX,
    gated_activation_fp8,
    gated_activation_fp8_reference,
    kernel_fits,
)
from tests.test_grouped_matmul import cuda_lowering


def _inputs(rng, rows: int, n: int, dtype=jnp.bfloat16):
    """An fp8 dot's output and its row and column scales; gate and up then of order 1 to 10."""
    acc = jnp.asarray(rng.standard_normal((rows, 2 * n)) * 64, dtype)
    row_scale = jnp.asarray(rng.uniform(0.01, 0.05, (rows, 1)), jnp.float32)
    col_scale = jnp.asarray(rng.uniform(0.5, 1.5, 2 * n), jnp.float32)
    return acc, row_scale, col_scale


@pytest.mark.parametrize("rows,n,activation,dtype", [
    (3, 256, "silu", jnp.bfloat16),  # one chunk
    (5, 2048 + 1024, "silu", jnp.bfloat16),  # three chunks of 1024
    (2, 384, "gelu_tanh", jnp.float16),  # chunks of 128
    (4, 512, "silu", jnp.float32),
])
def test_kernel_matches_the_reference(rows, n, activation, dtype):
    check_case(rows, n, activation, dtype, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,n,activation,dtype", [
    (1, 14336, "silu", jnp.bfloat16), (1024, 14336, "silu", jnp.bfloat16), (16384, 14336, "silu", jnp.bfloat16),
    (96, 11008, "gelu_tanh", jnp.bfloat16), (8, 96, "silu", jnp.float16)])
def test_kernel_matches_the_reference_on_gpu(rows, n, activation, dtype):
    check_case(rows, n, activation, dtype, interpret=False)


def check_case(rows, n, activation, dtype, interpret):
    rng = np.random.default_rng()
    args = _inputs(rng, rows, n, dtype)
    q, scale = gated_activation_fp8(*args, activation=activation, dtype=dtype, interpret=interpret)
    # Against float32 throughout: the reference in ``dtype`` rounds the activation's parts one by one, and its
    # tanh-GELU cancels in 1 + tanh(y) (run 41e on an H100: past an fp8 step from the kernel, in bf16)
    q_ref, scale_ref = gated_activation_fp8_reference(*args, activation=activation, dtype=jnp.float32)
    assert q.shape == q_ref.shape == (rows, n) and q.dtype == jnp.float8_e4m3fn and scale.shape == (rows, 1)
    # The row's peak through the kernel's roundings to ``dtype`` (three, each up to 0.4% in bf16)
    np.testing.assert_allclose(scale, scale_ref, rtol=2e-2)
    got, want = (np.asarray(a.astype(jnp.float32)) * np.asarray(s) for a, s in ((q, scale), (q_ref, scale_ref)))
    # The kernel rounds gate, up and the product to ``dtype``: a value may land on the next fp8 step (an eighth of
    # its binade), a few in a hundred; values under 1e-3 of the row's peak (448 * scale) within that.
    step = np.maximum(np.maximum(np.abs(got), np.abs(want)) / 8, np.asarray(scale_ref) * FP8_MAX * 1e-3)
    assert np.all(np.abs(got - want) <= 1.05 * step)  # a step, and the scales' difference
    assert np.mean(np.asarray(q.view(jnp.uint8)) == np.asarray(q_ref.view(jnp.uint8))) > 0.9
    assert np.all(np.abs(np.asarray(q.astype(jnp.float32))) <= FP8_MAX)


def test_a_row_of_zeros_quantizes_to_zeros():
    acc, row_scale, col_scale = _inputs(np.random.default_rng(0), 2, 256)
    acc = acc.at[1].set(0)
    q, scale = gated_activation_fp8(acc, row_scale, col_scale, interpret=True)
    assert not np.any(np.asarray(q[1].astype(jnp.float32))) and np.isfinite(np.asarray(scale)).all()


def test_widths_and_shapes_it_refuses():
    assert kernel_fits(14336) and kernel_fits(96) and kernel_fits(11008)
    assert not kernel_fits(100) and not kernel_fits(32768) and not kernel_fits(16 * 65)
    acc, row_scale, col_scale = _inputs(np.random.default_rng(0), 2, 256)
    with pytest.raises(ValueError, match="row_scale"):
        gated_activation_fp8(acc, row_scale[:1], col_scale, interpret=True)
    with pytest.raises(ValueError, match="do not fit"):
        gated_activation_fp8(acc[:, :200], row_scale, col_scale[:200], interpret=True)  # N = 100
    with pytest.raises(ValueError, match="activation"):
        gated_activation_fp8(acc, row_scale, col_scale, activation="relu", interpret=True)


@pytest.mark.parametrize("n", [14336, 11008])
def test_lowers_to_one_triton_call(n):
    acc, row_scale, col_scale = (jnp.zeros((64, 2 * n), jnp.bfloat16), jnp.ones((64, 1), jnp.float32),
                                 jnp.ones((2 * n,), jnp.float32))
    call = functools.partial(gated_activation_fp8, interpret=False)
    assert cuda_lowering(call, acc, row_scale, col_scale).count("__gpu$xla.gpu.triton") == 1

