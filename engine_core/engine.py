"""The offline engine's step: schedule, execute, update, over an in-process executor.

The offline LLM owns the loop; this owns nothing but the order of those three. (The core
process drives its workers through engine_core/pool.py instead: same scheduler.)"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from engine_core.messages.frontend import AddRequest, RequestDelta, SchedulerStats
from engine_core.messages.worker import StepPlan, StepResult
from engine_core.scheduler import Scheduler


class Executor(Protocol):
    """Anything that runs a plan in-process and returns its result: a model runner, a fake."""

    def execute(self, plan: StepPlan) -> StepResult: ...


class EngineCore:
    """Drives one scheduler against one executor, a step at a time."""

    def __init__(self, scheduler: Scheduler, executor: Executor) -> None:
        self.scheduler = scheduler
        self.executor = executor

    def add_request(self, msg: AddRequest) -> RequestDelta | None:
        """Queue a request; a returned delta means it was rejected (see its `error`)."""
        return self.scheduler.add_request(msg)

    def abort_requests(self, request_ids: Iterable[str]) -> list[RequestDelta]:
        """Abort requests in any state; returns their final deltas."""
        return self.scheduler.abort_requests(request_ids)

    def step(self) -> list[RequestDelta]:
        """Run one step and return the outputs it produced ([] if there was nothing to run)."""
        sched_out = self.scheduler.schedule()
        if sched_out.num_scheduled_tokens == 0:
            return []
        result = self.executor.execute(sched_out.plan)
        return self.scheduler.update_from_output(sched_out, result)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()
