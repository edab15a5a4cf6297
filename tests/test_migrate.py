"""Migrations: versioned, idempotent, serialised across concurrent replicas; `db` command."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from shadowproxy.storage.migrate import db_command, latest_version, migrate, schema_status


@pytest.mark.postgres
async def test_concurrent_migrations_serialise(postgres_url: str) -> None:
    assert (await schema_status(postgres_url))["pending"] == [1]
    versions = await asyncio.gather(*(migrate(postgres_url) for _ in range(8)))
    assert versions == [latest_version("postgres")] * 8
    conn = await asyncpg.connect(postgres_url, timeout=5)
    try:
        applied = await conn.fetch("SELECT version FROM shadowproxy_schema")
        indexes = {r["indexname"] for r in await conn.fetch("SELECT indexname FROM pg_indexes")}
    finally:
        await conn.close()
    assert [r["version"] for r in applied] == [1]
    assert {"shadow_log_request_shadow_uq", "shadow_log_route_shadow_ts_idx"} <= indexes
    status = await schema_status(postgres_url)
    assert status == {"backend": "postgresql", "version": 1, "latest": 1, "pending": []}


async def test_sqlite_concurrent_migrations(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/m.db"
    assert (await schema_status(url))["version"] == 0
    assert await asyncio.gather(*(migrate(url) for _ in range(6))) == [1] * 6
    assert (await schema_status(url))["pending"] == []


@pytest.mark.postgres
def test_db_command_migrate_and_status(
    postgres_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = str(tmp_path / "absent.yaml")  # with --database-url the config is optional
    assert db_command("status", config_path=missing, database_url=postgres_url) == 0
    assert "schema version 0 of 1, 1 pending" in capsys.readouterr().out
    assert db_command("migrate", config_path=missing, database_url=postgres_url) == 0
    assert "schema at version 1" in capsys.readouterr().out
    assert db_command("status", config_path=missing, database_url=postgres_url) == 0
    assert "up to date" in capsys.readouterr().out


def test_db_command_bad_or_unreachable_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert db_command("migrate", config_path="x", database_url="mysql://h/db") == 2
    assert "unknown scheme 'mysql'" in capsys.readouterr().err
    url = "postgresql://postgres:secret@127.0.0.1:1/db"
    assert db_command("migrate", config_path="x", database_url=url) == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and "secret" not in err
