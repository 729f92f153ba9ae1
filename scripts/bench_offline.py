#!/usr/bin/env python
"""Offline throughput: duet's LLM.generate against Hugging Face generate, same process.

64 prompts of 50-500 random tokens, 128 new tokens each, greedy, EOS ignored, fp32.
HF runs one prompt at a time (on a subset: it is slow) and in left-padded batches of 16.
Prints a Markdown table of output tokens/s and the machine's measured fp32 matmul rate.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM

from engine_core import LLM, SamplingParams
from models.export import export_hf_folder
from models.loader import resolve_model


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    """Best-of-N fp32 GEMM rate on this machine, in GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_prompts(count: int, low: int, high: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=gen).tolist()
    # ids from the middle of the vocabulary: ordinary tokens, no special ones
    return [torch.randint(1000, 40000, (n,), generator=gen).tolist() for n in lengths]


def bench_duet(prompts: list[list[int]], max_tokens: int) -> float:
    llm = LLM(kv_cache_memory="3GiB", max_model_len=2048)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)
    return len(prompts) * max_tokens / elapsed


def bench_hf(
    model: torch.nn.Module, prompts: list[list[int]], max_tokens: int, batch: int
) -> float:
    """HF greedy generate over left-padded batches; returns output tokens/s."""
    produced, elapsed = 0, 0.0
    for i in tqdm(range(0, len(prompts), batch), desc=f"HF batch {batch}"):
        chunk = prompts[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            pad_token_id=0,
        )
        elapsed += time.perf_counter() - start
        produced += (out.shape[1] - width) * len(chunk)
    return produced / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--hf-single-prompts",
        type=int,
        default=8,
        help="prompts HF runs one at a time (a subset: ~15 tok/s)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    prompts = make_prompts(args.num_prompts, 50, 500, args.seed)
    gflops = matmul_gflops()
    rows = [
        (
            "duet LLM.generate (all prompts, continuous batching)",
            bench_duet(prompts, args.max_tokens),
        )
    ]
    if not args.skip_hf:
        with tempfile.TemporaryDirectory() as tmp:
            folder = export_hf_folder(resolve_model(None), Path(tmp))
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            rows.append(
                (
                    f"HF generate, one at a time ({args.hf_single_prompts} prompts)",
                    bench_hf(hf, prompts[: args.hf_single_prompts], args.max_tokens, 1),
                )
            )
            rows.append(
                ("HF generate, padded batches of 16", bench_hf(hf, prompts, args.max_tokens, 16))
            )
    duet = rows[0][1]
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"fp32 matmul {gflops:.0f} GFLOP/s, torch {torch.__version__}"
    )
    print(
        f"workload: {args.num_prompts} prompts of 50-500 tokens, {args.max_tokens} new tokens, greedy, fp32\n"
    )
    print("| engine | output tok/s | duet / this |\n|---|---:|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} | {duet / rate:.2f}x |")


if __name__ == "__main__":
    main()
