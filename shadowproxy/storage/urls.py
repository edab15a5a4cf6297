"""Parse ``storage.url``: which backend, and where."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from shadowproxy.base.errors import UsageError

URL_FORMS = (
    "postgresql://user@host:5432/db, sqlite:///relative.db, sqlite:////absolute.db "
    "or jsonl:///path/to/dir"
)


@dataclass(frozen=True, slots=True)
class StoreURL:
    backend: str  # "postgresql" | "sqlite" | "jsonl"
    target: str  # the DSN for PostgreSQL, a file or directory path otherwise


def parse_store_url(url: str) -> StoreURL:
    """Raises UsageError naming the URL and the accepted forms."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise UsageError(f"storage url {display_url(url)!r} has no scheme; expected {URL_FORMS}")
    if scheme in ("postgresql", "postgres"):
        return StoreURL("postgresql", url)
    if scheme in ("sqlite", "jsonl"):
        # sqlite:///rel.db -> "/rel.db" -> relative; sqlite:////abs.db -> "//abs.db" -> absolute.
        if not rest.startswith("/") or len(rest) < 2:
            raise UsageError(
                f"storage url {url!r} needs a path after {scheme}:///; expected {URL_FORMS}"
            )
        path = rest[1:]
        return StoreURL(scheme, os.path.abspath(path) if not path.startswith("/") else path)
    raise UsageError(
        f"storage url {display_url(url)!r}: unknown scheme {scheme!r}; expected {URL_FORMS}"
    )


def display_url(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
