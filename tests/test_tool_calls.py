"""Tool-call parsing and streaming: any split of the text streams what the whole text parses to."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from frontend.errors import APIError
from frontend.tool_calls import ToolPlan, plan_tools
from frontend.tool_prompt import hermes, knows_tools, native
from frontend.tool_stream import ToolStreamer
from models.loader import resolve_model
from models.tokenizer import load_tokenizer

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time"}},
]
AUTO = (
    "Let me look.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Lyon <b>", "when": ["now"]}}\n'
    '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
)
REQUIRED = (
    '[{"name": "get_weather", "parameters": {"city": "a \\"}\\" b", "n": [1, {"x": 2}]}}, '
    '{"name": "get_time", "parameters": {}}]'
)


def _plan(tool_choice: object = None) -> ToolPlan:
    plan = plan_tools(TOOLS, tool_choice, None, "hermes")
    assert plan is not None
    return plan


def _streamed(plan: ToolPlan, pieces: list[str]) -> tuple[str, list[tuple[str, str]]]:
    streamer = ToolStreamer(plan)
    content, calls = "", {}
    for i, piece in enumerate(pieces):
        text, deltas = streamer.feed(piece, i == len(pieces) - 1)
        content += text
        for d in deltas:
            if d.id is not None:
                calls[d.index] = [d.function.name, ""]
            calls[d.index][1] += d.function.arguments or ""
    return content, [tuple(c) for c in calls.values()]


def _split(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(bounds)] or [""]


@pytest.mark.parametrize(("choice", "text"), [("auto", AUTO), ("required", REQUIRED)])
@given(cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_any_split_streams_the_parse(choice: str, text: str, cuts: list[int]) -> None:
    plan = _plan(choice)
    content, calls = plan.parse(text)
    expected = [(c.function.name, c.function.arguments) for c in calls]
    streamed_content, streamed = _streamed(plan, _split(text, cuts))
    assert streamed_content.strip() == (content or "")
    assert [n for n, _ in streamed] == [n for n, _ in expected] == ["get_weather", "get_time"]
    assert streamed == expected
    assert all(isinstance(json.loads(a), dict) for _, a in streamed)


def test_auto_without_calls_is_content() -> None:
    plan = _plan("auto")
    assert plan.parse("a <tool_ca b") == ("a <tool_ca b", [])
    assert _streamed(plan, ["a <tool_c", "a b"]) == ("a <tool_ca b", [])


def test_tool_choice_checks() -> None:
    assert plan_tools(None, None, None, None) is None
    assert _plan().mode == "auto"
    assert plan_tools(TOOLS, None, None, None).mode == "none"  # auto needs the flag
    for tools, choice in [
        (TOOLS, {"type": "function", "function": {"name": "nope"}}),
        (TOOLS, "sometimes"),
        (None, "required"),
    ]:
        with pytest.raises(APIError) as info:
            plan_tools(tools, choice, None, "hermes")
        assert info.value.param == "tool_choice"
    with pytest.raises(APIError):
        plan_tools(TOOLS, "auto", None, None)


def test_hermes_prompt_carries_tools_calls_and_results() -> None:
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "1"},
    ]  # fmt: skip
    out = hermes(messages, _plan().functions)
    assert out[0]["role"] == "system" and '"name": "get_weather"' in out[0]["content"]
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert out[2]["content"] == call
    assert out[3] == {"role": "tool", "content": "<tool_response>\nsunny\n</tool_response>"}


def test_tool_aware_templates_get_tools_natively() -> None:
    template = (
        "{% for t in tools %}{{ t.function.name }};{% endfor %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[{{ c.function.arguments.city }}]{% endfor %}|"
        "{% endfor %}"
    )
    tokenizer = load_tokenizer(resolve_model(None), chat_template=template)
    assert knows_tools(tokenizer.chat_template)
    messages = [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    ]  # fmt: skip
    messages, tools = native(messages, _plan().functions)
    text = tokenizer.render_chat(messages, add_generation_prompt=False, tools=tools)
    assert text == "get_weather;get_time;assistant:[Oslo]|"
