"""Server-sent events: `data: {json}\\n\\n` per chunk, then `data: [DONE]\\n\\n`.

Headers go out only with the first chunk, so anything that fails before the first token
(a rejected or failed request) still gets a proper HTTP status and a JSON error body.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator

import msgspec
from aiohttp import web

from frontend.errors import APIError

logger = logging.getLogger(__name__)

_encoder = msgspec.json.Encoder()


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
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            # tell nginx-style proxies not to buffer the stream
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    return response
