"""The on-device sampler and its host-side metadata builder, against numpy references."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine.sampler import apply_penalties, build_sampling_metadata, sample
from engine.sampling_params import SamplingParams

sample_jit = jax.jit(sample, static_argnames="num_logprobs")


@pytest.fixture
def rng():
    return np.random.default_rng()


def _metadata(params, *, outputs=None, prompts=None, seeds=None, steps=None, num_padded=None, eos=(),
              bad_words=None, vocab_size=None):
    n = len(params)
    return build_sampling_metadata(
        params,
        outputs if outputs is not None else [[] for _ in range(n)],
        prompts if prompts is not None else [[] for _ in range(n)],
        seeds if seeds is not None else list(range(n)),
        steps if steps is not None else [0] * n,
        num_padded if num_padded is not None else n,
        eos_token_ids=eos,
        bad_words_token_ids=bad_words,
        vocab_size=vocab_size,
    )


def _logits(rng, rows, vocab, scale=3.0):
    return (rng.standard_normal((rows, vocab)) * scale).astype(np.float32)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _draw_many(row_logits, params, num_draws):
    """``num_draws`` independent samples of one distribution: one row per seed."""
    logits = np.repeat(row_logits[None], num_draws, axis=0)
    metadata = _metadata([params] * num_draws, seeds=list(range(1000, 1000 + num_draws)), vocab_size=len(row_logits))
    return np.asarray(sample_jit(logits, metadata).token_ids)


# -- greedy ---------------------------------------------------------------


def test_greedy_is_argmax(rng):
    logits = _logits(rng, 8, 64)
    out = sample_jit(logits, _metadata([SamplingParams(temperature=0.0)] * 8))
    np.testing.assert_array_equal(np.asarray(out.token_ids), logits.argmax(-1))


def test_greedy_rows_in_a_mixed_batch_are_argmax(rng):
    logits = _logits(rng, 8, 64, scale=0.1)  # flat: random rows would rarely hit the argmax
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.5, top_p=0.9) for i in range(8)]
    out = np.asarray(sample_jit(logits, _metadata(params)).token_ids)
    np.testing.assert_array_equal(out[1::2], logits.argmax(-1)[1::2])
    assert (out[0::2] != logits.argmax(-1)[0::2]).any()


def test_top_k_one_is_argmax(rng):
    logits = _logits(rng, 8, 64, scale=0.1)
    out = sample_jit(logits, _metadata([SamplingParams(temperature=2.0, top_k=1)] * 8))
    np.testing.assert_array_equal(np.asarray(out.token_ids), logits.argmax(-1))


# -- distribution and truncation ------------------------------------------


def test_temperature_sampling_matches_softmax(rng):
    vocab, draws, temperature = 6, 8192, 0.7
    row = _logits(rng, 1, vocab, scale=1.0)[0]
    tokens = _draw_many(row, SamplingParams(temperature=temperature), draws)
    freq = np.bincount(tokens, minlength=vocab) / draws
    expected = _softmax(row / temperature)
    tolerance = 5 * np.sqrt(expected * (1 - expected) / draws) + 1e-3
    assert np.all(np.abs(freq - expected) < tolerance), (freq, expected)


def _allowed_top_k_top_p(row, top_k, top_p):
    """numpy reference: indices kept by top_k then top_p (on the renormalised top_k set)."""
    order = np.argsort(-row)
    kept = order[: top_k or len(row)]
    probs = _softmax(row[kept])
    mass_before = np.cumsum(probs) - probs
    return set(kept[mass_before < top_p].tolist())


@pytest.mark.parametrize(
    "top_k, top_p, min_p",
    [(5, 1.0, 0.0), (0, 0.6, 0.0), (8, 0.7, 0.0), (0, 1.0, 0.3), (10, 0.9, 0.1)],
)
def test_truncation_never_picks_excluded_tokens(rng, top_k, top_p, min_p):
    vocab, temperature = 32, 1.3
    row = _logits(rng, 1, vocab, scale=1.0)[0]
    scaled = row / temperature
    probs = _softmax(scaled)
    allowed = set(np.flatnonzero(probs >= min_p * probs.max()).tolist())
    masked = np.where(np.isin(np.arange(vocab), list(allowed)), scaled, -np.inf)
    allowed &= _allowed_top_k_top_p(masked, top_k, top_p)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    drawn = set(_draw_many(row, params, 1024).tolist())
    assert drawn <= allowed, (sorted(drawn - allowed), sorted(allowed))
    assert len(drawn) >= min(len(allowed), 3)  # the kept set is really sampled from


# -- penalties ------------------------------------------------------------


def _numpy_penalties(logits, prompts, outputs, presence, frequency, repetition):
    """vLLM's apply_penalties, written out."""
    logits = logits.copy()
    for i in range(logits.shape[0]):
        counts = np.bincount(np.asarray(outputs[i], np.int64), minlength=logits.shape[1])
        seen = counts > 0
        seen[np.asarray(prompts[i], np.int64)] = True
        row = logits[i]
        row[seen] = np.where(row[seen] > 0, row[seen] / repetition[i], row[seen] * repetition[i])
        row -= frequency[i] * counts + presence[i] * (counts > 0)
    return logits


