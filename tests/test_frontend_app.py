"""The HTTP layer against a scripted engine: SSE shape, fan-out, stop strings, errors, aborts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from engine_core.messages.common import ErrorKind, FinishReason, TokenLogprobs
from engine_core.messages.frontend import AddRequest, RequestDelta
from frontend.app import build_app
from frontend.context import ServerContext
from frontend.logprobs import LogprobFormatter
from models.tokenizer import Tokenizer

TEXT = "The capital of Japan is Tokyo. 東京 is big 😀."
KEY = "secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


class FakeEngine:
    """Stands in for EngineClient: every request gets TEXT's tokens, one per step, then EOS."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = token_ids
        self.delay = 0.001
        self.error: str | None = None
        self.error_kind = ErrorKind.SERVER
        self.is_healthy = True
        self.latest_stats = None
        self.num_unstarted = 0
        self.added: list[AddRequest] = []
        self.aborted: list[str] = []

    def add_request(self, request: AddRequest) -> AsyncGenerator[RequestDelta]:
        self.added.append(request)
        return self._deltas(request)

    async def _deltas(self, request: AddRequest) -> AsyncGenerator[RequestDelta]:
        params, rid, finished = request.sampling_params, request.request_id, False
        if self.error:
            yield RequestDelta(
                rid,
                [],
                finish_reason=FinishReason.ABORT,
                error=self.error,
                error_kind=self.error_kind,
            )
            return
        try:
            ids = self.token_ids[: params.max_tokens]
            for i, token_id in enumerate(ids):
                await asyncio.sleep(self.delay)
                finished = i + 1 == len(ids)
                reason = (
                    None
                    if not finished
                    else FinishReason.LENGTH
                    if len(ids) == params.max_tokens
                    else FinishReason.STOP
                )
                logprobs = (
                    None
                    if params.logprobs is None
                    else [TokenLogprobs([token_id, 5, 6], [-0.5, -1.0, -2.0], 1)]
                )
                yield RequestDelta(rid, [token_id], logprobs, reason)
        finally:
            if not finished:
                self.aborted.append(rid)


class _Timer:
    num_prompt_tokens = 0

    def on_delta(self, delta: RequestDelta) -> None:
        pass

    def finish(self, reason: FinishReason) -> None:
        pass


class _Metrics:
    def start_request(self) -> _Timer:
        return _Timer()


@pytest.fixture
def engine(default_tokenizer: Tokenizer) -> FakeEngine:
    return FakeEngine(default_tokenizer.encode(TEXT, add_special_tokens=False))


@pytest.fixture
def run(
    engine: FakeEngine, default_tokenizer: Tokenizer
) -> Callable[[Callable[[TestClient], Awaitable[Any]]], Any]:
    """run(scenario): serve the app over real HTTP and run `scenario(client)` against it."""
    ctx = ServerContext(
        client=engine, tokenizer=default_tokenizer, metrics=_Metrics(),
        formatter=LogprobFormatter(default_tokenizer), model_name="duet-test",
        max_model_len=256, vocab_size=49152, max_waiting_requests=4,
    )  # fmt: skip

    def go(scenario: Callable[[TestClient], Awaitable[Any]]) -> Any:
        async def main() -> Any:
            server = TestServer(
                build_app(ctx, api_key=KEY, max_body_bytes=4096), handler_cancellation=True
            )
            async with TestClient(server) as client:
                return await scenario(client)

        return asyncio.run(main())

    return go


async def _post(
    client: TestClient, path: str, body: dict, headers: dict | None = None
) -> tuple[int, Any]:
    resp = await client.post(path, json=body, headers=AUTH if headers is None else headers)
    return resp.status, await resp.json()


async def _events(client: TestClient, path: str, body: dict) -> list[Any]:
    resp = await client.post(path, json={**body, "stream": True}, headers=AUTH)
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    raw = (await resp.read()).decode()
    frames = raw.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    assert all(f.startswith("data: ") for f in frames[:-1])
    return [msgspec.json.decode(f[6:]) for f in frames[:-2]]


