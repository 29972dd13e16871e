"""Pydantic models of the OpenAI-compatible API: request bodies, responses, stream chunks, errors.

Owns the wire format: field names, types and OpenAI's defaults, plus the few vLLM
extensions the server accepts (top_k, min_p, repetition_penalty, min_tokens,
ignore_eos, stop_token_ids, allowed_token_ids, bad_words, structured_outputs, ...).
Range checks of sampling values are not repeated here: ``SamplingParams`` owns them
and its errors name the field. Fields OpenAI
defines that this server does not implement are declared so that a non-default
value is refused (see ``unsupported_fields``) instead of silently ignored.
Knows nothing of the engine or HTTP.
"""

from __future__ import annotations

import time
import typing
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# -- errors ---------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# -- requests -------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, each chunk's usage so far too


class _NullMeansDefault(BaseModel):
    """A ``null`` for a field that takes no None is its default, as OpenAI's API reads an explicit null (clients
    generated from its spec send every unset field so); vLLM's fields are Optional with a default for the same
    reason."""

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {key: value for key, value in data.items()
                if not (value is None and key in fields and not _takes_none(fields[key].annotation))}


def _takes_none(annotation: Any) -> bool:
    return annotation is None or annotation is type(None) or type(None) in typing.get_args(annotation)


class _SamplingFields(_NullMeansDefault):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None  # None: the first served model name (as vLLM)
    request_id: Optional[str] = None  # vLLM's: names the response (after an X-Request-Id header)
    return_tokens_as_token_ids: Optional[bool] = None  # vLLM's: logprobs' tokens as "token_id:<id>" (None: server's)
    n: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)  # vLLM's bounds: a 64-bit integer
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # vLLM's; a fast tokenizer decodes special tokens as they are
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    priority: int = 0
    user: Optional[str] = None  # accepted and ignored, as OpenAI's abuse-monitoring id
    logit_bias: Optional[dict[str, float]] = None  # OpenAI's form: token ids as strings; biases clamped to +-100
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    truncate_prompt_tokens: Optional[int] = None  # keep the prompt's last k tokens; -1: max_model_len
    prompt_logprobs: Optional[int] = None  # each prompt token's logprob and the k most likely there (not streamed)
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs (StructuredOutputsParams' fields) and
    # its older guided_* fields; at most one of them.
    response_format: Optional[dict[str, Any]] = None
    structured_outputs: Optional[dict[str, Any]] = None
    guided_json: Optional[Union[str, dict[str, Any]]] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None
    guided_whitespace_pattern: Optional[str] = None  # vLLM's older options of the JSON forms; the backend's name is
    guided_decoding_backend: Optional[str] = None  # taken and changes nothing (llguidance is the one backend)
    # vLLM's beam search: ``n`` beams, ranked by cumulative logprob over length ** length_penalty.
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # OpenAI fields not implemented: a value other than these defaults is refused.
    best_of: Optional[int] = None

    def unsupported_fields(self) -> list[str]:
        """Names of set fields this server cannot honour."""
        if self.best_of is not None and self.best_of != self.n:
            return ["best_of"]
        if self.use_beam_search:  # what a beam search does not do (vLLM ignores them)
            return [name for name in BEAM_SEARCH_REFUSES if getattr(self, name, None) not in (None, False, 0, [])]
        return []


# Fields a beam search would not honour (``use_beam_search`` refuses them rather than ignore them).
BEAM_SEARCH_REFUSES = ("logprobs", "top_logprobs", "prompt_logprobs", "echo", "stop", "stop_token_ids",
                       "min_tokens", "logit_bias", "allowed_token_ids", "bad_words", "response_format",
                       "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "tools",
                       "presence_penalty", "frequency_penalty", "repetition_penalty", "top_p", "top_k", "min_p",
                       "seed")


PROMPT_FORMS = "a string, a list of strings, a list of token ids (integers >= 0) or a list of token-id lists"


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    add_special_tokens: bool = True  # vLLM's: a text prompt's BOS and such
    max_tokens: Optional[int] = 16  # OpenAI's default for completions
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _check_prompt(cls, prompt: Any) -> Union[str, list[str], list[int], list[list[int]]]:
        """One clear message for every wrong shape (a plain union would list one error per member)."""
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return prompt
            if all(_is_token_id(t) for t in prompt):
                return prompt
            if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt):
                return prompt
        raise ValueError(f"prompt must be {PROMPT_FORMS}, non-empty")

    def unsupported_fields(self) -> list[str]:
        return super().unsupported_fields() + (["suffix"] if self.suffix else [])


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class TextContentPart(BaseModel):
    type: Literal["text", "input_text", "output_text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, list[TextContentPart]]] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # an assistant turn's calls, for the chat template
    tool_call_id: Optional[str] = None  # a tool turn's answer to that call

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        """A part of another type (an image, audio) is refused by name, before the union's type errors."""
        if isinstance(content, list):
            from engine.tokenizer import non_text_part_kinds

            kinds = non_text_part_kinds(content)
            if kinds:
                raise ValueError(f"content parts must be text (type 'text'): this server reads text only, "
                                 f"got {', '.join(repr(k) for k in kinds)}")
            return [{"type": "text", **part} for part in content]  # a part without its type is text
        return content

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        from engine.tokenizer import join_text_parts

        return join_text_parts(part.text for part in self.content)


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema of the arguments object


class ChatTool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class _ChatTemplateFields(_NullMeansDefault):
    """vLLM's arguments of the chat template, on chat completions and on ``/tokenize`` alike."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last (assistant) message is continued, not closed
    chat_template_kwargs: Optional[dict[str, Any]] = None  # more arguments for the template, e.g. enable_thinking
    chat_template: Optional[str] = None  # a Jinja template for this request instead of the model's


class ChatCompletionRequest(_SamplingFields, _ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    echo: bool = False  # vLLM's: the reply begins with the last message's text where it has the reply's role
    tools: Optional[list[ChatTool]] = None
    # None: "auto" with tools, else "none" (OpenAI's defaults); see engine.entrypoints.openai.tools
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None  # False: at most one call (the first, under "auto")


class TokenizeRequest(_ChatTemplateFields):
    """vLLM's ``/tokenize``: a ``prompt`` (as ``/v1/completions`` tokenizes it) or chat ``messages`` (as
    ``/v1/chat/completions`` renders them)."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    tools: Optional[list[ChatTool]] = None  # rendered by the chat template, as a chat completion's are
    add_special_tokens: bool = True  # a prompt's BOS and such (the chat template writes its own)
    return_token_strs: bool = False  # the tokens' strings too, as the tokenizer's vocabulary spells them


