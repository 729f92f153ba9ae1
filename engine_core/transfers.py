"""The core's book of KV hand-offs: which request's blocks go from which prefill worker to
which decode worker, and what happens when the receiver confirms, refuses or stays silent.

A transfer is planned with the step that finishes a prompt (decode blocks reserved, a send
order for the prefill worker, a receive order for the decode worker). With no room on any
decode worker it is parked and retried every step. Only the blocks the decode worker's
prefix cache lacks move (looked up by block hash when the transfer is routed); the request
shares the cached ones there. One whose missing blocks are on their way in another
transfer waits, parked, until those land. It completes only on the receiver's KV_DONE; then
the prefill blocks are released (full ones stay in the prefill prefix cache), its full
blocks are published in the decode worker's cache, and the request joins the decode
worker's scheduler. Until the prefill step's result is
back (`prefilled_at`), the prefill scheduler still owns the request and its blocks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine_core.messages.worker import KVRecvOrder, KVSendOrder, KVTransferDone
from engine_core.pool_workers import Worker
from engine_core.request import Request

logger = logging.getLogger(__name__)


@dataclass
class Transfer:
    request: Request
    src: str  # prefill worker id
    num_tokens: int  # tokens whose KV moves
    transfer_id: str | None = None  # None while parked (no decode blocks yet)
    dst: str | None = None
    since: float | None = None  # when the transfer could start: prefilled and routed
    prefilled_at: float | None = None
    early: KVTransferDone | None = None  # the receiver's word, come before the prefill result


class TransferBook:
    """Transfers in progress, keyed by request id.

    `landed(request, worker)` takes a request whose KV is now in that decode worker's pool;
    `lost(request, worker)` one whose KV is lost, to recompute there (None: anywhere).
    """

    def __init__(
        self,
        workers: dict[str, Worker],
        landed: Callable[[Request, Worker], None],
        lost: Callable[[Request, Worker | None], None],
        timeout: float,
    ) -> None:
        self.workers = workers
        self.landed = landed
        self.lost = lost
        self.timeout = timeout
        self.by_request: dict[str, Transfer] = {}
        self._by_id: dict[str, str] = {}  # transfer id -> request id
        self._seq = 0
        self.bytes = 0
        self.seconds = 0.0
        self.failures = 0

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.by_request

    def __len__(self) -> int:
        return len(self.by_request)

    @property
    def num_between_workers(self) -> int:
        """Requests out of prefill (first token sampled) and not yet in a decode scheduler."""
        return sum(1 for t in self.by_request.values() if t.prefilled_at is not None)

    @property
    def num_in_flight(self) -> int:
        """Transfers routed to a decode worker and not yet confirmed (parked ones excluded)."""
        return sum(1 for t in self.by_request.values() if t.transfer_id is not None)

    def plan(self, request: Request, src: Worker) -> None:
        """The step that finishes `request`'s prompt on `src` is being planned."""
        transfer = Transfer(request, src.id, request.num_tokens)
        self.by_request[request.request_id] = transfer
        self._route(transfer)

    def prefilled(self, request: Request, src_id: str) -> None:
        """The prefill result is in and the request detached: the blocks are ours to move."""
        transfer = self.by_request.get(request.request_id)
        if transfer is None:  # its planned transfer was dropped meanwhile: plan a new one
            transfer = self.by_request[request.request_id] = Transfer(
                request, src_id, request.num_computed_tokens
            )
        transfer.prefilled_at = time.monotonic()
        if transfer.dst is not None:
            transfer.since = transfer.prefilled_at
        if transfer.early is not None:
            self.on_done(transfer.early)

    def on_done(self, done: KVTransferDone) -> None:
        """The receiver's confirmation (or refusal) of one transfer."""
        transfer = self.by_request.get(self._by_id.get(done.transfer_id, ""))
        if transfer is None or transfer.transfer_id != done.transfer_id:
            return  # cancelled meanwhile
        if transfer.prefilled_at is None:
            transfer.early = done
            return
        if not done.ok:
            self._fail(transfer, f"receiver refused it: {done.error}", cancel=False)
            return
        self.bytes += done.num_bytes
        self.seconds += done.seconds
        self._complete(transfer)

    def drop(self, req_id: str) -> None:
        """Forget a transfer whose request finished or was aborted; frees both sides."""
        transfer = self.by_request.pop(req_id, None)
        if transfer is not None:
            self._unroute(transfer, cancel=True)
            self._release_src(transfer)

    def tick(self) -> None:
        """Route parked transfers and fail those the receiver has not confirmed in time."""
        now = time.monotonic()
        for transfer in list(self.by_request.values()):
            if transfer.dst is None:
                self._route(transfer)
            elif transfer.since is not None and now - transfer.since > self.timeout:
                self._fail(transfer, f"no confirmation after {self.timeout:.0f}s", cancel=True)

    def worker_died(self, worker_id: str) -> list[Request]:
        """Re-park transfers into a dead decode worker; return requests whose source KV died."""
        lost: list[Request] = []
        for transfer in list(self.by_request.values()):
            if transfer.dst == worker_id:
                self._unroute(transfer, cancel=False)
            elif transfer.src == worker_id:
                self.by_request.pop(transfer.request.request_id)
                self._unroute(transfer, cancel=True)
                if transfer.prefilled_at is not None:  # else its scheduler died with it
                    lost.append(transfer.request)
        return lost

    def _route(self, transfer: Transfer) -> None:
        decoders = [w for w in self.workers.values() if w.role == "decode"]
        src = self.workers.get(transfer.src)
        if not decoders or src is None:
            return
        dst = max(decoders, key=lambda w: w.free_blocks)
        if self._arriving(transfer, dst):
            return  # parked: retried each step, and it then shares those blocks
        reserved = dst.pool.reserve(transfer.request, transfer.num_tokens)
        if reserved is None:
            return
        # only the blocks the receiver's prefix cache lacks move
        reused, dst_ids = reserved
        self._seq += 1
        transfer_id = f"{transfer.request.request_id}#{self._seq}"
        transfer.transfer_id, transfer.dst = transfer_id, dst.id
        self._by_id[transfer_id] = transfer.request.request_id
        if transfer.prefilled_at is not None:
            transfer.since = time.monotonic()
        src_ids = src.pool.get_block_ids(transfer.request)[reused : reused + len(dst_ids)]
        src.sends.append(
            KVSendOrder(
                transfer_id, src_ids, dst.id, dst.ready.kv_address, dst_ids, dst.ready.kv_store
            )
        )
        dst.recvs.append(KVRecvOrder(transfer_id, dst_ids))

    def _arriving(self, transfer: Transfer, dst: Worker) -> bool:
        """Whether the first block `transfer` would move to `dst` is on its way there in
        another transfer. Requests that share a prompt prefix finish their prefills
        together, and each would move the shared blocks again (0.41x of the bytes on a
        shared-prefix c16 load in 1P+1D, where the decode side's cache alone would give
        ~0.2x); waiting for the first to land costs the others a step or two of their
        decode, not their first token, which the prefill step sampled."""
        if not dst.pool.enable_prefix_caching:
            return False
        missing = dst.pool.first_missing_block(transfer.request, transfer.num_tokens)
        return missing is not None and any(
            other.dst == dst.id and other is not transfer and missing in other.request.block_hashes
            for other in self.by_request.values()
        )

    def _unroute(self, transfer: Transfer, cancel: bool) -> None:
        """Give back the decode-side reservation (telling the receiver, if asked)."""
        if transfer.transfer_id is None:
            return
        transfer_id = transfer.transfer_id
        self._by_id.pop(transfer_id, None)
        src = self.workers.get(transfer.src)
        if src is not None:  # an order not yet sent is simply withdrawn
            src.sends = [o for o in src.sends if o.transfer_id != transfer_id]
        dst = self.workers.get(transfer.dst or "")
        if dst is not None:
            dst.pool.free(transfer.request)
            dst.recvs = [o for o in dst.recvs if o.transfer_id != transfer_id]
            if cancel:
                dst.cancels.append(transfer_id)
        transfer.transfer_id = transfer.dst = transfer.since = None
        transfer.early = None

    def _release_src(self, transfer: Transfer) -> None:
        src = self.workers.get(transfer.src)
        if src is not None and transfer.prefilled_at is not None:
            src.pool.free(transfer.request)

    def _complete(self, transfer: Transfer) -> None:
        request = self.by_request.pop(transfer.request.request_id).request
        assert transfer.transfer_id is not None and transfer.dst is not None
        self._by_id.pop(transfer.transfer_id, None)
        self._release_src(transfer)
        request.num_computed_tokens = transfer.num_tokens
        dst = self.workers[transfer.dst]
        dst.pool.cache_blocks(request)  # in place now: transfers routed after it share them
        self.landed(request, dst)

    def _fail(self, transfer: Transfer, reason: str, cancel: bool) -> None:
        """Fall back to recomputing the prompt on the decode worker that was to receive it."""
        logger.warning("KV transfer %s failed (%s): recomputing", transfer.transfer_id, reason)
        self.failures += 1
        dst = self.workers.get(transfer.dst or "")
        self.by_request.pop(transfer.request.request_id)
        self._unroute(transfer, cancel)
        self._release_src(transfer)
        self.lost(transfer.request, dst)
