"""Cross-host connector without GPUs: the blocks ride beside the header as ZeroMQ frames.

The sender gathers the (possibly scattered) blocks into one contiguous tensor and hands
its memory to ZeroMQ without copying; the receiver views the arrived frame as a tensor
and scatters it into its pool.
"""

from __future__ import annotations

import math
import warnings

import torch
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


class TcpSender(KVSender):
    def _ship(self, order: KVSendOrder, header: KVHeader) -> None:
        blocks = gather_blocks(self.kv_cache, order.src_block_ids).cpu()  # [L, 2, k, bs, Hkv, D]
        # NOTE: ZeroMQ keeps a reference to the array until the frame is sent; no copy.
        self._push(order.dst_address, header, [blocks.view(torch.uint8).reshape(-1).numpy()])


class TcpReceiver(KVReceiver):
    def _fetch(self, header: KVHeader, payload: list[zmq.Frame]) -> Landing:
        shape = blocks_shape(self.kv_cache, len(header.src_block_ids))
        nbytes = math.prod(shape) * self.kv_cache.element_size()
        if len(payload) != 1 or len(payload[0].buffer) != nbytes:
            return _failing(ValueError(f"expected one data frame of {nbytes} bytes"))
        with warnings.catch_warnings():
            # the frame is read-only; we only ever read it
            warnings.simplefilter("ignore", UserWarning)
            data = torch.frombuffer(payload[0].buffer, dtype=self.kv_cache.dtype)

        def land(kv: torch.Tensor, dst_ids: list[int]) -> None:
            scatter_blocks(kv, dst_ids, data.view(shape))

        return land


def _failing(error: Exception) -> Landing:
    def land(kv: torch.Tensor, dst_ids: list[int]) -> None:
        raise error

    return land
