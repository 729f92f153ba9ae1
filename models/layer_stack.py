"""A bf16 step's decoder layers in one native call (kernels/csrc/layer_stack.c).

On CPUs with AVX512_BF16 every op of a bf16 step is one of duet's C kernels, and the Python
around them (~8 calls per layer: interpreter, ctypes, a tensor allocated per output) was
about a third of a batch-1 decode step. The stack calls the same kernels in the same order,
so its hidden states are bit-equal to the Python forward's. It runs only where that forward
would take exactly those kernels: linears on duet's bf16 kernels (AMX tiles or their
`vdpbf16ps` twin, kernels/bf16_gemm.py) or on the native int8 kernels their route picks for
the step's rows (models/quant_int8.py), no LoRA, the fused ops and the native attention
kernels in use (kernels/cpu_attention.py: the AVX512_BF16 decode kernel, and the prefill
kernel its `prefill_twin` picks for chunks). DUET_DISABLE_LAYER_STACK=1 keeps the Python
forward (A/B runs).
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from kernels import bf16_gemm, fused, int8, native
from kernels.cpu_attention import MAX_HEAD_DIM, int32_contiguous, prefill_twin
from kernels.metadata import AttentionMetadata
from models import cpu_features, switches
from models.packed import TileGateUpSiLU, TileLinear
from models.quant_int8 import Int8Linear

DISABLE_ENV = "DUET_DISABLE_LAYER_STACK"
_LINEARS = ("qkv", "o_proj", "gate_up", "down_proj")


class StackLinear(ctypes.Structure):
    """layer_stack.c's StackLinear: bf16 tiles (int8 NULL) or an int8 kernel's weights."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("weight", "bias", "int8", "wsum", "scale")]


class StackLayer(ctypes.Structure):
    """layer_stack.c's StackLayer: one layer's norms and linears."""

    _fields_ = (
        [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p)]
        + [(name, StackLinear) for name in _LINEARS]
        + [("silu_in_gate_up", ctypes.c_int)]
    )


class StackShape(ctypes.Structure):
    """layer_stack.c's StackShape."""

    _fields_ = [
        (name, ctypes.c_int)
        for name in (
            "layers", "hidden", "num_heads", "num_kv_heads", "head_dim", "intermediate",
            "block_size",
        )
    ] + [("eps", ctypes.c_float), ("scale", ctypes.c_float), ("amx", ctypes.c_int)]  # fmt: skip


@functools.cache
def _kernel() -> ctypes._CFuncPtr:
    return entry_point(native.load())


def entry_point(lib: ctypes.CDLL) -> ctypes._CFuncPtr:
    """`lib`'s layer_stack_bf16, declared: this build's, or another build's for an A/B run
    (LayerStack.entry)."""
    fn = lib.layer_stack_bf16
    ptr, num = ctypes.c_void_p, ctypes.c_int
    # (layers, shape, final_norm, x, kv_cache, blocks, cos, sin, positions, slots,
    # block_tables, seq_lens, query_start, tokens, num_decodes, num_seqs, max_blocks,
    # prefill kernel or NULL, out, threads)
    fn.argtypes = [ptr] * 5 + [ctypes.c_long] + [ptr] * 7 + [num] * 4 + [ptr, ptr, num]
    fn.restype = num
    return fn


