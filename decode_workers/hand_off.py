"""The decode worker's side of the KV hand-off: land transfers the core announced, confirm them."""

from __future__ import annotations

import torch
import zmq

from engine_core.messages.config import EngineConfig
from engine_core.messages.curve import CurveKeys
from engine_core.messages.worker import KVTransferDone, StepPlan
from kv_transfer import KVReceiver, make_receiver
from models.runner import KVAllocator, zeros_allocator


class ReceiverSide:
    """Owns the KV receiver; its socket joins the worker's poll loop."""

    def __init__(
        self, config: EngineConfig, worker_id: str, kv_host: str, keys: CurveKeys | None
    ) -> None:
        self.kind = config.kv_connector
        self.kv_host = kv_host
        self.keys = keys
        self.receiver: KVReceiver | None = None

    @property
    def allocator(self) -> KVAllocator:
        return zeros_allocator

    def attach(self, ctx: zmq.Context, kv_cache: torch.Tensor) -> None:
        self.receiver = make_receiver(self.kind, ctx, kv_cache, self.kv_host, self.keys)

    def ready_fields(self) -> dict[str, str]:
        assert self.receiver is not None
        return {"kv_address": self.receiver.address, "kv_store": self.receiver.store_address}

    @property
    def socket(self) -> zmq.Socket | None:
        return None if self.receiver is None else self.receiver.sock

    def before_step(self, plan: StepPlan) -> None:
        """Apply the plan's cancels, then its expectations, before its forward runs."""
        assert self.receiver is not None
        for transfer_id in plan.kv_cancels:
            self.receiver.cancel(transfer_id)
        for order in plan.kv_recvs:
            self.receiver.expect(order)

    def after_step(self, plan: StepPlan) -> None:
        """Nothing to do: landing happens in `poll`, between steps."""

    def poll(self) -> list[KVTransferDone]:
        assert self.receiver is not None
        return self.receiver.poll()

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
