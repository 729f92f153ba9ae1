"""POST /v1/chat/completions: messages -> chat template -> generation -> message or SSE."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import jinja2
from aiohttp import web

from engine_core.messages.sampling_params import StructuredSpec
from frontend import tokenizing
from frontend.context import CONTEXT, ServerContext
from frontend.errors import bad_request
from frontend.generation import ChoiceDelta, Generation
from frontend.prompt_logprobs import check_prompt_logprobs, render
from frontend.protocol import (
    UNSUPPORTED_CHAT,
    UNSUPPORTED_MESSAGE,
    ChatCompletionRequest,
    ChatMessage,
    decode_request,
    reject_unsupported,
)
from frontend.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    json_response,
)
from frontend.sampling import fit_max_tokens, sampling_params
from frontend.sse import stream_events
from frontend.structured_outputs import check_compiles, parse_structured, request_spec
from frontend.tool_calls import ToolPlan, plan_tools
from frontend.tool_prompt import hermes, knows_tools, native, tool_calls_in
from frontend.tool_stream import ToolStreamer

ROLES = {
    "system": "system", "developer": "system", "user": "user", "assistant": "assistant",
    "tool": "tool",
}  # fmt: skip
MAX_TOP_LOGPROBS = 20


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    """Handle one chat completion request, streamed or not."""
    ctx = request.app[CONTEXT]
    body = decode_request(await request.read(), ChatCompletionRequest)
    lora = ctx.check_model(body.model)
    reject_unsupported(body, UNSUPPORTED_CHAT)
    tools = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, ctx.tool_call_parser)
    structured = await _constraint(ctx, body, tools)
    prompt = await chat_prompt(ctx, body, tools)
    # max_completion_tokens is OpenAI's newer name for max_tokens
    max_tokens = (
        body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    )
    params = sampling_params(
        body,
        max_tokens=max_tokens,
        logprobs=_logprobs(body),
        vocab_size=ctx.vocab_size,
        logprobs_param="top_logprobs",
        structured=structured,
    )
    check_prompt_logprobs(body)
    params = fit_max_tokens(params, len(prompt), ctx.max_model_len, None, "messages")
    ctx.admit()
    gen = Generation(ctx, f"chatcmpl-{uuid.uuid4().hex}", [prompt], params, lora)
    gen.log_accepted()
    view = _ChatView(ctx, gen, params.logprobs, tools)
    if body.stream:
        return await stream_events(request, view.chunks(*body.usage_flags()))
    return json_response(await view.complete())


async def _constraint(
    ctx: ServerContext, body: ChatCompletionRequest, tools: ToolPlan | None
) -> StructuredSpec | None:
    """The output's constraint: from tool_choice required / named, else from the body."""
    spec = tools.spec if tools is not None else None
    if spec is None:
        return await request_spec(
            ctx.tokenizer, ctx.vocab_size, body.response_format, body.structured_outputs
        )
    if parse_structured(body.response_format, body.structured_outputs) is not None:
        raise bad_request(
            "response_format and structured_outputs cannot be combined with tool_choice "
            "required or a named function",
            "tool_choice",
        )
    await check_compiles(ctx.tokenizer, ctx.vocab_size, spec, "tools")
    return spec


async def chat_prompt(
    ctx: ServerContext, body: ChatCompletionRequest, tools: ToolPlan | None = None
) -> list[int]:
    """Token ids of the messages (and tools) rendered by the model's chat template."""
    messages = [_template_message(i, m) for i, m in enumerate(body.messages)]
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    functions = tools.functions if tools is not None else []
    tool_list = None
    if knows_tools(ctx.tokenizer.chat_template):
        messages, tool_list = native(messages, functions)
    else:
        messages = hermes(messages, functions)
    add_generation_prompt = body.add_generation_prompt is not False
    try:
        return await tokenizing.apply_chat_template(
            ctx.tokenizer, messages, add_generation_prompt, tool_list or None
        )
    except (ValueError, jinja2.TemplateError) as exc:
        raise bad_request(f"cannot apply the chat template: {exc}", "messages") from None


def _template_message(index: int, message: ChatMessage) -> dict[str, Any]:
    where = f"messages[{index}]"
    reject_unsupported(message, UNSUPPORTED_MESSAGE, prefix=f"{where}.")
    role = ROLES.get(message.role)
    if role is None:
        raise bad_request(f"role {message.role!r} is not supported", f"{where}.role")
    content = message.content
    if isinstance(content, list):
        for j, part in enumerate(content):
            if part.type != "text" or part.text is None:
                raise bad_request("only text content parts are supported", f"{where}.content[{j}]")
        content = "\n".join(part.text or "" for part in content)
    out: dict[str, Any] = {"role": role, "content": content or ""}
    calls = tool_calls_in(message.tool_calls, f"{where}.tool_calls")
    if calls:
        out["tool_calls"] = calls
    if isinstance(message.tool_call_id, str):
        out["tool_call_id"] = message.tool_call_id
    return out


