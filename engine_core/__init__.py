"""duet's engine core: scheduling, block management, and the offline API."""

from engine_core.messages.sampling_params import SamplingParams

__all__ = ["LLM", "LoRARequest", "SamplingParams"]


def __getattr__(name: str) -> object:
    # The offline API pulls in torch and the model (and importing any wire module runs this
    # package's __init__, which must stay a leaf): import it only when asked for.
    if name == "LLM":
        from engine_core.llm import LLM

        return LLM
    if name == "LoRARequest":
        from engine_core.lora_request import LoRARequest

        return LoRARequest
    raise AttributeError(name)
