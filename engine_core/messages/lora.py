"""The adapter a request runs with, as it crosses every boundary (frontend -> core -> worker).

A worker knows an adapter only by this reference and loads it from `path` on first use, so
a restarted worker, a decode worker after a KV hand-off, or a remote worker all serve the
same adapter without any registration step.
"""

from __future__ import annotations

import msgspec


class LoRARef(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A LoRA adapter by identity: its served name and the PEFT folder it is loaded from."""

    name: str
    path: str

    @property
    def key(self) -> str:
        """What tells two adapters apart (the same name at a new path is another adapter)."""
        return f"{self.name}\0{self.path}"
