"""End-to-end behaviour of the engine through ``LLM`` on the embedded default model.

Continuous batching, chunked prefill and preemption must not change what a request
produces; seeded sampling must not depend on the batch; many threads share steps;
bad input is refused without disturbing other requests.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import pickle
import threading
import time

import jax
import numpy as np
import pytest

from engine import LLM, SamplingParams
from engine.compile_timer import CompileTimer

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4,",
    "The quick brown fox",
    "def fibonacci(n):",
    "Water boils at",
    "My favourite colour is",
    "In the beginning",
    "The largest planet in the solar system is",
    "Hello! My name is",
    "A haiku about autumn:\n",
    "The best way to learn a language is to practise speaking it every day with native speakers, and",
    "Q: What is two plus two?\nA:",
    "Roses are red,",
    "import numpy as np\n",
    "Paris",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    engine = LLM(max_model_len=256, max_num_batched_tokens=128, max_num_seqs=16, seed=0)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def alone(llm):
    """Greedy outputs of each prompt generated on its own."""
    return [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]


def test_batched_equals_alone(llm, alone):
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.prompt for o in outs] == PROMPTS
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert all(len(o.outputs[0].token_ids) == 12 for o in outs)


def test_default_model_answers_coherently(llm):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(question, SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason in ("stop", "length")
    assert out.prompt.endswith("What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")  # as vLLM
    assert llm.get_tokenizer().encode(out.prompt, add_special_tokens=False) == out.prompt_token_ids
    # OpenAI's text parts: a part a line, as vLLM joins them
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"},
                                          {"type": "text", "text": "One word."}]}]
    joined = [{"role": "user", "content": "What is the capital of France?\nOne word."}]
    same, expected = llm.chat([parts, joined], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    assert same.prompt_token_ids == expected.prompt_token_ids and same.outputs[0].text == expected.outputs[0].text
    with pytest.raises(ValueError, match="content parts must be text"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    started = question + [{"role": "assistant", "content": "The capital of France is"}]
    out = llm.chat(started, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False, add_generation_prompt=False,
                   continue_final_message=True)[0]
    assert "Paris" in out.outputs[0].text  # the reply goes on from the open message
    with pytest.raises(ValueError, match="add_generation_prompt"):
        llm.chat(started, continue_final_message=True)


def test_preemption_keeps_outputs(alone):
    # 12 blocks of 16 tokens (one is the sink): far too few for 16 sequences of ~30 tokens at once.
    # (admission_reserve_tokens=0: vLLM's admission, which fills the pool; the default's reserve preempts less)
    small = LLM(max_model_len=128, max_num_batched_tokens=64, max_num_seqs=16, num_gpu_blocks_override=12,
                admission_reserve_tokens=0)
    try:
        outs = small.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == alone
        stats = small.stats()
        assert stats["num_preemptions"] > 0
        assert small.llm_engine.block_manager.num_used_blocks == 0
    finally:
        small.shutdown()


def test_seeded_sampling_independent_of_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.7, max_tokens=10, ignore_eos=True)
    batch = llm.generate(PROMPTS[3:9] + [PROMPTS[0]], [others] * 6 + [params], use_tqdm=False)
    assert batch[-1].outputs[0].token_ids == alone


def test_request_metrics_times_come_in_order(llm):
    """vLLM's ``RequestOutput.metrics``: arrival, first scheduling, first and last token, finish, in that order
    (one monotonic clock)."""
    (out,) = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time < m.last_token_time <= m.finished_time
    assert m.time_in_queue == m.first_scheduled_time - m.arrival_time


def test_start_and_stop_profile_write_a_trace(llm, tmp_path, monkeypatch):
    """vLLM's ``start_profile`` / ``stop_profile``: JAX's trace of the steps in between, in the folder given or
    ``$VLLM_TORCH_PROFILER_DIR``; without either a ValueError."""
    monkeypatch.delenv("VLLM_TORCH_PROFILER_DIR", raising=False)
    with pytest.raises(ValueError, match="VLLM_TORCH_PROFILER_DIR"):
        llm.start_profile()
    monkeypatch.setenv("VLLM_TORCH_PROFILER_DIR", str(tmp_path))
    llm.start_profile()
    llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
    llm.stop_profile()
    assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))


def test_collective_rpc_calls_the_worker_between_steps(llm):
    """vLLM's ``collective_rpc``: a function of the worker (the engine's ``ModelRunner``) or a method's name, with
    args and kwargs; one result a worker (one here); a name the worker lacks is an AttributeError; a call that waits
    past its ``timeout`` is a TimeoutError; ``get_metrics`` with stats off (the default offline) a ValueError."""
    import jax

    def vocab_rows(worker, times, plus=0):
        return worker.config.vocab_size * times + plus

    assert llm.collective_rpc(vocab_rows, args=(2,), kwargs={"plus": 1}) == [2 * llm.llm_engine.model_config.vocab_size
                                                                           + 1]
    leaves = llm.collective_rpc(lambda worker: len(jax.tree.leaves(worker.params)), timeout=60)
    assert len(leaves) == 1 and leaves[0] > 0
    assert llm.collective_rpc("activation_bytes") == [llm.llm_engine.runner.activation_bytes()]
    with pytest.raises(AttributeError, match="no method 'no_such_method'"):
        llm.collective_rpc("no_such_method")
    with pytest.raises(TimeoutError, match="longer than 0.05 s"):
        llm.collective_rpc(lambda worker: time.sleep(0.5), timeout=0.05)
    time.sleep(0.5)  # the slow call ends before the next test steps
    with pytest.raises(ValueError, match="disable_log_stats=False"):
        llm.get_metrics()


def test_concurrent_threads_share_steps(llm, alone):
    results: dict[int, list[int]] = {}
    errors = []
    before = llm.stats()["steps"]
    llm.llm_engine.stats["max_batch_seqs"] = 0

    def worker(i: int) -> None:
        try:
            results[i] = llm.generate(PROMPTS[i], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [results[i] for i in range(10)] == alone[:10]
    stats = llm.stats()
    assert stats["max_batch_seqs"] > 1
    assert stats["steps"] - before < 10 * 12  # fewer steps than running them one by one


def test_parallel_sampling_n(llm):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True)
    out = llm.generate(PROMPTS[1], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = llm.generate(PROMPTS[1], params, use_tqdm=False)[0]  # seeded: reproducible
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert llm.llm_engine.block_manager.num_used_blocks == 0


def test_n_samples_of_one_token_and_at_the_context_limit(llm):
    """``n > 1`` where the first sample finishes at its first token: by max_tokens (the others are forked before its
    stop checks free its blocks), or by reaching max_model_len (the others compute the prompt again). Each sample's
    one token is the first token of the same seeded request with more tokens."""
    longer = llm.generate(PROMPTS[1], SamplingParams(n=3, temperature=1.0, max_tokens=4, seed=7), use_tqdm=False)[0]
    one = llm.generate(PROMPTS[1], SamplingParams(n=3, temperature=1.0, max_tokens=1, seed=7), use_tqdm=False)[0]
    assert [c.token_ids for c in one.outputs] == [c.token_ids[:1] for c in longer.outputs]
    assert all(c.finish_reason == "length" for c in one.outputs)
    full = list(range(1, 256))  # max_model_len 256: one token left
    at_limit = llm.generate({"prompt_token_ids": full}, SamplingParams(n=2, temperature=1.0, seed=5), use_tqdm=False)[0]
    assert [len(c.token_ids) for c in at_limit.outputs] == [1, 1]
    assert all(c.finish_reason == "length" for c in at_limit.outputs)
    assert llm.llm_engine.block_manager.num_used_blocks == 0


def test_n_samples_past_max_num_seqs_wait_their_turn(llm, monkeypatch):
    """``n`` above ``max_num_seqs`` (16 here): the samples forked beside the first fill the running set, the rest
    wait and compute the prompt again, so no more than ``max_num_seqs`` sequences run (hold blocks, count as
    running) at once, as in vLLM; all 40 ran before."""
    engine, running = llm.llm_engine, []
    step = engine.step

    def counted_step():
        outputs = step()
        running.append(engine.scheduler.num_running)
        return outputs

    monkeypatch.setattr(engine, "step", counted_step)
    params = SamplingParams(n=40, temperature=1.0, max_tokens=3, seed=11, ignore_eos=True)
    out = llm.generate(PROMPTS[1], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == list(range(40)) and all(len(c.token_ids) == 3 for c in out.outputs)
    assert max(running) == 16
    assert engine.block_manager.num_used_blocks == 0


def test_n_samples_of_a_one_token_prompt(llm):
    """``n > 1`` on a one-token prompt (nothing before its last token to share): the other samples compute the
    prompt themselves, beside a request of another caller, which is unaffected."""
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    other = llm.generate(PROMPTS[0], greedy, use_tqdm=False)[0].outputs[0].token_ids
    outs = llm.generate([{"prompt_token_ids": [5]}, PROMPTS[0]],
                        [SamplingParams(n=3, temperature=1.0, max_tokens=4, seed=3, ignore_eos=True),
                         greedy], use_tqdm=False)
    assert [len(c.token_ids) for c in outs[0].outputs] == [4, 4, 4]
    assert outs[1].outputs[0].token_ids == other
    assert llm.llm_engine.block_manager.num_used_blocks == 0


def test_every_buffer_a_small_step_touches_stays_where_it_is(llm, alone, monkeypatch):
    """A small step's inputs (staged into donated buffers), its logits and the sampled tokens it feeds the
    next step (both written over the previous step's, donated) keep their device addresses from step to step,
    so XLA can replay the step's CUDA graphs instead of re-recording them each step (benchmarks/NOTES.md, runs
    20a-b); outputs are those of each prompt alone."""
    import jax

    runner = llm.llm_engine.runner
    run_step = runner._run_step
    addresses = {}  # the step's shapes -> the addresses of its buffers, a tuple per step

    def spy(num_tokens, model_input, feed):
        sampled = runner._sampled.unsafe_buffer_pointer()
        logits = run_step(num_tokens, model_input, feed)
        leaves = jax.tree.leaves((model_input, feed))
        key = tuple(leaf.shape for leaf in leaves)
        addresses.setdefault(key, []).append(
            (sampled, logits.unsafe_buffer_pointer(), *(leaf.unsafe_buffer_pointer() for leaf in leaves)))
        return logits

    monkeypatch.setattr(runner, "_run_step", spy)
    outs = llm.generate(PROMPTS[:6], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == alone[:6]
    assert sum(len(steps) for steps in addresses.values()) >= GREEDY.max_tokens
    for steps in addresses.values():
        assert len(set(steps[1:])) <= 1  # a shape's first logits may land in a new buffer, then stay


def test_stop_strings_and_logprobs(llm, alone):
    text = llm.generate(PROMPTS[2], GREEDY, use_tqdm=False)[0].outputs[0].text
    stop = text.strip()[:3]
    out = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12, stop=[stop]), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop"
    assert stop not in out.outputs[0].text
    lp = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=4, logprobs=3), use_tqdm=False)[0]
    entries = lp.outputs[0].logprobs
    assert len(entries) == 4
    for token, entry in zip(lp.outputs[0].token_ids, entries):
        assert token in entry and entry[token].rank == 1  # greedy picks the top token
        assert len(entry) == 3
        assert all(v.logprob <= 0 for v in entry.values())


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_tokens": -1}, "max_tokens"), ({"temperature": -0.5}, "temperature"),
     ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p")],
)
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_rejected_others_unaffected(llm, alone):
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([1] * 300, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):  # a bad prompt in a list queues nothing
        llm.generate([PROMPTS[0], [1] * 300], GREEDY, use_tqdm=False)
    changed = SamplingParams(temperature=0.0, max_tokens=4)
    for field, value in (("n", 0), ("max_tokens", 0), ("logprobs", 10_000)):  # set after construction
        setattr(changed, field, value)
        with pytest.raises(ValueError, match=field):
            llm.generate(PROMPTS[0], changed, use_tqdm=False)
        changed = SamplingParams(temperature=0.0, max_tokens=4)
    with pytest.raises(ValueError, match="priority 2 needs priority scheduling"):  # this engine's queue is FIFO
        llm.generate([PROMPTS[0], PROMPTS[1]], GREEDY, use_tqdm=False, priority=[0, 2])
    with pytest.raises(ValueError, match="got 0 sampling_params for 2 prompts"):  # not the defaults (vLLM's)
        llm.generate([PROMPTS[0], PROMPTS[1]], [], use_tqdm=False)
    with pytest.raises(ValueError, match="'multi_modal_data' is not supported: this engine serves text-only"):
        llm.generate({"prompt": PROMPTS[0], "multi_modal_data": {"image": None}}, GREEDY, use_tqdm=False)
    for prompts, params, message in ((5, GREEDY, "prompts must be a text"), ([PROMPTS[0], 5], GREEDY, "prompt 1"),
                                     (PROMPTS[0], {"temperature": 0}, "sampling_params must be SamplingParams"),
                                     ([PROMPTS[0], PROMPTS[1]], [GREEDY, None], "got NoneType")):
        with pytest.raises(TypeError, match=message):
            llm.generate(prompts, params, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == alone[0]


def test_detokenize_false_gives_the_same_tokens_without_text(llm):
    """vLLM's ``detokenize=False``: the same tokens and logprobs, no text (nor logprob tokens); with stop strings a
    ValueError. ``clone()`` copies."""
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2)
    bare = params.clone()
    bare.detokenize = False
    assert params.detokenize
    with_text, without = (llm.generate(PROMPTS[0], p, use_tqdm=False)[0].outputs[0] for p in (params, bare))
    assert without.token_ids == with_text.token_ids and with_text.text and without.text == ""
    assert [list(e) for e in without.logprobs] == [list(e) for e in with_text.logprobs]
    assert all(lp.decoded_token is None for e in without.logprobs for lp in e.values())
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=["."], detokenize=False)


def test_truncate_prompt_tokens_makes_an_over_long_prompt_fit(llm):
    """``truncate_prompt_tokens``: a prompt over max_model_len keeps its last k tokens and generates, the same as
    those k tokens given alone; through ``submit`` too."""
    long_prompt = list(range(1, 301))  # max_model_len 256
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    cut = llm.generate(long_prompt, SamplingParams(temperature=0.0, max_tokens=4, truncate_prompt_tokens=50),
                       use_tqdm=False)[0]
    assert cut.prompt_token_ids == long_prompt[-50:]
    assert cut.outputs[0].token_ids == llm.generate(long_prompt[-50:], greedy, use_tqdm=False)[0].outputs[0].token_ids
    done = threading.Event()
    llm.submit(long_prompt, SamplingParams(max_tokens=2, truncate_prompt_tokens=8), on_error=print,
               on_output=lambda out: out.finished and done.set())
    assert done.wait(120)


def test_logit_bias_allowed_token_ids_and_bad_words(llm, alone):
    """The default model under each control: a large bias makes greedy repeat its token, allowed ids bound what
    is drawn, and a bad word (one of several tokens too) never appears where greedy wrote it, asynchronous
    scheduling on; ids outside the vocabulary are refused and leave other requests as they were."""
    tokenizer = llm.get_tokenizer()
    token = tokenizer.encode(" blue", add_special_tokens=False)[0]
    out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, logit_bias={token: 100.0}),
                       use_tqdm=False)[0]
    assert out.outputs[0].token_ids == [token] * 5
    allowed = alone[1][:3] + [token]
    out = llm.generate(PROMPTS[1], SamplingParams(temperature=1.0, seed=2, max_tokens=12, ignore_eos=True,
                                                  allowed_token_ids=allowed), use_tqdm=False)[0]
    assert set(out.outputs[0].token_ids) <= set(allowed)

    text = tokenizer.decode(alone[0])
    words = text.split()
    long_word = max(words, key=lambda w: len(tokenizer.encode(" " + w, add_special_tokens=False)))
    assert len(tokenizer.encode(" " + long_word, add_special_tokens=False)) > 1, text
    for bad in (words[0], long_word):
        out = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                      bad_words=[bad]), use_tqdm=False)[0]
        assert out.outputs[0].token_ids != alone[0]
        ids = tokenizer.encode(" " + bad, add_special_tokens=False)
        got = out.outputs[0].token_ids
        assert all(got[i:i + len(ids)] != ids for i in range(len(got))), (bad, out.outputs[0].text)

    vocab = llm.llm_engine.model_config.vocab_size
    for params, field in ((SamplingParams(logit_bias={vocab: 1.0}), "logit_bias"),
                          (SamplingParams(allowed_token_ids=[1, vocab + 5]), "allowed_token_ids")):
        with pytest.raises(ValueError, match=f"{field}.* outside the vocabulary"):
            llm.generate(PROMPTS[0], params, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == alone[0]


def test_structured_outputs_follow_their_grammar(llm):
    """JSON schema, JSON object, regex, choice and Lark grammars on the default model, greedy and sampled (n=2),
    batched with a free request and with asynchronous scheduling on: every output is in its language and ends
    there; a bad grammar is refused by name, nothing queued."""
    import json
    import re

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    cases = [
        ("The capital of France as JSON:", {"json": schema}),
        ("A JSON object describing a cat:", {"json_object": True}),
        ("A phone number:", {"regex": r"[0-9]{3}-[0-9]{4}"}),
        ("Is water wet? Answer:", {"choice": ["yes", "no", "maybe"]}),
        ("Some arithmetic:", {"grammar": 'start: NUM "+" NUM\nNUM: /[1-9][0-9]?/'}),
    ]
    params = [SamplingParams(temperature=0, max_tokens=80, structured_outputs=so) for _, so in cases]
    sampled = SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=80, structured_outputs=cases[0][1])
    free = SamplingParams(temperature=0, max_tokens=8)
    outs = llm.generate([p for p, _ in cases] + [cases[0][0], PROMPTS[0]], params + [sampled, free], use_tqdm=False)
    texts = [o.outputs[0].text for o in outs[:5]]
    for i, out in enumerate(outs[:6]):
        if i != 1:  # any JSON object: the model may write one longer than max_tokens
            assert all(c.finish_reason == "stop" for c in out.outputs), [(c.text, c.finish_reason) for c in out.outputs]
    for text in [texts[0]] + [c.text for c in outs[5].outputs]:
        value = json.loads(text)
        assert set(value) == {"city", "population"} and isinstance(value["population"], int), text
    assert isinstance(json.loads(texts[1]), dict) if outs[1].outputs[0].finish_reason == "stop" else texts[1][0] == "{"
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", texts[2]) and texts[3] in ("yes", "no", "maybe")
    assert re.fullmatch(r"[1-9][0-9]?\+[1-9][0-9]?", texts[4]), texts[4]
    assert outs[6].outputs[0].finish_reason == "length"
    gbnf = {"grammar": 'root ::= answer "."\nanswer ::= "yes" | "no"'}  # GBNF / EBNF, vLLM's examples' form
    (out,) = llm.generate("Is the sky blue? Answer:", SamplingParams(temperature=0, max_tokens=8,
                                                                   structured_outputs=gbnf), use_tqdm=False)
    assert out.outputs[0].text in ("yes.", "no.")

    for so, fragment in (({"regex": "[0-9"}, "regex"), ({"json": {"type": "bogus"}}, "json"),
                         ({"grammar": "start: undefined_rule"}, "grammar"), ({"grammar": "root ::= foo"}, "grammar"),
                         ({"json": "{not json"}, "json")):
        with pytest.raises(ValueError, match=f"structured_outputs: the {fragment} is invalid"):
            llm.generate(PROMPTS[0], SamplingParams(structured_outputs=so), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_structured_outputs_start_after_the_thinking_under_a_reasoning_parser(llm, monkeypatch):
    """With a reasoning parser (vLLM's default): a prompt that closed its thinking block is constrained from the
    first token; an open one runs free up to the token that closes it, then the grammar holds. The default model
    never writes ``</think>``, so the end tag here is a token of its own free greedy reply."""
    import re

    from engine.reasoning import THINK_END, ReasoningEnd

    tokenizer = llm.get_tokenizer()
    engine = llm.llm_engine
    choice = SamplingParams(temperature=0, max_tokens=12, structured_outputs={"choice": ["yes", "no"]})
    free = SamplingParams(temperature=0, max_tokens=12)
    closed, open_ = f"Is water wet?{THINK_END}\n\n", "Is water wet? Let me think."
    monkeypatch.setattr(engine, "_reasoning_end", ReasoningEnd(tokenizer))
    assert engine._reasoning_end.ended_in_prompt(tokenizer.encode(closed))
    assert not engine._reasoning_end.ended_in_prompt(tokenizer.encode(open_))
    assert llm.generate(closed, choice, use_tqdm=False)[0].outputs[0].text in ("yes", "no")

    unconstrained = llm.generate(open_, free, use_tqdm=False)[0].outputs[0].token_ids
    end = next(j for j in range(1, len(unconstrained)) if unconstrained[j] not in unconstrained[:j])
    engine._reasoning_end.end_ids = [unconstrained[end]]  # the thinking ends with token ``end``
    out = llm.generate(open_, choice, use_tqdm=False)[0].outputs[0]
    assert out.token_ids[:end + 1] == unconstrained[:end + 1], "the thinking is not constrained"
    answer = tokenizer.decode(out.token_ids[end + 1:], skip_special_tokens=True)
    assert re.fullmatch("yes|no", answer) and out.finish_reason == "stop", (tokenizer.decode(out.token_ids), answer)
    assert not re.fullmatch("yes|no", tokenizer.decode(unconstrained[end + 1:]))  # the grammar made the difference
    with pytest.raises(ValueError, match="reasoning_parser must be None or one of deepseek_r1, qwen3"):
        LLM(reasoning_parser="granite", skip_tokenizer_init=True)


def test_beam_search_finds_what_greedy_misses_and_keeps_its_sums(llm):
    """vLLM's LLM.beam_search: width 1 is greedy; wider, the beams come best first by vLLM's score, the best at
    least as likely as greedy's sequence, each beam's cumulative logprob the sum of its tokens' logprobs, its text
    its tokens after the prompt; end-of-sequence ends a beam unless ignored."""
    from engine import BeamSearchParams

    tokenizer = llm.get_tokenizer()
    (one,) = llm.beam_search([PROMPTS[2]], BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True),
                             use_tqdm=False)
    greedy = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0),
                          use_tqdm=False)[0].outputs[0]
    prompt_len = len(tokenizer.encode(PROMPTS[2]))
    assert one.sequences[0].tokens[prompt_len:] == greedy.token_ids
    assert one.sequences[0].cum_logprob == pytest.approx(greedy.cumulative_logprob, abs=1e-4)
    outs = llm.beam_search([PROMPTS[2], {"prompt": PROMPTS[0]}], BeamSearchParams(beam_width=3, max_tokens=6,
                                                                                 ignore_eos=True), use_tqdm=False)
    beams = outs[0].sequences
    assert len(beams) == 3 and len({tuple(b.tokens) for b in beams}) == 3
    scores = [b.cum_logprob / len(b.tokens) for b in beams]
    assert scores == sorted(scores, reverse=True) and beams[0].cum_logprob >= greedy.cumulative_logprob - 1e-4
    for beam in beams:
        generated = beam.tokens[prompt_len:]
        assert beam.cum_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(generated, beam.logprobs)),
                                                 abs=1e-4)
        assert beam.text == tokenizer.decode(generated) and beam.finish_reason == "length"
    stopped = llm.beam_search([[1, 2]], BeamSearchParams(beam_width=2, max_tokens=40), use_tqdm=False)[0]
    assert all(b.finish_reason in ("stop", "length") for b in stopped.sequences)
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="beam_width must be at most 10"):  # 2 * 10 logprobs a round
        BeamSearchParams(beam_width=11, max_tokens=4)


def _stream(llm, prompt, params, output_kind):
    """Submit one request; the list its outputs go into and an event set when it ends."""
    outputs, done = [], threading.Event()

    def on_output(output):
        outputs.append(copy.deepcopy(output))  # a cumulative output shares the engine's logprobs list
        if output.finished:
            done.set()

    llm.submit(prompt, params, on_output=on_output, on_error=lambda exc: (outputs.append(exc), done.set()),
               output_kind=output_kind)
    return outputs, done


def test_submit_streams_each_token_and_ends_with_generates_output(llm, alone):
    from engine import RequestOutputKind

    outputs, done = _stream(llm, PROMPTS[3], GREEDY, RequestOutputKind.CUMULATIVE)
    assert done.wait(120) and not any(isinstance(o, BaseException) for o in outputs)
    seen = [o.outputs[0].token_ids for o in outputs]
    assert seen[-1] == alone[3]
    assert [len(tokens) for tokens in seen] == list(range(1, 13))  # one output per token, cumulative
    with pytest.raises(ValueError, match="max_model_len"):
        llm.submit([1] * 300, GREEDY, on_output=outputs.append, on_error=outputs.append)
    assert not llm.llm_engine.has_unfinished_requests()


def _straddling_stop(texts: list[str]) -> tuple[str, int]:
    """From the texts of successive outputs, one token a step: a stop string that starts 2 characters before a
    token's text ends and ends 2 characters into the next token's, and where it starts."""
    full = texts[-1]
    for before, at, after in zip(texts, texts[1:], texts[2:]):
        end = len(at)
        if end - len(before) >= 2 and len(after) - end >= 2 and full.find(full[end - 2:end + 2]) == end - 2:
            return full[end - 2:end + 2], end - 2
    raise AssertionError(f"no token boundary to put a stop string across in {full!r}")


def test_delta_outputs_join_into_the_cumulative_ones_and_no_output_takes_text_back(llm):
    """Each ``RequestOutputKind`` on the same requests: deltas (through the engine process's encoding and a
    pickle) rebuild the cumulative outputs; the final-only output is the last cumulative one; while a request runs
    no output shows text that a stop string split across tokens later cuts (vLLM's hold-back)."""
    from engine import RequestOutputKind
    from engine.output_deltas import DeltaDecoder, encode

    outputs, done = _stream(llm, PROMPTS[1], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                            RequestOutputKind.CUMULATIVE)
    assert done.wait(120)
    stop, cut = _straddling_stop([o.outputs[0].text for o in outputs])
    cases = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop], logprobs=2),
             SamplingParams(temperature=0.8, seed=11, n=2, max_tokens=10, ignore_eos=True, logprobs=1)]
    for params in cases:
        runs = {}
        for kind in RequestOutputKind:  # one after another: alike batches, so alike logprobs to the last bit
            runs[kind] = _stream(llm, PROMPTS[1], params, kind)
            assert runs[kind][1].wait(120)
        cumulative, deltas, final = (runs[kind][0] for kind in RequestOutputKind)
        decoder = DeltaDecoder()
        rebuilt = [decoder.decode(d.request_id, pickle.loads(pickle.dumps(encode(d)))) for d in deltas]
        last = cumulative[-1]
        assert len(final) == 1 and final[0].outputs == last.outputs
        assert rebuilt[-1].outputs == last.outputs and rebuilt[-1].finished
        assert rebuilt[-1].prompt == last.prompt == PROMPTS[1] and rebuilt[-1].prompt_token_ids == last.prompt_token_ids
        assert all(d.prompt is None and d.prompt_token_ids is None for d in deltas[1:])
        assert len(last.outputs) == params.n
        for i, completion in enumerate(last.outputs):
            assert len(completion.logprobs) == len(completion.token_ids)
            for o in cumulative + rebuilt:  # no output says what a later one takes back
                if len(o.outputs) > i:
                    assert completion.text.startswith(o.outputs[i].text)
                    assert completion.token_ids[:len(o.outputs[i].token_ids)] == o.outputs[i].token_ids
        if params.stop:
            assert (last.outputs[0].finish_reason, last.outputs[0].stop_reason) == ("stop", stop)
            assert len(last.outputs[0].text) == cut and len(cumulative) > 2


