"""LoRA adapters as the API sees them: the names a request's `model` may pick and their
/v1/models cards (runtime updates: frontend/serving_lora.py).

The registry only names adapters; the workers load them by path when a request first uses
one. NOTE: each frontend process has its own registry: with --api-server-count > 1, a
runtime update reaches only the process that answered it.
"""

from __future__ import annotations

import os
import time

from engine_core.messages.lora import LoRARef
from frontend.errors import APIError
from frontend.responses import ModelCard
from models.config import ModelConfig
from models.lora_files import LoRAError, read_adapter


class LoRARegistry:
    """The adapters one frontend serves, by name, checked against the base model."""

    def __init__(
        self,
        base_name: str,
        model: ModelConfig,
        max_lora_rank: int,
        enabled: bool,
        modules: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.base_name = base_name
        self.model = model
        self.max_lora_rank = max_lora_rank
        self.enabled = enabled
        self.adapters: dict[str, LoRARef] = {}
        for name, path in modules:
            self.add(name, path)

    def add(self, name: str, path: str) -> LoRARef:
        """Check and register an adapter; raises LoRAError (one line) if it is unusable."""
        if not self.enabled:
            raise LoRAError("LoRA adapters need --enable-lora")
        if name == self.base_name or name in self.adapters:
            raise LoRAError(f"The lora adapter '{name}' has already been loaded.")
        read_adapter(path, self.model, self.max_lora_rank)
        ref = self.adapters[name] = LoRARef(name, os.path.abspath(path))
        return ref

    def resolve(self, model: str | None) -> LoRARef | None:
        """The adapter `model` names (None: the base model); 404 for an unknown name."""
        if model is None or model == self.base_name:
            return None
        ref = self.adapters.get(model)
        if ref is None:
            raise APIError(404, f"The model `{model}` does not exist.", "model", "model_not_found")
        return ref

    def cards(self, max_model_len: int) -> list[ModelCard]:
        now = int(time.time())
        return [
            ModelCard(ref.name, now, max_model_len, root=ref.path, parent=self.base_name)
            for ref in self.adapters.values()
        ]
