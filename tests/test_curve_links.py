"""`duet serve` with a tcp engine address: CURVE keeps strangers out; without keys, loopback only."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
import zmq
from engine_harness import EngineHarness, worker_pid
from listeners import listening, listening_anywhere, non_loopback_address
from server_process import free_port, running_server

from engine_core.messages.config import EngineConfig
from engine_core.messages.curve import CurveKeys, dial, generate_keys, load_keys
from engine_core.messages.framing import encode
from engine_core.messages.frontend import AddRequest, FrontendMsg
from engine_core.messages.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

SMALL = [
    "--served-model-name",
    "tiny",
    "--max-model-len",
    "256",
    "--kv-cache-memory",
    "32MiB",
    "--max-num-seqs",
    "4",
]


def raw_frontend_hears(
    address: str, keys: CurveKeys | None, wait: float = 4.0
) -> list[list[bytes]]:
    """What the core sends a bare DEALER that says HELLO and asks for 4 tokens."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    dial(sock, address, keys)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    sock.send_multipart(encode(FrontendMsg.HELLO))
    sock.send_multipart(
        encode(FrontendMsg.ADD, AddRequest("raw-1", [1, 2, 3], params, time.time()))
    )
    heard = []
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000) + 1):
            heard.append(sock.recv_multipart())
    sock.close()
    ctx.term()
    return heard


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("curve") / "keys"
    subprocess.run([sys.executable, "-c", "from frontend.cli import main; main()", "keys",
                    str(directory)], check=True)  # fmt: skip
    return directory


@pytest.fixture
def model(tiny_checkpoint: Callable[..., Path]) -> str:
    return str(tiny_checkpoint())


def test_tcp_core_with_keys_serves_its_frontends_and_no_stranger(
    keys: Path, model: str, tmp_path: Path
) -> None:
    engine = f"tcp://127.0.0.1:{free_port()}"
    log = tmp_path / "duet.log"
    args = [model, *SMALL, "--engine-address", engine, "--curve-keys", str(keys)]
    generate_keys(tmp_path / "other")
    cluster, other = load_keys(keys), load_keys(tmp_path / "other")
    assert cluster is not None and other is not None
    # knows the core's public key, holds a client key pair of its own
    stranger = CurveKeys(keys, cluster.server_public, other.client_public, other.client_secret)
    with running_server(args, log) as url:
        # the frontends reach the core over tcp with the client key: a request end to end
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0)
        assert reply.usage is not None and reply.usage.completion_tokens == 4
        # plain ZeroMQ, and CURVE with a client key of its own: no stats, no tokens, nothing
        assert raw_frontend_hears(engine, None) == []
        assert raw_frontend_hears(engine, stranger) == []
        # the same bare client with the cluster's keys is answered: the check above can fail
        assert raw_frontend_hears(engine, cluster) != []
    assert "refused a CURVE client with an unknown key" in log.read_text()


def test_keyless_wildcard_engine_address_listens_on_loopback_only(
    model: str, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "duet.log"
    with running_server([model, *SMALL, "--engine-address", f"tcp://0.0.0.0:{port}"], log) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.completions.create(model="tiny", prompt="Hello", max_tokens=2)
        assert reply.usage is not None and reply.usage.completion_tokens == 2
        bound = {a for a in listening_anywhere() if a[1] == port}
        outward = non_loopback_address()
        if outward is not None:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((outward, port), timeout=2).close()
    assert bound == {("127.0.0.1", port)}
    text = log.read_text()
    assert f"binding tcp://0.0.0.0:{port} to tcp://127.0.0.1:{port} instead" in text


def writable(address: str, keys: CurveKeys | None) -> bool:
    """Does a PUSH (queueing only on completed handshakes) to `address` become writable?"""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    dial(sock, address, keys)
    ready = bool(sock.poll(2000, zmq.POLLOUT))
    sock.close()
    ctx.term()
    return ready


def test_local_workers_hand_off_kv_under_curve(keys: Path, model: str) -> None:
    """With keys every tcp socket is CURVE, so the core's own workers must hold them too."""
    config = EngineConfig(model=model, colocated=False, kv_connector="tcp",
                          kv_cache_memory=32 * 2**20, max_model_len=256)  # fmt: skip
    harness = EngineHarness(config, curve_keys=str(keys))
    try:
        outputs = harness.generate({f"r{i}": [1, 2, 3, 10 + i] for i in range(4)}, 4)
        stats = harness.wait_stats(lambda s: s.num_running == 0)
        (port,) = [p for _, p in listening(worker_pid("decode-0", harness.core.pid))]
        receiver = f"tcp://127.0.0.1:{port}"  # the decode worker's KV socket
        assert not writable(receiver, None)
        assert writable(receiver, load_keys(keys))
    finally:
        harness.close()
    assert all(len(tokens) == 4 for tokens in outputs.values())
    assert stats.kv_transfer_bytes > 0 and stats.kv_transfer_failures == 0
