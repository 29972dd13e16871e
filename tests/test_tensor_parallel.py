"""Tensor parallelism (sharding/, engine/runner.py) on fake CPU devices, and multi-process runs.

JAX fixes its device count when it starts, and this pytest process already runs on one
CPU device, so the sharded runs happen in subprocesses started with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (this file is also their script,
see ``__main__``). On 4 devices, through ``LLM``: greedy and seeded-sampling (``n=2``, so
copy-on-write too) outputs at ``tensor_parallel_size`` 2 and 4 equal those at 1, for a
tiny random llama safetensors checkpoint, qwen2 (qkv bias, tied embeddings) dummy
weights and a llama GGUF: every loader places its weights on the mesh. All have 2 kv
heads, so tp=4 replicates kv heads. The compiled step communicates only activations. Params and KV cache carry the
partition specs of the scheme, every device holds its slice, and with replication
each device holds the copy of the kv head its query heads read. Two processes of two
CPU devices each (``jax.distributed`` over gloo) give the same outputs at tp=4, process
1 following process 0's steps. Bad sizes get clear errors.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 4
ENGINE_KWARGS = dict(max_model_len=64, max_num_seqs=8, max_num_batched_tokens=64, skip_tokenizer_init=True)
# Prompt lengths: inside one page, across two pages (block 16), and in between.
PROMPT_LENGTHS = (5, 19, 11)
NEW_TOKENS = 8
EXPECTED_SPECS = {  # param path -> mesh axis of each array axis
    "embed": ["tp", None], "lm_head": [None, "tp"], "final_norm": [None],
    "layers/input_norm": [None, None], "layers/post_norm": [None, None],
    "layers/wq": [None, None, "tp"], "layers/wk": [None, None, "tp"], "layers/wv": [None, None, "tp"],
    "layers/bq": [None, "tp"], "layers/bk": [None, "tp"], "layers/bv": [None, "tp"],
    "layers/q_norm": [None, None], "layers/k_norm": [None, None],
    "layers/wo": [None, "tp", None], "layers/bo": [None, None],
    "layers/w_gate": [None, None, "tp"], "layers/w_up": [None, None, "tp"], "layers/w_down": [None, "tp", None],
}
KV_CACHE_SPEC = [None, "tp", None, None, None]


# ------------------------------------------------------------------ subprocess side


def _spec(sharding, ndim: int) -> list:
    spec = list(getattr(sharding, "spec", ()))
    return spec + [None] * (ndim - len(spec))


def _layout(runner) -> dict:
    """Specs, devices and per-device shard shapes of a runner's params and KV cache."""
    import jax

    out = {}
    leaves = jax.tree_util.tree_flatten_with_path(runner.params)[0]
    first_layer_k = runner.kv_cache.k[0] if runner.kv_cache.per_layer else runner.kv_cache.k
    for path, a in leaves + [(("kv_cache",), first_layer_k)]:
        key = "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)  # dict keys, dataclass fields
        out[key] = dict(shape=list(a.shape), spec=_spec(a.sharding, a.ndim), devices=len(a.sharding.device_set),
                        shard_shapes=sorted({tuple(s.data.shape) for s in a.addressable_shards}))
    return out


def _unfused(layers: dict, name: str, config):
    """Weight ``name`` of a one-device runner, whose q/k/v may be joined (models.llama.fuse_projections)."""
    from models.llama import FUSED_PROJECTIONS, fused_widths, split_columns

    for fused, parts in FUSED_PROJECTIONS.items():
        if name in parts and fused in layers:
            parts_of_fused = split_columns(np.asarray(layers[fused]), fused_widths(config)[fused])
            return np.asarray(parts_of_fused[parts.index(name)])
    return np.asarray(layers[name])


