#!/usr/bin/env python
"""All of SmolLM2's decode linears (30 layers + LM head) for one step: F.linear against
oneDNN-prepacked weights, and (bf16 on CPUs with AVX512_BF16) duet's tile kernel, per dtype and
batch size. Best of --repeats, interleaved.

    .venv/bin/python scripts/bench_linears.py --threads 1 --batch-sizes 1 16 64

With --against-library PATH (bf16, CPUs with AVX512_BF16), this build's tile kernels against
another build's on the same packed weights: the 30 layers' linears (not the LM head, which
a step runs on its sampled rows only), gate_up with SiLU x up in its kernel as the model
runs it; --repeats rounds in turn, medians and their ratio per batch size.

    .venv/bin/python scripts/bench_linears.py --threads 2 --batch-sizes 1 64 2048 \
        --against-library old.so --repeats 8
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from kernels import bf16_gemm
from models.packed import PackedLinear, TileLinear, tiles_available

# (out, in) of SmolLM2-135M's fused qkv, o, gate_up, down; then the tied LM head
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--against-library", help="another build's tile kernels (A/B)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.against_library:
        against_library(args.against_library, args.batch_sizes, args.repeats)
        return
    print(
        f"| dtype | batch | F.linear | oneDNN prepacked | tiles ({bf16_gemm.twin()}) | tiles / oneDNN |  "
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


def against_library(path: str, batch_sizes: list[int], rounds: int) -> None:
    """All linears of a step on this build's tile kernels and on those of the library at
    `path`, in turn."""
    if not tiles_available(torch.bfloat16):
        raise SystemExit("--against-library times the bf16 tile kernels: none here")
    other = bf16_gemm.declare(ctypes.CDLL(path))
    layer_shapes = SHAPES[:-1]
    calls = []  # (packed weight, outputs, whether SiLU x up is in the kernel) per linear
    for out_features, in_features in layer_shapes:
        weight = torch.randn(out_features, in_features).bfloat16() * 0.05
        if out_features == 2 * SHAPES[3][1]:  # gate_up
            calls.append((bf16_gemm.pack_gate_up(weight), out_features // 2, True))
        else:
            calls.append((bf16_gemm.pack(weight), out_features, False))
    print(f"| batch | this build | other | this / other (median, range) |  {rounds} rounds")
    print("|---:|---:|---:|---:|")
    for batch in batch_sizes:
        inputs = [torch.randn(batch, shape[1]).bfloat16() for shape in layer_shapes]
        builds = {"this": None, "other": other}
        times: dict[str, list[float]] = {name: [] for name in builds}
        for round_ in range(rounds):
            for name in list(builds)[:: 1 if round_ % 2 == 0 else -1]:
                start = time.perf_counter()
                for (packed, n, silu), x in zip(calls, inputs, strict=True):
                    if silu:
                        bf16_gemm.silu_mul(x, packed, n, builds[name])
                    else:
                        bf16_gemm.linear(x, packed, None, n, builds[name])
                times[name].append(time.perf_counter() - start)
        ratios = [ours / theirs for ours, theirs in zip(*times.values(), strict=True)]
        ours, theirs = (statistics.median(t) * 1e3 for t in times.values())
        print(
            f"| {batch} | {ours:.1f} ms | {theirs:.1f} ms | {statistics.median(ratios):.3f} "
            f"({min(ratios):.2f}-{max(ratios):.2f}) |"
        )


def one_step(layers: list[Callable], inputs: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for layer, x in zip(layers, inputs, strict=True):
        layer(x)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
