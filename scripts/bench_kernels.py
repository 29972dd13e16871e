"""Benchmark the ragged paged attention kernel (workloads kernel-decode, kernel-mixed, kernel-prefill).

Thin CLI over ``pallas_kernels``: builds the PROTOCOL workloads (Llama-3.1-8B attention
shape: 32 query / 8 KV heads, head_dim 128, block 16, bf16, pages in random order),
checks the kernel against the reference, sweeps tilings, times the kernel and its
peers measured in the same run (the jnp reference through XLA, JAX's deprecated
Pallas ``paged_attention``; for whole-prompt prefill, ``jax.nn.dot_product_attention``
with cuDNN's flash attention and with XLA on contiguous q/k/v), measures the device
copy rate, and checks that the KV write updates the donated cache in place. Writes
one JSON file per workload.

    python scripts/bench_kernels.py --out benchmarks/results          # on a GPU
    python scripts/bench_kernels.py --smoke --out /tmp/bench          # tiny shapes, CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pallas_kernels.ragged_paged_attention import (  # noqa: E402
    Tiling,
    auto_k_splits,
    ragged_paged_attention,
    ragged_paged_attention_reference,
    write_kv_reference,
)


@dataclasses.dataclass(frozen=True)
class Shape:
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype: str = "bfloat16"


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def build_workload(seed, shape: Shape, q_lens, kv_lens, min_cache_bytes=0):
    """Step inputs for sequences with ``q_lens`` new tokens ending at ``kv_lens``.

    Pages are a random permutation; the cache has enough layers that one K cache
    holds at least ``min_cache_bytes`` (so the kernel indexes a realistic, >4 GiB
    cache), all layers alike, and the kernel reads the last one.
    """
    rng = np.random.default_rng(seed)
    bs, Hkv, D = shape.block_size, shape.num_kv_heads, shape.head_dim
    dtype = jnp.dtype(shape.dtype)
    S = len(q_lens)
    pages_per_seq = max(-(-k // bs) for k in kv_lens)
    num_pages = S * pages_per_seq + 1
    layer_bytes = Hkv * num_pages * bs * D * dtype.itemsize
    num_layers = max(1, -(-min_cache_bytes // layer_bytes))
    block_tables = rng.permutation(np.arange(1, num_pages)).reshape(S, pages_per_seq).astype(np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    key_k, key_v, key_q = jax.random.split(jax.random.PRNGKey(seed), 3)

    @functools.partial(jax.jit, static_argnums=0)
    def random_cache(num_layers, key):
        one = jax.random.normal(key, (1, Hkv, num_pages, bs, D), jnp.float32).astype(dtype)
        return jnp.broadcast_to(one, (num_layers,) + one.shape[1:])

    q = jax.random.normal(key_q, (int(cu[-1]), shape.num_heads, D), jnp.float32).astype(dtype)
    return dict(
        q=q,
        # The attention's argument: q and this step's key and value heads (already in the pages; not read) in one buffer.
        qkv=jnp.concatenate([q, jnp.zeros((q.shape[0], 2 * Hkv, D), dtype)], axis=1),
        k_cache=random_cache(num_layers, key_k),
        v_cache=random_cache(num_layers, key_v),
        layer=jnp.int32(num_layers - 1),
        kv_lens=jnp.asarray(kv_lens, jnp.int32),
        block_tables=jnp.asarray(block_tables),
        cu_q_lens=jnp.asarray(cu),
        num_seqs=jnp.asarray([S], jnp.int32),
    )


ARG_ORDER = ("qkv", "k_cache", "v_cache", "layer", "kv_lens", "block_tables", "cu_q_lens", "num_seqs")


def args_of(w):
    return tuple(w[k] for k in ARG_ORDER)


def kv_bytes_read(w):
    """Bytes of K and V the attention must read: every cached token of every sequence."""
    _, Hkv, _, _, D = w["k_cache"].shape
    return 2 * int(np.asarray(w["kv_lens"]).sum()) * Hkv * D * w["k_cache"].dtype.itemsize


def attention_flops(w):
    """Useful FLOPs: 4 * D per (query head, visible key) pair (QK^T and PV)."""
    T, Hq, D = w["q"].shape
    cu, kv = np.asarray(w["cu_q_lens"]), np.asarray(w["kv_lens"])
    visible = 0
    for s in range(len(kv)):
        q_len = int(cu[s + 1] - cu[s])
        first = int(kv[s]) - q_len
        visible += sum(first + i + 1 for i in range(q_len))
    return 4 * D * Hq * visible


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def time_us(fn, args, repeats, inner):
    """Median over ``repeats`` of the mean of ``inner`` back-to-back calls (µs).

    Calls are dispatched asynchronously and synchronised once per repeat, so the
    host's dispatch overlaps device work; the first two calls (compile, warm-up)
    are not timed.
    """
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(samples), samples


def memory_rates_tb_s(num_bytes, repeats):
    """Copy rate (bytes read + written per second by an elementwise pass) and read rate
    (a reduction that only reads) of ``num_bytes`` of bf16 on the device."""
    x = jax.random.normal(jax.random.PRNGKey(0), (num_bytes // 2,), jnp.float32).astype(jnp.bfloat16)
    copy_us, _ = time_us(jax.jit(lambda x: x * 2), (x,), repeats, 10)
    read_us, _ = time_us(jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), (x,), repeats, 10)
    return 2 * num_bytes / (copy_us * 1e-6) / 1e12, num_bytes / (read_us * 1e-6) / 1e12


def relative_error(out, ref):
    out = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(ref.astype(jnp.float32))
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# --------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------


def kernel_fn(tiling, interpret):
    return jax.jit(functools.partial(ragged_paged_attention, tiling=tiling, interpret=interpret))


def reference_error(w, out):
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(ragged_paged_attention_reference)(*args_of(w))
    return relative_error(out, ref)


def sweep(w, tilings, interpret, repeats, inner, log):
    """Time every tiling on workload ``w``; failures (e.g. out of shared memory) are recorded."""
    rows = []
    for tiling in tilings:
        try:
            us, samples = time_us(kernel_fn(tiling, interpret), args_of(w), repeats, inner)
            rows.append(dict(tiling=dataclasses.asdict(tiling), us=us, samples_us=samples))
            log(f"    {us:10.1f} us  {tiling}")
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects is a data point
            rows.append(dict(tiling=dataclasses.asdict(tiling), error=f"{type(e).__name__}: {e}"[:500]))
            log(f"    failed       {tiling}: {type(e).__name__}: {str(e)[:200]}")
    return rows


def jax_paged_attention_peer(w, interpret, repeats, inner, **params):
    """JAX's deprecated Pallas decode kernel on the same pages (layer sliced beforehand)."""
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa

    layer = int(w["layer"])
    k_pages = jax.block_until_ready(w["k_cache"][layer])
    v_pages = jax.block_until_ready(w["v_cache"][layer])
    fn = jax.jit(functools.partial(jax_pa.paged_attention, interpret=interpret, **params))
    q = (w["q"] * w["q"].shape[-1] ** -0.5).astype(w["q"].dtype)  # it applies no softmax scale itself
    args = (q, k_pages, v_pages, w["block_tables"], w["kv_lens"])
    us, samples = time_us(fn, args, repeats, inner)
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(ragged_paged_attention_reference)(*args_of(w))
    err = relative_error(fn(*args), ref)
    del k_pages, v_pages
    return dict(us=us, samples_us=samples, params=params, rel_err=err)


