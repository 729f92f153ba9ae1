"""The supervised server: kill -9 of the engine core, and SIGTERM of the whole process group.

A real `duet serve` over a tiny random checkpoint; streams are read as raw SSE (to see every
event, `[DONE]` included) and through the official openai client.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
from server_process import healthy, server_process

from engine_core.supervision import Backoff

MODEL = "tiny"
ARGS = ["--served-model-name", MODEL, "--max-model-len", "2048", "--kv-cache-memory", "64MiB"]
RECOVERY_TIMEOUT = 30.0  # the target: serving again this long after the core died
LIVE_TIMEOUT = 120.0  # for every stream to have its first token on a busy machine


def _body(max_tokens: int, stream: bool) -> dict:
    return {"model": MODEL, "prompt": "hello", "max_tokens": max_tokens, "stream": stream,
            "ignore_eos": True}  # fmt: skip


async def _sse(
    session: aiohttp.ClientSession, url: str, live: asyncio.Event, max_tokens: int
) -> list[str]:
    """Every `data:` payload of one streamed completion; sets `live` at the first token."""
    events: list[str] = []
    async with session.post(f"{url}/v1/completions", json=_body(max_tokens, True)) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(line[6:].decode().strip())
                live.set()
    return events


async def _plain(session: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with session.post(f"{url}/v1/completions", json=_body(2000, False)) as resp:
        return resp.status, await resp.json()


async def _openai_stream(url: str, live: asyncio.Event) -> Exception | None:
    """What iterating one openai-client stream raised (None if it ended normally)."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    stream = await client.completions.create(
        model=MODEL, prompt="hello", max_tokens=2000, stream=True, extra_body={"ignore_eos": True}
    )
    try:
        async for _ in stream:
            live.set()
    except Exception as exc:
        return exc
    finally:
        await client.close()
    return None


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _descendants(pid: int) -> list[int]:
    return [d for c in _children(pid) for d in [c, *_descendants(c)]]


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _core_pid(launcher: int) -> int:
    """The launcher's child whose own child is the worker (workers name themselves)."""
    return next(c for c in _children(launcher) if any(_comm(g) == "worker-0" for g in _children(c)))


def _frontend_pids(launcher: int, core: int) -> list[int]:
    """The launcher's children that are neither the core nor multiprocessing's tracker."""
    others = [c for c in _children(launcher) if c != core]
    return [c for c in others if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]


