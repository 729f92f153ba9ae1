"""LoRA across the engine's processes: a real core and workers over real sockets.

Greedy fp32 tokens with adapters must be the offline LLM's (which test_lora.py holds to
Hugging Face) after a KV hand-off to a decode worker, and after a worker is killed and its
replacement loads the adapters again from their folders.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from engine_harness import EngineHarness, worker_pid
from lora_adapters import write_adapter
from transformers import AutoModelForCausalLM

from engine_core import LLM, LoRARequest, SamplingParams
from engine_core.messages.config import EngineConfig
from engine_core.messages.lora import LoRARef

pytestmark = pytest.mark.slow

# long enough that a worker killed after two tokens of every stream meets live streams
MAX_TOKENS = 48
SMALL = {"kv_cache_memory": 32 * 2**20, "max_num_batched_tokens": 256, "dtype": "float32",
         "enable_lora": True, "max_loras": 2}  # fmt: skip


@pytest.fixture(scope="module")
def setup(
    tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[LoRARef | None], dict[str, tuple[list[int], LoRARef | None]]]:
    """(base folder, [None, adapter a, adapter b], request id -> (prompt, adapter))."""
    folder = tiny_checkpoint(num_heads=4, num_kv_heads=2)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    root = tmp_path_factory.mktemp("adapters")
    refs = [None] + [
        LoRARef(name, str(write_adapter(hf, root / name, rank=8, seed=i)))
        for i, name in enumerate(["a", "b"])
    ]
    requests = {
        f"r{i}": ([1, *range(100 + 7 * i, 100 + 7 * i + 5 + 9 * (i % 4))], refs[i % 3])
        for i in range(12)
    }
    return folder, refs, requests


@pytest.fixture(scope="module")
def reference(setup) -> dict[str, list[int]]:
    """The offline LLM's greedy tokens, each request alone."""
    folder, _, requests = setup
    llm = LLM(str(folder), dtype="float32", enable_lora=True, kv_cache_memory="32MiB")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = {}
    for req_id, (prompt, ref) in requests.items():
        lora = None if ref is None else LoRARequest(ref.name, 1, ref.path)
        out[req_id] = llm.generate([prompt], params, lora_request=lora)[0].outputs[0].token_ids
    return out


@pytest.fixture
def harness(setup) -> Iterator[Callable[..., EngineHarness]]:
    made: list[EngineHarness] = []

    def make(**config: object) -> EngineHarness:
        made.append(EngineHarness(EngineConfig(model=str(setup[0]), **SMALL, **config)))
        return made[-1]

    yield make
    for h in made:
        h.close()


def _add_all(h: EngineHarness, requests: dict) -> None:
    for req_id, (prompt, ref) in requests.items():
        h.add(req_id, prompt, MAX_TOKENS, lora=ref)


@pytest.mark.parametrize("connector", ["shm", "tcp"])
def test_the_kv_hand_off_keeps_the_adapter(harness, setup, reference, connector: str) -> None:
    h = harness(colocated=False, kv_connector=connector)
    _add_all(h, setup[2])
    h.wait_all()
    assert h.tokens == reference
    assert h.stats.kv_transfer_bytes > 0


@pytest.mark.parametrize(("colocated", "victim"), [(True, "worker-0"), (False, "decode-0")])
def test_a_replaced_worker_loads_the_adapters_again(
    harness, setup, reference, colocated: bool, victim: str
) -> None:
    h = harness(colocated=colocated)
    _add_all(h, setup[2])
    deadline = time.monotonic() + 120
    while not all(len(t) >= 2 for t in h.tokens.values()):
        assert time.monotonic() < deadline
        h.pump(0.05)
    os.kill(worker_pid(victim, h.core.pid), signal.SIGKILL)
    assert len(h.finished) < len(reference)  # the kill hit live streams
    h.wait_all()
    assert h.tokens == reference


def test_stats_name_the_running_adapters(harness, setup) -> None:
    h = harness(colocated=True, max_num_seqs=2)
    _, refs, _ = setup
    for i in range(6):
        # long enough that stats sent twice a second see some running and some waiting
        h.add(f"s{i}", [1, 2, 3, 4], 120, lora=refs[1 + i % 2])
    stats = h.wait_stats(lambda s: bool(s.running_loras) and bool(s.waiting_loras), 120)
    assert set(stats.running_loras) | set(stats.waiting_loras) == {"a", "b"}
    assert sum(stats.running_loras.values()) <= 2
    h.wait_all()
