"""Verify speculative draft tokens: rejection sampling for point-mass (n-gram) drafts.

A request with k drafts d_1..d_k has k + 1 logits rows: row j is the target distribution
p_j after the known tokens and d_1..d_j. Speculative sampling accepts d_{j+1} with
probability min(1, p_j(d) / q(d)) and on rejection samples from max(0, p_j - q),
normalised. An n-gram draft is deterministic, q = one-hot(d), so that is: accept with
probability p_j(d), else sample from p_j with d removed and renormalised — which is
exactly "draw x ~ p_j; accept iff x == d, else emit x" (P(x = d) = p_j(d), and x given
x != d is p_j without d). So every row is sampled by the ordinary sampler, with the
whole pipeline (logit_bias, min_tokens, penalties over the tokens up to that row,
temperature, top-k/p, min_p), and the walk stops at the first row whose token differs
from the draft; the last row's token is the bonus when all drafts hold.

Each output token is then a draw from the target given the tokens before it, so the
output distribution is the non-speculative one; greedy rows reduce to argmax checks. A
seeded row's noise is keyed by its output position (see `sampler.sample`), so a seeded
request emits the very tokens it would without speculation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from engine_core.messages.common import TokenLogprobs
from models.sampler import SamplingState, sample


@dataclass
class VerifiedOutput:
    """Per request: the drafts it accepted, then one sampled token (as `SamplerOutput`)."""

    accepted: list[list[int]]
    accepted_logprobs: list[list[TokenLogprobs] | None]  # None where logprobs weren't asked
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def verify(
    logits: torch.Tensor, states: Sequence[SamplingState], drafts: Sequence[Sequence[int]]
) -> VerifiedOutput:
    """Sample and check drafts: logits [R, V] fp32 holds 1 + len(drafts[i]) consecutive
    rows for request i (R = sum of those); used as scratch, like `sample`'s."""
    rows = [
        replace(state, output_token_ids=[*state.output_token_ids, *draft[:j]]) if j else state
        for state, draft in zip(states, drafts, strict=True)
        for j in range(len(draft) + 1)
    ]
    out = sample(logits, rows)
    result = VerifiedOutput([], [], [], [])
    first = 0
    for state, draft in zip(states, drafts, strict=True):
        sampled = out.token_ids[first : first + len(draft) + 1]
        num_accepted = next((j for j, d in enumerate(draft) if sampled[j] != d), len(draft))
        result.accepted.append(list(draft[:num_accepted]))
        result.token_ids.append(sampled[num_accepted])
        lps = out.logprobs[first : first + num_accepted + 1]
        wants = state.params.logprobs is not None
        accepted_lps = [lp for lp in lps[:-1] if lp is not None]
        result.accepted_logprobs.append(accepted_lps if wants else None)
        result.logprobs.append(lps[-1])
        first += len(draft) + 1
    return result
