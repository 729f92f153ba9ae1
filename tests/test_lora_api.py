"""LoRA without a model or a server: flag parsing, the runtime-update switch, and the
adapter checks on malformed folders."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from frontend.app import build_app
from frontend.bench.cli import pick_lora_modules
from frontend.bench.client import RequestSettings, payload
from frontend.bench.datasets import SampleRequest
from frontend.lora_args import lora_module
from frontend.serving_lora import RUNTIME_UPDATES_ENV
from models.config import ModelConfig
from models.loader import load_config
from models.lora_files import LoRAError, read_adapter

RUNTIME_ROUTES = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
MODEL = ModelConfig("llama", 100, 64, 128, 2, 4, 2, 16, 1e-6, 10000.0, 2048, False)


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


@pytest.mark.parametrize(
    ("config", "weights", "expected"),
    [
        ("{nope", None, "unreadable (JSONDecodeError)"),
        ("[1, 2]", None, "not a JSON object"),
        ('{"r": true, "lora_alpha": 8}', None, "needs a positive integer r"),
        ('{"r": 0}', None, "needs a positive integer r"),
        ('{"r": 4, "target_modules": [1, "q_proj"]}', None, "unknown target module '1'"),
        ('{"r": 4, "use_dora": true}', None, "DoRA is not supported"),
        ('{"r": 4, "bias": "all"}', None, "bias='all' is not supported"),
        ('{"r": 4}', b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]", "not a safetensors file"),
        ('{"r": 4}', b"\xff" * 8, "not a safetensors file"),
        ('{"r": 4}', b"\x02\x00\x00\x00\x00\x00\x00\x00{}", "holds no LoRA tensors"),
    ],
)
def test_malformed_adapters_are_refused_in_one_line(
    tmp_path: Path, config: str, weights: bytes | None, expected: str
) -> None:
    (tmp_path / "adapter_config.json").write_text(config)
    if weights is not None:
        (tmp_path / "adapter_model.safetensors").write_bytes(weights)
    with pytest.raises(LoRAError) as info:
        read_adapter(tmp_path, MODEL, max_rank=16)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_bench_spreads_requests_over_the_lora_modules() -> None:
    requests = [SampleRequest(f"p{i}", 1, 4) for i in range(200)]
    picked = pick_lora_modules(requests, ["a", "b", "c"], np.random.default_rng(0))
    assert [r.prompt for r in picked] == [r.prompt for r in requests]
    assert {r.model for r in picked} == {"a", "b", "c"}
    again = pick_lora_modules(requests, ["a", "b", "c"], np.random.default_rng(0))
    assert [r.model for r in again] == [r.model for r in picked]  # seeded
    settings = RequestSettings(url="http://x/v1/completions", model="base", chat=False)
    assert payload(picked[0], settings)["model"] == picked[0].model
    assert payload(requests[0], settings)["model"] == "base"


def test_made_adapters_pass_the_check(tmp_path: Path, default_source) -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "make_lora_adapters.py"
    subprocess.run([sys.executable, str(script), str(tmp_path), "--count", "2", "--rank", "4"],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    model = load_config(default_source)
    for name in ("a0", "a1"):
        spec = read_adapter(tmp_path / name, model, max_rank=16)
        assert (spec.rank, spec.scaling, len(spec.tensors)) == (4, 2.0, 7 * model.num_hidden_layers)
