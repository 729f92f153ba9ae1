"""Disaggregated serving end to end: a real core, real workers, real sockets and KV transfers."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from engine_harness import EngineHarness, worker_pid

from engine_core.messages.config import EngineConfig
from models.tokenizer import Tokenizer

MAX_TOKENS = 12
TOPICS = ["the sea", "volcanoes", "bread", "chess", "owls", "trains", "rain", "copper"]
Factory = Callable[[EngineConfig], EngineHarness]
# float32: disaggregated greedy tokens equal colocated ones (other batch shapes) only there
SMALL = {"kv_cache_memory": 192 * 2**20, "max_model_len": 1024, "max_num_batched_tokens": 256,
         "dtype": "float32"}  # fmt: skip


def prompts(tokenizer: Tokenizer, count: int) -> dict[str, list[int]]:
    """Chats of varied length; every fourth is long enough to be prefilled in chunks."""
    chats = {}
    for i in range(count):
        text = f"Tell me one fact about {TOPICS[i % len(TOPICS)]}. Keep it short, number {i}."
        if i % 4 == 3:
            text = "Here are my notes: " + " ".join(TOPICS * 6) + ". " + text
        chats[f"r{i}"] = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True
        )
    return chats


def run(
    config: EngineConfig, chats: dict[str, list[int]]
) -> tuple[dict[str, list[int]], EngineHarness]:
    harness = EngineHarness(config)
    try:
        return harness.generate(chats, MAX_TOKENS), harness
    finally:
        harness.close()


@pytest.fixture(scope="module")
def chats(default_tokenizer: Tokenizer) -> dict[str, list[int]]:
    return prompts(default_tokenizer, 32)


@pytest.fixture(scope="module")
def reference(chats: dict[str, list[int]]) -> dict[str, list[int]]:
    """Colocated greedy outputs: what every disaggregated run must reproduce."""
    outputs, _ = run(EngineConfig(colocated=True, **SMALL), chats)
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("connector", ["shm", "torch", "tcp"])
def test_greedy_outputs_match_colocated(
    connector: str, chats: dict[str, list[int]], reference: dict[str, list[int]]
) -> None:
    outputs, harness = run(EngineConfig(colocated=False, kv_connector=connector, **SMALL), chats)
    assert outputs == reference
    assert all(len(tokens) == MAX_TOKENS for tokens in outputs.values())
    stats = harness.stats
    assert stats.kv_transfer_bytes > 0 and stats.kv_transfer_failures == 0
    assert stats.recomputed_prefills == 0
    assert set(stats.kv_cache_usage) == {"prefill-0", "decode-0"}


def test_two_prefill_and_two_decode_workers_share_the_load(
    tiny_checkpoint: Callable[..., Path], default_tokenizer: Tokenizer
) -> None:
    config = EngineConfig(model=str(tiny_checkpoint()), colocated=False, prefill_workers=2, decode_workers=2,
                          kv_connector="tcp", **SMALL)  # fmt: skip
    chats = prompts(default_tokenizer, 16)
    harness = EngineHarness(config)
    try:
        outputs = harness.generate(chats, 4)
        stats = harness.wait_stats(lambda s: s.num_running == 0)
    finally:
        harness.close()
    assert all(len(tokens) == 4 for tokens in outputs.values())
    taken = stats.worker_requests
    assert set(taken) == {"prefill-0", "prefill-1", "decode-0", "decode-1"}, taken
    assert all(count > 0 for count in taken.values()), taken
    assert sum(taken[w] for w in ("decode-0", "decode-1")) == 16


@pytest.fixture
def harness_factory() -> Iterator[Factory]:
    made: list[EngineHarness] = []

    def make(config: EngineConfig) -> EngineHarness:
        made.append(EngineHarness(config))
        return made[-1]

    yield make
    for harness in made:
        harness.close()


@pytest.mark.slow
def test_abort_during_transfer_leaks_no_blocks(
    harness_factory: Factory, default_tokenizer: Tokenizer
) -> None:
    harness = harness_factory(EngineConfig(colocated=False, kv_connector="tcp", **SMALL))
    long_text = " ".join(TOPICS * 40)
    for i in range(6):
        chat = [{"role": "user", "content": f"{i}: {long_text}"}]
        harness.add(
            f"a{i}", default_tokenizer.apply_chat_template(chat, add_generation_prompt=True), 50
        )
    aborted: set[str] = set()
    deadline = time.monotonic() + 120
    while len(aborted) < 6 and time.monotonic() < deadline:
        harness.pump(0.01)
        # NOTE: the first token streams before the KV moves: aborting now hits the transfer
        started = {r for r, tokens in harness.tokens.items() if tokens} - aborted
        if started:
            harness.abort(sorted(started))
            aborted |= started
        if len(aborted) >= 3 and len(aborted) < 6:
            harness.abort([f"a{i}" for i in range(6)])  # the rest mid-prefill or queued
            aborted = {f"a{i}" for i in range(6)}
    stats = harness.wait_stats(lambda s: s.num_running == 0 and s.num_waiting == 0)
    stats = harness.wait_stats(lambda s: all(u == 0.0 for u in s.kv_cache_usage.values()))
    assert set(stats.kv_cache_usage) == {"prefill-0", "decode-0"}
    harness.tokens.clear()
    harness.finished.clear()
    assert len(harness.generate({"after": [1, 2, 3, 4]}, 3)["after"]) == 3  # still serving


@pytest.mark.slow
@pytest.mark.parametrize(("colocated", "victim"), [(False, "decode-0"), (True, "worker-0")])
def test_kill_9_of_the_decode_worker_loses_no_stream(
    harness_factory: Factory,
    chats: dict[str, list[int]],
    reference: dict[str, list[int]],
    colocated: bool,
    victim: str,
) -> None:
    harness = harness_factory(EngineConfig(colocated=colocated, **SMALL))
    streams = dict(list(chats.items())[:16])
    for request_id, prompt in streams.items():
        harness.add(request_id, prompt, MAX_TOKENS)
    deadline = time.monotonic() + 120
    while not all(len(harness.tokens[r]) >= 2 for r in streams):
        assert time.monotonic() < deadline
        harness.pump(0.05)
    os.kill(worker_pid(victim, harness.core.pid), signal.SIGKILL)
    assert len(harness.finished) < len(streams) - 4  # the kill hit live streams
    harness.wait_all()
    assert harness.finished == dict.fromkeys(streams, "length")
    assert {r: harness.tokens[r] for r in streams} == {r: reference[r] for r in streams}
    if not colocated:
        assert harness.stats.recomputed_prefills > 0
        assert "decode-1" in harness.stats.kv_cache_usage  # the replacement
