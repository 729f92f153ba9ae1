"""The torch paged-attention path against a dense float64 reference, and write_kv."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import cpu_attention, get_attention_backend, native
from kernels.attention import paged_attention, write_kv
from kernels.metadata import AttentionMetadata

BLOCK_SIZE = 16
# (num_heads, num_kv_heads): GQA with groups of 3, MHA, MQA.
HEADS = [(6, 2), (2, 2), (4, 1)]


@dataclass
class PagedBatch:
    """A step's inputs with the paged cache already holding every earlier token."""

    query: torch.Tensor  # [T, Hq, D]
    key: torch.Tensor  # [T, Hkv, D]: this step's new keys, not yet in the cache
    value: torch.Tensor  # [T, Hkv, D]
    key_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    value_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    meta: AttentionMetadata
    dense_keys: list[torch.Tensor]  # per sequence [seq_len, Hkv, D], cached + new
    dense_values: list[torch.Tensor]


def make_batch(
    seqs: list[tuple[int, int]],
    num_decodes: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int = 32,
    block_size: int = BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PagedBatch:
    """seqs: (num_cached, num_new) per sequence, decodes (num_new == 1) first.

    Blocks are handed out in shuffled order from a pool with spare blocks, and every slot
    no sequence owns holds large garbage, so a wrong block or an unmasked read shows up.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [math.ceil((cached + new) / block_size) for cached, new in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = 1e3 * torch.randn(cache_shape, generator=gen).to(dtype)
    value_cache = 1e3 * torch.randn(cache_shape, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seqs), max(blocks_per_seq), dtype=torch.int32)
    dense_keys, dense_values, new_slots = [], [], []
    used = 0
    for i, (cached, new) in enumerate(seqs):
        seq_len = cached + new
        tables[i, : blocks_per_seq[i]] = order[used : used + blocks_per_seq[i]]
        used += blocks_per_seq[i]
        positions = torch.arange(seq_len)
        slots = tables[i, positions // block_size].long() * block_size + positions % block_size
        keys = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        values = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        # Earlier steps already stored the cached prefix; this step's tokens go via write_kv.
        key_cache.view(-1, num_kv_heads, head_dim)[slots[:cached]] = keys[:cached]
        value_cache.view(-1, num_kv_heads, head_dim)[slots[:cached]] = values[:cached]
        dense_keys.append(keys)
        dense_values.append(values)
        new_slots.append(slots[cached:])
    query_lens = [new for _, new in seqs]
    starts = [0, *torch.tensor(query_lens).cumsum(0).tolist()]
    seq_lens = [cached + new for cached, new in seqs]
    meta = AttentionMetadata(
        slot_mapping=torch.cat(new_slots),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        num_decodes=num_decodes,
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )
    return PagedBatch(
        query=torch.randn(starts[-1], num_heads, head_dim, generator=gen).to(dtype),
        key=torch.cat([k[c:] for k, (c, _) in zip(dense_keys, seqs, strict=True)]),
        value=torch.cat([v[c:] for v, (c, _) in zip(dense_values, seqs, strict=True)]),
        key_cache=key_cache,
        value_cache=value_cache,
        meta=meta,
        dense_keys=dense_keys,
        dense_values=dense_values,
    )


def dense_attention(batch: PagedBatch, scale: float) -> torch.Tensor:
    """Plain softmax(QK^T)V per sequence in float64 over contiguous K/V: [T, Hq, D]."""
    outputs = []
    starts = batch.meta.query_start_loc_cpu
    for i, (keys, values) in enumerate(zip(batch.dense_keys, batch.dense_values, strict=True)):
        q = batch.query[starts[i] : starts[i + 1]].double()  # [n, Hq, D]
        group = q.shape[1] // keys.shape[1]
        k = keys.double().repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = values.double().repeat_interleave(group, dim=1)  # [S, Hq, D]
        num_new, seq_len = q.shape[0], k.shape[0]
        scores = torch.einsum("nhd,shd->hns", q, k) * scale  # [Hq, n, S]
        q_pos = torch.arange(seq_len - num_new, seq_len)[:, None]  # [n, 1]
        scores = scores.masked_fill(torch.arange(seq_len)[None, :] > q_pos, -math.inf)
        outputs.append(torch.einsum("hns,shd->nhd", scores.softmax(-1), v))
    return torch.cat(outputs)


def run_and_check(batch: PagedBatch, atol: float = 2e-5) -> None:
    """Write this step's K/V, attend through the paged cache, compare with the reference."""
    scale = batch.query.shape[-1] ** -0.5
    write_kv(batch.key, batch.value, batch.key_cache, batch.value_cache, batch.meta.slot_mapping)
    out = paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.meta, scale)
    assert out.shape == batch.query.shape and out.dtype == batch.query.dtype
    torch.testing.assert_close(out.double(), dense_attention(batch, scale), atol=atol, rtol=1e-4)