def _kv_copies_match(runner, reference_runner, tp: int) -> bool:
    """Device d's slice of wk/wv/bk/bv equals checkpoint kv head d * Hkv // tp (replication)."""
    config = reference_runner.config
    D, ok = config.head_dim, True
    for name in ("wk", "wv", "bk", "bv"):
        if name not in runner.params["layers"]:
            continue
        full = _unfused(reference_runner.params["layers"], name, config)
        for shard in runner.params["layers"][name].addressable_shards:
            d = shard.index[-1].start // D  # which (replicated) kv head this device holds
            head = d * config.num_kv_heads // tp
            ok &= np.array_equal(np.asarray(shard.data), full[..., head * D:(head + 1) * D])
    return bool(ok)


def _collectives(runner) -> list:
    """``[shape, op]`` of every collective in the compiled model step and greedy sampler of 3 tokens (T=16, S=16)."""
    import re

    from engine import SamplingParams
    from engine.runner import SequenceWork
    from engine.sampler import build_sampling_metadata

    work = [SequenceWork(token_ids=[1, 2, 3], start=0, block_table=[1], sample=True)]
    sampling = build_sampling_metadata([SamplingParams(temperature=0.0)], [[]], [[1, 2, 3]], [0], [0],
                                       runner.padded_num_seqs(3))
    model_input = runner.build_model_input(work)
    feed = np.full(model_input.token_ids.shape, -1, np.int32)  # no token fed from a previous step
    step = runner.step_fn(model_input.token_ids.shape[0]).lower(
        runner.params, runner.kv_cache, model_input, runner._sampled, feed,
        runner._logits_buffer(model_input.token_ids.shape[0], take=False)).compile()
    packed, layout = runner._packed(sampling)
    sampler = runner._sample.lower(runner._abstract_logits(len(sampling.temperature)), packed, runner._sampled,
                                   layout=layout, num_logprobs=None).compile()
    ops = "all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute"
    return [list(m) for m in re.findall(rf"= (\w+\[[\d,]*\])\S* ({ops})\(", step.as_text() + sampler.as_text())]


def _generate(llm, prompts: list, lora_path: str | None = None) -> dict:
    """``outputs``: each prompt's greedy tokens, then the first prompt's two seeded samples; ``top2``: for each
    greedy output, the two most likely ``[token, logprob]`` at each position. ``lora_path``: every prompt with
    that LoRA adapter."""
    from engine import LoRARequest, SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)
    sampled = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, n=2, seed=7, max_tokens=NEW_TOKENS,
                             ignore_eos=True)
    lora = None if lora_path is None else LoRARequest("adapter", 1, lora_path)
    outs = llm.generate(prompts + prompts[:1], [greedy] * len(prompts) + [sampled], use_tqdm=False,
                        lora_request=lora)
    top2 = [[sorted(([t, lp.logprob] for t, lp in position.items()), key=lambda e: -e[1])[:2]
             for position in o.outputs[0].logprobs] for o in outs[:len(prompts)]]
    return {"outputs": [[c.token_ids for c in o.outputs] for o in outs], "top2": top2}


def assert_same_tokens(reference: dict, got: dict, near_tie: float = 0.05) -> None:
    """``got``'s outputs are the reference's, except that a greedy output may part from it where the reference's two
    most likely tokens were within ``near_tie`` nats and ``got`` took the second (another device count sums in
    another order; fp8 K/V pages round such differences up). The seeded samples must be equal."""
    want, have = reference["outputs"], got["outputs"]
    assert all(len(c) == NEW_TOKENS for o in want for c in o)
    assert len({tuple(c) for o in want for c in o}) > 1  # outputs differ per prompt: the check has teeth
    assert have[len(reference["top2"]):] == want[len(reference["top2"]):]
    for (w,), (h,), top2 in zip(want, have, reference["top2"]):
        diverged = next((i for i, (a, b) in enumerate(zip(w, h)) if a != b), None)
        if diverged is not None:
            (first, first_lp), (second, second_lp) = top2[diverged]
            assert h[diverged] == second and first_lp - second_lp < near_tie, (
                f"{h} parts from {w} at {diverged}: top two there {top2[diverged]}")
        assert len(h) == len(w)


