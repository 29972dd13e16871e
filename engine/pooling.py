"""Pooling (embedding and classification) models: one vector a prompt from the last layer's hidden states, as vLLM's
pooling runner; a sequence-classification checkpoint's ``score`` head turns the last token's into class
probabilities (``LLM.classify``).

Owns ``PoolingParams``, the pooled outputs (``EmbeddingRequestOutput``, vLLM's shape: ``.outputs.embedding``; and
``ScoringRequestOutput``, two texts' cosine, with vLLM's pairing of ``LLM.score``), the
pooling a checkpoint's sentence-transformers files name (``pooling_config``: ``1_Pooling/config.json``'s mode,
``modules.json``'s Normalize), and a request's pooled vector from the rows its prompt chunks returned
(``PooledRows``: the last token's, the mean of all, or the first token's; normalised, cut to ``dimensions``).
vLLM's per-token tasks keep every prompt row: ``token_embed`` (each token's vector, normalised as an embedding) and
``token_classify`` (a classifier's head on each token: ``LLM.reward``), as a ``PoolingRequestOutput`` of
``[tokens, ...]``.
The rows come from ``engine.runner.ModelRunner.dispatch_pool``; the engine (``engine.llm_engine``) finishes a
request when its prompt's last chunk has run. Plain host code: no JAX here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np

POOLING_TYPES = ("LAST", "MEAN", "CLS")
RUNNERS = ("auto", "generate", "pooling")
# vLLM's pooling tasks: a model embeds (and ``token_embed``: a vector a token) or, a sequence classifier, classifies
# (and ``token_classify``: its head on every token, a reward model's per-token rewards).
POOLING_TASKS = ("embed", "classify", "token_embed", "token_classify")
PER_TOKEN_TASKS = ("token_embed", "token_classify")


def model_tasks(classifier: bool) -> tuple[str, str]:
    """The pooling tasks a model can run: a classifier's or an embedding model's, pooled and per token."""
    return ("classify", "token_classify") if classifier else ("embed", "token_embed")


def check_task(task: Optional[str], classifier: bool) -> str:
    """``task`` (None: the model's pooled one) if the model can run it, else a ``ValueError`` naming what it can."""
    tasks = model_tasks(classifier)
    if task is None:
        return tasks[0]
    if task not in tasks:
        kind = "a sequence classifier" if classifier else "an embedding model"
        raise ValueError(f"pooling task {task!r} is not this model's: it can only {' or '.join(tasks)} ({kind})"
                         + ("" if task in POOLING_TASKS else f"; vLLM's tasks: {', '.join(POOLING_TASKS)}"))
    return task


def _config_field(model_path: str, name: str):
    """Field ``name`` of a checkpoint folder's ``config.json`` (None for a GGUF file, a bad config, no such field)."""
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            return json.load(f).get(name)
    except (OSError, ValueError, AttributeError):
        return None


def _architectures(model_path: str) -> list[str]:
    """The ``architectures`` a checkpoint folder's ``config.json`` names (none for a GGUF file or a bad config)."""
    try:
        return list(_config_field(model_path, "architectures") or [])
    except TypeError:
        return []


def _all_named(architectures: list[str], suffix: str) -> bool:
    return bool(architectures) and all(a.endswith(suffix) for a in architectures)


def is_classifier(model_path: str) -> bool:
    """Whether the checkpoint is a sequence classifier (``LlamaForSequenceClassification``, ...: a reward model, a
    classifier), whose ``score`` head gives class logits from the last token."""
    return _all_named(_architectures(model_path), "ForSequenceClassification")


def class_labels(model_path: str) -> dict[int, str]:
    """A classifier's class names by index (its ``config.json``'s ``id2label``; none where it has none)."""
    try:
        return {int(k): str(v) for k, v in (_config_field(model_path, "id2label") or {}).items()}
    except (ValueError, AttributeError, TypeError):
        return {}


def resolve_runner(runner: str, model_path: str) -> str:
    """``runner``, or for "auto" (vLLM's default) what the checkpoint is: "pooling" where its ``config.json`` names
    only bare decoders as architectures (``MistralModel``: e5-mistral; ``Qwen2Model``: gte-Qwen2) or sequence
    classifiers, else "generate" (a ``...ForCausalLM``, a GGUF file, no architectures)."""
    if runner != "auto":
        return runner
    architectures = _architectures(model_path)
    pooling = _all_named(architectures, "Model") or _all_named(architectures, "ForSequenceClassification")
    return "pooling" if pooling else "generate"


@dataclasses.dataclass
class PoolingParams:
    """vLLM's ``PoolingParams`` for embeddings: ``normalize`` (None: the model's, else True as vLLM's default),
    ``dimensions`` (a Matryoshka model's first dimensions, normalised after the cut); ``task`` (vLLM's, set by
    ``LLM.encode``'s ``pooling_task``; None: the model's pooled task)."""

    normalize: Optional[bool] = None
    dimensions: Optional[int] = None
    use_activation: Optional[bool] = None  # a classifier's: probabilities (softmax; sigmoid of one label) or logits
    task: Optional[str] = None

    def __post_init__(self):
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)
                                            or self.dimensions < 1):
            raise ValueError(f"dimensions must be a positive integer, got {self.dimensions!r}")
        if self.task is not None and self.task not in POOLING_TASKS:
            raise ValueError(f"task must be one of {', '.join(POOLING_TASKS)}, got {self.task!r}")

    @property
    def per_token(self) -> bool:
        """Whether the request keeps every prompt row (``token_embed``, ``token_classify``)."""
        return self.task in PER_TOKEN_TASKS


