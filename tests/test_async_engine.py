"""Async scheduling end to end: a real core and worker, outputs identical to sync scheduling.

Tiny random checkpoints under a small KV pool (so requests are preempted), greedy and
seeded sampling, stops that land in the overlapped step, aborts, a killed worker; then
the real model in fp32, and a real server streaming through the official openai client.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from engine_harness import EngineHarness, worker_pid
from server_process import running_server

from engine_core import LLM
from engine_core.messages.config import EngineConfig
from engine_core.messages.framing import encode
from engine_core.messages.frontend import AddRequest, FrontendMsg
from engine_core.messages.sampling_params import SamplingParams
from models.loader import resolve_model
from models.tokenizer import load_tokenizer

# a 2-layer model with 4 KV heads of 16: 16 KiB per 16-token block, so 12 blocks here; a
# small token budget chunks prompts, so chunks are planned behind chunks too
SMALL_POOL = {"kv_cache_memory": 12 * 16 * 1024, "max_model_len": 128, "dtype": "float32",
              "max_num_batched_tokens": 24}  # fmt: skip
Run = tuple[dict[str, list[int]], dict[str, str]]  # (tokens, finish reasons) by request


def send(h: EngineHarness, request_id: str, prompt: list[int], params: SamplingParams) -> None:
    h.tokens[request_id] = []
    h.sock.send_multipart(encode(FrontendMsg.ADD, AddRequest(request_id, prompt, params, 0.0)))


def prompts() -> dict[str, list[int]]:
    return {f"r{i}": [1, *range(200 + 11 * i, 200 + 11 * i + 6 + 5 * (i % 5))] for i in range(10)}


@pytest.fixture(scope="module")
def folder(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint(num_heads=4, num_kv_heads=4)


@pytest.fixture(scope="module")
def requests(folder: Path) -> dict[str, tuple[list[int], SamplingParams]]:
    """Greedy and seeded requests of several lengths; some stop at a token they produce
    (found with the offline LLM), so a stop lands mid-stream."""
    llm = LLM(str(folder), dtype="float32", kv_cache_memory="8MiB")
    out: dict[str, tuple[list[int], SamplingParams]] = {}
    for i, (req_id, prompt) in enumerate(prompts().items()):
        params = SamplingParams(temperature=0.0 if i % 2 else 0.9, seed=i, max_tokens=10 + 7 * i)
        if i % 3 == 0:
            produced = llm.generate([prompt], params)[0].outputs[0].token_ids
            params = SamplingParams(
                temperature=params.temperature, seed=i, max_tokens=params.max_tokens,
                stop_token_ids=[produced[3 + i % 4]],
            )  # fmt: skip
        out[req_id] = (prompt, params)
    long_prompt = [1, *range(600, 660)]
    out["scored"] = (long_prompt, SamplingParams(temperature=0.0, max_tokens=6, prompt_logprobs=2))
    return out


@pytest.fixture
def harness(folder: Path) -> Iterator[Callable[..., EngineHarness]]:
    made: list[EngineHarness] = []

    def make(**config: object) -> EngineHarness:
        made.append(EngineHarness(EngineConfig(model=str(folder), **{**SMALL_POOL, **config})))
        return made[-1]

    yield make
    for h in made:
        h.close()


def run(h: EngineHarness, requests: dict, abort: str | None = None) -> Run:
    for req_id, (prompt, params) in requests.items():
        send(h, req_id, prompt, params)
    if abort is not None:
        wait_for_tokens(h, abort, 3)
        h.abort([abort])
        h.finished[abort] = "abort"
    h.wait_all()
    # every block is back in the pool once nothing runs (cached ones count as free)
    h.wait_stats(lambda s: s.num_running == 0 and not any(s.kv_cache_usage.values()))
    return dict(h.tokens), dict(h.finished)


def wait_for_tokens(h: EngineHarness, req_id: str, count: int) -> None:
    deadline = time.monotonic() + 120
    while len(h.tokens[req_id]) < count:
        assert time.monotonic() < deadline and req_id not in h.finished
        h.pump(0.02)


@pytest.fixture(scope="module")
def sync_harness(folder: Path, requests: dict) -> Iterator[tuple[EngineHarness, Run]]:
    h = EngineHarness(EngineConfig(model=str(folder), **SMALL_POOL))
    try:
        yield h, run(h, requests)
    finally:
        h.close()


@pytest.fixture(scope="module")
def sync_run(sync_harness: tuple[EngineHarness, Run]) -> Run:
    return sync_harness[1]


@pytest.fixture(scope="module")
def sync_prompt_logprobs(sync_harness: tuple[EngineHarness, Run]) -> list:
    return sync_harness[0].prompt_logprobs["scored"]


def test_async_outputs_equal_sync_ones_under_preemption(
    harness, requests, sync_run, sync_prompt_logprobs, capfd: pytest.CaptureFixture
) -> None:
    h = harness(async_scheduling=True)
    tokens, finished = run(h, requests)
    assert (tokens, finished) == sync_run
    assert {"stop", "length"} <= set(finished.values())
    assert h.stats.num_preemptions > 0
    assert "async scheduling: planning one step ahead" in capfd.readouterr().err
    scored = h.prompt_logprobs["scored"]
    assert len(scored) == len(requests["scored"][0]) - 1
    assert [(e.token_ids, e.rank) for e in scored] == [
        (e.token_ids, e.rank) for e in sync_prompt_logprobs
    ]
    for mine, theirs in zip(scored, sync_prompt_logprobs, strict=True):
        assert mine.logprobs == pytest.approx(theirs.logprobs, abs=1e-4)


def test_an_abort_mid_stream_leaves_the_others_exact(harness, requests, sync_run) -> None:
    h = harness(async_scheduling=True)
    # r8 has no stop token and 66 tokens to go: an abort after its third is always mid-stream
    tokens, finished = run(h, requests, abort="r8")
    assert finished["r8"] == "abort" and len(tokens["r8"]) < len(sync_run[0]["r8"])
    others = [r for r in requests if r != "r8"]
    assert {r: tokens[r] for r in others} == {r: sync_run[0][r] for r in others}


def test_a_worker_killed_during_async_steps_is_recomputed_exactly(
    harness, requests, sync_run
) -> None:
    h = harness(async_scheduling=True)
    for req_id, (prompt, params) in requests.items():
        send(h, req_id, prompt, params)
    wait_for_tokens(h, "r1", 4)
    os.kill(worker_pid("worker-0", h.core.pid), signal.SIGKILL)
    assert len(h.finished) < len(requests)  # the kill hit live streams
    h.wait_all()
    assert (h.tokens, h.finished) == sync_run
    assert h.stats.recomputed_prefills > 0


@pytest.mark.slow
def test_the_real_model_in_fp32_is_token_identical(capfd: pytest.CaptureFixture) -> None:
    tokenizer = load_tokenizer(resolve_model(None))
    questions = ["What is the capital of Japan?", "Name three primary colors.",
                 "Write a haiku about the sea.", "What is 12 times 12?"]  # fmt: skip
    requests = {}
    for i, question in enumerate(questions):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}])
        params = SamplingParams(temperature=0.0 if i % 2 == 0 else 0.8, seed=i, max_tokens=40)
        requests[f"q{i}"] = (prompt, params)
    runs = []
    for async_scheduling in (False, True):
        config = EngineConfig(dtype="float32", kv_cache_memory=64 * 2**20, max_model_len=512,
                              async_scheduling=async_scheduling)  # fmt: skip
        h = EngineHarness(config)
        try:
            runs.append(run(h, requests))
        finally:
            h.close()
    assert runs[1] == runs[0]
    assert "async scheduling: planning one step ahead" in capfd.readouterr().err
    assert runs[0][0]["q0"][-1] in tokenizer.eos_token_ids  # stopped at EOS, not length


def test_a_server_with_async_scheduling_streams_to_the_openai_client(
    folder: Path, tmp_path: Path
) -> None:
    args = [str(folder), "--dtype", "float32", "--async-scheduling", "--max-model-len", "256"]
    with running_server(args, tmp_path / "duet.log") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        kwargs = {"model": model, "prompt": "Once upon a time", "max_tokens": 12,
                  "temperature": 0.0}  # fmt: skip
        whole = client.completions.create(**kwargs)
        stream = client.completions.create(**kwargs, stream=True)
        pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert "".join(pieces) == whole.choices[0].text and len(pieces) > 1
    assert whole.usage.completion_tokens == 12
    assert "async scheduling: planning one step ahead" in (tmp_path / "duet.log").read_text()
