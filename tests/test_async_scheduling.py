"""Async scheduling at the scheduler: step N+1 is planned before result N comes back.

A paged fake worker (test_scheduler.PagedFakeWorker) runs every plan in order as it is
sent, keeping its own copy of each request and appending what it samples, as the model
runner does; the core sees each result only after it planned the next step. Outputs must
be exactly those of synchronous scheduling, and every block must be free at the end.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable

import pytest
from test_scheduler import EOS_ID, PagedFakeWorker, add, blocks_in_use, make_scheduler, next_token

from engine_core.messages.frontend import RequestDelta
from engine_core.messages.worker import StepResult
from engine_core.request import RequestStatus
from engine_core.scheduler import Policy, Scheduler, SchedulerConfig, SchedulerOutput

Outputs = dict[str, tuple[list[int], str | None]]


class Driver:
    """The core's side of one worker: up to `ahead` plans in flight, results in order."""

    def __init__(self, sched: Scheduler, ahead: int) -> None:
        self.sched = sched
        self.ahead = ahead
        self.worker = PagedFakeWorker(sched.config)
        self.inflight: deque[tuple[SchedulerOutput, StepResult]] = deque()
        self.outputs: Outputs = {}
        self.max_inflight = 0

    def dispatch(self) -> None:
        while len(self.inflight) < self.ahead:
            out = self.sched.schedule()
            if not out.num_scheduled_tokens:
                return
            self.inflight.append((out, self.worker.execute(out.plan)))
            self.max_inflight = max(self.max_inflight, len(self.inflight))

    def land(self, result: StepResult | None = None) -> list[RequestDelta]:
        """Hand the oldest result to the scheduler (or `result` in its place)."""
        out, computed = self.inflight.popleft()
        deltas = self.sched.update_from_output(out, result or computed)
        for delta in deltas:
            tokens, _ = self.outputs.get(delta.request_id, ([], None))
            reason = None if delta.finish_reason is None else delta.finish_reason.api_name
            self.outputs[delta.request_id] = ([*tokens, *delta.new_token_ids], reason)
        return deltas

    def run(self, on_step: Callable[[int, Driver], None] | None = None) -> Outputs:
        steps = 0
        while self.sched.has_unfinished_requests() or self.inflight:
            self.dispatch()
            self.land()
            steps += 1
            if on_step is not None:
                on_step(steps, self)
            assert steps < 2000
        return self.outputs


def make(
    policy: Policy = "fcfs", caching: bool = True, num_blocks: int = 12, **limits: int
) -> Scheduler:
    """A scheduler whose EOS is the fake worker's, with the given limits."""
    config = SchedulerConfig(block_size=4, policy=policy, enable_prefix_caching=caching, **limits)  # type: ignore[arg-type]
    return Scheduler(config, num_blocks, eos_token_ids=[EOS_ID])


def requests_for(seed: int) -> list[tuple[str, list[int], dict]]:
    """Prompts (some sharing a prefix) with max_tokens, stop tokens and priorities."""
    rng = random.Random(seed)
    shared = [rng.randrange(EOS_ID) for _ in range(8)]
    out = []
    for i in range(8):
        prompt = [rng.randrange(EOS_ID) for _ in range(rng.randrange(1, 14))]
        if i % 4 == 1:
            prompt = shared + prompt[:3]
        params: dict = {"max_tokens": rng.choice([1, 2, 5, 12, None])}
        if i % 3 == 0:
            params["stop_token_ids"] = [rng.randrange(EOS_ID)]
        out.append((f"r{i}", prompt, {"priority": rng.randrange(3), **params}))
    return out


def run_one(seed: int, ahead: int, abort: bool = False, **options: object) -> Driver:
    """Half the requests at the start, the rest arriving while it runs (one aborted)."""
    sched = make(**options)
    pending = requests_for(seed)

    def arrive(steps: int, driver: Driver) -> None:
        if steps % 3 == 0 and pending:
            req_id, prompt, params = pending.pop()
            add(sched, req_id, prompt, arrival=float(steps), **params)
        if abort and steps == 5 and "r0" in sched.requests:
            sched.abort_requests(["r0"])

    for _ in range(4):
        req_id, prompt, params = pending.pop(0)
        add(sched, req_id, prompt, **params)
    driver = Driver(sched, ahead)
    driver.run(arrive)
    while pending:  # the run ended before they all arrived: run them too
        req_id, prompt, params = pending.pop()
        add(sched, req_id, prompt, **params)
        driver.run()
    return driver


def run_both(seed: int, **options: object) -> tuple[Driver, Driver]:
    return run_one(seed, 1, **options), run_one(seed, 2, **options)


LIMITS = {"num_blocks": 12, "max_num_batched_tokens": 10, "max_model_len": 40}


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_outputs_and_blocks_match_sync_under_preemption(
    seed: int, caching: bool, policy: Policy
) -> None:
    sync, ahead = run_both(seed, caching=caching, policy=policy, **LIMITS)
    assert ahead.max_inflight == 2
    assert ahead.outputs == sync.outputs
    assert all(reason is not None for _, reason in ahead.outputs.values())
    assert blocks_in_use(ahead.sched) == 0 and not ahead.sched.requests
    assert not ahead.sched.running and not len(ahead.sched.waiting)


