"""Types shared by both wire boundaries (frontend <-> core, core <-> worker)."""

from __future__ import annotations

import enum

import msgspec


class FinishReason(enum.IntEnum):
    """Why a request stopped; the names are the OpenAI API's strings."""

    STOP = 0  # EOS, a stop token or a stop string
    LENGTH = 1  # max_tokens or max_model_len
    ABORT = 2  # client went away, or the server shut down

    @property
    def api_name(self) -> str:
        return ("stop", "length", "abort")[self]


class ErrorKind(enum.IntEnum):
    """Who is to blame for a request's error: the frontend answers 400 or 503 from it."""

    SERVER = 0  # the engine or a worker failed; retrying later may work
    CLIENT = 1  # the request itself is invalid; retrying it as is never works


class TokenLogprobs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Logprobs for one sampled token, computed from the raw logits (as vLLM does).

    `token_ids[0]`/`logprobs[0]` are the sampled token; the rest are the top N in order.
    `rank` is the sampled token's 1-based rank in the distribution.
    """

    token_ids: list[int]
    logprobs: list[float]
    rank: int
