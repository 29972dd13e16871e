"""On a GPU, the engine with the Pallas attention kernel gives the same greedy tokens as with
the pure-jnp reference (same weights, same ragged mixes of prefill and decode)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from engine import LLM, SamplingParams
from tests.tiny_checkpoints import write_tiny_checkpoint

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    """XLA's default float32 matmul on GPU is TF32 while the kernel computes in full float32;
    compare the two attention paths with every other matmul exact."""
    previous = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    yield
    jax.config.update("jax_default_matmul_precision", previous)


@pytest.mark.parametrize("variant", ["llama", "qwen3", "mistral"])
def test_kernel_and_reference_engines_agree(tmp_path, variant):
    write_tiny_checkpoint(tmp_path, variant, seed=3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (1, 7, 16, 17, 33, 60, 5, 90)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = {}
    for backend in ("reference", "pallas"):
        llm = LLM(model=str(tmp_path), dtype="float32", attention_backend=backend, skip_tokenizer_init=True,
                  max_model_len=256, max_num_batched_tokens=64, max_num_seqs=8, num_gpu_blocks_override=128)
        outputs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.shutdown()
    agree = [sum(a == b for a, b in zip(p, r)) for p, r in zip(outputs["pallas"], outputs["reference"])]
    assert outputs["pallas"] == outputs["reference"], f"tokens agreeing per prompt (of 24): {agree}"


def test_mosaic_prefill_engine_agrees_with_the_triton_one(tmp_path, monkeypatch):
    """bfloat16, head_dim 64: the engine with the Mosaic GPU prefill launch (sm_90) against the Triton one, on
    prompts that span several work items and chunks after context (64-token steps). Both round in bfloat16,
    differently, so near-ties of a random model may flip a greedy token: every prompt's first generated token
    (its prefill's alone) must agree, and most tokens (run 17c, H200: 86 of 96, one prompt parting after 6)."""
    from pallas_kernels import ragged_prefill_mgpu
    from pallas_kernels.ragged_paged_attention import default_tiling

    if not ragged_prefill_mgpu.supported("bfloat16", "bfloat16", 64, 16, soft_cap=None, sliding_window=None):
        pytest.skip("the Mosaic GPU prefill kernel needs an sm_90 GPU")
    write_tiny_checkpoint(tmp_path, "llama", seed=5, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=64)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (1, 70, 130, 17, 200, 3)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = {}
    for kernel in ("triton", "mosaic"):
        monkeypatch.setenv("PAGEDJAX_ATTENTION_TILING",
                           f'{{"prefill_kernel": "{kernel}", "prefill_mosaic_min_tokens": 0}}')
        default_tiling.cache_clear()
        llm = LLM(model=str(tmp_path), dtype="bfloat16", attention_backend="pallas", skip_tokenizer_init=True,
                  max_model_len=256, max_num_batched_tokens=64, max_num_seqs=8, num_gpu_blocks_override=128)
        outputs[kernel] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.shutdown()
    default_tiling.cache_clear()
    agree = [sum(a == b for a, b in zip(m, t)) for m, t in zip(outputs["mosaic"], outputs["triton"])]
    assert all(m[0] == t[0] for m, t in zip(outputs["mosaic"], outputs["triton"])), agree
    assert sum(agree) >= 0.8 * 16 * len(prompts), f"tokens agreeing per prompt (of 16): {agree}"


GENERATE_UNDER_ALLOCATOR = """
import json, os, sys
from engine import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", skip_tokenizer_init=True, max_model_len=256,
          max_num_batched_tokens=64, max_num_seqs=8)
params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
batched = [o.outputs[0].token_ids for o in llm.generate(json.loads(sys.argv[2]), params, use_tqdm=False)]
alone = llm.generate([json.loads(sys.argv[2])[0]], params, use_tqdm=False)[0].outputs[0].token_ids  # batch-1 steps
print(json.dumps({"allocator": os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR"), "tokens": batched + [alone],
                  "max_concurrent_tokens": llm.llm_engine.max_concurrent_tokens}))
"""


def test_vmm_allocator_gives_the_default_allocators_tokens_and_pool(tmp_path):
    """The engine's default on one GPU (JAX's VMM allocator, XLA's temporaries at a fixed address, so decode steps
    replay their CUDA graphs without updating them) gives the greedy tokens of JAX's pool allocator (``bfc``), in
    a batch and at batch 1, and a KV pool sized from the driver within 5% of the one sized from the pool."""
    import json
    import os
    import subprocess
    import sys

    write_tiny_checkpoint(tmp_path, "llama", seed=7)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (9, 1, 40, 70, 3)]
    runs = {}
    for allocator in ("bfc", None):
        env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_ALLOCATOR"}
        env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
        if allocator:
            env["XLA_PYTHON_CLIENT_ALLOCATOR"] = allocator
        out = subprocess.run([sys.executable, "-c", GENERATE_UNDER_ALLOCATOR, str(tmp_path), json.dumps(prompts)],
                             env=env, capture_output=True, text=True, timeout=600,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert out.returncode == 0, out.stderr[-3000:]
        runs[allocator] = json.loads(out.stdout.strip().splitlines()[-1])
    if runs[None]["allocator"] != "vmm":
        pytest.skip(f"the engine's default here is {runs[None]['allocator']!r}, not the VMM allocator")
    assert runs[None]["tokens"] == runs["bfc"]["tokens"]
    pools = [runs[a]["max_concurrent_tokens"] for a in ("bfc", None)]
    assert abs(pools[1] - pools[0]) <= 0.05 * pools[0], pools


@pytest.mark.parametrize("method,int8_layout", [("int8", "kn"), ("int8", "nk"), ("int4", "kn")])
def test_quantized_weight_kernels_give_xlas_tokens(tmp_path, monkeypatch, method, int8_layout):
    """float32, one sequence at a time (so every decode step is the one-row GEMV, with the default byte-permute
    conversions compiled: int8 values as themselves, int4 nibbles as 0.5 + q / 256; int8 stored [K, N] and,
    ``$PAGEDJAX_INT8_LAYOUT=nk``, [N, K]): the engine's Pallas weight-streaming matmuls give the greedy tokens of XLA's dequantize-then-dot on the same quantized weights."""
    monkeypatch.setenv("PAGEDJAX_INT8_LAYOUT", int8_layout)
    write_tiny_checkpoint(tmp_path, "llama", seed=5)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (3, 17, 40)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = {}
    for backend in ("xla", "auto"):
        llm = LLM(model=str(tmp_path), dtype="float32", quantization=method, linear_backend=backend,
                  skip_tokenizer_init=True, max_model_len=128, max_num_batched_tokens=64, max_num_seqs=1,
                  num_gpu_blocks_override=64)
        outputs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.shutdown()
    agree = [sum(a == b for a, b in zip(p, r)) for p, r in zip(outputs["auto"], outputs["xla"])]
    assert outputs["auto"] == outputs["xla"], f"{method}: tokens agreeing per prompt (of 16): {agree}"


def test_multi_step_decoding_gives_one_steps_tokens_and_updates_the_cache_in_place(tmp_path):
    """The GPU path (Pallas attention and KV write, unrolled layers with a KV buffer each, precompiled steps):
    multi-step decodes give the one-step engine's greedy tokens, and their program writes the KV pages in place
    (XLA's copy insertion could copy loop-carried buffers: its temporaries must hold no copy of the pool)."""
    write_tiny_checkpoint(tmp_path, "llama", seed=3)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (1, 7, 16, 17, 33, 60)]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outputs = {}
    for steps in (1, 4):
        llm = LLM(model=str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=128,
                  max_num_batched_tokens=64, max_num_seqs=8, num_gpu_blocks_override=4096, precompile_steps=True,
                  num_scheduler_steps=steps)
        outputs[steps] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if steps > 1:
            assert llm.stats()["multi_steps"] > 0
            runner = llm.llm_engine.runner
            T = runner.burst_buckets()[-1]
            S = runner.padded_num_seqs(T)
            host, (layout,) = runner._empty_burst_input(T, [SamplingParams(temperature=0)])
            leaves = jax.tree.leaves(host)
            staged = runner._staging_buffers(tuple(leaf.shape for leaf in leaves), host)
            compiled = runner.burst_fn(T).lower(runner.params, runner.kv_cache, staged, runner._sampled,
                                                runner._burst_output_buffer(S, None, take=False), layout=layout,
                                                num_logprobs=None).compile()
            pool = sum(a.nbytes for a in jax.tree.leaves(runner.kv_cache))
            assert compiled.memory_analysis().temp_size_in_bytes < pool / 8
        llm.shutdown()
    assert outputs[4] == outputs[1]