def decode_tilings(smoke, quick=False):
    """The decode-launch tilings the first decode case sweeps (later cases take its best few)."""
    if quick:  # the best few of the full sweeps on H200 and H100 (benchmarks/NOTES.md)
        grid = [(128, 4, 2), (128, 8, 3), (64, 4, 2)]
        return [Tiling(decode_kv_tokens=kv, decode_warps=w, decode_stages=st) for kv, w, st in grid]
    if smoke:
        return [Tiling(decode_kv_tokens=16, k_splits=None), Tiling(decode_kv_tokens=32, decode_warps=8)]
    grid = [(32, 4, 2), (32, 4, 3), (32, 4, 4), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 2), (64, 8, 3),
            (128, 4, 2), (128, 4, 3), (128, 4, 4), (128, 8, 2), (128, 8, 3), (256, 4, 2),
            # two warps and one-page steps: for short contexts (tput-short's decodes read 129-256 tokens)
            (16, 4, 2), (32, 2, 2), (64, 2, 2), (64, 2, 3), (128, 2, 2)]
    return [Tiling(decode_kv_tokens=kv, decode_warps=w, decode_stages=st) for kv, w, st in grid]


def prefill_tilings(decode: Tiling, smoke):
    if smoke:
        return [dataclasses.replace(decode, prefill_q_rows=16, prefill_kv_tokens=16)]
    combos = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2),
              (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 4), (256, 64, 8, 3), (256, 32, 8, 3)]
    # The Mosaic GPU prefill launch first (sm_90 only: elsewhere it is the Triton launch with default tiles).
    tilings = [dataclasses.replace(decode, prefill_kernel="mosaic", prefill_mosaic_min_tokens=0)]
    triton = dataclasses.replace(decode, prefill_kernel="triton")
    tilings += [dataclasses.replace(triton, prefill_q_rows=r, prefill_kv_tokens=k, prefill_warps=nw, prefill_stages=ns)
                for r, k, nw, ns in combos]
    # Without the prefill launch's hand-pipelined block-table reads and longest-first order (run 15c).
    for base in (Tiling(), Tiling(prefill_kv_tokens=128)):
        tilings += [dataclasses.replace(triton, prefill_q_rows=base.prefill_q_rows, prefill_kv_tokens=base.prefill_kv_tokens,
                                        prefill_prefetch_pages=pf, prefill_longest_first=lf)
                    for pf, lf in ((False, True), (True, False), (False, False))]
    return tilings


