"""vLLM's offline handle on an adapter: `LoRARequest(lora_name, lora_int_id, lora_path)`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine_core.messages.lora import LoRARef


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT adapter folder to generate with. As in vLLM, `lora_int_id` must be positive;
    duet tells adapters apart by name and path, so the id is only checked."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be at least 1, got {self.lora_int_id}")

    def ref(self) -> LoRARef:
        return LoRARef(self.lora_name, str(self.lora_path))


def per_prompt_refs(
    lora_request: LoRARequest | Sequence[LoRARequest | None] | None, count: int
) -> list[LoRARef | None]:
    """One adapter (or None) per prompt, from one request for all or a list of them."""
    if lora_request is None or isinstance(lora_request, LoRARequest):
        ref = None if lora_request is None else lora_request.ref()
        return [ref] * count
    if len(lora_request) != count:
        raise ValueError(f"got {len(lora_request)} LoRA requests for {count} prompts")
    return [None if r is None else r.ref() for r in lora_request]
