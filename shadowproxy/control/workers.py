"""Serving processes: one worker, or a supervisor of N workers sharing the port.

Workers are fresh interpreters (not forks) so each imports prometheus_client with
PROMETHEUS_MULTIPROC_DIR already set: counters from all workers add up in one scrape.
Worker 0 also runs the admin listener; a reload or promotion there is passed to the
other workers through the supervisor (SIGHUP).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import structlog

from shadowproxy.base.errors import ConfigError
from shadowproxy.base.exits import EXIT_OK
from shadowproxy.config.settings import Settings
from shadowproxy.control.service import Overrides, Service

log = structlog.get_logger("shadowproxy.server")

WORKER_ENV = "SHADOWPROXY_WORKER_INDEX"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_GC_YOUNG_THRESHOLD = 20_000  # CPython default: 700


def run_worker(settings: Settings, overrides: Overrides, *, worker_index: int, multi: bool) -> int:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a declared dependency on Linux
        pass

    async def main() -> int:
        # The record's `instance`: the pod (or given) name, per worker; else hostname-pid.
        named = os.environ.get("SHADOWPROXY_INSTANCE")
        instance = (f"{named}-w{worker_index}" if multi else named) if named else ""
        service = Service(
            settings,
            overrides=overrides,
            instance=instance,
            worker_index=worker_index,
            reuse_port=multi,
            notify_siblings=multi,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: service.tasks.spawn(_sighup(service), name="sighup-reload")
        )
        await service.start(admin=worker_index == 0)
        _tune_gc()
        await stop.wait()
        log.info("stopping", signal="SIGTERM")
        await service.stop()
        return EXIT_OK

    return asyncio.run(main())


def _tune_gc() -> None:
    """Keep the cyclic garbage collector off the request path's back.

    Everything loaded at start (modules, config, pools) lives until exit: frozen, later
    collections never walk it again. Requests allocate many short-lived containers; a larger
    first-generation threshold collects them in fewer, equally cheap passes. Profiled on the
    bench: the collector was about 4% of the CPU of a proxied request.
    """
    gc.collect()
    gc.freeze()
    _, second, third = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, second, third)


async def _sighup(service: Service) -> None:
    with contextlib.suppress(ConfigError):
        await service.reload(source="SIGHUP")


def _die_with_parent(supervisor: int) -> Callable[[], None]:
    """Run in the worker before exec: SIGTERM it when the supervisor dies, even by SIGKILL,
    so no orphaned worker keeps serving an old config on the shared port."""

    def arrange() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != supervisor:  # it died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return arrange


def supervise(args: argparse.Namespace, workers: int) -> int:
    """Run N worker processes; forward SIGHUP/SIGTERM; restart a worker that dies."""
    from prometheus_client import multiprocess

    metrics_dir = tempfile.mkdtemp(prefix="shadowproxy-metrics-")
    argv = (
        [sys.executable, "-m", "shadowproxy", *sys.argv[1:]]
        if sys.argv[0].endswith("shadowproxy")
        else None
    )
    if argv is None:
        argv = [sys.executable, "-m", "shadowproxy", "serve", "--config", args.config]
        for flag, value in (
            ("--host", args.host),
            ("--port", args.port),
            ("--admin-host", args.admin_host),
            ("--admin-port", args.admin_port),
            ("--database-url", args.database_url),
        ):
            if value is not None:
                argv += [flag, str(value)]
    stopping = False
    procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(index: int) -> None:
        env = dict(os.environ, **{WORKER_ENV: str(index), "PROMETHEUS_MULTIPROC_DIR": metrics_dir})
        tie = _die_with_parent(os.getpid()) if sys.platform.startswith("linux") else None
        procs[index] = subprocess.Popen(argv, env=env, preexec_fn=tie)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for index in range(workers):
        start(index)
    log.info("supervisor_started", workers=workers, pids=[p.pid for p in procs.values()])
    exit_code = 0
    while procs:
        time.sleep(0.2)
        for index, proc in list(procs.items()):
            code = proc.poll()
            if code is None:
                continue
            multiprocess.mark_process_dead(proc.pid, metrics_dir)  # type: ignore[no-untyped-call]
            del procs[index]
            if not stopping:
                log.error("worker_died", worker=index, pid=proc.pid, code=code)
                time.sleep(1.0)
                if not stopping:  # a SIGTERM during the pause: no new worker nobody would stop
                    start(index)
            elif code != 0:
                exit_code = code
    return exit_code
