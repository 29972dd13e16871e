"""Pooling engines: ``LLM(runner="pooling").embed`` against Hugging Face's hidden states, and a sequence classifier's
``classify`` against its logits.

A tiny random checkpoint's prompts, chunked (a step's token budget below the longest prompt) and batched in a KV
pool too small for all at once: the last token's, the mean or the first token's row of the last layer's normed
output, normalised or not as the sentence-transformers files or ``PoolingParams`` say, equal HF's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine import LLM, PoolingParams, SamplingParams
from engine.runner import token_buckets
from tests.tiny_checkpoints import write_tiny_checkpoint

PROMPT_LENGTHS = (5, 30, 17, 9)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3-embedding")
    model = write_tiny_checkpoint(path, "qwen3", seed=int(np.random.default_rng().integers(1 << 20)))
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 256, n).tolist() for n in PROMPT_LENGTHS]
    with torch.no_grad():
        hidden = [model.model(torch.tensor([p])).last_hidden_state[0].numpy().astype(np.float64) for p in prompts]
    return path, prompts, hidden


def embed(path, prompts, params=None, **engine):
    llm = LLM(str(path), runner="pooling", dtype="float32", skip_tokenizer_init=True, max_model_len=40,
              max_num_batched_tokens=16, max_num_seqs=4, num_gpu_blocks_override=7, block_size=8, **engine)
    try:
        outs = llm.embed([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [np.asarray(o.outputs.embedding, np.float64) for o in outs], llm.stats(), llm
    finally:
        llm.shutdown()


def unit(v):
    return v / np.linalg.norm(v)


def assert_close_to_hf(got, want):
    """Our float32 vector against transformers' float32 one: the two sum in other orders, so an element may be a few
    ulps of the vector's largest element off, not of its own (a raw hidden state's 0.0845 was 3.2e-6 off beside
    elements of 2.6); a unit vector keeps the bound of 2e-6."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * max(1.0, float(np.abs(want).max())))


def test_last_token_embeddings_are_hf_hidden_states_normalised(checkpoint):
    path, prompts, hidden = checkpoint
    got, stats, llm = embed(path, prompts)
    assert stats["steps"] > len(PROMPT_LENGTHS) // 2  # the 30-token prompt in chunks of 16, others beside it
    for g, h in zip(got, hidden):
        np.testing.assert_allclose(g, unit(h[-1]), atol=2e-6)
    cut, _, _ = embed(path, prompts[:2], PoolingParams(dimensions=16, normalize=False))
    for g, h in zip(cut, hidden):  # Matryoshka: the first dimensions
        np.testing.assert_allclose(g, h[-1][:16], rtol=1e-5, atol=5e-6)  # 1.03e-6 seen on a 9e-4 value
    assert llm.llm_engine.block_manager.prefix_cache is not None  # last-token pooling keeps the prefix cache


