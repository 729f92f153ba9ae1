"""Tool calling: `tools` + `tool_choice` -> a constraint and a prompt; output -> tool calls.

As in vLLM: `required` constrains the output to a JSON array of {"name", "parameters"}
items and a named choice to that function's arguments, both through a schema built from
the functions' parameter schemas, so the arguments always validate. `auto` leaves the
output free and a tool-call parser (hermes: `<tool_call>{...}</tool_call>`) finds calls.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec

from engine_core.messages.sampling_params import StructuredSpec
from frontend.errors import bad_request
from frontend.responses import FunctionCallOut, ToolCallOut
from frontend.structured_outputs import json_schema_spec

_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


class FunctionDef(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(msgspec.Struct, kw_only=True):
    type: str
    function: FunctionDef


class NamedFunction(msgspec.Struct, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    type: str
    function: NamedFunction


@dataclass(frozen=True)
class ToolPlan:
    """How one request uses its tools. mode: "none" | "auto" | "required" | "named"."""

    functions: list[FunctionDef]
    mode: str
    named: str | None = None
    parallel: bool = True

    @property
    def spec(self) -> StructuredSpec | None:
        """The constraint the mode puts on the output (None for none and auto)."""
        if self.mode == "named":
            fn = next(f for f in self.functions if f.name == self.named)
            return json_schema_spec(fn.parameters or _EMPTY_PARAMETERS, "tools")
        if self.mode == "required":
            return json_schema_spec(_calls_schema(self.functions, self.parallel), "tools")
        return None

    def parse(self, text: str) -> tuple[str | None, list[ToolCallOut]]:
        """(content, tool calls) of a choice's whole output."""
        if self.mode == "named":
            return None, [new_call(self.named or "", text)]
        if self.mode == "required":
            try:
                json.loads(text)
            except ValueError:  # cut short by max_tokens
                return text, []
            return None, [new_call(name, args) for name, args in scan_calls(text, "parameters")]
        if self.mode == "auto":
            return parse_hermes(text)
        return text, []


def plan_tools(
    tools: Any, tool_choice: Any, parallel_tool_calls: Any, auto_parser: str | None
) -> ToolPlan | None:
    """Check a request's tool options; None when it has no tools (or tool_choice none
    without any). `auto_parser` is --tool-call-parser when auto tool choice is enabled."""
    functions = _functions(tools)
    if tool_choice is None:
        tool_choice = "auto" if functions and auto_parser else "none"
    if not isinstance(parallel_tool_calls, bool | None):
        raise bad_request("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    parallel = parallel_tool_calls is not False
    if tool_choice in ("none", "auto", "required"):
        if tool_choice != "none" and not functions:
            raise bad_request(f'tool_choice "{tool_choice}" needs tools', "tool_choice")
        if tool_choice == "auto" and auto_parser is None:
            raise bad_request(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser',
                "tool_choice",
            )
        return ToolPlan(functions, tool_choice, parallel=parallel) if functions else None
    try:
        named = msgspec.convert(tool_choice, NamedToolChoice).function.name
    except msgspec.ValidationError:
        raise bad_request(
            'tool_choice must be "none", "auto", "required" or {"type": "function", '
            '"function": {"name": ...}}',
            "tool_choice",
        ) from None
    if named not in {f.name for f in functions}:
        raise bad_request(f"tool_choice names {named!r}, which is not in tools", "tool_choice")
    return ToolPlan(functions, "named", named, parallel)


def _functions(tools: Any) -> list[FunctionDef]:
    if tools is None:
        return []
    try:
        defs = msgspec.convert(tools, list[ToolDef])
    except msgspec.ValidationError as exc:
        raise bad_request(f"invalid tools: {exc}", "tools") from None
    for i, tool in enumerate(defs):
        if tool.type != "function":
            raise bad_request("only tools of type function are supported", f"tools[{i}].type")
    return [t.function for t in defs]


def _calls_schema(functions: list[FunctionDef], parallel: bool) -> dict[str, Any]:
    """vLLM's schema for tool_choice "required": [{"name": ..., "parameters": ...}, ...]."""
    items = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [f.name]},
                "parameters": f.parameters or _EMPTY_PARAMETERS,
            },
            "required": ["name", "parameters"],
        }
        for f in functions
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def new_call(name: str, arguments: str) -> ToolCallOut:
    return ToolCallOut(f"chatcmpl-tool-{uuid.uuid4().hex}", FunctionCallOut(name, arguments))


_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def scan_calls(text: str, key: str) -> list[tuple[str, str]]:
    """(name, arguments text so far) of each {"name": ..., key: {...}} object in `text`,
    which may end anywhere: the last call's arguments may be incomplete."""
    calls: list[tuple[str, str]] = []
    value = re.compile(rf'"{key}"\s*:\s*')
    pos = 0
    while (name := _NAME.search(text, pos)) is not None:
        start = value.search(text, name.end())
        if start is None:
            calls.append((json.loads(f'"{name.group(1)}"'), ""))
            break
        end = _value_end(text, start.end())
        calls.append((json.loads(f'"{name.group(1)}"'), text[start.end() : end]))
        pos = end
    return calls


def _value_end(text: str, start: int) -> int:
    """Where the JSON object or array starting at `start` ends (len(text) if it does not)."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            escaped, in_string = (False, True) if escaped else (c == "\\", c != '"')
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"


def parse_hermes(text: str) -> tuple[str | None, list[ToolCallOut]]:
    """Hermes tool calls in free text: the text before the first is the content."""
    if HERMES_OPEN not in text:
        return text, []
    calls = [c for c in (hermes_call(m) for m in _HERMES.findall(text)) if c is not None]
    if not calls:
        return text, []
    content = text[: text.index(HERMES_OPEN)].strip()
    return content or None, [new_call(name, args) for name, args in calls]


def hermes_call(body: str) -> tuple[str, str] | None:
    """(name, arguments JSON) of one `<tool_call>` body, {"name": ..., "arguments": {...}};
    None if it is not one. The arguments keep the model's own text where it is plain (as
    the stream sent it piece by piece)."""
    try:
        call = json.loads(body)
        name, arguments = call["name"], call.get("arguments", {})
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if not isinstance(name, str):
        return None
    scanned = scan_calls(body, "arguments")
    if scanned and scanned[0][0] == name and _parses_to(scanned[0][1], arguments):
        return name, scanned[0][1]
    return name, arguments if isinstance(arguments, str) else json.dumps(arguments)


def _parses_to(text: str, value: Any) -> bool:
    try:
        return not isinstance(value, str) and json.loads(text) == value
    except ValueError:
        return False
