"""Workers that join a running core by hand (`duet decode-worker --engine tcp://...`), and the
heartbeat that tells the core when one of them is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from engine_harness import EngineHarness

from engine_core.messages.config import EngineConfig
from engine_core.worker_link import HEARTBEAT_TIMEOUT

ENGINE = "tcp://127.0.0.1:5581"


def join(worker_id: str, log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "decode_workers", "--engine", ENGINE, "--worker-id", worker_id]
    return subprocess.Popen(
        argv, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent
    )


def test_remote_decode_worker_joins_and_its_death_is_survived(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    config = EngineConfig(model=str(tiny_checkpoint()), colocated=False, prefill_workers=1, decode_workers=0,
                          kv_connector="tcp", worker_address=ENGINE, kv_cache_memory=64 * 2**20,
                          max_model_len=512)  # fmt: skip
    harness = EngineHarness(config)
    first = join("decode-far", tmp_path / "far.log")
    second: subprocess.Popen | None = None
    try:
        harness.wait_stats(lambda s: "decode-far" in s.kv_cache_usage, timeout=120)
        for i in range(8):
            harness.add(f"r{i}", [1, 2, 3, *range(200 + i, 260 + i)], 200)
        while sum(len(t) for t in harness.tokens.values()) < 8 * 5:
            harness.pump(0.05)
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        harness.wait_stats(lambda s: "decode-far" not in s.kv_cache_usage, timeout=10)
        noticed = time.monotonic() - killed_at
        second = join("decode-near", tmp_path / "near.log")
        harness.wait_all()
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
        harness.close()
    assert noticed < HEARTBEAT_TIMEOUT + 1.5, noticed
    assert harness.finished == {f"r{i}": "length" for i in range(8)}
    assert all(len(t) == 200 for t in harness.tokens.values())
    stats = harness.stats
    assert stats.recomputed_prefills > 0
    assert stats.worker_requests.get("decode-near", 0) > 0
