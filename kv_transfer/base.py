"""The connector interface: a sender ships KV blocks, a receiver lands them and has the last word.

Every connector shares the control path (engine_core/messages/kv.py): the sender PUSHes a
`KVHeader` to the receiver's PULL socket (`WorkerReady.kv_address`); how the bytes travel is the connector's business
(beside the header as zero-copy ZeroMQ frames, through torch.distributed, or not at all
for shared memory, where the receiver reads the sender's pool itself).

NOTE: the receiver writes every byte into its own pool, in its own loop, and only into
blocks the core named in a `KVRecvOrder`. Core -> worker messages are ordered, so once a
worker has applied a cancel no late byte of that transfer can land in blocks the core has
since reused. That is why the core may free both sides of an aborted transfer at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch
import zmq

from engine_core.messages.curve import CurveKeys, listening_host
from engine_core.messages.framing import Channel
from engine_core.messages.kv import RECEIVER, SENDER, KVHeader, KVMsg
from engine_core.messages.worker import KVRecvOrder, KVSendOrder, KVTransferDone

logger = logging.getLogger(__name__)

# Writes a transfer's blocks into the receiver's pool at the given block ids.
Landing = Callable[[torch.Tensor, list[int]], None]

# how long a send waits for its receiver's connection (the core times the transfer out)
CONNECT_TIMEOUT_MS = 2000


def gather_blocks(kv: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """Blocks `block_ids` of a pool [L, 2, N, bs, Hkv, D] as one contiguous [L, 2, k, bs, Hkv, D]."""
    out = torch.empty(blocks_shape(kv, len(block_ids)), dtype=kv.dtype, device=kv.device)
    for i, block_id in enumerate(block_ids):
        # NOTE: a copy per block, not index_select: on CPU that is ~6x faster here
        out[:, :, i].copy_(kv[:, :, block_id])
    return out


def scatter_blocks(kv: torch.Tensor, block_ids: list[int], blocks: torch.Tensor) -> None:
    """Write [L, 2, k, bs, Hkv, D] into the pool's blocks `block_ids`."""
    for i, block_id in enumerate(block_ids):
        kv[:, :, block_id].copy_(blocks[:, :, i])


def blocks_shape(kv: torch.Tensor, num_blocks: int) -> tuple[int, ...]:
    shape = list(kv.shape)
    shape[2] = num_blocks
    return tuple(shape)


class KVSender:
    """Ships blocks of this worker's pool to receivers named by the core."""

    def __init__(
        self,
        ctx: zmq.Context,
        worker_id: str,
        kv_cache: torch.Tensor,
        keys: CurveKeys | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.ctx = ctx
        self.worker_id = worker_id
        self.kv_cache = kv_cache
        self.keys = keys
        self.host = listening_host(host, keys)  # this worker's address, for senders that listen
        self._pushes: dict[str, Channel] = {}
        self._open()

    def _open(self) -> None:
        """A connector's own set-up."""

    def send(self, order: KVSendOrder) -> None:
        """Start shipping `order.src_block_ids`; returns once the bytes are on their way."""
        header = KVHeader(
            order.transfer_id, self.worker_id, order.src_block_ids, order.dst_block_ids, time.time()
        )
        self._ship(order, header)

    def poll(self) -> None:
        """Finish bookkeeping of sends in flight (connectors that have any)."""

    def close(self) -> None:
        for channel in self._pushes.values():
            channel.close(linger=1000)  # let the last transfers leave

    def _ship(self, order: KVSendOrder, header: KVHeader) -> None:
        raise NotImplementedError

    def _push(self, address: str, header: KVHeader, payload: Sequence[object] = ()) -> None:
        channel = self._pushes.get(address)
        if channel is None:
            channel = self._pushes[address] = Channel(self.ctx, SENDER, keys=self.keys)
            channel.connect(address)
        if not channel.sock.poll(CONNECT_TIMEOUT_MS, zmq.POLLOUT):
            raise ConnectionError(f"KV receiver at {address} is unreachable")
        channel.send(KVMsg.HEADER, header, data=payload)


class KVReceiver:
    """Lands transfers into this worker's pool once the core has said where they go.

    `expect` (from the core's plan) and the sender's header may come in either order;
    a transfer completes when both are here and its bytes are in the pool.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        kv_cache: torch.Tensor,
        host: str = "127.0.0.1",
        keys: CurveKeys | None = None,
    ) -> None:
        self.kv_cache = kv_cache
        self.channel = Channel(ctx, RECEIVER, keys=keys)  # a CURVE server with keys
        self.sock = self.channel.sock
        self.address = self.channel.bind_to_random_port(host)
        self.host = listening_host(host, keys)
        self.store_address = ""  # set by connectors that need a rendezvous store
        self._expected: dict[str, list[int]] = {}
        self._arrived: dict[str, tuple[KVHeader, Landing]] = {}
        self._cancelled: set[str] = set()
        self._open()

    def _open(self) -> None:
        """A connector's own set-up, once the header socket is bound (`self.host` is final)."""

    def expect(self, order: KVRecvOrder) -> None:
        self._expected[order.transfer_id] = order.dst_block_ids

    def cancel(self, transfer_id: str) -> None:
        """Forget a transfer; its bytes, now or later, are dropped."""
        if (
            self._expected.pop(transfer_id, None) is None
            and self._arrived.pop(transfer_id, None) is None
        ):
            self._cancelled.add(transfer_id)

    def poll(self) -> list[KVTransferDone]:
        """Take in whatever senders have sent; report every transfer that landed."""
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self._take(frames)
        return [self._land(tid) for tid in list(self._expected) if tid in self._arrived]

    def close(self) -> None:
        self.channel.close()

    def _take(self, frames: list[zmq.Frame]) -> None:
        decoded = self.channel.decode(frames)
        if decoded is None:
            return
        header: KVHeader = decoded[1]
        landing = self._fetch(header, frames[2:])  # NOTE: always, so a channel stays drained
        if header.transfer_id in self._cancelled:
            self._cancelled.discard(header.transfer_id)
            return
        self._arrived[header.transfer_id] = (header, landing)

    def _land(self, transfer_id: str) -> KVTransferDone:
        dst = self._expected.pop(transfer_id)
        header, landing = self._arrived.pop(transfer_id)
        if header.dst_block_ids != dst or len(header.src_block_ids) != len(dst):
            return KVTransferDone(
                transfer_id, ok=False, error="block ids disagree with the core's order"
            )
        try:
            landing(self.kv_cache, dst)
        except Exception as exc:  # a bad transfer must not take the worker down
            logger.exception("transfer %s failed to land", transfer_id)
            return KVTransferDone(transfer_id, ok=False, error=repr(exc))
        num_bytes = len(dst) * self.kv_cache[:, :, 0].numel() * self.kv_cache.element_size()
        return KVTransferDone(
            transfer_id, ok=True, num_bytes=num_bytes, seconds=time.time() - header.started_at
        )

    def _fetch(self, header: KVHeader, payload: list[zmq.Frame]) -> Landing:
        raise NotImplementedError
