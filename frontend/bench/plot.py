"""`--plot FILE.png`: latency CDFs and output tokens/s over the run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from frontend.bench.client import RequestResult


def tokens_per_second(results: list[RequestResult]) -> np.ndarray:
    """Output tokens received in each whole second since the first request was sent.

    A chunk counts as output_tokens / chunks of its request, so chunks that carry
    several tokens still add up to the server's count.
    """
    ok = [r for r in results if r.success]
    if not ok:
        return np.zeros(0)
    t0 = min(r.start for r in ok)
    times = np.concatenate([np.asarray(r.token_times) - t0 for r in ok])
    weights = np.concatenate(
        [np.full(len(r.token_times), r.output_tokens / len(r.token_times)) for r in ok]
    )
    return np.bincount(times.astype(int), weights=weights)


def plot_results(results: list[RequestResult], path: Path, title: str = "") -> None:
    """Save a two-panel figure to `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display here; must precede importing pyplot
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.success]
    series = {
        "TTFT": [r.ttft for r in ok],
        "TPOT": [r.tpot for r in ok if r.output_tokens > 1],
        "ITL": [g for r in ok for g in r.itl],
        "E2EL": [r.latency for r in ok],
    }
    fig, (cdf, rate) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, seconds in series.items():
        if seconds:
            ms = np.sort(np.asarray(seconds) * 1000.0)
            cdf.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post", label=name)
    cdf.set(xscale="log", xlabel="latency (ms)", ylabel="fraction of samples", title="Latency CDFs")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend()
    per_s = tokens_per_second(results)
    rate.bar(np.arange(len(per_s)), per_s, width=1.0, align="edge")
    rate.set(xlabel="seconds since start", ylabel="output tokens/s", title="Output throughput")
    rate.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
