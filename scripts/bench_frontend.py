#!/usr/bin/env python3
"""How many streamed tokens/s and concurrent SSE connections the frontend sustains.

This isolates the frontend: the real `duet frontend` processes (HTTP, tokenization,
detokenization, SSE, the engine client) run against a *synthetic engine core* defined
here, which runs no model. It binds a ROUTER and speaks the real wire
(engine_core/messages/frontend.py, engine_core/messages/framing.py): every AddRequest gets one
token per step, at a fixed step interval, until its max_tokens, with one StepOutputs per
frontend per step carrying SchedulerStats, exactly as the real core batches them. So
whatever limits tokens/s here is the frontend (and the load generator sharing the CPU),
never the model.

    .venv/bin/python scripts/bench_frontend.py                      # N = 100 500 1000, 1 and 2 frontends
    .venv/bin/python scripts/bench_frontend.py --clients 500 --api-server-counts 1 \
        --profile frontend_profile.txt                              # py-spy one frontend under load

Per run it reports tokens/s delivered to clients, streams that completed (connections
sustained), p50/p99 of the gap between SSE chunks as clients see them, and the frontend
processes' own CPU time per delivered token (user + system, from /proc): on a shared
machine tokens/s moves with the neighbours' load, CPU per token much less.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import aiohttp  # noqa: E402
import zmq  # noqa: E402

from engine_core.messages.common import FinishReason  # noqa: E402
from engine_core.messages.framing import Channel  # noqa: E402
from engine_core.messages.frontend import (  # noqa: E402
    CORE,
    FrontendMsg,
    RequestDelta,
    SchedulerStats,
    StepOutputs,
)

STATS_INTERVAL = 1.0  # as the real core: an idle frontend still hears from it every second
FIRST_TOKEN_ID = 1000  # ordinary vocabulary tokens, so detokenization does real work


@dataclass
class _Live:
    owner: bytes
    remaining: int
    sent: int = 0


def run_synthetic_core(address: str, step_interval: float) -> None:
    """Serve frontends at `address` forever: one token per live request per step."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ctx = zmq.Context()
    router = Channel(ctx, CORE)
    router.bind(address)
    live: dict[str, _Live] = {}
    last_sent: dict[bytes, float] = {}
    next_step = time.monotonic()
    while True:
        timeout_ms = max(0.0, next_step - time.monotonic()) * 1000
        if router.poll(timeout_ms if live else STATS_INTERVAL * 1000):
            _drain(router, live, last_sent)
        now = time.monotonic()
        if live and now >= next_step:
            _step(router, live, last_sent)
            # NOTE: a fixed cadence, not fixed sleeps: a slow step must not slow the rate
            next_step = max(next_step + step_interval, now)
        elif not live:
            next_step = now
        for identity, at in list(last_sent.items()):
            if now - at > STATS_INTERVAL:
                _send(router, identity, [], live, last_sent)


def _drain(router: Channel, live: dict[str, _Live], last_sent: dict[bytes, float]) -> None:
    while True:
        try:
            identity, *frames = router.sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        decoded = router.decode(frames)
        if decoded is None:
            continue
        kind, message = decoded
        last_sent.setdefault(identity, 0.0)
        if kind == FrontendMsg.ADD:
            max_tokens = message.sampling_params.max_tokens or 16
            live[message.request_id] = _Live(identity, max_tokens)
        elif kind == FrontendMsg.ABORT:
            for request_id in message.request_ids:
                live.pop(request_id, None)


def _step(router: Channel, live: dict[str, _Live], last_sent: dict[bytes, float]) -> None:
    by_owner: dict[bytes, list[RequestDelta]] = collections.defaultdict(list)
    for request_id, req in list(live.items()):
        req.remaining -= 1
        token = FIRST_TOKEN_ID + req.sent % 500
        req.sent += 1
        finish = FinishReason.LENGTH if req.remaining == 0 else None
        by_owner[req.owner].append(RequestDelta(request_id, [token], finish_reason=finish))
        if finish is not None:
            del live[request_id]
    for identity, deltas in by_owner.items():
        _send(router, identity, deltas, live, last_sent)


def _send(
    router: Channel,
    identity: bytes,
    deltas: list[RequestDelta],
    live: dict[str, _Live],
    last_sent: dict[bytes, float],
) -> None:
    stats = SchedulerStats(num_running=len(live), kv_cache_usage={"mixed": 0.0})
    router.send(FrontendMsg.OUTPUTS, StepOutputs(deltas, time.time(), stats), to=identity)
    last_sent[identity] = time.monotonic()


