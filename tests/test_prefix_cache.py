"""Automatic prefix caching: block keys, the block manager's cached and evictable blocks, the scheduler starting a
request on its cached prefix, and the engine's outputs unchanged by it."""

import os
import random

import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.block_manager import BlockManager
from engine.prefix_cache import ROOT_KEY, block_key, extend_block_keys
from engine.request import RequestStatus
from tests.test_scheduler import make


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return random.Random(seed)


def keys_of(tokens, block_size=4):
    keys = []
    extend_block_keys(keys, lambda start, stop: tokens[start:stop], len(tokens), block_size)
    return keys


def run_sequence(bm, seq_id, tokens):
    """A sequence whose tokens were all computed: allocate, key its full blocks, as the scheduler does."""
    keys = keys_of(tokens, bm.block_size)
    prefix = bm.cached_prefix(keys, len(tokens))
    if prefix:
        assert bm.allocate_with_prefix(seq_id, prefix, len(tokens)) == []
    else:
        assert bm.allocate_slots(seq_id, len(tokens)) == []
    bm.cache_blocks(seq_id, keys)
    bm.check_invariants()
    return prefix


# -- keys -------------------------------------------------------------------------------------------


def test_a_key_names_the_whole_prefix_and_unknown_tokens_stop_keying(rng):
    tokens = [rng.randrange(50_000) for _ in range(10)]
    keys = keys_of(tokens)
    assert len(keys) == 2  # full blocks only
    assert keys[0] == block_key(ROOT_KEY, tokens[:4]) and keys[1] == block_key(keys[0], tokens[4:8])
    # The same block after another prefix has another key.
    assert keys_of([tokens[0] + 1] + tokens[1:])[1] != keys[1]
    # A token still on the device (negative) stops keying at its block; it goes on once the token is known.
    partial = tokens[:5] + [-1] + tokens[6:]
    keys_partial = []
    extend_block_keys(keys_partial, lambda a, b: partial[a:b], 10, 4)
    assert keys_partial == keys[:1]
    partial[5] = tokens[5]
    extend_block_keys(keys_partial, lambda a, b: partial[a:b], 10, 4)
    assert keys_partial == keys


# -- the block manager --------------------------------------------------------------------------------


def test_finished_sequences_leave_their_full_blocks_cached_and_counted_as_free(rng):
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    tokens = [rng.randrange(50_000) for _ in range(10)]
    run_sequence(bm, "a", tokens)
    table = bm.block_table("a")
    bm.free("a")
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_usable_blocks and bm.num_used_blocks == 0
    assert len(bm.prefix_cache) == 2 and bm.prefix_cache.num_evictable == 2
    # The same tokens again: the two full blocks are found; a prompt of exactly 8 tokens gets one (its last
    # token must be computed, and it lies in the second block).
    keys = keys_of(tokens)
    assert bm.cached_prefix(keys, 10) == table[:2]
    assert bm.cached_prefix(keys, 9) == table[:2]
    assert bm.cached_prefix(keys, 8) == table[:1]
    # Another sequence sharing the first block only.
    assert bm.cached_prefix(keys_of(tokens[:4] + [tokens[4] + 1] + tokens[5:]), 10) == table[:1]
    prefix = run_sequence(bm, "b", tokens + [7, 8])
    assert prefix == table[:2] and bm.block_table("b")[:2] == table[:2]
    assert bm.prefix_cache.num_evictable == 0 and bm.num_used_blocks == 3


def test_never_cached_blocks_go_first_then_the_block_freed_longest_ago_is_evicted(rng):
    bm = BlockManager(7, 4, enable_prefix_caching=True)  # 6 usable blocks
    first = [rng.randrange(50_000) for _ in range(8)]
    second = [rng.randrange(50_000) for _ in range(8)]
    run_sequence(bm, "first", first)
    run_sequence(bm, "second", second)
    first_blocks, second_blocks = bm.block_table("first"), bm.block_table("second")
    bm.free("first")
    bm.free("second")
    assert bm.num_free_blocks == 6
    bm.allocate_slots("x", 8)  # the 2 never-cached blocks
    assert set(bm.block_table("x")).isdisjoint(first_blocks + second_blocks)
    assert len(bm.prefix_cache) == 4
    bm.allocate_slots("x", 12)  # evicts: "first" was freed first, and a sequence's last block goes first
    assert bm.block_table("x")[2] == first_blocks[1]
    assert bm.cached_prefix(keys_of(first), 8) == first_blocks[:1]
    bm.allocate_slots("x", 16)
    assert bm.cached_prefix(keys_of(first), 8) == []
    assert bm.cached_prefix(keys_of(second), 9) == second_blocks
    bm.check_invariants()


