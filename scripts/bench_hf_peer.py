"""The Hugging Face peer of the engine benchmarks: ``transformers`` ``generate()`` (PyTorch, eager,
its default dynamic cache) with random weights of the same config, on the same device.

Times PROTOCOL workloads at a batch it can hold (all prompts of a batch have the
same length, so nothing is padded), greedy, with end-of-sequence disabled so every
request produces exactly its output length. Prompts are the same random token ids
as ours (``bench_common.random_prompts``). Normally started by ``bench_latency`` /
``bench_throughput --peer hf`` in a child process, before JAX takes the GPU:

    python scripts/bench_hf_peer.py --model benchmarks/models/llama-3.1-8b \\
        --run latency:1:128:256:1 --run tput-short:256:128:128:256 --json-out /tmp/peer.json

``--run workload:requests:input:output:batch``. Knows nothing of our engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common  # noqa: E402


def load_random_model(model_dir: str, dtype: str, device):
    import torch
    import transformers

    if not os.path.exists(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"the Hugging Face peer needs a folder with a config.json, got {model_dir!r}")
    config = transformers.AutoConfig.from_pretrained(model_dir)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        torch_dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "half": "float16",
                                      "float": "float32"}.get(dtype, dtype))
    torch.manual_seed(0)
    with torch.device(device):  # initialise straight on the device: an 8B model never sits on the host
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    return model.eval(), config


class Peer:
    def __init__(self, model_dir: str, dtype: str, seed: int):
        import torch

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.config = load_random_model(model_dir, dtype, self.device)
        self.seed = seed
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def generate_seconds(self, prompts: list[list[int]], new_tokens: int) -> float:
        """Wall time of one greedy ``generate()`` of exactly ``new_tokens`` tokens per prompt."""
        import transformers

        ids = self.torch.tensor(prompts, device=self.device)
        gen = transformers.GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                            eos_token_id=None, pad_token_id=0)
        self._sync()
        start = time.perf_counter()
        with self.torch.inference_mode():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), generation_config=gen)
        self._sync()
        seconds = time.perf_counter() - start
        if out.shape[1] != ids.shape[1] + new_tokens:
            raise RuntimeError(f"generate() made {out.shape[1] - ids.shape[1]} tokens, expected {new_tokens}")
        return seconds

    def run(self, workload: str, num_requests: int, input_len: int, output_len: int, batch: int) -> dict:
        prompts = bench_common.random_prompts(num_requests, input_len, self.config.vocab_size, self.seed)
        batches = [prompts[i:i + batch] for i in range(0, num_requests, batch)]
        self.generate_seconds(batches[0], min(4, output_len))  # warm-up: CUDA context, kernels, allocator
        result = dict(name="transformers.generate (eager, dynamic cache)", device=self.device_name(),
                      torch_version=self.torch.__version__, transformers_version=_transformers_version(),
                      dtype=self.dtype, num_requests=num_requests, input_len=input_len, output_len=output_len,
                      batch_size=batch)
        if workload == "latency":
            ttft = statistics.median(self.generate_seconds(batches[0], 1) for _ in range(3))
            total = self.generate_seconds(batches[0], output_len)
            result.update(ttft_ms=ttft * 1e3, tpot_ms=(total - ttft) / max(1, output_len - 1) * 1e3,
                          output_tok_s=output_len / total, e2e_ms=total * 1e3)
        else:
            seconds = sum(self.generate_seconds(b, output_len) for b in batches)
            result.update(output_tok_s=num_requests * output_len / seconds,
                          total_tok_s=num_requests * (input_len + output_len) / seconds,
                          req_s=num_requests / seconds, seconds=seconds)
        return result

    def device_name(self) -> str:
        return self.torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def parse_run(text: str) -> tuple[str, int, int, int, int]:
    parts = text.split(":")
    if len(parts) != 5:
        raise argparse.ArgumentTypeError(f"--run wants workload:requests:input:output:batch, got {text!r}")
    workload, *numbers = parts
    try:
        n, i, o, b = (int(x) for x in numbers)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--run {text!r}: requests, input, output and batch must be integers")
    if min(n, i, o, b) < 1:
        raise argparse.ArgumentTypeError(f"--run {text!r}: every size must be >= 1")
    return workload, n, i, o, b


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=bench_common.DEFAULT_MODEL)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=bench_common.PROMPT_SEED)
    parser.add_argument("--run", type=parse_run, action="append", required=True)
    parser.add_argument("--json-out", required=True)
    args = parser.parse_args(argv)
    peer = Peer(args.model, args.dtype, args.seed)
    results = {}
    for workload, n, i, o, b in args.run:
        start = time.perf_counter()
        try:
            results[workload] = peer.run(workload, n, i, o, b)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: report it, keep the other workloads
            results[workload] = {"error": f"{type(exc).__name__}: {exc}"}
            if peer.device.type == "cuda":
                peer.torch.cuda.empty_cache()
        print(f"peer {workload}: {json.dumps(results[workload])} ({time.perf_counter() - start:.0f} s)", flush=True)
    with open(args.json_out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
