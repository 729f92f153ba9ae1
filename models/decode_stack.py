"""A bf16 decode step's decoder layers in one native call (kernels/csrc/decode_stack.c).

On CPUs with AMX-BF16 (and with int8 weights on any with AVX512_BF16) every op of a bf16
decode step is one of duet's C kernels, and the
Python around them (~8 calls per layer: interpreter, ctypes, a tensor allocated per output)
was about a third of a batch-1 step. The stack calls the same kernels in the same order, so
its hidden states are bit-equal to the Python forward's. It runs only where that forward
would take exactly those kernels: linears on AMX tiles or on the native int8 kernels their
route picks for the batch (models/quant_int8.py), no LoRA, the fused ops and the AVX512_BF16
decode attention in use, and a batch of decodes only. DUET_DISABLE_DECODE_STACK=1 keeps the
Python forward (A/B runs).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from kernels import fused, int8, native
from kernels.cpu_attention import int32_contiguous
from kernels.metadata import AttentionMetadata
from models import cpu_features, switches
from models.packed import TileGateUpSiLU, TileLinear
from models.quant_int8 import Int8Linear

DISABLE_ENV = "DUET_DISABLE_DECODE_STACK"
_LINEARS = ("qkv", "o_proj", "gate_up", "down_proj")


class StackLinear(ctypes.Structure):
    """decode_stack.c's StackLinear: bf16 tiles (int8 NULL) or an int8 kernel's weights."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("weight", "bias", "int8", "wsum", "scale")]


class StackLayer(ctypes.Structure):
    """decode_stack.c's StackLayer: one layer's norms and linears."""

    _fields_ = (
        [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p)]
        + [(name, StackLinear) for name in _LINEARS]
        + [("silu_in_gate_up", ctypes.c_int)]
    )


class StackShape(ctypes.Structure):
    """decode_stack.c's StackShape."""

    _fields_ = [
        (name, ctypes.c_int)
        for name in (
            "layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "intermediate",
            "block_size",
        )
    ] + [("eps", ctypes.c_float), ("scale", ctypes.c_float)]  # fmt: skip


@functools.cache
def _kernel() -> ctypes._CFuncPtr:
    lib = native.load()
    fn = lib.decode_stack_bf16
    ptr, num = ctypes.c_void_p, ctypes.c_int
    # (layers, shape, final_norm, x, kv_cache, blocks, cos, sin, positions, slots,
    # block_tables, seq_lens, batch, max_blocks, out, threads)
    fn.argtypes = [ptr] * 5 + [ctypes.c_long] + [ptr] * 6 + [num, num, ptr, num]
    fn.restype = num
    return fn


