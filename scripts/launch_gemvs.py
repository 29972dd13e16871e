"""Launch each one-row GEMV of the engine a few times at one matrix shape, for Nsight Compute (``ncu``) to profile.

The kernels at their defaults: int4 (``int4_weight_streaming_gemv``), int8 stored K-major (``int8_kmajor_gemv``),
and XLA's bf16 dot for comparison. Each is compiled, run and checked against its dequantized weight (so a profile
never describes a wrong kernel), then launched ``--launches`` more times. Run it under ``ncu`` with no memory preallocated, e.g. (the suite's
``ncu-gemvs`` step):

    XLA_PYTHON_CLIENT_PREALLOCATE=false ncu -k regex:weight_streaming_gemv --section WarpStateStats ... \\
        python scripts/launch_gemvs.py --k 4096 --n 28672
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from models.quantization import dequantize, quantize_int4, quantize_int8  # noqa: E402
from pallas_kernels import quantized_matmul as qmm  # noqa: E402


def kernels(K: int, N: int, interpret: bool):
    """``(name, fn of x, dense float32 weight)`` for each GEMV at ``[K, N]``."""
    w = (jax.random.normal(jax.random.key(K + N), (K, N), jnp.float32) * 0.02).astype(jnp.bfloat16)
    q4, q8 = quantize_int4(w), quantize_int8(w, layout="nk")
    out = [("int4", lambda x: qmm.int4_matmul(x, q4.packed, q4.scales, q4.zeros, group_size=q4.group_size,
                                              pack=q4.pack, interpret=interpret), dequantize(q4))]
    out.append(("int8-kmajor", lambda x: qmm.int8_kmajor_matmul(x, q8.q, q8.scale, interpret=interpret),
                dequantize(q8)))
    out.append(("bf16-xla", jax.jit(lambda x: jnp.dot(x, w)), w))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=28672, help="default: the 8B's gate/up projection")
    parser.add_argument("--launches", type=int, default=2, help="launches of each kernel after its warm-up")
    args = parser.parse_args(argv)
    interpret = jax.default_backend() != "gpu"
    x = jax.random.normal(jax.random.key(1), (1, args.k), jnp.float32).astype(jnp.bfloat16)
    for name, fn, dense in kernels(args.k, args.n, interpret):
        got = np.asarray(fn(x).astype(jnp.float32))  # compiled and checked before the launches ncu profiles
        want = np.asarray(x.astype(jnp.float32) @ dense.astype(jnp.float32))
        err = float(np.abs(got - want).max() / np.abs(want).max())
        for _ in range(args.launches):
            fn(x).block_until_ready()
        print(f"{name}: max error {err:.2e} of the largest output", flush=True)
        if err > 3e-2:
            sys.exit(f"{name} is wrong (max error {err:.2e})")


if __name__ == "__main__":
    main()
