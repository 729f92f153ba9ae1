"""`--quantization int8`: per-output-channel symmetric int8 weights, quantized at load.

Every linear (and the LM head, tied or not) becomes an `Int8Linear`; the embedding table
stays in the model's float dtype, so the lookup is unchanged. At run time each call picks
its kernel by the number of rows (tokens) from a table measured on this machine kind
(docs/benchmarks.md, scripts/bench_int8.py): weight-only int8 (bf16 activations) for the
smallest batches, W8A8 (activations quantized per token) above that, through the native
VNNI kernel where the CPU has AVX512_VNNI, the AVX2 one elsewhere, and torch's int8 matmul
(oneDNN, faster at larger batches) above that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from engine_core.messages.config import QUANTIZATIONS
from kernels import int8
from models import cpu_features
from models.packed import swap_linears

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Crossover:
    """Where one int8 path stops beating the next, in rows (tokens) per call."""

    weight_only_max: int  # up to here: weight-only int8 (only where bf16 is native)
    native_max: int | None  # then up to here the native W8A8 kernel (None: at every size);
    # above it torch._int_mm W8A8


# Per W8A8 kernel, from scripts/bench_int8.py on this machine kind (docs/benchmarks.md,
# "int8"): VNNI beat weight-only and torch._int_mm at every batch measured (1-512 rows);
# the AVX2 twin up to 16 rows; without native kernels weight-only wins up to 2 rows.
CROSSOVERS = {
    "vnni": Crossover(weight_only_max=0, native_max=None),
    "avx2": Crossover(weight_only_max=0, native_max=16),
    "torch": Crossover(weight_only_max=2, native_max=0),
}


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


def crossover(kernel: str, out_features: int, in_features: int) -> Crossover:
    """The measured crossover for `kernel`, without weight-only where bf16 is emulated or
    the shape is one `torch._weight_int8pack_mm` cannot take."""
    table = CROSSOVERS[kernel]
    if cpu_features.native_bf16() and int8.weight_only_supports(out_features, in_features):
        return table
    return Crossover(weight_only_max=0, native_max=table.native_max)


class Int8Linear(nn.Module):
    """`x @ W.T + bias` with W held as int8 plus an fp32 scale per output channel.

    Holds, for a native kernel, the packed int8 weight, and the plain one where the
    crossover also uses the weight-only or torch paths. The tensors are plain attributes, not buffers, so `model.to(dtype)`
    leaves the int8 weight and its fp32 scales alone.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.qweight, self.scale = quantize_weight(weight)
        self.bias = None if bias is None else bias.detach().float()
        self.kernel = kernel
        self.crossover = crossover(kernel, self.out_features, self.in_features)
        if kernel != "torch":
            self.packed, self.wsum = int8.pack_weight(self.qweight)
        if self.crossover.weight_only_max == 0 and self.crossover.native_max is None:
            del self.qweight  # only the packed copy is ever read

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        rows = x.shape[0]
        if rows <= self.crossover.weight_only_max:
            y = int8.weight_only(x, self.qweight, self.scale, self.bias)
        elif self.crossover.native_max is None or rows <= self.crossover.native_max:
            y = int8.native_linear(x, self.packed, self.wsum, self.scale, self.bias, self.kernel)
        else:
            y = int8.torch_w8a8(x, self.qweight.t(), self.scale, self.bias)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


def _max_rows(table: Crossover) -> str:
    return "any size" if table.native_max is None else f"{table.native_max} rows"


def quantize_model(model: nn.Module) -> int:
    """Swap every nn.Linear in `model` for an Int8Linear, and give a model with tied
    embeddings (`lm_head is None`) an int8 LM head over a copy of the embedding; returns
    how many linears were quantized. Call after load_weights, before `model.to(dtype)`."""
    kernel = w8a8_kernel()
    count = swap_linears(model, lambda linear: Int8Linear(linear.weight, linear.bias, kernel))
    if getattr(model, "lm_head", ...) is None:
        model.lm_head = Int8Linear(model.embed_tokens.weight, None, kernel)
        count += 1
    table = crossover(kernel, *model.embed_tokens.weight.shape)
    logger.info(
        "int8: %d linears quantized; weight-only up to %d rows, native W8A8 (%s) up to %s, "
        "torch._int_mm above", count, table.weight_only_max, kernel, _max_rows(table),
    )  # fmt: skip
    return count
