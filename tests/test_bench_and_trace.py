"""The engine's per-step trace, static batching, and the benchmark and picture scripts.

The trace must record every executed step with the tokens each request ran and a
KV pool state that agrees with the block-manager rules (only a sequence's last
block is partly empty); static batching must never admit a request while its
batch is unfinished and must not change what greedy decoding produces; the
benchmark scripts must run end to end on a tiny random model and write the
PROTOCOL fields; ``visualize.py`` must draw PNGs from what they wrote.
"""

from __future__ import annotations

import json
import os
import secrets
import sys

import numpy as np
import pytest

from engine import LLM, EngineArgs, SamplingParams
from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus
from engine.scheduler import Scheduler
from engine.trace import StepTrace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))

import bench_common  # noqa: E402

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 384,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "hidden_act": "silu", "torch_dtype": "float32",
}
BLOCK = 8
BATCH = 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ALWAYS = ("workload", "model", "device", "jax_version", "commit", "command", "dtype", "quantization",
          "tensor_parallel_size", "date")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    with open(folder / "config.json", "w") as f:
        json.dump(TINY_CONFIG, f)
    return str(folder)


@pytest.fixture(scope="module")
def workload():
    """Fresh random prompts and output lengths (the seed is printed on failure)."""
    seed = secrets.randbelow(2**31)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, TINY_CONFIG["vocab_size"], size=int(rng.integers(3, 21))).tolist() for _ in range(7)]
    lengths = [int(n) for n in rng.integers(2, 19, size=len(prompts))]
    return seed, prompts, lengths


@pytest.fixture(scope="module")
def runs(tiny_model, workload):
    """mode -> (greedy token ids per request, trace, steps the engine counted) for the same requests."""
    _, prompts, lengths = workload
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    out = {}
    for mode in ("continuous", "static", "continuous-async"):
        # A budget that admits a whole batch's prompts in one step, so admission steps are batch starts.
        # Synchronous steps (exact token accounting) except "continuous-async".
        llm = LLM(tiny_model, load_format="dummy", skip_tokenizer_init=True, block_size=BLOCK, max_num_seqs=BATCH,
                  max_num_batched_tokens=128, max_model_len=64, scheduling_mode=mode.removesuffix("-async"),
                  trace=True, async_scheduling=mode.endswith("-async"))
        try:
            outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            out[mode] = ([o.outputs[0].token_ids for o in outputs], llm.get_trace(), llm.stats()["steps"])
        finally:
            llm.shutdown()
    return out


# -- trace -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_trace_records_every_step_with_token_counts(runs, workload, mode):
    seed, prompts, lengths = workload
    _, trace, steps = runs[mode]
    assert [r.step for r in trace.records] == list(range(steps)), f"seed {seed}"
    assert trace.scheduling_mode == mode and trace.block_size == BLOCK and trace.max_num_seqs == BATCH
    spans = trace.request_spans()
    assert len(spans) == len(prompts)
    for rid, runs_of_request in spans.items():
        i = int(rid)
        # Every token but the last sampled one is fed to the model once; each output token is sampled once.
        assert sum(s.num_tokens for _, s in runs_of_request) == len(prompts[i]) + lengths[i] - 1, f"seed {seed}"
        assert sum(s.samples for _, s in runs_of_request) == lengths[i], f"seed {seed}"
        assert all(s.num_prompt_tokens == len(prompts[i]) for _, s in runs_of_request)
        starts = [s.start for _, s in runs_of_request]
        assert starts == sorted(starts) and starts[0] == 0
    for r in trace.records:
        assert r.start_s <= r.end_s
        held = {s.request_id: s for s in r.sequences}
        assert {s.request_id for s in r.scheduled} <= held.keys()
        for s in r.scheduled:  # after the step, each scheduled sequence's blocks hold exactly what it computed
            assert held[s.request_id].num_tokens == s.start + s.num_tokens
        assert r.num_used_blocks == len({b for s in r.sequences for b in s.block_table})
        assert r.num_used_slots == sum(s.num_tokens for s in r.sequences)  # nothing shared here
        assert r.num_allocated_slots == r.num_used_blocks * BLOCK
        for s in r.sequences:
            assert s.reserved_tokens == len(prompts[int(s.request_id)]) + lengths[int(s.request_id)]


