"""A request's outputs as deltas, for the engine process's pipe (``engine.engine_process``).

The engine hands each request a cumulative ``RequestOutput`` every step: all its tokens and text so far. Pickled
across the pipe that is O(length) a step, O(length^2) a request: with 512 streams, pickling took 18% of the engine
child's samples and competed with its engine thread for the GIL (``py-spy``, benchmarks/NOTES.md, session of
2026-12-04 from 20:31). So the child sends only what changed (``DeltaEncoder``) and the parent rebuilds the
cumulative output its callers expect (``DeltaDecoder``), in fresh lists each time, so an output a caller holds
never changes under it.

Each field is sent as ``(keep, added)``: keep the first ``keep`` items of what was sent, then append ``added``.
Token ids and text mostly grow (the final text may be cut at a stop string); ``keep`` is their common prefix
with what was sent, so any change comes out right. Logprobs are only ever appended, a token at a time.
"""

from __future__ import annotations

from typing import Optional

from engine.outputs import CompletionOutput, RequestOutput

# One completion's delta: (index, tokens kept, tokens added, text kept, text added, cumulative logprob,
# logprobs kept, logprobs added or None, finish reason, stop reason).
# A request's: (finished, (prompt, prompt_token_ids) on its first output else None, completions' deltas).


class DeltaEncoder:
    """The child's side, one per request: each cumulative output as the delta since the last."""

    def __init__(self):
        self._sent: dict[int, tuple[list, str, int]] = {}  # index -> (token ids, text, logprobs count) sent
        self._first = True

    def encode(self, output: RequestOutput) -> tuple:
        prompt = (output.prompt, output.prompt_token_ids) if self._first else None
        self._first = False
        completions = []
        for c in output.outputs:
            tokens_sent, text_sent, logprobs_sent = self._sent.get(c.index, ([], "", 0))
            tokens_kept, text_kept = _common_prefix(tokens_sent, c.token_ids), _common_prefix(text_sent, c.text)
            logprobs = c.logprobs
            logprobs_kept = 0 if logprobs is None else min(logprobs_sent, len(logprobs))
            completions.append((c.index, tokens_kept, c.token_ids[tokens_kept:], text_kept, c.text[text_kept:],
                                c.cumulative_logprob, logprobs_kept,
                                None if logprobs is None else logprobs[logprobs_kept:], c.finish_reason,
                                c.stop_reason))
            self._sent[c.index] = (list(c.token_ids), c.text, 0 if logprobs is None else len(logprobs))
        return output.finished, prompt, completions


def _common_prefix(old, new) -> int:
    """The length of the longest common prefix of two lists or strings (usually all of ``old``)."""
    n = min(len(old), len(new))
    if old[:n] == new[:n]:
        return n
    return next(i for i in range(n) if old[i] != new[i])


class DeltaDecoder:
    """The parent's side, one per request: the cumulative ``RequestOutput`` after each delta."""

    def __init__(self):
        self._prompt: tuple = (None, None)
        self._completions: dict[int, tuple[list, str, Optional[list]]] = {}  # index -> (tokens, text, logprobs)

    def decode(self, request_id: str, delta: tuple) -> RequestOutput:
        finished, prompt, completions = delta
        if prompt is not None:
            self._prompt = prompt
        outputs = []
        for (index, tokens_kept, tokens_added, text_kept, text_added, cumulative_logprob, logprobs_kept,
             logprobs_added, finish_reason, stop_reason) in completions:
            tokens, text, logprobs = self._completions.get(index, ([], "", None))
            tokens = tokens[:tokens_kept] + tokens_added
            text = text[:text_kept] + text_added
            logprobs = None if logprobs_added is None else (logprobs or [])[:logprobs_kept] + logprobs_added
            self._completions[index] = (tokens, text, logprobs)
            outputs.append(CompletionOutput(index=index, text=text, token_ids=tokens,
                                            cumulative_logprob=cumulative_logprob, logprobs=logprobs,
                                            finish_reason=finish_reason, stop_reason=stop_reason))
        return RequestOutput(request_id=request_id, prompt=self._prompt[0], prompt_token_ids=self._prompt[1],
                             outputs=outputs, finished=finished)
