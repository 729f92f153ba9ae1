"""Core, prefill worker and decode worker in three network namespaces joined by veth over a
bridge: the workers join with `duet prefill-worker/decode-worker --engine tcp://...` and
move KV over the tcp connector, the only path between them being the wire, every link
under CURVE with the keys of one `duet keys` directory (as an operator would mount it)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from engine_harness import EngineHarness

from engine_core.messages.config import EngineConfig
from engine_core.messages.curve import generate_keys

TAG = f"d{os.getpid() % 100000}"  # unique names: other test runs may share this kernel
NAMESPACES = {"core": "10.77.0.1", "prefill": "10.77.0.2", "decode": "10.77.0.3"}
WORKER_PORT = 5571


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _teardown() -> None:
    for role in NAMESPACES:
        subprocess.run(["ip", "netns", "del", f"{TAG}-{role}"], capture_output=True)
    subprocess.run(["ip", "link", "del", f"{TAG}-br"], capture_output=True)


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    """role -> namespace name, each with one veth onto a shared bridge in 10.77.0.0/24."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    try:
        ip("link", "add", f"{TAG}-br", "type", "bridge")
        ip("link", "set", f"{TAG}-br", "up")
        for role, address in NAMESPACES.items():
            ns, veth = f"{TAG}-{role}", f"{TAG}-{role[0]}"
            ip("netns", "add", ns)
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", veth, "master", f"{TAG}-br", "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        _teardown()
        pytest.skip(f"the kernel refused network namespaces/veth: {exc.stderr.strip()}")
    yield {role: f"{TAG}-{role}" for role in NAMESPACES}
    _teardown()


def start_worker(netns: str, role: str, log: Path, keys: Path) -> subprocess.Popen:
    module = f"{role}_workers"
    argv = ["ip", "netns", "exec", netns, sys.executable, "-m", module,
            "--engine", f"tcp://{NAMESPACES['core']}:{WORKER_PORT}", "--worker-id", f"{role}-remote",
            "--curve-keys", str(keys)]  # fmt: skip
    return subprocess.Popen(
        argv, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent
    )


def test_three_namespaces_tcp_connector(
    namespaces: dict[str, str], tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    config = EngineConfig(
        model=str(tiny_checkpoint()), colocated=False, prefill_workers=0, decode_workers=0,
        kv_connector="tcp", worker_address=f"tcp://{NAMESPACES['core']}:{WORKER_PORT}",
        kv_cache_memory=64 * 2**20, max_model_len=512,
    )  # fmt: skip
    chats = {f"r{i}": [1, 2, 3, *range(100 + i, 140 + 3 * i)] for i in range(8)}
    keys = generate_keys(tmp_path / "keys")[0].parent
    harness = EngineHarness(config, netns=namespaces["core"], curve_keys=str(keys))
    workers = [start_worker(namespaces[r], r, tmp_path / f"{r}.log", keys)
               for r in ("prefill", "decode")]  # fmt: skip
    try:
        harness.wait_stats(lambda s: len(s.kv_cache_usage) == 2, timeout=120)  # both joined
        outputs = harness.generate(chats, 6)
        stats = harness.wait_stats(lambda s: s.num_running == 0)
    finally:
        for worker in workers:
            worker.kill()
        harness.close()
    logs = {p.name: p.read_text()[-2000:] for p in tmp_path.glob("*.log")}
    assert all(len(t) == 6 for t in outputs.values()), logs
    assert stats.worker_requests == {"prefill-remote": 8, "decode-remote": 8}, logs
    assert stats.kv_transfer_bytes > 0 and stats.kv_transfer_failures == 0
    reference = EngineHarness(
        EngineConfig(model=config.model, kv_cache_memory=64 * 2**20, max_model_len=512)
    )
    try:
        assert reference.generate(chats, 6) == outputs
    finally:
        reference.close()
