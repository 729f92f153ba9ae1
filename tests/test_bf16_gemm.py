"""The bf16 linear on duet's kernels (kernels/bf16_gemm.py: AMX tiles and their `vdpbf16ps`
twin, each where this CPU runs it) against an fp32 reference, at the edges of its tiles,
blocks and row chunks."""

from __future__ import annotations

import ctypes

import pytest
import torch

from engine_core import LLM, SamplingParams
from kernels import bf16_gemm, fused, native
from models import cpu_features
from models.packed import TileGateUpSiLU, TileLinear

pytestmark = pytest.mark.skipif(not bf16_gemm.available(), reason="no AVX512_BF16 here")


@pytest.fixture(
    autouse=True,
    params=[
        pytest.param(
            "amx",
            marks=pytest.mark.skipif(not cpu_features.has_amx_bf16(), reason="no AMX-BF16 here"),
        ),
        "avx512bf16",
    ],
)
def gemm_twin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test once per twin of the kernels this CPU runs: AMX tiles where it has them, and
    `vdpbf16ps` (DUET_CPU_ISA=avx512bf16 hides AMX)."""
    if request.param == "avx512bf16":
        monkeypatch.setenv(cpu_features.ISA_ENV, "avx512bf16")
    assert bf16_gemm.twin() == request.param
    return request.param


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


@pytest.mark.parametrize("rows", [1, 16, 17, 40, 300])
def test_gate_up_with_silu_is_the_linear_then_silu_mul_bit_for_bit(rows: int) -> None:
    # the activation in the epilogue rounds as the unfused path does: the projection's output
    # to bf16, then the fused silu_mul kernel's arithmetic
    inter, k = 48, 2048
    gen = torch.Generator().manual_seed(rows)
    w = (torch.randn(2 * inter, k, generator=gen) * 0.05).bfloat16()
    x = torch.randn(rows, k, generator=gen).bfloat16()
    unfused = fused.silu_mul(bf16_gemm.linear(x, bf16_gemm.pack(w), None, 2 * inter))
    got = bf16_gemm.silu_mul(x, bf16_gemm.pack_gate_up(w), inter)
    assert torch.equal(got, unfused)


def test_another_build_of_the_kernels_gives_the_same_bits() -> None:
    # the baseline hook of scripts/bench_linears.py --against-library, here with this very
    # build loaded a second time
    other = bf16_gemm.declare(ctypes.CDLL(str(native.library_path())))
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(96, 576, generator=gen) * 0.05).bfloat16()
    x = torch.randn(40, 576, generator=gen).bfloat16()
    packed, gate_up = bf16_gemm.pack(w), bf16_gemm.pack_gate_up(w)
    assert torch.equal(
        bf16_gemm.linear(x, packed, None, 96, other), bf16_gemm.linear(x, packed, None, 96)
    )
    assert torch.equal(
        bf16_gemm.silu_mul(x, gate_up, 48, other), bf16_gemm.silu_mul(x, gate_up, 48)
    )


def test_mlps_take_the_activation_into_gate_up_unless_told_not_to(tiny_checkpoint) -> None:
    folder = tiny_checkpoint(num_heads=4, num_kv_heads=2)
    fused_llm = LLM(str(folder), kv_cache_memory="64MiB", block_size=4, dtype="bfloat16")
    mlp = fused_llm.runner.model.layers[0].mlp
    assert isinstance(mlp.gate_up_proj, TileGateUpSiLU) and mlp.silu_in_gate_up
    lora_llm = LLM(
        str(folder), kv_cache_memory="64MiB", block_size=4, dtype="bfloat16", enable_lora=True
    )
    assert not lora_llm.runner.model.layers[0].mlp.silu_in_gate_up  # deltas join gate_up's output
    params = SamplingParams(temperature=0.0, max_tokens=8)
    prompts = [[5, 17, 300, 42], list(range(100, 140))]
    got = [o.outputs[0].token_ids for o in fused_llm.generate(prompts, params)]
    assert got == [o.outputs[0].token_ids for o in lora_llm.generate(prompts, params)]
