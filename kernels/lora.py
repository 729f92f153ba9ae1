"""The batched multi-LoRA delta: y[t] += scale[s] * (x[t] @ A[s].T) @ B[s].T for each
adapter row t, s its own slot, through the native kernel (kernels/csrc/lora_bgmv.c: twins
for AVX-512 with AVX512_BF16's pair dot product, AVX-512 and AVX2) or torch.

`StackedLoRA` holds one wrapped linear's resident adapters in the kernel's layout; `LoRARows`
one step's adapter rows grouped by slot. Both are built by models/lora.py.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kernels import native

SLACK = 32  # elements after each weight: a kernel's last vector may read past a row
_DTYPE_FLAG = {torch.float32: 0, torch.bfloat16: 1}
TWINS = ("avx512bf16", "avx512", "avx2")


@dataclass
class StackedLoRA:
    """One linear's slots, rank padded to the largest (zeros where an adapter lacks a shard).

    R = len(shards) * rank. Slot s owns a's columns [s * R, (s + 1) * R) (shard-major, then
    rank) and b's rows [s * rank, (s + 1) * rank); shard j's columns [b_col[j], + size[j])
    of b are y's columns [y_col[j], + size[j]). The rank is even, so bf16 weights pair up
    along it for the native kernel, which reads them in k-pairs (`native_a`, `native_b`).
    """

    a: torch.Tensor  # [in, slots * R], SLACK elements of storage after it
    b: torch.Tensor  # [slots * rank, cols], the same
    rank: int
    y_col: list[int]
    b_col: list[int]
    size: list[int]
    shard_args: torch.Tensor = field(init=False)  # int32 [3, shards]: y_col, b_col, size
    native_a: torch.Tensor = field(init=False)  # a, or bf16 a in k-pairs [in / 2, W, 2]
    native_b: torch.Tensor = field(init=False)  # b, or bf16 b in rank pairs
    kernel_args: tuple = field(init=False)  # the C kernel's weight arguments, made once

    def __post_init__(self) -> None:
        self.shard_args = torch.tensor([self.y_col, self.b_col, self.size], dtype=torch.int32)
        y_col, b_col, size = (self.shard_args[i].data_ptr() for i in range(3))
        paired = self.a.dtype == torch.bfloat16
        self.native_a = _k_pairs(self.a) if paired else self.a
        self.native_b = _k_pairs(self.b) if paired else self.b
        self.kernel_args = (self.native_a.data_ptr(), self.native_b.data_ptr(), self.rank,
                            len(self.size), y_col, b_col, size)  # fmt: skip

    @property
    def slots(self) -> int:
        return self.b.shape[0] // self.rank


def _k_pairs(w: torch.Tensor) -> torch.Tensor:
    """w [K, N] as [ceil(K / 2), N, 2] (rows 2i and 2i + 1 side by side, a zero row where K
    is odd), with SLACK elements of storage after it."""
    rows, cols = w.shape
    half = -(-rows // 2)
    flat = torch.zeros(2 * half * cols + SLACK, dtype=w.dtype)
    pairs = flat[: 2 * half * cols].view(half, cols, 2)
    pairs[: rows // 2] = w[: rows // 2 * 2].view(rows // 2, 2, cols).transpose(1, 2)
    if rows % 2:
        pairs[half - 1, :, 0] = w[rows - 1]
    return pairs


def empty_stack(
    slots: int, in_features: int, rank: int, sizes: Sequence[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed (a, b) for `slots` adapters of `rank` over shards of `sizes` (with SLACK)."""
    width = slots * len(sizes) * rank
    cols = sum(sizes)
    a = torch.zeros(in_features * width + SLACK, dtype=dtype)[: in_features * width]
    b = torch.zeros(slots * rank * cols + SLACK, dtype=dtype)[: slots * rank * cols]
    return a.view(in_features, width), b.view(slots * rank, cols)