EDGE_LENGTHS = [1, 15, 16, 17, 100]


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEADS)
def test_decode_batch_across_block_edges(num_heads: int, num_kv_heads: int) -> None:
    seqs = [(n - 1, 1) for n in EDGE_LENGTHS]
    run_and_check(make_batch(seqs, len(seqs), num_heads, num_kv_heads))


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEADS)
@pytest.mark.parametrize("length", EDGE_LENGTHS)
def test_single_decode(length: int, num_heads: int, num_kv_heads: int) -> None:
    run_and_check(make_batch([(length - 1, 1)], 1, num_heads, num_kv_heads))


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEADS)
@pytest.mark.parametrize("length", EDGE_LENGTHS)
def test_prefill_from_empty_cache(length: int, num_heads: int, num_kv_heads: int) -> None:
    run_and_check(make_batch([(0, length)], 0, num_heads, num_kv_heads))


# (cached, new): a chunk inside one block, chunks crossing and ending on block edges,
# a one-token chunk, and a long chunk after a partial block.
CACHED_CHUNKS = [(15, 7), (16, 1), (1, 15), (16, 16), (17, 83), (9, 40)]


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEADS)
@pytest.mark.parametrize(("cached", "new"), CACHED_CHUNKS)
def test_prefill_chunk_after_cached_tokens(
    cached: int, new: int, num_heads: int, num_kv_heads: int
) -> None:
    run_and_check(make_batch([(cached, new)], 0, num_heads, num_kv_heads))


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), HEADS)
def test_mixed_batch(num_heads: int, num_kv_heads: int) -> None:
    decodes = [(0, 1), (15, 1), (16, 1), (99, 1)]
    prefills = [(0, 17), (15, 7), (33, 67), (16, 1)]
    run_and_check(make_batch(decodes + prefills, len(decodes), num_heads, num_kv_heads))


def test_large_decode_batch_spans_several_tiles() -> None:
    """Enough context that the CPU path splits the decode batch into several tiles."""
    lengths = [700, 3, 64, 650, 129, 1, 333, 512] * 3
    seqs = [(n - 1, 1) for n in lengths]
    run_and_check(make_batch(seqs, len(seqs), 6, 3, head_dim=64), atol=5e-5)


def test_non_contiguous_inputs() -> None:
    """q/k/v as views into one fused projection, the way model code produces them."""
    batch = make_batch([(20, 1), (5, 30)], 1, 6, 2)
    for name in ("query", "key", "value"):
        t = getattr(batch, name)
        padded = torch.zeros(t.shape[0], t.shape[1] + 1, t.shape[2] + 3, dtype=t.dtype)
        padded[:, 1:, 3:] = t
        setattr(batch, name, padded[:, 1:, 3:])
    run_and_check(batch)


@settings(max_examples=25, deadline=None)
@given(
    decode_lens=st.lists(st.integers(1, 70), max_size=5),
    chunks=st.lists(st.tuples(st.integers(0, 70), st.integers(1, 40)), max_size=3),
    block_size=st.sampled_from([1, 4, 16]),
    heads=st.sampled_from(HEADS),
    seed=st.integers(0, 2**16),
)
def test_random_mixed_batches(
    decode_lens: list[int],
    chunks: list[tuple[int, int]],
    block_size: int,
    heads: tuple[int, int],
    seed: int,
) -> None:
    seqs = [(n - 1, 1) for n in decode_lens] + chunks
    if seqs:
        run_and_check(make_batch(seqs, len(decode_lens), *heads, block_size=block_size, seed=seed))


def test_write_kv_touches_exactly_its_slots() -> None:
    gen = torch.Generator().manual_seed(1)
    num_blocks, num_kv_heads, head_dim = 6, 2, 8
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    key_cache, value_cache = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    key_before, value_before = key_cache.clone(), value_cache.clone()
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:21]  # [T]
    key = torch.randn(21, num_kv_heads, head_dim, generator=gen)
    value = torch.randn(21, num_kv_heads, head_dim, generator=gen)

    write_kv(key, value, key_cache, value_cache, slots)

    for cache, before, new in ((key_cache, key_before, key), (value_cache, value_before, value)):
        for token, slot in enumerate(slots.tolist()):
            assert torch.equal(cache[slot // BLOCK_SIZE, slot % BLOCK_SIZE], new[token])
        untouched = torch.ones(num_blocks * BLOCK_SIZE, dtype=torch.bool)
        untouched[slots] = False
        flat, flat_before = (
            cache.view(-1, num_kv_heads, head_dim),
            before.view(-1, num_kv_heads, head_dim),
        )
        assert torch.equal(flat[untouched], flat_before[untouched])


def test_cpu_backend_is_the_torch_path_with_native_decode_when_built() -> None:
    backend = get_attention_backend("cpu")
    assert backend.write_kv is write_kv
    if native.load() is None:
        assert backend.name == "torch" and backend.paged_attention is paged_attention
    else:
        assert (
            backend.name == "cpu-native"
            and backend.paged_attention is cpu_attention.paged_attention
        )