def test_asynchronous_trace_matches_the_synchronous_one_but_for_dropped_tokens(runs, workload):
    """With asynchronous scheduling a finishing request runs one more token (dropped, as in vLLM)
    in the step planned before its finish was seen; otherwise the same chunks, and records tile
    the timeline."""
    seed, prompts, lengths = workload
    sync_tokens, sync_trace, _ = runs["continuous"]
    async_tokens, async_trace, steps = runs["continuous-async"]
    assert async_tokens == sync_tokens, f"seed {seed}"
    assert [r.step for r in async_trace.records] == list(range(steps))
    sync_spans, async_spans = sync_trace.request_spans(), async_trace.request_spans()
    assert async_spans.keys() == sync_spans.keys()
    for rid, runs_of_request in async_spans.items():
        chunks = [(s.start, s.num_tokens) for _, s in runs_of_request]
        expected = [(s.start, s.num_tokens) for _, s in sync_spans[rid]]
        assert chunks[: len(expected)] == expected, f"seed {seed}"
        assert len(chunks) - len(expected) <= 1, f"seed {seed}"
    records = async_trace.records
    assert all(a.end_s <= b.start_s <= b.end_s for a, b in zip(records, records[1:]))


@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_waste_never_exceeds_one_block_per_sequence(runs, mode):
    _, trace, _ = runs[mode]
    for r in trace.records:
        for s in r.sequences:
            assert len(s.block_table) == -(-s.num_tokens // BLOCK)
            assert 0 <= len(s.block_table) * BLOCK - s.num_tokens < BLOCK
            assert 0 not in s.block_table  # the padding sink is never handed out
        assert 0 <= r.num_wasted_slots <= len(r.sequences) * (BLOCK - 1)
    rows = trace.kv_waste()
    assert all(row["paged_allocated"] - row["written"] < BLOCK * max(1, row["num_seqs"]) for row in rows)
    assert all(row["contiguous_max_model_len_allocated"] >= row["contiguous_reserved_allocated"] >= row["written"]
               for row in rows)


def test_static_mode_never_admits_mid_batch(runs, workload):
    seed = workload[0]
    _, trace, _ = runs["static"]
    first_last = trace.first_and_last_steps()
    admissions = trace.admission_steps()
    assert [len(ids) for ids in admissions.values()] == [3, 3, 1], f"seed {seed}: {admissions}"
    for step, ids in admissions.items():
        earlier = [rid for rid, (first, _) in first_last.items() if first < step]
        assert all(first_last[rid][1] < step for rid in earlier), f"seed {seed}: admitted at {step} mid-batch"
    # Continuous batching does admit while others run: the contrast the static mode exists to show.
    _, cont, _ = runs["continuous"]
    cont_first_last = cont.first_and_last_steps()
    assert any(any(first < step <= last for first, last in cont_first_last.values())
               for step in cont.admission_steps()), f"seed {seed}"
    assert len(trace.records) >= len(cont.records)


def test_continuous_and_static_give_the_same_greedy_tokens(runs, workload):
    seed, _, lengths = workload
    assert [len(t) for t in runs["continuous"][0]] == lengths
    assert runs["continuous"][0] == runs["static"][0], f"seed {seed}"


def test_trace_json_round_trip_is_compact(runs, tmp_path):
    _, trace, _ = runs["continuous"]
    path = str(tmp_path / "t.trace.json.gz")
    trace.save(path)
    assert StepTrace.load(path) == trace
    encoded = trace.to_json()
    tables_written = sum(seq[3] is not None for r in encoded["records"] for seq in r["sequences"])
    tables_held = sum(len(r.sequences) for r in trace.records)
    assert tables_written < tables_held  # an unchanged block table is not written again
    with pytest.raises(ValueError, match="unsupported trace format"):
        StepTrace.from_json({**encoded, "format": 99})


def test_trace_is_off_unless_asked(tiny_model):
    llm = LLM(tiny_model, load_format="dummy", skip_tokenizer_init=True, max_model_len=32)
    try:
        assert llm.llm_engine.tracer is None
        with pytest.raises(ValueError, match="trace=True"):
            llm.get_trace()
    finally:
        llm.shutdown()


def test_scheduling_mode_is_validated():
    with pytest.raises(ValueError, match="scheduling_mode must be 'continuous' or 'static'"):
        EngineArgs(scheduling_mode="batchwise").validate()
    with pytest.raises(ValueError, match="scheduling_mode must be one of"):
        Scheduler(BlockManager(8, 4), max_num_batched_tokens=16, max_num_seqs=2, max_model_len=8,
                  scheduling_mode="batchwise")


# -- static batching in the scheduler alone (no JAX) -------------------------------------


def test_static_scheduler_holds_late_arrivals_until_the_batch_ends():
    rng = np.random.default_rng(secrets.randbelow(2**31))
    scheduler = Scheduler(BlockManager(64, 4), max_num_batched_tokens=64, max_num_seqs=2, max_model_len=32,
                          scheduling_mode="static")
    lengths = {}

    def add(rid: str, out_len: int) -> None:
        scheduler.add_request(Request(rid, rng.integers(1, 100, size=int(rng.integers(2, 9))).tolist()))
        lengths[rid] = out_len

    add("a", 2)
    add("b", 6)
    add("c", 1)
    admitted = []
    for step in range(40):
        if step == 1:
            add("d", 1)  # arrives while the first batch runs: waits for it, though a slot frees at once
        out = scheduler.schedule()
        admitted += [(step, s.request_id) for s in out.scheduled if s.start == 0]
        scheduler.update_after_step(out, {s.request_id: int(rng.integers(1, 100)) for s in out.scheduled})
        for s in out.scheduled:
            r = s.request
            if not r.is_finished and len(r.output_token_ids) >= lengths[r.request_id]:
                scheduler.finish_request(r.request_id, RequestStatus.FINISHED_STOPPED)
        scheduler.check_invariants()
        if not scheduler.has_unfinished_requests():
            break
    first = dict((rid, step) for step, rid in admitted)
    assert first["a"] == first["b"] == 0
    # "b" needs 6 steps; "c" and "d" (the next batch) start only after it finished, together.
    assert first["c"] == first["d"] == 6
    assert not scheduler.has_unfinished_requests()


# -- benchmark scripts and pictures ------------------------------------------------------


def _check_protocol_fields(result: dict, workload: str, fields) -> None:
    assert result["workload"] == workload
    for name in ALWAYS:
        assert name in result, f"{workload}: missing {name}"
    assert result["tensor_parallel_size"] == 1 and result["dtype"] == "float32"
    for name in fields:
        assert isinstance(result[name], (int, float)) and result[name] > 0, f"{workload}: {name}={result.get(name)}"


@pytest.fixture(scope="module")
def bench_dir(tiny_model, tmp_path_factory):
    """Every benchmark script run once on the tiny model, its JSON in one folder."""
    import bench_embed
    import bench_latency
    import bench_static_vs_continuous
    import bench_throughput

    out = tmp_path_factory.mktemp("results")
    common = ["--model", tiny_model, "--load-format", "dummy", "--block-size", "8"]
    bench_latency.main(common + ["--input-len", "12", "--output-len", "6", "--num-requests", "2", "--peer", "hf",
                                 "--output-json", str(out / "latency-cpu.json")])
    bench_latency.main(common + ["--input-len", "12", "--output-len", "8", "--num-requests", "2",
                                 "--num-scheduler-steps", "3", "--output-json", str(out / "latency-cpu-ms3.json")])
    bench_throughput.main(common + ["--workload", "tput-short", "--num-requests", "4", "--input-len", "10",
                                    "--output-len", "4", "--num-loras", "2", "--max-lora-rank", "4",
                                    "--output-json", str(out / "tput-short-cpu-lora.json")])
    for workload in ("tput-short", "tput-prefill"):
        bench_throughput.main(common + ["--workload", workload, "--num-requests", "6", "--input-len", "20",
                                        "--output-len", "4", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
                                        "--output-json", str(out / f"{workload}-cpu.json")])
    bench_throughput.main(common + ["--workload", "tput-short", "--num-requests", "6", "--input-len", "20",
                                    "--output-len", "6", "--range-ratio", "0.5", "--shared-prefix-len", "4",
                                    "--output-json", str(out / "tput-short-cpu-range.json")])
    bench_static_vs_continuous.main(common + ["--num-requests", "7", "--input-len", "6", "--min-output-len", "2",
                                              "--max-output-len", "20", "--max-num-seqs", "3",
                                              "--output-json", str(out / "static-vs-continuous-cpu.json")])
    bench_embed.main(common + ["--num-requests", "6", "--input-len", "20", "--warmup-requests", "2",
                               "--max-num-batched-tokens", "32", "--output-json", str(out / "embed-cpu.json")])
    return out


def test_embed_json(bench_dir):
    """The pooling engine's benchmark: every prompt embedded, rates and the share of its FLOP ceiling."""
    with open(bench_dir / "embed-cpu.json") as f:
        result = json.load(f)
    assert result["workload"] == "embed" and result["num_requests"] == 6 and result["pooling_type"] == "LAST"
    assert result["input_tok_s"] == pytest.approx(result["req_s"] * 20) and 0 < result["of_ceiling"]
    assert result["engine_steps"] >= 6 * 20 / 32  # chunked: at most 32 tokens a step


def test_latency_json(bench_dir):
    with open(bench_dir / "latency-cpu.json") as f:
        result = json.load(f)
    _check_protocol_fields(result, "latency", ("ttft_ms", "tpot_ms", "output_tok_s", "roofline_tpot_ms"))
    assert len(result["itl_ms_samples"]) == 5  # 6 tokens: 5 token-to-token intervals
    assert result["tpot_ms"] <= result["e2e_ms"]
    # The engine's host / device split of the timed steps: each step either waits for the device or not.
    assert result["host_ms_per_step"] > result["dispatch_ms_per_step"] > 0 and result["wait_ms_per_step"] >= 0
    parts = [result[f"dispatch_{part}_ms_per_step"] for part in ("inputs", "model", "sampler")]
    assert all(p > 0 for p in parts) and sum(parts) <= result["dispatch_ms_per_step"]  # dispatch's own parts
    peer = result["peer"]
    assert "error" not in peer, peer
    assert {"ttft_ms", "tpot_ms", "output_tok_s"} <= peer.keys() and peer["output_len"] == 6
    assert result["ratio"] == pytest.approx(result["output_tok_s"] / peer["output_tok_s"])
    assert result["ratios"]["tpot_ms"] == pytest.approx(peer["tpot_ms"] / result["tpot_ms"])


def test_latency_json_with_multi_step_decoding(bench_dir):
    """Tokens of a multi-step decode arrive together: each gets its share of the interval since the last arrival,
    so TPOT stays a per-token time (not the 0 between tokens that arrive at once)."""
    with open(bench_dir / "latency-cpu-ms3.json") as f:
        result = json.load(f)
    _check_protocol_fields(result, "latency", ("ttft_ms", "tpot_ms", "output_tok_s", "roofline_tpot_ms"))
    assert result["num_scheduler_steps"] == 3 and result["multi_steps"] > 0
    samples = result["itl_ms_samples"]
    assert len(samples) == 7 and min(samples) > 0  # 8 tokens: the prompt's, then 7 from multi-step decodes
    assert len(set(samples)) < len(samples)  # tokens of one decode share an interval


def test_throughput_json(bench_dir):
    for workload in ("tput-short", "tput-prefill"):
        with open(bench_dir / f"{workload}-cpu.json") as f:
            result = json.load(f)
        fields = ["output_tok_s", "total_tok_s", "req_s", "num_requests"]
        _check_protocol_fields(result, workload, fields + (["prefill_mfu"] if workload == "tput-prefill" else []))
        assert result["num_requests"] == 6 and result["max_num_seqs"] == 4
        assert result["engine_steps"] > 0 and result["engine_multi_steps"] == 0 and result["engine_wait_s"] >= 0
        assert result["total_tok_s"] == pytest.approx(result["output_tok_s"] * 24 / 4)
    assert 0 < result["prefill_mfu"] < 1.5  # against a matmul rate measured on the same machine
    timeline = result["step_timeline"]  # traced (tput-prefill always is): one row per step
    assert len(timeline) == result["steps"] and result["step_timeline_fields"][0] == "tokens"
    # Prompts, then decodes (the first token comes from the prompt step; an asynchronous step may run one
    # decode more for a request that finishes, whose token is dropped).
    assert 6 * 20 + 6 * 3 <= sum(row[0] for row in timeline) <= 6 * 20 + 6 * 4
    assert result["matmul_tflop_s"] > 0 and result["read_bandwidth_tb_s"] > 0
    assert 0 < result["limit_output_tok_s"] < result["flop_ceiling_output_tok_s"]  # K/V reads cost on top
    assert result["of_limit"] == pytest.approx(result["output_tok_s"] / result["limit_output_tok_s"])


def test_throughput_with_lora_adapters(bench_dir):
    """``--num-loras``: the requests run random adapters in turn, all in device slots at once."""
    with open(bench_dir / "tput-short-cpu-lora.json") as f:
        result = json.load(f)
    _check_protocol_fields(result, "tput-short", ["output_tok_s", "num_requests"])
    assert result["num_loras"] == 2 and result["max_lora_rank"] == 4
    from bench_common import variant_tag

    assert variant_tag(result) == "-lora2r4"


def test_throughput_with_serving_requests(bench_dir):
    """``--range-ratio``: the serving benchmark's requests (same seed, lengths and shared prefix), all at once."""
    import bench_common

    with open(bench_dir / "tput-short-cpu-range.json") as f:
        result = json.load(f)
    requests = bench_common.make_requests(6, 20, 6, 0.5, TINY_CONFIG["vocab_size"], bench_common.PROMPT_SEED, 4)
    num_input, num_output = sum(len(p) for p, _ in requests), sum(m for _, m in requests)
    assert len({m for _, m in requests}) > 1 and result["range_ratio"] == 0.5
    assert result["total_tok_s"] == pytest.approx(result["output_tok_s"] * (num_input + num_output) / num_output)
    assert result["req_s"] == pytest.approx(result["output_tok_s"] * 6 / num_output)


def test_cpu_default_json(tmp_path):
    """PROTOCOL's ``cpu-default``: the default model through ``LLM``, one stream then concurrent callers, and the
    ``transformers`` peer on the same GGUF (small sizes here)."""
    import bench_cpu_default

    out = tmp_path / "cpu-default.json"
    bench_cpu_default.main(["--output-len", "3", "--concurrency", "2", "--repeats", "1", "--output-json", str(out)])
    with open(out) as f:
        result = json.load(f)
    _check_protocol_fields(result, "cpu-default", ("single_stream_tok_s", "aggregate_tok_s"))
    assert result["model"] == "smollm2-135m" and (result["output_len"], result["concurrency"]) == (3, 2)
    assert {"single_stream_tok_s", "aggregate_tok_s"} <= result["peer"].keys()
    assert result["ratio"]["aggregate_tok_s"] == pytest.approx(result["aggregate_tok_s"]
                                                               / result["peer"]["aggregate_tok_s"])


def test_workload_flops_is_the_sum_of_its_steps_flops():
    """A request's chunks, however split, add up to the workload's FLOPs (no preemption)."""
    from engine.trace import ScheduledTokens
    from models.config import ModelConfig

    config = ModelConfig.from_hf_dict(TINY_CONFIG)
    prompt, output = 37, 9
    chunks = [(0, 16, False), (16, 16, False), (32, 5, True)] + [(37 + i, 1, True) for i in range(output - 1)]
    steps = [[ScheduledTokens("r", start, n, samples, prompt)] for start, n, samples in chunks]
    total = sum(bench_common.step_flops(config, scheduled) for scheduled in steps)
    assert total == bench_common.workload_flops(config, 1, prompt, output)
    assert bench_common.workload_flops(config, 3, prompt, output) == 3 * total
    # Decode K/V reads: the 8 fed output tokens see contexts 38..45, 2 (K, V) x layers x kv heads x dim each.
    per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * 2
    assert bench_common.workload_decode_kv_bytes(config, 1, prompt, output, "bfloat16") == per_token * sum(range(38, 46))


def test_static_vs_continuous_json(bench_dir):
    with open(bench_dir / "static-vs-continuous-cpu.json") as f:
        result = json.load(f)
    _check_protocol_fields(result, "static-vs-continuous", ("ratio",))
    assert result["same_tokens"] is True
    for mode in ("continuous", "static"):
        figures = result[mode]
        assert figures["output_tok_s"] > 0 and figures["max_num_seqs"] == 3
        waste = figures["waste"]
        assert 0 <= waste["paged"] <= waste["contiguous_reserved"] <= waste["contiguous_max_model_len"] < 1
        assert figures["max_wasted_slots_per_seq"] < figures["block_size"]
        seqs = figures["max_concurrent_seqs"]
        assert seqs["paged"] >= seqs["contiguous_reserved"] >= seqs["contiguous_max_model_len"] >= 1
        assert os.path.exists(bench_dir / result["traces"][mode])
    assert result["static"]["steps"] >= result["continuous"]["steps"]


def test_visualize_writes_pngs(bench_dir, tmp_path):
    import visualize

    written = visualize.main(["static-vs-continuous", str(bench_dir / "static-vs-continuous-cpu.json"),
                              "--out-dir", str(tmp_path)])
    written += visualize.main(["results", "--results-dir", str(bench_dir), "--out-dir", str(tmp_path)])
    trace = str(bench_dir / "static-vs-continuous-cpu.continuous.trace.json.gz")
    written += visualize.main(["blockmap", "--trace", trace, "--step", "2", "--out", str(tmp_path / "b.png")])
    names = sorted(os.path.basename(p) for p in written)
    assert names == sorted(["static-vs-continuous-cpu-timeline.png", "static-vs-continuous-cpu-blockmap.png",
                            "static-vs-continuous-cpu-kv-waste.png", "throughput-vs-batch.png", "latency-cdf.png",
                            "b.png"])
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC
        assert 2_000 < os.path.getsize(path) < 400_000
    with pytest.raises(ValueError, match="outside the trace"):
        visualize.main(["blockmap", "--trace", trace, "--step", "100000", "--out", str(tmp_path / "x.png")])


def test_bench_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="at least one request"):
        bench_common.random_prompts(0, 8, 100)
    a = bench_common.random_prompts(3, 5, 1000, seed=7)
    assert a == bench_common.random_prompts(3, 5, 1000, seed=7) and len({tuple(p) for p in a}) == 3
    assert bench_common.peer_ratios({"tpot_ms": 5.0, "output_tok_s": 300.0}, {"tpot_ms": 10.0, "output_tok_s": 100.0},
                                    ("tpot_ms", "output_tok_s")) == {"tpot_ms": 2.0, "output_tok_s": 3.0}


