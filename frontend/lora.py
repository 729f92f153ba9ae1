"""LoRA adapters as the API sees them: names a request's `model` may pick, /v1/models cards,
and vLLM's runtime POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

The registry only names adapters; the workers load them by path when a request first uses
one. Runtime updates are off unless DUET_ALLOW_RUNTIME_LORA_UPDATING is set (as vLLM's
VLLM_ALLOW_RUNTIME_LORA_UPDATING), since they let a client make the server read a path.
NOTE: each frontend process has its own registry: with --api-server-count > 1, a runtime
update reaches only the process that answered it.
"""

from __future__ import annotations

import os
import time

import msgspec
from aiohttp import web

from engine_core.messages.lora import LoRARef
from frontend.errors import APIError, bad_request
from frontend.protocol import decode_request
from frontend.responses import ModelCard
from models.config import ModelConfig
from models.lora_files import LoRAError, read_adapter

RUNTIME_UPDATES_ENV = "DUET_ALLOW_RUNTIME_LORA_UPDATING"


def runtime_updates_allowed() -> bool:
    return os.environ.get(RUNTIME_UPDATES_ENV, "").strip().lower() in ("1", "true")


class LoadLoRARequest(msgspec.Struct, kw_only=True):
    lora_name: str | None = None
    lora_path: str | None = None


class UnloadLoRARequest(msgspec.Struct, kw_only=True):
    lora_name: str | None = None
    lora_int_id: int | None = None  # accepted for vLLM clients; the name decides


class LoRARegistry:
    """The adapters one frontend serves, by name, checked against the base model."""

    def __init__(
        self,
        base_name: str,
        model: ModelConfig,
        max_lora_rank: int,
        enabled: bool,
        modules: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.base_name = base_name
        self.model = model
        self.max_lora_rank = max_lora_rank
        self.enabled = enabled
        self.adapters: dict[str, LoRARef] = {}
        for name, path in modules:
            self.add(name, path)

    def add(self, name: str, path: str) -> LoRARef:
        """Check and register an adapter; raises LoRAError (one line) if it is unusable."""
        if not self.enabled:
            raise LoRAError("LoRA adapters need --enable-lora")
        if name == self.base_name or name in self.adapters:
            raise LoRAError(f"The lora adapter '{name}' has already been loaded.")
        read_adapter(path, self.model, self.max_lora_rank)
        ref = self.adapters[name] = LoRARef(name, os.path.abspath(path))
        return ref

    def resolve(self, model: str | None) -> LoRARef | None:
        """The adapter `model` names (None: the base model); 404 for an unknown name."""
        if model is None or model == self.base_name:
            return None
        ref = self.adapters.get(model)
        if ref is None:
            raise APIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
        return ref

    def cards(self, max_model_len: int) -> list[ModelCard]:
        now = int(time.time())
        return [
            ModelCard(ref.name, now, max_model_len, root=ref.path, parent=self.base_name)
            for ref in self.adapters.values()
        ]


async def load_lora_adapter(request: web.Request) -> web.Response:
    """vLLM's POST /v1/load_lora_adapter {"lora_name", "lora_path"}."""
    registry = _registry(request)
    body = decode_request(await request.read(), LoadLoRARequest)
    if not body.lora_name or not body.lora_path:
        raise bad_request("Both 'lora_name' and 'lora_path' must be provided.", "lora_name")
    try:
        registry.add(body.lora_name, body.lora_path)
    except LoRAError as exc:
        raise bad_request(str(exc), "lora_path") from None
    return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' added successfully.")


async def unload_lora_adapter(request: web.Request) -> web.Response:
    """vLLM's POST /v1/unload_lora_adapter {"lora_name"}; requests already running finish."""
    registry = _registry(request)
    body = decode_request(await request.read(), UnloadLoRARequest)
    if not body.lora_name:
        raise bad_request("'lora_name' must be provided.", "lora_name")
    if registry.adapters.pop(body.lora_name, None) is None:
        raise APIError(
            404, f"The lora adapter '{body.lora_name}' cannot be found.", "lora_name",
            "lora_not_found",
        )  # fmt: skip
    return web.Response(text=f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _registry(request: web.Request) -> LoRARegistry:
    from frontend.context import CONTEXT

    registry = request.app[CONTEXT].loras
    if not registry.enabled:
        raise bad_request("LoRA adapters are not enabled (start with --enable-lora)")
    return registry
