"""Smoothing before W8A8 (SmoothQuant's idea): even out the activations' channels at load.

Per-token int8 activations give each row one scale, so a row's small channels lose their
bits to the few large ones, and in a Llama the large ones are the same channels for every
token. For a linear y = x W^T, x_j / s_j with W[:, j] * s_j gives the same y; with
s_j = max|x_j|^ALPHA / max|W[:, j]|^(1 - ALPHA) both sides' ranges even out. The division
is folded into what makes x, so nothing runs at serving time:
- qkv and gate/up read an RMSNorm's output: its weight is divided;
- o_proj reads the attention output, a mix of v rows: the v rows (and bias) are divided,
  one scale per KV channel, the largest of the query heads sharing it;
- down_proj reads silu(gate) * up: the up rows are divided;
- the LM head reads the final norm's output: that norm's weight is divided (a tied head gets
  its own copy of the embedding first, as quantization gives it one anyway).

The maxima come from one float forward over CALIBRATION_TEXT, our own mixed text (prose,
dialogue, code, numbers), not the evaluation text of scripts/eval_quality.py.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.metadata import AttentionMetadata, fresh_prompts

# measured on SmolLM2 (docs/benchmarks.md): 0.5 and 0.65 close most of W8A8's perplexity
# gap, 0.8 widens it again
ALPHA = 0.65
_FLOOR = 1e-5  # a channel that never fires keeps a finite scale

CALIBRATION_TEXT = """\
<|im_start|>user
Can you explain how tides work, and why there are two high tides a day?<|im_end|>
<|im_start|>assistant
Tides come mostly from the Moon's pull. The side of the Earth facing the Moon is pulled a \
little more than the Earth's centre, and the far side a little less, so the oceans bulge on \
both sides. As the Earth turns, a coast passes through both bulges: two high tides, roughly \
twelve hours and twenty-five minutes apart.<|im_end|>
<|im_start|>user
Write a short Python function that counts the vowels in a string.<|im_end|>
<|im_start|>assistant
def count_vowels(text: str) -> int:
    return sum(1 for ch in text.lower() if ch in "aeiou")

print(count_vowels("Harbour lights"))  # 4<|im_end|>
The old lighthouse keeper climbed the ninety-seven steps every evening at dusk. In 1874 the \
lamp burned whale oil; by 1921 it was electric, and the keeper's log noted storms, passing \
ships and, once, a lost heron that rested on the gallery rail for three days.
Shopping list: 2 kg flour, 12 eggs, 500 g butter, 1 litre milk, salt, yeast (7 g sachets).
"Are you coming to the meeting on Thursday?" she asked. "Only if it starts after four," he \
said, "the train from Leeds is always late."
Table 3 reports a mean of 41.7 (standard deviation 5.2) over 1,024 runs; the median latency \
fell from 88 ms to 61 ms after the cache was warmed.
"""


def smooth_for_w8a8(model: nn.Module, token_ids: list[int], alpha: float = ALPHA) -> int:
    """Fold smoothing scales into a float Llama-family `model` (before quantization, its
    linears plain nn.Linear); returns how many linears were smoothed."""
    if getattr(model, "lm_head", None) is None:
        embed = model.embed_tokens.weight
        model.lm_head = nn.Linear(embed.shape[1], embed.shape[0], bias=False)
        model.lm_head.weight = nn.Parameter(embed.detach().clone())
    maxima = activation_maxima(model, token_ids)
    config = model.config
    group, dim = config.num_attention_heads // config.num_key_value_heads, config.head_dim
    q_size, kv_size = config.num_attention_heads * dim, config.num_key_value_heads * dim
    with torch.no_grad():
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            s = _scales(attn.qkv_proj, maxima[attn.qkv_proj], alpha)
            attn.qkv_proj.weight.mul_(s)
            layer.input_layernorm.weight.div_(s)
            s = _scales(mlp.gate_up_proj, maxima[mlp.gate_up_proj], alpha)
            mlp.gate_up_proj.weight.mul_(s)
            layer.post_attention_layernorm.weight.div_(s)
            # one scale per KV channel: o_proj's input channel (head h, d) is v's (h // G, d)
            s = _scales(attn.o_proj, maxima[attn.o_proj], alpha)
            s = s.view(config.num_key_value_heads, group, dim).amax(1)  # [Hkv, D]
            attn.o_proj.weight.mul_(s[:, None].expand(-1, group, -1).reshape(-1))
            v = slice(q_size + kv_size, q_size + 2 * kv_size)
            attn.qkv_proj.weight[v].div_(s.reshape(-1, 1))
            if attn.qkv_proj.bias is not None:
                attn.qkv_proj.bias[v].div_(s.reshape(-1))
            s = _scales(mlp.down_proj, maxima[mlp.down_proj], alpha)
            mlp.down_proj.weight.mul_(s)
            mlp.gate_up_proj.weight[config.intermediate_size :].div_(s[:, None])
        s = _scales(model.lm_head, maxima[model.lm_head], alpha)
        model.lm_head.weight.mul_(s)
        model.norm.weight.div_(s)
    return 4 * len(model.layers) + 1


def _scales(linear: nn.Linear, x_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [in_features]: max|x_j|^alpha / max|W[:, j]|^(1 - alpha)."""
    w_max = linear.weight.detach().abs().amax(0).float().clamp(min=_FLOOR)
    return (x_max.clamp(min=_FLOOR) ** alpha / w_max ** (1 - alpha)).clamp(min=_FLOOR)


@torch.inference_mode()
def activation_maxima(model: nn.Module, token_ids: list[int]) -> dict[nn.Module, torch.Tensor]:
    """Each nn.Linear's largest |input| per channel over one forward of `token_ids` (one
    sequence, a scratch KV cache); the LM head's input is the forward's output at every
    position, taken as it is rather than by computing the logits."""
    maxima: dict[nn.Module, torch.Tensor] = {}

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], _: torch.Tensor) -> None:
        amax = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0).float()
        seen = maxima.get(module)
        maxima[module] = amax if seen is None else torch.maximum(seen, amax)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        tokens = len(token_ids)
        hidden = model(torch.tensor(token_ids), torch.arange(tokens), *scratch_cache(model, tokens))
        record(model.lm_head, (hidden,), hidden)
    finally:
        for hook in hooks:
            hook.remove()
    return maxima


def scratch_cache(model: nn.Module, tokens: int) -> tuple[torch.Tensor, AttentionMetadata]:
    """A KV cache just big enough for one sequence of `tokens`, and its prefill metadata."""
    config, block_size = model.config, 16
    blocks = -(-tokens // block_size)
    shape = (config.num_hidden_layers, 2, blocks, block_size, config.num_key_value_heads,
             config.head_dim)  # fmt: skip
    cache = torch.zeros(shape, dtype=model.embed_tokens.weight.dtype)
    return cache, fresh_prompts(1, tokens, block_size)
