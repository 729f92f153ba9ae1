"""Multi-LoRA through the offline LLM: parity with Hugging Face + PEFT merged, mixed batches,
slots and the LRU, bf16 packed linears, and bad adapters refused in one line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from lora_adapters import write_adapter
from parity import compare, hf_greedy
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel

from engine_core import LLM, LoRARequest, SamplingParams
from engine_core.messages.lora import LoRARef
from models.lora import LoRALinear
from models.lora_files import LoRAError
from models.packed import PackedLinear, TileLinear, packing_available

PROMPTS = [[1, 5, 7, 9, 100, 200, 300, 400, 500, 600, 700, 800, 900], [1, 42, 43], [1, 3000]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
         "prompt_lookup_min": 2}  # fmt: skip
SHAPE = {"num_heads": 4, "num_kv_heads": 2}  # GQA: q and k/v shards differ in size
TARGET_SETS = [
    ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ("q_proj", "v_proj"),
    ("k_proj", "up_proj"),
    ("o_proj", "gate_proj", "down_proj"),
]


@pytest.fixture(scope="module")
def base_folder(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint(**SHAPE)


@pytest.fixture(scope="module")
def hf_base(base_folder: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def adapters(hf_base: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four adapters of different ranks, each with one of TARGET_SETS."""
    root = tmp_path_factory.mktemp("adapters")
    return [
        write_adapter(hf_base, root / f"a{i}", rank=rank, alpha=2 * rank, targets=targets, seed=i)
        for i, (rank, targets) in enumerate(zip([8, 4, 16, 2], TARGET_SETS, strict=True))
    ]


def hf_merged(base_folder: Path, adapter: Path) -> PreTrainedModel:
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()


def lora(adapter: Path, index: int = 0) -> LoRARequest:
    return LoRARequest(adapter.name, index + 1, str(adapter))


def tokens(llm: LLM, loras: Sequence[LoRARequest | None], prompts=PROMPTS) -> list[list[int]]:
    outs = llm.generate(prompts, GREEDY, lora_request=list(loras))
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def llm(base_folder: Path) -> LLM:
    return LLM(str(base_folder), dtype="float32", enable_lora=True, max_loras=4,
               kv_cache_memory="64MiB")  # fmt: skip


@pytest.mark.parametrize("which", range(4), ids=["all", "q+v", "k+up", "o+gate+down"])
def test_greedy_tokens_match_hf_with_the_adapter_merged(
    llm: LLM, base_folder: Path, adapters: list[Path], which: int
) -> None:
    ours = tokens(llm, [lora(adapters[which], which)] * len(PROMPTS))
    refs = hf_greedy(hf_merged(base_folder, adapters[which]), PROMPTS, GREEDY.max_tokens, None)
    assert ours == [r.token_ids for r in refs]


def test_a_mixed_batch_gives_each_request_its_solo_output(
    llm: LLM, hf_base: PreTrainedModel, adapters: list[Path]
) -> None:
    prompt = PROMPTS[0]
    choices = [None, lora(adapters[0], 0), lora(adapters[1], 1), lora(adapters[2], 2)]
    solo = [tokens(llm, [c], [prompt])[0] for c in choices]
    assert len({tuple(t) for t in solo}) == 4  # every adapter changes the output
    assert solo[0] == hf_greedy(hf_base, [prompt], GREEDY.max_tokens, None)[0].token_ids
    # one generate call: all eight are admitted together and decode in the same steps
    mixed = tokens(llm, choices * 2, [prompt] * 4 + [PROMPTS[1]] * 4)
    assert mixed[:4] == solo


def test_speculative_steps_carry_the_adapter_over_their_draft_rows(
    llm: LLM, base_folder: Path, adapters: list[Path]
) -> None:
    # a repetitive prompt so the n-gram proposer drafts, and verification rows (1 + k per
    # request) must each get their request's adapter
    prompt = [1, *([5, 7, 9, 11] * 6)]
    spec = LLM(str(base_folder), dtype="float32", enable_lora=True, max_loras=4,
               kv_cache_memory="64MiB", speculative_config=NGRAM)  # fmt: skip
    choices = [None, lora(adapters[0], 0), lora(adapters[1], 1), lora(adapters[3], 3)]
    assert tokens(spec, choices, [prompt] * 4) == tokens(llm, choices, [prompt] * 4)
    stats = spec.engine.stats().spec_decode
    assert stats is not None and stats.num_draft_tokens > 0


def test_slots_and_the_cpu_lru_hold_at_most_their_limits(
    base_folder: Path, adapters: list[Path]
) -> None:
    small = LLM(str(base_folder), dtype="float32", enable_lora=True, max_loras=2,
                max_cpu_loras=2, kv_cache_memory="64MiB")  # fmt: skip
    reference = LLM(str(base_folder), dtype="float32", enable_lora=True, max_loras=4,
                    kv_cache_memory="64MiB")  # fmt: skip
    choices = [lora(a, i) for i, a in enumerate(adapters)] + [None]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(choices))]
    assert tokens(small, choices, prompts) == tokens(reference, choices, prompts)
    assert len(small.runner.lora.loaded) <= 2
    # and an adapter evicted from memory is read again from its folder
    assert tokens(small, choices[:1], prompts[:1]) == tokens(reference, choices[:1], prompts[:1])


def test_base_requests_after_adapter_ones_reuse_nothing_of_theirs(
    llm: LLM, hf_base: PreTrainedModel, adapters: list[Path]
) -> None:
    prompt = [1, *range(500, 540)]  # two full blocks of 16
    tokens(llm, [lora(adapters[0], 0)], [prompt])
    before = llm.engine.stats().prefix_cache_hits
    assert tokens(llm, [None], [prompt]) == [
        hf_greedy(hf_base, [prompt], GREEDY.max_tokens, None)[0].token_ids
    ]
    assert llm.engine.stats().prefix_cache_hits == before


