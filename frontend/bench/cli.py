"""`duet bench serve` / scripts/bench_serve.py: dataset -> load -> report."""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp
import numpy as np

from frontend.bench.args import DESCRIPTION, add_arguments
from frontend.bench.client import RequestSettings, response_format
from frontend.bench.datasets import (
    SampleRequest,
    jsonl_requests,
    mixed_requests,
    prefix_repetition_requests,
    random_requests,
    repeat_requests,
)
from frontend.bench.report import format_report, save_result
from frontend.bench.runner import LoadShape, run_load
from frontend.bench.stats import compute_metrics, parse_goodput
from frontend.bench.tokens import TokenSampler, load_prompt_tokenizer


def build_requests(
    args: argparse.Namespace, num: int, rng: np.random.Generator
) -> list[SampleRequest]:
    """`num` requests of the dataset `args` describe."""
    if args.dataset_name == "jsonl":
        if args.dataset_path is None:
            raise ValueError("--dataset-name jsonl needs --dataset-path")
        return jsonl_requests(args.dataset_path, num, args.output_len)
    sampler = TokenSampler(load_prompt_tokenizer(args.tokenizer), rng)
    n, out = num, args.output_len
    if args.dataset_name == "prefix-repetition":
        return prefix_repetition_requests(
            sampler, n, args.prefix_len, args.suffix_len, args.num_prefixes, out
        )
    if args.dataset_name == "mixed":
        return mixed_requests(
            sampler, n, args.mixed_short_len, args.mixed_long_len, args.mixed_long_fraction, out
        )
    if args.dataset_name == "repeat":
        return repeat_requests(sampler, n, out)
    return random_requests(sampler, n, args.input_len, out)


def pick_lora_modules(
    requests: list[SampleRequest], names: list[str], rng: np.random.Generator
) -> list[SampleRequest]:
    """Give each request one of the adapter names, uniformly at random (seeded)."""
    picks = rng.integers(len(names), size=len(requests))
    return [replace(req, model=names[i]) for req, i in zip(requests, picks, strict=True)]


async def first_served_model(base_url: str) -> str:
    """The id of the first model GET /v1/models lists."""
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/v1/models") as resp:
        resp.raise_for_status()
        models = (await resp.json()).get("data") or []
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return models[0]["id"]


async def _bench(args: argparse.Namespace) -> int:
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    slo_ms = parse_goodput(args.goodput)
    # separate streams: the prompts stay the same whatever the arrival settings
    requests = build_requests(
        args, args.num_prompts + args.num_warmups, np.random.default_rng([args.seed, 0])
    )
    # warm-ups get prompts of their own, so they warm no measured prompt's prefix cache
    if args.lora_modules:
        requests = pick_lora_modules(
            requests, args.lora_modules, np.random.default_rng([args.seed, 2])
        )
    warmups, requests = requests[: args.num_warmups], requests[args.num_warmups :]
    if not requests:
        raise ValueError("the dataset has no requests")
    model = args.model or await first_served_model(base_url)
    settings = RequestSettings(
        url=base_url + args.endpoint,
        model=model,
        chat=args.endpoint.rstrip("/").endswith("chat/completions"),
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        response_format=response_format(args.structured_output),
    )
    shape = LoadShape(args.request_rate, args.burstiness, args.max_concurrency)
    outcome = await run_load(
        requests,
        settings,
        shape,
        np.random.default_rng([args.seed, 1]),
        warmups=warmups,
        progress=not args.disable_tqdm,
    )
    metrics = compute_metrics(outcome.results, outcome.duration_s, slo_ms)
    print(format_report(metrics, outcome.results))
    if args.save_result:
        config = {k: _jsonable(v) for k, v in vars(args).items() if not callable(v)}
        save_result(args.save_result, metrics, outcome.results, {**config, "model": model})
    if args.plot:
        from frontend.bench.plot import plot_results

        plot_results(outcome.results, args.plot, title=f"{model} · {args.dataset_name}")
    return 0 if metrics.completed else 1


def _jsonable(value: object) -> object:
    # paths, and inf (plain JSON has no infinity), as strings
    if isinstance(value, Path) or (isinstance(value, float) and math.isinf(value)):
        return str(value)
    return value


def run(args: argparse.Namespace) -> int:
    """Run the benchmark `args` describe. Exit code: 1 when every request failed, 2 when
    the run could not start (bad arguments, no server)."""
    try:
        return asyncio.run(_bench(args))
    except (ValueError, OSError, aiohttp.ClientError) as e:
        print(f"bench serve: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of scripts/bench_serve.py."""
    parser = argparse.ArgumentParser(prog="bench_serve", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
