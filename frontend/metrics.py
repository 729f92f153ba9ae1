"""Prometheus metrics for duet's frontends, in prometheus-client's multiprocess mode.

Every frontend process writes its samples to files in PROMETHEUS_MULTIPROC_DIR; GET /metrics
on any of them merges all the files, so a scrape sees the whole server whichever process
answers. Names mirror vLLM's (`vllm:` becomes `duet:`), each labelled `model_name`.

Two sources feed the metrics:
- Per-request timings and token counts, measured by the frontend that owns the request
  (`EngineMetrics.start_request` -> `RequestTimer`). Each frontend records only its own
  requests, and the merge sums them.
- `SchedulerStats` from the engine core, which every frontend receives. Gauges use
  multiprocess_mode="mostrecent", so N frontends holding the same reading show it once.
  The core's counters arrive as cumulative totals; only the frontend built with
  `apply_core_stats=True` (frontend 0) turns them into increments, or N frontends would
  count the same work N times. It takes the first totals it sees as a baseline, so a
  restarted frontend 0 does not count again what its predecessor already counted (the
  cost: work between the core's start and frontend 0's first stats is not counted).

Per-token updates are held in memory and written once per engine step (`EngineMetrics.flush`,
called with each step's stats, when a request finishes and before a scrape): every write to
a multiprocess file takes a lock and packs into an mmap, which per token was 17 % of a
saturated frontend's CPU. A scrape therefore lags a running request by at most one step.

NOTE: prometheus_client picks in-memory or file-backed values when it is first imported,
so this module imports it only inside functions: importing `frontend.metrics` before the
launcher has called `setup_multiproc_dir()` is safe.
"""

from __future__ import annotations

import atexit
import bisect
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from engine_core.messages.common import FinishReason
from engine_core.messages.frontend import EngineSnapshot, RequestDelta, SchedulerStats
from frontend.spec_metrics import SpecDecodeMetrics

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Histogram

logger = logging.getLogger(__name__)

_ENV = "PROMETHEUS_MULTIPROC_DIR"

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards and SLO rules carry over.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
               5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip

# counter name (without `duet:` and `_total`) -> cumulative SchedulerStats field, help text
_CORE_COUNTERS = {
    "prefix_cache_queries": ("prefix_cache_queries", "Prefix cache queries, in queried tokens."),
    "prefix_cache_hits": ("prefix_cache_hits", "Prefix cache hits, in cached tokens."),
    "num_preemptions": ("num_preemptions", "Cumulative number of preemptions."),
    "kv_transfer_bytes": ("kv_transfer_bytes", "Bytes of KV blocks moved prefill -> decode."),
    # NOTE: SchedulerStats carries only the cumulative time, not per-transfer durations,
    # so this is a counter of seconds (rate() of it is the fraction of time spent moving).
    "kv_transfer_seconds": ("kv_transfer_seconds", "Seconds spent transferring KV blocks."),
    "kv_transfer_failures": ("kv_transfer_failures", "KV transfers that failed."),
    "recomputed_prefills": ("recomputed_prefills", "Prefills recomputed after a lost transfer."),
    # per-step overhead of structured outputs: rate() of it over rate() of steps
    "structured_output_mask_seconds": (
        "structured_output_seconds",
        "Seconds workers spent building and applying grammar token masks.",
    ),
}