def test_unrolled_layers_with_per_layer_kv_buffers_match_the_scan(tmp_path):
    """The GPU default (unrolled layers, one KV buffer per layer) gives the scan's tokens, also
    through preemption (a pool too small for the batch) and n=2 (copy-on-write of shared pages); so do
    separate q/k/v and gate/up matmuls (``fuse_projections=False``)."""
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "llama", seed=11)
    rng = np.random.default_rng()
    # 26-32 tokens: each prompt takes two 16-token pages and its 12 new tokens need a third, while 7 of them hold the
    # pool's 14, so the pool preempts whatever lengths are drawn (a probe of 300 draws through one engine: each
    # preempted at least twice). With 24-39, 5 of those 300 fitted without a preemption (a CI failure here).
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(26, 33, 10)]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 9 + [
        SamplingParams(temperature=0.9, top_k=20, n=2, seed=3, max_tokens=12, ignore_eos=True)]
    outputs = {}
    for unroll, fuse in ((False, None), (True, None), (True, False)):
        llm = LLM(str(tmp_path), dtype="float32", unroll_layers=unroll, fuse_projections=fuse,
                  skip_tokenizer_init=True, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=64,
                  num_gpu_blocks_override=14, admission_reserve_tokens=0)  # vLLM's admission: fills the pool
        runner = llm.llm_engine.runner
        layer = runner.params["layers"][0] if unroll else runner.params["layers"]
        assert runner.kv_cache.per_layer == unroll and ("w_gate_up" in layer) == (fuse is None), sorted(layer)
        outputs[unroll, fuse] = [[c.token_ids for c in o.outputs]
                                 for o in llm.generate(prompts, params, use_tqdm=False)]
        assert llm.stats()["num_preemptions"] > 0
        llm.shutdown()
    assert outputs[True, None] == outputs[False, None] == outputs[True, False]


