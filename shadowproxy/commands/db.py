"""`shadowproxy db migrate|status`: the schema of the configured store."""

from __future__ import annotations

import asyncio
import sys

from shadowproxy.base.errors import StorageUnavailable, UsageError
from shadowproxy.base.exits import EXIT_OK, EXIT_USAGE
from shadowproxy.config.load import load_settings
from shadowproxy.storage.migrate import latest_version, migrate, schema_status
from shadowproxy.storage.urls import display_url, parse_store_url


def db_command(action: str, *, config_path: str, database_url: str | None) -> int:
    """``shadowproxy db migrate|status``: one line on stdout; 0 ok, 2 bad URL or unreachable.

    ``database_url`` overrides the config's storage.url; given it, the config is optional.
    """
    url = database_url or _config_storage_url(config_path)
    shown = display_url(url)
    try:
        if action == "migrate":
            version = asyncio.run(migrate(url))
            print(f"{shown}: schema at version {version} (latest {_latest_for(url)})")
        elif action == "status":
            status = asyncio.run(schema_status(url))
            pending = status["pending"]
            state = (
                f"{len(pending)} pending, run `shadowproxy db migrate`" if pending else "up to date"
            )
            print(f"{shown}: schema version {status['version']} of {status['latest']}, {state}")
        else:
            raise UsageError(f"unknown db action {action!r}; expected migrate or status")
    except (UsageError, StorageUnavailable) as exc:
        print(f"shadowproxy db {action}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _latest_for(url: str) -> int:
    backend = parse_store_url(url).backend
    return (
        0
        if backend == "jsonl"
        else latest_version("postgres" if backend == "postgresql" else "sqlite")
    )


def _config_storage_url(config_path: str) -> str:
    return load_settings(config_path).storage.url
