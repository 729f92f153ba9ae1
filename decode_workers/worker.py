"""A worker process: connects to the core, loads the model, executes step plans.

The same loop serves the colocated "mixed" role (prefill and decode in one batch) and the
disaggregated roles, which plug a KV hand-off side into it: a prefill worker ships blocks
after the step that finished a prompt (prefill_workers/hand_off.py), a decode worker
lands transfers between its steps and confirms each to the core (decode_workers/hand_off.py).
A heartbeat thread on its own socket tells the core this worker lives, also during a
long step.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Protocol

import torch
import zmq

from engine_core.messages.config import EngineConfig
from engine_core.messages.curve import CurveKeys, authenticate
from engine_core.messages.framing import Channel
from engine_core.messages.worker import (
    HEARTBEAT,
    HEARTBEAT_SUFFIX,
    HEARTBEAT_TIMEOUT,
    WORKER,
    KVTransferDone,
    StepPlan,
    StepResult,
    WorkerMsg,
    WorkerReady,
)
from engine_core.supervision import die_with_parent, multiprocessing_parent, parent_gone
from models.runner import KVAllocator, ModelRunner, zeros_allocator
from models.warm_up import warm_up

logger = logging.getLogger(__name__)

PARENT_CHECK_MS = 1000  # how often an idle worker makes sure its core still exists


class HandOff(Protocol):
    """What a disaggregated role adds to the worker loop (see the two hand_off modules)."""

    @property
    def allocator(self) -> KVAllocator: ...
    @property
    def socket(self) -> zmq.Socket | None: ...
    def attach(self, ctx: zmq.Context, kv_cache: torch.Tensor) -> None: ...
    def ready_fields(self) -> dict[str, str]: ...
    def before_step(self, plan: StepPlan) -> None: ...
    def after_step(self, plan: StepPlan) -> None: ...
    def poll(self) -> list[KVTransferDone]: ...
    def close(self) -> None: ...


def pin_threads(threads: int | None, cores: list[int] | None = None) -> None:
    """Bound torch's intra-op threads (and optionally the CPU set) of this process."""
    if cores:
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))


def name_process(name: str) -> None:
    """Show `name` (first 15 bytes) as this process's name in ps/top and /proc/PID/comm."""
    libc = ctypes.CDLL(None)
    libc.prctl(15, name.encode()[:15], 0, 0, 0)  # 15 = PR_SET_NAME


def make_hand_off(
    config: EngineConfig, role: str, worker_id: str, kv_host: str, keys: CurveKeys | None
) -> HandOff | None:
    """The KV side of a disaggregated role; None for the colocated "mixed" worker."""
    if role == "prefill":
        from prefill_workers.hand_off import SenderSide

        return SenderSide(config, worker_id, kv_host, keys)
    if role == "decode":
        from decode_workers.hand_off import ReceiverSide

        return ReceiverSide(config, worker_id, kv_host, keys)
    if role != "mixed":
        raise ValueError(f"unknown worker role {role!r}")
    return None


