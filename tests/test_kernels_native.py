"""The native C decode and prefill kernels against the torch path and a float64 reference,
at block edges."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_kernels import CACHED_CHUNKS, HEADS, PagedBatch, dense_attention, make_batch

from kernels import attention, cpu_attention, native
from kernels.metadata import AttentionMetadata
from models import cpu_features

pytestmark = pytest.mark.skipif(
    native.load() is None, reason="no C compiler or no AVX2: the native kernel is not built"
)


def _decode_batch(
    lengths: list[int],
    num_heads: int,
    num_kv_heads: int,
    block_size: int = 16,
    seed: int = 0,
    head_dim: int = 64,
):
    gen = torch.Generator().manual_seed(seed)
    blocks_each = [(n + block_size - 1) // block_size for n in lengths]
    total = sum(blocks_each) + 1
    order = (torch.randperm(total - 1, generator=gen) + 1).tolist()  # shuffled, block 0 unused
    tables = torch.zeros(len(lengths), max(blocks_each), dtype=torch.int32)
    used = 0
    for row, count in enumerate(blocks_each):
        tables[row, :count] = torch.tensor(order[used : used + count], dtype=torch.int32)
        used += count
    key_cache = torch.randn(total, block_size, num_kv_heads, head_dim, generator=gen)
    value_cache = torch.randn(total, block_size, num_kv_heads, head_dim, generator=gen)
    query = torch.randn(len(lengths), num_heads, head_dim, generator=gen)
    starts = list(range(len(lengths) + 1))
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(lengths), dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lengths, dtype=torch.int32),
        block_tables=tables,
        num_decodes=len(lengths),
        query_start_loc_cpu=starts,
        seq_lens_cpu=lengths,
    )
    return query, key_cache, value_cache, meta


# the last batch is big enough for tasks of a whole sequence (its KV heads in turn)
BATCHES = [[1], [15], [16], [17], [100], [1, 15, 16, 17, 100, 333], [9, 1, 300, 48, 17] * 2]


# group sizes 3, 1, 8 (two passes of 4 heads) and 6 (4 then 2); block size 5 cuts the runs of
# keys reduced together short
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads"),
    [(9, 3), (4, 4), (8, 1), (12, 2)],
    ids=["gqa", "mha", "mqa", "gqa6"],
)
@pytest.mark.parametrize("lengths", BATCHES)
@pytest.mark.parametrize("block_size", [16, 5])
def test_native_decode_matches_torch(
    lengths: list[int], num_heads: int, num_kv_heads: int, block_size: int, twin: str
) -> None:
    query, key_cache, value_cache, meta = _decode_batch(
        lengths, num_heads, num_kv_heads, block_size=block_size
    )
    expected = attention.decode_attention(query, key_cache, value_cache, meta, 0.125)
    got = cpu_attention.native_decode(query, key_cache, value_cache, meta, 0.125)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# 64 and 128 take the unrolled paths; the others the general one, with a tail after the
# vectorized pairs (80, 48), only a tail (16, 8) or several pairs and a tail (200)
@pytest.mark.parametrize("head_dim", [128, 80, 48, 16, 8, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_at_every_head_size(head_dim: int, dtype: torch.dtype, twin: str) -> None:
    query, key_cache, value_cache, meta = _decode_batch([1, 17, 100], 4, 2, head_dim=head_dim)
    query, key_cache, value_cache = (t.to(dtype) for t in (query, key_cache, value_cache))
    expected = attention.decode_attention(
        query.float(), key_cache.float(), value_cache.float(), meta, head_dim**-0.5
    )
    got = cpu_attention.native_decode(query, key_cache, value_cache, meta, head_dim**-0.5)
    assert got.dtype == dtype
    tolerance = 2**-8 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), expected, rtol=tolerance, atol=1e-5)


@pytest.mark.parametrize("lengths", [[1], [17], [1, 15, 16, 17, 100, 333]])
def test_native_bf16_decode_is_fp32_math_rounded_once(lengths: list[int], twin: str) -> None:
    # the kernel reads bf16, computes in fp32 and rounds the output once: it must equal the
    # fp32 torch path over the same (bf16-valued) inputs to within that one rounding
    query, key_cache, value_cache, meta = _decode_batch(lengths, 9, 3)
    query, key_cache, value_cache = (t.bfloat16() for t in (query, key_cache, value_cache))
    expected = attention.decode_attention(
        query.float(), key_cache.float(), value_cache.float(), meta, 0.125
    )
    got = cpu_attention.native_decode(query, key_cache, value_cache, meta, 0.125)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=2**-8, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_reads_only_its_blocks(dtype: torch.dtype, twin: str) -> None:
    query, key_cache, value_cache, meta = _decode_batch([5, 40], 9, 3)
    query, key_cache, value_cache = (t.to(dtype) for t in (query, key_cache, value_cache))
    expected = cpu_attention.native_decode(query, key_cache, value_cache, meta, 0.125)
    used = set(meta.block_tables.flatten().tolist())
    for block in range(key_cache.shape[0]):
        if block not in used:
            key_cache[block] = float("nan")
            value_cache[block] = float("nan")
    # the tail of the last block past the sequence's end must be ignored too
    key_cache[meta.block_tables[0, 0], 5:] = float("nan")
    value_cache[meta.block_tables[0, 0], 5:] = float("nan")
    got = cpu_attention.native_decode(query, key_cache, value_cache, meta, 0.125)
    torch.testing.assert_close(got, expected)


def _native_attention(batch: PagedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(the native path's output, the float64 reference) for a batch, its K/V written."""
    scale = batch.query.shape[-1] ** -0.5
    attention.write_kv(
        batch.key, batch.value, batch.key_cache, batch.value_cache, batch.meta.slot_mapping
    )
    got = cpu_attention.paged_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.meta, scale
    )
    assert got.shape == batch.query.shape and got.dtype == batch.query.dtype
    return got, dense_attention(batch, scale)


