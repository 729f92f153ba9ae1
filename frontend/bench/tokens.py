"""Prompts of exact token lengths, for the synthetic datasets.

The tokenizer must be the served model's: prompt lengths are what the datasets promise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np


class PromptTokenizer(Protocol):
    """What the datasets need; duet's `models.tokenizer.Tokenizer` and any Hugging Face
    tokenizer fit."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def all_special_ids(self) -> list[int]: ...

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def load_prompt_tokenizer(path: str | None) -> PromptTokenizer:
    """`--tokenizer`: None = duet's embedded default model, a .gguf file, else a Hugging
    Face tokenizer folder (or hub name)."""
    if path is None or Path(path).suffix.lower() == ".gguf":
        from models.loader import resolve_model
        from models.tokenizer import load_tokenizer

        return load_tokenizer(resolve_model(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class TokenSampler:
    """Random ordinary (non-special) token ids, and text that encodes to an exact length."""

    def __init__(self, tokenizer: PromptTokenizer, rng: np.random.Generator) -> None:
        self.tokenizer = tokenizer
        self.rng = rng
        special = set(tokenizer.all_special_ids)
        self._allowed = np.array([i for i in range(tokenizer.vocab_size) if i not in special])

    def ids(self, n: int) -> list[int]:
        """`n` token ids drawn uniformly from the ordinary vocabulary."""
        return self._allowed[self.rng.integers(0, len(self._allowed), size=n)].tolist()

    def text(self, ids: list[int], max_tries: int = 10) -> tuple[str, list[int]]:
        """Text for `ids` that re-encodes to exactly len(ids) tokens, and those tokens.

        Decoding then encoding rarely round-trips (BPE merges across the seams), so the
        encoded ids are cut or padded and tried again; after `max_tries` the length may be
        off by a few tokens, and the returned ids say by how much.
        """
        target = len(ids)
        for _ in range(max_tries):
            text = self.tokenizer.decode(ids)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == target:
                return text, ids
            ids = ids[:target] if len(ids) > target else ids + self.ids(target - len(ids))
        text = self.tokenizer.decode(ids)
        return text, self.tokenizer.encode(text, add_special_tokens=False)