@dataclasses.dataclass
class EmbeddingOutput:
    embedding: list[float]


@dataclasses.dataclass
class EmbeddingRequestOutput:
    """A pooled request's result (vLLM's ``EmbeddingRequestOutput``)."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True


@dataclasses.dataclass
class ClassificationOutput:
    probs: list[float]  # one a class (the logits with use_activation=False)


@dataclasses.dataclass
class ClassificationRequestOutput:
    """A classified request's result (vLLM's ``ClassificationRequestOutput``: ``.outputs.probs``)."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: ClassificationOutput
    finished: bool = True


@dataclasses.dataclass
class PoolingOutput:
    data: np.ndarray  # float32: an embedding, a classifier's class probabilities (or logits); per token: [tokens, ...]


@dataclasses.dataclass
class PoolingRequestOutput:
    """vLLM's ``PoolingRequestOutput`` (``LLM.encode``): the pooled numbers whatever the model's task, in
    ``.outputs.data``."""

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: PoolingOutput
    finished: bool = True


# What a pooling engine's request finishes with (one output, whole).
POOLED_OUTPUTS = (EmbeddingRequestOutput, ClassificationRequestOutput, PoolingRequestOutput)


def pooled_data(output: EmbeddingRequestOutput | ClassificationRequestOutput | PoolingRequestOutput) -> list:
    """A pooled request's numbers: a classifier's class probabilities (or logits), else its embedding; a per-token
    task's rows as nested lists."""
    if isinstance(output, PoolingRequestOutput):
        return output.outputs.data.tolist()
    return output.outputs.probs if isinstance(output.outputs, ClassificationOutput) else output.outputs.embedding


def as_pooling_output(output: EmbeddingRequestOutput | ClassificationRequestOutput | PoolingRequestOutput
                      ) -> PoolingRequestOutput:
    if isinstance(output, PoolingRequestOutput):
        return output
    return PoolingRequestOutput(output.request_id, output.prompt, output.prompt_token_ids,
                                PoolingOutput(np.asarray(pooled_data(output), np.float32)), output.finished)


@dataclasses.dataclass
class ScoringOutput:
    score: float


@dataclasses.dataclass
class ScoringRequestOutput:
    """One pair's similarity (vLLM's ``ScoringRequestOutput`` for an embedding model: the cosine of the two
    texts' embeddings)."""

    request_id: str
    prompt_token_ids: list[int]  # the two texts' tokens, the first's then the second's
    outputs: ScoringOutput
    finished: bool = True


def score_pairs(first: list, second: list) -> list[tuple[int, int]]:
    """vLLM's pairing of ``LLM.score``'s two sides: one first item against every second one (1:N), or item by item
    (N:N); the indices into each side."""
    if not first or not second:
        raise ValueError("score needs at least one item on each side")
    if len(first) == 1:
        return [(0, j) for j in range(len(second))]
    if len(first) != len(second):
        raise ValueError(f"score pairs one item with many, or as many with as many; got {len(first)} and "
                         f"{len(second)}")
    return [(i, i) for i in range(len(first))]


def cosine(a: list[float], b: list[float]) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


@dataclasses.dataclass(frozen=True)
class PoolingConfig:
    pooling_type: str = "LAST"
    normalize: bool = True
    # A sequence classifier's head, ``score.weight [num_labels, hidden]`` (float32), applied to the last token's
    # normed hidden state; None for an embedding model.
    classifier: Optional[np.ndarray] = dataclasses.field(default=None, compare=False)

    def classify(self, params: PoolingParams, rows: np.ndarray) -> np.ndarray:
        """The class probabilities (softmax; a sigmoid for one label, as vLLM's classify) of hidden rows
        (``[..., hidden]``: a prompt's last row, or every row for ``token_classify``), or their logits with
        ``params.use_activation=False``: float32 ``[..., labels]``."""
        logits = np.asarray(rows, np.float64) @ self.classifier.astype(np.float64).T
        if params.use_activation is not False:
            if logits.shape[-1] == 1:
                logits = 1.0 / (1.0 + np.exp(-logits))
            else:
                logits = np.exp(logits - logits.max(axis=-1, keepdims=True))
                logits = logits / logits.sum(axis=-1, keepdims=True)
        return logits.astype(np.float32)

    def embedding(self, params: PoolingParams, rows: np.ndarray) -> np.ndarray:
        """Pooled or per-token vectors (``[..., hidden]``, float32) cut to ``params.dimensions`` (checked against
        the hidden size when the request came in) and normalised as the model or ``params.normalize`` says."""
        vectors = np.asarray(rows, np.float64)
        if params.dimensions is not None:
            vectors = vectors[..., :params.dimensions]
        if self.normalize if params.normalize is None else params.normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
        return vectors.astype(np.float32)


