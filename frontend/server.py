"""One frontend process: tokenizer, engine client and the HTTP app on a shared port.

Several frontends listen on the same port (SO_REUSEPORT: the kernel spreads connections
over them); each is its own DEALER on the engine core's ROUTER.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

import uvloop
from aiohttp import web

from engine_core.client import EngineClient
from engine_core.messages.curve import load_keys
from frontend.app import build_app
from frontend.context import ServerContext
from frontend.logprobs import LogprobFormatter
from frontend.lora import LoRARegistry
from frontend.metrics import EngineMetrics
from frontend.settings import FrontendSettings, setup_logging
from models.loader import ModelLoadError, load_config, resolve_model
from models.lora_files import LoRAError
from models.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

SHUTDOWN_MARGIN = 1.0  # seconds before aiohttp's own shutdown timeout that streams are ended


def run_frontend(
    settings: FrontendSettings, index: int, on_serving: Callable[[], None] | None = None
) -> None:
    """Process entry point: serve HTTP until SIGINT or SIGTERM, then stop cleanly.

    `on_serving` is called once the port is open (the launcher's sign that we came up)."""
    setup_logging(f"frontend-{index}")
    try:
        uvloop.run(serve(settings, index, on_serving))
    except ModelLoadError as exc:
        logger.error("cannot load the model: %s", exc)
        sys.exit(2)
    except LoRAError as exc:
        logger.error("cannot load a LoRA adapter: %s", exc)
        sys.exit(2)


async def serve(
    settings: FrontendSettings, index: int, on_serving: Callable[[], None] | None = None
) -> None:
    """Serve until a stop signal: stop accepting, let requests finish, abort the rest."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    ctx = build_context(settings, index)
    await ctx.client.start()
    app = build_app(ctx, settings.api_key)
    runner = web.AppRunner(
        app,
        # a client that disconnects cancels its handler, which aborts its requests
        handler_cancellation=True,
        access_log=None,  # generation.py logs each request once it is accepted
        shutdown_timeout=settings.shutdown_timeout,
    )
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port, reuse_port=True).start()
    gc.freeze()  # start-up objects out of full collections (see decode_workers/worker.py)
    host = settings.host or "0.0.0.0"
    logger.info(
        "listening on http://%s:%d (engine core %s)", host, settings.port, settings.engine_address
    )
    if on_serving is not None:
        on_serving()
    await stop.wait()
    logger.info("stopping: waiting up to %.0f s for requests in flight", settings.shutdown_timeout)
    # NOTE: aiohttp cancels handlers still running at shutdown_timeout, which cuts their
    # streams mid-body; end them a little earlier with an error event and [DONE] instead
    deadline = max(0.0, settings.shutdown_timeout - SHUTDOWN_MARGIN)
    loop.call_later(deadline, ctx.client.shut_down, "the server is shutting down")
    await runner.cleanup()
    await ctx.client.close()
    logger.info("stopped")


def build_context(settings: FrontendSettings, index: int) -> ServerContext:
    """Load the tokenizer and model shape, and make this process's engine client."""
    source = resolve_model(settings.model)
    tokenizer = load_tokenizer(source, chat_template=settings.chat_template)
    model_config = load_config(source)
    name = settings.served_model_name or source.name
    # frontend 0 alone turns the core's cumulative counters into metric increments
    metrics = EngineMetrics(
        name,
        apply_core_stats=index == 0,
        max_lora=settings.max_loras if settings.enable_lora else None,
    )
    identity = f"frontend-{index}-{socket.gethostname()}-{os.getpid()}".encode()
    return ServerContext(
        client=EngineClient(
            settings.engine_address,
            identity,
            on_stats=metrics.on_stats,
            on_snapshot=metrics.on_snapshot,
            keys=load_keys(settings.curve_keys),
        ),
        tokenizer=tokenizer,
        metrics=metrics,
        formatter=LogprobFormatter(tokenizer),
        model_name=name,
        max_model_len=settings.max_model_len or model_config.max_position_embeddings,
        vocab_size=model_config.vocab_size,
        max_waiting_requests=settings.max_waiting_requests,
        log_requests=settings.log_requests,
        dtype=settings.dtype,
        loras=LoRARegistry(name, model_config, settings.max_lora_rank, settings.enable_lora,
                           settings.lora_modules),
        tool_call_parser=settings.tool_call_parser,
    )  # fmt: skip
