"""Pool balance advice: which share of the workers should prefill, measured from the queues.

Disaggregated, capacity is split between a prefill pool and a decode pool, and the right
split moves with the traffic (long prompts want prefill workers, long answers want decode
workers). Each sample measures both pools' demand in *worker-equivalents*, each against
its own per-step capacity:

- prefill demand = prompt tokens not yet computed (held by prefill workers, or waiting
  for one) / `max_num_batched_tokens`: full prefill steps of work queued. The chunk a
  worker is computing right now still counts, so a busy worker shows up even with an
  empty queue.
- decode demand = max(sequences on decode workers or on their way there / `max_num_seqs`,
  the decode pools' KV usage summed): full decode batches, by slots or by memory,
  whichever binds first.

The recommended prefill fraction is mean prefill demand / (mean prefill + mean decode
demand) over a sliding window of samples (a burst does not flip the advice); with no
demand at all it is the current split, so an idle server advises no change. An autoscaler
sets the prefill pool to fraction x total workers (docs/autoscaling.md).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

WINDOW_SECONDS = 30.0  # how long a sample counts towards the advice


@dataclass(frozen=True)
class PoolLoad:
    """One instant's load on both pools, as the core sees it."""

    prefill_queued_tokens: int  # prompt tokens still to compute, queued or in a step
    prefill_token_budget: int  # one prefill step's token budget (max_num_batched_tokens)
    decode_seqs: int  # running or waiting on decode workers, or in transfer to one
    decode_seq_cap: int  # one decode worker's batch (max_num_seqs)
    decode_kv_usage: float  # the decode workers' KV usage fractions, summed
    prefill_workers: int
    decode_workers: int


@dataclass(frozen=True)
class PoolDemand:
    """Demand on each pool, in worker-equivalents (1.0 = one worker kept fully busy)."""

    prefill: float
    decode: float


def demand(load: PoolLoad) -> PoolDemand:
    """One sample's demand on both pools (see the module docstring)."""
    prefill = load.prefill_queued_tokens / max(1, load.prefill_token_budget)
    decode = max(load.decode_seqs / max(1, load.decode_seq_cap), load.decode_kv_usage)
    return PoolDemand(prefill, decode)


class PoolAdvisor:
    """Samples of pool demand over the last `window` seconds, and the split they advise."""

    def __init__(self, window: float = WINDOW_SECONDS) -> None:
        self.window = window
        self._samples: deque[tuple[float, PoolDemand]] = deque()
        self._workers = (0, 0)  # (prefill, decode) at the latest sample

    def observe(self, now: float, load: PoolLoad) -> None:
        """Add the load at monotonic time `now`; samples older than the window drop out."""
        self._samples.append((now, demand(load)))
        self._workers = (load.prefill_workers, load.decode_workers)
        while self._samples and self._samples[0][0] <= now - self.window:
            self._samples.popleft()

    def mean_demand(self) -> PoolDemand:
        """Mean demand over the window (zeros before any sample)."""
        count = len(self._samples)
        if not count:
            return PoolDemand(0.0, 0.0)
        prefill = sum(d.prefill for _, d in self._samples) / count
        decode = sum(d.decode for _, d in self._samples) / count
        return PoolDemand(prefill, decode)

    def recommended_prefill_fraction(self) -> float | None:
        """The share of workers that should prefill; None with no workers and no demand."""
        mean = self.mean_demand()
        total = mean.prefill + mean.decode
        if total > 0:
            return mean.prefill / total
        prefill, decode = self._workers
        return prefill / (prefill + decode) if prefill + decode else None
