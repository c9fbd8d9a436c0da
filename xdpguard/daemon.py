"""``xdpguard run``: the engine, its control socket and its lifecycle.

The lifecycle is what scripts and service managers wait on:

    starting  the control socket answers ``status`` (and only that); the data
              path is being built
    ready     every worker is polling its sockets and both XDP programs are
              attached: a frame sent now is forwarded
    stopping  a signal or a fatal error; the data path is being taken down

``status`` reports the state, and ``status`` with ``wait`` blocks until the
appliance leaves ``starting`` (``xdpguard status --wait``). Under systemd
(NOTIFY_SOCKET), READY=1 and STOPPING=1 go to it, and WATCHDOG=1 from the
housekeeping while every worker makes progress (xdpguard.sdnotify).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from xdpguard.control import ControlServer
from xdpguard.engine import Engine, EngineConfig
from xdpguard.errors import XdpguardError
from xdpguard.sdnotify import sd_notify
from xdpguard.stats import rates, summary_line

log = logging.getLogger("xdpguard")

STARTING, READY, STOPPING = "starting", "ready", "stopping"
# Longest a client may ask ``status`` to wait for readiness.
MAX_WAIT = 3600.0


class Lifecycle:
    """The appliance's state, with a way to wait for it to leave ``starting``."""

    def __init__(self) -> None:
        self._state = STARTING
        self._changed = threading.Condition()

    @property
    def state(self) -> str:
        return self._state

    def set(self, state: str) -> None:
        with self._changed:
            self._state = state
            self._changed.notify_all()

    def wait(self, timeout: float) -> str:
        """Block until the state is not ``starting``, or ``timeout`` seconds; the state."""
        with self._changed:
            self._changed.wait_for(lambda: self._state != STARTING, timeout)
            return self._state


def _wait_polling(engine: Engine, timeout: float = 10.0) -> None:
    """Until every worker has entered its loop (it polls its sockets from then on)."""
    deadline = time.monotonic() + timeout
    while not all(p.worker is not None and p.worker.stats()["loops"] for p in engine.paths):
        if engine.fatal.is_set():
            raise XdpguardError(f"{engine.fatal_reason}; shut down")
        if time.monotonic() > deadline:
            raise XdpguardError(f"the workers did not start within {timeout:.0f} s")
        time.sleep(0.005)


def run_daemon(cfg: EngineConfig, control: str, summary_interval: float) -> None:
    """The appliance in the foreground until SIGINT/SIGTERM (returns) or a fatal error."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    engine = Engine(cfg)
    life = Lifecycle()

    def gated(fn: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
        def handler(args: dict[str, Any]) -> Any:
            if life.state != READY:
                raise XdpguardError(f"xdpguard is {life.state}")
            return fn(args)

        return handler

    def status(args: dict[str, Any]) -> Any:
        wait = args.get("wait")
        if wait is not None:
            if isinstance(wait, bool) or not isinstance(wait, int | float) or not wait >= 0:
                raise XdpguardError(f"wait {wait!r}: must be a number of seconds")
            life.wait(min(float(wait), MAX_WAIT))
        state = life.state
        if state != READY:
            return {"state": state, "pid": os.getpid()}
        return {"state": state, **engine.status()}

    handlers = {name: gated(fn) for name, fn in engine.control_handlers().items()}
    handlers["status"] = status
    server = ControlServer(control, handlers)
    # The sockets first: a second instance on the same path, or a metrics
    # port taken, fails before touching any device.
    server.start()
    metrics = None
    try:
        if cfg.metrics is not None:
            from xdpguard.metrics import MetricsServer

            metrics = MetricsServer(engine, *cfg.metrics)
        engine.start()
        _wait_polling(engine)
        life.set(READY)
        if metrics is not None:
            metrics.start()
        sd_notify(f"READY=1\nSTATUS=forwarding {cfg.outer} <-> {cfg.inner}\nMAINPID={os.getpid()}")
        log.info("ready; control socket %s", control)
        prev = engine.stats(account=False)
        next_line = time.monotonic() + summary_interval
        while not stop.is_set():
            stop.wait(0.1)
            if engine.fatal.is_set():
                raise XdpguardError(f"{engine.fatal_reason}; shut down")
            if time.monotonic() >= next_line:
                cur = engine.stats(account=False)
                rate = rates(prev, cur)["directions"]
                log.info(summary_line(prev, cur), extra={"fields": {"rates": rate}})
                prev, next_line = cur, next_line + summary_interval
    finally:
        life.set(STOPPING)
        sd_notify("STOPPING=1")
        if metrics is not None:
            metrics.close()
        server.close()
        engine.stop()
    log.info("stopped")
