"""torch.distributed connector: point-to-point send/recv between a sender and a receiver.

Gloo on CPU (what the tests run), NCCL when the pool is on a GPU — the same calls. Each
sender/receiver pair gets its own two-rank process group, formed on first contact
through the receiver's TCPStore, so a restarted worker simply forms new pairs instead of
needing a whole-world re-initialisation. Receiver is rank 0, sender rank 1.

NOTE: the store and gloo's pair sockets listen on the worker's KV host only (by default
TCPStore listens on every interface), but neither is covered by CURVE: across hosts this
connector is for a private network; the tcp connector is the authenticated one.
"""

from __future__ import annotations

import datetime
import logging
import socket
import uuid

import torch
import torch.distributed as dist
import zmq

from engine_core.messages.kv import KVHeader
from engine_core.messages.worker import KVSendOrder
from kv_transfer.base import (
    KVReceiver,
    KVSender,
    Landing,
    blocks_shape,
    gather_blocks,
    scatter_blocks,
)

logger = logging.getLogger(__name__)

GROUP_TIMEOUT = datetime.timedelta(seconds=30)


def _pair_group(
    store: dist.Store, key: str, rank: int, device: torch.device, host: str
) -> dist.ProcessGroup:
    """Both ends call this with the same key; it returns once the other end has too."""
    prefixed = dist.PrefixStore(key, store)
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(prefixed, rank, 2)
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]  # listen on host only
    options._timeout = GROUP_TIMEOUT
    return dist.ProcessGroupGloo(prefixed, rank, 2, options)


def _store_on(host: str) -> dist.TCPStore:
    """A master TCPStore that listens on `host` alone, on a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, 0), family=family)
    # NOTE: detach: the store's server owns the listening socket from here on
    return dist.TCPStore(host, listener.getsockname()[1], is_master=True, wait_for_workers=False,
                         timeout=GROUP_TIMEOUT, master_listen_fd=listener.detach())  # fmt: skip


class TorchSender(KVSender):
    def _open(self) -> None:
        # NOTE: gloo's pair sockets listen on self.host
        self._nonce = uuid.uuid4().hex[:8]  # new pairs for every incarnation of this worker
        self._groups: dict[str, dist.ProcessGroup] = {}  # receiver worker id -> pair group
        self._in_flight: list[tuple[dist.Work, torch.Tensor]] = []

    def _ship(self, order: KVSendOrder, header: KVHeader) -> None:
        header.group = f"{self.worker_id}/{self._nonce}->{order.dst_worker}"
        blocks = gather_blocks(self.kv_cache, order.src_block_ids)  # [L, 2, k, bs, Hkv, D]
        # NOTE: the header goes first: the receiver joins the pair group when it reads it
        self._push(order.dst_address, header)
        group = self._groups.get(order.dst_worker)
        if group is None:
            host, port = order.dst_store.rsplit(":", 1)
            store = dist.TCPStore(host, int(port), is_master=False, timeout=GROUP_TIMEOUT)
            group = self._groups[order.dst_worker] = _pair_group(
                store, header.group, 1, blocks.device, self.host
            )
        self._in_flight.append((group.send([blocks], 0, 0), blocks))
        self.poll()

    def poll(self) -> None:
        self._in_flight = [(w, t) for w, t in self._in_flight if not w.is_completed()]


class TorchReceiver(KVReceiver):
    def _open(self) -> None:
        self._store = _store_on(self.host)
        self.store_address = f"{self.host}:{self._store.port}"
        self._groups: dict[str, dist.ProcessGroup] = {}  # pair key -> group

    def _fetch(self, header: KVHeader, payload: list[zmq.Frame]) -> Landing:
        group = self._groups.get(header.group)
        if group is None:
            group = self._groups[header.group] = _pair_group(
                self._store, header.group, 0, self.kv_cache.device, self.host
            )
        shape = blocks_shape(self.kv_cache, len(header.src_block_ids))
        blocks = torch.empty(shape, dtype=self.kv_cache.dtype, device=self.kv_cache.device)
        group.recv([blocks], 1, 0).wait()

        def land(kv: torch.Tensor, dst_ids: list[int]) -> None:
            scatter_blocks(kv, dst_ids, blocks)

        return land