def best_row(rows):
    ok = [r for r in rows if "us" in r]
    return min(ok, key=lambda r: r["us"]) if ok else None


def run_decode(cfg, common, log):
    results = []
    shape = cfg.shape
    tilings = decode_tilings(cfg.smoke, cfg.quick)
    for num_seqs, ctx, split_variants in cfg.decode_cases:
        name = f"{num_seqs}x{ctx}"
        log(f"\n== kernel-decode {name}")
        w = build_workload(1, shape, [1] * num_seqs, [ctx] * num_seqs, cfg.min_cache_bytes)
        kv_bytes = kv_bytes_read(w)
        rows = sweep(w, tilings, cfg.interpret, cfg.repeats, cfg.inner, log)
        best = best_row(rows)
        top = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])[:2]
        splits = [dataclasses.replace(Tiling(**r["tiling"]), k_splits=k) for r in top for k in split_variants]
        rows += sweep(w, splits, cfg.interpret, cfg.repeats, cfg.inner, log)
        best = best_row(rows)
        if not results:  # later cases sweep only the first case's best few
            ranked = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
            tilings = [Tiling(**r["tiling"]) for r in ranked[: cfg.keep_best]]
        default = sweep(w, [Tiling()], cfg.interpret, cfg.repeats, cfg.inner, log)[0]
        best_tiling = Tiling(**best["tiling"])
        err = reference_error(w, kernel_fn(best_tiling, cfg.interpret)(*args_of(w)))
        log(f"  best {best['us']:.1f} us, rel err vs reference {err:.2e}")
        ref_us, _ = time_us(jax.jit(ragged_paged_attention_reference), args_of(w), max(5, cfg.repeats // 2), 1)
        pages_per_seq = w["block_tables"].shape[1]
        tuned = dict(pages_per_compute_block=4, k_splits=1, num_warps=4, num_stages=3)
        if ctx >= 8192 or cfg.smoke:
            tuned["k_splits"] = 8 if pages_per_seq % 32 == 0 else 1
        peers = {}
        for label, params in (("jax_paged_attention_tuned", tuned), ("jax_paged_attention_default", {})):
            try:
                peers[label] = jax_paged_attention_peer(w, cfg.interpret, cfg.repeats, cfg.inner, **params)
            except Exception as e:  # noqa: BLE001
                peers[label] = dict(error=f"{type(e).__name__}: {e}"[:500])
        peers["xla_reference"] = dict(us=ref_us)
        for p in peers.values():
            if "us" in p:
                p["kv_read_tb_s"] = kv_bytes / (p["us"] * 1e-6) / 1e12
                p["pct_of_copy_bw"] = 100 * p["kv_read_tb_s"] / common["copy_tb_s"]
        tb_s = kv_bytes / (best["us"] * 1e-6) / 1e12
        peer = peers["jax_paged_attention_tuned"]
        result = dict(
            common, workload="kernel-decode", name=name,
            shape=dict(dataclasses.asdict(shape), num_seqs=num_seqs, ctx=ctx, q_tokens=num_seqs,
                       cache_layers=int(w["k_cache"].shape[0]),
                       k_cache_bytes=int(w["k_cache"].size * w["k_cache"].dtype.itemsize)),
            us=best["us"], kv_read_tb_s=tb_s, pct_of_copy_bw=100 * tb_s / common["copy_tb_s"],
            pct_of_read_bw=100 * tb_s / common["read_tb_s"],
            kv_bytes_read=kv_bytes, rel_err_vs_reference=err, tiling=best["tiling"],
            auto_k_splits=auto_k_splits(shape.num_kv_heads * num_seqs,
                                        -(-pages_per_seq * shape.block_size // best_tiling.decode_kv_tokens)),
            default_tiling=default, sweep=rows, peer=dict(peer, name="jax.experimental.pallas.ops.gpu.paged_attention"),
            ratio=(peer["us"] / best["us"]) if "us" in peer else None, peers=peers,
        )
        log(f"  ours {best['us']:.1f} us = {tb_s:.2f} TB/s ({result['pct_of_copy_bw']:.0f}% of copy); "
            + ", ".join(f"{k} {v.get('us', float('nan')):.1f} us" for k, v in peers.items()))
        results.append(result)
        del w
    return results


def run_mixed(cfg, common, decode_tiling, log):
    shape = cfg.shape
    n_chunks, chunk, n_decodes, ctx = cfg.mixed_case
    log(f"\n== kernel-mixed {n_chunks}x{chunk} prefill + {n_decodes} decodes, ctx {ctx}")
    q_lens = [1] * n_decodes + [chunk] * n_chunks  # the scheduler puts running decodes first
    w = build_workload(2, shape, q_lens, [ctx] * (n_decodes + n_chunks), cfg.min_cache_bytes)
    flops = attention_flops(w)
    rows = sweep(w, prefill_tilings(decode_tiling, cfg.smoke), cfg.interpret, cfg.repeats, cfg.inner, log)
    best = best_row(rows)
    best_tiling = Tiling(**best["tiling"])
    err = reference_error(w, kernel_fn(best_tiling, cfg.interpret)(*args_of(w)))
    ref_us, _ = time_us(jax.jit(ragged_paged_attention_reference), args_of(w), 5, 1)
    # Parts of the step on their own: the prefill chunks alone and the decodes alone.
    parts = {}
    for label, ql in (("prefill_only", [chunk] * n_chunks), ("decode_only", [1] * n_decodes)):
        wp = build_workload(3, shape, ql, [ctx] * len(ql), cfg.min_cache_bytes)
        us, _ = time_us(kernel_fn(best_tiling, cfg.interpret), args_of(wp), cfg.repeats, cfg.inner)
        parts[label] = dict(us=us, tflop_s=attention_flops(wp) / (us * 1e-6) / 1e12,
                            kv_read_tb_s=kv_bytes_read(wp) / (us * 1e-6) / 1e12)
        del wp
    tflop_s = flops / (best["us"] * 1e-6) / 1e12
    result = dict(
        common, workload="kernel-mixed",
        shape=dict(dataclasses.asdict(shape), prefill_chunks=n_chunks, chunk_tokens=chunk, decodes=n_decodes,
                   ctx=ctx, q_tokens=int(w["q"].shape[0])),
        us=best["us"], tflop_s=tflop_s, flops=flops, kv_read_tb_s=kv_bytes_read(w) / (best["us"] * 1e-6) / 1e12,
        pct_of_copy_bw=None, rel_err_vs_reference=err, tiling=best["tiling"], sweep=rows, parts=parts,
        peer=dict(name="xla_reference", us=ref_us, tflop_s=flops / (ref_us * 1e-6) / 1e12),
        ratio=ref_us / best["us"],
    )
    log(f"  ours {best['us']:.1f} us = {tflop_s:.1f} TFLOP/s (err {err:.1e}); reference {ref_us:.1f} us; parts {parts}")
    return [result]


def dense_qkv(w, num_seqs, seq_len):
    """Contiguous ``[B, S, H, D]`` q, k, v of a whole-prompt workload (every sequence
    ``seq_len`` new tokens, ``kv_len == seq_len``): the new tokens' q, and the read
    layer's pages gathered in block-table order (k/v keep the KV head count: GQA)."""
    _, Hq, D = w["q"].shape
    layer = int(w["layer"])
    block_tables = w["block_tables"]

    @jax.jit
    def gather(cache):
        pages = cache[layer][:, block_tables]  # [Hkv, B, pages, bs, D]
        return pages.reshape(pages.shape[0], num_seqs, -1, D)[:, :, :seq_len].transpose(1, 2, 0, 3)

    return w["q"].reshape(num_seqs, seq_len, Hq, D), gather(w["k_cache"]), gather(w["v_cache"])


def dense_attention_peer(implementation, qkv, ours, ref, flops, repeats, inner):
    """``jax.nn.dot_product_attention`` (causal) on contiguous q/k/v; errors against our
    output and the reference (both ``[T, Hq, D]``; T = B * S, sequences in order)."""
    fn = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation=implementation))
    us, samples = time_us(fn, qkv, repeats, inner)
    out = fn(*qkv).reshape(ours.shape)
    return dict(us=us, samples_us=samples, tflop_s=flops / (us * 1e-6) / 1e12,
                rel_err_vs_ours=relative_error(out, ours), rel_err_vs_reference=relative_error(out, ref))


def pallas_mha_peer(qkv, ours, ref, flops, repeats, inner, *, block_q, block_k, num_warps, num_stages, interpret):
    """JAX's Pallas (Triton) flash attention ``pallas.ops.gpu.attention.mha`` on contiguous q/k/v, K/V
    repeated to the query heads (it has no GQA): what the same Triton path reaches without pages."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    q, k, v = qkv
    group = q.shape[2] // k.shape[2]
    k, v = jax.block_until_ready((jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)))
    fn = jax.jit(functools.partial(
        pallas_attention.mha, segment_ids=None, sm_scale=q.shape[-1] ** -0.5, causal=True,
        block_sizes=pallas_attention.BlockSizes(block_q=block_q, block_k=block_k), num_warps=num_warps,
        num_stages=num_stages, interpret=interpret))
    us, samples = time_us(fn, (q, k, v), repeats, inner)
    out = fn(q, k, v).reshape(ours.shape)
    return dict(us=us, samples_us=samples, tflop_s=flops / (us * 1e-6) / 1e12, block_q=block_q, block_k=block_k,
                num_warps=num_warps, num_stages=num_stages, rel_err_vs_ours=relative_error(out, ours),
                rel_err_vs_reference=relative_error(out, ref))


def mosaic_gpu_attention_peer(qkv, ours, ref, flops, repeats, inner, *, block_kv):
    """JAX's Hopper flash attention in Pallas Mosaic GPU (``pallas.ops.gpu.attention_mgpu``: TMA loads,
    wgmma, warp-specialised, GQA) on contiguous q/k/v: how far a Mosaic GPU kernel gets toward cuDNN
    where the Triton path stops (run 15: Pallas ``mha`` 0.71 of cuDNN). It applies no softmax scale, so q
    comes pre-scaled, and in float16: its softmax tile is float16 (bfloat16 inputs fail to lower, run 16a);
    GPU only (it raises elsewhere, recorded as the peer's error)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu

    q, k, v = (a.astype(jnp.float16) for a in qkv)
    q = (q * q.shape[-1] ** -0.5).astype(q.dtype)
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=True)
    fn = jax.jit(functools.partial(attention_mgpu.attention, config=config))
    us, samples = time_us(fn, (q, k, v), repeats, inner)
    out = fn(q, k, v).reshape(ours.shape).astype(ours.dtype)
    return dict(us=us, samples_us=samples, tflop_s=flops / (us * 1e-6) / 1e12, block_q=64, block_kv=block_kv,
                rel_err_vs_ours=relative_error(out, ours), rel_err_vs_reference=relative_error(out, ref))


def record_peer(peers: dict, label: str, name: str, measure, log) -> None:
    """``peers[label]``: ``name`` and the timing dict ``measure()`` returns, or ``name`` and the error where
    the peer fails (absent on this device, e.g. cuDNN on CPU, or rejected by its compiler): recorded, not fatal."""
    try:
        peers[label] = p = dict(name=name, **measure())
        log(f"  {label}: {p['us']:.1f} us = {p['tflop_s']:.1f} TFLOP/s (rel err vs ours {p['rel_err_vs_ours']:.1e},"
            f" vs reference {p['rel_err_vs_reference']:.1e})")
    except Exception as e:  # noqa: BLE001 - a missing peer is a data point, not the run's end
        peers[label] = dict(name=name, error=f"{type(e).__name__}: {e}"[:500])
        log(f"  {label}: failed: {peers[label]['error'][:200]}")


def run_prefill(cfg, common, log):
    """Whole causal prompts (the open issue's target: within 1.3x of cuDNN's flash
    attention on the same shapes), our paged kernel against dense peers on contiguous q/k/v."""
    shape = cfg.shape
    num_seqs, seq_len = cfg.prefill_case
    name = f"{num_seqs}x{seq_len}"
    log(f"\n== kernel-prefill {name} (whole causal prompts, kv_len {seq_len})")
    w = build_workload(6, shape, [seq_len] * num_seqs, [seq_len] * num_seqs, cfg.min_cache_bytes)
    flops = attention_flops(w)
    kv_bytes = kv_bytes_read(w)
    # Decode fields stay the defaults (the engine's): the decode launch only runs empty programs here.
    rows = sweep(w, prefill_tilings(Tiling(), cfg.smoke), cfg.interpret, cfg.repeats, cfg.inner, log)
    best = best_row(rows)
    if best is None:
        raise RuntimeError("kernel-prefill: every tiling failed")
    best_tiling = Tiling(**best["tiling"])
    ours = kernel_fn(best_tiling, cfg.interpret)(*args_of(w))
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(ragged_paged_attention_reference)(*args_of(w))
    err = relative_error(ours, ref)
    qkv = jax.block_until_ready(dense_qkv(w, num_seqs, seq_len))
    peers = {}
    for label, implementation in (("cudnn_flash_attention", "cudnn"), ("xla_dot_product_attention", "xla")):
        record_peer(peers, label, f"jax.nn.dot_product_attention(is_causal=True, implementation='{implementation}')",
                    functools.partial(dense_attention_peer, implementation, qkv, ours, ref, flops, cfg.repeats,
                                      cfg.inner), log)
    for bq, bk, nw, ns in [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3)] if not cfg.smoke else [(16, 16, 4, 1)]:
        record_peer(peers, f"pallas_mha_{bq}x{bk}_w{nw}_s{ns}", "jax.experimental.pallas.ops.gpu.attention.mha",
                    functools.partial(pallas_mha_peer, qkv, ours, ref, flops, cfg.repeats, cfg.inner, block_q=bq,
                                      block_k=bk, num_warps=nw, num_stages=ns, interpret=cfg.interpret), log)
    for block_kv in (128, 64, 256) if not cfg.smoke else (128,):
        record_peer(peers, f"mosaic_gpu_attention_64x{block_kv}",
                    "jax.experimental.pallas.ops.gpu.attention_mgpu.attention",
                    functools.partial(mosaic_gpu_attention_peer, qkv, ours, ref, flops, cfg.repeats, cfg.inner,
                                      block_kv=block_kv), log)
    tflop_s = flops / (best["us"] * 1e-6) / 1e12
    peer = peers["cudnn_flash_attention"]
    ratio = (peer["us"] / best["us"]) if "us" in peer else None
    target = 1 / 1.3
    result = dict(
        common, workload="kernel-prefill", name=name,
        shape=dict(dataclasses.asdict(shape), num_seqs=num_seqs, q_len=seq_len, kv_len=seq_len,
                   q_tokens=int(w["q"].shape[0]), causal=True, cache_layers=int(w["k_cache"].shape[0]),
                   k_cache_bytes=int(w["k_cache"].size * w["k_cache"].dtype.itemsize)),
        us=best["us"], tflop_s=tflop_s, flops=flops, kv_read_tb_s=kv_bytes / (best["us"] * 1e-6) / 1e12,
        kv_bytes_read=kv_bytes, pct_of_copy_bw=None, rel_err_vs_reference=err, tiling=best["tiling"], sweep=rows,
        peer=peer, ratio=ratio, target_ratio_vs_cudnn=target,
        meets_target=(ratio >= target) if ratio is not None else None, peers=peers,
    )
    log(f"  ours {best['us']:.1f} us = {tflop_s:.1f} TFLOP/s (err {err:.1e}); cuDNN / ours "
        + (f"{ratio:.2f}" if ratio is not None else "n/a") + f" (target >= {target:.2f})")
    del w, qkv
    return [result]