def setup_multiproc_dir() -> str:
    """Point PROMETHEUS_MULTIPROC_DIR at a fresh directory; return its path.

    The launcher calls this once, before any process imports prometheus_client and before
    it starts the frontends (they inherit the variable). A directory the operator set
    already is kept as is; it must be emptied between runs, as prometheus-client requires.
    """
    if _ENV in os.environ:
        logger.warning(
            "using %s=%s as set; empty it between runs or metrics carry over",
            _ENV,
            os.environ[_ENV],
        )
        return os.environ[_ENV]
    if "prometheus_client.values" in sys.modules:
        raise RuntimeError(
            "prometheus_client was imported before setup_multiproc_dir(): "
            "this process would keep its metrics in memory, unseen by /metrics"
        )
    path = tempfile.mkdtemp(prefix="duet-prometheus-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ[_ENV] = path
    return path


def render_metrics() -> tuple[bytes, str]:
    """Every frontend's metrics merged, as (body, content type) for GET /metrics."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(merged_registry()), CONTENT_TYPE_LATEST


def merged_registry() -> CollectorRegistry:
    """A registry collecting every frontend's metric files (read anew on each collect)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


class BatchedCounter:
    """A counter child whose increments add up in memory until `flush()` writes them once."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._pending = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self._pending += amount

    def flush(self) -> None:
        if self._pending:
            self._counter.inc(self._pending)
            self._pending = 0.0


class BatchedHistogram:
    """A histogram child whose observations add up in memory until `flush()` writes them.

    NOTE: prometheus_client has no batch observe (each observe() is two locked file writes:
    the sum and one bucket), so the flush writes the pending sum and bucket counts through
    the histogram's own value children: a scrape sees what the observe() calls would give.
    """

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._bounds: list[float] = list(histogram._upper_bounds)  # ends with +Inf
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._pending = False

    def observe(self, amount: float) -> None:
        # the first bucket whose upper bound is >= amount, as Histogram.observe picks it
        self._counts[bisect.bisect_left(self._bounds, amount)] += 1
        self._sum += amount
        self._pending = True

    def flush(self) -> None:
        if not self._pending:
            return
        self._histogram._sum.inc(self._sum)
        for bucket, count in zip(self._histogram._buckets, self._counts, strict=True):
            if count:
                bucket.inc(count)
        self._counts = [0] * len(self._bounds)
        self._sum, self._pending = 0.0, False


class EngineMetrics:
    """This frontend process's metrics for one served model.

    Build exactly one per process: two instances with the same model name would write the
    same file entries and lose each other's updates.
    """

    def __init__(
        self,
        model_name: str,
        apply_core_stats: bool,
        clock: Callable[[], float] = time.monotonic,
        max_lora: int | None = None,
    ) -> None:
        from prometheus_client import Counter, Gauge, Histogram, values

        if values.ValueClass is values.MutexValue:
            raise RuntimeError(
                "prometheus_client is not in multiprocess mode: call "
                "setup_multiproc_dir() in the launcher before importing it"
            )
        self.model_name = model_name
        self.apply_core_stats = apply_core_stats
        self.clock = clock
        name, labels = [model_name], ["model_name"]

        def gauge(key: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            # registry=None: /metrics reads the files, and a process-wide registry would
            # reject a second EngineMetrics (tests build several, one per model name).
            return Gauge(
                f"duet:{key}", doc, [*labels, *extra], registry=None, multiprocess_mode="mostrecent"
            )

        def counter(key: str, doc: str) -> Counter:
            return Counter(f"duet:{key}", doc, labels, registry=None).labels(*name)

        def histogram(key: str, doc: str, buckets: tuple[float, ...]) -> BatchedHistogram:
            family = Histogram(f"duet:{key}", doc, labels, registry=None, buckets=buckets)
            return BatchedHistogram(family.labels(*name))

        self.running = gauge("num_requests_running", "Requests in the running batch.").labels(*name)
        self.waiting = gauge("num_requests_waiting", "Requests waiting to run.").labels(*name)
        self.kv_usage = gauge("kv_cache_usage_perc", "KV cache usage; 1 means full.", ("pool",))
        self.workers = gauge("num_workers", "Workers serving, by role.", ("role",))
        self.transfers_in_flight = gauge(
            "kv_transfers_in_flight", "KV hand-offs routed and not yet confirmed."
        ).labels(*name)
        # the share of workers the core would give prefill (engine_core/pool_advice.py)
        self.pd_fraction = gauge(
            "pd_recommended_prefill_fraction", "Advised prefill share of the workers."
        ).labels(*name)
        self.pd_demand = gauge(
            "pd_pool_demand", "Pool demand in worker-equivalents, windowed.", ("role",)
        )
        self.core_counters = {key: counter(key, doc) for key, (_, doc) in _CORE_COUNTERS.items()}
        self.prompt_tokens = BatchedCounter(counter("prompt_tokens", "Prompt tokens prefilled."))
        self.generation_tokens = BatchedCounter(counter("generation_tokens", "Tokens generated."))
        success = Counter(
            "duet:request_success",
            "Requests finished, by reason.",
            [*labels, "finished_reason"],
            registry=None,
        )
        self.success = {r: success.labels(model_name, r.api_name) for r in FinishReason}
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between outputs.", ITL_BUCKETS)
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Arrival to finish.", REQUEST_LATENCY_BUCKETS
        )
        self.queue_time = histogram(
            "request_queue_time_seconds",
            "Arrival to first output from the core.",
            REQUEST_LATENCY_BUCKETS,
        )
        self._batched = (
            self.prompt_tokens, self.generation_tokens,
            self.ttft, self.itl, self.e2e, self.queue_time,
        )  # fmt: skip
        self._last_totals: dict[str, float] | None = None
        self.lora_info = None if max_lora is None else LoRAInfo(max_lora)
        self.spec_decode = SpecDecodeMetrics(model_name)

    def flush(self) -> None:
        """Write the per-request updates held since the last flush to this process's files."""
        for batched in self._batched:
            batched.flush()

    def on_stats(self, stats: SchedulerStats) -> None:
        """Apply one SchedulerStats from the core (every frontend calls this, once a step)."""
        self.flush()
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        for pool, usage in stats.kv_cache_usage.items():
            self.kv_usage.labels(self.model_name, pool).set(usage)
        if self.apply_core_stats:
            self._count_core_totals(stats)
            self.spec_decode.on_totals(stats.spec_decode)
        if self.lora_info is not None:
            self.lora_info.update(stats)

    def on_snapshot(self, snapshot: EngineSnapshot) -> None:
        """Apply one EngineSnapshot from the core (a few times a second)."""
        for role in ("mixed", "prefill", "decode"):
            count = sum(1 for w in snapshot.workers if w.role == role)
            self.workers.labels(self.model_name, role).set(count)
        self.transfers_in_flight.set(snapshot.kv_transfers_in_flight)
        if snapshot.pd_recommended_prefill_fraction is not None:
            self.pd_fraction.set(snapshot.pd_recommended_prefill_fraction)
            self.pd_demand.labels(self.model_name, "prefill").set(snapshot.prefill_demand)
            self.pd_demand.labels(self.model_name, "decode").set(snapshot.decode_demand)

    def _count_core_totals(self, stats: SchedulerStats) -> None:
        totals = {key: float(getattr(stats, field)) for key, (field, _) in _CORE_COUNTERS.items()}
        last, self._last_totals = self._last_totals, totals
        if last is None:
            return  # the baseline (see the module docstring)
        for key, total in totals.items():
            # a total that went down means the core restarted and counts from zero again
            delta = total - last[key] if total >= last[key] else total
            if delta > 0:
                self.core_counters[key].inc(delta)

    def start_request(self) -> RequestTimer:
        """Start timing a request now: call when it arrives, before tokenizing it."""
        return RequestTimer(self)


class RequestTimer:
    """One request's timeline as its frontend sees it; feeds the per-request metrics.

    Set `num_prompt_tokens` once the prompt is tokenized; it is counted into
    `duet:prompt_tokens_total` when the first token arrives (the prefill is done then).
    Queue time is arrival -> the first output the core sends for the request: the wire
    has no "scheduled" event, so this is an upper bound (it includes the first step).
    """

    def __init__(self, metrics: EngineMetrics) -> None:
        self._metrics = metrics
        self.num_prompt_tokens = 0
        self._arrival = metrics.clock()
        self._seen_output = False
        self._last_token: float | None = None
        self._done = False

    def on_delta(self, delta: RequestDelta) -> None:
        """Record one RequestDelta for this request (tokens, and the finish if it carries one)."""
        if self._done:
            return
        if delta.error is not None:
            self._done = True  # rejected, never ran: no latency to report
            return
        now, m = self._metrics.clock(), self._metrics
        if not self._seen_output:
            self._seen_output = True
            m.queue_time.observe(now - self._arrival)
        if delta.new_token_ids:
            if self._last_token is None:
                m.ttft.observe(now - self._arrival)
                m.prompt_tokens.inc(self.num_prompt_tokens)
            else:
                m.itl.observe(now - self._last_token)
            self._last_token = now
            m.generation_tokens.inc(len(delta.new_token_ids))
        if delta.finish_reason is not None:
            self.finish(delta.finish_reason)

    def finish(self, reason: FinishReason) -> None:
        """Count the request as finished; later calls and deltas are ignored.

        A delta with a finish reason calls it; the frontend calls it for the requests it
        ends itself (a stop string it matched, a client that went away).
        """
        if self._done:
            return
        self._done = True
        self._metrics.success[reason].inc()
        if reason != FinishReason.ABORT:
            self._metrics.e2e.observe(self._metrics.clock() - self._arrival)
        # a finished response's tokens must be in the files before a client can scrape
        self._metrics.flush()


class LoRAInfo:
    """vLLM's `lora_requests_info`: a gauge whose labels name the adapters with running and
    waiting requests and whose value is when that was last seen (so the newest labels win).
    """

    REFRESH_SECONDS = 1.0  # an unchanged reading is rewritten at most this often

    def __init__(self, max_lora: int) -> None:
        from prometheus_client import Gauge

        self.max_lora = str(max_lora)
        self.gauge = Gauge(
            "duet:lora_requests_info",
            "Running stats on LoRA requests.",
            ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            registry=None,
            multiprocess_mode="mostrecent",
        )
        self._last: tuple[tuple[str, str], float] | None = None

    def update(self, stats: SchedulerStats) -> None:
        labels = (",".join(sorted(stats.waiting_loras)), ",".join(sorted(stats.running_loras)))
        now = time.time()
        last = self._last
        if last is not None and last[0] == labels and now - last[1] < self.REFRESH_SECONDS:
            return
        self._last = (labels, now)
        self.gauge.labels(self.max_lora, *labels).set(now)