def _tokens_of(path, prompts, params, **llm_kwargs) -> list:
    """The token ids of ``prompts`` from a fresh float32 engine over the tiny checkpoint at ``path``."""
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True, max_model_len=64, max_num_seqs=4,
              max_num_batched_tokens=64, **llm_kwargs)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        llm.shutdown()


def test_pallas_kv_write_gives_the_reference_scatters_tokens(tmp_path):
    """kv_write_backend="pallas" (interpreted on CPU), unrolled per-layer buffers, preemption."""
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "llama", seed=12)
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(3, 40, 6)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outputs = {backend: _tokens_of(tmp_path, prompts, params, unroll_layers=True, kv_write_backend=backend,
                                   num_gpu_blocks_override=10) for backend in ("reference", "pallas")}
    assert outputs["pallas"] == outputs["reference"]
    with pytest.raises(ValueError, match="kv_write_backend"):
        LLM(str(tmp_path), kv_write_backend="triton")


def test_a_head_of_no_power_of_two_through_the_pallas_kernels_gives_the_references_tokens(tmp_path):
    """Phi-3's head size 96 (24 here) runs the attention and KV-write kernels padded to the next power of two
    (interpreted on CPU; the GPU's form is tests/test_engine_gpu.py -k head_size): the reference's greedy tokens."""
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "phi3", seed=11, hidden_size=96, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=24)
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in (5, 33, 1)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    tokens = {backend: _tokens_of(tmp_path, prompts, params, attention_backend=backend, kv_write_backend=backend,
                                  num_gpu_blocks_override=32) for backend in ("pallas", "reference")}
    assert tokens["pallas"] == tokens["reference"]


