"""``scripts/bench_kernels.py --smoke --sections prefill`` runs on CPU and writes the
kernel-prefill record: our kernel's time and error, and the dense peers (cuDNN flash
attention, XLA, JAX's Pallas flash attention) either measured against our output or recorded with their error."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO_ROOT, "scripts", "bench_kernels.py")


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_prefill_smoke_writes_record(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", BENCH_COMMIT="test")
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--sections", "prefill", "--out", str(tmp_path)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr  # main() prints a failed section's traceback and goes on
    files = glob.glob(str(tmp_path / "kernel-prefill-*.json"))
    assert len(files) == 1, (files, proc.stdout, proc.stderr)
    with open(files[0]) as f:
        (r,) = json.load(f)

    assert r["workload"] == "kernel-prefill"
    assert r["name"] == f"{r['shape']['num_seqs']}x{r['shape']['q_len']}"  # the case, not a peer's name
    assert r["shape"]["q_len"] == r["shape"]["kv_len"]
    assert _is_number(r["us"]) and r["us"] > 0
    assert _is_number(r["tflop_s"]) and r["tflop_s"] > 0
    assert r["rel_err_vs_reference"] < 1e-2
    assert math.isclose(r["target_ratio_vs_cudnn"], 1 / 1.3)

    assert {"cudnn_flash_attention", "xla_dot_product_attention"} < set(r["peers"])
    assert any(label.startswith("pallas_mha_") for label in r["peers"]), r["peers"]  # JAX's Pallas flash attention
    assert r["peer"] == r["peers"]["cudnn_flash_attention"]
    for label, p in r["peers"].items():
        if "error" in p:
            assert isinstance(p["error"], str) and p["error"], label
            continue
        for key in ("us", "tflop_s", "rel_err_vs_ours", "rel_err_vs_reference"):
            assert _is_number(p[key]), (label, key, p)
        assert p["us"] > 0
        assert p["rel_err_vs_ours"] < 1e-2, (label, p)  # same shapes, layouts converted right
    # XLA runs everywhere, so the layout conversion is always checked.
    assert "error" not in r["peers"]["xla_dot_product_attention"], r["peers"]
    if "error" in r["peer"]:
        assert r["ratio"] is None
    else:
        assert math.isclose(r["ratio"], r["peer"]["us"] / r["us"])

    assert "kernel-prefill" in proc.stdout.split("workload        case")[-1]  # a row in the summary table


def smoke_bench(script: str, out, workload: str, *args) -> dict:
    """``scripts/<script> --smoke --output-json <out> <args>`` on the CPU: its result, checked to name ``workload``
    and to have timed every row."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", BENCH_COMMIT="test")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", script), "--smoke", *args,
                           "--output-json", str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    with open(out) as f:
        r = json.load(f)
    assert r["workload"] == workload and r["commit"] == "test"
    assert all("error" not in row and row["us"] > 0 for row in r["rows"]), r["rows"]
    return r


def test_matmul_bench_smoke_times_every_variant_and_estimates_a_step(tmp_path):
    """``scripts/bench_matmul.py --smoke``: every variant timed (no error rows), and the decode-step
    estimate sums the layer matrices with the bf16 LM head."""
    variants = "xla-bf16,pallas-int8,pallas-int4,xla-fp8"
    r = smoke_bench("bench_matmul.py", tmp_path / "m.json", "kernel-matmul", "--rows", "1", "--variants", variants)
    assert {row["variant"] for row in r["rows"]} == set(variants.split(","))
    estimates = {e["variant"]: e for e in r["decode_step_estimates"]}
    assert set(estimates) == set(variants.split(","))
    by = {(row["variant"], row["name"]): row for row in r["rows"]}
    int8 = sum(by[("pallas-int8", n)]["us"] * c for n, c in (("wqkv", 2), ("w_gate_up", 2), ("w_down", 2)))
    assert math.isclose(estimates["pallas-int8"]["step_us"], int8 + by[("xla-bf16", "lm_head")]["us"])
    # int8 weights are about half the bytes of bf16 ones (scales add a little).
    assert 0.45 < estimates["pallas-int8"]["weight_bytes"] / estimates["xla-bf16"]["weight_bytes"] < 0.6


def test_kv_cache_updated_in_place_in_every_layout(tmp_path):
    """``scripts/check_kv_in_place.py`` on CPU: every layer-loop layout compiles to a step whose
    temporaries are a small fraction of the cache, with no cache-shaped copy."""
    config = dict(model_type="llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    (tmp_path / "config.json").write_text(json.dumps(config))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "check_kv_in_place.py"), "--model",
                           str(tmp_path), "--layers", "3", "--cache-gib", "0.1", "--out", str(tmp_path / "r.json")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["layouts"]) == {"scan", "unrolled-stacked", "unrolled-per-layer"}
    for layout, entry in r["layouts"].items():
        assert entry["cache_copies"] == 0, layout
        assert 0 <= entry["temp_over_cache"] < 0.1, (layout, entry)