@pytest.mark.parametrize("seed", range(6))
def test_an_abort_while_steps_are_in_flight_leaves_the_others_exact(seed: int) -> None:
    sync, ahead = run_one(seed, 1, **LIMITS), run_one(seed, 2, abort=True, **LIMITS)
    del sync.outputs["r0"]
    ahead.outputs.pop("r0", None)
    assert ahead.outputs == sync.outputs
    assert blocks_in_use(ahead.sched) == 0 and not ahead.sched.requests


def test_the_workloads_do_preempt_and_stop_every_way() -> None:
    preemptions, reasons, eos = 0, set(), 0
    for seed in range(6):
        _, ahead = run_both(seed, **LIMITS)
        preemptions += ahead.sched.num_preemptions
        reasons |= {reason for _, reason in ahead.outputs.values()}
        eos += sum(tokens[-1] == EOS_ID for tokens, _ in ahead.outputs.values())
    assert preemptions > 0 and reasons == {"stop", "length"} and eos > 0


def test_a_stop_at_step_n_drops_its_token_from_step_n_plus_1() -> None:
    sched = make_scheduler()
    stop = next_token([1, 2, 3, next_token([1, 2, 3])])  # its second token
    add(sched, "a", [1, 2, 3], stop_token_ids=[stop], max_tokens=10)
    driver = Driver(sched, ahead=2)
    driver.dispatch()  # prefill, then the placeholder's decode
    assert len(driver.inflight) == 2
    driver.land()
    driver.dispatch()  # the token after the stop, before the stop is known
    (delta,) = driver.land()
    assert delta.finish_reason is not None and delta.stop_reason == stop
    assert blocks_in_use(sched) == 0 and not sched.requests
    assert driver.land() == []  # the wasted step's token goes nowhere
    assert driver.outputs["a"][0] == [next_token([1, 2, 3]), stop]


def test_no_step_is_planned_behind_a_token_that_reaches_max_tokens() -> None:
    sched = make_scheduler()
    add(sched, "a", [1, 2, 3], max_tokens=1)
    driver = Driver(sched, ahead=2)
    driver.dispatch()
    assert len(driver.inflight) == 1  # its one token is in flight: nothing to add
    (delta,) = driver.land()
    assert delta.finish_reason is not None and blocks_in_use(sched) == 0


def test_an_abort_with_two_steps_in_flight_frees_blocks_and_ignores_results() -> None:
    sched = make_scheduler()
    add(sched, "a", [1, 2, 3, 4, 5], max_tokens=10)
    add(sched, "b", [6, 7], max_tokens=4)
    driver = Driver(sched, ahead=2)
    driver.dispatch()
    request = sched.requests["a"]
    (abort,) = sched.abort_requests(["a"])
    assert abort.finish_reason is not None and not sched.pools["mixed"].holds(request)
    outputs = driver.run()
    assert "a" not in outputs and len(outputs["b"][0]) == 4
    assert blocks_in_use(sched) == 0


def test_a_request_preempted_behind_its_step_keeps_the_token_it_sampled() -> None:
    # 9 usable blocks of 4: "old" and "new" fill 4 each; planned behind their prefill,
    # old takes the last block for its next token and new, its prefill still in flight,
    # preempts itself
    sched = make_scheduler(num_blocks=10, max_model_len=36)
    add(sched, "old", list(range(16)), max_tokens=3)
    add(sched, "new", list(range(100, 116)), max_tokens=4)
    driver = Driver(sched, ahead=2)
    driver.dispatch()
    assert sched.num_preemptions == 1 and sched.requests["new"].status == RequestStatus.PREEMPTED
    outputs = driver.run()
    sync = make_scheduler(num_blocks=10, max_model_len=36)
    add(sync, "old", list(range(16)), max_tokens=3)
    add(sync, "new", list(range(100, 116)), max_tokens=4)
    assert outputs == Driver(sync, ahead=1).run()
    assert blocks_in_use(sched) == 0


def test_a_failed_step_with_the_next_in_flight_recomputes_exactly() -> None:
    failed: list[int] = []

    def fail_third(steps: int, driver: Driver) -> None:
        if steps == 2 and driver.inflight:
            out, _ = driver.inflight[0]
            failed.append(out.plan.step_id)
            driver.land(StepResult(out.plan.step_id, [], [], error="boom"))

    outputs = {}
    for ahead, hook in ((1, None), (2, fail_third)):
        sched = make(num_blocks=20, max_model_len=40)
        for req_id, prompt, params in requests_for(3):
            add(sched, req_id, prompt, **params)
        driver = Driver(sched, ahead)
        outputs[ahead] = driver.run(hook)
        assert blocks_in_use(sched) == 0
    assert failed and outputs[2] == outputs[1]
