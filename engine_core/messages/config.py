"""Everything `duet serve` configures, in one place, with vLLM's flag names."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import msgspec

from engine_core.messages.speculative import SpeculativeConfig, parse_speculative_config

QUANTIZATIONS = ("int8",)  # --quantization values (models/quant_int8.py)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'2GiB' / '512MiB' / '1.5G' / '1000000' -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (try 2GiB or 512MiB)")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** ("KMGT".index(unit) + 1)) if unit else int(number)


def env_seconds(name: str, default: float) -> float:
    """A timeout from the environment (`name`, in seconds), for tests and odd deployments."""
    value = os.environ.get(name)
    return float(value) if value else default


class EngineConfig(msgspec.Struct, kw_only=True):
    """Engine-side settings; the frontend CLI fills it, the core hands it to workers."""

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    served_model_name: str | None = None
    dtype: str = "auto"  # "auto": bfloat16 where the CPU computes it natively, else float32
    kv_cache_dtype: str = "auto"  # "auto": the model's dtype
    quantization: str | None = None  # "int8": int8 weights quantized at load (models/quant_int8)
    max_model_len: int | None = None  # None: the model's max positions
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory: int = 2 * 1024**3  # bytes per worker pool
    scheduling_policy: str = "fcfs"  # "fcfs" | "priority"
    colocated: bool = True
    prefill_workers: int = 1
    decode_workers: int = 1
    kv_connector: str = "shm"  # "shm" | "torch" | "tcp"
    kv_transfer_timeout: float = 10.0  # seconds; then the decode worker recomputes the prompt
    # bind the core's worker socket here (e.g. tcp://0.0.0.0:5571) so that workers on other
    # hosts can join with `duet prefill-worker/decode-worker --engine`; None: private ipc
    worker_address: str | None = None
    torch_threads: int | None = None  # per worker; None: split the machine's cores
    max_waiting_requests: int | None = None
    # multi-LoRA, with vLLM's flags: adapters per step, their largest rank, adapters a
    # worker keeps loaded (None: max_loras)
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # vLLM's --speculative-config; a dict or JSON text is parsed (and checked) on creation
    speculative_config: SpeculativeConfig | None = None
    # vLLM's --async-scheduling: plan the next step while a worker runs this one
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        self.speculative_config = parse_speculative_config(self.speculative_config)


@dataclass(frozen=True)
class EngineAddresses:
    """ZeroMQ endpoints the core binds; frontends and workers connect to them."""

    frontend: str  # ROUTER: frontends' DEALERs
    workers: str  # ROUTER: workers' DEALERs
    curve_keys: str | None = None  # a `duet keys` directory: CURVE on the tcp ones

    @classmethod
    def ipc(cls, directory: str) -> EngineAddresses:
        return cls(
            frontend=f"ipc://{directory}/frontend.sock", workers=f"ipc://{directory}/workers.sock"
        )
