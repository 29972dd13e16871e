"""The residual add + RMSNorm kernel (``pallas_kernels.add_rms_norm``) against its jnp reference, interpreted here
and compiled on a GPU (``-m gpu``), on fresh random inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.add_rms_norm import add_rms_norm, add_rms_norm_reference, supported

CASES = [  # (partial sums, rows, width, dtype)
    (1, 1, 64, jnp.float32),
    (4, 1, 4096, jnp.bfloat16),  # batch-1 decode of the 8B after a K-split GEMV
    (1, 7, 256, jnp.bfloat16),
    (3, 5, 128, jnp.float32),
]


def _inputs(P, T, N, dtype):
    keys = jax.random.split(jax.random.PRNGKey(np.random.default_rng().integers(1 << 30)), 3)
    x = (4 * jax.random.normal(keys[0], (T, N))).astype(dtype)
    parts = jax.random.normal(keys[1], (P, T, N), jnp.float32 if P > 1 else dtype)
    weight = (1 + 0.1 * jax.random.normal(keys[2], (N,))).astype(dtype)
    return x, parts, weight


def _check(P, T, N, dtype, interpret):
    x, parts, weight = _inputs(P, T, N, dtype)
    got = add_rms_norm(x, parts, weight, eps=1e-6, interpret=interpret)
    want = add_rms_norm_reference(x, parts, weight, 1e-6)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        # The same roundings; only the order of the mean's float32 sum differs.
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=1e-2 if dtype ==
                                   jnp.bfloat16 else 1e-5, atol=1e-2 if dtype == jnp.bfloat16 else 1e-5)


@pytest.mark.parametrize("P,T,N,dtype", CASES)
def test_interpreted_kernel_matches_reference(P, T, N, dtype):
    _check(P, T, N, dtype, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("P,T,N,dtype", CASES)
def test_compiled_kernel_matches_reference(P, T, N, dtype):
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    _check(P, T, N, dtype, interpret=False)


def test_bad_shapes_and_widths_are_refused():
    x, parts, weight = _inputs(2, 3, 64, jnp.float32)
    with pytest.raises(ValueError, match="parts"):
        add_rms_norm(x, parts[:, :2], weight, eps=1e-6, interpret=True)
    assert supported(4096) and not supported(576) and not supported(16)
    with pytest.raises(ValueError, match="power-of-two"):
        add_rms_norm(x[:, :48], parts[:, :, :48], weight[:48], eps=1e-6, interpret=True)


@pytest.mark.parametrize("P", [1, 3])
def test_kernel_lowers_to_triton_for_cuda(P):
    """The Triton lowering (not only the interpreter) takes the kernel, a count of partial sums that is no power of
    two included: cross-platform lowering on the CPU."""
    x, parts, weight = _inputs(P, 2, 4096, jnp.bfloat16)
    fn = jax.jit(lambda *a: add_rms_norm(*a, eps=1e-6, interpret=False))
    text = fn.trace(x, parts, weight).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
