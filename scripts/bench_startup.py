#!/usr/bin/env python
"""Start-up time of `duet serve`: cold (empty cache folder) and warm (the same folder again).

Each run starts a server in its own process group with DUET_CACHE_DIR set to one fresh
folder per tree, times it to a healthy `/health` and to the first token of a one-token
completion, then stops it. The first run of a tree fills its cache (cold); the later ones
find it on disk (warm). The Python bytecode and the OS page cache are warm in every run
(this is a restart, not a new node). With several `--tree`s (checkouts of duet, e.g. a
`git worktree` of an older commit) the runs interleave, so they compare under one load.

    .venv/bin/python scripts/bench_startup.py --runs 3 --tree . --tree /tmp/old -- --dtype auto
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVE = [sys.executable, "-c", "from frontend.cli import main; main()", "serve"]


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during start-up")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
    raise RuntimeError(f"not healthy after {timeout:.0f} s")


def first_token(port: int) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as response:
        model = json.load(response)["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 1}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        body,
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        json.load(response)


def one_run(
    tree: Path, port: int, cache: Path, serve_args: list[str], log: Path
) -> tuple[float, float]:
    """Seconds from launch to healthy and to the first completion, serving from `tree`."""
    env = {**os.environ, "DUET_CACHE_DIR": str(cache)}
    cmd = [*SERVE, "--port", str(port), *serve_args]
    with log.open("w") as out:
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            wait_healthy(port, proc, timeout=600)
            healthy = time.monotonic() - start
            first_token(port)
            return healthy, time.monotonic() - start
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="1 cold run, then warm ones")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--tree", type=Path, action="append", help="a duet checkout (repeat)")
    parser.add_argument("serve_args", nargs="*", help="after --: flags for `duet serve`")
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.tree or [Path(__file__).resolve().parent.parent]]
    with tempfile.TemporaryDirectory(prefix="duet-startup-") as tmp:
        print(f"{'tree':<40} {'run':>5} {'healthy s':>10} {'first token s':>14}", flush=True)
        for i in range(args.runs):
            for t, tree in enumerate(trees):
                log = Path(tmp) / f"{t}-{i}.log"
                healthy, token = one_run(
                    tree, args.port, Path(tmp) / f"cache-{t}", args.serve_args, log
                )
                kind = "cold" if i == 0 else "warm"
                print(f"{tree!s:<40} {kind:>5} {healthy:>10.1f} {token:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