# -- profile_step and compiler options -----------------------------------------------------


def _kernel(name, ts, dur, pid=1, tid=7):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid}


def test_profile_reads_compute_streams_and_unions_busy_time():
    import profile_step

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "Stream #14(MemcpyD2D,Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 8, "args": {"name": "Stream #15(MemcpyH2D)"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 9, "args": {"name": "XLA Ops"}}]
    events = meta + [_kernel("nvjet_sm90_gemm", 0, 10), _kernel("ragged_paged_attention_decode", 5, 10),
                     _kernel("loop_add_fusion", 30, 5), _kernel("copy", 0, 50, tid=8),
                     _kernel("fusion.1", 0, 50, tid=9), _kernel("python", 0, 99, pid=2)]
    kernels, lines = profile_step.device_events({"traceEvents": events})
    assert sorted(e["name"] for e in kernels) == ["loop_add_fusion", "nvjet_sm90_gemm", "ragged_paged_attention_decode"]
    assert lines == {"/device:GPU:0 / Stream #14(MemcpyD2D,Compute)": 3}
    assert profile_step.busy_us(kernels) == 20.0  # [0, 15) and [30, 35): overlaps count once
    gaps = profile_step.idle_gaps(kernels)
    assert gaps["count"] == 1 and gaps["largest"] == [{"us": 15.0, "at_us": 15.0}]
    assert gaps["total_us_by_size"]["10_100us"] == 15.0
    summary = profile_step.summarize(kernels, steps=1)
    assert summary["per_step_us_by_kind"] == {"matmul": 10.0, "attention": 10.0, "other": 5.0}
    assert summary["top"][0]["per_step_us"] == 10.0
    assert profile_step.kind_of("entry_mosaic_gpu_kernel") == "attention"  # the Hopper prefill attention (Mosaic GPU)
    # --host-events: what is off the GPU's lines, per step
    assert profile_step.host_events({"traceEvents": events}, per=3) == [
        {"name": "python", "us_per_step": 33.0, "calls_per_step": 1 / 3}]


