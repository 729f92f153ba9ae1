"""Speculative decoding served: `duet serve --speculative-config` through the openai SDK
(streaming, logprobs, stop strings, /metrics), and on disaggregated decode workers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import openai
import pytest
from engine_harness import EngineHarness
from server_process import running_server
from test_disagg_e2e import SMALL
from test_spec_decode_model import NGRAM, PARAGRAPH

from engine_core.messages.config import EngineConfig
from models.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
COPY = [{"role": "user", "content": f"Repeat this paragraph exactly:\n\n{PARAGRAPH}"}]


def test_a_bad_config_stops_the_server_at_start() -> None:
    bad = json.dumps({"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 9,
                      "prompt_lookup_max": 4})  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", "from frontend.cli import main; main()", "serve",
         "--speculative-config", bad],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "duet serve: error: argument --speculative-config: "
        "prompt_lookup_min=9 must be <= prompt_lookup_max=4"
    )


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("spec-server") / "duet.log"
    args = ["--max-model-len", "1024", "--kv-cache-memory", "128MiB", "--dtype", "float32",
            "--speculative-config", json.dumps(NGRAM)]  # fmt: skip
    with running_server(args, log) as base:
        yield base


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)


def test_stream_equals_non_stream_with_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=COPY, max_tokens=64, temperature=0, logprobs=True, top_logprobs=1
    )
    choice = reply.choices[0]
    text = choice.message.content or ""
    assert "lighthouse keeper climbed" in text  # it copies, so drafts are accepted
    entries = choice.logprobs.content if choice.logprobs else []
    assert reply.usage and len(entries) == reply.usage.completion_tokens
    assert "".join(e.token for e in entries).removesuffix("<|im_end|>") == text
    stream = client.chat.completions.create(
        model=MODEL, messages=COPY, max_tokens=64, temperature=0, logprobs=True,
        top_logprobs=1, stream=True,
    )  # fmt: skip
    parts, streamed = [], []
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
                streamed += chunk.choices[0].logprobs.content
    assert "".join(parts) == text
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-4)


def test_a_stop_string_inside_accepted_drafts(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=COPY, max_tokens=64, temperature=0, stop=["great lens"]
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra
    assert choice.model_extra["stop_reason"] == "great lens"
    assert (choice.message.content or "").endswith("polished the ")


def test_metrics_count_drafts_under_vllm_names(url: str, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt=PARAGRAPH + " " + PARAGRAPH, max_tokens=32,
                              temperature=0)  # fmt: skip
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
        text = resp.read().decode()

    def value(name: str, labels: str = "") -> float:
        found = re.search(rf"^duet:{name}_total\{{[^}}]*{labels}[^}}]*\}} (\S+)$", text, re.M)
        assert found, name
        return float(found.group(1))

    drafts = value("spec_decode_num_drafts")
    draft_tokens = value("spec_decode_num_draft_tokens")
    accepted = value("spec_decode_num_accepted_tokens")
    first = value("spec_decode_num_accepted_tokens_per_pos", 'position="0"')
    assert 0 < drafts <= draft_tokens <= 4 * drafts
    assert 0 < accepted <= draft_tokens and 0 < first <= drafts


def test_disaggregated_decode_workers_speculate(default_tokenizer: Tokenizer) -> None:
    chats = {
        f"c{i}": default_tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{ask}\n\n{PARAGRAPH}"}], add_generation_prompt=True
        )
        for i, ask in enumerate(["Repeat this paragraph exactly:", "Hi"])
    }
    reference, _ = run_config({"colocated": True}, chats)
    outputs, harness = run_config({"colocated": False, "speculative_config": NGRAM}, chats)
    assert outputs == reference
    stats = harness.stats
    assert stats.kv_transfer_bytes > 0 and stats.recomputed_prefills == 0
    assert stats.spec_decode is not None and stats.spec_decode.num_accepted_tokens > 0


def run_config(
    options: dict, chats: dict[str, list[int]]
) -> tuple[dict[str, list[int]], EngineHarness]:
    harness = EngineHarness(EngineConfig(**SMALL, **options))
    try:
        return harness.generate(chats, 32), harness
    finally:
        harness.close()