def test_penalties_match_vllm_formula(rng):
    rows, vocab = 5, 40
    logits = _logits(rng, rows, vocab)
    prompts = [rng.integers(0, vocab, rng.integers(1, 20)).tolist() for _ in range(rows)]
    outputs = [rng.integers(0, vocab, rng.integers(0, 30)).tolist() for _ in range(rows)]
    presence = rng.uniform(-2, 2, rows)
    frequency = rng.uniform(-2, 2, rows)
    repetition = rng.uniform(0.5, 2.0, rows)
    params = [
        SamplingParams(presence_penalty=presence[i], frequency_penalty=frequency[i], repetition_penalty=repetition[i])
        for i in range(rows)
    ]
    metadata = _metadata(params, outputs=outputs, prompts=prompts, num_padded=8)
    padded_logits = np.concatenate([logits, _logits(rng, 3, vocab)])
    got = np.asarray(jax.jit(apply_penalties)(padded_logits, metadata))
    want = _numpy_penalties(logits, prompts, outputs, presence, frequency, repetition)
    np.testing.assert_allclose(got[:rows], want, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(got[rows:], padded_logits[rows:])  # padding rows untouched


def test_greedy_applies_penalties(rng):
    logits = _logits(rng, 1, 16)
    top = int(logits.argmax())
    params = SamplingParams(temperature=0.0, presence_penalty=2.0, frequency_penalty=2.0)
    out = sample_jit(logits, _metadata([params], outputs=[[top] * 10]))
    assert int(out.token_ids[0]) != top


# -- seeds ----------------------------------------------------------------


def test_seeded_row_is_independent_of_batch(rng):
    vocab = 64
    target_row = _logits(rng, 1, vocab, scale=0.5)[0]
    target = SamplingParams(temperature=1.0, seed=1234)
    others = [
        SamplingParams(temperature=0.8, top_p=0.5, min_p=0.1, repetition_penalty=1.3),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.2, top_k=3, presence_penalty=1.0),
        SamplingParams(temperature=0.5, min_tokens=5),
    ]

    def run(position, other_params, num_padded):
        params = list(other_params)
        params.insert(position, target)
        logits = _logits(rng, len(params), vocab)
        logits[position] = target_row
        outputs = [rng.integers(0, vocab, 5).tolist() for _ in params]
        outputs[position] = []
        metadata = _metadata(
            params,
            outputs=outputs,
            prompts=[rng.integers(0, vocab, 7).tolist() for _ in params],
            seeds=[p.seed if p.seed is not None else int(rng.integers(2**31)) for p in params],
            steps=[3] * len(params),
            num_padded=num_padded,
            eos=[0],
        )
        padded = np.concatenate([logits, _logits(rng, num_padded - len(params), vocab)])
        return int(sample_jit(padded, metadata).token_ids[position])

    alone = run(0, [], 1)
    assert run(0, others, 8) == alone
    assert run(3, others, 8) == alone
    assert run(2, others[:2], 4) == alone

    # ...and the seed and step really drive the draw.
    draws = set()
    for seed in range(8):
        metadata = _metadata([SamplingParams(seed=seed)], seeds=[seed], steps=[3])
        draws.add(int(sample_jit(target_row[None], metadata).token_ids[0]))
    assert len(draws) > 1


