"""The core's blocking round trip to a worker always ends: with the result, a failed
result, or WorkerDied. The worker here is a thread speaking the real worker wire."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

from engine_core.framing import Channel, encode
from engine_core.messages.worker import (
    HEARTBEAT,
    HEARTBEAT_SUFFIX,
    HEARTBEAT_TIMEOUT,
    WORKER,
    StepPlan,
    StepResult,
    WorkerMsg,
)
from engine_core.worker_link import WorkerDied, WorkerLink

PLAN = StepPlan(step_id=1, new_requests=[], cached_requests=[], num_scheduled_tokens={})


@pytest.fixture
def link(tmp_path: Path) -> Iterator[WorkerLink]:
    ctx = zmq.Context()
    link = WorkerLink(ctx, f"ipc://{tmp_path}/workers.sock")
    yield link
    link.sock.close()
    ctx.destroy(linger=0)


def play_worker(
    link: WorkerLink, answer: Callable[[Channel], None], beat_for: float
) -> threading.Thread:
    """A worker that heartbeats for `beat_for` seconds and `answer`s the first plan."""

    def run() -> None:
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
        time.sleep(HEARTBEAT_TIMEOUT * 3)  # silent, but connected: only heartbeats tell
        work.close()
        beats.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_connected(link: WorkerLink) -> None:
    deadline = time.monotonic() + 5
    while "w0" not in link.heard:
        assert time.monotonic() < deadline, "the worker never heartbeat"
        link.poll(100)


def test_an_undecodable_result_is_a_failed_step(link: WorkerLink) -> None:
    def garbled(work: Channel) -> None:
        work.sock.send_multipart([*encode(WorkerMsg.RESULT)[:1], b"\xc1not msgpack"])

    worker = play_worker(link, garbled, beat_for=1.0)
    wait_connected(link)
    result = link.execute("w0", PLAN)
    assert result.step_id == PLAN.step_id and result.error and result.req_ids == []
    worker.join()


def test_a_step_longer_than_the_heartbeat_timeout_is_waited_for(link: WorkerLink) -> None:
    waits = []
    link.on_wait = lambda: waits.append(time.monotonic())

    def late(work: Channel) -> None:
        work.send(WorkerMsg.RESULT, StepResult(PLAN.step_id, [], []))

    worker = play_worker(link, late, beat_for=HEARTBEAT_TIMEOUT * 3)
    wait_connected(link)
    started = time.monotonic()
    result = link.execute("w0", PLAN)
    assert result == StepResult(PLAN.step_id, [], []) and result.error is None
    assert waits and waits[-1] - started > HEARTBEAT_TIMEOUT  # it kept the core talking
    worker.join()


def test_a_worker_that_stops_heartbeating_is_dead(link: WorkerLink) -> None:
    worker = play_worker(link, lambda work: None, beat_for=0.5)
    wait_connected(link)
    with pytest.raises(WorkerDied):
        link.execute("w0", PLAN)
    worker.join()
