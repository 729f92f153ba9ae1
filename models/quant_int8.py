"""`--quantization int8`: per-output-channel symmetric int8 weights, quantized at load.

Every linear (and the LM head, tied or not) becomes an `Int8Linear`; the embedding table
stays in the model's float dtype, so the lookup is unchanged. Each call picks its path by
its number of rows (tokens) from `ROUTES`, a table measured on this machine kind
(docs/benchmarks.md, scripts/bench_int8.py) and fixed at load from the CPU and the model
dtype. With the native kernels, activations are quantized per token too (W8A8: VNNI where
the CPU has AVX512_VNNI, the AVX2 twin elsewhere), after smoothing scales are folded into
the weights (models.smooth_quant), in every linear but down_proj, which keeps float
activations: bf16 ones quantized to 16 bits on the same W8A8 tiles at small batches, else the
native weight-only kernels (on AMX-BF16 tiles or `vdpbf16ps` where the CPU has them), or
dequantize + a float GEMM for large bf16 batches. DUET_INT8_W8A8=1 quantizes activations to
int8 in every linear, =0 in none.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from torch import nn

from engine_core.messages.config import QUANTIZATIONS
from kernels import int8
from models import cpu_features
from models.packed import swap_linears
from models.smooth_quant import smooth_for_w8a8

logger = logging.getLogger(__name__)


# How each call is computed, by its number of rows (tokens): the first (max_rows, path)
# whose max_rows holds it, None meaning any size. Paths:
#   wo    weight-only: fp32 math on the int8 weights (the native kernel; torch's
#         bf16-activation one without it), no activation rounding
#   w8a8  activations quantized per token, int8 x int8 (VNNI or AVX2; torch._int_mm without
#         native kernels)
#   wo_amx weight-only on AMX-BF16 tiles (bf16 activations): the weights widened to bf16
#         once per call, no activation rounding
#   wo_dp weight-only on AVX512_BF16's `vdpbf16ps` (bf16 activations, no AMX): the same
#         numbers as wo_amx
#   w8a16 activations quantized per token to 16 bits, through the W8A8 tiles (VNNI or AVX2)
#         as two int8 rows a token (kernels/csrc/int8_gemm.c): an error below max|x| / 65,000
#         a row, finer than the bf16 rounding of the activations themselves
#   dense dequantize the weight, then a float GEMM in the activations' dtype
# Measured (docs/benchmarks.md, "int8"; scripts/bench_int8.py): native W8A8 is the fastest
# at every batch size, and with smoothing its perplexity on SmolLM2 is within 1 % of fp32's
# (3 % without). W8A8 in every linear still moves single tokens' logprobs by up to ~0.6
# nats, so down_proj, whose inputs (SiLU(gate) * up) spread widest from token to token,
# keeps float activations: weight-only while the step is memory-bound, and with bf16
# activations dequantize + oneDNN's bf16 GEMM beyond 32 rows (prefill; fp32's GEMM never
# beat the weight-only kernel). Without native kernels torch's int8 x int8 matmul loses to
# its weight-only one at small batches, so every linear keeps float activations there.
Route = tuple[tuple[int | None, str], ...]
# Native bf16 activations take w8a16 (docs/benchmarks.md, "16-bit activations on the W8A8
# tiles"; all of a step's linears through each kernel on the Zen 5): 0.96x of the AVX-512
# weight-only kernel's time at 1-4 rows, 0.72x at 8, 0.53x at 32 (the AVX2 twins: 0.63x at
# one row, 0.84x at 16-32), until dequantize + a bf16 GEMM takes over.
# Its error stays at the size of the activations' own bf16 rounding, so fp32 activations,
# which have none, keep the exact weight-only kernel: through 16 bits, the forced-AVX2 fp32
# model's greedy output left fp32's top 5 on a chat (tests/test_quant_int8.py).
ROUTES: dict[tuple[str, torch.dtype], Route] = {
    ("native", torch.bfloat16): ((32, "w8a16"), (None, "dense")),
    ("native", torch.float32): ((None, "wo"),),
    ("torch", torch.bfloat16): ((2, "wo"), (None, "dense")),
    ("torch", torch.float32): ((None, "dense"),),
}
# W8A8's own (paths as above, and `amx`: int8 x int8 on AMX tiles): VNNI or AVX2 at every
# size, except on CPUs with AMX (docs/benchmarks.md, "int8 on the AMX machine", "AMX tiles at
# decode sizes" and "The AMX W8A8 epilogue in vectors"): AMX-INT8 tiles from 5 rows (0.66x of
# VNNI's time at 16 rows since the kernel prefetches its weight tiles) and, since its
# epilogue is vectorized, at prefill sizes too (0.58-0.86x of dequantize + oneDNN's bf16
# GEMM at 1024-2048 rows, even at 4096); where the AMX-INT8 kernel cannot run (no
# permission, in_features not a multiple of 64) that bf16 GEMM from 385 rows.
W8A8_ROUTE: Route = ((None, "w8a8"),)
AMX_ROUTE: Route = ((4, "w8a8"), (None, "amx"))
AMX_BF16_ROUTE: Route = ((384, "w8a8"), (None, "dense"))
# Float (bf16) activations on CPUs with AMX-BF16 (down_proj by default): the weight-only
# kernel on AMX tiles from 2 rows (0.42x of the AVX-512 weight-only kernel's time at 16 rows,
# 0.45x of dequantize + oneDNN's at 64; since it widens the weight as it streams, 0.81x of
# the AVX-512 kernel's at 4 rows and even at 1-2), and oneDNN's GEMM over the dequantized
# weight beyond 256 (docs/benchmarks.md, "int8 weight-only on AMX tiles", "AMX tiles at
# decode sizes").
AMX_WO_ROUTE: Route = ((1, "wo"), (256, "wo_amx"), (None, "dense"))
# Float (bf16) activations on CPUs with AVX512_BF16 and no AMX: w8a16 up to A16_UPTO rows,
# the weight-only kernel on `vdpbf16ps` over the widened weight (kernels/csrc/int8_gemm.c)
# beyond, where twice the rows through VNNI cost more than widening the weight once a call
# (docs/benchmarks.md, "16-bit activations on the W8A8 tiles": against the route before, the
# AVX-512 weight-only kernel up to 8 rows and this one beyond, 0.96x at 1-4 rows, 0.72x at 8,
# 0.75x at 16, 0.86x at 32, 0.95x at 64; 1.02x at 128).
A16_UPTO = 96
DP_WO_ROUTE: Route = ((A16_UPTO, "w8a16"), (None, "wo_dp"))
W8A8_ENV = "DUET_INT8_W8A8"  # "1": int8 activations in every linear, "0": in none
FLOAT_ACTIVATIONS = ("down_proj",)  # linears (by name) that keep them float by default


class QuantizationError(ValueError):
    """An unknown --quantization value; the message is one line for the user."""


def check_quantization(name: str | None) -> None:
    """Raise QuantizationError unless `name` is None or a supported method."""
    if name is not None and name not in QUANTIZATIONS:
        raise QuantizationError(
            f"unknown quantization {name!r} (supported: {', '.join(QUANTIZATIONS)})"
        )


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float [N, K] -> (int8 [N, K] in [-127, 127], fp32 scale [N]); w ~ q * scale[:, None]."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight an int8 one stands for."""
    return qweight.float() * scale[:, None]


