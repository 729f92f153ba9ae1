"""Tokenizing without stalling the event loop: long texts are tokenized in a thread.

A megabyte prompt takes seconds to tokenize; on the event loop that would freeze every
other stream of the process (and /health) meanwhile. The Rust tokenizer releases the GIL
while it works, so a thread keeps the loop serving. Short texts stay inline: below
INLINE_MAX_CHARS tokenizing costs about what the hand-off to a thread does (~0.2 ms).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from models.tokenizer import Tokenizer

INLINE_MAX_CHARS = 1024
# two threads: a second long prompt need not wait for the first; the machine has 2 cores
_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")


async def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """`tokenizer.encode(text)`, in a thread when `text` is long."""
    if len(text) <= INLINE_MAX_CHARS:
        return tokenizer.encode(text, add_special_tokens)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_POOL, tokenizer.encode, text, add_special_tokens)


async def apply_chat_template(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """`tokenizer.apply_chat_template(...)`, in a thread when the messages are long."""
    if sum(len(m["content"]) for m in messages) <= INLINE_MAX_CHARS and not tools:
        return tokenizer.apply_chat_template(messages, add_generation_prompt)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        _POOL, tokenizer.apply_chat_template, messages, add_generation_prompt, tools
    )
