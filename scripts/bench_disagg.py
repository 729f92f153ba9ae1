"""Colocated vs disaggregated (1 prefill + 1 decode worker) under a chat load with long
prompts mixed in, then KV transfer speed per connector against a plain memcpy.

The load: `--concurrency` chat streams, each sending `--chats-per-stream` chats one after
another (~100-token prompts, 128 output tokens), while `--long` prompts of ~1,500 tokens
arrive every `--long-every` seconds. Reported per mode: TTFT (chats and long prompts),
ITL p50/p99 of the chats (where a long prefill stalls colocated decoding), and output
throughput. The engine core is driven through its frontend socket (EngineClient), so the
numbers exclude HTTP and detokenization.

    .venv/bin/python scripts/bench_disagg.py                    # everything, ~5 minutes
    .venv/bin/python scripts/bench_disagg.py --skip-serving     # transfer speeds only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import zmq

from engine_core.client import EngineClient
from engine_core.messages.config import EngineAddresses, EngineConfig
from engine_core.messages.frontend import AddRequest
from engine_core.messages.sampling_params import SamplingParams
from engine_core.messages.worker import KVRecvOrder, KVSendOrder
from kv_transfer import CONNECTORS, ShmAllocator, make_receiver, make_sender
from kv_transfer.base import scatter_blocks

# -- serving ------------------------------------------------------------------------------


@dataclass
class Trace:
    """Arrival times of one request's tokens."""

    kind: str  # "chat" | "long"
    sent: float
    tokens: list[float] = field(default_factory=list)


def _run_core(config: EngineConfig, addresses: EngineAddresses) -> None:
    from engine_core.core_proc import run_engine_core

    run_engine_core(config, addresses)


async def _request(client: EngineClient, request_id: str, prompt: list[int], max_tokens: int,
                   kind: str) -> Trace:  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    trace = Trace(kind, time.perf_counter())
    async for delta in client.add_request(AddRequest(request_id, prompt, params, time.time())):
        if delta.error:
            raise RuntimeError(delta.error)
        trace.tokens += [time.perf_counter()] * len(delta.new_token_ids)
    return trace


async def _workload(client: EngineClient, args: argparse.Namespace) -> tuple[list[Trace], float]:
    rng = np.random.default_rng(0)  # the same prompts for every mode

    def prompt(length: int) -> list[int]:
        return rng.integers(1000, 40000, length).tolist()

    chat_prompts = [
        [prompt(args.chat_len) for _ in range(args.chats_per_stream)]
        for _ in range(args.concurrency)
    ]
    long_prompts = [prompt(args.long_len) for _ in range(args.long)]

    async def stream(slot: int) -> list[Trace]:
        return [await _request(client, f"c{slot}-{i}", p, args.output_len, "chat")
                for i, p in enumerate(chat_prompts[slot])]  # fmt: skip

    async def long_prompt(index: int) -> Trace:
        await asyncio.sleep(args.long_delay + index * args.long_every)
        return await _request(
            client, f"long-{index}", long_prompts[index], args.long_output_len, "long"
        )

    start = time.perf_counter()
    results = await asyncio.gather(*(stream(s) for s in range(args.concurrency)),
                                   *(long_prompt(i) for i in range(args.long)))  # fmt: skip
    elapsed = time.perf_counter() - start
    traces = [t for r in results for t in (r if isinstance(r, list) else [r])]
    return traces, elapsed


async def _serve_and_measure(config: EngineConfig, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="duet-bench-") as folder:
        addresses = EngineAddresses.ipc(folder)
        core = mp.get_context("spawn").Process(target=_run_core, args=(config, addresses))
        core.start()
        client = EngineClient(addresses.frontend, b"bench", health_timeout=120)
        await client.start()
        try:
            while client.latest_stats is None:  # the core publishes once its workers are up
                await asyncio.sleep(0.2)
            await _request(client, "warm-up", list(range(100, 164)), 4, "chat")
            traces, elapsed = await _workload(client, args)
            stats = client.latest_stats
        finally:
            await client.close()
            os.kill(core.pid, signal.SIGTERM)
            core.join(60)
    return _summary(traces, elapsed) | {"kv_transfer_failures": stats.kv_transfer_failures}


def _summary(traces: list[Trace], elapsed: float) -> dict[str, float]:
    def pct(values: list[float], q: float) -> float:
        return float(np.percentile(values, q)) * 1000 if values else float("nan")

    chats = [t for t in traces if t.kind == "chat"]
    longs = [t for t in traces if t.kind == "long"]
    itl = [b - a for t in chats for a, b in zip(t.tokens, t.tokens[1:], strict=False)]
    return {
        "ttft_chat_p50_ms": pct([t.tokens[0] - t.sent for t in chats], 50),
        "ttft_chat_p99_ms": pct([t.tokens[0] - t.sent for t in chats], 99),
        "ttft_long_p50_ms": pct([t.tokens[0] - t.sent for t in longs], 50),
        "itl_p50_ms": pct(itl, 50),
        "itl_p99_ms": pct(itl, 99),
        "itl_max_ms": pct(itl, 100),
        "output_tok_per_s": sum(len(t.tokens) for t in traces) / elapsed,
        "duration_s": elapsed,
    }


