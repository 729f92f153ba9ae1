"""The request sets `duet bench serve` can send: random, prefix-repetition, mixed, repeat,
jsonl."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from frontend.bench.paragraphs import CUE, INSTRUCTION, PARAGRAPHS
from frontend.bench.tokens import TokenSampler


@dataclass(frozen=True)
class SampleRequest:
    """One request to send; `prompt_len` is our count (the server's usage count wins)."""

    prompt: str
    prompt_len: int
    max_tokens: int
    model: str | None = None  # None: the run's --model (else a --lora-modules pick)


def random_requests(
    sampler: TokenSampler, num: int, input_len: int, output_len: int
) -> list[SampleRequest]:
    """`num` prompts of `input_len` random tokens, each asking for `output_len` tokens."""
    return [_sample(sampler, sampler.ids(input_len), output_len) for _ in range(num)]


def prefix_repetition_requests(
    sampler: TokenSampler,
    num: int,
    prefix_len: int,
    suffix_len: int,
    num_prefixes: int,
    output_len: int,
) -> list[SampleRequest]:
    """`num` prompts sharing `num_prefixes` random prefixes, each with its own suffix.

    Prefixes take turns (0, 1, ..., 0, 1, ...) so a prefix recurs while it is likely
    still cached. Prompts share the prefix text exactly; BPE may merge a token across the
    seam, so a prompt can be a token longer or shorter than prefix_len + suffix_len.
    """
    if not 0 < num_prefixes <= num:
        raise ValueError(f"--num-prefixes must be in 1..{num} (the number of prompts)")
    prefixes = [sampler.text(sampler.ids(prefix_len))[0] for _ in range(num_prefixes)]
    requests = []
    for i in range(num):
        prompt = prefixes[i % num_prefixes] + sampler.text(sampler.ids(suffix_len))[0]
        prompt_len = len(sampler.tokenizer.encode(prompt, add_special_tokens=False))
        requests.append(SampleRequest(prompt, prompt_len, output_len))
    return requests


def mixed_requests(
    sampler: TokenSampler,
    num: int,
    short_len: int,
    long_len: int,
    long_fraction: float,
    output_len: int,
) -> list[SampleRequest]:
    """Short chats with long prompts arriving among them.

    The long ones sit at evenly spaced positions away from both ends, so each lands
    while short requests are streaming: the case where a long prefill stalls decodes.
    """
    num_long = round(num * long_fraction)
    long_at = {(k + 1) * num // (num_long + 1) for k in range(num_long)}
    return [
        _sample(sampler, sampler.ids(long_len if i in long_at else short_len), output_len)
        for i in range(num)
    ]


def repeat_requests(sampler: TokenSampler, num: int, output_len: int) -> list[SampleRequest]:
    """Copy-heavy prompts: "repeat this paragraph exactly", the paragraphs taking turns.

    Meant for greedy decoding at concurrency 1, with and without n-gram speculation; the
    prompt reads as a task both as a completion and as a chat message.
    """
    requests = []
    for i in range(num):
        prompt = INSTRUCTION + PARAGRAPHS[i % len(PARAGRAPHS)] + CUE
        prompt_len = len(sampler.tokenizer.encode(prompt, add_special_tokens=False))
        requests.append(SampleRequest(prompt, prompt_len, output_len))
    return requests


def jsonl_requests(path: Path, num: int | None, default_max_tokens: int) -> list[SampleRequest]:
    """Requests from a file of {"prompt": str, "max_tokens": int} lines (the first `num`)."""
    requests = []
    with path.open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                prompt = item["prompt"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f'{path}:{line_no}: not a {{"prompt": ...}} object') from e
            requests.append(
                SampleRequest(prompt, 0, int(item.get("max_tokens", default_max_tokens)))
            )
            if len(requests) == num:
                break
    return requests


def _sample(sampler: TokenSampler, ids: list[int], output_len: int) -> SampleRequest:
    text, ids = sampler.text(ids)
    return SampleRequest(text, len(ids), output_len)
