"""Attention over the paged KV cache as Triton kernels, for GPUs.

Same signatures and semantics as `kernels.attention` (the torch reference). Importing this
module imports triton; on a CPU the kernels run only under TRITON_INTERPRET=1, which must
be set before triton is first imported.

Each program reads K/V one cache block at a time through the block table (a tile of
block_size keys) and keeps an online softmax, so nothing is gathered into a padded copy
and slots past a sequence's length are never read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.metadata import AttentionMetadata

# Query tokens per prefill program.
_PREFILL_TILE = 32
# tl.dot needs every tile dimension to be at least 16.
_MIN_DOT = 16


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per new token: copy its [Hkv, D] key and value into its slot.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    dst = slot * (NUM_KV_HEADS * HEAD_DIM) + h * HEAD_DIM + d
    key = tl.load(key_ptr + token * stride_kt + h * stride_kh + d, mask=mask)
    tl.store(key_cache_ptr + dst, key, mask=mask)
    value = tl.load(value_ptr + token * stride_vt + h * stride_vh + d, mask=mask)
    tl.store(value_cache_ptr + dst, value, mask=mask)


@triton.jit
def _attend_block(
    q,
    acc,
    m_i,
    l_i,
    key_cache_ptr,
    value_cache_ptr,
    block,
    kv_head,
    key_pos,
    visible,
    seq_len,
    scale,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One online-softmax step of rows q [R, BLOCK_D] over one cache block, whose keys sit
    # at positions key_pos [BLOCK_SIZE]; visible [R, BLOCK_SIZE] says which each row sees.
    # Slots past seq_len load as zeros, so stale cache contents (even NaN) never reach
    # the sum.
    n = tl.arange(0, BLOCK_SIZE)
    d = tl.arange(0, BLOCK_D)
    kv_mask = (key_pos[:, None] < seq_len) & (d[None, :] < HEAD_DIM)
    kv_offs = (
        (block * BLOCK_SIZE + n[:, None]) * (NUM_KV_HEADS * HEAD_DIM)
        + kv_head * HEAD_DIM
        + d[None, :]
    )
    k = tl.load(key_cache_ptr + kv_offs, mask=kv_mask, other=0.0)  # [BLOCK_SIZE, BLOCK_D]
    s = tl.where(visible, tl.dot(q, tl.trans(k)) * scale, float("-inf"))  # [R, BLOCK_SIZE]
    # Every row sees position 0 in the first block, so m_new is finite from the start.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    v = tl.load(value_cache_ptr + kv_offs, mask=kv_mask, other=0.0)  # [BLOCK_SIZE, BLOCK_D]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _decode_kernel(
    q_ptr,
    key_cache_ptr,
    value_cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    GROUP: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (sequence, KV head): the GROUP query heads sharing that KV head are
    # the rows of one tile, so each K/V block is loaded once for all of them.
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g  # [BLOCK_G]
    q_mask = (g[:, None] < GROUP) & (d[None, :] < HEAD_DIM)
    q_offs = seq * stride_qt + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)  # running row max
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for j in range(0, tl.cdiv(seq_len, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + seq * stride_bt + j).to(tl.int64)
        key_pos = j * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # [BLOCK_SIZE]
        visible = (key_pos < seq_len)[None, :]  # [1, BLOCK_SIZE]: the same for every row
        acc, m_i, l_i = _attend_block(
            q, acc, m_i, l_i, key_cache_ptr, value_cache_ptr, block, kv_head, key_pos, visible,
            seq_len, scale, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_D,
        )  # fmt: skip

    out_offs = seq * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + out_offs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _prefill_kernel(
    q_ptr,
    key_cache_ptr,
    value_cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    first_seq,
    scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    GROUP: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (prefill sequence, query head, tile of BLOCK_M new tokens).
    seq = (first_seq + tl.program_id(0)).to(tl.int64)
    head = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]: index within the chunk
    q_pos = seq_len - q_len + m  # [BLOCK_M]: position in the sequence
    d = tl.arange(0, BLOCK_D)
    q_mask = (m[:, None] < q_len) & (d[None, :] < HEAD_DIM)
    q_offs = (q_start + m[:, None]) * stride_qt + head * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Causality: no row of this tile sees past its last row's position.
    kv_end = tl.minimum(seq_len, seq_len - q_len + (tile + 1) * BLOCK_M)
    for j in range(0, tl.cdiv(kv_end, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + seq * stride_bt + j).to(tl.int64)
        key_pos = j * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # [BLOCK_SIZE]
        visible = key_pos[None, :] <= q_pos[:, None]  # [BLOCK_M, BLOCK_SIZE]
        acc, m_i, l_i = _attend_block(
            q, acc, m_i, l_i, key_cache_ptr, value_cache_ptr, block, head // GROUP, key_pos,
            visible, seq_len, scale, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, BLOCK_D,
        )  # fmt: skip

    out_offs = (q_start + m[:, None]) * stride_ot + head * stride_oh + d[None, :]
    tl.store(out_ptr + out_offs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store each new token's K/V at its slot, in place.

    key, value: [T, Hkv, D] with unit stride over D; key_cache, value_cache: contiguous
    [num_blocks, block_size, Hkv, D]; slot_mapping: [T] int64.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    _check_cache(key_cache, value_cache)
    if num_tokens == 0:
        return
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "head_dim must have unit stride"
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attend each new token to its sequence's cached and new tokens, causally.

    query: [T, Hq, D] (unit stride over D), Hq a multiple of Hkv; caches: contiguous
    [num_blocks, block_size, Hkv, D] with block_size a power of two >= 16, already holding
    this step's K/V. One launch for the decodes, one for the prefill chunks. Returns
    [T, Hq, D].
    """
    _check_cache(key_cache, value_cache)
    assert query.stride(-1) == 1, "head_dim must have unit stride"
    _, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    assert block_size >= _MIN_DOT and block_size & (block_size - 1) == 0, (
        "block_size: power of 2 >= 16"
    )
    out = query.new_empty(query.shape)  # [T, Hq, D]
    common = dict(
        GROUP=num_heads // num_kv_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_D=max(_MIN_DOT, triton.next_power_of_2(head_dim)),
    )
    strides = (
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        meta.block_tables.stride(0),
    )
    if meta.num_decodes > 0:
        _decode_kernel[(meta.num_decodes, num_kv_heads)](
            query,
            key_cache,
            value_cache,
            out,
            meta.block_tables,
            meta.seq_lens,
            scale,
            *strides,
            BLOCK_G=max(_MIN_DOT, triton.next_power_of_2(num_heads // num_kv_heads)),
            **common,
        )
    starts = meta.query_start_loc_cpu
    prefills = range(meta.num_decodes, meta.num_seqs)
    if len(prefills) > 0:
        max_query_len = max(starts[i + 1] - starts[i] for i in prefills)
        _prefill_kernel[(len(prefills), num_heads, triton.cdiv(max_query_len, _PREFILL_TILE))](
            query,
            key_cache,
            value_cache,
            out,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            meta.num_decodes,
            scale,
            *strides,
            BLOCK_M=_PREFILL_TILE,
            **common,
        )
    return out


def _check_cache(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    # The kernels address a slot as slot * Hkv * D, which holds only for contiguous caches.
    assert key_cache.is_contiguous() and value_cache.is_contiguous(), "caches must be contiguous"
    assert key_cache.shape == value_cache.shape