class LayerStack:
    """The layers of a bf16 model whose linears are on bf16 tiles or native int8 kernels, for
    the steps whose every op the stack's kernels would run (`takes`)."""

    def __init__(self, model: nn.Module) -> None:
        config = model.config
        attn = model.layers[0].self_attn
        self._model = model  # keeps every tensor whose address the layers hold alive
        self._shape = StackShape(
            len(model.layers), config.hidden_size, attn.num_heads, attn.num_kv_heads,
            attn.head_dim, config.intermediate_size, 0, config.rms_norm_eps, attn.scale,
            bf16_gemm.twin() == "amx",
        )  # fmt: skip
        self._rope = attn.rope
        self._by_kernels: dict[tuple[str, ...], ctypes.Array] = {}  # see _layers
        # another build's entry point (scripts/bench_decode_step.py --against-library); its
        # own norms, RoPE and bf16 tiles, this build's int8 and prefill kernels (addresses)
        self.entry: ctypes._CFuncPtr | None = None

    @staticmethod
    def build(model: nn.Module) -> LayerStack | None:
        """The stack for `model` (a LlamaForCausalLM after pack_weights, and after LoRA would
        wrap its linears), or None where its steps never take the stack's kernels."""
        lib = native.load()
        if lib is None or not hasattr(lib, "layer_stack_bf16"):
            return None
        if model.embed_tokens.weight.dtype != torch.bfloat16:
            return None
        if model.layers[0].self_attn.head_dim > MAX_HEAD_DIM:  # the attention kernels' limit
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
        return LayerStack(model)

    def takes(self, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> bool:
        """True when the Python forward would run this step (x: [T, hidden]) on the stack's
        kernels: a bf16 cache, native kernels for every linear at T rows and for the step's
        chunks, and no switch choosing others."""
        return (
            x.shape[0] > 0
            and kv_cache.dtype == torch.bfloat16
            and kv_cache.is_contiguous()
            and switches.read(DISABLE_ENV) != "1"
            and switches.read(fused.DISABLE_ENV) != "1"
            and cpu_features.isa() == "avx512"
            and native.twin(torch.bfloat16) == "avx512bf16"
            and (bf16_gemm.twin() == "amx") == bool(self._shape.amx)  # the tiles it was built for
            and (meta.num_seqs == meta.num_decodes or self._prefill_kernel() is not None)
            and self._layers(x.shape[0]) is not None
        )

    def __call__(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """x: the step's token embeddings [T, hidden] (overwritten: the residual stream) ->
        the final norm's output [T, hidden]; kv_cache [L, 2, blocks, block_size, Hkv, D]."""
        self._shape.block_size = kv_cache.shape[3]
        tables = int32_contiguous(meta.block_tables)
        seq_lens = int32_contiguous(meta.seq_lens)
        starts = int32_contiguous(meta.query_start_loc)
        positions = positions.to(torch.int64).contiguous()
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        prefill = None if meta.num_seqs == meta.num_decodes else self._prefill_kernel()
        out = torch.empty_like(x)
        status = (self.entry or _kernel())(
            ctypes.byref(self._layers(x.shape[0])), ctypes.byref(self._shape),
            self._model.norm.weight.data_ptr(), x.data_ptr(), kv_cache.data_ptr(),
            kv_cache.shape[2], self._rope.cos.data_ptr(), self._rope.sin.data_ptr(),
            positions.data_ptr(), slots.data_ptr(), tables.data_ptr(), seq_lens.data_ptr(),
            starts.data_ptr(), x.shape[0], meta.num_decodes, meta.num_seqs, tables.shape[1],
            prefill, out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("layer stack: out of memory for a step's scratch buffers")
        return out

    def _prefill_kernel(self) -> int | None:
        """The address of the prefill kernel the Python forward's chunks take, None where
        they take the torch path."""
        shape = self._shape
        twin = prefill_twin(torch.bfloat16, shape.num_heads, shape.num_kv_heads, shape.head_dim)
        if twin is None:
            return None
        kernel = getattr(native.load(), f"paged_prefill_bf16_{twin}")
        return ctypes.cast(kernel, ctypes.c_void_p).value

    def _layers(self, rows: int) -> ctypes.Array | None:
        """The layers as the stack calls them for a step of `rows` rows, None where a linear
        would not take a native kernel. An int8 linear's kernel depends on the rows, the
        same in every layer (the same shapes): one array per set of kernels."""
        kernels = tuple(_kernel_for(linear, rows) for linear in _linears(self._model.layers[0]))
        if None in kernels:
            return None
        if kernels not in self._by_kernels:
            layers = [_layer(layer, kernels) for layer in self._model.layers]
            self._by_kernels[kernels] = (StackLayer * len(layers))(*layers)
        return self._by_kernels[kernels]


def _linears(layer: nn.Module) -> tuple[nn.Module, ...]:
    attn, mlp = layer.self_attn, layer.mlp
    return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj


def _stackable(linear: nn.Module) -> bool:
    """A linear the stack can call: on bf16 tiles, or int8 with native kernels."""
    return type(linear) is TileLinear or (type(linear) is Int8Linear and linear.kernel != "torch")


def _kernel_for(linear: nn.Module, rows: int) -> str | None:
    """How the stack calls `linear` for `rows` rows: "tiles", an int8 kernel
    (kernels.int8.NATIVE_KERNELS), or None where that call is not native."""
    if type(linear) in (TileLinear, TileGateUpSiLU):
        return "tiles"
    return linear.native_kernel_for(rows)


def _address(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _linear(linear: nn.Module, kernel: str) -> StackLinear:
    if kernel == "tiles":
        return StackLinear(linear.packed.data_ptr(), _address(getattr(linear, "bias", None)))
    return StackLinear(
        linear.packed.data_ptr(), _address(linear.bias), int8.kernel_address(kernel),
        linear.wsum.data_ptr(), linear.scale.data_ptr(),
    )  # fmt: skip


def _silu_in_gate_up(gate_up: nn.Module, kernel: str) -> bool:
    """True when gate_up's call applies SiLU(gate) * up itself: on bf16 tiles packed for it,
    or int8 W8A8 with the kernel's SiLU twin (kernels.int8.SILU_KERNELS) for a gate_up
    without bias."""
    if type(gate_up) is TileGateUpSiLU:
        return True
    return (
        int8.silu_available(kernel)
        and gate_up.bias is None
        and gate_up.out_features % (2 * int8.LANES) == 0
    )


def _layer(layer: nn.Module, kernels: tuple[str, ...]) -> StackLayer:
    kernels = list(kernels)
    silu = _silu_in_gate_up(layer.mlp.gate_up_proj, kernels[2])
    if silu and kernels[2] in int8.SILU_KERNELS:
        kernels[2] = int8.SILU_KERNELS[kernels[2]]
    pairs = zip(_linears(layer), kernels, strict=True)
    linears = [_linear(linear, kernel) for linear, kernel in pairs]
    return StackLayer(
        layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
        *linears, silu,
    )  # fmt: skip
