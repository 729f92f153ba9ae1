"""Attention over the paged KV cache in plain torch: the CPU path and the reference.

The cache of one layer is two tensors `[num_blocks, block_size, Hkv, D]`; a token's K/V
lives at `slot = block_id * block_size + offset`. Callers write the step's new K/V first
(`write_kv`) and then attend (`paged_attention`), so every key is read from the cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.metadata import AttentionMetadata

# (query [B, Hq, D], key_cache, value_cache, meta, scale) -> [B, Hq, D]
DecodeFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor
]


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store each new token's K/V at its slot, in place.

    key, value: [T, Hkv, D]; key_cache, value_cache: [num_blocks, block_size, Hkv, D];
    slot_mapping: [T] int64, every slot valid and distinct.
    """
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    # A flat [num_slots, Hkv, D] view turns the write into one indexed copy per tensor.
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    decode: DecodeFn | None = None,
) -> torch.Tensor:
    """Attend each new token to its sequence's cached and new tokens, causally.

    query: [T, Hq, D] with Hq a multiple of Hkv; caches: [num_blocks, block_size, Hkv, D],
    already holding this step's K/V. Sequences [0, num_decodes) have one token each and
    run batched (one SDPA call per few MB of gathered K/V); the prefill chunks after them
    run one sequence at a time. Returns a new contiguous [T, Hq, D]. `decode` replaces
    the batched decode part (same arguments as `decode_attention`), e.g. a native kernel.
    """
    if 0 < meta.num_decodes == meta.num_seqs:  # decodes only: no output to assemble
        return (decode or decode_attention)(query, key_cache, value_cache, meta, scale)
    out = query.new_empty(query.shape)  # [T, Hq, D]
    if meta.num_decodes > 0:
        decode_query = query[: meta.num_decodes]  # [B, Hq, D]
        out[: meta.num_decodes] = (decode or decode_attention)(
            decode_query, key_cache, value_cache, meta, scale
        )
    for seq in range(meta.num_decodes, meta.num_seqs):
        start, end = meta.query_start_loc_cpu[seq], meta.query_start_loc_cpu[seq + 1]
        out[start:end] = _prefill_chunk(
            query[start:end],
            key_cache,
            value_cache,
            meta.block_tables[seq],
            meta.seq_lens_cpu[seq],
            scale,
        )
    return out


# NOTE: decode gathers K/V into a padded batch. One gather for a large batch allocates
# tens of MB per layer, which on CPU costs page faults and a trip to DRAM before attention
# reads it back. Tiling the batch so each tile's K/V stays this small, gathered into one
# buffer pair reused by every tile, keeps the copy in cache and faults in at most a few MB
# (B=64, ctx 350-450: ~3x faster on one thread than a single gather).
_DECODE_TILE_BYTES = 4 << 20


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """One new token for each of the first B sequences: query [B, Hq, D] -> [B, Hq, D]."""
    num_seqs = query.shape[0]
    seq_lens = meta.seq_lens_cpu[:num_seqs]
    block_size = key_cache.shape[1]
    block_numel = key_cache[0].numel()  # bs * Hkv * D
    max_blocks = -(-max(seq_lens) // block_size)
    seq_bytes = 2 * max_blocks * block_numel * key_cache.element_size()  # K and V
    tile = max(1, _DECODE_TILE_BYTES // seq_bytes)
    key_buf = key_cache.new_empty(
        min(tile, num_seqs) * max_blocks, block_numel
    )  # [b * nb, bs * Hkv * D]
    value_buf = torch.empty_like(key_buf)
    out = query.new_empty(query.shape)  # [B, Hq, D]
    for start in range(0, num_seqs, tile):
        end = min(start + tile, num_seqs)
        num_blocks = -(-max(seq_lens[start:end]) // block_size)
        tables = meta.block_tables[start:end, :num_blocks]  # [b, nb]
        key = _gather_blocks(key_cache, tables, key_buf)  # [b, L, Hkv, D], L = nb * bs
        value = _gather_blocks(value_cache, tables, value_buf)  # [b, L, Hkv, D]
        out[start:end] = _decode_tile(query[start:end], key, value, meta.seq_lens[start:end], scale)
    return out


def _decode_tile(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """query [b, Hq, D] over gathered key, value [b, L, Hkv, D] valid up to seq_lens [b]."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    positions = torch.arange(key.shape[1], device=query.device)  # [L]
    valid = positions < seq_lens[:, None]  # [b, L]: False on the padding past each seq_len
    # NOTE: GQA as extra query rows rather than enable_gqa=True: the G query heads that
    # share a KV head become G rows against it, so K/V are never repeated (enable_gqa
    # repeats them on CPU, ~2x slower here).
    q = query.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [b, Hkv, G, D]
    k, v = key.transpose(1, 2), value.transpose(1, 2)  # [b, Hkv, L, D]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None], scale=scale)
    return o.reshape(num_seqs, num_heads, head_dim)  # o: [b, Hkv, G, D]


def _prefill_chunk(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    table: torch.Tensor,
    seq_len: int,
    scale: float,
) -> torch.Tensor:
    """One sequence's n new tokens, the last n of its seq_len: query [n, Hq, D] -> same."""
    num_new, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = -(-seq_len // block_size)
    key = _gather_blocks(key_cache, table[None, :num_blocks])[0, :seq_len]  # [S, Hkv, D]
    value = _gather_blocks(value_cache, table[None, :num_blocks])[0, :seq_len]  # [S, Hkv, D]
    # Query i sits at position seq_len - n + i, so is_causal=True (top-left aligned) would
    # be wrong whenever cached tokens precede the chunk; without them it is exact, and lets
    # the flash kernel skip the masked half instead of computing the full square.
    causal = None
    if num_new != seq_len:
        q_pos = torch.arange(seq_len - num_new, seq_len, device=query.device)  # [n]
        k_pos = torch.arange(seq_len, device=query.device)  # [S]
        causal = k_pos[None, :] <= q_pos[:, None]  # [n, S]
    # NOTE: GQA by broadcasting each KV head over its G query heads (a stride-0 expand, no
    # copy) with one [n, S] mask for all heads: ~1.7x faster on CPU than enable_gqa=True.
    q = query.view(num_new, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, n, D]
    shape = (num_kv_heads, group, seq_len, head_dim)
    k = key.transpose(0, 1)[:, None].expand(shape)  # [Hkv, G, S, D]
    v = value.transpose(0, 1)[:, None].expand(shape)  # [Hkv, G, S, D]
    o = F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal, is_causal=causal is None, scale=scale
    )  # [Hkv, G, n, D]
    return o.permute(2, 0, 1, 3).reshape(num_new, num_heads, head_dim)


def _gather_blocks(
    cache: torch.Tensor, tables: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Copy the blocks named by tables [B, nb] out of cache: -> [B, nb * block_size, Hkv, D].

    out, if given, is a [>= B * nb, block_size * Hkv * D] buffer whose head is filled.
    """
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    index = tables.reshape(-1)  # [B * nb]
    if out is not None:
        out = out[: index.shape[0]]
    # index_select over whole blocks as flat rows is ~3x faster than advanced indexing.
    rows = torch.index_select(
        cache.view(num_blocks, -1), 0, index, out=out
    )  # [B * nb, bs * Hkv * D]
    return rows.view(tables.shape[0], tables.shape[1] * block_size, num_kv_heads, head_dim)