def test_seeds_take_64_bits_and_below_2_32_draw_as_jax_random_key():
    """A seed is taken modulo 2**64, as vLLM's torch generator takes it: seeds equal modulo 2**32 but not 2**64 draw
    apart; a seed below 2**32 draws with ``jax.random.key(seed)`` (the draws of seeded requests made before)."""
    row = np.zeros((1, 4096), np.float32)  # uniform: a draw is the key's, nothing else
    base = int(np.random.default_rng().integers(2**32))

    def draw(seed: int) -> int:
        return int(sample_jit(row, _metadata([SamplingParams(seed=seed)], seeds=[seed], steps=[5])).token_ids[0])

    expected = int(jax.random.categorical(jax.random.fold_in(jax.random.key(base), 5), jnp.asarray(row[0])))
    assert draw(base) == expected
    assert len({draw(base + k * 2**32) for k in range(4)}) > 1
    assert draw(base + 2**64) == draw(base)


# -- logprobs -------------------------------------------------------------


def test_logprobs_are_raw_log_softmax(rng):
    rows, vocab, k = 6, 50, 4
    logits = _logits(rng, rows, vocab)
    params = [SamplingParams(temperature=0.9, top_k=10, repetition_penalty=1.5, logprobs=k)] * rows
    metadata = _metadata(params, outputs=[rng.integers(0, vocab, 5).tolist() for _ in range(rows)])
    out = sample_jit(logits, metadata, num_logprobs=k)
    log_softmax = np.log(_softmax(logits.astype(np.float64)))
    tokens = np.asarray(out.token_ids)
    np.testing.assert_allclose(np.asarray(out.logprobs), log_softmax[np.arange(rows), tokens], atol=1e-5)
    expected_ranks = 1 + (log_softmax > log_softmax[np.arange(rows), tokens][:, None]).sum(-1)
    np.testing.assert_array_equal(np.asarray(out.ranks), expected_ranks)
    expected_top = np.argsort(-logits, axis=-1)[:, :k]
    np.testing.assert_array_equal(np.asarray(out.top_token_ids), expected_top)
    np.testing.assert_allclose(
        np.asarray(out.top_logprobs), np.take_along_axis(log_softmax, expected_top, -1), atol=1e-5
    )


def test_a_tied_tokens_rank_counts_the_tie_as_vllm_does():
    """vLLM's rank is the number of tokens at least as likely as the sampled one: either of two tied tokens ranks 2."""
    from engine.sampler import with_logprobs

    logits = jnp.array([[2.0, 2.0, 0.0, -1.0], [2.0, 2.0, 0.0, -1.0], [0.0, 3.0, 1.0, 1.0]])
    out = with_logprobs(jnp.array([0, 1, 3], jnp.int32), logits, 2)
    assert np.asarray(out.ranks).tolist() == [2, 2, 3]


def test_no_logprobs_unless_asked(rng):
    out = sample_jit(_logits(rng, 2, 16), _metadata([SamplingParams()] * 2))
    assert out.logprobs is None and out.top_token_ids is None
    out = sample_jit(_logits(rng, 2, 16), _metadata([SamplingParams(logprobs=0)] * 2), num_logprobs=0)
    assert out.logprobs.shape == (2,) and out.top_token_ids.shape == (2, 0)


# -- min_tokens bans and the builder --------------------------------------


def test_min_tokens_bans_eos_and_stop_tokens(rng):
    vocab, eos, stop_id = 32, 2, 9
    logits = _logits(rng, 2, vocab)
    logits[:, eos] = 50.0
    logits[:, stop_id] = 40.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[stop_id])
    out = sample_jit(logits, _metadata([params] * 2, outputs=[[5, 6], [5, 6, 7]], eos=[eos]))
    tokens = np.asarray(out.token_ids)
    assert tokens[0] not in (eos, stop_id)  # 2 outputs < min_tokens: banned
    assert tokens[1] == eos  # min_tokens reached: allowed