def test_profile_step_smoke(tiny_model, tmp_path):
    import profile_step

    result = profile_step.main(["--model", tiny_model, "--load-format", "dummy", "--block-size", "8", "--step",
                                "decode", "--batch", "3", "--ctx", "20", "--repeats", "2", "--out",
                                str(tmp_path / "p.json")])
    step = result["step_profile"]
    assert (step["T"], step["S"]) == (16, 3) and step["wall_ms_per_step"] > 0  # S capped at max_num_seqs = batch
    with open(tmp_path / "p.json") as f:
        assert json.load(f)["step_profile"]["batch"] == 3
    # Several steps in one engine (--case), which takes the largest batch as its sequence cap
    result = profile_step.main(["--model", tiny_model, "--load-format", "dummy", "--block-size", "8", "--case",
                                "decode:2:30", "--case", "prefill:4:9", "--repeats", "1"])
    assert [(p["step"], p["batch"], p["ctx"], p["T"], p["S"]) for p in result["step_profiles"]] == [
        ("decode", 2, 30, 16, 4), ("prefill", 4, 9, 64, 4)]
    with pytest.raises(SystemExit):
        profile_step.main(["--case", "mixed:2:3"])


def test_bench_sleep_smoke(tiny_model, tmp_path):
    """Sleep and wake cycles on the tiny model: the same greedy tokens after each wake-up, the times recorded."""
    import bench_sleep

    result = bench_sleep.main(["--model", tiny_model, "--load-format", "dummy", "--block-size", "8", "--input-len",
                               "12", "--output-len", "4", "--cycles", "2", "--output-json", str(tmp_path / "s.json")])
    assert result["same_tokens"] and len(result["cycles"]) == 2
    assert result["wake_s"] > 0 and result["weight_gib"] > 0
    with open(tmp_path / "s.json") as f:
        assert json.load(f)["workload"] == "sleep"


