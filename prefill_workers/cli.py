"""`duet prefill-worker --engine tcp://HOST:PORT`: join a running core as a prefill worker."""

from __future__ import annotations

from decode_workers.remote import main as join


def main(argv: list[str] | None = None) -> None:
    """Entry point: see `duet prefill-worker --help`."""
    join("prefill", argv)