@dataclass
class LoRARows:
    """One step's adapter rows of the flat batch, grouped by slot (base rows absent)."""

    rows: torch.Tensor  # [N] int64, sorted by slot
    seg: torch.Tensor  # [slots + 1] int32: slot s owns rows[seg[s] : seg[s + 1]]
    scale: torch.Tensor  # [slots] fp32: each slot's adapter's alpha / r (0 for none)
    rows32: torch.Tensor = field(init=False)  # rows as int32, for the kernel
    kernel_args: tuple = field(init=False)  # the C kernel's row arguments
    present: list[int] = field(init=False)  # slots with at least one row
    scales: list[float] = field(init=False)
    _weights: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rows32 = self.rows.to(torch.int32)
        self.kernel_args = (self.rows32.data_ptr(), self.seg.data_ptr(), len(self.scale),
                            self.scale.data_ptr())  # fmt: skip
        counts = (self.seg[1:] - self.seg[:-1]).tolist()
        self.present = [s for s, n in enumerate(counts) if n]
        self.scales = self.scale.tolist()

    @classmethod
    def of(cls, slot_per_row: torch.Tensor, scale: Sequence[float]) -> LoRARows:
        """From each row's slot ([T] int64, -1 for a base row) and each slot's scale."""
        rows = (slot_per_row >= 0).nonzero().flatten()
        row_slot = slot_per_row[rows]
        order = torch.sort(row_slot, stable=True).indices  # each slot's rows stay in order
        seg = torch.zeros(len(scale) + 1, dtype=torch.int32)
        seg[1:] = torch.bincount(row_slot, minlength=len(scale)).cumsum(0)
        return cls(rows[order], seg, torch.tensor(scale, dtype=torch.float32))

    def weights(self, dtype: torch.dtype) -> torch.Tensor:
        """[N, slots]: a row's scale on its own slot, 0 elsewhere (built once per step)."""
        weights = self._weights.get(dtype)
        if weights is None:
            counts = self.seg[1:] - self.seg[:-1]
            slot = torch.repeat_interleave(torch.arange(len(counts)), counts)
            own = slot[:, None] == torch.arange(len(counts))[None, :]
            weights = self._weights[dtype] = own.to(dtype) * self.scale.to(dtype)
        return weights


@functools.cache
def _kernels() -> ctypes.CDLL | None:
    lib = native.load()
    if lib is None:
        return None
    for isa in TWINS:
        native.declare(lib, f"lora_bgmv_{isa}", (
            [ctypes.c_void_p] * 2 + [ctypes.c_int] * 3 + [ctypes.c_void_p] * 2 + [ctypes.c_int]
            + [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2 + [ctypes.c_void_p] * 3 + [ctypes.c_int]
        ))  # fmt: skip
    return lib


def native_available() -> bool:
    """True when the C kernels built (a compiler and AVX2 on this machine)."""
    return _kernels() is not None


def add_lora(y: torch.Tensor, x: torch.Tensor, stack: StackedLoRA, rows: LoRARows) -> None:
    """y [T, out] += each adapter row's delta, in place: natively where the kernel runs
    (x, y and the weights fp32, or all bf16), else through torch."""
    if (
        x.dtype in _DTYPE_FLAG
        and x.dtype == y.dtype == stack.a.dtype
        and y.is_contiguous()
        and native_available()
    ):
        add_lora_native(y, x.contiguous(), stack, rows, native.twin(x.dtype))
    else:
        add_lora_torch(y, x, stack, rows)


def add_lora_native(
    y: torch.Tensor, x: torch.Tensor, stack: StackedLoRA, rows: LoRARows, isa: str
) -> None:
    """The C kernel's twin for `isa` (one of TWINS); x and y contiguous."""
    rows_ptr, seg, slots, scale = rows.kernel_args
    a, b, rank, shards, y_col, b_col, size = stack.kernel_args
    getattr(_kernels(), f"lora_bgmv_{isa}")(
        x.data_ptr(), y.data_ptr(), _DTYPE_FLAG[x.dtype], x.shape[1], y.shape[1], rows_ptr,
        seg, slots, a, b, scale, rank, shards, y_col, b_col, size, torch.get_num_threads(),
    )  # fmt: skip


def add_lora_torch(y: torch.Tensor, x: torch.Tensor, stack: StackedLoRA, rows: LoRARows) -> None:
    """The torch path: one adapter in the step multiplies by its own columns only; several
    share one matmul over every slot's A and keep each row's own columns by a mask (fewer
    ops than one group per adapter, which costs more than the extra flops here)."""
    n, rank, shards = rows.rows.shape[0], stack.rank, len(stack.size)
    xs = x.index_select(0, rows.rows)  # [N, in]
    if len(rows.present) == 1:
        s = rows.present[0]
        width = shards * rank
        xa = (xs @ stack.a[:, s * width : (s + 1) * width]) * rows.scales[s]  # [N, R]
        parts = [xa[:, j * rank : (j + 1) * rank] for j in range(shards)]
        b = stack.b[s * rank : (s + 1) * rank]
    else:
        xa = (xs @ stack.a).view(n, stack.slots, shards, rank)  # [N, slots, shards, rank]
        xa = xa * rows.weights(xa.dtype)[:, :, None, None]
        parts = [xa[:, :, j].reshape(n, stack.slots * rank) for j in range(shards)]
        b = stack.b
    for part, y_col, b_col, size in zip(parts, stack.y_col, stack.b_col, stack.size, strict=True):
        delta = part @ b[:, b_col : b_col + size]  # [N, size]
        y.narrow(1, y_col, size).index_add_(0, rows.rows, delta.to(y.dtype))
