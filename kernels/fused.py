"""The decoder's small per-layer ops, fused: C kernels (kernels/csrc/fused_ops.c) where
they run, else the torch ops they replace, which are also the reference tests hold them to.

Residual add + RMSNorm, RoPE on q and k with the KV cache write, and SiLU(gate) * up are
each a handful of torch ops per layer (an allocation, a pass over memory and a dispatch
apiece); at small batches those, not the matmuls, were half of a decode step. The kernels
take CPU tensors in fp32 or bf16 and pick the AVX-512 or AVX2 twin per
`cpu_features.isa()`. DUET_DISABLE_FUSED_OPS=1 (or DUET_DISABLE_NATIVE_KERNELS=1) keeps the
torch ops, for A/B runs.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from kernels import native
from models import cpu_features, switches

DISABLE_ENV = "DUET_DISABLE_FUSED_OPS"
# rows run on one thread below this many elements: an OpenMP fork/join costs microseconds,
# more than a small batch's whole op
_PARALLEL_MIN = 1 << 16
_MAX_HEAD_DIM = 256  # the kernel's per-head scratch row (CHUNK in fused_ops.c)


def kernel(name: str, dtype: torch.dtype) -> ctypes._CFuncPtr | None:
    """The C kernel `name` for `dtype` activations on this CPU's ISA, or None."""
    if switches.read(DISABLE_ENV) == "1":
        return None
    # bf16 rounding in hardware where the kernel has such a twin (0.6-0.85x of the time:
    # docs/benchmarks.md)
    has_bf16_twin = name in native.FUSED_AVX512BF16_KERNELS
    return _lookup(name, dtype, native.twin(dtype) if has_bf16_twin else cpu_features.isa())


@functools.cache  # a step asks ~100 times; the switches are read above, each call
def _lookup(name: str, dtype: torch.dtype, isa: str) -> ctypes._CFuncPtr | None:
    lib, suffix = native.load(), native.DTYPE_SUFFIX.get(dtype)
    return None if lib is None or suffix is None else getattr(lib, f"{name}_{suffix}_{isa}")


def _threads(numel: int) -> int:
    return torch.get_num_threads() if numel >= _PARALLEL_MIN else 1


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's RMSNorm in its order (fp32 inside even for bf16 activations), so fp32
    results match its bits and bf16 ones round where its do."""
    dtype = x.dtype
    x = x.float()
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps)).to(dtype)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """weight * RMSNorm(x) for x [T, hidden]. With `residual` (the pre-norm residual stream,
    [T, hidden]): `residual += x` in place first, and the sum is what gets normalized."""
    fn = kernel("rms_norm", x.dtype) if x.is_cpu else None
    if fn is None or weight.dtype != x.dtype or not x.is_contiguous():
        if residual is not None:
            x = residual.add_(x)
        return torch_rms_norm(x, weight, eps)
    out = torch.empty_like(x)
    hidden = x.shape[-1]
    fn(
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        x.numel() // hidden,
        hidden,
        eps,
        _threads(x.numel()),
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up from a fused projection's output [T, 2 * I] (gate first) -> [T, I]."""
    fn = kernel("silu_mul", gate_up.dtype) if gate_up.is_cpu else None
    if fn is None or not gate_up.is_contiguous():
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, inter)
    fn(gate_up.data_ptr(), out.data_ptr(), rows, inter, _threads(gate_up.numel()))
    return out


def rope_write_kv(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
) -> torch.Tensor | None:
    """RoPE (neox) on q and k of a fused qkv [T, (Hq + 2 Hkv) * D], k and v stored at their
    slots of key_cache, value_cache [num_blocks, block_size, Hkv, D]; returns q [T, Hq, D] in
    the cache's dtype. cos, sin: [max_positions, D / 2]; positions, slot_mapping: [T] int64.
    None where the kernel can't run (the caller takes the torch path)."""
    fn = kernel("rope_kv", qkv.dtype) if qkv.is_cpu else None
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    usable = (
        fn is not None
        and cos.dtype == sin.dtype == qkv.dtype
        and key_cache.dtype == value_cache.dtype
        and key_cache.dtype in native.DTYPE_SUFFIX
        and head_dim <= _MAX_HEAD_DIM
        and positions.dtype == slot_mapping.dtype == torch.int64
        and qkv.is_contiguous()
        and key_cache.is_contiguous()
        and value_cache.is_contiguous()
    )
    if not usable:
        return None
    tokens = qkv.shape[0]
    q = torch.empty(tokens, num_heads, head_dim, dtype=key_cache.dtype)
    fn(
        qkv.data_ptr(),
        positions.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        slot_mapping.data_ptr(),
        q.data_ptr(),
        key_cache.data_ptr(),
        value_cache.data_ptr(),
        key_cache.dtype == torch.bfloat16,
        tokens,
        num_heads,
        num_kv_heads,
        head_dim,
        _threads(qkv.numel()),
    )
    return q
