"""Start a real `duet serve` as a subprocess on a free port, for the end-to-end tests.

Not a test module itself: test files import `running_server` and wrap it in their own
fixtures with the flags they need.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

STARTUP_TIMEOUT = 600.0  # loading and compiling the model on a busy 2-core machine
STOP_TIMEOUT = 90.0


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    """True when the server at `url` answers /health with 200."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def kill_group(pgid: int) -> None:
    """SIGKILL every process left in a server's process group (a test that failed)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@contextmanager
def running_server(args: list[str], log: Path) -> Iterator[str]:
    """`duet serve --host 127.0.0.1 --port P *args` until the block ends; yields its URL.

    Output goes to `log`. Fails the test if the server never becomes healthy or does not
    stop within STOP_TIMEOUT of SIGTERM.
    """
    with server_process(args, log) as (_, url):
        yield url


@contextmanager
def server_process(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen, str]]:
    """Like `running_server`, yielding (the launcher's Popen, URL); `env` adds variables.

    The server leads a process group of its own, so a test can signal all of it at once
    (as Ctrl-C in a terminal does) with `os.killpg(proc.pid, ...)`.
    """
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from frontend.cli import main; main()",
             "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "DUET_API_KEY": "", **(env or {})},
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not healthy(url):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc.pid)
            pytest.fail(f"duet serve did not become healthy:\n{log.read_text()[-4000:]}")
        time.sleep(1)
    try:
        yield proc, url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            pytest.fail(f"duet serve did not stop within {STOP_TIMEOUT:.0f} s of SIGTERM")
