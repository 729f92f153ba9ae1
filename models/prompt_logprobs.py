"""Prompt logprobs: how likely each prompt token was, given the tokens before it.

The hidden state at position p scores the token at p + 1, so a prefill chunk covering
positions [start, end) scores tokens start + 1 .. end. The last chunk position's target is
the next chunk's first token, which the worker already holds (it has the whole prompt),
so chunk boundaries need nothing special; only the prompt's last position is left out, as
it predicts the first output token, which the sampler handles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch

from engine_core.messages.common import TokenLogprobs
from models.sampler import SamplingState, _gather_logprobs

# Rows per LM-head call: bounds the [rows, vocab] fp32 logits a long prompt needs at once
# (256 x 49k x 4 B = 50 MB for SmolLM2) while keeping each matmul large.
CHUNK_ROWS = 256


def scored_positions(start: int, end: int, num_prompt_tokens: int) -> range:
    """Positions of a step's chunk [start, end) whose hidden state scores a prompt token."""
    return range(start, min(end, num_prompt_tokens - 1))


def score_tokens(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: Sequence[int],
    top_n: int,
    chunk_rows: int = CHUNK_ROWS,
) -> list[TokenLogprobs]:
    """Logprob and rank of `targets[i]` under the logits of `hidden[i]`, plus the top N.

    hidden: [R, hidden]; compute_logits maps [r, hidden] -> fp32 [r, V]. Row by row the
    same numbers the sampler reports for a sampled token (raw logits, log_softmax).
    """
    out: list[TokenLogprobs] = []
    for first in range(0, len(targets), chunk_rows):
        rows = hidden[first : first + chunk_rows]  # [r, hidden]
        logprobs = compute_logits(rows).log_softmax(-1)  # [r, V]
        ids = torch.tensor(targets[first : first + chunk_rows], dtype=torch.long)  # [r]
        out += _gather_logprobs(logprobs, ids, [top_n] * len(ids))
    return out


class _Prompted(Protocol):
    """What this module reads of the runner's request (models.runner.RunnerRequest)."""

    num_computed_tokens: int
    sampling: SamplingState


def step_prompt_logprobs(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    chunks: Sequence[tuple[str, int, int]],
    requests: Mapping[str, _Prompted],
) -> dict[str, list[TokenLogprobs]]:
    """Score the prompt tokens a step covers, for the requests that ask for prompt logprobs.

    hidden: [T, hidden], the step's flat batch; `chunks` lists (req_id, first row in
    `hidden`, tokens scheduled) per request, read before the step advances the request.
    """
    out: dict[str, list[TokenLogprobs]] = {}
    for req_id, first_row, count in chunks:
        req = requests[req_id]
        top_n = req.sampling.params.prompt_logprobs
        if top_n is None:  # nearly every request: skip it before any work, every step
            continue
        prompt = req.sampling.prompt_token_ids
        start = req.num_computed_tokens
        positions = scored_positions(start, start + count, len(prompt))
        if not positions:
            continue
        rows = hidden[first_row : first_row + len(positions)]  # [r, hidden]
        targets = prompt[positions.start + 1 : positions.stop + 1]
        out[req_id] = score_tokens(compute_logits, rows, targets, top_n)
    return out
