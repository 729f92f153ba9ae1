"""Turn a validated OpenAI request into SamplingParams, with every range check as a 400."""

from __future__ import annotations

from typing import TypeVar

import msgspec

from engine_core.messages.sampling_params import SamplingParams, StructuredSpec
from frontend.errors import APIError, bad_request
from frontend.protocol import SamplingRequest

V = TypeVar("V")

LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for logit_bias values


def sampling_params(
    req: SamplingRequest,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    vocab_size: int,
    logprobs_param: str = "logprobs",
    structured: StructuredSpec | None = None,
) -> SamplingParams:
    """SamplingParams for `req`; `max_tokens` / `logprobs` are already endpoint-specific.

    `max_tokens` is the caller's request (None: until the context is full); it is fixed
    against the prompt length later by `fit_max_tokens`.
    """
    stop_token_ids = _pick(req.stop_token_ids, [])
    # the sampler indexes logits with these (min_tokens masks them)
    check_token_ids(stop_token_ids, vocab_size, "stop_token_ids")
    params = SamplingParams(
        n=_pick(req.n, 1),
        temperature=_pick(req.temperature, 1.0),
        top_p=_pick(req.top_p, 1.0),
        top_k=_pick(req.top_k, 0),
        min_p=_pick(req.min_p, 0.0),
        presence_penalty=_pick(req.presence_penalty, 0.0),
        frequency_penalty=_pick(req.frequency_penalty, 0.0),
        repetition_penalty=_pick(req.repetition_penalty, 1.0),
        logit_bias=_logit_bias(req.logit_bias, vocab_size),
        seed=req.seed,
        max_tokens=max_tokens,
        min_tokens=_pick(req.min_tokens, 0),
        stop=_stop_strings(req.stop),
        stop_token_ids=stop_token_ids,
        include_stop_str_in_output=_pick(req.include_stop_str_in_output, False),
        ignore_eos=_pick(req.ignore_eos, False),
        logprobs=logprobs,
        prompt_logprobs=req.prompt_logprobs,
        skip_special_tokens=_pick(req.skip_special_tokens, True),
        structured=structured,
    )
    try:
        params.validate()
    except ValueError as exc:
        message = str(exc)
        # validate()'s messages start with the field's name
        param = message.split(" ", 1)[0]
        if param == "logprobs":
            param = logprobs_param
            message = message.replace("logprobs", logprobs_param, 1)
        raise bad_request(message, param) from None
    return params


def fit_max_tokens(
    params: SamplingParams,
    num_prompt_tokens: int,
    max_model_len: int,
    default: int | None,
    prompt_param: str,
) -> SamplingParams:
    """Check the prompt fits the context and resolve an unset max_tokens.

    An unset max_tokens becomes `default` (or the rest of the context), capped to what
    the context allows; an explicit one that does not fit is a 400, as in OpenAI.
    """
    room = max_model_len - num_prompt_tokens
    if room <= 0:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has {num_prompt_tokens} tokens, which leaves no room for the completion.",
            prompt_param,
            "context_length_exceeded",
        )
    if params.max_tokens is None:
        params = msgspec.structs.replace(params, max_tokens=min(default or room, room))
    elif params.max_tokens > room:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + params.max_tokens} tokens ({num_prompt_tokens} in "
            f"the prompt, {params.max_tokens} for the completion). Please reduce the length of "
            "the prompt or of max_tokens.",
            "max_tokens",
            "context_length_exceeded",
        )
    if params.min_tokens > params.max_tokens:
        raise bad_request("min_tokens must not exceed max_tokens", "min_tokens")
    return params


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    """A 400 for any id the model has no embedding for."""
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise bad_request(
                f"token id {token_id} is outside the vocabulary [0, {vocab_size})", param
            )


def _pick(value: V | None, default: V) -> V:
    return default if value is None else value


def _stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else (stop or [])
    if any(s == "" for s in stops):
        raise bad_request("stop strings must not be empty", "stop")
    return stops


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    parsed: dict[int, float] = {}
    for key, value in bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise bad_request(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
        check_token_ids([token_id], vocab_size, "logit_bias")
        if not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
            raise bad_request(
                f"logit_bias values must be in [-100, 100], got {value}", "logit_bias"
            )
        parsed[token_id] = value
    return parsed
