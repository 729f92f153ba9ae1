"""Write any model duet can load as a Hugging Face folder (for HF, vLLM, other peers)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.config import ModelConfig
from models.loader import ModelSource, load_config
from models.tokenizer import load_tokenizer
from models.weights import iter_weights

_HF_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def hf_config_dict(config: ModelConfig) -> dict:
    """config.json contents in the classic (rope_theta at top level) layout."""
    eos = list(config.eos_token_ids)
    out = {
        "architectures": [_HF_ARCHITECTURE[config.architecture]],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
    }
    if config.architecture == "llama":
        out["attention_bias"] = config.attention_bias
    return out


def export_hf_folder(source: ModelSource, folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json, model.safetensors and the tokenizer (with chat template) to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    config = load_config(source)
    (folder / "config.json").write_text(json.dumps(hf_config_dict(config), indent=2))
    tensors = {name: t.contiguous() for name, t in iter_weights(source, dtype)}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    load_tokenizer(source).hf.save_pretrained(folder)
    eos = list(config.eos_token_ids)
    generation = {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
    }
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return folder
