"""The engine core process: a busy loop between frontends and workers.

No asyncio here: the loop drains incoming requests, runs one engine step and publishes
one output batch per frontend. It blocks only when idle. In both modes the engine is a
pool of workers (engine_core/pool.py): one mixed worker colocated, prefill and decode
workers disaggregated; a step keeps a plan in flight on each and handles results as
they arrive.
"""

from __future__ import annotations

import gc
import itertools
import logging
import queue
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace

import zmq

from engine_core.async_steps import steps_ahead
from engine_core.frontend_io import FrontendIO
from engine_core.messages.common import ErrorKind
from engine_core.messages.config import EngineAddresses, EngineConfig
from engine_core.messages.curve import authenticate, load_keys
from engine_core.messages.frontend import (
    AbortRequests,
    AddRequest,
    FrontendMsg,
    RequestDelta,
    StepOutputs,
)
from engine_core.placement import cores_for, local_roles
from engine_core.pool import PoolEngine
from engine_core.scheduler import Scheduler, rejected, scheduler_for
from engine_core.snapshots import Snapshots
from engine_core.worker_link import WorkerLink
from models.loader import load_config, resolve_model

logger = logging.getLogger(__name__)

STATS_INTERVAL = 1.0  # seconds between stats messages while idle (frontends' liveness signal)
DRAIN_TIMEOUT = 30.0  # seconds SIGTERM waits for in-flight requests before aborting them


class BusyLoop:
    """Owns the engine and routes its outputs to the frontend that sent each request."""

    def __init__(self, engine: PoolEngine, frontends: FrontendIO) -> None:
        self.engine = engine
        self.frontends = frontends
        self.owners: dict[str, bytes] = {}
        self.draining_since: float | None = None
        self._last_sent: dict[bytes, float] = {}  # frontend identity -> monotonic time
        self.snapshots = Snapshots(engine)

    def run(self) -> None:
        while not self._drain_over():
            busy = self.engine.wants_step()
            self._drain_inbox(block=not busy)
            if self.engine.wants_step():
                self._step()
            if self._stats_due():
                self._publish([])
            if self.snapshots.due():
                self.frontends.broadcast(self.snapshots.take())

    def start_draining(self) -> None:
        """Finish what is in flight, accept nothing new, replace no worker that dies."""
        if self.draining_since is None:
            self.draining_since = time.monotonic()  # first: a second signal may land mid-log
            logger.info("draining %d requests", len(self.owners))
            self.engine.drain()

    def keep_alive(self) -> None:
        """Stats to the frontends that are due some: called while a long step runs, so
        that they know the core is alive (their health check gives up on silence)."""
        if self._stats_due():
            self._publish([])

    def _step(self) -> None:
        deltas = self.engine.step()
        # NOTE: a step often just waited for workers; the idle stats cover it
        if deltas:
            self._publish(deltas)

    def _drain_inbox(self, block: bool) -> None:
        timeout = STATS_INTERVAL if block else None
        while True:
            try:
                identity, kind, message = self.frontends.inbox.get(block=block, timeout=timeout)
            except queue.Empty:
                return
            block = False
            if kind == FrontendMsg.ADD:
                self._add(identity, message)
            elif kind == FrontendMsg.ABORT:
                self._abort(identity, message)

    def _add(self, identity: bytes, request: AddRequest) -> None:
        if self.draining_since is not None:
            self._send(identity, [_rejected(request.request_id, "server is shutting down")])
            return
        rejection = self.engine.add_request(request)
        if rejection is not None:
            # NOTE: straight back to the sender: a duplicate id must not re-own a live request
            self._send(identity, [rejection])
            return
        self.owners[request.request_id] = identity

    def _abort(self, identity: bytes, message: AbortRequests) -> None:
        # a frontend may abort only its own requests
        ids = [r for r in message.request_ids if self.owners.get(r) == identity]
        self.engine.abort_requests(ids)
        for request_id in ids:
            self.owners.pop(request_id, None)

    def _abort_all(self, reason: str) -> None:
        ids = list(self.owners)
        self.engine.abort_requests(ids)
        self._publish([_rejected(r, reason) for r in ids])

    def _drain_over(self) -> bool:
        """Draining and nothing left to wait for: every request finished, or the drain
        timed out and the rest were aborted here. A step still out on a hung worker is
        not waited for past the deadline: it would hold the shutdown for ever."""
        if self.draining_since is None:
            return False
        if not self.engine.has_unfinished_requests():
            return True
        if time.monotonic() - self.draining_since <= DRAIN_TIMEOUT:
            return False
        logger.warning("drain timeout: aborting %d requests", len(self.owners))
        self._abort_all("server is shutting down")
        return True

    def _stats_due(self) -> bool:
        clock = time.monotonic()
        return any(
            clock - self._last_sent.get(i, 0.0) > STATS_INTERVAL
            for i in list(self.frontends.frontends)
        )

    def _publish(self, deltas: list[RequestDelta]) -> None:
        """One StepOutputs per frontend with its requests' deltas, stats on each."""
        stats = self.engine.stats()
        now = time.time()
        by_owner: dict[bytes, list[RequestDelta]] = defaultdict(list)
        for delta in deltas:
            owner = self.owners.get(delta.request_id)
            if owner is not None:
                by_owner[owner].append(delta)
            if delta.finish_reason is not None or delta.error:
                self.owners.pop(delta.request_id, None)
        # NOTE: a frontend with no requests in this step still hears from the core at least
        # every STATS_INTERVAL: stats are its liveness signal, and a busy core must not go
        # silent to the frontends whose clients are idle.
        clock = time.monotonic()
        for identity in list(self.frontends.frontends):
            mine = by_owner.get(identity)
            if mine or clock - self._last_sent.get(identity, 0.0) > STATS_INTERVAL:
                self.frontends.send(identity, StepOutputs(mine or [], now, stats))
                self._last_sent[identity] = clock

    def _send(self, identity: bytes, deltas: list[RequestDelta]) -> None:
        self.frontends.send(identity, StepOutputs(deltas, time.time(), self.engine.stats()))