class EmbeddingRequest(BaseModel):
    """OpenAI's ``/v1/embeddings``: ``input`` a text, a list of texts, a token-id list or a list of those;
    ``encoding_format`` "float" or "base64" (little-endian float32); ``dimensions`` a Matryoshka cut."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    request_id: Optional[str] = None  # vLLM's: names the response (after an X-Request-Id header)
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None
    priority: int = 0
    # vLLM's: a text's BOS and such; each input's last k tokens (-1: as many as fit); None: the model's (normalised)
    add_special_tokens: bool = True
    truncate_prompt_tokens: Optional[int] = None
    normalize: Optional[bool] = None


class PoolingRequest(_ChatTemplateFields):
    """vLLM's ``/pooling``: ``input`` (as ``/v1/embeddings`` takes it) or chat ``messages`` (rendered as
    ``/v1/chat/completions`` renders them, without a generation prompt unless asked), pooled as the model pools:
    an embedding model's vector (``dimensions``, ``normalize``), a classifier's class probabilities
    (``use_activation`` False: its logits); per token with ``task``."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    input: Optional[Union[str, list[str], list[int], list[list[int]]]] = None
    messages: Optional[list[ChatMessage]] = None
    add_generation_prompt: bool = False  # vLLM's default for pooling a chat
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    normalize: Optional[bool] = None
    use_activation: Optional[bool] = None
    add_special_tokens: bool = True
    truncate_prompt_tokens: Optional[int] = None
    # vLLM's pooling task, one the model runs: "embed" or "classify" (None: the model's), per token "token_embed" or
    # "token_classify"
    task: Optional[str] = None
    user: Optional[str] = None
    priority: int = 0


