"""Each KV connector moves blocks byte-for-byte between two real processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest
import torch
import zmq
from listeners import listening, non_loopback_address

from engine_core.messages.curve import authenticate, generate_keys, load_keys
from engine_core.messages.worker import KVRecvOrder, KVSendOrder, KVTransferDone
from kv_transfer import ShmAllocator, make_receiver, make_sender

SHAPE = (2, 2, 12, 4, 2, 8)  # [L, 2, N, bs, Hkv, D]
SRC = [5, 2, 9, 3]  # deliberately scattered and unordered
DST = [1, 7, 4, 10]


def sender_pool(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run_sender(
    kind: str,
    orders: list[KVSendOrder],
    seed: int,
    done: mp.Event,
    key_dir: Path | None = None,
    host: str = "127.0.0.1",
) -> None:
    ctx = zmq.Context()
    shm = ShmAllocator("test-sender") if kind == "shm" else None
    pool = shm(SHAPE, torch.float32) if shm else torch.zeros(SHAPE)
    pool.copy_(sender_pool(seed))
    sender = make_sender(kind, ctx, "test-sender", pool, shm, load_keys(key_dir), host)
    for order in orders:
        sender.send(order)
    # NOTE: the shm pool file must outlive the receiver's copy; the test says when
    done.wait(30)
    sender.close()
    if shm:
        shm.unlink()
    ctx.term()


def receive(receiver, count: int, timeout: float = 30.0) -> list[KVTransferDone]:
    landed: list[KVTransferDone] = []
    deadline = time.monotonic() + timeout
    while len(landed) < count and time.monotonic() < deadline:
        receiver.sock.poll(100)
        landed += receiver.poll()
    return landed


def start_sender(
    kind: str,
    orders: list[KVSendOrder],
    seed: int,
    key_dir: Path | None = None,
    host: str = "127.0.0.1",
) -> tuple[mp.Process, mp.Event]:
    spawn = mp.get_context("spawn")
    done = spawn.Event()
    args = (kind, orders, seed, done, key_dir, host)
    proc = spawn.Process(target=run_sender, args=args, daemon=True)
    proc.start()
    return proc, done


def order(receiver, transfer_id: str, src: list[int], dst: list[int]) -> KVSendOrder:
    return KVSendOrder(
        transfer_id, src, "test-receiver", receiver.address, dst, receiver.store_address
    )


@pytest.mark.parametrize("kind", ["shm", "torch", "tcp"])
def test_blocks_arrive_byte_identical(kind: str) -> None:
    ctx = zmq.Context()
    pool = torch.zeros(SHAPE)
    receiver = make_receiver(kind, ctx, pool)
    # t1 is expected before its bytes come, t2 after: both orders must work
    receiver.expect(KVRecvOrder("t1", DST))
    orders = [order(receiver, "t1", SRC, DST), order(receiver, "t2", [11], [2])]
    proc, done = start_sender(kind, orders, seed=3)
    try:
        landed = receive(receiver, 1)
        receiver.expect(KVRecvOrder("t2", [2]))
        landed += receive(receiver, 1)
    finally:
        done.set()
        proc.join(10)
    assert [(d.transfer_id, d.ok) for d in landed] == [("t1", True), ("t2", True)]
    assert landed[0].num_bytes == 4 * pool[:, :, 0].numel() * 4
    src = sender_pool(3)
    for s, d in [*zip(SRC, DST, strict=True), (11, 2)]:
        assert torch.equal(pool[:, :, d], src[:, :, s]), f"block {s} -> {d}"
    untouched = [b for b in range(SHAPE[2]) if b not in [*DST, 2]]
    assert torch.count_nonzero(pool[:, :, untouched]) == 0
    receiver.close()
    ctx.term()


@pytest.mark.parametrize("kind", ["shm", "tcp"])
def test_cancelled_transfer_lands_nothing(kind: str) -> None:
    ctx = zmq.Context()
    pool = torch.zeros(SHAPE)
    receiver = make_receiver(kind, ctx, pool)
    receiver.expect(KVRecvOrder("gone", DST))
    receiver.cancel("gone")
    receiver.cancel("never-expected")
    receiver.expect(KVRecvOrder("kept", [6]))
    orders = [order(receiver, "gone", SRC, DST), order(receiver, "never-expected", [1], [3]),
              order(receiver, "kept", [4], [6])]  # fmt: skip
    proc, done = start_sender(kind, orders, seed=5)
    try:
        landed = receive(receiver, 1)
    finally:
        done.set()
        proc.join(10)
    assert [d.transfer_id for d in landed] == ["kept"]
    assert torch.count_nonzero(pool[:, :, [b for b in range(SHAPE[2]) if b != 6]]) == 0
    receiver.close()
    ctx.term()


def test_receiver_rejects_blocks_the_core_did_not_name() -> None:
    ctx = zmq.Context()
    pool = torch.zeros(SHAPE)
    receiver = make_receiver("tcp", ctx, pool)
    receiver.expect(KVRecvOrder("t", [1, 2]))
    proc, done = start_sender("tcp", [order(receiver, "t", [3, 4], [2, 1])], seed=1)
    try:
        (landed,) = receive(receiver, 1)
    finally:
        done.set()
        proc.join(10)
    assert not landed.ok and torch.count_nonzero(pool) == 0
    receiver.close()
    ctx.term()


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    generate_keys(tmp_path / "keys")
    return tmp_path / "keys"


def test_tcp_connector_with_keys_takes_blocks_only_from_key_holders(key_dir: Path) -> None:
    ctx = zmq.Context()
    keys = load_keys(key_dir)
    authenticator = authenticate(ctx, keys)
    pool = torch.zeros(SHAPE)
    receiver = make_receiver("tcp", ctx, pool, keys=keys)
    receiver.expect(KVRecvOrder("plain", [1]))
    receiver.expect(KVRecvOrder("curve", [2]))
    # a sender without keys cannot complete the handshake: its send fails, nothing lands
    proc, done = start_sender("tcp", [order(receiver, "plain", [3], [1])], seed=2)
    try:
        assert receive(receiver, 1, timeout=4) == []
    finally:
        done.set()
        proc.join(10)
    proc, done = start_sender("tcp", [order(receiver, "curve", [3], [2])], seed=2, key_dir=key_dir)
    try:
        landed = receive(receiver, 1)
    finally:
        done.set()
        proc.join(10)
    assert [(d.transfer_id, d.ok) for d in landed] == [("curve", True)]
    assert torch.count_nonzero(pool[:, :, 1]) == 0
    assert torch.equal(pool[:, :, 2], sender_pool(2)[:, :, 3])
    receiver.close()
    assert authenticator is not None
    authenticator.stop()
    ctx.term()


@pytest.mark.parametrize(
    ("asked", "with_keys", "expected"),
    [("loopback", False, "loopback"), ("outward", True, "outward"),
     ("outward", False, "loopback")],
)  # fmt: skip
def test_torch_connector_listens_only_where_it_may(
    asked: str, with_keys: bool, expected: str, key_dir: Path
) -> None:
    """The store, the header socket and gloo's pair sockets, on both ends of a transfer."""
    outward = non_loopback_address()
    if outward is None and "outward" in (asked, expected):
        pytest.skip("this host has no non-loopback address")
    hosts = {"loopback": "127.0.0.1", "outward": outward}
    keys = load_keys(key_dir) if with_keys else None
    before = listening(os.getpid())
    ctx = zmq.Context()
    authenticator = authenticate(ctx, keys)
    pool = torch.zeros(SHAPE)
    receiver = make_receiver("torch", ctx, pool, hosts[asked], keys)
    receiver.expect(KVRecvOrder("t1", DST))
    proc, done = start_sender("torch", [order(receiver, "t1", SRC, DST)], 3,
                              key_dir if with_keys else None, hosts[asked])  # fmt: skip
    try:
        landed = receive(receiver, 1)
        theirs = listening(proc.pid)
    finally:
        done.set()
        proc.join(10)
    ours = listening(os.getpid()) - before
    assert [d.ok for d in landed] == [True]
    assert {address for address, _ in ours} == {hosts[expected]}
    assert len(ours) >= 3, ours  # header socket, store, gloo
    assert {address for address, _ in theirs} <= {hosts[expected]}
    receiver.close()
    if authenticator is not None:
        authenticator.stop()
    ctx.term()
