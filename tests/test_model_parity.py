"""Greedy token parity with Hugging Face transformers, on the real model and tiny ones."""

from __future__ import annotations

import pytest
import torch
from parity import compare, hf_greedy
from transformers import AutoModelForCausalLM

from engine_core import LLM, SamplingParams
from models.cpu_features import ISA_ENV, native_bf16
from models.export import export_hf_folder
from models.packed import DISABLE_ENV as DISABLE_PACKED_ENV
from models.packed import PackedLinear, TileLinear, packing_available, tiles_available

PROMPTS = [
    "What is the capital of Japan?",
    "Write a haiku about the sea.",
    "Hi",
    "Explain in detail how a transformer language model turns a prompt into an answer, "
    "covering tokenization, embeddings, attention, the feed-forward layers and sampling.",
    "List five prime numbers.",
    "Translate to French: The cat sleeps on the warm windowsill while the rain falls outside.",
    "Once upon a time, " * 40,
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Summarize: " + "The quick brown fox jumps over the lazy dog. " * 25,
]


@pytest.fixture(scope="module")
def default_llm() -> LLM:
    return LLM(kv_cache_memory="512MiB", dtype="float32")


@pytest.fixture(scope="module")
def hf_default(tmp_path_factory: pytest.TempPathFactory, default_source) -> torch.nn.Module:
    folder = export_hf_folder(default_source, tmp_path_factory.mktemp("smollm2-hf"))
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _check_batch(llm: LLM, hf: torch.nn.Module, prompts: list[list[int]], max_tokens: int) -> int:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=5)
    ours = llm.generate(prompts, params)
    eos = llm.runner.model_config.eos_token_ids
    refs = hf_greedy(hf, prompts, max_tokens, eos[0] if eos else None)
    return sum(
        compare(o.outputs[0].token_ids, o.outputs[0].logprobs, r)
        for o, r in zip(ours, refs, strict=True)
    )


@pytest.mark.slow
def test_default_model_matches_hf_in_one_batch(
    default_llm: LLM, hf_default: torch.nn.Module
) -> None:
    tok = default_llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    lengths = sorted(len(p) for p in prompts)
    assert len(set(lengths)) >= 8 and lengths[-1] > 200, lengths
    tolerated = _check_batch(default_llm, hf_default, prompts, max_tokens=64)
    print(f"tolerated top-5 divergences: {tolerated} of {len(prompts)} prompts")
    assert tolerated <= 2


@pytest.mark.slow
@pytest.mark.skipif(
    not native_bf16(), reason="no native bf16 on this CPU (AVX512_BF16/AMX): auto is float32"
)
def test_bf16_default_model_close_to_hf_fp32(hf_default: torch.nn.Module) -> None:
    # vLLM's check_logprobs_close rule on 9 prompts, 32 tokens, top-5: bf16 may part from
    # fp32 only where each side's token is in the other's top 5
    llm = LLM(kv_cache_memory="256MiB", dtype="bfloat16")
    assert llm.runner.dtype == llm.runner.kv_cache.dtype == torch.bfloat16
    tok = llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    tolerated = _check_batch(llm, hf_default, prompts, max_tokens=32)
    print(f"bf16: tolerated top-5 divergences: {tolerated} of {len(prompts)} prompts")


@pytest.mark.slow
def test_float32_model_over_a_bf16_kv_cache() -> None:
    llm = LLM(
        kv_cache_memory="128MiB", max_model_len=2048, dtype="float32", kv_cache_dtype="bfloat16"
    )
    assert (llm.runner.dtype, llm.runner.kv_cache.dtype) == (torch.float32, torch.bfloat16)
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of Japan?"}],
        SamplingParams(temperature=0.0, max_tokens=48),
    )
    assert out[0].outputs[0].text == "The capital of Japan is Tokyo."


