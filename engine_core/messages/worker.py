"""Core <-> worker wire: step plans down, step results and hand-shakes up.

Following vLLM v1, a worker keeps its own copy of each running request (tokens, block
table, sampling state); a plan carries new requests in full and running ones as diffs.
A request resumed after preemption comes back as a new request with all of its tokens.
Every message is framed as [type byte, msgpack payload]; TO_WORKER and TO_CORE are the
only type -> Struct tables, and the endpoints below the only socket set-ups.
"""

from __future__ import annotations

import enum

import msgspec
import zmq

from engine_core.messages.common import TokenLogprobs
from engine_core.messages.config import EngineConfig, env_seconds
from engine_core.messages.framing import Endpoint, MessageTable
from engine_core.messages.lora import LoRARef
from engine_core.messages.sampling_params import SamplingParams


class WorkerMsg(enum.IntEnum):
    READY = 0  # worker -> core: WorkerReady
    PLAN = 1  # core -> worker: StepPlan
    RESULT = 2  # worker -> core: StepResult
    SHUTDOWN = 3  # core -> worker: no payload
    HEARTBEAT = 4  # worker -> core: no payload
    KV_DONE = 5  # receiving worker -> core: KVTransferDone
    JOIN = 6  # a worker started by hand -> core: WorkerJoin, before loading anything
    CONFIG = 7  # core -> that worker: the core's EngineConfig, so both sides agree


HEARTBEAT_SUFFIX = "/hb"  # identity of a worker's heartbeat socket: "<worker id>/hb"
JOIN_SUFFIX = "/join"  # identity of a remote worker's configuration request
# seconds of heartbeat silence after which a worker counts as dead; beats come 6x as often
HEARTBEAT_TIMEOUT = env_seconds("DUET_HEARTBEAT_TIMEOUT", 1.5)
# NOTE: the core sees a local worker's exit at once (its process sentinel), so silence only
# has to catch a hang there; a CPU-starved but healthy worker must not be restarted for it
LOCAL_HEARTBEAT_TIMEOUT = env_seconds("DUET_LOCAL_HEARTBEAT_TIMEOUT", 10.0)


class WorkerJoin(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A worker started on another host asks the core for its configuration."""

    worker_id: str
    role: str


class WorkerReady(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """First message a worker sends: who it is and how much KV it holds."""

    worker_id: str
    role: str  # "mixed" | "prefill" | "decode"
    num_blocks: int
    block_size: int
    max_model_len: int
    # disaggregated roles: where KV senders reach this worker (see kv_transfer/)
    kv_address: str = ""
    kv_store: str = ""  # torch connector: host:port of this receiver's TCPStore
    kv_shm: str = ""  # shm connector: the file under /dev/shm holding this sender's KV pool


class NewRequestData(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    req_id: str
    # prompt + any output already generated (a resumed request recomputes them all)
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    lora: LoRARef | None = None  # the worker loads it by path on first use


class CachedRequestData(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    # Tokens the worker has not seen yet (e.g. sampled by another worker); usually empty.
    new_token_ids: list[int] = []


class KVSendOrder(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Prefill worker: once this plan's forward is done, ship these blocks to a receiver."""

    transfer_id: str
    src_block_ids: list[int]
    dst_worker: str
    dst_address: str  # the receiver's WorkerReady.kv_address
    dst_block_ids: list[int]
    dst_store: str = ""  # the receiver's WorkerReady.kv_store (torch connector)


class KVRecvOrder(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Decode worker: accept transfer `transfer_id` into these blocks, then report KV_DONE."""

    transfer_id: str
    dst_block_ids: list[int]


class KVTransferDone(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The receiver's word on one transfer: only this makes a transfer complete."""

    transfer_id: str
    ok: bool
    num_bytes: int = 0
    seconds: float = 0.0  # from the sender's start to the receiver's last byte landed
    error: str | None = None


class StepPlan(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One engine step for one worker: which requests advance by how many tokens."""

    step_id: int
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    # req_id -> tokens to compute this step; a request samples iff this reaches its end
    num_scheduled_tokens: dict[str, int]
    # requests the worker must forget (finished, aborted, preempted)
    finished_req_ids: list[str] = []
    # KV hand-off orders (disaggregated mode); cancels are applied before anything else
    kv_cancels: list[str] = []
    kv_recvs: list[KVRecvOrder] = []
    kv_sends: list[KVSendOrder] = []
    # speculative decoding: req_id -> draft tokens appended to its scheduled tokens (vLLM's
    # scheduled_spec_decode_tokens); the worker verifies them and samples one more
    spec_token_ids: dict[str, list[int]] = {}


class StepResult(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What a worker computed for one plan: one sampled token per sampling request.

    `logprobs` is None when no request of the step asked for them; otherwise one row per
    req_id, None for the requests that did not ask.
    """

    step_id: int
    req_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None = None
    # req_id -> logprobs of the prompt tokens this step scored, one per scheduled position
    # p < num_prompt_tokens - 1 (for token p + 1); only requests with prompt_logprobs
    prompt_logprobs: dict[str, list[TokenLogprobs]] = {}
    error: str | None = None  # the step failed on the worker (logged there, not for clients)
    # speculative decoding: req_id -> the drafts it accepted, which come before its sampled
    # token in the output; and their logprobs, for the requests that asked for logprobs
    accepted_token_ids: dict[str, list[int]] = {}
    accepted_logprobs: dict[str, list[TokenLogprobs]] = {}
    structured_seconds: float = 0.0  # spent building and applying grammar masks this step


TO_WORKER = MessageTable(
    "core->worker",
    {WorkerMsg.PLAN: StepPlan, WorkerMsg.SHUTDOWN: None, WorkerMsg.CONFIG: EngineConfig},
)
TO_CORE = MessageTable(
    "worker->core",
    {
        WorkerMsg.READY: WorkerReady,
        WorkerMsg.RESULT: StepResult,
        WorkerMsg.HEARTBEAT: None,
        WorkerMsg.KV_DONE: KVTransferDone,
        WorkerMsg.JOIN: WorkerJoin,
    },
)

# NOTE: ROUTER_MANDATORY, so a plan for a worker whose connection is gone fails at once
CORE = Endpoint(zmq.ROUTER, sends=TO_WORKER, receives=TO_CORE, options={zmq.ROUTER_MANDATORY: 1})
WORKER = Endpoint(zmq.DEALER, sends=TO_CORE, receives=TO_WORKER)
# a worker's heartbeat socket ("<id>/hb"): never queue a backlog of stale beats
HEARTBEAT = Endpoint(zmq.DEALER, sends=TO_CORE, receives=TO_WORKER, options={zmq.SNDHWM: 2})