def w8a8_kernel() -> str:
    """The W8A8 kernel for this CPU: "vnni", "avx2" (native twins) or "torch"."""
    if not int8.native_available():
        return "torch"
    return "vnni" if cpu_features.has_vnni() else "avx2"


def int8_activations(kernel: str, name: str, smoothed: bool = True) -> bool:
    """Whether the linear at `name` in the model quantizes its activations per token; by
    default only in a model whose smoothing scales were folded in (`smoothed`): unsmoothed
    W8A8 costs SmolLM2 3 % perplexity."""
    switch = os.environ.get(W8A8_ENV)
    if switch in ("0", "1"):
        return switch == "1"
    return smoothed and kernel != "torch" and name.rpartition(".")[2] not in FLOAT_ACTIVATIONS


def route(kernel: str, shape: tuple[int, int], dtype: torch.dtype, w8a8: bool) -> Route:
    """The measured route for this CPU and activation dtype: W8A8 at every size where the
    activations are quantized, else float activations, without torch's weight-only kernel
    where it cannot run (bf16 emulated, or a shape it crashes on)."""
    dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    if w8a8:
        if kernel != "torch" and int8.amx_available() and shape[1] % int8.AMX_K_STEP == 0:
            return AMX_ROUTE
        amx_bf16 = dtype == torch.bfloat16 and cpu_features.has_amx_bf16()
        return AMX_BF16_ROUTE if amx_bf16 else W8A8_ROUTE
    if kernel != "torch":
        amx_wo = dtype == torch.bfloat16 and int8.amx_bf16_available()
        if amx_wo and shape[1] % int8.AMX_BF16_K_STEP == 0:
            return AMX_WO_ROUTE
        if dtype == torch.bfloat16 and cpu_features.has_avx512_bf16() and shape[1] % 4 == 0:
            return DP_WO_ROUTE
        return ROUTES["native", dtype]
    torch_wo = cpu_features.native_bf16() and int8.weight_only_supports(*shape)
    return ROUTES["torch", torch.bfloat16] if torch_wo else ((None, "dense"),)


