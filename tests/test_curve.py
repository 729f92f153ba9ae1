"""CURVE on real ZeroMQ sockets: `duet keys`, who gets through, and the loopback rule."""

from __future__ import annotations

import logging
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from listeners import non_loopback_address

from engine_core.messages.curve import (
    CurveKeyError,
    CurveKeys,
    authenticate,
    dial,
    generate_keys,
    listen,
    load_keys,
)


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    subprocess.run([sys.executable, "-c", "from frontend.cli import main; main()", "keys", str(tmp_path / "keys")],
                   check=True, cwd=Path(__file__).parent.parent)  # fmt: skip
    return tmp_path / "keys"


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def serve_one(ctx: zmq.Context, keys: CurveKeys | None) -> tuple[zmq.Socket, str]:
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    return server, listen(server, "tcp://127.0.0.1:0", keys)


def answered(ctx: zmq.Context, server: zmq.Socket, endpoint: str, keys: CurveKeys | None) -> bool:
    """Does a DEALER using `keys` get a message through to `server` and an answer back?"""
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    dial(client, endpoint, keys)
    client.send(b"ping")
    if not server.poll(1500):
        client.close()
        return False
    identity, body = server.recv_multipart()
    server.send_multipart([identity, b"pong:" + body])
    reply = client.recv() if client.poll(1500) else None
    client.close()
    return reply == b"pong:ping"


def test_duet_keys_writes_private_secrets_and_refuses_to_overwrite(key_dir: Path) -> None:
    names = sorted(p.name for p in key_dir.iterdir())
    assert names == ["client.key", "client.key_secret", "server.key", "server.key_secret"]
    for path in key_dir.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if path.name.endswith("_secret") else 0o644), path
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    public_text = (key_dir / "server.key").read_text()
    assert "secret-key" not in public_text
    with pytest.raises(FileExistsError):
        generate_keys(key_dir)


def test_client_with_keys_is_served(ctx: zmq.Context, key_dir: Path) -> None:
    keys = load_keys(key_dir)
    authenticator = authenticate(ctx, keys)
    try:
        server, endpoint = serve_one(ctx, keys)
        assert answered(ctx, server, endpoint, keys)
    finally:
        assert authenticator is not None
        authenticator.stop()


def test_clients_without_the_client_key_get_nothing(
    ctx: zmq.Context, key_dir: Path, tmp_path: Path
) -> None:
    keys = load_keys(key_dir)
    assert keys is not None
    generate_keys(tmp_path / "other")
    other = load_keys(tmp_path / "other")
    assert other is not None
    # a stranger who knows the server's public key but holds its own client pair
    stranger = CurveKeys(key_dir, keys.server_public, other.client_public, other.client_secret)
    authenticator = authenticate(ctx, keys)
    try:
        server, endpoint = serve_one(ctx, keys)
        assert not answered(ctx, server, endpoint, None)  # plain ZeroMQ
        assert not answered(ctx, server, endpoint, stranger)
        assert not answered(ctx, server, endpoint, other)  # pins the wrong server key
        assert answered(ctx, server, endpoint, keys)
    finally:
        assert authenticator is not None
        authenticator.stop()


def test_a_server_without_an_authenticator_refuses_to_bind(ctx: zmq.Context, key_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="authenticate"):
        serve_one(ctx, load_keys(key_dir))


def test_frontend_hosts_need_no_server_secret(key_dir: Path, ctx: zmq.Context) -> None:
    (key_dir / "server.key_secret").unlink()
    keys = load_keys(key_dir)
    assert keys is not None and keys.server_secret is None
    authenticate(ctx, keys).stop()  # type: ignore[union-attr]
    with pytest.raises(CurveKeyError, match=r"server\.key_secret"):
        serve_one(ctx, keys)
    (key_dir / "client.key_secret").unlink()
    with pytest.raises(CurveKeyError, match=r"client\.key_secret"):
        load_keys(key_dir)


def test_without_keys_a_wildcard_bind_is_narrowed_to_loopback(
    ctx: zmq.Context, caplog: pytest.LogCaptureFixture
) -> None:
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    with caplog.at_level(logging.WARNING, logger="engine_core.messages.curve"):
        endpoint = listen(server, "tcp://0.0.0.0:0", None)
    assert endpoint.startswith("tcp://127.0.0.1:")
    assert any("loopback only" in r.getMessage() for r in caplog.records)
    assert answered(ctx, server, endpoint, None)
    outward = non_loopback_address()
    if outward is not None:
        port = endpoint.rsplit(":", 1)[1]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((outward, int(port)), timeout=2).close()