def run_kv_write(cfg, common, tiling, log):
    """Is the reference KV write an in-place update of the donated cache, inside a layer scan?"""
    shape = cfg.shape
    num_seqs, ctx = cfg.kvwrite_case
    log(f"\n== kv-write {num_seqs}x{ctx}, {cfg.kvwrite_layers} layers")
    w = build_workload(4, shape, [1] * num_seqs, [ctx] * num_seqs)
    L = cfg.kvwrite_layers
    k_cache = jnp.broadcast_to(w["k_cache"][0], (L,) + w["k_cache"].shape[1:]) + 0
    v_cache = jnp.broadcast_to(w["v_cache"][0], (L,) + w["v_cache"].shape[1:]) + 0
    T, Hkv, D = num_seqs, shape.num_kv_heads, shape.head_dim
    bs = shape.block_size
    last_page = np.asarray(w["block_tables"])[np.arange(num_seqs), (ctx - 1) // bs]
    slots = jnp.asarray(last_page * bs + (ctx - 1) % bs, jnp.int32)
    k_new = jax.random.normal(jax.random.PRNGKey(5), (T, Hkv, D), jnp.float32).astype(k_cache.dtype)
    qkv_new = jnp.concatenate([jnp.zeros((T, shape.num_heads, D), k_new.dtype), k_new, -k_new], axis=1)
    cache_bytes = k_cache.size * k_cache.dtype.itemsize
    hlo_dtype = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}[shape.dtype]
    layer_shape = f"{hlo_dtype}[{','.join(map(str, k_cache.shape[1:]))}]"
    cache_shape = f"{hlo_dtype}[{','.join(map(str, k_cache.shape))}]"

    def cache_copies(hlo_text):
        """HLO copy ops that move a whole cache or a whole layer of it."""
        return sum(1 for line in hlo_text.splitlines()
                   if " copy(" in line and (cache_shape + "{" in line or layer_shape + "{" in line
                                            or cache_shape + " " in line or layer_shape + " " in line))

    write = jax.jit(write_kv_reference, donate_argnums=(0, 1))
    compiled = write.lower(k_cache, v_cache, jnp.int32(1), qkv_new, slots).compile()
    hlo_copies = cache_copies(compiled.as_text())
    k_cache, v_cache = write(k_cache, v_cache, jnp.int32(1), qkv_new, slots)
    jax.block_until_ready(k_cache)
    samples = []
    for _ in range(cfg.repeats):
        t0 = time.perf_counter()
        for i in range(cfg.inner):
            k_cache, v_cache = write(k_cache, v_cache, jnp.int32(i % L), qkv_new, slots)
        jax.block_until_ready(k_cache)
        samples.append((time.perf_counter() - t0) / cfg.inner * 1e6)
    write_us = statistics.median(samples)

    attend = functools.partial(ragged_paged_attention, tiling=tiling, interpret=cfg.interpret)
    meta = (w["kv_lens"], w["block_tables"], w["cu_q_lens"], w["num_seqs"])

    def layer_scan(do_write, do_attend):
        """The model's pattern: scan over layers carrying the donated caches."""

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def run(k_cache, v_cache, qkv):
            def body(carry, layer):
                kc, vc, acc = carry
                if do_write:
                    kc, vc = write_kv_reference(kc, vc, layer, qkv_new, slots)
                if do_attend:
                    acc = acc + attend(qkv, kc, vc, layer, *meta)[0, 0, 0].astype(jnp.float32)
                return (kc, vc, acc), None

            (kc, vc, acc), _ = jax.lax.scan(body, (k_cache, v_cache, jnp.float32(0)),
                                            jnp.arange(L, dtype=jnp.int32))
            return kc, vc, acc

        return run

    scans = {}
    for label, do_write, do_attend in (("write", True, False), ("attention", False, True), ("both", True, True)):
        run = layer_scan(do_write, do_attend)
        copies = cache_copies(run.lower(k_cache, v_cache, w["qkv"]).compile().as_text())
        k_cache, v_cache, acc = run(k_cache, v_cache, w["qkv"])
        jax.block_until_ready(acc)
        samples = []
        for _ in range(cfg.repeats):
            t0 = time.perf_counter()
            k_cache, v_cache, acc = run(k_cache, v_cache, w["qkv"])
            jax.block_until_ready(acc)
            samples.append((time.perf_counter() - t0) / L * 1e6)
        scans[label] = dict(us_per_layer=statistics.median(samples), hlo_cache_copies=copies)
    cache_copy_us = 4 * cache_bytes / (common["copy_tb_s"] * 1e12) * 1e6  # K and V, read + write
    layer_copy_us = cache_copy_us / L
    result = dict(
        common, workload="kv-write", shape=dict(dataclasses.asdict(shape), num_seqs=num_seqs, ctx=ctx, layers=L,
                                                 k_cache_bytes=int(cache_bytes)),
        jitted_write_call_us=write_us, write_hlo_copy_ops=hlo_copies, full_cache_copy_us=cache_copy_us,
        layer_copy_us=layer_copy_us, scan=scans,
        in_place=bool(hlo_copies == 0 and all(v["hlo_cache_copies"] == 0 for v in scans.values())
                      and scans["write"]["us_per_layer"] < 0.2 * layer_copy_us),
    )
    log(f"  one jitted write call {write_us:.1f} us incl. dispatch (a K+V copy: {cache_copy_us:.0f} us whole cache, "
        f"{layer_copy_us:.0f} us one layer); per layer in a scan: "
        + ", ".join(f"{k} {v['us_per_layer']:.1f} us ({v['hlo_cache_copies']} cache copies)" for k, v in scans.items())
        + f" -> in place: {result['in_place']}")
    return [result]


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    smoke: bool
    interpret: bool
    repeats: int
    inner: int
    shape: Shape
    decode_cases: list
    mixed_case: tuple
    kvwrite_case: tuple
    kvwrite_layers: int
    min_cache_bytes: int
    keep_best: int = 4
    quick: bool = False
    prefill_case: tuple = (4, 2048)  # (sequences, tokens): whole causal prompts, kv_len = tokens


