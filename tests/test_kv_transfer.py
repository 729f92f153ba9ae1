"""Each KV connector moves blocks byte-for-byte between two real processes."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch
import zmq

from engine_core.messages.worker import KVRecvOrder, KVSendOrder, KVTransferDone
from kv_transfer import ShmAllocator, make_receiver, make_sender

SHAPE = (2, 2, 12, 4, 2, 8)  # [L, 2, N, bs, Hkv, D]
SRC = [5, 2, 9, 3]  # deliberately scattered and unordered
DST = [1, 7, 4, 10]


def sender_pool(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run_sender(kind: str, orders: list[KVSendOrder], seed: int, done: mp.Event) -> None:
    ctx = zmq.Context()
    shm = ShmAllocator("test-sender") if kind == "shm" else None
    pool = shm(SHAPE, torch.float32) if shm else torch.zeros(SHAPE)
    pool.copy_(sender_pool(seed))
    sender = make_sender(kind, ctx, "test-sender", pool, shm)
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


def start_sender(kind: str, orders: list[KVSendOrder], seed: int) -> tuple[mp.Process, mp.Event]:
    spawn = mp.get_context("spawn")
    done = spawn.Event()
    proc = spawn.Process(target=run_sender, args=(kind, orders, seed, done), daemon=True)
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