@pytest.mark.skipif(not packing_available(torch.bfloat16), reason="no packed bf16 linears here")
def test_bf16_packed_linears_carry_the_adapter(base_folder: Path, adapters: list[Path]) -> None:
    bf16 = LLM(str(base_folder), dtype="bfloat16", enable_lora=True, max_loras=4,
               kv_cache_memory="64MiB")  # fmt: skip
    linear = bf16.runner.model.layers[0].self_attn.qkv_proj
    assert isinstance(linear, LoRALinear) and isinstance(linear.base, (PackedLinear, TileLinear))
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=5)
    outs = bf16.generate(PROMPTS, params, lora_request=lora(adapters[0]))
    refs = hf_greedy(hf_merged(base_folder, adapters[0]), PROMPTS, 8, None)
    for out, ref in zip(outs, refs, strict=True):
        compare(out.outputs[0].token_ids, out.outputs[0].logprobs, ref)


def test_an_adapter_failing_to_load_on_the_worker_leaves_the_slots_consistent(
    llm: LLM, adapters: list[Path], tmp_path: Path
) -> None:
    choices = [lora(a, i) for i, a in enumerate(adapters)]
    tokens(llm, choices, [PROMPTS[0]] * 4)  # every slot taken
    copy = tmp_path / "copy"
    shutil.copytree(adapters[1], copy)  # the same weights under another identity
    with pytest.raises(LoRAError):
        llm.runner.lora.set_batch([(LoRARef("copy", str(copy)), 2), (LoRARef("gone", "/no"), 2)])
    assert tokens(llm, [lora(copy)], PROMPTS[:1]) == tokens(llm, [choices[1]], PROMPTS[:1])


# -- bad adapters ------------------------------------------------------------------------


def _refusal(llm: LLM, folder: Path) -> str:
    with pytest.raises(LoRAError) as info:
        llm.generate(PROMPTS[:1], GREEDY, lora_request=LoRARequest("bad", 1, str(folder)))
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def _edit_config(src: Path, dst: Path, **changes: object) -> Path:
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    (dst / "adapter_model.safetensors").write_bytes(
        (src / "adapter_model.safetensors").read_bytes()
    )
    return dst


def test_missing_files_are_refused(llm: LLM, adapters: list[Path], tmp_path: Path) -> None:
    assert "no adapter_config.json" in _refusal(llm, tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text(
        (adapters[0] / "adapter_config.json").read_text()
    )
    assert "no adapter_model.safetensors" in _refusal(llm, tmp_path / "half")


def test_a_rank_above_max_lora_rank_is_refused(base_folder: Path, adapters: list[Path]) -> None:
    strict = LLM(str(base_folder), dtype="float32", enable_lora=True, max_lora_rank=8,
                 kv_cache_memory="32MiB")  # fmt: skip
    assert "rank 16 is above --max-lora-rank 8" in _refusal(strict, adapters[2])


def test_wrong_shapes_are_refused(
    llm: LLM, tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    other = AutoModelForCausalLM.from_pretrained(tiny_checkpoint(hidden=32, num_heads=4))
    folder = write_adapter(other, tmp_path / "other", targets=["q_proj"])
    assert "has shape [8, 32], expected [8, 64]" in _refusal(llm, folder)


def test_unknown_targets_are_refused(
    llm: LLM, hf_base: PreTrainedModel, adapters: list[Path], tmp_path: Path
) -> None:
    head = write_adapter(hf_base, tmp_path / "head", targets=["q_proj", "lm_head"])
    assert "unknown target module 'lm_head'" in _refusal(llm, head)
    # a regex in target_modules is not checked by name: the tensors are
    regex = _edit_config(head, tmp_path / "regex", target_modules=".*proj|lm_head")
    assert "unknown target tensor 'base_model.model.lm_head." in _refusal(llm, regex)


def test_lora_needs_enable_lora(base_folder: Path, adapters: list[Path]) -> None:
    plain = LLM(str(base_folder), dtype="float32", kv_cache_memory="32MiB")
    with pytest.raises(ValueError, match="enable_lora=True"):
        plain.generate(PROMPTS[:1], GREEDY, lora_request=lora(adapters[0]))


# -- the real default model ----------------------------------------------------------------


@pytest.mark.slow
def test_default_model_with_an_adapter_matches_hf_merged(
    default_source, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from models.export import export_hf_folder

    folder = export_hf_folder(default_source, tmp_path_factory.mktemp("smollm2-hf"))
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    adapter = write_adapter(hf, tmp_path_factory.mktemp("smollm2-lora") / "a", std=0.02)
    llm = LLM(dtype="float32", enable_lora=True, kv_cache_memory="128MiB", max_model_len=1024)
    tok = llm.tokenizer
    chats = ["What is the capital of Japan?", "Write a haiku about the sea.", "List three colours."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}]) for c in chats]
    params = SamplingParams(temperature=0.0, max_tokens=24, logprobs=5)
    ours = llm.generate(prompts, params, lora_request=LoRARequest("a", 1, str(adapter)))
    base = llm.generate(prompts, params)
    refs = hf_greedy(
        hf_merged(folder, adapter), prompts, 24, llm.runner.model_config.eos_token_ids[0]
    )
    assert [o.outputs[0].token_ids for o in ours] != [o.outputs[0].token_ids for o in base]
    assert [o.outputs[0].token_ids for o in ours] == [r.token_ids for r in refs]
