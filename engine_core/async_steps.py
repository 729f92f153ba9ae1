"""Async scheduling (vLLM's --async-scheduling): plan step N+1 while a worker runs step N.

The core keeps at most `MAX_STEPS_AHEAD` plans in flight on a worker. A request in a plan
that has not come back yet carries an `InflightSteps` record: the tokens that plan will
compute and whether it samples. The scheduler plans over those as if they were done: a
sampling step leaves one placeholder token, so the next plan computes it. The worker
keeps its own copy of each request and appends what it samples, so it already has the
real token when the next plan asks for it: the core never sends it.

When result N arrives the request's record for N is confirmed (its tokens computed, its
sampled token appended, stops checked). A request that stopped at N may already be in
N+1: that output is dropped (its record is gone with the request) and its blocks were
freed at N, which is safe because the worker runs plans in order. A request whose
progress is reset (recomputed after a failed step or a lost worker) clears its record, so
results of plans made before the reset are ignored for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from engine_core.messages.config import EngineConfig

logger = logging.getLogger(__name__)

MAX_STEPS_AHEAD = 2  # plans in flight per worker with async scheduling (vLLM: one ahead)


@dataclass(frozen=True)
class InflightStep:
    """One plan's share of a request, until its result arrives."""

    step_id: int
    start: int  # the request's computed tokens (as the worker will have them) before it
    num_tokens: int
    samples: bool


@dataclass
class InflightSteps:
    """A request's plans in flight, oldest first (results come back in plan order)."""

    steps: list[InflightStep] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.steps)

    @property
    def num_tokens(self) -> int:
        """Tokens scheduled but not yet confirmed computed."""
        return sum(s.num_tokens for s in self.steps)

    @property
    def num_placeholders(self) -> int:
        """Tokens that will be sampled but have not arrived yet."""
        return sum(s.samples for s in self.steps)

    def push(self, step: InflightStep) -> None:
        self.steps.append(step)

    def confirm(self, step_id: int) -> InflightStep | None:
        """The record of `step_id`, removed; None if the request was not in it any more."""
        if not self.steps or self.steps[0].step_id != step_id:
            return None
        return self.steps.pop(0)

    def clear(self) -> None:
        self.steps.clear()


def steps_ahead(config: EngineConfig) -> int:
    """How many plans the core keeps in flight per worker: 1, or 2 with async scheduling.

    NOTE: off with speculative decoding (the next plan's drafts depend on how many the
    in-flight step accepts, as in vLLM's first async version) and when disaggregated (a
    prefill worker's request leaves at its first token, so nothing can be planned behind it).
    """
    if not config.async_scheduling:
        return 1
    if config.speculative_config is not None:
        logger.warning("async scheduling is off: speculative decoding is on")
        return 1
    if not config.colocated:
        logger.warning("async scheduling is off: it is colocated-only for now")
        return 1
    logger.info("async scheduling: planning one step ahead of the worker")
    return MAX_STEPS_AHEAD
