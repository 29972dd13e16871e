"""What a Pallas (Triton) one-row GEMV (or a ragged paged attention launch, ``--kernel attention-decode`` /
``attention-prefill``) compiles to for a Hopper GPU, without a GPU: registers a thread, shared memory, and the
instruction mix of its longest loop (barriers, loads, arithmetic).

Timings need the device; this answers "why" questions on the CPU machine: how many programs fit on a multiprocessor
(registers), whether a step synchronizes its warps (``BAR.SYNC`` from layout conversions through shared memory),
how many instructions a weight costs. Two phases:

1. here (JAX, CPU): the kernel is lowered for CUDA with ``pallas_call(debug=True)``, which prints the Triton module
   JAX hands to XLA; the module is cut out and its location notes stripped (``triton_module_text``);
2. in a Python that has the ``triton`` package (``--triton-python``; keep it in its own virtual environment:
   ``python -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install triton``): ``triton.compile`` for ``--arch`` (90:
   H100/H200) and its bundled ``cuobjdump`` give the SASS.

The Triton in ``pip`` is not the one inside jaxlib, so the counts are a close guide, not the device's exact code
(NOTES.md after run 25e: the int4 GEMV at 168 registers, 4 barriers a K step).

    python scripts/inspect_kernel_sass.py --kernel int4 --k 4096 --n 28672 --triton-python /tmp/tvenv/bin/python
    python scripts/inspect_kernel_sass.py --kernel int8-kmajor --config '{"kmajor_defer_reduction": false}' ...
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Phase 2, run by the Triton Python: compile the module, then report registers, shared memory and the K loop's mix.
_COMPILE = r"""
import collections, json, re, subprocess, sys, os, triton
from triton.backends.compiler import GPUTarget
ttir, arch, num_warps, out, fp_fusion = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
num_stages = int(sys.argv[6])
k = triton.compile(ttir, target=GPUTarget("cuda", arch, 32),
                   options={"num_warps": num_warps, "num_stages": num_stages, "enable_fp_fusion": fp_fusion})
open(out + ".cubin", "wb").write(k.asm["cubin"])
open(out + ".ttgir", "w").write(k.asm["ttgir"])
tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", out + ".cubin"], capture_output=True, text=True).stdout
usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", out + ".cubin"], capture_output=True,
                       text=True).stdout
open(out + ".sass", "w").write(sass)
lines = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?[A-Z][^;]*);",
                                                                sass)]
loops = [(int(b.group(1), 16), at) for at, text in lines if (b := re.search(r"BRA\s+(?:`\()?0x([0-9a-f]+)", text))
         and int(b.group(1), 16) < at]
report = {"registers": int(re.search(r"REG:(\d+)", usage).group(1)), "shared_bytes": int(re.search(r"SHARED:(\d+)", usage).group(1)),
          "stack_bytes": int(re.search(r"STACK:(\d+)", usage).group(1)),  # local memory: spilled registers
          "dynamic_shared_bytes": k.metadata.shared,  # Triton's shared memory (staged tiles, conversions): not in SHARED
          "layout_conversions": k.asm["ttgir"].count("ttg.convert_layout"), "barriers": sass.count("BAR.SYNC")}
if loops:
    start, end = max(loops, key=lambda se: se[1] - se[0])
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
                              for at, text in lines if start <= at <= end)
    report["loop_instructions"] = sum(ops.values())
    report["loop_mix"] = dict(ops.most_common(16))
