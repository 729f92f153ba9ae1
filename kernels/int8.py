"""int8 GEMM paths for CPUs: the native W8A8 kernels (AMX tiles, VNNI and AVX2 twins), the
native weight-only ones, torch's weight-only int8 matmul, and torch's int8 x int8 matmul as
the reference and fallback.

Every path takes a float activation `x` [M, K] and per-output-channel symmetric int8
weights (`models.quant_int8`), and returns `x @ dequant(W).T + bias` in x's dtype.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kernels import native
from models import cpu_features

LANES = 16  # output channels per packed block (the C kernels' layout, int8_gemm.c)
# W8A8 (AMX, VNNI, AVX2), int16 activations on the VNNI and AVX2 tiles (a16-*) and weight-only
# (AMX-BF16 tiles, fp32 math on int8 weights) -> C function
NATIVE_KERNELS = {
    "amx": "int8_linear_amx",
    "wo-amx": "int8_wo_linear_amx",
    "vnni": "int8_linear_vnni",
    "avx2": "int8_linear_avx2",
    "a16-vnni": "int8_a16_linear_vnni",
    "a16-avx2": "int8_a16_linear_avx2",
    "wo-avx512": "int8_wo_linear_avx512",
    "wo-avx512bf16": "int8_wo_linear_avx512bf16",
    "wo-avx2": "int8_wo_linear_avx2",
}
# an MLP's gate_up with SiLU(gate) * up in its epilogue (the layer stack's), by W8A8 kernel;
# the VNNI one takes AVX512_BF16 too (the SiLU's twin)
SILU_KERNELS = {"amx": "int8_silu_mul_amx", "vnni": "int8_silu_mul_vnni"}
_DTYPE_FLAG = {torch.float32: 0, torch.bfloat16: 1}


@functools.cache
def _kernels() -> ctypes.CDLL | None:
    lib = native.load()
    if lib is None:
        return None
    for name in [*NATIVE_KERNELS.values(), *SILU_KERNELS.values()]:
        native.declare(lib, name, (
            [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
            + [ctypes.c_void_p] * 4
            + [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        ))  # fmt: skip
    native.declare(lib, "int8_dequantize", [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2 + [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
    ])  # fmt: skip
    return lib


def kernel_address(kernel: str) -> int:
    """The address of the C function for `kernel` (a NATIVE_KERNELS key, or a SILU_KERNELS
    value), for native callers (models/layer_stack.py)."""
    name = NATIVE_KERNELS.get(kernel, kernel)
    return ctypes.cast(getattr(_kernels(), name), ctypes.c_void_p).value


def native_available() -> bool:
    """True when the C kernels built (a compiler and AVX2 on this machine)."""
    return _kernels() is not None


AMX_K_STEP = 64  # the AMX kernel's K per tile: in_features must be a multiple of it


def amx_available() -> bool:
    """True when W8A8 can run on AMX tiles here: AMX-INT8 (unless DUET_CPU_ISA says
    otherwise) and Linux's permission for this process to use tile data."""
    return cpu_features.has_amx_int8() and native.amx_permitted()


AMX_BF16_K_STEP = 32  # the AMX weight-only kernel's K per tile (others take the AVX-512 twin)


def amx_bf16_available() -> bool:
    """True when the weight-only kernel can run on AMX-BF16 tiles here (bf16 activations):
    AMX-BF16 (unless DUET_CPU_ISA says otherwise) and the permission to use tile data."""
    return cpu_features.has_amx_bf16() and native.amx_permitted()


