"""The environment switches that pick kernels (DUET_CPU_ISA, DUET_DISABLE_FUSED_OPS, ...),
read at every call, or once per model step inside `held()`.

Kernels look their switches up on every call, so that a test (or an A/B run) that changes
one takes effect at once. A lookup of an unset variable costs ~1-2 us (os.environ raises
and catches a KeyError), and a decode step asks ~300 times: reading them once per step took
a batch-1 step to 0.97x (int8) and 0.90x (bf16) of its time. Inside `held()` each variable is
read from the environment once and then answered from a dict until the block ends
(docs/benchmarks.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

_held: dict[str, str | None] | None = None


def read(name: str) -> str | None:
    """The value of environment variable `name` (None when unset); inside `held()`, the
    value it had at its first read in the block."""
    if _held is None:
        return os.environ.get(name)
    if name not in _held:
        _held[name] = os.environ.get(name)
    return _held[name]


@contextmanager
def held() -> Iterator[None]:
    """Answer `read` from the first read of each variable until the block ends (one model
    step: nothing changes the environment inside one). Nested blocks share the outer one's."""
    global _held
    if _held is not None:
        yield
        return
    _held = {}
    try:
        yield
    finally:
        _held = None
