"""Header rules of a reverse proxy (RFC 9110 §7.6.1 hop-by-hop), pure functions."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
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


# RFC 3986 §3.2.2 host and §3.2.3 port: an IP literal, or reg-name characters only (no
# userinfo '@', no path or query), as nginx accepts it.
_HOST_OK = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(:[0-9]*)?")
_REASON_OK = re.compile(r"[\x20-\x7e]*")
_HTTP_1 = ((1, 0), (1, 1))


def request_refusal(
    method: str,
    version: tuple[int, int],
    raw_path: str,
    path: str,
    headers: Mapping[str, str],
    raw_headers: Iterable[tuple[bytes, bytes]],
) -> tuple[int, str] | None:
    """(status, why) for a request the proxy must answer itself and never forward, or None.

    These are what aiohttp's parser (3.14) lets through but a reverse proxy must not pass on.
    """
    if version not in _HTTP_1:
        return 505, f"HTTP/{version[0]}.{version[1]} is not supported"
    if method == "CONNECT":
        return 400, "CONNECT is not supported"
    if not raw_path.startswith("/"):
        # Absolute-form or authority-form targets: the upstream is chosen by config only.
        return 400, "request target must be an absolute path"
    if not b"".join(name + value for name, value in raw_headers).isascii():
        # aiohttp's client would silently drop the non-ASCII bytes: refuse rather than alter.
        return 400, "request headers contain non-ASCII bytes"
    coding = headers.get("Transfer-Encoding")
    if coding is not None:
        if version == (1, 0):
            return 400, "Transfer-Encoding in an HTTP/1.0 request"  # RFC 9112 §6.1
        if coding.strip().lower() != "chunked":
            return 501, f"transfer-coding {coding!r} is not supported"
    host = headers.get("Host")
    if host is not None and not _HOST_OK.fullmatch(host):
        return 400, "invalid Host header"
    if has_dot_segment(path):
        return 400, "request path contains dot-segments"
    return None


def has_dot_segment(decoded_path: str) -> bool:
    """True for '.' or '..' segments (also percent-encoded, or behind an encoded slash or a
    backslash): routing matches the path as sent, and an upstream that resolves them would
    reach what no route allows."""
    if "." not in decoded_path:
        return False
    segments = decoded_path.replace("\\", "/").split("/")
    return "." in segments or ".." in segments


def printable_reason(reason: str | None) -> str | None:
    """The upstream's reason phrase when it is printable ASCII, else None (the standard one)."""
    return reason if reason and _REASON_OK.fullmatch(reason) else None
