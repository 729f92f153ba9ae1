"""`bench serve`'s command line, apart from the code that runs it.

Importing this is cheap (argparse only), so the `duet` command can offer `bench serve`
without loading aiohttp and numpy until a benchmark actually runs.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

DATASETS = ("random", "prefix-repetition", "mixed", "repeat", "jsonl")
DESCRIPTION = (
    "Benchmark a running OpenAI-compatible server with streaming requests: throughput, "
    "TTFT/TPOT/ITL/E2EL percentiles, goodput."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `bench serve`'s options (vLLM's names where vLLM has one) to `parser`."""
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", help="e.g. http://127.0.0.1:8000 (overrides --host/--port)")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument(
        "--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions"
    )
    server.add_argument("--model", help="model name to request (default: the server's first)")
    server.add_argument(
        "--lora-modules",
        nargs="+",
        metavar="NAME",
        help="as vLLM's: adapter names the server serves; each request picks one at random",
    )
    server.add_argument(
        "--tokenizer",
        help="for synthetic prompts: a .gguf file or Hugging Face "
        "tokenizer folder (default: duet's embedded model)",
    )
    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=DATASETS, default="random")
    data.add_argument("--dataset-path", type=Path, help="the jsonl file")
    data.add_argument("--num-prompts", type=int, default=100)
    data.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=256)
    data.add_argument(
        "--output-len",
        "--random-output-len",
        dest="output_len",
        type=int,
        default=128,
        help="max_tokens of synthetic requests (and jsonl default)",
    )
    data.add_argument("--prefix-len", type=int, default=256)
    data.add_argument("--suffix-len", type=int, default=256)
    data.add_argument("--num-prefixes", type=int, default=10)
    data.add_argument("--mixed-short-len", type=int, default=100)
    data.add_argument("--mixed-long-len", type=int, default=1500)
    data.add_argument("--mixed-long-fraction", type=float, default=0.1)
    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate", type=float, default=math.inf, help="req/s; inf = all at once"
    )
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    load.add_argument("--max-concurrency", type=int)
    load.add_argument("--num-warmups", type=int, default=0)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--ignore-eos", action="store_true")
    load.add_argument("--temperature", type=float, help="default: the server's")
    load.add_argument("--structured-output", choices=["json_schema"], default=None,
        help="constrain every request: json_schema adds a small JSON schema response_format")  # fmt: skip
    out = parser.add_argument_group("output")
    out.add_argument(
        "--goodput",
        nargs="+",
        default=[],
        metavar="NAME:MS",
        help="SLOs, e.g. ttft:500 tpot:50 e2el:10000",
    )
    out.add_argument("--save-result", type=Path, metavar="FILE.json")
    out.add_argument("--plot", type=Path, metavar="FILE.png")
    out.add_argument("--disable-tqdm", action="store_true")
