"""Incremental detokenization with stop strings, shared by the server and the offline LLM.

Tokens arrive a few at a time; text must come out as soon as it is certain: never half of
a multi-byte character (byte-level BPE and byte-fallback tokens split them), and never
text that a later token could turn into a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from engine_core.messages.sampling_params import SamplingParams

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

if TYPE_CHECKING:
    from models.tokenizer import Tokenizer

# Prompt tokens decoded ahead of the output, so tokenizers that drop the leading space of
# the first decoded token (SentencePiece's Metaspace) still emit it for the first output.
PROMPT_CONTEXT_TOKENS = 6


class _TokenStream(Protocol):
    def step(self, token_id: int) -> str:
        """Text that token_id completes; "" while a character is still partial."""
        ...


class _FastStream:
    """tokenizers' own DecodeStream (Rust), used whenever the installed version has it."""

    def __init__(self, hf: Any, skip_special_tokens: bool, context: list[int]) -> None:
        self._backend = hf.backend_tokenizer
        self._stream = DecodeStream(ids=context, skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._backend, token_id) or ""


class _OffsetStream:
    """The prefix/read-offset method: decode a short window and emit what it grew by."""

    def __init__(self, hf: Any, skip_special_tokens: bool, context: list[int]) -> None:
        self._hf = hf
        self._skip = skip_special_tokens
        self._ids = list(context)
        self._read = len(self._ids)  # ids[:read] are already emitted (or are the prompt)

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        emitted = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        # A trailing U+FFFD means the last token ends inside a character: wait for more.
        if len(text) <= len(emitted) or text.endswith("\ufffd"):
            return ""
        # The emitted window becomes the new prefix: enough context for spacing rules.
        del self._ids[: self._read]
        self._read = len(self._ids)
        return text[len(emitted) :]

    def _decode(self, ids: list[int]) -> str:
        return self._hf.decode(
            ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False
        )


def _token_stream(
    hf: Any, skip_special_tokens: bool, prompt_token_ids: Sequence[int]
) -> _TokenStream:
    context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
    if DecodeStream is not None and hasattr(hf, "backend_tokenizer"):
        return _FastStream(hf, skip_special_tokens, context)
    return _OffsetStream(hf, skip_special_tokens, context)


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas, applying `params.stop`.

    `update` returns only text that is final: while streaming, a tail that could still
    grow into a stop string is held back until it can't (or the request finishes). A
    matched stop string ends the text, excluded unless `include_stop_str_in_output`.
    """

    def __init__(
        self, tokenizer: Tokenizer, params: SamplingParams, prompt_token_ids: Sequence[int]
    ) -> None:
        self._stream = _token_stream(tokenizer.hf, params.skip_special_tokens, prompt_token_ids)
        self._stops = [s for s in params.stop if s]
        self._include_stop = params.include_stop_str_in_output
        self.text = ""  # everything decoded so far, cut at a stop string
        self.num_tokens = 0  # output tokens consumed; none after the one matching a stop
        self.stop_string: str | None = None
        self._sent = 0  # len(text) already returned by update()

    def update(self, new_token_ids: Sequence[int], finished: bool) -> tuple[str, str | None]:
        """Feed one step's tokens; return (text to emit now, matched stop string or None).

        After a stop string matches, the remaining tokens are ignored and the held-back
        text is released, so the caller can end the request at once.
        """
        for token_id in new_token_ids:
            if self.stop_string is not None:
                break
            self.num_tokens += 1
            piece = self._stream.step(token_id)
            if piece:
                self._append(piece)
        final = finished or self.stop_string is not None
        end = len(self.text) if final else len(self.text) - self._held_back()
        delta = self.text[self._sent : end]
        self._sent = end
        return delta, self.stop_string

    def _append(self, piece: str) -> None:
        start = len(self.text)
        self.text += piece
        match = _first_stop(self.text, start, self._stops)
        if match is not None:
            index, stop = match
            self.stop_string = stop
            self.text = self.text[: index + len(stop) if self._include_stop else index]

    def _held_back(self) -> int:
        """Length of the longest unsent tail that is a proper prefix of a stop string."""
        if self._include_stop:
            return 0  # the stop string would be emitted anyway, so nothing to hide
        tail = self.text[self._sent :]
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(tail)), longest, -1):
                if tail.endswith(stop[:k]):
                    longest = k
                    break
        return longest


def _first_stop(text: str, new_from: int, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends after `new_from` (i.e. uses new text), if any."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop, max(0, new_from - len(stop) + 1))
        if index != -1 and (best is None or index < best[0]):
            best = (index, stop)
    return best