def test_shutdown_frees_the_device_memory_at_once(tmp_path):
    """shutdown() deletes the weights, KV pages and step buffers (another engine in the process can then size
    its pool from that memory), and a later request gets a clear error."""
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "llama", seed=13)
    llm = LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=64, max_num_seqs=4,
              num_gpu_blocks_override=10)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    first = llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0].token_ids
    runner = llm.llm_engine.runner
    held = jax.tree.leaves([runner.params, runner.kv_cache, list(runner._staged.values())])
    assert held and not any(a.is_deleted() for a in held)
    llm.shutdown()
    assert all(a.is_deleted() for a in held)
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([[1, 2, 3]], params, use_tqdm=False)
    llm.shutdown()  # twice is harmless
    again = LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=64, max_num_seqs=4,
                num_gpu_blocks_override=10)
    assert again.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0].token_ids == first
    again.shutdown()


def test_sleep_frees_the_device_and_wake_up_resumes_without_compiling(tmp_path):
    """vLLM's sleep mode (level 1): sleep() deletes the weights, KV pages and step buffers (the weights kept in host
    memory) and empties the prefix cache; requests are refused while asleep, and sleeping needs an idle engine;
    wake_up() puts it back (compiling at most the new pool's zeroing), the steps after it compile nothing, and the
    same prompts give the same greedy tokens (a prompt cached before the sleep is computed again)."""
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "llama", seed=13)
    llm = LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=64, max_num_seqs=4,
              num_gpu_blocks_override=12, block_size=8, enable_lora=True, max_lora_rank=4)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = [list(range(1, 20)), [5, 6, 7]]
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    runner = llm.llm_engine.runner
    held = jax.tree.leaves([runner.params, runner.kv_cache, list(runner._staged.values())])
    with pytest.raises(ValueError, match="LoRA"):  # level 2 would drop the adapters' slots with the weights
        llm.sleep(level=2)
    with pytest.raises(ValueError, match="level 3"):
        llm.sleep(level=3)
    llm.sleep()
    assert llm.is_sleeping() and all(a.is_deleted() for a in held)
    with pytest.raises(ValueError, match="asleep"):
        llm.generate(prompts, params, use_tqdm=False)
    with pytest.raises(ValueError, match="asleep already"):
        llm.sleep()
    hits = llm.stats()["prefix_cache_hits"]
    llm.wake_up()
    assert not llm.is_sleeping()
    with CompileTimer() as timer:
        after = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert after == before and timer.compiled() == []
    assert llm.stats()["prefix_cache_hits"] == hits  # the pages went with the sleep: nothing found cached
    with pytest.raises(ValueError, match="wake_up follows sleep"):
        llm.wake_up()
    request_id = llm.submit([1, 2, 3], SamplingParams(max_tokens=60, ignore_eos=True), on_output=lambda out: None,
                            on_error=lambda exc: None)
    with pytest.raises(ValueError, match="requests are unfinished"):
        llm.sleep()
    llm.abort(request_id)
    llm.shutdown()