def test_holding_an_evictable_prefix_takes_a_free_block_and_a_short_pool_refuses_whole(rng):
    bm = BlockManager(5, 4, enable_prefix_caching=True)  # 4 usable blocks
    tokens = [rng.randrange(50_000) for _ in range(8)]
    run_sequence(bm, "a", tokens)
    bm.free("a")
    bm.allocate_slots("other", 8)  # 2 never-cached blocks; the 2 cached ones are all that is free
    prefix = bm.cached_prefix(keys_of(tokens), 9)
    assert len(prefix) == 2 and bm.num_free_blocks == 2
    # 8 cached + 5 new tokens need the 2 cached blocks and 2 more: refused, nothing changed.
    assert bm.allocate_with_prefix("b", prefix, 13) is None
    assert "b" not in bm and bm.prefix_cache.num_evictable == 2
    assert bm.allocate_with_prefix("b", prefix, 9) is None  # 2 cached + 1 new: 3 blocks, 2 free
    bm.free("other")
    assert bm.allocate_with_prefix("b", prefix, 13) == []
    assert bm.block_table("b")[:2] == prefix and bm.num_free_blocks == 0
    with pytest.raises(ValueError, match="at least one must be computed"):
        bm.allocate_with_prefix("c", prefix, 8)
    bm.check_invariants()


def test_a_shared_block_keeps_its_first_key_and_reset_forgets_every_prefix(rng):
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    tokens = [rng.randrange(50_000) for _ in range(9)]
    run_sequence(bm, "a", tokens)
    bm.fork("a", "child")
    bm.cache_blocks("child", keys_of(tokens))  # the same keys, the same blocks: nothing new
    assert len(bm.prefix_cache) == 2
    run_sequence(bm, "twin", tokens)  # computed the same prefix in parallel: finds the cached blocks
    assert bm.block_table("twin")[:2] == bm.block_table("a")[:2]
    for seq in ("a", "child", "twin"):
        bm.free(seq)
    bm.check_invariants()
    assert bm.reset_prefix_cache() == 2 and len(bm.prefix_cache) == 0
    assert bm.num_free_blocks == bm.num_usable_blocks
    bm.check_invariants()
    assert BlockManager(4, 4).reset_prefix_cache() == 0


# -- the scheduler --------------------------------------------------------------------------------------


def test_a_request_starts_after_its_cached_prefix_and_counts_the_hit(rng):
    engine = make(block_size=4, max_num_batched_tokens=16, enable_prefix_caching=True, rng=rng)
    prompt = [rng.randrange(1, 50_000) for _ in range(22)]
    first = engine.add("first", prompt=prompt, max_tokens=2)
    engine.run_to_completion()
    assert first.num_cached_tokens == 0
    again = engine.add("again", prompt=prompt + [5], max_tokens=2)  # 23 tokens: 20 cached (5 blocks)
    out = engine.step()
    assert [(s.start, s.num_tokens) for s in out.scheduled] == [(20, 3)]
    assert again.num_cached_tokens == 20
    same = engine.add("same", prompt=prompt, max_tokens=2)  # 22 tokens, all cached: the last one is computed
    out = engine.step()
    assert [(s.request_id, s.start, s.num_tokens) for s in out.scheduled] == [("again", 23, 1), ("same", 20, 2)]
    assert same.num_cached_tokens == 20
    engine.run_to_completion()
    s = engine.scheduler
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (22 + 23 + 22, 40)


@pytest.mark.parametrize("num_scheduler_steps", [1, 4])
def test_shared_prefixes_under_preemption_forks_and_eviction_keep_every_sequence_kv_right(rng, num_scheduler_steps):
    # FakeEngine checks each running sequence's KV against its tokens after every step, and the pool's invariants.
    engine = make(num_blocks=13, block_size=4, max_num_batched_tokens=12, max_num_seqs=4, max_model_len=48,
                  rng=rng, num_scheduler_steps=num_scheduler_steps, enable_prefix_caching=True)
    prefixes = [[rng.randrange(1, 50_000) for _ in range(rng.randrange(3, 20))] for _ in range(3)]
    s = engine.scheduler
    for i in range(200):  # 40 requests, and more until something was preempted (1 seed in ~15 had not by 40)
        if i >= 40 and s.num_preemptions > 0 and s.prefix_cache_hits > 0:
            break
        prompt = rng.choice(prefixes) + [rng.randrange(1, 50_000) for _ in range(rng.randrange(0, 12))]
        request = engine.add(f"r{i}", prompt=prompt[:40], max_tokens=rng.randrange(1, 8))
        for _ in range(rng.randrange(4)):
            engine.step()
            running = engine.with_status(RequestStatus.RUNNING)
            if running and rng.random() < 0.2:
                parent = rng.choice(running)
                if parent.output_token_ids and parent.num_uncomputed_tokens == 1:
                    engine.fork(parent, f"{parent.request_id}.{engine.scheduler.num_steps}")
        assert request.num_tokens <= 48
    engine.run_to_completion()
    assert s.num_preemptions > 0 and s.prefix_cache_hits > 0
    assert all(r.status is RequestStatus.FINISHED_STOPPED for r in engine.requests.values())


