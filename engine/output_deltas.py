"""A request's outputs as deltas on the engine process's pipe (``engine.engine_process``).

A cumulative ``RequestOutput`` (all tokens and text so far) pickled every step is O(length) a step, O(length^2) a
request: with 512 streams, pickling took 18% of the engine child's samples and competed with its engine thread for
the GIL (``py-spy``, benchmarks/NOTES.md, session of 2026-12-04 from 20:31). So the child's requests ask the engine
for ``RequestOutputKind.DELTA`` outputs, which say only what is new, ``encode`` packs one into plain tuples (cheap to
pickle), and ``DeltaDecoder`` here rebuilds the cumulative output the parent's callers expect, in fresh lists each
time, so an output a caller holds never changes under it. Deltas only ever append (``RequestOutputKind``).
"""

from __future__ import annotations

from typing import Optional, Union

from engine.outputs import CompletionOutput, RequestOutput
from engine.pooling import POOLED_OUTPUTS, ClassificationRequestOutput, EmbeddingRequestOutput, PoolingRequestOutput

# One completion's delta: (index, tokens added, text added, cumulative logprob, logprobs entries added or None,
# finish reason, stop reason). A request's: (finished, (prompt, prompt_token_ids, num_cached_tokens, prompt_logprobs,
# lora_request, metrics) on its first output else None, completions' deltas, its metrics again on its last output
# else None). A request's first output comes after the step that first scheduled it (or as it is aborted
# unscheduled); its last has the token and finish times too.


def encode(output: Union[RequestOutput, EmbeddingRequestOutput, ClassificationRequestOutput,
                          PoolingRequestOutput]) -> tuple:
    """A ``RequestOutputKind.DELTA`` output as tuples for the pipe (a pooled output whole: it is final, and
    comes once)."""
    if isinstance(output, POOLED_OUTPUTS):
        return True, None, output, None
    prompt = ((output.prompt, output.prompt_token_ids, output.num_cached_tokens, output.prompt_logprobs,
               output.lora_request, output.metrics) if output.prompt_token_ids is not None else None)
    return output.finished, prompt, [(c.index, c.token_ids, c.text, c.cumulative_logprob, c.logprobs,
                                      c.finish_reason, c.stop_reason) for c in output.outputs], \
        output.metrics if output.finished and prompt is None else None


class DeltaDecoder:
    """The parent's side, one per request: the cumulative ``RequestOutput`` after each delta."""

    def __init__(self):
        self._prompt: tuple = (None, None, None, None, None, None)
        self._completions: dict[int, tuple[list, str, Optional[list]]] = {}  # index -> (tokens, text, logprobs)

    def decode(self, request_id: str, delta: tuple) -> Union[RequestOutput, EmbeddingRequestOutput,
                                                             ClassificationRequestOutput, PoolingRequestOutput]:
        finished, prompt, completions, last_metrics = delta
        if isinstance(completions, POOLED_OUTPUTS):
            return completions
        if prompt is not None:
            self._prompt = prompt
        if last_metrics is not None:
            self._prompt = (*self._prompt[:5], last_metrics)
        outputs = []
        for index, tokens_added, text_added, cumulative_logprob, logprobs_added, finish_reason, stop_reason \
                in completions:
            tokens, text, logprobs = self._completions.get(index, ([], "", None))
            tokens = tokens + tokens_added
            text = text + text_added
            logprobs = None if logprobs_added is None else (logprobs or []) + logprobs_added
            self._completions[index] = (tokens, text, logprobs)
            outputs.append(CompletionOutput(index=index, text=text, token_ids=tokens,
                                            cumulative_logprob=cumulative_logprob, logprobs=logprobs,
                                            finish_reason=finish_reason, stop_reason=stop_reason))
        prompt_text, prompt_token_ids, num_cached_tokens, prompt_logprobs, lora_request, metrics = self._prompt
        return RequestOutput(request_id=request_id, prompt=prompt_text, prompt_token_ids=prompt_token_ids,
                             outputs=outputs, finished=finished, num_cached_tokens=num_cached_tokens,
                             prompt_logprobs=prompt_logprobs, lora_request=lora_request, metrics=metrics)
