"""Stream a model's weights as `(hf_name, tensor)` pairs in Hugging Face names and layouts.

GGUF files and Hugging Face safetensors folders yield the same pairs, so the model class
never knows where its weights came from.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf.quants import dequantize
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from models.disk_cache import atomic_file, cache_dir, code_version, file_key
from models.loader import (
    ModelLoadError,
    ModelSource,
    gguf_config,
    gguf_reader,
    hf_config,
    read_json,
)

# GGUF tensor name -> HF name; per-layer names are under blk.N / model.layers.N
GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

logger = logging.getLogger(__name__)


def iter_weights(
    source: ModelSource, dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` for every weight, in HF layout, converted to `dtype`.

    A progress bar over tensors goes to stderr. `lm_head.weight` is absent when the
    embeddings are tied.
    """
    if source.kind == "gguf":
        yield from _gguf_weights(source.path, source.name, dtype)
    else:
        yield from _safetensors_weights(source.path, source.name, dtype)


def _progress(total: int, name: str) -> tqdm:
    return tqdm(
        total=total,
        desc=f"Loading {name}",
        unit="tensor",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,  # a few redraws, not hundreds, when stderr goes to a log file
    )


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return [folder / shard for shard in shards]
    return sorted(folder.glob("*.safetensors"))


def _safetensors_weights(
    folder: Path, display_name: str, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    tied = hf_config(folder).tie_word_embeddings
    files = _safetensors_files(folder)
    try:
        handles = [safe_open(str(f), framework="pt") for f in files]
    except (OSError, SafetensorError) as e:
        raise ModelLoadError(f"cannot read weights in {folder}: {e}") from e
    with _progress(sum(len(h.keys()) for h in handles), display_name) as bar:
        for handle in handles:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                bar.update()
                # old checkpoints store RoPE tables, and some tied ones keep a redundant head
                if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                    continue
                yield name, handle.get_tensor(name).to(dtype)


def _gguf_hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if base in GGUF_GLOBAL_NAMES:
        return f"{GGUF_GLOBAL_NAMES[base]}.{suffix}"
    m = _GGUF_LAYER_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in GGUF_LAYER_NAMES:
        raise ModelLoadError(f"unexpected GGUF tensor {gguf_name}: not a Llama-family model")
    layer, part, suffix = m.groups()
    return f"model.layers.{layer}.{GGUF_LAYER_NAMES[part]}.{suffix}"


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (pairs interleaved per head) back to HF's halves.

    Works for weights [rows, cols] and biases [rows] alike.
    """
    pairs = w.shape[0] // n_head // 2
    return w.reshape(n_head, pairs, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_weights(
    path: Path, display_name: str, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    # NOTE: dequantizing in numpy and the GGUF header's parse take seconds per start; the
    # result, in HF names and `dtype`, is kept on disk as safetensors and read back by mmap
    key = file_key(path, f"gguf-weights-{dtype}", code_version(sys.modules[__name__]))
    cached = cache_dir() / "weights" / f"{key}.safetensors"
    if cached.is_file():
        try:
            yield from _cached_weights(cached, display_name)
            return
        except (OSError, SafetensorError) as e:
            logger.warning("re-reading %s: its cache %s is damaged: %s", path, cached, e)
    tensors = {}
    for name, tensor in _dequantized_gguf_weights(path, display_name, dtype):
        tensors[name] = tensor
        yield name, tensor
    try:
        with atomic_file(cached) as tmp:
            save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp))
    except OSError as e:
        logger.warning("cannot cache the dequantized weights in %s: %s", cached, e)


def _cached_weights(cached: Path, display_name: str) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(str(cached), framework="pt") as handle:
        names = list(handle.keys())
        with _progress(len(names), display_name) as bar:
            for name in names:
                bar.update()
                yield name, handle.get_tensor(name)


def _dequantized_gguf_weights(
    path: Path, display_name: str, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    config = gguf_config(path)
    # only llama.cpp's "llama" converter permutes q/k; qwen2 (NeoX RoPE) stores HF order
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    reader = gguf_reader(path)
    with _progress(len(reader.tensors), display_name) as bar:
        for tensor in reader.tensors:
            hf_name = _gguf_hf_name(tensor.name)
            w = dequantize(tensor.data, tensor.tensor_type)  # [rows, cols]: HF's [out, in]
            part = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
            if config.architecture == "llama" and part in heads:
                w = _unpermute_rope_rows(w, heads[part])
            if not w.flags.writeable:  # F32 tensors come back as views of the read-only mmap
                w = w.copy()
            bar.update()
            yield hf_name, torch.from_numpy(w).to(dtype)
