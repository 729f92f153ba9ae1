"""Prefill workers: run prompt chunks, sample the first token, ship the KV to a decode worker.

`main(argv)` is `duet prefill-worker --engine tcp://HOST:PORT` (a worker joining a core).
"""

from prefill_workers.cli import main

__all__ = ["main"]