def test_logit_bias_allowed_tokens_and_bad_words_against_numpy(rng):
    """vLLM v1's order on a mixed batch: allowed ids, then bans (bad words' next tokens), then the bias, then
    penalties; rows without a setting are untouched, greedy and sampled rows alike, and logprobs stay raw."""
    vocab = 40
    logits = _logits(rng, 5, vocab)
    bias = {3: 25.0, 7: -30.0}
    params = [SamplingParams(temperature=0.0, logit_bias=bias),
              SamplingParams(temperature=0.0, allowed_token_ids=[4, 11, 12]),
              SamplingParams(temperature=0.0, allowed_token_ids=[5, 6], logit_bias={6: 100.0}),
              SamplingParams(temperature=0.0, logit_bias={9: 50.0}, bad_words=["x"]),
              SamplingParams(temperature=0.0)]
    outputs = [[], [], [], [1, 8], [2]]
    # Row 3's bad words as token ids: [9] always banned, [8, 10] banned after an 8, [5, 10] not (output ends in 8).
    bad_words = [[], [], [], [[9], [8, 10], [5, 13]], []]
    logits[3, 10] = logits[3, 13] = 60.0
    out = sample_jit(logits, _metadata(params, outputs=outputs, bad_words=bad_words, vocab_size=vocab), num_logprobs=0)
    want = logits.copy()
    for token, value in bias.items():
        want[0, token] += value
    keep = np.full(vocab, -np.inf)
    keep[[4, 11, 12]] = 0.0
    want[1] += keep
    want[2, [5, 6]] += [0.0, 100.0]
    want[2, [t for t in range(vocab) if t not in (5, 6)]] = -np.inf
    want[3, [9, 10]] = -np.inf  # the bias on 9 does not lift its ban
    assert np.asarray(out.token_ids).tolist() == np.argmax(want, axis=-1).tolist()
    assert np.asarray(out.token_ids)[3] == 13
    raw = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    picked = np.asarray(out.token_ids)
    np.testing.assert_allclose(np.asarray(out.logprobs), raw[np.arange(5), picked], rtol=1e-5, atol=1e-5)

    # Sampled rows draw only allowed tokens, and a large bias dominates the draw.
    draws = _draw_many(logits[4], SamplingParams(temperature=1.0, allowed_token_ids=[2, 30]), 64)
    assert set(draws.tolist()) <= {2, 30}
    draws = _draw_many(logits[4], SamplingParams(temperature=1.0, logit_bias={17: 80.0}), 32)
    assert set(draws.tolist()) == {17}


def test_token_bitmasks_keep_only_their_tokens_and_feed_the_raw_logprobs(rng):
    """Structured outputs' rows (bit t % 32 of word t // 32 = token t allowed) draw only allowed tokens, greedy
    and sampled; rows without a bitmask are untouched; the logprobs are of the masked logits, as vLLM's (which
    masks before its sampler)."""
    vocab, rows = 70, 6
    logits = _logits(rng, rows, vocab)
    allowed = {1: [3, 40, 69], 2: [0], 4: list(range(33, 64))}
    masks = [None] * rows
    for row, tokens in allowed.items():
        bits = np.zeros(96, np.uint8)
        bits[tokens] = 1
        masks[row] = np.packbits(bits, bitorder="little").view(np.int32)
    params = [SamplingParams(temperature=0.0)] * 3 + [SamplingParams(temperature=1.0, seed=s) for s in range(3)]
    md = build_sampling_metadata(params, [[]] * rows, [[]] * rows, list(range(rows)), [0] * rows, rows,
                                 token_bitmasks=masks)
    assert md.needs_token_bitmask and md.bitmask_rows.shape == (8,) and md.token_bitmask.shape == (8, 3)
    out = sample_jit(logits, md, num_logprobs=0)
    tokens = np.asarray(out.token_ids)
    assert tokens[0] == np.argmax(logits[0]) and tokens[2] == 0
    assert tokens[1] == max(allowed[1], key=lambda t: logits[1, t]) and tokens[4] in allowed[4]
    masked = np.full(vocab, -np.inf)
    masked[allowed[1]] = logits[1, allowed[1]]
    want = masked[tokens[1]] - np.log(np.exp(masked - masked.max()).sum()) - masked.max()
    assert float(out.logprobs[1]) == pytest.approx(want, abs=1e-5)
    assert build_sampling_metadata(params, [[]] * rows, [[]] * rows, [0] * rows, [0] * rows, rows,
                                   token_bitmasks=[None] * rows).token_bitmask.shape == (0, 0)


