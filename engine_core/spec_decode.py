"""n-gram speculative decoding, the core's half: propose drafts, count what was accepted.

Drafting happens here, in the scheduler, rather than in the worker as vLLM does: the core
already holds every request's tokens and must allocate KV slots for the drafts anyway, so
proposing where they are scheduled needs no extra round of draft ids through the result,
and the worker stays stateless about speculation. It also keeps P/D simple: only the
schedulers of mixed and decode workers get a proposer, and a request that moves between
workers (a transfer, a recompute) carries nothing speculative with it. A proposal costs a
few vectorised comparisons over the request's tokens, small next to a forward pass.

Verification is the worker's (models/rejection_sampler.py); the scheduler applies the
result: KV of rejected drafts is rolled back and their blocks freed
(`KVCacheManager.trim`), and stops inside accepted drafts cut the output there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from engine_core.messages.speculative import SpecDecodeCounters, SpeculativeConfig
from engine_core.request import Request


def propose_ngram(tokens: Sequence[int], min_n: int, max_n: int, k: int) -> list[int]:
    """vLLM's NgramProposer: up to k tokens that followed the longest suffix n-gram.

    The longest n in [min_n, max_n] whose last-n tokens occur earlier in `tokens` wins;
    among its occurrences the earliest one (overlaps with the suffix allowed). Returns
    the (at most k) tokens after that occurrence, [] when no n-gram matches.
    """
    total = len(tokens)
    if k <= 0 or total <= min_n:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, total - 1), min_n - 1, -1):
        # windows starting at 0 .. total-n-1: every earlier occurrence of the suffix
        windows = sliding_window_view(arr[:-1], n)  # [total - n, n]
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[0]) + n
            return arr[start : start + k].tolist()
    return []


class NgramSpeculator:
    """One scheduler's proposer and counters."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.counters = SpecDecodeCounters()

    def propose(self, request: Request, max_drafts: int) -> list[int]:
        """Draft tokens for a decoding request: at most `max_drafts`, and never more than
        could be kept (past max_tokens or the last position of max_model_len). Requests
        under a grammar get none: their drafts would need masks of their own."""
        if request.sampling_params.structured is not None:
            return []
        k = min(self.config.num_speculative_tokens, max_drafts)
        # NOTE: the step verifies positions num_tokens - 1 .. num_tokens - 1 + k
        k = min(k, self.max_model_len - request.num_tokens)
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:  # the step emits up to k + 1 tokens
            k = min(k, max_tokens - request.num_output_tokens - 1)
        return propose_ngram(
            request.all_token_ids, self.config.prompt_lookup_min, self.config.prompt_lookup_max, k
        )

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.counters.record(num_drafts, num_accepted)
