"""The CPU attention path: the torch path with decode swapped for the native C kernel.

Decode is where CPUs lose time: the torch path gathers every sequence's K/V into a padded
copy before SDPA; the C kernel reads the blocks in place. Prefill chunks stay on SDPA,
which is already compute-bound there.
"""

from __future__ import annotations

import torch

from kernels import attention, native
from kernels.metadata import AttentionMetadata
from models import cpu_features

write_kv = attention.write_kv
MAX_HEAD_DIM = 256  # paged_decode.c's MAX_BODY


def native_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """query [B, Hq, D] -> [B, Hq, D] with the C kernel (fp32 or bf16, AVX-512 or AVX2 per
    `cpu_features.isa()`), or the torch path where it can't run."""
    lib = native.load()
    batch, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    suffix = native.DTYPE_SUFFIX.get(query.dtype)
    usable = (
        lib is not None
        and suffix is not None
        and query.dtype == key_cache.dtype == value_cache.dtype
        and key_cache.is_contiguous()
        and value_cache.is_contiguous()
        and head_dim <= MAX_HEAD_DIM
    )
    if not usable:
        return attention.decode_attention(query, key_cache, value_cache, meta, scale)
    q = query.contiguous()
    out = torch.empty_like(q)
    tables = meta.block_tables.to(torch.int32).contiguous()
    seq_lens = meta.seq_lens.to(torch.int32).contiguous()
    kernel = getattr(lib, f"paged_decode_{suffix}_{cpu_features.isa()}")
    kernel(
        q.data_ptr(),
        key_cache.data_ptr(),
        value_cache.data_ptr(),
        tables.data_ptr(),
        seq_lens.data_ptr(),
        out.data_ptr(),
        batch,
        num_heads,
        num_kv_heads,
        head_dim,
        key_cache.shape[1],
        tables.shape[1],
        scale,
        torch.get_num_threads(),
    )
    return out


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """`kernels.attention.paged_attention` semantics, decode through the C kernel."""
    return attention.paged_attention(
        query, key_cache, value_cache, meta, scale, decode=native_decode
    )