def test_weights_update_from_disk_and_sleep_level_2(tmp_path):
    """``update_weights_from_disk`` (idle, awake): the engine then gives a fresh engine's greedy tokens on the new
    checkpoint, compiles nothing and empties the prefix cache; a checkpoint of another shape is refused with the
    differing config and the old weights keep serving. ``sleep(level=2)`` discards the weights (no host copy):
    ``wake_up`` loads the checkpoint again, or the one an update named while asleep."""
    from tests.tiny_checkpoints import write_tiny_checkpoint

    paths = {name: str(tmp_path / name) for name in ("a", "b", "wide")}
    write_tiny_checkpoint(paths["a"], "llama", seed=21)
    write_tiny_checkpoint(paths["b"], "llama", seed=22)
    write_tiny_checkpoint(paths["wide"], "llama", seed=23, intermediate_size=128)
    options = dict(dtype="float32", skip_tokenizer_init=True, max_model_len=64, max_num_seqs=4,
                   num_gpu_blocks_override=12, block_size=8)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [list(range(1, 20)), [5, 6, 7]]

    def tokens(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    fresh_b = LLM(paths["b"], **options)
    want_b = tokens(fresh_b)
    fresh_b.shutdown()
    llm = LLM(paths["a"], **options)
    want_a = tokens(llm)
    assert want_a != want_b
    hits = llm.stats()["prefix_cache_hits"]
    old = jax.tree.leaves(llm.llm_engine.runner.params)
    with CompileTimer() as timer:
        llm.update_weights_from_disk(paths["b"])
        assert tokens(llm) == want_b
    assert all(a.is_deleted() for a in old) and llm.stats()["prefix_cache_hits"] == hits
    assert timer.compiled() == []
    with pytest.raises(ValueError, match="intermediate_size=128") as refused:
        llm.update_weights_from_disk(paths["wide"])
    assert "max_model_len" not in str(refused.value)  # the engine's own, not the checkpoint's
    assert tokens(llm) == want_b  # the old weights loaded back
    with pytest.raises(FileNotFoundError, match="does not exist"):
        llm.update_weights_from_disk(str(tmp_path / "none"))
    llm.sleep(level=2)
    assert llm.is_sleeping() and llm.llm_engine.runner.params is None
    llm.wake_up()  # the checkpoint loaded again
    assert tokens(llm) == want_b
    llm.sleep()  # level 1, then new weights named while asleep: they come at wake_up
    llm.update_weights_from_disk(paths["a"])
    llm.wake_up()
    assert tokens(llm) == want_a
    llm.sleep(level=2)
    llm.update_weights_from_disk(paths["wide"])
    with pytest.raises(ValueError, match="config differs"):
        llm.wake_up()
    assert llm.is_sleeping()  # still asleep: another update, then wake_up
    llm.update_weights_from_disk(paths["b"])
    llm.wake_up()
    assert tokens(llm) == want_b
    llm.shutdown()


def test_kv_pool_leaves_room_for_the_largest_step(tmp_path, monkeypatch):
    """With a device memory budget (as on a GPU), the pool gets the budget minus weights minus the
    largest step's activations, which XLA reports for that step compiled at start-up."""
    import engine.device_memory as device_memory
    from models.batch import kv_cache_bytes_per_block
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "llama", seed=2)
    budget = 64 << 20
    monkeypatch.setattr(device_memory, "device_memory_budget", lambda utilization: budget)
    activations = {}
    for tokens in (64, 1024):
        llm = LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=128, max_num_seqs=8,
                  max_num_batched_tokens=tokens)
        engine = llm.llm_engine
        per_block = kv_cache_bytes_per_block(engine.model_config, 16, np.float32)
        assert engine.block_manager.num_blocks == (budget - engine.activation_bytes) // per_block
        activations[tokens] = engine.activation_bytes
        out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
        llm.shutdown()
    assert 0 < activations[64] < activations[1024]  # 16x the tokens: more activation memory


def test_activation_bytes_are_kept_on_disk_by_program(tmp_path, monkeypatch):
    """The largest step's activation bytes are compiled for once and kept under a digest of the traced
    programs (``sizing_key``): a restart reads the figure (here a planted one), other limits get their own."""
    import json

    import engine.device_memory as device_memory
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path / "model", "llama", seed=2)
    monkeypatch.setattr(device_memory, "device_memory_budget", lambda utilization: 64 << 20)
    monkeypatch.setenv("PAGEDJAX_CACHE_DIR", str(tmp_path / "cache"))

    def start(tokens: int) -> int:
        llm = LLM(str(tmp_path / "model"), dtype="float32", skip_tokenizer_init=True, max_model_len=128,
                  max_num_seqs=8, max_num_batched_tokens=tokens)
        figure = llm.llm_engine.activation_bytes
        llm.shutdown()
        return figure

    first = start(64)
    (kept,) = (tmp_path / "cache" / "activation-bytes").glob("*.json")
    assert json.loads(kept.read_text()) == {"activation_bytes": first} and first > 0
    kept.write_text(json.dumps({"activation_bytes": first + 4096}))
    assert start(64) == first + 4096  # read, not compiled again
    start(128)
    assert len(list((tmp_path / "cache" / "activation-bytes").glob("*.json"))) == 2


def test_persistent_compilation_cache_is_on_before_the_weights_load(tmp_path, monkeypatch):
    """The weights' programs (random weights, quantizers, the layer layout) go through JAX's persistent cache
    too: it is turned on before they are made (it was turned on after them, so a warm start remade them)."""
    import jax

    import engine.llm_engine as llm_engine
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path / "model", "llama", seed=4)
    monkeypatch.setenv("PAGEDJAX_CACHE_DIR", str(tmp_path / "cache"))
    seen = []
    load_model = llm_engine.load_model

    def recording_load_model(*args, **kwargs):
        seen.append(jax.config.jax_compilation_cache_dir)
        return load_model(*args, **kwargs)

    monkeypatch.setattr(llm_engine, "load_model", recording_load_model)
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        llm = LLM(str(tmp_path / "model"), dtype="float32", skip_tokenizer_init=True, max_model_len=64,
                  max_num_seqs=4, max_num_batched_tokens=32, num_gpu_blocks_override=8)
        llm.shutdown()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    assert seen == [str(tmp_path / "cache" / "jax")], seen