class ClassificationRequest(BaseModel):
    """vLLM's ``/classify``: ``input`` a text, texts or token ids, each classified by a sequence classifier;
    ``use_activation`` False for the logits instead of probabilities."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    input: Union[str, list[str], list[int], list[list[int]]]
    use_activation: Optional[bool] = None
    user: Optional[str] = None
    priority: int = 0


class ScoreRequest(BaseModel):
    """vLLM's ``/score``: ``text_1`` against each of ``text_2`` (1:N) or pair by pair (N:N)."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    text_1: Union[str, list[str]]
    text_2: Union[str, list[str]]
    priority: int = 0


class RerankRequest(BaseModel):
    """vLLM's ``/rerank`` (Jina's and Cohere's API): ``documents`` ordered by relevance to ``query``."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    query: str
    documents: list[str]
    top_n: Optional[int] = None
    priority: int = 0


class LoadLoRAAdapterRequest(BaseModel):
    """vLLM's ``/v1/load_lora_adapter`` (with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``): serve the PEFT adapter folder
    ``lora_path`` under the model name ``lora_name``."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    """vLLM's ``/v1/unload_lora_adapter``: stop serving the adapter named ``lora_name``."""

    model_config = ConfigDict(extra="ignore")

    lora_name: str
    lora_int_id: Optional[int] = None  # vLLM's; the name decides


class UpdateWeightsFromDiskRequest(BaseModel):
    """SGLang's ``/update_weights_from_disk`` (with ``VLLM_SERVER_DEV_MODE=1``): serve the weights of checkpoint
    ``model_path`` (the running model's shapes) from now on."""

    model_config = ConfigDict(extra="ignore")

    model_path: str
    load_format: Optional[str] = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    tokens: list[int]


# -- responses ------------------------------------------------------------------------------


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeResponse(BaseModel):
    prompt: str



class PromptTokenUsageInfo(BaseModel):
    cached_tokens: int = 0  # found in the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokenUsageInfo] = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]


class _Response(BaseModel):
    """What every response of a model's work starts with (its ``object`` is each one's own)."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class EmbeddingResponse(_Response):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    usage: UsageInfo


class PoolingData(BaseModel):
    object: Literal["pooling"] = "pooling"
    index: int
    data: Union[list[float], list[list[float]], str]  # a per-token task's: a row a token


class PoolingResponse(_Response):
    object: Literal["list"] = "list"
    data: list[PoolingData]
    usage: UsageInfo


class ClassificationData(BaseModel):
    index: int
    label: str  # the most likely class's name (config.json's id2label)
    probs: list[float]
    num_classes: int


class ClassificationResponse(_Response):
    object: Literal["list"] = "list"
    data: list[ClassificationData]
    usage: UsageInfo


class ScoreData(BaseModel):
    object: Literal["score"] = "score"
    index: int
    score: float


class ScoreResponse(_Response):
    object: Literal["list"] = "list"
    data: list[ScoreData]
    usage: UsageInfo


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankResponse(_Response):
    results: list[RerankResult]
    usage: UsageInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedjax"
    root: Optional[str] = None  # the model's path; a LoRA adapter's folder
    parent: Optional[str] = None  # a LoRA adapter's base model (its served name), as vLLM's
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


# vLLM's prompt_logprobs: one entry a prompt token (None for the first), token id -> its logprob
PromptLogprobs = list[Optional[dict[int, PromptLogprob]]]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None  # vLLM extension: the stop string or token id
    prompt_logprobs: Optional[PromptLogprobs] = None  # vLLM extension


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # the arguments object as JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl-tool"))
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = None  # vLLM's: a reasoning model's thinking (--reasoning-parser)
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatDelta(BaseModel):
    """A chunk's change to the message; unset parts are left out, as OpenAI does (``{}`` at the end)."""

    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None  # each call whole, with its "index"

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionChoice]
    usage: Optional[UsageInfo] = None
    prompt_logprobs: Optional[PromptLogprobs] = None  # vLLM extension


class ChatCompletionChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Optional[UsageInfo] = None
