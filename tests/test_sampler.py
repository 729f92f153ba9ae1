"""The batched sampler against hand computations and full-sort references."""

from __future__ import annotations

import math

import pytest
import torch

from engine_core.messages.sampling_params import SamplingParams
from models.sampler import SamplingState, _apply_logit_bias, _apply_penalties, sample

EOS = 0


def state(
    prompt: list[int] | None = None, output: list[int] | None = None, **params: object
) -> SamplingState:
    return SamplingState(
        params=SamplingParams(**params),  # type: ignore[arg-type]
        prompt_token_ids=prompt or [1, 2, 3],
        output_token_ids=output or [],
        eos_token_ids=(EOS,),
    )


def picks(logits: torch.Tensor, rows: int, **params: object) -> torch.Tensor:
    """Sample `rows` unseeded rows that all see the same 1-D `logits`."""
    batch = logits.expand(rows, -1).contiguous()  # [rows, V]
    return torch.tensor(sample(batch, [state(**params) for _ in range(rows)]).token_ids)


def nucleus(logits: torch.Tensor, top_p: float) -> set[int]:
    """vLLM's top-p kept set by a full sort: tokens with less than top_p mass before them."""
    vals, ids = logits.sort(descending=True)  # [V]
    probs = vals.softmax(-1)
    before = probs.cumsum(-1) - probs
    return set(ids[before < top_p].tolist())


def test_greedy_is_argmax_with_lowest_id_on_ties() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 100)  # [B, V]
    logits[2, 7] = logits[2, 40] = 50.0
    out = sample(logits.clone(), [state(temperature=0.0) for _ in range(5)])
    expected = logits.argmax(-1).tolist()
    assert expected[2] == 7
    assert out.token_ids == expected
    assert out.logprobs == [None] * 5


def test_logprobs_are_raw_sorted_and_ranked() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 50)  # [B, V]
    logits[0, 9] = 8.0  # the raw favourite, penalised and biased out of the greedy pick
    rows = [
        state(
            temperature=0.0, logprobs=4, repetition_penalty=2.0, prompt=[9], logit_bias={9: -9.0}
        ),
        state(temperature=0.0, logprobs=0, logit_bias={3: 30.0}),
        state(temperature=1.0, logprobs=20, seed=5, presence_penalty=1.0, output=[1, 2]),
    ]
    out = sample(logits.clone(), rows)
    raw = logits.log_softmax(-1)  # [B, V]
    assert out.token_ids[1] == 3
    for row, lp, n in zip(range(3), out.logprobs, (4, 0, 20), strict=True):
        assert lp is not None and len(lp.token_ids) == len(lp.logprobs) == n + 1
        token = out.token_ids[row]
        assert lp.token_ids[0] == token
        assert lp.logprobs[0] == pytest.approx(raw[row, token].item(), abs=1e-5)
        assert lp.rank == int((raw[row] > raw[row, token]).sum()) + 1
        top_lp, top_ids = raw[row].topk(n)
        assert lp.token_ids[1:] == top_ids.tolist()
        assert lp.logprobs[1:] == pytest.approx(top_lp.tolist(), abs=1e-5)
        assert lp.logprobs[1:] == sorted(lp.logprobs[1:], reverse=True)
    # Row 0 took the raw runner-up; its logprobs still see the raw favourite.
    assert out.token_ids[0] == int(raw[0].topk(2).indices[1])
    assert out.logprobs[0].token_ids[1] == 9 and out.logprobs[0].rank == 2


def test_rank_counts_ties_as_worst() -> None:
    logits = torch.zeros(1, 10)  # all tied: every token has rank 10, as vLLM counts
    out = sample(logits, [state(temperature=0.0, logprobs=1)])
    assert out.token_ids == [0] and out.logprobs[0].rank == 10


def test_penalties_match_hand_computation() -> None:
    logits = torch.tensor([[1.0, -1.0, 2.0, -2.0, 0.5, 3.0], [1.0] * 6])  # [B=2, V=6]
    rows = [
        state(
            prompt=[1, 4],
            output=[2, 3, 3],
            repetition_penalty=2.0,
            presence_penalty=0.5,
            frequency_penalty=0.25,
        ),
        state(prompt=[0], output=[0, 1]),  # no penalties: row untouched
    ]
    _apply_penalties(logits, rows)
    # repetition (prompt or output: 1, 2, 3, 4): positive / 2, negative * 2;
    # then output counts {2: 1, 3: 2}: minus 0.25 * count + 0.5.
    expected = [1.0, -2.0, 1.0 - 0.75, -4.0 - 1.0, 0.25, 3.0]
    assert logits[0].tolist() == pytest.approx(expected)
    assert logits[1].tolist() == [1.0] * 6


def test_penalties_only_presence_and_frequency_ignore_prompt() -> None:
    logits = torch.zeros(1, 5)  # [B, V]
    _apply_penalties(logits, [state(prompt=[1, 4], output=[4, 4], presence_penalty=-1.0)])
    assert logits[0].tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_logit_bias_adds_to_named_tokens_only() -> None:
    logits = torch.zeros(2, 6)  # [B, V]
    _apply_logit_bias(logits, [state(logit_bias={1: 2.5, 4: -100.0, 99: 1.0}), state()])
    assert logits[0].tolist() == [0.0, 2.5, 0.0, 0.0, -100.0, 0.0]
    assert logits[1].tolist() == [0.0] * 6
    out = sample(torch.zeros(1, 6), [state(temperature=0.0, logit_bias={5: 0.1})])
    assert out.token_ids == [5]


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.tensor([[5.0, 1.0, 4.0, 3.0]])  # EOS (0) best, stop id 2 second
    params = {"temperature": 0.0, "min_tokens": 2, "stop_token_ids": [2]}
    for output, expected in (([], 3), ([7], 3), ([7, 7], EOS)):
        assert sample(logits.clone(), [state(output=output, **params)]).token_ids == [expected]
    torch.manual_seed(2)
    random = picks(torch.tensor([5.0, 1.0, 4.0, 3.0]), 500, min_tokens=1, stop_token_ids=[2])
    assert set(random.tolist()) == {1, 3}


