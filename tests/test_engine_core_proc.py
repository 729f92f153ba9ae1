"""The engine core process end to end: real processes, ZeroMQ sockets, the default model.

One core (with the worker it spawns) serves most tests; the preemption and SIGTERM tests
start cores of their own. Greedy requests ignore EOS, so every length is known up front.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
import torch
import zmq
import zmq.asyncio

from engine_core.client import EngineClient
from engine_core.core_proc import run_engine_core
from engine_core.messages.common import FinishReason
from engine_core.messages.config import EngineAddresses, EngineConfig
from engine_core.messages.framing import encode
from engine_core.messages.frontend import (
    TO_FRONTEND,
    AbortRequests,
    AddRequest,
    FrontendMsg,
    SchedulerStats,
)
from engine_core.messages.sampling_params import SamplingParams
from models.loader import ModelSource, load_config
from models.runner import kv_block_bytes
from models.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256
BLOCK_SIZE = 16
STARTUP_TIMEOUT = 300.0  # model load on a shared 2-core machine
TIMEOUT = 240.0  # any one scenario

T = TypeVar("T")

_request_ids = itertools.count()


class CoreProcess:
    """`run_engine_core` in a process of its own; it spawns its worker itself."""

    def __init__(self, directory: Path, **config: object) -> None:
        self.addresses = EngineAddresses.ipc(str(directory))
        # one torch thread: batch-1 decode is memory-bound anyway, and two threads collapse
        # when another process computes on this shared 2-core machine
        # float32: tokens equal across batch shapes (alone vs 64 at once, preempted) only there
        engine_config = EngineConfig(  # type: ignore[arg-type]
            block_size=BLOCK_SIZE, torch_threads=1, dtype="float32", **config
        )
        # NOTE: not daemonic: a daemonic process may not have children.
        self.process = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, args=(engine_config, self.addresses), daemon=False
        )
        self.process.start()

    def wait_serving(self) -> None:
        """Block until the core answers a HELLO (it sends idle stats every second)."""
        ctx = zmq.Context.instance()
        with ctx.socket(zmq.DEALER) as sock:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.addresses.frontend)
            sock.send(bytes((FrontendMsg.HELLO,)))
            deadline = time.monotonic() + STARTUP_TIMEOUT
            while not sock.poll(500):
                assert self.process.is_alive(), f"core exited with {self.process.exitcode}"
                assert time.monotonic() < deadline, "core did not start"

    def terminate(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGTERM)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, wait for the drain; kill if it hangs. Returns the exit code."""
        self.terminate()
        self.process.join(timeout)
        if self.process.is_alive():
            # a killed core cannot stop its worker, which would linger on a shared machine
            pid = self.process.pid
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            self.process.kill()
            self.process.join()
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(child), signal.SIGKILL)
        return self.process.exitcode


@contextlib.contextmanager
def running_core(directory: Path, **config: object) -> Iterator[CoreProcess]:
    core = CoreProcess(directory, **config)
    try:
        core.wait_serving()
        yield core
    finally:
        core.stop()


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreProcess]:
    """The shared core: a pool with room for every test's requests at once."""
    with running_core(
        tmp_path_factory.mktemp("core"), max_model_len=MAX_MODEL_LEN, kv_cache_memory=160 * 2**20
    ) as process:
        yield process


@pytest.fixture(scope="module")
def block_bytes(default_source: ModelSource) -> int:
    return kv_block_bytes(load_config(default_source), BLOCK_SIZE, torch.float32)