print(json.dumps(report))
"""


def triton_module_text(debug_output: str) -> str:
    """The first Triton module in ``pallas_call(debug=True)``'s printout, in the syntax ``triton``'s parser takes:
    location notes (``loc(...)``, ``"name"(#locN)``, `` [unknown]``) and eviction hints dropped."""
    start = debug_output.index("module @")
    end = debug_output.find("\n#loc", start)
    text = debug_output[start:] if end < 0 else debug_output[start:end]
    text = text.replace(" [unknown]", "").replace(" evictionPolicy = evict_first", "")
    text = re.sub(r'\s*"[^"\n]*"\(#loc\d+\)', "", text)
    text = re.sub(r"\s*loc\([^()\n]*(\([^()\n]*\))?[^()\n]*\)", "", text)
    text = re.sub(r"\s*\(#loc\d+\)", "", text)
    text = text.rstrip()
    # The printout ends with the function's closing brace; the module's may be missing before the location table.
    if text.count("{") > text.count("}"):
        text += "\n}"
    return text + "\n"


KERNELS = ("int4", "int8-kmajor", "moe", "moe-mxfp4", "attention-decode", "attention-prefill")


def lowered_module(kernel: str, K: int, N: int, config: dict, pack: int = 128, rows: int = 1,
                   kv_dtype: str = "bfloat16") -> tuple[str, int, int]:
    """The Triton module of the engine's one-row GEMV for ``x[1, K] @ W[K, N]`` (int4: packed in blocks of ``pack``
    rows of K, the K step of its GEMV; ``rows`` > 1: the tensor-core form for ``x[rows, K]``; "moe": the grouped
    matmul of ``pallas_kernels.grouped_matmul``, ``rows`` a block; "moe-mxfp4": its MXFP4 experts, compiled with their
    tiles' stages), or of an attention launch (``config``: ``Tiling``
    fields; shapes fixed; KV pages of ``kv_dtype``), its warp count and the stage count to compile it with (the GEMVs
    and the grouped matmul 1, as before; the attention launches their tiling's, the pipeliner's buffers)."""
    import jax.numpy as jnp

    from pallas_kernels import quantized_matmul as qmm

    if kernel.startswith("attention-"):
        return _attention_module(kernel.removeprefix("attention-"), config, kv_dtype)
    cfg = qmm.MatmulConfig(**config) if not kernel.startswith("moe") else None
    x = jnp.ones((rows, K), jnp.bfloat16)
    if kernel == "int4":
        args = (x, jnp.zeros((K // 2, N), jnp.uint8), jnp.ones((K // 128, N), jnp.bfloat16),
                jnp.ones((K // 128, N), jnp.bfloat16))
        fn = functools.partial(qmm.int4_matmul, group_size=128, pack=pack, config=cfg, interpret=False)
    elif kernel == "int8-kmajor":
        args = (x, jnp.zeros((N, K), jnp.int8), jnp.ones((N,), jnp.float32))
        fn = functools.partial(qmm.int8_kmajor_matmul, config=cfg, interpret=False)
    elif kernel.startswith("moe"):  # a mixture's grouped matmul: 8 blocks of max(rows, 16) rows, 128 experts [K, N]
        from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_config, grouped_matmul_int4

        block_m = max(rows, 16)  # ``config``: the call's keyword arguments (tiles, swiglu)
        x, block_expert = jnp.ones((8 * block_m, K), jnp.bfloat16), jnp.arange(8, dtype=jnp.int32)
        tiles = {**grouped_matmul_config().tiles(block_m), **config}
        if kernel == "moe":  # bf16 experts, compiled with 1 stage as before
            fn, stages = functools.partial(grouped_matmul, interpret=False, **config), 1
            args = (x, jnp.zeros((128, K, N), jnp.bfloat16), block_expert)
        else:  # "moe-mxfp4": FP4 codes with a uint8 exponent each 32 rows, compiled with its tiles' stages
            fn = functools.partial(grouped_matmul_int4, group_size=32, pack=32, codes="e2m1", interpret=False,
                                   **config)
            args, stages = (x, jnp.zeros((128, K // 2, N), jnp.uint8), jnp.full((128, K // 32, N), 127, jnp.uint8),
                            None, block_expert), tiles["num_stages"]
        return triton_module_text(_printed_modules(fn, args)), tiles["num_warps"], stages
    else:
        raise ValueError(f"--kernel must be one of {KERNELS}, got {kernel!r}")
    return triton_module_text(_printed_modules(fn, args)), cfg.gemv_num_warps if rows == 1 else cfg.num_warps, 1


def _printed_modules(fn, args) -> str:
    """What ``pallas_call(debug=True)`` prints while ``fn(*args)`` is lowered for CUDA: each launch's Triton module."""
    import jax
    from jax.experimental import pallas as pl

    pallas_call = pl.pallas_call
    printed = io.StringIO()
    jax.clear_caches()  # a wrapper traced before in this process would not call pallas_call (and print) again
    try:
        pl.pallas_call = functools.partial(pallas_call, debug=True)
        with contextlib.redirect_stdout(printed):
            jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        pl.pallas_call = pallas_call
    return printed.getvalue()


def _attention_module(launch: str, tiling: dict, kv_dtype: str = "bfloat16") -> tuple[str, int, int]:
    """The Triton module of the ragged paged attention's ``launch`` ("decode" or "prefill") for the 8B's heads
    (32 query, 8 KV, head_dim 128) at 64 one-token sequences of 192 positions, under ``Tiling(**tiling)``, over
    KV pages of ``kv_dtype`` (e.g. "float8_e4m3fn"); with its warp and stage counts."""
    import importlib

    import jax.numpy as jnp

    rpa = importlib.import_module("pallas_kernels.ragged_paged_attention")
    seqs, ctx, page = 64, 192, 16
    qkv = jnp.ones((seqs, 32 + 2 * 8, 128), jnp.bfloat16)  # 32 query heads, then 8 key and 8 value heads
    pages = jnp.ones((1, 8, seqs * ctx // page, page, 128), jnp.dtype(kv_dtype))
    args = (qkv, pages, pages, 0, jnp.full((seqs,), ctx, jnp.int32), jnp.zeros((seqs, ctx // page), jnp.int32),
            jnp.arange(seqs + 1, dtype=jnp.int32), jnp.array([seqs], jnp.int32))
    config = rpa.Tiling(**tiling)
    fn = functools.partial(rpa.ragged_paged_attention, interpret=False, tiling=config)
    printed = _printed_modules(fn, args)
    warps, stages = ((config.decode_warps, config.decode_stages) if launch == "decode"
                     else (config.prefill_warps, config.prefill_stages))
    return triton_module_text(printed[printed.index(f"module @ragged_paged_attention_{launch}"):]), warps, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="int4", choices=KERNELS)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=28672)
    parser.add_argument("--config", default="{}",
                        help="MatmulConfig fields as JSON (the attention kernels: Tiling fields; moe: grouped_matmul's "
                             "keyword arguments)")
    parser.add_argument("--pack", type=int, default=128, choices=[32, 64, 128],
                        help="int4: rows of K a packing block (the GEMV's K step)")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10")
    parser.add_argument("--triton-python", required=True, help="a Python with the triton package")
    parser.add_argument("--fp-fusion", choices=["on", "off"], default="off",
                        help="Triton's multiply-add contraction (off: as jaxlib's pipeline, whose SASS has FMUL + FADD "
                             "where pip's Triton fuses them, NOTES.md run 26c)")
    parser.add_argument("--rows", type=int, default=1, help="rows of x (more than 1: the tensor-core form)")
    parser.add_argument("--kv-dtype", default="bfloat16", help="the attention kernels: the KV pages' dtype "
                        "(bfloat16, float16, float8_e4m3fn, float8_e5m2)")
    parser.add_argument("--out", default=None, help="keep the .ttir/.ttgir/.sass here (default: a temporary folder)")
    args = parser.parse_args()
    module, num_warps, num_stages = lowered_module(args.kernel, args.k, args.n, json.loads(args.config), args.pack,
                                                   args.rows, args.kv_dtype)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(args.out or tmp, f"{args.kernel}_gemv")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out + ".ttir", "w") as f:
            f.write(module)
        done = subprocess.run([args.triton_python, "-c", _COMPILE, out + ".ttir", str(args.arch), str(num_warps), out,
                               str(int(args.fp_fusion == "on")), str(num_stages)],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"triton.compile failed:\n{done.stderr[-3000:]}")
        report = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps({"kernel": args.kernel, "K": args.k, "N": args.n, "pack": args.pack, "config": json.loads(args.config),
                      "kv_dtype": args.kv_dtype, "num_warps": num_warps, "num_stages": num_stages, **report},
                     indent=1))


if __name__ == "__main__":
    main()
