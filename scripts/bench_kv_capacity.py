"""KV-cache capacity: how many tokens fit at start-up, per ``kv_cache_dtype``, same model and memory.

Starts the engine (no step runs, so nothing compiles) once per KV dtype and records the
blocks and maximum concurrent tokens it sized from ``gpu_memory_utilization``.

    python scripts/bench_kv_capacity.py --kv-cache-dtypes auto,fp8      # GPU: llama-3.1-8b dummy, bf16
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_common.add_engine_flags(parser)
    parser.add_argument("--kv-cache-dtypes", default="auto,fp8")
    args = parser.parse_args(argv)
    result = bench_common.engine_result_header("kv-capacity", args)
    rows = []
    for kv_dtype in args.kv_cache_dtypes.split(","):
        args.kv_cache_dtype = kv_dtype
        llm = bench_common.make_llm(args, max_model_len=args.max_model_len or 2048)
        engine = llm.llm_engine
        rows.append(dict(kv_cache_dtype=kv_dtype, num_kv_blocks=engine.block_manager.num_usable_blocks,
                         max_concurrent_tokens=engine.max_concurrent_tokens,
                         page_dtype=str(engine.runner.kv_cache.dtype)))
        llm.shutdown()
        del llm, engine
        gc.collect()  # the next engine sizes its pool from the memory this one held
    base = rows[0]["max_concurrent_tokens"]
    for row in rows:
        row["ratio_vs_first"] = row["max_concurrent_tokens"] / base
    result.update(kv_cache_dtypes=args.kv_cache_dtypes.split(","), rows=rows,
                  gpu_memory_utilization=args.gpu_memory_utilization)
    path = bench_common.write_results(result, args.output_json, args.results_dir)
    bench_common.print_table(rows, ["kv_cache_dtype", "page_dtype", "num_kv_blocks", "max_concurrent_tokens",
                                    "ratio_vs_first"], title=f"KV capacity on {result['device']}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
