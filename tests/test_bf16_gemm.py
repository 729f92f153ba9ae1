"""The bf16 linear on AMX tiles (kernels/bf16_gemm.py) against an fp32 reference, at the
edges of its tiles, blocks and row chunks."""

from __future__ import annotations

import pytest
import torch

from kernels import bf16_gemm
from models.packed import TileLinear

pytestmark = pytest.mark.skipif(not bf16_gemm.available(), reason="no AMX-BF16 tiles here")

# rows: one, a tile but one, a tile, a tile and one, past a pair of tiles, and (with
# k=2048, whose row chunks hold 128 rows) several chunks with a short last tile
ROWS = [0, 1, 15, 16, 17, 40, 300]
# (k, n): one block; three blocks (a pair and a lone one); 40 channels (a short block);
# SmolLM2's widest k
SHAPES = [(64, 16), (96, 48), (2048, 40), (1536, 576)]


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"k{k}-n{n}" for k, n in SHAPES])
@pytest.mark.parametrize("rows", ROWS)
def test_tile_linear_matches_an_fp32_reference(rows: int, shape: tuple, with_bias: bool) -> None:
    k, n = shape
    gen = torch.Generator().manual_seed(rows * 7 + k + n)
    w = torch.randn(n, k, generator=gen).bfloat16()
    x = torch.randn(rows, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen) if with_bias else None
    out = bf16_gemm.linear(x, bf16_gemm.pack(w), bias, n)
    assert out.shape == (rows, n) and out.dtype == torch.bfloat16
    ref = _reference(x, w, bias)
    # one rounding to bf16 (half an ulp: 2^-8 relative) after fp32 sums in tile order
    magnitude = x.double().abs() @ w.double().abs().T
    bound = ref.abs() * 2.0**-8 + magnitude * k * 2.0**-24
    assert ((out.double() - ref).abs() <= bound).all()


def test_packing_puts_each_k_pair_of_a_channel_in_one_tile_word() -> None:
    w = torch.arange(20 * 64, dtype=torch.float32).view(20, 64).bfloat16()
    packed = bf16_gemm.pack(w)
    assert packed.shape == (2, 32, 16, 2)  # 20 channels padded to two blocks of 16
    assert torch.equal(packed[1, 5, 3], w[16 + 3, 10:12])
    assert packed[1, :, 4:].abs().sum() == 0  # the padding channels are zero


def test_tile_linear_reshapes_leading_dimensions() -> None:
    w = torch.randn(48, 64).bfloat16()
    layer = TileLinear(w, None)
    x = torch.randn(2, 3, 64).bfloat16()
    flat = bf16_gemm.linear(x.view(6, 64), bf16_gemm.pack(w), None, 48)
    assert torch.equal(layer(x), flat.view(2, 3, 48))