def test_async_scheduling_and_multi_step_decoding_give_the_outputs_of_synchronous_steps(tmp_path):
    """Planning step N+1 while step N runs (pending tokens fed on the device), and multi-step decoding
    (several decode steps a dispatch, each feeding the next on the device), change nothing a request
    sees: tokens, finish reasons and logprobs equal the synchronous one-step engine's, through
    preemption, stops in the middle of a step in flight or of a multi-step decode (stop tokens,
    max_tokens, max_model_len), seeded sampling, n=2, logit_bias, allowed_token_ids and penalties (read back
    before planning; no multi-step decode while they run); every block is freed."""
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "llama", seed=5)
    rng = np.random.default_rng()
    # Prompts of 12-39 tokens (and one of 2): the requests running at once then need more than the
    # 10 usable blocks whatever the draw (25 tokens into the 60-, 30- and 25-token requests those three
    # hold 9 blocks, beside the n=2 request and others admitted as the short ones finish); with prompts
    # from 2 tokens up, a short draw sometimes never preempted (seen failing in a full CPU run).
    prompts = [rng.integers(3, 256, int(n)).tolist() for n in [2, *rng.integers(12, 40, 15)]]

    def make_params(stop_token: int) -> list:
        return (
            [SamplingParams(temperature=0, max_tokens=int(m), ignore_eos=True) for m in (1, 2, 5, 9, 30, 60)]
            + [SamplingParams(temperature=0, max_tokens=30,
                              stop_token_ids=[stop_token, *(int(t) for t in rng.integers(3, 256, 4))]),
               SamplingParams(temperature=1.0, top_k=20, seed=11, max_tokens=25, ignore_eos=True),
               SamplingParams(temperature=0.8, seed=4, n=2, max_tokens=10, ignore_eos=True),
               SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.5, max_tokens=12,
                              ignore_eos=True),
               SamplingParams(temperature=0, logprobs=2, max_tokens=6, ignore_eos=True),
               SamplingParams(temperature=0, min_tokens=4, max_tokens=9),
               SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),  # stopped by max_model_len
               SamplingParams(temperature=0.7, seed=9, max_tokens=40, stop_token_ids=[7, 8, 9, 10, 11, 12]),
               SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                              logit_bias={int(t): 4.0 for t in rng.integers(3, 256, 6)}),
               SamplingParams(temperature=0.9, seed=3, max_tokens=10, ignore_eos=True,
                              allowed_token_ids=[int(t) for t in rng.integers(3, 256, 20)])])

    params, results = None, {}
    for mode, steps in ((False, 1), (True, 1), (True, 4), (False, 3)):
        # 10 usable blocks (160 tokens) for up to 8 sequences of up to 72: preemption every run (with
        # 15 usable blocks, or prompts from 2 tokens up, a run of short random prompts sometimes had none).
        llm = LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=72, max_num_seqs=8,
                  max_num_batched_tokens=48, num_gpu_blocks_override=11, async_scheduling=mode,
                  num_scheduler_steps=steps, admission_reserve_tokens=0)  # vLLM's admission: fills the pool
        assert llm.llm_engine.async_scheduling == mode
        if params is None:  # a stop token the greedy stop request surely meets mid-way: its own 4th token
            probe = llm.generate([prompts[6]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                 use_tqdm=False)
            params = make_params(probe[0].outputs[0].token_ids[3])
        outs = llm.generate(prompts, params, use_tqdm=False)
        results[mode, steps] = [[(c.token_ids, c.finish_reason, c.logprobs) for c in o.outputs] for o in outs]
        stats = llm.stats()
        assert stats["num_preemptions"] > 0
        assert (stats["steps_planned_ahead"] > stats["steps"] // 2) == mode
        assert (stats["multi_steps"] > 0) == (steps > 1)
        assert llm.llm_engine.block_manager.num_used_blocks == 0 and not llm.llm_engine.has_unfinished_requests()
        llm.shutdown()
    for key, result in results.items():
        assert result == results[False, 1], key
    assert {reason for r in results[True, 1] for _, reason, _ in r} == {"length", "stop"}


@pytest.mark.parametrize("fraction,utilization,expected_gib", [
    (None, 0.9, 58.2),     # JAX's default 75% pool of an 80 GiB device is 60 GiB: 97% of it
    ("0.95", 0.9, 72.0),   # a 76 GiB pool: 90% of the device fits
    ("0.95", 0.99, 73.72),  # more than the pool holds: 97% of the pool
    ("0.5", 0.9, 38.8),    # a small pool the user chose: 97% of it
])
def test_memory_budget_is_utilization_of_the_device_within_the_pool(monkeypatch, fraction, utilization, expected_gib):
    import engine.device_memory as device_memory

    device = 80 << 30
    pool = device * (float(fraction) if fraction else 0.75)

    class FakeDevice:
        def memory_stats(self):
            return {"bytes_limit": int(pool), "bytes_in_use": 0}

    monkeypatch.setattr(device_memory.jax, "local_devices", lambda: [FakeDevice()])
    if fraction is None:
        monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    else:
        monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", fraction)
    budget = device_memory.device_memory_budget(utilization)
    assert budget <= 0.97 * pool + 1
    assert budget / 2**30 == pytest.approx(expected_gib, rel=1e-3)


@pytest.mark.parametrize("user_value,expected", [(None, "0.95"), ("0.5", "0.5")])
def test_engine_asks_jax_for_a_larger_gpu_pool(user_value, expected):
    """Importing ``engine`` sets JAX's allocator fraction unless the user set one."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_MEM_FRACTION"}
    if user_value:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = user_value
    out = subprocess.run([sys.executable, "-c", "import engine, os; print(os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])"],
                         env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == expected


def test_memory_budget_under_an_allocator_without_a_pool_comes_from_the_driver(monkeypatch):
    """JAX's VMM allocator reports no stats (run 20e): the budget is ``utilization`` of the device as the CUDA
    driver reports it, and what is in use is what the driver does not report free."""
    import engine.device_memory as device_memory

    class FakeDevice:
        def memory_stats(self):
            return None

    monkeypatch.setattr(device_memory.jax, "local_devices", lambda: [FakeDevice()])
    monkeypatch.setattr(device_memory, "_least_outside_arrays", [])  # a fresh process's
    monkeypatch.setattr(device_memory, "driver_memory", lambda: (100 << 30, 140 << 30))  # (free, total)
    assert device_memory.device_memory_budget(0.9) == int(0.9 * (140 << 30))
    assert device_memory.device_memory_in_use() == 40 << 30
    assert device_memory.device_memory_bytes() == 140 << 30
    # Read before the weights: 40 GiB not free, 1 GiB of it live arrays. After loading, the driver also counts
    # memory the allocator freed (run 21a): in use is then what was outside arrays plus the arrays live now.
    monkeypatch.setattr(device_memory, "live_array_bytes", lambda: 1 << 30)
    outside = device_memory.memory_outside_arrays()
    assert outside == 39 << 30
    monkeypatch.setattr(device_memory, "driver_memory", lambda: (50 << 30, 140 << 30))
    monkeypatch.setattr(device_memory, "live_array_bytes", lambda: 16 << 30)
    assert device_memory.device_memory_in_use(outside) == 55 << 30
    # That engine shut down: its arrays are gone, but the allocator keeps their memory for the next engine's
    # arrays. The next engine's reading is the process's least, not 89 GiB.
    monkeypatch.setattr(device_memory, "live_array_bytes", lambda: 1 << 30)
    assert device_memory.memory_outside_arrays() == 39 << 30
    monkeypatch.setattr(device_memory, "driver_memory", lambda: None)  # no CUDA: a CPU
    assert device_memory.device_memory_budget(0.9) is None and device_memory.device_memory_in_use() == 0
    assert device_memory.memory_outside_arrays() is None


def test_live_array_bytes_counts_this_devices_arrays(monkeypatch):
    import jax.numpy as jnp

    import engine.device_memory as device_memory

    arrays = [jnp.ones((1000, 250), jnp.float32), jnp.ones(8, jnp.bfloat16)]
    monkeypatch.setattr(device_memory.jax, "live_arrays", lambda: arrays)  # other tests' arrays come and go
    assert device_memory.live_array_bytes() == 1_000_016


VMM = {"XLA_PYTHON_CLIENT_ALLOCATOR": "vmm"}
CUDA_0112 = {"jaxlib": "0.11.2", "jax-cuda13-pjrt": "0.11.2"}
SKIP_TEMP = "--xla_gpu_command_buffer_update_mode=SKIP_TEMP"
NO_REMAT = "--xla_disable_hlo_passes=rematerialization"  # on CUDA, any jaxlib (run 38c-d)


@pytest.mark.parametrize("installed,gpus,environ,allocator,flags", [
    ({}, None, {}, None, ""),  # no CUDA plugin (this machine): nothing changes
    ({}, None, VMM, "vmm", ""),
    (CUDA_0112, 1, {}, "vmm", f"{SKIP_TEMP} {NO_REMAT}"),  # one GPU: VMM with fixed-address temporaries
    (CUDA_0112, 2, {}, None, NO_REMAT),  # several: JAX's default (tensor parallelism under VMM not run yet)
    (CUDA_0112, 1, {"XLA_PYTHON_CLIENT_ALLOCATOR": "bfc"}, "bfc", NO_REMAT),  # the user's allocator wins
    (CUDA_0112, 2, VMM, "vmm", f"{SKIP_TEMP} {NO_REMAT}"),
    ({"jaxlib": "0.11.2", "jax-cuda12-pjrt": "0.11.2"}, 1, {"XLA_FLAGS": "--xla_dump_to=/tmp/d"}, "vmm",
     f"--xla_dump_to=/tmp/d {SKIP_TEMP} {NO_REMAT}"),
    ({"jaxlib": "0.10.2", "jax-cuda12-pjrt": "0.10.2"}, 1, {}, None, NO_REMAT),  # its XLA rejects SKIP_TEMP
    ({"jaxlib": "0.10.2", "jax-cuda12-pjrt": "0.10.2"}, 1, VMM, "vmm", NO_REMAT),
    (CUDA_0112, 1, {"XLA_FLAGS": "--xla_gpu_command_buffer_update_mode=ALWAYS_UPDATE"}, "vmm",
     f"--xla_gpu_command_buffer_update_mode=ALWAYS_UPDATE {NO_REMAT}"),
    (CUDA_0112, 1, {"XLA_FLAGS": "--xla_disable_hlo_passes=dce"}, "vmm",  # the user's disabled passes win
     f"--xla_disable_hlo_passes=dce {SKIP_TEMP}"),
])
def test_engine_asks_for_fixed_address_temporaries_on_cuda(installed, gpus, environ, allocator, flags):
    """Importing ``engine`` on CUDA (JAX's CUDA plugin, jaxlib >= 0.11.2) with one visible GPU picks JAX's VMM
    allocator and asks XLA for its temporaries at a fixed address, so decode steps replay their CUDA graphs (run
    20e); on CUDA it also turns XLA's rematerialisation off (run 38c-d); an allocator, update mode or disabled
    passes the user set win. The installed packages and the driver's device count are faked in a subprocess."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_PYTHON_CLIENT_ALLOCATOR", "XLA_FLAGS")}
    env.update(environ)
    code = ("import importlib.metadata as m, sys, types\n"
            f"installed = {installed!r}\n"
            "def version(name):\n"
            "    if name in installed: return installed[name]\n"
            "    raise m.PackageNotFoundError(name)\n"
            "m.version = version\n"
            "driver = types.ModuleType('engine.cuda_driver')\n"
            f"driver.device_count = lambda: {gpus!r}\n"
            "sys.modules['engine.cuda_driver'] = driver\n"
            "import engine, os\n"
            "print(repr(os.environ.get('XLA_PYTHON_CLIENT_ALLOCATOR')))\n"
            "print(os.environ.get('XLA_FLAGS', ''))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    printed_allocator, printed_flags = (out.stdout.splitlines() + [""])[:2]
    assert printed_allocator == repr(allocator) and printed_flags == flags


@pytest.mark.parametrize("async_scheduling,num_scheduler_steps", [(False, 1), (True, 1), (True, 4)])
def test_final_only_and_delta_requests_hand_out_what_the_streamed_one_did(tmp_path, async_scheduling,
                                                                          num_scheduler_steps):
    """``RequestOutputKind.FINAL_ONLY`` (what ``LLM.generate`` asks for): one output, when finished, the
    same as the last of a streamed request's outputs; nothing from it in ``step()`` before that; an
    abort still hands its output out. ``DELTA``: an output with each streamed one, its new tokens only."""
    from engine import EngineArgs, LLMEngine, RequestOutputKind
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "llama", seed=3)
    engine = LLMEngine(EngineArgs(model=str(tmp_path), dtype="float32", max_model_len=64,
                                  async_scheduling=async_scheduling, num_scheduler_steps=num_scheduler_steps),
                       skip_tokenizer_init=True)
    seen = {"streamed": [], "final": [], "aborted": [], "delta": []}
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    engine.add_request("streamed", [5, 6, 7, 8], params, on_output=seen["streamed"].append)
    engine.add_request("final", [5, 6, 7, 8], params, on_output=seen["final"].append,
                       output_kind=RequestOutputKind.FINAL_ONLY)
    engine.add_request("delta", [5, 6, 7, 8], params, on_output=seen["delta"].append,
                       output_kind=RequestOutputKind.DELTA)
    engine.add_request("aborted", [9, 10], SamplingParams(max_tokens=30), on_output=seen["aborted"].append,
                       output_kind=RequestOutputKind.FINAL_ONLY)
    stepped = []
    for i in range(100):
        if i == 3:
            engine.abort_request("aborted")
        stepped += engine.step()
        if not engine.has_unfinished_requests():
            break
    assert len(seen["streamed"]) > 1 and len(seen["final"]) == 1 and len(seen["aborted"]) == 1
    final, last = seen["final"][0], seen["streamed"][-1]
    assert final.finished and final.outputs[0].token_ids == last.outputs[0].token_ids
    assert len(final.outputs[0].token_ids) == 7 and final.outputs[0].finish_reason == "length"
    assert seen["aborted"][0].finished and seen["aborted"][0].outputs[0].finish_reason == "abort"
    assert [o.finished for o in stepped if o.request_id == "final"] == [True]
    streamed_tokens = [o.outputs[0].token_ids for o in seen["streamed"]]
    assert [sum((d.outputs[0].token_ids for d in seen["delta"][:k + 1]), []) for k in range(len(seen["delta"]))] \
        == streamed_tokens


@pytest.mark.parametrize("workers,steps,lora", [("1", 1, False), ("3", 1, False), ("2", 4, False), ("2", 4, True)])
def test_precompiled_engine_compiles_nothing_while_it_generates(tmp_path, capsys, monkeypatch, workers, steps, lora):
    """precompile_steps=True: LLM(...) compiles the model step of every token bucket at the fixed
    block-table width (one after another, or by threads at once), and the greedy and random samplers,
    under a progress bar (with multi-step decoding, its greedy and random programs of every bucket a
    decode can have; with LoRA slots, each step with adapters' updates and without, and the slot writer); then
    prompts of many lengths, batch sizes and both kinds of sampling (half with an adapter) compile nothing more."""
    monkeypatch.setenv("PAGEDJAX_PRECOMPILE_WORKERS", workers)
    from engine.runner import token_buckets
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "llama", seed=4)
    with CompileTimer() as start_up:
        llm = LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=96, max_num_seqs=8,
                  max_num_batched_tokens=64, precompile_steps=True, num_scheduler_steps=steps, enable_lora=lora,
                  max_lora_rank=4)
        adapter = None
        if lora:
            from engine import LoRARequest
            from models.lora import write_random_adapter

            adapter = LoRARequest("a", 1, write_random_adapter(str(tmp_path / "adapter"),
                                                               llm.llm_engine.model_config, ["q_proj", "down_proj"],
                                                               r=4))
    runner = llm.llm_engine.runner
    assert runner.table_width == 6 and token_buckets(64) == [1, 16, 32, 64]
    assert "Compiling steps" in capsys.readouterr().err
    assert gc.get_freeze_count() > 0  # start-up's objects are out of the collector's way
    assert len(start_up.compiled()) >= 4 + 2  # a model step per token bucket; greedy and random samplers of 8 slots
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in (1, 5, 17, 40, 60, 3, 9, 2)]
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    random = SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True, seed=3)
    with CompileTimer() as serving:
        outputs = llm.generate(prompts, [greedy, random] * 4, use_tqdm=False, lora_request=[adapter, None] * 4)
        single = llm.generate([prompts[0]], greedy, use_tqdm=False, lora_request=adapter)  # one token a step: T=1
        llm.generate([prompts[2]], greedy, use_tqdm=False)  # the base model alone: steps without LoRA updates
    assert [len(o.outputs[0].token_ids) for o in outputs] == [20] * 8
    assert single[0].outputs[0].token_ids == outputs[0].outputs[0].token_ids
    assert serving.compiled() == []
    assert (llm.stats()["multi_steps"] > 0) == (steps > 1)
    llm.shutdown()
    assert token_buckets(1000) == [1, 16, 32, 64, 128, 256, 512, 1000] and token_buckets(8) == [1, 8]


