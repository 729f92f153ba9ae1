"""`duet decode-worker --engine tcp://HOST:PORT`: join a running core as a decode worker."""

from __future__ import annotations

from decode_workers.remote import main as join


def main(argv: list[str] | None = None) -> None:
    """Entry point: see `duet decode-worker --help`."""
    join("decode", argv)
