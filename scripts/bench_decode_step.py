#!/usr/bin/env python
"""One decode step of the default model (forward + LM head over the sampled rows), timed.

B sequences, each with a context of --context tokens already in the paged KV cache, all
decode one token; the median of --steps steps after --warmup ones is printed per batch
size. Measures the model alone: no scheduler, no sockets, no sampler. With --lora N, N
random rank-16 adapters are mixed round-robin over the batch, timed alternately with a step
of base rows only (the same model, LoRA wrapped) so the ratio comes from one run.

    .venv/bin/python scripts/bench_decode_step.py --dtype bfloat16 --batch-sizes 1 16 64
    .venv/bin/python scripts/bench_decode_step.py --batch-sizes 16 --lora 4

--compare-unfused alternates, in this one process, --rounds runs with the fused C ops
(kernels/fused.py) and runs with their torch ops (DUET_DISABLE_FUSED_OPS=1), and prints
both medians and their ratio. (A bf16 model on a CPU with AMX-BF16 applies SiLU x up inside
its gate_up kernel, models/packed.py: TileGateUpSiLU, in both.) --compare-python-layers
does the same with the layer stack (a bf16 model's layers in one native call on CPUs with
AMX-BF16, models/layer_stack.py) and the Python forward (DUET_DISABLE_LAYER_STACK=1).
The default side of --compare-unfused takes the stack where it runs: add
DUET_DISABLE_LAYER_STACK=1 to compare the fused ops alone. --against-library PATH does the
same with the layer stack's entry point from another build of the kernels (its norms, RoPE
and bf16 tiles; the int8 and prefill attention kernels stay this build's).

--prompt-len L times prompt steps instead: B prompts of L new tokens each (a step of B x L
tokens), the LM head over each prompt's last row.

    .venv/bin/python scripts/bench_decode_step.py --batch-sizes 1 8 --prompt-len 256 \
        --against-library old.so --rounds 10
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from make_lora_adapters import write_random_adapter

from engine_core.messages.config import EngineConfig
from engine_core.messages.lora import LoRARef
from kernels import fused
from kernels.metadata import AttentionMetadata, fresh_prompts
from models import layer_stack
from models.lora_files import module_shapes
from models.runner import ModelRunner


def decode_inputs(
    batch: int, context: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Sequence b owns blocks [b * nb, (b + 1) * nb); its new token sits at `context`."""
    blocks = -(-(context + 1) // block_size)
    tables = torch.arange(batch * blocks, dtype=torch.int32).view(batch, blocks)
    slots = tables[:, context // block_size].long() * block_size + context % block_size
    seq_lens = [context + 1] * batch
    meta = AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        num_decodes=batch,
        query_start_loc_cpu=list(range(batch + 1)),
        seq_lens_cpu=seq_lens,
    )
    ids = torch.randint(1000, 40000, (batch,))
    return ids, torch.full((batch,), context, dtype=torch.int64), meta


def prompt_inputs(
    batch: int, length: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """`batch` prompts of `length` new tokens from position 0 (kernels.metadata.fresh_prompts)."""
    ids = torch.randint(1000, 40000, (batch * length,))
    return ids, torch.arange(length).repeat(batch), fresh_prompts(batch, length, block_size)


def step_inputs(
    runner: ModelRunner, batch: int, args: argparse.Namespace
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A decode step of `batch` sequences, or with --prompt-len a step of `batch` prompts."""
    if args.prompt_len:
        return prompt_inputs(batch, args.prompt_len, runner.block_size)
    return decode_inputs(batch, args.context, runner.block_size)


def step_ms(
    runner: ModelRunner,
    inputs: tuple[torch.Tensor, torch.Tensor, AttentionMetadata],
    steps: int,
    warmup: int,
    adapters: Sequence[list[LoRARef] | None] = (None,),
) -> list[float]:
    """Median ms per step for each entry of `adapters` (None: base rows only; a list of
    refs: mixed round-robin over the rows), the entries timed in turn within each step."""
    ids, positions, meta = inputs
    sampled = meta.query_start_loc[1:].long() - 1  # each sequence's last row
    batch = meta.num_seqs
    times: list[list[float]] = [[] for _ in adapters]
    with torch.inference_mode():
        for i in range(warmup + steps):
            for which, refs in enumerate(adapters):
                if runner.lora is not None:
                    rows = [
                        (None if refs is None else refs[b % len(refs)], 1) for b in range(batch)
                    ]
                    runner.lora.set_batch(rows)
                start = time.perf_counter()
                hidden = runner.model(ids, positions, runner.kv_cache, meta)
                runner.model.compute_logits(hidden[sampled])
                if i >= warmup:
                    times[which].append(time.perf_counter() - start)
    return [statistics.median(t) * 1e3 for t in times]


def random_adapters(runner: ModelRunner, count: int, folder: Path) -> list[LoRARef]:
    """`count` rank-16 adapters on every target (scripts/make_lora_adapters.py's)."""
    config = runner.model_config
    refs = []
    for i in range(count):
        write_random_adapter(folder / f"a{i}", module_shapes(config), config.num_hidden_layers,
                             rank=16, seed=i)  # fmt: skip
        refs.append(LoRARef(f"a{i}", str(folder / f"a{i}")))
    return refs


def compare(
    runner: ModelRunner,
    inputs: tuple[torch.Tensor, torch.Tensor, AttentionMetadata],
    args: argparse.Namespace,
    sides: dict[str, Callable[[], None]],
) -> str:
    """Steps on each side (set up by its callable) in turn, --rounds times: the medians and
    the first side's over the second's."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, set_up in sides.items():
            set_up()
            times[name].append(step_ms(runner, inputs, args.steps, args.warmup)[0])
    (first, ours), (second, ref) = ((k, statistics.median(v)) for k, v in times.items())
    return f"{first} {ours:.1f} ms/step, {second} {ref:.1f} ms/step, ratio {ours / ref:.2f}"


def switch_sides(env: str) -> dict[str, Callable[[], None]]:
    """The default path, and the one the switch `env`=1 forces."""
    return {
        "default": lambda: os.environ.pop(env, None),
        f"{env}=1": lambda: os.environ.update({env: "1"}),
    }


def library_sides(runner: ModelRunner, path: str) -> dict[str, Callable[[], None]]:
    """The layer stack's entry point from this build, and from the library at `path`."""
    stack = runner.model.layer_stack
    if stack is None:
        raise SystemExit("--against-library needs the layer stack (bf16 on a CPU with AMX-BF16)")
    other = layer_stack.entry_point(ctypes.CDLL(path))
    return {
        "this build": lambda: setattr(stack, "entry", None),
        "other": lambda: setattr(stack, "entry", other),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--quantization", default=None, help="e.g. int8")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--lora", type=int, default=0, help="adapters mixed (vs base rows)")
    parser.add_argument("--compare-unfused", action="store_true", help="A/B: torch's small ops")
    parser.add_argument(
        "--compare-python-layers", action="store_true", help="A/B: no layer stack (bf16, AMX)"
    )
    parser.add_argument("--against-library", help="A/B: another build's layer stack")
    parser.add_argument("--prompt-len", type=int, default=0, help="prompt steps of this length")
    parser.add_argument("--rounds", type=int, default=5, help="A/B rounds (--compare-*)")
    args = parser.parse_args()
    if args.against_library and args.quantization:
        parser.error("--against-library compares bf16 steps: int8 kernels are this build's")
    torch.set_num_threads(args.threads)
    config = EngineConfig(
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        quantization=args.quantization,
        kv_cache_memory=1 << 30,
        max_model_len=2048,
        enable_lora=args.lora > 0,
        max_loras=max(args.lora, 1),
    )
    runner = ModelRunner(config)
    # written once, as a served pool is: untouched pages of the lazily mapped pool all read
    # the kernel's one zero page from cache, which made the attention look ~2 ms cheaper at
    # batch 16 (context 320) than over KV in memory
    runner.kv_cache.uniform_(-1.0, 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [None] + ([random_adapters(runner, args.lora, Path(tmp))] if args.lora else [])
        sides = None
        if args.compare_unfused or args.compare_python_layers:
            sides = switch_sides(
                fused.DISABLE_ENV if args.compare_unfused else layer_stack.DISABLE_ENV
            )
        elif args.against_library:
            sides = library_sides(runner, args.against_library)
        for batch in args.batch_sizes:
            step = f"prompts of {args.prompt_len}" if args.prompt_len else f"context {args.context}"
            head = f"dtype {runner.dtype} quantization {args.quantization} batch {batch} {step}"
            inputs = step_inputs(runner, batch, args)
            if sides:
                print(f"{head}: {compare(runner, inputs, args, sides)}", flush=True)
                continue
            ms = step_ms(runner, inputs, args.steps, args.warmup, adapters)
            if args.lora:
                print(f"{head}: base {ms[0]:.1f} ms/step, {args.lora} adapters mixed "
                      f"{ms[1]:.1f} ms/step ({ms[1] / ms[0]:.2f}x)", flush=True)  # fmt: skip
            else:
                print(f"{head}: {ms[0]:.1f} ms/step", flush=True)


if __name__ == "__main__":
    main()
