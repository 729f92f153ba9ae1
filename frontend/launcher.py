"""The process tree behind `duet serve`: one engine core and N frontends, stopped together.

Each child handles SIGINT/SIGTERM itself (frontends finish or abort their requests, the
core drains), so Ctrl-C in a terminal, which signals the whole process group, and a
SIGTERM to this process alone end the same way: frontends first, then the core. A second
signal kills whatever is still running.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import signal
import tempfile
import time
from dataclasses import replace
from multiprocessing.process import BaseProcess

from engine_core.config import EngineAddresses, EngineConfig
from engine_core.curve import narrowed
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
        spawn = multiprocessing.get_context("spawn")
        core = spawn.Process(target=_run_core, args=(config, addresses), name="engine-core")
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


def _run_core(config: EngineConfig, addresses: EngineAddresses) -> None:
    # imported in the child: the supervisor itself never needs the engine's modules
    from engine_core.core_proc import run_engine_core

    run_engine_core(config, addresses)


def _run_frontend(settings: FrontendSettings, index: int) -> None:
    from frontend.server import run_frontend

    run_frontend(settings, index)


def _local_address(bound: str) -> str:
    """The address a process on this host connects to for a socket bound to `bound`."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:"):
        if bound.startswith(wildcard):
            return "tcp://127.0.0.1:" + bound[len(wildcard) :]
    return bound


class Supervisor:
    """Starts the processes, waits for a signal or a death, then stops them in order."""

    def __init__(
        self, frontends: list[BaseProcess], core: BaseProcess | None, frontend_timeout: float
    ) -> None:
        self.frontends = frontends
        self.core = core
        self.frontend_timeout = frontend_timeout + GRACE
        self.signals = 0

    def run(self) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        for process in self._all():  # the core first: frontends connect to it
            process.start()
        exit_code = self._wait_for_trouble()
        self._stop(self.frontends, self.frontend_timeout)
        if self.core is not None:
            self._stop([self.core], CORE_STOP_TIMEOUT)
        logger.info("all processes stopped")
        return exit_code

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1
        what = "stopping" if self.signals == 1 else "killing what is left"
        logger.info("%s: %s", signal.Signals(signum).name, what)

    def _all(self) -> list[BaseProcess]:
        return [p for p in [self.core, *self.frontends] if p is not None]

    def _wait_for_trouble(self) -> int:
        """0 when a signal arrives, 1 when a process exits on its own first."""
        while not self.signals:
            dead = [p for p in self._all() if not p.is_alive()]
            if dead:
                for p in dead:
                    logger.error("%s exited with code %s; stopping the server", p.name, p.exitcode)
                return 1
            multiprocessing.connection.wait([p.sentinel for p in self._all()], timeout=0.5)
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