def _logprobs(body: ChatCompletionRequest) -> int | None:
    top = body.top_logprobs
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad_request(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs")
    if not body.logprobs:
        if top:
            raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
        return None
    return top or 0


class _ChatView:
    """Shapes one Generation's deltas as chat completion bodies."""

    def __init__(
        self,
        ctx: ServerContext,
        gen: Generation,
        top_logprobs: int | None,
        tools: ToolPlan | None = None,
    ) -> None:
        self.ctx = ctx
        self.gen = gen
        self.top_logprobs = top_logprobs
        self.tools = tools
        self.created = int(time.time())
        self.streamers = [ToolStreamer(tools) for _ in range(gen.num_choices)] if tools else []

    def _logprobs(self, delta: ChoiceDelta) -> ChatLogprobs | None:
        if self.top_logprobs is None or delta.logprobs is None:
            return None
        return ChatLogprobs(self.ctx.formatter.chat(delta.logprobs, self.top_logprobs))

    def _chunk(self, choices: list[ChatChunkChoice], usage: bool = False) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            self.gen.request_id, self.created, self.gen.model_name, choices,
            self.gen.usage() if usage else None,
        )  # fmt: skip

    async def chunks(
        self, include_usage: bool, continuous: bool
    ) -> AsyncGenerator[ChatCompletionChunk]:
        """Stream chunks: each choice's role first, its text, then its finish reason."""
        started = False
        async with contextlib.aclosing(self.gen.stream()) as deltas:
            async for delta in deltas:
                if not started:  # only now: an error before any output keeps its status
                    started = True
                    for i in range(self.gen.num_choices):
                        yield self._chunk(
                            [ChatChunkChoice(i, ChatDelta("assistant", ""))], continuous
                        )
                choice = self._chunk_choice(delta)
                said = choice.delta.content or choice.delta.tool_calls or choice.logprobs
                if said or choice.finish_reason:
                    yield self._chunk([choice], continuous)
        if include_usage:
            yield self._chunk([], usage=True)

    def _chunk_choice(self, delta: ChoiceDelta) -> ChatChunkChoice:
        """One choice's stream chunk; with tools, its text goes through the tool parser."""
        finish = delta.finish_reason
        if not self.streamers:
            content, calls = delta.text, None
        else:
            streamer = self.streamers[delta.index]
            content, calls = streamer.feed(delta.text, finish is not None)
            finish = _tool_finish(finish, streamer.called)
        return ChatChunkChoice(
            delta.index, ChatDelta(content=content or None, tool_calls=calls or None),
            self._logprobs(delta), finish, delta.stop_reason,
        )  # fmt: skip

    async def complete(self) -> ChatCompletion:
        """Wait for every choice and build the whole response."""
        wants_logprobs = self.top_logprobs is not None
        choices = [
            ChatChoice(
                i,
                ChatMessageOut("assistant", ""),
                ChatLogprobs([]) if wants_logprobs else None,
                None,
            )
            for i in range(self.gen.num_choices)
        ]
        prompt_logprobs = None
        async with contextlib.aclosing(self.gen.stream()) as deltas:
            async for delta in deltas:
                if delta.prompt_logprobs is not None and delta.index == 0:
                    prompt_logprobs = render(self.ctx.formatter, delta.prompt_logprobs)
                choice = choices[delta.index]
                choice.message.content += delta.text
                new = self._logprobs(delta)
                if new is not None and choice.logprobs is not None:
                    choice.logprobs.content.extend(new.content)
                if delta.finish_reason is not None:
                    choice.finish_reason, choice.stop_reason = (
                        delta.finish_reason,
                        delta.stop_reason,
                    )
        if self.tools is not None:
            for choice in choices:
                text = choice.message.content or ""
                choice.message.content, calls = self.tools.parse(text)
                choice.message.tool_calls = calls or None
                choice.finish_reason = _tool_finish(choice.finish_reason, bool(calls))
        return ChatCompletion(
            self.gen.request_id, self.created, self.gen.model_name, choices, self.gen.usage(),
            prompt_logprobs,
        )  # fmt: skip


def _tool_finish(finish_reason: str | None, called: bool) -> str | None:
    return "tool_calls" if called and finish_reason == "stop" else finish_reason
