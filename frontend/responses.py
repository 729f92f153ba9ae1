"""OpenAI response bodies and stream chunks as msgspec Structs (encoded, never decoded).

Fields the OpenAI API sends as `null` stay present; chunk envelopes omit `usage` unless
it is set, as OpenAI does when usage was not asked for. `object` is each Struct's tag.
"""

from __future__ import annotations

import msgspec
from aiohttp import web


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[ChatTokenLogprob]


class FunctionCallOut(msgspec.Struct):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallOut(msgspec.Struct):
    id: str
    function: FunctionCallOut
    type: str = "function"


class ChatMessageOut(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    # vLLM's extension: the stop string or stop token id that ended the choice
    stop_reason: int | str | None = None


class ChatCompletion(msgspec.Struct, tag_field="object", tag="chat.completion"):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    # vLLM's extension, for the whole response (all choices share the prompt)
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None


class FunctionDelta(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    """One piece of a streamed tool call: id, type and name come once, arguments in parts."""

    index: int
    function: FunctionDelta
    id: str | None = None
    type: str | None = None


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(
    msgspec.Struct, omit_defaults=True, tag_field="object", tag="chat.completion.chunk"
):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    # null for an echoed prompt's first token: nothing predicts it
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptLogprob(msgspec.Struct):
    """vLLM's Logprob: one token's entry in `prompt_logprobs`."""

    logprob: float
    rank: int | None
    decoded_token: str | None


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # vLLM's extension (`prompt_logprobs` asked): None first, then token id -> entry
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None


class Completion(msgspec.Struct, omit_defaults=True, tag_field="object", tag="text_completion"):
    """A whole completion, or (with `usage` unset) one stream chunk of it."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(msgspec.Struct, tag_field="object", tag="model"):
    id: str
    created: int
    max_model_len: int
    owned_by: str = "duet"
    root: str | None = None
    parent: str | None = None  # a LoRA adapter's base model


class ModelList(msgspec.Struct, tag_field="object", tag="list"):
    data: list[ModelCard]


class TokenizeResponse(msgspec.Struct):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(msgspec.Struct):
    prompt: str


class Version(msgspec.Struct, omit_defaults=True):
    version: str
    dtype: str | None = None  # the served model's dtype, where this process knows it


def json_response(body: msgspec.Struct, status: int = 200) -> web.Response:
    """A JSON response encoded by msgspec (faster than aiohttp's json.dumps)."""
    return web.Response(
        body=msgspec.json.encode(body), status=status, content_type="application/json"
    )
