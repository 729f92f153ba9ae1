"""`/dashboard`: a live page of the whole server, and `/dashboard/stats`, the JSON it polls.

The page (frontend/static/) is plain HTML, JS and CSS shipped in the package: no build
step, nothing fetched from elsewhere (its Content-Security-Policy says so to the browser).
It carries no data, so it is open like /health; its data comes from /dashboard/stats,
which is behind --api-key like the API (the page sends the key as a Bearer header; see
static/dashboard.js for how it gets one).

Cost by design: one document is built at most once per INTERVAL per frontend process,
whatever the number of open dashboards, and none while nobody looks. A build reads the
merged Prometheus files once (the same numbers /metrics shows, from every frontend of
the server) and the latest EngineSnapshot the core sent; rates and percentiles come
from the difference between that reading and earlier ones kept for HISTORY seconds.
"""

from __future__ import annotations

import importlib.resources
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web

from frontend.context import CONTEXT, ServerContext
from frontend.metrics import merged_registry

if TYPE_CHECKING:
    from prometheus_client import Metric

INTERVAL = 1.0  # seconds: the freshest a document gets (the page polls this often)
HISTORY = 120.0  # seconds of readings kept for the plots
LATENCY_WINDOW = 60.0  # percentiles over the last minute
RATE_WINDOW = 5.0  # tokens/s and bytes/s over the last few seconds
PLOT_WINDOW = 10.0  # each plotted latency point: percentiles over this trailing window
QUANTILES = (0.5, 0.9, 0.99)
# counters the page reads (names without `duet:` and `_total`)
COUNTERS = ("prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits",
            "kv_transfer_bytes", "kv_transfer_failures", "recomputed_prefills",
            "num_preemptions", "spec_decode_num_draft_tokens",
            "spec_decode_num_accepted_tokens")  # fmt: skip
HISTOGRAMS = {"ttft": "time_to_first_token_seconds", "itl": "inter_token_latency_seconds"}
STATIC = {  # path -> (package file, content type)
    "/dashboard": ("dashboard.html", "text/html"),
    "/dashboard/dashboard.js": ("dashboard.js", "text/javascript"),
    "/dashboard/dashboard.css": ("dashboard.css", "text/css"),
}
PAGE_PATHS = frozenset(STATIC)  # open: the page holds no data
STATS_PATH = "/dashboard/stats"
# the browser may load nothing from anywhere but this server
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'"


@dataclass(frozen=True)
class Reading:
    """The merged metrics at one moment (monotonic `at`)."""

    at: float
    counters: dict[str, float]
    # histogram key -> (upper bounds ending with +Inf, cumulative counts)
    histograms: dict[str, tuple[list[float], list[float]]]


