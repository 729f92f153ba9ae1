"""Prompt logprobs through the real engine equal Hugging Face's log_softmax of the prompt."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import torch
from engine_harness import EngineHarness
from server_process import running_server
from transformers import AutoModelForCausalLM

from engine_core import LLM, SamplingParams
from engine_core.messages.common import TokenLogprobs
from engine_core.messages.config import EngineConfig
from models.export import export_hf_folder

MODEL = "SmolLM2-135M-Instruct"

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was "
    "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, "
    "it was the season of Light, it was the season of Darkness, it was the spring of hope, "
    "it was the winter of despair."
)
TOP = 3
# fp32 on both sides: only the order of float sums differs (attention, chunking)
ATOL = 2e-3


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory, default_source) -> torch.nn.Module:
    folder = export_hf_folder(default_source, tmp_path_factory.mktemp("smollm2-hf"))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_prompt_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """[P - 1, V]: row p is the distribution over token p + 1."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()  # [P, V]
    return logits[:-1].log_softmax(-1)


def check_against_hf(
    entries: list[TokenLogprobs | None], ids: list[int], ref: torch.Tensor
) -> None:
    assert entries[0] is None and len(entries) == len(ids)
    ours = torch.tensor([e.logprobs[0] for e in entries[1:]])  # type: ignore[union-attr]
    assert [e.token_ids[0] for e in entries[1:]] == ids[1:]  # type: ignore[union-attr]
    want = ref.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(ours, want, atol=ATOL, rtol=0)
    ranks = (ref >= want[:, None]).sum(-1).tolist()
    got_ranks = [e.rank for e in entries[1:]]  # type: ignore[union-attr]
    # a near-tie may swap places under fp32 reordering; anything else must agree
    assert sum(a != b for a, b in zip(got_ranks, ranks, strict=True)) <= 1
    for entry, row in zip(entries[1:], ref, strict=True):
        assert entry is not None and len(entry.token_ids) == 1 + TOP
        top = row.topk(TOP)
        torch.testing.assert_close(torch.tensor(entry.logprobs[1:]), top.values, atol=ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("max_num_batched_tokens", [2048, 24])
def test_prompt_logprobs_match_hf(hf_model: torch.nn.Module, max_num_batched_tokens: int) -> None:
    # 24-token budget: the ~75-token prompt is prefilled in chunks that end mid-block
    llm = LLM(
        kv_cache_memory="64MiB",
        dtype="float32",
        max_model_len=1024,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    ids = llm.tokenizer.encode(TEXT)
    assert len(ids) > 2 * 24
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=TOP)
    # a warm-up run fills the prefix cache: the second must score every position anyway
    first, second = llm.generate([ids, ids], params)
    ref = hf_prompt_logprobs(hf_model, ids)
    for out in (first, second):
        assert out.prompt_logprobs is not None
        check_against_hf(out.prompt_logprobs, ids, ref)
    again = llm.generate(ids, params)[0]
    assert again.num_cached_tokens == 0 and again.prompt_logprobs is not None
    check_against_hf(again.prompt_logprobs, ids, ref)
    plain = llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=2))[0]
    assert plain.prompt_logprobs is None and plain.num_cached_tokens > 0
    assert plain.outputs[0].token_ids == first.outputs[0].token_ids


def hf_token_logprobs(ref: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """[P - 1]: HF's logprob of each prompt token after the first."""
    return ref.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)


@pytest.fixture(scope="module")
def prompt_ids(default_tokenizer) -> list[int]:
    return default_tokenizer.encode(TEXT)


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("server") / "duet.log"
    # a 32-token budget: the prompt is prefilled in chunks here too
    args = ["--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory", "64MiB",
            "--max-num-batched-tokens", "32"]  # fmt: skip
    with running_server(args, log) as url:
        yield url


@pytest.fixture
def client(server_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="x", max_retries=0, timeout=300)


