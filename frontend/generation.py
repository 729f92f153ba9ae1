"""One API request in the engine: its choices fan out as child requests, text comes back.

A request with P prompts and n samples becomes P*n child requests "<id>-<index>" (seed+i
for the i-th sample of a prompt). Each child is detokenized on its own; a stop string ends
it here and aborts it in the core. Their outputs merge into one stream of ChoiceDelta.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

import msgspec

from engine_core.client import EngineDeadError
from engine_core.messages.common import ErrorKind, FinishReason, TokenLogprobs
from engine_core.messages.frontend import AddRequest, RequestDelta
from engine_core.messages.lora import LoRARef
from engine_core.messages.sampling_params import SamplingParams
from frontend.context import ServerContext
from frontend.errors import APIError
from frontend.responses import Usage
from models.detokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class ChoiceDelta:
    """What one choice gained in one engine step (text may lag tokens near stop strings)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None  # with a choice's first delta, if asked


class Generation:
    """Fans a request out to the core; iterate `stream()` once for its ChoiceDeltas."""

    def __init__(
        self,
        ctx: ServerContext,
        request_id: str,
        prompts: list[list[int]],
        params: SamplingParams,
        lora: LoRARef | None = None,
    ) -> None:
        self.ctx = ctx
        self.lora = lora
        self.model_name = ctx.model_name if lora is None else lora.name  # what responses say
        self.request_id = request_id
        self.prompts = prompts
        self.params = params
        self.num_prompt_tokens = sum(len(p) for p in prompts)
        self.num_completion_tokens = 0
        self.num_choices = len(prompts) * params.n
        self._start = time.monotonic()
        self._finish_reasons: list[str] = []

    async def stream(self) -> AsyncGenerator[ChoiceDelta]:
        """Every choice's deltas, interleaved as the core produces them.

        Raises APIError(503) if the core fails or goes away. Closing the stream early
        aborts whatever is still running.
        """
        outcome = "aborted"
        try:
            children = [self._choice(i) for i in range(self.num_choices)]
            async with contextlib.aclosing(merge(children)) as deltas:
                async for delta in deltas:
                    self.num_completion_tokens += len(delta.token_ids)
                    if delta.finish_reason is not None:
                        self._finish_reasons.append(delta.finish_reason)
                    yield delta
            outcome = ",".join(sorted(set(self._finish_reasons)))
        except APIError as exc:
            outcome = f"failed ({exc.message})"
            raise
        finally:
            self._log_finished(outcome)

    async def _choice(self, index: int) -> AsyncGenerator[ChoiceDelta]:
        prompt = self.prompts[index // self.params.n]
        params = _child_params(self.params, index % self.params.n)
        timer = self.ctx.metrics.start_request()
        timer.num_prompt_tokens = len(prompt)
        detok = IncrementalDetokenizer(self.ctx.tokenizer, params, prompt)
        request = AddRequest(
            f"{self.request_id}-{index}", prompt, params, time.time(), lora=self.lora
        )
        finished = False
        try:
            async with contextlib.aclosing(self.ctx.client.add_request(request)) as core:
                async for delta in core:
                    timer.on_delta(delta)
                    if delta.error is not None:
                        raise _engine_error(delta)
                    out = _choice_delta(index, delta, detok)
                    finished = out.finish_reason is not None
                    yield out
                    if finished:
                        return  # leaving the `async with` aborts a stop-string finish
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_unavailable") from None
        finally:
            # a finish the core reported was counted by on_delta; this is a no-op then
            timer.finish(FinishReason.STOP if finished else FinishReason.ABORT)

    def usage(self) -> Usage:
        """Token counts so far: the prompts once each, every choice's output tokens."""
        total = self.num_prompt_tokens + self.num_completion_tokens
        return Usage(self.num_prompt_tokens, self.num_completion_tokens, total)

    def _log_finished(self, outcome: str) -> None:
        if self.ctx.log_requests:
            logger.info(
                "request %s finished: %s, %d prompt + %d completion tokens in %.2f s",
                self.request_id,
                outcome,
                self.num_prompt_tokens,
                self.num_completion_tokens,
                time.monotonic() - self._start,
            )

    def log_accepted(self) -> None:
        if self.ctx.log_requests:
            p = self.params
            logger.info(
                "request %s accepted: %d prompt(s), %d prompt tokens, n=%d, max_tokens=%s, "
                "temperature=%g, seed=%s",
                self.request_id,
                len(self.prompts),
                self.num_prompt_tokens,
                p.n,
                p.max_tokens,
                p.temperature,
                p.seed,
            )


def _choice_delta(index: int, delta: RequestDelta, detok: IncrementalDetokenizer) -> ChoiceDelta:
    """Detokenize one core delta; tokens after a matched stop string are dropped."""
    before = detok.num_tokens
    text, stop = detok.update(delta.new_token_ids, delta.finish_reason is not None)
    used = detok.num_tokens - before
    out = ChoiceDelta(index, text, delta.new_token_ids[:used], _head(delta.new_logprobs, used))
    out.prompt_logprobs = delta.prompt_logprobs
    if stop is not None:
        out.finish_reason, out.stop_reason = "stop", stop
    elif delta.finish_reason is not None:
        out.finish_reason, out.stop_reason = delta.finish_reason.api_name, delta.stop_reason
    return out


def _child_params(params: SamplingParams, sample: int) -> SamplingParams:
    seed = None if params.seed is None else params.seed + sample
    return msgspec.structs.replace(params, n=1, seed=seed)


def _head(logprobs: list[TokenLogprobs] | None, count: int) -> list[TokenLogprobs] | None:
    return None if logprobs is None else logprobs[:count]


async def merge(streams: list[AsyncGenerator[T]]) -> AsyncGenerator[T]:
    """Interleave async generators as items arrive; closing the merge closes them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    pending = {asyncio.ensure_future(anext(s)): s for s in streams}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                stream = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(stream))] = stream
                yield item
    finally:
        await _close_all(pending, streams)


async def _close_all(pending: dict[asyncio.Future, AsyncIterator], streams: list) -> None:
    for task in pending:
        task.cancel()
    # NOTE: a generator cannot be closed while a task is still inside it, so the
    # cancelled tasks must finish first.
    await asyncio.gather(*pending, return_exceptions=True)
    for stream in streams:
        await stream.aclose()


def _engine_error(delta: RequestDelta) -> APIError:
    """The core's word on a failed request: 400 if the request is at fault, else 503."""
    if delta.error_kind == ErrorKind.CLIENT:
        return APIError(
            400, f"the engine rejected the request: {delta.error}", code="invalid_value"
        )
    return APIError(
        503, f"the engine could not run the request: {delta.error}", code="engine_error"
    )
