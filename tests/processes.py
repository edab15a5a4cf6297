"""Run `shadowproxy serve` as a real process for end-to-end tests; always cleaned up by PID."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp

from tests.proxyharness import free_port


class ServeProcess:
    def __init__(self, config: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        self.log = config.parent / f"serve-{self.port}.log"
        argv = [
            sys.executable, "-m", "shadowproxy", "serve", "--config", str(config),
            "--host", "127.0.0.1", "--port", str(self.port), "--admin-port", str(self.admin_port), *extra,
        ]  # fmt: skip
        self._log_file = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, stdout=self._log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def ready(self, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout), aiohttp.ClientSession() as client:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"serve exited with {self.proc.returncode}:\n{self.output()}"
                    )
                try:
                    async with client.get(self.admin + "/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def wait(self, timeout: float = 30.0) -> int:
        return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()


@contextmanager
def serve(config: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[ServeProcess]:
    process = ServeProcess(config, *extra, env=env)
    try:
        yield process
    finally:
        process.stop()
