"""A worker's warm-up at start: one full prefill step and one decode step on dummy tokens.

The first steps of a fresh process run slower than later ones of the same size: their large
buffers are touched for the first time (page faults), and where oneDNN runs a GEMM it
generates its kernels for each new shape. Served, that fell on the first wave of real prompts: at c16, its 1,792- and
2,048-token prefill steps took ~0.5 s longer than the next wave's (docs/benchmarks.md).
vLLM likewise runs a dummy batch of `max_num_batched_tokens` before it serves.
"""

from __future__ import annotations

import time

import torch

from kernels.metadata import AttentionMetadata, fresh_prompts
from models.runner import ModelRunner

PROMPT_TOKENS = 256  # per dummy sequence: a typical prompt, so attention sees typical shapes


@torch.inference_mode()
def warm_up(runner: ModelRunner, max_tokens: int) -> tuple[int, float]:
    """Run a prefill step of up to `max_tokens` tokens (sequences of PROMPT_TOKENS) and a
    decode step over the same sequences in the pool's first blocks, which hold no request
    yet, then zero those blocks again (the pool starts as zeros: the torch attention path
    relies on it). Returns (tokens prefilled, seconds); (0, 0.0) when the pool cannot hold
    one sequence or a sequence cannot hold two tokens."""
    start = time.perf_counter()
    length = min(PROMPT_TOKENS, runner.max_model_len - 1, max_tokens)  # + 1 decoded
    blocks_each = -(-(length + 1) // runner.block_size)
    count = min(max_tokens // max(length, 1), runner.num_blocks // blocks_each)
    if length < 1 or count == 0:
        return 0, 0.0
    ids = torch.arange(count * length) % runner.model_config.vocab_size
    prefill = fresh_prompts(count, length, runner.block_size, blocks_each)
    _step(runner, ids, torch.arange(length).repeat(count), prefill, length)
    tables = prefill.block_tables  # each sequence's next token goes right after its prompt
    decode = AttentionMetadata(
        slot_mapping=torch.arange(count) * blocks_each * runner.block_size + length,
        query_start_loc=torch.arange(count + 1, dtype=torch.int32),
        seq_lens=torch.full((count,), length + 1, dtype=torch.int32),
        block_tables=tables,
        num_decodes=count,
        query_start_loc_cpu=list(range(count + 1)),
        seq_lens_cpu=[length + 1] * count,
    )
    _step(runner, ids[:count], torch.full((count,), length), decode, 1)
    runner.kv_cache[:, :, : count * blocks_each].zero_()
    return count * length, time.perf_counter() - start


def _step(
    runner: ModelRunner,
    ids: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
    tokens_each: int,
) -> None:
    """One forward and the LM head over each sequence's last token, base weights only."""
    if runner.lora is not None:
        runner.lora.set_batch([(None, tokens_each)] * meta.num_seqs)
    hidden = runner.model(ids, positions, runner.kv_cache, meta)
    runner.model.compute_logits(hidden[meta.query_start_loc[1:].long() - 1])
