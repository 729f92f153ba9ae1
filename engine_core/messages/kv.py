"""Worker <-> worker wire for KV hand-off: a sender PUSHes one header per transfer to the
receiver's PULL socket (`WorkerReady.kv_address`), followed by the blocks' bytes as raw
frames when the connector ships them that way (tcp). Framed [type byte, header, data...].
"""

from __future__ import annotations

import enum

import msgspec
import zmq

from engine_core.messages.framing import Endpoint, MessageTable


class KVMsg(enum.IntEnum):
    HEADER = 0  # sender -> receiver: KVHeader, then the connector's data frames (if any)


class KVHeader(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Sender -> receiver: one transfer's metadata (never its bytes)."""

    transfer_id: str
    src_worker: str
    src_block_ids: list[int]
    dst_block_ids: list[int]
    started_at: float  # sender's time.time() when it began, for the transfer's duration
    shm_path: str = ""  # shm: the sender's pool file
    group: str = ""  # torch: the sender/receiver pair's process group key


TO_RECEIVER = MessageTable(
    "kv sender->receiver", {KVMsg.HEADER: KVHeader}, with_data=[KVMsg.HEADER]
)
_NOTHING_BACK = MessageTable("kv receiver->sender", {})

# NOTE: IMMEDIATE queues only on a live connection, so blocks bound for a receiver that
# died are dropped with its connection instead of piling up in the sender forever
SENDER = Endpoint(
    zmq.PUSH, sends=TO_RECEIVER, receives=_NOTHING_BACK, options={zmq.SNDHWM: 0, zmq.IMMEDIATE: 1}
)
RECEIVER = Endpoint(zmq.PULL, sends=_NOTHING_BACK, receives=TO_RECEIVER)
