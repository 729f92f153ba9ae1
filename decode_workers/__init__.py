"""Decode workers: receive KV from prefill workers and run batched decode steps.

The worker loop itself (decode_workers/worker.py) serves every role, the colocated one too.
`main(argv)` is `duet decode-worker --engine tcp://HOST:PORT` (a worker joining a core).
"""

from decode_workers.cli import main

__all__ = ["main"]
