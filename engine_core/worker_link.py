"""The core's side of its workers: spawn, hand-shake, send plans, collect results.

The core keeps a plan in flight on every worker at once (its one mixed worker colocated):
`send_plan` never waits, and `poll` returns whatever any worker said, as it arrives.

Every worker heartbeats on a socket of its own ("<id>/hb"), also while a step runs, so
a slow step is not a dead worker; silence, an exit or a step past STEP_TIMEOUT is. A
result that cannot be decoded comes back as a failed StepResult, never as a lost one.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from typing import Any

import zmq

from engine_core.messages.config import EngineConfig, env_seconds
from engine_core.messages.curve import CurveKeys
from engine_core.messages.framing import Channel
from engine_core.messages.worker import (
    CORE,
    HEARTBEAT_SUFFIX,
    HEARTBEAT_TIMEOUT,
    JOIN_SUFFIX,
    LOCAL_HEARTBEAT_TIMEOUT,
    TO_CORE,
    StepPlan,
    StepResult,
    WorkerMsg,
    WorkerReady,
)

logger = logging.getLogger(__name__)

# seconds one step may take on a live worker before it counts as hung (and is restarted)
STEP_TIMEOUT = env_seconds("DUET_STEP_TIMEOUT", 600.0)
POLL_MS = 200  # how often `wait_ready` checks liveness and lets the core speak

# (worker id, message type, message) as `poll` returns them
Incoming = tuple[str, int, Any]


class WorkerDied(RuntimeError):
    pass


class WorkerLink:
    """One bound ROUTER for workers: plans out, results, KV confirmations and READYs in."""

    def __init__(self, ctx: zmq.Context, address: str, keys: CurveKeys | None = None) -> None:
        self.channel = Channel(ctx, CORE, keys=keys)
        self.address = self.channel.bind(address)
        self.sock = self.channel.sock
        self.keys = keys  # local workers get them too: their KV links may be tcp
        self.ready: dict[str, WorkerReady] = {}
        self.processes: dict[str, mp.process.BaseProcess] = {}
        self.config: EngineConfig | None = None  # what `duet *-worker` processes are told
        self.heard: dict[str, float] = {}  # worker id -> last heartbeat (monotonic)
        # NOTE: silence is measured up to the last time the socket was read empty, so that
        # the core's own pauses (building a scheduler, a slow machine) kill no worker
        self._drained_at = time.monotonic()
        self.sent: dict[str, tuple[int, float]] = {}  # worker id -> (step id, monotonic) in flight
        # called while `wait_ready` waits, so the core keeps talking to its frontends
        self.on_wait: Callable[[], None] = lambda: None

    def spawn(
        self, config: EngineConfig, worker_id: str, role: str, cores: list[int] | None = None
    ) -> None:
        """Start a local worker process that connects back to this link."""
        from decode_workers.worker import run_worker

        proc = mp.get_context("spawn").Process(
            target=run_worker,
            args=(config, self.address, worker_id, role, cores, "127.0.0.1", self.keys),
            name=f"duet-{worker_id}",
            daemon=True,
        )
        proc.start()
        self.processes[worker_id] = proc

    def wait_ready(self, worker_ids: list[str], timeout: float = 600.0) -> None:
        """Block until every named worker has said READY (model loaded, KV allocated)."""
        deadline = time.monotonic() + timeout
        while not all(w in self.ready for w in worker_ids):
            self._check_alive(worker_ids)
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready after {timeout:.0f}s: {worker_ids}")
            self._receive_or_drained()
            self.on_wait()  # a restart reloads the model: frontends must not give up meanwhile

    def send_plan(self, worker_id: str, plan: StepPlan) -> bool:
        """Queue a plan for a worker without waiting; False if the worker is unreachable."""
        try:
            self.channel.send(WorkerMsg.PLAN, plan, to=worker_id.encode(), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: its connection is gone
            logger.warning("could not send a plan to %s: %s", worker_id, exc)
            return False
        self.sent[worker_id] = (plan.step_id, time.monotonic())
        return True

    def poll(self, timeout_ms: int) -> list[Incoming]:
        """Every message waiting (after up to `timeout_ms` for the first); READYs are recorded."""
        messages: list[Incoming] = []
        if not self.sock.poll(timeout_ms):
            self._drained_at = time.monotonic()
            return messages
        while True:
            try:
                got = self._receive(zmq.NOBLOCK)
            except zmq.Again:
                self._drained_at = time.monotonic()
                return messages
            if got is not None:
                messages.append(got)

    def dead_workers(self) -> list[str]:
        """Workers to give up on: local ones whose process exited (a kill -9 shows at once),
        remote ones silent for HEARTBEAT_TIMEOUT (local ones for LOCAL_HEARTBEAT_TIMEOUT),
        any whose step in flight overran STEP_TIMEOUT."""
        now, read = time.monotonic(), self._drained_at
        dead = [w for w, proc in self.processes.items() if not proc.is_alive()]
        dead += [w for w, last in self.heard.items() if read - last > self._silence_limit(w)]
        hung = [w for w, (_, since) in self.sent.items() if now - since > STEP_TIMEOUT]
        for worker_id in hung:
            logger.error("worker %s has run one step for over %.0f s", worker_id, STEP_TIMEOUT)
        return list(dict.fromkeys(dead + hung))

    def _silence_limit(self, worker_id: str) -> float:
        return LOCAL_HEARTBEAT_TIMEOUT if worker_id in self.processes else HEARTBEAT_TIMEOUT

    def _receive_or_drained(self) -> Incoming | None:
        """The next message within POLL_MS, or None (and the socket is known empty)."""
        if self.sock.poll(POLL_MS):
            return self._receive()
        self._drained_at = time.monotonic()
        return None

    def _receive(self, flags: int = 0) -> Incoming | None:
        """One message off the socket: heartbeats and JOINs are answered here, READYs
        recorded; a result that cannot be decoded becomes a failed one for its step."""
        frames = self.sock.recv_multipart(flags)
        identity = frames[0].decode(errors="replace")
        if identity.endswith(HEARTBEAT_SUFFIX):
            self.heard[identity.removesuffix(HEARTBEAT_SUFFIX)] = time.monotonic()
            return None
        decoded = TO_CORE.decode(frames[1:])
        if decoded is None:
            return self._undecodable(identity, frames[1:])
        kind, message = decoded
        if kind == WorkerMsg.JOIN:
            self._answer_join(identity)
            return None
        if kind == WorkerMsg.READY:
            self.ready[message.worker_id] = message
            # NOTE: heard from here on: a worker that dies before its first heartbeat
            # must fall silent, not stay unheard (and alive) for ever
            self.heard[message.worker_id] = time.monotonic()
            logger.info("worker %s ready (%s, %d blocks)", message.worker_id, message.role,
                        message.num_blocks)  # fmt: skip
        if kind == WorkerMsg.RESULT and self.sent.get(identity, (None,))[0] == message.step_id:
            del self.sent[identity]
        return identity, kind, message

    def _undecodable(self, identity: str, frames: list[bytes]) -> Incoming | None:
        in_flight = self.sent.get(identity)
        if TO_CORE.kind_of(frames) != WorkerMsg.RESULT or in_flight is None:
            return None
        del self.sent[identity]
        logger.error("worker %s sent a result for step %d that cannot be decoded",
                     identity, in_flight[0])  # fmt: skip
        return (
            identity,
            WorkerMsg.RESULT,
            StepResult(in_flight[0], [], [], error="the worker's result could not be decoded"),
        )

    def _answer_join(self, identity: str) -> None:
        if identity.endswith(JOIN_SUFFIX) and self.config is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.channel.send(WorkerMsg.CONFIG, self.config, to=identity.encode())

    def forget(self, worker_id: str) -> None:
        """Drop a dead worker: reap its process and remove the shared memory it left behind."""
        self.heard.pop(worker_id, None)
        self.sent.pop(worker_id, None)
        proc = self.processes.pop(worker_id, None)
        if proc is not None:
            proc.join(timeout=1)
            if proc.is_alive():  # hung, not dead: it must not hold its cores and KV on
                proc.kill()
                proc.join()
        ready = self.ready.pop(worker_id, None)
        if proc is not None and ready is not None and ready.kv_shm and os.path.exists(ready.kv_shm):
            os.unlink(ready.kv_shm)

    def shutdown(self) -> None:
        for worker_id in list(self.ready):
            with contextlib.suppress(zmq.ZMQError):
                self.channel.send(WorkerMsg.SHUTDOWN, to=worker_id.encode(), flags=zmq.NOBLOCK)
        for worker_id in list(self.processes):
            proc = self.processes[worker_id]
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
            self.forget(worker_id)
        self.sock.close()

    def _check_alive(self, worker_ids: list[str]) -> None:
        for worker_id in worker_ids:
            proc = self.processes.get(worker_id)
            if proc is not None and not proc.is_alive():
                raise WorkerDied(f"worker {worker_id} exited with code {proc.exitcode}")