class DecodeStack:
    """The layers of a bf16 model whose linears are on AMX tiles or native int8 kernels, for
    decode-only steps (`takes`)."""

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        attn = model.layers[0].self_attn
        self._model = model  # keeps every tensor whose address the layers hold alive
        self._shape = StackShape(
            len(model.layers), config.hidden_size, attn.num_heads, attn.num_kv_heads,
            attn.head_dim, config.intermediate_size, 0, config.rms_norm_eps, attn.scale,
        )  # fmt: skip
        self._rope = attn.rope
        # the layers' kernels for a batch of that many rows (an int8 linear's depends on
        # it), None where one of them is not native
        self._by_rows: dict[int, ctypes.Array | None] = {}

    @staticmethod
    def build(model: nn.Module) -> DecodeStack | None:
        """The stack for `model` (a LlamaForCausalLM after pack_weights, and after LoRA would
        wrap its linears), or None where its decode steps never take the stack's kernels."""
        lib = native.load()
        if lib is None or not hasattr(lib, "decode_stack_bf16"):
            return None
        if model.embed_tokens.weight.dtype != torch.bfloat16:
            return None
        for layer in model.layers:
            qkv, o_proj, gate_up, down_proj = _linears(layer)
            if not all(_stackable(linear) for linear in (qkv, o_proj, down_proj)):
                return None
            if type(gate_up) is not TileGateUpSiLU and not _stackable(gate_up):
                return None
        norms = [model.norm] + [
            norm for layer in model.layers
            for norm in (layer.input_layernorm, layer.post_attention_layernorm)
        ]  # fmt: skip
        rope = model.layers[0].self_attn.rope
        tables = [norm.weight for norm in norms] + [rope.cos, rope.sin]
        if not all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in tables):
            return None
        return DecodeStack(model)

    def takes(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> bool:
        """True when the Python forward would run this step (x: [T, hidden]) on the stack's
        kernels: one new token per sequence, a bf16 cache, no switch choosing others, and
        native kernels for every linear at this many rows."""
        return (
            0 < x.shape[0] == meta.num_decodes == meta.num_seqs
            and kv_cache.dtype == torch.bfloat16
            and kv_cache.is_contiguous()
            and switches.read(DISABLE_ENV) != "1"
            and switches.read(fused.DISABLE_ENV) != "1"
            and cpu_features.isa() == "avx512"
            and native.twin(torch.bfloat16) == "avx512bf16"
            and self._layers(x.shape[0]) is not None
        )

    def __call__(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """x: the tokens' embeddings [B, hidden] (overwritten: the residual stream) ->
        the final norm's output [B, hidden]; kv_cache [L, 2, blocks, block_size, Hkv, D]."""
        batch = x.shape[0]
        self._shape.block_size = kv_cache.shape[3]
        tables = int32_contiguous(meta.block_tables)
        seq_lens = int32_contiguous(meta.seq_lens)
        positions = positions.to(torch.int64).contiguous()
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        out = torch.empty_like(x)
        status = _kernel()(
            ctypes.byref(self._layers(batch)), ctypes.byref(self._shape),
            self._model.norm.weight.data_ptr(), x.data_ptr(), kv_cache.data_ptr(),
            kv_cache.shape[2], self._rope.cos.data_ptr(), self._rope.sin.data_ptr(),
            positions.data_ptr(), slots.data_ptr(), tables.data_ptr(), seq_lens.data_ptr(),
            batch, tables.shape[1], out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("decode stack: out of memory for a step's scratch buffers")
        return out

    def _layers(self, rows: int) -> ctypes.Array | None:
        if rows not in self._by_rows:
            layers = [_layer(layer, rows) for layer in self._model.layers]
            self._by_rows[rows] = None if None in layers else (StackLayer * len(layers))(*layers)
        return self._by_rows[rows]


def _linears(layer: nn.Module) -> tuple[nn.Module, ...]:
    attn, mlp = layer.self_attn, layer.mlp
    return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj


def _stackable(linear: nn.Module) -> bool:
    """A linear the stack can call: on bf16 tiles, or int8 with native kernels."""
    return type(linear) is TileLinear or (type(linear) is Int8Linear and linear.kernel != "torch")


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _linear(linear: nn.Module, rows: int) -> StackLinear | None:
    """`linear` as the stack calls it for `rows` rows, None where that call is not native."""
    if type(linear) is TileLinear:
        return StackLinear(linear.packed.data_ptr(), _address(linear.bias))
    kernel = linear.native_kernel_for(rows)
    if kernel is None:
        return None
    return StackLinear(
        linear.packed.data_ptr(), _address(linear.bias), int8.kernel_address(kernel),
        linear.wsum.data_ptr(), linear.scale.data_ptr(),
    )  # fmt: skip


def _layer(layer: nn.Module, rows: int) -> StackLayer | None:
    fused_gate_up = type(layer.mlp.gate_up_proj) is TileGateUpSiLU
    linears = []
    for linear in _linears(layer):
        if linear is layer.mlp.gate_up_proj and fused_gate_up:
            linears.append(StackLinear(linear.packed.data_ptr()))
            continue
        linears.append(_linear(linear, rows))
    if None in linears:
        return None
    return StackLayer(
        layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
        *linears, fused_gate_up,
    )  # fmt: skip