def test_chat_stream_matches_non_stream(run: Callable, engine: FakeEngine) -> None:
    body = {**CHAT, "max_tokens": 12, "stream_options": {"include_usage": True}}

    async def scenario(client: TestClient) -> tuple:
        return await _post(client, "/v1/chat/completions", body), await _events(
            client, "/v1/chat/completions", body
        )

    (status, whole), chunks = run(scenario)
    assert status == 200 and whole["object"] == "chat.completion"
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["role"] == "assistant"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(
        c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks
    )
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1])
    assert streamed == choice["message"]["content"] and "\ufffd" not in streamed
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] == 12


def test_completions_fan_out_n_and_prompts(run: Callable, engine: FakeEngine) -> None:
    body = {
        "model": "duet-test",
        "prompt": ["a", "b"],
        "n": 2,
        "seed": 5,
        "max_tokens": 3,
        "echo": True,
    }
    status, whole = run(lambda client: _post(client, "/v1/completions", body))
    assert status == 200 and [c["index"] for c in whole["choices"]] == [0, 1, 2, 3]
    assert [c["text"][:1] for c in whole["choices"]] == ["a", "a", "b", "b"]
    assert [r.sampling_params.seed for r in engine.added] == [5, 6, 5, 6]
    rid = whole["id"]
    assert [r.request_id for r in engine.added] == [f"{rid}-{i}" for i in range(4)]
    assert whole["usage"] == {"prompt_tokens": 2, "completion_tokens": 12, "total_tokens": 14}


def test_completion_stream_matches_non_stream(run: Callable) -> None:
    body = {"prompt": [1, 2], "max_tokens": 20, "logprobs": 1}

    async def scenario(client: TestClient) -> tuple:
        return await _post(client, "/v1/completions", body), await _events(
            client, "/v1/completions", body
        )

    (_, whole), chunks = run(scenario)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    logprobs = whole["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == whole["usage"]["completion_tokens"]
    assert logprobs["text_offset"][0] == 0 and len(logprobs["top_logprobs"][0]) == 3


def test_frames_ready_together_share_one_http_chunk(run: Callable) -> None:
    # n=4: each engine step makes four frames at once; the last step adds usage and [DONE]
    body = {"prompt": "a", "n": 4, "max_tokens": 6, "stream": True}
    body["stream_options"] = {"include_usage": True}

    async def scenario(client: TestClient) -> tuple[bytes, int]:
        resp = await client.post("/v1/completions", json=body, headers=AUTH)
        data, http_chunks = b"", 0
        async for part, end_of_http_chunk in resp.content.iter_chunks():
            data += part
            http_chunks += end_of_http_chunk
        return data, http_chunks

    data, http_chunks = run(scenario)
    frames = data.split(b"\n\n")[:-1]
    assert frames[-1] == b"data: [DONE]" and len(frames) == 4 * 6 + 2
    # one write per frame would be 26 chunks; the fake children's timers need not all
    # fire in the same loop pass, so a step may take more than one
    assert http_chunks <= len(frames) // 2, (http_chunks, len(frames))


def test_stop_string_ends_and_aborts(run: Callable, engine: FakeEngine) -> None:
    body = {**CHAT, "stop": ["Tokyo"], "logprobs": True, "top_logprobs": 2}
    _, whole = run(lambda client: _post(client, "/v1/chat/completions", body))
    choice = whole["choices"][0]
    assert choice["message"]["content"] == "The capital of Japan is "
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", "Tokyo")
    assert engine.aborted == [engine.added[0].request_id]
    content = choice["logprobs"]["content"]
    assert (
        len(content) == whole["usage"]["completion_tokens"] and len(content[0]["top_logprobs"]) == 2
    )


def test_client_disconnect_aborts(run: Callable, engine: FakeEngine) -> None:
    engine.delay = 0.05

    async def scenario(client: TestClient) -> None:
        resp = await client.post(
            "/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH
        )
        await resp.content.readline()
        resp.close()
        for _ in range(50):
            await asyncio.sleep(0.02)
            if engine.aborted:
                return

    run(scenario)
    assert engine.aborted == [engine.added[0].request_id]


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "param"),
    [
        ("/v1/chat/completions", CHAT, {}, 401, None),
        ("/v1/chat/completions", CHAT, {"Authorization": "Bearer nope"}, 401, None),
        ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, AUTH, 404, "model"),
        ("/v1/nothing", CHAT, AUTH, 404, None),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 300}, AUTH, 400, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "n": "2"}, AUTH, 400, "n"),
        ("/v1/completions", {"prompt": "x" * 5000}, AUTH, 413, None),
        ("/v1/completions", {"prompt": [1] * 300}, AUTH, 400, "prompt"),
    ],
)
def test_errors_before_the_first_byte(
    run: Callable, path: str, body: dict, headers: dict, status: int, param: str | None
) -> None:
    got, error = run(lambda client: _post(client, path, body, headers))
    assert got == status
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["param"] == param


