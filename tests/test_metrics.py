"""frontend/metrics.py: several real frontend processes merged by one /metrics.

Each frontend runs in its own spawned process (prometheus_client must see
PROMETHEUS_MULTIPROC_DIR before it is imported, which this test process cannot promise).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from pathlib import Path

import pytest

from engine_core.messages.common import FinishReason
from engine_core.messages.frontend import RequestDelta, SchedulerStats
from frontend.metrics import render_metrics

MODEL = "tiny"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _stats(total: int, running: int) -> SchedulerStats:
    return SchedulerStats(
        num_running=running,
        num_waiting=1,
        kv_cache_usage={"mixed": running / 10},
        prefix_cache_queries=total * 10,
        prefix_cache_hits=total,
        num_preemptions=total,
        kv_transfer_seconds=total / 4,
    )


def _request(
    metrics: object, clock: FakeClock, prompt_len: int, steps: list[tuple[float, RequestDelta]]
) -> None:
    timer = metrics.start_request()  # type: ignore[attr-defined]
    timer.num_prompt_tokens = prompt_len
    start = clock.now
    for t, delta in steps:
        clock.now = start + t
        timer.on_delta(delta)


def frontend_0() -> None:
    """Applies core stats: cumulative totals 5 (baseline), 8, 8, 2 (core restart), 6."""
    from frontend.metrics import EngineMetrics

    clock = FakeClock()
    metrics = EngineMetrics(MODEL, apply_core_stats=True, clock=clock)
    for total in (5, 8, 8, 2, 6):
        metrics.on_stats(_stats(total, running=4))
    _request(
        metrics,
        clock,
        11,
        [
            (0.5, RequestDelta("r0", [7])),
            (0.75, RequestDelta("r0", [8])),
            (1.0, RequestDelta("r0", [9], finish_reason=FinishReason.LENGTH)),
        ],
    )


def frontend_1() -> None:
    """Sees the same core stats (plus a later reading) but must not count them."""
    from frontend.metrics import EngineMetrics

    clock = FakeClock()
    metrics = EngineMetrics(MODEL, apply_core_stats=False, clock=clock)
    for total in (5, 8, 8, 2, 6, 9):
        metrics.on_stats(_stats(total, running=7))
    _request(metrics, clock, 5, [(2.0, RequestDelta("r1", [3], finish_reason=FinishReason.STOP))])
    # a client that went away: counted as an abort, no latency; the core's echo is ignored
    timer = metrics.start_request()
    timer.finish(FinishReason.ABORT)
    timer.on_delta(RequestDelta("r2", [], finish_reason=FinishReason.ABORT))
    # rejected by the core: nothing at all
    metrics.start_request().on_delta(RequestDelta("r3", [], error="prompt too long"))


def in_memory_mode_is_refused() -> None:
    import prometheus_client  # noqa: F401  (imported before the directory is set up)

    from frontend.metrics import EngineMetrics, setup_multiproc_dir

    with pytest.raises(RuntimeError):
        EngineMetrics(MODEL, apply_core_stats=True)
    with pytest.raises(RuntimeError):
        setup_multiproc_dir()


def run_in_child(target: Callable[[], None]) -> None:
    child = multiprocessing.get_context("spawn").Process(target=target)
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0, f"{target.__name__} failed in its process"


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    body, content_type = render_metrics()
    assert content_type.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


@pytest.fixture
def multiproc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    return tmp_path


def test_two_frontends_merge(multiproc_dir: Path) -> None:
    run_in_child(frontend_0)
    run_in_child(frontend_1)  # later: its gauge readings are the most recent
    assert len(list(multiproc_dir.glob("*.db"))) >= 2
    samples = scrape()

    def value(name: str, **labels: str) -> float:
        return samples[(f"duet:{name}", tuple(sorted({"model_name": MODEL, **labels}.items())))]

    # core counters: deltas from frontend 0 only: 8-5, 0, then 2 after the restart, 6-2
    assert value("num_preemptions_total") == 3 + 2 + 4
    assert value("prefix_cache_hits_total") == 9
    assert value("prefix_cache_queries_total") == 90
    assert value("kv_transfer_seconds_total") == pytest.approx(9 / 4)
    assert value("kv_transfer_failures_total") == 0
    # gauges: the latest reading, not a sum over frontends
    assert value("num_requests_running") == 7
    assert value("kv_cache_usage_perc", pool="mixed") == pytest.approx(0.7)
    # per-request metrics: summed over frontends
    assert value("prompt_tokens_total") == 11 + 5
    assert value("generation_tokens_total") == 3 + 1
    assert [
        value("request_success_total", finished_reason=r) for r in ("stop", "length", "abort")
    ] == [1, 1, 1]
    assert (
        value("time_to_first_token_seconds_count"),
        value("time_to_first_token_seconds_sum"),
    ) == (2, pytest.approx(2.5))
    assert value("time_to_first_token_seconds_bucket", le="0.5") == 1
    assert value("time_to_first_token_seconds_bucket", le="2.5") == 2
    assert (
        value("inter_token_latency_seconds_count"),
        value("inter_token_latency_seconds_sum"),
    ) == (2, pytest.approx(0.5))
    assert (
        value("e2e_request_latency_seconds_count"),
        value("e2e_request_latency_seconds_sum"),
    ) == (2, pytest.approx(3.0))
    assert value("request_queue_time_seconds_sum") == pytest.approx(2.5)


def test_in_memory_mode_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    run_in_child(in_memory_mode_is_refused)
