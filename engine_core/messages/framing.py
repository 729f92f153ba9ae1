"""[type byte, msgpack payload] framing, and the typed channel every duet socket is.

A boundary module (engine_core/messages/{frontend,worker,kv}.py) declares, once, one
`MessageTable` per direction and the `Endpoint` of each side; both sides build their
`Channel` from those, so a producer and its consumer cannot disagree on a type.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from engine_core.messages.curve import CurveKeys, dial, listen, listen_on_random_port

logger = logging.getLogger(__name__)

_encoder = msgspec.msgpack.Encoder()

Frame = bytes | memoryview | zmq.Frame


def encode(kind: int, message: msgspec.Struct | None = None) -> list[bytes]:
    """Frames for one message: the type byte, then the payload (if any). Unchecked: use
    `MessageTable.encode` (or a Channel) unless forging a message on purpose."""
    head = bytes((kind,))
    return [head] if message is None else [head, _encoder.encode(message)]


def _buffer(frame: Frame) -> bytes | memoryview:
    return frame.buffer if isinstance(frame, zmq.Frame) else frame


class MessageTable:
    """One direction of one boundary: type byte -> payload Struct (None: no payload).

    `with_data` names the types followed by raw data frames (KV blocks) after the payload.
    """

    def __init__(
        self, name: str, types: Mapping[int, type | None], with_data: Iterable[int] = ()
    ) -> None:
        self.name = name
        self.types = dict(types)
        self.with_data = frozenset(with_data)
        self._decoders = {k: msgspec.msgpack.Decoder(t) if t else None for k, t in types.items()}

    def encode(self, kind: int, message: msgspec.Struct | None = None) -> list[bytes]:
        """Frames for `message`; a TypeError if it is not what this table says `kind` carries."""
        expected = self.types.get(kind, Ellipsis)
        if expected is Ellipsis or (message is None) != (expected is None):
            raise TypeError(f"{self.name}: type {kind} does not carry {type(message).__name__}")
        if message is not None and not isinstance(message, expected):
            raise TypeError(f"{self.name}: type {kind} carries {expected.__name__}, not "
                            f"{type(message).__name__}")  # fmt: skip
        return encode(kind, message)

    def kind_of(self, frames: Sequence[Frame]) -> int | None:
        """The type byte of `frames` if it is one of this table's, else None."""
        if not frames:
            return None
        head = _buffer(frames[0])
        return head[0] if len(head) == 1 and head[0] in self._decoders else None

    def decode(self, frames: Sequence[Frame]) -> tuple[int, Any] | None:
        """(type, message) or None for anything malformed (logged, then dropped)."""
        kind = self.kind_of(frames)
        if kind is None:
            logger.warning("%s: dropped a message with an unknown type frame", self.name)
            return None
        decoder = self._decoders[kind]
        if decoder is None:
            return kind, None
        if len(frames) != 2 and not (kind in self.with_data and len(frames) > 2):
            logger.warning("%s: dropped a type-%d message with %d frames", self.name, kind,
                           len(frames))  # fmt: skip
            return None
        try:
            return kind, decoder.decode(_buffer(frames[1]))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            logger.warning("%s: dropped an undecodable type-%d message: %s", self.name, kind, exc)
            return None


@dataclass(frozen=True)
class Endpoint:
    """One side of a boundary: its socket type, what it sends and receives, its options."""

    socket_type: int
    sends: MessageTable
    receives: MessageTable
    options: Mapping[int, int] = field(default_factory=dict)


def apply_socket_options(
    sock: zmq.Socket, *, server: bool, options: Mapping[int, int | bytes]
) -> None:
    """The one place a duet socket gets its options, just before it binds (`server`) or
    connects. Nothing lingers at close unless a caller asks: a dead peer must not hang exit."""
    sock.setsockopt(zmq.LINGER, 0)
    for option, value in options.items():
        sock.setsockopt(option, value)


class Channel:
    """A socket speaking one `Endpoint`: owns its options and its encode/decode.

    Works over a plain or an asyncio context; with asyncio, receive with
    `decode(await channel.sock.recv_multipart())`. With `keys`, a tcp channel is a CURVE
    server (bind) or client (connect); without, a tcp bind stays on loopback (curve.py).
    """

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: Endpoint,
        identity: bytes | None = None,
        keys: CurveKeys | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.keys = keys
        self.sock = ctx.socket(endpoint.socket_type)
        self._options: dict[int, int | bytes] = dict(endpoint.options)
        if identity is not None:
            self._options[zmq.IDENTITY] = identity
        self.routed = endpoint.socket_type == zmq.ROUTER  # frames start with a peer identity

    def bind(self, address: str) -> str:
        """Bind to `address`; returns where it is bound (loopback for keyless tcp)."""
        apply_socket_options(self.sock, server=True, options=self._options)
        return listen(self.sock, address, self.keys)

    def bind_to_random_port(self, host: str) -> str:
        """Bind `tcp://host` on a free port; returns the full address."""
        apply_socket_options(self.sock, server=True, options=self._options)
        return listen_on_random_port(self.sock, host, self.keys)

    def connect(self, address: str) -> None:
        apply_socket_options(self.sock, server=False, options=self._options)
        dial(self.sock, address, self.keys)

    def frames(
        self, kind: int, message: msgspec.Struct | None = None, to: bytes | None = None
    ) -> list[bytes]:
        """The checked frames for one message (with the peer's identity on a ROUTER)."""
        frames = self.endpoint.sends.encode(kind, message)
        return frames if to is None else [to, *frames]

    def send(
        self,
        kind: int,
        message: msgspec.Struct | None = None,
        *,
        to: bytes | None = None,
        flags: int = 0,
        data: Sequence[object] = (),
    ) -> None:
        """Send one message (to peer `to` on a ROUTER), then any raw `data` frames."""
        frames: list[object] = [*self.frames(kind, message, to), *data]
        self.sock.send_multipart(frames, flags, copy=not data)

    def decode(self, frames: Sequence[Frame]) -> tuple[int, Any] | None:
        """(type, message) of frames received without a peer identity; None if malformed."""
        return self.endpoint.receives.decode(frames)

    def recv(self, flags: int = 0) -> tuple[bytes, int, Any] | None:
        """(peer identity or b"", type, message); None if malformed. Raises zmq.Again."""
        frames = self.sock.recv_multipart(flags)
        identity = frames.pop(0) if self.routed else b""
        decoded = self.decode(frames)
        return None if decoded is None else (identity, *decoded)

    def poll(self, timeout_ms: int | None = None) -> bool:
        return bool(self.sock.poll(timeout_ms))

    def close(self, linger: int | None = None) -> None:
        self.sock.close(linger)
