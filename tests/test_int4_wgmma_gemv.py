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


def random_weights(key, K, N, dtype=jnp.bfloat16):
    """``(q [K, N] nibbles, scales, zeros [K / 128, N])``, the scales and zeros in ``dtype`` (the engine's: x's)."""
    k1, k2, k3 = jax.random.split(key, 3)
    q = jax.random.randint(k1, (K, N), 0, 16, jnp.int32)
    scales = jax.random.uniform(k2, (K // GROUP, N), jnp.float32, 0.001, 0.01).astype(dtype)
    zeros = jax.random.randint(k3, (K // GROUP, N), 0, 16, jnp.int32).astype(dtype)
    return q, scales, zeros


def test_packed_layout_reproduces_the_dequantized_weights():
    K, N = 256, 64
    q, scales, zeros = random_weights(jax.random.key(0), K, N, jnp.float32)
    wt = wg.pack_weights(q)
    assert wt.dtype == jnp.int4 and wt.shape == (N, K)
    w = (q.astype(jnp.float32).reshape(2, GROUP, N) - zeros[:, None]) * scales[:, None]
    x = jax.random.normal(jax.random.key(1), (3, K))
    np.testing.assert_allclose(wg.reference(x, wt, scales, zeros, group_size=GROUP), x @ w.reshape(K, N), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("convert, splits, norm", [(c, 2, False) for c in wg.CONVERSIONS] + [("4x", 1, True)])
def test_kernel_lowers_for_cuda(convert, splits, norm):
    """One row of x (its 8-row tiles past x's end), split or not, with a deferred norm."""
    K, N = 512, 128
    sd = jax.ShapeDtypeStruct
    args = (sd((1, K), jnp.bfloat16), sd((N, K), jnp.int4), sd((K // GROUP, N), jnp.bfloat16),
            sd((K // GROUP, N), jnp.bfloat16))
    norm_args = (sd((8,), jnp.float32),) if norm else ()

    def matmul(*a):
        extra = dict(sum_sq=a[4], norm_eps=1e-5) if norm else {}
        return wg.int4_wgmma_matmul(*a[:4], group_size=GROUP, k_splits=splits, convert=convert, **extra)

    assert "mosaic_gpu" in jax.jit(matmul).trace(*args, *norm_args).lower(lowering_platforms=("cuda",)).as_text()


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
    with pytest.raises(ValueError, match="one row only"):
        wg.int4_wgmma_matmul(jnp.zeros((2, 256), jnp.bfloat16), jnp.zeros((64, 256), jnp.int4),
                             jnp.zeros((2, 64)), jnp.zeros((2, 64)), group_size=GROUP, sum_sq=jnp.zeros((4,)))


def rms_normed(x, eps):
    """``(rows, sum_sq, the normed row's reference input)``: a deferred norm's inputs (unit weight) for one row."""
    from pallas_kernels.deferred_norm import norm_rows_reference

    rows, sum_sq = norm_rows_reference(x, jnp.ones((x.shape[1],), x.dtype))
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return rows, sum_sq, normed


def check_against_reference(K, N, rows, splits, *, norm=False, keep_splits=False, tolerance=1e-2,
                            dtype=jnp.bfloat16, **options):
    """The kernel's ``[M, N]`` (or its partials' sum) against the float32 reference, relative to its largest value;
    scales and zeros in ``dtype``."""
    q, scales, zeros = random_weights(jax.random.key(K + N + rows), K, N, dtype)
    wt = wg.pack_weights(q)
    x = jax.random.normal(jax.random.key(rows), (rows, K)).astype(jnp.bfloat16)
    extra, x_ref = {}, x
    if norm:
        x, sum_sq, x_ref = rms_normed(x, 1e-5)
        extra = dict(sum_sq=sum_sq, norm_eps=1e-5)
    out = wg.int4_wgmma_matmul(x, wt, scales, zeros, group_size=GROUP, k_splits=splits, keep_splits=keep_splits,
                               **extra, **options)
    if keep_splits:
        assert out.shape == (splits, rows, N) and out.dtype == (jnp.bfloat16 if splits == 1 else jnp.float32)
        out = out.astype(jnp.float32).sum(axis=0)
    assert out.shape == (rows, N)
    ref = wg.reference(x_ref, wt, scales, zeros, group_size=GROUP)
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref))) < tolerance


@pytest.mark.skipif(not JAX_0_11, reason="JAX's Mosaic GPU interpreter runs this kernel from 0.11 on")
@pytest.mark.parametrize("rows, splits, norm, keep_splits, dtype", [
    (3, 2, False, False, jnp.bfloat16), (1, 1, True, False, jnp.bfloat16), (1, 2, True, True, jnp.float32),
    (8, 1, False, True, jnp.float16)])
def test_kernel_matches_reference_in_the_interpreter(rows, splits, norm, keep_splits, dtype):
    """Pipeline, K splits, scales and zero points, x's rows read as they are (fewer than 8 too), the result stored
    transposed, the deferred norm, in JAX's Mosaic GPU interpreter (the upcast tile through shared memory: the
    interpreter has no register layouts)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    check_against_reference(512, 128, rows, splits, norm=norm, keep_splits=keep_splits, dtype=dtype, stages=2,
                            interpret=InterpretGPUParams())


@pytest.mark.gpu
@pytest.mark.parametrize("convert", wg.CONVERSIONS)
@pytest.mark.parametrize("K, N, splits, rows, norm", [(4096, 6144, 4, 1, True), (14336, 4096, 7, 1, False),
                                                      (4096, 28672, 1, 5, False), (4096, 28672, 1, 1, True)])
def test_kernel_matches_reference_on_gpu(convert, K, N, splits, rows, norm):
    check_against_reference(K, N, rows, splits, norm=norm, convert=convert)


@pytest.mark.gpu
@pytest.mark.parametrize("pad_rows, keep_splits", [(True, False), (False, True)])
def test_padded_rows_and_kept_splits_on_gpu(pad_rows, keep_splits):
    check_against_reference(4096, 6144, 3, 4, keep_splits=keep_splits, pad_rows=pad_rows, convert="4x")


# ------------------------------------------------------------------ the engine's use of it (opt-in)


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory):
    """A tiny llama whose every matmul has K a multiple of 128 and N of 64 (the kernel's tiles), int4 at load time."""
    pytest.importorskip("transformers")  # CI also runs this file in a JAX 0.11 venv without the engine's dependencies
    from models.loader import load_model
    from tests.tiny_checkpoints import write_tiny_checkpoint

    path = tmp_path_factory.mktemp("wgmma")
    write_tiny_checkpoint(path, "llama", seed=5, hidden_size=128, intermediate_size=256)
    return load_model(str(path), dtype="float32", quantization="int4")


def test_wgmma_layout_holds_the_same_weights(tiny128):
    """``add_int4_wgmma_layout``: every layer matmul of the stacked int4 model gets ``W^T`` with the same products as
    its block-packed weights; act-order and other group sizes get none."""
    from models.quantization import QUANTIZED_LAYER_WEIGHTS, add_int4_wgmma_layout, dequantize, takes_wgmma_layout

    layers = dict(tiny128.params["layers"])
    with_t = add_int4_wgmma_layout({"layers": dict(layers)})["layers"]
    x = jax.random.normal(jax.random.key(0), (2, 256))
    for name in QUANTIZED_LAYER_WEIGHTS:
        w = with_t[name]
        assert layers[name].wgmma_q is None and w.wgmma_q.dtype == jnp.int4
        for i in range(w.packed.shape[0]):
            K = w.wgmma_q.shape[-1]
            got = wg.reference(x[:, :K], w.wgmma_q[i], w.scales[i], w.zeros[i], group_size=w.group_size)
            np.testing.assert_allclose(got, x[:, :K] @ dequantize(w)[i], rtol=1e-5, atol=1e-5)
    w = layers["wq"]
    assert not takes_wgmma_layout(w.replace(perm=jnp.zeros(w.packed.shape[:-2] + (128,), jnp.int32)))
    assert not takes_wgmma_layout(w.replace(group_size=64)) and not takes_wgmma_layout(with_t["wq"])


def test_loader_keeps_one_layout_off_hopper(tiny128, caplog):
    from models.loader import _with_int4_wgmma_layout

    params = {"layers": dict(tiny128.params["layers"])}
    assert _with_int4_wgmma_layout(params, None)["layers"]["wq"].wgmma_q is None
    assert "runs on one Hopper GPU" in caplog.text


def test_one_row_steps_take_the_wgmma_matmul_with_the_same_logits(tiny128, monkeypatch):
    """Unrolled, joined layers with ``W^T``: a one-row step sends each of a layer's four matmuls to the wgmma kernel
    (here its float32 reference: the CPU cannot run it), the deferred norms and kept splits included, with the logits
    of the Triton GEMVs (interpreted); a prompt step of more than 8 rows keeps the Triton kernels."""
    import dataclasses

    from jax import lax

    from models.llama import layout_layers
    from models.quantization import LinearBackend, add_int4_wgmma_layout
    from tests.test_quantization import logits_of, ragged_batch, relative_error

    calls = []

    def reference_kernel(x, wt, scales, zeros, *, group_size, keep_splits=False, sum_sq=None, norm_eps=0.0):
        calls.append((x.shape[0], sum_sq is not None, keep_splits))
        y = wg.reference(x, wt, scales, zeros, group_size=group_size)
        if sum_sq is not None:
            y = y * lax.rsqrt(jnp.sum(sum_sq) / x.shape[1] + norm_eps)
        y = y.astype(x.dtype)
        return y[None] if keep_splits else y

    monkeypatch.setattr(wg, "engine_matmul", reference_kernel)
    monkeypatch.setattr(LinearBackend, "runs_int4_wgmma", lambda self, w, x: w.wgmma_q is not None
                        and x.shape[0] <= wg.ROWS)
    plain = dataclasses.replace(tiny128, params=layout_layers(tiny128.params, unroll=True, fuse=True))
    with_t = add_int4_wgmma_layout(layout_layers(tiny128.params, unroll=True, fuse=True))
    assert with_t["layers"][0]["wqkv"].wgmma_q.shape == (256, 128)
    with_t = dataclasses.replace(tiny128, params=with_t)
    pallas = LinearBackend(kernel="pallas", interpret=True)
    rng = np.random.default_rng(0)
    one_row, pages = ragged_batch(tiny128.config, rng, lengths=(1,))
    got = logits_of(with_t, one_row, pages + 1, linear_backend=pallas)
    # four matmuls a traced layer (one jitted layer serves every layer of a shape): q/k/v and gate/up apply the
    # deferred norm, wo and w_down hand their partial sums to the residual add
    assert calls and len(calls) % 4 == 0 and {c[1:] for c in calls} == {(True, False), (False, True)}
    assert relative_error(got, logits_of(plain, one_row, pages + 1, linear_backend=pallas)) < 1e-4
    calls.clear()
    prompt, pages = ragged_batch(tiny128.config, rng, lengths=(5, 9))
    got = logits_of(with_t, prompt, pages + 1, linear_backend=pallas)
    assert not calls
    assert relative_error(got, logits_of(plain, prompt, pages + 1, linear_backend=pallas)) < 1e-5


def test_decode_bytes_count_the_wgmma_copy_instead_of_the_packed_weights(tiny128):
    """``bench_common.weight_bytes``: the copy's int4 at half a byte, read in place of ``packed``."""
    import os
    import sys

    from models.quantization import QUANTIZED_LAYER_WEIGHTS, add_int4_wgmma_layout

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import bench_common

    params = dict(tiny128.params, layers=dict(tiny128.params["layers"]))
    total, read = bench_common.weight_bytes(params, tiny128.config)
    copies = sum(params["layers"][n].packed.size for n in QUANTIZED_LAYER_WEIGHTS)  # W^T: the packed weights' bytes
    total_t, read_t = bench_common.weight_bytes(add_int4_wgmma_layout(params), tiny128.config)
    assert (total_t, read_t) == (total + copies, read)
