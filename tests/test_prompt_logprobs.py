"""``SamplingParams.prompt_logprobs``: each prompt token's logprob given the tokens before it, its rank and the most
likely tokens there, against Hugging Face ``transformers`` on a random tiny checkpoint; across prompt chunks,
preemption, a cached prefix and ``n > 1``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from engine.runner import PROMPT_SCORE_CHUNK, SequenceWork, score_rows
from tests.tiny_checkpoints import write_tiny_checkpoint

TOP = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    model = write_tiny_checkpoint(path, "llama", seed=5)
    return str(path), model


def hf_prompt_logprobs(model, prompt: list[int]) -> np.ndarray:
    """Log-softmax of HF's logits at every prompt position but the last: row p predicts token p + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, :-1].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def check_against_hf(model, prompt: list[int], prompt_logprobs) -> None:
    reference = hf_prompt_logprobs(model, prompt)
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for position, entry in enumerate(prompt_logprobs[1:], start=1):
        row, token = reference[position - 1], prompt[position]
        assert entry[token].logprob == pytest.approx(row[token], abs=2e-4)
        assert entry[token].rank == int(np.sum(row >= row[token] - 1e-6))
        top = sorted((lp for lp in entry.values() if lp.rank <= TOP), key=lambda lp: lp.rank)
        assert [lp.rank for lp in top] == [1, 2, 3]
        np.testing.assert_allclose([lp.logprob for lp in top], np.sort(row)[::-1][:TOP], atol=2e-4)


def test_score_rows_pads_to_whole_chunks_and_keeps_each_works_place():
    work = [SequenceWork(token_ids=[1, 2, 3], start=0, block_table=[1], sample=True, score_targets=[2, 3, -1]),
            SequenceWork(token_ids=[9], start=4, block_table=[2], sample=True),
            SequenceWork(token_ids=[4, 5], start=2, block_table=[3], sample=False, score_targets=[5, 6])]
    rows, targets, offsets = score_rows(work, np.array([0, 3, 4, 6]))
    assert len(rows) == len(targets) == PROMPT_SCORE_CHUNK
    assert rows[:5].tolist() == [0, 1, 2, 4, 5] and targets[:5].tolist() == [2, 3, 0, 5, 6]
    assert offsets == {0: 0, 2: 3}
    assert score_rows(work[1:2], np.array([0, 1])) is None
    many = [SequenceWork(token_ids=[1] * (PROMPT_SCORE_CHUNK + 1), start=0, block_table=[1], sample=True,
                         score_targets=[1] * (PROMPT_SCORE_CHUNK + 1))] * 2
    assert len(score_rows(many, np.array([0, 129, 258]))[0]) == 4 * PROMPT_SCORE_CHUNK  # 3 chunks -> 4


def test_prompt_logprobs_equal_transformers_across_chunks_preemption_cache_and_n(tiny):
    path, model = tiny
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, vocab, n).tolist() for n in (2, 17, 40, 61)]
    # 16 tokens a step: the longer prompts are scored over several chunks; 14 blocks of 8 tokens for 4 requests of up
    # to 61 + 6 tokens: some are preempted and computed again.
    llm = LLM(path, skip_tokenizer_init=True, max_model_len=96, max_num_batched_tokens=16, max_num_seqs=4,
              num_gpu_blocks_override=15, block_size=8, seed=0, admission_reserve_tokens=0)  # fills the pool
    try:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=TOP)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        preemptions = llm.stats()["num_preemptions"]
        for prompt, output in zip(prompts, outputs):
            check_against_hf(model, prompt, output.prompt_logprobs)
        # With the longest prompt cached, asking its prompt logprobs computes it whole all the same.
        plain = [llm.generate({"prompt_token_ids": prompts[3]}, SamplingParams(temperature=0.0, max_tokens=1),
                              use_tqdm=False)[0] for _ in range(2)]
        assert plain[1].prompt_logprobs is None and plain[1].num_cached_tokens > 0
        again = llm.generate({"prompt_token_ids": prompts[3]}, params, use_tqdm=False)[0]
        assert again.num_cached_tokens == 0
        check_against_hf(model, prompts[3], again.prompt_logprobs)
        without = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
        samples = llm.generate({"prompt_token_ids": prompts[2]},
                               SamplingParams(temperature=1.0, seed=1, n=2, max_tokens=3, prompt_logprobs=0),
                               use_tqdm=False)[0]
    finally:
        llm.shutdown()
    assert preemptions > 0
    # Scoring the prompt changes nothing generated.
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in without]
    assert all(o.prompt_logprobs is None for o in without)
    # n = 2: one set of prompt logprobs; prompt_logprobs=0 gives the prompt token alone.
    assert len(samples.outputs) == 2 and len(samples.prompt_logprobs) == len(prompts[2])
    reference = hf_prompt_logprobs(model, prompts[2])
    for position, entry in enumerate(samples.prompt_logprobs[1:], start=1):
        assert list(entry) == [prompts[2][position]]
        assert entry[prompts[2][position]].logprob == pytest.approx(reference[position - 1][prompts[2][position]],
                                                                    abs=2e-4)


def test_prompt_logprobs_are_validated():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


def scores_agree_with_sampling(llm: LLM, prompts: list[list[int]], atol: float) -> None:
    """Greedy tokens with their logprobs, then the prompts again (found in the prefix cache: the same tokens), then
    prompt + tokens scored as a prompt: the scores at the generated places are the sampler's logprobs."""
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
    first = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    again = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in first]
    assert any(o.num_cached_tokens for o in again)
    texts = [p + o.outputs[0].token_ids for p, o in zip(prompts, first)]
    scored = llm.generate([{"prompt_token_ids": t} for t in texts],
                          SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    for prompt, output, score in zip(prompts, first, scored):
        tokens = output.outputs[0].token_ids
        sampled = [entry[token].logprob for entry, token in zip(output.outputs[0].logprobs, tokens)]
        found = [entry[token].logprob for entry, token in zip(score.prompt_logprobs[len(prompt):], tokens)]
        np.testing.assert_allclose(found, sampled, atol=atol)
        assert all(entry[token].rank == 1 for entry, token in zip(score.prompt_logprobs[len(prompt):], tokens))


def test_scores_of_generated_tokens_equal_their_sampled_logprobs(tiny):
    path, model = tiny
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (3, 20, 33)]
    llm = LLM(path, skip_tokenizer_init=True, max_model_len=128, max_num_batched_tokens=32, max_num_seqs=4,
              block_size=8, seed=0)
    try:
        scores_agree_with_sampling(llm, prompts, atol=1e-4)
    finally:
        llm.shutdown()
