"""Request validation without an engine: JSON bodies -> SamplingParams, or a 400 naming the field."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from types import SimpleNamespace
from typing import Any, TypeVar

import msgspec
import pytest

from engine_core.messages.sampling_params import SamplingParams
from frontend.errors import APIError
from frontend.protocol import (
    UNSUPPORTED_CHAT,
    ChatCompletionRequest,
    CompletionRequest,
    decode_request,
    reject_unsupported,
)
from frontend.sampling import fit_max_tokens, sampling_params
from frontend.serving_chat import chat_prompt as chat_prompt_async
from frontend.serving_completions import completion_prompts as completion_prompts_async
from models.tokenizer import Tokenizer

VOCAB = 49152
T = TypeVar("T")
HI = [{"role": "user", "content": "hi"}]


def _chat(**fields: object) -> ChatCompletionRequest:
    return decode_request(msgspec.json.encode({"messages": HI, **fields}), ChatCompletionRequest)


def _params(**fields: object) -> SamplingParams:
    req = _chat(**fields)
    return sampling_params(req, max_tokens=req.max_tokens, logprobs=None, vocab_size=VOCAB)


def _blocking(call: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """An async helper as a plain function (each call runs in a fresh event loop)."""
    return lambda *args, **kwargs: asyncio.run(call(*args, **kwargs))


chat_prompt = _blocking(chat_prompt_async)
completion_prompts = _blocking(completion_prompts_async)


def _error(call: object, *args: object, **kwargs: object) -> APIError:
    with pytest.raises(APIError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value


def test_defaults_match_vllm() -> None:
    params = _params()
    assert params == SamplingParams(max_tokens=None)
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.n == 1


def test_fields_map_to_sampling_params() -> None:
    params = _params(
        temperature=0, top_p=0.5, top_k=5, min_p=0.1, n=3, seed=7, stop="END",
        stop_token_ids=[5], presence_penalty=0.5, frequency_penalty=-0.5,
        repetition_penalty=1.2, logit_bias={"42": -100}, ignore_eos=True, min_tokens=2,
        max_tokens=10, skip_special_tokens=False, include_stop_str_in_output=True,
        user="someone",
    )  # fmt: skip
    assert params == SamplingParams(
        n=3, temperature=0.0, top_p=0.5, top_k=5, min_p=0.1, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.2, logit_bias={42: -100.0}, seed=7,
        max_tokens=10, min_tokens=2, stop=["END"], stop_token_ids=[5],
        include_stop_str_in_output=True, ignore_eos=True, skip_special_tokens=False,
    )  # fmt: skip


def test_nulls_mean_defaults() -> None:
    assert _params(temperature=None, n=None, stop=None, seed=None) == _params()


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{", None, "invalid_json"),
        (b"[1]", None, "invalid_type"),
        (b"{}", "messages", "invalid_value"),
        (b'{"messages": "hi"}', "messages", "invalid_type"),
        (b'{"messages": [{"content": "x"}]}', "messages[0].role", "invalid_value"),
        (b'{"messages": [], "max_tokens": "9"}', "max_tokens", "invalid_type"),
        (b'{"messages": [], "temperature": true}', "temperature", "invalid_type"),
        (b'{"messages": [], "n": 0}', "n", "invalid_value"),
        (b'{"messages": [], "seed": 18446744073709551616}', "seed", "invalid_value"),
        (b'{"messages": [], "stream_options": {"include_usage": 1}}', "stream_options.include_usage", "invalid_type"),
    ],
)  # fmt: skip
def test_decode_errors_name_the_field(body: bytes, param: str | None, code: str) -> None:
    error = _error(decode_request, body, ChatCompletionRequest)
    assert (error.status, error.param, error.code) == (400, param, code)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {str(VOCAB): 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ],
)
def test_out_of_range_values_are_400(fields: dict, param: str) -> None:
    error = _error(_params, **fields)
    assert (error.status, error.param) == (400, param)


def test_unsupported_fields_are_named() -> None:
    reject_unsupported(
        _chat(functions=[], audio=None, tools=[], tool_choice="none"), UNSUPPORTED_CHAT
    )
    error = _error(reject_unsupported, _chat(functions=[{"name": "f"}]), UNSUPPORTED_CHAT)
    assert (error.status, error.param, error.code) == (400, "functions", "unsupported_parameter")


def test_error_body_shape() -> None:
    body = msgspec.json.decode(
        APIError(429, "slow down", code="rate_limit_exceeded").response().body
    )
    assert body == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }


def test_max_tokens_fits_the_context() -> None:
    params = SamplingParams(max_tokens=None)
    assert fit_max_tokens(params, 100, 1024, None, "messages").max_tokens == 924
    assert fit_max_tokens(params, 100, 1024, 16, "prompt").max_tokens == 16
    assert fit_max_tokens(params, 1020, 1024, 16, "prompt").max_tokens == 4
    too_long = _error(fit_max_tokens, SamplingParams(max_tokens=925), 100, 1024, None, "messages")
    assert (too_long.param, too_long.code) == ("max_tokens", "context_length_exceeded")
    full = _error(fit_max_tokens, params, 1024, 1024, None, "messages")
    assert full.param == "messages"


@pytest.fixture(scope="module")
def ctx(default_tokenizer: Tokenizer) -> SimpleNamespace:
    return SimpleNamespace(tokenizer=default_tokenizer, vocab_size=VOCAB)


def test_prompt_shapes(ctx: SimpleNamespace) -> None:
    hello = ctx.tokenizer.encode("Hello")
    assert completion_prompts(ctx, "Hello") == [hello]
    assert completion_prompts(ctx, ["Hello", "Hello"]) == [hello, hello]
    assert completion_prompts(ctx, [1, 2, 3]) == [[1, 2, 3]]
    assert completion_prompts(ctx, [[1, 2], [3]]) == [[1, 2], [3]]
    for bad in ([], [[]], ["a", 1], [1, [2]], "", [VOCAB]):
        assert _error(completion_prompts, ctx, bad).param == "prompt"


def test_prompt_field_decodes_every_shape() -> None:
    for prompt in ("x", ["x", "y"], [1, 2], [[1], [2, 3]]):
        body = msgspec.json.encode({"prompt": prompt})
        assert decode_request(body, CompletionRequest).prompt == prompt


def test_chat_messages(ctx: SimpleNamespace) -> None:
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "the capital?"}]
    ids = chat_prompt(
        ctx,
        _chat(
            messages=[
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": parts},
            ]
        ),
    )
    text = ctx.tokenizer.decode(ids, skip_special_tokens=False)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert text.endswith("What is\nthe capital?<|im_end|>\n<|im_start|>assistant\n")
    assert _error(chat_prompt, ctx, _chat(messages=[])).param == "messages"
    assert (
        _error(chat_prompt, ctx, _chat(messages=[{"role": "narrator", "content": "x"}])).param
        == "messages[0].role"
    )
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert _error(chat_prompt, ctx, _chat(messages=image)).param == "messages[0].content[0]"
    calls = [{"role": "assistant", "tool_calls": [{"id": "1"}]}]
    assert _error(chat_prompt, ctx, _chat(messages=calls)).param == "messages[0].tool_calls"


def test_huge_integers_and_deep_nesting_are_400s() -> None:
    # the wire to the core carries 64-bit integers; msgspec's recursion limit is an error
    huge = b'{"prompt": [1, 18446744073709551616]}'
    assert _error(decode_request, huge, CompletionRequest).param == "prompt[1]"
    nested = b'{"messages": [], "extra": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert _error(decode_request, nested, ChatCompletionRequest).code == "invalid_json"
