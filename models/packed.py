"""Linear layers on weights packed once, at load, into oneDNN's blocked layout.

A plain bf16 `F.linear` re-lays-out its weight on every call; decode calls each linear
once per step with a handful of rows, so that copy is most of the cost. Packed once, the
30 layers' linears plus the LM head take about half the time at batch 1 (docs/benchmarks.md).
float32 is packed too (a decode step in 0.66x of the time at batch 1 and 16): oneDNN's packed
kernel is not bit-equal to `F.linear` (it sums in another order), yet the real-model
parity tests, greedy and logprobs, stay token-identical with Hugging Face's fp32.
On CPUs with AVX512_BF16, bf16 linears take duet's own kernel instead (TileLinear: AMX tiles
where the CPU has them, else `vdpbf16ps` on the same packed weights, kernels/bf16_gemm.py),
which reads a decode step's weights faster than oneDNN's and lets the layer stack run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import nn

from kernels import bf16_gemm

logger = logging.getLogger(__name__)

PACKED_DTYPES = (torch.bfloat16, torch.float32)
DISABLE_ENV = "DUET_DISABLE_PACKED_LINEARS"  # "1": every linear on F.linear (A/B, bit-equality)


class _TileModule(nn.Module):
    """A module over duet's bf16 kernels (kernels/bf16_gemm.py): `_rows` takes x as rows
    [M, in_features]; `forward` any leading dimensions."""

    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._rows(x.reshape(-1, self.in_features))
        return y.view(*x.shape[:-1], self.out_features)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TileLinear(_TileModule):
    """`x @ weight.T + bias` for bf16 on duet's kernels, the weight packed once into their
    tile layout (kernels/bf16_gemm.py)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = bf16_gemm.pack(weight)
        self.bias = None if bias is None else bias.detach().float()

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_gemm.linear(x, self.packed, self.bias, self.out_features)


class TileGateUpSiLU(_TileModule):
    """An MLP's gate_up projection and its activation in one of duet's bf16 kernels:
    x -> SiLU(x @ gate.T) * (x @ up.T), from the fused [2 * I, K] gate_up weight (no bias)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape[0] // 2, weight.shape[1]
        self.packed = bf16_gemm.pack_gate_up(weight)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_gemm.silu_mul(x, self.packed, self.out_features)


class PackedLinear(nn.Module):
    """`x @ weight.T + bias` through oneDNN with the weight already in its blocked layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def packing_available(dtype: torch.dtype) -> bool:
    """True when this torch build packs `dtype` linears (oneDNN present and the dtype one
    it is faster for), unless DUET_DISABLE_PACKED_LINEARS=1 keeps `F.linear`."""
    if os.environ.get(DISABLE_ENV) == "1":
        return False
    if dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = PackedLinear(torch.zeros(8, 8, dtype=dtype), None)
        probe(torch.zeros(1, 8, dtype=dtype))
    except (RuntimeError, AttributeError) as exc:  # op missing or CPU unsupported
        logger.info("oneDNN packed linears unavailable, using F.linear: %s", exc)
        return False
    return True


def tiles_available(dtype: torch.dtype) -> bool:
    """True when `dtype` linears take duet's kernels (TileLinear) here rather than oneDNN:
    bf16 on a CPU with AMX-BF16 or AVX512_BF16, unless DUET_CPU_ISA hides them."""
    return dtype == torch.bfloat16 and bf16_gemm.available()


def packed_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """The packed linear for `weight`: on duet's kernels where they take it, else oneDNN's."""
    if tiles_available(weight.dtype) and bf16_gemm.supports(weight.shape[1]):
        return TileLinear(weight, bias)
    return PackedLinear(weight, bias)


def packing_kind(dtype: torch.dtype) -> str:
    """How `dtype` linears are packed here, for the start-up log."""
    if not tiles_available(dtype):
        return "oneDNN"
    return "AMX-BF16 tiles" if bf16_gemm.twin() == "amx" else "AVX512_BF16 on tiles' layout"


def pack_linears(model: nn.Module) -> int:
    """Swap every nn.Linear inside `model` for a packed one; returns how many."""
    return swap_linears(model, lambda linear: packed_linear(linear.weight, linear.bias))


def swap_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace every nn.Linear inside `model` with `make(linear)`; returns how many."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    for parent, name, child in swaps:
        setattr(parent, name, make(child))
    return len(swaps)
