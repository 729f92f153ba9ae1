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
