"""The Triton kernels against the torch path, run by Triton's CPU interpreter.

TRITON_INTERPRET=1 only works if set before triton is imported, and it must not leak into
the rest of the suite, so `test_triton_kernels_in_interpreter` re-runs this module in a
child pytest with it set. The kernel tests run only in that child; the interpreter is
~1000x slower than torch, hence the tiny shapes.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from test_kernels import PagedBatch, dense_attention, make_batch

from kernels import attention, get_attention_backend

IN_CHILD = os.environ.get("TRITON_INTERPRET") == "1"
child_only = pytest.mark.skipif(not IN_CHILD, reason="runs inside the TRITON_INTERPRET=1 child")


def test_triton_kernels_in_interpreter() -> None:
    if IN_CHILD:
        pytest.skip("this is the launcher; the child runs the kernel tests")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install triton, or the test extra)")
    # -k drops this launcher in the child, so anything skipped there is a kernel test.
    args = ["-q", "-p", "no:cacheprovider", "-k", "not in_interpreter", __file__]
    child = subprocess.run(
        [sys.executable, "-m", "pytest", *args],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = child.stdout[-6000:] + child.stderr[-3000:]
    assert child.returncode == 0, report
    assert "passed" in child.stdout and "skipped" not in child.stdout, report


@pytest.fixture(scope="module")
def triton_attention() -> ModuleType:
    return importlib.import_module("kernels.triton_attention")


# (seqs as (cached, new), num_decodes): decodes across block edges, prefill chunks from an
# empty cache and after cached tokens, and a mixed batch.
CASES = {
    "decode": ([(0, 1), (14, 1), (15, 1), (16, 1), (99, 1)], 5),
    "prefill": ([(0, 1), (0, 17), (0, 40)], 0),
    "cached_prefill": ([(15, 7), (16, 1), (17, 50)], 0),
    "mixed": ([(15, 1), (40, 1), (0, 33), (15, 7)], 2),
}
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3}


def both_paths(
    triton_attention: ModuleType, batch: PagedBatch, query: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the step's K/V with torch, then attend with (torch, Triton)."""
    caches = (batch.key_cache, batch.value_cache)
    attention.write_kv(batch.key, batch.value, *caches, batch.meta.slot_mapping)
    expected = attention.paged_attention(batch.query, *caches, batch.meta, scale)
    return expected, triton_attention.paged_attention(query, *caches, batch.meta, scale)


@child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(6, 2, 24), (2, 2, 64)])
@pytest.mark.parametrize("case", CASES)
def test_paged_attention_matches_torch(
    triton_attention: ModuleType,
    case: str,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
) -> None:
    seqs, num_decodes = CASES[case]
    batch = make_batch(seqs, num_decodes, num_heads, num_kv_heads, head_dim=head_dim, dtype=dtype)
    expected, out = both_paths(triton_attention, batch, batch.query, head_dim**-0.5)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as t [T, H, D], laid out with gaps between heads and between tokens."""
    padded = torch.zeros(t.shape[0], t.shape[1] + 1, t.shape[2] + 3, dtype=t.dtype)
    padded[:, 1:, 3:] = t
    return padded[:, 1:, 3:]


@child_only
def test_paged_attention_with_strided_query(triton_attention: ModuleType) -> None:
    batch = make_batch([(20, 1), (5, 30)], 1, 6, 2)
    expected, out = both_paths(triton_attention, batch, strided(batch.query), 0.3)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


@child_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_write_kv_matches_torch(triton_attention: ModuleType, dtype: torch.dtype) -> None:
    batch = make_batch([(3, 1), (0, 20), (16, 9)], 1, 4, 2, head_dim=24, dtype=dtype)
    key_cache, value_cache = batch.key_cache.clone(), batch.value_cache.clone()
    slots = batch.meta.slot_mapping
    attention.write_kv(batch.key, batch.value, key_cache, value_cache, slots)
    key, value = strided(batch.key), strided(batch.value)
    triton_attention.write_kv(key, value, batch.key_cache, batch.value_cache, slots)
    assert torch.equal(batch.key_cache, key_cache)
    assert torch.equal(batch.value_cache, value_cache)


@child_only
def test_cuda_backend_is_triton(triton_attention: ModuleType) -> None:
    backend = get_attention_backend("cuda")
    assert backend.name == "triton"
    assert backend.write_kv is triton_attention.write_kv
    assert backend.paged_attention is triton_attention.paged_attention


@child_only
def test_stale_nan_slots_are_never_read(triton_attention: ModuleType) -> None:
    """Slots past each seq_len (and unowned blocks) may hold anything, even NaN."""
    batch = make_batch([(20, 1), (0, 1), (15, 7)], 2, 6, 2)
    attention.write_kv(
        batch.key, batch.value, batch.key_cache, batch.value_cache, batch.meta.slot_mapping
    )
    block_size = batch.key_cache.shape[1]
    stale = torch.ones(batch.key_cache.shape[:2], dtype=torch.bool).view(-1)  # [num_slots]
    for table, seq_len in zip(batch.meta.block_tables, batch.meta.seq_lens_cpu, strict=True):
        positions = torch.arange(seq_len)
        stale[table[positions // block_size].long() * block_size + positions % block_size] = False
    for cache in (batch.key_cache, batch.value_cache):
        cache.view(stale.shape[0], -1)[stale] = float("nan")
    scale = 0.2
    out = triton_attention.paged_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.meta, scale
    )
    torch.testing.assert_close(out.double(), dense_attention(batch, scale), atol=2e-5, rtol=1e-4)
