"""The scheduler's side of prompt logprobs: chunks accumulate, delivered once, no cache hits."""

from __future__ import annotations

from test_scheduler import add, make_scheduler, result_for

from engine_core.messages.common import TokenLogprobs
from engine_core.scheduler import Scheduler


def scored(positions: range) -> list[TokenLogprobs]:
    """A stand-in worker's entries: position p's logprob is -p, so order shows."""
    return [TokenLogprobs([p + 1], [-float(p)], 1) for p in positions]


def run_chunked(sched: Scheduler, req_id: str, prompt_len: int) -> list:
    """Step until `req_id` samples, scoring each chunk as the worker does; its deltas."""
    deltas = []
    while not deltas:
        out = sched.schedule()
        start = sched.requests[req_id].num_computed_tokens
        end = start + out.plan.num_scheduled_tokens[req_id]
        result = result_for(out)
        result.prompt_logprobs = {req_id: scored(range(start, min(end, prompt_len - 1)))}
        deltas = sched.update_from_output(out, result)
    return deltas


def test_chunks_accumulate_and_arrive_once_with_the_first_token() -> None:
    sched = make_scheduler(max_num_batched_tokens=5, max_model_len=64, num_blocks=20)
    prompt = list(range(1, 14))  # 13 tokens: chunks of 5, 5, 3
    add(sched, "a", prompt, prompt_logprobs=0, max_tokens=3)
    (first,) = run_chunked(sched, "a", len(prompt))
    assert first.prompt_logprobs == scored(range(12))
    out = sched.schedule()
    (second,) = sched.update_from_output(out, result_for(out))
    assert second.new_token_ids == [7] and second.prompt_logprobs is None


def test_a_prompt_logprobs_request_takes_no_prefix_cache_hits() -> None:
    sched = make_scheduler(max_model_len=64, num_blocks=20)
    prompt = list(range(1, 14))
    add(sched, "warm", prompt, max_tokens=1)
    run_chunked(sched, "warm", len(prompt))
    add(sched, "scored", prompt, prompt_logprobs=1, max_tokens=1)
    out = sched.schedule()
    (new,) = out.plan.new_requests
    assert new.num_computed_tokens == 0 and out.plan.num_scheduled_tokens["scored"] == 13
    add(sched, "plain", prompt, max_tokens=1)
    sched.update_from_output(out, result_for(out))
    (plain,) = sched.schedule().plan.new_requests
    assert plain.num_computed_tokens == 12  # all full blocks but the last token's
