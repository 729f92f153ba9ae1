"""[type byte, msgpack payload] framing shared by every duet socket."""

from __future__ import annotations

import logging
from typing import Any

import msgspec

logger = logging.getLogger(__name__)

_encoder = msgspec.msgpack.Encoder()


def encode(kind: int, message: msgspec.Struct | None = None) -> list[bytes]:
    """Frames for one message: the type byte, then the payload (if any)."""
    head = bytes((kind,))
    return [head] if message is None else [head, _encoder.encode(message)]


class Decoder:
    """Decodes frames into the Struct registered for their type byte; never raises."""

    def __init__(self, types: dict[int, type | None]) -> None:
        self._decoders = {k: msgspec.msgpack.Decoder(t) if t else None for k, t in types.items()}

    def decode(self, frames: list[bytes]) -> tuple[int, Any] | None:
        """(type, message) or None for anything malformed (logged, then dropped)."""
        if not frames or len(frames[0]) != 1 or frames[0][0] not in self._decoders:
            logger.warning("dropped a message with an unknown type frame (%d frames)", len(frames))
            return None
        kind = frames[0][0]
        decoder = self._decoders[kind]
        if decoder is None:
            return kind, None
        if len(frames) != 2:
            logger.warning("dropped a type-%d message with %d frames", kind, len(frames))
            return None
        try:
            return kind, decoder.decode(frames[1])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("dropped an undecodable type-%d message: %s", kind, exc)
            return None
