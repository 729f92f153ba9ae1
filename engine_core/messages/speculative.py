"""Speculative decoding's shared nouns: vLLM's `--speculative-config` and its counters.

A leaf like the rest of messages/: the CLI, the offline LLM, the core and the frontend's
metrics all import these, and nothing here imports anything of ours.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

_METHODS = ("ngram", "[ngram]")  # vLLM accepts both spellings (the second via "model")


class SpeculativeConfig(msgspec.Struct, kw_only=True, frozen=True):
    """n-gram (prompt lookup) speculation, with vLLM's field names and defaults."""

    method: str = "ngram"
    num_speculative_tokens: int
    prompt_lookup_max: int
    prompt_lookup_min: int


def parse_speculative_config(value: object) -> SpeculativeConfig | None:
    """vLLM's `--speculative-config` (a JSON object, as text or as a dict) -> the config.

    Raises ValueError, naming the bad field, on anything vLLM would refuse and on methods
    other than n-gram (duet has no draft models). None and "" mean no speculation.
    """
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"speculative config is not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise ValueError("speculative config must be a JSON object")
    return _from_fields(dict(value))


def _from_fields(fields: dict[str, Any]) -> SpeculativeConfig:
    known = {"method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"speculative config has unknown fields: {', '.join(unknown)}")
    method = fields.get("method") or fields.get("model")
    if method not in _METHODS:
        raise ValueError(f"speculative method {method!r} is not supported; use 'ngram'")
    k = _integer(fields, "num_speculative_tokens")
    if k is None or k < 1:
        raise ValueError("num_speculative_tokens must be an integer of at least 1")
    # vLLM's defaults: neither bound given -> 5 and 5; one given -> both equal to it
    lo, hi = _integer(fields, "prompt_lookup_min"), _integer(fields, "prompt_lookup_max")
    if lo is None and hi is None:
        lo = hi = 5
    lo = hi if lo is None else lo
    hi = lo if hi is None else hi
    if lo < 1 or hi < 1:
        raise ValueError("prompt_lookup_min and prompt_lookup_max must be at least 1")
    if lo > hi:
        raise ValueError(f"prompt_lookup_min={lo} must be <= prompt_lookup_max={hi}")
    return SpeculativeConfig(
        method="ngram", num_speculative_tokens=k, prompt_lookup_max=hi, prompt_lookup_min=lo
    )


def _integer(fields: dict[str, Any], name: str) -> int | None:
    value = fields.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


class SpecDecodeCounters(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Cumulative speculation counts, as vLLM's `spec_decode_*` metrics count them.

    A draft is one request's proposal in one step; `accepted_per_pos[i]` counts drafts
    whose token at position i was accepted.
    """

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = []

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        """Count one verified draft of `num_draft_tokens` of which the first `num_accepted` held."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        self._grow(num_draft_tokens)
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1

    def add(self, other: SpecDecodeCounters) -> None:
        """Fold another worker's counts into these."""
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        self._grow(len(other.accepted_per_pos))
        for pos, count in enumerate(other.accepted_per_pos):
            self.accepted_per_pos[pos] += count

    def _grow(self, length: int) -> None:
        if len(self.accepted_per_pos) < length:
            self.accepted_per_pos = self.accepted_per_pos + [0] * (
                length - len(self.accepted_per_pos)
            )
