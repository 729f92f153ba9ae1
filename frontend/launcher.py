"""The process tree behind `duet serve`: one engine core and N frontends, stopped together.

Each child handles SIGINT/SIGTERM itself (frontends finish or abort their requests, the
core drains), so Ctrl-C in a terminal, which signals the whole process group, and a
SIGTERM to this process alone end the same way: frontends first, then the core. A second
signal kills whatever is still running.

A core or frontend that dies after it has served is restarted (at once, then with growing
delays if it keeps crashing). While the core is down, frontends stay up, fail the requests
in flight and reconnect; while one frontend is down, the others keep the port (SO_REUSEPORT)
and its streams are the only ones cut. A child that dies before it ever served (a bad
flag, a missing model) stops the server. Every child gets SIGTERM when this process dies,
so none outlives it.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.synchronize
import signal
import tempfile
import time
from collections.abc import Callable
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
        core = RestartingProcess("engine-core", _run_core, (config, addresses))
        bound = narrowed(addresses.frontend, secured=settings.curve_keys is not None)
        local = replace(settings, engine_address=_local_address(bound))
        return Supervisor(_frontends(local, count), core, settings.shutdown_timeout).run()


def serve_frontends(settings: FrontendSettings, count: int) -> int:
    """Run `count` frontends against an engine core that runs elsewhere."""
    setup_multiproc_dir()
    return Supervisor(_frontends(settings, count), None, settings.shutdown_timeout).run()


def _frontends(settings: FrontendSettings, count: int) -> list[RestartingProcess]:
    return [RestartingProcess(f"frontend-{i}", _run_frontend, (settings, i)) for i in range(count)]


def _run_core(
    config: EngineConfig, addresses: EngineAddresses, serving: multiprocessing.synchronize.Event
) -> None:
    die_with_parent(multiprocessing_parent())
    # imported in the child: the supervisor itself never needs the engine's modules
    from engine_core.core_proc import run_engine_core

    run_engine_core(config, addresses, on_serving=serving.set)


def _run_frontend(
    settings: FrontendSettings, index: int, serving: multiprocessing.synchronize.Event
) -> None:
    die_with_parent(multiprocessing_parent())
    from frontend.server import run_frontend

    run_frontend(settings, index, on_serving=serving.set)


def _local_address(bound: str) -> str:
    """The address a process on this host connects to for a socket bound to `bound`."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:"):
        if bound.startswith(wildcard):
            return "tcp://127.0.0.1:" + bound[len(wildcard) :]
    return bound


class RestartingProcess:
    """A child process started again (after a backoff delay) when it dies.

    `target(*args, serving)` must set the `serving` event once it is up: a process that
    dies before any of its incarnations got that far (a bad flag, a missing model) is not
    restarted but stops the server.
    """

    def __init__(self, name: str, target: Callable[..., None], args: tuple) -> None:
        self.name, self.target, self.args = name, target, args
        self.backoff = Backoff()
        self.has_served = False  # some incarnation reached its serving state
        self.restart_at: float | None = None  # monotonic time of a pending restart
        self.process: BaseProcess | None = None
        self._serving: multiprocessing.synchronize.Event | None = None
        self._started_at = 0.0

    def start(self) -> None:
        spawn = multiprocessing.get_context("spawn")
        self._serving = spawn.Event()
        self.process = spawn.Process(
            target=self.target, args=(*self.args, self._serving), name=self.name
        )
        self.process.start()
        self._started_at = time.monotonic()
        self.restart_at = None

    def is_alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def tend(self) -> bool:
        """Start a new process when one is due; False if it died without ever serving."""
        if self.process is not None and self.restart_at is None and not self.is_alive():
            assert self._serving is not None
            self.has_served |= self._serving.is_set()
            code = self.process.exitcode
            if not self.has_served:
                logger.error("%s exited with code %s; stopping the server", self.name, code)
                return False
            delay = self.backoff.next_delay(time.monotonic() - self._started_at)
            logger.error("%s exited with code %s; restarting it in %.0f s", self.name, code, delay)
            self.restart_at = time.monotonic() + delay
        if self.restart_at is not None and time.monotonic() >= self.restart_at:
            self.start()
        return True


class Supervisor:
    """Starts the processes, restarts crashed ones, stops them all in order at a signal."""

    def __init__(
        self,
        frontends: list[RestartingProcess],
        core: RestartingProcess | None,
        frontend_timeout: float,
    ) -> None:
        self.frontends = frontends
        self.core = core
        self.frontend_timeout = frontend_timeout + GRACE
        self.signals = 0

    def run(self) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        for child in self._children():  # the core first: frontends connect to it
            child.start()
        exit_code = self._wait_for_trouble()
        self._stop(_processes(self.frontends), self.frontend_timeout)
        if self.core is not None:
            self._stop(_processes([self.core]), CORE_STOP_TIMEOUT)
        logger.info("all processes stopped")
        return exit_code

    def _children(self) -> list[RestartingProcess]:
        return [c for c in [self.core, *self.frontends] if c is not None]

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1
        what = "stopping" if self.signals == 1 else "killing what is left"
        logger.info("%s: %s", signal.Signals(signum).name, what)

    def _wait_for_trouble(self) -> int:
        """0 when a signal arrives, 1 when a child that never served exits."""
        while not self.signals:
            if not all(child.tend() for child in self._children()):
                return 1
            running = [c.process for c in self._children() if c.is_alive()]
            # NOTE: a dead child's sentinel stays ready: waiting on it would spin
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


def _processes(children: list[RestartingProcess]) -> list[BaseProcess]:
    return [c.process for c in children if c.process is not None]