def test_bucket_padding_simulation_accounts_for_every_step():
    """``scripts/bench_padding.py`` drives the real scheduler: every request finishes, the step shapes
    cover every step, and padding is the padded rows the buckets add."""
    sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
    from bench_padding import simulate

    r = simulate(40, 30, 7, max_num_seqs=16, max_num_batched_tokens=128, num_blocks=64, block_size=16)
    assert sum(s["steps"] for s in r["shapes"]) == r["steps"] and r["distinct_step_shapes"] == len(r["shapes"])
    assert r["token_rows"] == 40 * (30 + 7 - 1)  # every prompt token and every fed-back sampled token, once
    assert r["padded_token_rows"] == sum(s["T"] * s["steps"] for s in r["shapes"])
    assert 0 <= r["token_padding"] < 1 and 0 <= r["seq_padding"] < 1 and r["preemptions"] == 0
    assert r["recomputed_tokens"] == 0
    small = simulate(40, 30, 7, max_num_seqs=16, max_num_batched_tokens=128, num_blocks=24, block_size=16,
                     admission_reserve_tokens=0)
    assert small["preemptions"] > 0  # 23 usable blocks for 16 sequences of 3 blocks each
    assert small["token_rows"] - r["token_rows"] == small["recomputed_tokens"] > 0  # preempted requests recompute
    # Admission that keeps room for the running requests' outputs (the engine's default) preempts less
    reserved = simulate(40, 30, 7, max_num_seqs=16, max_num_batched_tokens=128, num_blocks=24, block_size=16)
    assert reserved["recomputed_tokens"] < small["recomputed_tokens"] / 4


def test_token_buckets_come_every_quarter_octave_between_256_rows_and_the_sequence_cap():
    """``engine.runner.token_bucket``: powers of two, but between 256 rows and ``max_num_seqs`` (large decode batches)
    the next quarter of the octave; ``token_buckets`` lists every one a step can take."""
    from engine.runner import token_bucket, token_buckets

    assert token_buckets(16384, 1024) == [1, 16, 32, 64, 128, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 2048,
                                          4096, 8192, 16384]
    assert token_buckets(16384, 256) == token_buckets(16384) == [1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096,
                                                                 8192, 16384]
    assert token_buckets(1000, 4096) == [1, 16, 32, 64, 128, 256, 320, 384, 448, 512, 640, 768, 896, 1000]
    for n in range(1, 3000):
        size = token_bucket(n, 2048, 1024)
        assert size in token_buckets(2048, 1024) and n <= size or n > 2048
        if 256 < n <= 1024:
            assert size - n < (1 << (n - 1).bit_length()) // 8  # less than a quarter octave of padding
        elif n <= 2048:
            assert size == token_bucket(n, 2048)  # powers of two (or the cap) elsewhere


def test_sequence_slots_follow_token_rows():
    """``engine.runner.seq_bucket``: a step's sequence slots S are its padded token rows T (at least
    8, at most max_num_seqs), so every step of one token count has one shape whatever its mix of
    prompt chunks and decodes, and S always holds the step's sequences."""
    from engine.runner import SequenceWork, build_model_input, seq_bucket, token_bucket

    import numpy as np

    rng = np.random.default_rng()
    shapes = set()
    for _ in range(50):
        n = int(rng.integers(1, 17))
        prompts = int(rng.integers(0, n + 1))  # the first ones are prompt chunks, the rest decodes
        lens = [int(q) for q in rng.integers(1, 40, prompts)] + [1] * (n - prompts)
        while sum(lens) > 128:
            lens[int(np.argmax(lens))] -= 1
        work = [SequenceWork(token_ids=[3] * q, start=5, block_table=[1, 2], sample=True) for q in lens]
        batch = build_model_input(work, block_size=16, max_num_tokens=128, max_num_seqs=16, max_blocks_per_seq=8)
        T, S = batch.token_ids.shape[0], batch.kv_lens.shape[0]
        assert T == token_bucket(sum(lens), 128, 16) and S == seq_bucket(sum(lens), 128, 16) >= n
        assert S == min(max(T, 8), 16)
        shapes.add((T, S))
    assert len(shapes) == len({t for t, _ in shapes})  # one S per T


