"""n-gram speculative decoding end to end offline: greedy parity, seeded parity and the
target distribution, on tiny random checkpoints and the real default model (fp32)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from checkpoints import build_tiny_llama
from parity import compare, hf_greedy
from transformers import AutoModelForCausalLM

from engine_core import LLM, SamplingParams
from engine_core.messages.speculative import SpecDecodeCounters
from models.export import export_hf_folder

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}  # fmt: skip
A, B = 1000, 2000  # two tokens a logit bias makes the only likely ones
PARAGRAPH = (
    "The lighthouse keeper climbed the narrow stairs every evening at dusk. He trimmed the "
    "wick, polished the great lens, and wrote the weather in a leather book. Ships passed "
    "far out on the grey water, and none of them knew his name."
)


def tiny_llms(folder: Path, **engine_args: object) -> tuple[LLM, LLM]:
    """The same tiny checkpoint without and with speculation (small blocks: many edges)."""
    args = {"kv_cache_memory": "64MiB", "block_size": 4, "dtype": "float32", **engine_args}
    return LLM(str(folder), **args), LLM(str(folder), speculative_config=NGRAM, **args)


def counters(llm: LLM) -> SpecDecodeCounters:
    stats = llm.engine.stats().spec_decode
    assert stats is not None
    return stats


def tokens(outputs: list) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> tuple[LLM, LLM]:
    return tiny_llms(tiny_checkpoint())


# Greedy under every sampler stage the verification rows must share with plain decoding:
# penalties at a draft position see the drafts before it, min_tokens counts them.
GREEDY_CASES = [
    {},
    {"logit_bias": {A: 30.0, B: 30.0}},
    {"logit_bias": {A: 30.0, B: 30.0}, "frequency_penalty": 0.05},
    {"logit_bias": {A: 30.0, B: 30.0}, "presence_penalty": 0.3, "repetition_penalty": 1.02},
    {"logit_bias": {A: 30.0, B: 30.0, 2: 31.0}, "min_tokens": 9},  # 2 is the EOS
    {"logit_bias": {A: 30.0, B: 30.0}, "stop_token_ids": [B], "min_tokens": 5},
]


def test_greedy_matches_plain_decoding_token_for_token(tiny: tuple[LLM, LLM]) -> None:
    plain, spec = tiny
    prompts = [[A, B, A, A, B, A, B, B] * 3, [5, 6, 7, 8] * 6, [A, B] * 2, [11]]
    params = [
        SamplingParams(temperature=0.0, max_tokens=60, logprobs=1, **case) for case in GREEDY_CASES
    ]
    batch = [(p, sp) for p in prompts for sp in params]
    want = plain.generate([p for p, _ in batch], [sp for _, sp in batch])
    got = spec.generate([p for p, _ in batch], [sp for _, sp in batch])
    assert tokens(got) == tokens(want)
    for ours, theirs in zip(got, want, strict=True):
        assert ours.outputs[0].finish_reason == theirs.outputs[0].finish_reason
        mine = ours.outputs[0].logprobs
        ref = theirs.outputs[0].logprobs
        assert [e.token_ids for e in mine] == [e.token_ids for e in ref]
        flat = [v for e in mine for v in e.logprobs]
        assert flat == pytest.approx([v for e in ref for v in e.logprobs], abs=1e-4)
    seen = counters(spec)
    # not vacuous: drafts were accepted, and rejected, at every position
    assert 0 < seen.num_accepted_tokens < seen.num_draft_tokens
    assert all(count > 0 for count in seen.accepted_per_pos)


def test_greedy_parity_one_request_at_a_time_and_blocks_come_back(tiny: tuple[LLM, LLM]) -> None:
    plain, spec = tiny
    params = SamplingParams(temperature=0.0, max_tokens=80, logit_bias={A: 30.0, B: 30.0})
    prompt = [A, B, B, A, B, A, A, B] * 4
    assert tokens(spec.generate(prompt, params)) == tokens(plain.generate(prompt, params))
    pool = spec.engine.scheduler.pools["mixed"].pool
    assert pool.num_free_blocks == pool.num_blocks - 1  # every draft block was given back


def test_seeded_sampling_emits_the_tokens_of_plain_decoding(tiny: tuple[LLM, LLM]) -> None:
    plain, spec = tiny
    before = counters(spec).num_accepted_tokens
    prompts = [[A, B, A, B, A, A, B, A] * 3, [5, 6, 7, 8] * 5]
    cases = [
        {"temperature": 1.0},
        {"temperature": 0.7, "top_p": 0.9, "top_k": 5},
        {"temperature": 1.3, "min_p": 0.05, "frequency_penalty": 0.1},
    ]
    params = [
        SamplingParams(seed=seed, max_tokens=40, logit_bias={A: 4.0, B: 4.0}, **case)
        for seed, case in enumerate(cases)
    ]
    batch = [(p, sp) for p in prompts for sp in params]
    want = plain.generate([p for p, _ in batch], [sp for _, sp in batch])
    got = spec.generate([p for p, _ in batch], [sp for _, sp in batch])
    assert tokens(got) == tokens(want)
    assert counters(spec).num_accepted_tokens > before


# -- the target distribution -----------------------------------------------------------

NUM_SAMPLES = 2000
NUM_OUTPUT = 4
# chi-square with 2^4 - 1 = 15 degrees of freedom: P(X > 37.7) = 0.001
CHI2_CRITICAL = 37.7


def exact_distribution(prompt: list[int], bias: float, top_k: int) -> dict[tuple, float]:
    """P(output = s) for every s in {A, B}^NUM_OUTPUT under the HF twin of the checkpoint,
    through the sampler's pipeline (bias, then top-k, then softmax)."""
    model = build_tiny_llama()
    probs: dict[tuple, float] = {}
    for seq in itertools.product((A, B), repeat=NUM_OUTPUT):
        ids = torch.tensor([prompt + list(seq)])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()  # [NUM_OUTPUT, V]
        logits[:, [A, B]] += bias
        top = logits.topk(top_k, dim=-1)
        assert set(top.indices.flatten().tolist()) == {A, B}
        logp = top.values.log_softmax(-1)  # [NUM_OUTPUT, 2]
        picked = (top.indices == torch.tensor(seq)[:, None]).float()
        probs[seq] = math.exp(float((logp * picked).sum()))
    return probs