def test_prefix_caching_and_prompt_logprobs_with_the_kernels(tmp_path):
    """The Pallas kernels over cached prefixes give the tokens computed afresh, and the scoring step's prompt
    logprobs of generated tokens are the sampler's logprobs (tests/test_prompt_logprobs.py runs it on the CPU)."""
    from tests.test_prompt_logprobs import scores_agree_with_sampling

    write_tiny_checkpoint(tmp_path, "llama", seed=4)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 256, size=n).tolist() for n in (3, 20, 33, 70)]
    llm = LLM(model=str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=256,
              max_num_batched_tokens=64, max_num_seqs=8, num_gpu_blocks_override=128)
    try:
        scores_agree_with_sampling(llm, prompts, atol=1e-3)
    finally:
        llm.shutdown()


def test_enforce_eager_turns_xla_graphs_off_and_gives_the_same_tokens(tmp_path):
    """vLLM's ``enforce_eager`` (no CUDA graphs): XLA reads the option (a value not among its command types is
    refused, the empty list compiles: no command buffers; its compiled text names none either way), and the
    engine's greedy tokens are those of the default engine."""
    from engine.engine_args import EAGER_COMPILER_OPTIONS

    x = jax.numpy.ones((64, 64))
    (option, value), = EAGER_COMPILER_OPTIONS.items()
    with pytest.raises(Exception, match="not a valid enum value"):
        jax.jit(jax.numpy.tanh, compiler_options={option: "NOT_A_COMMAND_TYPE"}).lower(x).compile()
    jax.jit(jax.numpy.tanh, compiler_options={option: value}).lower(x).compile()
    write_tiny_checkpoint(tmp_path, "llama", seed=7)
    prompts = [np.random.default_rng().integers(0, 256, size=n).tolist() for n in (3, 40, 9)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens = {}
    for eager in (False, True):
        llm = LLM(model=str(tmp_path), dtype="float32", skip_tokenizer_init=True, enforce_eager=eager,
                  max_model_len=128, max_num_batched_tokens=64, max_num_seqs=4, num_gpu_blocks_override=64)
        tokens[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.shutdown()
    assert tokens[True] == tokens[False]


def test_a_head_size_of_no_power_of_two_runs_the_kernels_on_the_gpu(tmp_path):
    """A head_dim that is no power of two (Phi-3's 96; 24 here) runs the Pallas attention and KV write padded to the
    next power of two, and gives the reference backend's tokens (it failed in the first step before run 46b, then
    ran XLA's attention)."""
    write_tiny_checkpoint(tmp_path, "phi3", seed=11, hidden_size=96, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=24)
    prompts = [np.random.default_rng().integers(0, 256, size=n).tolist() for n in (5, 33, 1)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = {}
    for backend in ("pallas", "reference"):
        llm = LLM(model=str(tmp_path), dtype="float32", skip_tokenizer_init=True, attention_backend=backend,
                  kv_write_backend=backend, max_model_len=64, max_num_seqs=4, num_gpu_blocks_override=32)
        tokens[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.shutdown()
    assert tokens["pallas"] == tokens["reference"] and all(len(t) == 8 for t in tokens["pallas"])