@pytest.mark.slow
def test_echo_with_logprobs_scores_the_prompt(
    client: openai.OpenAI, hf_model: torch.nn.Module, prompt_ids: list[int]
) -> None:
    result = client.completions.create(
        model=MODEL, prompt=TEXT, max_tokens=2, temperature=0, echo=True, logprobs=2
    )
    choice = result.choices[0]
    assert choice.text.startswith(TEXT) and choice.logprobs is not None
    lp = choice.logprobs
    count = len(prompt_ids)
    assert lp.tokens is not None and len(lp.tokens) == count + 2
    assert lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset is not None and lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[count] == len(TEXT)
    want = hf_token_logprobs(hf_prompt_logprobs(hf_model, prompt_ids), prompt_ids)
    got = torch.tensor(lp.token_logprobs[1:count])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert all(len(top) >= 2 for top in lp.top_logprobs[1:])

    stream = client.completions.create(
        model=MODEL, prompt=TEXT, max_tokens=2, temperature=0, echo=True, logprobs=2, stream=True
    )
    chunks = list(stream)
    first = chunks[0].choices[0]
    assert first.text == TEXT and first.logprobs is not None
    assert first.logprobs.token_logprobs == lp.token_logprobs[:count]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text


@pytest.mark.slow
def test_prompt_logprobs_extra_parameter(
    client: openai.OpenAI, hf_model: torch.nn.Module, prompt_ids: list[int]
) -> None:
    result = client.completions.create(
        model=MODEL, prompt=prompt_ids, max_tokens=1, temperature=0,
        extra_body={"prompt_logprobs": TOP},
    )  # fmt: skip
    entries = result.choices[0].model_extra["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(prompt_ids)
    ref = hf_prompt_logprobs(hf_model, prompt_ids)
    want = hf_token_logprobs(ref, prompt_ids)
    for p, entry in enumerate(entries[1:]):
        token = str(prompt_ids[p + 1])
        assert token in entry and TOP <= len(entry) <= TOP + 1
        assert abs(entry[token]["logprob"] - float(want[p])) < ATOL
        assert entry[token]["decoded_token"] and entry[token]["rank"] >= 1
        top_ids = ref[p].topk(TOP).indices.tolist()
        ranked = sorted((e["rank"], int(t)) for t, e in entry.items())
        assert ranked[0][0] == 1 and ranked[0][1] in top_ids[:2]  # a near-tie may swap

    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
        temperature=0, extra_body={"prompt_logprobs": 0},
    )  # fmt: skip
    scored = chat.model_extra["prompt_logprobs"]
    assert chat.usage is not None and len(scored) == chat.usage.prompt_tokens
    assert scored[0] is None and all(len(e) == 1 for e in scored[1:])

    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=1, stream=True,
            extra_body={"prompt_logprobs": 1},
        )  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=1, extra_body={"prompt_logprobs": 21}
        )


@pytest.mark.slow
def test_disaggregated_prefill_worker_scores_the_prompt(
    hf_model: torch.nn.Module, prompt_ids: list[int]
) -> None:
    config = EngineConfig(colocated=False, dtype="float32", kv_cache_memory=64 * 2**20,
                          max_model_len=1024, max_num_batched_tokens=32)  # fmt: skip
    harness = EngineHarness(config)
    try:
        harness.add("with", prompt_ids, 4, prompt_logprobs=TOP)
        harness.add("without", prompt_ids, 4)
        harness.wait_all()
    finally:
        harness.close()
    assert harness.finished == {"with": "length", "without": "length"}
    assert harness.tokens["with"] == harness.tokens["without"]
    assert "without" not in harness.prompt_logprobs
    entries = [None, *harness.prompt_logprobs["with"]]
    check_against_hf(entries, prompt_ids, hf_prompt_logprobs(hf_model, prompt_ids))
    assert harness.stats.kv_transfer_bytes > 0 and harness.stats.recomputed_prefills == 0
