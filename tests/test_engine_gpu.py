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
