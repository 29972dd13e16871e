"""LoRA adapters (``engine.lora``, ``models.lora``): PEFT adapters made and saved by ``peft`` itself on tiny random
checkpoints; the engine's greedy tokens and their logprobs against ``peft``'s model in ``transformers``, adapters
and the base model mixed in one batch, over the scanned and unrolled layers, multi-step decoding, n-gram drafts,
Phi-3's fused projections; the slot limit; prefix caching per adapter; and the errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from engine import LLM, LoRARequest, SamplingParams
from engine.engine_args import EngineArgs
from engine.lora import LoRASlots
from models.lora import LoRAAdapterError
from tiny_checkpoints import write_tiny_checkpoint

peft = pytest.importorskip("peft")

ALL_LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [[5, 17, 33, 99, 120, 7, 8, 200, 3], [44, 55, 66, 77], list(range(1, 19))]
MAX_TOKENS = 10


def make_adapter(path, variant: str, seed: int, targets: list[str], r: int, alpha: float, **lora_options):
    """A PEFT adapter of random (non-zero) A and B on a fresh copy of the tiny ``variant`` checkpoint of seed 1,
    saved by ``save_pretrained`` to ``path``; returns the ``peft`` model (eval)."""
    base = write_tiny_checkpoint(os.path.join(path, "base"), variant, seed=1)
    model = random_lora(base, seed, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                    init_lora_weights=False, **lora_options))
    model.save_pretrained(os.path.join(path, "adapter"))
    return model


def random_lora(base, seed: int, config):
    """``base`` (a transformers model) wrapped by peft with ``config``'s adapter, its A and B random (0.3 * normal of
    ``seed``: an update far from zero); returns the peft model (eval)."""
    model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return model.eval()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and each one's logprob, one full forward a token."""
    ids, tokens, logprobs = torch.tensor([prompt]), [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logp = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)
            token = int(logp.argmax())
            tokens.append(token)
            logprobs.append(float(logp[token]))
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens, logprobs


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The base checkpoint, two adapters (all seven matrices, r=8; q and v only, r=4, rsLoRA) and their models."""
    root = tmp_path_factory.mktemp("lora")
    base_path = root / "base"
    base = write_tiny_checkpoint(base_path, "llama", seed=1)
    one = make_adapter(root / "one", "llama", 1, ALL_LLAMA_MODULES, r=8, alpha=16)
    two = make_adapter(root / "two", "llama", 2, ["q_proj", "v_proj"], r=4, alpha=8, use_rslora=True)
    requests = [None, LoRARequest("one", 1, str(root / "one" / "adapter")),
                LoRARequest("two", 2, str(root / "two" / "adapter"))]
    expected = {}
    for request, model in zip(requests, (base, one, two)):
        for i, prompt in enumerate(PROMPTS):
            expected[(request, i)] = hf_greedy(model, prompt, MAX_TOKENS)
    return str(base_path), requests, expected


def check_against_peft(llm: LLM, requests: list, expected: dict) -> None:
    """Every prompt under every adapter (and none) in one ``generate``: peft's greedy tokens, logprobs within 2e-4."""
    cases = [(request, i) for request in requests for i in range(len(PROMPTS))]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=0)
    outputs = llm.generate([PROMPTS[i] for _, i in cases], params, lora_request=[r for r, _ in cases],
                           use_tqdm=False)
    for case, output in zip(cases, outputs):
        tokens, logprobs = expected[case]
        got = output.outputs[0]
        assert list(got.token_ids) == tokens, case
        assert output.lora_request == case[0]
        ours = [entry[token].logprob for entry, token in zip(got.logprobs, got.token_ids)]
        np.testing.assert_allclose(ours, logprobs, atol=2e-4, err_msg=str(case))


NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2, "prompt_lookup_min": 1}


@pytest.mark.parametrize("options", [dict(), dict(unroll_layers=True, num_scheduler_steps=4),
                                     dict(speculative_config=NGRAM), dict(fuse_projections=False)],
                         ids=["scanned", "unrolled-multistep", "ngram-drafts", "matrices-apart"])
