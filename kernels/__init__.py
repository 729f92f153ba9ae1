"""Attention over the paged KV cache: a torch path for CPUs (and the reference), Triton for GPUs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.metadata import AttentionMetadata


@dataclass(frozen=True)
class AttentionBackend:
    """The two entry points every backend provides, with `kernels.attention`'s semantics."""

    name: str
    # (key, value, key_cache, value_cache, slot_mapping) -> None, in place
    write_kv: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
    # (query, key_cache, value_cache, meta, scale) -> [T, Hq, D]
    paged_attention: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor
    ]


def get_attention_backend(device: torch.device | str) -> AttentionBackend:
    """Triton kernels on CUDA devices; on CPUs the native C decode kernel when it builds,
    else the torch path.

    triton is imported only when CUDA is asked for, so CPU-only installs never need it.
    """
    if torch.device(device).type == "cuda":
        from kernels import triton_attention

        return AttentionBackend(
            "triton", triton_attention.write_kv, triton_attention.paged_attention
        )
    from kernels import cpu_attention, native

    if native.load() is not None:
        return AttentionBackend("cpu-native", cpu_attention.write_kv, cpu_attention.paged_attention)
    from kernels import attention

    return AttentionBackend("torch", attention.write_kv, attention.paged_attention)