def parse_decode_cases(text: str) -> list:
    """``"1024x192,448x1536"`` -> decode cases ``(sequences, context, [])`` (no extra split variants)."""
    cases = []
    for item in text.split(","):
        seqs, _, ctx = item.partition("x")
        if not (seqs.isdigit() and ctx.isdigit()):
            raise ValueError(f"--decode-cases wants SEQSxCTX items like 1024x192, got {item!r}")
        cases.append((int(seqs), int(ctx), []))
    return cases


def print_best_decode_tiling(path: str, case: str, min_gain: float = 0.03) -> int:
    """``--best-decode-tiling``: 0, and the decode fields of ``case``'s fastest tiling printed as
    ``$PAGEDJAX_ATTENTION_TILING``'s JSON, if it beats the default tiling there by ``min_gain``; else 1."""
    with open(path) as f:
        (result,) = [r for r in json.load(f) if r.get("name") == case]
    default_us = result["default_tiling"].get("us")
    if default_us is None or result["us"] > (1 - min_gain) * default_us:
        print(f"{case}: the best tiling ({result['us']:.1f} us) is not {min_gain:.0%} under the default "
              f"({default_us} us)", file=sys.stderr)
        return 1
    fields = ("decode_kv_tokens", "decode_warps", "decode_stages", "k_splits")
    print(json.dumps({k: result["tiling"][k] for k in fields if result["tiling"][k] is not None}))
    return 0