def test_with_multi_step_decoding_a_first_token_goes_out_before_the_next_step_is_dispatched(tmp_path):
    """A burst's planning and dispatch take a few ms of host time: with multi-step decoding the step that samples a
    request's first token is read back (and its output handed out) before the next step is dispatched, so the first
    token does not wait for them; later steps are still planned while the previous one runs."""
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "llama", seed=2)
    llm = LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=64, max_num_seqs=4,
              num_scheduler_steps=4, async_scheduling=True)
    runner = llm.llm_engine.runner
    events = []
    dispatch = runner.dispatch
    runner.dispatch = lambda *a, **k: events.append(("dispatch", k.get("decode_steps", 1))) or dispatch(*a, **k)
    done = threading.Event()

    def on_output(output):
        events.append(("output", len(output.outputs[0].token_ids)))
        if output.finished:
            done.set()

    llm.submit([5, 6, 7, 8, 9], SamplingParams(temperature=0, max_tokens=13, ignore_eos=True), on_output=on_output,
               on_error=lambda exc: done.set())
    assert done.wait(120)
    assert events[:3] == [("dispatch", 1), ("output", 1), ("dispatch", 4)]
    assert llm.stats()["steps_planned_ahead"] > 0  # the bursts after it overlap as before
    llm.shutdown()