def test_probe_step_buffers_smoke(tiny_model, tmp_path):
    import probe_step_buffers

    result = probe_step_buffers.main(["--model", tiny_model, "--load-format", "dummy", "--input-len", "20",
                                      "--output-len", "5", "--out", str(tmp_path / "b.json")])
    assert result["steps"] == {"T=32": 1, "T=1": 4}  # the prompt (20 rows, bucketed), then one decode per token
    assert all(n <= 1 for buffers in result["distinct_addresses_after_the_first_step"].values()
               for n in buffers.values())  # every buffer stays where it is


def test_compiler_options_reach_the_step_and_change_no_token(tiny_model):
    assert bench_common.compiler_options(["xla_gpu_autotune_level=1", "xla_gpu_enable_triton_gemm=false", "a=b"]) == {
        "xla_gpu_autotune_level": 1, "xla_gpu_enable_triton_gemm": False, "a": "b"}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        bench_common.compiler_options(["xla_gpu_autotune_level"])
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    tokens = {}
    for options in (None, {"xla_cpu_enable_fast_math": False}):
        llm = LLM(tiny_model, load_format="dummy", skip_tokenizer_init=True, block_size=BLOCK, max_model_len=64,
                  compiler_options=options)
        try:
            assert llm.llm_engine.runner.compiler_options == (options or {})
            tokens[str(options)] = llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], params,
                                                use_tqdm=False)[0].outputs[0].token_ids
        finally:
            llm.shutdown()
    assert len(set(map(tuple, tokens.values()))) == 1 and len(next(iter(tokens.values()))) == 6


