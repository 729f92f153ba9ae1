#!/usr/bin/env python
"""Quality of each serving configuration against fp32, through the real engine (offline LLM).

Two measures per configuration (a `--config name:key=value,...` of LLM / `duet serve`
engine arguments; the first one is the reference):
- perplexity of a fixed public-domain text (scripts/data/, the first three chapters of
  Pride and Prejudice, ~3k tokens), scored with prompt_logprobs in windows of `--window`
  tokens (each window's first token is unscored, as nothing predicts it);
- greedy agreement with the reference on a small chat prompt set: how many outputs are
  identical, and the mean share of each output before the first differing token.

Add a configuration with e.g. `--config int8:dtype=bfloat16,quantization=int8`.
Prints a Markdown table (and writes JSON with `--json`).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from engine_core import LLM, SamplingParams

TEXT = Path(__file__).parent / "data" / "pride_and_prejudice_ch1-3.txt"
DEFAULT_CONFIGS = ["fp32:dtype=float32", "bf16:dtype=bfloat16"]
CHAT_PROMPTS = [
    "What is the capital of Japan?",
    "Write a haiku about the sea.",
    "Explain what a prime number is to a ten-year-old.",
    "List three uses of copper.",
    "Translate to French: The cat sleeps on the warm windowsill.",
    "Why is the sky blue? Answer in two sentences.",
    "Give me a recipe for a simple bread.",
    "What are the rules of chess for the knight?",
    "Summarize the plot of Romeo and Juliet.",
    "Write a Python function that reverses a string.",
    "How do volcanoes form?",
    "Suggest a name for a pet owl and explain why.",
]


@dataclass
class Quality:
    name: str
    engine_args: dict[str, object]
    perplexity: float
    scored_tokens: int
    identical: int | None = None  # greedy outputs equal to the reference's
    agreement: float | None = None  # mean share of each output before the first difference


def parse_config(spec: str) -> tuple[str, dict[str, object]]:
    """'int8:dtype=bfloat16,quantization=int8' -> ('int8', {...}); values as JSON if they parse."""
    name, _, rest = spec.partition(":")
    args: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            args[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            args[key.replace("-", "_")] = value
    return name, args


def perplexity(llm: LLM, token_ids: list[int], window: int) -> tuple[float, int]:
    """exp(mean negative logprob) over every window's tokens but its first; (ppl, count)."""
    windows = [token_ids[i : i + window] for i in range(0, len(token_ids), window)]
    windows = [w for w in windows if len(w) > 1]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    total, count = 0.0, 0
    for out in llm.generate(windows, params, use_tqdm=True):
        entries = out.prompt_logprobs or []
        total += sum(-e.logprobs[0] for e in entries if e is not None)
        count += sum(1 for e in entries if e is not None)
    return math.exp(total / count), count


def greedy_outputs(llm: LLM, max_tokens: int) -> list[list[int]]:
    chats = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return [o.outputs[0].token_ids for o in llm.chat(chats, params, use_tqdm=True)]


def agreement(ours: list[list[int]], ref: list[list[int]]) -> tuple[int, float]:
    """(identical outputs, mean share of each reference output before the first difference)."""
    identical, shares = 0, []
    for mine, theirs in zip(ours, ref, strict=True):
        identical += mine == theirs
        same = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), None)
        if same is None:
            same = min(len(mine), len(theirs))
        shares.append(same / max(len(theirs), 1))
    return identical, sum(shares) / len(shares)


def evaluate(specs: list[str], window: int, max_tokens: int, kv: str) -> list[Quality]:
    results: list[Quality] = []
    reference: list[list[int]] | None = None
    text = TEXT.read_text()
    for spec in tqdm(specs, desc="configs", position=0):
        name, args = parse_config(spec)
        tqdm.write(f"== {name}: {args}")
        llm = LLM(kv_cache_memory=kv, max_model_len=max(window, 1024) + 8, **args)
        ppl, count = perplexity(llm, llm.tokenizer.encode(text), window)
        quality = Quality(name, args, ppl, count)
        outputs = greedy_outputs(llm, max_tokens)
        if reference is None:
            reference = outputs
        else:
            quality.identical, quality.agreement = agreement(outputs, reference)
        tqdm.write(f"   perplexity {ppl:.4f} over {count} tokens")
        results.append(quality)
        del llm
        gc.collect()
    return results


def table(results: list[Quality], max_tokens: int) -> str:
    ref = results[0]
    lines = [
        f"| config | engine args | perplexity | vs {ref.name} | greedy identical "
        f"(of {len(CHAT_PROMPTS)}, {max_tokens} tokens) | agreement |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for q in results:
        args = ", ".join(f"{k}={v}" for k, v in q.engine_args.items())
        same = "reference" if q.identical is None else str(q.identical)
        share = "" if q.agreement is None else f"{q.agreement:.0%}"
        lines.append(f"| {q.name} | {args} | {q.perplexity:.4f} | "
                     f"{q.perplexity / ref.perplexity:.4f}× | {same} | {share} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", dest="configs",
                        help=f"name:key=value,... (repeatable; default {DEFAULT_CONFIGS})")  # fmt: skip
    parser.add_argument("--window", type=int, default=2048, help="tokens per scored window")
    parser.add_argument("--max-tokens", type=int, default=48, help="greedy tokens per chat")
    parser.add_argument("--kv-cache-memory", default="256MiB")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = evaluate(args.configs or DEFAULT_CONFIGS, args.window, args.max_tokens,
                       args.kv_cache_memory)  # fmt: skip
    print(table(results, args.max_tokens))
    if args.json:
        args.json.write_text(json.dumps([asdict(q) for q in results], indent=2))


if __name__ == "__main__":
    main()