def _rejected(request_id: str, reason: str) -> RequestDelta:
    return rejected(request_id, reason, ErrorKind.SERVER)


def scheduler_factory(config: EngineConfig) -> Callable[..., Scheduler]:
    """(num_blocks, max_model_len, role="mixed") -> Scheduler; reads the model's EOS ids
    and vocab once."""
    model = load_config(resolve_model(config.model))

    def make(num_blocks: int, max_model_len: int, role: str = "mixed") -> Scheduler:
        return scheduler_for(config, model, num_blocks, max_model_len, role)

    return make


def pool_engine(config: EngineConfig, link: WorkerLink) -> PoolEngine:
    """One local mixed worker (colocated), or P prefill and D decode local workers, each
    pinned to its kind's cores; dead ones are replaced.

    Disaggregated, workers on other hosts may join at any time (`duet prefill-worker ...`).
    """
    link.config = config  # for workers that join from other hosts
    names = {"mixed": "worker", "prefill": "prefill", "decode": "decode"}
    counters = {role: itertools.count() for role in names}

    def spawn(role: str) -> str:
        worker_id = f"{names[role]}-{next(counters[role])}"
        link.spawn(config, worker_id, role, cores_for(role))
        return worker_id

    for role in local_roles(config):
        spawn(role)
    make = scheduler_factory(config)  # reads the model's config while the workers load it
    link.wait_ready(list(link.processes))
    engine = PoolEngine(
        link,
        lambda ready: make(ready.num_blocks, ready.max_model_len, ready.role),
        respawn=spawn,
        transfer_timeout=config.kv_transfer_timeout,
        colocated=config.colocated,
        steps_ahead=steps_ahead(config),
    )
    for ready in link.ready.values():  # ours, and any that joined from elsewhere meanwhile
        engine.add_worker(ready)
    return engine


def run_engine_core(
    config: EngineConfig,
    addresses: EngineAddresses,
    on_serving: Callable[[], None] | None = None,
) -> None:
    """Process entry point: bind, start the workers, serve until SIGTERM/SIGINT drains us.

    `on_serving` is called once the workers are ready and the loop is about to run (the
    launcher's sign that a later death is a crash to recover from, not a bad start).
    """
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s engine-core %(levelname)s %(message)s"
    )
    if config.worker_address:
        addresses = replace(addresses, workers=config.worker_address)
    ctx = zmq.Context()
    keys = load_keys(addresses.curve_keys)
    authenticator = authenticate(ctx, keys)
    frontends = FrontendIO(ctx, addresses.frontend, keys)
    link = WorkerLink(ctx, addresses.workers, keys)
    loop = BusyLoop(pool_engine(config, link), frontends)
    link.on_wait = loop.keep_alive

    def drain(signum: int, _frame: object) -> None:
        logger.info("signal %s", signal.Signals(signum).name)
        loop.start_draining()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    logger.info(
        "serving on %s (%s)",
        frontends.address,
        "colocated" if config.colocated else "disaggregated",
    )
    gc.freeze()  # start-up objects out of full collections (see decode_workers/worker.py)
    if on_serving is not None:
        on_serving()
    try:
        loop.run()
    finally:
        link.shutdown()
        frontends.close()
        if authenticator is not None:
            authenticator.stop()
        ctx.term()
    logger.info("stopped")