@pytest.mark.parametrize("mode, normalize", [("mean_tokens", False), ("cls_token", True)])
def test_sentence_transformers_pooling_files(checkpoint, tmp_path, mode, normalize):
    """``1_Pooling/config.json`` names the pooling and ``modules.json`` whether a Normalize module ends it."""
    path, prompts, hidden = checkpoint
    for f in path.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({f"pooling_mode_{mode}": True}))
    modules = [{"type": "sentence_transformers.models.Transformer"}, {"type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"type": "sentence_transformers.models.Normalize"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    got, _, llm = embed(tmp_path, prompts)
    for g, h in zip(got, hidden):
        want = h.mean(axis=0) if mode == "mean_tokens" else h[0]
        assert_close_to_hf(g, unit(want) if normalize else want)
    assert llm.llm_engine.block_manager.prefix_cache is None  # every prompt row is needed
    forced, _, _ = embed(tmp_path, prompts[:1], pooling_type="LAST")
    assert_close_to_hf(forced[0], unit(hidden[0][-1]) if normalize else hidden[0][-1])


def test_pooling_and_generating_engines_refuse_each_others_requests(checkpoint):
    path, prompts, _ = checkpoint
    pooling = LLM(str(path), runner="pooling", dtype="float32", skip_tokenizer_init=True, max_model_len=64)
    with pytest.raises(ValueError, match="pooling engine.*takes PoolingParams"):
        pooling.generate({"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(ValueError, match="dimensions=65 exceeds the model's embedding size 64"):
        pooling.embed({"prompt_token_ids": prompts[0]}, PoolingParams(dimensions=65), use_tqdm=False)
    with pytest.raises(ValueError, match="this is an embedding model: use embed"):
        pooling.classify({"prompt_token_ids": prompts[0]}, use_tqdm=False)
    with pytest.raises(ValueError, match="PoolingParams.use_activation is for a classifier"):
        pooling.embed({"prompt_token_ids": prompts[0]}, PoolingParams(use_activation=False), use_tqdm=False)
    pooling.shutdown()
    generating = LLM(str(path), dtype="float32", skip_tokenizer_init=True, max_model_len=64)
    with pytest.raises(ValueError, match="runner='pooling'"):
        generating.embed({"prompt_token_ids": prompts[0]}, use_tqdm=False)
    generating.shutdown()
    for bad, match in (({"runner": "embed"}, "runner must be one of auto, generate, pooling"),
                       ({"runner": "pooling", "pooling_type": "max"}, "pooling_type must be None or one of")):
        with pytest.raises(ValueError, match=match):
            LLM(str(path), skip_tokenizer_init=True, **bad)
    with pytest.raises(ValueError, match="dimensions must be a positive integer"):
        PoolingParams(dimensions=0)


def test_embedding_checkpoint_saved_as_its_decoder_alone(checkpoint, tmp_path):
    """As Qwen3-Embedding's files: the decoder's tensors at the top (no ``model.`` prefix) and no LM head though
    the config is untied; a pooling engine loads it (a generating one names the missing head)."""
    from safetensors.numpy import load_file, save_file

    path, prompts, hidden = checkpoint
    config = json.loads((path / "config.json").read_text())
    assert not config["tie_word_embeddings"]
    tensors = {name.removeprefix("model."): value for name, value in load_file(path / "model.safetensors").items()
               if name != "lm_head.weight"}
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    got, _, _ = embed(tmp_path, prompts[:2])
    for g, h in zip(got, hidden):
        np.testing.assert_allclose(g, unit(h[-1]), atol=2e-6)
    with pytest.raises(ValueError, match="lm_head.weight"):
        LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=40)


def test_precompiled_pooling_steps_are_the_ones_that_run(checkpoint):
    """``precompile_steps=True`` (the GPU default) on a pooling engine compiles its pooling step of every token
    bucket at start-up; embedding afterwards compiles nothing more and gives the same vectors."""
    path, prompts, hidden = checkpoint
    got, _, llm = embed(path, prompts, precompile_steps=True)
    runner = llm.llm_engine.runner
    (jitted,) = runner._pool_fns.values()
    assert jitted._cache_size() == len(token_buckets(runner.max_num_batched_tokens))
    for g, h in zip(got, hidden):
        np.testing.assert_allclose(g, unit(h[-1]), atol=2e-6)


def test_encode_gives_the_embeddings_as_arrays(checkpoint):
    """vLLM's ``LLM.encode``: the model's pooled output (here its embedding) as a float32 array in ``.outputs.data``;
    a task the model does not do is refused by name."""
    from engine import PoolingRequestOutput

    path, prompts, hidden = checkpoint
    llm = LLM(str(path), runner="pooling", dtype="float32", skip_tokenizer_init=True, max_model_len=40)
    try:
        outs = llm.encode([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
        same = llm.encode({"prompt_token_ids": prompts[0]}, PoolingParams(normalize=False), pooling_task="embed",
                          use_tqdm=False)
        for task in ("classify", "reward"):
            with pytest.raises(ValueError, match="it can only embed"):
                llm.encode([prompts[0]], pooling_task=task, use_tqdm=False)
    finally:
        llm.shutdown()
    assert all(isinstance(o, PoolingRequestOutput) and o.outputs.data.dtype == np.float32 for o in outs)
    assert [o.prompt_token_ids for o in outs] == prompts
    for out, h in zip(outs, hidden):
        np.testing.assert_allclose(out.outputs.data, unit(h[-1]), atol=2e-6)
    assert_close_to_hf(same[0].outputs.data, hidden[0][-1])


def test_token_embed_gives_every_prompt_tokens_vector(checkpoint):
    """vLLM's ``pooling_task="token_embed"``: each prompt token's normed hidden state (normalised, cut to
    ``dimensions``), chunked, in a pool too small for all at once, beside last-token embeddings of the same prompts
    (which cache their blocks: a per-token request still computes every row, none skipped as cached)."""
    path, prompts, hidden = checkpoint
    llm = LLM(str(path), runner="pooling", dtype="float32", skip_tokenizer_init=True, max_model_len=40,
              max_num_batched_tokens=16, max_num_seqs=4, num_gpu_blocks_override=7, block_size=8)
    try:
        llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)  # their full blocks now cached
        outs = llm.encode([{"prompt_token_ids": p} for p in prompts], pooling_task="token_embed", use_tqdm=False)
        cut = llm.encode([prompts[1]], PoolingParams(dimensions=16, normalize=False), pooling_task="token_embed",
                         use_tqdm=False)[0].outputs.data
        with pytest.raises(ValueError, match="it can only embed or token_embed"):
            llm.reward([prompts[0]], use_tqdm=False)
        by_params = llm.encode([prompts[0]], PoolingParams(task="token_embed"), use_tqdm=False)  # the task there
        with pytest.raises(ValueError, match="PoolingParams.task='token_embed' conflicts with this call's task"):
            llm.embed([prompts[0]], PoolingParams(task="token_embed"), use_tqdm=False)
    finally:
        llm.shutdown()
    for out, h, p in zip(outs, hidden, prompts):
        assert out.outputs.data.shape == (len(p), h.shape[1]) and out.outputs.data.dtype == np.float32
        np.testing.assert_allclose(out.outputs.data, h / np.linalg.norm(h, axis=1, keepdims=True), atol=2e-6)
    assert_close_to_hf(cut, hidden[1][:, :16])
    np.testing.assert_array_equal(by_params[0].outputs.data, outs[0].outputs.data)


def test_a_prompt_may_fill_max_model_len(checkpoint):
    """Nothing is generated, so a pooled prompt may be max_model_len tokens long (as in vLLM), chunked and in a small
    pool too; one more is refused."""
    path, prompts, hidden = checkpoint
    full = prompts[1] + prompts[0] + prompts[3][:5]  # 40 tokens
    assert len(full) == 40
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf.model(torch.tensor([full])).last_hidden_state[0, -1].numpy().astype(np.float64)
    got, _, _ = embed(path, [full, prompts[2], full])
    for vector in (got[0], got[2]):
        np.testing.assert_allclose(vector, unit(want), atol=2e-6)
    with pytest.raises(ValueError, match="prompt 0 is 41 tokens long, but the model's context length"):
        embed(path, [full + [1]])


def test_score_is_the_cosine_of_the_embeddings(checkpoint):
    """vLLM's ``LLM.score`` for an embedding model: one text against many, or pair by pair."""
    path, prompts, hidden = checkpoint
    llm = LLM(str(path), runner="pooling", dtype="float32", skip_tokenizer_init=True, max_model_len=40)
    try:
        one_to_many = llm.score({"prompt_token_ids": prompts[0]}, [{"prompt_token_ids": p} for p in prompts[1:]],
                                use_tqdm=False)
        pairwise = llm.score([{"prompt_token_ids": p} for p in prompts[:2]],
                             [{"prompt_token_ids": p} for p in prompts[2:]], use_tqdm=False)
        with pytest.raises(ValueError, match="one item with many, or as many with as many"):
            llm.score([prompts[0], prompts[1]], [prompts[0], prompts[1], prompts[2]], use_tqdm=False)
    finally:
        llm.shutdown()
    last = [unit(h[-1]) for h in hidden]
    assert [o.outputs.score for o in one_to_many] == pytest.approx([last[0] @ v for v in last[1:]], abs=1e-5)
    assert [o.outputs.score for o in pairwise] == pytest.approx([last[0] @ last[2], last[1] @ last[3]], abs=1e-5)
    assert one_to_many[0].prompt_token_ids == prompts[0] + prompts[1]


def test_auto_runner_follows_the_checkpoints_architectures(checkpoint, tmp_path):
    """vLLM's default runner: a checkpoint whose architectures are bare decoders (``Qwen3Model``, as e5-mistral's
    ``MistralModel``) embeds; a causal LM generates."""
    path, prompts, hidden = checkpoint
    for f in path.iterdir():
        if f.name != "config.json":
            (tmp_path / f.name).symlink_to(f)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen3Model"]}))
    for folder, runner in ((path, "generate"), (tmp_path, "pooling")):
        llm = LLM(str(folder), dtype="float32", skip_tokenizer_init=True, max_model_len=40)
        try:
            assert llm.llm_engine.args.runner == runner
            if runner == "pooling":
                (out,) = llm.embed({"prompt_token_ids": prompts[0]}, use_tqdm=False)
                np.testing.assert_allclose(out.outputs.embedding, unit(hidden[0][-1]), atol=2e-6)
        finally:
            llm.shutdown()


@pytest.mark.parametrize("variant, num_labels", [("llama", 3), ("qwen2", 1)])
def test_sequence_classifier_gives_transformers_probabilities(tmp_path, variant, num_labels):
    """A ``...ForSequenceClassification`` checkpoint (a classifier; one label: a reward model): ``runner="auto"``
    serves it as a pooling engine, and ``classify`` gives the softmax of transformers' logits (a sigmoid for one
    label), or the logits themselves with ``use_activation=False``; chunked prompts in a small pool. ``embed`` is
    refused on it, ``classify`` on an embedding model, each naming the other. vLLM's ``reward``
    (``token_classify``): the head's probabilities (or logits) at every prompt token."""
    import transformers

    from engine import ClassificationRequestOutput
    from tests.tiny_checkpoints import randomize_, tiny_hf_config

    config = tiny_hf_config(variant, num_labels=num_labels, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32,
                                                                        attn_implementation="eager")
    randomize_(model, seed=3)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    rng = np.random.default_rng()
    prompts = [rng.integers(1, 256, n).tolist() for n in PROMPT_LENGTHS]
    with torch.no_grad():
        logits = [model.eval()(torch.tensor([p])).logits[0].numpy().astype(np.float64) for p in prompts]
    llm = LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=40, max_num_batched_tokens=16,
              max_num_seqs=4, num_gpu_blocks_override=7, block_size=8)
    outs = llm.classify([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    raw = llm.classify([{"prompt_token_ids": p} for p in prompts], PoolingParams(use_activation=False),
                       use_tqdm=False)
    for out, plain, want in zip(outs, raw, logits):
        assert isinstance(out, ClassificationRequestOutput) and len(out.outputs.probs) == num_labels
        probs = 1 / (1 + np.exp(-want)) if num_labels == 1 else np.exp(want) / np.exp(want).sum()
        np.testing.assert_allclose(out.outputs.probs, probs, atol=2e-5)
        np.testing.assert_allclose(plain.outputs.probs, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="sequence classifier: use classify, not embed"):
        llm.embed([[1, 2, 3]], use_tqdm=False)
    encoded = llm.encode([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)  # vLLM's: the model's task
    np.testing.assert_array_equal([o.outputs.data for o in encoded], [o.outputs.probs for o in outs])
    with pytest.raises(ValueError, match="it can only classify"):
        llm.encode([[1, 2, 3]], pooling_task="embed", use_tqdm=False)
    for wrong in (dict(dimensions=4), dict(normalize=True)):
        with pytest.raises(ValueError, match=f"PoolingParams.{next(iter(wrong))} is for embeddings"):
            llm.classify([[1, 2, 3]], PoolingParams(**wrong), use_tqdm=False)
    # vLLM's reward (pooling_task="token_classify"): the head on every token, as transformers' per-token logits
    rewards = llm.reward([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    raw_rewards = llm.encode([prompts[1]], PoolingParams(use_activation=False), pooling_task="token_classify",
                             use_tqdm=False)
    llm.shutdown()
    with torch.no_grad():
        every = [model.score(model.model(torch.tensor([p])).last_hidden_state)[0].numpy().astype(np.float64)
                 for p in prompts]
    for out, want, p in zip(rewards, every, prompts):
        assert out.outputs.data.shape == (len(p), num_labels) and out.prompt_token_ids == p
        probs = 1 / (1 + np.exp(-want)) if num_labels == 1 else np.exp(want) / np.exp(want).sum(1, keepdims=True)
        np.testing.assert_allclose(out.outputs.data, probs, atol=2e-5)
    np.testing.assert_allclose(raw_rewards[0].outputs.data, every[1], atol=1e-4, rtol=1e-4)
