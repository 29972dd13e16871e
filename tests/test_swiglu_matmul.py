"""The gate/up projection with the SwiGLU product in its epilogue against its reference.

The same cases run in interpret mode on CPU and compiled by Triton with ``-m gpu``; fresh random
inputs every run (the seed is in failures). The reference itself is checked against float64 numpy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.swiglu_matmul import SwigluConfig, swiglu_matmul, swiglu_matmul_reference

SMALL = SwigluConfig(block_m=32, block_n=32, block_k=32, group_m=2, num_warps=4, num_stages=2)
RTOL = {jnp.float32: 2e-3, jnp.bfloat16: 2e-2}  # float32 dots run as TF32 on the GPU (run 21b: 4.9e-4)
# (M, K, I, dtype, config): one row; rows not a whole tile; 5 row tiles in groups of 2 (a short last group)
CASES = [(1, 64, 96, jnp.float32, SMALL), (37, 64, 96, jnp.bfloat16, SMALL), (130, 128, 64, jnp.bfloat16, SMALL)]
GPU_CASES = CASES + [(300, 512, 384, jnp.bfloat16, None), (2048, 1024, 1024, jnp.bfloat16, None)]


def numpy_swiglu(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    gate_up = x.astype(np.float64) @ w.astype(np.float64)
    gate, up = np.split(gate_up, 2, axis=-1)
    return gate / (1 + np.exp(-gate)) * up


def run_case(M, K, I, dtype, config, *, interpret):
    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((M, K)), dtype)
    w = jnp.asarray(rng.standard_normal((K, 2 * I)) / np.sqrt(K), dtype)
    out = jax.jit(functools.partial(swiglu_matmul, config=config, interpret=interpret))(x, w)
    ref = swiglu_matmul_reference(x, w)
    exact = numpy_swiglu(np.asarray(x.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)))
    assert out.shape == (M, I) and out.dtype == dtype
    scale = np.abs(exact).max()
    for name, got in (("kernel", out), ("reference", ref)):
        err = np.abs(np.asarray(got.astype(jnp.float32), np.float64) - exact).max() / scale
        assert err < RTOL[dtype], f"{name} off by {err:.2e} of the largest output (seed {seed})"


@pytest.mark.parametrize("M,K,I,dtype,config", CASES)
def test_swiglu_matmul_matches_reference_interpret(M, K, I, dtype, config):
    run_case(M, K, I, dtype, config, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,I,dtype,config", GPU_CASES)
def test_swiglu_matmul_matches_reference_on_gpu(M, K, I, dtype, config):
    run_case(M, K, I, dtype, config, interpret=False)


def test_swiglu_matmul_lowers_to_triton_for_cuda():
    """The Triton lowering (not only the interpreter) accepts the kernel at its default tiles: cross-platform
    lowering on CPU."""
    x = jnp.ones((300, 512), jnp.bfloat16)
    w = jnp.ones((512, 768), jnp.bfloat16)
    text = jax.jit(functools.partial(swiglu_matmul, interpret=False)).trace(x, w).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.parametrize("w_shape,message", [((64, 95), "2I"), ((32, 96), "2I"), ((64, 100), "must divide I")])
def test_swiglu_matmul_rejects_bad_shapes(w_shape, message):
    with pytest.raises(ValueError, match=message):
        swiglu_matmul(jnp.ones((4, 64)), jnp.ones(w_shape), config=SMALL, interpret=True)
