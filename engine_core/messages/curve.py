"""ZeroMQ CURVE on duet's tcp sockets, and the loopback rule for a process without keys.

`duet keys DIR` writes two key pairs: "server" for every socket that binds (the core's
frontend and worker sockets, a decode worker's KV receiver) and "client" for every socket
that connects. A bound tcp socket only completes a handshake with a peer holding the client
secret (checked by a ZAP authenticator on its context, which logs every refusal); a
connecting socket pins the server's public key, so it never talks to an impostor. ipc://
and inproc:// sockets are file- or process-local and stay as they are.

Without keys a tcp socket that asks for a non-loopback address is bound to 127.0.0.1 on the
same port instead, with one warning: an unauthenticated core never listens beyond its host.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import stat
import weakref
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger(__name__)

SERVER, CLIENT = "server", "client"
_authenticated: weakref.WeakSet[zmq.Context] = weakref.WeakSet()


class CurveKeyError(ValueError):
    """A key directory that is missing, incomplete or unreadable."""


@dataclass(frozen=True)
class CurveKeys:
    """One host's view of a key directory (z85-encoded keys, as zmq wants them)."""

    directory: Path
    server_public: bytes
    client_public: bytes
    client_secret: bytes
    server_secret: bytes | None = None  # absent on hosts that only connect (frontends)


def add_curve_keys_argument(parser: argparse.ArgumentParser) -> None:
    """--curve-keys DIR, the same on every role's command line."""
    parser.add_argument("--curve-keys", default=os.environ.get("DUET_CURVE_KEYS") or None,
        metavar="DIR", help="a `duet keys` directory: encrypt and authenticate every tcp link "
        "with ZeroMQ CURVE; without it, tcp sockets bind to loopback only "
        "(default: $DUET_CURVE_KEYS)")  # fmt: skip


def generate_keys(directory: str | os.PathLike[str]) -> list[Path]:
    """Write a fresh server and client key pair into `directory`; secrets get mode 0600."""
    folder = Path(directory)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    written = []
    for name in (SERVER, CLIENT):
        public, secret = zmq.curve_keypair()
        written.append(_write(folder / f"{name}.key", _certificate(public)))
        written.append(_write(folder / f"{name}.key_secret", _certificate(public, secret)))
    return written


def load_keys(directory: str | os.PathLike[str] | None) -> CurveKeys | None:
    """The keys in `directory` (None: no keys); raises CurveKeyError when they are unusable."""
    if directory is None:
        return None
    folder = Path(directory)
    server_public, server_secret = _read(folder, SERVER)
    client_public, client_secret = _read(folder, CLIENT)
    if client_secret is None:
        raise CurveKeyError(f"{folder / 'client.key_secret'} is missing (run `duet keys`)")
    return CurveKeys(folder, server_public, client_public, client_secret, server_secret)


def authenticate(ctx: zmq.Context, keys: CurveKeys | None) -> ThreadAuthenticator | None:
    """Start the ZAP handler that admits only the client key to `ctx`'s CURVE servers.

    Call before `listen`; stop the returned authenticator before terminating `ctx`.
    """
    if keys is None:
        return None
    authenticator = ThreadAuthenticator(ctx, log=logging.getLogger(f"{__name__}.zap"))
    authenticator.start()
    authenticator.configure_curve_callback("*", _OneClient(keys.client_public))
    _authenticated.add(ctx)
    return authenticator


def listen(sock: zmq.Socket, address: str, keys: CurveKeys | None) -> str:
    """Bind `sock` to `address` under the rules above; returns the endpoint it is bound to."""
    if _is_tcp(address):
        address = _secure_server(sock, address, keys)
    sock.bind(address)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def listen_on_random_port(sock: zmq.Socket, host: str, keys: CurveKeys | None) -> str:
    """Bind `sock` to a free tcp port on `host`; returns the endpoint, e.g. tcp://10.0.0.2:4711."""
    return listen(sock, f"tcp://{_bracketed(host)}:0", keys)


def dial(sock: zmq.Socket, address: str, keys: CurveKeys | None) -> None:
    """Connect `sock` to `address`, as a CURVE client of the server key on tcp."""
    if _is_tcp(address):
        if keys is not None:
            sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.client_public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, keys.client_secret)
        elif not is_loopback(address):
            logger.warning("connecting to %s without --curve-keys: it will only answer a core "
                           "that runs without keys, which listens on loopback only", address)  # fmt: skip
    sock.connect(address)


def listening_host(host: str, keys: CurveKeys | None) -> str:
    """Where a listener asked for `host` may listen: loopback unless there are keys."""
    return host if keys is not None or is_loopback(f"tcp://{_bracketed(host)}") else "127.0.0.1"


def narrowed(address: str, secured: bool) -> str:
    """Where `listen` binds `address`: itself, or loopback on its port for keyless tcp."""
    if not _is_tcp(address) or secured or is_loopback(address):
        return address
    return f"tcp://127.0.0.1:{address.rsplit(':', 1)[1]}"


def is_loopback(address: str) -> bool:
    """True for a tcp address on 127.0.0.0/8, ::1 or localhost."""
    host = urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, an interface name or "*"


def _secure_server(sock: zmq.Socket, address: str, keys: CurveKeys | None) -> str:
    if keys is None:
        bound = narrowed(address, secured=False)
        if bound != address:
            logger.warning("no --curve-keys: binding %s to %s instead (loopback only); run "
                           "`duet keys DIR` and pass --curve-keys DIR to every role to accept "
                           "other hosts", address, bound)  # fmt: skip
        return bound
    if keys.server_secret is None:
        raise CurveKeyError(f"{keys.directory / 'server.key_secret'} is missing: "
                            f"this host cannot accept connections on {address}")  # fmt: skip
    if sock.context not in _authenticated:
        raise RuntimeError("curve.authenticate(ctx, keys) must run before a CURVE server binds")
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.server_secret)
    return address


class _OneClient:
    """ZAP credentials provider: admits exactly one public key."""

    def __init__(self, public: bytes) -> None:
        self.public = public

    def callback(self, domain: str, key: bytes) -> bool:
        if key != self.public:
            logger.warning("refused a CURVE client with an unknown key (%s)", key.decode()[:8])
            return False
        return True


def _is_tcp(address: str) -> bool:
    return address.startswith("tcp://")


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _certificate(public: bytes, secret: bytes | None = None) -> str:
    """ZeroMQ's certificate format (ZPL), which zmq.auth.load_certificate reads."""
    lines = ["#   ZeroMQ CURVE certificate written by `duet keys`", "metadata", "curve",
             f'    public-key = "{public.decode()}"']  # fmt: skip
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> Path:
    # NOTE: O_EXCL so existing keys are never overwritten; 0600 from creation, not after a chmod
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    if not path.name.endswith("_secret"):
        path.chmod(0o644)
    return path


def _read(folder: Path, name: str) -> tuple[bytes, bytes | None]:
    """(public, secret or None) of key pair `name`, from its secret file when there is one."""
    secret_file, public_file = folder / f"{name}.key_secret", folder / f"{name}.key"
    path = secret_file if secret_file.exists() else public_file
    if not path.exists():
        raise CurveKeyError(f"{public_file} is missing (run `duet keys {folder}`)")
    if path is secret_file and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s is readable by other users: chmod 600 it", path)
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read {path}: {exc}") from exc
    return public, secret
