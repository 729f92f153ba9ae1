"""Batched multi-LoRA: one forward serves base tokens and tokens of several adapters.

Every targeted linear is wrapped in a `LoRALinear` that adds, for the rows of adapter
tokens only, `(x @ A[a].T) @ B[a].T * scaling[a]`. The adapters resident in the worker's
`max_loras` slots are stacked per linear (every fused shard, rank padded to the largest),
and one call per linear applies each token's own adapter (kernels/lora.py: Punica's SGMV
as a native kernel over rows grouped by slot, or torch). Base tokens are never touched,
and a step without adapter tokens runs the plain linears."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors.torch import load_file
from torch import nn

from engine_core.messages.lora import LoRARef
from kernels.lora import LoRARows, StackedLoRA, add_lora, empty_stack
from models.config import ModelConfig
from models.lora_files import AdapterSpec, LoRAError, module_shapes, read_adapter

# wrapped linear -> the HF modules fused in it, in output order
FUSED_TARGETS = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    "mlp.down_proj": ("down_proj",),
}


@dataclass
class AdapterWeights:
    """One adapter in memory: (layer, target) -> (A [r, in], B [out, r]) in the model dtype."""

    ref: LoRARef
    rank: int
    scaling: float
    tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def load_adapter(spec: AdapterSpec, ref: LoRARef, dtype: torch.dtype) -> AdapterWeights:
    """Read a checked adapter's tensors (see models/lora_files.read_adapter)."""
    raw = load_file(str(spec.weights_path))
    tensors = {
        key: (raw[a].to(dtype).contiguous(), raw[b].to(dtype).contiguous())
        for key, (a, b) in spec.tensors.items()
    }
    return AdapterWeights(ref, spec.rank, spec.scaling, tensors)


def build_stack(
    slots: Sequence[AdapterWeights | None],
    layer: int,
    shards: Sequence[tuple[str, int, int]],
    dtype: torch.dtype,
) -> StackedLoRA | None:
    """Stack the slots' A/B of (layer, target) for each (target, offset, size) shard that
    some slotted adapter targets, in the kernel's layout (kernels/lora.StackedLoRA)."""
    pairs = {
        (slot, target): pair
        for slot, adapter in enumerate(slots)
        if adapter is not None
        for target, _, _ in shards
        if (pair := adapter.tensors.get((layer, target))) is not None
    }
    used = [shard for shard in shards if any(target == shard[0] for _, target in pairs)]
    if not used:
        return None
    # even, so that bf16 weights pair up along it (kernels/lora.StackedLoRA)
    rank = max(a.shape[0] for a, _ in pairs.values())
    rank += rank % 2
    in_features = next(iter(pairs.values()))[0].shape[1]
    sizes = [size for _, _, size in used]
    b_cols = [sum(sizes[:j]) for j in range(len(used))]
    a_all, b_all = empty_stack(len(slots), in_features, rank, sizes, dtype)
    width = len(used) * rank
    for (slot, target), (a, b) in pairs.items():
        j = next(j for j, shard in enumerate(used) if shard[0] == target)
        r, col = a.shape[0], slot * width + j * rank
        a_all[:, col : col + r] = a.t()
        b_all[slot * rank : slot * rank + r, b_cols[j] : b_cols[j] + sizes[j]] = b.t()
    return StackedLoRA(a_all, b_all, rank, [o for _, o, _ in used], b_cols, sizes)


@dataclass
class LoRABatch:
    """One step's adapter rows: how many rows the flat batch has, and which use which slot."""

    num_tokens: int  # T, the flat batch's rows
    rows: LoRARows


class LoRAState:
    """What every LoRALinear of one model reads: the current step's batch (None: none)."""

    def __init__(self) -> None:
        self.batch: LoRABatch | None = None


class LoRALinear(nn.Module):
    """A linear (plain, packed or quantized) plus the batched delta of resident adapters."""

    def __init__(self, base: nn.Module, state: LoRAState) -> None:
        super().__init__()
        self.base = base
        self.state = state
        self.stack: StackedLoRA | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch, stack = self.state.batch, self.stack
        if batch is None or stack is None:
            return y
        if x.shape[0] != batch.num_tokens:
            # NOTE: a forward over rows other than the ones set_batch was told about (a
            # new caller of the model) would apply adapters to the wrong tokens
            raise RuntimeError(f"LoRA batch is for {batch.num_tokens} rows, got {x.shape[0]}")
        add_lora(y, x, stack, batch.rows)
        return y


