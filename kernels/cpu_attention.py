"""The CPU attention path: native C kernels for decode and prefill, the torch path otherwise.

Decode is where CPUs lose time to copies: the torch path gathers every sequence's K/V into
a padded copy before SDPA; the C kernel reads the blocks in place. Prefill chunks go through
a tiled C kernel that also reads the cache in place and does the causal half only (SDPA
there ran at a seventh of the linears' FLOP rate). On CPUs with AVX512_BF16 the bf16 twins
multiply bf16 pairs with `vdpbf16ps`; on CPUs with AMX-BF16, bf16 prefill takes a kernel on
AMX tiles (paged_prefill_amx.c), or torch's SDPA, which also multiplies bf16 tiles there,
for head sizes that kernel does not take.
"""

from __future__ import annotations

import ctypes

import torch

from kernels import attention, native
from kernels.metadata import AttentionMetadata
from models import cpu_features

write_kv = attention.write_kv
MAX_HEAD_DIM = 256  # paged_decode.c's MAX_BODY
PREFILL_MAX_GROUP = 48  # paged_prefill_impl.h's ROWS: query heads per KV head at most
PREFILL_HEAD_DIM_STEP = 8  # its DB: head sizes a multiple of this
AMX_PREFILL_HEAD_DIM_STEP = 32  # paged_prefill_amx.c's KSTEP


def _kernel_suffix(
    lib: ctypes.CDLL | None, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor
) -> str | None:
    """The kernels' dtype suffix when they can run on these tensors, else None."""
    suffix = native.DTYPE_SUFFIX.get(query.dtype)
    usable = (
        lib is not None
        and suffix is not None
        and query.dtype == key_cache.dtype == value_cache.dtype
        and key_cache.is_contiguous()
        and value_cache.is_contiguous()
        and query.shape[-1] <= MAX_HEAD_DIM
    )
    return suffix if usable else None


def native_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """query [B, Hq, D] -> [B, Hq, D] with the C kernel (fp32 or bf16, AVX-512 or AVX2 per
    `cpu_features.isa()`), or the torch path where it can't run. `lib`: another build of the
    kernel library (a benchmark's baseline) instead of this one's."""
    lib = lib or native.load()
    suffix = _kernel_suffix(lib, query, key_cache, value_cache)
    if suffix is None:
        return attention.decode_attention(query, key_cache, value_cache, meta, scale)
    q = query.contiguous()
    out = torch.empty_like(q)
    _decode(lib, suffix, q, key_cache, value_cache, meta, scale, out)
    return out


def int32_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous int32, itself when it already is (as the runner's metadata is): a
    `.to().contiguous()` costs ~2 us per tensor even when it copies nothing, per layer."""
    return t if t.dtype == torch.int32 and t.is_contiguous() else t.to(torch.int32).contiguous()


def _decode(
    lib: ctypes.CDLL,
    suffix: str,
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
) -> None:
    """The decode kernel over the first q.shape[0] sequences, into out (both contiguous)."""
    batch, num_heads, head_dim = q.shape
    tables, seq_lens = int32_contiguous(meta.block_tables), int32_contiguous(meta.seq_lens)
    getattr(lib, f"paged_decode_{suffix}_{native.twin(q.dtype)}")(
        q.data_ptr(),
        key_cache.data_ptr(),
        value_cache.data_ptr(),
        tables.data_ptr(),
        seq_lens.data_ptr(),
        out.data_ptr(),
        batch,
        num_heads,
        key_cache.shape[2],
        head_dim,
        key_cache.shape[1],
        tables.shape[1],
        scale,
        torch.get_num_threads(),
    )


def _prefill(
    lib: ctypes.CDLL,
    suffix: str,
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    twin: str,
) -> None:
    """The prefill kernel's `twin` over sequences [num_decodes, num_seqs), into their rows of
    out."""
    _, num_heads, head_dim = q.shape
    tables, seq_lens = int32_contiguous(meta.block_tables), int32_contiguous(meta.seq_lens)
    starts = int32_contiguous(meta.query_start_loc)
    getattr(lib, f"paged_prefill_{suffix}_{twin}")(
        q.data_ptr(),
        key_cache.data_ptr(),
        value_cache.data_ptr(),
        tables.data_ptr(),
        seq_lens.data_ptr(),
        starts.data_ptr(),
        out.data_ptr(),
        meta.num_decodes,
        meta.num_seqs,
        num_heads,
        key_cache.shape[2],
        head_dim,
        key_cache.shape[1],
        tables.shape[1],
        scale,
        torch.get_num_threads(),
    )


def _amx_prefill(dtype: torch.dtype, head_dim: int) -> str | None:
    """How bf16 prefill chunks run on CPUs with AMX-BF16: "amx" (the tile kernel; 0.5-0.7x
    of SDPA's time, docs/benchmarks.md), "sdpa" (torch's flash attention, also on
    AMX tiles there, for head sizes the kernel does not take), or None elsewhere."""
    if dtype != torch.bfloat16 or not cpu_features.has_amx_bf16():
        return None
    fits = head_dim % AMX_PREFILL_HEAD_DIM_STEP == 0
    return "amx" if fits and native.amx_permitted() else "sdpa"


def prefill_twin(
    dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int
) -> str | None:
    """The twin of the prefill kernel (paged_prefill_{dtype}_{twin}) that chunks of this
    shape take here: "amx" for bf16 on AMX tiles, else the ISA twin for `dtype`; None where
    they take the torch path (SDPA for the head sizes the AMX kernel does not take, group
    or head sizes the other kernels do not)."""
    amx = _amx_prefill(dtype, head_dim)
    if amx is not None:
        return "amx" if amx == "amx" else None
    fits = num_heads // num_kv_heads <= PREFILL_MAX_GROUP and head_dim % PREFILL_HEAD_DIM_STEP == 0
    return native.twin(dtype) if fits else None


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """`kernels.attention.paged_attention` semantics, decode and prefill through the C
    kernels into one output (no per-sequence copies)."""
    if 0 < meta.num_decodes == meta.num_seqs:  # decodes only, as most steps are
        return native_decode(query, key_cache, value_cache, meta, scale)
    lib = native.load()
    suffix = _kernel_suffix(lib, query, key_cache, value_cache)
    num_heads, head_dim = query.shape[1], query.shape[2]
    prefills = meta.num_seqs > meta.num_decodes
    twin = prefill_twin(query.dtype, num_heads, key_cache.shape[2], head_dim) if prefills else ""
    if suffix is None or twin is None:
        return attention.paged_attention(
            query, key_cache, value_cache, meta, scale, decode=native_decode
        )
    q = query.contiguous()
    out = torch.empty_like(q)
    if meta.num_decodes > 0:
        decodes = meta.num_decodes
        _decode(lib, suffix, q[:decodes], key_cache, value_cache, meta, scale, out[:decodes])
    if prefills:
        _prefill(lib, suffix, q, key_cache, value_cache, meta, scale, out, twin)
    return out