def test_profile_compile_smoke(tiny_model, tmp_path):
    import profile_compile

    rows = profile_compile.main(["--model", tiny_model, "--quantization", "none,int8", "--layers", "1,2",
                                 "--unroll", "off", "--out", str(tmp_path / "c.json")])
    assert [(r["quantization"], r["layers"]) for r in rows] == [("none", 1), ("none", 2), ("int8", 1), ("int8", 2)]
    assert all(r["weights"] > 0 and r["sizing_compile"] >= 0 and r["first_request_s"] > 0 for r in rows)
    phases = profile_compile.weight_phases(profile_compile.config_with_layers(tiny_model, 2, str(tmp_path)), "fp8")
    assert all(seconds > 0 for seconds in phases.values())
    with open(tmp_path / "c.json") as f:
        assert len(json.load(f)["probes"]) == 4


def test_compile_timer_names_the_slowest_programs():
    import jax
    import jax.numpy as jnp

    from engine.compile_timer import CompileTimer

    def make_twice(x):
        return jnp.sin(x) * 2

    small, large = jnp.ones(3), jnp.ones(5)
    with CompileTimer() as timer:
        jax.jit(make_twice)(small).block_until_ready()
        jax.jit(make_twice)(large).block_until_ready()  # a second shape: same name, times summed
    phases = timer.seconds_by_phase()
    assert phases["trace"] > 0 and phases["lower"] > 0 and phases["compile"] > 0
    (name, seconds), *_ = timer.slowest(1)
    assert name == "make_twice" and seconds == pytest.approx(timer.seconds)


def test_compile_timer_counts_persistent_cache_lookups_and_hits(tmp_path):
    """A program compiled, then made again from JAX's persistent cache (jit's in-memory caches cleared, as in a
    new process): two lookups, one hit (what the engine's start-up line reports for a warm start)."""
    import jax
    import jax.numpy as jnp

    from engine.compile_timer import CompileTimer

    offset = float(np.random.default_rng().integers(1 << 30))  # a program no earlier run can have cached: JAX may
    # keep the cache another test opened first (~/.cache/pagedjax/jax, which outlives this run), not tmp_path

    def cached_twice(x):
        return jnp.cos(x) + offset

    saved = {name: getattr(jax.config, name) for name in
             ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
              "jax_persistent_cache_min_entry_size_bytes")}
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        x = np.ones(7, np.float32)  # a host array: no program of its own
        with CompileTimer() as timer:
            jax.jit(cached_twice)(x).block_until_ready()
            jax.clear_caches()
            jax.jit(cached_twice)(x).block_until_ready()
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
    assert timer.counts == {"cache_lookups": 2, "cache_hits": 1}, timer.counts
