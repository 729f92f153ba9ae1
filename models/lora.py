"""Batched multi-LoRA: one forward serves base tokens and tokens of several adapters.

Every targeted linear is wrapped in a `LoRALinear` that adds, for the rows of adapter
tokens only, `(x @ A[a].T) @ B[a].T * scaling[a]`. The adapters resident in the worker's
`max_loras` slots are stacked per linear (shard-major: q, k, v of the fused qkv, then
their slots), so a step costs one A matmul and one B matmul per shard whatever the mix:
a per-row mask keeps each token's own adapter's columns (and carries its scaling), in the
spirit of Punica's SGMV without a custom kernel. Base tokens are never gathered, and a
step without adapter tokens runs the plain linears.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from torch import nn

from engine_core.messages.lora import LoRARef
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


@dataclass
class ShardStack:
    """One output shard's slice of a stack: columns [start, end) of x @ A.T feed B_t."""

    offset: int  # first output column of the shard in the fused linear
    start: int
    end: int
    b_t: torch.Tensor  # [end - start, shard size]


@dataclass
class LinearStack:
    """The resident adapters' weights for one wrapped linear."""

    a: torch.Tensor  # [R, in]: every shard's A rows, shard-major then slot
    shards: list[ShardStack]
    col_slot: torch.Tensor  # [R] int64: the slot each column belongs to
    col_scale: torch.Tensor  # [R]: that slot's scaling
    layout: tuple  # equal layouts share one mask per step


def build_stack(
    slots: Sequence[AdapterWeights | None],
    layer: int,
    shards: Sequence[tuple[str, int, int]],
    dtype: torch.dtype,
) -> LinearStack | None:
    """Stack the slots' A/B of (layer, target) for each (target, offset, size) shard."""
    a_rows: list[torch.Tensor] = []
    stacks: list[ShardStack] = []
    col_slot: list[int] = []
    col_scale: list[float] = []
    layout: list[tuple[int, int]] = []
    for target, offset, _size in shards:
        start, b_rows = len(col_slot), []
        for slot, adapter in enumerate(slots):
            pair = None if adapter is None else adapter.tensors.get((layer, target))
            if pair is None:
                continue
            a_rows.append(pair[0])
            b_rows.append(pair[1].t())
            col_slot += [slot] * adapter.rank
            col_scale += [adapter.scaling] * adapter.rank
            layout.append((slot, adapter.rank))
        if b_rows:
            b_t = torch.cat(b_rows).contiguous()
            stacks.append(ShardStack(offset, start, len(col_slot), b_t))
    if not stacks:
        return None
    return LinearStack(
        a=torch.cat(a_rows).contiguous(),
        shards=stacks,
        col_slot=torch.tensor(col_slot, dtype=torch.int64),
        col_scale=torch.tensor(col_scale, dtype=dtype),
        layout=tuple(layout),
    )


@dataclass
class LoRABatch:
    """One step's adapter rows: which rows of the flat batch use which slot."""

    num_tokens: int  # T, the flat batch's rows
    rows: torch.Tensor | None  # [N] rows with an adapter; None when every row has one
    row_slot: torch.Tensor  # [N] int64 slot of each such row
    masks: dict[tuple, torch.Tensor] = field(default_factory=dict)  # layout -> [N, R]

    def mask(self, stack: LinearStack) -> torch.Tensor:
        """[N, R]: a row's scaling on its own slot's columns, 0 elsewhere."""
        mask = self.masks.get(stack.layout)
        if mask is None:
            own = self.row_slot[:, None] == stack.col_slot[None, :]
            mask = own.to(stack.col_scale.dtype) * stack.col_scale
            self.masks[stack.layout] = mask
        return mask


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
        self.stack: LinearStack | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch, stack = self.state.batch, self.stack
        if batch is None or stack is None:
            return y
        if x.shape[0] != batch.num_tokens:
            # NOTE: a forward over rows other than the ones set_batch was told about (a
            # new caller of the model) would apply adapters to the wrong tokens
            raise RuntimeError(f"LoRA batch is for {batch.num_tokens} rows, got {x.shape[0]}")
        # x: [T, in] -> xs: [N, in], the adapter rows only
        xs = x if batch.rows is None else x.index_select(0, batch.rows)
        xa = torch.nn.functional.linear(xs, stack.a) * batch.mask(stack)  # [N, R]
        for shard in stack.shards:
            delta = xa[:, shard.start : shard.end] @ shard.b_t  # [N, shard size]
            out = y.narrow(1, shard.offset, delta.shape[1])
            if batch.rows is None:
                out += delta
            else:
                out.index_add_(0, batch.rows, delta)
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
        slot_per_row = torch.tensor(
            [-1 if ref is None else slot_of[ref.key] for ref, n in rows for _ in range(n)],
            dtype=torch.int64,
        )
        adapter_rows = (slot_per_row >= 0).nonzero().flatten()
        every_row = len(adapter_rows) == len(slot_per_row)
        self.state.batch = LoRABatch(
            num_tokens=len(slot_per_row),
            rows=None if every_row else adapter_rows,
            row_slot=slot_per_row[adapter_rows],
        )

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
