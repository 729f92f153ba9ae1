"""A plan the core sends a worker always ends: with the result, a failed result, or the
worker given up for dead. The worker here is a thread speaking the real worker wire."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from engine_core.messages.framing import Channel, encode
from engine_core.messages.worker import (
    HEARTBEAT,
    HEARTBEAT_SUFFIX,
    HEARTBEAT_TIMEOUT,
    WORKER,
    StepPlan,
    StepResult,
    WorkerMsg,
    WorkerReady,
)
from engine_core.worker_link import WorkerLink

PLAN = StepPlan(step_id=1, new_requests=[], cached_requests=[], num_scheduled_tokens={})


@pytest.fixture
def link(tmp_path: Path) -> Iterator[WorkerLink]:
    ctx = zmq.Context()
    link = WorkerLink(ctx, f"ipc://{tmp_path}/workers.sock")
    yield link
    link.sock.close()
    ctx.destroy(linger=0)


class PlayedWorker:
    """A worker thread that heartbeats for `beat_for` seconds, `answer`s the first plan
    halfway through, then stays connected but silent until `stop`."""

    def __init__(
        self, link: WorkerLink, answer: Callable[[Channel], None], beat_for: float
    ) -> None:
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(link, answer, beat_for))
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def _run(self, link: WorkerLink, answer: Callable[[Channel], None], beat_for: float) -> None:
        work = Channel(link.sock.context, WORKER, b"w0")
        beats = Channel(link.sock.context, HEARTBEAT, b"w0" + HEARTBEAT_SUFFIX.encode())
        work.connect(link.address)
        beats.connect(link.address)
        beats.send(WorkerMsg.HEARTBEAT)
        assert work.poll(5000) and work.recv() is not None
        stop = time.monotonic() + beat_for
        answered = False
        while time.monotonic() < stop or not answered:
            if time.monotonic() < stop:
                beats.send(WorkerMsg.HEARTBEAT)
            if not answered and time.monotonic() > stop - beat_for / 2:
                answer(work)
                answered = True
            time.sleep(HEARTBEAT_TIMEOUT / 6)
        self.done.wait(10)  # silent, but connected: only heartbeats tell
        work.close()
        beats.close()


def wait_connected(link: WorkerLink) -> None:
    deadline = time.monotonic() + 5
    while "w0" not in link.heard:
        assert time.monotonic() < deadline, "the worker never heartbeat"
        link.poll(100)


def run_step(link: WorkerLink, plan: StepPlan) -> StepResult | None:
    """Send `plan` and poll as the engine does: its result, or None once w0 counts as dead."""
    assert link.send_plan("w0", plan)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for _, kind, message in link.poll(50):
            if kind == WorkerMsg.RESULT and message.step_id == plan.step_id:
                return message
        if "w0" in link.dead_workers():
            return None
    raise AssertionError("the step neither ended nor was given up")


def test_an_undecodable_result_is_a_failed_step(link: WorkerLink) -> None:
    def garbled(work: Channel) -> None:
        work.sock.send_multipart([*encode(WorkerMsg.RESULT)[:1], b"\xc1not msgpack"])

    worker = PlayedWorker(link, garbled, beat_for=1.0)
    wait_connected(link)
    result = run_step(link, PLAN)
    assert result is not None and result.step_id == PLAN.step_id
    assert result.error and result.req_ids == []
    worker.stop()


def test_a_step_longer_than_the_heartbeat_timeout_is_waited_for(link: WorkerLink) -> None:
    def late(work: Channel) -> None:
        work.send(WorkerMsg.RESULT, StepResult(PLAN.step_id, [], []))

    worker = PlayedWorker(link, late, beat_for=HEARTBEAT_TIMEOUT * 3)
    wait_connected(link)
    started = time.monotonic()
    assert run_step(link, PLAN) == StepResult(PLAN.step_id, [], [])
    assert time.monotonic() - started > HEARTBEAT_TIMEOUT  # the step did outlast it
    worker.stop()


def test_a_worker_that_stops_heartbeating_is_dead(link: WorkerLink) -> None:
    worker = PlayedWorker(link, lambda work: None, beat_for=0.5)
    wait_connected(link)
    assert run_step(link, PLAN) is None
    worker.stop()


def test_a_pause_of_the_core_itself_kills_no_worker(link: WorkerLink) -> None:
    worker = PlayedWorker(link, lambda work: None, beat_for=HEARTBEAT_TIMEOUT * 4)
    wait_connected(link)
    link.channel.send(WorkerMsg.PLAN, PLAN, to=b"w0")  # from here on it beats steadily
    link.poll(500)
    time.sleep(HEARTBEAT_TIMEOUT * 2)  # e.g. the core building a scheduler: nothing read
    assert link.dead_workers() == []
    link.poll(0)
    assert link.dead_workers() == []
    worker.stop()


def test_a_worker_that_dies_before_its_first_heartbeat_is_dead(link: WorkerLink) -> None:
    work = Channel(link.sock.context, WORKER, b"w0")
    work.connect(link.address)
    work.send(WorkerMsg.READY, WorkerReady("w0", "decode", 8, 16, 128))
    deadline = time.monotonic() + 5
    while "w0" not in link.ready:
        assert time.monotonic() < deadline, "READY never arrived"
        link.poll(50)
    ready_at = time.monotonic()
    work.close()  # gone without a single heartbeat, as a kill -9 right after READY leaves it
    while "w0" not in link.dead_workers():
        assert time.monotonic() - ready_at < HEARTBEAT_TIMEOUT + 2, "its death went unnoticed"
        link.poll(50)
    assert time.monotonic() - ready_at > HEARTBEAT_TIMEOUT * 0.9