def test_unseeded_sampling_keeps_the_target_distribution(tiny_checkpoint) -> None:
    folder = tiny_checkpoint()
    _, spec = tiny_llms(folder, max_num_seqs=256)
    prompt = [A, B, A, B, A, B, A, B, A]
    params = SamplingParams(
        temperature=1.0, top_k=2, max_tokens=NUM_OUTPUT, logit_bias={A: 30.0, B: 30.0}
    )
    outputs = spec.generate([prompt] * NUM_SAMPLES, params)
    seen = counters(spec)
    assert 0 < seen.num_accepted_tokens < seen.num_draft_tokens
    expected = exact_distribution(prompt, 30.0, 2)
    assert sum(expected.values()) == pytest.approx(1.0, abs=1e-5)
    observed = dict.fromkeys(expected, 0)
    for seq in tokens(outputs):
        observed[tuple(seq)] += 1
    chi2 = sum(
        (observed[s] - NUM_SAMPLES * p) ** 2 / (NUM_SAMPLES * p) for s, p in expected.items()
    )
    assert min(expected.values()) * NUM_SAMPLES > 5  # the test's approximation holds
    assert chi2 < CHI2_CRITICAL, (chi2, observed, expected)


# -- the real model --------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_greedy_identical_with_speculation(default_source, tmp_path) -> None:
    args = {"kv_cache_memory": "256MiB", "dtype": "float32", "max_model_len": 2048}
    plain, spec = LLM(**args), LLM(speculative_config=NGRAM, **args)
    tok = plain.tokenizer
    asks = [
        f"Repeat the following paragraph exactly, word for word:\n\n{PARAGRAPH}",
        f"Rewrite this paragraph with 'lighthouse' replaced by 'tower':\n\n{PARAGRAPH}",
        "What is the capital of Japan?",
    ]
    prompts = [tok.apply_chat_template([{"role": "user", "content": a}]) for a in asks]
    params = SamplingParams(temperature=0.0, max_tokens=64, logprobs=5)
    want = plain.generate(prompts, params)
    got = spec.generate(prompts, params)
    assert tokens(got) == tokens(want)
    seen = counters(spec)
    assert seen.num_accepted_tokens > 0.5 * seen.num_draft_tokens > 0  # it copies well
    # and against Hugging Face, with vLLM's tolerance for near-ties
    folder = export_hf_folder(default_source, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    refs = hf_greedy(hf, prompts, 64, plain.runner.model_config.eos_token_ids[0])
    for ours, ref in zip(got, refs, strict=True):
        assert not compare(ours.outputs[0].token_ids, ours.outputs[0].logprobs, ref)
