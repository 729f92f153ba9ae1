"""The batched LoRA delta (kernels/lora.py): the native kernel's twins and the torch path
against a per-row reference on small shapes: fused shards of odd sizes, adapters of
different (odd) ranks and targets, an empty slot, base rows between adapter rows, an odd
input width (bf16 weights pair up along it), a shard of several column chunks."""

from __future__ import annotations

import pytest
import torch

from engine_core.messages.lora import LoRARef
from kernels import lora
from models.lora import AdapterWeights, build_stack

_NATIVE = pytest.mark.skipif(not lora.native_available(), reason="native kernels not built")
IN = 40  # not a whole number of vectors: the tails of every loop run
# a fused qkv; q spans two whole column chunks of the AVX-512 twins and a part one
SHARDS = [("q_proj", 0, 150), ("k_proj", 150, 12), ("v_proj", 162, 12)]
# slot -> (rank, the shards it targets); slot 2 stays empty
SLOTS = {0: (8, ("q_proj", "k_proj", "v_proj")), 1: (3, ("k_proj",)), 3: (15, ("q_proj", "v_proj"))}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # of the largest output


def _adapters(dtype: torch.dtype, in_features: int) -> list[AdapterWeights | None]:
    gen = torch.Generator().manual_seed(0)
    sizes = {target: size for target, _, size in SHARDS}
    slots: list[AdapterWeights | None] = [None] * 4
    for slot, (rank, targets) in SLOTS.items():
        tensors = {
            (0, t): (
                torch.randn(rank, in_features, generator=gen).to(dtype),
                torch.randn(sizes[t], rank, generator=gen).to(dtype),
            )
            for t in targets
        }
        slots[slot] = AdapterWeights(LoRARef(f"a{slot}", "/x"), rank, 0.5 + slot, tensors)
    return slots


def _assert_close(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    """Close up to rounding at the outputs' scale (a small output may be a large delta
    cancelling a large base value)."""
    atol = tolerance * want.abs().max().item()
    torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=atol)


def _reference(x: torch.Tensor, y: torch.Tensor, slots, slot_per_row: list[int]) -> torch.Tensor:
    """Row by row in fp32 from the adapters' own A and B."""
    out = y.float().clone()
    for t, slot in enumerate(slot_per_row):
        if slot < 0:
            continue
        adapter = slots[slot]
        for target, offset, size in SHARDS:
            pair = adapter.tensors.get((0, target))
            if pair is not None:
                a, b = (w.float() for w in pair)
                out[t, offset : offset + size] += adapter.scaling * (x[t].float() @ a.T @ b.T)
    return out


def _case(dtype: torch.dtype, slot_per_row: list[int], in_features: int = IN):
    slots = _adapters(dtype, in_features)
    stack = build_stack(slots, 0, SHARDS, dtype)
    assert stack is not None and stack.rank == 16  # 15 padded to even
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(len(slot_per_row), in_features, generator=gen).to(dtype)
    y = torch.randn(len(slot_per_row), sum(size for _, _, size in SHARDS), generator=gen).to(dtype)
    scale = [0.0 if a is None else a.scaling for a in slots]
    rows = lora.LoRARows.of(torch.tensor(slot_per_row), scale)
    return slots, stack, x, y, rows


# mixed slots with base rows; one slot only (the torch path's own-columns case); tiles of
# MR rows and their remainders (11 rows of slot 0)
ROW_SLOTS = [[0, -1, 3, 1, 1, -1, 0, 3, 0, 0, 1, -1, 0], [3, -1, 3, 3], [0] * 11 + [-1, 1]]


@_NATIVE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slot_per_row", ROW_SLOTS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("in_features", [IN, 37])
def test_native_twins_match_the_reference(
    twin: str, dtype: torch.dtype, slot_per_row: list[int], threads: int, in_features: int
) -> None:
    slots, stack, x, y, rows = _case(dtype, slot_per_row, in_features)
    want = _reference(x, y, slots, slot_per_row)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        lora.add_lora_native(y, x, stack, rows, twin)
    finally:
        torch.set_num_threads(before)
    _assert_close(y, want, TOLERANCE[dtype])
    base = [t for t, s in enumerate(slot_per_row) if s < 0]
    assert torch.equal(y[base], _case(dtype, slot_per_row, in_features)[3][base])  # untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slot_per_row", ROW_SLOTS)
def test_torch_path_matches_the_reference(dtype: torch.dtype, slot_per_row: list[int]) -> None:
    slots, stack, x, y, rows = _case(dtype, slot_per_row)
    want = _reference(x, y, slots, slot_per_row)
    lora.add_lora_torch(y, x, stack, rows)
    # bf16 rounds the intermediate x @ A and the delta before the add
    _assert_close(y, want, 4 * TOLERANCE[dtype])


@_NATIVE
def test_a_step_without_rows_of_a_slot_leaves_y_alone(twin: str) -> None:
    _, stack, x, y, _ = _case(torch.float32, [-1, -1])
    rows = lora.LoRARows.of(torch.tensor([-1, -1]), [1.0] * 4)
    before = y.clone()
    lora.add_lora_native(y, x, stack, rows, twin)
    assert torch.equal(y, before)
