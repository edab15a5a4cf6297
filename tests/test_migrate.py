"""Migrations: versioned, idempotent, serialised across concurrent replicas; `db` command."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from shadowproxy.commands.db import db_command
from shadowproxy.storage.migrate import latest_version, migrate, schema_status
from shadowproxy.storage.sqlite import SqliteStore


@pytest.mark.postgres
async def test_concurrent_migrations_serialise(postgres_url: str) -> None:
    assert (await schema_status(postgres_url))["pending"] == [1, 2]
    versions = await asyncio.gather(*(migrate(postgres_url) for _ in range(8)))
    assert versions == [latest_version("postgres")] * 8
    conn = await asyncpg.connect(postgres_url, timeout=5)
    try:
        applied = await conn.fetch("SELECT version FROM shadowproxy_schema")
        indexes = {r["indexname"] for r in await conn.fetch("SELECT indexname FROM pg_indexes")}
        compression = {
            r["attname"]: r["attcompression"]
            for r in await conn.fetch(
                "SELECT attname, attcompression FROM pg_attribute"
                " WHERE attrelid = 'shadow_log'::regclass AND attname LIKE '%body'"
            )
        }
    finally:
        await conn.close()
    assert sorted(r["version"] for r in applied) == [1, 2]
    # v2: bodies compressed with lz4 (4x faster COPY of large bodies than pglz)
    assert compression == {"request_body": b"l", "primary_body": b"l", "shadow_body": b"l"}
    assert {"shadow_log_request_shadow_uq", "shadow_log_route_shadow_ts_idx"} <= indexes
    status = await schema_status(postgres_url)
    assert status == {"backend": "postgresql", "version": 2, "latest": 2, "pending": []}


# Replicas starting together on one new SQLite file: WORKERS processes released
# at once by a barrier, ROUNDS times, each round on a fresh file. Even workers
# run `shadowproxy db migrate`'s path, odd ones open a SqliteStore.
WORKERS = 8
ROUNDS = 30
# Round 0 widens the race window so that it reproduces every time: the test
# holds the write lock on the fresh file (as a replica part-way through
# switching it to WAL does) for HOLD_S after the barrier, well under the 5 s
# busy timeout. Before the fix every worker failed at once with "database is
# locked"; the free-running rounds failed a few percent of the time each.
HOLD_S = 0.3
BARRIER_TIMEOUT_S = 30.0


def _migrate_worker(
    index: int, paths: list[str], barrier: Any, results: multiprocessing.Queue[Any]
) -> None:
    """One replica: per round, wait at the barrier, then migrate/open the fresh file."""
    for round_, path in enumerate(paths):
        barrier.wait(BARRIER_TIMEOUT_S)
        try:
            outcome: object = asyncio.run(_open_or_migrate(index, path))
        except Exception as exc:  # reported to the test, which asserts there are none
            outcome = repr(exc)
        results.put((round_, index, outcome))


async def _open_or_migrate(index: int, path: str) -> object:
    if index % 2 == 0:
        return await migrate(f"sqlite:///{path}")
    store = SqliteStore(path)
    await store.open()
    await store.close()
    return "opened"


def test_sqlite_concurrent_migrations(tmp_path: Path) -> None:
    paths = [str(tmp_path / f"round{n}.db") for n in range(ROUNDS)]
    assert asyncio.run(schema_status(f"sqlite:///{paths[0]}"))["version"] == 0
    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded pytest
    barrier = ctx.Barrier(WORKERS + 1)  # the test is a party too: rounds stay in step
    results: multiprocessing.Queue[Any] = ctx.Queue()
    workers = [
        ctx.Process(target=_migrate_worker, args=(i, paths, barrier, results), daemon=True)
        for i in range(WORKERS)
    ]
    for worker in workers:
        worker.start()
    try:
        outcomes = []
        for round_, path in enumerate(paths):
            holder = None
            if round_ == 0:
                holder = sqlite3.connect(path, isolation_level=None)
                holder.execute("BEGIN IMMEDIATE")  # the write lock on the fresh file
            barrier.wait(BARRIER_TIMEOUT_S)
            if holder is not None:
                time.sleep(HOLD_S)
                holder.execute("ROLLBACK")
                holder.close()
            outcomes += [results.get(timeout=BARRIER_TIMEOUT_S) for _ in workers]
    finally:
        barrier.abort()  # a worker still waiting (after a failure here) gives up
        for worker in workers:
            worker.join(BARRIER_TIMEOUT_S)
            if worker.is_alive():
                worker.kill()
    expected = {0: 1, 1: "opened"}
    failures = sorted(o for o in outcomes if o[2] != expected[o[1] % 2])
    held = sum(1 for f in failures if f[0] == 0)
    assert not failures, (
        f"{len(failures)} of {len(outcomes)} failed ({held} of {WORKERS} in the held round): "
        f"{failures[:3]}"
    )
    assert [w.exitcode for w in workers] == [0] * WORKERS
    for path in paths:
        url = f"sqlite:///{path}"
        assert asyncio.run(schema_status(url)) == {
            "backend": "sqlite", "version": 1, "latest": 1, "pending": []
        }  # fmt: skip
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            # Applied exactly once, whichever worker won.
            assert conn.execute("SELECT version FROM shadowproxy_schema").fetchall() == [(1,)]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        finally:
            conn.close()
        assert {"shadow_log", "shadow_promotions", "shadow_log_request_shadow_uq"} <= tables


@pytest.mark.postgres
def test_db_command_migrate_and_status(
    postgres_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "absent.yaml")  # with --database-url the config is optional
    assert db_command("status", config_path=missing, database_url=postgres_url) == 0
    assert "schema version 0 of 2, 2 pending" in capsys.readouterr().out
    assert db_command("migrate", config_path=missing, database_url=postgres_url) == 0
    assert "schema at version 2" in capsys.readouterr().out
    assert db_command("status", config_path=missing, database_url=postgres_url) == 0
    assert "up to date" in capsys.readouterr().out


def test_db_command_bad_or_unreachable_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert db_command("migrate", config_path="x", database_url="mysql://h/db") == 2
    assert "unknown scheme 'mysql'" in capsys.readouterr().err
    url = "postgresql://postgres:secret@127.0.0.1:1/db"
    assert db_command("migrate", config_path="x", database_url=url) == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and "secret" not in err
