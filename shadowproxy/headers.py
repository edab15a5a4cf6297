"""Header rules of a reverse proxy (RFC 9110 §7.6.1 hop-by-hop), pure functions."""

from __future__ import annotations

import re
from collections.abc import Iterable
from random import getrandbits

HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
REQUEST_ID = "X-Request-ID"
MAX_REQUEST_ID = 128
_REQUEST_ID_OK = re.compile(r"^[\x21-\x7e]{1,128}$")


def end_to_end(
    headers: Iterable[tuple[str, str]], drop: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """``headers`` without hop-by-hop ones, those named in Connection, and ``drop``."""
    out: list[tuple[str, str]] = []
    named: set[str] = set()
    for name, value in headers:
        lower = name.lower()
        if lower == "connection":
            named.update(token.strip().lower() for token in value.split(",") if token.strip())
        elif lower not in HOP_BY_HOP and lower not in drop:
            out.append((name, value))
    if named:
        out = [(name, value) for name, value in out if name.lower() not in named]
    return out


def request_id_from(given: str | None) -> str:
    """The client's X-Request-ID when it is sane (printable ASCII, ≤128 chars), else a new one."""
    if given is not None and _REQUEST_ID_OK.match(given):
        return given
    return new_request_id()


def new_request_id() -> str:
    # 128 random bits as hex, like uuid4().hex. Not from the OS (a syscall per request): an id
    # needs to be unique, not secret; clients choose their own ids anyway.
    return f"{getrandbits(128):032x}"


def forwarded_for(existing: str | None, peer: str | None) -> str:
    if not peer:
        return existing or ""
    return f"{existing}, {peer}" if existing else peer