def make_config(args):
    if args.smoke:
        shape = parse_heads(args.heads) if args.heads else Shape(4, 2, 64, 16)
        return Config(True, jax.default_backend() != "gpu", 3, 1, shape, [(4, 64, [2]), (2, 128, [4])],
                      (2, 16, 4, 64), (4, 64), 2, 0, keep_best=1, prefill_case=(2, 64))
    cases = (parse_decode_cases(args.decode_cases) if args.decode_cases else
             # PROTOCOL's kernel-decode: 64 and 256 sequences at contexts of 2048 and 8192; 8 x 8192 the long-context
             # split's case
             [(64, 2048, [] if args.quick else [2]), (256, 2048, []), (64, 8192, []), (256, 8192, []),
              (8, 8192, [4, 8, 16])])
    return Config(False, False, args.repeats, args.inner, parse_heads(args.heads), cases,
                  (8, 512, 128, 4096), (64, 2048), 8, args.min_cache_gib << 30,
                  keep_best=3 if args.quick else 4, quick=args.quick, prefill_case=(4, 2048))


def parse_heads(text: str) -> Shape:
    """``--heads`` ``Hq,Hkv,D`` (e.g. ``32,32,96``: Phi-3-mini's heads) as a ``Shape``; empty: the protocol's."""
    if not text:
        return Shape()
    num_heads, num_kv_heads, head_dim = (int(x) for x in text.split(","))
    return Shape(num_heads, num_kv_heads, head_dim)