def test_words_gemv_probe_matches_the_reference_and_picks_its_fastest_config(tmp_path):
    """``scripts/probe_gemv_words.py``: the int32-word GEMV (each format, loads issued in their step and a step ahead) equals the
    dequantize-then-dot reference in interpret mode, and ``best_config`` hands the suite the fastest current-kernel
    row's changed fields as ``$PAGEDJAX_MATMUL_CONFIG`` JSON."""
    sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
    from probe_gemv_words import best_config, check

    assert len(check(interpret=True)) == 6
    rows = [dict(fmt="int4", kernel="a", config={"gemv_prefetch": 1}, us=50.0),
            dict(fmt="int4", kernel="b", config={"gemv_prefetch": 1, "gemv_block_n": 64}, us=40.0),
            dict(fmt="int8", kernel="c", config={"gemv_block_k": 32}, us=10.0),
            dict(fmt="int4", kernel="words", us=1.0)]  # words rows carry no config: not for the current kernel
    (tmp_path / "p.json").write_text(json.dumps(dict(rows=rows)))
    assert json.loads(best_config(str(tmp_path / "p.json"), "int4")) == {"gemv_prefetch": 1, "gemv_block_n": 64}


def test_gemv_bound_probe_matches_the_reference(tmp_path):
    """``scripts/probe_gemv_bound.py``: its int8 GEMV (on ``[K, N]`` rows and on tile-contiguous copies, loads in
    their step and a step ahead) equals the dequantize-then-dot reference, and its loads-alone kernel returns the
    XOR checksum of the tiles it read, in interpret mode; ``--smoke`` times each kind (the engine's K-major GEMV
    too) and writes the rows."""
    sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
    from probe_gemv_bound import check, main

    assert len(check(interpret=True)) == 4
    main(["--smoke", "--out", str(tmp_path / "bound.json")])
    rows = json.loads((tmp_path / "bound.json").read_text())["rows"]
    kinds = {r["kernel"].split()[0] for r in rows}
    assert {"read", "gemv", "gemv-x", "null", "null-1", "kmajor-gemv", "xla-bf16", "pallas-int8"} <= kinds and all(
        "us" in r for r in rows), rows


def test_command_buffer_census_counts_kernels_in_and_out_of_graphs(tmp_path):
    """``scripts/command_buffer_census.py`` on an after-optimizations HLO text of XLA's GPU form: fusions inside a
    command-buffer computation count as captured; a Pallas (Triton) custom call and the fusion beside it in the
    entry as launched one by one; a fusion's body is not a kernel of its own."""
    hlo = """HloModule jit_step, entry_computation_layout={(bf16[4]{0})->bf16[4]{0}}

%fused_add (p0: bf16[4]) -> bf16[4] {
  %p0 = bf16[4]{0} parameter(0)
  ROOT %add.1 = bf16[4]{0} add(%p0, %p0)
}

%command_buffer (p: bf16[4]) -> bf16[4] {
  %p = bf16[4]{0} parameter(0)
  %fusion.1 = bf16[4]{0} fusion(%p), kind=kLoop, calls=%fused_add
  ROOT %fusion.2 = bf16[4]{0} fusion(%fusion.1), kind=kLoop, calls=%fused_add
}

ENTRY %main.9 (x: bf16[4]) -> bf16[4] {
  %x = bf16[4]{0} parameter(0)
  %call = bf16[4]{0} call(%x), to_apply=%command_buffer
  %custom-call.3 = bf16[4]{0} custom-call(%call), custom_call_target="__gpu$xla.gpu.triton"
  ROOT %fusion.3 = bf16[4]{0} fusion(%custom-call.3), kind=kLoop, calls=%fused_add
}
"""
    (tmp_path / "module_0001.jit_step.sm_9.0_gpu_after_optimizations.txt").write_text(hlo)
    out = tmp_path / "census.json"
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "command_buffer_census.py"), str(tmp_path),
                    "--min-kernels", "1", "--out", str(out)], check=True, capture_output=True)
    (counts,) = json.loads(out.read_text()).values()
    assert counts == {"kernels_in_command_buffers": 2, "kernels_outside": 2, "command_buffers": 1,
                      "outside_by_kind": {"__gpu$xla.gpu.triton": 1, "fusion": 1}}, counts


def test_decode_cases_option_parses_shapes_and_rejects_bad_ones():
    sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
    import bench_kernels

    assert bench_kernels.parse_decode_cases("1024x192,448x1536") == [(1024, 192, []), (448, 1536, [])]
    with pytest.raises(ValueError, match="SEQSxCTX"):
        bench_kernels.parse_decode_cases("1024-192")


def test_best_decode_tiling_is_printed_only_when_it_beats_the_default(tmp_path, capsys):
    sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
    import bench_kernels

    best = dict(decode_kv_tokens=64, decode_warps=2, decode_stages=2, k_splits=None, prefill_q_rows=128)
    record = [dict(name="1024x192", us=90.0, tiling=best, default_tiling=dict(tiling={}, us=100.0))]
    path = tmp_path / "kernel-decode.json"
    path.write_text(json.dumps(record))
    assert bench_kernels.print_best_decode_tiling(str(path), "1024x192") == 0
    assert json.loads(capsys.readouterr().out) == dict(decode_kv_tokens=64, decode_warps=2, decode_stages=2)
    record[0]["us"] = 98.0  # 2% under the default: not worth a change
    path.write_text(json.dumps(record))
    assert bench_kernels.print_best_decode_tiling(str(path), "1024x192") == 1


