"""Scheduler and engine step, GPU-free: schedule, feed a hand-made StepResult, update, assert."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_core.engine import EngineCore
from engine_core.messages.common import ErrorKind, FinishReason, TokenLogprobs
from engine_core.messages.frontend import AddRequest, RequestDelta
from engine_core.messages.sampling_params import SamplingParams
from engine_core.messages.worker import StepPlan, StepResult
from engine_core.request import RequestStatus
from engine_core.scheduler import (
    STEP_FAILED,
    Policy,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)

EOS = 99


def make_scheduler(num_blocks: int = 10, **overrides: object) -> Scheduler:
    """A small fake KV config: `num_blocks` blocks of 4 tokens (block 0 reserved)."""
    options: dict = {"max_model_len": 32, "block_size": 4, **overrides}
    return Scheduler(SchedulerConfig(**options), num_blocks, eos_token_ids=[EOS])


def add(
    sched: Scheduler,
    req_id: str,
    prompt: list[int],
    *,
    arrival: float = 0.0,
    priority: int = 0,
    salt: str | None = None,
    **params: object,
) -> None:
    msg = AddRequest(req_id, prompt, SamplingParams(**params), arrival, priority, salt)
    assert sched.add_request(msg) is None


def result_for(out: SchedulerOutput, tokens: dict[str, int] | None = None) -> StepResult:
    """What a worker would return: one token per sampling request (7 unless given)."""
    ids = [r for r in out.plan.num_scheduled_tokens if r in out.sampling_req_ids]
    sampled = [(tokens or {}).get(r, 7) for r in ids]
    return StepResult(out.plan.step_id, ids, sampled)


def step(
    sched: Scheduler, tokens: dict[str, int] | None = None
) -> tuple[StepPlan, dict[str, RequestDelta]]:
    out = sched.schedule()
    deltas = sched.update_from_output(out, result_for(out, tokens))
    return out.plan, {d.request_id: d for d in deltas}


def blocks_in_use(sched: Scheduler) -> int:
    pool = sched.pools["mixed"].pool
    return pool.num_blocks - 1 - pool.num_free_blocks


# -- the basic step --------------------------------------------------------------------


def test_prefill_then_decode_follows_num_computed_tokens() -> None:
    sched = make_scheduler()
    add(sched, "a", [1, 2, 3, 4, 5, 6])
    plan, deltas = step(sched)
    (new,) = plan.new_requests
    assert (new.token_ids, new.num_computed_tokens, len(new.block_ids)) == (
        [1, 2, 3, 4, 5, 6],
        0,
        2,
    )
    assert plan.num_scheduled_tokens == {"a": 6}
    assert deltas["a"].new_token_ids == [7] and deltas["a"].finish_reason is None
    request = sched.requests["a"]
    assert (request.num_tokens, request.num_computed_tokens) == (7, 6)

    plan, deltas = step(sched, {"a": 8})
    assert plan.new_requests == []
    (cached,) = plan.cached_requests
    assert (cached.req_id, cached.num_computed_tokens, cached.new_block_ids) == ("a", 6, [])
    assert plan.num_scheduled_tokens == {"a": 1}
    assert deltas["a"].new_token_ids == [8]

    plan, _ = step(sched)  # token 8 is the 8th token: still in block 2
    assert plan.cached_requests[0].new_block_ids == []
    plan, _ = step(sched)  # the 9th token needs a third block
    assert len(plan.cached_requests[0].new_block_ids) == 1


def test_plans_carry_diffs_only_and_they_add_up_to_the_block_table() -> None:
    sched = make_scheduler(num_blocks=20)
    add(sched, "a", list(range(5)), max_tokens=14)
    add(sched, "b", list(range(10, 13)), max_tokens=14)
    worker_tables: dict[str, list[int]] = {}
    for _ in range(10):
        plan, _ = step(sched)
        for new in plan.new_requests:
            assert new.req_id not in worker_tables
            worker_tables[new.req_id] = list(new.block_ids)
        for cached in plan.cached_requests:
            worker_tables[cached.req_id] += cached.new_block_ids
            assert cached.new_token_ids == []
        for req_id, table in worker_tables.items():
            assert table == sched.pools["mixed"].get_block_ids(sched.requests[req_id])
    assert len(worker_tables) == 2


def test_logprobs_and_cached_tokens_reach_the_delta() -> None:
    sched = make_scheduler()
    add(sched, "a", [1, 2, 3], logprobs=1)
    out = sched.schedule()
    logprobs = TokenLogprobs([7, 3], [-0.1, -2.5], rank=1)
    (delta,) = sched.update_from_output(out, StepResult(out.plan.step_id, ["a"], [7], [logprobs]))
    assert delta.new_logprobs == [logprobs]
    assert delta.num_cached_tokens == 0


def test_a_result_for_another_step_is_refused() -> None:
    sched = make_scheduler()
    add(sched, "a", [1, 2, 3])
    out = sched.schedule()
    with pytest.raises(ValueError):
        sched.update_from_output(out, StepResult(out.plan.step_id + 1, ["a"], [7]))


def fail(sched: Scheduler) -> tuple[StepPlan, list[RequestDelta]]:
    """Schedule a step and have the worker report it failed."""
    out = sched.schedule()
    error = StepResult(out.plan.step_id, [], [], error="RuntimeError('boom')")
    return out.plan, sched.update_from_output(out, error)


def test_a_failed_step_recomputes_its_requests_each_alone_then_batched_again() -> None:
    sched = make_scheduler()
    add(sched, "a", [1, 2, 3], max_tokens=4)
    add(sched, "b", [4, 5, 6], max_tokens=4)
    plan, deltas = fail(sched)
    assert set(plan.num_scheduled_tokens) == {"a", "b"} and deltas == []
    assert sched.requests["a"].suspect and sched.requests["b"].suspect
    alone = [set(step(sched)[0].num_scheduled_tokens) for _ in range(2)]
    assert sorted(map(sorted, alone)) == [["a"], ["b"]]
    plan, deltas = step(sched)
    assert set(plan.num_scheduled_tokens) == {"a", "b"}
    assert all(d.error is None for d in deltas.values())


def test_a_request_that_fails_alone_too_is_failed_without_the_workers_error() -> None:
    sched = make_scheduler()
    add(sched, "a", [1, 2, 3], max_tokens=4)
    add(sched, "b", [4, 5, 6], max_tokens=4)
    fail(sched)
    plan, deltas = fail(sched)
    (culprit,) = plan.num_scheduled_tokens
    (delta,) = deltas
    assert delta.request_id == culprit and delta.finish_reason == FinishReason.ABORT
    assert delta.error == STEP_FAILED and delta.error_kind == ErrorKind.SERVER
    assert "boom" not in delta.error
    other = ({"a", "b"} - {culprit}).pop()
    tokens: list[int] = []
    while sched.has_unfinished_requests():
        tokens += step(sched)[1][other].new_token_ids
    assert tokens == [7, 7, 7, 7] and blocks_in_use(sched) == 0


def test_a_result_that_does_not_fit_its_plan_is_a_failed_step() -> None:
    sched = make_scheduler()
    add(sched, "a", [1, 2, 3])
    out = sched.schedule()
    assert sched.update_from_output(out, StepResult(out.plan.step_id, [], [])) == []
    assert sched.requests["a"].suspect and sched.requests["a"].num_computed_tokens == 0


# -- admission -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "error"),
    [([], "empty"), (list(range(32)), "max_model_len"), ([1], "temperature")],
)
def test_add_request_rejects(prompt: list[int], error: str) -> None:
    sched = make_scheduler()
    params = SamplingParams(temperature=-1.0) if error == "temperature" else SamplingParams()
    delta = sched.add_request(AddRequest("a", prompt, params, 0.0))
    assert delta is not None and error in (delta.error or "")
    assert delta.finish_reason == FinishReason.ABORT
    assert not sched.has_unfinished_requests()


@pytest.mark.parametrize(
    "params",
    [
        {"stop_token_ids": [10**9], "min_tokens": 2},
        {"stop_token_ids": [-1]},
        {"logit_bias": {1000: 1.0}},
    ],
)
def test_token_ids_outside_the_vocabulary_are_a_client_error(params: dict) -> None:
    sched = make_scheduler(vocab_size=100)
    delta = sched.add_request(AddRequest("a", [1, 2], SamplingParams(**params), 0.0))
    assert delta is not None and "outside the vocabulary" in (delta.error or "")
    assert delta.error_kind == ErrorKind.CLIENT and not sched.has_unfinished_requests()


def test_duplicate_request_id_is_rejected() -> None:
    sched = make_scheduler()
    add(sched, "a", [1])
    delta = sched.add_request(AddRequest("a", [2], SamplingParams(), 0.0))
    assert delta is not None and delta.error
    assert sched.requests["a"].prompt_token_ids == [1]


def test_pool_smaller_than_max_model_len_is_refused() -> None:
    with pytest.raises(ValueError):
        make_scheduler(num_blocks=8, max_model_len=32)  # 7 usable blocks hold 28 tokens


def test_max_num_seqs_caps_the_batch() -> None:
    sched = make_scheduler(num_blocks=20, max_num_seqs=2)
    for req_id in "abc":
        add(sched, req_id, [1, 2], max_tokens=2)
    plan, _ = step(sched)
    assert set(plan.num_scheduled_tokens) == {"a", "b"}
    plan, deltas = step(sched)
    assert set(plan.num_scheduled_tokens) == {"a", "b"}
    assert {d.finish_reason for d in deltas.values()} == {FinishReason.LENGTH}
    plan, _ = step(sched)
    assert set(plan.num_scheduled_tokens) == {"c"}
    assert sorted(plan.finished_req_ids) == ["a", "b"]


def test_chunked_prefill_fits_the_budget_while_decodes_continue() -> None:
    sched = make_scheduler(num_blocks=20, max_num_batched_tokens=8)
    add(sched, "d", [1, 2, 3], max_tokens=10)
    step(sched)
    add(sched, "p", list(range(20)))
    chunks = []
    for _ in range(3):
        plan, deltas = step(sched)
        assert plan.num_scheduled_tokens["d"] == 1
        assert sum(plan.num_scheduled_tokens.values()) <= 8
        chunks.append(plan.num_scheduled_tokens["p"])
        assert "d" in deltas
    assert chunks == [7, 7, 6]
    assert "p" in deltas  # only the last chunk samples
    assert sched.requests["p"].num_computed_tokens == 20


def test_partial_prefill_yields_no_token_even_if_the_worker_sends_one() -> None:
    sched = make_scheduler(max_num_batched_tokens=4)
    add(sched, "a", list(range(10)))
    out = sched.schedule()
    assert out.sampling_req_ids == frozenset()
    assert sched.update_from_output(out, StepResult(out.plan.step_id, ["a"], [5])) == []
    assert sched.requests["a"].output_token_ids == []


def test_long_prefill_token_threshold_caps_each_chunk() -> None:
    sched = make_scheduler(long_prefill_token_threshold=5)
    add(sched, "a", list(range(12)))
    add(sched, "b", [1, 2])
    plan, _ = step(sched)
    assert plan.num_scheduled_tokens == {"a": 5, "b": 2}
    plan, _ = step(sched)
    assert plan.num_scheduled_tokens == {"a": 5, "b": 1}


# -- preemption ------------------------------------------------------------------------


@pytest.mark.parametrize("caching", [True, False])
def test_newest_request_preempts_itself_and_resumes_with_all_tokens(caching: bool) -> None:
    sched = make_scheduler(enable_prefix_caching=caching)  # 9 usable blocks
    add(sched, "old", list(range(16)), max_tokens=2)
    add(sched, "new", list(range(100, 116)))
    plan, _ = step(sched, {"old": 1, "new": 2})  # 4 + 4 blocks
    assert blocks_in_use(sched) == 8
    plan, deltas = step(sched, {"old": 3})  # old takes the last block; new cannot grow
    assert plan.num_scheduled_tokens == {"old": 1}
    assert plan.finished_req_ids == ["new"]
    assert sched.requests["new"].status == RequestStatus.PREEMPTED
    assert sched.requests["new"].num_computed_tokens == 0
    assert deltas["old"].finish_reason == FinishReason.LENGTH
    assert sched.stats().num_preemptions == 1

    plan, deltas = step(sched, {"new": 4})
    (resumed,) = plan.new_requests
    assert resumed.token_ids == [*range(100, 116), 2]
    assert resumed.num_prompt_tokens == 16
    hit = 16 if caching else 0  # its computed blocks stayed cached while it waited
    assert resumed.num_computed_tokens == hit
    assert plan.num_scheduled_tokens == {"new": 17 - hit}
    assert len(resumed.block_ids) == 5
    assert plan.finished_req_ids == ["old"]
    assert deltas["new"].new_token_ids == [4]
    assert deltas["new"].num_cached_tokens == 0  # as first admitted: the prompt's usage
    assert sched.requests["new"].output_token_ids == [2, 4]


def test_a_growing_request_preempts_the_newest_other_one() -> None:
    sched = make_scheduler(enable_prefix_caching=False)
    add(sched, "old", list(range(16)))
    add(sched, "new", list(range(20)))
    step(sched)  # 4 + 5 blocks: the pool is full
    plan, deltas = step(sched)
    assert plan.num_scheduled_tokens == {"old": 1}
    assert plan.finished_req_ids == ["new"]
    assert sched.waiting.peek().request_id == "new"
    assert "new" not in deltas and blocks_in_use(sched) == 5


def test_preempted_request_goes_back_to_the_front_of_the_queue() -> None:
    sched = make_scheduler(enable_prefix_caching=False, max_num_seqs=2)
    add(sched, "old", list(range(16)))
    add(sched, "new", list(range(20)))
    add(sched, "later", [1])
    step(sched)
    step(sched)
    assert [r.request_id for r in sched.waiting] == ["new", "later"]


def test_priority_policy_admits_and_preempts_by_priority() -> None:
    sched = make_scheduler(policy="priority", enable_prefix_caching=False)
    add(sched, "low", list(range(16)), priority=5, arrival=0.0)
    step(sched)  # 4 blocks
    add(sched, "high", list(range(16)), priority=0, arrival=1.0)
    add(sched, "mid", [1], priority=1, arrival=0.5)
    plan, _ = step(sched)  # low grows to 5 blocks, high takes 4: full, so mid waits
    assert [n.req_id for n in plan.new_requests] == ["high"]
    plan, _ = step(sched)  # high grows: low, though admitted first, is the victim
    assert plan.finished_req_ids == ["low"]
    assert plan.num_scheduled_tokens == {"high": 1}
    assert [r.request_id for r in sched.waiting] == ["mid", "low"]


def test_priority_policy_orders_the_waiting_queue() -> None:
    sched = make_scheduler(policy="priority", max_num_seqs=1)
    add(sched, "late-urgent", [1], priority=-1, arrival=3.0)
    add(sched, "b", [1], priority=0, arrival=2.0)
    add(sched, "a", [1], priority=0, arrival=1.0)
    assert [r.request_id for r in sched.waiting] == ["late-urgent", "a", "b"]
    plan, _ = step(sched)
    assert list(plan.num_scheduled_tokens) == ["late-urgent"]


def test_fcfs_ignores_priority() -> None:
    sched = make_scheduler(max_num_seqs=1)
    add(sched, "first", [1], priority=9)
    add(sched, "second", [1], priority=0)
    plan, _ = step(sched)
    assert list(plan.num_scheduled_tokens) == ["first"]


# -- abort -----------------------------------------------------------------------------


def test_abort_in_waiting_and_running_frees_blocks() -> None:
    sched = make_scheduler()
    add(sched, "run", list(range(6)))
    step(sched)
    add(sched, "wait", [1, 2])
    assert blocks_in_use(sched) == 2
    deltas = sched.abort_requests(["run", "wait", "unknown"])
    assert [(d.request_id, d.finish_reason) for d in deltas] == [
        ("run", FinishReason.ABORT),
        ("wait", FinishReason.ABORT),
    ]
    assert blocks_in_use(sched) == 0 and not sched.has_unfinished_requests()
    add(sched, "next", [1])
    plan, _ = step(sched)
    assert plan.finished_req_ids == ["run"]  # the worker never saw "wait"


def test_abort_while_the_step_runs_drops_its_result() -> None:
    sched = make_scheduler()
    add(sched, "a", [1, 2, 3])
    add(sched, "b", [4, 5, 6])
    out = sched.schedule()
    sched.abort_requests(["a"])
    deltas = sched.update_from_output(out, result_for(out))
    assert [d.request_id for d in deltas] == ["b"]
    assert blocks_in_use(sched) == 1


def test_forget_list_survives_an_empty_step() -> None:
    sched = make_scheduler()
    add(sched, "a", [1, 2, 3])
    step(sched)
    sched.abort_requests(["a"])
    assert sched.schedule().num_scheduled_tokens == 0
    add(sched, "b", [1])
    assert sched.schedule().plan.finished_req_ids == ["a"]


# -- stop conditions -------------------------------------------------------------------


def generate(sched: Scheduler, req_id: str, tokens: list[int]) -> list[RequestDelta]:
    """Feed `tokens` as the sampled tokens of `req_id` until it finishes."""
    deltas = []
    for token in tokens:
        _, by_id = step(sched, {req_id: token})
        deltas.append(by_id[req_id])
        if by_id[req_id].finish_reason is not None:
            break
    return deltas


@pytest.mark.parametrize(
    ("params", "sampled", "n_out", "reason", "stop_reason"),
    [
        ({}, [5, EOS, 6], 2, FinishReason.STOP, None),
        ({"ignore_eos": True, "max_tokens": 3}, [5, EOS, 6, 7], 3, FinishReason.LENGTH, None),
        ({"stop_token_ids": [6]}, [5, 6, 7], 2, FinishReason.STOP, 6),
        ({"min_tokens": 3}, [EOS, 6, EOS, EOS], 3, FinishReason.STOP, None),
        ({"min_tokens": 2, "stop_token_ids": [6]}, [6, 6], 2, FinishReason.STOP, 6),
        ({"max_tokens": 3}, [5, 5, 5, 5], 3, FinishReason.LENGTH, None),
        ({"max_tokens": 2}, [5, EOS], 2, FinishReason.STOP, None),
        ({"max_tokens": None}, [5] * 40, 32 - 28, FinishReason.LENGTH, None),
    ],
)
def test_stop_conditions(
    params: dict, sampled: list[int], n_out: int, reason: FinishReason, stop_reason: int | None
) -> None:
    sched = make_scheduler()
    add(sched, "a", list(range(28)), **params)
    deltas = generate(sched, "a", sampled)
    assert [t for d in deltas for t in d.new_token_ids] == sampled[:n_out]
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == (reason, stop_reason)
    assert not sched.has_unfinished_requests() and blocks_in_use(sched) == 0


# -- prefix caching --------------------------------------------------------------------


def test_prefix_cache_hit_reduces_scheduled_tokens() -> None:
    sched = make_scheduler()
    add(sched, "a", list(range(10)))
    first, _ = step(sched)
    add(sched, "b", [*range(8), 42, 43])
    plan, deltas = step(sched)
    (new,) = plan.new_requests
    assert new.num_computed_tokens == 8
    assert new.block_ids[:2] == first.new_requests[0].block_ids[:2]
    assert plan.num_scheduled_tokens["b"] == 2
    assert deltas["b"].num_cached_tokens == 8
    stats = sched.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (20, 8)


def test_cache_salt_keeps_prefixes_apart() -> None:
    sched = make_scheduler()
    add(sched, "a", list(range(10)), salt="tenant-1")
    step(sched)
    add(sched, "b", list(range(10)), salt="tenant-2")
    plan, _ = step(sched)
    assert plan.num_scheduled_tokens["b"] == 10


def test_stats_report_queue_lengths_and_usage() -> None:
    sched = make_scheduler(max_num_seqs=1)
    add(sched, "a", list(range(6)))
    add(sched, "b", [1])
    step(sched)
    stats = sched.stats()
    assert (stats.num_running, stats.num_waiting) == (1, 1)
    assert stats.kv_cache_usage == {"mixed": pytest.approx(2 / 9)}


# -- the engine over a paged fake worker -----------------------------------------------

VOCAB = 32
EOS_ID = VOCAB - 1  # rare enough that most requests run long


def next_token(tokens: list[int]) -> int:
    return (sum(tokens) * 7 + len(tokens) * 3) % VOCAB


@dataclass
class _WorkerRequest:
    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class PagedFakeWorker:
    """Stands in for a model worker, keeping its own request state from plan diffs.

    It 'writes' each token's KV (the identity of its prefix) into the paged slot the
    block table names, and reads every slot back before sampling, so wrong block ids,
    a bad prefix hit or KV overwritten by another request change or break the output.
    It also holds every plan to the budget and the sequence cap.
    """

    config: SchedulerConfig
    kv: dict[int, int] = field(default_factory=dict)
    requests: dict[str, _WorkerRequest] = field(default_factory=dict)
    num_plans: int = 0

    def execute(self, plan: StepPlan) -> StepResult:
        self.num_plans += 1
        for req_id in plan.finished_req_ids:
            del self.requests[req_id]
        for new in plan.new_requests:
            assert new.req_id not in self.requests
            self.requests[new.req_id] = _WorkerRequest(
                list(new.token_ids), list(new.block_ids), new.num_computed_tokens
            )
        for cached in plan.cached_requests:
            state = self.requests[cached.req_id]
            assert state.num_computed_tokens == cached.num_computed_tokens
            state.block_ids += cached.new_block_ids
        counts = plan.num_scheduled_tokens
        assert min(counts.values()) >= 1
        assert sum(counts.values()) <= self.config.max_num_batched_tokens
        assert len(self.requests) <= self.config.max_num_seqs
        sampled = {}
        for req_id, count in plan.num_scheduled_tokens.items():
            token = self._run(self.requests[req_id], count)
            if token is not None:
                sampled[req_id] = token
        return StepResult(plan.step_id, list(sampled), list(sampled.values()))

    def _run(self, state: _WorkerRequest, count: int) -> int | None:
        assert 0 not in state.block_ids
        end = state.num_computed_tokens + count
        assert end <= len(state.token_ids) and end <= len(state.block_ids) * self.config.block_size
        for pos in range(state.num_computed_tokens, end):
            self.kv[self._slot(state, pos)] = hash(tuple(state.token_ids[: pos + 1]))
        state.num_computed_tokens = end
        if end < len(state.token_ids):
            return None
        for pos in range(end):
            assert self.kv[self._slot(state, pos)] == hash(tuple(state.token_ids[: pos + 1]))
        token = next_token(state.token_ids)
        state.token_ids.append(token)
        return token

    def _slot(self, state: _WorkerRequest, pos: int) -> int:
        size = self.config.block_size
        return state.block_ids[pos // size] * size + pos % size


def test_engine_steps_through_a_request_and_skips_empty_steps() -> None:
    sched = make_scheduler()
    worker = PagedFakeWorker(sched.config)
    engine = EngineCore(sched, worker)
    assert engine.step() == [] and worker.num_plans == 0
    assert engine.add_request(AddRequest("a", [1, 2], SamplingParams(max_tokens=2), 0.0)) is None
    first = engine.step()
    assert [(d.new_token_ids, d.finish_reason) for d in first] == [([next_token([1, 2])], None)]
    (last,) = engine.step()
    assert last.finish_reason == FinishReason.LENGTH
    assert not engine.has_unfinished_requests()
    assert engine.step() == [] and worker.num_plans == 2


@dataclass
class Workload:
    prompt: list[int]
    max_tokens: int
    arrive_at: int  # engine step
    abort_at: int | None  # engine step, if aborted


def run_engine(
    sched: Scheduler, workload: list[Workload], salts: list[str | None]
) -> dict[str, list[int]]:
    engine = EngineCore(sched, PagedFakeWorker(sched.config))
    outputs: dict[str, list[int]] = {}
    finished: set[str] = set()
    for tick in range(2000):
        for i, item in enumerate(workload):
            params = SamplingParams(max_tokens=item.max_tokens)
            if item.arrive_at == tick:
                msg = AddRequest(f"r{i}", item.prompt, params, float(tick), i % 3, salts[i])
                assert engine.add_request(msg) is None
                outputs[f"r{i}"] = []
            if item.abort_at == tick:
                finished.update(d.request_id for d in engine.abort_requests([f"r{i}"]))
        for delta in engine.step():
            assert delta.request_id not in finished
            outputs[delta.request_id] += delta.new_token_ids
            if delta.finish_reason is not None:
                finished.add(delta.request_id)
        if tick > max(item.arrive_at for item in workload) and not engine.has_unfinished_requests():
            return outputs
    raise AssertionError("the engine did not drain: livelock")


PREFIXES = [[], [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8, 9]]

workloads = st.lists(
    st.builds(
        Workload,
        prompt=st.builds(
            lambda prefix, tail: [*prefix, *tail] or [0],
            st.sampled_from(PREFIXES),
            st.lists(st.integers(0, 30), max_size=14),
        ),
        max_tokens=st.integers(1, 16),
        arrive_at=st.integers(0, 8),
        abort_at=st.none() | st.integers(0, 40),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(
    workload=workloads,
    num_blocks=st.integers(9, 12),
    budget=st.integers(1, 24),
    max_num_seqs=st.integers(1, 5),
    policy=st.sampled_from(["fcfs", "priority"]),
    caching=st.booleans(),
    threshold=st.none() | st.integers(1, 6),
    salts=st.lists(st.sampled_from([None, "x"]), min_size=8, max_size=8),
)
def test_scheduling_never_changes_what_is_generated(
    workload: list[Workload],
    num_blocks: int,
    budget: int,
    max_num_seqs: int,
    policy: Policy,
    caching: bool,
    threshold: int | None,
    salts: list[str | None],
) -> None:
    """A tight pool, budget and seq cap (chunking, preemption, cache hits, aborts) give the
    same tokens as a roomy engine, and every block comes back."""
    config = SchedulerConfig(
        max_model_len=32,
        block_size=4,
        max_num_batched_tokens=budget,
        max_num_seqs=max_num_seqs,
        policy=policy,
        enable_prefix_caching=caching,
        long_prefill_token_threshold=threshold,
    )
    tight = Scheduler(config, num_blocks, eos_token_ids=[EOS_ID])
    got = run_engine(tight, workload, salts)
    roomy = Scheduler(SchedulerConfig(max_model_len=32, block_size=4), 200, eos_token_ids=[EOS_ID])
    unaborted = [Workload(w.prompt, w.max_tokens, w.arrive_at, None) for w in workload]
    want = run_engine(roomy, unaborted, salts)
    for i, item in enumerate(workload):
        if item.abort_at is None:
            assert got[f"r{i}"] == want[f"r{i}"]
        else:
            assert got[f"r{i}"] == want[f"r{i}"][: len(got[f"r{i}"])]
    pool = tight.pools["mixed"].pool
    assert pool.num_free_blocks == num_blocks - 1
    assert all(block.ref_cnt == 0 for block in pool.blocks)
