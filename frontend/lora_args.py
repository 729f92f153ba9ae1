"""`duet serve`'s LoRA flags, with vLLM's names and meanings, and their start-up check."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from engine_core.messages.config import EngineConfig


def add_lora_arguments(parser: argparse.ArgumentParser, positive: Callable[[str], int]) -> None:
    """Add the flags; `positive` is the CLI's type for integers of at least 1."""
    add, default = parser.add_argument, EngineConfig()
    add("--enable-lora", action="store_true", help="serve LoRA adapters (picked by `model`)")
    add("--lora-modules", type=lora_module, nargs="+", default=None, metavar="NAME=PATH",
        help='adapters as name=path or JSON {"name": ..., "path": ...}: PEFT folders '
             "(adapter_config.json + adapter_model.safetensors)")  # fmt: skip
    add("--max-loras", type=positive, default=default.max_loras,
        help="most distinct adapters in one batch")  # fmt: skip
    add("--max-lora-rank", type=positive, default=default.max_lora_rank,
        help="largest adapter rank accepted")  # fmt: skip
    add("--max-cpu-loras", type=positive, default=None,
        help="adapters each worker keeps loaded (default: --max-loras)")  # fmt: skip


def lora_module(text: str) -> tuple[str, str]:
    """`name=path`, or vLLM's JSON form {"name": ..., "path": ...} -> (name, path)."""
    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError:
            raise argparse.ArgumentTypeError(f"not JSON: {text!r}") from None
        name, path = spec.get("name"), spec.get("path")
    else:
        name, _, path = text.partition("=")
    if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
        raise argparse.ArgumentTypeError(f"expected name=path, got {text!r}")
    return name, path


def check_lora_modules(args: argparse.Namespace) -> None:
    """Exit in one line on an adapter no process could serve, before anything starts."""
    modules = args.lora_modules or []
    if modules and not args.enable_lora:
        sys.exit("duet: --lora-modules needs --enable-lora")
    if args.max_cpu_loras is not None and args.max_cpu_loras < args.max_loras:
        sys.exit("duet: --max-cpu-loras must be at least --max-loras")
    if not modules:
        return
    # imported only here: the model's shape comes through the loader (torch)
    from models.loader import ModelLoadError, load_config, resolve_model
    from models.lora_files import LoRAError, read_adapter

    try:
        model = load_config(resolve_model(args.model or args.model_option))
        names = [name for name, _ in modules]
        if len(set(names)) != len(names):
            raise LoRAError("two --lora-modules share a name")
        for name, path in modules:
            try:
                read_adapter(path, model, args.max_lora_rank)
            except LoRAError as exc:
                raise LoRAError(f"LoRA module {name!r}: {exc}") from None
    except (ModelLoadError, LoRAError) as exc:
        sys.exit(f"duet: {exc}")