def _single_host(args: dict) -> dict:
    """Every scenario that needs 4 devices in one process (one JAX start-up, one set of compiles)."""
    import jax

    from engine import LLM

    results: dict = {"num_devices": len(jax.devices())}
    for name, source, load_format, sizes, *options in args["runs"]:
        reference = None
        options = dict((options or [{}])[0])
        lora_path = options.pop("lora_path", None)
        engines = []  # shut down after the run's last size: shutdown frees an engine's arrays, tp=1's are read
        for tp in sizes:
            llm = LLM(source, tensor_parallel_size=tp, load_format=load_format, **ENGINE_KWARGS, **options)
            engines.append(llm)
            runner = llm.llm_engine.runner
            entry = {**_generate(llm, args["prompts"], lora_path), "layout": _layout(runner)}
            if name == "llama" and tp > 1:
                entry["collectives"] = _collectives(runner)
            if tp == 1:
                reference = runner
            elif reference is not None and tp > runner.config.num_kv_heads and not options:  # dense weights
                entry["kv_copies_match"] = _kv_copies_match(runner, reference, tp)
            if name == "llama" and tp == sizes[-1]:  # sleep mode over the mesh: the weights back on their shards
                llm.sleep()
                llm.wake_up()
                entry["after_sleep"] = {**_generate(llm, args["prompts"]), "layout": _layout(runner)}
                llm.update_weights_from_disk(source)  # the same checkpoint loaded again onto the shards
                llm.sleep(level=2)  # and once more at wake-up
                llm.wake_up()
                entry["after_update"] = {**_generate(llm, args["prompts"]), "layout": _layout(runner)}
            results[f"{name}/tp{tp}"] = entry
        for llm in engines:
            llm.shutdown()
    errors = {}
    for tp in (3, 8):
        try:
            LLM(args["runs"][0][1], tensor_parallel_size=tp, **ENGINE_KWARGS)
            errors[tp] = None
        except ValueError as e:
            errors[tp] = str(e)
    results["errors"] = errors
    if "narrow_moe" in args:  # int4 experts whose down projection's groups a split would cut
        try:
            LLM(args["narrow_moe"], tensor_parallel_size=2, quantization="int4", **ENGINE_KWARGS)
            results["narrow_moe_int4_error"] = None
        except ValueError as e:
            results["narrow_moe_int4_error"] = str(e)
    results["mosaic_lowers_sharded"] = _mosaic_prefill_lowers_sharded()
    return results


