"""Request-side structured outputs: parsing the options, compiling under a time limit."""

from __future__ import annotations

import asyncio
import json

import pytest

from engine_core.messages.sampling_params import StructuredSpec
from frontend import structured_outputs
from frontend.errors import APIError
from frontend.structured_outputs import check_compiles, parse_structured
from models.tokenizer import Tokenizer

VOCAB = 49152


def test_options_become_specs() -> None:
    schema = {"type": "object", "properties": {"b": {}, "a": {}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    spec = parse_structured(fmt, None)
    assert spec is not None and spec.kind == "json"
    assert list(json.loads(spec.spec)["properties"]) == ["b", "a"]  # the order is kept
    assert parse_structured({"type": "text"}, None) is None
    assert parse_structured({"type": "json_object"}, None) == StructuredSpec("json_object")
    assert parse_structured(None, {"json": json.dumps(schema)}) == spec
    assert parse_structured(None, {"regex": "a+"}) == StructuredSpec("regex", "a+")
    choice = parse_structured(None, {"choice": ['say "hi"', "b"]})
    assert choice == StructuredSpec("grammar", 'root ::= "say \\"hi\\"" | "b"')


def test_bad_options_are_400() -> None:
    for fmt, extra in [
        ({"type": "json_schema"}, None),
        ({"type": "json_schema", "json_schema": {"schema": 5}}, None),
        (None, {"json": "{not json"}),
        (None, {"choice": []}),
        (None, {}),
        ({"type": "json_object"}, {"regex": "a"}),
    ]:
        with pytest.raises(APIError) as info:
            parse_structured(fmt, extra)
        assert info.value.status == 400


def test_compile_errors_and_the_time_limit(
    default_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def check(spec: StructuredSpec) -> APIError:
        with pytest.raises(APIError) as info:
            asyncio.run(check_compiles(default_tokenizer, VOCAB, spec, "structured_outputs"))
        return info.value

    asyncio.run(check_compiles(default_tokenizer, VOCAB, StructuredSpec("regex", "a+"), "x"))
    error = check(StructuredSpec("regex", "a(b"))
    assert error.message.startswith("invalid regex: ") and ".cc" not in error.message
    assert check(StructuredSpec("json", '{"type": 5}')).param == "structured_outputs"
    monkeypatch.setattr(structured_outputs, "COMPILE_TIMEOUT", 0.0)
    slow = StructuredSpec("regex", "(x|y){0,50}z" * 20)
    assert "took longer than" in check(slow).message
