"""PoolEngine's orchestration, GPU- and process-free: a fake link, hand-made results.

Disaggregated (prefill and decode workers) unless a test says colocated (one mixed worker).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from engine_core.messages.common import ErrorKind, FinishReason
from engine_core.messages.frontend import AddRequest
from engine_core.messages.sampling_params import SamplingParams
from engine_core.messages.worker import KVTransferDone, StepPlan, StepResult, WorkerMsg, WorkerReady
from engine_core.pool import PoolEngine
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
    prefill: int = 1, decode: int = 1, timeout: float = 10.0, colocated: bool = False
) -> tuple[PoolEngine, FakeLink, list[str]]:
    link = FakeLink()
    respawned: list[str] = []

    def make_scheduler(ready: WorkerReady) -> Scheduler:
        return Scheduler(SchedulerConfig(max_model_len=32, block_size=4), ready.num_blocks, [99])

    def respawn(role: str) -> str:
        respawned.append(role)
        link.processes[f"{role}-{len(respawned)}"] = object()  # it says READY later, or never
        return f"{role}-{len(respawned)}"

    engine = PoolEngine(link, make_scheduler, respawn, timeout, colocated)  # type: ignore[arg-type]
    roles = (("mixed", 1),) if colocated else (("prefill", prefill), ("decode", decode))
    for role, count in roles:
        for i in range(count):
            engine.add_worker(
                WorkerReady(f"{role}-{i}", role, 16, 4, 32, kv_address=f"tcp://{role}-{i}")
            )
            link.processes[f"{role}-{i}"] = object()
    return engine, link, respawned


def add(engine: PoolEngine, req_id: str, prompt: list[int] = PROMPT) -> None:
    assert engine.add_request(AddRequest(req_id, prompt, SamplingParams(max_tokens=5), 0.0)) is None


def finish_step(engine: PoolEngine, link: FakeLink, worker_id: str, token: int = 7) -> StepPlan:
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


def usage(engine: PoolEngine) -> dict[str, float]:
    return engine.stats().kv_cache_usage


def prefilled(engine: PoolEngine, link: FakeLink) -> str:
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


def mixed_worker(name: str) -> WorkerReady:
    return WorkerReady(name, "mixed", 16, 4, 32)


def test_a_mixed_worker_keeps_its_request_from_prefill_to_finish() -> None:
    engine, link, _ = make_engine(colocated=True)
    add(engine, "a")
    deltas = []
    while engine.has_unfinished_requests():
        assert engine.step() == []  # sends the next plan
        finish_step(engine, link, "mixed-0")
        deltas += engine.step()
    assert [d.new_token_ids for d in deltas] == [[7]] * 5
    assert deltas[-1].finish_reason == FinishReason.LENGTH
    assert not any(p.kv_sends or p.kv_recvs for p in link.plans["mixed-0"])
    assert usage(engine) == {"mixed-0": 0.0}


def test_an_idle_colocated_engine_sleeps_on_its_inbox_and_a_disaggregated_one_listens() -> None:
    assert not make_engine(colocated=True)[0].wants_step()
    assert make_engine()[0].wants_step()


def test_a_dead_mixed_worker_is_replaced_and_its_requests_recomputed() -> None:
    engine, link, respawned = make_engine(colocated=True)
    add(engine, "a")
    engine.step()
    finish_step(engine, link, "mixed-0")
    engine.step()
    link.dead.append("mixed-0")
    engine.step()
    assert respawned == ["mixed"]
    add(engine, "b")  # accepted while the replacement loads: it waits for it
    engine.add_worker(mixed_worker("mixed-1"))
    engine.step()
    new = {n.req_id: n for n in link.plans["mixed-1"][-1].new_requests}
    assert (new["a"].token_ids, new["a"].num_computed_tokens) == ([*PROMPT, 7], 0)
    assert set(new) == {"a", "b"} and engine.stats().recomputed_prefills == 1


def test_a_quick_second_crash_waits_before_the_replacement() -> None:
    engine, link, respawned = make_engine(colocated=True)
    link.dead.append("mixed-0")
    engine.step()
    engine.add_worker(mixed_worker("mixed-1"))
    link.processes["mixed-1"] = object()
    link.dead.append("mixed-1")
    engine.step()
    assert respawned == ["mixed"]  # the second one is due in a second
    assert engine.wants_step()  # and the engine keeps stepping until it is spawned


def test_a_replacement_that_dies_while_loading_is_tried_again_after_a_pause() -> None:
    engine, link, respawned = make_engine(colocated=True)
    add(engine, "a")
    link.dead.append("mixed-0")
    engine.step()
    link.dead.append("mixed-1")  # the replacement, before it said READY
    engine.step()
    assert respawned == ["mixed"]  # a second quick crash: the next one is due in a second
    assert engine.has_unfinished_requests() and engine.wants_step()


def test_a_worker_that_dies_while_draining_fails_its_requests_as_server_errors() -> None:
    engine, link, respawned = make_engine(colocated=True)
    add(engine, "a")
    engine.step()
    engine.drain()
    link.dead.append("mixed-0")
    (delta,) = engine.step()
    assert (delta.request_id, delta.error_kind) == ("a", ErrorKind.SERVER)
    assert respawned == [] and not engine.has_unfinished_requests()
