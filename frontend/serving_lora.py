"""vLLM's runtime adapter updates: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

Off unless DUET_ALLOW_RUNTIME_LORA_UPDATING is set (as vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING):
they let a client make the server read a path of its choosing.
"""

from __future__ import annotations

import os

import msgspec
from aiohttp import web

from frontend.context import CONTEXT
from frontend.errors import APIError, bad_request
from frontend.lora import LoRARegistry
from frontend.protocol import decode_request
from models.lora_files import LoRAError

RUNTIME_UPDATES_ENV = "DUET_ALLOW_RUNTIME_LORA_UPDATING"


def runtime_updates_allowed() -> bool:
    return os.environ.get(RUNTIME_UPDATES_ENV, "").strip().lower() in ("1", "true")


class LoadLoRARequest(msgspec.Struct, kw_only=True):
    lora_name: str | None = None
    lora_path: str | None = None


class UnloadLoRARequest(msgspec.Struct, kw_only=True):
    lora_name: str | None = None
    lora_int_id: int | None = None  # accepted for vLLM clients; the name decides


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
    registry = request.app[CONTEXT].loras
    if registry is None or not registry.enabled:
        raise bad_request("LoRA adapters are not enabled (start with --enable-lora)")
    return registry
