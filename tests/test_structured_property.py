"""Property: any schema from a small generator yields parseable, schema-valid JSON.

A tiny random Llama samples at temperature 1: its logits are noise, so only the grammar
stands between it and garbage, and it explores far corners of each schema. Every output
must finish by itself ("stop", inside the token budget) and validate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_core.llm import LLM
from engine_core.messages.sampling_params import SamplingParams, StructuredSpec
from models.loader import resolve_model
from models.structured import GrammarMasker
from models.tokenizer import load_tokenizer

NAMES = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)
LEAVES = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.builds(
        lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
        st.integers(-1000, 1000),
        st.integers(0, 500),
    ),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda v: {"enum": v}, st.lists(NAMES | st.integers(0, 9), min_size=1, max_size=4)),
)


def _object(props: dict[str, Any], required: list[bool]) -> dict[str, Any]:
    names = list(props)
    return {
        "type": "object",
        "properties": props,
        "required": [n for n, r in zip(names, required, strict=False) if r],
        "additionalProperties": False,
    }


SCHEMAS = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.builds(
            lambda items, n: {"type": "array", "items": items, "maxItems": n},
            inner,
            st.integers(0, 3),
        ),
        st.builds(
            _object,
            st.dictionaries(NAMES, inner, min_size=1, max_size=3),
            st.lists(st.booleans(), min_size=3, max_size=3),
        ),
    ),
    max_leaves=6,
).map(lambda s: s if s.get("type") == "object" else _object({"value": s}, [True]))


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Callable[..., Path]) -> LLM:
    return LLM(str(tiny_checkpoint()), kv_cache_memory="64MiB", max_model_len=1024)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schema=SCHEMAS, seed=st.integers(0, 2**31))
def test_random_schemas_give_valid_json(llm: LLM, schema: dict[str, Any], seed: int) -> None:
    params = SamplingParams(
        n=2, temperature=1.0, seed=seed, max_tokens=600,
        structured=StructuredSpec("json", json.dumps(schema)),
    )  # fmt: skip
    [output] = llm.generate(["Some JSON:"], params, use_tqdm=False)
    for sample in output.outputs:
        assert sample.finish_reason == "stop", sample.text
        jsonschema.validate(json.loads(sample.text), schema)


def test_grammar_survives_preemption(tiny_checkpoint: Callable[..., Path]) -> None:
    """Requests preempted mid-object resume with their matcher replayed from their tokens."""
    # ~40 KV blocks of 16 tokens: four ~250-token outputs cannot all stay resident
    llm = LLM(
        str(tiny_checkpoint()), kv_cache_memory=640 * 1024, max_model_len=512, dtype="float32"
    )
    word = {"type": "string", "minLength": 3, "maxLength": 6}
    schema = {"type": "array", "items": word, "minItems": 40, "maxItems": 40}
    params = SamplingParams(
        n=4, temperature=1.0, seed=7, max_tokens=480,
        structured=StructuredSpec("json", json.dumps(schema)),
    )  # fmt: skip
    [output] = llm.generate(["Words:"], params)
    assert llm.engine.stats().num_preemptions > 0
    for sample in output.outputs:
        assert sample.finish_reason == "stop", sample.text
        jsonschema.validate(json.loads(sample.text), schema)


def test_constrained_requests_stay_valid_beside_speculating_ones(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    """In speculative steps, constrained rows are masked and never drafted; the plain
    requests beside them still draft from their repetitive prompts."""
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
             "prompt_lookup_min": 1}  # fmt: skip
    llm = LLM(str(tiny_checkpoint()), kv_cache_memory="64MiB", max_model_len=1024,
              dtype="float32", speculative_config=ngram)  # fmt: skip
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
              "minItems": 5, "maxItems": 5}  # fmt: skip
    constrained = SamplingParams(
        temperature=1.0,
        seed=3,
        max_tokens=200,
        structured=StructuredSpec("json", json.dumps(schema)),
    )
    plain = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    repetitive = [1, *([5, 7, 9] * 8)]
    outputs = llm.generate(
        [repetitive, "Digits:", repetitive, "Digits:"], [plain, constrained, plain, constrained]
    )
    for output in outputs[1::2]:
        assert output.outputs[0].finish_reason == "stop", output.outputs[0].text
        jsonschema.validate(json.loads(output.outputs[0].text), schema)
    stats = llm.engine.stats().spec_decode
    assert stats is not None and stats.num_draft_tokens > 0


@pytest.mark.parametrize("limit", [{}, {"maxLength": 4}])
def test_json_strings_never_take_raw_control_characters(limit: dict[str, int]) -> None:
    # xgrammar 0.2.9 allows them in a string with maxLength; JSON does not
    tokenizer = load_tokenizer(resolve_model(None))
    masker = GrammarMasker(tokenizer.hf, 49152, tokenizer.eos_token_ids)
    schema = {"type": "object", "properties": {"v": {"type": "string", **limit}},
              "required": ["v"], "additionalProperties": False}  # fmt: skip
    grammar = masker.request(
        StructuredSpec("json", json.dumps(schema)), tokenizer.encode('{"v": "', False)
    )
    logits = torch.zeros(1, 49152)
    masker.apply(logits, [grammar])
    control = [i for i in range(256) if any(ord(c) < 0x20 for c in tokenizer.decode([i]))]
    assert control and bool(torch.isinf(logits[0, control]).all())
    assert not bool(torch.isinf(logits[0, tokenizer.encode("abc", False)]).any())
