"""The core's view of one worker: its scheduler and pool, plan in flight, KV orders."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from engine_core.kv_cache_manager import KVCacheManager
from engine_core.messages.worker import KVRecvOrder, KVSendOrder, StepPlan, WorkerReady
from engine_core.scheduler import Scheduler, SchedulerOutput


@dataclass
class Worker:
    """A mixed, prefill or decode worker. Its scheduler plans only its own steps, over its
    own pool."""

    ready: WorkerReady
    scheduler: Scheduler
    joined_at: float = 0.0  # monotonic time of its READY: a quick death backs its restart off
    sent: list[SchedulerOutput] = field(default_factory=list)  # plans in flight, oldest first
    # KV orders waiting for this worker's next plan
    cancels: list[str] = field(default_factory=list)
    recvs: list[KVRecvOrder] = field(default_factory=list)
    sends: list[KVSendOrder] = field(default_factory=list)

    @property
    def inflight(self) -> SchedulerOutput | None:
        """The oldest plan in flight: the next result is its."""
        return self.sent[0] if self.sent else None

    @property
    def id(self) -> str:
        return self.ready.worker_id

    @property
    def role(self) -> str:
        return self.ready.role

    @property
    def pool(self) -> KVCacheManager:
        return self.scheduler.pools["mixed"]

    @property
    def free_blocks(self) -> int:
        return self.pool.pool.num_free_blocks

    @property
    def queued_tokens(self) -> int:
        """Tokens this worker still has to compute for the requests it holds."""
        return sum(r.num_tokens - r.num_computed_tokens for r in self.scheduler.requests.values())

    def next_plan(self, out: SchedulerOutput) -> StepPlan | None:
        """The scheduled step plus pending KV orders; None when there is nothing to send."""
        if not (out.num_scheduled_tokens or self.cancels or self.recvs or self.sends):
            return None
        plan = msgspec.structs.replace(
            out.plan, kv_cancels=self.cancels, kv_recvs=self.recvs, kv_sends=self.sends
        )
        self.cancels, self.recvs, self.sends = [], [], []
        return plan
