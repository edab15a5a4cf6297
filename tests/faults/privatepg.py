"""A private PostgreSQL cluster for tests that stop the server (never the shared one)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.proxyharness import free_port

BIN = Path("/usr/lib/postgresql/15/bin")


class PrivateCluster:
    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        command = [str(BIN / "pg_ctl"), "-D", str(self.directory / "data"), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg_ctl("-o", options, "-l", str(self.directory / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "-w", "stop")


@contextmanager
def private_cluster() -> Iterator[PrivateCluster]:
    if not (BIN / "initdb").exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{BIN}/initdb is missing in CI")
        pytest.skip("PostgreSQL server binaries not installed")
    directory = Path(tempfile.mkdtemp(prefix="shadowproxy-pg-"))
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")  # initdb refuses to run as root
    initdb = [
        str(BIN / "initdb"),
        "-D",
        str(directory / "data"),
        "-A",
        "trust",
        "-U",
        "postgres",
        "--no-sync",
    ]
    if os.geteuid() == 0:
        initdb = ["runuser", "-u", "postgres", "--", *initdb]
    subprocess.run(initdb, check=True, capture_output=True, timeout=120)
    cluster = PrivateCluster(directory, free_port())
    cluster.start()
    try:
        yield cluster
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            cluster.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)
