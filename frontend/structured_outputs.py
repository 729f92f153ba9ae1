"""`response_format` and vLLM's `structured_outputs` -> a StructuredSpec, checked before admission.

The frontend compiles each spec once (in a thread, under a time limit; xgrammar caches it
by value), so an invalid schema, regex or grammar is a 400 before anything is scheduled
and a pathological one cannot stall the event loop or the engine. Workers compile the
spec again themselves; only the spec's text travels.
"""

from __future__ import annotations

import asyncio
import functools
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec

from engine_core.messages.config import env_seconds
from engine_core.messages.sampling_params import StructuredSpec
from frontend.errors import bad_request
from models.structured import GrammarError, compile_spec, make_compiler
from models.tokenizer import Tokenizer

COMPILE_TIMEOUT = env_seconds("DUET_GRAMMAR_COMPILE_TIMEOUT", 5.0)
# NOTE: a compile that overruns cannot be interrupted; it keeps its thread until done, so
# a few threads keep one such request from blocking everyone else's validation
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="grammar")

# what each kind is called in error messages
_WHAT = {"json": "JSON schema", "regex": "regex", "grammar": "grammar", "json_object": "format"}


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | bool | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: str
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's extra body `structured_outputs`: exactly one constraint."""

    json: str | dict[str, Any] | bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def parse_structured(response_format: Any, structured_outputs: Any) -> StructuredSpec | None:
    """The request's constraint, or None; 400 for malformed or conflicting options."""
    from_format = _from_response_format(response_format)
    from_extra = _from_structured_outputs(structured_outputs)
    if from_format is not None and from_extra is not None:
        raise bad_request(
            "response_format and structured_outputs cannot be used together",
            "structured_outputs",
        )
    return from_format or from_extra


async def check_compiles(
    tokenizer: Tokenizer, vocab_size: int, spec: StructuredSpec, param: str
) -> None:
    """Compile `spec` off the event loop; 400 if it is invalid or takes too long."""
    loop = asyncio.get_running_loop()
    job = loop.run_in_executor(_POOL, _compile, tokenizer, vocab_size, spec)
    try:
        await asyncio.wait_for(job, COMPILE_TIMEOUT)
    except TimeoutError:
        raise bad_request(
            f"the {_WHAT[spec.kind]} took longer than {COMPILE_TIMEOUT:g} s to compile", param
        ) from None
    except GrammarError as exc:
        raise bad_request(f"invalid {_WHAT[spec.kind]}: {exc}", param) from None


def _compile(tokenizer: Tokenizer, vocab_size: int, spec: StructuredSpec) -> None:
    compile_spec(_compiler(tokenizer, vocab_size), spec)


@functools.cache
def _compiler(tokenizer: Tokenizer, vocab_size: int) -> Any:
    return make_compiler(tokenizer.hf, vocab_size, tokenizer.eos_token_ids)


def _convert(value: Any, kind: type, param: str) -> Any:
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        raise bad_request(f"invalid {param}: {exc}", param) from None


def _from_response_format(value: Any) -> StructuredSpec | None:
    if value is None:
        return None
    fmt: ResponseFormat = _convert(value, ResponseFormat, "response_format")
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredSpec("json_object")
    if fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema is None:
            raise bad_request(
                "response_format of type json_schema needs json_schema.schema",
                "response_format.json_schema",
            )
        return json_schema_spec(fmt.json_schema.schema, "response_format.json_schema.schema")
    raise bad_request(
        f"response_format.type must be text, json_object or json_schema, not {fmt.type!r}",
        "response_format.type",
    )


def _from_structured_outputs(value: Any) -> StructuredSpec | None:
    if value is None:
        return None
    so: StructuredOutputs = _convert(value, StructuredOutputs, "structured_outputs")
    given = [
        (name, v)
        for name, v in (
            ("json", so.json),
            ("regex", so.regex),
            ("choice", so.choice),
            ("grammar", so.grammar),
            ("json_object", so.json_object or None),
        )
        if v is not None
    ]
    if len(given) != 1:
        raise bad_request(
            "structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
            "structured_outputs",
        )
    name, v = given[0]
    if name == "json":
        return json_schema_spec(v, "structured_outputs.json")
    if name == "choice":
        if not v:
            raise bad_request("structured_outputs.choice must not be empty", "structured_outputs")
        # json.dumps writes the \" \\ \n \uXXXX escapes that EBNF string literals take
        return StructuredSpec("grammar", "root ::= " + " | ".join(json.dumps(c) for c in v))
    if name == "json_object":
        return StructuredSpec("json_object")
    return StructuredSpec(name, v)


def json_schema_spec(schema: str | dict[str, Any] | bool, param: str) -> StructuredSpec:
    """A "json" spec from a schema given as an object or as its JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise bad_request("the JSON schema is not valid JSON", param) from None
    if not isinstance(schema, dict | bool):
        raise bad_request("a JSON schema must be an object", param)
    # NOTE: key order kept: it is the order in which the model writes the properties
    return StructuredSpec("json", json.dumps(schema))


async def request_spec(
    tokenizer: Tokenizer, vocab_size: int, response_format: Any, structured_outputs: Any
) -> StructuredSpec | None:
    """Parse and compile-check a request's constraint (None: unconstrained)."""
    spec = parse_structured(response_format, structured_outputs)
    if spec is not None:
        param = "structured_outputs" if response_format is None else "response_format"
        await check_compiles(tokenizer, vocab_size, spec, param)
    return spec
