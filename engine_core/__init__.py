"""duet's engine core: scheduling, block management, and the offline API."""

from engine_core.lora_request import LoRARequest
from engine_core.messages.sampling_params import SamplingParams

__all__ = ["LLM", "LoRARequest", "SamplingParams"]


def __getattr__(name: str) -> object:
    # The offline LLM pulls in torch and the model; import it only when asked for.
    if name == "LLM":
        from engine_core.llm import LLM

        return LLM
    raise AttributeError(name)
