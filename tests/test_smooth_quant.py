"""Smoothing before W8A8 (models.smooth_quant): the float model's function is unchanged, and
per-token int8 activations lose less where a few channels dominate."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kernels import int8
from models.llama import LlamaForCausalLM
from models.loader import load_config, resolve_model
from models.quant_int8 import W8A8_ENV, Int8Linear, int8_activations, quantize_model
from models.smooth_quant import CALIBRATION_TEXT, scratch_cache, smooth_for_w8a8
from models.weights import iter_weights

CALIBRATION = list(range(5, 80))
PROBE = [7, 300, 12, 99, 41, 5, 250, 18, 77, 3, 150, 64]


def _float_model(folder: Path) -> LlamaForCausalLM:
    source = resolve_model(str(folder))
    model = LlamaForCausalLM(load_config(source), max_positions=256)
    model.load_weights(iter_weights(source, torch.float32))
    return model.eval()


def _logits(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), *scratch_cache(model, len(ids)))
    return model.compute_logits(hidden)


@pytest.mark.parametrize(
    "shape",
    [
        {"num_heads": 4, "num_kv_heads": 2, "tie_word_embeddings": True},
        {"architecture": "qwen2", "num_heads": 4, "num_kv_heads": 1},  # qkv biases, G = 4
        {"num_heads": 4, "num_kv_heads": 4},
    ],
    ids=["gqa-tied", "qwen2-mqa", "mha"],
)
def test_smoothing_leaves_the_float_model_unchanged(
    tiny_checkpoint: Callable[..., Path], shape: dict
) -> None:
    model = _float_model(tiny_checkpoint(**shape))
    before = _logits(model, PROBE)
    norm = model.layers[0].input_layernorm.weight.clone()
    assert smooth_for_w8a8(model, CALIBRATION) == 4 * len(model.layers) + 1
    assert not torch.equal(model.layers[0].input_layernorm.weight, norm)  # scales were folded
    torch.testing.assert_close(_logits(model, PROBE), before, rtol=1e-4, atol=1e-4)


def test_smoothing_shrinks_w8a8_error_where_a_few_channels_dominate(
    tiny_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(W8A8_ENV, "1")
    reference = _float_model(tiny_checkpoint(num_heads=4, num_kv_heads=2))
    with torch.no_grad():  # the outlier channels real Llamas have after their norms
        for layer in reference.layers:
            layer.input_layernorm.weight[[3, 17]] *= 40
            layer.post_attention_layernorm.weight[[5, 40]] *= 40
    expected = _logits(reference, PROBE)
    errors = []
    for calibration in (None, lambda: CALIBRATION):
        model = copy.deepcopy(reference)
        quantize_model(model, torch.float32, calibration)
        paths = {m.path_for(len(PROBE)) for m in model.modules() if isinstance(m, Int8Linear)}
        assert paths <= {"w8a8", "amx"}  # int8 activations everywhere (amx: on AMX tiles)
        errors.append((_logits(model, PROBE) - expected).abs().mean().item())
    unsmoothed, smoothed = errors
    assert smoothed < 0.5 * unsmoothed, errors


def test_without_calibration_activations_stay_float_unless_forced(
    tiny_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a LoRA server passes no calibration: unsmoothed W8A8 would cost 3 % perplexity
    folder = tiny_checkpoint(num_heads=4, num_kv_heads=2)
    paths = {}
    for switch in (None, "1"):
        if switch is None:
            monkeypatch.delenv(W8A8_ENV, raising=False)
        else:
            monkeypatch.setenv(W8A8_ENV, switch)
        model = _float_model(folder)
        quantize_model(model, torch.float32, None)
        paths[switch] = {m.path_for(1) for m in model.modules() if isinstance(m, Int8Linear)}
    assert "w8a8" not in paths[None]
    assert paths["1"] == {"w8a8"}


def test_weight_only_int8_is_not_smoothed(
    tiny_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(W8A8_ENV, "0")
    model = _float_model(tiny_checkpoint(num_heads=4, num_kv_heads=2))
    norm = model.layers[0].input_layernorm.weight.clone()
    quantize_model(model, torch.float32, lambda: pytest.fail("calibrated without W8A8"))
    assert torch.equal(model.layers[0].input_layernorm.weight, norm)
    assert "w8a8" not in {m.path_for(1) for m in model.modules() if isinstance(m, Int8Linear)}


@pytest.mark.skipif(not int8.native_available(), reason="no native int8 kernels here")
def test_by_default_every_linear_but_down_proj_quantizes_its_activations(
    tiny_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(W8A8_ENV, raising=False)
    model = _float_model(tiny_checkpoint(num_heads=4, num_kv_heads=2, tie_word_embeddings=True))
    expected = _logits(model, PROBE)
    quantize_model(model, torch.bfloat16, lambda: CALIBRATION)
    paths = {
        name: module.path_for(1)
        for name, module in model.named_modules()
        if isinstance(module, Int8Linear)
    }
    assert len(paths) == 4 * len(model.layers) + 1  # the tied LM head got its own
    # bf16 activations there: 16 bits on the W8A8 tiles, or weight-only on AMX machines
    assert {p for n, p in paths.items() if n.endswith("down_proj")} <= {"w8a16", "wo"}
    assert {p for n, p in paths.items() if not n.endswith("down_proj")} == {"w8a8"}
    model.to(torch.bfloat16)
    got = _logits(model, PROBE)
    assert (got - expected).abs().mean() < 0.05 * expected.abs().mean()  # ~0.015 here
    without_native = [
        int8_activations("torch", n) for n in ("layers.0.mlp.gate_up_proj", "lm_head")
    ]
    assert without_native == [False, False]  # torch's int8 x int8 matmul loses there


def test_the_calibration_text_is_chat_and_prose_in_the_default_tokenizer(
    default_tokenizer,
) -> None:
    ids = default_tokenizer.encode(CALIBRATION_TEXT)
    assert 300 <= len(ids) <= 1024  # one short forward at load
    assert ids.count(1) == 4  # <|im_start|>: the chat turns are special tokens, not text
