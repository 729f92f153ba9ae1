"""Hostile clients against one real server: bodies generated from the request schemas,
raw bytes no JSON library would write, a multi-megabyte prompt, and 2,000 requests at once.

One `duet serve` over a tiny random checkpoint serves every test here: one frontend (so
/health and the big prompt share an event loop), 64 sequences, and a context of
MAX_MODEL_LEN tokens, so whatever a generated body asks for, its generation stays short.
The promise under test: no answer >= 500, no Python exception text in any body, and an
engine that is healthy after every case.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_process import running_server

from frontend.protocol import ChatCompletionRequest, CompletionRequest

MAX_MODEL_LEN = 64
MAX_NUM_SEQS = 64
MAX_WAITING = 256
MAX_BODY_BYTES = 8 * 1024**2  # frontend.app's default limit
EXAMPLES = 30  # per endpoint: with the raw cases, well under a minute on 2 busy cores
OVERLOAD = 2000
# what leaks when an exception's text reaches a client
EXCEPTION_TEXT = re.compile(r"Traceback|File \"|\b[A-Z]\w*(Error|Exception)\b")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("hostile") / "duet.log"
    args = [
        "--model", str(tiny_checkpoint()), "--max-model-len", str(MAX_MODEL_LEN),
        "--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting-requests", str(MAX_WAITING),
        "--kv-cache-memory", "64MiB", "--api-server-count", "1", "--disable-log-requests",
    ]  # fmt: skip
    with running_server(args, log) as url:
        yield url


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _post(
    url: str, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*_host_port(url), timeout=120)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _health(url: str) -> int:
    conn = http.client.HTTPConnection(*_host_port(url), timeout=60)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    finally:
        conn.close()


def _check_answer(status: int, body: bytes) -> None:
    """< 500; an error is an OpenAI JSON error; no exception text anywhere it could leak."""
    assert status < 500, (status, body[:1000])
    if status != 200:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert not EXCEPTION_TEXT.search(error["message"]), error
        return
    # generated text may say anything; only error events are checked for leaked text
    frames = body.split(b"\n\n") if body.startswith(b"data: ") else [body]
    for frame in frames:
        payload = frame.removeprefix(b"data: ")
        if payload in (b"", b"[DONE]"):
            continue
        decoded = json.loads(payload)
        if "error" in decoded:
            assert not EXCEPTION_TEXT.search(decoded["error"]["message"]), decoded
        else:
            assert decoded["choices"] is not None, decoded


def _check_case(url: str, path: str, body: bytes) -> None:
    _check_answer(*_post(url, path, body))
    assert _health(url) == 200


ROLES = ["system", "developer", "user", "assistant", "tool", "narrator"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10,
)


def _request_schema(kind: type) -> dict[str, Any]:
    """The JSON schema msgspec derives from a request Struct, minus `model` and `Any` fields.

    Those are the OpenAI parameters duet refuses (and a model it does not serve): any
    value of theirs is a quick 4xx, which would hide every path behind it. Roles come
    from a short list for the same reason.
    """
    schema = msgspec.json.schema(kind)
    for name, definition in schema["$defs"].items():
        props = definition.get("properties", {})
        for field in [f for f, s in props.items() if f == "model" or set(s) <= {"default"}]:
            del props[field]
        if name == "ChatMessage":
            props["role"] = {"enum": ROLES}
    return schema


def _from_schema(node: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """JSON values matching `node`, for the subset of JSON Schema msgspec writes.

    Numbers and strings are left unbounded where the schema leaves them so: huge or
    negative integers, odd floats and any Unicode are the hostile part.
    """
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        return st.deferred(lambda: _from_schema(defs[name], defs))
    if "anyOf" in node:
        return st.one_of([_from_schema(option, defs) for option in node["anyOf"]])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    kind = node.get("type")
    if kind == "object":
        props = {k: _from_schema(v, defs) for k, v in node.get("properties", {}).items()}
        if not props:
            values = _from_schema(node.get("additionalProperties", {}), defs)
            return st.dictionaries(st.text(max_size=8), values, max_size=4)
        required = set(node.get("required", []))
        return st.fixed_dictionaries(
            {k: v for k, v in props.items() if k in required},
            optional={k: v for k, v in props.items() if k not in required},
        )
    simple = {
        "array": lambda: st.lists(_from_schema(node["items"], defs), max_size=5),
        "integer": lambda: st.integers(node.get("minimum"), node.get("maximum")),
        "number": lambda: st.floats(allow_nan=False, allow_infinity=False),
        "string": lambda: st.text(max_size=30),
        "boolean": st.booleans,
        "null": st.none,
    }
    return simple[kind]() if kind in simple else JSON_VALUES


def _bodies(kind: type) -> st.SearchStrategy[bytes]:
    schema = _request_schema(kind)
    # ensure_ascii=False: the strings' own UTF-8 reaches the server, not \u escapes
    return _from_schema(schema, schema["$defs"]).map(
        lambda body: json.dumps(body, ensure_ascii=False).encode()
    )


SCHEMA_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SCHEMA_SETTINGS
@given(body=_bodies(ChatCompletionRequest))
def test_generated_chat_bodies(server: str, body: bytes) -> None:
    _check_case(server, "/v1/chat/completions", body)


@SCHEMA_SETTINGS
@given(body=_bodies(CompletionRequest))
def test_generated_completion_bodies(server: str, body: bytes) -> None:
    _check_case(server, "/v1/completions", body)


VALID = {
    "/v1/chat/completions": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}',
    "/v1/completions": b'{"prompt": "hi", "max_tokens": 2}',
}

RAW_BODIES = [
    b"",
    b"null",
    b"[]",
    b'"a string"',
    b"\xff\xfe\xfd",
    b'{"prompt": "\xff\xfe", "messages": [{"role": "user", "content": "\xc3\x28"}]}',
    b'{"prompt": "\\ud800", "messages": [{"role": "user", "content": "\\udfff"}]}',
    b'{"prompt": "a\\u0000b", "messages": [{"role": "user", "content": "\\u0000"}]}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    b'{"messages": [{"role": "user", "content": ' + b"{" * 5_000 + b"}",
    b'{"prompt": "hi", "max_tokens": 1' + b"0" * 400 + b"}",
    b'{"prompt": "hi", "max_tokens": -1' + b"0" * 400 + b"}",
    b'{"prompt": "hi", "temperature": 1e400, "max_tokens": 2}',
    b'{"prompt": "hi", "temperature": -1e400, "max_tokens": 2}',
    b'{"prompt": "hi", "top_p": 1e-400, "max_tokens": 2}',
    b'{"prompt": "hi", "temperature": NaN}',
    b'{"prompt": "hi", "temperature": Infinity}',
    b'{"prompt": "hi", "top_k": 18446744073709551616}',
    b'{"prompt": "hi", "top_k": 9223372036854775807, "max_tokens": 2}',
    b'{"prompt": "hi", "seed": 9223372036854775807, "n": 2, "max_tokens": 2}',
    b'{"prompt": "hi", "logit_bias": {"1": 1e400}, "max_tokens": 2}',
    b'{"prompt": "hi", "logit_bias": {"99999999999999999999": 1}}',
    b'{"prompt": "hi", "stop": ["' + b"x" * 100_000 + b'"], "max_tokens": 2}',
    b'{"prompt": [9223372036854775807]}',
    b'{"prompt": [-1]}',
    b'{"prompt": "hi", "n": "2"}',
    b'{"prompt": {"text": "hi"}}',
    b'{"messages": "hi"}',
    b'{"messages": [{"role": "user", "content": [{"type": "text"}]}]}',
    b'{"messages": [{"role": null, "content": "hi"}]}',
    b'{"prompt": "hi", "stream": "yes"}',
    b'{"prompt": "hi", "stream_options": {"include_usage": 1}}',
    b'{"prompt": "hi", "prompt": [1, 2], "max_tokens": 2}',
]


@pytest.mark.parametrize("path", ENDPOINTS)
def test_raw_bytes(server: str, path: str) -> None:
    for body in RAW_BODIES:
        _check_answer(*_post(server, path, body))
    for cut in range(1, len(VALID[path])):  # the valid body truncated at every byte
        status, answer = _post(server, path, VALID[path][:cut])
        _check_answer(status, answer)
        assert status == 400, (VALID[path][:cut], answer)
    assert _post(server, path, VALID[path])[0] == 200
    assert _health(server) == 200


def test_body_cut_off_mid_upload_and_oversized(server: str) -> None:
    host, port = _host_port(server)
    for path in ENDPOINTS:
        # the client promises more bytes than it sends, then leaves
        with socket.create_connection((host, port), timeout=30) as sock:
            head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            sock.sendall(f"{head}Content-Length: 1000\r\n\r\n".encode() + VALID[path][:10])
        status, answer = _post(server, path, b" " * (MAX_BODY_BYTES + 1))
        assert status == 413, answer
        _check_answer(status, answer)
        assert _health(server) == 200


def test_megabyte_prompt_does_not_stall_others(server: str) -> None:
    """While one prompt of several MB is tokenized, /health and another stream answer."""
    big = json.dumps({"prompt": "All work and no play makes Jack a dull boy. " * 70_000})
    order: list[str] = []

    async def post_big(session: aiohttp.ClientSession) -> tuple[int, dict]:
        async with session.post(f"{server}/v1/completions", data=big, headers=JSON) as resp:
            order.append("big")
            return resp.status, await resp.json()

    async def stream_small(session: aiohttp.ClientSession) -> bytes:
        body = {"prompt": "hi", "max_tokens": 8, "ignore_eos": True, "stream": True}
        async with session.post(f"{server}/v1/completions", json=body) as resp:
            assert resp.status == 200
            text = await resp.read()
            order.append("stream")
            return text

    async def health(session: aiohttp.ClientSession) -> int:
        async with session.get(f"{server}/health") as resp:
            order.append("health")
            return resp.status

    async def run() -> tuple[tuple[int, dict], bytes, int]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            big_task = asyncio.create_task(post_big(session))
            # NOTE: setup, not a measurement: let the upload finish and tokenizing begin
            # (reading and decoding the body takes milliseconds; tokenizing it, seconds)
            await asyncio.sleep(1.0)
            small = await asyncio.gather(stream_small(session), health(session))
            return await big_task, *small

    (status, error), streamed, health_status = asyncio.run(run())
    assert (status, error["error"]["code"]) == (400, "context_length_exceeded"), error
    assert health_status == 200
    assert streamed.endswith(b"data: [DONE]\n\n")
    assert order[-1] == "big", order


def _server_pids(url: str) -> list[int]:
    """The `duet serve` process listening at `url` and all its descendants."""
    port = str(_host_port(url)[1]).encode()
    parents: dict[int, int] = {}
    root = None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        if b"serve" in cmdline and b"--port" in cmdline and port in cmdline:
            root = int(entry.name)
    assert root is not None, "the server process is not found"
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return sorted(tree)


def _rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


async def _one_of_many(session: aiohttp.ClientSession, url: str, i: int) -> str:
    """'ok' or 'busy' (429); a stream must end with [DONE], a body must finish."""
    stream = i % 2 == 0
    body = {"prompt": f"Request {i}", "max_tokens": 4, "stream": stream}
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        answer = await resp.read()
        if resp.status == 429:
            assert json.loads(answer)["error"]["code"] == "rate_limit_exceeded"
            return "busy"
        assert resp.status == 200, answer
        if stream:
            assert answer.endswith(b"data: [DONE]\n\n"), answer[-200:]
        else:
            assert json.loads(answer)["choices"][0]["finish_reason"] is not None
        return "ok"


def test_overload_gets_200_or_429_and_memory_stays_bounded(server: str) -> None:
    async def burst(count: int) -> list[str]:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            return await asyncio.gather(*(_one_of_many(session, server, i) for i in range(count)))

    pids = _server_pids(server)
    asyncio.run(burst(MAX_NUM_SEQS))  # warm: the first burst allocates what every later reuses
    before = _rss_bytes(pids)
    outcomes = asyncio.run(burst(OVERLOAD))
    after = _rss_bytes(pids)
    assert len(outcomes) == OVERLOAD
    assert outcomes.count("ok") >= MAX_NUM_SEQS, outcomes.count("ok")
    assert _health(server) == 200
    growth = (after - before) / before
    assert growth < 0.25, f"server RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB"
