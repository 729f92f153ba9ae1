"""Weight loading, model configs and tokenizers, checked against transformers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checkpoints import build_tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from models.loader import (
    ModelLoadError,
    ModelSource,
    gguf_metadata,
    load_config,
    resolve_model,
)
from models.tokenizer import Tokenizer, load_tokenizer
from models.weights import iter_weights

JAPAN = "What is the capital of Japan?"
CHAT = [{"role": "user", "content": JAPAN}]
# "<|im_start|>system\n" ... the default system prompt ... "<|im_start|>assistant\n"
CHATML_HEAD = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173]
CHATML_TAIL = [2, 198, 1, 520, 9531, 198]
TEXTS = [JAPAN, "", "  leading spaces\tand tabs\n\nnewlines", "héllo wörld 東京 🚀", "<|im_end|>x"]


# ---------------------------------------------------------------- the embedded GGUF


def test_default_source(default_source: ModelSource) -> None:
    assert default_source.kind == "gguf"
    assert default_source.name == "SmolLM2-135M-Instruct"
    assert default_source.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gguf_config(default_source: ModelSource) -> None:
    cfg = load_config(default_source)
    assert (cfg.architecture, cfg.num_hidden_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.intermediate_size, cfg.vocab_size) == (1536, 49152)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (1e5, 1e-5, 8192)
    assert cfg.tie_word_embeddings and not cfg.attention_bias and cfg.rope_scaling is None
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))


def _meta_llama(layers: int) -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=True))


def test_gguf_weights_equal_transformers_conversion(default_source: ModelSource) -> None:
    cfg = load_config(default_source)
    # transformers maps GGUF names through a model's parameter names, one module at a time
    # (seconds per layer); mapping two layers keeps this test short and still covers every kind
    parsed = load_gguf_checkpoint(
        default_source.path, return_tensors=True, model_to_load=_meta_llama(2)
    )
    expected = parsed["tensors"]
    assert "model.layers.1.self_attn.k_proj.weight" in expected
    assert "model.layers.2.self_attn.k_proj.weight" not in expected
    for part in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.1.self_attn.{part}.weight" in expected
    assert {"model.embed_tokens.weight", "model.norm.weight"} <= expected.keys()
    all_names = set(_meta_llama(cfg.num_hidden_layers).state_dict()) - {"lm_head.weight"}
    seen = set()
    for name, tensor in iter_weights(default_source):
        assert tensor.dtype == torch.float32
        if name in expected:
            assert torch.equal(tensor, expected[name]), name
        seen.add(name)
    assert seen == all_names
    assert expected.keys() <= seen


# ---------------------------------------------------------------- safetensors folders

TINY_SHAPES = [
    pytest.param({"architecture": "llama"}, id="llama"),
    pytest.param(
        {"architecture": "llama", "num_kv_heads": 2, "tie_word_embeddings": True},
        id="llama-gqa-tied",
    ),
    pytest.param({"architecture": "mistral", "num_kv_heads": 2}, id="mistral-gqa"),
    pytest.param(
        {"architecture": "qwen2", "num_kv_heads": 2, "tie_word_embeddings": True},
        id="qwen2-gqa-tied",
    ),
]


def _hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_safetensors_round_trip(tiny_checkpoint: Callable[..., Path], shape: dict) -> None:
    folder = tiny_checkpoint(**shape)
    source = resolve_model(str(folder))
    assert (source.kind, source.name) == ("hf", folder.name)
    expected = _hf_state_dict(folder)
    got = dict(iter_weights(source))
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        assert torch.equal(tensor, expected[name]), name

    cfg = load_config(source)
    assert cfg.architecture == shape["architecture"]
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        4,
        shape.get("num_kv_heads", 4),
        16,
    )
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
    assert cfg.tie_word_embeddings == shape.get("tie_word_embeddings", False)
    assert cfg.attention_bias == (shape["architecture"] == "qwen2")
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.eos_token_ids) == (10000.0, None, (2,))


def test_sharded_safetensors_and_dtype(tmp_path: Path) -> None:
    model = build_tiny_llama(seed=3)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="4MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    got = dict(iter_weights(resolve_model(str(tmp_path)), dtype=torch.bfloat16))
    expected = model.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in got.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name


def _write_config(folder: Path, **overrides: object) -> Path:
    folder.mkdir(exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 32,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 4096,
        "eos_token_id": [2, 7],
        **overrides,
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_hf_config_defaults_and_rope(tmp_path: Path) -> None:
    folder = _write_config(
        tmp_path,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "original_max_position_embeddings": 8192,
        },
    )
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    cfg = load_config(resolve_model(str(folder)))
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.tie_word_embeddings) == (2, 4, False)
    assert cfg.eos_token_ids == (2, 7, 9)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
    }


def _error(model: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_config(resolve_model(model))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_error_messages(tmp_path: Path) -> None:
    assert "not found" in _error(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert ".gguf" in _error(str(tmp_path / "weights.bin"))

    no_weights = _write_config(tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    assert "no *.safetensors" in _error(str(no_weights))

    gpt2 = _write_config(tmp_path / "gpt2", architectures=["GPT2LMHeadModel"])
    message = _error(str(gpt2))
    assert (
        "GPT2LMHeadModel" in message
        and "LlamaForCausalLM" in message
        and "Qwen2ForCausalLM" in message
    )

    mistral = _write_config(
        tmp_path / "mistral", architectures=["MistralForCausalLM"], sliding_window=1024
    )
    assert "sliding" in _error(str(mistral))

    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    assert "cannot read" in _error(str(tmp_path / "bad.gguf"))

    garbage = _write_config(tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="cannot read"):
        next(iter_weights(resolve_model(str(garbage))))


# ---------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def transformers_gguf_tokenizer(default_source: ModelSource) -> object:
    """transformers' own tokenizer built from the GGUF: the reference (~6 s)."""
    return AutoTokenizer.from_pretrained(
        default_source.path.parent, gguf_file=default_source.path.name
    )


