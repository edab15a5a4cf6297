"""Shared fixtures. PostgreSQL tests get a throw-away database each.

The server is ``$SHADOWPROXY_TEST_DATABASE_URL`` (default
postgresql://postgres@127.0.0.1:5432/postgres); each test creates its own
database there and drops it afterwards. Without a reachable server the tests
skip locally, but fail when CI=true: CI never hides a missing database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def _server_url() -> str:
    return os.environ.get("SHADOWPROXY_TEST_DATABASE_URL", DEFAULT_PG)


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for this test; its URL."""
    server = _server_url()
    try:
        admin = await asyncpg.connect(server, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL at {server} is unreachable in CI: {exc!r}")
        pytest.skip(f"PostgreSQL at {server} unreachable: {exc!r}")
    name = f"shadowproxy_test_{uuid.uuid4().hex[:12]}"
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield _with_database(server, name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
