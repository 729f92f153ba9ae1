"""OpenAI request bodies as msgspec Structs: decoding a body is also validating its types.

Every optional field is nullable, since clients send `null` for "not given". Fields of the
OpenAI API that duet does not implement are declared (typed `Any`) only so that a request
using them gets a 400 naming the field instead of being silently misunderstood.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

import msgspec

from frontend.errors import bad_request

T = TypeVar("T")

# msgspec decodes JSON integers of any size, but the wire to the core (msgpack) carries
# 64 bits: a bigger one must be a 400 here, not a failure to encode the request later.
Int = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
# msgspec's own limits would fail later, when the child's seed (seed + i) is encoded.
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
N = Annotated[int, msgspec.Meta(ge=1, le=128)]


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None
    audio: Any = None


class SamplingRequest(msgspec.Struct, kw_only=True):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None
    max_tokens: Int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int | None = None
    min_p: float | None = None
    n: N | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int] | None = None
    seed: Seed | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = None
    min_tokens: Int | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    prompt_logprobs: Int | None = None  # vLLM's extension
    # structured outputs (checked by frontend/structured_outputs.py)
    response_format: Any = None
    structured_outputs: Any = None

    def usage_flags(self) -> tuple[bool, bool]:
        """(include_usage, continuous_usage_stats); the second only with the first, as in vLLM."""
        options = self.stream_options or StreamOptions()
        usage = bool(options.include_usage)
        return usage, usage and bool(options.continuous_usage_stats)


class ChatCompletionRequest(SamplingRequest, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: Int | None = None
    logprobs: bool | None = None
    top_logprobs: Int | None = None
    add_generation_prompt: bool | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None


class CompletionRequest(SamplingRequest, kw_only=True):
    # str | list of: str, token id, or token-id list (homogeneous; checked after decoding)
    prompt: str | list[str | Int | list[Int]]
    echo: bool | None = None
    logprobs: Int | None = None
    suffix: Any = None
    best_of: Any = None


class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool | None = None
    return_token_strs: bool | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    tokens: list[Int]


UNSUPPORTED_CHAT = (
    "functions", "function_call", "audio", "modalities", "prediction", "web_search_options",
    "reasoning_effort",
)  # fmt: skip
UNSUPPORTED_MESSAGE = ("function_call", "audio")
UNSUPPORTED_COMPLETION = ("suffix",)

# values that ask for nothing, so sending them is harmless
_NEUTRAL = (None, False, [], {}, "none", {"type": "text"})

_PATH = re.compile(r" - at `\$\.?(.*)`$")
_MISSING = re.compile(r"missing required field `(\w+)`")


def decode_request(body: bytes, kind: type[T]) -> T:
    """Decode and type-check a JSON body; raise a 400 APIError naming the bad field."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        # "Expected `int`, got `str`" is a wrong type; "Expected `int` >= 1" a bad value
        code = "invalid_type" if ", got `" in message else "invalid_value"
        raise bad_request(message, _param_of(message), code=code) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:  # msgspec's answer to arrays or objects nested too deeply
        raise bad_request("the body is nested too deeply", code="invalid_json") from None


def reject_unsupported(obj: msgspec.Struct, fields: tuple[str, ...], prefix: str = "") -> None:
    """400 for the first field of `fields` that `obj` sets to something meaningful."""
    for field in fields:
        if getattr(obj, field) not in _NEUTRAL:
            raise bad_request(
                f"`{prefix}{field}` is not supported by this server",
                f"{prefix}{field}",
                code="unsupported_parameter",
            )


def _param_of(message: str) -> str | None:
    """'Expected `int`, got `str` - at `$.messages[0].role`' -> 'messages[0].role'."""
    path = _PATH.search(message)
    where = path.group(1) if path else ""
    missing = _MISSING.search(message)
    if missing:
        where = f"{where}.{missing.group(1)}" if where else missing.group(1)
    return where or None
