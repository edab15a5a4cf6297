"""Test helpers for the recording tests: synthetic records and exchanges, a TCP forwarder."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import asyncpg

from shadowproxy.config.settings import CompareSettings
from shadowproxy.pairs.observation import Exchange, Observation, RequestSnapshot
from shadowproxy.storage.record import Comparison, DiffEntry, Record


def make_record(
    i: int, *, shadow: str = "model-v2", ts: float = 1_790_000_000.0, **kw: Any
) -> Record:
    base = Record(
        request_id=f"req-{i:08d}",
        ts=ts + i * 0.001,
        route="sentiment",
        method="POST",
        path="/predict",
        query="x=1",
        request_headers={"content-type": "application/json", "authorization": "[REDACTED]"},
        request_body='{"text": "great"}',
        primary_upstream="model-v1",
        primary_status=200,
        primary_latency_ms=12.5,
        primary_body='{"label": "pos", "score": 0.9}',
        primary_label="pos",
        primary_score=0.9,
        shadow_upstream=shadow,
        shadow_status=200,
        shadow_latency_ms=20.25,
        shadow_body='{"label": "neg", "score": 0.4}',
        shadow_label="neg",
        shadow_score=0.4,
        shadow_error=None,
        agreement=False,
        diff=[{"path": "label", "primary": "pos", "shadow": "neg"}],
        instance="test-1",
        config_sha="abc123",
    )
    return replace(base, **kw)


def make_exchange(
    *,
    request_body: bytes = b'{"input": {"ssn": "123-45-6789", "text": "hi"}}',
    primary_body: bytes = b'{"label": "pos"}',
    shadow_body: bytes = b'{"label": "neg"}',
    headers: tuple[tuple[str, str], ...] = (
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer secret-token"),
        ("Cookie", "session=abc"),
    ),
    shadow_truncated: bool = False,
    shadow_error: str | None = None,
) -> Exchange:
    request = RequestSnapshot(
        request_id="req-1",
        ts=1_790_000_000.5,
        route="sentiment",
        method="POST",
        path="/predict",
        query="a=1",
        headers=headers,
        body=request_body,
    )
    primary = Observation("model-v1", 200, (), primary_body, False, 10.0)
    shadow = Observation(
        "model-v2", 200 if shadow_error is None else None, (), shadow_body, shadow_truncated, 30.0,
        shadow_error,
    )  # fmt: skip
    return Exchange(request, primary, shadow, CompareSettings(label="label"), "sha-1")


def make_comparison(**kw: Any) -> Comparison:
    base = Comparison(
        outcome="disagree",
        agreement=False,
        primary_label="pos",
        shadow_label="neg",
        primary_score=None,
        shadow_score=None,
        shadow_error=None,
        diff=(DiffEntry("label", "pos", "neg"),),
    )
    return replace(base, **kw)


class Forwarder:
    """A TCP forwarder on 127.0.0.1:<port> in front of a real server, for outage tests.

    ``refuse()`` closes the listening socket (new connections are refused) and
    aborts every established connection; ``accept()`` listens again on the same port.
    While ``mute_replies`` is set the server's bytes are swallowed: the server
    does the work (a COMMIT commits) but the client never hears back.
    ``mute_on = b"COMMIT\\x00"`` swallows the first server reply that contains it
    (the CommandComplete of a COMMIT: the transaction is durable, its
    acknowledgement is lost) and sets ``mute_replies``.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self.connections = 0
        self.mute_replies = False
        self.mute_on: bytes | None = None

    async def accept(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def refuse(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def _from_server(self, data: bytes) -> bool:
        if self.mute_on is not None and self.mute_on in data:
            self.mute_on = None
            self.mute_replies = True
        return not self.mute_replies

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pipes = [
            asyncio.create_task(_pipe(reader, up_writer, lambda _: True)),
            asyncio.create_task(_pipe(up_reader, writer, self._from_server)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            self._pipes.difference_update(pipes)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, forward: Callable[[bytes], bool]
) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            if not forward(data):
                continue
            writer.write(data)
            await writer.drain()


async def shadow_log_counts(url: str) -> tuple[int, int]:
    """Rows in shadow_log, and distinct (request_id, shadow_upstream) pairs among them."""
    conn = await asyncpg.connect(url, timeout=5)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT (request_id, shadow_upstream)) AS d FROM shadow_log"
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row["n"]), int(row["d"])
