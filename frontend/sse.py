"""Server-sent events: `data: {json}\\n\\n` per chunk, then `data: [DONE]\\n\\n`.

Headers go out only with the first chunk, so anything that fails before the first token
(a rejected or failed request) still gets a proper HTTP status and a JSON error body.

Chunks made ready together leave in one transport write (see `_CoalescingResponse`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator

import msgspec
from aiohttp import web

from frontend.errors import APIError

logger = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()
# bytes a stream may hold while its client reads slower than frames are made (aiohttp's own)
HIGH_WATER_BYTES = 64 * 1024


async def stream_events(
    request: web.Request, events: AsyncGenerator[msgspec.Struct]
) -> web.StreamResponse:
    """Send each event as one SSE chunk; a mid-stream APIError becomes an error event.

    `events` is closed on the way out, which aborts its requests in the core when the
    client went away (ConnectionResetError here, or CancelledError from aiohttp).
    """
    response: web.StreamResponse | None = None
    try:
        async with contextlib.aclosing(events):
            try:
                async for event in events:
                    if response is None:
                        response = await _open(request)
                    await response.write(_frame(event))
            except APIError as exc:
                if response is None:
                    raise  # nothing sent yet: answer with the status and a JSON body
                await response.write(_frame(exc.body()))
        if response is None:
            response = await _open(request)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        logger.info("client went away mid-stream: %s %s", request.method, request.path)
    # 499 (nginx's "client closed request") is never sent: the client is gone
    return response if response is not None else web.Response(status=499)


def _frame(event: msgspec.Struct) -> bytes:
    return b"data: " + _encoder.encode(event) + b"\n\n"


async def _open(request: web.Request) -> web.StreamResponse:
    response = _CoalescingResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            # tell nginx-style proxies not to buffer the stream
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    return response


class _CoalescingResponse(web.StreamResponse):
    """A stream response whose writes made in one pass of the event loop go out as one.

    A stream's frames come in bursts: a step's deltas for n choices, the role chunk with
    the first text, the finish with usage and [DONE], and under load several engine steps
    that piled up while the frontend was busy. Each aiohttp write is a chunk header, a
    transport call and a syscall (36 % of a saturated frontend's CPU at one per frame), so
    `write` only queues: a writer task, which first runs once the handler waits for the
    engine, sends everything queued by then as one write.
    """

    def __init__(self, *, headers: dict[str, str]) -> None:
        super().__init__(headers=headers)
        self._frames: list[bytes] = []
        self._queued_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._error: ConnectionResetError | None = None

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue `data`; wait only while the client reads slower than frames are made."""
        if self._error is not None:
            raise self._error  # the client went away during an earlier write
        self._frames.append(bytes(data))
        self._queued_bytes += len(data)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._send_queued())
        elif self._queued_bytes > HIGH_WATER_BYTES:
            await asyncio.shield(self._writer)

    async def write_eof(self, data: bytes = b"") -> None:
        if self._writer is not None:
            await asyncio.shield(self._writer)
        if self._error is not None:
            raise self._error
        await super().write_eof(data)

    async def _send_queued(self) -> None:
        # NOTE: the error is kept for the handler's next call rather than raised here, where
        # nobody would see it once the handler itself was cancelled by the disconnect
        try:
            while self._frames:
                data = b"".join(self._frames)
                self._frames.clear()
                self._queued_bytes = 0
                await super().write(data)
        except ConnectionResetError as exc:
            self._error = exc
