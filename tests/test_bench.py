"""`duet bench serve`: stream timing, the metrics math, arrivals and datasets.

A tiny SSE server in the test streams scripted chunks and moves a fake clock to each
chunk's scripted time; it waits until the client has read the clock before moving on,
so every measured latency is known exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import astuple
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from frontend.bench.client import RequestResult, RequestSettings
from frontend.bench.datasets import (
    SampleRequest,
    jsonl_requests,
    mixed_requests,
    prefix_repetition_requests,
    random_requests,
    repeat_requests,
)
from frontend.bench.plot import plot_results, tokens_per_second
from frontend.bench.runner import LoadShape, arrival_offsets, run_load
from frontend.bench.stats import compute_metrics, parse_goodput

# prompt -> (chunk times after the request arrives, usage: prompt and completion tokens)
SCRIPTS = {
    "a": ([0.25, 0.30, 0.40, 0.45], (10, 4)),
    "b": ([0.5, 0.6], (20, 3)),  # 3 tokens in 2 chunks: usage, not chunks, is the count
    "c": ([0.1], (30, 1)),
    "eos": ([0.2], (5, 1)),  # stops at its first token: one finish chunk without text
}


class ScriptedClock:
    """The client's clock; the server sets it and waits until the client has read it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.was_read = asyncio.Event()

    def __call__(self) -> float:
        self.was_read.set()
        return self.now

    async def tick(self, now: float, send: asyncio.Future | None = None) -> None:
        self.now = now
        self.was_read.clear()
        if send is not None:
            await send
        await asyncio.wait_for(self.was_read.wait(), timeout=10)


def sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def make_app(clock: ScriptedClock, bodies: list[dict]) -> web.Application:
    async def stream(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        bodies.append(body)
        chat = "messages" in body
        prompt = body["messages"][0]["content"] if chat else body["prompt"]
        if prompt not in SCRIPTS:
            return web.Response(status=500, text="boom")
        times, (prompt_tokens, completion_tokens) = SCRIPTS[prompt]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = clock.now
        if chat:  # a role-only first chunk, as OpenAI sends: not a token
            await clock.tick(base, resp.write(sse({"choices": [{"delta": {"role": "assistant"}}]})))
        for t in times:
            text = "" if prompt == "eos" else "x"
            piece = {"delta": {"content": text}} if chat else {"text": text}
            if prompt == "eos":
                piece["finish_reason"] = "stop"
            await clock.tick(base + t, resp.write(sse({"choices": [piece]})))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        await resp.write(sse({"choices": [], "usage": usage}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", stream)
    app.router.add_post("/v1/chat/completions", stream)
    return app


def run_scripted(
    prompts: Sequence[str], endpoint: str
) -> tuple[list[RequestResult], float, list[dict]]:
    """Send `prompts` one at a time to the scripted server; (results, duration, bodies)."""

    async def go() -> tuple[list[RequestResult], float, list[dict]]:
        clock, bodies = ScriptedClock(), []
        async with TestServer(make_app(clock, bodies)) as server:
            settings = RequestSettings(
                url=str(server.make_url(endpoint)),
                model="m",
                chat="chat" in endpoint,
                ignore_eos=True,
            )
            requests = [SampleRequest(p, 0, 7) for p in prompts]
            outcome = await run_load(
                requests,
                settings,
                LoadShape(max_concurrency=1),
                np.random.default_rng(0),
                progress=False,
                clock=clock,
            )
        return outcome.results, outcome.duration_s, bodies

    return asyncio.run(go())


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_stream_timing_and_metrics_are_exact(endpoint: str) -> None:
    results, duration, bodies = run_scripted(["a", "b", "c", "fail"], endpoint)
    assert [r.success for r in results] == [True, True, True, False]
    assert "HTTP 500" in results[3].error
    a = results[0]
    assert a.ttft == pytest.approx(0.25)
    assert a.itl == pytest.approx([0.05, 0.10, 0.05])
    assert a.latency == pytest.approx(0.45)
    assert a.tpot == pytest.approx(0.2 / 3)
    assert (a.prompt_tokens, a.output_tokens) == (10, 4)
    assert duration == pytest.approx(0.45 + 0.6 + 0.1)
    assert bodies[0]["stream_options"] == {"include_usage": True}
    assert (bodies[0]["max_tokens"], bodies[0]["ignore_eos"], bodies[0]["model"]) == (7, True, "m")

    m = compute_metrics(results, duration, parse_goodput(["ttft:300", "tpot:60"]))
    assert (m.completed, m.failed, m.total_input_tokens, m.total_output_tokens) == (3, 1, 60, 8)
    assert m.request_throughput == pytest.approx(3 / 1.15)
    assert m.output_throughput == pytest.approx(8 / 1.15)
    assert m.total_token_throughput == pytest.approx(68 / 1.15)
    # only "c" meets both: "a" has TPOT 66.7 ms, "b" TTFT 500 ms; c's 1-token TPOT is 0
    assert m.request_goodput == pytest.approx(1 / 1.15)
    # numpy's linear-interpolation percentiles over the samples, in ms
    assert astuple(m.ttft) == pytest.approx((850 / 3, 250, 450, 495))  # 100 250 500
    assert astuple(m.itl) == pytest.approx((75, 75, 100, 100))  # 50 50 100 100
    assert astuple(m.tpot) == pytest.approx((175 / 3, 175 / 3, 65, 66.5))  # 50, 66.67
    assert astuple(m.e2el) == pytest.approx((1150 / 3, 450, 570, 597))  # 100 450 600


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_an_output_that_stops_at_its_first_token_succeeds(endpoint: str) -> None:
    [result], _, _ = run_scripted(["eos"], endpoint)
    assert result.success, result.error
    assert result.ttft == pytest.approx(0.2)
    assert (result.output_tokens, result.tpot, result.itl) == (1, 0.0, [])


def test_goodput_uses_every_slo_given() -> None:
    results, duration, _ = run_scripted(["a", "b", "c"], "/v1/completions")
    assert compute_metrics(results, duration, {}).request_goodput is None
    m = compute_metrics(results, duration, parse_goodput(["e2el:500"]))
    assert m.request_goodput == pytest.approx(2 / 1.15)  # a (450) and c (100)
    with pytest.raises(ValueError):
        parse_goodput(["ttft=300"])


def test_plot_and_tokens_per_second(tmp_path: Path) -> None:
    results, _, _ = run_scripted(["a", "b", "c"], "/v1/completions")
    # a: 4 chunks in [0, 1) s; b: 3 tokens over 2 chunks at 0.95 and 1.05; c: 1 at 1.15
    assert tokens_per_second(results).tolist() == pytest.approx([4 + 1.5, 1.5 + 1])
    plot_results(results, tmp_path / "run.png")
    assert (tmp_path / "run.png").stat().st_size > 0


def test_arrivals() -> None:
    assert arrival_offsets(3, LoadShape(), np.random.default_rng(0)) == [0.0, 0.0, 0.0]
    poisson = arrival_offsets(8, LoadShape(request_rate=4.0), np.random.default_rng(1))
    assert poisson[-1] == pytest.approx(2.0)  # stretched to num / rate exactly
    assert all(b > a for a, b in itertools.pairwise(poisson))
    regular = arrival_offsets(
        8, LoadShape(request_rate=4.0, burstiness=1e6), np.random.default_rng(1)
    )
    # very large burstiness: the gaps become the constant 1/rate
    assert regular == pytest.approx([0.25 * (i + 1) for i in range(8)], rel=1e-2)
    assert math.isinf(LoadShape().request_rate)


class CharTokenizer:
    """One token per character over 'a'..'z'; id 0 ('a') is special."""

    vocab_size = 26
    all_special_ids: ClassVar[list[int]] = [0]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(ord("a") + i) for i in ids)


def test_synthetic_datasets_have_exact_lengths() -> None:
    from frontend.bench.tokens import TokenSampler

    sampler = TokenSampler(CharTokenizer(), np.random.default_rng(0))
    rand = random_requests(sampler, 5, 12, 9)
    assert [(r.prompt_len, len(r.prompt), r.max_tokens) for r in rand] == [(12, 12, 9)] * 5
    assert not any("a" in r.prompt for r in rand)  # no special tokens
    rep = prefix_repetition_requests(sampler, 6, 8, 4, 2, 5)
    assert [r.prompt_len for r in rep] == [12] * 6
    assert {r.prompt[:8] for r in rep[0::2]} != {r.prompt[:8] for r in rep[1::2]}
    assert len({r.prompt[:8] for r in rep[0::2]}) == len({r.prompt[:8] for r in rep[1::2]}) == 1
    mixed = mixed_requests(sampler, 10, 3, 20, 0.2, 4)
    assert [r.prompt_len for r in mixed] == [3, 3, 3, 20, 3, 3, 20, 3, 3, 3]


def test_repeat_dataset_asks_to_copy_each_paragraph_in_turn(default_tokenizer) -> None:
    from frontend.bench.paragraphs import PARAGRAPHS
    from frontend.bench.tokens import TokenSampler

    sampler = TokenSampler(default_tokenizer, np.random.default_rng(0))
    requests = repeat_requests(sampler, len(PARAGRAPHS) + 1, 160)
    for request, paragraph in zip(requests, [*PARAGRAPHS, PARAGRAPHS[0]], strict=True):
        assert paragraph in request.prompt and request.prompt.startswith("Repeat")
        assert request.max_tokens == 160
        assert request.prompt_len == len(default_tokenizer.encode(request.prompt))
    assert requests[0] == requests[-1]


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_text('{"prompt": "hi", "max_tokens": 3}\n\n{"prompt": "yo"}\n{"prompt": "z"}\n')
    assert jsonl_requests(path, 2, 16) == [SampleRequest("hi", 0, 3), SampleRequest("yo", 0, 16)]


def test_a_request_on_a_connection_the_server_closed_is_sent_again() -> None:
    """A server that keeps each connection for one request: it reads the next request on
    it, then hangs up unanswered (a keep-alive connection it had timed out). Every request
    still succeeds, each on a connection of its own."""
    body = sse({"choices": [{"text": "x"}]}) + b"data: [DONE]\n\n"
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: keep-alive\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    connections = []

    async def read_request(reader: asyncio.StreamReader) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await read_request(reader)
        writer.write(response)
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError):  # the client closed it first
            await read_request(reader)
        writer.close()

    async def go() -> list[RequestResult]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            settings = RequestSettings(
                url=f"http://127.0.0.1:{port}/v1/completions", model="m", chat=False
            )
            outcome = await run_load(
                [SampleRequest("p", 1, 1)] * 4,
                settings,
                LoadShape(max_concurrency=1),
                np.random.default_rng(0),
                progress=False,
            )
        return outcome.results

    results = asyncio.run(go())
    assert [r.error for r in results] == [""] * 4
    assert all(r.success for r in results)
    assert len(connections) == 4