def git_commit():
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON files")
    parser.add_argument("--sections", default="decode,mixed,kvwrite,prefill")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (interpret mode on CPU)")
    parser.add_argument("--quick", action="store_true", help="only the best decode tilings of earlier sweeps")
    parser.add_argument("--decode-cases", default="",
                        help="decode shapes instead of the protocol's, e.g. 1024x192,448x1536 (sequences x context); "
                             "the first sweeps every tiling, later ones its best few and the default")
    parser.add_argument("--best-decode-tiling", default=None, metavar="JSON",
                        help="print the decode fields of --case's fastest tiling in this kernel-decode result as "
                             "$PAGEDJAX_ATTENTION_TILING's JSON and exit 0 if it beats the default by 3%%, else 1")
    parser.add_argument("--heads", default="", metavar="HQ,HKV,D",
                        help="query heads, KV heads and head_dim instead of the 8B's 32,8,128 (e.g. 32,32,96)")
    parser.add_argument("--case", default="1024x192", help="the kernel-decode case --best-decode-tiling reads")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=10)
    parser.add_argument("--min-cache-gib", type=int, default=5, help="grow the cache's layer count to this size")
    args = parser.parse_args(argv)
    if args.best_decode_tiling:
        sys.exit(print_best_decode_tiling(args.best_decode_tiling, args.case))
    cfg = make_config(args)
    os.makedirs(args.out, exist_ok=True)
    device = jax.devices()[0]
    date = datetime.date.today().isoformat()
    common = dict(
        model="llama-3.1-8b" if not args.heads else f"heads {args.heads}", device=device.device_kind, jax_version=jax.__version__, commit=git_commit(),
        command="python " + " ".join([sys.argv[0]] + sys.argv[1:]), dtype=cfg.shape.dtype, quantization=None,
        tensor_parallel_size=1, date=date, backend=jax.default_backend(), interpret=cfg.interpret,
    )
    common["copy_tb_s"], common["read_tb_s"] = memory_rates_tb_s((64 << 20) if cfg.smoke else (2 << 30), cfg.repeats)
    log = functools.partial(print, flush=True)
    log(f"{common['device']} jax {common['jax_version']} commit {common['commit']}: "
        f"copy rate {common['copy_tb_s']:.2f} TB/s (read + write), read rate {common['read_tb_s']:.2f} TB/s")
    device_tag = common["device"].replace(" ", "-")
    summary = []

    def save(results, workload):
        path = os.path.join(args.out, f"{workload}-{device_tag}-{date}.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)
        summary.extend(results)

    sections = args.sections.split(",")
    decode_tiling = Tiling()
    if "decode" in sections:
        try:
            res = run_decode(cfg, common, log)
            save(res, "kernel-decode")
            decode_tiling = Tiling(**{**res[0]["tiling"], "k_splits": None})
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    if "mixed" in sections:
        try:
            save(run_mixed(cfg, common, decode_tiling, log), "kernel-mixed")
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    if "kvwrite" in sections:
        try:
            save(run_kv_write(cfg, common, decode_tiling, log), "kv-write")
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    if "prefill" in sections:
        try:
            save(run_prefill(cfg, common, log), "kernel-prefill")
        except Exception:  # noqa: BLE001
            traceback.print_exc()

    log("\nworkload        case        ours us   TB/s  TFLOP/s  %copy  peer us  ratio")
    for r in summary:
        if r["workload"] == "kv-write":
            log("kv-write        per layer: " + ", ".join(f"{k} {v['us_per_layer']:.1f} us" for k, v in r["scan"].items())
                + f"; in place {r['in_place']}")
            continue
        log(f"{r['workload']:15s} {r.get('name', 'mixed'):10s} {r['us']:8.1f} {r['kv_read_tb_s']:6.2f} "
            f"{r.get('tflop_s') or 0:8.1f} {r['pct_of_copy_bw'] or 0:6.1f} {r['peer'].get('us', float('nan')):8.1f} "
            f"{r['ratio'] or float('nan'):6.2f}")


if __name__ == "__main__":
    main()