class LoRAManager:
    """A worker's adapters: loaded lazily by path into an LRU of `max_cpu_loras`, and the
    `max_loras` slots whose stacked weights the wrapped linears use."""

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        dtype: torch.dtype,
        *,
        max_loras: int,
        max_lora_rank: int,
        max_cpu_loras: int | None = None,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max(max_cpu_loras or max_loras, max_loras)
        self.state = LoRAState()
        self.loaded: OrderedDict[str, AdapterWeights] = OrderedDict()
        self.slots: list[AdapterWeights | None] = [None] * max_loras
        self.linears = wrap_linears(model, self.state)

    def set_batch(self, rows: Sequence[tuple[LoRARef | None, int]]) -> None:
        """Prepare the next forward: (adapter or None, token count) per request, in the
        order their tokens sit in the flat batch. Raises LoRAError for an unusable adapter."""
        slot_of = self._activate({ref.key: ref for ref, _ in rows if ref is not None})
        if not slot_of:
            self.state.batch = None
            return
        slot_per_row = torch.repeat_interleave(
            torch.tensor([-1 if ref is None else slot_of[ref.key] for ref, _ in rows]),
            torch.tensor([n for _, n in rows]),
        )
        scale = [0.0 if a is None else a.scaling for a in self.slots]
        self.state.batch = LoRABatch(len(slot_per_row), LoRARows.of(slot_per_row, scale))

    def _activate(self, wanted: dict[str, LoRARef]) -> dict[str, int]:
        """Put every wanted adapter in a slot, evicting ones this step does not use."""
        if len(wanted) > len(self.slots):
            raise LoRAError(f"{len(wanted)} adapters in one step, --max-loras is {len(self.slots)}")
        resident = {a.ref.key: i for i, a in enumerate(self.slots) if a is not None}
        missing = [key for key in wanted if key not in resident]
        if missing:
            # NOTE: every adapter is read before any slot changes, so one that fails to
            # load leaves the slots and their stacked weights as they were
            incoming = [self._get(wanted[key]) for key in missing]
            for adapter, slot in zip(incoming, self._victims(wanted), strict=False):
                self.slots[slot] = adapter
                resident[adapter.ref.key] = slot
            self._restack()
        for key in wanted:
            self.loaded.move_to_end(key)
        self._trim()
        return {key: resident[key] for key in wanted}

    def _victims(self, wanted: dict[str, LoRARef]) -> list[int]:
        """Slots this step may take over: empty ones, then the least recently used."""
        age = {key: i for i, key in enumerate(self.loaded)}  # oldest first
        free = [i for i, a in enumerate(self.slots) if a is None or a.ref.key not in wanted]
        return sorted(
            free, key=lambda i: -1 if self.slots[i] is None else age[self.slots[i].ref.key]
        )

    def _get(self, ref: LoRARef) -> AdapterWeights:
        adapter = self.loaded.get(ref.key)
        if adapter is None:
            spec = read_adapter(ref.path, self.config, self.max_lora_rank)
            adapter = self.loaded[ref.key] = load_adapter(spec, ref, self.dtype)
        return adapter

    def _trim(self) -> None:
        """Forget the least recently used adapters beyond max_cpu_loras (never a slotted one)."""
        in_slots = {a.ref.key for a in self.slots if a is not None}
        while len(self.loaded) > self.max_cpu_loras:
            oldest = next(key for key in self.loaded if key not in in_slots)
            del self.loaded[oldest]

    def _restack(self) -> None:
        for (layer, name), linear in self.linears.items():
            shards = _shards(self.config, name)
            linear.stack = build_stack(self.slots, layer, shards, self.dtype)


def _shards(config: ModelConfig, name: str) -> list[tuple[str, int, int]]:
    """(target, first output column, size) of each HF module fused in linear `name`."""
    shapes = module_shapes(config)
    shards, offset = [], 0
    for target in FUSED_TARGETS[name]:
        size = shapes[target][1]
        shards.append((target, offset, size))
        offset += size
    return shards


def wrap_linears(model: nn.Module, state: LoRAState) -> dict[tuple[int, str], LoRALinear]:
    """Wrap every targetable linear of every layer (after packing, so any linear kind)."""
    wrapped: dict[tuple[int, str], LoRALinear] = {}
    for index, layer in enumerate(model.layers):
        for name in FUSED_TARGETS:
            parent_name, attr = name.split(".")
            parent = getattr(layer, parent_name)
            linear = LoRALinear(getattr(parent, attr), state)
            setattr(parent, attr, linear)
            wrapped[(index, name)] = linear
    return wrapped
