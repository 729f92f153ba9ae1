"""Core, prefill worker and decode worker (and a frontend) in network namespaces joined by
veth over a bridge: the workers join with `duet prefill-worker/decode-worker --engine
tcp://...` and move KV over the tcp connector, the only path between them being the wire,
every link under CURVE with the keys of one `duet keys` directory (as an operator would
mount it). The last test starts every role from deploy/base's own manifests, so the
Kubernetes deployment runs what this test proves works."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from engine_harness import EngineHarness
from manifests import Probe, Role, deployments

from engine_core.messages.config import EngineConfig
from engine_core.messages.curve import generate_keys

TAG = f"d{os.getpid() % 100000}"  # unique names: other test runs may share this kernel
# NOTE: a subnet per run: the bridge's own address puts a route on this host's table
SUBNET = f"10.77.{os.getpid() % 250}"
NAMESPACES = {"core": f"{SUBNET}.1", "prefill": f"{SUBNET}.2", "decode": f"{SUBNET}.3",
              "frontend": f"{SUBNET}.4"}  # fmt: skip
HOST_ADDRESS = f"{SUBNET}.254"  # the bridge's own: this test reaches the namespaces through it
WORKER_PORT = 5571
# what the cluster's DNS would answer inside each namespace (/etc/netns/NS/hosts)
HOSTS = {"duet-core": NAMESPACES["core"]}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _teardown() -> None:
    for role in NAMESPACES:
        # the veth first: a namespace outlives `ip netns del` while a killed worker in it is
        # still exiting, and its veth with it, so the next test's `ip link add` found it
        # ("RTNETLINK answers: File exists") and skipped
        subprocess.run(["ip", "link", "del", f"{TAG}-{role[0]}"], capture_output=True)
        subprocess.run(["ip", "netns", "del", f"{TAG}-{role}"], capture_output=True)
        shutil.rmtree(f"/etc/netns/{TAG}-{role}", ignore_errors=True)
    subprocess.run(["ip", "link", "del", f"{TAG}-br"], capture_output=True)


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    """role -> namespace name, each with one veth onto a shared bridge in SUBNET.0/24."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    try:
        ip("link", "add", f"{TAG}-br", "type", "bridge")
        ip("link", "set", f"{TAG}-br", "up")
        ip("addr", "add", f"{HOST_ADDRESS}/24", "dev", f"{TAG}-br")
        for role, address in NAMESPACES.items():
            ns, veth = f"{TAG}-{role}", f"{TAG}-{role[0]}"
            ip("netns", "add", ns)
            hosts = Path("/etc/netns") / ns / "hosts"
            hosts.parent.mkdir(parents=True, exist_ok=True)
            names = "".join(f"{a} {n}\n" for n, a in HOSTS.items())
            hosts.write_text(f"127.0.0.1 localhost\n{names}")
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


# deploy/base Deployment -> the namespace standing for its pod
MANIFEST_ROLES = {"duet-core": "core", "duet-frontend": "frontend", "duet-prefill": "prefill",
                  "duet-decode": "decode"}  # fmt: skip
API_KEY = "netns-api-key"


def secret_folders(keys: Path, roles: dict[str, Role], root: Path) -> dict[str, dict[str, str]]:
    """Per role, mount path -> a folder holding what its secret volume projects (all the
    `duet keys` files, or only the items the manifest lists)."""
    mounts: dict[str, dict[str, str]] = {}
    for name, role in roles.items():
        mounts[name] = {}
        for secret in role.secrets:
            assert secret.secret == "duet-curve-keys", secret
            folder = root / name / secret.mount_path.strip("/").replace("/", "_")
            folder.mkdir(parents=True, mode=0o700)
            for item in secret.items or [p.name for p in keys.iterdir()]:
                shutil.copy2(keys / item, folder / item)
            mounts[name][secret.mount_path] = str(folder)
    return mounts


def start_role(netns: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, *argv],
        env={**os.environ, "DUET_API_KEY": "", **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).parent.parent,
        start_new_session=True,
    )


def probe_ok(address: str, probe: Probe) -> bool:
    try:
        url = f"http://{address}:{probe.port}{probe.path}"
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_manifest_roles_serve_across_namespaces(namespaces: dict[str, str], tmp_path: Path) -> None:
    roles = deployments()
    assert set(roles) == set(MANIFEST_ROLES)
    keys = generate_keys(tmp_path / "keys")[0].parent
    mounts = secret_folders(keys, roles, tmp_path / "volumes")
    secrets = {("duet-api-key", "api-key"): API_KEY}
    procs = {}
    for name in ("duet-core", "duet-prefill", "duet-decode", "duet-frontend"):
        argv, env = roles[name].command(secrets, mounts[name])
        ns = namespaces[MANIFEST_ROLES[name]]
        procs[name] = start_role(ns, argv, env, tmp_path / f"{name}.log")
    frontend = f"http://{NAMESPACES['frontend']}:8000"
    try:
        deadline = time.monotonic() + 600
        for name, role in roles.items():
            address = NAMESPACES[MANIFEST_ROLES[name]]
            while not all(probe_ok(address, p) for p in role.probes.values()):
                logs = {p.name: p.read_text()[-3000:] for p in tmp_path.glob("*.log")}
                assert procs[name].poll() is None, logs
                assert time.monotonic() < deadline, f"{name} never passed its probes: {logs}"
                time.sleep(1)
        # every probe passes: both workers have joined the core
        client = openai.OpenAI(base_url=f"{frontend}/v1", api_key=API_KEY, max_retries=0,
                               timeout=300)  # fmt: skip
        reply = client.chat.completions.create(
            model="SmolLM2-135M-Instruct", max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of Japan?"}],
        )  # fmt: skip
        with urllib.request.urlopen(f"{frontend}/metrics", timeout=10) as resp:
            scraped = resp.read().decode()
        dashboard = urllib.request.Request(
            f"{frontend}/dashboard/stats", headers={"Authorization": f"Bearer {API_KEY}"}
        )
        with urllib.request.urlopen(dashboard, timeout=10) as resp:
            workers = {w["role"] for w in json.loads(resp.read())["workers"]}
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    logs = {p.name: p.read_text()[-3000:] for p in tmp_path.glob("*.log")}
    assert reply.usage is not None and reply.usage.completion_tokens >= 1, logs
    assert "Tokyo" in (reply.choices[0].message.content or ""), logs
    assert 'duet:num_workers{model_name="SmolLM2-135M-Instruct",role="prefill"} 1.0' in scraped
    assert 'duet:num_workers{model_name="SmolLM2-135M-Instruct",role="decode"} 1.0' in scraped
    assert "duet:pd_recommended_prefill_fraction{" in scraped
    assert workers == {"prefill", "decode"}  # the core's snapshot reached a remote frontend
