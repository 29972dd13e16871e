"""The engine process's output deltas: what the parent rebuilds from the pipe equals the cumulative outputs, every
step (the engine's own ``RequestOutputKind.DELTA`` against ``CUMULATIVE`` is in tests/test_llm.py)."""

from __future__ import annotations

import copy
import pickle

import numpy as np

from engine.output_deltas import DeltaDecoder, encode
from engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput


def cumulative_and_delta_outputs(rng, steps: int, n: int, with_logprobs: bool):
    """``(cumulative, delta)`` output pairs as the engine would emit them: n completions growing by zero or more
    tokens, characters and logprobs entries a step, the last one finished."""
    tokens, texts, logprobs = [[] for _ in range(n)], [""] * n, [[] for _ in range(n)]
    for step in range(steps):
        last = step == steps - 1
        cumulative, delta = [], []
        for i in range(n):
            new_tokens = rng.integers(0, 1000, int(rng.integers(0, 3))).tolist()
            new_text = "".join(rng.choice(list("ab c\u00e9"), size=int(rng.integers(0, 4))))
            new_logprobs = [{t: Logprob(-float(rng.random()), 1, str(t))} for t in new_tokens]
            tokens[i], texts[i], logprobs[i] = tokens[i] + new_tokens, texts[i] + new_text, logprobs[i] + new_logprobs
            common = dict(index=i, cumulative_logprob=-float(step) if with_logprobs else None,
                          finish_reason="stop" if last else None, stop_reason="x" if last else None)
            cumulative.append(CompletionOutput(text=texts[i], token_ids=tokens[i],
                                               logprobs=logprobs[i] if with_logprobs else None, **common))
            delta.append(CompletionOutput(text=new_text, token_ids=new_tokens,
                                          logprobs=new_logprobs if with_logprobs else None, **common))
        first = step == 0
        # The queue and first-token times are final from the first output on; the last has the finish times (the
        # parent's outputs between keep the first's)
        metrics = (RequestMetrics(10.0, 10.25, 10.5, 12.0, 12.1) if last
                   else RequestMetrics(arrival_time=10.0, first_scheduled_time=10.25, first_token_time=10.5,
                                       last_token_time=10.5))
        yield (RequestOutput(request_id="r", prompt="a prompt", prompt_token_ids=[1, 2, 3], outputs=cumulative,
                             finished=last, num_cached_tokens=2, metrics=metrics),
               RequestOutput(request_id="r", prompt="a prompt" if first else None,
                             prompt_token_ids=[1, 2, 3] if first else None, outputs=delta, finished=last,
                             num_cached_tokens=2, metrics=metrics))


def test_decoded_outputs_equal_the_cumulative_ones_and_stay_as_delivered():
    rng = np.random.default_rng()
    for n, with_logprobs in ((1, False), (3, True)):
        decoder, delivered, expected = DeltaDecoder(), [], []
        for cumulative, delta in cumulative_and_delta_outputs(rng, steps=20, n=n, with_logprobs=with_logprobs):
            expected.append(copy.deepcopy(cumulative))
            delivered.append(decoder.decode("r", pickle.loads(pickle.dumps(encode(delta)))))  # as the pipe carries it
            assert delivered[-1] == expected[-1]
        assert delivered == expected  # earlier outputs did not change as later ones were rebuilt
        assert delivered[-1].prompt == "a prompt" and delivered[-1].prompt_token_ids == [1, 2, 3]


def test_only_the_first_delta_carries_the_prompt_and_the_last_the_finish_times():
    deltas = [encode(d) for _, d in cumulative_and_delta_outputs(np.random.default_rng(0), steps=4, n=1,
                                                                 with_logprobs=False)]
    metrics = RequestMetrics(arrival_time=10.0, first_scheduled_time=10.25, first_token_time=10.5,
                             last_token_time=10.5)
    assert deltas[0][1] == ("a prompt", [1, 2, 3], 2, None, None, metrics) and all(d[1] is None for d in deltas[1:])
    assert [d[3] for d in deltas] == [None] * 3 + [RequestMetrics(10.0, 10.25, 10.5, 12.0, 12.1)]
    assert metrics.time_in_queue == 0.25 and RequestMetrics(10.0).time_in_queue is None
