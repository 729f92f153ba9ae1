"""bf16 linears on AMX-BF16 tiles (kernels/csrc/bf16_gemm.c), weights packed once at load.

On CPUs with AMX-BF16 this kernel takes a bf16 model's linears at every size: at decode
sizes it reads the weight at close to the memory's speed (0.54-0.60x of oneDNN's packed
linear's time at 1-32 rows), and at prefill sizes each tile's epilogue runs while the next
tile multiplies (docs/benchmarks.md, "bf16 linears on AMX tiles", "Epilogues under the
tiles' multiplications").
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels import native
from models import cpu_features

LANES = 16  # output channels per packed block
K_STEP = 32  # k per tile: in_features must be a multiple of it


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib` with the two tile kernels' argument types given: this build's, or another
    build's for a benchmark's baseline (the `lib` arguments below)."""
    # (x, m, k, packed, bias or NULL, n, out, threads)
    native.declare(lib, "bf16_linear_amx", [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
    ])  # fmt: skip
    # (x, m, k, packed, inter, out, threads)
    native.declare(lib, "bf16_silu_mul_amx", [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_int,
    ])  # fmt: skip
    return lib


@functools.cache
def _library() -> ctypes.CDLL:
    return declare(native.load())


def available() -> bool:
    """True when bf16 linears can run on AMX tiles here: AMX-BF16 (unless DUET_CPU_ISA says
    otherwise) and Linux's permission for this process to use tile data."""
    return cpu_features.has_amx_bf16() and native.amx_permitted()


def supports(in_features: int) -> bool:
    """True when a linear with `in_features` inputs fits the kernel's tiles."""
    return in_features % K_STEP == 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """bf16 [N, K] -> the B-tile layout: packed[nb, k // 2, lane, k % 2] = w[nb * 16 + lane, k],
    zero rows padding N to whole blocks."""
    n, k = weight.shape
    padded = torch.nn.functional.pad(weight.detach().to(torch.bfloat16), (0, 0, 0, -n % LANES))
    return padded.view(-1, LANES, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """x [M, K] bf16 -> x @ W.T + bias [M, n] bf16, W packed by `pack`; bias fp32 or None.
    `lib`: another build of the kernels (`declare`d), a benchmark's baseline."""
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty(m, n, dtype=torch.bfloat16)
    (lib or _library()).bf16_linear_amx(
        x.data_ptr(), m, k, packed.data_ptr(), 0 if bias is None else bias.data_ptr(), n,
        out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def gate_up_supported(intermediate: int, in_features: int) -> bool:
    """True when an MLP's gate_up projection can take SiLU(gate) * up in the kernel."""
    return intermediate % LANES == 0 and supports(in_features)


def pack_gate_up(weight: torch.Tensor) -> torch.Tensor:
    """gate_up [2 * I, K] (gate rows, then up rows) -> `pack`'s layout with gate and up blocks
    alternating, so that a pair of blocks holds both halves of 16 outputs."""
    two_i, k = weight.shape
    halves = weight.detach().view(2, two_i // 2 // LANES, LANES, k)  # [gate/up, block, lane, k]
    return pack(halves.transpose(0, 1).reshape(two_i, k))


def silu_mul(
    x: torch.Tensor, packed: torch.Tensor, intermediate: int, lib: ctypes.CDLL | None = None
) -> torch.Tensor:
    """x [M, K] bf16 -> SiLU(x @ gate.T) * (x @ up.T) [M, I] bf16, the weight packed by
    `pack_gate_up`; the same bits as `linear` followed by `kernels.fused.silu_mul`. `lib`:
    as `linear`'s."""
    x = x.contiguous()
    m, k = x.shape
    out = torch.empty(m, intermediate, dtype=torch.bfloat16)
    (lib or _library()).bf16_silu_mul_amx(
        x.data_ptr(), m, k, packed.data_ptr(), intermediate, out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out
