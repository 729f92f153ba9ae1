"""The engine core process: a busy loop between frontends and workers.

No asyncio here: the loop drains incoming requests, schedules one step, waits for the
worker's result, and publishes one output batch per frontend. It blocks only when idle.
"""

from __future__ import annotations

import logging
import queue
import signal
import time
from collections import defaultdict

import zmq

from engine_core.config import EngineAddresses, EngineConfig
from engine_core.engine import EngineCore
from engine_core.frontend_io import FrontendIO
from engine_core.messages.common import FinishReason
from engine_core.messages.frontend import (
    AbortRequests,
    AddRequest,
    FrontendMsg,
    RequestDelta,
    StepOutputs,
)
from engine_core.messages.worker import StepPlan, StepResult
from engine_core.scheduler import Scheduler, SchedulerConfig
from engine_core.worker_link import WorkerLink
from models.loader import load_config, resolve_model

logger = logging.getLogger(__name__)

STATS_INTERVAL = 1.0  # seconds between stats messages while idle (frontends' liveness signal)
DRAIN_TIMEOUT = 30.0  # seconds SIGTERM waits for in-flight requests before aborting them


class StepFailed(RuntimeError):
    pass


class RemoteExecutor:
    """Runs plans on one worker process over the worker link."""

    def __init__(self, link: WorkerLink, worker_id: str) -> None:
        self.link, self.worker_id = link, worker_id

    def execute(self, plan: StepPlan) -> StepResult:
        result = self.link.execute(self.worker_id, plan)
        if result.error:
            raise StepFailed(result.error)
        return result


class BusyLoop:
    """Owns the engine and routes its outputs to the frontend that sent each request."""

    def __init__(self, engine: EngineCore, frontends: FrontendIO) -> None:
        self.engine = engine
        self.frontends = frontends
        self.owners: dict[str, bytes] = {}
        self.draining_since: float | None = None
        self._last_stats = 0.0

    def run(self) -> None:
        while self.draining_since is None or self.engine.has_unfinished_requests():
            busy = self.engine.has_unfinished_requests()
            self._drain_inbox(block=not busy)
            if self.engine.has_unfinished_requests():
                self._step()
            self._check_drain_deadline()
            if time.monotonic() - self._last_stats > STATS_INTERVAL:
                self._publish([])

    def _step(self) -> None:
        try:
            self._publish(self.engine.step())
        except StepFailed as exc:
            logger.error("step failed on the worker, aborting its requests: %s", exc)
            self._abort_all(f"internal error in the model worker: {exc}")

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
                self._abort(message)

    def _add(self, identity: bytes, request: AddRequest) -> None:
        if self.draining_since is not None:
            self._send(identity, [_rejected(request.request_id, "server is shutting down")])
            return
        self.owners[request.request_id] = identity
        rejection = self.engine.add_request(request)
        if rejection is not None:
            self._publish([rejection])

    def _abort(self, message: AbortRequests) -> None:
        ids = [r for r in message.request_ids if r in self.owners]
        self.engine.abort_requests(ids)
        for request_id in ids:
            self.owners.pop(request_id, None)

    def _abort_all(self, reason: str) -> None:
        ids = list(self.owners)
        self.engine.abort_requests(ids)
        self._publish([_rejected(r, reason) for r in ids])

    def _check_drain_deadline(self) -> None:
        if self.draining_since is not None and time.monotonic() - self.draining_since > DRAIN_TIMEOUT:
            logger.warning("drain timeout: aborting %d requests", len(self.owners))
            self._abort_all("server is shutting down")

    def _publish(self, deltas: list[RequestDelta]) -> None:
        """One StepOutputs per frontend with its requests' deltas, stats on each."""
        stats = self.engine.scheduler.stats()
        now = time.time()
        by_owner: dict[bytes, list[RequestDelta]] = defaultdict(list)
        for delta in deltas:
            owner = self.owners.get(delta.request_id)
            if owner is not None:
                by_owner[owner].append(delta)
            if delta.finish_reason is not None or delta.error:
                self.owners.pop(delta.request_id, None)
        for identity in list(self.frontends.frontends):
            if by_owner.get(identity) or not deltas:
                self.frontends.send(identity, StepOutputs(by_owner.get(identity, []), now, stats))
        self._last_stats = time.monotonic()

    def _send(self, identity: bytes, deltas: list[RequestDelta]) -> None:
        self.frontends.send(identity, StepOutputs(deltas, time.time(), self.engine.scheduler.stats()))


def _rejected(request_id: str, reason: str) -> RequestDelta:
    return RequestDelta(request_id, [], finish_reason=FinishReason.ABORT, error=reason)


def build_scheduler(config: EngineConfig, num_blocks: int, max_model_len: int) -> Scheduler:
    """The scheduler for a pool of `num_blocks`, with the model's EOS ids."""
    eos = load_config(resolve_model(config.model)).eos_token_ids
    sched_config = SchedulerConfig(
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=max_model_len,
        block_size=config.block_size,
        enable_prefix_caching=config.enable_prefix_caching,
        policy=config.scheduling_policy,
    )
    return Scheduler(sched_config, num_blocks, eos)


def run_engine_core(config: EngineConfig, addresses: EngineAddresses) -> None:
    """Process entry point: bind, start the worker, serve until SIGTERM/SIGINT drains us."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine-core %(levelname)s %(message)s")
    ctx = zmq.Context()
    frontends = FrontendIO(ctx, addresses.frontend)
    link = WorkerLink(ctx, addresses.workers)
    link.spawn(config, "worker-0", "mixed")
    link.wait_ready(["worker-0"])
    ready = link.ready["worker-0"]
    scheduler = build_scheduler(config, ready.num_blocks, ready.max_model_len)
    loop = BusyLoop(EngineCore(scheduler, RemoteExecutor(link, "worker-0")), frontends)

    def drain(signum: int, _frame: object) -> None:
        if loop.draining_since is None:
            logger.info("signal %d: draining %d requests", signum, len(loop.owners))
            loop.draining_since = time.monotonic()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    logger.info("serving on %s", addresses.frontend)
    try:
        loop.run()
    finally:
        link.shutdown()
        frontends.close()
        ctx.term()
    logger.info("stopped")
