"""The core's side of its workers: spawn, hand-shake, send plans, collect results."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import time

import zmq

from engine_core.config import EngineConfig
from engine_core.framing import Decoder, encode
from engine_core.messages.worker import StepPlan, StepResult, WorkerMsg, WorkerReady

logger = logging.getLogger(__name__)

_INCOMING = Decoder({WorkerMsg.READY: WorkerReady, WorkerMsg.RESULT: StepResult, WorkerMsg.HEARTBEAT: None})


class WorkerDied(RuntimeError):
    pass


class WorkerLink:
    """One bound ROUTER for workers; `execute` is a blocking round trip to one worker."""

    def __init__(self, ctx: zmq.Context, address: str) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.bind(address)
        self.address = address
        self.ready: dict[str, WorkerReady] = {}
        self.processes: dict[str, mp.process.BaseProcess] = {}

    def spawn(self, config: EngineConfig, worker_id: str, role: str) -> None:
        """Start a local worker process that connects back to this link."""
        from decode_workers.worker import run_worker

        proc = mp.get_context("spawn").Process(
            target=run_worker, args=(config, self.address, worker_id, role), name=f"duet-{worker_id}", daemon=True
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
                self._handle(self.sock.recv_multipart())

    def execute(self, worker_id: str, plan: StepPlan) -> StepResult:
        """Send a plan and wait for its result, noticing a dead worker within ~0.2 s."""
        self.sock.send_multipart([worker_id.encode(), *encode(WorkerMsg.PLAN, plan)])
        while True:
            if self.sock.poll(200):
                result = self._handle(self.sock.recv_multipart())
                if isinstance(result, StepResult) and result.step_id == plan.step_id:
                    return result
            else:
                self._check_alive([worker_id])

    def shutdown(self) -> None:
        for worker_id in list(self.ready):
            with contextlib.suppress(zmq.ZMQError):
                self.sock.send_multipart([worker_id.encode(), *encode(WorkerMsg.SHUTDOWN)], zmq.NOBLOCK)
        for proc in self.processes.values():
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
        self.sock.close()

    def _handle(self, frames: list[bytes]) -> StepResult | None:
        decoded = _INCOMING.decode(frames[1:])
        if decoded is None:
            return None
        kind, message = decoded
        if kind == WorkerMsg.READY:
            self.ready[message.worker_id] = message
            logger.info("worker %s ready (%s, %d blocks)", message.worker_id, message.role, message.num_blocks)
        return message if kind == WorkerMsg.RESULT else None

    def _check_alive(self, worker_ids: list[str]) -> None:
        for worker_id in worker_ids:
            proc = self.processes.get(worker_id)
            if proc is not None and not proc.is_alive():
                raise WorkerDied(f"worker {worker_id} exited with code {proc.exitcode}")
