#!/usr/bin/env python
"""Attention, one layer: the torch path against the native C kernels.

Decode: B sequences with random context lengths in [--min-ctx, --max-ctx]. With
--prefill N: B prompts of N new tokens each, nothing cached (the torch path is SDPA per
sequence). SmolLM2's head shape (Hq=9, Hkv=3, D=64), block size 16, shuffled block ids,
fp32 or bf16 (--dtype). The native kernels run as every twin this CPU can execute
(AVX-512, AVX2 via DUET_CPU_ISA, and for bf16 AVX512_BF16, and for bf16 prefill on CPUs with
AMX-BF16 the AMX tile kernel). Prints best-of-N ms.
With --layers L, a model step's worth instead: L layers' caches, each call after reading
~4.5 MB (a layer of SmolLM2's bf16 weights) as a step would, so the KV comes from memory
rather than from a cache the previous repeat warmed; the time is the L calls' sum.
With --against-library PATH (decode), this build's kernel against another build of the
library (e.g. ~/.cache/duet/kernels/duet_kernels_*.so of an earlier commit), the two in
turn for --repeats rounds in one process: medians and the median ratio, which the host's
slow and fast phases move far less than they move absolute times.

    .venv/bin/python scripts/bench_kernels.py --dtype bfloat16
    .venv/bin/python scripts/bench_kernels.py --dtype bfloat16 --batch 1 --prefill 256
    .venv/bin/python scripts/bench_kernels.py --dtype bfloat16 --batch 16 --layers 30
    .venv/bin/python scripts/bench_kernels.py --dtype bfloat16 --batch 64 --layers 30 \
        --threads 2 --against-library old.so
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# run from a checkout without installing: make the repository root importable
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from kernels import attention, cpu_attention, native
from kernels.metadata import AttentionMetadata
from models import cpu_features


def paged_batch(
    lengths: list[int], new_tokens: int, dtype: torch.dtype, block_size: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Sequences of `lengths` tokens in a shuffled pool, the last `new_tokens` of each new
    (1: a decode batch), their K/V already in the cache."""
    gen = torch.Generator().manual_seed(0)
    batch = len(lengths)
    blocks_each = [-(-n // block_size) for n in lengths]
    order = (torch.randperm(sum(blocks_each), generator=gen) + 1).tolist()
    tables = torch.zeros(batch, max(blocks_each), dtype=torch.int32)
    used = 0
    for row, count in enumerate(blocks_each):
        tables[row, :count] = torch.tensor(order[used : used + count], dtype=torch.int32)
        used += count
    key_cache = torch.randn(sum(blocks_each) + 1, block_size, 3, 64, dtype=dtype)
    value_cache = torch.randn_like(key_cache)
    starts = list(range(0, batch * new_tokens + 1, new_tokens))
    meta = AttentionMetadata(
        torch.zeros(starts[-1], dtype=torch.int64),
        torch.tensor(starts, dtype=torch.int32),
        torch.tensor(lengths, dtype=torch.int32),
        tables,
        batch if new_tokens == 1 else 0,
        starts,
        lengths,
    )
    return torch.randn(starts[-1], 9, 64, dtype=dtype), key_cache, value_cache, meta


def torch_prefill(query, key_cache, value_cache, meta, scale) -> torch.Tensor:
    """The torch path as the native backend ran prefill chunks before their kernel."""
    return attention.paged_attention(
        query, key_cache, value_cache, meta, scale, decode=cpu_attention.native_decode
    )


def best_ms(fn, args: tuple, repeats: int) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def step_ms(fn, layer_args: list[tuple], repeats: int) -> float:
    """Best over `repeats` of the summed time of one call per layer, each after a read of
    ~4.5 MB standing in for that layer's linears."""
    weights = torch.ones(len(layer_args), 4_500_000 // 4)
    best = float("inf")
    for _ in range(repeats + 1):  # the first warms up
        total = 0.0
        for layer, args in enumerate(layer_args):
            weights[layer].sum()
            start = time.perf_counter()
            fn(*args)
            total += time.perf_counter() - start
        best = min(best, total)
    return best * 1000


def against_library(path: str, calls: list[tuple], layers: int, repeats: int) -> None:
    """This build's decode kernel and the one in the library at `path`, in turn."""
    other = ctypes.CDLL(path)
    for name in native.DECODE_KERNELS:
        native.declare(other, name, native.DECODE_ARGTYPES)
    builds: dict[str, Callable] = {
        "this build": cpu_attention.native_decode,
        "other": lambda *call: cpu_attention.native_decode(*call, lib=other),
    }
    times: dict[str, list[float]] = {name: [] for name in builds}
    for round_ in range(repeats):
        for name in list(builds)[:: 1 if round_ % 2 == 0 else -1]:
            fn = builds[name]
            times[name].append(step_ms(fn, calls, 1) if layers else best_ms(fn, calls[0], 1))
    ratios = [ours / theirs for ours, theirs in zip(*times.values(), strict=True)]
    medians = " | ".join(f"{statistics.median(t):.2f} ms" for t in times.values())
    print("| this build | other | this / other (median, range) |")
    print(f"| {medians} | {statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--min-ctx", type=int, default=300)
    parser.add_argument("--max-ctx", type=int, default=450)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--prefill", type=int, default=0, help="new tokens per prompt")
    parser.add_argument("--layers", type=int, default=0, help="a step over this many layers")
    parser.add_argument("--against-library", help="another build of the kernels (decode)")
    args = parser.parse_args()
    if args.against_library and args.prefill:
        parser.error("--against-library times the decode kernel: drop --prefill")
    dtype = getattr(torch, args.dtype)
    if args.prefill:
        lengths = [args.prefill] * args.batch
        what = f"prefill attention, {args.dtype}, {args.batch} x {args.prefill} tokens"
        ours, ref = cpu_attention.paged_attention, torch_prefill
    else:
        gen = torch.Generator().manual_seed(0)
        lengths = torch.randint(args.min_ctx, args.max_ctx + 1, (args.batch,), generator=gen)
        lengths = lengths.tolist()
        what = f"decode attention, {args.dtype}, B={args.batch}, ctx {args.min_ctx}-{args.max_ctx}"
        ours, ref = cpu_attention.native_decode, attention.decode_attention
    query, key_cache, value_cache, meta = paged_batch(lengths, args.prefill or 1, dtype)
    calls = [(query, key_cache, value_cache, meta, 0.125)]
    for _ in range(args.layers - 1):
        calls.append(
            (query, torch.randn_like(key_cache), torch.randn_like(value_cache), meta, 0.125)
        )
    if args.layers:
        what += f", {args.layers} layers per step (ms per step)"
    if args.against_library:
        torch.set_num_threads(args.threads[-1])
        print(f"{what}, {args.threads[-1]} thread(s), {args.repeats} rounds")
        against_library(args.against_library, calls, args.layers, args.repeats)
        return
    print(f"{what}, best of {args.repeats}")
    print("| path | " + " | ".join(f"{t} thread(s)" for t in args.threads) + " |")
    paths: list[tuple[str, Callable, str | None]] = [("torch", ref, None)]
    if args.prefill and dtype == torch.bfloat16 and cpu_features.has_amx_bf16():
        paths.append(("native AMX tiles", ours, None))
    if dtype == torch.bfloat16 and cpu_features.has_avx512_bf16():
        paths.append(("native AVX512_BF16", ours, "avx512bf16"))
        paths.append(("native AVX-512", ours, "avx512"))
    elif cpu_features.isa() == "avx512":
        paths.append(("native AVX-512", ours, None))
    paths.append(("native AVX2", ours, "avx2"))
    for name, fn, forced in paths:
        if forced:
            os.environ[cpu_features.ISA_ENV] = forced
        cells = []
        for threads in args.threads:
            torch.set_num_threads(threads)
            ms = (
                step_ms(fn, calls, args.repeats)
                if args.layers
                else best_ms(fn, calls[0], args.repeats)
            )
            cells.append(f"{ms:.2f} ms")
        print(f"| {name} | " + " | ".join(cells) + " |")
        os.environ.pop(cpu_features.ISA_ENV, None)


if __name__ == "__main__":
    main()
