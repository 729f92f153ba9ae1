"""Tiny random Llama-family checkpoints in Hugging Face's safetensors format, for tests.

Each checkpoint carries the SmolLM2 tokenizer (vocab 49152), so tests can prompt it with text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from models.loader import resolve_model
from models.tokenizer import load_tokenizer

Architecture = Literal["llama", "mistral", "qwen2"]

VOCAB_SIZE = 49152  # the SmolLM2 tokenizer's
_CLASSES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def build_tiny_llama(
    *,
    architecture: Architecture = "llama",
    num_heads: int = 4,
    num_kv_heads: int = 4,
    tie_word_embeddings: bool = False,
    hidden: int = 64,
    layers: int = 2,
    intermediate: int = 128,
    seed: int = 0,
) -> PreTrainedModel:
    """A randomly initialised transformers model (fp32, eval mode) of the given shape."""
    config_class, model_class = _CLASSES[architecture]
    config = config_class(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        # Mistral defaults to a 4096-token sliding window, which duet does not serve
        **({"sliding_window": None} if architecture == "mistral" else {}),
    )
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    _perturb_constant_params(model, seed)
    return model


def _perturb_constant_params(model: PreTrainedModel, seed: int) -> None:
    # HF initialises norms to 1 and biases to 0, which would hide a swapped or dropped
    # norm/bias in a loader or model; make every one distinct
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))


def write_tiny_llama(
    dir: Path,
    *,
    architecture: Architecture = "llama",
    num_heads: int = 4,
    num_kv_heads: int = 4,
    tie_word_embeddings: bool = False,
    hidden: int = 64,
    layers: int = 2,
    intermediate: int = 128,
    seed: int = 0,
) -> Path:
    """Save a random model of the given shape plus the SmolLM2 tokenizer into `dir`.

    Returns `dir`, a Hugging Face folder that `models.loader.resolve_model` accepts.
    """
    dir = Path(dir)
    model = build_tiny_llama(
        architecture=architecture,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        tie_word_embeddings=tie_word_embeddings,
        hidden=hidden,
        layers=layers,
        intermediate=intermediate,
        seed=seed,
    )
    model.save_pretrained(dir, safe_serialization=True)
    load_tokenizer(resolve_model(None)).hf.save_pretrained(dir)
    return dir
