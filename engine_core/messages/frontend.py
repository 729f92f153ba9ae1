"""Frontend <-> core wire: requests and aborts in, per-step output batches out.

Each frontend process is a DEALER with its own identity on the core's ROUTER; the core
sends one StepOutputs per frontend per step. Every message is [type byte, msgpack payload];
TO_CORE and TO_FRONTEND are the only type -> Struct tables, CORE and FRONTEND the sockets.
"""

from __future__ import annotations

import enum

import msgspec
import zmq

from engine_core.messages.common import ErrorKind, FinishReason, TokenLogprobs
from engine_core.messages.framing import Endpoint, MessageTable
from engine_core.messages.lora import LoRARef
from engine_core.messages.sampling_params import SamplingParams
from engine_core.messages.speculative import SpecDecodeCounters


class FrontendMsg(enum.IntEnum):
    ADD = 0  # frontend -> core: AddRequest
    ABORT = 1  # frontend -> core: AbortRequests
    OUTPUTS = 2  # core -> frontend: StepOutputs
    HELLO = 3  # frontend -> core: no payload; registers the frontend's identity
    STATS = 4  # core -> frontend: EngineSnapshot, every SNAPSHOT_INTERVAL (dashboards, advice)


class AddRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0  # lower runs first, as in vLLM
    cache_salt: str | None = None
    lora: LoRARef | None = None  # None: the base model


class AbortRequests(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_ids: list[str]


class RequestDelta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """New tokens for one request since the previous step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    # the stop token id that finished the request, if any
    stop_reason: int | None = None
    num_cached_tokens: int = 0
    # why the request failed (e.g. a prompt longer than max_model_len); never a traceback
    error: str | None = None
    error_kind: ErrorKind = ErrorKind.SERVER
    # with the first token: prompt tokens 1.. (the first has none), if prompt_logprobs asked
    prompt_logprobs: list[TokenLogprobs] | None = None


class SchedulerStats(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    num_running: int = 0
    num_waiting: int = 0
    # pool name ("mixed" | "prefill" | "decode") -> fraction of blocks in use
    kv_cache_usage: dict[str, float] = {}
    prefix_cache_queries: int = 0  # cumulative tokens
    prefix_cache_hits: int = 0  # cumulative tokens
    num_preemptions: int = 0  # cumulative
    kv_transfer_bytes: int = 0
    kv_transfer_seconds: float = 0.0
    kv_transfer_failures: int = 0
    recomputed_prefills: int = 0
    structured_output_seconds: float = 0.0  # cumulative grammar-mask time in workers
    # disaggregated: worker id -> requests it has taken so far (cumulative)
    worker_requests: dict[str, int] = {}
    # adapter name -> its running / waiting requests (for duet:lora_requests_info)
    running_loras: dict[str, int] = {}
    waiting_loras: dict[str, int] = {}
    spec_decode: SpecDecodeCounters | None = None  # cumulative; None: no speculation


class WorkerSnapshot(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One worker as the core sees it right now."""

    worker_id: str
    role: str  # "mixed" | "prefill" | "decode"
    kv_cache_usage: float  # fraction of its KV blocks in use
    num_running: int
    num_waiting: int
    num_blocks: int


class EngineSnapshot(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The core's state beyond SchedulerStats, sent a few times a second, not every step."""

    timestamp: float
    workers: list[WorkerSnapshot]
    kv_transfers_in_flight: int = 0
    worker_deaths: int = 0  # cumulative, since the core started
    # disaggregated only: demand in worker-equivalents and the split it advises
    # (engine_core/pool_advice.py), each averaged over the advice window
    prefill_demand: float = 0.0
    decode_demand: float = 0.0
    pd_recommended_prefill_fraction: float | None = None


class StepOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    outputs: list[RequestDelta]
    timestamp: float
    stats: SchedulerStats | None = None


TO_CORE = MessageTable(
    "frontend->core",
    {FrontendMsg.ADD: AddRequest, FrontendMsg.ABORT: AbortRequests, FrontendMsg.HELLO: None},
)
TO_FRONTEND = MessageTable(
    "core->frontend", {FrontendMsg.OUTPUTS: StepOutputs, FrontendMsg.STATS: EngineSnapshot}
)

CORE = Endpoint(zmq.ROUTER, sends=TO_FRONTEND, receives=TO_CORE)
# NOTE: no high-water marks: dropping or blocking a frame would lose a request or a token
FRONTEND = Endpoint(
    zmq.DEALER, sends=TO_CORE, receives=TO_FRONTEND, options={zmq.SNDHWM: 0, zmq.RCVHWM: 0}
)
