"""The layer stack (a bf16 step's layers in one native call, models/layer_stack.py) against
the Python forward it stands for: the same bits, for decodes, chunks and both in one step,
with bf16 linears on tiles and with int8 ones on each of their kernels, and only where that
forward would take the stack's kernels."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch

from engine_core import LLM, SamplingParams
from engine_core.messages.config import EngineConfig
from kernels import bf16_gemm, fused, native
from kernels.metadata import AttentionMetadata
from models import cpu_features, layer_stack
from models.runner import ModelRunner

pytestmark = pytest.mark.skipif(not bf16_gemm.available(), reason="no AVX512_BF16 here")
# the int8 routes of a CPU with AMX (models/quant_int8.py)
amx_routes = pytest.mark.skipif(not cpu_features.has_amx_bf16(), reason="AMX's int8 routes")


def _runner(**overrides: object) -> ModelRunner:
    fields = {"dtype": "bfloat16", "kv_cache_memory": 128 << 20, "max_model_len": 1024}
    return ModelRunner(EngineConfig(**(fields | overrides)))


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return _runner()


@pytest.fixture(scope="module")
def int8_runner() -> ModelRunner:
    return _runner(quantization="int8")


def _step(seqs: list[tuple[int, int]], block_size: int, num_blocks: int, seed: int):
    """A step over sequences of (cached, new) tokens, those with one new token (decodes)
    first, their blocks scattered over the pool: (ids, positions, meta)."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-(cached + new) // block_size) for cached, new in seqs]
    order = torch.randperm(num_blocks, generator=gen)[: sum(per_seq)].to(torch.int32)
    tables = torch.zeros(len(seqs), max(per_seq), dtype=torch.int32)
    used = 0
    for row, count in enumerate(per_seq):
        tables[row, :count] = order[used : used + count]
        used += count
    positions = torch.cat([torch.arange(cached, cached + new) for cached, new in seqs])
    rows = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([n for _, n in seqs]))
    slots = tables[rows, positions // block_size].long() * block_size + positions % block_size
    starts = [0]
    for _, new in seqs:
        starts.append(starts[-1] + new)
    lengths = [cached + new for cached, new in seqs]
    meta = AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lengths, dtype=torch.int32),
        block_tables=tables,
        num_decodes=next((i for i, (_, new) in enumerate(seqs) if new != 1), len(seqs)),
        query_start_loc_cpu=starts,
        seq_lens_cpu=lengths,
    )
    ids = torch.randint(3, 40000, (starts[-1],), generator=gen)
    return ids, positions, meta


def _decodes(lengths: list[int], block_size: int, num_blocks: int, seed: int):
    """One new token per sequence of `lengths` tokens (the new one included)."""
    return _step([(n - 1, 1) for n in lengths], block_size, num_blocks, seed)


def _assert_same_bits(runner: ModelRunner, ids, positions, meta, monkeypatch) -> None:
    """The step through the stack, then through the Python forward, each from the same
    random cache: the same hidden states, and the same K and V written at the slots."""
    torch.manual_seed(1)
    start = torch.randn(runner.kv_cache.shape).to(runner.kv_cache.dtype)
    results = []
    for disabled in ("0", "1"):
        monkeypatch.setenv(layer_stack.DISABLE_ENV, disabled)
        runner.kv_cache.copy_(start)
        hidden = runner.model(ids, positions, runner.kv_cache, meta)
        results.append((hidden, runner.kv_cache.clone()))
    monkeypatch.delenv(layer_stack.DISABLE_ENV)
    (stack_hidden, stack_cache), (python_hidden, python_cache) = results
    assert torch.equal(stack_hidden, python_hidden)
    assert torch.equal(stack_cache, python_cache)


def _random_decodes(runner: ModelRunner, batch: int):
    """`batch` decodes with random contexts (1-199 tokens, across blocks)."""
    gen = torch.Generator().manual_seed(batch)
    lengths = torch.randint(1, 200, (batch,), generator=gen).tolist()
    return _decodes(lengths, runner.block_size, runner.num_blocks, batch)