def test_open_paths_need_no_key(run: Callable, engine: FakeEngine) -> None:
    async def scenario(client: TestClient) -> list:
        ok = [(await client.get(p)).status for p in ("/health", "/version")]
        engine.is_healthy = False
        down = await client.get("/health")
        return [*ok, down.status, (await down.json())["error"]["code"]]

    assert run(scenario) == [200, 200, 503, "engine_unavailable"]


def test_too_many_waiting_is_429(run: Callable, engine: FakeEngine) -> None:
    engine.num_unstarted = 4

    async def scenario(client: TestClient) -> tuple:
        resp = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
        return resp.status, resp.headers.get("Retry-After"), await resp.json()

    status, retry_after, error = run(scenario)
    assert (status, retry_after, error["error"]["type"]) == (429, "1", "rate_limit_error")


def test_engine_error_before_output_keeps_http_status(run: Callable, engine: FakeEngine) -> None:
    engine.error = "server is shutting down"
    status, error = run(
        lambda client: _post(client, "/v1/chat/completions", {**CHAT, "stream": True})
    )
    assert status == 503 and "shutting down" in error["error"]["message"]


def test_a_request_the_core_rejects_as_invalid_is_a_400(run: Callable, engine: FakeEngine) -> None:
    engine.error, engine.error_kind = (
        "stop_token_ids has token ids outside the vocabulary",
        ErrorKind.CLIENT,
    )
    status, error = run(lambda client: _post(client, "/v1/chat/completions", CHAT))
    assert status == 400 and error["error"]["type"] == "invalid_request_error"
    assert "vocabulary" in error["error"]["message"]


def test_tokenize_roundtrip(run: Callable) -> None:
    async def scenario(client: TestClient) -> tuple:
        _, tokens = await _post(client, "/tokenize", {"prompt": TEXT})
        _, text = await _post(client, "/detokenize", {"tokens": tokens["tokens"]})
        _, chat = await _post(client, "/tokenize", CHAT)
        return tokens, text, chat

    tokens, text, chat = run(scenario)
    assert text["prompt"] == TEXT and tokens["count"] == len(tokens["tokens"])
    assert chat["count"] > 5 and tokens["max_model_len"] == 256


def test_models_list(run: Callable) -> None:
    async def scenario(client: TestClient) -> Any:
        return await (await client.get("/v1/models", headers=AUTH)).json()

    models = run(scenario)
    assert [m["id"] for m in models["data"]] == ["duet-test"] and models["object"] == "list"


def test_wrong_method_is_json(run: Callable) -> None:
    async def scenario(client: TestClient) -> tuple:
        resp = await client.get("/v1/completions", headers=AUTH)
        return resp.status, (await resp.json())["error"]["code"]

    assert run(scenario) == (405, "method_not_allowed")
