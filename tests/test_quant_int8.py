"""int8 quantization: the round trip, every GEMM path against a float reference within the
bound int8 rounding allows, and the real model under `quantization="int8"`."""

from __future__ import annotations

import pytest
import torch
from parity import TOP_K, Reference, compare

from engine_core import LLM, SamplingParams
from kernels import fused, int8
from models import cpu_features
from models.quant_int8 import (
    W8A8_ENV,
    Int8Linear,
    QuantizationError,
    check_quantization,
    dequantize_weight,
    quantize_weight,
    w8a8_kernel,
)

_NATIVE = pytest.mark.skipif(not int8.native_available(), reason="native kernels not built")
_VNNI = pytest.mark.skipif(not cpu_features.has_vnni(), reason="no AVX512_VNNI here")
# (M, K, N): decode rows, tile edges (M % 4, K % 4, N % 16 nonzero), prefill-sized M
# how far a token's logprob under int8 may sit from fp32's while greedy still agrees
# (measured: docs/benchmarks.md "int8"), about half a nat
LOGPROB_SLACK = 0.5
# (M, K, N); 32 and 33 rows: the last that the AMX weight-only kernel widens as it streams,
# and the first that it widens a pair of blocks for up front
SHAPES = [
    (1, 64, 16), (3, 37, 33), (4, 576, 960), (17, 130, 49), (70, 96, 80), (32, 64, 48),
    (33, 96, 40), (300, 2048, 40),
]  # fmt: skip