class Int8Linear(nn.Module):
    """`x @ W.T + bias` with W held as int8 plus an fp32 scale per output channel.

    `w8a8`: activations quantized per token (W8A8's route; on CPUs with AMX-BF16 but
    without the AMX-INT8 kernel, the larger bf16 calls take a bf16 GEMM over the dequantized
    weight), else float activations. With native kernels only the packed int8 weight is kept
    (every path reads it), else the plain one. The tensors are plain attributes, not
    buffers, so `model.to(dtype)` leaves the int8 weight and its fp32 scales alone.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        kernel: str,
        dtype: torch.dtype,
        w8a8: bool = False,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        qweight, self.scale = quantize_weight(weight)
        self.bias = None if bias is None else bias.detach().float()
        self.kernel = kernel
        self.route = route(kernel, (self.out_features, self.in_features), dtype, w8a8)
        if kernel == "torch":
            self.qweight = qweight
        else:
            self.packed, self.wsum = int8.pack_weight(qweight)
        self.wo_kernel = f"wo-{cpu_features.isa()}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        y = getattr(self, f"_{self.path_for(x.shape[0])}")(x)
        return y.view(*shape[:-1], self.out_features)

    def path_for(self, rows: int) -> str:
        """The path a call with `rows` rows takes."""
        for limit, path in self.route[:-1]:  # a loop: a generator costs more, every call
            if rows <= limit:
                return path
        return self.route[-1][1]  # every route ends with the path that takes the rest

    def native_kernel_for(self, rows: int) -> str | None:
        """The native kernel (a kernels.int8.NATIVE_KERNELS key) a call with `rows` rows
        runs, None where that call takes torch's kernels or a dense GEMM."""
        if self.kernel == "torch":
            return None
        kernels = {
            "wo": self.wo_kernel, "w8a8": self.kernel, "amx": "amx", "wo_amx": "wo-amx",
            "wo_dp": "wo-avx512bf16", "w8a16": f"a16-{self.kernel}",
        }  # fmt: skip
        return kernels.get(self.path_for(rows))

    def _wo(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "torch":
            return int8.weight_only(x, self.qweight, self.scale, self.bias)
        return int8.native_linear(x, self.packed, self.wsum, self.scale, self.bias, self.wo_kernel)

    def _amx(self, x: torch.Tensor) -> torch.Tensor:
        return int8.native_linear(x, self.packed, self.wsum, self.scale, self.bias, "amx")

    def _wo_amx(self, x: torch.Tensor) -> torch.Tensor:
        return int8.native_linear(x, self.packed, self.wsum, self.scale, self.bias, "wo-amx")

    def _wo_dp(self, x: torch.Tensor) -> torch.Tensor:
        return int8.native_linear(x, self.packed, self.wsum, self.scale, self.bias, "wo-avx512bf16")

    def _w8a16(self, x: torch.Tensor) -> torch.Tensor:
        return int8.native_linear(
            x, self.packed, self.wsum, self.scale, self.bias, f"a16-{self.kernel}"
        )

    def _w8a8(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "torch":
            return int8.torch_w8a8(x, self.qweight.t(), self.scale, self.bias)
        return int8.native_linear(x, self.packed, self.wsum, self.scale, self.bias, self.kernel)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel != "torch":
            shape = (self.out_features, self.in_features)
            return int8.dense(x, self.packed, self.scale, self.bias, shape)
        w = dequantize_weight(self.qweight, self.scale).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, w, bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


def quantize_model(
    model: nn.Module, dtype: torch.dtype, calibration: Callable[[], list[int]] | None = None
) -> int:
    """Swap every nn.Linear in `model` for an Int8Linear, and give a model with tied
    embeddings (`lm_head is None`) an int8 LM head over a copy of the embedding; returns
    how many linears were quantized. `dtype` is the activations' (the model's) dtype. Where
    any activations are quantized (W8A8), `calibration` gives the token ids whose forward
    sets the smoothing scales (models.smooth_quant; None: no smoothing). Call after
    load_weights, before `model.to(dtype)`."""
    kernel = w8a8_kernel()
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    smoothed = calibration is not None and any(int8_activations(kernel, n) for n in linears)
    if smoothed:
        smooth_for_w8a8(model, calibration())  # gives a tied model its own LM head
    names = {id(module): name for name, module in model.named_modules()}
    count = swap_linears(model, lambda linear: Int8Linear(
        linear.weight, linear.bias, kernel, dtype,
        int8_activations(kernel, names[id(linear)], smoothed),
    ))  # fmt: skip
    if getattr(model, "lm_head", ...) is None:
        w8a8 = int8_activations(kernel, "lm_head", smoothed)
        model.lm_head = Int8Linear(model.embed_tokens.weight, None, kernel, dtype, w8a8)
        count += 1
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    int8_routes = [m.route for m in layers if m.path_for(1) == "w8a8"]
    float_routes = [m.route for m in layers if m.path_for(1) != "w8a8"]
    logger.info(
        "int8: %d linears quantized; %d with int8 activations (%s; kernel %s), %d with float "
        "ones (%s; weight-only twin %s)",
        count, len(int8_routes), _describe(int8_routes), kernel, len(float_routes),
        _describe(float_routes),
        f"wo-{cpu_features.isa()}",
    )  # fmt: skip
    return count


def _describe(routes: list[Route]) -> str:
    """The first route's steps in words ("w8a8 up to 16 rows, amx beyond"), "none" if none."""
    steps = routes[0] if routes else ()
    return (
        ", ".join(
            f"{path} up to {limit} rows"
            if limit is not None
            else f"{path} {'beyond' if i else 'always'}"
            for i, (limit, path) in enumerate(steps)
        )
        or "none"
    )
