"""The run's summary as a table on stdout and as a JSON file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from frontend.bench.client import RequestResult
from frontend.bench.stats import BenchMetrics, Distribution

_LATENCIES = (
    ("ttft", "Time to first token"),
    ("tpot", "Time per output token (excl. 1st)"),
    ("itl", "Inter-token latency"),
    ("e2el", "End-to-end latency"),
)


def format_report(m: BenchMetrics, results: list[RequestResult]) -> str:
    """vLLM-style summary table."""
    rows = [
        ("Successful requests", m.completed),
        ("Failed requests", m.failed),
        ("Benchmark duration (s)", f"{m.duration_s:.2f}"),
        ("Total input tokens", m.total_input_tokens),
        ("Total generated tokens", m.total_output_tokens),
        ("Request throughput (req/s)", f"{m.request_throughput:.2f}"),
    ]
    if m.request_goodput is not None:
        rows.append(("Request goodput (req/s)", f"{m.request_goodput:.2f}"))
    rows += [
        ("Output token throughput (tok/s)", f"{m.output_throughput:.2f}"),
        ("Total token throughput (tok/s)", f"{m.total_token_throughput:.2f}"),
    ]
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
    lines += [f"{name:<40}{value:>10}" for name, value in rows]
    for key, title in _LATENCIES:
        dist: Distribution = getattr(m, key)
        lines.append("{s:{c}^50}".format(s=f" {title} ", c="-"))
        for stat in ("mean", "median", "p90", "p99"):
            lines.append(
                f"{stat.capitalize() + ' ' + key.upper() + ' (ms)':<40}{getattr(dist, stat):>10.2f}"
            )
    lines.append("=" * 50)
    if any(r.success and not r.usage_reported for r in results):
        lines.append("WARNING: the server sent no usage; output tokens counted as chunks")
    errors = [r.error for r in results if not r.success]
    lines += [f"error: {e}" for e in errors[:5]]
    return "\n".join(lines)


def save_result(
    path: Path, m: BenchMetrics, results: list[RequestResult], config: dict[str, Any]
) -> None:
    """Write the summary, the run's settings and every request's timings as JSON."""
    ok = [r for r in results if r.success]
    doc = {
        "config": config,
        **dataclasses.asdict(m),
        "input_lens": [r.prompt_tokens for r in ok],
        "output_lens": [r.output_tokens for r in ok],
        "ttfts": [r.ttft for r in ok],
        "itls": [r.itl for r in ok],
        "e2els": [r.latency for r in ok],
        "errors": [r.error for r in results if not r.success],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))