def test_bad_words_ban_the_next_token_only_after_their_prefix():
    md = _metadata([SamplingParams(), SamplingParams()], outputs=[[4, 5], [5]],
                   bad_words=[[[5, 6], [4, 5, 7], [9]], [[4, 5, 7], [1, 2, 3, 4]]])
    assert md.needs_token_bans
    assert [sorted(r[r >= 0].tolist()) for r in md.banned_token_ids] == [[6, 7, 9], []]
    # No bad words, no bans: the matrix stays empty.
    assert _metadata([SamplingParams()], bad_words=[[]]).banned_token_ids.shape == (1, 0)


def test_builder_pads_flags_and_buckets():
    params = [SamplingParams(temperature=0.0), SamplingParams(top_p=0.9, repetition_penalty=1.2, seed=7)]
    md = build_sampling_metadata(params, [[1, 2], list(range(20))], [[3], [4, 5]], [11, 2**33 + 5], [2, 20], 4)
    assert md.temperature.tolist() == [0.0, 1.0, 0.0, 0.0]  # padding rows greedy
    assert md.top_p.tolist() == pytest.approx([1.0, 0.9, 1.0, 1.0])
    assert md.repetition_penalty.tolist() == pytest.approx([1.0, 1.2, 1.0, 1.0])
    assert md.seeds.tolist() == [[0, 11], [2, 5], [0, 0], [0, 0]] and md.step_indices.tolist() == [2, 20, 0, 0]
    assert (md.all_greedy, md.needs_penalties, md.needs_top_k_top_p, md.needs_min_p) == (False, True, True, False)
    assert not md.needs_token_bans and md.banned_token_ids.shape == (4, 0)
    assert not (md.needs_logit_bias or md.needs_token_bitmask or md.needs_allowed_tokens)
    # A long allowed list is one bitmask row (V / 32 words), not a [S, len] matrix; it needs the vocabulary size.
    many = _metadata([SamplingParams(allowed_token_ids=list(range(5000))), SamplingParams()], vocab_size=8000)
    assert many.allowed_rows.tolist() == [0] + [-1] * 7 and many.allowed_bitmask.shape == (8, 250)
    with pytest.raises(ValueError, match="vocab_size"):
        _metadata([SamplingParams(allowed_token_ids=[1])])
    assert md.logit_bias_token_ids.shape == md.logit_bias_values.shape == (4, 0) and md.token_bitmask.shape == (0, 0)
    # Only the penalised row's tokens are sent, padded to a power of two.
    assert md.output_token_ids.shape == (4, 32) and md.prompt_token_ids.shape == (4, 16)
    assert md.output_token_ids[0].tolist() == [-1] * 32
    assert md.output_token_ids[1, :21].tolist() == list(range(20)) + [-1]


def test_builder_rejects_inconsistent_inputs():
    with pytest.raises(ValueError, match="seeds has 1 entries, expected 2"):
        build_sampling_metadata([SamplingParams()] * 2, [[], []], [[], []], [0], [0, 0], 2)
    with pytest.raises(ValueError, match="num_padded_seqs must be >= the number of sequences \\(2\\), got 1"):
        build_sampling_metadata([SamplingParams()] * 2, [[], []], [[], []], [0, 0], [0, 0], 1)