def take_reading(at: float) -> Reading:
    """Read every frontend's metric files once: the numbers /metrics would show now,
    summed over labels."""
    counters: dict[str, float] = {}
    histograms: dict[str, tuple[list[float], list[float]]] = {}
    wanted = {f"duet:{name}": key for key, name in HISTOGRAMS.items()}
    for family in merged_registry().collect():
        name = family.name.removeprefix("duet:")
        if family.type == "counter" and name in COUNTERS:
            counters[name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
        elif family.type == "histogram" and family.name in wanted:
            histograms[wanted[family.name]] = _buckets(family)
    return Reading(at, counters, histograms)


def _buckets(family: Metric) -> tuple[list[float], list[float]]:
    """A histogram's (upper bounds, cumulative counts), summed over its other labels."""
    buckets: dict[float, float] = {}
    for sample in family.samples:
        if sample.name.endswith("_bucket"):
            bound = float(sample.labels["le"])
            buckets[bound] = buckets.get(bound, 0.0) + sample.value
    bounds = sorted(buckets)
    return bounds, [buckets[b] for b in bounds]


def quantile(q: float, bounds: list[float], cumulative: list[float]) -> float | None:
    """Prometheus's histogram_quantile over cumulative bucket counts; None when empty."""
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return None
    rank = q * total
    for i, count in enumerate(cumulative):
        if count >= rank:
            lower = bounds[i - 1] if i else 0.0
            if math.isinf(bounds[i]):
                return lower  # the open top bucket: its lower bound is all we know
            below = cumulative[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - below) / (count - below)
    return None


def _delta(new: Reading, old: Reading, key: str) -> float:
    return new.counters.get(key, 0.0) - old.counters.get(key, 0.0)


def _percentiles(new: Reading, old: Reading, key: str) -> dict[str, float | None] | None:
    if key not in new.histograms:
        return None
    bounds, counts = new.histograms[key]
    before = old.histograms.get(key, (bounds, [0.0] * len(counts)))[1]
    window = [max(0.0, a - b) for a, b in zip(counts, before, strict=True)]
    return {f"p{round(q * 100)}": quantile(q, bounds, window) for q in QUANTILES}


SERIES = ("tokens_in", "tokens_out", "ttft_p50", "ttft_p90", "itl_p50", "itl_p90")


class Readings:
    """Readings of the last HISTORY seconds, newest last, and one plot point per reading
    (computed once, when it is added: a document costs the same however long the plots)."""

    def __init__(self) -> None:
        self._readings: deque[Reading] = deque()
        self._points: deque[tuple[float, tuple[float | None, ...]]] = deque()

    def add(self, reading: Reading) -> None:
        previous = self._readings[-1] if self._readings else None
        self._readings.append(reading)
        if previous is not None:
            self._points.append((reading.at, self._point(previous, reading)))
        horizon = reading.at - HISTORY
        while self._readings and self._readings[0].at < horizon:
            self._readings.popleft()
        while self._points and self._points[0][0] < horizon:
            self._points.popleft()

    @property
    def latest(self) -> Reading:
        return self._readings[-1]

    def before(self, seconds: float, than: Reading | None = None) -> Reading:
        """The oldest reading within `seconds` before `than` (default: the latest)."""
        than = than or self.latest
        return next(r for r in self._readings if r.at >= than.at - seconds)

    def rate_base(self) -> Reading:
        """What rates are measured from: the oldest reading within RATE_WINDOW, or, when
        nobody looked for longer than that, the one before the latest."""
        base = self.before(RATE_WINDOW)
        if base is self.latest and len(self._readings) > 1:
            return self._readings[-2]
        return base

    def series(self) -> dict[str, list[float | None]]:
        """Per reading: tokens/s in and out since the previous one, latency percentiles
        over the trailing PLOT_WINDOW; `t` is seconds before the latest reading."""
        out: dict[str, list] = {"t": [round(at - self.latest.at, 3) for at, _ in self._points]}
        for i, name in enumerate(SERIES):
            out[name] = [values[i] for _, values in self._points]
        return out

    def _point(self, prev: Reading, cur: Reading) -> tuple[float | None, ...]:
        span = max(cur.at - prev.at, 1e-9)
        window = self.before(PLOT_WINDOW, cur)
        ttft = _percentiles(cur, window, "ttft") or {}
        itl = _percentiles(cur, window, "itl") or {}
        return (
            _delta(cur, prev, "prompt_tokens") / span,
            _delta(cur, prev, "generation_tokens") / span,
            ttft.get("p50"), ttft.get("p90"), itl.get("p50"), itl.get("p90"),
        )  # fmt: skip


class DashboardStats:
    """Builds the /dashboard/stats document, at most once per INTERVAL."""

    def __init__(self, ctx: ServerContext, clock: Callable[[], float] = time.monotonic) -> None:
        self.ctx = ctx
        self.clock = clock
        self.readings = Readings()
        self._body = b""
        self._built_at = -math.inf

    def body(self) -> bytes:
        now = self.clock()
        if now - self._built_at >= INTERVAL:
            self.readings.add(take_reading(now))
            self._body = msgspec.json.encode(self.document())
            self._built_at = now
        return self._body

    def document(self) -> dict:
        """Everything the page shows (the latest reading against earlier ones)."""
        r = self.readings
        new, rate_base, minute = r.latest, r.rate_base(), r.before(LATENCY_WINDOW)
        snapshot = self.ctx.client.latest_snapshot
        span = new.at - rate_base.at
        rate = (lambda key: _delta(new, rate_base, key) / span) if span > 0 else (lambda _: None)
        return {
            "time": time.time(),
            "model": self.ctx.model_name,
            "engine_healthy": self.ctx.client.is_healthy,
            "requests": self._requests(new),
            "workers": self._workers(),
            "prefix_cache_hit_rate": _ratio(
                _delta(new, minute, "prefix_cache_hits"),
                _delta(new, minute, "prefix_cache_queries"),
            ),
            "tokens_per_s": {"in": rate("prompt_tokens"), "out": rate("generation_tokens")},
            "totals": {k: new.counters.get(k, 0.0) for k in COUNTERS},
            "ttft": _percentiles(new, minute, "ttft"),
            "itl": _percentiles(new, minute, "itl"),
            "kv_transfers": self._transfers(rate("kv_transfer_bytes")),
            "worker_deaths": snapshot.worker_deaths if snapshot else 0,
            "spec_decode_acceptance": self._spec_decode(new, minute),
            "pool_advice": self._advice(),
            "history": r.series(),
        }

    def _requests(self, new: Reading) -> dict[str, float]:
        stats = self.ctx.client.latest_stats
        return {
            "running": stats.num_running if stats else 0,
            "waiting": stats.num_waiting if stats else 0,
            "swapped": 0,  # duet never swaps KV out: a preempted request is recomputed
            "preemptions": new.counters.get("num_preemptions", 0.0),
        }

    def _workers(self) -> list[dict]:
        snapshot = self.ctx.client.latest_snapshot
        return [msgspec.structs.asdict(w) for w in snapshot.workers] if snapshot else []

    def _transfers(self, bytes_per_s: float | None) -> dict[str, float | None]:
        snapshot = self.ctx.client.latest_snapshot
        in_flight = snapshot.kv_transfers_in_flight if snapshot else 0
        return {"in_flight": in_flight, "bytes_per_s": bytes_per_s}

    def _spec_decode(self, new: Reading, minute: Reading) -> float | None:
        """Accepted / drafted tokens over the last minute; None when spec decode is off."""
        if "spec_decode_num_draft_tokens" not in new.counters:
            return None
        drafted = _delta(new, minute, "spec_decode_num_draft_tokens")
        accepted = _delta(new, minute, "spec_decode_num_accepted_tokens")
        if drafted <= 0:  # on, but idle this minute: the running total
            drafted = new.counters["spec_decode_num_draft_tokens"]
            accepted = new.counters.get("spec_decode_num_accepted_tokens", 0.0)
        return _ratio(accepted, drafted)

    def _advice(self) -> dict[str, float] | None:
        snapshot = self.ctx.client.latest_snapshot
        if snapshot is None or snapshot.pd_recommended_prefill_fraction is None:
            return None
        return {
            "prefill_fraction": snapshot.pd_recommended_prefill_fraction,
            "prefill_demand": snapshot.prefill_demand,
            "decode_demand": snapshot.decode_demand,
        }


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


STATS = web.AppKey("dashboard_stats", DashboardStats)


def add_routes(app: web.Application) -> None:
    """Register the page, its assets and the stats endpoint on `app`."""
    app[STATS] = DashboardStats(app[CONTEXT])
    for path, (name, content_type) in STATIC.items():
        app.router.add_get(path, _static(name, content_type))
    app.router.add_get(STATS_PATH, stats)


def _static(name: str, content_type: str) -> Callable:
    body = importlib.resources.files("frontend").joinpath("static", name).read_bytes()
    headers = {"Content-Type": content_type, "Content-Security-Policy": CSP,
               "Cache-Control": "no-cache"}  # fmt: skip

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    return handler


async def stats(request: web.Request) -> web.Response:
    """GET /dashboard/stats: the whole server's state, as JSON (at most INTERVAL old)."""
    return web.Response(
        body=request.app[STATS].body(),
        headers={"Content-Type": "application/json", "Cache-Control": "no-store"},
    )
