"""POST /v1/completions: prompt(s) as text or token ids -> generation -> text or SSE."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncGenerator

from aiohttp import web

from frontend import tokenizing
from frontend.context import CONTEXT, ServerContext
from frontend.errors import bad_request
from frontend.generation import ChoiceDelta, Generation
from frontend.prompt_logprobs import check_prompt_logprobs, echo_logprobs, echo_params, render
from frontend.protocol import (
    UNSUPPORTED_COMPLETION,
    CompletionRequest,
    decode_request,
    reject_unsupported,
)
from frontend.responses import Completion, CompletionChoice, CompletionLogprobs, json_response
from frontend.sampling import check_token_ids, fit_max_tokens, sampling_params
from frontend.sse import stream_events
from frontend.structured_outputs import request_spec

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions API
MAX_CHOICES = 1024  # each choice is a request in the core; bounds one body's fan-out


async def create_completion(request: web.Request) -> web.StreamResponse:
    """Handle one completion request (one or more prompts), streamed or not."""
    ctx = request.app[CONTEXT]
    body = decode_request(await request.read(), CompletionRequest)
    lora = ctx.check_model(body.model)
    reject_unsupported(body, UNSUPPORTED_COMPLETION)
    structured = await request_spec(
        ctx.tokenizer, ctx.vocab_size, body.response_format, body.structured_outputs
    )
    params = sampling_params(
        body,
        max_tokens=body.max_tokens,
        logprobs=body.logprobs,
        vocab_size=ctx.vocab_size,
        structured=structured,
    )
    if body.best_of is not None and body.best_of != params.n:
        raise bad_request("best_of is not supported (other than best_of == n)", "best_of")
    check_prompt_logprobs(body)
    params = echo_params(params, bool(body.echo))
    prompts = await completion_prompts(ctx, body.prompt)
    if len(prompts) * params.n > MAX_CHOICES:
        raise bad_request(f"at most {MAX_CHOICES} choices (prompts × n) per request", "prompt")
    longest = max(len(ids) for ids in prompts)  # one max_tokens must fit every prompt
    params = fit_max_tokens(params, longest, ctx.max_model_len, DEFAULT_MAX_TOKENS, "prompt")
    ctx.admit()
    gen = Generation(ctx, f"cmpl-{uuid.uuid4().hex}", prompts, params, lora)
    gen.log_accepted()
    echo = (
        [ctx.tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]
        if body.echo
        else None
    )
    view = _CompletionView(ctx, gen, echo)
    if body.stream:
        return await stream_events(request, view.chunks(*body.usage_flags()))
    return json_response(await view.complete())


async def completion_prompts(
    ctx: ServerContext, prompt: str | list[str | int | list[int]]
) -> list[list[int]]:
    """Token ids of each prompt; a flat list of ints is one prompt."""
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]
    elif prompt and (
        all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt)
    ):
        items = prompt
    else:
        raise bad_request(
            "prompt must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists (not empty, not mixed)",
            "prompt",
        )
    prompts = [
        await tokenizing.encode(ctx.tokenizer, p) if isinstance(p, str) else p for p in items
    ]
    for ids in prompts:
        if not ids:
            raise bad_request("prompt must not be empty", "prompt")
        check_token_ids(ids, ctx.vocab_size, "prompt")
    return prompts


class _CompletionView:
    """Shapes one Generation's deltas as completion bodies; `echo` holds prompt texts."""

    def __init__(self, ctx: ServerContext, gen: Generation, echo: list[str] | None) -> None:
        self.ctx = ctx
        self.gen = gen
        self.echo = echo
        self.created = int(time.time())
        self.text_lengths = [0] * gen.num_choices  # for logprobs' text_offset
        self.echoed: set[int] = set()  # choices whose prompt has been echoed

    def _choice(self, delta: ChoiceDelta) -> CompletionChoice:
        logprobs = None
        if delta.logprobs is not None and self.gen.params.logprobs is not None:
            logprobs = self.ctx.formatter.completion(delta.logprobs, self.text_lengths[delta.index])
        self.text_lengths[delta.index] += len(delta.text)
        return CompletionChoice(
            delta.index, delta.text, logprobs, delta.finish_reason, delta.stop_reason
        )

    def _echo(self, delta: ChoiceDelta) -> CompletionChoice | None:
        """At a choice's first delta (which holds its prompt logprobs), its echoed prompt,
        with the prompt tokens' logprobs when logprobs are asked; None otherwise."""
        if self.echo is None or delta.index in self.echoed:
            return None
        self.echoed.add(delta.index)
        text, logprobs = self._prompt_text(delta.index), None
        if self.gen.params.logprobs is not None and delta.prompt_logprobs is not None:
            prompt = self.gen.prompts[delta.index // self.gen.params.n]
            logprobs = echo_logprobs(self.ctx.formatter, prompt, delta.prompt_logprobs)
        self.text_lengths[delta.index] += len(text)
        return CompletionChoice(delta.index, text, logprobs)

    def _body(self, choices: list[CompletionChoice], usage: bool) -> Completion:
        return Completion(
            self.gen.request_id,
            self.created,
            self.gen.model_name,
            choices,
            self.gen.usage() if usage else None,
        )

    def _prompt_text(self, index: int) -> str:
        return "" if self.echo is None else self.echo[index // self.gen.params.n]

    async def chunks(self, include_usage: bool, continuous: bool) -> AsyncGenerator[Completion]:
        """Stream chunks: the echoed prompt first (if asked), then text as it is final."""
        async with contextlib.aclosing(self.gen.stream()) as deltas:
            async for delta in deltas:
                # only now, not before any output: see serving_chat
                if (echo := self._echo(delta)) is not None:
                    yield self._body([echo], continuous)
                if delta.text or delta.finish_reason or delta.logprobs:
                    yield self._body([self._choice(delta)], continuous)
        if include_usage:
            yield self._body([], usage=True)

    async def complete(self) -> Completion:
        """Wait for every choice and build the whole response."""
        choices = [CompletionChoice(i, "") for i in range(self.gen.num_choices)]
        async with contextlib.aclosing(self.gen.stream()) as deltas:
            async for delta in deltas:
                choice = choices[delta.index]
                if delta.prompt_logprobs is not None:
                    choice.prompt_logprobs = render(self.ctx.formatter, delta.prompt_logprobs)
                if (echo := self._echo(delta)) is not None:
                    choice.text, choice.logprobs = echo.text, echo.logprobs
                part = self._choice(delta)
                choice.text += part.text
                if part.logprobs is not None:
                    choice.logprobs = _extend(choice.logprobs, part.logprobs)
                if delta.finish_reason is not None:
                    choice.finish_reason, choice.stop_reason = (
                        delta.finish_reason,
                        delta.stop_reason,
                    )
        return self._body(choices, usage=True)


def _extend(into: CompletionLogprobs | None, more: CompletionLogprobs) -> CompletionLogprobs:
    if into is None:
        return more
    into.tokens += more.tokens
    into.token_logprobs += more.token_logprobs
    into.top_logprobs += more.top_logprobs
    into.text_offset += more.text_offset
    return into
