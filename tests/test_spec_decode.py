"""n-gram speculative decoding in the core, GPU-free: config, proposer, block accounting,
stops inside accepted drafts (schedule, feed a hand-made StepResult, update, assert)."""

from __future__ import annotations

import pytest

from engine_core.messages.common import FinishReason, TokenLogprobs
from engine_core.messages.config import EngineConfig
from engine_core.messages.frontend import AddRequest, RequestDelta
from engine_core.messages.sampling_params import SamplingParams
from engine_core.messages.speculative import SpeculativeConfig, parse_speculative_config
from engine_core.messages.worker import StepResult
from engine_core.request import hash_block_tokens
from engine_core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine_core.spec_decode import NgramSpeculator, propose_ngram

EOS = 99
BS = 4
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}  # fmt: skip


# -- configuration ---------------------------------------------------------------------


def test_config_parses_as_vllm_does() -> None:
    text = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
    assert parse_speculative_config(text) == SpeculativeConfig(
        num_speculative_tokens=4, prompt_lookup_max=4, prompt_lookup_min=2
    )
    # vLLM's defaults for the lookup bounds, and its "[ngram]" model spelling
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3}) == (
        SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=5, prompt_lookup_min=5)
    )
    only_max = parse_speculative_config(
        {"model": "[ngram]", "num_speculative_tokens": 2, "prompt_lookup_max": 3}
    )
    assert only_max is not None and only_max.prompt_lookup_min == 3
    assert parse_speculative_config(None) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"method": "ngram"', "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "'eagle' is not supported"),
        ({"method": "ngram"}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": "4"}, "must be an integer"),
        ({**NGRAM, "prompt_lookup_min": 5}, "prompt_lookup_min=5 must be <="),
        ({**NGRAM, "prompt_lookup_min": 0}, "at least 1"),
        ({**NGRAM, "draft_tensor_parallel_size": 1}, "unknown fields: draft_tensor"),
    ],
)
def test_bad_config_is_one_clear_error(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_speculative_config(value)
    with pytest.raises(ValueError, match=message):  # as the offline LLM(...) passes it
        EngineConfig(speculative_config=value)


# -- the proposer ----------------------------------------------------------------------


def test_proposer_follows_vllm() -> None:
    # vLLM's docstring example: [4,2,3] has no earlier match, [2,3] does; 3 tokens follow
    assert propose_ngram([1, 2, 3, 4, 2, 3], 2, 3, 4) == [4, 2, 3]
    # the longest n-gram wins over an earlier shorter one
    assert propose_ngram([1, 2, 5, 9, 1, 2, 6, 9, 1, 2], 2, 3, 4) == [6, 9, 1, 2]
    # among equally long matches, the earliest
    assert propose_ngram([1, 2, 7, 1, 2, 8, 1, 2], 2, 2, 2) == [7, 1]
    # overlapping the suffix itself is allowed: a run proposes more of the run
    assert propose_ngram([5, 5, 5], 2, 4, 4) == [5]
    assert propose_ngram([1, 2, 3, 4], 2, 4, 4) == []
    assert propose_ngram([1, 2, 1, 2], 2, 4, 0) == []


def test_proposer_caps_drafts_at_max_tokens_and_max_model_len() -> None:
    sched = make_scheduler(max_model_len=12)
    add(sched, "a", [1, 2, 3, 4, 1, 2, 3, 4], max_tokens=3)
    step(sched, "a", [1])
    request = sched.requests["a"]
    assert sched.speculator is not None
    # one output so far; max_tokens=3 leaves room for one draft plus the sampled token
    assert sched.speculator.propose(request, max_drafts=8) == [2]
    request.sampling_params.max_tokens = None
    assert sched.speculator.propose(request, max_drafts=8) == [2, 3, 4]  # positions 8..11
    assert sched.speculator.propose(request, max_drafts=2) == [2, 3]  # the token budget


# -- scheduling, roll-back and block accounting ----------------------------------------


def make_scheduler(spec: bool = True, num_blocks: int = 20, **overrides: object) -> Scheduler:
    options: dict = {"max_model_len": 64, "block_size": BS, **overrides}
    config = SchedulerConfig(**options)
    speculator = None
    if spec:
        speculator = NgramSpeculator(parse_speculative_config(NGRAM), config.max_model_len)
    return Scheduler(config, num_blocks, eos_token_ids=[EOS], speculator=speculator)


def add(sched: Scheduler, req_id: str, prompt: list[int], **params: object) -> None:
    assert sched.add_request(AddRequest(req_id, prompt, SamplingParams(**params), 0.0)) is None


def step(
    sched: Scheduler,
    req_id: str,
    tokens: list[int],
    logprobs: bool = False,
) -> tuple[SchedulerOutput, RequestDelta]:
    """Schedule, then answer as a worker that emitted `tokens` (accepted drafts + one)."""
    out = sched.schedule()
    *accepted, last = tokens
    result = StepResult(out.plan.step_id, [req_id], [last])
    if accepted:
        result.accepted_token_ids = {req_id: accepted}
    if logprobs:
        result.logprobs = [lp(last)]
        result.accepted_logprobs = {req_id: [lp(t) for t in accepted]} if accepted else {}
    (delta,) = sched.update_from_output(out, result)
    return out, delta


def lp(token: int) -> TokenLogprobs:
    return TokenLogprobs([token], [-0.5], 1)


def blocks_held(sched: Scheduler, req_id: str) -> int:
    return len(sched.pools["mixed"].get_block_ids(sched.requests[req_id]))


def blocks_in_use(sched: Scheduler) -> int:
    pool = sched.pools["mixed"].pool
    return pool.num_blocks - 1 - pool.num_free_blocks


def test_drafts_are_scheduled_with_their_blocks() -> None:
    sched = make_scheduler()
    add(sched, "a", [1, 2, 3, 4, 1, 2, 3, 4])
    first, _ = step(sched, "a", [1])
    assert first.plan.spec_token_ids == {}  # no drafts in a prefill
    out = sched.schedule()
    assert out.plan.spec_token_ids == {"a": [2, 3, 4, 1]}
    assert out.plan.num_scheduled_tokens == {"a": 5}  # the sampled token plus 4 drafts
    assert out.sampling_req_ids == {"a"}
    # positions 8..12 -> 13 tokens -> 4 blocks, 2 of them new
    assert [len(c.new_block_ids) for c in out.plan.cached_requests] == [2]
    assert blocks_held(sched, "a") == 4


def test_rejected_drafts_free_their_blocks_exactly() -> None:
    spec, plain = make_scheduler(), make_scheduler(spec=False)
    for sched in (spec, plain):
        add(sched, "a", [1, 2, 3, 4, 1, 2, 3, 4])
        step(sched, "a", [1])
    out, delta = step(spec, "a", [9])  # every draft rejected; 9 sampled at position 8
    assert out.plan.spec_token_ids == {"a": [2, 3, 4, 1]}
    step(plain, "a", [9])
    request = spec.requests["a"]
    assert (delta.new_token_ids, request.num_computed_tokens, request.num_tokens) == ([9], 9, 10)
    # 9 computed tokens need 3 blocks: the 4th, allocated for drafts only, is free again
    assert blocks_held(spec, "a") == blocks_in_use(spec) == 3
    assert blocks_in_use(spec) == blocks_in_use(plain)
    assert spec.speculator is not None
    assert spec.speculator.counters.num_drafts == 1
    assert spec.speculator.counters.num_accepted_tokens == 0


def test_partly_accepted_drafts_advance_and_hash_only_accepted_tokens() -> None:
    sched = make_scheduler()
    add(sched, "a", [1, 2, 3, 4, 1, 2, 3, 4])
    step(sched, "a", [1])
    _, delta = step(sched, "a", [2, 3, 7])  # drafts [2, 3, 4, 1]: two held, then 7
    request = sched.requests["a"]
    assert delta.new_token_ids == [2, 3, 7]
    assert request.output_token_ids == [1, 2, 3, 7]
    assert (request.num_computed_tokens, request.num_tokens) == (11, 12)
    assert blocks_held(sched, "a") == 3 == blocks_in_use(sched)
    # the third block's tokens are [1, 2, 3, 7], never the draft's [1, 2, 3, 4]
    tokens = request.all_token_ids
    hashes = [hash_block_tokens(None, tokens[:4])]
    for index in (1, 2):
        hashes.append(hash_block_tokens(hashes[-1], tokens[index * 4 : index * 4 + 4]))
    assert request.block_hashes == hashes
    cached = sched.pools["mixed"].pool.cached
    assert set(cached) == set(hashes[:2])  # the third block is not computed yet
    drafted = hash_block_tokens(hashes[1], [1, 2, 3, 4])
    assert drafted not in cached
    counters = sched.speculator.counters if sched.speculator else None
    assert counters is not None and counters.accepted_per_pos == [1, 1, 0, 0]


def test_fully_accepted_drafts_emit_the_bonus_token() -> None:
    sched = make_scheduler()
    add(sched, "a", [1, 2, 3, 4, 1, 2, 3, 4], logprobs=0)
    step(sched, "a", [1])
    _, delta = step(sched, "a", [2, 3, 4, 1, 5], logprobs=True)
    request = sched.requests["a"]
    assert delta.new_token_ids == [2, 3, 4, 1, 5]
    assert delta.new_logprobs is not None
    assert [e.token_ids[0] for e in delta.new_logprobs] == [2, 3, 4, 1, 5]
    assert (request.num_computed_tokens, blocks_held(sched, "a")) == (13, 4)
    assert len(sched.pools["mixed"].pool.cached) == 3


@pytest.mark.parametrize(
    ("prompt", "params", "emitted", "reason", "stop_reason"),
    [
        # drafts [99, 3, 4, 1]: EOS is the first accepted one
        ([1, 99, 3, 4, 1, 99, 3, 4], {}, [99], FinishReason.STOP, None),
        ([1, 2, 3, 4, 1, 2, 3, 4], {"stop_token_ids": [3]}, [2, 3], FinishReason.STOP, 3),
        # drafts are capped to [2, 3]: with the sampled token that is the 4th output
        ([1, 2, 3, 4, 1, 2, 3, 4], {"max_tokens": 4}, [2, 3, 5], FinishReason.LENGTH, None),
    ],
)
def test_a_stop_inside_accepted_drafts_cuts_the_output_there(
    prompt: list[int],
    params: dict,
    emitted: list[int],
    reason: FinishReason,
    stop_reason: int | None,
) -> None:
    sched = make_scheduler()
    add(sched, "a", prompt, logprobs=0, **params)
    step(sched, "a", [1])
    out = sched.schedule()
    drafts = out.plan.spec_token_ids["a"]
    result = StepResult(out.plan.step_id, ["a"], [5], logprobs=[lp(5)])
    result.accepted_token_ids = {"a": drafts}
    result.accepted_logprobs = {"a": [lp(t) for t in drafts]}
    (delta,) = sched.update_from_output(out, result)
    assert delta.new_token_ids == emitted
    assert delta.new_logprobs is not None and len(delta.new_logprobs) == len(emitted)
    assert (delta.finish_reason, delta.stop_reason) == (reason, stop_reason)
    assert blocks_in_use(sched) == 0 and not sched.requests


def test_max_model_len_cuts_accepted_drafts() -> None:
    sched = make_scheduler(max_model_len=12)
    add(sched, "a", [1, 2, 3, 4, 1, 2, 3, 4])
    step(sched, "a", [1])
    out, delta = step(sched, "a", [2, 3, 4, 5])
    assert out.plan.spec_token_ids == {"a": [2, 3, 4]}  # the last position is 11
    assert (delta.new_token_ids, delta.finish_reason) == ([2, 3, 4], FinishReason.LENGTH)


def test_a_result_accepting_tokens_never_drafted_fails_the_step() -> None:
    sched = make_scheduler()
    add(sched, "a", [1, 2, 3, 4, 1, 2, 3, 4])
    step(sched, "a", [1])
    out = sched.schedule()
    result = StepResult(out.plan.step_id, ["a"], [5], accepted_token_ids={"a": [2, 8]})
    assert sched.update_from_output(out, result) == []  # requeued, to be recomputed alone
    assert sched.requests["a"].suspect and blocks_in_use(sched) == 0


def test_drafts_never_preempt() -> None:
    # 4 usable blocks: "a" takes 2, "b" 1; a's drafts would need 2 more, its decode 1
    sched = make_scheduler(num_blocks=5, max_model_len=16)
    add(sched, "a", [1, 2, 3, 4, 1, 2, 3, 4])
    add(sched, "b", [5, 6, 7])
    for _ in range(2):
        out = sched.schedule()
        result = StepResult(out.plan.step_id, ["a", "b"], [1, 5])
        sched.update_from_output(out, result)
    assert out.plan.spec_token_ids == {}
    assert out.plan.num_scheduled_tokens == {"a": 1, "b": 1}
    assert sched.num_preemptions == 0 and blocks_in_use(sched) == 4


@pytest.mark.parametrize(("num_blocks", "drafted"), [(5, False), (6, True)])
def test_drafts_never_take_the_block_a_later_decode_needs(num_blocks: int, drafted: bool) -> None:
    # "a" holds 2 blocks and its drafts [2, 3, 1] need a 3rd; "b" holds 1 and its decode
    # needs a 2nd: with 4 usable blocks only one of them can have its block
    sched = make_scheduler(num_blocks=num_blocks, max_model_len=16)
    add(sched, "a", [1, 2, 3, 1, 2, 3])
    add(sched, "b", [5, 6, 7, 8])
    out = sched.schedule()
    sched.update_from_output(out, StepResult(out.plan.step_id, ["a", "b"], [1, 5]))
    out = sched.schedule()
    assert out.plan.spec_token_ids == ({"a": [2, 3, 1]} if drafted else {})
    assert out.plan.num_scheduled_tokens == {"a": 4 if drafted else 1, "b": 1}
    assert sched.num_preemptions == 0


def test_prefill_schedulers_never_speculate() -> None:
    from engine_core.scheduler import scheduler_for
    from models.config import ModelConfig

    config = EngineConfig(speculative_config=NGRAM)
    model = ModelConfig(
        architecture="llama", vocab_size=128, hidden_size=8, intermediate_size=8,
        num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=8,
        rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=64,
        tie_word_embeddings=False, eos_token_ids=(EOS,),
    )  # fmt: skip
    assert scheduler_for(config, model, 64, 64, "prefill").speculator is None
    assert scheduler_for(config, model, 64, 64, "decode").speculator is not None
    assert scheduler_for(EngineConfig(), model, 64, 64, "mixed").speculator is None
