"""Continuous-batching scheduler: which requests advance by how many tokens each step.

vLLM v1's token-budget model. Every request has `num_computed_tokens` and a token list;
each step closes that gap under `max_num_batched_tokens` and `max_num_seqs`. Running
requests go first (a decode costs 1 token, a partial prefill its next chunk), then
waiting ones are admitted while budget, sequence slots and blocks last. When a running
request cannot get blocks, the lowest-ranked running request is preempted: its blocks
are freed and it is recomputed from its tokens later.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from engine_core.async_steps import InflightStep
from engine_core.kv_cache_manager import KVCacheManager
from engine_core.lora_cap import LoRACap, lora_counts
from engine_core.messages.common import ErrorKind, FinishReason, TokenLogprobs
from engine_core.messages.config import EngineConfig
from engine_core.messages.frontend import AddRequest, RequestDelta, SchedulerStats
from engine_core.messages.worker import (
    CachedRequestData,
    NewRequestData,
    StepPlan,
    StepResult,
)
from engine_core.request import Request, RequestStatus, Stop, check_stop
from engine_core.spec_decode import NgramSpeculator
from models.config import ModelConfig

logger = logging.getLogger(__name__)

Policy = Literal["fcfs", "priority"]

# what a client is told when its request keeps failing on the worker (details are logged)
STEP_FAILED = "the model worker failed to run this request"


@dataclass
class SchedulerConfig:
    """Scheduling limits; the names and defaults are vLLM's."""

    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # chunked prefill is always on
    block_size: int = 16
    enable_prefix_caching: bool = True
    policy: Policy = "fcfs"
    # cap on one request's prefill chunk per step, so long prompts don't hog the budget
    long_prefill_token_threshold: int | None = None
    # prompt token ids must be below this (None: unchecked); one bad id would fail the
    # whole step on the worker, and with it every request in the batch
    vocab_size: int | None = None
    # distinct LoRA adapters in one step (vLLM's --max-loras); None: LoRA is off
    max_loras: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.max_model_len >= 2, "max_model_len must be at least 2"),
            (self.max_num_seqs >= 1, "max_num_seqs must be at least 1"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be at least 1"),
            (self.block_size >= 1, "block_size must be at least 1"),
            (self.policy in ("fcfs", "priority"), "policy must be 'fcfs' or 'priority'"),
            (
                self.long_prefill_token_threshold is None or self.long_prefill_token_threshold >= 1,
                "long_prefill_token_threshold must be at least 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class SchedulerOutput:
    """One scheduled step: the worker's plan plus what `update_from_output` needs."""

    plan: StepPlan
    # requests whose scheduled tokens reach their last known token, so the worker samples
    sampling_req_ids: frozenset[str]

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(self.plan.num_scheduled_tokens.values())


def _priority_key(request: Request) -> tuple[int, float]:
    return (request.priority, request.arrival_time)


class WaitingQueue:
    """Requests holding no blocks, in the order they should be admitted.

    fcfs: arrival order, a preempted request back at the front. priority: by
    (priority, arrival_time), lower first; a preempted request goes ahead of its equals.
    """

    def __init__(self, policy: Policy) -> None:
        self._by_priority = policy == "priority"
        self._requests: list[Request] = []

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)

    def add(self, request: Request) -> None:
        if self._by_priority:
            bisect.insort_right(self._requests, request, key=_priority_key)
        else:
            self._requests.append(request)

    def prepend(self, request: Request) -> None:
        index = 0
        if self._by_priority:
            index = bisect.bisect_left(self._requests, _priority_key(request), key=_priority_key)
        self._requests.insert(index, request)

    def peek(self) -> Request:
        return self._requests[0]

    def popleft(self) -> Request:
        return self._requests.pop(0)

    def remove(self, request: Request) -> None:
        self._requests.remove(request)


@dataclass
class _Step:
    """The plan being built during one `schedule()` call."""

    token_budget: int
    new: list[NewRequestData] = field(default_factory=list)
    cached: list[CachedRequestData] = field(default_factory=list)
    num_tokens: dict[str, int] = field(default_factory=dict)
    sampling: set[str] = field(default_factory=set)
    preempted: list[str] = field(default_factory=list)
    spec: dict[str, list[int]] = field(default_factory=dict)  # req_id -> draft tokens

    def add_new(self, request: Request, num_tokens: int, block_ids: list[int]) -> None:
        self.new.append(
            NewRequestData(
                req_id=request.request_id,
                token_ids=list(request.all_token_ids),
                num_prompt_tokens=request.num_prompt_tokens,
                sampling_params=request.sampling_params,
                block_ids=block_ids,
                num_computed_tokens=request.num_computed_tokens,
                lora=request.lora,
            )
        )
        self._count(request, num_tokens)

    def add_cached(
        self,
        request: Request,
        num_tokens: int,
        new_block_ids: list[int],
        drafts: Sequence[int] = (),
    ) -> None:
        """`num_tokens` includes `drafts`, the speculative tokens after the known ones."""
        if drafts:
            self.spec[request.request_id] = list(drafts)
        self.cached.append(
            CachedRequestData(
                req_id=request.request_id,
                new_block_ids=new_block_ids,
                num_computed_tokens=request.num_planned_computed,
            )
        )
        self._count(request, num_tokens)

    def _count(self, request: Request, num_tokens: int) -> None:
        self.num_tokens[request.request_id] = num_tokens
        self.token_budget -= num_tokens
        num_drafts = len(self.spec.get(request.request_id, ()))
        if request.num_planned_computed + num_tokens - num_drafts == request.num_planned_tokens:
            self.sampling.add(request.request_id)


class Scheduler:
    """Decides every step; owns the requests and, through KV cache managers, their blocks.

    `running` is kept in rank order (admission order under fcfs; (priority, arrival)
    under priority), so it is scheduled front to back and its tail is always the next
    preemption victim — a victim is never a request already scheduled this step.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        num_blocks: int,
        eos_token_ids: Collection[int],
        speculator: NgramSpeculator | None = None,
    ) -> None:
        self.config = config
        self.speculator = speculator  # n-gram drafts for decoding requests (None: off)
        self.eos_token_ids = frozenset(eos_token_ids)
        # NOTE: one pool per worker role; colocated mode has only "mixed". Disaggregation
        # adds "prefill" and "decode" pools, and `_pool_for` picks by a request's phase.
        self.pools = {
            "mixed": KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        }
        for name, pool in self.pools.items():
            # otherwise a lone request could outgrow the pool and preempt itself forever
            if pool.capacity_tokens < config.max_model_len:
                raise ValueError(
                    f"{name} pool holds {pool.capacity_tokens} tokens, "
                    f"less than max_model_len={config.max_model_len}"
                )
        self.requests: dict[str, Request] = {}  # waiting and running, by id
        self.waiting = WaitingQueue(config.policy)
        self.running: list[Request] = []
        self._forget_ids: list[str] = []  # finished since the last plan; workers must drop them
        self._step_id = 0
        self.num_preemptions = 0
        self.structured_output_seconds = 0.0  # cumulative, from the worker's results

    def add_request(self, msg: AddRequest) -> RequestDelta | None:
        """Queue a request; returns a finished delta carrying the error if it is rejected."""
        error = self.rejection(msg)
        if error is not None:
            return rejected(msg.request_id, error, ErrorKind.CLIENT)
        request = Request.from_add_request(msg, self.config.block_size)
        self.requests[request.request_id] = request
        self.waiting.add(request)
        return None

    def enqueue(self, request: Request) -> None:
        """Take over a request from elsewhere (another worker's scheduler), at the back.

        If this scheduler's pool already holds blocks for it (KV transferred in), its
        `num_computed_tokens` must say how many tokens those blocks hold; otherwise it
        must be 0 and the request is recomputed here, prefix cache permitting.
        """
        if request.status != RequestStatus.WAITING:  # a fresh one still counts its cache hits
            request.status = RequestStatus.PREEMPTED
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def detach(self, request: Request) -> None:
        """Hand a running request over to someone else; its blocks stay held here.

        The worker is told to forget it; the caller frees the blocks (`pools[...].free`)
        once they are no longer needed, e.g. when their KV has been transferred.
        """
        self.running.remove(request)
        del self.requests[request.request_id]
        self._forget_ids.append(request.request_id)

    def abort_requests(self, request_ids: Iterable[str]) -> list[RequestDelta]:
        """Finish requests in any state, freeing their blocks; unknown ids are ignored."""
        deltas: list[RequestDelta] = []
        for req_id in request_ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, Stop(RequestStatus.FINISHED_ABORTED))
            deltas.append(self._delta(request, []))
        return deltas

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def stats(self) -> SchedulerStats:
        """Queue lengths, KV usage per pool, cumulative prefix-cache and preemption counts."""
        pools = self.pools.values()
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage={name: pool.usage for name, pool in self.pools.items()},
            prefix_cache_queries=sum(pool.prefix_cache_queries for pool in pools),
            prefix_cache_hits=sum(pool.prefix_cache_hits for pool in pools),
            num_preemptions=self.num_preemptions,
            running_loras=lora_counts(self.running),
            waiting_loras=lora_counts(self.waiting),
            spec_decode=None if self.speculator is None else self.speculator.counters,
            structured_output_seconds=self.structured_output_seconds,
        )

    def schedule(self) -> SchedulerOutput:
        """Plan one step: running requests first, then admit waiting ones.

        A suspect (a request from a failed step) runs in a step of its own, so a request
        that breaks steps is found and failed alone, and the others go on.
        """
        step = _Step(token_budget=self.config.max_num_batched_tokens)
        suspect = next((r for r in self.requests.values() if r.suspect), None)
        if suspect is None or not self._schedule_alone(suspect, step):
            self._schedule_running(step)
            # NOTE: a step that had to preempt is out of blocks; admitting now would thrash.
            if not step.preempted:
                self._schedule_waiting(step)
        return self._emit(step)

    def update_from_output(
        self, sched_out: SchedulerOutput, result: StepResult
    ) -> list[RequestDelta]:
        """Apply a worker's result: advance progress, append sampled tokens, check stops."""
        plan = sched_out.plan
        if result.step_id != plan.step_id:
            raise ValueError(f"result for step {result.step_id}, expected {plan.step_id}")
        self.structured_output_seconds += result.structured_seconds
        problem = result.error or self._result_problem(sched_out, result)
        if problem is not None:
            return self._fail_step(plan, problem)
        sampled = dict(zip(result.req_ids, result.sampled_token_ids, strict=True))
        logprobs: dict[str, TokenLogprobs | None] = {}
        if result.logprobs is not None:
            logprobs = dict(zip(result.req_ids, result.logprobs, strict=True))
        deltas: list[RequestDelta] = []
        for req_id, num_tokens in plan.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            inflight = None if request is None else request.inflight.confirm(plan.step_id)
            if request is None or inflight is None:
                continue  # aborted, or reset to be recomputed, while the step ran
            if req_id in result.prompt_logprobs:
                request.record_prompt_logprobs(inflight.start, result.prompt_logprobs[req_id])
            accepted = result.accepted_token_ids.get(req_id, [])
            # NOTE: not running = preempted by a plan made while this step ran (async
            # scheduling): it holds no blocks now, but the token it sampled stands
            preempted = request.status != RequestStatus.RUNNING
            if not preempted:
                num_rejected = self._count_verified(request, plan, accepted)
                request.num_computed_tokens += num_tokens - num_rejected
                if num_rejected:  # their KV is garbage: free the blocks only they needed
                    self._pool_for(request).trim(request)
                self._pool_for(request).cache_blocks(request)
            if req_id in sched_out.sampling_req_ids:
                request.suspect = False
                lp = logprobs.get(req_id)
                lps = None if lp is None else [*result.accepted_logprobs.get(req_id, []), lp]
                deltas.append(self._append(request, [*accepted, sampled[req_id]], lps))
                if preempted and request.is_finished:
                    self.waiting.remove(request)
        self.running = [r for r in self.running if r.status == RequestStatus.RUNNING]
        return deltas

    # -- scheduling ----------------------------------------------------------------------

    def _schedule_alone(self, request: Request, step: _Step) -> bool:
        """Put only `request` in this step; False if it cannot run now."""
        if request.status == RequestStatus.RUNNING:
            num_new = self._chunk(request.num_planned_tokens - request.num_planned_computed, step)
            new_block_ids = self._pool_for(request).allocate_slots(request, num_new)
            if new_block_ids is None:
                return False
            step.add_cached(request, num_new, new_block_ids)
            return True
        return len(self.running) < self.config.max_num_seqs and self._admit(request, step)

    def _schedule_running(self, step: _Step) -> None:
        index = 0
        while index < len(self.running) and step.token_budget > 0:
            request = self.running[index]
            if self._ends_in_flight(request):
                index += 1
                continue
            num_new = self._chunk(request.num_planned_tokens - request.num_planned_computed, step)
            # NOTE: drafts leave a block per request still to schedule, so they never
            # cause a preemption (each of those needs at most one more for its decode)
            reserve = len(self.running) - index - 1
            drafts, new_block_ids = self._speculate(request, num_new, step, reserve)
            if new_block_ids is None:
                new_block_ids = self._allocate_or_preempt(request, num_new, step)
            if new_block_ids is None:
                return  # it preempted itself, so it was the last running request
            step.add_cached(request, num_new + len(drafts), new_block_ids, drafts)
            index += 1

    def _ends_in_flight(self, request: Request) -> bool:
        """The tokens its plans in flight sample will surely finish it (by length), so a
        plan behind them would be wasted (async scheduling)."""
        num_placeholders = request.inflight.num_placeholders
        if not num_placeholders:
            return False
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None and request.num_output_tokens + num_placeholders >= max_tokens:
            return True
        return request.num_planned_tokens >= self.config.max_model_len

    def _speculate(
        self, request: Request, num_new: int, step: _Step, reserve: int
    ) -> tuple[list[int], list[int] | None]:
        """(drafts, the new block ids of 1 + drafts tokens) for a decoding request; ([],
        None) when there are none or their blocks would not leave `reserve` free."""
        if self.speculator is None or num_new != 1 or not request.output_token_ids:
            return [], None
        drafts = self.speculator.propose(request, step.token_budget - 1)
        pool = self._pool_for(request)
        if not drafts or not pool.can_extend(request, 1 + len(drafts), reserve):
            return [], None
        return drafts, pool.allocate_slots(request, 1 + len(drafts))

    def _count_verified(self, request: Request, plan: StepPlan, accepted: list[int]) -> int:
        """Count a request's verified draft, if it had one; returns its rejected tokens."""
        drafts = plan.spec_token_ids.get(request.request_id)
        if not drafts or self.speculator is None:
            return 0
        self.speculator.record(len(drafts), len(accepted))
        return len(drafts) - len(accepted)

    def _allocate_or_preempt(self, request: Request, num_new: int, step: _Step) -> list[int] | None:
        """Allocate for a running request, preempting from the tail until it fits."""
        pool = self._pool_for(request)
        while (new_block_ids := pool.allocate_slots(request, num_new)) is None:
            victim = self.running[-1]
            self._preempt(victim, step)
            if victim is request:
                return None
        return new_block_ids

    def _schedule_waiting(self, step: _Step) -> None:
        loras = LoRACap(self.config.max_loras, self.running)
        for request in list(self.waiting):
            if step.token_budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                return
            if not loras.admits(request):
                continue  # as vLLM: it waits for its adapter's turn; others may go
            if not self._admit(request, step):
                return  # head-of-line waits for blocks; later requests wait behind it

    def _admit(self, request: Request, step: _Step) -> bool:
        """Try to start (or resume) the head of the waiting queue."""
        if request.inflight:  # preempted behind a step in flight: resume after its result
            return False
        pool = self._pool_for(request)
        if pool.holds(request):  # its KV was transferred in: those tokens are computed
            hits, num_hit_tokens = [], request.num_computed_tokens
        else:
            hits, num_hit_tokens = pool.get_computed_blocks(request)
        num_new = self._chunk(request.num_tokens - num_hit_tokens, step)
        if pool.allocate_slots(request, num_new, hits) is None:
            return False
        self.waiting.remove(request)
        if request.status == RequestStatus.WAITING:
            request.num_cached_tokens = num_hit_tokens
        request.num_computed_tokens = num_hit_tokens
        request.status = RequestStatus.RUNNING
        self._add_running(request)
        step.add_new(request, num_new, pool.get_block_ids(request))
        return True

    def _chunk(self, num_uncomputed: int, step: _Step) -> int:
        threshold = self.config.long_prefill_token_threshold
        if threshold is not None:
            num_uncomputed = min(num_uncomputed, threshold)
        return min(num_uncomputed, step.token_budget)

    def _add_running(self, request: Request) -> None:
        if self.config.policy == "priority":
            bisect.insort_right(self.running, request, key=_priority_key)
        else:
            self.running.append(request)

    def _preempt(self, request: Request, step: _Step) -> None:
        self.running.remove(request)
        self._pool_for(request).free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend(request)
        step.preempted.append(request.request_id)

    def _emit(self, step: _Step) -> SchedulerOutput:
        self._forget_ids += step.preempted
        forget: list[str] = []
        # NOTE: an empty plan is never executed, so what to forget waits for the next one
        if step.num_tokens:
            forget, self._forget_ids = self._forget_ids, []
        self._step_id += 1
        for req_id, num_tokens in step.num_tokens.items():
            request = self.requests[req_id]
            samples = req_id in step.sampling
            start = request.num_planned_computed
            request.inflight.push(InflightStep(self._step_id, start, num_tokens, samples))
        plan = StepPlan(
            step_id=self._step_id,
            new_requests=step.new,
            cached_requests=step.cached,
            num_scheduled_tokens=step.num_tokens,
            finished_req_ids=forget,
            spec_token_ids=step.spec,
        )
        return SchedulerOutput(plan, frozenset(step.sampling))

    def _pool_for(self, request: Request) -> KVCacheManager:
        return self.pools["mixed"]

    # -- results -------------------------------------------------------------------------

    def _append(
        self, request: Request, token_ids: list[int], logprobs: list[TokenLogprobs] | None
    ) -> RequestDelta:
        """Append a step's tokens (several with accepted drafts), up to the first stop."""
        num_kept, stop = 0, None
        for token_id in token_ids:
            request.append_output_token(token_id)
            num_kept += 1
            stop = check_stop(request, self.eos_token_ids, self.config.max_model_len)
            if stop is not None:
                break
        if num_kept > 1:  # accepted drafts completed blocks that are computed: publish them
            self._pool_for(request).cache_blocks(request)
        if stop is not None:
            self._finish(request, stop)
        kept = token_ids[:num_kept]
        delta = self._delta(request, kept, None if logprobs is None else logprobs[:num_kept])
        delta.prompt_logprobs = request.take_prompt_logprobs()
        return delta

    def _result_problem(self, sched_out: SchedulerOutput, result: StepResult) -> str | None:
        """What is wrong with a decodable result that does not fit its plan, if anything."""
        num = len(result.req_ids)
        lp_rows = num if result.logprobs is None else len(result.logprobs)
        if len(result.sampled_token_ids) != num or lp_rows != num:
            return "the result's lists differ in length"
        if not sched_out.sampling_req_ids <= set(result.req_ids):
            return "the result lacks a token for a sampling request"
        vocab = self.config.vocab_size
        if vocab is not None and not all(0 <= t < vocab for t in result.sampled_token_ids):
            return "the result has a token id outside the vocabulary"
        for req_id, accepted in result.accepted_token_ids.items():
            drafts = sched_out.plan.spec_token_ids.get(req_id, [])
            if accepted != drafts[: len(accepted)]:
                return "the result accepted tokens that were not drafted"
            if len(result.accepted_logprobs.get(req_id, accepted)) != len(accepted):
                return "the result's lists differ in length"
        return None

    def _fail_step(self, plan: StepPlan, error: str) -> list[RequestDelta]:
        """The worker could not run the step: recompute its requests, each alone; a
        request already in a failed step fails now, with a generic error (never `error`)."""
        in_step = [self.requests.get(req_id) for req_id in plan.num_scheduled_tokens]
        confirmed = [r for r in in_step if r is not None and r.inflight.confirm(plan.step_id)]
        running = [r for r in confirmed if r.status == RequestStatus.RUNNING]
        failed = [r for r in running if r.suspect]
        logger.error("step %d failed on the worker (%s): recomputing %d requests, failing %d",
                     plan.step_id, error, len(running) - len(failed), len(failed))  # fmt: skip
        deltas: list[RequestDelta] = []
        for request in running:
            self.running.remove(request)
            if request.suspect:
                self._finish(request, Stop(RequestStatus.FINISHED_ABORTED))
                deltas.append(self._delta(request, [], error=STEP_FAILED))
            else:
                self._requeue(request)
        return deltas

    def _requeue(self, request: Request) -> None:
        """Back to the front of the queue, holding nothing, to be recomputed alone."""
        self._pool_for(request).free(request)
        self._forget_ids.append(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.inflight.clear()  # the worker's later results for it are stale
        request.suspect = True
        self.waiting.prepend(request)

    def _finish(self, request: Request, stop: Stop) -> None:
        if request.status == RequestStatus.RUNNING:
            self._forget_ids.append(request.request_id)
        request.status = stop.status
        request.stop_reason = stop.stop_token
        self._pool_for(request).free(request)
        del self.requests[request.request_id]

    def _delta(
        self,
        request: Request,
        new_token_ids: list[int],
        logprobs: list[TokenLogprobs] | None = None,
        error: str | None = None,
    ) -> RequestDelta:
        return RequestDelta(
            request_id=request.request_id,
            new_token_ids=new_token_ids,
            new_logprobs=logprobs,
            finish_reason=request.status.finish_reason,
            stop_reason=request.stop_reason,
            num_cached_tokens=request.num_cached_tokens,
            error=error,
        )

    def rejection(self, msg: AddRequest) -> str | None:
        """Why `msg` cannot be served here (None if it can)."""
        num_prompt = len(msg.prompt_token_ids)
        if msg.request_id in self.requests:
            return f"request id {msg.request_id!r} is already in use"
        if num_prompt == 0:
            return "the prompt is empty"
        if msg.lora is not None and self.config.max_loras is None:
            return "LoRA adapters are not enabled (start the server with --enable-lora)"
        vocab = self.config.vocab_size
        if vocab is not None:
            for name, ids in _token_id_fields(msg):
                if ids and not 0 <= min(ids) <= max(ids) < vocab:
                    return f"{name} has token ids outside the vocabulary [0, {vocab})"
        if not math.isfinite(msg.arrival_time):
            return "arrival_time must be a finite number"
        if num_prompt >= self.config.max_model_len:
            return (
                f"the prompt has {num_prompt} tokens, but max_model_len is "
                f"{self.config.max_model_len}: no room to generate"
            )
        try:
            msg.sampling_params.validate()
        except ValueError as exc:
            return str(exc)
        return None


def _token_id_fields(msg: AddRequest) -> list[tuple[str, list[int]]]:
    """Every token id a request names, by where it names it (for the vocabulary check)."""
    params = msg.sampling_params
    return [
        ("the prompt", msg.prompt_token_ids),
        ("stop_token_ids", params.stop_token_ids),
        ("logit_bias", list(params.logit_bias or ())),
    ]


def rejected(request_id: str, error: str, kind: ErrorKind) -> RequestDelta:
    """The final delta of a request the engine will not (or can no longer) serve."""
    return RequestDelta(
        request_id, [], finish_reason=FinishReason.ABORT, error=error, error_kind=kind
    )


def scheduler_for(
    config: EngineConfig,
    model: ModelConfig,
    num_blocks: int,
    max_model_len: int,
    role: str = "mixed",
) -> Scheduler:
    """The scheduler for one KV pool of `num_blocks`, with the engine's limits and the
    model's EOS ids and vocabulary (the one place EngineConfig maps onto SchedulerConfig).
    Mixed and decode workers speculate if configured; prefill workers never do."""
    sched_config = SchedulerConfig(
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=max_model_len,
        block_size=config.block_size,
        enable_prefix_caching=config.enable_prefix_caching,
        policy=config.scheduling_policy,
        vocab_size=model.vocab_size,
        max_loras=config.max_loras if config.enable_lora else None,
    )
    spec = config.speculative_config
    speculator = None
    if spec is not None and role != "prefill":
        speculator = NgramSpeculator(spec, max_model_len)
    return Scheduler(sched_config, num_blocks, model.eos_token_ids, speculator)
