"""`python -m prefill_workers --engine tcp://HOST:PORT`, the same as `duet prefill-worker`."""

from prefill_workers.cli import main

main()
