#!/usr/bin/env python
"""All of SmolLM2's decode linears (30 layers + LM head) for one step under each int8 path,
against bf16 on oneDNN-prepacked weights, per batch size. Best of --repeats, interleaved.

    .venv/bin/python scripts/bench_int8.py --threads 1 --batch-sizes 1 2 4 8 16 32 64

What it shows is what `models.quant_int8.ROUTES` encodes.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from bench_linears import SHAPES, one_step

from kernels import int8
from models import cpu_features
from models.packed import PackedLinear
from models.quant_int8 import quantize_weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    paths = build_paths([torch.randn(o, i) * 0.05 for o, i in SHAPES], dtype)
    print(f"| batch | {' | '.join(paths)} |  ({args.dtype} activations, {args.threads} "
          f"thread(s), best of {args.repeats}, ms per step)")  # fmt: skip
    print("|---:|" + "---:|" * len(paths))
    for batch in args.batch_sizes:
        inputs = [torch.randn(batch, i).to(dtype) for _, i in SHAPES]
        best = dict.fromkeys(paths, float("inf"))
        for _ in range(args.repeats):
            for name, layers in paths.items():
                best[name] = min(best[name], one_step(layers, inputs))
        print(f"| {batch} | " + " | ".join(f"{best[p] * 1e3:.1f}" for p in paths) + " |")


def build_paths(weights: list[torch.Tensor], dtype: torch.dtype) -> dict[str, list]:
    """Each path's callables, one per linear: x [M, K] -> [M, N]."""
    quantized = [quantize_weight(w) for w in weights]
    packed = [(*int8.pack_weight(q), s) for q, s in quantized]
    paths: dict[str, list] = {
        f"{dtype} prepacked": [PackedLinear(w.to(dtype), None) for w in weights],
        "weight-only int8": [
            functools.partial(int8.weight_only, qweight=q, scale=s, bias=None) for q, s in quantized
        ],
        "torch._int_mm W8A8": [
            functools.partial(int8.torch_w8a8, qweight_t=q.t(), scale=s, bias=None)
            for q, s in quantized
        ],
    }
    if int8.native_available():
        paths["native dequantize + F.linear"] = [
            functools.partial(int8.dense, packed=p, scale=s, bias=None, shape=tuple(w.shape))
            for (p, _, s), w in zip(packed, weights, strict=True)
        ]
        runnable = {"amx": int8.amx_available(), "vnni": cpu_features.has_vnni(),
                    "a16-vnni": cpu_features.has_vnni(),
                    "wo-amx": int8.amx_bf16_available() and dtype == torch.bfloat16,
                    "wo-avx512": cpu_features.isa() == "avx512",
                    "wo-avx512bf16": cpu_features.has_avx512_bf16() and dtype == torch.bfloat16}  # fmt: skip
        for kernel in int8.NATIVE_KERNELS:
            if not runnable.get(kernel, True):
                continue  # this CPU lacks its instructions
            paths[f"native {kernel}"] = [
                functools.partial(
                    int8.native_linear, packed=p, wsum=ws, scale=s, bias=None, kernel=kernel
                )
                for p, ws, s in packed
            ]
    return paths


if __name__ == "__main__":
    main()
