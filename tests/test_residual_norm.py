"""The residual-add + RMSNorm kernels against its jnp reference: interpreted on CPU, compiled on GPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.residual_norm import add_rms_norm, add_rms_norm_reference

CASES = [  # (parts P, rows T, hidden D, dtype): one part in x's dtype, or float32 K-split partial sums
    (1, 1, 128, jnp.bfloat16),
    (3, 1, 256, jnp.bfloat16),
    (8, 5, 128, jnp.float32),
    (1, 2, 4096, jnp.float32),
]


def run_case(P, T, D, dtype, *, interpret):
    seed = np.random.SeedSequence().entropy
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((T, D)), dtype)
    parts = jnp.asarray(rng.standard_normal((P, T, D)), jnp.float32 if P > 1 else dtype)
    weight = jnp.asarray(rng.uniform(0.5, 1.5, D), dtype)
    got = add_rms_norm(x, parts, weight, eps=1e-5, interpret=interpret)
    want = add_rms_norm_reference(x, parts, weight, eps=1e-5)
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5  # one rounding step of bf16 where the sum orders differ
    for name, a, b in zip(("residual", "normed"), got, want):
        assert a.shape == b.shape == (T, D) and a.dtype == b.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol,
                                   err_msg=f"seed {seed}: {name}")


@pytest.mark.parametrize("P,T,D,dtype", CASES)
def test_kernel_matches_reference_interpret(P, T, D, dtype):
    run_case(P, T, D, dtype, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("P,T,D,dtype", CASES + [(4, 1, 4096, jnp.bfloat16), (8, 1, 8192, jnp.bfloat16)])
def test_kernel_matches_reference_on_gpu(P, T, D, dtype):
    run_case(P, T, D, dtype, interpret=False)


def test_kernels_lower_to_triton_for_cuda():
    """Two launches: the sum and residual add (with each chunk's sum of squares), then the scaling."""
    fn = jax.jit(functools.partial(add_rms_norm, eps=1e-5, interpret=False))
    args = (jnp.ones((1, 4096), jnp.bfloat16), jnp.ones((4, 1, 4096), jnp.float32), jnp.ones((4096,), jnp.bfloat16))
    assert fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text().count("__gpu$xla.gpu.triton") == 2


@pytest.mark.parametrize("x,parts,weight,message", [
    ((1, 96), (1, 1, 96), (96,), "power-of-two hidden size"),
    ((1, 128), (2, 2, 128), (128,), r"parts \[P, T, D\]"),
    ((1, 128), (1, 1, 128), (64,), "weight"),
])
def test_rejects_bad_shapes_with_clear_errors(x, parts, weight, message):
    with pytest.raises(ValueError, match=message):
        add_rms_norm(jnp.ones(x), jnp.ones(parts), jnp.ones(weight), eps=1e-5)
