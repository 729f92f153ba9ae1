"""Random PEFT LoRA adapters for tests, and the Hugging Face model with one merged in.

PEFT initialises lora_B to zero (an adapter that changes nothing); these are random on
both sides, large enough to change greedy tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(
    base: PreTrainedModel,
    folder: Path,
    *,
    rank: int = 8,
    alpha: int = 16,
    targets: Sequence[str] = ALL_TARGETS,
    seed: int = 0,
    std: float = 0.05,
) -> Path:
    """Save a random LoRA adapter for `base` (left untouched) as a PEFT folder."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(std * torch.randn(param.shape, generator=gen))
    peft_model.save_pretrained(folder)
    return Path(folder)


def merged_model(base_folder: Path, adapter: Path) -> PreTrainedModel:
    """The fp32 HF model at `base_folder` with the adapter merged into its weights."""
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