def bench_serving(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    base = {"kv_cache_memory": args.kv_cache_memory, "max_model_len": 4096}
    modes = {"colocated": EngineConfig(colocated=True, **base)}
    for connector in args.connectors:
        modes[f"1P+1D {connector}"] = EngineConfig(colocated=False, kv_connector=connector, **base)
    results = {}
    for name, config in modes.items():
        print(f"serving: {name} ...", flush=True)
        results[name] = asyncio.run(_serve_and_measure(config, args))
    return results


# -- transfers ----------------------------------------------------------------------------

# SmolLM2-135M's pool layout [L, 2, N, block_size, Hkv, D] in fp32: 737,280 bytes a block
POOL = (30, 2, 160, 16, 3, 64)


def _scattered(count: int, offset: int) -> list[int]:
    return [1 + offset + 2 * i for i in range(count)]  # every other block: never contiguous


def _sender(kind: str, orders: list[KVSendOrder], gap: float, done: mp.Event) -> None:
    torch.set_num_threads(1)
    ctx = zmq.Context()
    shm = ShmAllocator("bench-sender") if kind == "shm" else None
    pool = shm(POOL, torch.float32) if shm else torch.zeros(POOL)
    pool.normal_()
    sender = make_sender(kind, ctx, "bench-sender", pool, shm)
    for order in orders:
        sender.send(order)
        time.sleep(gap)  # one transfer at a time, so each is timed alone
        sender.poll()
    done.wait(60)
    sender.close()
    if shm:
        shm.unlink()
    ctx.term()


def bench_transfer(kind: str, num_blocks: int, repeats: int) -> float:
    """Median GB/s of `repeats` transfers of `num_blocks` scattered blocks (first one dropped)."""
    ctx = zmq.Context()
    pool = torch.zeros(POOL)
    receiver = make_receiver(kind, ctx, pool)
    orders = [KVSendOrder(f"t{i}", _scattered(num_blocks, i % 2), "bench-receiver", receiver.address,
                          _scattered(num_blocks, (i + 1) % 2), receiver.store_address)
              for i in range(repeats + 1)]  # fmt: skip
    for order in orders:
        receiver.expect(KVRecvOrder(order.transfer_id, order.dst_block_ids))
    spawn = mp.get_context("spawn")
    done = spawn.Event()
    proc = spawn.Process(target=_sender, args=(kind, orders, 0.5, done))
    proc.start()
    landed = []
    deadline = time.monotonic() + 120
    while len(landed) < len(orders) and time.monotonic() < deadline:
        receiver.sock.poll(100)
        landed += receiver.poll()
    done.set()
    proc.join(30)
    receiver.close()
    ctx.term()
    if len(landed) < len(orders) or not all(d.ok for d in landed):
        raise RuntimeError(f"{kind}: only {len(landed)} of {len(orders)} transfers landed")
    return statistics.median(d.num_bytes / d.seconds / 1e9 for d in landed[1:])


def bench_memcpy(num_blocks: int, repeats: int) -> dict[str, float]:
    """The floor: the same bytes copied in one process, contiguous and block-scattered."""
    src = torch.randn(POOL)
    dst = torch.zeros(POOL)
    blocks = src[:, :, :num_blocks].contiguous()
    nbytes = blocks.numel() * blocks.element_size()
    flat = torch.empty_like(blocks)

    def best(fn: object) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            times.append(time.perf_counter() - start)
        return nbytes / min(times) / 1e9

    return {
        "memcpy contiguous": best(lambda: flat.copy_(blocks)),
        "memcpy into scattered blocks": best(
            lambda: scatter_blocks(dst, _scattered(num_blocks, 0), blocks)
        ),
    }


def bench_transfers(args: argparse.Namespace) -> dict[str, float]:
    # NOTE: one thread, as in a pinned worker; two OpenMP threads on a busy 2-core box
    # make strided copies collapse (10x slower), which would measure the box, not the wire
    torch.set_num_threads(1)
    results = bench_memcpy(args.transfer_blocks, args.transfer_repeats)
    for kind in args.connectors:
        print(f"transfer: {kind} ...", flush=True)
        results[kind] = bench_transfer(kind, args.transfer_blocks, args.transfer_repeats)
    return results


# -- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--concurrency", type=int, default=16)
    add("--chats-per-stream", type=int, default=2)
    add("--chat-len", type=int, default=100)
    add("--output-len", type=int, default=128)
    add("--long", type=int, default=3, help="how many long prompts arrive")
    add("--long-len", type=int, default=1500)
    add("--long-output-len", type=int, default=32)
    add("--long-delay", type=float, default=5.0, help="seconds before the first long prompt")
    add("--long-every", type=float, default=10.0)
    add("--kv-cache-memory", type=int, default=1024**3)
    add("--connectors", nargs="+", default=["shm"], choices=CONNECTORS, help="serving modes to run")
    add("--transfer-connectors", nargs="+", default=list(CONNECTORS), choices=CONNECTORS)
    add("--transfer-blocks", type=int, default=64, help="blocks per transfer (64 = 47 MB)")
    add("--transfer-repeats", type=int, default=5)
    add("--skip-serving", action="store_true")
    add("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    results: dict[str, object] = {}
    if not args.skip_serving:
        results["serving"] = serving = bench_serving(args)
        _print_table(serving)
    args.connectors = args.transfer_connectors
    results["transfer_gb_per_s"] = transfers = bench_transfers(args)
    mb = args.transfer_blocks * 737280 / 1e6
    print(f"\nKV transfer, {args.transfer_blocks} scattered blocks ({mb:.0f} MB), median GB/s:")
    for name, value in transfers.items():
        print(f"  {name:32s} {value:7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def _print_table(serving: dict[str, dict[str, float]]) -> None:
    names = list(serving)
    keys = list(serving[names[0]])
    print("\n" + " " * 22 + "".join(f"{n:>18s}" for n in names))
    for key in keys:
        print(f"{key:22s}" + "".join(f"{serving[n][key]:18.1f}" for n in names))


if __name__ == "__main__":
    main()
