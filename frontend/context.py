"""What every handler of one frontend process shares, and the checks made before admitting."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from engine_core.client import EngineClient
from engine_core.messages.lora import LoRARef
from frontend.errors import APIError
from frontend.logprobs import LogprobFormatter
from frontend.lora import LoRARegistry
from frontend.metrics import EngineMetrics
from models.tokenizer import Tokenizer

RETRY_AFTER_SECONDS = 1


@dataclass
class ServerContext:
    """One frontend's engine connection, tokenizer, metrics and serving limits."""

    client: EngineClient
    tokenizer: Tokenizer
    metrics: EngineMetrics
    formatter: LogprobFormatter
    model_name: str
    max_model_len: int
    vocab_size: int  # the model's embedding rows: every token id must be below this
    max_waiting_requests: int | None = None
    log_requests: bool = True
    dtype: str | None = None
    loras: LoRARegistry | None = None
    tool_call_parser: str | None = None  # tool_choice "auto" is enabled with this parser

    def check_model(self, model: str | None) -> LoRARef | None:
        """The LoRA adapter `model` names, None for the base model (or no `model`); 404 else."""
        if self.loras is not None:
            return self.loras.resolve(model)
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
        return None

    def admit(self) -> None:
        """503 while the engine core is down; 429 while too many requests wait."""
        if not self.client.is_healthy:
            raise APIError(503, "the engine core is not available", code="engine_unavailable")
        if self.max_waiting_requests is None:
            return
        stats = self.client.latest_stats
        # The core's count lags by up to a step; this frontend's own unstarted requests
        # cover a burst that arrives in between.
        waiting = max(stats.num_waiting if stats else 0, self.client.num_unstarted)
        if waiting >= self.max_waiting_requests:
            raise APIError(
                429,
                f"too many requests waiting ({waiting}); retry shortly",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )


CONTEXT = web.AppKey("context", ServerContext)
