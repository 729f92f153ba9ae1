"""A real engine core process driven through its frontend socket, for end-to-end tests."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import msgspec
import zmq

from engine_core.messages.common import TokenLogprobs
from engine_core.messages.config import EngineAddresses, EngineConfig
from engine_core.messages.framing import encode
from engine_core.messages.frontend import (
    TO_FRONTEND,
    AbortRequests,
    AddRequest,
    EngineSnapshot,
    FrontendMsg,
    SchedulerStats,
)
from engine_core.messages.lora import LoRARef
from engine_core.messages.sampling_params import SamplingParams


def _run_core(config: EngineConfig, addresses: EngineAddresses) -> None:
    from engine_core.core_proc import run_engine_core

    run_engine_core(config, addresses)


class NetnsCore:
    """The engine core as a child process inside network namespace `netns`."""

    def __init__(self, netns: str, config: EngineConfig, addresses: EngineAddresses) -> None:
        code = ("import sys, msgspec; from engine_core.messages.config import *; from engine_core.core_proc import *; "
                "run_engine_core(msgspec.json.decode(sys.argv[1], type=EngineConfig), "
                "EngineAddresses(sys.argv[2], sys.argv[3], sys.argv[4] or None))")  # fmt: skip
        argv = ["ip", "netns", "exec", netns, sys.executable, "-c", code,
                msgspec.json.encode(config).decode(), addresses.frontend, addresses.workers,
                addresses.curve_keys or ""]  # fmt: skip
        self.popen = subprocess.Popen(argv, cwd=Path(__file__).parent.parent)
        self.pid = self.popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)

    def kill(self) -> None:
        self.popen.kill()


class EngineHarness:
    """Starts `run_engine_core(config)` (in `netns` if given) and talks to it as one frontend would.

    `curve_keys` (a `duet keys` directory) secure the core's tcp sockets, e.g. a worker address.
    """

    def __init__(
        self, config: EngineConfig, netns: str | None = None, curve_keys: str | None = None
    ) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="duet-test-")
        addresses = replace(EngineAddresses.ipc(self._dir.name), curve_keys=curve_keys)
        if netns is None:
            self.core: mp.Process | NetnsCore = mp.get_context("spawn").Process(
                target=_run_core, args=(config, addresses)
            )
            self.core.start()
        else:
            # NOTE: ipc:// is a socket file, reachable from any network namespace
            self.core = NetnsCore(netns, config, addresses)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(addresses.frontend)
        self.sock.send_multipart(encode(FrontendMsg.HELLO))
        self.tokens: dict[str, list[int]] = {}
        self.finished: dict[str, str] = {}  # request id -> finish reason (or error)
        self.stats = SchedulerStats()
        self.snapshot: EngineSnapshot | None = None  # the core's latest, twice a second
        self.prompt_logprobs: dict[str, list[TokenLogprobs]] = {}

    def add(
        self,
        request_id: str,
        prompt: list[int],
        max_tokens: int,
        lora: LoRARef | None = None,
        prompt_logprobs: int | None = None,
    ) -> None:
        params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=prompt_logprobs
        )
        self.tokens[request_id] = []
        request = AddRequest(request_id, prompt, params, time.time(), lora=lora)
        self.sock.send_multipart(encode(FrontendMsg.ADD, request))

    def abort(self, request_ids: list[str]) -> None:
        self.sock.send_multipart(encode(FrontendMsg.ABORT, AbortRequests(request_ids)))

    def pump(self, timeout: float = 0.1) -> None:
        """Take in everything the core sends within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                return
            decoded = TO_FRONTEND.decode(self.sock.recv_multipart())
            if decoded is None:
                continue
            kind, message = decoded
            if kind == FrontendMsg.STATS:
                self.snapshot = message
                continue
            self.stats = message.stats or self.stats
            for delta in message.outputs:
                self.tokens.setdefault(delta.request_id, []).extend(delta.new_token_ids)
                if delta.prompt_logprobs is not None:
                    self.prompt_logprobs[delta.request_id] = delta.prompt_logprobs
                if delta.finish_reason is not None or delta.error:
                    self.finished[delta.request_id] = delta.error or delta.finish_reason.api_name

    def wait_all(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while set(self.tokens) - set(self.finished):
            if time.monotonic() > deadline or not self.core.is_alive():
                raise TimeoutError(
                    f"unfinished: {sorted(set(self.tokens) - set(self.finished))[:5]}"
                )
            self.pump(0.2)

    def wait_stats(
        self, predicate: Callable[[SchedulerStats], bool], timeout: float = 30.0
    ) -> SchedulerStats:
        deadline = time.monotonic() + timeout
        while not predicate(self.stats):
            if time.monotonic() > deadline:
                raise TimeoutError(f"stats never matched: {self.stats}")
            self.pump(0.2)
        return self.stats

    def generate(self, prompts: dict[str, list[int]], max_tokens: int) -> dict[str, list[int]]:
        for request_id, prompt in prompts.items():
            self.add(request_id, prompt, max_tokens)
        self.wait_all()
        return {r: self.tokens[r] for r in prompts}

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()
        if self.core.is_alive():
            os.kill(self.core.pid, signal.SIGTERM)
        self.core.join(60)
        if self.core.is_alive():
            self.core.kill()
        self._dir.cleanup()


def worker_pid(name: str, parent: int) -> int:
    """The pid of `parent`'s child process named `name` (workers name themselves by id)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if fields.get("Name", "").strip() == name[:15] and int(fields.get("PPid", "0")) == parent:
            return int(status.parent.name)
    raise LookupError(f"no process named {name} under {parent}")
