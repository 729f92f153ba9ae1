"""The core's frontend socket, served by one I/O thread around the busy loop.

The ROUTER socket may only be touched by one thread, so the busy loop never touches it:
incoming messages land on a queue, outgoing ones go through an inproc PUSH/PULL pair that
the I/O thread polls beside the ROUTER.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import zmq

from engine_core.messages.curve import CurveKeys
from engine_core.messages.framing import Channel
from engine_core.messages.frontend import CORE, EngineSnapshot, FrontendMsg, StepOutputs

logger = logging.getLogger(__name__)


class FrontendIO:
    """Bound ROUTER for all frontends; `inbox` yields (identity, type, message)."""

    def __init__(self, ctx: zmq.Context, address: str, keys: CurveKeys | None = None) -> None:
        self.inbox: queue.Queue[tuple[bytes, int, Any]] = queue.Queue()
        self.frontends: set[bytes] = set()
        self._ctx = ctx
        self._pipe = f"inproc://frontend-out-{id(self)}"
        self._channel = Channel(ctx, CORE, keys=keys)
        self.address = self._channel.bind(address)  # where it ended up bound
        self._router = self._channel.sock
        self._pull = ctx.socket(zmq.PULL)
        self._pull.bind(self._pipe)
        self._push = ctx.socket(zmq.PUSH)  # used by the busy loop only
        self._push.connect(self._pipe)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="frontend-io", daemon=True)
        self._thread.start()

    def send(self, identity: bytes, outputs: StepOutputs) -> None:
        """Queue one StepOutputs for one frontend (called from the busy loop)."""
        self._push.send_multipart(
            self._channel.frames(FrontendMsg.OUTPUTS, outputs, to=identity), copy=False
        )

    def broadcast(self, snapshot: EngineSnapshot) -> None:
        """Queue one EngineSnapshot for every frontend known (called from the busy loop)."""
        frames = self._channel.frames(FrontendMsg.STATS, snapshot)  # encoded once for all
        for identity in list(self.frontends):
            self._push.send_multipart([identity, *frames], copy=False)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._push.close(linger=1000)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(100))
            if self._pull in ready:
                self._forward()
            if self._router in ready:
                self._receive()
        # NOTE: the last outputs (a drain's final deltas) may still be in the pipe or queued
        # on the ROUTER; linger so they leave before the core exits
        self._forward()
        self._router.close(linger=1000)
        self._pull.close()

    def _forward(self) -> None:
        while True:
            try:
                self._router.send_multipart(self._pull.recv_multipart(zmq.NOBLOCK), copy=False)
            except zmq.Again:
                return

    def _receive(self) -> None:
        while True:
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, body = frames[0], frames[1:]
            decoded = self._channel.decode(body)
            if decoded is None:
                continue
            self.frontends.add(identity)
            self.inbox.put((identity, *decoded))