def test_without_prefix_caching_nothing_is_cached(rng):
    engine = make(enable_prefix_caching=False, rng=rng)
    prompt = [rng.randrange(1, 50_000) for _ in range(12)]
    engine.add("a", prompt=prompt, max_tokens=1)
    engine.run_to_completion()
    again = engine.add("b", prompt=prompt, max_tokens=1)
    assert engine.step().scheduled[0].start == 0 and again.num_cached_tokens == 0
    assert engine.scheduler.prefix_cache_queries == 0


# -- the engine ---------------------------------------------------------------------------------------------

SYSTEM = ("You are a careful assistant. Answer in one short sentence, name your sources when you can, and say so "
          "plainly when you do not know. ")
QUESTIONS = ["What is the capital of France?", "Why is the sky blue?", "How many legs has a spider?"]


@pytest.mark.parametrize("num_scheduler_steps", [1, 4])
def test_cached_prefixes_leave_outputs_and_logprobs_as_computed_afresh(num_scheduler_steps):
    llm = LLM(max_model_len=256, max_num_batched_tokens=32, max_num_seqs=8, seed=0,
              num_scheduler_steps=num_scheduler_steps)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
        prompts = [SYSTEM + q for q in QUESTIONS]
        afresh = []
        for prompt in prompts:  # each alone, with nothing cached
            llm.reset_prefix_cache()
            afresh.append(llm.generate(prompt, params, use_tqdm=False)[0])
        assert all(o.num_cached_tokens == 0 for o in afresh)
        llm.reset_prefix_cache()
        warm = llm.generate(prompts, params, use_tqdm=False)  # the first computes the system prompt's blocks
        warm += llm.generate(prompts, params, use_tqdm=False)  # every prompt hits
        seeded = SamplingParams(temperature=0.8, seed=3, max_tokens=6, n=2)
        llm.reset_prefix_cache()
        cold_samples = llm.generate(prompts[0], seeded, use_tqdm=False)[0]
        warm_samples = llm.generate(prompts[0], seeded, use_tqdm=False)[0]
        stats = llm.stats()
    finally:
        llm.shutdown()
    for fresh, output in zip(afresh * 2, warm):
        assert output.outputs[0].token_ids == fresh.outputs[0].token_ids
        np.testing.assert_allclose([next(iter(e.values())).logprob for e in output.outputs[0].logprobs],
                                   [next(iter(e.values())).logprob for e in fresh.outputs[0].logprobs], atol=1e-4)
    num_prompt_tokens = len(afresh[0].prompt_token_ids)
    assert all(o.num_cached_tokens >= 16 for o in warm[3:])
    assert all(o.num_cached_tokens < num_prompt_tokens for o in warm)
    assert warm_samples.num_cached_tokens > 0
    assert [c.token_ids for c in warm_samples.outputs] == [c.token_ids for c in cold_samples.outputs]
    assert stats["prefix_cache_hits"] >= sum(o.num_cached_tokens for o in warm)
    assert stats["prefix_cache_queries"] > stats["prefix_cache_hits"]


def test_a_finished_reply_leaves_every_full_block_cached_under_asynchronous_scheduling():
    """The next chat turn (prompt + reply + more) finds the reply's last full block: with asynchronous scheduling (the
    default) it filled while its last token was still on the device, and was offered to the cache only when the
    request finished (from a scheduler probe: 64 of 80 tokens hit before)."""
    llm = LLM(max_model_len=256, max_num_seqs=4, seed=0)
    try:
        assert llm.llm_engine.async_scheduling
        prompt = [(t * 37 + 11) % 30000 + 100 for t in range(70)]  # 4 full blocks and 6 tokens
        reply = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].token_ids  # block 4 (tokens 64-79) fills in the decode
        turn = llm.generate([prompt + list(reply) + [42]], SamplingParams(temperature=0, max_tokens=1),
                            use_tqdm=False)[0]
    finally:
        llm.shutdown()
    assert turn.num_cached_tokens == 80
