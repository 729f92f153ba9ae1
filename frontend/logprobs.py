"""The core's TokenLogprobs rendered in the chat and the legacy completions formats."""

from __future__ import annotations

from engine_core.messages.common import TokenLogprobs
from frontend.responses import ChatTokenLogprob, CompletionLogprobs, TopLogprob
from models.tokenizer import Tokenizer

# JSON has no -inf; OpenAI-compatible servers report impossible tokens as this instead.
MIN_LOGPROB = -9999.0


class LogprobFormatter:
    """Turns token ids into the strings logprobs show, caching them per process."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            # a lone byte of a multi-byte character decodes to U+FFFD, as in OpenAI's API
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text

    def chat(self, entries: list[TokenLogprobs], top: int) -> list[ChatTokenLogprob]:
        """`top` alternatives per token (the sampled token comes first in each entry)."""
        return [self._chat_entry(e, top) for e in entries]

    def _chat_entry(self, entry: TokenLogprobs, top: int) -> ChatTokenLogprob:
        alternatives = [
            TopLogprob(self.token(t), _finite(lp), list(self.token(t).encode()))
            for t, lp in zip(entry.token_ids[1 : top + 1], entry.logprobs[1 : top + 1], strict=True)
        ]
        token = self.token(entry.token_ids[0])
        return ChatTokenLogprob(
            token, _finite(entry.logprobs[0]), list(token.encode()), alternatives
        )

    def completion(self, entries: list[TokenLogprobs], text_offset: int) -> CompletionLogprobs:
        """Legacy logprobs; `text_offset` is where the first token starts in the choice text."""
        out = CompletionLogprobs([], [], [], [])
        for entry in entries:
            token = self.token(entry.token_ids[0])
            out.tokens.append(token)
            out.token_logprobs.append(_finite(entry.logprobs[0]))
            out.top_logprobs.append(
                {
                    self.token(t): _finite(lp)
                    for t, lp in zip(entry.token_ids, entry.logprobs, strict=True)
                }
            )
            out.text_offset.append(text_offset)
            text_offset += len(token)
        return out


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)
