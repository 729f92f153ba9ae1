"""What the launcher hands each frontend process; light to import (no torch, no aiohttp)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

TOOL_CALL_PARSERS = ("hermes",)  # --tool-call-parser choices (frontend/tool_calls.py)


@dataclass(frozen=True)
class FrontendSettings:
    """Per-process settings of `duet serve` / `duet frontend`, with vLLM's flag meanings."""

    engine_address: str
    model: str | None = None
    served_model_name: str | None = None
    chat_template: str | None = None
    tool_call_parser: str | None = None  # set only with --enable-auto-tool-choice
    max_model_len: int | None = None
    host: str | None = None
    port: int = 8000
    api_key: str | None = None
    max_waiting_requests: int | None = None
    log_requests: bool = True
    curve_keys: str | None = None  # a `duet keys` directory for a tcp engine address
    dtype: str | None = None  # the model dtype `duet serve` resolved (reported by /version)
    # seconds in-flight requests get to finish on SIGTERM before they are aborted
    shutdown_timeout: float = 10.0
    # LoRA (vLLM's --enable-lora, --lora-modules, --max-lora-rank, --max-loras)
    enable_lora: bool = False
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, path)
    max_lora_rank: int = 16
    max_loras: int = 1


def setup_logging(name: str) -> None:
    """One line per event, tagged with the process's role (as the engine core does)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
