"""From per-request results to a run's numbers: throughput, latency percentiles, goodput."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from frontend.bench.client import RequestResult

GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class Distribution:
    """Summary of one latency, in milliseconds (all zero when there are no samples)."""

    mean: float
    median: float
    p90: float
    p99: float

    @classmethod
    def of(cls, seconds: list[float]) -> Distribution:
        if not seconds:
            return cls(0.0, 0.0, 0.0, 0.0)
        ms = np.asarray(seconds) * 1000.0
        # numpy's default (linear interpolation) percentiles, as vLLM reports them
        p50, p90, p99 = np.percentile(ms, [50, 90, 99]).tolist()
        return cls(float(ms.mean()), p50, p90, p99)


@dataclass(frozen=True)
class BenchMetrics:
    """The numbers a run reports; throughputs are per second of wall time."""

    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    request_goodput: float | None  # None when no --goodput was given
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2el: Distribution


def parse_goodput(items: list[str]) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> {"ttft": 500.0, "tpot": 50.0} (SLOs in ms)."""
    slo: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition(":")
        if name not in GOODPUT_METRICS or not value:
            raise ValueError(
                f"--goodput takes NAME:MS with NAME in {GOODPUT_METRICS}; got {item!r}"
            )
        slo[name] = float(value)
    return slo


def meets_slo(result: RequestResult, slo_ms: dict[str, float]) -> bool:
    """Whether a successful request met every SLO (TPOT of a 1-token output counts as 0)."""
    seconds = {"ttft": result.ttft, "tpot": result.tpot, "e2el": result.latency}
    return all(seconds[name] * 1000.0 <= limit for name, limit in slo_ms.items())


def compute_metrics(
    results: list[RequestResult], duration_s: float, slo_ms: dict[str, float]
) -> BenchMetrics:
    """Summarize a run that took `duration_s` of wall time; failed requests count only
    in `failed`."""
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    good = sum(meets_slo(r, slo_ms) for r in ok) if slo_ms else None
    return BenchMetrics(
        completed=len(ok),
        failed=len(results) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / duration_s,
        output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        request_goodput=None if good is None else good / duration_s,
        ttft=Distribution.of([r.ttft for r in ok]),
        # as in vLLM: single-token outputs have no TPOT to summarize
        tpot=Distribution.of([r.tpot for r in ok if r.output_tokens > 1]),
        itl=Distribution.of([gap for r in ok for gap in r.itl]),
        e2el=Distribution.of([r.latency for r in ok]),
    )
