"""Which CPU cores each worker kind gets, so prefill and decode stop fighting over them.

Two busy processes on two cores collapse when both run 2-thread OpenMP pools, so each
disaggregated worker kind gets its own cores: prefill the first half of this process's
CPU set, decode the second (on the 2-core dev machines: prefill core 0, decode core 1),
each worker pinned there with one torch thread per core it owns. Several workers of one
kind share that kind's cores. Decode gets the larger half of an odd count because it
paces every stream's inter-token latency. The colocated worker and the engine core (which
mostly sleeps in poll) are not pinned. One core: nobody is pinned.
"""

from __future__ import annotations

import os

from engine_core.messages.config import EngineConfig


def local_roles(config: EngineConfig) -> list[str]:
    """The roles of the workers the core starts on its own machine, one entry each
    (workers joining from elsewhere come on top)."""
    if config.colocated:
        return ["mixed"]
    return ["prefill"] * config.prefill_workers + ["decode"] * config.decode_workers


def cores_for(role: str, cpu_set: set[int] | None = None) -> list[int] | None:
    """The cores a worker of `role` is pinned to (None: leave it unpinned)."""
    cores = sorted(cpu_set if cpu_set is not None else os.sched_getaffinity(0))
    if role == "mixed" or len(cores) < 2:
        return None
    half = len(cores) // 2
    return cores[:half] if role == "prefill" else cores[half:]
