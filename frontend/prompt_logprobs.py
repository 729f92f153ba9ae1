"""Prompt logprobs in the API: vLLM's `prompt_logprobs` field, and `echo` with `logprobs`.

The core sends one TokenLogprobs per prompt token after the first (nothing predicts the
first), with the first output token. vLLM's field is a list with None first, then per
token a dict token id -> {logprob, rank, decoded_token} holding the prompt token and the
top N there; echo shows the same numbers in the legacy completions shape.
"""

from __future__ import annotations

import msgspec

from engine_core.messages.common import TokenLogprobs
from engine_core.messages.sampling_params import SamplingParams
from frontend.errors import bad_request
from frontend.logprobs import MIN_LOGPROB, LogprobFormatter
from frontend.protocol import SamplingRequest
from frontend.responses import CompletionLogprobs, PromptLogprob

PromptLogprobs = list[dict[int, PromptLogprob] | None]


def check_prompt_logprobs(req: SamplingRequest) -> None:
    """400 for what vLLM refuses too: prompt logprobs on a stream (they come all at once)."""
    if req.prompt_logprobs is not None and req.stream:
        raise bad_request("prompt_logprobs are not available when stream=true", "prompt_logprobs")


def render(formatter: LogprobFormatter, entries: list[TokenLogprobs]) -> PromptLogprobs:
    """vLLM's shape: None for the first prompt token, then one dict per token."""
    out: PromptLogprobs = [None]
    for entry in entries:
        ranks = [entry.rank, *range(1, len(entry.token_ids))]  # the top N in order
        scored: dict[int, PromptLogprob] = {}
        for token_id, logprob, rank in zip(entry.token_ids, entry.logprobs, ranks, strict=True):
            # the prompt token may also be in the top N; JSON has no -inf (frontend/logprobs.py)
            if token_id not in scored:
                entry_lp = max(logprob, MIN_LOGPROB)
                scored[token_id] = PromptLogprob(entry_lp, rank, formatter.token(token_id))
        out.append(scored)
    return out


def echo_logprobs(
    formatter: LogprobFormatter, prompt: list[int], entries: list[TokenLogprobs]
) -> CompletionLogprobs:
    """Legacy logprobs of an echoed prompt: the first token's are null, as in OpenAI's API."""
    first = formatter.token(prompt[0])
    rest = formatter.completion(entries, len(first))
    return CompletionLogprobs(
        [first, *rest.tokens],
        [None, *rest.token_logprobs],
        [None, *rest.top_logprobs],
        [0, *rest.text_offset],
    )


def echo_params(params: SamplingParams, echo: bool) -> SamplingParams:
    """As vLLM: echo with logprobs scores the prompt too (with the same top N, unless
    prompt_logprobs says otherwise)."""
    if echo and params.logprobs is not None and params.prompt_logprobs is None:
        return msgspec.structs.replace(params, prompt_logprobs=params.logprobs)
    return params
