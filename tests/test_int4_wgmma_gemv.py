"""The int4 wgmma matmul prototype (``pallas_kernels/int4_wgmma_gemv.py``): its layouts and reference on the CPU, its
lowering for cuda (the CPU cannot run Mosaic GPU kernels, and JAX's Mosaic interpreter takes wgmma's left operand
from memory only), and the kernel against the reference on a GPU (``-m gpu``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import int4_wgmma_gemv as wg
from pallas_kernels.ragged_prefill_mgpu import JAX_0_11

GROUP = 128


def random_weights(key, K, N):
    k1, k2, k3 = jax.random.split(key, 3)
    q = jax.random.randint(k1, (K, N), 0, 16, jnp.int32)
    scales = jax.random.uniform(k2, (K // GROUP, N), jnp.float32, 0.001, 0.01)
    zeros = jax.random.randint(k3, (K // GROUP, N), 0, 16, jnp.int32).astype(jnp.float32)
    return q, scales, zeros


def test_packed_layout_reproduces_the_dequantized_weights():
    K, N = 256, 64
    q, scales, zeros = random_weights(jax.random.key(0), K, N)
    wt, s, zs = wg.pack_weights(q, scales, zeros)
    assert wt.dtype == jnp.int4 and wt.shape == (N, K)
    w = (q.astype(jnp.float32).reshape(2, GROUP, N) - zeros[:, None]) * scales[:, None]
    x = jax.random.normal(jax.random.key(1), (3, K))
    np.testing.assert_allclose(wg.reference(x, wt, s, zs, group_size=GROUP), x @ w.reshape(K, N), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("convert", wg.CONVERSIONS)
def test_kernel_lowers_for_cuda(convert):
    K, N, splits = 512, 128, 2
    sd = jax.ShapeDtypeStruct
    args = (sd((1, K), jnp.bfloat16), sd((N, K), jnp.int4), sd((K // GROUP, N), jnp.float32),
            sd((K // GROUP, N), jnp.float32))
    fn = jax.jit(lambda *a: wg.int4_wgmma_matmul(*a, group_size=GROUP, k_splits=splits, convert=convert))
    assert "mosaic_gpu" in fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of"):
        wg.int4_wgmma_partials(jnp.zeros((8, 256), jnp.bfloat16), jnp.zeros((96, 256), jnp.int4),
                               jnp.zeros((2, 96)), jnp.zeros((2, 96)), group_size=GROUP)
    with pytest.raises(ValueError, match="groups of 128"):
        wg.int4_wgmma_partials(jnp.zeros((8, 256), jnp.bfloat16), jnp.zeros((64, 256), jnp.int4),
                               jnp.zeros((4, 64)), jnp.zeros((4, 64)), group_size=64)
    with pytest.raises(ValueError, match="at most 8 rows"):
        wg.int4_wgmma_matmul(jnp.zeros((9, 256), jnp.bfloat16), jnp.zeros((64, 256), jnp.int4),
                             jnp.zeros((2, 64)), jnp.zeros((2, 64)), group_size=GROUP)


@pytest.mark.skipif(not JAX_0_11, reason="JAX's Mosaic GPU interpreter runs this kernel from 0.11 on")
def test_kernel_matches_reference_in_the_interpreter():
    """Pipeline, K splits, scales and zero points in JAX's Mosaic GPU interpreter (the upcast tile through shared
    memory: the interpreter has no register layouts); a few rows of x."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    K, N, rows = 512, 128, 3
    wt, s, zs = wg.pack_weights(*random_weights(jax.random.key(3), K, N))
    x = jax.random.normal(jax.random.key(4), (rows, K)).astype(jnp.bfloat16)
    out = wg.int4_wgmma_matmul(x, wt, s, zs, group_size=GROUP, k_splits=2, stages=2, interpret=InterpretGPUParams())
    ref = wg.reference(x, wt, s, zs, group_size=GROUP)
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref))) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("convert", wg.CONVERSIONS)
@pytest.mark.parametrize("K, N, splits, rows", [(4096, 6144, 4, 1), (14336, 4096, 7, 1), (4096, 28672, 1, 5)])
def test_kernel_matches_reference_on_gpu(convert, K, N, splits, rows):
    q, scales, zeros = random_weights(jax.random.key(K + N), K, N)
    wt, s, zs = wg.pack_weights(q, scales, zeros)
    x = jax.random.normal(jax.random.key(2), (rows, K), jnp.float32).astype(jnp.bfloat16)
    out = wg.int4_wgmma_matmul(x, wt, s, zs, group_size=GROUP, k_splits=splits, convert=convert)
    ref = wg.reference(x, wt, s, zs, group_size=GROUP)
    assert out.shape == (rows, N)
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref))) < 1e-2
