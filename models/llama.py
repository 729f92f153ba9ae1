"""Llama-family decoder (Llama, Mistral, Qwen2) over a flat batch of tokens.

The model sees a flat batch of T new tokens from any mix of sequences; paging lives in
`AttentionMetadata`, which it only passes through to the attention kernels. q/k/v and
gate/up projections are fused at load time: one larger matmul is cheaper than three.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from kernels import AttentionBackend, bf16_gemm, fused, get_attention_backend
from kernels.metadata import AttentionMetadata
from models import switches
from models.config import ModelConfig
from models.layer_stack import LayerStack
from models.packed import (
    TileGateUpSiLU,
    pack_linears,
    packed_linear,
    packing_available,
    tiles_available,
)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        # with a residual: residual += x in place, then the norm of that (one fused pass)
        return fused.rms_norm(x, self.weight, self.eps, residual)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [D/2], with HF's "linear" and "llama3" scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    )
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if kind != "default":
        raise ValueError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) RoPE with a precomputed cos/sin table."""

    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions).float(), rope_inv_freq(config))
        self.register_buffer("cos", freqs.cos(), persistent=False)  # [P, D/2]
        self.register_buffer("sin", freqs.sin(), persistent=False)  # [P, D/2]

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # x: [T, H, D]; positions: [T]
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D/2]
        sin = self.sin[positions].unsqueeze(1)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, rope: RotaryEmbedding, attn: AttentionBackend) -> None:
        super().__init__()
        self.attn = attn
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = skip_init(
            nn.Linear,
            config.hidden_size,
            self.q_size + 2 * self.kv_size,
            bias=config.attention_bias,
        )
        self.o_proj = skip_init(nn.Linear, self.q_size, config.hidden_size, bias=False)
        self.rope = rope

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        # x: [T, hidden]; kv_cache: [2, num_blocks, block_size, Hkv, D]
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 * Hkv) * D]
        key_cache, value_cache = kv_cache.unbind(0)
        q = fused.rope_write_kv(
            qkv, positions, self.rope.cos, self.rope.sin, key_cache, value_cache,
            meta.slot_mapping, self.num_heads,
        )  # fmt: skip
        if q is None:
            q = self._rope_write_kv(positions, qkv, key_cache, value_cache, meta)
        # the KV cache may hold another dtype (--kv-cache-dtype): attention runs in its dtype
        out = self.attn.paged_attention(q, key_cache, value_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size).to(x.dtype))  # out: [T, Hq, D]

    def _rope_write_kv(
        self,
        positions: torch.Tensor,
        qkv: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The torch path of `fused.rope_write_kv`: q [T, Hq, D] in the cache's dtype."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.rope(positions, q.view(-1, self.num_heads, self.head_dim))  # [T, Hq, D]
        k = self.rope(positions, k.view(-1, self.num_kv_heads, self.head_dim))  # [T, Hkv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        kv_dtype = key_cache.dtype
        self.attn.write_kv(
            k.to(kv_dtype), v.to(kv_dtype), key_cache, value_cache, meta.slot_mapping
        )
        return q.to(kv_dtype)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate = config.intermediate_size
        self.gate_up_proj = skip_init(
            nn.Linear, config.hidden_size, 2 * self.intermediate, bias=False
        )
        self.down_proj = skip_init(nn.Linear, self.intermediate, config.hidden_size, bias=False)
        self.silu_in_gate_up = False  # True once gate_up_proj applies SiLU(gate) * up itself

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.gate_up_proj(x)
        return self.down_proj(hidden if self.silu_in_gate_up else fused.silu_mul(hidden))

    def fuse_activation(self) -> bool:
        """Give gate_up_proj (built without a bias) the activation where the bf16 tile kernel
        can apply it (still a plain linear, duet's bf16 kernels here); returns whether it did.
        Call before packing."""
        linear = self.gate_up_proj
        weight = linear.weight if isinstance(linear, nn.Linear) else None
        if (
            weight is None
            or not tiles_available(weight.dtype)
            or not bf16_gemm.gate_up_supported(self.intermediate, weight.shape[1])
        ):
            return False
        self.gate_up_proj = TileGateUpSiLU(weight)
        self.silu_in_gate_up = True
        return True


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rope: RotaryEmbedding, attn: AttentionBackend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, rope, attn)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output [T, hidden] and residual the stream it adds to
        (at the first layer x is the embedding and residual None) -> this layer's pair.

        NOTE: the residual adds happen inside the next norm (one fused pass); the sums, in
        the model's dtype, are the ones HF rounds.
        """
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, kv_cache, meta)
        return self.mlp(self.post_attention_layernorm(h, residual)), residual


class LlamaForCausalLM(nn.Module):
    """Decoder stack + LM head; `forward` returns hidden states, `compute_logits` the logits."""

    def __init__(
        self, config: ModelConfig, max_positions: int | None = None, device: str = "cpu"
    ) -> None:
        super().__init__()
        self.config = config
        rope = RotaryEmbedding(config, max_positions or config.max_position_embeddings)
        attn = get_attention_backend(device)
        self.embed_tokens = skip_init(nn.Embedding, config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, rope, attn) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.layer_stack: LayerStack | None = None  # set by enable_layer_stack
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else skip_init(nn.Linear, config.hidden_size, config.vocab_size, bias=False)
        )

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; kv_cache: [L, 2, blocks, block_size, Hkv, D] -> [T, hidden]."""
        with switches.held():  # the kernels' switches, read once for the whole step
            x, residual = self.embed_tokens(input_ids), None  # x: [T, hidden]
            if self.layer_stack is not None and self.layer_stack.takes(x, kv_cache, meta):
                return self.layer_stack(x, positions, kv_cache, meta)
            for layer, layer_cache in zip(self.layers, kv_cache.unbind(0), strict=True):
                x, residual = layer(positions, x, residual, layer_cache, meta)
            return self.norm(x, residual)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> fp32 logits [N, vocab]."""
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight).float()
        return self.lm_head(hidden).float()

    def pack_weights(self, fuse_activation: bool = True) -> int:
        """Pack every linear (and a tied LM head) for oneDNN or duet's bf16 kernels where that is
        faster for the model's dtype; returns how many were packed. Call after load_weights.
        `fuse_activation`: the MLPs' gate_up projections apply SiLU(gate) * up themselves
        where the tile kernel can (not with LoRA, whose deltas join the projection's output)."""
        if not packing_available(self.embed_tokens.weight.dtype):
            return 0
        fused_mlps = (
            sum(layer.mlp.fuse_activation() for layer in self.layers) if fuse_activation else 0
        )
        count = fused_mlps + pack_linears(self)
        if self.lm_head is None:
            self.lm_head = packed_linear(self.embed_tokens.weight, None)
            count += 1
        return count

    def enable_layer_stack(self) -> bool:
        """Run steps' layers in one native call where the model's kernels allow
        (models/layer_stack.py); returns whether they will. Call after pack_weights and
        after anything that wraps the linears (LoRA), which keeps the Python forward."""
        self.layer_stack = LayerStack.build(self)
        return self.layer_stack is not None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors in, fusing q/k/v and gate/up on the way."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            target = _fused_target(hf_name)
            if target is None:
                continue
            name, shard = target
            param = params[name]
            with torch.no_grad():
                self._shard_view(param, name, shard).copy_(tensor)
            loaded.add(f"{name}#{shard}")
        expected = {f"{n}#{s}" for n in params for s in _shards_of(n)}
        missing = expected - loaded
        if missing:
            raise ValueError(
                f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[0]}"
            )

    def _shard_view(self, param: torch.Tensor, name: str, shard: str) -> torch.Tensor:
        if shard == "":
            return param.data
        attn = self.layers[0].self_attn
        sizes = {
            "q": (0, attn.q_size),
            "k": (attn.q_size, attn.kv_size),
            "v": (attn.q_size + attn.kv_size, attn.kv_size),
            "gate": (0, self.config.intermediate_size),
            "up": (self.config.intermediate_size, self.config.intermediate_size),
        }
        start, size = sizes[shard]
        return param.data.narrow(0, start, size)


_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up"),
}


def _fused_target(hf_name: str) -> tuple[str, str] | None:
    """HF parameter name -> (our parameter name, shard), None for buffers we recompute."""
    if "rotary_emb" in hf_name:
        return None
    name = hf_name.removeprefix("model.")
    for hf_part, (ours, shard) in _FUSED.items():
        if f".{hf_part}." in name:
            return name.replace(hf_part, ours), shard
    return name, ""


def _shards_of(name: str) -> list[str]:
    if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
        return ["q", "k", "v"]
    if name.endswith("gate_up_proj.weight"):
        return ["gate", "up"]
    return [""]
