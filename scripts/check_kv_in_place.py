"""Does the compiled step update the KV cache in place? Temp memory and cache copies per layout.

The engine's step donates the KV cache and must write new K/V into it without copying
it. This compiles the jitted forward (attention backend "auto": the Pallas kernel on
GPU) for a few layers of a model's shape, with the three layouts the engine can run:

- ``scan``: stacked weights under ``lax.scan``, one stacked ``[L, Hkv, P, bs, D]`` cache;
- ``unrolled-stacked``: per-layer weights, the same stacked cache threaded through;
- ``unrolled-per-layer``: per-layer weights, one cache buffer per layer (the engine's GPU default);

and reports, from XLA's own analysis of each executable, the temporary bytes it needs
and how many cache-shaped ``copy`` ops it holds, next to the cache's size. In place:
temp bytes far below the cache, no cache-shaped copy. Then times a decode step of each.

    python scripts/check_kv_in_place.py                       # GPU: llama-3.1-8b shape, 4 layers, ~8 GiB cache
    python scripts/check_kv_in_place.py --layers 2 --cache-gib 0.05 --model <tiny>   # CPU smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from engine.runner import SequenceWork, build_model_input  # noqa: E402
from models.batch import kv_cache_bytes_per_block, make_kv_cache  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.dummy import load_dummy_params  # noqa: E402
from models.llama import forward, unstack_layers  # noqa: E402
from pallas_kernels import get_attention_fns  # noqa: E402

LAYOUTS = ("scan", "unrolled-stacked", "unrolled-per-layer")


def cache_shaped_copies(hlo_text: str, shapes: set[str]) -> int:
    """``copy`` / ``copy-start`` instructions whose result is one of ``shapes`` (e.g. ``bf16[4,8,512,16,128]``)."""
    count = 0
    for line in hlo_text.splitlines():
        m = re.search(r"= (\w+\[[\d,]*\])\S* copy(-start)?\(", line)
        if m and m.group(1) in shapes:
            count += 1
    return count


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="benchmarks/models/llama-3.1-8b", help="folder with a config.json")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--cache-gib", type=float, default=8.0, help="K + V pool size over the layers")
    parser.add_argument("--batch", type=int, default=8, help="decode sequences in the timed step")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    config = dataclasses.replace(ModelConfig.from_pretrained(args.model), num_layers=args.layers)
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    block_size = 16
    num_blocks = max(args.batch * 4 + 1, int(args.cache_gib * 2**30 // kv_cache_bytes_per_block(config, block_size,
                                                                                                   dtype)))
    stacked = load_dummy_params(config, dtype)
    unstacked = unstack_layers(stacked)
    attention_fn, write_kv_fn = get_attention_fns("auto")
    step = jax.jit(functools.partial(forward, config=config, attention_fn=attention_fn, write_kv_fn=write_kv_fn),
                   donate_argnums=(1,))
    rng = np.random.default_rng(0)
    pages = rng.permutation(np.arange(1, num_blocks))
    work = [SequenceWork(token_ids=[7], start=63, block_table=pages[4 * i:4 * i + 4].tolist(), sample=True)
            for i in range(args.batch)]
    batch = build_model_input(work, block_size=block_size, max_num_tokens=8192, max_num_seqs=256, max_blocks_per_seq=4)
    shape = (config.num_layers, config.num_kv_heads, num_blocks, block_size, config.head_dim)
    name = jnp.dtype(dtype).name.replace("bfloat16", "bf16").replace("float32", "f32")
    shapes = {f"{name}[{','.join(map(str, shape))}]", f"{name}[{','.join(map(str, shape[1:]))}]"}
    cache_bytes = 2 * int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    result = dict(device=jax.devices()[0].device_kind, jax_version=jax.__version__, layers=config.num_layers,
                  num_blocks=num_blocks, cache_bytes=cache_bytes, layouts={})
    for layout in LAYOUTS:
        params = stacked if layout == "scan" else unstacked
        cache = make_kv_cache(config, num_blocks, block_size, dtype, per_layer=layout == "unrolled-per-layer")
        compiled = step.lower(params, cache, batch).compile()
        memory = compiled.memory_analysis()
        temp = int(getattr(memory, "temp_size_in_bytes", -1)) if memory is not None else -1
        copies = cache_shaped_copies(compiled.as_text(), shapes)
        logits, cache = compiled(params, cache, batch)
        jax.block_until_ready(logits)
        times = []
        for _ in range(10):
            start = time.perf_counter()
            logits, cache = compiled(params, cache, batch)
            jax.block_until_ready(logits)
            times.append(time.perf_counter() - start)
        entry = dict(temp_bytes=temp, temp_over_cache=temp / cache_bytes, cache_copies=copies,
                     step_ms=float(np.median(times)) * 1e3)
        result["layouts"][layout] = entry
        print(f"{layout:20s} temp {temp / 2**30:7.2f} GiB ({entry['temp_over_cache']:.2f} of the cache), "
              f"cache-shaped copies {copies}, step {entry['step_ms']:.2f} ms", flush=True)
        del cache
    print(f"cache (K + V): {cache_bytes / 2**30:.2f} GiB over {config.num_layers} layers")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
