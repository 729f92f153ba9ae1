"""The model shape every loader produces and every model class consumes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """Llama-family hyper-parameters with Hugging Face's meaning.

    `architecture` is one of "llama", "mistral", "qwen2"; Qwen2 differs by q/k/v biases.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    # HF's rope_scaling dict (e.g. {"rope_type": "llama3", ...}) or None
    rope_scaling: dict | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
