"""KV block hand-off between prefill and decode workers, behind one small interface.

A `KVSender` (prefill worker) ships the blocks a `KVSendOrder` names; a `KVReceiver`
(decode worker) lands them into the blocks a `KVRecvOrder` names and reports
`KVTransferDone` — a transfer is complete only when the receiver says so. Connectors:

- ``shm``: same host; the sender's pool lives in /dev/shm, the receiver copies from it.
- ``torch``: torch.distributed send/recv (gloo on CPU, NCCL on GPU).
- ``tcp``: ZeroMQ frames carrying the block bytes, for hosts without GPUs.
"""

from __future__ import annotations

import torch
import zmq

from engine_core.messages.curve import CurveKeys
from engine_core.messages.kv import KVHeader
from kv_transfer.base import KVReceiver, KVSender
from kv_transfer.shm import ShmAllocator, ShmReceiver, ShmSender
from kv_transfer.tcp import TcpReceiver, TcpSender
from kv_transfer.torch_dist import TorchReceiver, TorchSender

CONNECTORS = ("shm", "torch", "tcp")

__all__ = [
    "CONNECTORS",
    "KVHeader",
    "KVReceiver",
    "KVSender",
    "ShmAllocator",
    "make_receiver",
    "make_sender",
]


def make_sender(
    kind: str,
    ctx: zmq.Context,
    worker_id: str,
    kv_cache: torch.Tensor,
    shm: ShmAllocator | None = None,
    keys: CurveKeys | None = None,
    host: str = "127.0.0.1",
) -> KVSender:
    """The sending end of connector `kind`; shm needs the allocator that made `kv_cache`.

    `keys` make it a CURVE client of the receivers; `host` is this worker's own address,
    where the torch connector's pair sockets listen.
    """
    if kind == "shm":
        if shm is None:
            raise ValueError("the shm connector needs the pool to live in shared memory")
        return ShmSender(ctx, worker_id, kv_cache, shm.path, keys)
    if kind == "torch":
        return TorchSender(ctx, worker_id, kv_cache, keys, host)
    if kind == "tcp":
        return TcpSender(ctx, worker_id, kv_cache, keys)
    raise ValueError(f"unknown KV connector {kind!r}; choose one of {CONNECTORS}")


def make_receiver(
    kind: str,
    ctx: zmq.Context,
    kv_cache: torch.Tensor,
    host: str = "127.0.0.1",
    keys: CurveKeys | None = None,
) -> KVReceiver:
    """The receiving end of connector `kind`, bound on `host` (an address senders can reach).

    With `keys` its socket is a CURVE server (`ctx` needs `curve.authenticate` first);
    without, a non-loopback `host` is narrowed to loopback (see engine_core/messages/curve.py).
    """
    receivers = {"shm": ShmReceiver, "torch": TorchReceiver, "tcp": TcpReceiver}
    if kind not in receivers:
        raise ValueError(f"unknown KV connector {kind!r}; choose one of {CONNECTORS}")
    return receivers[kind](ctx, kv_cache, host, keys)
