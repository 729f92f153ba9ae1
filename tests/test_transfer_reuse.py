"""P/D hand-off moves only the blocks the decode worker's prefix cache lacks."""

from __future__ import annotations

import pytest
import torch
from engine_harness import EngineHarness

from engine_core.kv_cache_manager import KVCacheManager, Reserved
from engine_core.messages.config import EngineConfig
from engine_core.messages.sampling_params import SamplingParams
from engine_core.request import Request
from models.loader import load_config, resolve_model
from models.runner import kv_block_bytes
from models.tokenizer import Tokenizer

BS = 4


def request(req_id: str, prompt: list[int]) -> Request:
    return Request(req_id, prompt, SamplingParams(), BS)


def landed_and_ran(pool: KVCacheManager, req: Request) -> None:
    """What the decode side does once the KV is in: the request runs a step there."""
    req.num_computed_tokens = req.num_tokens
    pool.cache_blocks(req)


def test_reserve_reuses_the_cached_prefix_and_counts_references() -> None:
    pool = KVCacheManager(20, BS)
    a = request("a", list(range(1, 11)))  # 10 tokens: blocks [1-4] [5-8] [9 10]
    first = pool.reserve(a, a.num_tokens)
    assert first is not None and first.num_reused == 0 and len(first.block_ids) == 3
    landed_and_ran(pool, a)
    b = request("b", [*range(1, 10), 42, 43])  # shares two full blocks, then differs
    second = pool.reserve(b, b.num_tokens)
    assert second is not None and second.num_reused == 2 and len(second.block_ids) == 1
    shared = pool.get_block_ids(a)[:2]
    assert pool.get_block_ids(b) == [*shared, *second.block_ids]
    assert [pool.pool.blocks[i].ref_cnt for i in shared] == [2, 2]
    pool.free(a)
    assert [pool.pool.blocks[i].ref_cnt for i in shared] == [1, 1]
    pool.free(b)
    assert pool.pool.num_free_blocks == 19  # all back, the shared ones still cached
    # a freed cached prefix is reused too; a prompt of exactly two blocks still moves its last
    c = request("c", list(range(1, 9)))
    assert pool.reserve(c, c.num_tokens) == Reserved(1, [pool.get_block_ids(c)[1]])
    assert pool.get_block_ids(c)[0] == shared[0] and pool.pool.blocks[shared[0]].ref_cnt == 1


def test_reserve_without_room_takes_nothing() -> None:
    pool = KVCacheManager(4, BS)  # 3 usable blocks
    a = request("a", list(range(1, 9)))
    assert pool.reserve(a, a.num_tokens) is not None
    landed_and_ran(pool, a)
    pool.free(a)  # two cached blocks in the free queue
    b = request("b", [*range(1, 5), *range(50, 62)])  # 16 tokens: 1 hit + 3 fresh > 2 left
    assert pool.reserve(b, b.num_tokens) is None
    assert not pool.holds(b) and pool.pool.num_free_blocks == 3
    assert all(block.ref_cnt == 0 for block in pool.pool.blocks)


# -- end to end: 1 prefill + 1 decode worker -------------------------------------------

SMALL = {"kv_cache_memory": 192 * 2**20, "max_model_len": 1024, "max_num_batched_tokens": 256,
         "dtype": "float32"}  # fmt: skip
NOTES = "Here are my notes on the history of the railway, to be read with care: " + " ".join(
    f"In {1800 + i} the line reached station {i}, and the crowds came out to see it."
    for i in range(20)
)


def shared_prefix_chats(
    tokenizer: Tokenizer,
    questions: dict[str, str] | None = None,
) -> dict[str, list[int]]:
    """Chat prompts that share NOTES and differ in the question after them."""
    questions = questions or {
        "first": "Which station came first?",
        "second": "Summarize the notes.",
    }
    return {
        name: tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{NOTES}\n\n{q}"}], add_generation_prompt=True
        )
        for name, q in questions.items()
    }


def one_by_one(config: EngineConfig, chats: dict[str, list[int]]) -> tuple[dict, list[int]]:
    """Run the chats one after another; their outputs and the transferred bytes after each."""
    harness = EngineHarness(config)
    moved: list[int] = []
    try:
        for name, prompt in chats.items():
            harness.add(name, prompt, 8)
            harness.wait_all()
            harness.pump(1.0)  # the stats of the step that finished it
            moved.append(harness.stats.kv_transfer_bytes)
        assert harness.stats.kv_transfer_failures == harness.stats.recomputed_prefills == 0
        return dict(harness.tokens), moved
    finally:
        harness.close()


@pytest.mark.slow
def test_second_transfer_moves_only_the_blocks_not_shared(default_tokenizer: Tokenizer) -> None:
    chats = shared_prefix_chats(default_tokenizer)
    first, second = chats["first"], chats["second"]
    common = next(i for i, (x, y) in enumerate(zip(first, second, strict=False)) if x != y)
    block = 16
    assert common > 10 * block
    outputs, moved = one_by_one(EngineConfig(colocated=False, block_size=block, **SMALL), chats)
    per_block = kv_block_bytes(load_config(resolve_model(None)), block, torch.float32)
    first_blocks = -(-len(first) // block)
    assert moved[0] == first_blocks * per_block
    # the decode worker's cache holds the first prompt's full blocks, so only the rest move
    reused = min(common // block, (len(second) - 1) // block)
    second_blocks = -(-len(second) // block) - reused
    assert moved[1] - moved[0] == second_blocks * per_block
    assert moved[1] - moved[0] <= 0.3 * first_blocks * per_block
    colocated, _ = one_by_one(EngineConfig(colocated=True, block_size=block, **SMALL), chats)
    assert outputs == colocated


@pytest.mark.slow
def test_requests_sharing_a_prefix_at_once_move_it_once(default_tokenizer: Tokenizer) -> None:
    """Four chats on the same notes, submitted together: their prefills finish in the same
    steps, and the shared blocks still move only once (the others wait for them to land)."""
    questions = ["Which station came first?", "Summarize the notes.", "Name a year.", "Why?"]
    chats = shared_prefix_chats(default_tokenizer, {f"q{i}": q for i, q in enumerate(questions)})
    block = 16
    config = EngineConfig(colocated=False, block_size=block, **SMALL)
    harness = EngineHarness(config)
    try:
        for name, prompt in chats.items():
            harness.add(name, prompt, 8)
        harness.wait_all()
        harness.pump(1.0)
        stats, outputs = harness.stats, dict(harness.tokens)
    finally:
        harness.close()
    assert stats.kv_transfer_failures == stats.recomputed_prefills == 0
    prompts = list(chats.values())
    common = min(
        next(i for i, (x, y) in enumerate(zip(prompts[0], p, strict=False)) if x != y)
        for p in prompts[1:]
    )
    per_block = kv_block_bytes(load_config(resolve_model(None)), block, torch.float32)
    everything = sum(-(-len(p) // block) for p in prompts)
    shared = min(common // block, *((len(p) - 1) // block for p in prompts))
    assert stats.kv_transfer_bytes == (everything - (len(prompts) - 1) * shared) * per_block
    assert stats.kv_transfer_bytes <= 0.45 * everything * per_block
    colocated = EngineHarness(EngineConfig(colocated=True, block_size=block, **SMALL))
    try:
        assert colocated.generate(chats, 8) == outputs
    finally:
        colocated.close()
