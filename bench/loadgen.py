"""Open-loop fixed-rate HTTP/1.1 load generator without coordinated omission.

Request i is due at ``t0 + i / rate``; its latency is measured from that due time, not from
when it was actually sent, so a stalled server (or a stalled connection) shows up in the
percentiles instead of silently slowing the generator down. Requests go over a keep-alive
connection pool (idle connections reused last-in first-out; a new connection is opened while
fewer than ``--connections`` exist, otherwise the request waits for one - still on the clock).

A request that gets no complete response within ``--timeout`` of its due time is an error
("timeout"); its connection is closed. Errors keep their latency (time until the error) in
the percentiles: an open-loop generator must not drop the slow tail. Non-2xx responses are
counted as errors too (``status_<code>``).

The body is ``--body`` (a small JSON document by default) or the bytes of ``--body-file``
(the harness's 32 KiB and 1 MiB bodies: too long for a command-line argument), POSTed to
``--path``.

Also ``--sequential N``: N requests one after the other on ONE keep-alive connection
(the nginx ``mirror`` keep-alive stall test); reports the total time.

Prints one JSON object on stdout. Uses uvloop when available and raw asyncio protocols
(a minimal response parser: Content-Length, chunked, or close-delimited bodies).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, cast

DEFAULT_BODY = b'{"inputs":[[5.1,3.5,1.4,0.2]],"id":"bench"}'


class HttpError(Exception):
    """A request that failed before a complete response arrived."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class _Conn(asyncio.Protocol):
    """One HTTP/1.1 client connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.closed = False
        self.reusable = True

    # asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is not None and not self.waiter.done():
            self._try_complete(eof=False)

    def eof_received(self) -> bool | None:
        if self.waiter is not None and not self.waiter.done():
            self._try_complete(eof=True)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self._try_complete(eof=True)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpError("reset"))

    # ------------------------------------------------------------------------------------
    def request(self, payload: bytes) -> asyncio.Future[int]:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.buf.clear()
        self.waiter = loop.create_future()
        self.transport.write(payload)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _try_complete(self, eof: bool) -> None:
        buf = self.buf
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = bytes(buf[:head_end]).decode("latin-1").split("\r\n")
        parts = head[0].split(" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            self._fail("protocol")
            return
        length: int | None = None
        chunked = False
        for line in head[1:]:
            name, _, value = line.partition(":")
            lname = name.strip().lower()
            if lname == "content-length":
                length = int(value.strip())
            elif lname == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif lname == "connection" and "close" in value.lower():
                self.reusable = False
        body_start = head_end + 4
        if status in (204, 304) or 100 <= status < 200:
            length = 0
        if chunked:
            if not self._chunked_complete(body_start):
                if eof:
                    self._fail("protocol")
                return
        elif length is not None:
            if len(buf) - body_start < length:
                if eof:
                    self._fail("protocol")
                return
        else:  # close-delimited body
            self.reusable = False
            if not eof:
                return
        waiter = self.waiter
        assert waiter is not None
        waiter.set_result(status)

    def _chunked_complete(self, pos: int) -> bool:
        buf = self.buf
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return False
            try:
                size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
            except ValueError:
                return False
            pos = eol + 2
            if size == 0:
                if buf[pos : pos + 2] == b"\r\n":
                    return True
                return buf.find(b"\r\n\r\n", pos) >= 0
            pos += size + 2
            if pos > len(buf):
                return False

    def _fail(self, kind: str) -> None:
        self.reusable = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpError(kind))


@dataclass
class _Pool:
    host: str
    port: int
    max_conns: int
    idle: list[_Conn] = field(default_factory=list)
    waiting: collections.deque[asyncio.Future[_Conn | None]] = field(
        default_factory=collections.deque
    )
    total: int = 0
    opened: int = 0

    async def acquire(self) -> _Conn:
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                return conn
            self.total -= 1
        if self.total < self.max_conns:
            self.total += 1
            self.opened += 1
            try:
                loop = asyncio.get_running_loop()
                _, proto = await loop.create_connection(_Conn, self.host, self.port)
            except OSError as exc:
                self.total -= 1
                self._wake()
                raise HttpError("connect") from exc
            except BaseException:  # cancelled by the request's deadline
                self.total -= 1
                self._wake()
                raise
            return proto
        fut: asyncio.Future[_Conn | None] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        try:
            handed_over = await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed over just as the deadline hit
                handed = fut.result()
                if handed is None:
                    self._wake()
                else:
                    self.release(handed, ok=True)
            raise
        if handed_over is None:  # a slot was freed: open a new connection
            return await self.acquire()
        return handed_over

    def release(self, conn: _Conn, ok: bool) -> None:
        if ok and conn.reusable and not conn.closed:
            while self.waiting:
                fut = self.waiting.popleft()
                if not fut.done():
                    fut.set_result(conn)
                    return
            self.idle.append(conn)
            return
        conn.close()
        self.total -= 1
        self._wake()

    def _wake(self) -> None:
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


def build_request(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n*q/100)
    return sorted_values[min(len(sorted_values), int(rank)) - 1]


def summarize(latencies_s: list[float]) -> dict[str, float | None]:
    ms = sorted(x * 1000.0 for x in latencies_s)
    return {
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": ms[-1] if ms else None,
    }


async def _one(
    pool: _Pool,
    payload: bytes,
    due: float,
    req_timeout: float,
    latencies: list[float],
    errors: collections.Counter[str],
    ok_count: list[int],
) -> None:
    deadline = due + req_timeout
    conn: _Conn | None = None
    try:
        conn = await asyncio.wait_for(pool.acquire(), max(0.0, deadline - time.perf_counter()))
        status = await asyncio.wait_for(
            conn.request(payload), max(0.0, deadline - time.perf_counter())
        )
    except (TimeoutError, HttpError, OSError) as exc:
        kind = exc.kind if isinstance(exc, HttpError) else "timeout"
        if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
            kind = "connect"
        errors[kind] += 1
        latencies.append(time.perf_counter() - due)
        if conn is not None:
            pool.release(conn, ok=False)
        return
    latencies.append(time.perf_counter() - due)
    pool.release(conn, ok=True)
    if 200 <= status < 300:
        ok_count[0] += 1
    else:
        errors[f"status_{status}"] += 1


async def open_loop(
    host: str,
    port: int,
    path: str,
    body: bytes,
    rate: float,
    duration: float,
    req_timeout: float,
    max_conns: int,
    spin: float = 0.0,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    payload = build_request(host, port, path, body)
    pool = _Pool(host, port, max_conns)
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    ok_count = [0]
    total = int(rate * duration)
    tasks: set[asyncio.Task[None]] = set()
    lags: list[float] = []
    t0 = time.perf_counter() + 0.05
    for i in range(total):
        due = t0 + i / rate
        # Event-loop timers have 1 ms granularity: sleep to just before the due time, then
        # yield (spin) until it; `spin` bounds the busy part.
        delay = due - time.perf_counter()
        if delay > spin:
            await asyncio.sleep(delay - spin)
        while time.perf_counter() < due:  # noqa: ASYNC110 - a deliberate short spin
            await asyncio.sleep(0)
        lags.append(max(0.0, time.perf_counter() - due))
        task = loop.create_task(_one(pool, payload, due, req_timeout, latencies, errors, ok_count))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    send_end = time.perf_counter()
    if tasks:
        await asyncio.wait(set(tasks), timeout=req_timeout + 1.0)
    for task in list(tasks):  # cannot happen (each request has its own deadline); be safe
        task.cancel()
    end = time.perf_counter()
    pool.close()
    elapsed = max(send_end, t0) - t0
    lags.sort()
    result: dict[str, Any] = {
        "mode": "open",
        "target_rate": rate,
        "duration_s": duration,
        "scheduled": total,
        "completed": len(latencies),
        "ok": ok_count[0],
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "rps": ok_count[0] / elapsed if elapsed > 0 else 0.0,
        "elapsed_s": end - t0,
        "connections_opened": pool.opened,
        "dispatch_lag_p50_ms": (percentile(lags, 50) or 0.0) * 1000.0,
        "dispatch_lag_p99_ms": (percentile(lags, 99) or 0.0) * 1000.0,
    }
    result.update(summarize(latencies))
    return result


async def sequential(
    host: str, port: int, path: str, body: bytes, count: int, req_timeout: float
) -> dict[str, Any]:
    """`count` requests one after the other on a single keep-alive connection."""
    loop = asyncio.get_running_loop()
    payload = build_request(host, port, path, body)
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    reconnects = 0
    start = time.perf_counter()
    conn: _Conn | None = None
    for _ in range(count):
        t = time.perf_counter()
        try:
            if conn is None or conn.closed or not conn.reusable:
                if conn is not None:
                    conn.close()
                    reconnects += 1
                _, conn = await asyncio.wait_for(
                    loop.create_connection(_Conn, host, port), req_timeout
                )
            assert conn is not None
            status = await asyncio.wait_for(conn.request(payload), req_timeout)
            if not 200 <= status < 300:
                errors[f"status_{status}"] += 1
        except (TimeoutError, HttpError, OSError) as exc:
            errors[exc.kind if isinstance(exc, HttpError) else "timeout"] += 1
            if conn is not None:
                conn.close()
        latencies.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    if conn is not None:
        conn.close()
    result: dict[str, Any] = {
        "mode": "sequential",
        "requests": count,
        "total_s": total,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "reconnects": reconnects,
    }
    result.update(summarize(latencies))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="/predict")
    ap.add_argument("--rate", type=float, default=500.0, help="requests per second")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of scheduled load")
    ap.add_argument("--timeout", type=float, default=5.0, help="per request, from its due time")
    ap.add_argument("--connections", type=int, default=64, help="max keep-alive connections")
    ap.add_argument(
        "--spin-ms", type=float, default=0.0, help="busy-wait before each due time (0: timers only)"
    )
    ap.add_argument("--sequential", type=int, default=0, help="N requests on one connection")
    ap.add_argument("--body", default=DEFAULT_BODY.decode(), help="JSON request body")
    ap.add_argument(
        "--body-file", help="read the request body from this file instead (large bodies)"
    )
    args = ap.parse_args(argv)
    run: Any = asyncio.run
    loop_name = "asyncio"
    try:
        import uvloop

        run = uvloop.run
        loop_name = "uvloop"
    except ImportError:
        pass
    if args.body_file:
        with open(args.body_file, "rb") as f:
            body = f.read()
    else:
        body = args.body.encode()
    if args.sequential > 0:
        result = run(
            sequential(args.host, args.port, args.path, body, args.sequential, args.timeout)
        )
    else:
        result = run(
            open_loop(
                args.host,
                args.port,
                args.path,
                body,
                args.rate,
                args.duration,
                args.timeout,
                args.connections,
                args.spin_ms / 1000.0,
            )
        )
    result["loop"] = loop_name
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
