"""The scheduler's LoRA rules: at most `max_loras` distinct adapters run in one step."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from engine_core.request import Request


class LoRACap:
    """Admission check for one step: a request may start if its adapter is already
    running, or if fewer than `max_loras` adapters are."""

    def __init__(self, max_loras: int | None, running: Iterable[Request]) -> None:
        self.max_loras = max_loras
        self.active = {r.lora.key for r in running if r.lora is not None}

    def admits(self, request: Request) -> bool:
        """True if `request` fits; then its adapter counts as active for this step."""
        if request.lora is None or self.max_loras is None:
            return True
        key = request.lora.key
        if key not in self.active and len(self.active) >= self.max_loras:
            return False
        self.active.add(key)
        return True


def lora_counts(requests: Iterable[Request]) -> dict[str, int]:
    """Adapter name -> how many of `requests` use it."""
    return dict(Counter(r.lora.name for r in requests if r.lora is not None))


def merge_counts(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Sum per-adapter counts (e.g. over the workers of a pool)."""
    total: Counter[str] = Counter()
    for one in counts:
        total.update(one)
    return dict(total)
