"""EngineClient against a hand-driven ROUTER: HELLO, demux per request, aborts, health."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Awaitable, Callable

import msgspec
import pytest
import zmq
import zmq.asyncio

from engine_core.client import EngineClient, EngineDeadError
from engine_core.messages.common import FinishReason
from engine_core.messages.framing import encode
from engine_core.messages.frontend import (
    AbortRequests,
    AddRequest,
    FrontendMsg,
    RequestDelta,
    SchedulerStats,
    StepOutputs,
)
from engine_core.messages.sampling_params import SamplingParams


class Core:
    """The core's end of the socket, driven step by step from the test."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str) -> None:
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind(address)

    async def receive(self) -> tuple[bytes, int, bytes | None]:
        frames = await asyncio.wait_for(self.router.recv_multipart(), 5)
        return frames[0], frames[1][0], frames[2] if len(frames) > 2 else None

    async def send(
        self, identity: bytes, *deltas: RequestDelta, stats: SchedulerStats | None = None
    ) -> None:
        step = StepOutputs(list(deltas), time.time(), stats)
        await self.router.send_multipart([identity, *encode(FrontendMsg.OUTPUTS, step)])


def _run(
    scenario: Callable[[Core, EngineClient], Awaitable[None]], health_timeout: float = 30.0
) -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as folder:
            ctx = zmq.asyncio.Context()
            core = Core(ctx, f"ipc://{folder}/core.sock")
            client = EngineClient(
                f"ipc://{folder}/core.sock", b"fe-0", health_timeout=health_timeout
            )
            await client.start()
            try:
                await scenario(core, client)
            finally:
                await client.close()
                core.router.close()
                ctx.term()

    asyncio.run(main())


def _request(request_id: str) -> AddRequest:
    return AddRequest(request_id, [1, 2, 3], SamplingParams(max_tokens=4), time.time())


def test_hello_then_deltas_demuxed_per_request() -> None:
    async def scenario(core: Core, client: EngineClient) -> None:
        identity, kind, _ = await core.receive()
        assert (identity, kind) == (b"fe-0", FrontendMsg.HELLO)
        a, b = client.add_request(_request("a")), client.add_request(_request("b"))
        for expected in ("a", "b"):
            _, kind, payload = await core.receive()
            assert kind == FrontendMsg.ADD
            assert msgspec.msgpack.decode(payload, type=AddRequest).request_id == expected
        assert client.num_unstarted == 2
        await core.send(
            identity,
            RequestDelta("b", [7]),
            RequestDelta("a", [5]),
            stats=SchedulerStats(num_waiting=3),
        )
        await core.send(identity, RequestDelta("a", [6], finish_reason=FinishReason.LENGTH))
        await core.send(identity, RequestDelta("b", [8], finish_reason=FinishReason.STOP))
        assert [d.new_token_ids async for d in a] == [[5], [6]]
        assert [d.new_token_ids async for d in b] == [[7], [8]]
        assert client.is_healthy and client.latest_stats == SchedulerStats(num_waiting=3)
        assert client.num_unstarted == 0

    _run(scenario)


def test_closing_early_aborts_and_garbage_is_dropped() -> None:
    async def scenario(core: Core, client: EngineClient) -> None:
        identity, _, _ = await core.receive()
        await core.router.send_multipart([identity, b"\x02", b"not msgpack"])
        await core.router.send_multipart([identity, b"\x63", b""])
        deltas = client.add_request(_request("a"))
        await core.receive()
        await core.send(identity, RequestDelta("a", [5]))
        async with contextlib.aclosing(deltas):
            assert (await anext(deltas)).new_token_ids == [5]
        _, kind, payload = await core.receive()
        assert kind == FrontendMsg.ABORT
        assert msgspec.msgpack.decode(payload, type=AbortRequests).request_ids == ["a"]
        await core.send(identity, RequestDelta("a", [6]))  # late output for a dead request: ignored
        await core.send(identity)
        assert client.is_healthy

    _run(scenario)


def test_silent_core_fails_requests_in_flight() -> None:
    async def scenario(core: Core, client: EngineClient) -> None:
        identity, _, _ = await core.receive()
        await core.send(identity)
        deltas = client.add_request(_request("a"))
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(anext(deltas), 5)
        assert not client.is_healthy

    _run(scenario, health_timeout=1.0)


def test_a_core_that_goes_away_fails_requests_at_once_and_its_successor_is_greeted() -> None:
    async def scenario(core: Core, client: EngineClient) -> None:
        identity, _, _ = await core.receive()
        await core.send(identity)
        deltas = client.add_request(_request("a"))
        await core.receive()
        address = core.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        core.router.close()  # a killed core: its connection drops
        with pytest.raises(EngineDeadError, match="went away"):  # long before the 30 s silence
            await asyncio.wait_for(anext(deltas), 5)
        assert not client.is_healthy
        core.router = core.router.context.socket(zmq.ROUTER)
        core.router.setsockopt(zmq.LINGER, 0)
        core.router.bind(address)  # the restarted core
        identity, kind, _ = await core.receive()
        assert (identity, kind) == (b"fe-0", FrontendMsg.HELLO)
        assert not client.is_healthy  # not before the new core has spoken
        await core.send(identity)
        while not client.is_healthy:
            await asyncio.sleep(0.01)  # bounded by pytest's timeout

    _run(scenario)