def pooling_config(model_path: str, pooling_type: Optional[str] = None) -> PoolingConfig:
    """The pooling of ``model_path``'s sentence-transformers files, where it has them: ``1_Pooling/config.json``'s
    mode (last token, mean, CLS) and whether ``modules.json`` ends in Normalize; else the last token, normalised
    (vLLM's defaults for a decoder's embeddings). ``pooling_type`` (one of ``POOLING_TYPES``) overrides the mode.
    A sequence classifier (``is_classifier``) pools its last token, unnormalised, through its ``score`` head."""
    if is_classifier(model_path):
        if pooling_type is not None and pooling_type.upper() != "LAST":
            raise ValueError(f"a sequence classifier pools its last token, not pooling_type={pooling_type!r}")
        return PoolingConfig("LAST", normalize=False, classifier=_score_head(model_path))
    folder = model_path if os.path.isdir(model_path) else os.path.dirname(model_path)
    mode, normalize = "LAST", True
    try:
        with open(os.path.join(folder, "1_Pooling", "config.json")) as f:
            fields = json.load(f)
        mode = next((name for key, name in (("pooling_mode_lasttoken", "LAST"), ("pooling_mode_mean_tokens", "MEAN"),
                                            ("pooling_mode_cls_token", "CLS")) if fields.get(key)), mode)
        with open(os.path.join(folder, "modules.json")) as f:
            normalize = any(m.get("type", "").endswith("Normalize") for m in json.load(f))
    except (OSError, ValueError, AttributeError):
        pass
    if pooling_type is not None:
        if pooling_type.upper() not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got {pooling_type!r}")
        mode = pooling_type.upper()
    return PoolingConfig(mode, normalize)


def _score_head(model_path: str) -> np.ndarray:
    """A sequence classifier's ``score.weight`` (float32 ``[num_labels, hidden]``), read from its safetensors."""
    from models.safetensors_loader import CheckpointError, _Checkpoint, find_safetensors_files

    checkpoint = _Checkpoint(find_safetensors_files(model_path))
    if "score.weight" not in checkpoint:
        raise CheckpointError(f"{model_path!r} is a sequence classifier (its architectures say so) without a "
                              "score.weight head")
    return np.asarray(checkpoint.array("score.weight"), np.float32)


@dataclasses.dataclass
class PooledRows:
    """What a request's prompt chunks returned so far, for its pooled vector (or, per token, every row)."""

    total: Optional[np.ndarray] = None  # sum of every prompt row (MEAN)
    first: Optional[np.ndarray] = None  # the prompt's first row (CLS)
    rows: list[np.ndarray] = dataclasses.field(default_factory=list)  # each chunk's rows (a per-token task)

    def add_chunk(self, start: int, first_row: np.ndarray, row_sum: np.ndarray,
                  rows: Optional[np.ndarray] = None) -> None:
        """A chunk starting at prompt position ``start``: its first row and the sum of its rows (and, for a per-token
        task, all of them). A chunk at 0 starts over (a preempted request computes its prompt again)."""
        if start == 0:
            self.total, self.first, self.rows = None, first_row, []
        self.total = row_sum if self.total is None else self.total + row_sum
        if rows is not None:
            self.rows.append(rows)

    def pooled(self, config: PoolingConfig, last_row: np.ndarray, num_tokens: int) -> np.ndarray:
        """The prompt's pooled row once its last chunk (ending with ``last_row``) has run."""
        if config.pooling_type == "MEAN":
            return self.total / num_tokens
        return self.first if config.pooling_type == "CLS" else last_row

    def vector(self, config: PoolingConfig, params: PoolingParams, last_row: np.ndarray,
               num_tokens: int) -> list[float]:
        """The pooled vector once the prompt's last chunk (ending with ``last_row``) has run."""
        return config.embedding(params, self.pooled(config, last_row, num_tokens)).tolist()

    def every_row(self) -> np.ndarray:
        """Every prompt row, in order (a per-token task's, once its last chunk has run)."""
        return np.concatenate(self.rows)