def run_worker(
    config: EngineConfig,
    engine_address: str,
    worker_id: str,
    role: str = "mixed",
    cores: list[int] | None = None,
    kv_host: str = "127.0.0.1",
    keys: CurveKeys | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve step plans from the core at `engine_address` until told to shut down.

    `cores` pins the process (and sizes torch's thread pool unless `config.torch_threads`
    says otherwise); `kv_host` is the address KV senders use to reach a decode worker;
    `keys` secure its tcp links (engine_core/messages/curve.py); `on_ready` is called
    once the core has been told the worker is ready (a health probe's cue).
    """
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {role}-worker %(levelname)s %(message)s"
    )
    core_pid = follow_core()
    name_process(worker_id)
    pin_threads(config.torch_threads, cores)
    hand_off = make_hand_off(config, role, worker_id, kv_host, keys)
    runner = ModelRunner(config, hand_off.allocator if hand_off else zeros_allocator)
    tokens, seconds = warm_up(runner, config.max_num_batched_tokens)
    logger.info("warm-up: a %d-token prefill step and a decode step in %.2f s", tokens, seconds)
    ctx = zmq.Context()
    authenticator = authenticate(ctx, keys)  # for a decode worker's KV receiver
    channel = Channel(ctx, WORKER, worker_id.encode(), keys)
    channel.connect(engine_address)
    if hand_off:
        hand_off.attach(ctx, runner.kv_cache)
    extra = hand_off.ready_fields() if hand_off else {}
    ready = WorkerReady(
        worker_id, role, runner.num_blocks, runner.block_size, runner.max_model_len, **extra
    )
    # NOTE: the model, torch and transformers leave ~1M long-lived objects: frozen, they
    # are no longer walked by every full collection (~200 ms each, a stall of every stream)
    gc.freeze()
    channel.send(WorkerMsg.READY, ready)
    logger.info("ready: %d KV blocks, %d torch threads", runner.num_blocks, torch.get_num_threads())
    if on_ready is not None:
        on_ready()
    stop = threading.Event()
    beats = threading.Thread(target=_heartbeat, args=(ctx, engine_address, worker_id, keys, stop),
                             name="heartbeat", daemon=True)  # fmt: skip
    beats.start()
    try:
        _serve(channel, runner, hand_off, core_pid)
    finally:
        stop.set()
        beats.join()
        if hand_off:
            hand_off.close()
        channel.close()
        if authenticator is not None:
            authenticator.stop()
        ctx.term()


def follow_core() -> int | None:
    """Stop when the core says so or when it is gone, not at the process group's signals.

    Ctrl-C and `kill -TERM -<pgid>` reach every process of the server: the core then drains
    and sends SHUTDOWN, which a worker dead at the signal could not serve. A SIGTERM that
    comes once the core has exited is its death notice (PR_SET_PDEATHSIG): then we leave.
    Returns the core's pid (None for a worker started by hand, which SIGTERM stops).
    """
    core_pid = multiprocessing_parent()

    def on_sigterm(_signum: int, _frame: object) -> None:
        if core_pid is None or parent_gone(core_pid):
            logger.info("SIGTERM: the engine core is gone, exiting")
            raise SystemExit(0)
        logger.info("SIGTERM: waiting for the engine core to stop this worker")

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_sigterm)
    die_with_parent(core_pid, signal.SIGTERM)
    return core_pid


def _heartbeat(
    ctx: zmq.Context,
    engine_address: str,
    worker_id: str,
    keys: CurveKeys | None,
    stop: threading.Event,
) -> None:
    # NOTE: own socket and thread: the worker loop may sit in a long forward pass
    channel = Channel(ctx, HEARTBEAT, (worker_id + HEARTBEAT_SUFFIX).encode(), keys)
    channel.connect(engine_address)
    while True:
        with contextlib.suppress(zmq.Again):
            channel.send(WorkerMsg.HEARTBEAT, flags=zmq.NOBLOCK)
        if stop.wait(HEARTBEAT_TIMEOUT / 6):
            break
    channel.close()


def _serve(
    channel: Channel, runner: ModelRunner, hand_off: HandOff | None, core_pid: int | None
) -> None:
    sock = channel.sock
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    if hand_off and hand_off.socket is not None:
        poller.register(hand_off.socket, zmq.POLLIN)
    while True:
        events = dict(poller.poll(PARENT_CHECK_MS))
        if parent_gone(core_pid):  # in case the death signal was lost
            logger.warning("the engine core is gone: exiting")
            return
        if sock in events and not _handle(channel, runner, hand_off):
            return
        if hand_off:
            for done in hand_off.poll():
                channel.send(WorkerMsg.KV_DONE, done)


def _handle(channel: Channel, runner: ModelRunner, hand_off: HandOff | None) -> bool:
    """Run one message from the core; False when it says to shut down."""
    received = channel.recv()
    if received is None or received[1] == WorkerMsg.CONFIG:
        return True
    _, kind, plan = received
    if kind == WorkerMsg.SHUTDOWN:
        return False
    if hand_off:
        hand_off.before_step(plan)
    channel.send(WorkerMsg.RESULT, _execute(runner, plan))
    if hand_off:
        # NOTE: after the result is out, so the first token streams before any copying
        hand_off.after_step(plan)
    return True


def _execute(runner: ModelRunner, plan: StepPlan) -> StepResult:
    # A failing plan must not kill the worker: the core sees the error and recovers.
    try:
        return runner.execute(plan)
    except Exception as exc:
        logger.exception("step %d failed", plan.step_id)
        return StepResult(step_id=plan.step_id, req_ids=[], sampled_token_ids=[], error=repr(exc))
