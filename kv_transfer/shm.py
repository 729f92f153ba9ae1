"""Same-host connector: the sender's KV pool lives in /dev/shm and the receiver copies from it.

One copy, straight from the prefill worker's pool into the decode worker's. The receiver
makes it (see kv_transfer/base.py for why the receiver writes), which is safe because the
core keeps the source blocks held until the receiver reports the transfer done.
"""

from __future__ import annotations

import math
import os
import uuid

import torch
import zmq

from engine_core.messages.curve import CurveKeys
from engine_core.messages.kv import KVHeader
from engine_core.messages.worker import KVSendOrder
from kv_transfer.base import KVReceiver, KVSender, Landing

SHM_DIR = "/dev/shm"


def shm_path(worker_id: str) -> str:
    """A fresh pool file name: a restarted worker never reuses its predecessor's file."""
    return os.path.join(SHM_DIR, f"duet-kv-{worker_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def map_pool(
    path: str, shape: tuple[int, ...], dtype: torch.dtype, create: bool = False
) -> torch.Tensor:
    """The pool tensor [L, 2, N, bs, Hkv, D] backed by `path` (created and zeroed if asked)."""
    numel = math.prod(shape)
    if create:
        with open(path, "wb") as f:
            f.truncate(numel * dtype.itemsize)  # sparse: pages appear (as zeros) when touched
    return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)


class ShmAllocator:
    """A `KVAllocator` for ModelRunner that puts the pool in shared memory."""

    def __init__(self, worker_id: str) -> None:
        self.path = shm_path(worker_id)

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return map_pool(self.path, shape, dtype, create=True)

    def unlink(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


class ShmSender(KVSender):
    """Only announces: the blocks are already where the receiver can read them."""

    def __init__(
        self,
        ctx: zmq.Context,
        worker_id: str,
        kv_cache: torch.Tensor,
        path: str,
        keys: CurveKeys | None = None,
    ) -> None:
        super().__init__(ctx, worker_id, kv_cache, keys)
        self.path = path

    def _ship(self, order: KVSendOrder, header: KVHeader) -> None:
        header.shm_path = self.path
        self._push(order.dst_address, header)


class ShmReceiver(KVReceiver):
    """Maps each sender's pool file once and copies blocks out of it."""

    def _open(self) -> None:
        # sender worker id -> (its pool file, the mapped pool); a restarted sender has a new file
        self._pools: dict[str, tuple[str, torch.Tensor]] = {}

    def _fetch(self, header: KVHeader, payload: list[zmq.Frame]) -> Landing:
        src = self._pool(header.src_worker, header.shm_path)
        src_ids = header.src_block_ids

        def land(kv: torch.Tensor, dst_ids: list[int]) -> None:
            for s, d in zip(src_ids, dst_ids, strict=True):
                kv[:, :, d].copy_(src[:, :, s])

        return land

    def _pool(self, worker: str, path: str) -> torch.Tensor:
        known = self._pools.get(worker)
        if known is not None and known[0] == path:
            return known[1]
        per_block = self.kv_cache[:, :, 0].numel() * self.kv_cache.element_size()
        shape = list(self.kv_cache.shape)
        shape[2] = os.path.getsize(path) // per_block
        pool = map_pool(path, tuple(shape), self.kv_cache.dtype)
        self._pools[worker] = (path, pool)
        return pool