@pytest.mark.parametrize("kernel,config", [("int4", {}), ("int8-kmajor", {}),
                                           ("int8-kmajor", {"kmajor_defer_reduction": False}),
                                           ("attention-decode", {"decode_kv_tokens": 64})])
def test_sass_inspection_cuts_a_parseable_triton_module(kernel, config):
    """``scripts/inspect_kernel_sass.py``'s first phase (no GPU, no triton package): the one-row GEMV lowered for
    CUDA gives one Triton module with its location notes stripped, the syntax ``triton.compile`` parses."""
    sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
    from inspect_kernel_sass import lowered_module

    text, num_warps, _ = lowered_module(kernel, 1024, 512, config)
    assert text.startswith("module @") and "tt.func public" in text and num_warps == 4
    assert text.count("{") == text.count("}") and "loc(" not in text and "#loc" not in text
    assert "[unknown]" not in text and "evictionPolicy" not in text


def test_grouped_matmul_sweep_times_each_setting_once_and_names_the_fastest(tmp_path, capsys):
    """``bench_grouped_matmul.py`` (interpreted on the CPU): a row per distinct setting at each block size, the best
    per case, and ``--best-of`` merging each regime's winner as ``$PAGEDJAX_MOE_CONFIG`` takes it."""
    from scripts import bench_grouped_matmul

    model = tmp_path / "moe"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 128, "moe_intermediate_size": 128,
                                                   "num_experts": 4, "num_experts_per_tok": 2}))
    out = tmp_path / "sweep.json"
    # decode_k_splits only changes decode-sized blocks (T=1: 16 rows), block_n 32 only the middle ones (T=128: 64
    # rows) and large_block_n 32 the largest (T=256: 128 rows); elsewhere each repeats the default and is skipped.
    configs = [{}, {"decode_k_splits": 1}, {"block_n": 32}, {"large_block_n": 32}]
    bench_grouped_matmul.main(["--model", str(model), "--tokens", "1,128,256", "--formats", "bf16,int4", "--matmuls",
                               "down", "--configs", json.dumps(configs), "--calls", "2", "--repeats", "1",
                               "--output-json", str(out)])
    record = json.loads(out.read_text())
    assert [(r["format"], r["tokens"], r["tiles"]["k_splits"], r["tiles"]["block_n"]) for r in record["rows"]] == [
        (fmt, tokens, splits, block_n) for fmt in ("bf16", "int4")
        for tokens, splits, block_n in ((1, 4, 128), (1, 1, 128), (128, 1, 128), (128, 1, 32), (256, 1, 128),
                                        (256, 1, 32))]
    assert all(r["error"] is None and r["us"] > 0 for r in record["rows"])
    assert [b["default_us"] is not None for b in record["best"]] == [True] * 6
    assert len(record["complete"]) == 6
    capsys.readouterr()
    bench_grouped_matmul.main(["--best-of", str(out)])
    best = json.loads(capsys.readouterr().out)
    assert set(best) <= {"decode_k_splits", "block_n", "large_block_n"} and set(best.values()) <= {1, 32}
    # Each regime picks its own fastest setting: a record with known times.
    row = lambda tokens, block_m, config, us: dict(format="int4", matmul="down", tokens=tokens,  # noqa: E731
                                                   block_m=block_m, config=config, us=us, error=None)
    out.write_text(json.dumps({"complete": [["int4", "down", t] for t in (1, 128, 256)], "rows": [
        row(1, 16, {}, 10.0), row(1, 16, {"decode_k_splits": 1}, 9.0),
        row(128, 64, {}, 10.0), row(128, 64, {"block_n": 32}, 11.0),
        row(256, 128, {}, 10.0), row(256, 128, {"large_block_n": 32}, 8.0)]}))
    bench_grouped_matmul.main(["--best-of", str(out)])
    assert json.loads(capsys.readouterr().out) == {"decode_k_splits": 1, "large_block_n": 32}
    # Past the deadline nothing more starts, and a case cut short is left out of the choice.
    record["complete"] = []
    out.write_text(json.dumps(record))
    bench_grouped_matmul.main(["--best-of", str(out)])
    assert json.loads(capsys.readouterr().out) == {}
    bench_grouped_matmul.main(["--model", str(model), "--tokens", "1,128", "--formats", "bf16,int4", "--matmuls",
                               "down", "--configs", json.dumps(configs), "--calls", "2", "--repeats", "1",
                               "--deadline-s", "0", "--output-json", str(out)])
    assert json.loads(out.read_text())["rows"] == [] and "stopped before bf16" in capsys.readouterr().out
