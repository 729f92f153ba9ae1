"""The process tree behind `duet serve`: one engine core and N frontends, stopped together.

Each child handles SIGINT/SIGTERM itself (frontends finish or abort their requests, the
core drains), so Ctrl-C in a terminal, which signals the whole process group, and a
SIGTERM to this process alone end the same way: frontends first, then the core. A second
signal kills whatever is still running.

A core that dies after it has served is restarted (at once, then with growing delays if
it keeps crashing); frontends stay up, fail the requests in flight and reconnect. A core
that dies before it ever served, or a frontend that dies, stops the server. Every child
gets SIGTERM when this process dies, so none outlives it.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.synchronize
import signal
import tempfile
import time
from dataclasses import replace
from multiprocessing.process import BaseProcess

from engine_core.messages.config import EngineAddresses, EngineConfig
from engine_core.messages.curve import narrowed
from engine_core.supervision import Backoff, die_with_parent, multiprocessing_parent
from frontend.metrics import setup_multiproc_dir
from frontend.settings import FrontendSettings

logger = logging.getLogger(__name__)

CORE_STOP_TIMEOUT = 40.0  # the core drains requests for up to 30 s after SIGTERM
GRACE = 5.0  # beyond a frontend's own shutdown timeout


def serve(
    config: EngineConfig, settings: FrontendSettings, count: int, engine_address: str | None
) -> int:
    """Run the engine core and `count` frontends until a signal; return the exit code.

    `engine_address` (e.g. tcp://0.0.0.0:5570) lets frontends on other hosts join with
    `duet frontend --engine`; by default the core listens on a private ipc socket.
    """
    setup_multiproc_dir()
    with tempfile.TemporaryDirectory(prefix="duet-") as ipc_dir:
        addresses = EngineAddresses(
            frontend=engine_address or f"ipc://{ipc_dir}/frontend.sock",
            workers=f"ipc://{ipc_dir}/workers.sock",
            curve_keys=settings.curve_keys,
        )
        core = RestartingCore(config, addresses)
        bound = narrowed(addresses.frontend, secured=settings.curve_keys is not None)
        local = replace(settings, engine_address=_local_address(bound))
        return Supervisor(_frontends(local, count), core, settings.shutdown_timeout).run()


def serve_frontends(settings: FrontendSettings, count: int) -> int:
    """Run `count` frontends against an engine core that runs elsewhere."""
    setup_multiproc_dir()
    return Supervisor(_frontends(settings, count), None, settings.shutdown_timeout).run()


def _frontends(settings: FrontendSettings, count: int) -> list[BaseProcess]:
    spawn = multiprocessing.get_context("spawn")
    return [
        spawn.Process(target=_run_frontend, args=(settings, i), name=f"frontend-{i}")
        for i in range(count)
    ]


def _run_core(
    config: EngineConfig, addresses: EngineAddresses, serving: multiprocessing.synchronize.Event
) -> None:
    die_with_parent(multiprocessing_parent())
    # imported in the child: the supervisor itself never needs the engine's modules
    from engine_core.core_proc import run_engine_core

    run_engine_core(config, addresses, on_serving=serving.set)


def _run_frontend(settings: FrontendSettings, index: int) -> None:
    die_with_parent(multiprocessing_parent())
    from frontend.server import run_frontend

    run_frontend(settings, index)


def _local_address(bound: str) -> str:
    """The address a process on this host connects to for a socket bound to `bound`."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:"):
        if bound.startswith(wildcard):
            return "tcp://127.0.0.1:" + bound[len(wildcard) :]
    return bound


class RestartingCore:
    """The engine core's process, started again (after a backoff delay) when it dies."""

    def __init__(self, config: EngineConfig, addresses: EngineAddresses) -> None:
        self.config, self.addresses = config, addresses
        self.backoff = Backoff()
        self.has_served = False  # some core of ours reached its busy loop
        self.restart_at: float | None = None  # monotonic time of a pending restart
        self.process: BaseProcess | None = None
        self._serving: multiprocessing.synchronize.Event | None = None
        self._started_at = 0.0

    def start(self) -> None:
        spawn = multiprocessing.get_context("spawn")
        self._serving = spawn.Event()
        self.process = spawn.Process(
            target=_run_core,
            args=(self.config, self.addresses, self._serving),
            name="engine-core",
        )
        self.process.start()
        self._started_at = time.monotonic()
        self.restart_at = None

    def is_alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def tend(self) -> bool:
        """Start a new core when one is due; False if the core died without ever serving."""
        if self.process is not None and self.restart_at is None and not self.is_alive():
            assert self._serving is not None
            self.has_served |= self._serving.is_set()
            code = self.process.exitcode
            if not self.has_served:
                logger.error("engine-core exited with code %s; stopping the server", code)
                return False
            delay = self.backoff.next_delay(time.monotonic() - self._started_at)
            logger.error("engine-core exited with code %s; restarting it in %.0f s", code, delay)
            self.restart_at = time.monotonic() + delay
        if self.restart_at is not None and time.monotonic() >= self.restart_at:
            self.start()
        return True


class Supervisor:
    """Starts the processes, restarts a crashed core, stops them all in order at a signal."""

    def __init__(
        self, frontends: list[BaseProcess], core: RestartingCore | None, frontend_timeout: float
    ) -> None:
        self.frontends = frontends
        self.core = core
        self.frontend_timeout = frontend_timeout + GRACE
        self.signals = 0

    def run(self) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        if self.core is not None:
            self.core.start()  # first: frontends connect to it
        for process in self.frontends:
            process.start()
        exit_code = self._wait_for_trouble()
        self._stop(self.frontends, self.frontend_timeout)
        if self.core is not None and self.core.process is not None:
            self._stop([self.core.process], CORE_STOP_TIMEOUT)
        logger.info("all processes stopped")
        return exit_code

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1
        what = "stopping" if self.signals == 1 else "killing what is left"
        logger.info("%s: %s", signal.Signals(signum).name, what)

    def _wait_for_trouble(self) -> int:
        """0 when a signal arrives, 1 when a frontend, or a core that never served, exits."""
        while not self.signals:
            dead = [p for p in self.frontends if not p.is_alive()]
            for p in dead:
                logger.error("%s exited with code %s; stopping the server", p.name, p.exitcode)
            if dead or (self.core is not None and not self.core.tend()):
                return 1
            running = [p for p in self.frontends if p.is_alive()]
            if self.core is not None and self.core.process is not None:
                running += [self.core.process] if self.core.is_alive() else []
            # NOTE: a dead core's sentinel stays ready: waiting on it would spin
            multiprocessing.connection.wait([p.sentinel for p in running], timeout=0.5)
        return 0

    def _stop(self, processes: list[BaseProcess], timeout: float) -> None:
        for p in processes:
            if p.is_alive():
                p.terminate()  # SIGTERM: the child's own graceful path
        deadline = time.monotonic() + timeout
        while (
            any(p.is_alive() for p in processes)
            and time.monotonic() < deadline
            and self.signals < 2
        ):
            multiprocessing.connection.wait([p.sentinel for p in processes], timeout=0.5)
        for p in processes:
            if p.is_alive():
                logger.warning("%s did not stop in time: killing it", p.name)
                p.kill()
            p.join()