@dataclass
class RunResult:
    clients: int
    frontends: int
    completed: int = 0
    failed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    demand: float = 0.0  # tokens/s the synthetic core offers: clients / step interval
    frontend_cpu: float = 0.0  # CPU seconds the frontend processes spent during the run
    gaps: list[float] = field(default_factory=list)

    def row(self) -> str:
        gaps = sorted(self.gaps) or [0.0]
        p50 = statistics.median(gaps) * 1000
        p99 = gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] * 1000
        return (
            f"{self.frontends:>9} {self.clients:>7} {self.completed:>9} {self.failed:>6} "
            f"{self.demand:>10.0f} {self.tokens / self.seconds:>10.0f} {p50:>8.1f} {p99:>8.1f} "
            f"{self.seconds:>7.2f} {self.frontend_cpu / max(self.tokens, 1) * 1e6:>10.1f}"
        )


HEADER = (
    f"{'frontends':>9} {'clients':>7} {'completed':>9} {'failed':>6} {'offered':>10} "
    f"{'tok/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'wall s':>7} {'cpu us/tok':>10}"
)


async def _one_stream(
    session: aiohttp.ClientSession, url: str, max_tokens: int, result: RunResult
) -> None:
    body = {"prompt": "Hello there, how are you?", "max_tokens": max_tokens, "stream": True}
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            resp.raise_for_status()
            last, done = None, False
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if line.startswith(b"data: [DONE]"):
                    done = True
                    break
                now = time.perf_counter()
                if last is not None:
                    result.gaps.append(now - last)
                last = now
                result.tokens += 1  # one token per step, so one chunk is one token
        if done:
            result.completed += 1
        else:
            result.failed += 1
    except (TimeoutError, aiohttp.ClientError):
        result.failed += 1


async def drive(url: str, clients: int, frontends: int, max_tokens: int) -> RunResult:
    """`clients` concurrent SSE streams of `max_tokens` tokens each; their combined numbers."""
    result = RunResult(clients, frontends)
    # NOTE: one connection per stream, no pooling limit: connections are what is measured
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(
            *(_one_stream(session, url, max_tokens, result) for _ in range(clients))
        )
        result.seconds = time.perf_counter() - start
    return result


def _cpu_seconds(root: int) -> float:
    """User + system CPU seconds of process `root` and its live descendants."""
    ticks, parents = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
            ticks[int(entry.name)] = int(fields[11]) + int(fields[12])  # utime + stime
    tree, frontier = {root}, {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - tree
        tree |= frontier
    return sum(ticks.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"duet frontend exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("duet frontend did not become healthy")


def _start_frontends(engine: str, count: int, port: int, log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", "from frontend.cli import main; main()", "frontend",
             "--engine", engine, "--host", "127.0.0.1", "--port", str(port),
             "--api-server-count", str(count), "--disable-log-requests"],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def _profile(supervisor: subprocess.Popen, seconds: int, out: Path) -> subprocess.Popen:
    # --subprocesses reaches the frontend children; the idle supervisor adds no samples
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(supervisor.pid),
         "--subprocesses", "--duration", str(seconds), "--rate", "200", "--format", "raw",
         "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip


def summarize_profile(path: Path, top: int = 20) -> str:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total} samples", "self %  function"]
    lines += [f"{100 * n / total:5.1f}  {f}" for f, n in own.most_common(top)]
    lines += ["incl %  function"]
    lines += [f"{100 * n / total:5.1f}  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    """Run the grid of (frontends, clients) and print one row per run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--api-server-counts", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--step-ms", type=float, default=20.0, help="synthetic core step interval")
    parser.add_argument("--log", type=Path, default=Path("/tmp/bench_frontend.log"))
    parser.add_argument("--profile", type=Path, help="py-spy raw output for the first run")
    parser.add_argument("--profile-seconds", type=int, default=8)
    args = parser.parse_args()

    import uvloop

    engine = f"tcp://127.0.0.1:{_free_port()}"
    core = multiprocessing.get_context("spawn").Process(
        target=run_synthetic_core, args=(engine, args.step_ms / 1000), daemon=True
    )
    core.start()
    print(f"load average: {os.getloadavg()}", flush=True)
    print(HEADER, flush=True)
    try:
        for count in args.api_server_counts:
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            frontends = _start_frontends(engine, count, port, args.log)
            try:
                _wait_healthy(url, frontends)
                for clients in args.clients:
                    spy = None
                    if args.profile is not None:
                        spy = _profile(frontends, args.profile_seconds, args.profile)
                        time.sleep(1)  # py-spy attaches before the load starts
                    cpu_before = _cpu_seconds(frontends.pid)
                    result = uvloop.run(drive(url, clients, count, args.max_tokens))
                    result.frontend_cpu = _cpu_seconds(frontends.pid) - cpu_before
                    result.demand = clients / (args.step_ms / 1000)
                    print(result.row(), flush=True)
                    if spy is not None:
                        spy.wait()
                        print(summarize_profile(args.profile), flush=True)
                        args.profile = None
            finally:
                _stop(frontends)
    finally:
        core.terminate()
        core.join()
    print(f"load average: {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
