"""Every message of every boundary crosses a real socket and comes back equal.

Messages are built from the tables themselves (msgspec.inspect), so a new message type or
field is covered without touching this file: each one once with every optional field set
and once with them all at their defaults.
"""

from __future__ import annotations

import enum
import itertools
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
import zmq

from engine_core.messages import frontend, kv, worker
from engine_core.messages.common import TokenLogprobs
from engine_core.messages.framing import Channel, Endpoint, MessageTable

# (one side, the other side, the message enum) for each boundary
BOUNDARIES = [
    (frontend.CORE, frontend.FRONTEND, frontend.FrontendMsg),
    (worker.CORE, worker.WORKER, worker.WorkerMsg),
    (kv.RECEIVER, kv.SENDER, kv.KVMsg),
]


def sample(t: mi.Type, full: bool) -> Any:
    """A value of type `t`; Structs with their optional fields set (`full`) or defaulted."""
    if isinstance(t, mi.StructType):
        fields = [f for f in t.fields if full or f.required]
        return t.cls(**{f.name: sample(f.type, full) for f in fields})
    if isinstance(t, mi.UnionType):
        return sample(next(u for u in t.types if not isinstance(u, mi.NoneType)), full)
    if isinstance(t, mi.ListType):
        return [sample(t.item_type, full), sample(t.item_type, full)]
    if isinstance(t, mi.DictType):
        return {sample(t.key_type, full): sample(t.value_type, full)}
    if isinstance(t, mi.EnumType):
        return list(t.cls)[-1]
    scalars = {mi.IntType: 7, mi.FloatType: 0.5, mi.StrType: "x", mi.BoolType: True}
    return scalars[type(t)]


def messages(table: MessageTable) -> list[tuple[int, msgspec.Struct | None]]:
    """Every type of `table`, with a full and an empty payload where it has one."""
    out: list[tuple[int, msgspec.Struct | None]] = []
    for kind, payload in table.types.items():
        if payload is None:
            out.append((kind, None))
        else:
            out += [(kind, sample(mi.type_info(payload), full)) for full in (True, False)]
    return out


@pytest.fixture
def ctx() -> zmq.Context:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def pair(ctx: zmq.Context, server: Endpoint, client: Endpoint) -> tuple[Channel, Channel]:
    a, b = Channel(ctx, server), Channel(ctx, client, b"peer")
    address = f"inproc://wire-{next(_addresses)}"
    a.bind(address)
    b.connect(address)
    return a, b


_addresses = itertools.count()


def through(sender: Channel, receiver: Channel, kind: int, message: msgspec.Struct | None) -> Any:
    to = b"peer" if sender.routed else None
    sender.send(kind, message, to=to)
    assert receiver.poll(2000), f"type {kind} never arrived"
    received = receiver.recv()
    assert received is not None, f"type {kind} could not be decoded"
    assert received[1] == kind
    return received[2]


@pytest.mark.parametrize("server,client,_kinds", BOUNDARIES)
def test_every_message_round_trips(ctx, server: Endpoint, client: Endpoint, _kinds) -> None:
    a, b = pair(ctx, server, client)
    # PUSH/PULL is one-way: the receiver sends nothing
    directions = [(b, a, client.sends), (a, b, server.sends)]
    for sender, receiver, table in directions:
        for kind, message in messages(table):
            assert through(sender, receiver, kind, message) == message


@pytest.mark.parametrize("server,client,kinds", BOUNDARIES)
def test_every_message_type_has_one_table_entry(server, client, kinds: type[enum.IntEnum]) -> None:
    entries = [k for table in (server.sends, client.sends) for k in table.types]
    assert sorted(entries) == sorted(kinds), "a type missing from, or in both, directions"
    assert server.receives is client.sends and client.receives is server.sends


def test_step_result_with_rows_with_and_without_logprobs(ctx) -> None:
    core, work = pair(ctx, worker.CORE, worker.WORKER)
    rows = [TokenLogprobs([5, 5, 9], [-0.1, -0.1, -2.3], 1), None, TokenLogprobs([3], [-1.0], 4)]
    result = worker.StepResult(7, ["a", "b", "c"], [5, 8, 3], logprobs=rows)
    assert through(work, core, worker.WorkerMsg.RESULT, result) == result


def test_a_producer_cannot_send_what_the_table_does_not_say() -> None:
    table = frontend.TO_CORE
    with pytest.raises(TypeError):
        table.encode(frontend.FrontendMsg.ADD, frontend.AbortRequests(["x"]))
    with pytest.raises(TypeError):
        table.encode(frontend.FrontendMsg.OUTPUTS, frontend.StepOutputs([], 0.0))
    with pytest.raises(TypeError):
        table.encode(frontend.FrontendMsg.ADD)


def test_kv_header_carries_its_data_frames(ctx) -> None:
    receiver, sender = pair(ctx, kv.RECEIVER, kv.SENDER)
    header = sample(mi.type_info(kv.KVHeader), True)
    sender.send(kv.KVMsg.HEADER, header, data=[b"\x01\x02", b"\x03"])
    assert receiver.poll(2000)
    frames = receiver.sock.recv_multipart()
    assert receiver.decode(frames) == (kv.KVMsg.HEADER, header)
    assert frames[2:] == [b"\x01\x02", b"\x03"]


def test_step_result_prompt_logprobs_rows_may_be_absent(ctx) -> None:
    core, work = pair(ctx, worker.CORE, worker.WORKER)
    chunk = [TokenLogprobs([4, 4], [-0.5, -0.5], 1), TokenLogprobs([6, 2], [-3.0, -0.2], 7)]
    # "b" is a prompt chunk that asked nothing; "c" samples without prompt logprobs
    result = worker.StepResult(3, ["c"], [9], prompt_logprobs={"a": chunk})
    assert through(work, core, worker.WorkerMsg.RESULT, result) == result
    plain = worker.StepResult(4, [], [])
    received = through(work, core, worker.WorkerMsg.RESULT, plain)
    assert received == plain and received.prompt_logprobs == {}


def test_first_delta_carries_prompt_logprobs(ctx) -> None:
    core, front = pair(ctx, frontend.CORE, frontend.FRONTEND)
    entries = [TokenLogprobs([8, 1, 8], [-1.5, -0.3, -1.5], 2)]
    first = frontend.RequestDelta("r", [5], prompt_logprobs=entries)
    later = frontend.RequestDelta("r", [6])
    message = frontend.StepOutputs([first, later], 1.0)
    received = through(core, front, frontend.FrontendMsg.OUTPUTS, message)
    assert received == message and received.outputs[1].prompt_logprobs is None