def test_penalty_free_batch_sends_no_tokens():
    md = build_sampling_metadata([SamplingParams()], [[1, 2, 3]], [[4, 5]], [0], [3], 2)
    assert not md.needs_penalties
    assert md.output_token_ids.shape == (2, 0) and md.prompt_token_ids.shape == (2, 0)


def test_sort_descending_orders_like_floats(rng):
    from engine.sampler import _sort_descending

    x = _logits(rng, 3, 257, scale=1e3)
    x[0, :6] = [-np.inf, np.inf, -0.0, 0.0, -3.4e38, 3.4e38]
    np.testing.assert_array_equal(np.asarray(_sort_descending(x)), -np.sort(-x, axis=-1))


def test_builder_rows_do_not_depend_on_the_batch_or_on_shared_params(rng):
    """The builder computes values once per distinct params object and builds the token matrices only
    when some row needs them: each row must still be what it is alone, shared object or equal copy."""
    kinds = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=5, seed=3),
             SamplingParams(temperature=0.7, min_p=0.1, presence_penalty=0.5),
             SamplingParams(temperature=0.0, repetition_penalty=1.3), SamplingParams(min_tokens=3, stop_token_ids=[9])]
    picks = rng.integers(0, len(kinds), 12)
    shared = [kinds[k] for k in picks]
    copies = [SamplingParams(**{f: getattr(kinds[k], f) for f in ("temperature", "top_k", "top_p", "min_p", "seed",
                                                                   "presence_penalty", "repetition_penalty",
                                                                   "min_tokens", "stop_token_ids")})
              for k in picks]
    outputs = [rng.integers(0, 50, rng.integers(0, 6)).tolist() for _ in picks]
    prompts = [rng.integers(0, 50, rng.integers(1, 30)).tolist() for _ in picks]
    seeds, steps = rng.integers(0, 2**40, len(picks)).tolist(), [len(o) for o in outputs]
    batch = build_sampling_metadata(shared, outputs, prompts, seeds, steps, 16, eos_token_ids=[2])
    same = build_sampling_metadata(copies, outputs, prompts, seeds, steps, 16, eos_token_ids=[2])
    for a, b in zip(jax.tree.leaves(batch), jax.tree.leaves(same)):
        np.testing.assert_array_equal(a, b)
    for i in range(len(picks)):
        alone = build_sampling_metadata([shared[i]], [outputs[i]], [prompts[i]], [seeds[i]], [steps[i]], 1,
                                        eos_token_ids=[2])
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty", "seeds", "step_indices"):
            np.testing.assert_array_equal(getattr(batch, name)[i], getattr(alone, name)[0], err_msg=name)
        for name in ("prompt_token_ids", "output_token_ids", "banned_token_ids"):
            row, alone_row = getattr(batch, name)[i], getattr(alone, name)[0]
            assert row[row >= 0].tolist() == alone_row[alone_row >= 0].tolist(), name


def test_sampling_metadata_packs_into_one_array_and_back():
    """The runner sends a step's sampling metadata as one int32 array (float32 and uint32 by their bits): the
    sampler's unpacked arrays equal the host's, dtypes, shapes, empty token lists and static flags included."""
    from engine.runner import pack_arrays, unpack_arrays

    params = [SamplingParams(temperature=0.7, top_p=0.9, top_k=5, presence_penalty=0.5, seed=3,
                             logit_bias={4: -1.5, 9: 2.25}),
              SamplingParams(temperature=0.0, repetition_penalty=1.2, allowed_token_ids=[1, 2, 3])]
    meta = build_sampling_metadata(params, [[5, 6], []], [[1, 2, 3], [4]], [2**31 + 7, 11], [2, 0], 8, vocab_size=40)
    flat, layout = pack_arrays(meta)
    assert flat.dtype == np.int32 and flat.ndim == 1
    back = jax.jit(unpack_arrays, static_argnums=1)(flat, layout)
    assert jax.tree.structure(back) == jax.tree.structure(meta)  # the static flags ride in the treedef
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(meta)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match="32-bit"):
        pack_arrays({"x": np.zeros(3, np.int8)})
