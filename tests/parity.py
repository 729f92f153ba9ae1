"""Compare duet's greedy outputs with Hugging Face transformers, with vLLM's tolerance.

Two greedy runs may part where two tokens are nearly tied; vLLM accepts that when each
run's token sits in the other's top-k logprobs, and stops comparing the pair there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine_core.messages.common import TokenLogprobs

TOP_K = 5


@dataclass
class Reference:
    token_ids: list[int]
    top_ids: list[list[int]]  # per step, HF's top-k token ids


def hf_greedy(
    model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, eos: int | None
) -> list[Reference]:
    """HF greedy decoding one prompt at a time (no padding), with per-step top-k."""
    refs = []
    for ids in prompts:
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos if eos is not None else 0,
            output_logits=True,
            return_dict_in_generate=True,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
        new = out.sequences[0, len(ids) :].tolist()
        tops = [
            torch.log_softmax(step[0].float(), -1).topk(TOP_K).indices.tolist()
            for step in out.logits
        ]
        refs.append(Reference(new, tops[: len(new)]))
    return refs


def compare(ours: list[int], our_logprobs: list[TokenLogprobs], ref: Reference) -> bool:
    """Assert ours matches ref under vLLM's rule; True when a tolerated divergence happened."""
    for step, (mine, theirs) in enumerate(zip(ours, ref.token_ids, strict=False)):
        if mine == theirs:
            continue
        our_top = our_logprobs[step].token_ids[1 : TOP_K + 1]
        assert theirs in our_top and mine in ref.top_ids[step], (
            f"step {step}: duet {mine} (top {our_top}) vs HF {theirs} (top {ref.top_ids[step]})"
        )
        return True
    assert ours == ref.token_ids, (
        f"same prefix but different length: {len(ours)} vs {len(ref.token_ids)}"
    )
    return False
