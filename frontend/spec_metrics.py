"""Speculative decoding's Prometheus counters, under vLLM's names (`vllm:` -> `duet:`).

Fed from the core's cumulative `SchedulerStats.spec_decode` by the frontend that applies
core stats, with the same baseline rule as `frontend.metrics` (the first totals seen are
the baseline; totals that went down mean the core restarted and count from zero).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine_core.messages.speculative import SpecDecodeCounters

if TYPE_CHECKING:
    from prometheus_client import Counter

_COUNTERS = {
    "num_drafts": "Speculative drafts verified (one per request per step).",
    "num_draft_tokens": "Speculative draft tokens verified.",
    "num_accepted_tokens": "Speculative draft tokens accepted.",
}


class SpecDecodeMetrics:
    """duet:spec_decode_num_{drafts,draft_tokens,accepted_tokens} and ..._per_pos."""

    def __init__(self, model_name: str) -> None:
        from prometheus_client import Counter

        self.model_name = model_name
        self.counters = {
            key: Counter(f"duet:spec_decode_{key}", doc, ["model_name"], registry=None).labels(
                model_name
            )
            for key, doc in _COUNTERS.items()
        }
        self.per_pos = Counter(
            "duet:spec_decode_num_accepted_tokens_per_pos",
            "Accepted speculative tokens, by their position in the draft.",
            ["model_name", "position"],
            registry=None,
        )
        self._last: list[int] | None = None

    def on_totals(self, totals: SpecDecodeCounters | None) -> None:
        """Count the increments since the previous totals (None: the core doesn't speculate)."""
        if totals is None:
            return
        flat = [
            totals.num_drafts,
            totals.num_draft_tokens,
            totals.num_accepted_tokens,
            *totals.accepted_per_pos,
        ]
        last, self._last = self._last, flat
        if last is None:
            return
        last = last + [0] * (len(flat) - len(last))
        for index, (now, before) in enumerate(zip(flat, last, strict=False)):
            delta = now - before if now >= before else now
            if delta > 0:
                self._child(index).inc(delta)

    def _child(self, index: int) -> Counter:
        keys = list(self.counters)
        if index < len(keys):
            return self.counters[keys[index]]
        return self.per_pos.labels(self.model_name, str(index - len(keys)))