@pytest.mark.slow
def test_capital_of_japan(default_llm: LLM) -> None:
    out = default_llm.chat(
        [{"role": "user", "content": "What is the capital of Japan?"}],
        SamplingParams(temperature=0.0, max_tokens=48),
    )
    assert out[0].outputs[0].text == "The capital of Japan is Tokyo."
    assert out[0].outputs[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "kind",
    [
        dict(architecture="llama", num_heads=4, num_kv_heads=4, tie_word_embeddings=False),  # MHA
        dict(architecture="llama", num_heads=4, num_kv_heads=2, tie_word_embeddings=False),  # GQA
        dict(architecture="llama", num_heads=4, num_kv_heads=2, tie_word_embeddings=True),
        dict(architecture="mistral", num_heads=4, num_kv_heads=2, tie_word_embeddings=False),
        dict(
            architecture="qwen2", num_heads=4, num_kv_heads=2, tie_word_embeddings=False
        ),  # q/k/v bias
    ],
    ids=["llama-mha", "llama-gqa", "llama-tied", "mistral-gqa", "qwen2-bias"],
)
def test_tiny_checkpoints_match_hf(tiny_checkpoint, kind: dict) -> None:
    folder = tiny_checkpoint(**kind)
    llm = LLM(str(folder), kv_cache_memory="64MiB", block_size=4, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (1, 3, 4, 5, 17, 40)]
    assert _check_batch(llm, hf, prompts, max_tokens=24) == 0


@pytest.mark.parametrize(
    ("dtype", "packing", "isa"),
    [
        ("float32", PackedLinear, None),
        ("bfloat16", PackedLinear, "avx512"),  # hides AVX512_BF16 and AMX: oneDNN's packing
        ("bfloat16", TileLinear, None),  # duet's kernels: AMX tiles where the CPU has them
        ("bfloat16", TileLinear, "avx512bf16"),  # hides AMX: the tiles' vdpbf16ps twin
    ],
    ids=["fp32-onednn", "bf16-onednn", "bf16-tiles", "bf16-tiles-avx512bf16"],
)
def test_packed_linears_and_their_fallback_agree(
    tiny_checkpoint, dtype: str, packing: type, isa: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DISABLE_PACKED_ENV, raising=False)
    if isa is not None:
        monkeypatch.setenv(ISA_ENV, isa)
    if not packing_available(getattr(torch, dtype)):
        pytest.skip(f"oneDNN packs no {dtype} linears on this machine")
    if packing is TileLinear and not tiles_available(torch.bfloat16):
        pytest.skip("no AVX512_BF16 here")
    folder = tiny_checkpoint(num_heads=4, num_kv_heads=2, tie_word_embeddings=True)
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=3)
    prompts = [[5, 17, 300, 42], list(range(100, 140))]
    runs = {}
    for disabled in ("0", "1"):
        monkeypatch.setenv(DISABLE_PACKED_ENV, disabled)
        llm = LLM(str(folder), kv_cache_memory="64MiB", block_size=4, dtype=dtype)
        model = llm.runner.model
        linears = [model.layers[0].mlp.down_proj, model.lm_head]
        assert all(isinstance(m, packing) != (disabled == "1") for m in linears)
        runs[disabled] = [o.outputs[0] for o in llm.generate(prompts, params)]
    tolerance = 2e-2 if dtype == "bfloat16" else 1e-4
    for packed, plain in zip(runs["0"], runs["1"], strict=True):
        assert packed.token_ids == plain.token_ids
        for a, b in zip(packed.logprobs, plain.logprobs, strict=True):
            assert a.token_ids[0] == b.token_ids[0]
            assert a.logprobs[0] == pytest.approx(b.logprobs[0], abs=tolerance)


@pytest.mark.slow
def test_one_shot_chunked_and_token_by_token_prefill_agree(default_llm: LLM) -> None:
    tok = default_llm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS[:4]]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    one_shot = [o.outputs[0].token_ids for o in default_llm.generate(prompts, params)]
    for budget in (7, 1):  # chunks of 7, then every prompt token through the decode path
        llm = LLM(
            kv_cache_memory="256MiB",
            max_model_len=2048,
            max_num_batched_tokens=budget,
            enable_prefix_caching=False,
            dtype="float32",
        )
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == one_shot, budget


@pytest.mark.slow
def test_seeded_sample_is_the_same_alone_and_in_a_batch(default_llm: LLM) -> None:
    chat = [{"role": "user", "content": "Tell me a story about a robot."}]
    prompt = default_llm.tokenizer.apply_chat_template(chat)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24)
    alone = default_llm.generate([prompt], seeded)[0].outputs[0].token_ids
    others = [default_llm.tokenizer.encode(p) for p in PROMPTS[:5]]
    batch = default_llm.generate(
        [*others, prompt], [SamplingParams(temperature=1.0, max_tokens=24)] * 5 + [seeded]
    )
    assert batch[-1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=4321, max_tokens=24)
    assert default_llm.generate([prompt], other_seed)[0].outputs[0].token_ids != alone
