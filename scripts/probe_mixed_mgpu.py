"""Probe: JAX's Hopper mixed-type matmul (Mosaic GPU, ``pallas/ops/gpu/hopper_mixed_type_matmul_mgpu.py``:
int8 weights converted in registers, then wgmma) at decode batch sizes, against our Triton GEMV.

The question (issue 8): can int8 weights at one row reach memory speed on the tensor cores? Our GEMV
form runs w_gate_up at ~2.5 T weights/s (run 17a, 47.6 us) where the bytes allow ~4.8 TB/s. The kernel
wants the weight as the left operand ``[N_out, K]`` (K-major, the transpose of our storage), so this
probe makes it so; the batch (padded to 16 rows) is the wgmma's N. JAX 0.11+ on sm_90 only.

    python scripts/probe_mixed_mgpu.py --out results/probe-mixed-mgpu.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = {"w_gate_up": (4096, 28672), "w_down": (14336, 4096), "w_qkv": (4096, 6144)}  # (K, N) of the 8B
ROWS = 16  # the batch, padded to a wgmma N of 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as mixed

    import bench_matmul

    key = jax.random.key(0)
    rows = []
    configs = [dict(tile_m=tm, tile_n=ROWS, tile_k=tk, max_concurrent_steps=st, epi_tile_n=ROWS, epi_tile_m=64,
                    wg_dimension=mixed.MatmulDimension.M)
               for tm in (64, 128) for tk in (128, 256) for st in (4, 6)]
    for name, (K, N) in SHAPES.items():
        def make(k, K=K, N=N):
            return jax.random.randint(k, (N, K), -127, 128, jnp.int32).astype(jnp.int8)

        x = jax.random.normal(key, (ROWS, K), jnp.float32).astype(jnp.bfloat16)
        w = make(key)
        want = np.asarray(jnp.dot(x, w.T.astype(jnp.bfloat16), preferred_element_type=jnp.float32))
        for fields in configs:
            config = mixed.TuningConfig(**fields)
            fn = jax.jit(lambda x, w, config=config: mixed.mixed_matmul_kernel(w, x.T, out_dtype=jnp.bfloat16,
                                                                               config=config).T)
            label = f"{name} m{fields['tile_m']} k{fields['tile_k']} s{fields['max_concurrent_steps']}"
            try:
                got = np.asarray(fn(x, w).astype(jnp.float32))
                err = float(np.abs(got - want).max() / np.abs(want).max())
                row = bench_matmul.time_chain(fn, make, N * K, K, N, ROWS, key=key, repeats=args.repeats)
                row.update(rel_err=err)
                print(f"{label:36s} {row['us']:7.1f} us {row['weight_tb_s']:.2f} TB/s (err {err:.1e})", flush=True)
            except Exception as e:  # noqa: BLE001 - a config the kernel rejects must not lose the others
                row = dict(error=f"{type(e).__name__}: {e}"[:300])
                print(f"{label:36s} failed: {row['error'][:160]}", flush=True)
            rows.append(dict(shape=name, config={k: str(v) for k, v in fields.items()}, **row))
    bench_matmul.write_probe(args.out, ",".join(SHAPES), rows)


if __name__ == "__main__":
    main()