# (cached, new) chunks: tiles of 16 tokens (48 rows at groups of 3) cut inside them, chunks
# after cached tokens ending on and off block edges, and one chunk several tiles long
PREFILL_CHUNKS = [(0, 1), (0, 16), (0, 17), (0, 100), *CACHED_CHUNKS, (5, 300)]


def _assert_close_to_float64(got: torch.Tensor, expected: torch.Tensor, twin: str) -> None:
    """fp32 to its rounding; bf16 to its output rounding, and with the AVX512_BF16 twin also
    the probabilities' (rounded to bf16 before the product with V, as torch's bf16 path)."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4)
    else:
        atol = 2**-8 if twin in ("avx512bf16", "amx") else 1e-5
        torch.testing.assert_close(got.double(), expected, atol=atol, rtol=2**-8)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [*HEADS, (9, 3), (48, 1)])
@pytest.mark.parametrize(("cached", "new"), PREFILL_CHUNKS)
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_prefill_matches_float64(
    cached: int,
    new: int,
    num_heads: int,
    num_kv_heads: int,
    block_size: int,
    dtype: torch.dtype,
    prefill_twin: str,
) -> None:
    batch = make_batch([(cached, new)], 0, num_heads, num_kv_heads, head_dim=64,
                       block_size=block_size, dtype=dtype)  # fmt: skip
    got, expected = _native_attention(batch)
    _assert_close_to_float64(got, expected, prefill_twin)


@pytest.mark.parametrize("head_dim", [8, 32, 128, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_mixed_batch_at_every_head_size(
    head_dim: int, dtype: torch.dtype, prefill_twin: str
) -> None:
    # decodes first, then prefill chunks of several sequences in one call
    seqs = [(0, 1), (15, 1), (99, 1), (0, 17), (15, 7), (33, 67), (16, 1)]
    batch = make_batch(seqs, 3, 9, 3, head_dim=head_dim, dtype=dtype)
    got, expected = _native_attention(batch)
    _assert_close_to_float64(got, expected, prefill_twin)


@pytest.mark.skipif(not cpu_features.has_amx_bf16(), reason="no AMX here")
def test_bf16_prefill_on_an_amx_cpu_takes_sdpa_where_the_tile_kernel_cannot() -> None:
    # a head size off the tile kernel's 32-wide steps: bit for bit the torch path's output
    # (SDPA on AMX tiles for the prefill chunks, the native kernel for the decodes), which
    # no native prefill twin reproduces
    batch = make_batch(
        [(0, 1), (15, 1), (0, 40), (33, 67)], 2, 9, 3, head_dim=40, dtype=torch.bfloat16
    )
    got, expected = _native_attention(batch)
    _assert_close_to_float64(got, expected, "avx512bf16")
    sdpa = attention.paged_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.meta, 40**-0.5,
        decode=cpu_attention.native_decode,
    )  # fmt: skip
    assert torch.equal(got, sdpa)


@pytest.mark.parametrize(("head_dim", "num_heads"), [(20, 4), (64, 49)], ids=["dim", "group"])
def test_native_path_falls_back_where_the_prefill_kernel_cannot_run(
    head_dim: int, num_heads: int
) -> None:
    # a head size off its 8-wide steps, or more than 48 query heads per KV head
    batch = make_batch([(0, 1), (3, 20)], 1, num_heads, 1, head_dim=head_dim)
    got, expected = _native_attention(batch)
    torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_prefill_reads_only_its_keys(dtype: torch.dtype, prefill_twin: str) -> None:
    batch = make_batch([(9, 40)], 0, 9, 3, head_dim=64, dtype=dtype)
    expected, _ = _native_attention(batch)
    used = set(batch.meta.block_tables.flatten().tolist())
    for block in range(batch.key_cache.shape[0]):
        if block not in used:
            batch.key_cache[block] = float("nan")
            batch.value_cache[block] = float("nan")
    last = batch.meta.block_tables[0, (49 - 1) // 16]  # slots past the 49 tokens: unread
    batch.key_cache[last, 49 % 16 :] = float("nan")
    batch.value_cache[last, 49 % 16 :] = float("nan")
    got = cpu_attention.paged_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.meta, 64**-0.5
    )
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_loading_the_kernels_leaves_subnormal_floats_alone() -> None:
    # a library linked with -ffast-math would have set flush-to-zero for this whole process
    assert native.load() is not None
    tiny = torch.tensor([1e-40], dtype=torch.float32)  # subnormal in fp32
    assert (tiny * 1.0).item() > 0
    assert 2.2250738585072014e-308 / 2 > 0  # a subnormal double, in Python itself


def test_bench_times_this_build_against_another_library() -> None:
    """scripts/bench_kernels.py --against-library, here against this very build: one row of
    medians and their ratio."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_kernels.py"
    args = ["--batch", "2", "--layers", "2", "--threads", "1", "--repeats", "2"]
    args += ["--dtype", "bfloat16", "--against-library", str(native.library_path())]
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.strip().splitlines()[-2:]
    assert header == "| this build | other | this / other (median, range) |"
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == 3 and cells[0].endswith(" ms") and cells[1].endswith(" ms")
    assert float(cells[2].split()[0]) > 0
