"""Per-request sampling parameters, with vLLM's names, defaults and meaning."""

from __future__ import annotations

import math

import msgspec


class StructuredSpec(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A constraint on a request's output, as data: workers compile it (cached by value).

    kind: "json" (spec is a JSON schema's text), "json_object" (any JSON object; spec is
    empty), "regex" or "grammar" (spec is EBNF, xgrammar's dialect of GBNF).
    """

    kind: str
    spec: str = ""


class SamplingParams(msgspec.Struct, omit_defaults=True, gc=False, kw_only=True):
    """How to sample one request's tokens and when to stop.

    Crosses frontend -> core -> worker, so it is a msgspec Struct. `stop` strings are
    matched by the text side (frontend / offline LLM); the engine core handles every
    token-level stop (EOS, stop_token_ids, max_tokens, max_model_len).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16  # None: until max_model_len
    min_tokens: int = 0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    # None: no logprobs; 0: the sampled token's only; N: plus the top N.
    logprobs: int | None = None
    # None: none; N: each prompt token's logprob (after the first) plus the top N there.
    # NOTE: such a request takes no prefix-cache hits: every prompt position is scored.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured: StructuredSpec | None = None  # constrained decoding (structured outputs)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def validate(self) -> None:
        """Raise ValueError with an OpenAI-style message for out-of-range values."""
        checks = [
            (self.n >= 1, "n must be at least 1"),
            (
                self.temperature >= 0.0 and math.isfinite(self.temperature),
                "temperature must be a non-negative number",
            ),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k >= -1, "top_k must be -1 (disable) or at least 1"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (0.0 < self.repetition_penalty <= 2.0, "repetition_penalty must be in (0, 2]"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.min_tokens >= 0, "min_tokens must be non-negative"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens must not exceed max_tokens",
            ),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                "prompt_logprobs must be in [0, 20]",
            ),
            (
                all(-100.0 <= v <= 100.0 for v in (self.logit_bias or {}).values()),
                "logit_bias values must be in [-100, 100]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