def test_adapters_and_base_in_one_batch_match_peft(llama, options):
    path, requests, expected = llama
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32", block_size=8, enable_lora=True, max_loras=2,
              max_lora_rank=8, **options)
    check_against_peft(llm, requests, expected)
    # The same prompts again: their blocks are cached per adapter, so each finds its own K/V, not another's.
    check_against_peft(llm, requests, expected)
    assert llm.stats()["prefix_cache_hits"] > 0
    if "speculative_config" in options:  # drafts ran, with their sequence's adapter
        assert llm.stats()["spec_decode_num_draft_tokens"] > 0


def test_rank_and_alpha_patterns_match_peft(llama, tmp_path):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` (a module's own rank and alpha, by the end of its name): peft's
    greedy tokens and logprobs."""
    path, _, _ = llama
    model = make_adapter(tmp_path / "patterns", "llama", 3, ALL_LLAMA_MODULES, r=8, alpha=16,
                         rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2}, alpha_pattern={"v_proj": 4})
    request = LoRARequest("patterns", 1, str(tmp_path / "patterns" / "adapter"))
    expected = {(request, i): hf_greedy(model, prompt, MAX_TOKENS) for i, prompt in enumerate(PROMPTS)}
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32", block_size=8, enable_lora=True, max_lora_rank=8)
    check_against_peft(llm, [request], expected)


def test_an_adapter_saved_as_a_pytorch_bin(llama, tmp_path):
    """Older trainers save ``adapter_model.bin`` (a PyTorch pickle), which vLLM reads too: the same adapter, peft's
    tokens; a pickle that is not weights only is refused."""
    from safetensors.numpy import load_file

    path, requests, expected = llama
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(os.path.join(requests[2].lora_path, "adapter_config.json"), folder)
    tensors = load_file(os.path.join(requests[2].lora_path, "adapter_model.safetensors"))
    torch.save({name: torch.from_numpy(value) for name, value in tensors.items()}, folder / "adapter_model.bin")
    request = LoRARequest("two-bin", 2, str(folder))
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32", block_size=8, enable_lora=True, max_lora_rank=8)
    check_against_peft(llm, [request], {(request, i): expected[(requests[2], i)] for i in range(len(PROMPTS))})
    torch.save({"code": print}, folder / "adapter_model.bin")
    with pytest.raises(LoRAAdapterError, match="adapter_model.bin is unreadable"):
        llm.generate([[1, 2, 3]], lora_request=LoRARequest("evil", 3, str(folder)), use_tqdm=False)


def test_beam_search_with_an_adapter(llama):
    """``LLM.beam_search(..., lora_request=...)``: width 1 is the adapter's greedy continuation."""
    from engine import BeamSearchParams

    path, requests, expected = llama
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32", block_size=8, enable_lora=True, max_lora_rank=8)
    best = llm.beam_search([{"prompt_token_ids": PROMPTS[0]}], BeamSearchParams(beam_width=1, max_tokens=MAX_TOKENS),
                           use_tqdm=False, lora_request=requests[1])[0].sequences[0]
    assert best.tokens[len(PROMPTS[0]):] == expected[(requests[1], 0)][0]


def test_samples_of_one_request_share_its_adapter(llama):
    """n=2 (top_k=1: each sample greedy): the second sample, a fork of the first sharing its prompt's blocks, runs
    the request's adapter too."""
    path, requests, expected = llama
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32", block_size=8, enable_lora=True, max_lora_rank=8)
    out = llm.generate([PROMPTS[2]], SamplingParams(n=2, top_k=1, max_tokens=MAX_TOKENS), use_tqdm=False,
                       lora_request=requests[2])[0]
    assert [list(c.token_ids) for c in out.outputs] == [expected[(requests[2], 2)][0]] * 2


def test_one_slot_runs_two_adapters_in_turn(llama):
    """max_loras=1: the requests of the second adapter wait for the first's to finish; every output is right."""
    path, requests, expected = llama
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32", block_size=8, enable_lora=True, max_loras=1,
              max_lora_rank=8, max_cpu_loras=1)
    check_against_peft(llm, requests, expected)
    slots = llm.llm_engine.lora_slots
    assert slots.num_loads >= 2 and [r.lora_name for r in slots.adapters()] == ["one", "two"]


@pytest.mark.parametrize("variant", ["qwen2", "gemma2", "granite", "olmo2"])
def test_adapters_on_other_architectures_match_peft(tmp_path, variant):
    """Every matrix's update where the architecture differs around it: q/k/v biases (Qwen2), the block's output
    normed after the update (Gemma 2, OLMo 2), the residual multiplier (Granite)."""
    adapter_of_variant_matches_peft(tmp_path, variant, ALL_LLAMA_MODULES)


def test_phi3_fused_projection_adapter_matches_peft(tmp_path):
    """Phi-3 checkpoints join q/k/v and gate/up: PEFT's ``qkv_proj`` / ``gate_up_proj`` updates split into ours."""
    adapter_of_variant_matches_peft(tmp_path, "phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], lora_id=7)


def adapter_of_variant_matches_peft(tmp_path, variant: str, targets: list[str], lora_id: int = 1) -> LLM:
    """A rank-4 peft adapter of ``targets`` on a tiny ``variant`` checkpoint: the engine gives peft's tokens and
    logprobs, with and without it (``check_against_peft``). Returns the engine (max_lora_rank 4)."""
    base = write_tiny_checkpoint(tmp_path / "base", variant, seed=1)
    model = make_adapter(tmp_path / "a", variant, 3, targets, r=4, alpha=8)
    request = LoRARequest("a", lora_id, str(tmp_path / "a" / "adapter"))
    expected = {(r, i): hf_greedy(m, p, MAX_TOKENS) for r, m in ((None, base), (request, model))
                for i, p in enumerate(PROMPTS)}
    llm = LLM(str(tmp_path / "base"), skip_tokenizer_init=True, dtype="float32", block_size=8, enable_lora=True,
              max_lora_rank=4)
    check_against_peft(llm, [None, request], expected)
    return llm


def write_adapter(path, config: dict, tensors: dict) -> str:
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    return str(path)


def test_errors_are_clear_and_lose_nothing(llama, tmp_path):
    path, requests, expected = llama
    llm = LLM(path, skip_tokenizer_init=True, dtype="float32", block_size=8, enable_lora=True, max_lora_rank=4)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    a = np.zeros((4, 64), np.float32)
    cases = [
        (LoRARequest("big", 11, requests[1].lora_path), "exceeds max_lora_rank=4"),
        (LoRARequest("gone", 12, str(tmp_path / "nowhere")), "does not exist"),
        (LoRARequest("embed", 13, write_adapter(tmp_path / "embed", config, {
            "base_model.model.model.embed_tokens.lora_embedding_A": a})), "is not a LoRA update"),
        (LoRARequest("misplaced", 17, write_adapter(tmp_path / "misplaced", config, {  # q_proj is attention's
            "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight": a})), "is not a LoRA update"),
        (LoRARequest("shape", 14, write_adapter(tmp_path / "shape", config, {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 32), np.float32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((128, 4), np.float32)})),
         r"has shape \[4, 32\], expected \[4, 64\]"),
        (LoRARequest("half", 15, write_adapter(tmp_path / "half", config, {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a})), "must come in pairs"),
        (LoRARequest("dora", 16, write_adapter(tmp_path / "dora", {**config, "use_dora": True}, {})),
         "use_dora=True is not supported"),
        (LoRARequest("two", 2, requests[1].lora_path), "already names adapter"),
    ]
    llm.generate([[1, 2, 3]], lora_request=requests[2], use_tqdm=False)  # id 2 taken by "two"
    for request, message in cases:
        with pytest.raises(LoRAAdapterError, match=message):
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), lora_request=request, use_tqdm=False)
    with pytest.raises(ValueError, match="got 2 lora_requests for 1 prompts"):
        llm.generate([[1, 2, 3]], lora_request=[None, None], use_tqdm=False)
    # The same folder written otherwise (a trailing slash) is the same adapter under its id.
    same = LoRARequest(requests[2].lora_name, 2, requests[2].lora_path + os.sep)
    assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), lora_request=same,
                            use_tqdm=False)[0].outputs[0].token_ids) == 2
    # Nothing was queued; the engine still serves.
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == expected[(None, 1)][0]
    off = LLM(path, skip_tokenizer_init=True, dtype="float32", block_size=8)
    with pytest.raises(ValueError, match="LoRA is off: start the engine with enable_lora=True"):
        off.generate([[1, 2, 3]], lora_request=requests[1], use_tqdm=False)


@pytest.mark.parametrize("field, value, message", [
    ("max_loras", 0, "max_loras must be a positive integer"),
    ("max_lora_rank", 1.5, "max_lora_rank must be a positive integer"),
    ("max_cpu_loras", 1, r"max_cpu_loras \(1\) must be >= max_loras \(2\)"),
])
def test_engine_args_are_checked(field, value, message):
    args = EngineArgs(enable_lora=True, **{"max_loras": 2, field: value})
    with pytest.raises(ValueError, match=message):
        args.validate()


def test_embeddings_with_an_adapter_match_peft(tmp_path):
    """A pooling engine with LoRA (an embedding model's adapter): each prompt's last-token embedding is peft's
    model's normed last hidden state, with and without the adapter in one call; precompiled, nothing compiles
    while it runs."""
    from engine.compile_timer import CompileTimer

    base = write_tiny_checkpoint(tmp_path / "base", "qwen3", seed=1)
    model = make_adapter(tmp_path / "a", "qwen3", 4, ALL_LLAMA_MODULES, r=4, alpha=8)
    request = LoRARequest("a", 1, str(tmp_path / "a" / "adapter"))

    def hf_embedding(decoder, prompt):
        with torch.no_grad():
            last = decoder(torch.tensor([prompt])).last_hidden_state[0, -1].numpy().astype(np.float64)
        return last / np.linalg.norm(last)

    llm = LLM(str(tmp_path / "base"), skip_tokenizer_init=True, runner="pooling", dtype="float32", block_size=8,
              max_model_len=64, max_num_batched_tokens=32, max_num_seqs=4, enable_lora=True, max_lora_rank=4,
              precompile_steps=True)
    cases = [(r, i) for r in (None, request) for i in range(len(PROMPTS))]
    with CompileTimer() as timer:
        outs = llm.embed([PROMPTS[i] for _, i in cases], use_tqdm=False, lora_request=[r for r, _ in cases])
    assert timer.compiled() == []
    for (r, i), out in zip(cases, outs):
        decoder = base.model if r is None else model.base_model.model.model
        np.testing.assert_allclose(out.outputs.embedding, hf_embedding(decoder, PROMPTS[i]), atol=2e-5)


def test_classify_takes_an_adapter(tmp_path):
    """``LLM.classify`` with ``lora_request``: a sequence classifier's probabilities with and without an adapter of
    its decoder (peft on transformers' classifier, the score head as it was), in one call."""
    import transformers

    from tests.tiny_checkpoints import randomize_, tiny_hf_config

    config = tiny_hf_config("llama", num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    classifier = transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32,
                                                                             attn_implementation="eager")
    randomize_(classifier, seed=3)
    classifier.save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    with torch.no_grad():
        plain = [classifier.eval()(torch.tensor([p])).logits[0].numpy().astype(np.float64) for p in PROMPTS]
    adapted = random_lora(classifier, 5, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LLAMA_MODULES,
                                                         init_lora_weights=False))
    with torch.no_grad():
        with_adapter = [adapted(torch.tensor([p])).logits[0].numpy().astype(np.float64) for p in PROMPTS]
    adapted.save_pretrained(str(tmp_path / "adapter"))
    request = LoRARequest("cls", 1, str(tmp_path / "adapter"))
    llm = LLM(str(tmp_path / "base"), skip_tokenizer_init=True, dtype="float32", block_size=8, max_model_len=64,
              max_num_seqs=4, enable_lora=True, max_lora_rank=4)
    try:
        cases = [(r, i) for r in (None, request) for i in range(len(PROMPTS))]
        outs = llm.classify([PROMPTS[i] for _, i in cases], use_tqdm=False, lora_request=[r for r, _ in cases])
        for (r, i), out in zip(cases, outs):
            logits = (plain if r is None else with_adapter)[i]
            assert not np.allclose(plain[i], with_adapter[i], atol=1e-3)
            np.testing.assert_allclose(out.outputs.probs, np.exp(logits) / np.exp(logits).sum(), atol=2e-5)
    finally:
        llm.shutdown()


def test_score_through_an_adapter_is_the_cosine_of_its_embeddings(tmp_path):
    """``LLM.score`` with ``lora_request``: the cosine of the adapter's embeddings, not the base model's (asked after
    a sleep and wake-up, which keep the pooling engine's weights and adapter slots)."""
    write_tiny_checkpoint(tmp_path / "base", "qwen3", seed=1)
    make_adapter(tmp_path / "a", "qwen3", 4, ALL_LLAMA_MODULES, r=4, alpha=8)
    request = LoRARequest("a", 1, str(tmp_path / "a" / "adapter"))
    llm = LLM(str(tmp_path / "base"), skip_tokenizer_init=True, runner="pooling", dtype="float32", block_size=8,
              max_model_len=64, max_num_seqs=4, enable_lora=True, max_lora_rank=4)
    try:
        first, *others = llm.embed(PROMPTS, use_tqdm=False, lora_request=request)
        llm.sleep()
        llm.wake_up()
        scores = llm.score(PROMPTS[0], PROMPTS[1:], use_tqdm=False, lora_request=request)
        plain = llm.score(PROMPTS[0], PROMPTS[1:], use_tqdm=False)
        for got, other, base in zip(scores, others, plain):
            want = np.dot(first.outputs.embedding, other.outputs.embedding)
            assert abs(got.outputs.score - want) < 1e-5 and abs(base.outputs.score - want) > 1e-4
    finally:
        llm.shutdown()


def test_lora_request_fields_are_checked():
    with pytest.raises(ValueError, match="lora_int_id must be an integer >= 1"):
        LoRARequest("a", 0, "/x")
    with pytest.raises(ValueError, match="lora_name must be a non-empty string"):
        LoRARequest("", 1, "/x")


def test_mixture_of_experts_attention_adapter_matches_peft(tmp_path):
    """A mixture of experts (Qwen3-MoE) runs an adapter of its attention; an update of its MLP (the experts) is
    refused by name."""
    from models.config import ModelConfig
    from models.lora import write_random_adapter

    llm = adapter_of_variant_matches_peft(tmp_path, "qwen3_moe", ["q_proj", "k_proj", "v_proj", "o_proj"])
    with open(tmp_path / "base" / "config.json") as f:  # a dense model of its shape writes an MLP update
        dense = ModelConfig.from_hf_dict({**json.load(f), "model_type": "qwen3"})
    mlp = write_random_adapter(str(tmp_path / "mlp"), dense, ["down_proj"], r=4)
    with pytest.raises(LoRAAdapterError, match="updates the MLP of qwen3_moe, a mixture of experts"):
        llm.generate([[1, 2, 3]], lora_request=LoRARequest("mlp", 2, mlp), use_tqdm=False)


def test_slots_load_least_recently_used_first(llama):
    """``LoRASlots``: a step's adapters keep their slots; a new one replaces the least recently used."""
    path, requests, _ = llama
    from models.config import ModelConfig

    loads = []
    slots = LoRASlots(ModelConfig.from_pretrained(path), 2, 8, 2, lambda slot, weights: loads.append(slot))
    one, two = requests[1], requests[2]
    three = LoRARequest("three", 3, one.lora_path)
    for r in (one, two, three):
        slots.check(r)
    assert slots.slots_for({1}) == {1: 1} and slots.slots_for({1, 2}) == {1: 1, 2: 2}
    assert slots.slots_for({2}) == {2: 2} and loads == [1, 2]
    assert slots.slots_for({3, 2}) == {3: 1, 2: 2} and loads == [1, 2, 1]  # 1 was the least recently used
    with pytest.raises(RuntimeError, match="more than max_loras=2"):
        slots.slots_for({1, 2, 3})
    # The metrics' reading (vLLM's vllm:lora_requests_info): adapters of running and of waiting requests, by name.
    from engine.block_manager import BlockManager
    from engine.request import Request
    from engine.scheduler import Scheduler

    scheduler = Scheduler(BlockManager(64, 4), max_num_batched_tokens=64, max_num_seqs=8, max_model_len=32,
                          max_loras=1)
    for i, lora_id in enumerate((3, 1, 0, 3)):
        scheduler.add_request(Request(f"r{i}", [1, 2, 3], lora_id=lora_id))
    scheduler.schedule()
    assert slots.usage(scheduler) == {"max_lora": 2, "running": ["three"], "waiting": ["one"]}


def test_scheduler_passes_over_a_request_whose_adapter_has_no_slot():
    """max_loras=1: adapter 2's request waits while adapter 1's runs; the base model's and adapter 1's requests
    behind it start at once (as vLLM's scheduler does); it starts when adapter 1's requests are done."""
    from engine.block_manager import BlockManager
    from engine.request import Request, RequestStatus
    from engine.scheduler import Scheduler

    scheduler = Scheduler(BlockManager(64, 4), max_num_batched_tokens=64, max_num_seqs=8, max_model_len=32,
                          max_loras=1)
    requests = [Request(f"r{i}", [1, 2, 3], lora_id=lora_id) for i, lora_id in enumerate((1, 2, 0, 1))]
    for r in requests:
        scheduler.add_request(r)
    first = scheduler.schedule()
    assert [s.request_id for s in first.scheduled] == ["r0", "r2", "r3"]
    assert requests[1].status is RequestStatus.WAITING
    scheduler.update_after_step(first, {s.request_id: 7 for s in first.scheduled})
    for rid in ("r0", "r3"):
        scheduler.finish_request(rid, RequestStatus.FINISHED_STOPPED)
    second = scheduler.schedule()
    assert sorted(s.request_id for s in second.scheduled) == ["r1", "r2"]


def test_random_adapter_reads_back_split_and_scaled(tmp_path):
    """``write_random_adapter`` (benchmarks' adapters) in PEFT's layout: a fused ``qkv_proj``'s B rows split into
    wq / wk / wv, scaled by alpha / r, padded to the slot rank; untouched matrices zero."""
    from safetensors.numpy import load_file

    from models.config import ModelConfig
    from models.lora import read_adapter, write_random_adapter

    write_tiny_checkpoint(tmp_path / "base", "phi3", seed=0)
    config = ModelConfig.from_pretrained(str(tmp_path / "base"))
    path = write_random_adapter(str(tmp_path / "a"), config, ["qkv_proj"], r=2, lora_alpha=3.0, seed=5)
    weights = read_adapter(path, config, max_rank=4)
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.1.self_attn.qkv_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.qkv_proj.lora_B.weight"]
    q, kv = config.q_size, config.kv_size
    np.testing.assert_array_equal(weights["wk"][0][1, :, :2], a.T)
    np.testing.assert_allclose(weights["wk"][1][1, :2], 1.5 * b[q:q + kv].T)
    assert not weights["wk"][0][:, :, 2:].any() and not weights["w_down"][1].any()


def test_joined_and_separate_updates_agree(llama):
    """The forward's four ways to add an adapter's q/k/v and gate/up updates: weights joined or apart (act-order int4
    weights stay apart on one device), updates joined (one ``a``, a block-diagonal ``b``) or one a matrix; the
    adapter in slot 2 of 2, every row its. The same logits, within float32 rounding (1e-4, as against transformers)."""
    import jax
    import jax.numpy as jnp

    from models.batch import make_kv_cache
    from models.config import ModelConfig
    from models.generate import _contiguous_batch
    from models.llama import forward, fuse_projections
    from models.lora import empty_lora_params, read_adapter, set_slot
    from models.safetensors_loader import load_safetensors_params

    path, requests, _ = llama
    config = ModelConfig.from_pretrained(path)
    params = load_safetensors_params(path, config, jnp.float32, progress=False)
    adapter = read_adapter(requests[1].lora_path, config, max_rank=8)
    lengths = [len(p) for p in PROMPTS]
    batch = _contiguous_batch(lengths, [0] * len(PROMPTS), 3, 8, np.concatenate(PROMPTS), all_logits=True)
    batch = batch.replace(lora_slots=jnp.full(sum(lengths), 2, jnp.int32))
    logits = []
    for joined_weights in (False, True):
        for joined_updates in (False, True):
            lora = empty_lora_params(config, 2, 8, np.float32, joined=joined_updates)
            with_lora = {**params, "layers": {**params["layers"], "lora": set_slot(lora["lora"], adapter, 2)},
                         "lora_columns": lora["lora_columns"]}
            with_lora = fuse_projections(with_lora) if joined_weights else with_lora
            out, _ = jax.jit(forward, static_argnames=("config",))(
                with_lora, make_kv_cache(config, 1 + 3 * len(PROMPTS), 8, jnp.float32), batch, config=config)
            logits.append(np.asarray(out))
    for other in logits[1:]:
        np.testing.assert_allclose(other, logits[0], atol=1e-4, rtol=1e-4)
    plain, _ = jax.jit(forward, static_argnames=("config",))(
        params, make_kv_cache(config, 1 + 3 * len(PROMPTS), 8, jnp.float32), batch, config=config)
    assert np.abs(np.asarray(plain) - logits[0]).max() > 0.1  # the adapter bites


def test_queued_requests_keep_their_adapters_read(llama, tmp_path):
    """max_cpu_loras=1 and two adapters whose requests wait together: both stay read on the host until their
    requests end, so the steps never read a folder again (here both folders are gone before the first step)."""
    import shutil

    from engine.outputs import RequestOutputKind

    path, requests, expected = llama
    from engine import LLMEngine

    engine = LLMEngine(EngineArgs(model=path, dtype="float32", block_size=8, enable_lora=True, max_loras=1,
                                  max_lora_rank=8, max_cpu_loras=1), skip_tokenizer_init=True)  # stepped here
    copies = [LoRARequest(r.lora_name, r.lora_int_id, shutil.copytree(r.lora_path, tmp_path / r.lora_name))
              for r in requests[1:]]
    for request in copies:
        engine.add_request(request.lora_name, PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
                           lora_request=request, output_kind=RequestOutputKind.FINAL_ONLY)
    for request in copies:
        shutil.rmtree(request.lora_path)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: list(o.outputs[0].token_ids) for o in engine.step() if o.finished})
    assert done == {r.lora_name: expected[(r, 0)][0] for r in requests[1:]}
    assert len(engine.lora_slots._host) <= 1  # back within max_cpu_loras once they ended


def test_weight_update_keeps_the_adapters(tmp_path):
    """``update_weights_from_disk`` with LoRA enabled: the adapters' device slots stay beside the new weights, so an
    adapter request then gives a fresh engine's tokens on the new checkpoint with the same adapter; sleep level 2,
    which would drop the slots with the weights, is refused."""
    make_adapter(str(tmp_path / "one"), "llama", seed=3, targets=["q_proj", "v_proj", "gate_proj"], r=4, alpha=8)
    write_tiny_checkpoint(str(tmp_path / "b"), "llama", seed=2)
    request = LoRARequest("one", 1, str(tmp_path / "one" / "adapter"))
    options = dict(dtype="float32", skip_tokenizer_init=True, max_model_len=64, max_num_seqs=4,
                   num_gpu_blocks_override=16, block_size=8, enable_lora=True, max_lora_rank=4)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [list(range(1, 20)), [5, 6, 7]]

    def tokens(llm, lora=request):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, lora_request=lora, use_tqdm=False)]

    fresh = LLM(str(tmp_path / "b"), **options)
    want, want_base = tokens(fresh), tokens(fresh, None)
    assert want != want_base  # the adapter changes the tokens: the check has teeth
    fresh.shutdown()
    llm = LLM(str(tmp_path / "one" / "base"), **options)
    before = tokens(llm)  # the adapter now in a device slot
    llm.update_weights_from_disk(str(tmp_path / "b"))
    assert tokens(llm) == want != before and tokens(llm, None) == want_base
    with pytest.raises(ValueError, match="LoRA"):
        llm.sleep(level=2)
    llm.shutdown()
