"""The core's side of its workers: spawn, hand-shake, send plans, collect results.

Colocated mode uses `execute`, a blocking round trip to its one worker. Disaggregated
mode keeps a plan in flight on every worker at once: `send_plan` never waits, and `poll`
returns whatever any worker said, as it arrives.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import time
from typing import Any

import zmq

from engine_core.config import EngineConfig
from engine_core.curve import CurveKeys, listen
from engine_core.framing import Decoder, encode
from engine_core.messages.worker import (
    KVTransferDone,
    StepPlan,
    StepResult,
    WorkerJoin,
    WorkerMsg,
    WorkerReady,
)

logger = logging.getLogger(__name__)

_INCOMING = Decoder(
    {
        WorkerMsg.READY: WorkerReady,
        WorkerMsg.RESULT: StepResult,
        WorkerMsg.HEARTBEAT: None,
        WorkerMsg.KV_DONE: KVTransferDone,
        WorkerMsg.JOIN: WorkerJoin,
    }
)

HEARTBEAT_SUFFIX = "/hb"  # identity of a remote worker's heartbeat socket: "<worker id>/hb"
JOIN_SUFFIX = "/join"  # identity of its configuration request
HEARTBEAT_TIMEOUT = 1.5  # seconds of silence after which a remote worker counts as dead

# (worker id, message type, message) as `poll` returns them
Incoming = tuple[str, int, Any]


class WorkerDied(RuntimeError):
    pass


class WorkerLink:
    """One bound ROUTER for workers; `execute` is a blocking round trip to one worker."""

    def __init__(self, ctx: zmq.Context, address: str, keys: CurveKeys | None = None) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.address = listen(self.sock, address, keys)
        self.keys = keys  # local workers get them too: their KV links may be tcp
        self.ready: dict[str, WorkerReady] = {}
        self.processes: dict[str, mp.process.BaseProcess] = {}
        self.config: EngineConfig | None = None  # what `duet *-worker` processes are told
        self.heard: dict[str, float] = {}  # remote worker id -> last heartbeat (monotonic)

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
            if self.sock.poll(200):
                frames = self.sock.recv_multipart()
                decoded = _INCOMING.decode(frames[1:])
                if decoded is not None and not self._answer_remote(
                    frames[0].decode(errors="replace"), decoded[0]
                ):
                    self._handle(frames)

    def execute(self, worker_id: str, plan: StepPlan) -> StepResult:
        """Send a plan and wait for its result, noticing a dead worker within ~0.2 s."""
        try:
            self.sock.send_multipart([worker_id.encode(), *encode(WorkerMsg.PLAN, plan)])
        except zmq.ZMQError as exc:  # ROUTER_MANDATORY: the worker's connection is gone
            raise WorkerDied(f"worker {worker_id} is unreachable: {exc}") from exc
        while True:
            if self.sock.poll(200):
                result = self._handle(self.sock.recv_multipart())
                if isinstance(result, StepResult) and result.step_id == plan.step_id:
                    return result
            else:
                self._check_alive([worker_id])

    def send_plan(self, worker_id: str, plan: StepPlan) -> bool:
        """Queue a plan for a worker without waiting; False if the worker is unreachable."""
        try:
            self.sock.send_multipart(
                [worker_id.encode(), *encode(WorkerMsg.PLAN, plan)], zmq.NOBLOCK
            )
        except zmq.ZMQError as exc:  # EHOSTUNREACH: its connection is gone
            logger.warning("could not send a plan to %s: %s", worker_id, exc)
            return False
        return True

    def poll(self, timeout_ms: int) -> list[Incoming]:
        """Every message waiting (after up to `timeout_ms` for the first); READYs are recorded."""
        messages: list[Incoming] = []
        if not self.sock.poll(timeout_ms):
            return messages
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return messages
            decoded = _INCOMING.decode(frames[1:])
            identity = frames[0].decode(errors="replace")
            if decoded is None or self._answer_remote(identity, decoded[0]):
                continue
            if decoded[0] == WorkerMsg.READY:
                self._handle(frames)
            messages.append((identity, *decoded))

    def dead_workers(self) -> list[str]:
        """Workers to give up on: local ones whose process exited (a kill -9 shows at once),
        remote ones silent for HEARTBEAT_TIMEOUT."""
        now = time.monotonic()
        dead = [w for w, proc in self.processes.items() if not proc.is_alive()]
        return dead + [w for w, last in self.heard.items() if now - last > HEARTBEAT_TIMEOUT]

    def _answer_remote(self, identity: str, kind: int) -> bool:
        """Heartbeats and configuration requests of remote workers; True if it was one."""
        if identity.endswith(HEARTBEAT_SUFFIX):
            self.heard[identity.removesuffix(HEARTBEAT_SUFFIX)] = time.monotonic()
            return True
        if kind == WorkerMsg.JOIN and identity.endswith(JOIN_SUFFIX) and self.config is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.send_multipart(
                    [identity.encode(), *encode(WorkerMsg.CONFIG, self.config)]
                )
            return True
        return False

    def forget(self, worker_id: str) -> None:
        """Drop a dead worker: reap its process and remove the shared memory it left behind."""
        self.heard.pop(worker_id, None)
        proc = self.processes.pop(worker_id, None)
        if proc is not None:
            proc.join(timeout=1)
        ready = self.ready.pop(worker_id, None)
        if proc is not None and ready is not None and ready.kv_shm and os.path.exists(ready.kv_shm):
            os.unlink(ready.kv_shm)

    def shutdown(self) -> None:
        for worker_id in list(self.ready):
            with contextlib.suppress(zmq.ZMQError):
                self.sock.send_multipart(
                    [worker_id.encode(), *encode(WorkerMsg.SHUTDOWN)], zmq.NOBLOCK
                )
        for worker_id in list(self.processes):
            proc = self.processes[worker_id]
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
            self.forget(worker_id)
        self.sock.close()

    def _handle(self, frames: list[bytes]) -> StepResult | None:
        decoded = _INCOMING.decode(frames[1:])
        if decoded is None:
            return None
        kind, message = decoded
        if kind == WorkerMsg.READY:
            self.ready[message.worker_id] = message
            logger.info(
                "worker %s ready (%s, %d blocks)",
                message.worker_id,
                message.role,
                message.num_blocks,
            )
        return message if kind == WorkerMsg.RESULT else None

    def _check_alive(self, worker_ids: list[str]) -> None:
        for worker_id in worker_ids:
            proc = self.processes.get(worker_id)
            if proc is not None and not proc.is_alive():
                raise WorkerDied(f"worker {worker_id} exited with code {proc.exitcode}")