def _exists(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _group(pgid: int) -> list[str]:
    """'pid name' of every live process in process group `pgid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, fields = text[text.index("(") + 1 : text.rindex(")")], text.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(f"{stat.parent.name} {name}")
    return found


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _duet_dirs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("duet-"))


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    tmp: Path  # its TMPDIR: where its duet-* directories go
    log: Path


@contextmanager
def serving(checkpoint: Path, folder: Path, *extra: str) -> Iterator[Server]:
    tmp = folder / "tmp"
    tmp.mkdir()
    log = folder / "duet.log"
    args = [str(checkpoint), *ARGS, *extra]
    with server_process(args, log, env={"TMPDIR": str(tmp)}) as (proc, url):
        yield Server(proc, url, tmp, log)


async def _live_streams(
    session: aiohttp.ClientSession, url: str, count: int, max_tokens: int
) -> list[asyncio.Task[list[str]]]:
    """`count` streams started, returned once every one of them has had a token."""
    lives = [asyncio.Event() for _ in range(count)]
    streams = [asyncio.create_task(_sse(session, url, e, max_tokens)) for e in lives]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in lives)), LIVE_TIMEOUT)
    return streams


def test_backoff_grows_with_quick_crashes_and_resets_after_a_stable_run() -> None:
    backoff = Backoff(first=1.0, maximum=5.0, stable_after=60.0)
    assert [backoff.next_delay(uptime=2.0) for _ in range(6)] == [0.0, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert backoff.next_delay(uptime=61.0) == 0.0
    assert backoff.next_delay(uptime=2.0) == 1.0


@pytest.mark.slow
def test_kill_9_of_the_core_fails_streams_cleanly_and_the_server_recovers(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    with serving(tiny_checkpoint(), tmp_path) as server:
        url = server.url
        assert len(_duet_dirs(server.tmp)) == 2  # the ipc dir and the prometheus dir
        core = _core_pid(server.proc.pid)
        doomed = [core, *_descendants(core)]

        async def scenario() -> tuple[list[list[str]], tuple[int, dict], Exception | None, int]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
                plain = asyncio.create_task(_plain(session, url))
                sdk_live = asyncio.Event()
                sdk = asyncio.create_task(_openai_stream(url, sdk_live))
                streams = await _live_streams(session, url, 32, 2000)
                await asyncio.wait_for(sdk_live.wait(), LIVE_TIMEOUT)
                os.kill(core, signal.SIGKILL)
                events = await asyncio.gather(*streams)
                async with session.get(f"{url}/health") as resp:
                    health = resp.status
                return events, await plain, await sdk, health

        events, (status, body), sdk_error, health = asyncio.run(scenario())
        for stream in events:
            assert stream[-1] == "[DONE]"
            error = json.loads(stream[-2])["error"]
            assert error["code"] == "engine_unavailable" and error["type"] == "server_error"
            assert error["message"] == "the engine core went away"  # not the 30 s silence
            assert all("error" not in json.loads(e) for e in stream[:-2])
        assert status == 503 and body["error"]["code"] == "engine_unavailable"
        assert type(sdk_error) is openai.APIError and "went away" in sdk_error.message
        assert health == 503

        _wait_until(lambda: not any(map(_exists, doomed)), 30.0, "the worker outlived its core")
        _wait_until(lambda: healthy(url), RECOVERY_TIMEOUT, "the server did not recover")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
        reply = client.completions.create(model=MODEL, prompt="hello", max_tokens=4)
        assert reply.usage is not None and reply.usage.completion_tokens == 4
    assert server.proc.returncode == 0
    assert _duet_dirs(server.tmp) == []
    assert "engine-core exited with code -9; restarting it" in server.log.read_text()


@pytest.mark.slow
def test_sigterm_of_the_process_group_drains_and_cleans_up(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    with serving(tiny_checkpoint(), tmp_path) as server:

        async def scenario() -> list[list[str]]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
                streams = await _live_streams(session, server.url, 4, 16)
                os.killpg(server.proc.pid, signal.SIGTERM)  # what Ctrl-C in a terminal does
                return await asyncio.gather(*streams)

        events = asyncio.run(scenario())
        server.proc.wait(timeout=90)
    pgid = server.proc.pid
    assert server.proc.returncode == 0
    _wait_until(lambda: not _group(pgid), 10.0, f"left running: {_group(pgid)}")
    assert _duet_dirs(server.tmp) == []
    assert all(stream[-1] == "[DONE]" for stream in events)
    text = server.log.read_text()
    assert "SIGTERM: waiting for the engine core to stop this worker" in text
    assert "restarting" not in text


@pytest.mark.slow
def test_kill_9_of_a_frontend_leaves_the_others_serving_and_it_comes_back(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    with serving(tiny_checkpoint(), tmp_path, "--api-server-count", "2") as server:
        # /health answers once one frontend is up; a frontend killed before it ever served
        # would rightly stop the server
        listening = lambda: server.log.read_text().count(" listening on http") == 2  # noqa: E731
        _wait_until(listening, LIVE_TIMEOUT, "both frontends never listened")
        core = _core_pid(server.proc.pid)
        frontends = _frontend_pids(server.proc.pid, core)
        assert len(frontends) == 2

        async def scenario() -> list[list[str] | BaseException]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
                streams = await _live_streams(session, server.url, 32, 48)
                os.kill(frontends[0], signal.SIGKILL)
                return await asyncio.gather(*streams, return_exceptions=True)

        outcomes = asyncio.run(scenario())
        # a stream on the killed process loses its TCP connection; every other one finishes
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                assert isinstance(outcome, aiohttp.ClientError)
            else:
                assert outcome[-1] == "[DONE]"
                assert all("error" not in json.loads(e) for e in outcome[:-1])
        _wait_until(
            lambda: len(_frontend_pids(server.proc.pid, core)) == 2,
            RECOVERY_TIMEOUT,
            "no new frontend",
        )
        assert frontends[0] not in _frontend_pids(server.proc.pid, core)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        for _ in range(4):  # connections spread over both frontends, the new one included
            reply = client.completions.create(model=MODEL, prompt="hello", max_tokens=4)
            assert reply.usage is not None and reply.usage.completion_tokens == 4
    assert server.proc.returncode == 0
    assert re.search(r"frontend-\d exited with code -9; restarting it", server.log.read_text())


@pytest.mark.slow
def test_sigterm_ends_streams_that_outlast_the_shutdown_timeout_with_an_error_event(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    with serving(tiny_checkpoint(), tmp_path, "--shutdown-timeout", "2") as server:

        async def scenario() -> list[list[str]]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
                # far longer than 2 s at any speed: the context is the limit, not the timeout
                streams = await _live_streams(session, server.url, 4, 2000)
                server.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*streams)

        events = asyncio.run(scenario())
        server.proc.wait(timeout=90)
    assert server.proc.returncode == 0
    for stream in events:
        assert stream[-1] == "[DONE]"
        error = json.loads(stream[-2])["error"]
        assert error["message"] == "the server is shutting down"
