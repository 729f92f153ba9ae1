"""The fused per-layer C kernels (kernels/fused.py) against the torch ops they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import attention, fused, native
from kernels.metadata import AttentionMetadata
from models import cpu_features
from models.config import ModelConfig
from models.llama import LlamaForCausalLM, RotaryEmbedding

pytestmark = pytest.mark.skipif(
    native.load() is None, reason="no C compiler or no AVX2: the native kernels are not built"
)
DTYPES = [torch.float32, torch.bfloat16]


def _config(**changes: object) -> ModelConfig:
    base = dict(
        architecture="LlamaForCausalLM",
        vocab_size=256,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return ModelConfig(**(base | changes))


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    # fp32: the kernels sum a row in another order than torch (a few ulps); bf16: that
    # difference may move one rounding of the result
    assert got.dtype == expected.dtype
    tol = 1e-5 if got.dtype == torch.float32 else 2**-7
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "hidden"), [(1, 576), (3, 300), (70, 600)])
def test_add_rms_norm_matches_torch(rows: int, hidden: int, dtype: torch.dtype, twin: str) -> None:
    gen = torch.Generator().manual_seed(rows)
    x, stream = (torch.randn(rows, hidden, generator=gen).to(dtype) for _ in range(2))
    weight = (1 + 0.2 * torch.randn(hidden, generator=gen)).to(dtype)
    residual = stream.clone()
    got = fused.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(residual, stream + x)  # the residual add rounds once, in the dtype
    _close(got, fused.torch_rms_norm(stream + x, weight, 1e-5))
    _close(fused.rms_norm(x, weight, 1e-5), fused.torch_rms_norm(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "inter"), [(1, 1536), (5, 100), (40, 1000)])
def test_silu_mul_matches_torch(rows: int, inter: int, dtype: torch.dtype, twin: str) -> None:
    gen = torch.Generator().manual_seed(inter)
    gate_up = (6 * torch.randn(rows, 2 * inter, generator=gen)).to(dtype)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's clamps and zero
    gate, up = gate_up.chunk(2, dim=-1)
    _close(fused.silu_mul(gate_up), F.silu(gate) * up)


@pytest.mark.skipif(not cpu_features.has_avx512_bf16(), reason="no AVX512_BF16 here")
def test_hardware_bf16_rounding_equals_the_emulated_one(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(1)
    gate_up = (6 * torch.randn(33, 2 * 1000, generator=gen)).to(torch.bfloat16)
    x, stream = (torch.randn(33, 600, generator=gen).to(torch.bfloat16) for _ in range(2))
    weight = (1 + 0.2 * torch.randn(600, generator=gen)).to(torch.bfloat16)
    outputs = []
    for forced in ("avx512bf16", "avx512"):
        monkeypatch.setenv(cpu_features.ISA_ENV, forced)
        residual = stream.clone()
        outputs.append(
            (fused.silu_mul(gate_up), fused.rms_norm(x, weight, 1e-5, residual), residual)
        )
    (silu_hw, norm_hw, residual_hw), (silu, norm, residual) = outputs
    assert torch.equal(silu_hw, silu)  # the same operations per element, in the same order
    assert torch.equal(residual_hw, residual)
    _close(norm_hw, norm)  # a row's sum of squares may add up in another order


def _rope_inputs(
    tokens: int, dtype: torch.dtype, cache_dtype: torch.dtype, num_heads: int = 6
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(tokens)
    rope = RotaryEmbedding(_config(), max_positions=512).to(dtype)
    qkv = torch.randn(tokens, (num_heads + 4) * 16, generator=gen).to(dtype)  # Hkv = 2
    positions = torch.randint(0, 512, (tokens,), generator=gen)
    positions[0] = 511
    slots = torch.randperm(64 * 4, generator=gen)[:tokens]  # distinct, any block
    caches = torch.full((2, 64, 4, 2, 16), float("nan"), dtype=cache_dtype)
    return rope, qkv, positions, slots, caches


@pytest.mark.parametrize("cache_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 200])
def test_rope_and_kv_write_match_torch(
    tokens: int, dtype: torch.dtype, cache_dtype: torch.dtype, isa: str
) -> None:
    rope, qkv, positions, slots, caches = _rope_inputs(tokens, dtype, cache_dtype)
    expected = caches.clone()
    q, k, v = qkv.split([96, 32, 32], dim=-1)
    q_ref = rope(positions, q.view(tokens, 6, 16)).to(cache_dtype)
    k_ref = rope(positions, k.view(tokens, 2, 16)).to(cache_dtype)
    attention.write_kv(k_ref, v.view(tokens, 2, 16).to(cache_dtype), *expected, slots)
    got_q = fused.rope_write_kv(qkv, positions, rope.cos, rope.sin, *caches, slots, 6)
    assert got_q is not None
    # element-wise math rounded where torch rounds: bit for bit, and every other slot
    # untouched (still NaN)
    assert torch.equal(got_q, q_ref)
    assert torch.equal(caches.isnan(), expected.isnan())
    assert torch.equal(caches.nan_to_num(), expected.nan_to_num())


def test_rope_kernel_declines_what_it_cannot_do() -> None:
    rope, qkv, positions, slots, caches = _rope_inputs(3, torch.float32, torch.float32)
    half = torch.float16
    assert (
        fused.rope_write_kv(qkv, positions, rope.cos, rope.sin, *caches.to(half), slots, 6) is None
    )
    assert (
        fused.rope_write_kv(qkv.to(half), positions, rope.cos, rope.sin, *caches, slots, 6) is None
    )


def _model_step(model: LlamaForCausalLM, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Three decodes and a 5-token prefill chunk after 3 cached tokens, on a fresh cache."""
    config = model.config
    block_size, num_blocks = 4, 12
    gen = torch.Generator().manual_seed(1)
    kv_cache = torch.randn(
        config.num_hidden_layers, 2, num_blocks, block_size, config.num_key_value_heads,
        config.head_dim, generator=gen,
    ).to(dtype)  # fmt: skip
    seq_lens = [9, 1, 4, 8]
    tables = torch.tensor([[1, 2, 3], [4, 0, 0], [5, 0, 0], [6, 7, 0]], dtype=torch.int32)
    slots = [3 * 4 + 0, 4 * 4 + 0, 5 * 4 + 3, 6 * 4 + 3, *(7 * 4 + i for i in range(4))]
    positions = [8, 0, 3, *range(3, 8)]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor([0, 1, 2, 3, 8], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        num_decodes=3,
        query_start_loc_cpu=[0, 1, 2, 3, 8],
        seq_lens_cpu=seq_lens,
    )
    ids = torch.randint(0, config.vocab_size, (8,), generator=gen)
    hidden = model(ids, torch.tensor(positions), kv_cache, meta)
    return hidden, kv_cache


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_step_fused_matches_unfused(
    dtype: torch.dtype, twin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(attention_bias=True))
    with torch.no_grad():  # the model skips its init (load_weights fills it): random weights
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) * param.shape[-1] ** -0.5)
    model.to(dtype)
    fused_hidden, fused_cache = _model_step(model, dtype)
    monkeypatch.setenv(fused.DISABLE_ENV, "1")
    assert fused.kernel("rms_norm", dtype) is None
    torch_hidden, torch_cache = _model_step(model, dtype)
    _close(fused_cache, torch_cache)
    tol = 1e-5 if dtype == torch.float32 else 0.05  # bf16: rounding flips compound per layer
    torch.testing.assert_close(fused_hidden.float(), torch_hidden.float(), rtol=tol, atol=tol)