def test_vllms_arguments_that_change_nothing_here_are_taken(tmp_path, caplog, monkeypatch):
    """vLLM scripts pass swap_space and the like: taken with a warning each; a name neither engine knows is Python's
    TypeError. ``disable_log_stats=False`` turns vLLM's periodic stats line on (every $VLLM_LOG_STATS_INTERVAL
    seconds while the engine works; ``engine.stats_log``)."""
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "llama", seed=3)
    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "0.05")
    with caplog.at_level("INFO"):
        llm = LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=32, max_num_seqs=2,
                  num_gpu_blocks_override=8, disable_log_stats=False, swap_space=4, enable_chunked_prefill=True)
        llm.generate([[1, 2, 3], [4, 5]], [SamplingParams(max_tokens=20, ignore_eos=True),
                                           SamplingParams(max_tokens=4, n=2, ignore_eos=True)], use_tqdm=False)
        time.sleep(0.3)
        metrics = {(m.name, tuple(sorted(m.labels.items()))): m for m in llm.get_metrics()}
        llm.shutdown()
    assert "swap_space=...) has no effect" in caplog.text and "disable_log_stats" not in caplog.text
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Avg prompt throughput")]
    assert lines and "Running: 0 reqs, Waiting: 0 reqs, GPU KV cache usage: 0.0%" in lines[-1], lines
    # vLLM's LLM.get_metrics(): the server's metrics as Counter / Gauge / Histogram / Vector snapshots
    from engine.metrics_reader import Counter, Gauge, Histogram

    def one(name, **labels):
        return metrics[(name, tuple(sorted({"model_name": str(tmp_path), **labels}.items())))]

    assert one("vllm:generation_tokens") == Counter("vllm:generation_tokens", {"model_name": str(tmp_path)}, 28)
    assert one("vllm:request_success", finished_reason="length").value == 3  # a request of n counts n
    assert isinstance(one("vllm:num_requests_running"), Gauge) and one("vllm:kv_cache_total_blocks").value == 7
    ttft = one("vllm:time_to_first_token_seconds")
    assert isinstance(ttft, Histogram) and ttft.count == 3 and ttft.buckets["+Inf"] == 3 and ttft.sum > 0
    assert one("vllm:request_generation_tokens").sum == 28 and one("vllm:request_params_n").count == 2
    assert one("vllm:inter_token_latency_seconds").count == 19 + 3 + 3
    assert one("vllm:cache_config_info", block_size="16", cache_dtype="auto", enable_prefix_caching="True",
               gpu_memory_utilization="0.9", num_cpu_blocks="None", num_gpu_blocks="7",
               num_gpu_blocks_override="8", swap_space="0").value == 1
    with pytest.raises(TypeError, match="'swap_spaces'"):
        LLM(str(tmp_path), swap_spaces=4)


@pytest.mark.parametrize("configure", ["1", "0"])
def test_an_offline_script_shows_the_engines_info_lines_as_vllms_does(tmp_path, configure):
    """A script that sets up no logging sees the engine's start-up line and, with ``disable_log_stats=False``, its
    stats line on stderr, as vLLM shows its INFO lines (Python alone shows warnings only: a probe found the README's
    promise of both unkept offline); ``VLLM_CONFIGURE_LOGGING=0`` leaves logging to the script, as in vLLM."""
    import subprocess
    import sys

    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "llama", seed=9)
    script = ("from engine import LLM, SamplingParams\n"
              f"llm = LLM({str(tmp_path)!r}, dtype='float32', skip_tokenizer_init=True, max_model_len=32, "
              "max_num_seqs=2, num_gpu_blocks_override=8, disable_log_stats=False)\n"
              "llm.generate([[1, 2, 3]], SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)\n"
              "import time; time.sleep(0.5)\nllm.shutdown()\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "VLLM_CONFIGURE_LOGGING": configure, "VLLM_LOG_STATS_INTERVAL": "0.1",
           "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    shown = ("INFO pagedjax: loaded" in run.stderr, "Avg prompt throughput" in run.stderr)
    assert shown == ((True, True) if configure == "1" else (False, False)), run.stderr[-3000:]


@pytest.mark.parametrize("stats", [False, True])
def test_an_llm_dropped_without_shutdown_is_freed_and_its_threads_end(tmp_path, monkeypatch, stats):
    """Nothing the engine keeps (a finished request's callbacks) points back to the ``LLM``: dropped without
    ``shutdown()``, it is collected and its engine (and stats) threads end (a review found it kept alive by the
    metrics recorder each request's callback held). A metric that fails is logged; ``generate`` still returns."""
    import weakref

    from engine.metrics import ServingMetrics
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "llama", seed=7)

    def engine_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name in ("pagedjax-engine", "pagedjax-stats-log")]

    before = engine_threads()
    llm = LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=32, max_num_seqs=2,
              num_gpu_blocks_override=8, disable_log_stats=not stats)
    if stats:
        monkeypatch.setattr(ServingMetrics, "on_finished", lambda self, finished: 1 / 0)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    dropped = weakref.ref(llm)
    del llm
    gc.collect()
    for _ in range(100):
        if dropped() is None and engine_threads() == before:
            break
        time.sleep(0.05)
    assert dropped() is None and engine_threads() == before


def test_shutdown_ends_the_waits_of_requests_in_flight_and_refuses_to_wake(tmp_path):
    """shutdown() while another thread waits in generate: that wait ends with the loop's error (it hung forever);
    sleep / wake_up afterwards are refused (wake_up put the weights back on the device for an engine that never
    steps again)."""
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "llama", seed=5)
    llm = LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=256, max_num_seqs=2,
              num_gpu_blocks_override=40)
    errors, started = [], threading.Event()

    def wait_in_generate():
        started.set()
        try:
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=250, ignore_eos=True), use_tqdm=False)
        except RuntimeError as e:
            errors.append(e)

    thread = threading.Thread(target=wait_in_generate, daemon=True)
    thread.start()
    started.wait()
    while not llm.llm_engine.has_unfinished_requests():
        threading.Event().wait(0.01)
    llm.shutdown()
    thread.join(timeout=30)
    assert not thread.is_alive() and "shut down" in str(errors[0])
    for call in (llm.wake_up, llm.sleep):
        with pytest.raises(RuntimeError, match="shut down"):
            call()


def test_an_interrupted_generate_aborts_its_requests(tmp_path, monkeypatch):
    """A caller interrupted while it waits (Ctrl-C): its requests are aborted, not decoded on for nobody."""
    import engine.llm as llm_module
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "llama", seed=5)
    llm = LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=256, max_num_seqs=4,
              num_gpu_blocks_override=80)

    def interrupted(futures):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(llm_module.concurrent.futures, "as_completed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2, 3]] * 3, SamplingParams(max_tokens=250, ignore_eos=True), use_tqdm=False)
    monkeypatch.undo()
    for _ in range(500):
        stats = llm._loop.stats()  # the scheduler's queues and the pool
        if stats["num_running"] == stats["num_waiting"] == stats["num_used_blocks"] == 0:
            break
        threading.Event().wait(0.01)
    llm.shutdown()
    assert stats["num_running"] == stats["num_waiting"] == stats["num_used_blocks"] == 0, stats
    assert stats["steps"] < 100  # dropped within a few steps: not decoded on to 250 tokens


def test_vllms_engine_accessors(tmp_path):
    """What scripts written for vLLM read off ``llm.llm_engine`` (lm-eval's harness reads
    ``model_config.max_model_len``); the context length stays out of the config's equality, so no step recompiles."""
    from tests.tiny_checkpoints import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, "llama", seed=3)
    llm = LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=48, max_num_seqs=2,
              num_gpu_blocks_override=8)
    engine = llm.llm_engine
    try:
        config = engine.get_model_config()
        assert config is engine.model_config and config.max_model_len == engine.max_model_len == 48
        assert config == dataclasses.replace(config, max_model_len=None)
        assert hash(config) == hash(dataclasses.replace(config, max_model_len=None))
        assert engine.get_tokenizer() is None and engine.get_num_unfinished_requests() == 0
    finally:
        llm.shutdown()
