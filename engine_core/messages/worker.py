"""Core <-> worker wire: step plans down, step results and hand-shakes up.

Following vLLM v1, a worker keeps its own copy of each running request (tokens, block
table, sampling state); a plan carries new requests in full and running ones as diffs.
A request resumed after preemption comes back as a new request with all of its tokens.
Every message is framed as [type byte, msgpack payload].
"""

from __future__ import annotations

import enum

import msgspec

from engine_core.messages.common import TokenLogprobs
from engine_core.sampling_params import SamplingParams


class WorkerMsg(enum.IntEnum):
    READY = 0  # worker -> core: WorkerReady
    PLAN = 1  # core -> worker: StepPlan
    RESULT = 2  # worker -> core: StepResult
    SHUTDOWN = 3  # core -> worker: no payload
    HEARTBEAT = 4  # worker -> core: no payload


class WorkerReady(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """First message a worker sends: who it is and how much KV it holds."""

    worker_id: str
    role: str  # "mixed" | "prefill" | "decode"
    num_blocks: int
    block_size: int
    max_model_len: int


class NewRequestData(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    req_id: str
    # prompt + any output already generated (a resumed request recomputes them all)
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


class CachedRequestData(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int
    # Tokens the worker has not seen yet (e.g. sampled by another worker); usually empty.
    new_token_ids: list[int] = []


class StepPlan(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One engine step for one worker: which requests advance by how many tokens."""

    step_id: int
    new_requests: list[NewRequestData]
    cached_requests: list[CachedRequestData]
    # req_id -> tokens to compute this step; a request samples iff this reaches its end
    num_scheduled_tokens: dict[str, int]
    # requests the worker must forget (finished, aborted, preempted)
    finished_req_ids: list[str] = []


class StepResult(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What a worker computed for one plan: one sampled token per sampling request."""

    step_id: int
    req_ids: list[str]
    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    error: str | None = None