def test_encode_matches_transformers(
    default_tokenizer: Tokenizer, transformers_gguf_tokenizer: object
) -> None:
    assert default_tokenizer.encode(JAPAN) == [1780, 314, 260, 3575, 282, 3085, 47]
    for text in TEXTS:
        assert default_tokenizer.encode(text) == transformers_gguf_tokenizer.encode(text)


def test_chat_template_matches_transformers(
    default_tokenizer: Tokenizer, transformers_gguf_tokenizer: object
) -> None:
    ids = default_tokenizer.apply_chat_template(CHAT)
    expected = transformers_gguf_tokenizer.apply_chat_template(
        CHAT, add_generation_prompt=True, return_dict=False
    )
    assert ids == expected
    assert ids[: len(CHATML_HEAD)] == CHATML_HEAD and ids[-len(CHATML_TAIL) :] == CHATML_TAIL
    assert default_tokenizer.decode(
        ids, skip_special_tokens=False
    ) == default_tokenizer.render_chat(CHAT)
    assert (default_tokenizer.eos_token_ids, default_tokenizer.vocab_size) == ((2,), 49152)
    assert sorted(default_tokenizer.all_special_ids) == [0, 1, 2]


def test_cached_tokenizer_equals_uncached(
    default_source: ModelSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DUET_CACHE_DIR", str(tmp_path))
    uncached = load_tokenizer(default_source)
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1
    cached = load_tokenizer(default_source)
    assert (
        cached.chat_template
        == uncached.chat_template
        == gguf_metadata(default_source, "tokenizer.chat_template")
    )
    assert cached.hf.get_vocab() == uncached.hf.get_vocab()
    assert (cached.eos_token_ids, cached.all_special_ids) == (
        uncached.eos_token_ids,
        uncached.all_special_ids,
    )
    for text in TEXTS:
        assert cached.encode(text) == uncached.encode(text)
    assert cached.apply_chat_template(CHAT) == uncached.apply_chat_template(CHAT)


def test_chat_template_override(default_source: ModelSource, tmp_path: Path) -> None:
    literal = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert load_tokenizer(default_source, chat_template=literal).render_chat(CHAT) == f"[{JAPAN}]"
    long_literal = literal + "{# " + "x" * 300 + " #}"  # longer than any file name
    assert (
        load_tokenizer(default_source, chat_template=long_literal).render_chat(CHAT) == f"[{JAPAN}]"
    )
    (tmp_path / "t.jinja").write_text(literal)
    from_file = load_tokenizer(default_source, chat_template=str(tmp_path / "t.jinja"))
    assert from_file.render_chat(CHAT) == f"[{JAPAN}]"
    with pytest.raises(ModelLoadError, match="not found"):
        load_tokenizer(default_source, chat_template=str(tmp_path / "missing.jinja"))


def test_tiny_checkpoint_tokenizer(
    tiny_checkpoint: Callable[..., Path], default_tokenizer: Tokenizer
) -> None:
    tokenizer = load_tokenizer(resolve_model(str(tiny_checkpoint(architecture="llama"))))
    assert tokenizer.encode(JAPAN) == default_tokenizer.encode(JAPAN)
    assert tokenizer.apply_chat_template(CHAT) == default_tokenizer.apply_chat_template(CHAT)
    assert tokenizer.eos_token_ids == (2,)


def test_gguf_config_and_weights_come_back_from_the_disk_cache(
    default_source: ModelSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DUET_CACHE_DIR", str(tmp_path))
    config = load_config(default_source)
    fresh = dict(iter_weights(default_source, torch.bfloat16))
    (config_entry,) = (tmp_path / "configs").iterdir()
    (weights_entry,) = (tmp_path / "weights").iterdir()
    assert load_config(default_source) == config
    cached = dict(iter_weights(default_source, torch.bfloat16))
    assert cached.keys() == fresh.keys()
    assert all(torch.equal(cached[name], fresh[name]) for name in fresh)
    assert all(cached[name].dtype == torch.bfloat16 for name in cached)
    # a damaged entry is derived again (and rewritten), never trusted
    config_entry.write_bytes(b"{")
    weights_entry.write_bytes(b"not safetensors")
    assert load_config(default_source) == config
    again = dict(iter_weights(default_source, torch.bfloat16))
    assert all(torch.equal(again[name], fresh[name]) for name in fresh)
    assert weights_entry.stat().st_size > 2**20