# batch sizes: one row, a row tile but one, a tile, a tile and one; contexts across blocks
@pytest.mark.parametrize("batch", [1, 15, 16, 17])
def test_the_stack_gives_the_python_forwards_bits(
    runner: ModelRunner, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert runner.model.layer_stack is not None
    ids, positions, meta = _random_decodes(runner, batch)
    _assert_same_bits(runner, ids, positions, meta, monkeypatch)


# a prompt's first chunk; chunks after cached context (a block edge and mid-block); decodes
# and chunks in one step (the second with a 1-token chunk after decodes)
MIXED = {
    "prefill": [(0, 256)],
    "chunks": [(16, 100), (37, 64), (0, 5)],
    "mixed": [(120, 1), (7, 1), (0, 40), (64, 64)],
    "mixed-short": [(30, 1), (99, 1), (5, 2)],
}


@pytest.mark.parametrize("seqs", MIXED.values(), ids=MIXED.keys())
def test_steps_with_chunks_give_the_python_forwards_bits(
    runner: ModelRunner, seqs: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, positions, meta = _step(seqs, runner.block_size, runner.num_blocks, len(seqs))
    x = runner.model.embed_tokens(ids)
    assert runner.model.layer_stack.takes(x, runner.kv_cache, meta)
    _assert_same_bits(runner, ids, positions, meta, monkeypatch)


def test_another_builds_entry_point_runs_the_same_step(runner: ModelRunner) -> None:
    # the A/B hook of scripts/bench_decode_step.py --against-library, here with this very
    # build loaded a second time: the same step, the same bits
    ids, positions, meta = _step(MIXED["mixed"], runner.block_size, runner.num_blocks, 3)
    stack = runner.model.layer_stack
    start = runner.kv_cache.clone()
    results = []
    for entry in (None, layer_stack.entry_point(ctypes.CDLL(str(native.library_path())))):
        stack.entry = entry
        runner.kv_cache.copy_(start)
        results.append(runner.model(ids, positions, runner.kv_cache, meta))
    stack.entry = None
    assert torch.equal(*results)


@amx_routes
def test_an_int8_step_with_chunks_matches_too(
    int8_runner: ModelRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 rows: W8A8 on AMX tiles, down_proj's dense GEMM (not native) keeps the Python
    forward; 200 rows: every linear native."""
    for seqs, taken in [([(10, 1), (0, 299)], False), ([(10, 1), (40, 199)], True)]:
        ids, positions, meta = _step(seqs, int8_runner.block_size, int8_runner.num_blocks, 0)
        x = int8_runner.model.embed_tokens(ids)
        assert int8_runner.model.layer_stack.takes(x, int8_runner.kv_cache, meta) == taken
        _assert_same_bits(int8_runner, ids, positions, meta, monkeypatch)


def test_a_biased_qkv_and_small_heads_match_too(
    tiny_checkpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Qwen2's qkv bias, grouped heads of 16, 3 layers."""
    folder: Path = tiny_checkpoint(architecture="qwen2", num_kv_heads=2, layers=3)
    tiny = _runner(model=str(folder))
    assert tiny.model.layer_stack is not None
    # chunks of heads of 16, which bf16 prefill on AMX CPUs sends to SDPA (not the stack's),
    # and on AVX512_BF16 ones to the native kernel
    ids, positions, meta = _step([(3, 1), (0, 9)], tiny.block_size, tiny.num_blocks, 0)
    x = tiny.model.embed_tokens(ids % tiny.model_config.vocab_size)
    assert tiny.model.layer_stack.takes(x, tiny.kv_cache, meta) != cpu_features.has_amx_bf16()
    ids, positions, meta = _decodes([5, 40, 33], tiny.block_size, tiny.num_blocks, 0)
    ids = ids % tiny.model_config.vocab_size
    _assert_same_bits(tiny, ids, positions, meta, monkeypatch)


def test_greedy_generation_is_the_same_with_and_without_the_stack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    llm = LLM(dtype="bfloat16", max_model_len=512)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outputs = {}
    for disabled in ("0", "1"):
        monkeypatch.setenv(layer_stack.DISABLE_ENV, disabled)
        outputs[disabled] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outputs["0"] == outputs["1"]


@pytest.mark.parametrize(
    "overrides",
    [{"enable_lora": True}, {"enable_lora": True, "quantization": "int8"}, {"dtype": "float32"}],
    ids=["lora", "int8-lora", "fp32"],
)
def test_models_off_the_stacks_kernels_keep_the_python_forward(overrides: dict) -> None:
    assert _runner(**overrides).model.layer_stack is None


def test_bf16_hidden_by_the_isa_switch_keeps_the_python_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(cpu_features.ISA_ENV, "avx512")  # oneDNN's linears
    assert _runner().model.layer_stack is None


def test_bf16_without_amx_takes_the_stack_on_the_tiles_twin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Zen 4's or 5's choices: the tiles' `vdpbf16ps` twin, the AVX512_BF16 attention."""
    monkeypatch.setenv(cpu_features.ISA_ENV, "avx512bf16")
    runner = _runner()
    assert runner.model.layer_stack is not None
    assert not runner.model.layer_stack._shape.amx
    ids, positions, meta = _step(
        [(40, 1), (7, 1), (0, 33)], runner.block_size, runner.num_blocks, 4
    )
    _assert_same_bits(runner, ids, positions, meta, monkeypatch)


def test_steps_the_stack_does_not_take(
    runner: ModelRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = runner.model.layer_stack
    ids, _, meta = _step([(9, 1), (0, 20)], runner.block_size, runner.num_blocks, 0)
    x = runner.model.embed_tokens(ids)
    assert stack.takes(x, runner.kv_cache, meta)
    assert not stack.takes(x, runner.kv_cache.float(), meta)  # another cache dtype
    for env, value in [
        (layer_stack.DISABLE_ENV, "1"),
        (fused.DISABLE_ENV, "1"),  # torch's small ops
        (cpu_features.ISA_ENV, "avx2"),  # other kernel twins
        # another twin of the bf16 tiles than the stack was built for (AMX where it has it)
        (cpu_features.ISA_ENV, "avx512bf16" if runner.model.layer_stack._shape.amx else "avx512"),
    ]:
        with monkeypatch.context() as patch:
            patch.setenv(env, value)
            assert not stack.takes(x, runner.kv_cache, meta)


# int8 routes by rows: W8A8 on VNNI up to 4 rows and AMX beyond, down_proj weight-only (the
# AVX-512 kernel at 1 row, AMX tiles beyond)
@amx_routes
@pytest.mark.parametrize("batch", [1, 2, 4, 5, 16])
def test_int8_linears_give_the_python_forwards_bits(
    int8_runner: ModelRunner, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = int8_runner.model.layer_stack
    assert stack is not None
    ids, positions, meta = _random_decodes(int8_runner, batch)
    # gate_up runs W8A8 with SiLU x up in its epilogue: on VNNI up to 4 rows, AMX tiles beyond
    assert stack._layers(batch)[0].silu_in_gate_up
    _assert_same_bits(int8_runner, ids, positions, meta, monkeypatch)


def test_int8_without_amx_takes_the_stack_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Zen 4's or 5's choices (VNNI, gate_up with SiLU x up in its epilogue, down_proj on
    16-bit activations up to 96 rows, `vdpbf16ps` on the widened weight beyond), at decode
    and prompt sizes."""
    monkeypatch.setenv(cpu_features.ISA_ENV, "avx512bf16")
    runner = _runner(quantization="int8")
    assert runner.model.layer_stack is not None
    assert runner.model.layer_stack._layers(3)[0].silu_in_gate_up  # int8_silu_mul_vnni
    ids, positions, meta = _decodes([7, 100, 64], runner.block_size, runner.num_blocks, 3)
    _assert_same_bits(runner, ids, positions, meta, monkeypatch)
    ids, positions, meta = _step([(10, 1), (0, 299)], runner.block_size, runner.num_blocks, 0)
    assert runner.model.layer_stack.takes(runner.model.embed_tokens(ids), runner.kv_cache, meta)
    _assert_same_bits(runner, ids, positions, meta, monkeypatch)


@amx_routes
def test_a_batch_whose_int8_route_leaves_the_native_kernels_keeps_the_python_forward(
    int8_runner: ModelRunner, runner: ModelRunner
) -> None:
    """down_proj dequantizes for a dense GEMM beyond 256 rows (models/quant_int8.py)."""
    down = int8_runner.model.layers[0].mlp.down_proj
    assert down.native_kernel_for(256) is not None and down.native_kernel_for(257) is None
    assert int8_runner.model.layer_stack._layers(256) is not None
    assert int8_runner.model.layer_stack._layers(257) is None
    assert runner.model.layer_stack._layers(257) is not None  # tiles take any size
