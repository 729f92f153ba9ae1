"""Structured outputs and tool calling end to end: `duet serve` driven by the openai SDK.

Every case runs against a colocated server and against 1 prefill + 1 decode worker, where
the decode worker continues the grammar from the prefill worker's first token. Sampling
is at temperature 1 where it matters: the grammar, not luck, must make outputs valid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import jsonschema
import openai
import pytest
from pydantic import BaseModel
from server_process import running_server

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
COMMON = ["--max-model-len", "1024", "--kv-cache-memory", "128MiB", "--max-num-seqs", "8",
          "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]  # fmt: skip
MODES = {"colocated": [], "disagg": ["--prefill-workers", "1", "--decode-workers", "1"]}
PERSON = [{"role": "user", "content": "Invent a person. Reply in JSON with a name and an age."}]
WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                      "parameters": CITY_SCHEMA}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time",
                                      "parameters": {"type": "object", "properties": {
                                          "zone": {"type": "string", "maxLength": 16}},
                                          "required": ["zone"], "additionalProperties": False}}},
]  # fmt: skip
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module", params=list(MODES))
def client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[openai.OpenAI]:
    log = tmp_path_factory.mktemp("server") / f"duet-{request.param}.log"
    with running_server(COMMON + MODES[request.param], log) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=300)


def _streamed_calls(stream: openai.Stream) -> tuple[str, list[dict[str, str]], str | None]:
    """(content, calls as {"name", "args"}, finish reason) of a one-choice chat stream."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for piece in choice.delta.tool_calls or ():
                if piece.index not in calls:  # the first piece names the call, once
                    assert piece.id and piece.function.name and piece.type == "function"
                    calls[piece.index] = {"name": piece.function.name, "args": ""}
                else:
                    assert piece.id is None and piece.function.name is None
                calls[piece.index]["args"] += piece.function.arguments or ""
    return content, list(calls.values()), finish


def _check_calls(calls: list, finish_reason: str) -> None:
    assert calls and finish_reason == "tool_calls"
    for call in calls:
        assert call.type == "function" and call.id
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=MODEL, messages=PERSON, response_format=Person, max_tokens=200, temperature=0
    )
    assert isinstance(completion.choices[0].message.parsed, Person)


def test_json_schema_n3_at_temperature_1(client: openai.OpenAI) -> None:
    schema = Person.model_json_schema() | {"additionalProperties": False}
    schema["properties"]["name"]["maxLength"] = 20
    schema["properties"]["age"] |= {"minimum": 0, "maximum": 120}
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema, "strict": True}}
    completion = client.chat.completions.create(
        model=MODEL, messages=PERSON, response_format=fmt, n=3, temperature=1, max_tokens=100
    )
    assert len(completion.choices) == 3
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_schema_streamed(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": CITY_SCHEMA}}
    stream = client.chat.completions.create(
        model=MODEL, messages=WEATHER, response_format=fmt, max_tokens=100, stream=True, n=2
    )
    texts, finishes = ["", ""], [None, None]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert finishes == ["stop", "stop"]
    for text in texts:
        jsonschema.validate(json.loads(text), CITY_SCHEMA)


def test_json_object_on_completions(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL, prompt='A short JSON object for a cat, like {"name": "Tom"}:',
        max_tokens=250, temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )  # fmt: skip
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.text), dict)


def test_choice_and_regex(client: openai.OpenAI) -> None:
    colours = ["red", "green", "deep blue"]
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Pick a colour."}], n=3,
        max_tokens=10, extra_body={"structured_outputs": {"choice": colours}},
    )  # fmt: skip
    assert all(c.message.content in colours for c in completion.choices)
    pattern = r"[A-Z]{2}-\d{3}"
    stream = client.completions.create(
        model=MODEL, prompt="Licence plate:", max_tokens=12, stream=True,
        extra_body={"structured_outputs": {"regex": pattern}},
    )  # fmt: skip
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert re.fullmatch(pattern, text)


def test_grammar(client: openai.OpenAI) -> None:
    grammar = 'root ::= "yes" | "no" | "maybe " [0-9]'
    completion = client.completions.create(
        model=MODEL, prompt="Will it rain?", max_tokens=8,
        extra_body={"structured_outputs": {"grammar": grammar}},
    )  # fmt: skip
    assert re.fullmatch(r"yes|no|maybe \d", completion.choices[0].text)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}}, "response_format"),
        ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "root ::= missing"}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {"unknown": 1}}, "structured_outputs"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}], "tool_choice": "required"}, "tools"),
    ],
)  # fmt: skip
def test_bad_constraints_are_400(client: openai.OpenAI, body: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=WEATHER, max_tokens=4, extra_body=body)
    error = info.value.body
    assert info.value.status_code == 400 and error["param"] == param
    assert "Traceback" not in error["message"] and ".cc:" not in error["message"]


def test_tools_required_at_temperature_1(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice="required", n=2,
        temperature=1, max_tokens=150, parallel_tool_calls=False,
    )  # fmt: skip
    for choice in completion.choices:
        assert choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        _check_calls(choice.message.tool_calls, choice.finish_reason)


def test_tools_named(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=WEATHER, tools=TOOLS, max_tokens=100,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    calls = completion.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather"]
    _check_calls(calls, completion.choices[0].finish_reason)


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}]
)
def test_tool_calls_streamed(client: openai.OpenAI, tool_choice: object) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice=tool_choice, max_tokens=150,
        stream=True, parallel_tool_calls=False,
    )  # fmt: skip
    _, calls, finish = _streamed_calls(stream)
    assert finish == "tool_calls" and calls
    for call in calls:
        jsonschema.validate(json.loads(call["args"]), SCHEMAS[call["name"]])


# A grammar that makes the model write a hermes call, so the auto parser has one to find.
HERMES_CALL = (
    'root ::= "Let me check.\\n<tool_call>\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": '
    '{\\"city\\": \\"" [A-Za-z]{1,20} "\\", \\"unit\\": \\"celsius\\"}}\\n</tool_call>"'
)


@pytest.mark.parametrize("stream", [False, True])
def test_tools_auto_parses_hermes_calls(client: openai.OpenAI, stream: bool) -> None:
    extra = {"structured_outputs": {"grammar": HERMES_CALL}}
    args = {"model": MODEL, "messages": WEATHER, "tools": TOOLS, "max_tokens": 60}
    if not stream:
        choice = client.chat.completions.create(**args, extra_body=extra).choices[0]
        calls = [{"name": c.function.name, "args": c.function.arguments}
                 for c in choice.message.tool_calls]  # fmt: skip
        content, finish = choice.message.content, choice.finish_reason
    else:
        stream_ = client.chat.completions.create(**args, extra_body=extra, stream=True)
        content, calls, finish = _streamed_calls(stream_)
    assert content.strip() == "Let me check." and finish == "tool_calls"
    assert [c["name"] for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0]["args"]), CITY_SCHEMA)


def test_tools_auto_and_none_leave_text_alone(client: openai.OpenAI) -> None:
    for tool_choice in ("auto", "none"):
        completion = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello."}], tools=TOOLS,
            tool_choice=tool_choice, max_tokens=8, temperature=0,
        )  # fmt: skip
        choice = completion.choices[0]
        if tool_choice == "none" or "<tool_call>" not in choice.message.content:
            assert choice.message.tool_calls is None and choice.message.content


def test_tool_result_round_trip(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice="required", max_tokens=100,
        parallel_tool_calls=False, temperature=0,
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, max_tokens=30, temperature=0
    )
    assert second.choices[0].message.content
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
