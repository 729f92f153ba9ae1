"""The engine core's model of one request: its tokens, progress, block hashes and stops."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Collection, Sequence
from typing import NamedTuple

import msgspec

from engine_core.async_steps import InflightSteps
from engine_core.messages.common import FinishReason, TokenLogprobs
from engine_core.messages.frontend import AddRequest
from engine_core.messages.lora import LoRARef
from engine_core.messages.sampling_params import SamplingParams

# A block's identity for prefix caching: sha256 of (parent hash, block tokens, salt).
BlockHash = bytes

_encoder = msgspec.msgpack.Encoder()


def hash_block_tokens(
    parent: BlockHash | None,
    token_ids: Sequence[int],
    cache_salt: str | None = None,
    lora: LoRARef | None = None,
) -> BlockHash:
    """Hash one full block, chained to the hash of the block before it.

    NOTE: sha256 rather than Python's hash(): it is stable across processes (str hashes
    are salted per process) and collisions are out of the question, so a hash can name
    KV content anywhere — prefill and decode pools, or a cache-aware router later.
    The salt and the adapter enter the first block only; the chain carries them into every
    later block, so KV computed under one adapter is never a hit for another (or the base).
    """
    extra = (cache_salt,) if lora is None else (cache_salt, lora.key)
    payload = _encoder.encode((parent, list(token_ids), *extra))
    return hashlib.sha256(payload).digest()


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # back in the waiting queue, holding no blocks
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


class Request:
    """One request as the engine core sees it.

    `num_computed_tokens` counts tokens whose KV exists in the request's blocks; the gap
    to `num_tokens` is what the scheduler closes. After a step that samples token t,
    t is in `all_token_ids` but not yet computed, so the next step schedules it.
    `block_hashes` covers every full block of `all_token_ids` and grows as blocks fill.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        block_size: int,
        arrival_time: float = 0.0,
        priority: int = 0,
        cache_salt: str | None = None,
        lora: LoRARef | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.block_size = block_size
        self.arrival_time = arrival_time
        self.priority = priority
        self.cache_salt = cache_salt
        self.lora = lora
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        # prefix-cache hit at first admission (resumption after preemption keeps it)
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        # in a step that failed: scheduled alone until it samples, failed if that fails too
        self.suspect = False
        self.inflight = InflightSteps()  # plans not yet back from the worker (async_steps.py)
        self.status = RequestStatus.WAITING
        self.stop_reason: int | None = None
        self.block_hashes: list[BlockHash] = []
        self._hash_full_blocks()
        # prompt_logprobs: entry p scores prompt token p + 1; sent once, with the first token
        self.prompt_logprobs: list[TokenLogprobs] = []
        self.prompt_logprobs_sent = False

    @classmethod
    def from_add_request(cls, msg: AddRequest, block_size: int) -> Request:
        """Build a request from the frontend's message, hashing in `block_size` blocks."""
        return cls(
            msg.request_id,
            msg.prompt_token_ids,
            msg.sampling_params,
            block_size,
            arrival_time=msg.arrival_time,
            priority=msg.priority,
            cache_salt=msg.cache_salt,
            lora=msg.lora,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_planned_computed(self) -> int:
        """Computed tokens once the plans in flight are done: where the next plan starts."""
        return self.num_computed_tokens + self.inflight.num_tokens

    @property
    def num_planned_tokens(self) -> int:
        """Tokens including those the plans in flight will sample (placeholders)."""
        return self.num_tokens + self.inflight.num_placeholders

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        """Record a sampled token and hash the block it completes, if any."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        self._hash_full_blocks()

    def record_prompt_logprobs(self, start: int, entries: list[TokenLogprobs]) -> None:
        """Store a step's prompt logprobs for positions from `start` on; a recomputed
        prefill (after preemption or a lost worker) overwrites what it scores again."""
        del self.prompt_logprobs[start:]
        self.prompt_logprobs.extend(entries)

    def take_prompt_logprobs(self) -> list[TokenLogprobs] | None:
        """The prompt logprobs to deliver now: once, when asked for, else None."""
        if self.sampling_params.prompt_logprobs is None or self.prompt_logprobs_sent:
            return None
        self.prompt_logprobs_sent = True
        return self.prompt_logprobs

    def _hash_full_blocks(self) -> None:
        size = self.block_size
        while (len(self.block_hashes) + 1) * size <= len(self.all_token_ids):
            index = len(self.block_hashes)
            parent = self.block_hashes[-1] if index else None
            tokens = self.all_token_ids[index * size : (index + 1) * size]
            salt, lora = (self.cache_salt, self.lora) if index == 0 else (None, None)
            self.block_hashes.append(hash_block_tokens(parent, tokens, salt, lora))


class Stop(NamedTuple):
    """Why a request must finish after its latest token."""

    status: RequestStatus
    stop_token: int | None = None  # set only for a token from stop_token_ids


def check_stop(request: Request, eos_token_ids: Collection[int], max_model_len: int) -> Stop | None:
    """Decide whether `request` is done after appending its latest output token.

    Token stops come first: a request whose last allowed token is EOS finished
    naturally ("stop"), not by length. Before `min_tokens` no token stops it (the
    sampler is expected to suppress them; this keeps the count honest regardless).
    As in vLLM, EOS reports no stop token while a stop_token_ids hit does.
    """
    params = request.sampling_params
    last = request.output_token_ids[-1]
    if request.num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and last in eos_token_ids:
            return Stop(RequestStatus.FINISHED_STOPPED)
        if last in params.stop_token_ids:
            return Stop(RequestStatus.FINISHED_STOPPED, last)
    max_tokens = params.max_tokens
    if max_tokens is not None and request.num_output_tokens >= max_tokens:
        return Stop(RequestStatus.FINISHED_LENGTH)
    if request.num_tokens >= max_model_len:
        return Stop(RequestStatus.FINISHED_LENGTH)
    return None