def _mosaic_prefill_lowers_sharded() -> bool:
    """Whether attention with the Mosaic GPU prefill launch (taken at tp > 1 too, in the large steps) lowers for
    cuda per device under ``shard_map`` on 2 devices (its kernel cannot run on a CPU; it lowers there)."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh

    from pallas_kernels import ragged_prefill_mgpu
    from pallas_kernels.ragged_paged_attention import ragged_paged_attention, write_kv
    from sharding.attention import shard_attention_fns
    from tests.test_ragged_paged_attention import MOSAIC_EVERY_STEP, abstract_attention_args

    ragged_prefill_mgpu.supported = lambda *a, **k: True  # this subprocess's last use of the kernels
    attention = functools.partial(ragged_paged_attention, interpret=False, tiling=MOSAIC_EVERY_STEP)
    sharded, _ = shard_attention_fns(attention, write_kv, Mesh(np.array(jax.devices()[:2]), ("tp",)))
    args = abstract_attention_args(512, 8, 2, 128, 16, jnp.bfloat16)
    text = jax.jit(sharded).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return "mosaic_gpu" in text and "ragged_paged_attention_decode" in text


def _multi_host(args: dict) -> dict:
    """One of 2 processes of a tp=4 cluster: process 0 generates, process 1 follows its steps."""
    from sharding.distributed import initialize, is_leader

    initialize(f"127.0.0.1:{args['port']}", 2, args["process_id"])
    import jax

    from engine import LLM

    llm = LLM(args["checkpoint"], tensor_parallel_size=NUM_DEVICES, **ENGINE_KWARGS)
    runner = llm.llm_engine.runner
    result = {"process_count": jax.process_count(), "local_devices": jax.local_device_count(),
              "layout": {k: v["shard_shapes"] for k, v in _layout(runner).items()}}
    if is_leader():
        result.update(_generate(llm, args["prompts"]))
        runner.release_followers()
    else:
        runner.follow()
    llm.shutdown()
    return result


# ------------------------------------------------------------------ pytest side


def _run_worker(mode: str, args: dict, devices: int) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), mode, json.dumps(args)], env=env,
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, timeout: int = 240) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    from tests.test_gguf import random_hf_weights, write_gguf
    from safetensors.numpy import load_file, save_file

    from tests.tiny_checkpoints import BASE, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tp")
    rng = np.random.default_rng()
    seed = int(rng.integers(1 << 30))
    print(f"tensor-parallel checkpoints from seed {seed}")  # shown with a failure: a flip can be replayed
    paths = {}
    for i, variant in enumerate(("llama", "qwen2", "mixtral", "phi3", "gemma3_text", "qwen2_moe", "gpt_oss")):
        paths[variant] = str(root / variant)
        write_tiny_checkpoint(paths[variant], variant, seed=seed + i)
    # gpt-oss's MXFP4 experts (4-bit e2m1 on the devices): experts 64 wide, each device's down rows whole groups of 32
    from tests.tiny_checkpoints import write_mxfp4_experts

    paths["gpt_oss_mxfp4"] = str(root / "gpt-oss-mxfp4")
    write_mxfp4_experts(paths["gpt_oss_mxfp4"], write_tiny_checkpoint(paths["gpt_oss_mxfp4"], "gpt_oss", seed=seed + 7,
                                                                      intermediate_size=64))
    # int4 experts split over 2 devices need each device's share of the down projection's inputs in whole groups
    # (128 rows at load time): experts 256 wide.
    paths["mixtral-wide"] = str(root / "mixtral-wide")
    write_tiny_checkpoint(paths["mixtral-wide"], "mixtral", seed=seed - 1, intermediate_size=256)
    # The llama checkpoint with fp8 KV scales a layer (llm-compressor's k_scale / v_scale tensors).
    paths["llama-kv-scales"] = str(root / "llama-kv-scales")
    shutil.copytree(paths["llama"], paths["llama-kv-scales"])
    tensors = load_file(os.path.join(paths["llama"], "model.safetensors"))
    for i in range(BASE["num_hidden_layers"]):
        for name in ("k_scale", "v_scale"):
            tensors[f"model.layers.{i}.self_attn.{name}"] = np.asarray(rng.uniform(0.5, 2.0), np.float32)
    save_file(tensors, os.path.join(paths["llama-kv-scales"], "model.safetensors"))
    # A LoRA adapter on every matrix of the llama checkpoint (its k / v updates repeated with the kv heads at 4).
    from models.config import ModelConfig
    from models.lora import write_random_adapter

    paths["llama-lora"] = write_random_adapter(
        str(root / "llama-lora"), ModelConfig.from_pretrained(paths["llama"]),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=4, std=0.3, seed=seed)
    # An act-order GPTQ checkpoint of the llama: its row-parallel matrices stay whole on every device.
    from tests.test_quantization import write_quantized_checkpoint

    paths["gptq-act-order"] = str(root / "gptq-act-order")
    write_quantized_checkpoint(paths["llama"], paths["gptq-act-order"], "gptq", rng, act_order=True)
    paths["gguf"] = str(root / "tiny.gguf")
    write_gguf(paths["gguf"], random_hf_weights(np.random.default_rng(seed), qkv_bias=False))
    return paths


@pytest.fixture(scope="module")
def prompts() -> list:
    rng = np.random.default_rng()
    return [rng.integers(0, 160, n).tolist() for n in PROMPT_LENGTHS]  # 160: the smallest vocab here


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workers(checkpoints, prompts) -> dict:
    """Results of the 4-device workers and of the 2 processes of the cluster, started together
    (compiling is mostly single-threaded, so they share the cores)."""
    runs = [
        ("llama", checkpoints["llama"], "auto", [1, 2, 4]),
        ("qwen2", checkpoints["qwen2"], "dummy", [1, 4]),
        ("gguf", checkpoints["gguf"], "auto", [1, 4]),
        # Quantized weights: their fields (scales too) are split with the matrix they belong to.
        ("int8", checkpoints["llama"], "auto", [1, 4], {"quantization": "int8"}),
        ("int8-tied", checkpoints["qwen2"], "dummy", [1, 4], {"quantization": "int8"}),  # the head an int8 copy
        ("int4", checkpoints["llama"], "auto", [1, 2], {"quantization": "int4"}),
        ("fp8", checkpoints["qwen2"], "dummy", [1, 4], {"quantization": "fp8"}),
        # The GPU default: unrolled layers over one KV buffer per layer.
        ("unrolled", checkpoints["llama"], "auto", [1, 4], {"unroll_layers": True}),
        # Multi-step decoding over the mesh (its burst program's outputs replicated, its KV pages sharded).
        ("multi-step", checkpoints["llama"], "auto", [4], {"num_scheduler_steps": 4}),
        # A mixture of experts: every device a slice of every expert (kv heads replicated at 4).
        ("moe", checkpoints["mixtral"], "auto", [1, 4]),
        ("moe-int8", checkpoints["mixtral"], "auto", [1, 4], {"quantization": "int8"}),
        ("moe-int4", checkpoints["mixtral-wide"], "auto", [1, 2], {"quantization": "int4"}),
        ("moe-fp8", checkpoints["mixtral"], "auto", [1, 2], {"quantization": "fp8"}),  # experts' q [E, N, K]
        # fp8 KV pages with the checkpoint's scales (replicated per-layer numbers).
        ("kv-fp8-scales", checkpoints["llama-kv-scales"], "auto", [1, 2], {"kv_cache_dtype": "fp8"}),
        ("qwen2-moe", checkpoints["qwen2_moe"], "auto", [1, 4]),  # its shared expert split as a dense MLP
        # gpt-oss: the sinks split with the query heads, the experts' gate / up biases with their columns.
        ("gpt-oss", checkpoints["gpt_oss"], "auto", [1, 4]),
        ("gpt-oss-mxfp4", checkpoints["gpt_oss_mxfp4"], "auto", [1, 2]),
        # The grouped matmul kernel (interpreted) on each device's slice of the experts, inside shard_map.
        ("moe-kernel", checkpoints["mixtral"], "auto", [1, 2], {"linear_backend": "pallas"}),
        # Phi-3's joined q/k/v and gate/up rows: each device reads its own rows of each part.
        ("phi3", checkpoints["phi3"], "auto", [1, 4]),
        # Gemma 3: sandwich norms and sliding / full layers over the mesh, int8 layers (tanh GELU).
        ("gemma3", checkpoints["gemma3_text"], "auto", [1, 4], {"quantization": "int8"}),
        # A LoRA adapter's slots replicated on every device, its kv updates repeated with the kv heads.
        ("gptq-act-order", checkpoints["gptq-act-order"], "auto", [1, 2]),
        ("lora", checkpoints["llama"], "auto", [1, 4], {"enable_lora": True, "max_lora_rank": 4,
                                                        "lora_path": checkpoints["llama-lora"]}),
    ]
    cluster = {"checkpoint": checkpoints["llama"], "prompts": prompts, "port": _free_port()}
    # The single-host runs in two workers (every run's sizes in one of them): each compiles on one core mostly, and
    # one worker alone held the suite ~2 min on CI's two cores.
    procs = [_run_worker("single", {"runs": runs[half::2], "prompts": prompts,
                                    **({"narrow_moe": checkpoints["mixtral"]} if half == 0 else {})}, NUM_DEVICES)
             for half in (0, 1)]
    procs += [_run_worker("multi", {**cluster, "process_id": i}, NUM_DEVICES // 2) for i in range(2)]
    try:
        first, second, *multi = [_result(p) for p in procs]
        single = {**first, **second}
    finally:  # a failed worker must not leave the others (e.g. a follower waiting) behind
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return {"single": single, "multi": multi}


@pytest.fixture(scope="module")
def single_host(workers) -> dict:
    return workers["single"]


@pytest.mark.parametrize("run", ["llama/tp2", "llama/tp4", "qwen2/tp4", "gguf/tp4", "int8/tp4", "int8-tied/tp4",
                                 "int4/tp2", "fp8/tp4", "unrolled/tp4", "moe/tp4",
                                 "moe-int8/tp4", "moe-int4/tp2", "moe-fp8/tp2", "kv-fp8-scales/tp2", "phi3/tp4", "gemma3/tp4",
                                 "qwen2-moe/tp4", "moe-kernel/tp2", "gptq-act-order/tp2", "lora/tp4", "gpt-oss/tp4",
                                 "gpt-oss-mxfp4/tp2"])
def test_outputs_equal_single_device(single_host, run):
    """Greedy and seeded sampling (top-k/top-p, n=2) give the tokens of tensor_parallel_size=1 (a greedy output may
    part from them only at a near tie)."""
    assert_same_tokens(single_host[f"{run.split('/')[0]}/tp1"], single_host[run])


def test_lora_adapter_changes_the_outputs(single_host):
    """The adapter of the "lora" run bites (its outputs, equal over the mesh, are not the base model's)."""
    assert single_host["lora/tp1"]["outputs"] != single_host["llama/tp1"]["outputs"]


def test_sleep_and_wake_up_over_the_mesh_keep_the_shards_and_tokens(single_host):
    """``LLM.sleep()`` then ``wake_up()`` at tensor_parallel_size=4: every weight and the KV pool back on the shards
    they had, and the same tokens as before the sleep; likewise after ``update_weights_from_disk`` of the same
    checkpoint and a level-2 sleep (the weights loaded again)."""
    before = single_host["llama/tp4"]
    assert before["after_sleep"]["layout"] == before["layout"]
    assert before["after_sleep"]["outputs"] == before["outputs"]
    # update_weights_from_disk and sleep level 2 over the mesh: the checkpoint loaded again onto the same shards
    assert before["after_update"]["layout"] == before["layout"]
    assert before["after_update"]["outputs"] == before["outputs"]


def test_multi_step_decoding_over_the_mesh_gives_the_single_devices_tokens(single_host):
    assert_same_tokens(single_host["llama/tp1"], single_host["multi-step/tp4"])


@pytest.mark.parametrize("run", ["llama/tp2", "llama/tp4", "qwen2/tp4", "gguf/tp4"])
def test_params_and_kv_cache_sharded_as_specified(single_host, run):
    tp = int(run.split("tp")[1])
    layout = single_host[run]["layout"]
    single = single_host[run.split("/")[0] + "/tp1"]["layout"]
    assert layout["kv_cache"]["spec"] == KV_CACHE_SPEC
    for key, entry in layout.items():
        spec = KV_CACHE_SPEC if key == "kv_cache" else EXPECTED_SPECS[key]
        assert entry["spec"] == spec, key
        assert entry["devices"] == tp, key
        local = [n // tp if axis == "tp" else n for n, axis in zip(entry["shape"], spec)]
        assert entry["shard_shapes"] == [local], key
        # (one device joins q/k/v and gate/up: those have no single-device counterpart)
        if key in single and key not in ("layers/wk", "layers/wv", "layers/bk", "layers/bv", "kv_cache"):
            assert entry["shape"] == single[key]["shape"], key
    # 2 kv heads: up to tp=2 each device holds its own, at tp=4 every head is stored twice.
    # (Each device then holds one kv head: checked above through the shard shapes.)
    heads = max(2, tp)
    assert layout["kv_cache"]["shape"][1] == heads
    assert layout["layers/wk"]["shape"][-1] == heads * layout["kv_cache"]["shape"][-1]  # heads x head_dim
    if tp > 2:
        assert single_host[run]["kv_copies_match"] is True


# Which axis of the dense [L, K, N] matrix each field of a quantized weight runs over.
# (int8: the default K-major layout, Int8KMajorWeight.)
QUANTIZED_FIELD_AXES = {"int8": {"q": "nk", "scale": "n"}, "fp8": {"q": "nk", "scale": "n"},
                        "int4": {"packed": "kn", "scales": "kn", "zeros": "kn"}}


@pytest.mark.parametrize("run", ["int8/tp4", "int8-tied/tp4", "int4/tp2", "fp8/tp4"])
def test_quantized_fields_split_with_their_matrix(single_host, run):
    """A column-parallel matrix's scales are split over N, a row-parallel one's over K (its
    groups, where there are at least as many groups as devices; else they are replicated).
    The int8 LM head (K-major ``[V, H]``, a tied model's too) is vocab-parallel like the dense
    one, its scales with its rows; a tied model's embedding stays dense and vocab-parallel."""
    method, tp = run.split("/")[0].split("-")[0], int(run.split("tp")[1])
    layout = single_host[run]["layout"]
    if method == "int8":
        assert layout["lm_head/q"]["spec"] == ["tp", None] and layout["lm_head/scale"]["spec"] == ["tp"]
        assert layout["lm_head/q"]["devices"] == tp and layout["embed"]["spec"] == EXPECTED_SPECS["embed"]
        vocab, hidden = layout["embed"]["shape"]
        assert layout["lm_head/q"]["shape"] == [vocab, hidden] and layout["lm_head/q"]["shard_shapes"] == [
            [vocab // tp, hidden]]
    else:  # the dense head (none when tied: fp8's qwen2)
        assert "lm_head" not in layout or layout["lm_head"]["spec"] == EXPECTED_SPECS["lm_head"]
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        _, k_axis, n_axis = EXPECTED_SPECS[f"layers/{name}"]
        for field, axes in QUANTIZED_FIELD_AXES[method].items():
            entry = layout[f"layers/{name}/{field}"]
            want = [None] + [k_axis if a == "k" else n_axis for a in axes]
            want = [ax if ax is None or n % tp == 0 else None for ax, n in zip(want, entry["shape"])]
            assert entry["spec"] == want, (name, field)
            assert entry["devices"] == tp
    assert layout["kv_cache"]["spec"] == KV_CACHE_SPEC


def test_per_layer_kv_buffers_split_on_kv_heads(single_host):
    layout = single_host["unrolled/tp4"]["layout"]
    assert layout["kv_cache"]["spec"] == KV_CACHE_SPEC[1:]  # [Hkv, P, bs, D] per layer
    assert layout["kv_cache"]["devices"] == 4 and layout["kv_cache"]["shard_shapes"][0][0] == 1
    assert_same_tokens(single_host["llama/tp1"], single_host["unrolled/tp4"])


@pytest.mark.parametrize("run", ["llama/tp2", "llama/tp4"])
def test_step_communicates_only_activations(single_host, run):
    """Per step: one all-reduce of [T, H] for the vocab-parallel embedding and two per layer
    (attention and MLP outputs; the layer loop's body appears once in the program), and
    greedy sampling gathers only each device's best (value, index) per sequence, [S, tp]:
    no weight, cache or [S, V] logits is gathered."""
    tp = int(run.split("tp")[1])
    T, H, S = 16, single_host[run]["layout"]["final_norm"]["shape"][0], 8
    collectives = sorted(map(tuple, single_host[run]["collectives"]))
    assert collectives == sorted([(f"f32[{T},{H}]", "all-reduce")] * 3 + [
        (f"f32[{S},{tp}]", "all-gather"), (f"s32[{S},{tp}]", "all-gather")])


def test_mosaic_prefill_launch_lowers_per_device(single_host):
    """The Mosaic GPU prefill launch (the default in steps of >= 8192 rows on Hopper) lowers for cuda inside
    the attention's ``shard_map``, beside the Triton decode launch."""
    assert single_host["mosaic_lowers_sharded"] is True


def test_bad_sizes_are_refused_with_clear_errors(single_host):
    assert single_host["num_devices"] == NUM_DEVICES
    errors = single_host["errors"]
    assert "tensor_parallel_size=3" in errors["3"] and "4 attention heads" in errors["3"]
    assert "valid sizes: [1, 2, 4]" in errors["3"]
    assert "needs 8 devices" in errors["8"] and "only 4 CPU device(s)" in errors["8"]
    # found when the engine is made, not at its first step's trace
    assert "int4 experts' down projection" in single_host["narrow_moe_int4_error"]
    assert "cannot be split over 2 devices" in single_host["narrow_moe_int4_error"]


def test_two_processes_form_one_mesh(workers, single_host):
    """2 processes x 2 CPU devices, tp=4: process 1 follows process 0; outputs equal tp=1."""
    leader, follower = workers["multi"]
    assert leader["process_count"] == follower["process_count"] == 2
    assert leader["local_devices"] == follower["local_devices"] == 2
    assert_same_tokens(single_host["llama/tp1"], leader)
    # Each process holds only its own devices' slices (a quarter of wq's columns each).
    wq = single_host["llama/tp4"]["layout"]["layers/wq"]["shard_shapes"]
    assert leader["layout"]["layers/wq"] == follower["layout"]["layers/wq"] == wq


# ------------------------------------------------------------------ in this process (1 device)


def test_size_checks_name_the_problem():
    from models.config import ModelConfig
    from sharding import check_tensor_parallel_size

    config = ModelConfig(model_type="llama", vocab_size=1000, hidden_size=96, intermediate_size=192,
                         num_layers=1, num_heads=12, num_kv_heads=4, head_dim=8)
    for ok in (1, 2, 4, 12):
        check_tensor_parallel_size(config, ok)
    with pytest.raises(ValueError, match=r"does not divide the model's 12 attention heads.*valid sizes: \[1, 2, 4, 12\]"):
        check_tensor_parallel_size(config, 5)
    with pytest.raises(ValueError, match="does not divide the model's 4 kv heads"):
        check_tensor_parallel_size(config, 3)
    with pytest.raises(ValueError, match="exceeds the model's 4 kv heads without being a multiple"):
        check_tensor_parallel_size(config, 6)
    with pytest.raises(ValueError, match="positive integer"):
        check_tensor_parallel_size(config, 0)


def test_more_devices_than_present_is_refused_before_loading():
    from engine import LLM
    from engine.engine_args import EngineArgs
    from sharding import make_mesh

    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 needs 2 devices, but only 1 CPU device"):
        LLM("/nonexistent/checkpoint", tensor_parallel_size=2)  # refused before the path is even read
    with pytest.raises(ValueError, match="positive integer"):
        EngineArgs(tensor_parallel_size=0).validate()
    with pytest.raises(ValueError, match="needs 3 devices"):
        make_mesh(3)


def test_per_device_kv_block_bytes():
    from models.batch import kv_cache_bytes_per_block
    from models.config import ModelConfig
    from sharding import kv_cache_bytes_per_block_per_device

    config = ModelConfig(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=64,
                         num_layers=3, num_heads=8, num_kv_heads=2, head_dim=16)
    whole = kv_cache_bytes_per_block(config, 16, np.float32)
    assert kv_cache_bytes_per_block_per_device(config, 16, np.float32, 1) == whole
    assert kv_cache_bytes_per_block_per_device(config, 16, np.float32, 2) == whole // 2
    assert kv_cache_bytes_per_block_per_device(config, 16, np.float32, 8) == whole // 2  # one (copied) head


def test_distributed_arguments_are_checked():
    from sharding.distributed import initialize

    with pytest.raises(ValueError, match="need --coordinator-address"):
        initialize(num_processes=2, process_id=1)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
        initialize("127.0.0.1:1", 2, 2)


if __name__ == "__main__":
    mode, payload = sys.argv[1], json.loads(sys.argv[2])
    result = _single_host(payload) if mode == "single" else _multi_host(payload)
    print("RESULT " + json.dumps(result), flush=True)