def pack_weight(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [N, K] -> (blocks of 16 channels x groups of 4 bytes of K, sum_k w per channel).

    Layout: packed[nb, k4, lane, j] = w[nb * 16 + lane, k4 * 4 + j], zero-padded.
    """
    n, k = qweight.shape
    n_pad, k_pad = -n % LANES, -k % 4
    padded = torch.nn.functional.pad(qweight, (0, k_pad, 0, n_pad))
    blocks = padded.view((n + n_pad) // LANES, LANES, (k + k_pad) // 4, 4)
    packed = blocks.permute(0, 2, 1, 3).contiguous()
    wsum = qweight.sum(dim=1, dtype=torch.int32).contiguous()
    return packed, wsum


def native_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    wsum: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    kernel: str,
) -> torch.Tensor:
    """x [M, K] fp32/bf16 -> [M, N] through the C kernel `kernel` (a NATIVE_KERNELS key)."""
    x = x.contiguous()
    if x.dtype not in _DTYPE_FLAG:
        x = x.float()
    m, k = x.shape
    n = wsum.shape[0]
    out = torch.empty(m, n, dtype=x.dtype)
    flag = _DTYPE_FLAG[x.dtype]
    getattr(_kernels(), NATIVE_KERNELS[kernel])(
        x.data_ptr(), flag, m, k, packed.data_ptr(), wsum.data_ptr(), scale.data_ptr(),
        0 if bias is None else bias.data_ptr(), n, out.data_ptr(), flag, torch.get_num_threads(),
    )  # fmt: skip
    return out


def silu_available(kernel: str) -> bool:
    """Whether the W8A8 kernel `kernel` has a gate_up twin with SiLU(gate) * up in its
    epilogue that runs here."""
    return kernel == "amx" or (kernel == "vnni" and cpu_features.has_avx512_bf16())


def silu_mul(
    x: torch.Tensor, packed: torch.Tensor, wsum: torch.Tensor, scale: torch.Tensor, kernel: str
) -> torch.Tensor:
    """x [M, K] bf16 and a gate_up's W8A8 weights (2 x inter channels, gate's first, no bias)
    -> SiLU(gate) * up [M, inter] bf16 through SILU_KERNELS[kernel]: the bits of
    native_linear(..., kernel) followed by kernels.fused.silu_mul."""
    x = x.contiguous()
    m, k = x.shape
    inter = wsum.shape[0] // 2
    out = torch.empty(m, inter, dtype=torch.bfloat16)
    getattr(_kernels(), SILU_KERNELS[kernel])(
        x.data_ptr(), 1, m, k, packed.data_ptr(), wsum.data_ptr(), scale.data_ptr(), 0, inter,
        out.data_ptr(), 1, torch.get_num_threads(),
    )  # fmt: skip
    return out


_WORKSPACES: dict[torch.dtype, torch.Tensor] = {}


def _workspace(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of at least `numel`, reused call after call: a fresh 100 MB tensor per
    linear is mostly page faults. The model's calls run one at a time, so one per dtype."""
    buffer = _WORKSPACES.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffer = _WORKSPACES[dtype] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def dense(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    shape: tuple[int, int],
) -> torch.Tensor:
    """Dequantize the packed weight (C), then a float GEMM in x's dtype: for large batches,
    where the GEMM is compute-bound and one pass over the weights costs little."""
    if x.dtype not in _DTYPE_FLAG:
        x = x.float()
    w = _workspace(shape[0] * shape[1], x.dtype).view(shape)
    _kernels().int8_dequantize(
        packed.data_ptr(), scale.data_ptr(), shape[0], shape[1], w.data_ptr(),
        _DTYPE_FLAG[x.dtype], torch.get_num_threads(),
    )  # fmt: skip
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: x [M, K] -> (q int8 [M, K], scale fp32 [M, 1]), q * s ~ x."""
    amax = x.float().abs().amax(dim=-1, keepdim=True)
    scale = amax / 127.0
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(x.float() * inv).clamp_(-127, 127).to(torch.int8)
    return q, scale


def torch_w8a8(
    x: torch.Tensor,
    qweight_t: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """W8A8 with torch ops (`torch._int_mm`): qweight_t is the int8 weight transposed, [K, N]."""
    q, x_scale = quantize_rows(x)
    y = torch._int_mm(q, qweight_t).float() * x_scale * scale
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)


def weight_only_supports(out_features: int, in_features: int) -> bool:
    """True for shapes `torch._weight_int8pack_mm` handles: it crashes (SIGSEGV) unless
    both sides are multiples of 8 (torch 2.13, checked by hand)."""
    return out_features % 8 == 0 and in_features % 8 == 0


def weight_only(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Weight-only int8 (`torch._weight_int8pack_mm`), bf16 activations: its fast case
    (its fp32 one measured 12-30x slower, docs/benchmarks.md)."""
    y = torch._weight_int8pack_mm(x.to(torch.bfloat16), qweight, scale.to(torch.bfloat16))
    if bias is not None:
        y = y + bias
    return y.to(x.dtype)
