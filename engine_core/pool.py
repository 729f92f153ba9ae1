"""The core's one engine: a pool of workers, each with its own scheduler and KV pool.

Every worker has at most one plan in flight; `step` hands a plan to each idle worker, then
handles whatever the workers say, as it arrives — no worker waits for another.

Colocated, the pool is one "mixed" worker that keeps its requests from prefill to finish.
Disaggregated, a request's path is: the backlog -> the prefill worker with the fewest
queued tokens (chunked prefill, first token sampled and streamed) -> a KV transfer to the
decode worker with the most free blocks (see transfers.py) -> that worker's scheduler
until it finishes. In both, a dead worker's requests are recomputed from the token ids the
core holds while it is replaced (with backoff on quick crashes); a failed step is the
scheduler's to recover from (see Scheduler.update_from_output).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from engine_core.lora_cap import lora_counts, merge_counts
from engine_core.messages.common import ErrorKind, FinishReason
from engine_core.messages.frontend import AddRequest, RequestDelta, SchedulerStats
from engine_core.messages.speculative import SpecDecodeCounters
from engine_core.messages.worker import StepResult, WorkerMsg, WorkerReady
from engine_core.pool_workers import Worker
from engine_core.request import Request, RequestStatus
from engine_core.scheduler import Scheduler, SchedulerOutput, rejected
from engine_core.supervision import Backoff
from engine_core.transfers import TransferBook
from engine_core.worker_link import WorkerLink

logger = logging.getLogger(__name__)

POLL_MS = 5  # longest wait for a worker message per step; bounds new requests' admission delay
IDLE_POLL_MS = 50  # the same with no requests: still listening for joins and deaths
ENTRY_ROLES = ("prefill", "mixed")  # where a new request starts
DRAIN_DEATH = "the model worker stopped while the server shuts down"


class PoolEngine:
    """What the core's busy loop drives (add, abort, step, stats), over concurrent workers.

    `make_scheduler` builds the scheduler for a newly ready worker; `respawn(role)` starts
    a local worker to replace one that died and returns its id (None: don't). `colocated`
    takes one mixed worker instead of prefill and decode ones; `steps_ahead` > 1 plans a
    worker's next steps while it runs one (async_steps.py).
    """

    def __init__(
        self,
        link: WorkerLink,
        make_scheduler: Callable[[WorkerReady], Scheduler],
        respawn: Callable[[str], str] | None = None,
        transfer_timeout: float = 10.0,
        colocated: bool = False,
        steps_ahead: int = 1,
    ) -> None:
        self.link = link
        self.make_scheduler = make_scheduler
        self.respawn = respawn
        self.colocated = colocated
        self.steps_ahead = steps_ahead  # plans in flight per worker (2: async scheduling)
        self.roles = ("mixed",) if colocated else ("prefill", "decode")
        self.workers: dict[str, Worker] = {}
        # request checks and block size: any worker's scheduler, kept while none is up
        self._rules: Scheduler | None = None
        # NOTE: capped well below the frontends' 30 s silence timeout
        self._backoff = {role: Backoff(first=1.0, maximum=8.0) for role in self.roles}
        self._respawns: list[tuple[float, str]] = []  # (monotonic due time, role)
        self._starting: dict[str, str] = {}  # id -> role of replacements not yet ready
        self.transfers = TransferBook(
            self.workers, self._enqueue, self._recompute, transfer_timeout
        )
        self.backlog: list[Request] = []  # requests no prefill worker has taken yet
        self.recomputed_prefills = 0
        self._retired_preemptions = 0  # of workers that died
        self._retired_spec = SpecDecodeCounters()  # likewise
        self._retired_structured_seconds = 0.0
        self.worker_requests: dict[str, int] = {}  # worker id -> requests taken, for stats
        self.worker_deaths = 0  # workers lost after they were ready

    def add_worker(self, ready: WorkerReady) -> None:
        if ready.role not in self.roles:
            logger.warning("ignoring a %s worker (this core takes %s): %s",
                           ready.role, " and ".join(self.roles), ready.worker_id)  # fmt: skip
            return
        self._starting.pop(ready.worker_id, None)
        worker = Worker(ready, self.make_scheduler(ready), joined_at=time.monotonic())
        self.workers[ready.worker_id] = worker
        self._rules = worker.scheduler
        logger.info(
            "%s worker %s joined (%d blocks)", ready.role, ready.worker_id, ready.num_blocks
        )

    def add_request(self, msg: AddRequest) -> RequestDelta | None:
        """Queue a request; a returned delta means it was rejected (see its `error`)."""
        if self._rules is None or not (self.workers or self._expecting_workers()):
            return rejected(msg.request_id, "no workers are ready", ErrorKind.SERVER)
        error = self._rejection(msg, self._rules)
        if error is not None:
            return rejected(msg.request_id, error, ErrorKind.CLIENT)
        self.backlog.append(Request.from_add_request(msg, self._rules.config.block_size))
        self._assign_backlog()
        return None

    def abort_requests(self, request_ids: Iterable[str]) -> list[RequestDelta]:
        """Abort requests wherever they are, freeing their blocks on every worker."""
        deltas: list[RequestDelta] = []
        for req_id in request_ids:
            owner = self._owner(req_id)
            if owner is not None:
                deltas += owner.scheduler.abort_requests([req_id])
            elif req_id in self.transfers or any(r.request_id == req_id for r in self.backlog):
                self.backlog = [r for r in self.backlog if r.request_id != req_id]
                deltas.append(RequestDelta(req_id, [], finish_reason=FinishReason.ABORT))
            self.transfers.drop(req_id)
        return deltas

    def drain(self) -> None:
        """Replace no worker that dies from now on: the core is shutting down."""
        self.respawn = None
        self._respawns = []

    def has_unfinished_requests(self) -> bool:
        busy = any(w.scheduler.requests or w.inflight for w in self.workers.values())
        return busy or bool(self.backlog) or len(self.transfers) > 0

    def wants_step(self) -> bool:
        """Disaggregated, always: even idle, workers join, die and confirm transfers.
        Colocated, only with work or a worker on its way: an idle core then sleeps on its
        inbox, so a new request starts its step at once instead of after a poll."""
        busy = self.has_unfinished_requests() or self._expecting_workers()
        return busy or not self.colocated

    def step(self) -> list[RequestDelta]:
        """Notice deaths, move transfers along, keep every worker busy, handle what came back."""
        deltas = self._reap_dead()
        self._respawn_due()
        self.transfers.tick()
        self._assign_backlog()
        for worker in list(self.workers.values()):
            while len(worker.sent) < self.steps_ahead:
                sent, lost = self._dispatch(worker)
                deltas += lost
                if not sent:
                    break
        for worker_id, kind, message in self.link.poll(self._poll_timeout()):
            deltas += self._on_message(worker_id, kind, message)
        return deltas

    def stats(self) -> SchedulerStats:
        per_worker = [w.scheduler.stats() for w in self.workers.values()]
        return SchedulerStats(
            num_running=sum(s.num_running for s in per_worker) + self.transfers.num_between_workers,
            num_waiting=sum(s.num_waiting for s in per_worker) + len(self.backlog),
            kv_cache_usage={w.id: w.pool.usage for w in self.workers.values()},
            prefix_cache_queries=sum(s.prefix_cache_queries for s in per_worker),
            prefix_cache_hits=sum(s.prefix_cache_hits for s in per_worker),
            num_preemptions=self._retired_preemptions + sum(s.num_preemptions for s in per_worker),
            kv_transfer_bytes=self.transfers.bytes,
            kv_transfer_seconds=self.transfers.seconds,
            kv_transfer_failures=self.transfers.failures,
            recomputed_prefills=self.recomputed_prefills,
            structured_output_seconds=self._retired_structured_seconds
            + sum(s.structured_output_seconds for s in per_worker),
            worker_requests=dict(self.worker_requests),
            running_loras=merge_counts(s.running_loras for s in per_worker),
            waiting_loras=merge_counts(
                [*(s.waiting_loras for s in per_worker), lora_counts(self.backlog)]
            ),
            spec_decode=self._spec_decode(per_worker),
        )

    def _spec_decode(self, per_worker: list[SchedulerStats]) -> SpecDecodeCounters | None:
        counters = [s.spec_decode for s in per_worker if s.spec_decode is not None]
        if not counters and not self._retired_spec.num_drafts:
            return None
        total = SpecDecodeCounters()
        for part in [self._retired_spec, *counters]:
            total.add(part)
        return total

    # -- dispatch and results ------------------------------------------------------------

    def _poll_timeout(self) -> int:
        """A result ends the poll at once; the timeout only bounds how soon the core looks
        at anything else (its inbox, deaths, transfers)."""
        if not self.has_unfinished_requests():
            return IDLE_POLL_MS
        # NOTE: a busy mixed worker takes no new request before its result: waking the
        # core sooner would only take CPU from the worker
        if self.colocated and all(w.inflight is not None for w in self.workers.values()):
            return IDLE_POLL_MS
        return POLL_MS

    def _dispatch(self, worker: Worker) -> tuple[bool, list[RequestDelta]]:
        """Plan and send the worker's next step: (whether one was sent, deltas of a death)."""
        out = worker.scheduler.schedule()
        if worker.role == "prefill":
            for req_id in out.sampling_req_ids:  # this step finishes their prompts
                self.transfers.plan(worker.scheduler.requests[req_id], worker)
        plan = worker.next_plan(out)
        if plan is None:
            return False, []
        worker.sent.append(SchedulerOutput(plan, out.sampling_req_ids))
        if not self.link.send_plan(worker.id, plan):
            return False, self._on_death(worker.id)
        return True, []

    def _on_message(self, worker_id: str, kind: int, message: Any) -> list[RequestDelta]:
        if kind == WorkerMsg.READY:
            self.add_worker(message)
        elif kind == WorkerMsg.KV_DONE:
            self.transfers.on_done(message)
        elif kind == WorkerMsg.RESULT:
            return self._on_result(worker_id, message)
        return []

    def _on_result(self, worker_id: str, result: StepResult) -> list[RequestDelta]:
        worker = self.workers.get(worker_id)
        if (
            worker is None
            or worker.inflight is None
            or worker.inflight.plan.step_id != result.step_id
        ):
            return []  # from a worker given up for dead, or a stale step
        out = worker.sent.pop(0)
        deltas = worker.scheduler.update_from_output(out, result)
        if worker.role == "prefill":
            self._hand_over(worker, out.sampling_req_ids)
        return deltas

    def _hand_over(self, worker: Worker, req_ids: Iterable[str]) -> None:
        """Requests that just sampled their first token leave prefill for their transfer."""
        for req_id in req_ids:
            request = worker.scheduler.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                self.transfers.drop(req_id)  # finished at its first token (or aborted)
                continue
            worker.scheduler.detach(request)
            self.transfers.prefilled(request, worker.id)

    # -- placement and recovery ----------------------------------------------------------

    def _assign_backlog(self) -> None:
        entries = [w for w in self.workers.values() if w.role in ENTRY_ROLES]
        if not entries:
            return
        for request in self.backlog:
            self._enqueue(request, min(entries, key=lambda w: w.queued_tokens))
        self.backlog = []

    def _enqueue(self, request: Request, worker: Worker) -> None:
        worker.scheduler.enqueue(request)
        self.worker_requests[worker.id] = self.worker_requests.get(worker.id, 0) + 1

    def _recompute(self, request: Request, worker: Worker | None) -> None:
        """Lost KV: compute the request again from its tokens, on `worker` or via the backlog."""
        self.recomputed_prefills += 1
        request.num_computed_tokens = 0
        request.inflight.clear()  # its steps in flight died with the worker
        if worker is None:
            self.backlog.append(request)
        else:
            self._enqueue(request, worker)

    def _reap_dead(self) -> list[RequestDelta]:
        return [d for w in self.link.dead_workers() for d in self._on_death(w)]

    def _on_death(self, worker_id: str) -> list[RequestDelta]:
        """Recompute a dead worker's requests and replace it; while draining, fail them."""
        worker = self.workers.pop(worker_id, None)
        local = worker_id in self.link.processes
        self.link.forget(worker_id)
        starting = self._starting.pop(worker_id, None)
        if worker is None:
            if starting is not None:  # died while loading: try again, backing off
                logger.error("%s worker %s died before it was ready", starting, worker_id)
                self._replace(starting, uptime=0.0)
            return []
        self.worker_deaths += 1
        orphans = [*worker.scheduler.requests.values(), *self.transfers.worker_died(worker_id)]
        logger.error("%s worker %s died with %d requests", worker.role, worker_id, len(orphans))
        self._retired_preemptions += worker.scheduler.num_preemptions
        if worker.scheduler.speculator is not None:
            self._retired_spec.add(worker.scheduler.speculator.counters)
        self._retired_structured_seconds += worker.scheduler.structured_output_seconds
        if self.respawn is None:
            return [rejected(r.request_id, DRAIN_DEATH, ErrorKind.SERVER) for r in orphans]
        for request in orphans:
            self._recompute(request, None)
        if local:
            self._replace(worker.role, uptime=time.monotonic() - worker.joined_at)
        return []

    def _replace(self, role: str, uptime: float) -> None:
        if self.respawn is None:
            return
        delay = self._backoff[role].next_delay(uptime)
        logger.info("starting a %s worker in %.0f s", role, delay)
        self._respawns.append((time.monotonic() + delay, role))
        self._respawn_due()

    def _respawn_due(self) -> None:
        now = time.monotonic()
        due = [role for at, role in self._respawns if at <= now]
        self._respawns = [(at, role) for at, role in self._respawns if at > now]
        if self.respawn is not None:
            for role in due:
                self._starting[self.respawn(role)] = role

    def _expecting_workers(self) -> bool:
        """A replacement is due, or a local worker is starting (it will say READY)."""
        return bool(self._respawns or self._starting) or any(
            w not in self.workers for w in self.link.processes
        )

    def _owner(self, req_id: str) -> Worker | None:
        return next((w for w in self.workers.values() if req_id in w.scheduler.requests), None)

    def _rejection(self, msg: AddRequest, rules: Scheduler) -> str | None:
        known = self._owner(msg.request_id) or msg.request_id in self.transfers
        if known or any(r.request_id == msg.request_id for r in self.backlog):
            return f"request id {msg.request_id!r} is already in use"
        return rules.rejection(msg)
