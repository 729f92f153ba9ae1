#!/usr/bin/env python
"""The batched LoRA delta alone over every wrapped linear of the default model (30 layers x
qkv, o, gate_up, down): the native kernel's twins against the torch path, best of N ms.

--adapters random rank-16 adapters on every target fill the slots, and --batch decode rows
use them round-robin (and, for comparison, all the first one). --tokens > 1 gives each
request that many rows, as a prefill chunk does.

    .venv/bin/python scripts/bench_lora.py --batch 16 --adapters 4 --threads 1
    .venv/bin/python scripts/bench_lora.py --batch 4 --tokens 256 --threads 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

# (importing bench_decode_step puts the repository root on sys.path)
from bench_decode_step import random_adapters

from engine_core.messages.config import EngineConfig
from kernels import lora
from models import cpu_features
from models.runner import ModelRunner

Delta = Callable[[torch.Tensor, torch.Tensor, lora.StackedLoRA], None]


def best_ms(fn: Delta, cases: list, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for x, y, stack in cases:
            fn(y, x, stack)
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def paths(rows: lora.LoRARows) -> dict[str, Delta]:
    """The native twins this CPU runs, and the torch path, over one step's rows."""
    twins = ["avx512", "avx2"] if cpu_features.isa() == "avx512" else ["avx2"]
    if cpu_features.has_avx512_bf16():
        twins.insert(0, "avx512bf16")
    found: dict[str, Delta] = {}
    for isa in twins if lora.native_available() else []:
        found[f"native {isa}"] = lambda y, x, s, isa=isa: lora.add_lora_native(y, x, s, rows, isa)
    found["torch"] = lambda y, x, s: lora.add_lora_torch(y, x, s, rows)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=1, help="rows per request")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = EngineConfig(dtype=args.dtype, kv_cache_memory=1 << 26, max_model_len=512,
                          enable_lora=True, max_loras=args.adapters)  # fmt: skip
    runner = ModelRunner(config)
    assert runner.lora is not None
    with tempfile.TemporaryDirectory() as tmp:
        refs = random_adapters(runner, args.adapters, Path(tmp))
        for mix, label in [(refs, f"{args.adapters} mixed"), (refs[:1], "1 adapter")]:
            runner.lora.set_batch([(mix[b % len(mix)], args.tokens) for b in range(args.batch)])
            rows = runner.lora.state.batch.rows
            cases, rows_total = [], args.batch * args.tokens
            for linear in runner.lora.linears.values():
                stack = linear.stack
                out = max(c + s for c, s in zip(stack.y_col, stack.size, strict=True))
                x = torch.randn(rows_total, stack.a.shape[0]).to(runner.dtype)
                cases.append((x, torch.randn(rows_total, out).to(runner.dtype), stack))
            with torch.inference_mode():
                for name, fn in paths(rows).items():
                    ms = best_ms(fn, cases, args.repeats)
                    print(f"{runner.dtype} batch {args.batch} x {args.tokens} rows, {label}, "
                          f"{args.threads} threads, {name}: {ms:.2f} ms / {len(cases)} linears")  # fmt: skip


if __name__ == "__main__":
    main()
