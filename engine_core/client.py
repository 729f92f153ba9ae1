"""The frontend side of the frontend <-> core wire: one asyncio DEALER per frontend process.

Requests go out as ADD / ABORT frames; the core answers with one StepOutputs per step for
everything this frontend owns, which a single receive task splits into one queue per
request. While idle the core still sends stats (an empty StepOutputs) every second, which
doubles as a heartbeat; twice a second it also sends an EngineSnapshot (STATS). A core
that dies is noticed at once when its connection drops (a local core, or a remote one
whose host is up), else after the silence.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from engine_core.messages.common import FinishReason
from engine_core.messages.config import env_seconds
from engine_core.messages.curve import CurveKeys
from engine_core.messages.framing import Channel
from engine_core.messages.frontend import (
    FRONTEND,
    AbortRequests,
    AddRequest,
    EngineSnapshot,
    FrontendMsg,
    RequestDelta,
    SchedulerStats,
    StepOutputs,
)

logger = logging.getLogger(__name__)

# The core speaks at least every second, also while a long step runs, so silence this
# long means it is gone (or wedged).
HEALTH_TIMEOUT = env_seconds("DUET_HEALTH_TIMEOUT", 30.0)


class EngineDeadError(RuntimeError):
    """The engine core stopped talking; requests in flight cannot finish."""


class EngineClient:
    """Submit requests to the engine core and stream their deltas back.

    Use inside a running event loop: `await client.start()`, then `add_request(...)` per
    request, `await client.close()` at shutdown.
    """

    def __init__(
        self,
        address: str,
        identity: bytes,
        health_timeout: float = HEALTH_TIMEOUT,
        on_stats: Callable[[SchedulerStats], None] | None = None,
        keys: CurveKeys | None = None,
        on_snapshot: Callable[[EngineSnapshot], None] | None = None,
    ) -> None:
        self.address = address
        self.identity = identity
        self.keys = keys  # CURVE client keys for a tcp core
        self.health_timeout = health_timeout
        self.on_stats = on_stats  # called with every SchedulerStats (e.g. for /metrics)
        self.latest_stats: SchedulerStats | None = None
        self.on_snapshot = on_snapshot  # called with every EngineSnapshot
        self.latest_snapshot: EngineSnapshot | None = None
        self._ctx = zmq.asyncio.Context()
        self._channel: Channel | None = None
        self._queues: dict[str, asyncio.Queue[RequestDelta | Exception]] = {}
        self._unstarted: set[str] = set()  # added, no token back yet
        self._started_at = time.monotonic()
        self._last_heard: float | None = None
        self._disconnected = False  # the connection to the core dropped and is not back
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        """Connect, say HELLO so the core knows this identity, and start listening."""
        channel = Channel(self._ctx, FRONTEND, self.identity, self.keys)
        channel.connect(self.address)
        self._channel = channel
        self._started_at = time.monotonic()
        self._send(FrontendMsg.HELLO)
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="engine-client-recv"),
            asyncio.create_task(self._watchdog(), name="engine-client-watchdog"),
            asyncio.create_task(self._watch_connection(), name="engine-client-monitor"),
        ]

    def shut_down(self, reason: str) -> None:
        """End every request in flight with `reason` (an EngineDeadError to its handler), and
        abort them in the core: a frontend out of time to drain still ends each stream
        with an error event instead of a cut connection."""
        if self._queues:
            ids = list(self._queues)
            self._fail_all(EngineDeadError(reason))
            self._send(FrontendMsg.ABORT, AbortRequests(ids))

    async def close(self) -> None:
        """Abort everything in flight, stop the tasks and close the socket."""
        if self._queues:
            self.abort(list(self._queues))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._channel is not None:
            self._channel.close(linger=100)  # let the aborts leave
        self._ctx.term()

    @property
    def is_healthy(self) -> bool:
        """True when the core is connected and has spoken within `health_timeout` seconds."""
        return (
            not self._disconnected
            and self._last_heard is not None
            and self._silence() < self.health_timeout
        )

    @property
    def num_unstarted(self) -> int:
        """Requests of this frontend that the core has not produced a token for yet."""
        return len(self._unstarted)

    def add_request(self, request: AddRequest) -> AsyncGenerator[RequestDelta]:
        """Send `request` now; iterate the result for its deltas until it finishes.

        The last delta has `finish_reason` (or `error`) set. Closing the iterator early
        (a stop string, a client that went away) aborts the request in the core. Raises
        EngineDeadError from the iterator if the core goes silent.
        """
        if request.request_id in self._queues:
            raise ValueError(f"request id {request.request_id!r} is already in flight")
        queue: asyncio.Queue[RequestDelta | Exception] = asyncio.Queue()
        self._queues[request.request_id] = queue
        self._unstarted.add(request.request_id)
        self._send(FrontendMsg.ADD, request)
        return self._deltas(request.request_id, queue)

    def abort(self, request_ids: list[str]) -> None:
        """Tell the core to drop these requests; their iterators end with an ABORT delta."""
        for request_id in request_ids:
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(RequestDelta(request_id, [], finish_reason=FinishReason.ABORT))
            self._forget(request_id)
        self._send(FrontendMsg.ABORT, AbortRequests(request_ids))

    async def _deltas(
        self, request_id: str, queue: asyncio.Queue[RequestDelta | Exception]
    ) -> AsyncGenerator[RequestDelta]:
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finish_reason is not None or item.error is not None
                yield item
        finally:
            if not finished and request_id in self._queues:
                self.abort([request_id])
            self._forget(request_id)

    def _send(self, kind: FrontendMsg, message: AddRequest | AbortRequests | None = None) -> None:
        assert self._channel is not None, "EngineClient.start() was not awaited"
        # NOTE: with no HWM a DEALER send never blocks, so the returned future is already
        # done; not awaiting it keeps abort() callable from `finally` blocks.
        self._channel.send(kind, message)

    async def _receive_loop(self) -> None:
        assert self._channel is not None
        while True:
            frames = await self._channel.sock.recv_multipart()
            if self._last_heard is None or not self.is_healthy:
                logger.info("engine core at %s is up", self.address)
            self._last_heard = time.monotonic()
            decoded = self._channel.decode(frames)
            if decoded is None:
                continue
            kind, message = decoded
            if kind == FrontendMsg.STATS:
                self._set_snapshot(message)
            else:
                self._dispatch(message)

    def _set_snapshot(self, snapshot: EngineSnapshot) -> None:
        self.latest_snapshot = snapshot
        if self.on_snapshot is not None:
            self.on_snapshot(snapshot)

    def _set_stats(self, stats: SchedulerStats) -> None:
        self.latest_stats = stats
        if self.on_stats is not None:
            self.on_stats(stats)

    def _dispatch(self, step: StepOutputs) -> None:
        if step.stats is not None:
            self._set_stats(step.stats)
        for delta in step.outputs:
            queue = self._queues.get(delta.request_id)
            if queue is None:
                continue  # aborted here while the core was still producing it
            self._unstarted.discard(delta.request_id)
            queue.put_nowait(delta)

    async def _watchdog(self) -> None:
        """Fail requests in flight once the core has been silent for too long."""
        while True:
            await asyncio.sleep(1.0)
            if not self.is_healthy:
                # a core that (re)started after our HELLO does not know us yet
                self._send(FrontendMsg.HELLO)
            if self._queues and self._silence() >= self.health_timeout:
                logger.error(
                    "engine core silent for %.0f s: failing %d requests",
                    self._silence(),
                    len(self._queues),
                )
                self._fail_all(EngineDeadError("the engine core is not responding"))

    async def _watch_connection(self) -> None:
        """Fail requests in flight as soon as the core's connection drops; greet its successor."""
        assert self._channel is not None
        sock = self._channel.sock
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event == zmq.EVENT_DISCONNECTED:
                    self._on_disconnected()
                elif event == zmq.EVENT_CONNECTED and self._disconnected:
                    # NOTE: only a message from the new core counts: the old one's last
                    # stats may still have been read after the drop
                    self._disconnected, self._last_heard = False, None
                    self._started_at = time.monotonic()
                    self._send(FrontendMsg.HELLO)
        finally:
            sock.disable_monitor()
            monitor.close()

    def _on_disconnected(self) -> None:
        self._disconnected = True
        logger.error(
            "lost the engine core at %s: failing %d requests", self.address, len(self._queues)
        )
        self._fail_all(EngineDeadError("the engine core went away"))

    def _silence(self) -> float:
        return time.monotonic() - (self._last_heard or self._started_at)

    def _fail_all(self, error: Exception) -> None:
        for request_id, queue in list(self._queues.items()):
            queue.put_nowait(error)
            self._forget(request_id)

    def _forget(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._unstarted.discard(request_id)
