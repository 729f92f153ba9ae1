"""Whether the KV pools the core will start fit in this machine's memory.

The pools are lazily zeroed mappings (models/runner.py), so an oversized one does not fail
at start: it fails once traffic has written enough blocks, as the kernel's OOM killer
taking a worker mid-stream. Refusing at start turns that into one clear line.
"""

from __future__ import annotations

from pathlib import Path

from engine_core.messages.config import EngineConfig
from engine_core.placement import local_roles

GIB = 1024**3


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable in bytes (None where the kernel does not say)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def kv_memory_problem(config: EngineConfig, available: int | None) -> str | None:
    """Why the local KV pools cannot fit in `available` bytes, or None when they can."""
    pools = len(local_roles(config))  # one pool each; remote workers bring their own memory
    wanted = pools * config.kv_cache_memory
    if available is None or wanted <= available:
        return None
    each = f"{pools} workers x " if pools > 1 else ""
    return (
        f"--kv-cache-memory asks for {each}{config.kv_cache_memory / GIB:.2f} GiB of KV cache, "
        f"but this machine has {available / GIB:.2f} GiB available: lower --kv-cache-memory"
    )
