"""Storage backends behind one small protocol (``base.Store``), chosen by URL."""

from __future__ import annotations

import os
import socket

from shadowproxy.storage.base import PromotionRecord, Store
from shadowproxy.storage.urls import parse_store_url

__all__ = ["PromotionRecord", "Store", "default_instance", "open_store"]


def default_instance() -> str:
    """hostname-pid: unique per worker process, stable for its lifetime."""
    return f"{socket.gethostname()}-{os.getpid()}"


def open_store(url: str, *, instance: str | None = None) -> Store:
    """The store for ``url`` (not yet opened: call ``await store.open()``).

    ``postgresql://…``/``postgres://…``, ``sqlite:///rel.db`` (relative to the
    working directory) or ``sqlite:////abs.db``, ``jsonl:///dir`` (same rule).
    Raises UsageError for anything else, naming the accepted forms.
    """
    target = parse_store_url(url)
    if target.backend == "postgresql":
        from shadowproxy.storage.postgres import PostgresStore

        return PostgresStore(target.target)
    if target.backend == "sqlite":
        from shadowproxy.storage.sqlite import SqliteStore

        return SqliteStore(target.target)
    from shadowproxy.storage.jsonl import JsonlStore

    return JsonlStore(target.target, instance=instance or default_instance())
