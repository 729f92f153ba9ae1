#!/usr/bin/env python3
"""Engine overhead: time per decode step spent outside the worker's forward + sample.

Runs the colocated core's real pieces (FrontendIO, WorkerLink, scheduler, BusyLoop) in
this process against one spawned worker, times each phase of every step with
perf_counter, and has the worker time `ModelRunner.execute`. For steady-state decode
steps at each batch size it prints, per step (median, ms):

    schedule    Scheduler.schedule()
    ipc         the core's wait for the result (its worker polls) minus the worker's
                execute: msgspec encode/decode of plan and result, both socket hops,
                the worker loop itself
    update      Scheduler.update_from_output()
    publish     stats + encoding + hand-off of one StepOutputs to the frontend I/O thread
    other       the rest of the loop iteration (inbox drain, stats check, step glue)

    .venv/bin/python scripts/bench_engine_overhead.py --batch-sizes 1 16 64 --steps 40

Run it on a quiet machine (`uptime`): another busy process skews every number.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# run from a checkout without installing: make the repository root importable
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq

from engine_core.core_proc import BusyLoop, scheduler_factory
from engine_core.frontend_io import FrontendIO
from engine_core.messages.config import EngineAddresses, EngineConfig
from engine_core.messages.framing import encode
from engine_core.messages.frontend import AddRequest, FrontendMsg
from engine_core.messages.sampling_params import SamplingParams
from engine_core.pool import PoolEngine
from engine_core.worker_link import WorkerLink

PHASES = ("schedule", "ipc", "update", "publish", "other")
WARMUP_STEPS = 5  # decode steps dropped per batch size (allocator and cache warm-up)


def timed_worker(config: EngineConfig, address: str, out_path: str) -> None:
    """The mixed worker, with `ModelRunner.execute` timed; the times land in `out_path`."""
    from decode_workers.worker import run_worker
    from models.runner import ModelRunner

    times: list[float] = []
    execute = ModelRunner.execute

    def timed_execute(self: ModelRunner, plan: Any) -> Any:
        start = time.perf_counter()
        result = execute(self, plan)
        times.append(time.perf_counter() - start)
        return result

    ModelRunner.execute = timed_execute  # type: ignore[method-assign]
    try:
        run_worker(config, address, "worker-0", "mixed")
    finally:
        Path(out_path).write_text(json.dumps(times))


class StepTimer:
    """Wraps the loop's phases; one record per executed plan, in execution order (a plan's
    loop turns add up until its result is applied; "execute" is the time polling for it)."""

    def __init__(self, loop: BusyLoop) -> None:
        self.records: list[dict[str, float]] = []
        self._current: dict[str, float] = {}
        self._last_end = time.perf_counter()
        engine = loop.engine
        assert isinstance(engine, PoolEngine)
        scheduler = engine.workers["worker-0"].scheduler
        scheduler.schedule = self._wrap(scheduler.schedule, "schedule", self._note_plan)
        scheduler.update_from_output = self._wrap(scheduler.update_from_output, "update")
        engine.link.poll = self._wrap(engine.link.poll, "execute")
        loop._publish = self._wrap(loop._publish, "publish")
        loop._step = self._wrap(loop._step, "step", after=self._close_step)

    def _wrap(
        self,
        fn: Callable[..., Any],
        name: str,
        note: Callable[[Any], None] | None = None,
        after: Callable[[], None] | None = None,
    ) -> Callable[..., Any]:
        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            result = fn(*args)
            self._current[name] = self._current.get(name, 0.0) + time.perf_counter() - start
            if note is not None:
                note(result)
            if after is not None:
                after()
            return result

        return timed

    def _note_plan(self, sched_out: Any) -> None:
        if not sched_out.num_scheduled_tokens:
            return  # not sent: the plan whose result comes next is the one noted before
        scheduled = sched_out.plan.num_scheduled_tokens
        self._current["batch"] = len(scheduled)
        self._current["decode_only"] = float(sum(scheduled.values()) == len(scheduled))

    def _close_step(self) -> None:
        # NOTE: wall time from the previous step's end, so the inbox drain, the stats check
        # and the loop itself count too
        if "update" not in self._current:
            return  # the plan's result has not come back yet
        now = time.perf_counter()
        self._current["total"] = now - self._last_end
        self._last_end = now
        self.records.append(self._current)
        self._current = {}


def submit(sock: zmq.Socket, batch: int, max_tokens: int, tag: str) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(batch):
        prompt = [1, *range(100 + i, 116 + i)]  # 17 distinct tokens: no shared blocks
        request = AddRequest(f"{tag}-{i}", prompt, params, time.time())
        sock.send_multipart(encode(FrontendMsg.ADD, request))


def wait_idle(loop: BusyLoop, timeout: float = 600.0) -> None:
    """Wait for requests to show up in the engine, then for all of them to finish."""
    deadline = time.monotonic() + timeout
    while not loop.owners:
        time.sleep(0.01)
    while loop.owners or loop.engine.has_unfinished_requests():
        if time.monotonic() > deadline:
            raise TimeoutError("requests did not finish")
        time.sleep(0.05)


def summarize(records: list[dict[str, float]], worker: list[float], batch: int) -> dict[str, float]:
    rows = [
        (r, w)
        for r, w in zip(records, worker, strict=True)
        if r["batch"] == batch and r["decode_only"]
    ][WARMUP_STEPS:]
    if not rows:
        raise RuntimeError(f"no decode steps at batch {batch}")

    def median(values: list[float]) -> float:
        return statistics.median(values) * 1e3

    out = {
        "steps": len(rows),
        "step": median([r["total"] for r, _ in rows]),
        "worker": median([w for _, w in rows]),
        "schedule": median([r["schedule"] for r, _ in rows]),
        "ipc": median([r["execute"] - w for r, w in rows]),
        "update": median([r["update"] for r, _ in rows]),
        "publish": median([r["publish"] for r, _ in rows]),
    }
    overhead = [r["total"] - w for r, w in rows]
    out["overhead"] = median(overhead)
    out["other"] = out["overhead"] - sum(out[p] for p in PHASES[:-1])
    out["share"] = 100 * out["overhead"] / out["step"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=40, help="decode steps per batch size")
    parser.add_argument("--torch-threads", type=int, default=None)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f}; numbers will be noisy", file=sys.stderr)

    config = EngineConfig(
        max_model_len=512, kv_cache_memory=256 * 2**20, torch_threads=args.torch_threads
    )
    with tempfile.TemporaryDirectory(prefix="duet-bench-") as tmp:
        addresses = EngineAddresses.ipc(tmp)
        ctx = zmq.Context()
        frontends = FrontendIO(ctx, addresses.frontend)
        link = WorkerLink(ctx, addresses.workers)
        times_path = f"{tmp}/worker_times.json"
        worker = mp.get_context("spawn").Process(
            target=timed_worker, args=(config, addresses.workers, times_path)
        )
        worker.start()
        link.wait_ready(["worker-0"])
        ready = link.ready["worker-0"]
        make = scheduler_factory(config)
        engine = PoolEngine(
            link, lambda r: make(r.num_blocks, r.max_model_len), respawn=None, colocated=True
        )
        engine.add_worker(ready)
        loop = BusyLoop(engine, frontends)
        timer = StepTimer(loop)
        runner = threading.Thread(target=loop.run, name="busy-loop")
        runner.start()

        client = ctx.socket(zmq.DEALER)
        client.setsockopt(zmq.RCVHWM, 0)
        client.connect(addresses.frontend)
        for batch in args.batch_sizes:
            submit(client, batch, WARMUP_STEPS + args.steps + 1, f"b{batch}")
            wait_idle(loop)
        loop.draining_since = time.monotonic()  # what SIGTERM does: stop once idle
        runner.join()
        link.shutdown()
        worker.join()
        worker_times = json.loads(Path(times_path).read_text())
        client.close(linger=0)
        frontends.close()
        ctx.term()

    print(f"load average at start {load:.2f}; torch threads {args.torch_threads or 'default'}")
    header = ["batch", "steps", "step", "worker", *PHASES, "overhead", "share"]
    print(" ".join(f"{h:>9}" for h in header) + "   (ms per decode step, medians; share in %)")
    for batch in args.batch_sizes:
        row = summarize(timer.records, worker_times, batch)
        cells = [batch, row["steps"], *(row[h] for h in header[2:])]
        print(" ".join(f"{c:>9.3f}" if isinstance(c, float) else f"{c:>9}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
