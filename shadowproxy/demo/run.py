"""``shadowproxy demo``: both iris models, the proxy on SQLite, a little traffic, then what to type.

The models run in this process on free loopback ports; the proxy is a child
``shadowproxy serve`` in its own session (so Ctrl-C reaches only us and we stop it
with SIGTERM, letting it flush its records). Everything lands in one working
directory: ``routes.yaml``, ``shadowproxy-demo.db``, ``spool/`` and ``proxy.log``.

Environment: ``SHADOWPROXY_DEMO_DIR`` (default ``./shadowproxy-demo``),
``SHADOWPROXY_DEMO_REQUESTS`` (default 300), ``SHADOWPROXY_DEMO_EXIT_AFTER_TRAFFIC=1``
to stop once the traffic is recorded instead of serving until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp
from aiohttp import web

from shadowproxy.base.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from shadowproxy.demo.instructions import cli_name, print_instructions, print_summary
from shadowproxy.demo.models import MODEL_KEY, build_model_app, sample_instances
from shadowproxy.demo.records import Summary, max_record_id, read_summary
from shadowproxy.demo.routes import DemoRoutes, write_routes

ENV_DIR = "SHADOWPROXY_DEMO_DIR"
ENV_REQUESTS = "SHADOWPROXY_DEMO_REQUESTS"
ENV_EXIT_AFTER_TRAFFIC = "SHADOWPROXY_DEMO_EXIT_AFTER_TRAFFIC"
TOKEN_ENV = "SHADOWPROXY_ADMIN_TOKEN"
LOOPBACK = "127.0.0.1"
ADMIN_PORT_OFFSET = 1821  # 8080 -> 9901, the documented admin port
READY_TIMEOUT_S = 60.0
RECORDS_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 40.0
CONCURRENCY = 8


class DemoError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class DemoOptions:
    port: int
    directory: Path
    requests: int
    exit_after_traffic: bool

    @classmethod
    def from_env(cls, port: int) -> DemoOptions:
        raw = os.environ.get(ENV_REQUESTS, "300")
        try:
            requests = int(raw)
        except ValueError:
            raise DemoError(
                f"{ENV_REQUESTS}: expected a whole number, got {raw!r}", EXIT_USAGE
            ) from None
        if requests < 0:
            raise DemoError(f"{ENV_REQUESTS}: expected 0 or more, got {requests}", EXIT_USAGE)
        return cls(
            port=port,
            directory=Path(os.environ.get(ENV_DIR) or "shadowproxy-demo").resolve(),
            requests=requests,
            exit_after_traffic=os.environ.get(ENV_EXIT_AFTER_TRAFFIC, "") not in ("", "0", "false"),
        )


def demo_command(port: int) -> int:
    try:
        options = DemoOptions.from_env(port)
        return asyncio.run(_main(options))
    except DemoError as exc:
        print(f"shadowproxy demo: {exc}", file=sys.stderr)
        return exc.exit_code


async def _main(options: DemoOptions) -> int:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    stopping = False

    def on_signal() -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    demo = Demo(options)
    code = EXIT_OK
    try:
        code = await demo.run()
    except asyncio.CancelledError:
        if not stopping:
            raise
        print("\nstopping the demo (the proxy flushes its records first) ...", flush=True)
    finally:
        stopped_cleanly = await demo.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return code if stopped_cleanly else EXIT_FAILED


class Demo:
    def __init__(self, options: DemoOptions) -> None:
        self.options = options
        self.runners: list[web.AppRunner] = []
        self.proxy: asyncio.subprocess.Process | None = None
        self.log_path = options.directory / "proxy.log"

    async def run(self) -> int:
        opts = self.options
        if not 1 <= opts.port <= 65535:
            raise DemoError(f"--port must be 1-65535, got {opts.port}", EXIT_USAGE)
        if not _port_free(opts.port):
            raise DemoError(
                f"port {opts.port} on {LOOPBACK} is already in use; "
                f"try `{cli_name()} demo --port {_suggest_port(opts.port)}`",
                EXIT_USAGE,
            )
        admin_port = _admin_port(opts.port)
        opts.directory.mkdir(parents=True, exist_ok=True)
        primary_url = await self._start_model("primary")
        candidate_url = await self._start_model("candidate")
        routes = DemoRoutes(
            directory=opts.directory,
            port=opts.port,
            admin_port=admin_port,
            primary_url=primary_url,
            candidate_url=candidate_url,
        )
        write_routes(routes)
        token = os.environ.get(TOKEN_ENV) or f"demo-{secrets.token_hex(8)}"
        await self._start_proxy(routes, token)
        await self._wait_ready(admin_port)
        print(f"proxy on http://{LOOPBACK}:{opts.port}  (admin http://{LOOPBACK}:{admin_port})")
        first_id = await asyncio.to_thread(max_record_id, routes.database)
        if opts.requests:
            await self._send_traffic(opts.port, opts.requests)
            summary = await self._wait_recorded(routes.database, first_id, opts.requests)
            print_summary(summary, opts.requests)
        print_instructions(routes, token, token_from_env=TOKEN_ENV in os.environ)
        if opts.exit_after_traffic:
            return EXIT_OK
        print("serving; press Ctrl-C to stop", flush=True)
        assert self.proxy is not None
        code = await self.proxy.wait()
        raise DemoError(f"the proxy exited unexpectedly (exit code {code}){self._log_tail()}")

    async def _start_model(self, role: str) -> str:
        app = build_model_app(role)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self.runners.append(runner)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, 0))
        await web.SockSite(runner, sock).start()
        url = f"http://{LOOPBACK}:{sock.getsockname()[1]}"
        model = app[MODEL_KEY]
        print(f"{role:9} model {model.version:15} on {url}  (+{model.latency_s * 1000:.0f} ms)")
        return url

    async def _start_proxy(self, routes: DemoRoutes, token: str) -> None:
        env = dict(os.environ)
        env[TOKEN_ENV] = token
        env.pop("SHADOWPROXY_DATABASE_URL", None)  # the demo always records to its own SQLite
        env.pop("SHADOWPROXY_CONFIG", None)
        command = [sys.executable, "-m", "shadowproxy", "serve", "--config", str(routes.path)]
        command += ["--port", str(routes.port)]
        log = _open_log(self.log_path)
        try:
            self.proxy = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        finally:
            log.close()
        print(f"proxy     pid {self.proxy.pid}, logs in {self.log_path}")

    async def _wait_ready(self, admin_port: int) -> None:
        assert self.proxy is not None
        url = f"http://{LOOPBACK}:{admin_port}/readyz"
        deadline = time.monotonic() + READY_TIMEOUT_S
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < deadline:
                if self.proxy.returncode is not None:
                    raise DemoError(
                        f"the proxy exited at start-up (exit code {self.proxy.returncode})"
                        f"{self._log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise DemoError(f"the proxy was not ready after {READY_TIMEOUT_S:.0f} s{self._log_tail()}")

    async def _send_traffic(self, port: int, count: int) -> None:
        url = f"http://{LOOPBACK}:{port}/predict"
        statuses: dict[str, int] = {}
        gate = asyncio.Semaphore(CONCURRENCY)
        started = time.monotonic()

        async def one(session: aiohttp.ClientSession, instance: list[float]) -> None:
            async with gate:
                try:
                    async with session.post(url, json={"instances": [instance]}) as response:
                        await response.read()
                        outcome = str(response.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcome = type(exc).__name__
            statuses[outcome] = statuses.get(outcome, 0) + 1

        print(f"sending {count} requests to {url} ...", flush=True)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(one(session, row) for row in sample_instances(count)))
        elapsed = time.monotonic() - started
        outcomes = ", ".join(f"{n} x {s}" for s, n in sorted(statuses.items()))
        print(f"sent {count} requests in {elapsed:.1f} s: {outcomes}")

    async def _wait_recorded(self, database: Path, first_id: int, expected: int) -> Summary:
        deadline = time.monotonic() + RECORDS_TIMEOUT_S
        summary = await asyncio.to_thread(read_summary, database, first_id)
        while summary.rows < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            summary = await asyncio.to_thread(read_summary, database, first_id)
        return summary

    async def close(self) -> bool:
        """Stop the proxy (SIGTERM, then SIGKILL after a while) and the models.

        False when the proxy we stopped did not exit 0; that is reported here.
        """
        clean = True
        if self.proxy is not None and self.proxy.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proxy.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.wait_for(self.proxy.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                print(
                    f"the proxy did not stop in {STOP_TIMEOUT_S:.0f} s; killing it", file=sys.stderr
                )
                with contextlib.suppress(ProcessLookupError):
                    self.proxy.kill()
                code = await self.proxy.wait()
            if code != 0:
                print(
                    f"the proxy exited with code {code} while stopping{self._log_tail()}",
                    file=sys.stderr,
                )
                clean = False
        for runner in reversed(self.runners):
            await runner.cleanup()
        self.runners.clear()
        return clean

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        if not tail:
            return ""
        return f"; last lines of {self.log_path}:\n" + "\n".join(f"  {line}" for line in tail)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port


def _suggest_port(taken: int) -> int:
    for candidate in range(taken + 1, min(taken + 50, 65536)):
        if _port_free(candidate):
            return candidate
    return _free_port()


def _admin_port(port: int) -> int:
    preferred = port + ADMIN_PORT_OFFSET
    if preferred <= 65535 and _port_free(preferred):
        return preferred
    return _free_port()


def _open_log(path: Path) -> IO[bytes]:
    return path.open("ab")
