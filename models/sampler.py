"""Batched token sampler with vLLM v1 semantics.

One call per step samples a token for every row of the logits. The order is vLLM's:
raw logprobs -> logit_bias -> min_tokens -> penalties -> greedy argmax, or temperature ->
min_p -> top_k -> top_p -> exponential race. Each stage is skipped when no row in the batch
uses it, because this runs every step at batch 64 x vocab 49k on two CPU cores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine_core.messages.common import TokenLogprobs
from engine_core.messages.sampling_params import SamplingParams

# Candidate-list length for top-p rows: most nuclei fit, and topk this short costs a few
# ms at batch 64 where a full sort costs ~130 ms. Wider nuclei take the rejection race.
_TOP_P_PROBE = 256
_MASK64 = (1 << 64) - 1


@dataclass
class SamplingState:
    """What the sampler needs to know about one request; owned by the model runner."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # the runner appends each sampled token
    eos_token_ids: tuple[int, ...]


@dataclass
class SamplerOutput:
    """One sampled token per row, in the order of the states passed to `sample`."""

    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprobs | None]  # None where params.logprobs is None


def sample(logits: torch.Tensor, states: Sequence[SamplingState]) -> SamplerOutput:
    """Sample one token per row of `logits` [B, V] fp32; `states[i]` describes row i.

    `logits` is used as scratch space and holds garbage afterwards. Logprobs are taken
    from the raw logits, before any bias, penalty or temperature (vLLM's default). A
    seeded row's randomness is a function of (seed, len(output_token_ids)) alone, so it
    samples the same tokens in any batch, after preemption, and in any worker process.
    """
    lp_rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    raw_logprobs = _rows(logits, lp_rows).log_softmax(-1) if lp_rows else None  # [L, V]
    _apply_logit_bias(logits, states)
    _apply_min_tokens(logits, states)
    _apply_penalties(logits, states)

    token_ids = torch.empty(len(states), dtype=torch.long)  # [B]
    greedy = [i for i, s in enumerate(states) if s.params.greedy]
    randomized = [i for i, s in enumerate(states) if not s.params.greedy]
    if greedy:
        token_ids[greedy] = _rows(logits, greedy).argmax(-1)
    if randomized:
        chosen = _sample_random(_rows(logits, randomized), [states[i] for i in randomized])
        token_ids[randomized] = chosen

    logprobs: list[TokenLogprobs | None] = [None] * len(states)
    if raw_logprobs is not None:
        top_n = [states[i].params.logprobs or 0 for i in lp_rows]
        entries = _gather_logprobs(raw_logprobs, token_ids[lp_rows], top_n)
        for i, entry in zip(lp_rows, entries, strict=True):
            logprobs[i] = entry
    return SamplerOutput(token_ids=token_ids.tolist(), logprobs=logprobs)


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    # The all-rows case is the common one; skip the copy that fancy indexing makes.
    return x if len(rows) == x.shape[0] else x[rows]


def _gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, top_n: list[int]
) -> list[TokenLogprobs]:
    """Per row: the sampled token's logprob and rank, then the row's own top N."""
    sampled = logprobs.gather(1, token_ids[:, None])  # [L, 1]
    # Rank counts every token at least as likely, as vLLM does: ties share the worst rank.
    # int32: summing bools into the default int64 costs 5x more here.
    ranks = (logprobs >= sampled).sum(-1, dtype=torch.int32).tolist()  # [L]
    top_lp, top_ids = logprobs.topk(max(top_n), dim=-1)  # [L, N]
    tokens, token_lp = token_ids.tolist(), sampled.squeeze(1).tolist()
    return [
        TokenLogprobs(
            token_ids=[tokens[j], *top_ids[j, :n].tolist()],
            logprobs=[token_lp[j], *top_lp[j, :n].tolist()],
            rank=ranks[j],
        )
        for j, n in enumerate(top_n)
    ]


