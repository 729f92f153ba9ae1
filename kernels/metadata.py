"""Attention metadata: how a flat batch of new tokens maps onto the paged KV cache.

Model code never sees paging; it passes this object through to the attention kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where a flat batch of T new tokens from B sequences reads and writes KV.

    Sequences are ordered decodes first: sequences [0, num_decodes) have exactly one new
    token each; the rest are prefill chunks that may start after already-cached tokens.
    A slot is `block_id * block_size + offset_in_block`.
    """

    slot_mapping: torch.Tensor  # [T] int64: slot each new token's K/V is written to
    query_start_loc: torch.Tensor  # [B + 1] int32: cumulative new-token counts
    seq_lens: torch.Tensor  # [B] int32: context length after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32, right-padded with 0
    num_decodes: int
    # Host copies of the same numbers, so kernels can plan without device syncs.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes


def fresh_prompts(
    count: int, length: int, block_size: int, blocks_each: int | None = None
) -> AttentionMetadata:
    """`count` prompts of `length` new tokens each from position 0, nothing cached, prompt b
    in blocks [b * blocks_each, (b + 1) * blocks_each) (by default just enough for its
    tokens): for steps made up outside the scheduler (warm-up, calibration, benchmarks)."""
    blocks_each = blocks_each or -(-length // block_size)
    tables = torch.arange(count * blocks_each, dtype=torch.int32).view(count, blocks_each)
    slots = tables.long()[:, :, None] * block_size + torch.arange(block_size)
    starts = [b * length for b in range(count + 1)]
    return AttentionMetadata(
        slot_mapping=slots.view(count, -1)[:, :length].reshape(-1),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.full((count,), length, dtype=torch.int32),
        block_tables=tables,
        num_decodes=0,
        query_start_loc_cpu=starts,
        seq_lens_cpu=[length] * count,
    )
