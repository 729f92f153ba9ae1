"""Workers started by hand, possibly on another host: `duet prefill-worker --engine tcp://...`.

Such a worker first asks the core for its EngineConfig (so model, block size, dtype and
connector match the core's), then runs the ordinary worker loop, whose heartbeats let the
core notice within HEARTBEAT_TIMEOUT that the host or process is gone; the core then
recomputes its requests elsewhere (it cannot restart it).
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from urllib.parse import urlsplit

import zmq

from decode_workers.health import HealthServer
from engine_core.messages.config import EngineConfig
from engine_core.messages.curve import CurveKeyError, CurveKeys, add_curve_keys_argument, load_keys
from engine_core.messages.framing import Channel
from engine_core.messages.worker import JOIN_SUFFIX, WORKER, WorkerJoin, WorkerMsg
from engine_core.placement import cores_for


def main(role: str, argv: list[str] | None = None) -> None:
    """Parse `argv`, join the core at --engine as a `role` worker, serve until shut down."""
    args = _parser(role).parse_args(argv)
    worker_id = args.worker_id or f"{role}-{socket.gethostname()}-{os.getpid()}"
    kv_host = args.kv_host or local_address_towards(args.engine)
    try:
        keys = load_keys(args.curve_keys)
    except CurveKeyError as exc:
        raise SystemExit(f"duet: {exc}") from None
    health = HealthServer(args.health_port) if args.health_port else None
    config = fetch_config(args.engine, worker_id, role, args.timeout, keys)
    if args.torch_threads:
        config.torch_threads = args.torch_threads
    cores = _cores(args.cores, role)
    from decode_workers.worker import run_worker

    run_worker(config, args.engine, worker_id, role, cores, kv_host, keys,
               on_ready=health.mark_ready if health else None)  # fmt: skip


def _parser(role: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"duet {role}-worker", description=f"Join a running engine core as a {role} worker."
    )
    add = parser.add_argument
    add(
        "--engine",
        required=True,
        metavar="ADDRESS",
        help="the core's worker socket, e.g. tcp://10.0.0.5:5571",
    )
    add("--worker-id", default=None, help="a unique name (default: ROLE-HOSTNAME-PID)")
    add("--kv-host", default=None, help="address KV senders reach this host at (default: the "
        "address of the interface that routes to the engine)")  # fmt: skip
    add(
        "--cores",
        default=None,
        help="comma-separated CPU ids to pin to, or `all` (default: this role's half, "
        "for a host shared with the other pool)",
    )
    add("--torch-threads", type=int, default=None)
    add("--timeout", type=float, default=30.0, help="seconds to wait for the core's answer")
    add("--health-port", type=int, default=None, metavar="PORT",
        help="answer GET /health on this port: 503 while starting, 200 once joined")  # fmt: skip
    add_curve_keys_argument(parser)
    return parser


def _cores(spec: str | None, role: str) -> list[int] | None:
    """--cores: None (every core of this process's CPU set) for `all`."""
    if spec == "all":
        return None
    return [int(c) for c in spec.split(",")] if spec else cores_for(role)


def fetch_config(
    engine: str, worker_id: str, role: str, timeout: float, keys: CurveKeys | None = None
) -> EngineConfig:
    """Ask the core for its EngineConfig."""
    channel = Channel(zmq.Context.instance(), WORKER, (worker_id + JOIN_SUFFIX).encode(), keys)
    channel.connect(engine)
    deadline = time.monotonic() + timeout
    try:
        # NOTE: asked again every 2 s: a core still starting up may have missed the first
        while True:
            channel.send(WorkerMsg.JOIN, WorkerJoin(worker_id, role))
            if channel.poll(2000):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no answer from the engine core at {engine} within {timeout:.0f}s"
                )
        received = channel.recv()
        if received is None or received[1] != WorkerMsg.CONFIG:
            raise RuntimeError(f"the engine core at {engine} sent no configuration")
        return received[2]
    finally:
        channel.close()


def local_address_towards(engine: str) -> str:
    """The IP of this host's interface that routes to the engine (no packet is sent)."""
    host = urlsplit(engine).hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return probe.getsockname()[0]
