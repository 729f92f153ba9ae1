"""One streaming request to an OpenAI-compatible server, timed chunk by chunk."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from frontend.bench.datasets import SampleRequest


@dataclass(frozen=True)
class RequestSettings:
    """What every request of a run shares."""

    url: str  # base URL + endpoint
    model: str
    chat: bool
    ignore_eos: bool = False
    temperature: float | None = None  # None: the server's default
    response_format: dict[str, Any] | None = None  # the structured-output workload


@dataclass
class RequestResult:
    """What the client saw of one request; times are seconds on the run's clock.

    A token chunk is an SSE event whose first choice carries text (or the finish chunk of
    an output without text); its arrival time is in `token_times`. Token counts come from
    the server's usage report when it sends one.
    """

    success: bool = False
    error: str = ""
    start: float = 0.0
    token_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    usage_reported: bool = False

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def latency(self) -> float:
        """Send -> last token chunk (E2EL), as vLLM measures it."""
        return self.token_times[-1] - self.start

    @property
    def itl(self) -> list[float]:
        """Gaps between consecutive token chunks."""
        return [b - a for a, b in itertools.pairwise(self.token_times)]

    @property
    def tpot(self) -> float:
        """Mean time per output token after the first; 0 for single-token outputs."""
        if self.output_tokens <= 1:
            return 0.0
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def payload(req: SampleRequest, settings: RequestSettings) -> dict[str, Any]:
    """The JSON body: streaming, with usage in the last chunk."""
    body: dict[str, Any] = {
        "model": req.model or settings.model,
        # max_tokens (not max_completion_tokens) in chat too: more servers understand it
        "max_tokens": req.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if settings.chat:
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    if settings.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension; duet honours it too
    if settings.temperature is not None:
        body["temperature"] = settings.temperature
    if settings.response_format is not None:
        body["response_format"] = settings.response_format
    return body


# The structured-output workload's schema: a record of bounded fields, nested once, so
# outputs finish by themselves (with --ignore-eos the request goes on at EOS only).
BENCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "author": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 30},
                "alive": {"type": "boolean"},
            },
            "required": ["name", "alive"],
            "additionalProperties": False,
        },
    },
    "required": ["title", "year", "tags", "author"],
    "additionalProperties": False,
}


def response_format(kind: str | None) -> dict[str, Any] | None:
    """The response_format of `--structured-output kind` (None: unconstrained)."""
    if kind is None:
        return None
    return {"type": "json_schema", "json_schema": {"name": "record", "schema": BENCH_SCHEMA}}


# A pooled keep-alive connection that the server has closed in the meantime fails the next
# request on it before any response (llama.cpp's server closes idle ones after 5 s; the
# request's body cannot be written, or the server hangs up unanswered). Such a request is
# sent again on another connection, this many times at most; one that got a response never.
STALE_CONNECTION_RETRIES = 2


async def send_request(
    session: aiohttp.ClientSession,
    req: SampleRequest,
    settings: RequestSettings,
    clock: Callable[[], float],
) -> RequestResult:
    """Send one request and read its stream to the end; never raises."""
    result = RequestResult(start=clock(), prompt_tokens=req.prompt_len)
    headers = (
        {"Authorization": f"Bearer {key}"} if (key := os.environ.get("OPENAI_API_KEY")) else {}
    )
    for attempt in itertools.count():
        responded = False
        try:
            async with session.post(
                settings.url, json=payload(req, settings), headers=headers
            ) as resp:
                responded = True
                if resp.status != 200:
                    result.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                    return result
                async for line in resp.content:
                    _on_line(line, result, settings.chat, clock)
            break
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
            if responded or attempt == STALE_CONNECTION_RETRIES:
                result.error = f"{type(e).__name__}: {e}"
                return result
        except Exception as e:  # whatever goes wrong fails this request, not the run
            result.error = f"{type(e).__name__}: {e}"
            return result
    _finish(result)
    return result


def _on_line(line: bytes, result: RequestResult, chat: bool, clock: Callable[[], float]) -> None:
    text = line.decode().strip()
    if not text.startswith("data:"):
        return  # blank separators, SSE comments (pings), event/id fields
    now = clock()  # before parsing, so it is the chunk's arrival time
    data = text[len("data:") :].strip()
    if data == "[DONE]":
        return
    event = json.loads(data)
    if "error" in event:
        raise ValueError(f"server error in stream: {event['error']}")
    if choices := event.get("choices"):
        first = choices[0]
        piece = (first.get("delta") or {}).get("content") if chat else first.get("text")
        # An output that stops at its first token (EOS) carries no text, only the finish
        # chunk: that chunk is its token's arrival, as vLLM's client counts it.
        if piece or (first.get("finish_reason") and not result.token_times):
            result.token_times.append(now)
    if usage := event.get("usage"):
        result.usage_reported = True
        result.output_tokens = int(usage.get("completion_tokens") or 0)
        result.prompt_tokens = int(usage.get("prompt_tokens") or result.prompt_tokens)


def _finish(result: RequestResult) -> None:
    if not result.token_times:
        result.error = "the stream ended without a token"
        return
    if not result.usage_reported:
        result.output_tokens = len(result.token_times)  # best guess: a token per chunk
    result.success = True
