"""The prefill worker's side of the KV hand-off: after a step, ship finished prompts' blocks."""

from __future__ import annotations

import logging

import torch
import zmq

from engine_core.messages.config import EngineConfig
from engine_core.messages.curve import CurveKeys
from engine_core.messages.worker import KVTransferDone, StepPlan
from kv_transfer import KVSender, ShmAllocator, make_sender
from models.runner import KVAllocator, zeros_allocator

logger = logging.getLogger(__name__)


class SenderSide:
    """Owns the KV sender; the pool goes to shared memory when the connector wants it there."""

    def __init__(
        self, config: EngineConfig, worker_id: str, kv_host: str, keys: CurveKeys | None
    ) -> None:
        self.kind = config.kv_connector
        self.worker_id = worker_id
        self.kv_host = kv_host
        self.keys = keys
        self.shm = ShmAllocator(worker_id) if self.kind == "shm" else None
        self.sender: KVSender | None = None

    @property
    def allocator(self) -> KVAllocator:
        return self.shm or zeros_allocator

    def attach(self, ctx: zmq.Context, kv_cache: torch.Tensor) -> None:
        self.sender = make_sender(
            self.kind, ctx, self.worker_id, kv_cache, self.shm, self.keys, self.kv_host
        )

    def ready_fields(self) -> dict[str, str]:
        return {"kv_shm": self.shm.path if self.shm else ""}

    @property
    def socket(self) -> zmq.Socket | None:
        return None

    def before_step(self, plan: StepPlan) -> None:
        """Nothing to do: a prefill worker receives no KV."""

    def after_step(self, plan: StepPlan) -> None:
        """The step's forward has written the KV, so the blocks it names are ready to go."""
        assert self.sender is not None
        for order in plan.kv_sends:
            try:
                self.sender.send(order)
            except Exception:  # the core times the transfer out and recomputes; we live on
                logger.exception(
                    "could not send transfer %s to %s", order.transfer_id, order.dst_worker
                )

    def poll(self) -> list[KVTransferDone]:
        assert self.sender is not None
        self.sender.poll()
        return []

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        if self.shm is not None:
            self.shm.unlink()
