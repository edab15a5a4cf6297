"""Header rules of a reverse proxy (RFC 9110 §7.6.1 hop-by-hop), pure functions."""

from __future__ import annotations

import re
import secrets

from multidict import CIMultiDict, CIMultiDictProxy

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


def _connection_named(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("Connection", ()):
        named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


def end_to_end(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], drop: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """Copy of ``headers`` without hop-by-hop ones, those named in Connection, and ``drop``."""
    named = _connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named or lower in drop:
            continue
        out.add(name, value)
    return out


def request_id_from(headers: CIMultiDictProxy[str]) -> str:
    """The client's X-Request-ID when it is sane (printable ASCII, ≤128 chars), else a new one."""
    given = headers.get(REQUEST_ID)
    if given is not None and _REQUEST_ID_OK.match(given):
        return given
    return secrets.token_hex(16)  # as random as uuid4().hex, without building a UUID


def forwarded_for(existing: str | None, peer: str | None) -> str:
    if not peer:
        return existing or ""
    return f"{existing}, {peer}" if existing else peer
