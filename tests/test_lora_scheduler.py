"""LoRA in the scheduler, GPU-free: the adapter in the block hash, --max-loras per step."""

from __future__ import annotations

from test_scheduler import make_scheduler, result_for

from engine_core.messages.frontend import AddRequest
from engine_core.messages.lora import LoRARef
from engine_core.messages.sampling_params import SamplingParams
from engine_core.scheduler import Scheduler

A = LoRARef("a", "/adapters/a")
B = LoRARef("b", "/adapters/b")
C = LoRARef("c", "/adapters/c")
PROMPT = list(range(18))  # 4 full blocks of 4, and 2 tokens


def add(sched: Scheduler, req_id: str, lora: LoRARef | None, prompt: list[int] = PROMPT) -> None:
    msg = AddRequest(req_id, prompt, SamplingParams(max_tokens=1), 0.0, lora=lora)
    assert sched.add_request(msg) is None


def run(sched: Scheduler, req_id: str, lora: LoRARef | None) -> int:
    """Serve one request to its end alone; returns its prefix-cache hit in tokens."""
    add(sched, req_id, lora)
    out = sched.schedule()
    (new,) = out.plan.new_requests
    assert new.lora == lora  # the worker is told which adapter
    (delta,) = sched.update_from_output(out, result_for(out))
    assert delta.finish_reason is not None
    return delta.num_cached_tokens


def test_blocks_are_never_shared_across_adapters() -> None:
    sched = make_scheduler(num_blocks=40, max_loras=2)
    full = 16  # 4 blocks; the last prompt token is always recomputed
    hits = [run(sched, f"r{i}", lora) for i, lora in enumerate([None, A, A, B, None, B])]
    assert hits == [0, 0, full, 0, full, full]
    stats = sched.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (6 * 18, 3 * full)
    # three copies of the prompt's 4 full blocks stay cached (base, a, b), nothing more
    assert len(sched.pools["mixed"].pool.cached) == 3 * 4


def test_the_same_name_at_another_path_is_another_adapter() -> None:
    sched = make_scheduler(num_blocks=40, max_loras=2)
    assert run(sched, "x", A) == 0
    assert run(sched, "y", LoRARef("a", "/adapters/a-v2")) == 0


def test_max_loras_caps_distinct_adapters_per_step_and_lets_others_pass() -> None:
    sched = make_scheduler(num_blocks=40, max_loras=2)
    for req_id, lora in [("a1", A), ("b1", B), ("c1", C), ("base", None), ("a2", A)]:
        add(sched, req_id, lora, [1, 2, 3])
    plan = sched.schedule().plan
    # c1 waits for a free adapter slot; the base request and a2 behind it still run
    assert [n.req_id for n in plan.new_requests] == ["a1", "b1", "base", "a2"]
    stats = sched.stats()
    assert (stats.running_loras, stats.waiting_loras) == ({"a": 2, "b": 1}, {"c": 1})


def test_an_adapter_gets_its_turn_when_one_finishes() -> None:
    sched = make_scheduler(num_blocks=40, max_loras=1)
    add(sched, "a1", A, [1, 2, 3])
    add(sched, "b1", B, [1, 2, 3])
    out = sched.schedule()
    assert [n.req_id for n in out.plan.new_requests] == ["a1"]
    sched.update_from_output(out, result_for(out))  # a1 finishes (max_tokens=1)
    assert [n.req_id for n in sched.schedule().plan.new_requests] == ["b1"]


def test_lora_requests_are_refused_when_lora_is_off() -> None:
    sched = make_scheduler()
    msg = AddRequest("x", [1, 2], SamplingParams(), 0.0, lora=A)
    delta = sched.add_request(msg)
    assert delta is not None and "--enable-lora" in (delta.error or "")


def test_a_preempted_request_resumes_with_its_adapter() -> None:
    sched = make_scheduler(num_blocks=5, max_model_len=16, max_loras=2)  # 4 blocks of 4
    for req_id, lora in [("a", A), ("b", B)]:
        msg = AddRequest(req_id, [1] * 7, SamplingParams(max_tokens=8, ignore_eos=True), 0.0,
                         lora=lora)  # fmt: skip
        assert sched.add_request(msg) is None
    resumed = []
    for _ in range(30):
        out = sched.schedule()
        resumed += [n for n in out.plan.new_requests if n.req_id == "b" and sched.num_preemptions]
        sched.update_from_output(out, result_for(out))
        if not sched.has_unfinished_requests():
            break
    assert sched.num_preemptions >= 1 and resumed
    assert all(n.lora == B for n in resumed)
