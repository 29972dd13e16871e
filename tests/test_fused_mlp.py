"""The one-row MLP in one launch (``pallas_kernels.fused_mlp``) against the three-launch path's math.

The same cases run in interpret mode on CPU and compiled by Triton with ``-m gpu``; every run draws fresh random
inputs (the seed is in failures). In the model, the fused MLP gives the logits of the three launches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.fused_mlp import fused_mlp, fused_mlp_reference
from pallas_kernels.quantized_matmul import MatmulConfig

RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}

# (hidden H, intermediate I, dtype, config)
CPU_CASES = [
    (128, 256, jnp.float32, MatmulConfig()),
    (64, 96, jnp.float32, MatmulConfig(mlp_block_k=32, mlp_block_h=16)),  # slices of 32 (the power of 2 dividing I)
    (128, 256, jnp.bfloat16, MatmulConfig(mlp_block_i=16, mlp_block_k=32, mlp_block_h=128)),
    (96, 64, jnp.float32, MatmulConfig(gemv_prefetch=0, gemv_convert="cvt")),  # loads not ahead, 3 steps
]
GPU_CASES = [  # the 8B's MLP under the default tiles and the variants the suite times
    (4096, 14336, jnp.bfloat16, MatmulConfig()),
    (4096, 14336, jnp.bfloat16, MatmulConfig(mlp_block_h=128)),
    (4096, 14336, jnp.bfloat16, MatmulConfig(mlp_block_i=32, gemv_fma=False)),
    (2048, 8192, jnp.bfloat16, MatmulConfig(mlp_block_k=128, mlp_num_warps=8)),
]


def random_mlp(rng, H: int, I: int, dtype):
    """``(x[1, H], gate/up q [2I, H], its scale, down q [H, I], its scale)``, scales that keep outputs ~1."""
    x = jnp.asarray(rng.standard_normal((1, H)), dtype)
    gu_q = jnp.asarray(rng.integers(-127, 128, (2 * I, H)), jnp.int8)
    gu_scale = jnp.asarray(rng.uniform(0.5, 1.5, 2 * I) / (64 * np.sqrt(H)), jnp.float32)
    d_q = jnp.asarray(rng.integers(-127, 128, (H, I)), jnp.int8)
    d_scale = jnp.asarray(rng.uniform(0.5, 1.5, H) / (64 * np.sqrt(I)), jnp.float32)
    return x, gu_q, gu_scale, d_q, d_scale


def run_case(H, I, dtype, config, *, interpret):
    seed = np.random.SeedSequence().entropy
    args = random_mlp(np.random.default_rng(seed), H, I, dtype)
    parts = jax.jit(functools.partial(fused_mlp, config=config, interpret=interpret))(*args)
    block_i = I // parts.shape[0]
    assert parts.shape == (I // block_i, 1, H) and parts.dtype == jnp.float32 and block_i <= config.mlp_block_i
    want = np.asarray(fused_mlp_reference(*args), np.float64)
    err = np.abs(np.asarray(parts, np.float64).sum(axis=0) - want).max() / np.abs(want).max()
    assert err < RTOL[dtype], f"seed {seed}: max error {err:.2e} (of the largest output)"


@pytest.mark.parametrize("H,I,dtype,config", CPU_CASES)
def test_fused_mlp_matches_the_three_launches_interpret(H, I, dtype, config):
    run_case(H, I, dtype, config, interpret=True)


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


@pytest.mark.parametrize("config", [c for _, _, _, c in GPU_CASES])
def test_fused_mlp_lowers_to_one_triton_call_and_checks_its_inputs(config):
    H, I = 4096, 14336  # shapes only: nothing runs
    x, gu_q, gu_scale, d_q, d_scale = (jnp.zeros((1, H), jnp.bfloat16), jnp.zeros((2 * I, H), jnp.int8),
                                       jnp.ones((2 * I,)), jnp.zeros((H, I), jnp.int8), jnp.ones((H,)))
    text = cuda_lowering(functools.partial(fused_mlp, config=config, interpret=False), x, gu_q, gu_scale, d_q, d_scale)
    assert text.count("__gpu$xla.gpu.triton") == 1
    with pytest.raises(ValueError, match="one row"):
        fused_mlp(jnp.concatenate([x, x]), gu_q, gu_scale, d_q, d_scale)
    with pytest.raises(ValueError, match="down"):
        fused_mlp(x, gu_q, gu_scale, d_q.T, d_scale)
    with pytest.raises(ValueError, match="int8"):
        fused_mlp(x, gu_q.astype(jnp.float32), gu_scale, d_q, d_scale)


@pytest.mark.gpu
@pytest.mark.parametrize("H,I,dtype,config", GPU_CASES)
def test_fused_mlp_matches_the_three_launches_on_gpu(H, I, dtype, config):
    run_case(H, I, dtype, config, interpret=False)


def test_model_with_the_fused_mlp_gives_the_three_launches_logits(tmp_path, monkeypatch):
    """A decode row of an int8 model (K-major weights, fused gate/up) through the fused MLP, interpreted: the
    logits of the three-launch kernels; prompt rows keep the three launches; ``$PAGEDJAX_FUSED_MLP`` switches it."""
    import pallas_kernels.fused_mlp as kernel_module
    from models.llama import layout_layers
    from models.loader import load_model
    from models.quantization import LinearBackend
    from tests.test_quantization import logits_of, ragged_batch, relative_error
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "llama", seed=int(np.random.default_rng().integers(1 << 20)))
    model = load_model(str(tmp_path), dtype="float32", quantization="int8")
    model.params = layout_layers(model.params, unroll=False, fuse=True)
    calls = []
    monkeypatch.setattr(kernel_module, "fused_mlp", lambda *a, _f=kernel_module.fused_mlp, **k: calls.append(
        a[1].shape) or _f(*a, **k))
    rng = np.random.default_rng()
    for lengths in ((1,), (5, 3)):
        batch, pages = ragged_batch(model.config, rng, lengths=lengths)
        calls.clear()
        logits = {fused: logits_of(model, batch, pages + 1, linear_backend=LinearBackend(
            kernel="pallas", interpret=True, fused_mlp=fused)) for fused in (False, True)}
        assert relative_error(logits[True], logits[False]) < 1e-5
        assert len(calls) == (1 if lengths == (1,) else 0)  # the layers are one scan: traced once
    monkeypatch.setenv("PAGEDJAX_FUSED_MLP", "1")
    assert LinearBackend().fused_mlp
    monkeypatch.setenv("PAGEDJAX_FUSED_MLP", "yes")
    with pytest.raises(ValueError, match="PAGEDJAX_FUSED_MLP"):
        LinearBackend()
