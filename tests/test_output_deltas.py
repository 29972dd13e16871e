"""The engine process's output deltas: what the parent rebuilds equals what the engine emitted, every step."""

from __future__ import annotations

import copy
import pickle

import numpy as np

from engine.output_deltas import DeltaDecoder, DeltaEncoder
from engine.outputs import CompletionOutput, Logprob, RequestOutput


def emitted_outputs(rng, steps: int, n: int, with_logprobs: bool):
    """Cumulative outputs as the engine emits them: n completions growing a token (and some text) a step, their
    first character and token revised once midway (the encoder must not rely on pure growth), the last output
    finished with the first completion's text cut at a stop string."""
    tokens = [[] for _ in range(n)]
    texts = [""] * n
    logprobs = [[] for _ in range(n)]
    for step in range(steps):
        last = step == steps - 1
        completions = []
        for i in range(n):
            token = int(rng.integers(0, 1000))
            tokens[i].append(token)
            texts[i] += "".join(rng.choice(list("ab c\u00e9"), size=int(rng.integers(0, 4))))
            logprobs[i].append({token: Logprob(-float(rng.random()), 1, str(token))})
            if last and i == 0:
                texts[i] = texts[i][: len(texts[i]) // 2]  # a stop string cut the text
            if step == steps // 2 and texts[i] and tokens[i]:  # an earlier character and token revised
                texts[i] = "X" + texts[i][1:]
                tokens[i][0] += 1
            completions.append(CompletionOutput(
                index=i, text=texts[i], token_ids=list(tokens[i]),
                cumulative_logprob=-float(step) if with_logprobs else None,
                logprobs=logprobs[i] if with_logprobs else None,  # the engine's live list, as _emit passes it
                finish_reason="stop" if last else None, stop_reason="x" if last else None))
        yield RequestOutput(request_id="r", prompt="a prompt", prompt_token_ids=[1, 2, 3], outputs=completions,
                            finished=last)


def test_decoded_outputs_equal_the_emitted_ones_and_stay_as_delivered():
    rng = np.random.default_rng()
    for n, with_logprobs in ((1, False), (3, True)):
        encoder, decoder, delivered, expected = DeltaEncoder(), DeltaDecoder(), [], []
        for output in emitted_outputs(rng, steps=20, n=n, with_logprobs=with_logprobs):
            expected.append(copy.deepcopy(output))
            delta = pickle.loads(pickle.dumps(encoder.encode(output)))  # as the pipe carries it
            delivered.append(decoder.decode("r", delta))
            assert delivered[-1] == expected[-1]
        assert delivered == expected  # earlier outputs did not change as later ones were rebuilt
        assert expected[0].prompt == "a prompt" and delivered[-1].prompt_token_ids == [1, 2, 3]


def test_a_delta_carries_the_prompt_once_and_only_the_new_tokens():
    rng = np.random.default_rng(0)
    encoder = DeltaEncoder()
    deltas = [encoder.encode(o) for o in emitted_outputs(rng, steps=5, n=1, with_logprobs=False)]
    assert deltas[0][1] == ("a prompt", [1, 2, 3]) and all(d[1] is None for d in deltas[1:])
    # one new token a step; all three at step 2, whose first token was revised
    assert [(d[2][0][1], len(d[2][0][2])) for d in deltas] == [(0, 1), (1, 1), (0, 3), (3, 1), (4, 1)]
