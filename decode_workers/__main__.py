"""`python -m decode_workers --engine tcp://HOST:PORT`, the same as `duet decode-worker`."""

from decode_workers.cli import main

main()
