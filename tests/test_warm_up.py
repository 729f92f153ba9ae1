"""The worker's start-up warm-up (models/warm_up.py) on real pools, large and too small."""

from __future__ import annotations

from engine_core.messages.config import EngineConfig
from models.runner import ModelRunner, kv_block_bytes
from models.warm_up import PROMPT_TOKENS, warm_up


def test_warm_up_prefills_a_full_step_and_leaves_the_pool_as_it_found_it(
    tiny_checkpoint,
) -> None:
    runner = ModelRunner(EngineConfig(model=str(tiny_checkpoint()), kv_cache_memory=8 << 20))
    tokens, seconds = warm_up(runner, 2048)
    assert tokens == 2048 // PROMPT_TOKENS * PROMPT_TOKENS and seconds > 0
    assert runner.kv_cache.abs().sum() == 0  # zeros again, as a fresh pool


def test_warm_up_fits_the_pool_it_has(tiny_checkpoint) -> None:
    folder = str(tiny_checkpoint())
    short = ModelRunner(EngineConfig(model=folder, kv_cache_memory=256 << 10, max_model_len=64))
    blocks_each = -(-64 // short.block_size)  # 63 prompt tokens and the decoded one
    tokens, _ = warm_up(short, 2048)
    assert tokens == 63 * (short.num_blocks // blocks_each) < 2048
    block = kv_block_bytes(short.model_config, short.block_size, short.kv_dtype)
    config = EngineConfig(model=folder, kv_cache_memory=(blocks_each - 1) * block, max_model_len=64)
    assert warm_up(ModelRunner(config), 2048) == (0, 0.0)  # not one sequence fits
    one = ModelRunner(EngineConfig(model=folder, kv_cache_memory=256 << 10, max_model_len=1))
    assert warm_up(one, 2048) == (0, 0.0)  # no room for a prompt token and a decoded one
