"""The core's periodic EngineSnapshot: per-worker state and pool balance advice.

Built a few times a second by the busy loop (not every step) and sent to every frontend
as a STATS message, so dashboards and the advice gauge cost the core a fixed, small
amount whatever the request rate. Each snapshot is also one sample of pool demand.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from engine_core.messages.frontend import EngineSnapshot, WorkerSnapshot
from engine_core.pool import PoolEngine
from engine_core.pool_advice import PoolAdvisor, PoolLoad
from engine_core.pool_workers import Worker

SNAPSHOT_INTERVAL = 0.5  # seconds between snapshots (dashboards poll every second)


def pool_load(engine: PoolEngine) -> PoolLoad | None:
    """Both pools' load right now; None when colocated or before any worker joined."""
    prefill = [w for w in engine.workers.values() if w.role == "prefill"]
    decode = [w for w in engine.workers.values() if w.role == "decode"]
    if engine.colocated or not engine.workers:
        return None
    config = next(iter(engine.workers.values())).scheduler.config
    backlog = sum(r.num_tokens - r.num_computed_tokens for r in engine.backlog)
    seqs = sum(len(w.scheduler.running) + len(w.scheduler.waiting) for w in decode)
    return PoolLoad(
        prefill_queued_tokens=backlog + sum(w.queued_tokens for w in prefill),
        prefill_token_budget=config.max_num_batched_tokens,
        decode_seqs=seqs + engine.transfers.num_between_workers,
        decode_seq_cap=config.max_num_seqs,
        decode_kv_usage=sum(w.pool.usage for w in decode),
        prefill_workers=len(prefill),
        decode_workers=len(decode),
    )


class Snapshots:
    """Takes an EngineSnapshot of `engine` when one is due, sampling the advisor with it."""

    def __init__(
        self,
        engine: PoolEngine,
        interval: float = SNAPSHOT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.interval = interval
        self.clock = clock
        self.advisor = PoolAdvisor()
        self._last = -interval

    def due(self) -> bool:
        return self.clock() - self._last >= self.interval

    def take(self) -> EngineSnapshot:
        now = self.clock()
        self._last = now
        load = pool_load(self.engine)
        if load is not None:
            self.advisor.observe(now, load)
        mean = self.advisor.mean_demand()
        return EngineSnapshot(
            timestamp=time.time(),
            workers=[_worker(w) for w in self.engine.workers.values()],
            kv_transfers_in_flight=self.engine.transfers.num_in_flight,
            worker_deaths=self.engine.worker_deaths,
            prefill_demand=mean.prefill,
            decode_demand=mean.decode,
            pd_recommended_prefill_fraction=None
            if load is None
            else self.advisor.recommended_prefill_fraction(),
        )


def _worker(worker: Worker) -> WorkerSnapshot:
    scheduler = worker.scheduler
    return WorkerSnapshot(
        worker.id,
        worker.role,
        worker.pool.usage,
        len(scheduler.running),
        len(scheduler.waiting),
        worker.ready.num_blocks,
    )
