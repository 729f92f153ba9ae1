"""PEFT LoRA adapter folders: read and check one against the base model, without torch.

An adapter is `adapter_config.json` + `adapter_model.safetensors` as PEFT saves them. The
check reads only the config and the safetensors header (names, shapes), so the CLI and the
frontends can refuse a bad adapter in one clear line before any worker sees it.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from models.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MAX_HEADER_BYTES = 100 * 1024**2

_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)
# PEFT features that change the math; refused rather than served wrong
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "fan_in_fan_out",
    "modules_to_save": "modules_to_save",
    "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern",
}


class LoRAError(ValueError):
    """An adapter that cannot be served; the message is one line meant for the user."""


@dataclass(frozen=True)
class AdapterSpec:
    """A checked adapter: where its tensors are and how to apply them.

    `tensors` maps (layer, target) to the safetensors names of its A [r, in] and B [out, r].
    """

    weights_path: Path
    rank: int
    scaling: float  # lora_alpha / r (or / sqrt(r) with use_rslora), as PEFT applies it
    tensors: dict[tuple[int, str], tuple[str, str]]


def module_shapes(model: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-targetable linear of one layer."""
    hidden, inter = model.hidden_size, model.intermediate_size
    q, kv = model.num_attention_heads * model.head_dim, model.num_key_value_heads * model.head_dim
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def read_adapter(path: str | Path, model: ModelConfig, max_rank: int) -> AdapterSpec:
    """Check the PEFT folder at `path` against the base model; raises LoRAError."""
    folder = Path(path)
    config = _read_config(folder)
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not _is_number(rank, int) or rank < 1 or not _is_number(alpha, int | float):
        raise LoRAError(f"{folder / CONFIG_FILE}: needs a positive integer r and a lora_alpha")
    if rank > max_rank:
        raise LoRAError(f"{folder}: rank {rank} is above --max-lora-rank {max_rank}")
    _check_config(folder, config)
    header = _read_header(folder / WEIGHTS_FILE)
    tensors = _check_tensors(folder, header, rank, model)
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return AdapterSpec(folder / WEIGHTS_FILE, rank, float(scaling), tensors)


def _read_config(folder: Path) -> dict:
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise LoRAError(f"{folder}: no {CONFIG_FILE} (not a PEFT adapter folder)")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoRAError(f"{file}: unreadable ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{file}: not a JSON object")
    return config


def _check_config(folder: Path, config: dict) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{folder}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("bias", "none") != "none":
        raise LoRAError(f"{folder}: bias={config.get('bias')!r} is not supported (only 'none')")
    for key, feature in _UNSUPPORTED.items():
        if config.get(key):
            raise LoRAError(f"{folder}: {feature} is not supported")
    if config.get("layers_to_transform") is not None:
        raise LoRAError(f"{folder}: layers_to_transform is not supported")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted({str(t) for t in targets} - set(TARGETS))
        if unknown:
            raise LoRAError(
                f"{folder}: unknown target module {unknown[0]!r} (supported: {', '.join(TARGETS)})"
            )


def _read_header(file: Path) -> dict:
    """The safetensors JSON header: tensor name -> {dtype, shape, data_offsets}."""
    if not file.is_file():
        raise LoRAError(f"{file.parent}: no {WEIGHTS_FILE}")
    try:
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER_BYTES:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        raise LoRAError(f"{file}: not a safetensors file") from None
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise LoRAError(f"{file}: not a safetensors file")
    header.pop("__metadata__", None)
    return header


def _check_tensors(
    folder: Path, header: dict, rank: int, model: ModelConfig
) -> dict[tuple[int, str], tuple[str, str]]:
    shapes = module_shapes(model)
    found: dict[tuple[int, str], dict[str, str]] = {}
    for name, info in header.items():
        match = _KEY.match(name)
        if match is None or match.group(2) not in shapes:
            raise LoRAError(f"{folder}: unknown target tensor {name!r}")
        layer, target, side = int(match.group(1)), match.group(2), match.group(3)
        if layer >= model.num_hidden_layers:
            raise LoRAError(f"{folder}: {name} is for layer {layer}; the model has "
                            f"{model.num_hidden_layers}")  # fmt: skip
        in_features, out_features = shapes[target]
        expected = [rank, in_features] if side == "A" else [out_features, rank]
        if info.get("shape") != expected:
            raise LoRAError(f"{folder}: {name} has shape {info.get('shape')}, expected {expected}")
        found.setdefault((layer, target), {})[side] = name
    if not found:
        raise LoRAError(f"{folder}: {WEIGHTS_FILE} holds no LoRA tensors")
    pairs: dict[tuple[int, str], tuple[str, str]] = {}
    for (layer, target), sides in sorted(found.items()):
        if set(sides) != {"A", "B"}:
            raise LoRAError(f"{folder}: layer {layer} {target} lacks lora_A or lora_B")
        pairs[(layer, target)] = (sides["A"], sides["B"])
    return pairs


def _is_number(value: object, kind: type | tuple[type, ...]) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)  # JSON true is no rank
