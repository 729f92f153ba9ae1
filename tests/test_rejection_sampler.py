"""Draft verification on hand-made logits: which drafts hold, and that every row samples
with the sampler's pipeline as of its own position."""

from __future__ import annotations

import torch

from engine_core.messages.sampling_params import SamplingParams
from models.rejection_sampler import verify
from models.sampler import SamplingState, sample


def state(**params: object) -> SamplingState:
    """Greedy unless `params` say otherwise."""
    return SamplingState(SamplingParams(**{"temperature": 0.0, **params}), [7, 8], [], (3,))


def test_greedy_accepts_the_drafts_argmax_agrees_with_then_one_more() -> None:
    logits = torch.tensor(
        [
            [0.0, 5.0, 0.0, 0.0],  # request 0, row 0: argmax 1 = draft 1, accepted
            [0.0, 0.0, 5.0, 0.0],  # row 1: argmax 2 != draft 1, the sampled token
            [0.0, 0.0, 0.0, 5.0],  # row 2: never reached
            [5.0, 0.0, 0.0, 0.0],  # request 1 (no drafts)
            [0.0, 0.0, 5.0, 0.0],  # request 2, row 0: draft 2 holds
            [0.0, 5.0, 0.0, 0.0],  # row 1: the bonus token
        ]
    )
    out = verify(logits, [state(logprobs=1), state(), state()], [[1, 1], [], [2]])
    assert out.accepted == [[1], [], [2]]
    assert out.token_ids == [2, 0, 1]
    first = out.accepted_logprobs[0]
    assert first is not None and [e.token_ids[0] for e in first] == [1]
    last = out.logprobs[0]
    assert last is not None and last.token_ids[0] == 2
    assert out.accepted_logprobs[1:] == [None, None]


def test_penalties_and_min_tokens_at_a_draft_position_see_the_drafts_before_it() -> None:
    # token 0 leads by 0.1; a frequency penalty of 0.5 on it applies only once it is output
    row = [1.0, 0.9, 0.0, 0.0]
    out = verify(torch.tensor([row, row]), [state(frequency_penalty=0.5)], [[0]])
    assert (out.accepted, out.token_ids) == ([[0]], [1])
    # EOS (3) is masked while fewer than min_tokens are out: at row 0, not at row 1
    eos_first = [0.0, 1.0, 0.0, 5.0]
    out = verify(torch.tensor([eos_first, eos_first]), [state(min_tokens=1)], [[1]])
    assert (out.accepted, out.token_ids) == ([[1]], [3])


def test_a_seeded_row_draws_what_plain_sampling_draws_at_that_position() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = {"temperature": 1.0, "seed": 11, "top_k": 10}
    drafts = [int(sample(logits[0:1].clone(), [state(**params)]).token_ids[0])]
    plain = state(**params)
    plain.output_token_ids = drafts[:]
    want = sample(logits[1:2].clone(), [plain]).token_ids[0]
    out = verify(logits[:2].clone(), [state(**params)], [drafts])
    assert (out.accepted, out.token_ids) == ([drafts], [want])
