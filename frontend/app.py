"""The aiohttp application: routes, API-key check, and JSON bodies for every error."""

from __future__ import annotations

import hmac
import importlib.metadata
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from frontend import dashboard
from frontend.context import CONTEXT, ServerContext
from frontend.errors import APIError
from frontend.metrics import render_metrics
from frontend.responses import ModelCard, ModelList, Version, json_response
from frontend.serving_chat import create_chat_completion
from frontend.serving_completions import create_completion
from frontend.serving_lora import load_lora_adapter, runtime_updates_allowed, unload_lora_adapter
from frontend.serving_tokens import detokenize, tokenize

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024**2  # enough for a full context of token ids many times over
# no API key needed (the dashboard's page holds no data; its stats need the key)
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", *dashboard.PAGE_PATHS})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_app(
    ctx: ServerContext, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES
) -> web.Application:
    """The OpenAI-compatible app for one frontend process."""
    app = web.Application(
        client_max_size=max_body_bytes, middlewares=[_errors_as_json, _api_key_check(api_key)]
    )
    app[CONTEXT] = ctx
    app.router.add_post("/v1/chat/completions", create_chat_completion)
    app.router.add_post("/v1/completions", create_completion)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/version", version)
    if runtime_updates_allowed():
        app.router.add_post("/v1/load_lora_adapter", load_lora_adapter)
        app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter)
    dashboard.add_routes(app)
    return app


async def list_models(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    card = ModelCard(ctx.model_name, int(time.time()), ctx.max_model_len, root=ctx.model_name)
    adapters = [] if ctx.loras is None else ctx.loras.cards(ctx.max_model_len)
    return json_response(ModelList([card, *adapters]))


async def health(request: web.Request) -> web.Response:
    """200 while the engine core answers, else 503 (load balancers take us out)."""
    if not request.app[CONTEXT].client.is_healthy:
        # returned, not raised: probes poll this, and every 503 would be logged otherwise
        return APIError(
            503, "the engine core is not responding", code="engine_unavailable"
        ).response()
    return web.Response()


async def metrics(request: web.Request) -> web.Response:
    request.app[CONTEXT].metrics.flush()  # this process's last updates, not a step late
    body, content_type = render_metrics()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def version(request: web.Request) -> web.Response:
    dtype = request.app[CONTEXT].dtype
    return json_response(Version(importlib.metadata.version("duet"), dtype))


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as an OpenAI-style JSON body; a bug is a logged 500, not a trace."""
    try:
        return await handler(request)
    except APIError as exc:
        _log_rejection(request, exc)
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        error = APIError(exc.status, _http_message(request, exc), code=code, headers=allow)
        _log_rejection(request, error)
        return error.response()
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return APIError(500, "internal server error", code="internal_error").response()


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no route {request.method} {request.path}"
    return exc.text or exc.reason


def _log_rejection(request: web.Request, error: APIError) -> None:
    log = logger.warning if error.status >= 500 else logger.info
    log("%s %s -> %d %s", request.method, request.path, error.status, error.message)


def _api_key_check(api_key: str | None) -> Callable:
    expected = f"Bearer {api_key}".encode() if api_key else None

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is None or request.path in OPEN_PATHS:
            return await handler(request)
        # surrogateescape: aiohttp decodes odd header bytes that way; any bytes compare
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")
        return await handler(request)

    return check