def _weights(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[0] = 0.0  # a zero channel quantizes to zeros, not NaN
    return w


# the largest quantized value of a 16-bit activation (kernels/csrc/int8_gemm.c: A16_MAX)
A16_LEVELS = 32512


def _w8a8_bound(x: torch.Tensor, w: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """|y - x @ w.T| allowed by rounding both operands per row (half a step each): the weight
    to int8, the activations to `levels` steps each side (127: int8, A16_LEVELS: 16 bits)."""
    dw = w.abs().amax(1) / 127 / 2  # [N]
    dx = x.abs().amax(1) / levels / 2  # [M]
    k = x.shape[1]
    return (
        x.abs().sum(1, keepdim=True) * dw
        + dx[:, None] * w.abs().sum(1)
        + k * dx[:, None] * dw
        + 1e-4 * (x.abs() @ w.abs().T)  # fp32 accumulation order
    )


def test_weight_round_trip_is_within_half_a_step() -> None:
    w = _weights(40, 70, seed=1)
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.abs().max() <= 127
    assert torch.equal(q[0], torch.zeros_like(q[0])) and torch.isfinite(scale).all()
    # the largest |w| of each nonzero channel maps to +-127 exactly
    assert torch.equal(q[1:].abs().amax(1), torch.full((39,), 127, dtype=torch.int8))
    err = (dequantize_weight(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-6)).all()
    # quantizing the dequantized weight gives the same int8 back (a fixed point)
    q2, scale2 = quantize_weight(dequantize_weight(q, scale))
    assert torch.equal(q2, q)
    torch.testing.assert_close(scale2, scale)


def test_activation_rows_round_trip_is_within_half_a_step() -> None:
    x = torch.randn(9, 50) * torch.logspace(-3, 2, 9)[:, None]  # rows of very different sizes
    x[4] = 0.0
    q, scale = int8.quantize_rows(x)
    assert q.abs().max() <= 127 and torch.equal(q[4], torch.zeros_like(q[4]))
    assert ((q.float() * scale - x).abs() <= scale / 2 * (1 + 1e-6) + 1e-12).all()


def test_pack_layout() -> None:
    q, _ = quantize_weight(_weights(33, 10, seed=2))
    packed, wsum = int8.pack_weight(q)
    assert packed.shape == (3, 3, 16, 4)  # 33 -> 48 channels, 10 -> 12 bytes of K
    for n, k in [(0, 0), (17, 9), (32, 5), (15, 3)]:
        assert packed[n // 16, k // 4, n % 16, k % 4] == q[n, k]
    assert packed[2, :, 1:].abs().sum() == 0 and packed[:, 2, :, 2:].abs().sum() == 0
    assert torch.equal(wsum, q.sum(1, dtype=torch.int32))


def _check_w8a8(
    path, shape: tuple[int, int, int], dtype: torch.dtype, levels: int = 127, outlier: float = 1
) -> None:
    m, k, n = shape
    w = _weights(n, k, seed=m + k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)) * 2
    x[:, k // 2] *= outlier  # one channel far wider than the rest, as down_proj's inputs have
    x = x.to(dtype)
    bias = torch.randn(n) * 0.1
    q, scale = quantize_weight(w)
    got = path(x, q, scale, bias)
    assert got.dtype == dtype and got.shape == (m, n)
    xf = x.float()  # the reference sees the same (bf16-rounded) activations
    expected = xf @ w.T + bias
    bound = _w8a8_bound(xf, w, levels)
    if dtype == torch.bfloat16:
        bound = bound + expected.abs() * 2**-8  # the output's one bf16 rounding
    excess = (got.float() - expected).abs() - bound
    assert excess.max() <= 0, f"worst excess over the int8 bound: {excess.max():.3g}"


def _native(kernel: str):
    def run(x, q, scale, bias):
        packed, wsum = int8.pack_weight(q)
        return int8.native_linear(x, packed, wsum, scale, bias, kernel)

    return run


def _torch_w8a8(x, q, scale, bias):
    return int8.torch_w8a8(x, q.t(), scale, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
@pytest.mark.parametrize(
    "path",
    [
        pytest.param(_native("vnni"), marks=[_NATIVE, _VNNI], id="native-vnni"),
        pytest.param(_native("avx2"), marks=_NATIVE, id="native-avx2"),
        pytest.param(_torch_w8a8, id="torch-int-mm"),
    ],
)
def test_w8a8_paths_within_the_int8_bound(path, shape: tuple, dtype: torch.dtype) -> None:
    _check_w8a8(path, shape, dtype)


_A16_PATHS = [
    pytest.param(_native("a16-vnni"), marks=[_NATIVE, _VNNI], id="native-a16-vnni"),
    pytest.param(_native("a16-avx2"), marks=_NATIVE, id="native-a16-avx2"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
@pytest.mark.parametrize("path", _A16_PATHS)
def test_16_bit_activation_paths_within_their_bound(path, shape: tuple, dtype) -> None:
    # a channel 300x wider than the rest: 16-bit activations keep the others' digits
    _check_w8a8(path, shape, dtype, levels=A16_LEVELS, outlier=300)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(_native("vnni"), marks=[_NATIVE, _VNNI], id="native-vnni"),
        pytest.param(_native("avx2"), marks=_NATIVE, id="native-avx2"),
    ],
)
def test_int8_activations_miss_the_16_bit_bound(path) -> None:
    """What the bound above tells apart: int8 activations lose the narrow channels."""
    with pytest.raises(AssertionError, match="worst excess"):
        _check_w8a8(path, (4, 576, 960), torch.float32, levels=A16_LEVELS, outlier=300)


def _weight_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|y - x @ w.T| allowed by rounding the weight alone to int8 (half a step)."""
    return x.abs().sum(1, keepdim=True) * (w.abs().amax(1) / 127 / 2) + 1e-4 * (x.abs() @ w.abs().T)


def _check_weight_only(path, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    m, k, n = shape
    w = _weights(n, k, seed=k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    q, scale = quantize_weight(w)
    got = path(x, q, scale, None)
    assert got.dtype == dtype and got.shape == (m, n)
    expected = x.float() @ w.T
    bound = _weight_bound(x.float(), w)
    if dtype == torch.bfloat16:  # bf16 weights (torch's kernel, dense) and output rounding
        bound = bound + (x.float().abs() @ w.abs().T) * 2**-7
    assert ((got.float() - expected).abs() <= bound).all()


def _native_dense(x, q, scale, bias):
    packed, _ = int8.pack_weight(q)
    return int8.dense(x, packed, scale, bias, tuple(q.shape))


def _torch_weight_only(x, q, scale, bias):
    return int8.weight_only(x, q, scale, bias)


_AVX512 = pytest.mark.skipif(cpu_features.isa() != "avx512", reason="no AVX-512 here")
_AMX_BF16 = pytest.mark.skipif(not int8.amx_bf16_available(), reason="no AMX-BF16 tiles here")
_AVX512_BF16 = pytest.mark.skipif(not cpu_features.has_avx512_bf16(), reason="no AVX512_BF16")
_WEIGHT_ONLY_SHAPES = [s for s in SHAPES if int8.weight_only_supports(s[2], s[1])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in SHAPES])
@pytest.mark.parametrize(
    "path",
    [
        pytest.param(_native("wo-amx"), marks=[_NATIVE, _AMX_BF16], id="native-wo-amx"),
        pytest.param(_native("wo-avx512"), marks=[_NATIVE, _AVX512], id="native-wo-avx512"),
        pytest.param(
            _native("wo-avx512bf16"), marks=[_NATIVE, _AVX512_BF16], id="native-wo-avx512bf16"
        ),
        pytest.param(_native("wo-avx2"), marks=_NATIVE, id="native-wo-avx2"),
        pytest.param(_native_dense, marks=_NATIVE, id="native-dense"),
    ],
)
def test_weight_only_paths_within_the_weight_bound(path, shape: tuple, dtype) -> None:
    _check_weight_only(path, shape, dtype)


@pytest.mark.parametrize(
    "shape", _WEIGHT_ONLY_SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in _WEIGHT_ONLY_SHAPES]
)
def test_torch_weight_only_within_the_weight_bound(shape: tuple) -> None:
    _check_weight_only(_torch_weight_only, shape, torch.bfloat16)


@_NATIVE
def test_forced_avx2_layer_routes_through_the_avx2_twins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_features.ISA_ENV, "avx2")
    monkeypatch.delenv(W8A8_ENV, raising=False)
    assert w8a8_kernel() == "avx2"
    w = _weights(48, 96, seed=3)
    layer = Int8Linear(w, None, w8a8_kernel(), torch.float32)
    assert layer.wo_kernel == "wo-avx2"
    assert [layer.path_for(rows) for rows in (1, 16, 17, 500)] == ["wo"] * 4
    for rows in (1, 5, 40):
        x = torch.randn(rows, 96)
        assert ((layer(x) - x @ w.T).abs() <= _weight_bound(x, w)).all()
    bf16 = Int8Linear(w, None, w8a8_kernel(), torch.bfloat16)  # 16-bit activations there
    assert bf16.path_for(1) == "w8a16" and bf16.native_kernel_for(1) == "a16-avx2"


def _check_bf16_route(rows_paths: dict[int, str]) -> None:
    w = _weights(48, 96, seed=6)
    layer = Int8Linear(w, None, w8a8_kernel(), torch.bfloat16)
    assert {rows: layer.path_for(rows) for rows in rows_paths} == rows_paths
    for rows in rows_paths:
        x = torch.randn(rows, 96).bfloat16()
        bound = _w8a8_bound(x.float(), w, A16_LEVELS) + (x.float().abs() @ w.abs().T) * 2**-7
        assert ((layer(x).float() - x.float() @ w.T).abs() <= bound).all()


@_NATIVE
def test_bf16_layers_switch_to_dense_past_the_crossover(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(W8A8_ENV, raising=False)
    monkeypatch.setenv(cpu_features.ISA_ENV, "avx512")  # no AMX tiles, wherever this runs
    _check_bf16_route({1: "w8a16", 32: "w8a16", 33: "dense", 300: "dense"})


@_NATIVE
@_AVX512_BF16
def test_bf16_layers_take_vdpbf16ps_past_the_crossover_without_amx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(W8A8_ENV, raising=False)
    monkeypatch.setenv(cpu_features.ISA_ENV, "avx512bf16")  # a Zen 4's or 5's choices
    _check_bf16_route({1: "w8a16", 16: "w8a16", 96: "w8a16", 97: "wo_dp", 300: "wo_dp"})


@_NATIVE
@_AMX_BF16
def test_bf16_layers_take_amx_tiles_between_the_crossovers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(W8A8_ENV, raising=False)
    _check_bf16_route(
        {1: "wo", 2: "wo_amx", 32: "wo_amx", 33: "wo_amx", 256: "wo_amx", 257: "dense"}
    )


def test_without_native_kernels_layers_route_through_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(W8A8_ENV, raising=False)
    w = _weights(48, 96, seed=5)
    layer = Int8Linear(w, None, "torch", torch.bfloat16)
    small = "wo" if cpu_features.native_bf16() else "dense"
    assert [layer.path_for(rows) for rows in (1, 2, 3, 500)] == [small, small, "dense", "dense"]
    for rows in (1, 40):
        x = torch.randn(rows, 96).bfloat16()
        bound = _weight_bound(x.float(), w) + (x.float().abs() @ w.abs().T) * 2**-6
        assert ((layer(x).float() - x.float() @ w.T).abs() <= bound).all()


@pytest.mark.parametrize("isa", [pytest.param("avx512", marks=_VNNI), "avx2"])
def test_w8a8_layers_route_every_size_through_w8a8(
    monkeypatch: pytest.MonkeyPatch, isa: str
) -> None:
    if isa == "avx2":
        monkeypatch.setenv(cpu_features.ISA_ENV, isa)
    else:  # the machine's own AVX-512 with VNNI
        monkeypatch.delenv(cpu_features.ISA_ENV, raising=False)
    w = _weights(48, 96, seed=4)
    layer = Int8Linear(w, None, w8a8_kernel(), torch.float32, w8a8=True)
    assert {layer.path_for(rows) for rows in (1, 16, 500)} == {"w8a8"}
    for rows in (1, 5, 40):
        x = torch.randn(rows, 96)
        assert ((layer(x) - x @ w.T).abs() <= _w8a8_bound(x, w)).all()


_AMX = pytest.mark.skipif(not int8.amx_available(), reason="no AMX-INT8 here")
# (M, K, N) for the AMX kernel (K a multiple of 64): a row, a tile and a bit, odd blocks, a
# tile exactly (its second row tile skipped), and blocks whose weight tiles are prefetched
# from past the weight's end
AMX_SHAPES = [
    (1, 64, 16), (5, 128, 40), (33, 576, 960), (17, 128, 49), (70, 192, 80), (16, 64, 32),
    (3, 2048, 48),
]  # fmt: skip


@_AMX
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", AMX_SHAPES, ids=[f"{m}x{k}x{n}" for m, k, n in AMX_SHAPES])
def test_amx_w8a8_equals_vnni_bit_for_bit(shape: tuple, dtype: torch.dtype) -> None:
    # both sum the same int8 products exactly in int32 and share the epilogue
    m, k, n = shape
    w = _weights(n, k, seed=n)
    q, scale = quantize_weight(w)
    packed, wsum = int8.pack_weight(q)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(k))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    amx = int8.native_linear(x, packed, wsum, scale, bias, "amx")
    assert torch.equal(amx, int8.native_linear(x, packed, wsum, scale, bias, "vnni"))
    expected = x.float() @ w.T + bias
    rounding = expected.abs() * 2**-7 if dtype == torch.bfloat16 else 0.0  # the bf16 output
    assert ((amx.float() - expected).abs() <= _w8a8_bound(x.float(), w) + rounding).all()


# (M, K, inter): a row, one block of each half, a tile and a bit, several row tiles, an odd
# number of blocks (the VNNI kernel's last group of one), K not a multiple of 4
SILU_SHAPES = [(1, 64, 16), (33, 576, 48), (70, 192, 32), (16, 128, 16), (7, 96, 80), (5, 37, 32)]


@pytest.mark.parametrize("shape", SILU_SHAPES, ids=[f"{m}x{k}x{i}" for m, k, i in SILU_SHAPES])
@pytest.mark.parametrize(
    "kernel",
    [
        pytest.param("amx", marks=_AMX),
        pytest.param("vnni", marks=[_NATIVE, _VNNI, _AVX512_BF16]),
    ],
)
def test_gate_up_with_silu_equals_the_two_calls_bit_for_bit(kernel: str, shape: tuple) -> None:
    # the layer stack's fused gate_up: one epilogue instead of gate_up's bf16 output, then
    # fused.silu_mul; the same roundings, so the same bits
    m, k, inter = shape
    if kernel == "amx" and k % int8.AMX_K_STEP:
        pytest.skip("the AMX kernel takes K in multiples of 64")
    q, scale = quantize_weight(_weights(2 * inter, k, seed=inter))
    packed, wsum = int8.pack_weight(q)
    x = (3 * torch.randn(m, k, generator=torch.Generator().manual_seed(m))).bfloat16()
    unfused = fused.silu_mul(int8.native_linear(x, packed, wsum, scale, None, kernel))
    assert torch.equal(int8.silu_mul(x, packed, wsum, scale, kernel), unfused)


@_VNNI
@pytest.mark.parametrize("isa", ["", "avx512bf16"], ids=["this-cpu", "no-amx"])
@pytest.mark.parametrize("in_features", [128, 96], ids=["k64", "k-other"])
def test_bf16_w8a8_routes_follow_the_cpus_amx(
    monkeypatch: pytest.MonkeyPatch, isa: str, in_features: int
) -> None:
    monkeypatch.setenv(cpu_features.ISA_ENV, isa)
    w = _weights(48, in_features, seed=7)
    layer = Int8Linear(w, None, w8a8_kernel(), torch.bfloat16, w8a8=True)
    rows = (1, 4, 5, 16, 384, 385, 1024, 1025)
    if not cpu_features.has_amx_bf16():
        expected = ["w8a8"] * 8
    elif int8.amx_available() and in_features % int8.AMX_K_STEP == 0:
        expected = ["w8a8"] * 2 + ["amx"] * 6
    else:
        expected = ["w8a8"] * 5 + ["dense"] * 3
    assert [layer.path_for(r) for r in rows] == expected
    for r in (5, 40, 1100):
        x = torch.randn(r, in_features).bfloat16()
        bound = _w8a8_bound(x.float(), w) + (x.float().abs() @ w.abs().T) * 2**-6
        assert ((layer(x).float() - x.float() @ w.T).abs() <= bound).all()


def test_unknown_quantization_is_a_clear_error() -> None:
    check_quantization(None)
    check_quantization("int8")
    with pytest.raises(QuantizationError, match=r"unknown quantization 'int4' \(supported: int8\)"):
        check_quantization("int4")


# ---------------------------------------------------------------- the real model

CHATS = [
    "What is the capital of Japan?",
    "Write a haiku about the sea.",
    "List five prime numbers.",
    "Explain how a rainbow forms.",
    "Translate to French: The cat sleeps on the warm windowsill.",
]
MAX_TOKENS = 32


def _greedy(llm: LLM) -> list:
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": c}]) for c in CHATS]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=TOP_K)
    return [o.outputs[0] for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def fp32_outputs() -> list:
    return _greedy(LLM(kv_cache_memory="128MiB", max_model_len=1024, dtype="float32"))


def _check_close_to_fp32(llm: LLM, fp32_outputs: list) -> int:
    """vLLM's check_logprobs_close rule against duet fp32 (greedy may part only where each
    side's token is in the other's top 5), and the chosen tokens' logprobs within
    LOGPROB_SLACK while the two agree. Returns how many prompts parted."""
    parted = 0
    for ours, ref in zip(_greedy(llm), fp32_outputs, strict=True):
        reference = Reference(ref.token_ids, [lp.token_ids[1 : TOP_K + 1] for lp in ref.logprobs])
        parted += compare(ours.token_ids, ours.logprobs, reference)
        for step, (mine, theirs) in enumerate(zip(ours.token_ids, ref.token_ids, strict=False)):
            if mine != theirs:
                break
            gap = abs(ours.logprobs[step].logprobs[0] - ref.logprobs[step].logprobs[0])
            assert gap <= LOGPROB_SLACK, f"step {step}: logprob {gap:.3f} away from fp32"
    assert fp32_outputs[0].text == "The capital of Japan is Tokyo."
    return parted


@pytest.mark.slow
def test_int8_default_model_close_to_fp32(fp32_outputs: list) -> None:
    llm = LLM(kv_cache_memory="128MiB", max_model_len=1024, quantization="int8")
    linears = [m for m in llm.runner.model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 30 * 4 + 1  # qkv, o, gate_up, down per layer + the tied LM head
    assert {m.kernel for m in linears} == {w8a8_kernel()}
    parted = _check_close_to_fp32(llm, fp32_outputs)
    print(f"int8 ({llm.runner.dtype}): {parted} of {len(CHATS)} prompts parted within top-5")
    out = llm.chat(
        [{"role": "user", "content": CHATS[0]}], SamplingParams(temperature=0.0, max_tokens=16)
    )
    assert out[0].outputs[0].text == "The capital of Japan is Tokyo."


@pytest.mark.slow
@_NATIVE
def test_int8_on_the_forced_avx2_path_close_to_fp32(
    fp32_outputs: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cpu_features.ISA_ENV, "avx2")  # fp32 activations, the AVX2 twin
    llm = LLM(kv_cache_memory="128MiB", max_model_len=1024, quantization="int8")
    assert llm.runner.dtype == torch.float32
    assert {m.kernel for m in llm.runner.model.modules() if isinstance(m, Int8Linear)} == {"avx2"}
    parted = _check_close_to_fp32(llm, fp32_outputs)
    print(f"int8 (forced AVX2, fp32 activations): {parted} of {len(CHATS)} prompts parted")


def test_offline_unknown_quantization_is_a_clear_error() -> None:
    with pytest.raises(QuantizationError, match="unknown quantization 'fp4'"):
        LLM(kv_cache_memory="64MiB", quantization="fp4")
