"""Tools, assistant tool calls and tool results in the prompt, whatever the chat template.

A template that knows tools (it mentions `tools`) gets them natively, as transformers
passes them. Others (SmolLM2's plain ChatML among them) would drop them silently, so the
conversation is rewritten in the Hermes format the hermes parser reads back: the tools in
the system prompt, calls as `<tool_call>` blocks, results as `<tool_response>` blocks.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from frontend.errors import bad_request
from frontend.tool_calls import FunctionDef

_HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures "
    "within <tools></tools> XML tags. You may call one or more functions to assist with "
    "the user query. Don't make assumptions about what values to plug into functions. "
    "Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags as follows:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


class FunctionIn(msgspec.Struct, kw_only=True):
    name: str
    arguments: str


class ToolCallIn(msgspec.Struct, kw_only=True):
    function: FunctionIn
    id: str | None = None
    type: str = "function"


def tool_calls_in(value: Any, param: str) -> list[dict[str, Any]] | None:
    """An assistant message's `tool_calls` as template dicts (arguments kept as text)."""
    if value is None:
        return None
    try:
        calls = msgspec.convert(value, list[ToolCallIn])
    except msgspec.ValidationError as exc:
        raise bad_request(f"invalid tool_calls: {exc}", param) from None
    return [msgspec.to_builtins(c) for c in calls]


def knows_tools(template: str | None) -> bool:
    return template is not None and "tools" in template


def native(
    messages: list[dict[str, Any]], functions: list[FunctionDef]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Messages and tools as transformers' tool-aware templates expect them."""
    for message in messages:
        for call in message.get("tool_calls") or ():
            fn = call["function"]
            fn["arguments"] = _loads_or_keep(fn["arguments"])
    return messages, [_tool_json(f) for f in functions]


def hermes(messages: list[dict[str, Any]], functions: list[FunctionDef]) -> list[dict[str, Any]]:
    """Plain role/content messages carrying tools, calls and results as Hermes text."""
    out = [_hermes_message(m) for m in messages]
    if functions:
        listing = "\n".join(json.dumps(_tool_json(f)) for f in functions)
        system = _HERMES_SYSTEM.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def _hermes_message(message: dict[str, Any]) -> dict[str, Any]:
    content = message["content"]
    if message["role"] == "tool":
        return {"role": "tool", "content": f"<tool_response>\n{content}\n</tool_response>"}
    calls = [
        json.dumps(
            {"name": c["function"]["name"], "arguments": _loads_or_keep(c["function"]["arguments"])}
        )
        for c in message.get("tool_calls") or ()
    ]
    blocks = "".join(f"<tool_call>\n{c}\n</tool_call>" for c in calls)
    return {"role": message["role"], "content": content + blocks}


def _tool_json(fn: FunctionDef) -> dict[str, Any]:
    return {"type": "function", "function": msgspec.to_builtins(fn)}


def _loads_or_keep(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
