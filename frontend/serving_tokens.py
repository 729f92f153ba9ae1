"""POST /tokenize and /detokenize (vLLM's extensions): the model's tokenizer over HTTP."""

from __future__ import annotations

from aiohttp import web

from frontend import tokenizing
from frontend.context import CONTEXT
from frontend.errors import bad_request
from frontend.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    decode_request,
)
from frontend.responses import DetokenizeResponse, TokenizeResponse, json_response
from frontend.sampling import check_token_ids
from frontend.serving_chat import chat_prompt


async def tokenize(request: web.Request) -> web.Response:
    """Token ids of a `prompt` string, or of `messages` through the chat template."""
    ctx = request.app[CONTEXT]
    body = decode_request(await request.read(), TokenizeRequest)
    ctx.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of `prompt` and `messages`", "prompt")
    if body.messages is not None:
        chat = ChatCompletionRequest(
            messages=body.messages, add_generation_prompt=body.add_generation_prompt
        )
        tokens = await chat_prompt(ctx, chat)
    else:
        tokens = await tokenizing.encode(
            ctx.tokenizer,
            body.prompt or "",
            add_special_tokens=body.add_special_tokens is not False,
        )
    strs = ctx.tokenizer.hf.convert_ids_to_tokens(tokens) if body.return_token_strs else None
    return json_response(TokenizeResponse(len(tokens), ctx.max_model_len, tokens, strs))


async def detokenize(request: web.Request) -> web.Response:
    """Text of a list of token ids."""
    ctx = request.app[CONTEXT]
    body = decode_request(await request.read(), DetokenizeRequest)
    ctx.check_model(body.model)
    check_token_ids(body.tokens, ctx.tokenizer.vocab_size, "tokens")
    return json_response(DetokenizeResponse(ctx.tokenizer.decode(body.tokens)))
