#!/usr/bin/env python
"""All of SmolLM2's decode linears (30 layers + LM head) for one step: F.linear against
oneDNN-prepacked weights, and (bf16 on CPUs with AMX-BF16) duet's tile kernel, per dtype and
batch size. Best of --repeats, interleaved.

    .venv/bin/python scripts/bench_linears.py --threads 1 --batch-sizes 1 16 64
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from models.packed import PackedLinear, TileLinear, tiles_available

# (out, in) of SmolLM2-135M's fused qkv, o, gate_up, down; then the tied LM head
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"| dtype | batch | F.linear | oneDNN prepacked | AMX tiles | tiles / oneDNN |  "
        f"{args.threads} thread(s), best of {args.repeats}"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        weights = [torch.randn(o, i).to(dtype) * 0.05 for o, i in SHAPES]
        paths = {
            "plain": [functools.partial(F.linear, weight=w) for w in weights],
            "packed": [PackedLinear(w, None) for w in weights],
        }
        if tiles_available(dtype):
            paths["tiles"] = [TileLinear(w, None) for w in weights]
        for batch in args.batch_sizes:
            inputs = [torch.randn(batch, w.shape[1]).to(dtype) for w in weights]
            best = dict.fromkeys(paths, float("inf"))
            for _ in range(args.repeats):
                for name, layers in paths.items():
                    best[name] = min(best[name], one_step(layers, inputs))
            tiles = best.get("tiles")
            print(
                f"| {str(dtype).removeprefix('torch.')} | {batch} | "
                f"{best['plain'] * 1e3:.1f} ms | {best['packed'] * 1e3:.1f} ms | "
                + (f"{tiles * 1e3:.1f} ms | {tiles / best['packed']:.2f} |" if tiles else "— | — |")
            )


def one_step(layers: list[Callable], inputs: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for layer, x in zip(layers, inputs, strict=True):
        layer(x)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
