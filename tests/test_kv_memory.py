"""KV pools larger than the machine's memory are refused at start, in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from engine_core.memory import GIB, available_memory, kv_memory_problem
from engine_core.messages.config import EngineConfig

ROOT = Path(__file__).resolve().parent.parent


def test_every_local_pool_counts() -> None:
    colocated = EngineConfig(kv_cache_memory=3 * GIB)
    split = EngineConfig(kv_cache_memory=3 * GIB, colocated=False, prefill_workers=1,
                         decode_workers=2)  # fmt: skip
    assert kv_memory_problem(colocated, 4 * GIB) is None
    assert kv_memory_problem(split, 9 * GIB) is None
    problem = kv_memory_problem(split, 8 * GIB)
    assert problem is not None and "3 workers x 3.00 GiB" in problem and "8.00 GiB" in problem
    assert kv_memory_problem(split, None) is None  # no /proc/meminfo: nothing to check against


def test_the_machine_reports_its_memory() -> None:
    available = available_memory()
    assert available is not None and available > 64 * 2**20


def test_serve_refuses_a_pool_larger_than_the_machine() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from frontend.cli import main; main()", "serve",
         "--kv-cache-memory", "100000GiB"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--kv-cache-memory asks for 100000.00 GiB" in proc.stderr, proc.stderr[-2000:]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def test_the_colocated_pool_is_private_memory_that_reads_as_zeros() -> None:
    """Touching the pool grows the process's anonymous memory, not its shmem (whose first
    touches cost several times as much), and untouched blocks read as zeros."""
    import torch

    from models.runner import zeros_allocator

    pool = zeros_allocator((2, 64, 16, 3, 64), torch.bfloat16)  # K and V of 64 blocks: 768 KiB
    assert pool.abs().sum().item() == 0
    shmem, anon = _status_kib("RssShmem"), _status_kib("RssAnon")
    pool[0].fill_(1.0)
    assert _status_kib("RssAnon") - anon >= pool[0].numel() * 2 // 1024 - 64
    assert _status_kib("RssShmem") - shmem < 64
    assert pool[1].abs().sum().item() == 0
