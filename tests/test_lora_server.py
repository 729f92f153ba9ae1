"""LoRA through the real server and the official openai client: adapters picked by `model`,
/v1/models with parents, runtime load/unload, metrics, and refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
import torch
from lora_adapters import write_adapter
from server_process import server_process
from transformers import AutoModelForCausalLM, PreTrainedModel

from engine_core import LLM, LoRARequest, SamplingParams

pytestmark = pytest.mark.slow

BASE = "tiny"
PROMPT = [1, 300, 301, 302, 303, 304]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def folder(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint(num_heads=4, num_kv_heads=2)


@pytest.fixture(scope="module")
def hf(folder: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def adapters(hf: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    made = {name: write_adapter(hf, root / name, seed=i) for i, name in enumerate("abc")}
    made["big"] = write_adapter(hf, root / "big", rank=32, seed=9)
    return made


@pytest.fixture(scope="module")
def expected(folder: Path, adapters: dict[str, Path]) -> dict[str | None, str]:
    """The offline LLM's greedy text for PROMPT, per adapter (None: the base model)."""
    llm = LLM(str(folder), dtype="float32", enable_lora=True, kv_cache_memory="32MiB")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out: dict[str | None, str] = {}
    for name in (None, "a", "b", "c"):
        lora = None if name is None else LoRARequest(name, 1, str(adapters[name]))
        out[name] = llm.generate([PROMPT], params, lora_request=lora)[0].outputs[0].text
    assert len(set(out.values())) == 4
    return out


@pytest.fixture(scope="module")
def url(
    folder: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "duet.log"
    args = [
        str(folder), "--served-model-name", BASE, "--dtype", "float32",
        "--kv-cache-memory", "32MiB", "--enable-lora", "--max-loras", "2",
        "--lora-modules", f"a={adapters['a']}", json.dumps({"name": "b", "path": str(adapters["b"])}),
    ]  # fmt: skip
    env = {"DUET_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    with server_process(args, log, env) as (_, server_url):
        yield server_url


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)


def _complete(client: openai.OpenAI, model: str) -> openai.types.Completion:
    return client.completions.create(
        model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip


def _post(url: str, path: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(
        f"{url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())["error"]["message"]


def test_models_lists_adapters_with_their_parent(client: openai.OpenAI, adapters) -> None:
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards)[:3] == [BASE, "a", "b"]
    assert getattr(cards[BASE], "parent", None) is None
    assert cards["a"].parent == BASE and cards["a"].root == str(adapters["a"])


def test_model_picks_the_adapter(client: openai.OpenAI, expected) -> None:
    for model, name in [(BASE, None), ("a", "a"), ("b", "b")]:
        reply = _complete(client, model)
        assert reply.model == model
        assert reply.choices[0].text == expected[name]


def test_a_stream_with_an_adapter_says_its_name(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
        )
    )
    assert chunks and all(c.model == "b" for c in chunks)


def test_an_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        _complete(client, "nope")
    assert info.value.code == "model_not_found"


def test_load_and_unload_at_run_time(url: str, client: openai.OpenAI, adapters, expected) -> None:
    assert _post(url, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(adapters["c"])}) == (
        200, "Success: LoRA adapter 'c' added successfully."
    )  # fmt: skip
    assert "c" in [m.id for m in client.models.list().data]
    assert _complete(client, "c").choices[0].text == expected["c"]
    status, message = _post(url, "/v1/load_lora_adapter",
                            {"lora_name": "c", "lora_path": str(adapters["c"])})  # fmt: skip
    assert (status, message) == (400, "The lora adapter 'c' has already been loaded.")
    status, message = _post(url, "/v1/unload_lora_adapter", {"lora_name": "c"})
    assert status == 200
    with pytest.raises(openai.NotFoundError):
        _complete(client, "c")
    assert _post(url, "/v1/unload_lora_adapter", {"lora_name": "c"}) == (
        404, "The lora adapter 'c' cannot be found."
    )  # fmt: skip


def test_bad_runtime_adapters_are_400_in_one_line(url: str, adapters, tmp_path: Path) -> None:
    big = {"lora_name": "big", "lora_path": str(adapters["big"])}
    status, message = _post(url, "/v1/load_lora_adapter", big)
    assert status == 400 and "rank 32 is above --max-lora-rank 16" in message
    status, message = _post(
        url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path)}
    )
    assert status == 400 and "no adapter_config.json" in message and "\n" not in message
    status, message = _post(url, "/v1/load_lora_adapter", {"lora_name": "x"})
    assert (status, message) == (400, "Both 'lora_name' and 'lora_path' must be provided.")


def test_metrics_carry_the_adapters(url: str, client: openai.OpenAI) -> None:
    _complete(client, "a")
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    lines = [line for line in text.splitlines() if line.startswith("duet:lora_requests_info{")]
    assert lines and all('max_lora="2"' in line for line in lines)
    assert any('running_lora_adapters="a"' in line for line in lines)


def test_a_bad_lora_module_stops_serve_in_one_line(folder: Path, adapters) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from frontend.cli import main; main()", "serve", str(folder),
         "--enable-lora", "--lora-modules", f"big={adapters['big']}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"duet: LoRA module 'big': {adapters['big']}: rank 32 is above --max-lora-rank 16"
    ]
