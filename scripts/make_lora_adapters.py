#!/usr/bin/env python
"""Write random LoRA adapters (PEFT folders) for a model, e.g. to benchmark multi-LoRA serving.

.venv/bin/python scripts/make_lora_adapters.py /tmp/adapters --count 4 --rank 16
duet serve --enable-lora --max-loras 4 --lora-modules a0=/tmp/adapters/a0 ...
duet bench serve --lora-modules a0 a1 a2 a3 ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from safetensors.torch import save_file

from models.loader import load_config, resolve_model
from models.lora_files import CONFIG_FILE, TARGETS, WEIGHTS_FILE, module_shapes


def write_random_adapter(folder: Path, shapes: dict, layers: int, rank: int, seed: int) -> None:
    """A PEFT folder with random A and B (both nonzero, so the adapter changes outputs)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for target, (in_features, out_features) in shapes.items():
            part = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{part}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = 0.02 * torch.randn(
                rank, in_features, generator=gen
            )
            tensors[f"{prefix}.lora_B.weight"] = 0.02 * torch.randn(
                out_features, rank, generator=gen
            )
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": list(shapes), "bias": "none", "lora_dropout": 0.0}  # fmt: skip
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="adapters go to DIRECTORY/a0, a1, ...")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    args = parser.parse_args()
    config = load_config(resolve_model(args.model))
    shapes = {t: s for t, s in module_shapes(config).items() if t in args.targets}
    for i in range(args.count):
        folder = args.directory / f"a{i}"
        write_random_adapter(folder, shapes, config.num_hidden_layers, args.rank, seed=i)
        print(f"wrote {folder}")


if __name__ == "__main__":
    main()