def test_temperature_matches_distribution() -> None:
    torch.manual_seed(3)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for temperature in (0.5, 2.0):
        counts = torch.bincount(picks(logits, 8000, temperature=temperature), minlength=4)
        expected = (logits / temperature).softmax(-1)
        assert (counts / 8000 - expected).abs().max() < 0.02  # ~3.5 standard errors


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        ({"top_k": 2}, {0, 1}),
        ({"top_p": 0.7}, {0, 1}),  # token 1 crosses 0.7 and stays; 2 has 0.75 before it
        ({"top_p": 0.76}, {0, 1, 2}),
        ({"min_p": 0.25}, {0, 1, 2}),  # p >= 0.25 * 0.5
        ({"top_k": 3, "top_p": 0.58}, {0, 1}),
        # top-p over the renormalised top-2 set: 0.5 / 0.75 > 0.6 already, so token 1 goes.
        ({"top_k": 2, "top_p": 0.6}, {0}),
        ({"min_p": 0.2, "top_k": -1, "top_p": 1.0}, {0, 1, 2}),
        ({"top_p": 1e-300}, {0}),  # underflows to 0 in float32: the top token still stays
    ],
)
def test_truncation_never_picks_masked_tokens(params: dict, allowed: set[int]) -> None:
    probs = torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04])
    torch.manual_seed(4)
    chosen = picks(probs.log(), 2000, temperature=1.0, **params)
    assert set(chosen.tolist()) == allowed


@pytest.mark.parametrize(
    ("vocab", "scale", "top_p"),
    [
        (300, 0.3, 0.95),  # 274 kept; the least likely is drawn ~16 times in 8000
        (600, 0.05, 0.5),  # 289 kept, and half the draws are rejected and redrawn
    ],
)
def test_wide_nucleus_matches_full_sort(vocab: int, scale: float, top_p: float) -> None:
    # Nuclei wider than the candidate list: these rows take the rejection race.
    torch.manual_seed(5)
    logits = torch.randn(vocab) * scale  # [V]
    chosen = torch.cat([picks(logits, 1000, top_p=top_p) for _ in range(8)])
    assert set(chosen.tolist()) == nucleus(logits, top_p)


def test_top_k_keeps_ties_at_the_edge() -> None:
    logits = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0])
    torch.manual_seed(6)
    assert set(picks(logits, 500, top_k=2).tolist()) == {0, 2, 3}


def run_steps(rows: list[SamplingState], logits: list[torch.Tensor], of: int) -> list[int]:
    """Sample each step's logits for `rows`, appending tokens as the runner does."""
    for step_logits in logits:
        out = sample(step_logits.clone(), rows)
        for row, token in zip(rows, out.token_ids, strict=True):
            row.output_token_ids.append(token)
    return rows[of].output_token_ids


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.9},
        {"top_p": 0.8},
        {"temperature": 2.0, "top_p": 0.9},  # nucleus past the candidate list
        {"temperature": 20.0, "top_p": 0.5},  # ... and draws rejected and redrawn
        {"top_k": 40, "min_p": 0.01},
    ],
)
def test_seeded_row_ignores_its_batch(params: dict) -> None:
    torch.manual_seed(7)
    vocab = 600
    steps = [torch.randn(6, vocab) * 2 for _ in range(5)]  # [B, V] per step
    alone = run_steps([state(seed=1234, **params)], [s[:1] for s in steps], 0)

    others = [
        state(seed=99, top_p=0.5),
        state(),
        state(temperature=0.0),
        state(top_k=300, min_p=0.02),  # widens the batch's candidate lists
        state(seed=1234, top_p=0.9),  # same seed, other params
    ]
    torch.manual_seed(8)  # the default generator's state must not matter either
    batch = run_steps([state(seed=1234, **params), *others], steps, 0)
    assert batch == alone

    # A recompute after preemption, or another worker, continues the same stream.
    resumed = state(seed=1234, **params)
    resumed.output_token_ids = alone[:3]
    assert run_steps([resumed], [s[:1] for s in steps[3:]], 0) == alone

    other_seed = run_steps([state(seed=4321, **params)], [s[:1] for s in steps], 0)
    assert other_seed != alone


def test_empty_output_step_differs_from_later_steps() -> None:
    # Same seed and logits at different output lengths must not repeat the same draw.
    logits = torch.zeros(1, 1000)  # [B, V] uniform
    tokens = [
        sample(logits.clone(), [state(seed=3, output=[5] * n)]).token_ids[0] for n in range(6)
    ]
    assert len(set(tokens)) > 1


def test_masked_tokens_never_win_even_when_almost_everything_is_masked() -> None:
    logits = torch.full((1, 5000), -math.inf)  # [B, V]
    logits[0, 4321] = 0.0
    torch.manual_seed(9)
    batch = logits.expand(64, -1).contiguous()
    out = sample(batch, [state(top_p=0.5, seed=i if i % 2 else None) for i in range(64)])
    assert set(out.token_ids) == {4321}
