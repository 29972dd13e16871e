"""Where a decode step's time goes: device time of the jitted step (stacked layers under
``lax.scan`` vs unrolled per-layer weights) against the engine's wall time per step.

    python scripts/profile_decode.py --model benchmarks/models/llama-3.1-8b --batch 1 64
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from engine.runner import SequenceWork, build_model_input  # noqa: E402
from models.batch import make_kv_cache  # noqa: E402
from models.llama import forward  # noqa: E402
from models.loader import load_model  # noqa: E402
from pallas_kernels import get_attention_fns  # noqa: E402


def time_fn(fn, *args, repeats=20):
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/llama-3.1-8b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    loaded = load_model(args.model, load_format="dummy", dtype="bfloat16")
    config, params = loaded.config, loaded.params
    attention_fn, write_kv_fn = get_attention_fns("auto")
    step = jax.jit(functools.partial(forward, config=config, attention_fn=attention_fn, write_kv_fn=write_kv_fn))
    bs, blocks_per_seq = 16, -(-args.ctx // 16)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ctx": args.ctx}
    unstacked = None
    for batch in args.batch:
        cache = make_kv_cache(config, 1 + batch * blocks_per_seq, bs, jnp.bfloat16)
        work = [SequenceWork(token_ids=[7], start=args.ctx - 1,
                             block_table=list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq)), sample=True)
                for i in range(batch)]
        model_input = build_model_input(work, block_size=bs, max_num_tokens=8192, max_num_seqs=256,
                                        max_blocks_per_seq=blocks_per_seq)
        scan_ms = time_fn(step, params, cache, model_input)
        if unstacked is None:
            unstacked = dict(params, layers=[jax.tree.map(lambda a: a[i], params["layers"])
                                             for i in range(config.num_layers)])
        unrolled_ms = time_fn(step, unstacked, cache, model_input)
        results[f"batch{batch}"] = {"T": int(model_input.token_ids.shape[0]), "scan_ms": scan_ms,
                                    "unrolled_ms": unrolled_ms}
        print(f"batch {batch}: T={model_input.token_ids.shape[0]} scan {scan_ms:.2f} ms, unrolled {unrolled_ms:.2f} ms",
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
