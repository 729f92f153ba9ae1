"""DisaggEngine's orchestration, GPU- and process-free: a fake link, hand-made results."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from engine_core.disagg import DisaggEngine
from engine_core.messages.frontend import AddRequest
from engine_core.messages.worker import KVTransferDone, StepPlan, StepResult, WorkerMsg, WorkerReady
from engine_core.sampling_params import SamplingParams
from engine_core.scheduler import Scheduler, SchedulerConfig

PROMPT = [1, 2, 3, 4, 5, 6]


class FakeLink:
    """Records plans; `inbox` is what the next poll returns."""

    def __init__(self) -> None:
        self.plans: dict[str, list[StepPlan]] = defaultdict(list)
        self.inbox: list[tuple[str, int, Any]] = []
        self.dead: list[str] = []
        self.ready: dict[str, WorkerReady] = {}
        self.processes: dict[str, object] = {}  # every worker counts as local

    def send_plan(self, worker_id: str, plan: StepPlan) -> bool:
        self.plans[worker_id].append(plan)
        return True

    def poll(self, timeout_ms: int) -> list[tuple[str, int, Any]]:
        messages, self.inbox = self.inbox, []
        return messages

    def dead_workers(self) -> list[str]:
        dead, self.dead = self.dead, []
        return dead

    def forget(self, worker_id: str) -> None:
        self.processes.pop(worker_id, None)


def make_engine(
    prefill: int = 1, decode: int = 1, timeout: float = 10.0
) -> tuple[DisaggEngine, FakeLink, list[str]]:
    link = FakeLink()
    respawned: list[str] = []

    def make_scheduler(ready: WorkerReady) -> Scheduler:
        return Scheduler(SchedulerConfig(max_model_len=32, block_size=4), ready.num_blocks, [99])

    engine = DisaggEngine(link, make_scheduler, respawned.append, timeout)  # type: ignore[arg-type]
    for role, count in (("prefill", prefill), ("decode", decode)):
        for i in range(count):
            engine.add_worker(
                WorkerReady(f"{role}-{i}", role, 16, 4, 32, kv_address=f"tcp://{role}-{i}")
            )
            link.processes[f"{role}-{i}"] = object()
    return engine, link, respawned


def add(engine: DisaggEngine, req_id: str, prompt: list[int] = PROMPT) -> None:
    assert engine.add_request(AddRequest(req_id, prompt, SamplingParams(max_tokens=5), 0.0)) is None


def finish_step(engine: DisaggEngine, link: FakeLink, worker_id: str, token: int = 7) -> StepPlan:
    """The worker answers its plan in flight, sampling `token` wherever it should."""
    out = engine.workers[worker_id].inflight
    assert out is not None, f"{worker_id} has no plan in flight"
    ids = sorted(out.sampling_req_ids)
    link.inbox.append(
        (worker_id, WorkerMsg.RESULT, StepResult(out.plan.step_id, ids, [token] * len(ids)))
    )
    return out.plan


def confirm(link: FakeLink, transfer_id: str, ok: bool = True) -> None:
    link.inbox.append(
        ("decode-0", WorkerMsg.KV_DONE, KVTransferDone(transfer_id, ok, num_bytes=100))
    )


def usage(engine: DisaggEngine) -> dict[str, float]:
    return engine.stats().kv_cache_usage


def prefilled(engine: DisaggEngine, link: FakeLink) -> str:
    """Add request "a", run its prefill; returns its transfer id (the first token is out)."""
    add(engine, "a")
    engine.step()
    plan = finish_step(engine, link, "prefill-0")
    (send,) = plan.kv_sends
    assert send.dst_worker == "decode-0" and len(send.src_block_ids) == len(send.dst_block_ids) == 2
    (recv,) = link.plans["decode-0"][-1].kv_recvs
    assert (recv.transfer_id, recv.dst_block_ids) == (send.transfer_id, send.dst_block_ids)
    deltas = engine.step()
    assert [(d.request_id, d.new_token_ids) for d in deltas] == [("a", [7])]
    finish_step(engine, link, "decode-0")  # the plan that carried the receive order
    engine.step()
    return send.transfer_id


def test_request_moves_to_decode_only_when_the_receiver_confirms() -> None:
    engine, link, _ = make_engine()
    transfer_id = prefilled(engine, link)
    engine.step()
    assert not engine.workers["decode-0"].scheduler.requests  # not before KV_DONE
    confirm(link, transfer_id)
    engine.step()
    engine.step()
    (new,) = link.plans["decode-0"][-1].new_requests
    assert (new.req_id, new.token_ids, new.num_computed_tokens) == ("a", [*PROMPT, 7], 6)
    assert link.plans["decode-0"][-1].num_scheduled_tokens == {"a": 1}
    assert usage(engine)["prefill-0"] == 0.0  # released once the transfer was confirmed
    assert engine.stats().kv_transfer_bytes == 100


def test_abort_mid_transfer_frees_both_sides_and_cancels() -> None:
    engine, link, _ = make_engine()
    transfer_id = prefilled(engine, link)
    assert usage(engine)["decode-0"] > 0 and usage(engine)["prefill-0"] > 0
    engine.abort_requests(["a"])
    assert usage(engine) == {"prefill-0": 0.0, "decode-0": 0.0}
    engine.step()
    assert link.plans["decode-0"][-1].kv_cancels == [transfer_id]
    confirm(link, transfer_id)  # a late confirmation changes nothing
    engine.step()
    assert not engine.has_unfinished_requests() or engine.workers["decode-0"].inflight
    assert usage(engine) == {"prefill-0": 0.0, "decode-0": 0.0}


def test_abort_while_the_final_chunk_runs_cancels_the_planned_transfer() -> None:
    engine, link, _ = make_engine()
    add(engine, "a")
    engine.step()
    (send,) = link.plans["prefill-0"][-1].kv_sends
    engine.abort_requests(["a"])
    finish_step(engine, link, "prefill-0")
    finish_step(engine, link, "decode-0")
    engine.step()
    engine.step()
    assert send.transfer_id in link.plans["decode-0"][-1].kv_cancels
    assert usage(engine) == {"prefill-0": 0.0, "decode-0": 0.0}


def test_refused_transfer_is_recomputed_on_the_decode_worker() -> None:
    engine, link, _ = make_engine()
    transfer_id = prefilled(engine, link)
    confirm(link, transfer_id, ok=False)
    engine.step()
    engine.step()
    (new,) = link.plans["decode-0"][-1].new_requests
    assert (new.token_ids, new.num_computed_tokens) == ([*PROMPT, 7], 0)
    stats = engine.stats()
    assert (stats.kv_transfer_failures, stats.recomputed_prefills) == (1, 1)
    assert usage(engine)["prefill-0"] == 0.0


def test_silent_receiver_times_out_into_a_recompute() -> None:
    engine, link, _ = make_engine(timeout=0.0)
    transfer_id = prefilled(engine, link)
    engine.step()
    engine.step()
    plan = link.plans["decode-0"][-1]
    assert transfer_id in plan.kv_cancels
    assert [n.num_computed_tokens for n in plan.new_requests] == [0]
    assert engine.stats().kv_transfer_failures == 1


def test_dead_decode_worker_requests_are_recomputed_and_it_is_respawned() -> None:
    engine, link, respawned = make_engine()
    transfer_id = prefilled(engine, link)
    confirm(link, transfer_id)
    engine.step()
    engine.step()
    link.dead.append("decode-0")
    engine.step()
    assert respawned == ["decode"]
    # back to prefill with every token; the prefill prefix cache still holds its first block
    (new,) = link.plans["prefill-0"][-1].new_requests
    assert (new.req_id, new.token_ids, new.num_computed_tokens) == ("a", [*PROMPT, 7], 4)
    assert engine.stats().recomputed_prefills == 1
    assert link.plans["prefill-0"][-1].kv_sends == []  # no decode worker to send to yet
    finish_step(engine, link, "prefill-0", token=8)
    assert [d.new_token_ids for d in engine.step()] == [[8]]
    engine.add_worker(WorkerReady("decode-1", "decode", 16, 4, 32, kv_address="tcp://decode-1"))
    engine.step()  # the parked transfer is routed to the new worker
    (send,) = link.plans["prefill-0"][-1].kv_sends
    assert send.dst_worker == "decode-1"


def test_two_of_each_share_the_load() -> None:
    engine, link, _ = make_engine(prefill=2, decode=2)
    for i in range(4):
        add(engine, f"r{i}", [i + 1] * 6)
    engine.step()
    taken = engine.stats().worker_requests
    assert taken["prefill-0"] == taken["prefill-1"] == 2
    sends = [s.dst_worker for p in ("prefill-0", "prefill-1") for s in link.plans[p][-1].kv_sends]
    assert sorted(sends) == ["decode-0", "decode-0", "decode-1", "decode-1"]