@dataclass
class Completion:
    """Everything one request streamed back, folded."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0
    error: str | None = None


def greedy(prompt: list[int], max_tokens: int, cache_salt: str | None = None) -> AddRequest:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return AddRequest(
        f"req-{next(_request_ids)}", prompt, params, time.time(), cache_salt=cache_salt
    )


async def complete(client: EngineClient, request: AddRequest) -> Completion:
    done = Completion()
    async for delta in client.add_request(request):
        done.token_ids += delta.new_token_ids
        done.finish_reason, done.error = delta.finish_reason, delta.error
        done.num_cached_tokens = delta.num_cached_tokens
    return done


@contextlib.asynccontextmanager
async def connect(
    core: CoreProcess, on_stats: Callable[[SchedulerStats], None] | None = None
) -> AsyncIterator[EngineClient]:
    identity = f"fe-{next(_request_ids)}".encode()
    client = EngineClient(core.addresses.frontend, identity, on_stats=on_stats)
    await client.start()
    try:
        yield client
    finally:
        await client.close()


async def wait_for_stats(client: EngineClient, ok: Callable[[SchedulerStats], bool]) -> None:
    while client.latest_stats is None or not ok(client.latest_stats):
        await asyncio.sleep(0.05)


class RawFrontend:
    """A bare DEALER: sends any frames, and sees every StepOutputs the core sends it."""

    def __init__(self, ctx: zmq.asyncio.Context, core: CoreProcess, identity: bytes) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(core.addresses.frontend)
        self.received: dict[str, Completion] = {}  # every request id a delta named

    async def send(self, frames: list[bytes]) -> None:
        await self.sock.send_multipart(frames)

    async def wait(self, request_ids: set[str], until_finished: bool = True) -> None:
        """Receive until each of `request_ids` has finished (or has had its first delta)."""

        def pending(request_id: str) -> bool:
            out = self.received.get(request_id)
            return out is None or (until_finished and out.finish_reason is None)

        while any(pending(r) for r in request_ids):
            decoded = TO_FRONTEND.decode(await self.sock.recv_multipart())
            assert decoded is not None
            if decoded[0] != FrontendMsg.OUTPUTS:
                continue
            for delta in decoded[1].outputs:
                out = self.received.setdefault(delta.request_id, Completion())
                out.token_ids += delta.new_token_ids
                out.finish_reason, out.error = delta.finish_reason, delta.error


def run(scenario: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(scenario, TIMEOUT))


@pytest.fixture(scope="module")
def prompts(default_tokenizer: Tokenizer) -> list[list[int]]:
    """64 distinct short prompts."""
    return [
        default_tokenizer.encode(f"Question {i}: what is {i} times {i % 7 + 3}? Answer:")
        for i in range(64)
    ]


def test_64_concurrent_requests_match_each_run_alone(
    core: CoreProcess, prompts: list[list[int]]
) -> None:
    max_running = 0

    def on_stats(stats: SchedulerStats) -> None:
        nonlocal max_running
        max_running = max(max_running, stats.num_running)

    async def scenario() -> tuple[list[Completion], list[Completion]]:
        async with connect(core, on_stats) as client:
            batch = await asyncio.gather(*(complete(client, greedy(p, 6)) for p in prompts))
            # a salt of its own keeps each lone run off the batch's prefix-cache entries
            alone = [await complete(client, greedy(p, 6, cache_salt="alone")) for p in prompts]
            return batch, alone

    batch, alone = run(scenario())
    assert max_running == 64
    assert all(c.finish_reason == FinishReason.LENGTH and len(c.token_ids) == 6 for c in batch)
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]


def test_prefix_cache_hit_on_repeat(core: CoreProcess, default_tokenizer: Tokenizer) -> None:
    prompt = default_tokenizer.encode(
        "Summarize: " + "The quick brown fox jumps over the dog. " * 12
    )

    async def scenario() -> list[Completion]:
        async with connect(core) as client:
            return [await complete(client, greedy(prompt, 8, cache_salt="repeat")) for _ in "ab"]

    first, second = run(scenario())
    assert first.num_cached_tokens == 0
    # every full block but the one holding the last prompt token, which must be recomputed
    assert second.num_cached_tokens == (len(prompt) - 1) // BLOCK_SIZE * BLOCK_SIZE > 0
    assert second.token_ids == first.token_ids and len(first.token_ids) == 8


def test_preemption_gives_the_same_tokens(
    core: CoreProcess, block_bytes: int, default_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    texts = [f"Story {i}: once upon a time in a land far away, " * 4 for i in range(4)]
    long_prompts = [default_tokenizer.encode(t) for t in texts]
    assert all(40 <= len(p) <= 64 for p in long_prompts)

    async def generate(process: CoreProcess) -> tuple[list[Completion], SchedulerStats]:
        async with connect(process) as client:
            done = await asyncio.gather(*(complete(client, greedy(p, 48)) for p in long_prompts))
            assert client.latest_stats is not None
            return list(done), client.latest_stats

    # 10 blocks hold one 128-token request, while the four need up to 28 blocks together
    with running_core(tmp_path, max_model_len=128, kv_cache_memory=10 * block_bytes) as tiny:
        constrained, stats = run(generate(tiny))
    unconstrained, _ = run(generate(core))
    assert stats.num_preemptions > 0
    assert all(len(c.token_ids) == 48 for c in constrained)
    assert [c.token_ids for c in constrained] == [c.token_ids for c in unconstrained]


def test_abort_mid_decode_frees_every_block(core: CoreProcess, prompts: list[list[int]]) -> None:
    async def scenario() -> None:
        async with connect(core) as client:
            streams = [client.add_request(greedy(p, 200)) for p in prompts[:4]]
            for stream in streams:
                for _ in range(3):
                    assert (await anext(stream)).finish_reason is None
            await wait_for_stats(client, lambda s: s.num_running == 4)
            assert client.latest_stats is not None
            assert client.latest_stats.kv_cache_usage["worker-0"] > 0
            for stream in streams:
                await stream.aclose()  # the client sends ABORT
            await wait_for_stats(
                client,
                lambda s: (
                    (s.num_running, s.num_waiting, s.kv_cache_usage["worker-0"]) == (0, 0, 0.0)
                ),
            )

    run(scenario())


def test_garbage_on_the_socket_is_survived(core: CoreProcess, prompts: list[list[int]]) -> None:
    request = greedy(prompts[0], 4)
    payload = msgspec.msgpack.encode(request)
    add, abort = bytes((FrontendMsg.ADD,)), bytes((FrontendMsg.ABORT,))
    garbage = [
        [b"\x63", payload],  # unknown type byte
        [b"", payload],  # empty type frame
        [add + add, payload],  # type frame of two bytes
        [add],  # missing payload
        [add, payload[:-3]],  # truncated msgpack
        [add, b"\xc1"],  # a byte msgpack never uses
        [add, msgspec.msgpack.encode(AbortRequests(["x"]))],  # wrong struct
        [abort, payload],  # wrong struct the other way round
        [add, msgspec.msgpack.encode({"request_id": 1})],
        [add, payload, b"extra"],  # extra frame
    ]

    out_of_vocab = [greedy([1, 10**6], 4), greedy([1, -1], 4)]

    async def scenario() -> None:
        ctx = zmq.asyncio.Context()
        raw = RawFrontend(ctx, core, b"raw-garbage")
        try:
            await raw.send(encode(FrontendMsg.ADD, request))
            for frames in garbage:
                await raw.send(frames)
            # well-formed, but an id the model has no embedding for would fail the whole step
            for bad in out_of_vocab:
                await raw.send(encode(FrontendMsg.ADD, bad))
            await raw.wait({request.request_id, *(bad.request_id for bad in out_of_vocab)})
        finally:
            raw.sock.close()
            ctx.term()
        survived = raw.received.pop(request.request_id)
        assert len(survived.token_ids) == 4 and survived.finish_reason == FinishReason.LENGTH
        assert all("vocabulary" in (c.error or "") for c in raw.received.values())
        assert len(raw.received) == len(out_of_vocab)
        async with connect(core) as client:
            after = await complete(client, greedy(prompts[0], 4))
        assert after.token_ids == survived.token_ids

    run(scenario())
    assert core.process.is_alive()


def test_two_frontends_get_only_their_own_outputs(
    core: CoreProcess, prompts: list[list[int]]
) -> None:
    reqs_a = [greedy(p, 5) for p in prompts[:3]]
    reqs_b = [greedy(p, 7) for p in prompts[3:6]]
    ids_a, ids_b = {r.request_id for r in reqs_a}, {r.request_id for r in reqs_b}
    stolen = reqs_a[1].request_id

    async def scenario() -> tuple[RawFrontend, RawFrontend]:
        ctx = zmq.asyncio.Context()
        a, b = RawFrontend(ctx, core, b"raw-a"), RawFrontend(ctx, core, b"raw-b")
        try:
            for frontend, reqs in ((a, reqs_a), (b, reqs_b)):
                for req in reqs:
                    await frontend.send(encode(FrontendMsg.ADD, req))
            await a.wait(ids_a, until_finished=False)
            # b may neither abort a's requests nor take over their ids
            await b.send(encode(FrontendMsg.ABORT, AbortRequests(sorted(ids_a))))
            await b.send(encode(FrontendMsg.ADD, reqs_a[1]))
            await asyncio.gather(a.wait(ids_a), b.wait(ids_b | {stolen}))
            return a, b
        finally:
            a.sock.close()
            b.sock.close()
            ctx.term()

    a, b = run(scenario())
    assert set(a.received) == ids_a and set(b.received) == ids_b | {stolen}
    assert all(len(a.received[r].token_ids) == 5 for r in ids_a)
    assert all(len(b.received[r].token_ids) == 7 for r in ids_b)
    rejected = b.received[stolen]
    assert rejected.token_ids == [] and rejected.error is not None and "in use" in rejected.error


def test_overlong_prompt_is_rejected_alone(core: CoreProcess, prompts: list[list[int]]) -> None:
    async def scenario() -> list[Completion]:
        async with connect(core) as client:
            return list(
                await asyncio.gather(
                    complete(client, greedy(prompts[0], 8)),
                    complete(client, greedy(prompts[1] * 30, 8)),
                    complete(client, greedy(prompts[2], 8)),
                )
            )

    before, rejected, after = run(scenario())
    assert len(prompts[1] * 30) > MAX_MODEL_LEN
    assert rejected.token_ids == [] and rejected.error is not None
    assert "max_model_len" in rejected.error
    assert before.finish_reason == after.finish_reason == FinishReason.LENGTH
    assert len(before.token_ids) == len(after.token_ids) == 8


def test_sigterm_drains_in_flight_requests(prompts: list[list[int]], tmp_path: Path) -> None:
    # long enough that the drain outlasts the pause below on the fastest machines (a bf16
    # step of three sequences takes a few ms)
    in_flight = 200
    with running_core(tmp_path, max_model_len=MAX_MODEL_LEN, kv_cache_memory=32 * 2**20) as proc:

        async def scenario() -> tuple[list[Completion], Completion]:
            async with connect(proc) as client:
                streams = [client.add_request(greedy(p, in_flight)) for p in prompts[:3]]
                firsts = [await anext(s) for s in streams]
                proc.terminate()
                await asyncio.sleep(0.2)  # the core handles the signal between two steps
                late = await complete(client, greedy(prompts[3], 4))
                done = []
                for first, stream in zip(firsts, streams, strict=True):
                    rest = [d async for d in stream]
                    tokens = first.new_token_ids + [t for d in rest for t in d.new_token_ids]
                    done.append(Completion(tokens, rest[-1].finish_reason))
                return done, late

        done, late = run(scenario())
        proc.process.join(60)
        assert proc.process.exitcode == 0
    assert all(
        c.finish_reason == FinishReason.LENGTH and len(c.token_ids) == in_flight for c in done
    )
    assert late.error is not None and "shutting down" in late.error
