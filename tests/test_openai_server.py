"""The real server end to end: `duet serve` in a subprocess, driven by the official openai SDK.

Error cases use raw HTTP, since the SDK would hide the status codes and bodies under test.
Generation is kept to a few tokens per request: the CPU is shared and a step is ~30 ms+.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from server_process import running_server

from models.cpu_features import resolve_dtype

pytestmark = pytest.mark.slow

KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct"
JSON = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`duet serve` with two frontends on a free port: yields (base URL, its log file)."""
    log = tmp_path_factory.mktemp("server") / "duet.log"
    args = [
        "--api-key", KEY, "--max-model-len", "512", "--kv-cache-memory", "128MiB",
        "--max-num-seqs", "8", "--api-server-count", "2", "--max-waiting-requests", "16",
    ]  # fmt: skip
    with running_server(args, log) as url:
        yield url, log


@pytest.fixture(scope="session")
def url(server: tuple[str, Path]) -> str:
    return server[0]


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture
def aclient(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)


def test_both_frontends_listen(server: tuple[str, Path]) -> None:
    text = server[1].read_text()
    assert "frontend-0 INFO listening" in text and "frontend-1 INFO listening" in text


def test_models_and_open_paths(url: str, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    for path in ("/health", "/version", "/metrics"):
        with urllib.request.urlopen(f"{url}{path}", timeout=10) as resp:
            assert resp.status == 200


def test_version_reports_the_dtype_auto_chose(url: str) -> None:
    # the server runs with the test process's environment, DUET_CPU_ISA included
    with urllib.request.urlopen(f"{url}/version", timeout=10) as resp:
        assert json.loads(resp.read())["dtype"] == resolve_dtype("auto")


def test_chat_greedy(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=JAPAN, max_tokens=16, temperature=0
    )
    choice = reply.choices[0]
    assert "Tokyo" in (choice.message.content or "") and choice.finish_reason == "stop"
    assert (
        reply.usage
        and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    )


def test_stream_equals_non_stream_for_a_seed(client: openai.OpenAI) -> None:
    args = {"model": MODEL, "messages": JAPAN, "max_tokens": 12, "temperature": 0.8, "seed": 7}
    whole = client.chat.completions.create(**args)
    chunks = list(
        client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content


def test_completions_batch_and_n(aclient: openai.AsyncOpenAI) -> None:
    async def go() -> openai.types.Completion:
        return await aclient.completions.create(
            model=MODEL, prompt=["The sky is", "Water is"], n=2, max_tokens=4, temperature=0
        )

    result = asyncio.run(go())
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    texts = [c.text for c in result.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: samples agree
    assert result.usage and 0 < result.usage.completion_tokens <= 4 * 4


def test_many_streaming_clients(aclient: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> tuple[str, str | None]:
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=6, temperature=0, stream=True,
        )  # fmt: skip
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def go() -> list[tuple[str, str | None]]:
        return await asyncio.gather(*(one(i) for i in range(6)))

    results = asyncio.run(go())
    assert all(text and reason in ("stop", "length") for text, reason in results)


def test_stop_string_and_chat_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=JAPAN, max_tokens=16, temperature=0, stop=["Tokyo"],
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    choice = reply.choices[0]
    assert "Tokyo" not in (choice.message.content or "") and choice.finish_reason == "stop"
    assert choice.model_extra and choice.model_extra["stop_reason"] == "Tokyo"
    entries = choice.logprobs.content if choice.logprobs else []
    assert reply.usage and len(entries) == reply.usage.completion_tokens
    for entry in entries:  # greedy: the sampled token is the most likely one
        assert (
            len(entry.top_logprobs) == 2 and entry.logprob >= entry.top_logprobs[0].logprob - 1e-4
        )


def test_completion_token_prompt_logprobs(url: str, client: openai.OpenAI) -> None:
    request = urllib.request.Request(
        f"{url}/tokenize", data=b'{"prompt": "The capital of France is"}', headers=JSON
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        prompt = json.loads(resp.read())["tokens"]
    result = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2
    )
    logprobs = result.choices[0].logprobs
    assert (
        logprobs and len(logprobs.tokens or []) == 3 and len((logprobs.top_logprobs or [])[0]) >= 2
    )


async def _raw(url: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}{path}", data=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "param"),
    [
        ("/v1/chat/completions", b"{nope", JSON, 400, None),
        ("/v1/chat/completions", b'{"messages": 5}', JSON, 400, "messages"),
        ("/v1/chat/completions", b'{"messages": [], "tools": [{"type": "function"}]}', JSON, 400, "tools"),
        ("/v1/completions", b'{"prompt": "x", "temperature": -1}', JSON, 400, "temperature"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": 600}', JSON, 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "model": "nope"}', JSON, 404, "model"),
        ("/v1/nowhere", b"{}", JSON, 404, None),
        ("/v1/completions", b'{"prompt": "x"}', {"Content-Type": "application/json"}, 401, None),
        ("/v1/completions", b'{"prompt": "x"}', {**JSON, "Authorization": "Bearer wrong"}, 401, None),
        ("/v1/completions", b'{"prompt": "' + b"a" * (8 * 1024**2) + b'"}', JSON, 413, None),
    ],
)  # fmt: skip
def test_errors(
    url: str, path: str, body: bytes, headers: dict, status: int, param: str | None
) -> None:
    got, error = asyncio.run(_raw(url, path, body, headers))
    assert got == status and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["param"] == param


def _aborted_count(url: str) -> float:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(r'duet:request_success_total\{finished_reason="abort"[^}]*\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_disconnect_aborts_the_request(url: str) -> None:
    before = _aborted_count(url)
    body = b'{"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true, "stream": true}'

    async def read_one_chunk_then_leave() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{url}/v1/completions", data=body, headers=JSON) as resp,
        ):
            assert resp.status == 200
            await resp.content.readline()

    asyncio.run(read_one_chunk_then_leave())
    deadline = time.monotonic() + 60
    while _aborted_count(url) <= before:
        assert time.monotonic() < deadline, "the request was not aborted after the client left"
        time.sleep(0.5)


def test_too_many_waiting_requests_get_429(url: str) -> None:
    # 64 tokens each keep the first 8 running while the rest of the burst arrives: with one
    # token each a fast machine started requests before 16 were ever waiting
    body = b'{"prompt": [1, 2], "max_tokens": 64, "ignore_eos": true}'

    async def flood() -> list[tuple[int, str | None]]:
        async with aiohttp.ClientSession() as session:

            async def one() -> tuple[int, str | None]:
                async with session.post(f"{url}/v1/completions", data=body, headers=JSON) as resp:
                    await resp.read()
                    return resp.status, resp.headers.get("Retry-After")

            return await asyncio.gather(*(one() for _ in range(48)))

    results = asyncio.run(flood())
    assert {status for status, _ in results} <= {200, 429}
    assert any(status == 429 and retry for status, retry in results)
    assert any(status == 200 for status, _ in results)
