#!/usr/bin/env python3
"""Benchmark a running OpenAI-compatible server (duet, vLLM, ...); same as `duet bench serve`.

    .venv/bin/python scripts/bench_serve.py --dataset-name random --input-len 256 \
        --output-len 128 --num-prompts 64 --max-concurrency 16 --ignore-eos
"""

import sys
from pathlib import Path

# run from a checkout without installing: make the repository root importable
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from frontend.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