def _apply_logit_bias(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    rows: list[int] = []
    cols: list[int] = []
    bias: list[float] = []
    vocab = logits.shape[1]
    for i, s in enumerate(states):
        for token, value in (s.params.logit_bias or {}).items():
            # The frontend validates against the tokenizer; an id past the model's vocab
            # must still not take the whole batch down with an IndexError.
            if 0 <= token < vocab:
                rows.append(i)
                cols.append(token)
                bias.append(value)
    if rows:
        index = (torch.tensor(rows), torch.tensor(cols))
        logits.index_put_(index, torch.tensor(bias), accumulate=True)


def _apply_min_tokens(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    # vLLM masks EOS here even with ignore_eos: min_tokens is about the output's length.
    rows: list[int] = []
    cols: list[int] = []
    for i, s in enumerate(states):
        if len(s.output_token_ids) < s.params.min_tokens:
            stops = {*s.eos_token_ids, *s.params.stop_token_ids}
            rows.extend([i] * len(stops))
            cols.extend(stops)
    if rows:
        logits[rows, cols] = -math.inf


def _apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """Repetition over prompt + output tokens; presence and frequency over output only.

    Works on the (row, token) pairs that occur rather than on [B, V] count tensors:
    sequences are far shorter than the vocabulary.
    """
    vocab = logits.shape[1]
    rep = [(i, s) for i, s in enumerate(states) if s.params.repetition_penalty != 1.0]
    if rep:
        pairs = [(i, s.prompt_token_ids + s.output_token_ids) for i, s in rep]
        keys = _pair_keys(pairs, vocab).unique()  # [K] each seen (row, token) once
        row, col = keys.div(vocab, rounding_mode="floor"), keys % vocab
        penalty = torch.tensor([s.params.repetition_penalty for s in states])[row]  # [K]
        seen = logits[row, col]  # [K]
        logits[row, col] = torch.where(seen > 0, seen / penalty, seen * penalty)

    additive = [
        (i, s)
        for i, s in enumerate(states)
        if s.params.presence_penalty != 0.0 or s.params.frequency_penalty != 0.0
    ]
    if additive:
        keys, counts = _pair_keys([(i, s.output_token_ids) for i, s in additive], vocab).unique(
            return_counts=True
        )
        row, col = keys.div(vocab, rounding_mode="floor"), keys % vocab  # [K]
        presence = torch.tensor([s.params.presence_penalty for s in states])[row]
        frequency = torch.tensor([s.params.frequency_penalty for s in states])[row]
        logits[row, col] -= frequency * counts + presence


def _pair_keys(rows: list[tuple[int, list[int]]], vocab: int) -> torch.Tensor:
    """Encode (row, token) pairs as row * vocab + token, one int64 per pair."""
    parts = [torch.tensor(tokens, dtype=torch.long) + i * vocab for i, tokens in rows]
    return torch.cat(parts)


def _sample_random(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Temperature, min_p, top-k / top-p and the exponential race for non-greedy rows."""
    params = [s.params for s in states]
    logits.div_(torch.tensor([p.temperature for p in params])[:, None])  # [R, V]
    if any(p.min_p > 0.0 for p in params):
        _apply_min_p(logits, torch.tensor([p.min_p for p in params]))
    vocab = logits.shape[1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params])  # [R]
    # inf rather than 1.0: rounding in a cumulative sum must never drop a tail token.
    top_p = torch.tensor([p.top_p if p.top_p < 1.0 else math.inf for p in params])  # [R]
    cut = ((top_k < vocab) | (top_p < 1.0)).tolist()
    truncated = [j for j, c in enumerate(cut) if c]
    whole = [j for j, c in enumerate(cut) if not c]

    token_ids = torch.empty(len(states), dtype=torch.long)  # [R]
    if whole:
        probs = _rows(logits, whole).softmax(-1)  # [F, V]
        noise = _exponential_noise([states[j] for j in whole], None, probs.shape, vocab)
        token_ids[whole] = probs.div_(noise).argmax(-1)
    if truncated:
        token_ids[truncated] = _sample_truncated(
            _rows(logits, truncated),
            [states[j] for j in truncated],
            top_k[truncated],
            top_p[truncated],
        )
    return token_ids


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    # p_j < min_p * p_max  <=>  l_j < l_max + log(min_p): no softmax needed, and
    # min_p = 0 gives a floor of -inf, which masks nothing.
    floor = logits.amax(-1) + min_p.log()  # [R]
    logits.masked_fill_(logits < floor[:, None], -math.inf)


def _sample_truncated(
    logits: torch.Tensor, states: list[SamplingState], top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Top-k, then top-p over the top-k set, then the race, without sorting the vocabulary.

    Each row takes a short candidate list of its own length (k + 1, or _TOP_P_PROBE for
    top-p) and is sampled from it when its kept set provably ends inside; the other rows
    race over the whole vocabulary with rejection. Which way a row goes depends only on
    the row, so a seeded row draws the same token whatever batch it is in.
    """
    n, vocab = logits.shape  # [T, V]
    has_k = top_k < vocab  # [T]
    reach = torch.where(has_k, top_k + 1, 0)  # [T] the row's own list length
    reach = reach.maximum(torch.where(top_p < 1.0, _TOP_P_PROBE, 0)).clamp(max=vocab)
    vals, ids = logits.topk(int(reach.max()), dim=-1)  # [T, W] descending
    # Top-p's mass for a row without top-k is over the whole (min_p-masked) row.
    mass = torch.zeros(n)  # [T]
    if not bool(has_k.all()):
        mass = (logits - vals[:, :1]).exp_().sum(-1)
    weights, floor = _nucleus(vals, top_k, top_p, mass, vocab)  # [T, W], [T, 1]
    kth = vals.gather(1, top_k.clamp(max=vals.shape[1])[:, None] - 1)  # [T, 1]
    edge = vals.gather(1, reach[:, None] - 1)  # [T, 1] last entry of the row's own list
    # Exact when the list ends strictly below the floor (below the k-th value with
    # top-k, which is <= the floor): then no kept token or tie lies past it.
    exact = torch.where(has_k[:, None], edge < kth, edge < floor).squeeze(1) | (reach == vocab)

    token_ids = torch.empty(n, dtype=torch.long)  # [T]
    listed = exact.nonzero().squeeze(1).tolist()
    if listed:
        rows = [states[j] for j in listed]
        noise = _exponential_noise(rows, ids[listed], (len(listed), vals.shape[1]), vocab)
        picked = (weights[listed] / noise).argmax(-1, keepdim=True)  # [D, 1]
        token_ids[listed] = ids[listed].gather(1, picked).squeeze(1)
    wide = (~exact).nonzero().squeeze(1).tolist()
    if wide:
        k_floor = torch.where(has_k[:, None], kth, -math.inf)[wide]  # [N, 1]
        wide_logits = _rows(logits, wide)  # [N, V]
        # Top-k by value, so ties with the k-th logit stay, as vLLM masks it.
        wide_logits.masked_fill_(wide_logits < k_floor, -math.inf)
        token_ids[wide] = _rejection_race(wide_logits, [states[j] for j in wide], top_p[wide])
    return token_ids


def _nucleus(
    vals: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, mass: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Race weights of the kept candidates (0 elsewhere) and the smallest kept logit.

    vals: [P, W] each row's largest logits, descending. A candidate is kept if it is in
    the top k and the probability mass strictly before it is below top_p, so the token
    that crosses top_p stays (vLLM's rule). Ties with the smallest kept logit are kept too.
    """
    width = vals.shape[1]
    weights = (vals - vals[:, :1]).exp()  # [P, W] unnormalised probabilities
    cum = weights.cumsum(-1)  # [P, W]
    # vLLM renormalises after top-k, so top-p is measured against the top-k set's mass.
    k_mass = cum.gather(1, (top_k.clamp(max=width) - 1)[:, None]).squeeze(1)  # [P]
    total = torch.where(top_k < vocab, k_mass, mass)  # [P]
    in_k = torch.arange(width) < top_k[:, None]  # [P, W]
    # weights > 0: a candidate whose probability underflows to 0 can never win the race.
    keep = in_k & (cum - weights < (top_p * total)[:, None]) & (weights > 0)
    keep[:, 0] = True  # the top token stays even when a tiny top_p * total underflows to 0
    floor = vals.gather(1, keep.sum(-1, keepdim=True) - 1)  # [P, 1] smallest kept logit
    return weights.masked_fill_(vals < floor, 0.0), floor


def _rejection_race(
    logits: torch.Tensor, states: list[SamplingState], top_p: torch.Tensor
) -> torch.Tensor:
    """Race over the whole (top-k-masked) vocabulary, redrawing rows whose winner lies
    outside their top-p nucleus: rejection sampling, so exactly the nucleus distribution.

    Each draw lands in the nucleus with probability >= top_p, and only rows whose nucleus
    outgrew their candidate list come here, so finding the nucleus's edge by a sort
    would cost more than the few redraws.
    """
    probs = logits.softmax(-1)  # [N, V]
    token_ids = torch.empty(len(states), dtype=torch.long)  # [N]
    pending = torch.arange(len(states))  # [P] rows still drawing
    attempt = 0
    while len(pending):
        rows = pending.tolist()
        p = _rows(probs, rows)  # [P, V]
        noise = _exponential_noise([states[j] for j in rows], None, p.shape, p.shape[1], attempt)
        winner = torch.div(p, noise, out=noise).argmax(-1, keepdim=True)  # [P, 1]
        # Mass strictly more likely than the winner; its ties are kept, as on the list path.
        before = torch.where(p > p.gather(1, winner), p, 0.0).sum(-1)  # [P]
        accepted = before < top_p[pending]
        token_ids[pending[accepted]] = winner[accepted].squeeze(1)
        pending = pending[~accepted]
        attempt += 1
    return token_ids


def _exponential_noise(
    states: list[SamplingState],
    ids: torch.Tensor | None,
    shape: tuple[int, int] | torch.Size,
    vocab: int,
    attempt: int = 0,
) -> torch.Tensor:
    """Exp(1) noise [N, W] for the race argmax(p / noise), one row per state.

    `ids` [N, W] names the token of each entry (None: all `vocab` tokens in order). A
    seeded row draws noise for the whole vocabulary and indexes it by token id, so its
    tokens depend neither on the rest of the batch nor on how long its candidate list was.
    """
    u = torch.empty(shape)  # [N, W]
    if any(s.params.seed is None for s in states):
        u.uniform_()  # default generator; seeded rows are overwritten below
    for j, s in enumerate(states):
        if s.params.seed is not None:
            generator = _draw_generator(s.params.seed, len(s.output_token_ids), attempt)
            row = torch.rand(vocab, generator=generator)  # [V]
            u[j] = row if ids is None else row[ids[j]]
    # -log(U) is Exp(1) and never 0 (U < 1), so a masked p = 0 scores 0, never NaN.
    return u.log_().neg_()


def _draw_generator(seed: int, step: int, attempt: int) -> torch.Generator:
    """A generator keyed by (seed, tokens output so far, redraw number): stateless, so a
    request recomputed after preemption, or handed to another worker, draws the same."""
    key = seed
    for part in (step, attempt):
        key = _splitmix64(key + part)
    return torch.Generator().manual_seed(key)


def _splitmix64(z: int) -> int:
    # Neighbouring inputs get unrelated outputs, and the low 32 bits (all that torch's
    # CPU mt19937 keeps of a seed) depend on every input bit.
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
