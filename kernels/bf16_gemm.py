"""bf16 linears on duet's own kernels (kernels/csrc/bf16_gemm.c), weights packed once at load.

On CPUs with AMX-BF16 the kernel multiplies tiles; at decode sizes it reads the weight at
close to the memory's speed (0.54-0.60x of oneDNN's packed linear's time at 1-32 rows),
and at prefill sizes each tile's epilogue runs while the next tile multiplies
(docs/benchmarks.md, "bf16 linears on AMX tiles", "Epilogues under the tiles'
multiplications"). On CPUs with AVX512_BF16 and no AMX (Zen 4, Zen 5) its twin multiplies
the same packed weights with `vdpbf16ps`, which lets the layer stack (models/layer_stack.py)
run a bf16 step there too. `DUET_CPU_ISA=avx512bf16` hides AMX (the twin runs), and
`DUET_CPU_ISA=avx512` AVX512_BF16 (oneDNN runs the linears).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels import native
from models import cpu_features

LANES = 16  # output channels per packed block
K_STEP = 32  # k per tile: in_features must be a multiple of it


TWINS = ("amx", "avx512bf16")


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """`lib` with its kernels' argument types given: this build's, or another build's for a
    benchmark's baseline (the `lib` arguments below; an older build may lack a twin)."""
    for twin in TWINS:
        if not hasattr(lib, f"bf16_linear_{twin}"):
            continue
        # (x, m, k, packed, bias or NULL, n, out, threads)
        native.declare(lib, f"bf16_linear_{twin}", [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
        ])  # fmt: skip
        # (x, m, k, packed, inter, out, threads)
        native.declare(lib, f"bf16_silu_mul_{twin}", [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
            ctypes.c_void_p, ctypes.c_int,
        ])  # fmt: skip
    return lib


@functools.cache
def _library() -> ctypes.CDLL:
    return declare(native.load())


def twin() -> str | None:
    """Which kernel runs bf16 linears here: "amx" on AMX-BF16 tiles (with Linux's permission
    for this process to use tile data), "avx512bf16" on `vdpbf16ps`, None where neither (as
    DUET_CPU_ISA allows)."""
    if native.load() is None:
        return None
    if cpu_features.has_amx_bf16() and native.amx_permitted():
        return "amx"
    return "avx512bf16" if cpu_features.has_avx512_bf16() else None


def available() -> bool:
    """True when bf16 linears can run on one of these kernels here."""
    return twin() is not None


def supports(in_features: int) -> bool:
    """True when a linear with `in_features` inputs fits the kernels' tiles."""
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
    getattr(lib or _library(), f"bf16_linear_{twin()}")(
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
    getattr(lib or _library(), f"bf16_silu_mul_{twin()}")(
        x.data_ptr(), m, k, packed.data_ptr(), intermediate, out.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return out
