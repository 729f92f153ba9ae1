"""A worker process: connects to the core, loads the model, executes step plans.

The same loop serves the colocated "mixed" role (prefill and decode in one batch) and the
disaggregated roles, which add KV hand-off around it.
"""

from __future__ import annotations

import logging
import os
import signal

import torch
import zmq

from engine_core.config import EngineConfig
from engine_core.framing import Decoder, encode
from engine_core.messages.worker import StepPlan, StepResult, WorkerMsg, WorkerReady
from models.runner import ModelRunner

logger = logging.getLogger(__name__)

_INCOMING = Decoder({WorkerMsg.PLAN: StepPlan, WorkerMsg.SHUTDOWN: None})


def pin_threads(threads: int | None, cores: list[int] | None = None) -> None:
    """Bound torch's intra-op threads (and optionally the CPU set) of this process."""
    if cores:
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))


def run_worker(config: EngineConfig, engine_address: str, worker_id: str, role: str = "mixed") -> None:
    """Serve step plans from the core at `engine_address` until told to shut down."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role}-worker %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the core decides when workers stop
    pin_threads(config.torch_threads)
    runner = ModelRunner(config)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, worker_id.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(engine_address)
    ready = WorkerReady(worker_id, role, runner.num_blocks, runner.block_size, runner.max_model_len)
    sock.send_multipart(encode(WorkerMsg.READY, ready))
    logger.info("ready: %d KV blocks, %d torch threads", runner.num_blocks, torch.get_num_threads())
    while True:
        decoded = _INCOMING.decode(sock.recv_multipart())
        if decoded is None:
            continue
        kind, plan = decoded
        if kind == WorkerMsg.SHUTDOWN:
            break
        sock.send_multipart(encode(WorkerMsg.RESULT, _execute(runner, plan)))
    sock.close()
    ctx.term()


def _execute(runner: ModelRunner, plan: StepPlan) -> StepResult:
    # A failing plan must not kill the worker: the core sees the error and recovers.
    try:
        return runner.execute(plan)
    except Exception as exc:
        logger.exception("step %d failed", plan.step_id)
        return StepResult(step_id=plan.step_id, req_ids=[], sampled_token_ids=[], error=repr(exc))
