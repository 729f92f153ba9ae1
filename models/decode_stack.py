"""A bf16 decode step's decoder layers in one native call (kernels/csrc/decode_stack.c).

On CPUs with AMX-BF16 every op of a bf16 decode step is one of duet's C kernels, and the
Python around them (~8 calls per layer: interpreter, ctypes, a tensor allocated per output)
was about a third of a batch-1 step. The stack calls the same kernels in the same order, so
its hidden states are bit-equal to the Python forward's; it runs only where that forward
would take exactly those kernels: a model whose every linear is on AMX tiles with SiLU in
gate_up (no LoRA, no int8), the fused ops and the AVX512_BF16 decode attention in use, and a
batch of decodes only. DUET_DISABLE_DECODE_STACK=1 keeps the Python forward (A/B runs).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from kernels import fused, native
from kernels.cpu_attention import int32_contiguous
from kernels.metadata import AttentionMetadata
from models import cpu_features, switches
from models.packed import TileGateUpSiLU, TileLinear

DISABLE_ENV = "DUET_DISABLE_DECODE_STACK"


class StackLayer(ctypes.Structure):
    """decode_stack.c's StackLayer: one layer's norms and packed linears."""

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in (
            "input_norm", "post_norm", "qkv", "o_proj", "gate_up", "down_proj", "qkv_bias",
        )
    ]  # fmt: skip


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
    fn = lib.decode_stack_bf16_amx
    ptr, num = ctypes.c_void_p, ctypes.c_int
    # (layers, shape, final_norm, x, kv_cache, blocks, cos, sin, positions, slots,
    # block_tables, seq_lens, batch, max_blocks, out, threads)
    fn.argtypes = [ptr] * 5 + [ctypes.c_long] + [ptr] * 6 + [num, num, ptr, num]
    fn.restype = num
    return fn


class DecodeStack:
    """The layers of a bf16 model on AMX tiles, for decode-only steps (`takes`)."""

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        attn = model.layers[0].self_attn
        self._model = model  # keeps every tensor whose address the layers hold alive
        self._layers = (StackLayer * len(model.layers))(*(_layer(layer) for layer in model.layers))
        self._shape = StackShape(
            len(model.layers), config.hidden_size, attn.num_heads, attn.num_kv_heads,
            attn.head_dim, config.intermediate_size, 0, config.rms_norm_eps, attn.scale,
        )  # fmt: skip
        self._rope = attn.rope

    @staticmethod
    def build(model: nn.Module) -> DecodeStack | None:
        """The stack for `model` (a LlamaForCausalLM after pack_weights), or None where its
        decode steps would not take exactly the stack's kernels."""
        lib = native.load()
        if lib is None or not hasattr(lib, "decode_stack_bf16_amx"):
            return None
        if model.embed_tokens.weight.dtype != torch.bfloat16:
            return None
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = (attn.qkv_proj, attn.o_proj, mlp.down_proj)
            if not all(type(linear) is TileLinear for linear in linears):
                return None
            if type(mlp.gate_up_proj) is not TileGateUpSiLU or attn.o_proj.bias is not None:
                return None
            if mlp.down_proj.bias is not None:
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
        kernels: one new token per sequence, a bf16 cache, no switch choosing others."""
        return (
            0 < x.shape[0] == meta.num_decodes == meta.num_seqs
            and kv_cache.dtype == torch.bfloat16
            and kv_cache.is_contiguous()
            and switches.read(DISABLE_ENV) != "1"
            and switches.read(fused.DISABLE_ENV) != "1"
            and cpu_features.isa() == "avx512"
            and native.twin(torch.bfloat16) == "avx512bf16"
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
            ctypes.byref(self._layers), ctypes.byref(self._shape),
            self._model.norm.weight.data_ptr(), x.data_ptr(), kv_cache.data_ptr(),
            kv_cache.shape[2], self._rope.cos.data_ptr(), self._rope.sin.data_ptr(),
            positions.data_ptr(), slots.data_ptr(), tables.data_ptr(), seq_lens.data_ptr(),
            batch, tables.shape[1], out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("decode stack: out of memory for a step's scratch buffers")
        return out


def _layer(layer: nn.Module) -> StackLayer:
    attn, mlp = layer.self_attn, layer.mlp
    bias = attn.qkv_proj.bias
    return StackLayer(
        layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
        attn.qkv_proj.packed.data_ptr(), attn.o_proj.packed.data_ptr(),
        mlp.gate_up_proj.packed.data_ptr(), mlp.down_proj.packed.data_ptr(),
        None if bias is None else bias.data_ptr(),
    )  # fmt: skip
