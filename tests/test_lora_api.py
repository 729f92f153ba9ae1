"""LoRA's API surface without a server: the flags' parsing and the runtime-update switch."""

from __future__ import annotations

import argparse

import pytest

from frontend.app import build_app
from frontend.lora_args import lora_module
from frontend.serving_lora import RUNTIME_UPDATES_ENV

RUNTIME_ROUTES = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}


def _routes() -> set[str]:
    # the routes are fixed when the app is built; no handler runs, so no context is needed
    app = build_app(None)  # type: ignore[arg-type]
    return {route.resource.canonical for route in app.router.routes()}


def test_runtime_updates_are_routed_only_when_the_env_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(RUNTIME_UPDATES_ENV, raising=False)
    assert not RUNTIME_ROUTES & _routes()
    monkeypatch.setenv(RUNTIME_UPDATES_ENV, "0")
    assert not RUNTIME_ROUTES & _routes()
    for value in ("1", "True"):
        monkeypatch.setenv(RUNTIME_UPDATES_ENV, value)
        assert _routes() >= RUNTIME_ROUTES


def test_lora_modules_take_vllms_two_forms() -> None:
    assert lora_module("sql=/adapters/sql") == ("sql", "/adapters/sql")
    assert lora_module("a=/x=y") == ("a", "/x=y")
    assert lora_module('{"name": "sql", "path": "/adapters/sql", "base_model_name": "m"}') == (
        "sql",
        "/adapters/sql",
    )
    for bad in ("sql", "=/p", "sql=", '{"name": "x"}', "{nope"):
        with pytest.raises(argparse.ArgumentTypeError):
            lora_module(bad)
